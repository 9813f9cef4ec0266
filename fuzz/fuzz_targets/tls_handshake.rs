//! The TLS handshake drivers (server and client) fed any bytes as the peer's flight: each must
//! fail within its deadline, never panic, hang or admit a peer that holds no key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_tls::fuzzing::handshake(data);
});
