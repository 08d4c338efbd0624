#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| normlab_fuzz::data_dir(data));
