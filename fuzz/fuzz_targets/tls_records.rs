//! The TLS record layer of ring connections fed any records a peer could seal (any content type,
//! length and content, in any order): the reader must end with the data sent or an error, never
//! a panic, a hang or data that was not sent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_tls::fuzzing::record_layer(data);
});
