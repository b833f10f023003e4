#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stonelion_fuzz::targets::mqtt_connect(data));
