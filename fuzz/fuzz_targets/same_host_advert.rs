//! The same-host advert a peer publishes in the rendezvous (which process, which word to watch),
//! parsed from any text: a malformed advert is refused, never trusted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = tandem_peer_memory::PeerMemory::parse(text);
});
