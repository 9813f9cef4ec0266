//! `tandem tune`'s experiment files (Katib's Experiment shape), fed any text: refused with an
//! error naming the field, or accepted; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = tandem_tune::Experiment::from_yaml(text);
});
