//! Helpers shared by the integration tests: run the built binary in a temporary directory.
#![allow(dead_code)] // each test file uses its own subset

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn vae<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run vae")
}

pub fn ok<S: AsRef<OsStr> + Debug>(dir: &Path, args: &[S]) -> String {
    let o = vae(dir, args);
    assert!(
        o.status.success(),
        "vae {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Asserts a clean failure: non-zero exit, one `error:` line naming `needle`, no panic.
pub fn fails<S: AsRef<OsStr> + Debug>(dir: &Path, args: &[S], needle: &str) {
    let o = vae(dir, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "vae {args:?} should fail");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

pub fn metrics(run: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

pub fn data_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/mnist")
        .display()
        .to_string()
}

/// `vae train` of tiny.toml on the shipped MNIST, 300 images, quiet, then `extra` (a later
/// `--set` of the same key wins).
pub fn tiny_args(extra: &[&str]) -> Vec<String> {
    let d = format!("data.dir={}", data_dir());
    [
        "train",
        "--config",
        "tiny.toml",
        "-q",
        "--set",
        &d,
        "--set",
        "data.limit=300",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// A tiny run: 300 images, 2 epochs.
pub fn tiny(dir: &Path, extra: &[&str]) -> PathBuf {
    ok(dir, &tiny_args(extra));
    dir.join("runs/tiny")
}

/// Runs `vae args` and returns its raw standard output, asserting success.
pub fn ok_bytes(dir: &Path, args: &[&str]) -> Vec<u8> {
    let o = vae(dir, args);
    assert!(
        o.status.success(),
        "vae {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// (width, height) of PNG bytes.
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).expect("a PNG");
    (img.width(), img.height())
}
