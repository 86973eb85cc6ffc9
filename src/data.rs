//! MNIST-format IDX files (LeCun et al., "The MNIST database", file-format section): a big-endian
//! magic `0x0000_08_NN` (type 0x08 = unsigned byte, NN = number of dimensions), NN u32 sizes, then
//! the bytes. Images carry magic 2051 (3 dims), labels 2049 (1 dim). Files may be gzipped.
//!
//! Any directory holding the four usual files reads unchanged: MNIST, Fashion-MNIST, KMNIST.

use anyhow::{bail, Context, Result};
use rand::Rng;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MAGIC_IMAGES: u32 = 2051;
pub const MAGIC_LABELS: u32 = 2049;

/// One split: `n` images of `rows*cols` bytes each, row-major, and their labels.
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Split {
    pub fn dim(&self) -> usize {
        self.rows * self.cols
    }

    /// The last `n` images as a split of their own, removed from this one.
    pub fn split_off_last(&mut self, n: usize) -> Split {
        let keep = self.n - n.min(self.n);
        let d = self.dim();
        let images = self.images.split_off(keep * d);
        let labels = self.labels.split_off(keep.min(self.labels.len()));
        let taken = self.n - keep;
        self.n = keep;
        Split {
            images,
            labels,
            n: taken,
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn truncate(&mut self, limit: usize) {
        if limit > 0 && limit < self.n {
            self.n = limit;
            self.images.truncate(limit * self.dim());
            self.labels.truncate(limit);
        }
    }

    /// Pixels scaled to [0, 1]; shape (n, rows*cols) flattened.
    pub fn pixels_f32(&self) -> Vec<f32> {
        to_pixels(&self.images)
    }
}

/// A byte's pixel value in [0, 1]: every conversion of bytes to pixels goes through this, so the
/// training batches, the uploaded training set and the test set hold the same floats.
#[inline]
pub fn pixel(b: u8) -> f32 {
    b as f32 / 255.0
}

/// `pixel` of each byte.
pub fn to_pixels(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| pixel(b)).collect()
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub train: Split,
    pub test: Split,
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
    })
}

/// Where `data.dir` points: as given, else (for a relative path) beside the crate's sources,
/// so a fresh clone's binary finds its shipped `data/mnist` from any working directory.
pub fn resolve_dir(dir: &str) -> Result<PathBuf> {
    let p = PathBuf::from(dir);
    if p.is_dir() {
        return Ok(p);
    }
    if p.is_relative() {
        let q = Path::new(env!("CARGO_MANIFEST_DIR")).join(&p);
        if q.is_dir() {
            return Ok(q);
        }
    }
    if p.exists() {
        bail!("key `data.dir`: {dir} is not a directory");
    }
    bail!("key `data.dir`: no directory {dir}; point it at MNIST-format IDX files (--set data.dir=PATH)")
}

/// Loads both splits of `dir`, keeping the first `limit` / `test_limit` items (0 = all).
pub fn load_dir(dir: &str, limit: usize, test_limit: usize) -> Result<Dataset> {
    let d = resolve_dir(dir)?;
    let mut train = load_split(&d, "train")?;
    let mut test = load_split(&d, "t10k")?;
    if (train.rows, train.cols) != (test.rows, test.cols) {
        bail!(
            "{}: train images are {}x{} but test images {}x{}",
            d.display(),
            train.rows,
            train.cols,
            test.rows,
            test.cols
        );
    }
    train.truncate(limit);
    test.truncate(test_limit);
    Ok(Dataset {
        dir: d,
        train,
        test,
    })
}

/// Loads only the test split (for evaluation and pictures), keeping the first `test_limit` (0 = all).
pub fn load_test(dir: &str, test_limit: usize) -> Result<Split> {
    let d = resolve_dir(dir)?;
    let mut test = load_split(&d, "t10k")?;
    test.truncate(test_limit);
    Ok(test)
}

/// `binarize_in_place` on bytes: p = b / 255, and the drawn pixel is 255 or 0. The same draws
/// from `rng` and the same outcomes as on `pixels_f32`.
pub fn binarize_bytes_in_place(bytes: &mut [u8], rng: &mut impl Rng) {
    for b in bytes.iter_mut() {
        let u: f32 = rng.random();
        *b = if u < pixel(*b) { 255 } else { 0 };
    }
}

/// Draws each pixel from Bernoulli(p) in place: 1 if u < p.
pub fn binarize_in_place(pixels: &mut [f32], rng: &mut impl Rng) {
    for p in pixels.iter_mut() {
        let u: f32 = rng.random();
        *p = if u < *p { 1.0 } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn byte_binarization_draws_as_the_f32_one() {
        use rand::{rngs::StdRng, SeedableRng};
        // Every byte value a few times; the two paths must consume the same draws and agree.
        let bytes: Vec<u8> = (0..2048).map(|i| (i % 256) as u8).collect();
        let split = Split {
            images: bytes.clone(),
            labels: vec![],
            n: 1,
            rows: 1,
            cols: bytes.len(),
        };
        let mut f = split.pixels_f32();
        binarize_in_place(&mut f, &mut StdRng::seed_from_u64(7));
        let mut b = bytes;
        binarize_bytes_in_place(&mut b, &mut StdRng::seed_from_u64(7));
        let back: Vec<f32> = b.iter().map(|&v| v as f32 / 255.0).collect();
        assert_eq!(back, f);
        // 0 never turns on, 255 always does.
        assert!(b.iter().step_by(256).all(|&v| v == 0));
        assert!(b.iter().skip(255).step_by(256).all(|&v| v == 255));
    }

    #[test]
    fn missing_dir_names_the_key() {
        let e = format!("{:#}", load_dir("/nonexistent/mnist", 0, 0).unwrap_err());
        assert!(e.contains("data.dir"), "{e}");
    }
}
