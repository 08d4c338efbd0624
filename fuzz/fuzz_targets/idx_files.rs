#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| normlab_fuzz::idx_files(data));
