//! MNIST-format IDX files (LeCun et al., "The MNIST database", file-format section): a big-endian
//! magic `0x0000_08_NN` (type 0x08 = unsigned byte, NN = number of dimensions), NN u32 sizes, then
//! the bytes. Images carry magic 2051 (3 dims), labels 2049 (1 dim). Files may be gzipped.
//!
//! Any directory holding the four usual files reads unchanged: MNIST, Fashion-MNIST, KMNIST.

use super::{Dataset, Split};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MAGIC_IMAGES: u32 = 2051;
pub const MAGIC_LABELS: u32 = 2049;

/// Whether `dir` holds MNIST-format files (its training images, under any of their names).
pub fn is_idx_dir(dir: &Path) -> bool {
    locate(dir, "train-images-idx3-ubyte").is_ok()
}

/// Both splits of `dir`; only the test split (the training split empty) when `test_only`.
pub fn load(dir: &Path, test_only: bool) -> Result<Dataset> {
    let test = load_split(dir, "t10k")?;
    let train = if test_only {
        Split::empty_like(&test)
    } else {
        load_split(dir, "train")?
    };
    if (train.rows, train.cols) != (test.rows, test.cols) {
        bail!(
            "{}: train images are {}x{} but test images {}x{}",
            dir.display(),
            train.rows,
            train.cols,
            test.rows,
            test.cols
        );
    }
    Ok(Dataset {
        dir: dir.to_path_buf(),
        train,
        test,
    })
}

/// Parses one IDX file's bytes, checking the magic, the dimensions and the length.
pub fn parse_idx(bytes: &[u8], magic: u32, what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 {
        bail!(
            "{what}: only {} bytes; not an IDX file (truncated?)",
            bytes.len()
        );
    }
    let got = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if got != magic {
        bail!(
            "{what}: magic number {got} (0x{got:08x}), expected {magic} (0x{magic:08x}); \
             not an MNIST-format {} file",
            if magic == MAGIC_IMAGES {
                "image"
            } else {
                "label"
            }
        );
    }
    let nd = (magic & 0xff) as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        bail!(
            "{what}: truncated header ({} of {header} bytes)",
            bytes.len()
        );
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    if dims.iter().skip(1).any(|&d| d == 0) {
        bail!("{what}: a zero dimension in {dims:?}");
    }
    let want = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .with_context(|| format!("{what}: dimensions {dims:?} overflow"))?;
    let have = bytes.len() - header;
    if have < want {
        bail!(
            "{what}: truncated: header says {dims:?} = {want} bytes of data, file has {have}; \
             re-download or re-copy the file"
        );
    }
    if have > want {
        bail!(
            "{what}: {} bytes after the {dims:?} the header declares; damaged file?",
            have - want
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Parses IDX file contents, gzipped or raw (a gzip stream is recognized by its magic bytes).
pub fn parse_bytes(raw: &[u8], magic: u32, what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = ungzip(raw, what)?;
    parse_idx(&bytes, magic, what)
}

/// The bytes of a gzip stream decompressed, or `raw` itself when it is not one. Decompression
/// stops at 4 GiB (EMNIST's largest file is ~0.6 GiB), so a hostile stream cannot exhaust memory.
fn ungzip(raw: &[u8], what: &str) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw.to_vec());
    }
    const LIMIT: u64 = 4 << 30;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw)
        .take(LIMIT + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("{what}: damaged gzip stream; re-download the file"))?;
    if out.len() as u64 > LIMIT {
        bail!("{what}: decompresses to more than 4 GiB; not an MNIST-format file");
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    ungzip(&raw, &path.display().to_string())
}

/// The file for `stem` in `dir`: `stem`, `stem.gz`, or the dotted variant (`…-images.idx3-ubyte`).
fn locate(dir: &Path, stem: &str) -> Result<PathBuf> {
    let dotted = stem.replacen("-idx", ".idx", 1);
    for name in [
        format!("{stem}.gz"),
        stem.to_string(),
        format!("{dotted}.gz"),
        dotted.clone(),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{}: no {stem}[.gz] here; key `data.dir` must name a directory of MNIST-format IDX files",
        dir.display()
    )
}

