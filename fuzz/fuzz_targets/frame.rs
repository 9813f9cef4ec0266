//! The ring's wire decoders: the connection handshake and the 32-byte operation header, fed any
//! bytes. Neither may panic; whatever decodes must encode back to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_collective::transport::frame::{HEADER_LEN, HELLO_FIXED, OpHeader, decode_hello};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = <[u8; HELLO_FIXED]>::try_from(data.get(..HELLO_FIXED).unwrap_or(&[])) {
        let _ = decode_hello(&b);
    }
    if let Ok(b) = <[u8; HEADER_LEN]>::try_from(data.get(..HEADER_LEN).unwrap_or(&[]))
        && let Ok(h) = OpHeader::decode(&b)
    {
        let again = OpHeader::decode(&h.encode()).expect("an encoded header decodes");
        assert!(again.same_call(&h) && again.seq == h.seq);
        let _ = h.to_string();
    }
});
