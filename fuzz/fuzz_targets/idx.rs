//! The IDX reader on arbitrary bytes, raw and as a gzip stream: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vae::data::idx::parse_bytes(data, vae::data::idx::MAGIC_IMAGES, "fuzz");
    let _ = vae::data::idx::parse_bytes(data, vae::data::idx::MAGIC_LABELS, "fuzz");
});
