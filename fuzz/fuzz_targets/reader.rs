//! libFuzzer target: one input = a mode byte and a body (see fuzz/src/lib.rs), checked by
//! `datafold_fuzz::check`, which panics on a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    datafold_fuzz::check(data);
});
