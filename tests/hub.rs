//! `data.source = "hub:mnist"` offline: small parquet files written here, in the layout of
//! Hugging Face's parquet conversion, into a temporary cache chosen by `HF_HUB_CACHE`. This
//! is a test binary of its own because the cache is chosen by environment variables.
//!
//!     cargo test --release --features hub --test hub
#![cfg(feature = "hub")]

use image::{GrayImage, Luma};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

/// A parquet file of rows `image: struct{bytes: binary PNG}, label: int64`.
fn parquet(path: &Path, pngs: &[Vec<u8>], labels: &[i64]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { required group image { required binary bytes; } required int64 label; }",
        )
        .unwrap(),
    );
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(path).unwrap(),
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    let bytes: Vec<ByteArray> = pngs.iter().map(|b| ByteArray::from(b.clone())).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&bytes, None, None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(labels, None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

/// A 28x28 PNG whose bright bar sits at a row set by `k`.
fn digit(k: usize) -> Vec<u8> {
    let mut img = GrayImage::new(28, 28);
    for x in 4..24 {
        img.put_pixel(x, (k % 20 + 4) as u32, Luma([255]));
        img.put_pixel(x, (k % 20 + 5) as u32, Luma([128]));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The cache entry of `repo` with `dir/{train,test}/0000.parquet` (`None`: left out).
fn cache_entry(
    cache: &Path,
    repo: &str,
    dir: &str,
    train: Option<&[Vec<u8>]>,
    test: Option<&[Vec<u8>]>,
) {
    let root = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    let refs = root.join("refs/refs/convert");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("parquet"), "0123abcd").unwrap();
    let snap = root.join("snapshots/0123abcd").join(dir);
    for (split, pngs) in [("train", train), ("test", test)] {
        if let Some(p) = pngs {
            let labels: Vec<i64> = (0..p.len() as i64).map(|i| i % 10).collect();
            parquet(&snap.join(split).join("0000.parquet"), p, &labels);
        }
    }
}

fn vae(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_CACHE", cache)
        .env("HOME", dir)
        .output()
        .unwrap()
}

fn train(dir: &Path, cache: &Path, source: &str) -> Output {
    let s = format!("data.source={source}");
    vae(
        dir,
        cache,
        &[
            "train",
            "-c",
            "tiny.toml",
            "-q",
            "--set",
            &s,
            "--set",
            "train.batch_size=10",
        ],
    )
}

fn one_line_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn mnist_and_fashion_mnist_load_offline_from_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let train_png: Vec<Vec<u8>> = (0..30).map(digit).collect();
    let test_png: Vec<Vec<u8>> = (0..10).map(|k| digit(k + 3)).collect();
    cache_entry(
        &cache,
        "ylecun/mnist",
        "mnist",
        Some(&train_png),
        Some(&test_png),
    );
    let o = train(t.path(), &cache, "hub:mnist");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("30 train, 10 test images of 28x28"), "{out}");
    let e = vae(t.path(), &cache, &["eval", "--json"]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    assert!(String::from_utf8_lossy(&e.stdout).contains("\"images\":10"));

    cache_entry(
        &cache,
        "zalando-datasets/fashion_mnist",
        "fashion_mnist",
        Some(&train_png),
        Some(&test_png),
    );
    let o = train(t.path(), &cache, "hub:fashion-mnist");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state = std::fs::read_to_string(t.path().join("runs/tiny-run2/state.json")).unwrap();
    assert!(state.contains("Ankle boot"), "the class names: {state}");
}

#[test]
fn a_missing_or_damaged_file_is_one_line() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    // Nothing cached: the refs file is named, with how to fetch.
    let o = train(t.path(), &cache, "hub:mnist");
    one_line_error(
        &o,
        "refs/refs/convert/parquet is not in the Hugging Face cache",
    );
    one_line_error(&o, "huggingface-cli download ylecun/mnist");
    // The refs file but no test file.
    let pngs: Vec<Vec<u8>> = (0..10).map(digit).collect();
    cache_entry(&cache, "ylecun/mnist", "mnist", Some(&pngs), None);
    one_line_error(
        &train(t.path(), &cache, "hub:mnist"),
        "mnist/test/0000.parquet is not in the Hugging Face cache",
    );
    // A PNG that does not decode: candle-datasets would panic; vae says it in one line.
    let mut bad = pngs.clone();
    bad[3] = b"\x89PNG\r\n\x1a\nbroken".to_vec();
    cache_entry(&cache, "ylecun/mnist", "mnist", Some(&bad), Some(&pngs));
    one_line_error(
        &train(t.path(), &cache, "hub:mnist"),
        "damaged? delete them and fetch again",
    );
    // An unknown source.
    one_line_error(&train(t.path(), &cache, "hub:cifar"), "data.source");
}
