#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stonelion_fuzz::targets::certificate_common_name(data));
