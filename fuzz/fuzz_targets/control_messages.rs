//! The control messages a rank reads from the rendezvous (another rank's abort, its answer to a
//! stall inquiry), decoded from any text: a malformed one is an error, never a panic or a guess.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_collective::messages::{Abort, RankState};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(a) = Abort::decode(&text) {
        // What decodes travels back unchanged and becomes an error.
        assert_eq!(Abort::decode(&a.encode()).ok(), Some(a.clone()));
        let _ = a.into_error(std::time::Duration::from_secs(1));
    }
    if let Ok(s) = RankState::decode(&text) {
        assert_eq!(RankState::decode(&s.encode()).ok(), Some(s));
    }
});