fn load_split(dir: &Path, prefix: &str) -> Result<Split> {
    let ip = locate(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = locate(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (idims, images) = parse_idx(&read_file(&ip)?, MAGIC_IMAGES, &ip.display().to_string())?;
    let (ldims, labels) = parse_idx(&read_file(&lp)?, MAGIC_LABELS, &lp.display().to_string())?;
    if idims[0] != ldims[0] {
        bail!(
            "{}: {} labels for {} images in {}; the two files do not belong together",
            lp.display(),
            ldims[0],
            idims[0],
            ip.display()
        );
    }
    if idims[0] == 0 {
        bail!("{}: holds no images", ip.display());
    }
    Ok(Split {
        images,
        labels,
        n: idims[0],
        rows: idims[1],
        cols: idims[2],
        channels: 1,
        classes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataConfig;

    fn load_dir(dir: &str, limit: usize, test_limit: usize) -> Result<Dataset> {
        let cfg = DataConfig {
            dir: dir.into(),
            ..Default::default()
        };
        crate::data::load(&cfg, limit, test_limit)
    }

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn good_file() {
        // 2 images of 2x3: header 4 + 3*4 = 16 bytes, then 12 bytes.
        let b = idx(2051, &[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]);
        let (dims, data) = parse_idx(&b, MAGIC_IMAGES, "x").unwrap();
        assert_eq!(dims, vec![2, 2, 3]);
        assert_eq!(data.len(), 12);
        assert_eq!(data[11], 255);
    }

    #[test]
    fn bad_magic() {
        let b = idx(2049, &[1], &[3]);
        let e = parse_idx(&b, MAGIC_IMAGES, "f").unwrap_err().to_string();
        assert!(
            e.contains("magic number 2049") && e.contains("expected 2051"),
            "{e}"
        );
    }

    #[test]
    fn truncated_data_and_header() {
        let b = idx(2051, &[2, 2, 3], &[0; 11]);
        let e = parse_idx(&b, MAGIC_IMAGES, "f").unwrap_err().to_string();
        assert!(
            e.contains("truncated") && e.contains("12 bytes") && e.contains("has 11"),
            "{e}"
        );
        let e = parse_idx(&b[..9], MAGIC_IMAGES, "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated header"), "{e}");
        let e = parse_idx(&b[..2], MAGIC_IMAGES, "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 2 bytes"), "{e}");
    }

    #[test]
    fn trailing_bytes() {
        let b = idx(2049, &[2], &[1, 2, 3]);
        let e = parse_idx(&b, MAGIC_LABELS, "f").unwrap_err().to_string();
        assert!(e.contains("1 bytes after"), "{e}");
    }

    #[test]
    fn shipped_mnist_matches_its_readme() {
        // data/mnist/README.md: first ten train labels 5 0 4 1 9 2 1 3 1 4, test 7 2 1 0 4 1 4 9 5 9,
        // mean training pixel 0.1307.
        let d = load_dir("data/mnist", 0, 0).unwrap();
        assert_eq!(
            (d.train.n, d.test.n, d.train.rows, d.train.cols),
            (60000, 10000, 28, 28)
        );
        assert_eq!(&d.train.labels[..10], &[5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
        assert_eq!(&d.test.labels[..10], &[7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
        let mean =
            d.train.images.iter().map(|&b| b as f64).sum::<f64>() / (60000.0 * 784.0 * 255.0);
        assert!((mean - 0.1307).abs() < 5e-5, "{mean}");
        let l = load_dir("data/mnist", 300, 50).unwrap();
        assert_eq!(
            (l.train.n, l.test.n, l.train.images.len()),
            (300, 50, 300 * 784)
        );
    }

    #[test]
    fn label_count_mismatch_and_raw_files() {
        let t = tempfile::tempdir().unwrap();
        let w = |n: &str, b: Vec<u8>| std::fs::write(t.path().join(n), b).unwrap();
        w("train-images-idx3-ubyte", idx(2051, &[2, 1, 1], &[0, 255]));
        w("train-labels-idx1-ubyte", idx(2049, &[2], &[3, 4]));
        w("t10k-images-idx3-ubyte", idx(2051, &[1, 1, 1], &[128]));
        w("t10k-labels-idx1-ubyte", idx(2049, &[2], &[1, 2]));
        let e = format!(
            "{:#}",
            load_dir(t.path().to_str().unwrap(), 0, 0).unwrap_err()
        );
        assert!(e.contains("2 labels for 1 images"), "{e}");
        w("t10k-labels-idx1-ubyte", idx(2049, &[1], &[1]));
        let d = load_dir(t.path().to_str().unwrap(), 0, 0).unwrap();
        assert_eq!(d.train.pixels_f32(), vec![0.0, 1.0]);
    }
}
