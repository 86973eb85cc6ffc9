//! The config parser on arbitrary text, with and without a `--set` override taken from it:
//! errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).to_string();
    let src = vae::config::Source { label: "fuzz.toml".into(), text: text.clone() };
    let _ = vae::config::resolve(&src, &[]);
    let empty = vae::config::Source { label: "fuzz.toml".into(), text: String::new() };
    let _ = vae::config::resolve(&empty, &[text]);
});
