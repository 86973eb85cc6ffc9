//! The IDX reader on arbitrary bytes, raw and as a gzip stream: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vae::data::parse_bytes(data, vae::data::MAGIC_IMAGES, "fuzz");
    let _ = vae::data::parse_bytes(data, vae::data::MAGIC_LABELS, "fuzz");
});
