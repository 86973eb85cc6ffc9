//! NumPy arrays as a data set.
//!
//! The `.npy` format (NEP 1, "A simple file format for NumPy arrays") is read with `npyz`.
//! A `.npz` is a zip archive of `.npy` members (`np.savez`, `np.savez_compressed`), opened with
//! `zip`.
//!
//! Images:
//! - uint8 in 0..255, or float32/float64 in [0, 1];
//! - shape N x H x W (grey) or N x H x W x C, with C = 1 or 3.
//!
//! Labels are any integer type, values 0..255. Where the images come from:
//! - a `.npy` holds the images alone;
//! - a `.npz` holds `x_train`, `x_test` (and `y_train`, `y_test`), as Keras' `mnist.npz` does;
//! - or a `.npz` holds one image array and its labels, named `images`/`x`/`data`/`arr_0` and
//!   `labels`/`y`/`targets`/`arr_1`.
//!
//! Without a train/test pair, `data.test_fraction` of the images is drawn for the test set by a
//! fixed seed.

use super::{check_fits, draw_split, Builder, Dataset, Shape};
use anyhow::{bail, Context, Result};
use image::{DynamicImage, GrayImage, RgbImage};
use npyz::{NpyFile, Order, TypeChar};
use std::io::{BufReader, Read, Seek};
use std::path::Path;

const IMAGE_NAMES: &[&str] = &["images", "x", "data", "arr_0"];
const LABEL_NAMES: &[&str] = &["labels", "y", "targets", "arr_1"];

/// An array's images: count, height, width, channels as stored.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

fn dims<R: Read>(f: &NpyFile<R>, what: &str) -> Result<Dims> {
    if f.order() == Order::Fortran {
        bail!("{what}: stored in Fortran order; save np.ascontiguousarray(x) instead");
    }
    let s: Vec<usize> = f.shape().iter().map(|&v| v as usize).collect();
    let d = match s[..] {
        [n, h, w] => Dims { n, h, w, c: 1 },
        [n, h, w, c] if c == 1 || c == 3 => Dims { n, h, w, c },
        [_, c, _, _] if c == 1 || c == 3 => bail!(
            "{what}: shape {s:?} looks channels-first; images must be N x H x W x C \
             (np.transpose(x, (0, 2, 3, 1)))"
        ),
        _ => bail!(
            "{what}: shape {s:?}; images must be N x H x W (grey) or N x H x W x C with C = 1 or 3"
        ),
    };
    if d.n == 0 || d.h == 0 || d.w == 0 {
        bail!("{what}: shape {s:?} holds no pixels");
    }
    Ok(d)
}

/// The element type of an image array: bytes, or floats of 4 or 8 bytes.
fn check_image_dtype<R: Read>(f: &NpyFile<R>, what: &str) -> Result<()> {
    let ok = match f.dtype() {
        npyz::DType::Plain(t) => matches!(
            (t.type_char(), t.size_field()),
            (TypeChar::Uint, 1) | (TypeChar::Float, 4) | (TypeChar::Float, 8)
        ),
        _ => false,
    };
    if !ok {
        bail!(
            "{what}: dtype {}; images must be uint8 (0..255) or float32/float64 in [0, 1]",
            f.dtype().descr()
        );
    }
    Ok(())
}

/// Streams an array's elements as f64, whatever its numeric type, into `sink`.
fn each_value<R: Read>(
    f: NpyFile<R>,
    what: &str,
    mut sink: impl FnMut(usize, f64) -> Result<()>,
) -> Result<()> {
    macro_rules! stream {
        ($t:ty) => {{
            let data = f.data::<$t>().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            for (i, v) in data.enumerate() {
                let v = v.with_context(|| format!("{what}: truncated or unreadable data"))?;
                sink(i, v as f64)?;
            }
        }};
    }
    let t = match f.dtype() {
        npyz::DType::Plain(t) => t,
        d => bail!("{what}: dtype {}: not a plain number type", d.descr()),
    };
    match (t.type_char(), t.size_field()) {
        (TypeChar::Uint, 1) => stream!(u8),
        (TypeChar::Uint, 2) => stream!(u16),
        (TypeChar::Uint, 4) => stream!(u32),
        (TypeChar::Uint, 8) => stream!(u64),
        (TypeChar::Int, 1) => stream!(i8),
        (TypeChar::Int, 2) => stream!(i16),
        (TypeChar::Int, 4) => stream!(i32),
        (TypeChar::Int, 8) => stream!(i64),
        (TypeChar::Float, 4) => stream!(f32),
        (TypeChar::Float, 8) => stream!(f64),
        _ => bail!("{what}: dtype {}: not supported", t),
    }
    Ok(())
}

/// Streams the images of `f`, one byte image (H*W*C) at a time, into `sink(index, bytes)`.
fn read_images<R: Read>(
    f: NpyFile<R>,
    d: Dims,
    what: &str,
    mut sink: impl FnMut(usize, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let float = matches!(f.dtype(), npyz::DType::Plain(t) if t.type_char() == TypeChar::Float);
    let per = d.h * d.w * d.c;
    let mut cur = Vec::with_capacity(per);
    each_value(f, what, |i, v| {
        let b = if float {
            if !(0.0..=1.0).contains(&v) {
                bail!(
                    "{what}: value {v} at image {}, element {}; float images must lie in \
                     [0, 1] (divide by 255?)",
                    i / per,
                    i % per
                );
            }
            (v * 255.0).round() as u8
        } else {
            v as u8
        };
        cur.push(b);
        if cur.len() == per {
            sink(
                i / per,
                std::mem::replace(&mut cur, Vec::with_capacity(per)),
            )?;
        }
        Ok(())
    })?;
    if !cur.is_empty() {
        bail!("{what}: truncated: the last image is incomplete");
    }
    Ok(())
}

fn to_image(bytes: Vec<u8>, d: Dims) -> Result<DynamicImage> {
    let (w, h) = (d.w as u32, d.h as u32);
    let img = if d.c == 3 {
        RgbImage::from_raw(w, h, bytes).map(DynamicImage::ImageRgb8)
    } else {
        GrayImage::from_raw(w, h, bytes).map(DynamicImage::ImageLuma8)
    };
    img.context("an image buffer of the wrong length")
}

fn read_labels<R: Read>(f: NpyFile<R>, n: usize, what: &str) -> Result<Vec<u8>> {
    let shape = f.shape().to_vec();
    if shape.len() != 1 || shape[0] as usize != n {
        bail!("{what}: shape {shape:?}; labels must be one integer per image ({n})");
    }
    let mut out = Vec::with_capacity(n);
    each_value(f, what, |i, v| {
        if v.fract() != 0.0 || !(0.0..=255.0).contains(&v) {
            bail!("{what}: label {v} at {i}; labels must be integers 0..255");
        }
        out.push(v as u8);
        Ok(())
    })?;
    Ok(out)
}

/// Opens one `.npz` member by array name.
fn member<'a, R: Read + Seek>(
    z: &'a mut zip::ZipArchive<R>,
    name: &str,
    path: &Path,
) -> Result<NpyFile<BufReader<zip::read::ZipFile<'a>>>> {
    let what = format!("{}: array {name}", path.display());
    let f = z
        .by_name(&format!("{name}.npy"))
        .with_context(|| format!("{what}: cannot open"))?;
    NpyFile::new(BufReader::new(f)).with_context(|| format!("{what}: not a readable .npy"))
}

/// Loads `path`, a `.npy` or `.npz`: both sets, or the test set alone (`test_only`).
pub fn load(path: &Path, shape: Shape, test_only: bool) -> Result<Dataset> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let open = || {
        std::fs::File::open(path)
            .map(BufReader::new)
            .with_context(|| super::cannot_read(path))
    };
    match ext.as_deref() {
        Some("npy") => {
            let what = path.display().to_string();
            let f = NpyFile::new(open()?).with_context(|| format!("{what}: not a .npy file"))?;
            let d = dims(&f, &what)?;
            check_image_dtype(&f, &what)?;
            fits(shape, d, d.n, path)?;
            let (tr, te) = draw_split(d.n, shape.test_fraction, path)?;
            build(path, shape, f, d, &what, None, &tr, &te, test_only)
        }
        Some("npz") => {
            let mut z = zip::ZipArchive::new(open()?)
                .with_context(|| format!("{}: not a .npz (zip) archive", path.display()))?;
            let names: Vec<String> = z
                .file_names()
                .filter_map(|n| n.strip_suffix(".npy").map(str::to_string))
                .collect();
            let has = |n: &str| names.iter().any(|m| m == n);
            if has("x_train") && has("x_test") {
                load_pair(
                    path,
                    shape,
                    &mut z,
                    has("y_train") && has("y_test"),
                    test_only,
                )
            } else {
                let Some(xn) = IMAGE_NAMES.iter().find(|n| has(n)) else {
                    bail!(
                        "{}: arrays {names:?}; name the images x_train and x_test (with y_train, \
                         y_test), or one of {IMAGE_NAMES:?} (labels: {LABEL_NAMES:?})",
                        path.display()
                    );
                };
                let labels = match LABEL_NAMES.iter().find(|n| has(n)) {
                    Some(yn) => {
                        let f = member(&mut z, yn, path)?;
                        let n = f.shape().first().copied().unwrap_or(0) as usize;
                        Some(read_labels(
                            f,
                            n,
                            &format!("{}: array {yn}", path.display()),
                        )?)
                    }
                    None => None,
                };
                let what = format!("{}: array {xn}", path.display());
                let f = member(&mut z, xn, path)?;
                let d = dims(&f, &what)?;
                check_image_dtype(&f, &what)?;
                if let Some(l) = &labels {
                    if l.len() != d.n {
                        bail!("{what}: {} images but {} labels", d.n, l.len());
                    }
                }
                fits(shape, d, d.n, path)?;
                let (tr, te) = draw_split(d.n, shape.test_fraction, path)?;
                build(path, shape, f, d, &what, labels, &tr, &te, test_only)
            }
        }
        _ => bail!(
            "key `data.dir`: {} is a file but not .npy or .npz; give a directory of images or \
             IDX files, or a NumPy array",
            path.display()
        ),
    }
}

/// One array split into train and test: the images at positions `tr` and at `te`, each set in
/// the array's order. Each image is copied straight into its set, so the array is held once.
#[allow(clippy::too_many_arguments)]
fn build<R: Read>(
    path: &Path,
    shape: Shape,
    f: NpyFile<R>,
    d: Dims,
    what: &str,
    labels: Option<Vec<u8>>,
    tr: &[usize],
    te: &[usize],
    test_only: bool,
) -> Result<Dataset> {
    // For each image: Some(true) train, Some(false) test, None skipped.
    let mut to_train = vec![None; d.n];
    if !test_only {
        tr.iter().for_each(|&i| to_train[i] = Some(true));
    }
    te.iter().for_each(|&i| to_train[i] = Some(false));
    let n_train = if test_only { 0 } else { tr.len() };
    let mut train = start(shape, d, n_train, path)?;
    let mut test = start(shape, d, te.len(), path)?;
    read_images(f, d, what, |i, img| match to_train[i] {
        Some(true) => train.push(to_image(img, d)?, &|| format!("{what}[{i}]")),
        Some(false) => test.push(to_image(img, d)?, &|| format!("{what}[{i}]")),
        None => Ok(()),
    })?;
    let pick = |want: bool| -> Vec<u8> {
        match &labels {
            Some(l) => (0..d.n)
                .filter(|&i| to_train[i] == Some(want))
                .map(|i| l[i])
                .collect(),
            None => Vec::new(),
        }
    };
    Ok(Dataset {
        dir: path.to_path_buf(),
        train: train.into_split(pick(true), Vec::new()),
        test: test.into_split(pick(false), Vec::new()),
    })
}

/// Refuses `n` images of `d`, as they will be held, when they would not fit in memory.
fn fits(shape: Shape, d: Dims, n: usize, path: &Path) -> Result<(usize, usize, usize)> {
    let (h, w) = match shape.resize {
        Some([h, w]) => (h, w),
        None => (d.h, d.w),
    };
    let c = shape.channels.unwrap_or(d.c);
    check_fits(
        n as u128 * (h as u128 * w as u128 * c as u128),
        path,
        n,
        &super::describe_size(h, w, c),
    )?;
    Ok((h, w, c))
}

/// A builder for `n` images of `d`, refused when they would not fit in memory. The channel count
/// is the data's unless `data.channels` asks for another.
fn start(shape: Shape, d: Dims, n: usize, path: &Path) -> Result<Builder> {
    let (h, w, c) = fits(shape, d, n, path)?;
    let mut b = Builder::new(Shape {
        channels: Some(c),
        ..shape
    });
    b.reserve(n, h, w);
    Ok(b)
}

/// Keras' layout: x_train, x_test and optionally y_train, y_test.
fn load_pair<R: Read + Seek>(
    path: &Path,
    shape: Shape,
    z: &mut zip::ZipArchive<R>,
    labelled: bool,
    test_only: bool,
) -> Result<Dataset> {
    let mut sets = Vec::new();
    for (x, y) in [("x_train", "y_train"), ("x_test", "y_test")] {
        let what = format!("{}: array {x}", path.display());
        let d = {
            let f = member(z, x, path)?;
            check_image_dtype(&f, &what)?;
            dims(&f, &what)?
        };
        let skip = test_only && x == "x_train";
        let labels = if labelled && !skip {
            let yf = member(z, y, path)?;
            read_labels(yf, d.n, &format!("{}: array {y}", path.display()))?
        } else {
            Vec::new()
        };
        let mut b = start(shape, d, if skip { 0 } else { d.n }, path)?;
        if !skip {
            let f = member(z, x, path)?;
            read_images(f, d, &what, |i, img| {
                b.push(to_image(img, d)?, &|| format!("{what}[{i}]"))
            })?;
        }
        sets.push(b.into_split(labels, Vec::new()));
    }
    let test = sets.pop().context("x_test")?;
    let train = sets.pop().context("x_train")?;
    Ok(Dataset {
        dir: path.to_path_buf(),
        train,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A version-1.0 .npy file: magic, header length, the header dict padded to 64 bytes, data.
    pub fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let tuple = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn npz(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opts =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in members {
            z.start_file(format!("{name}.npy"), opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }

    /// Every byte of both splits, sorted: what was read, whichever split each image went to.
    fn all_sorted(ds: &Dataset) -> Vec<u8> {
        let mut v: Vec<u8> = ds
            .train
            .images
            .iter()
            .chain(&ds.test.images)
            .copied()
            .collect();
        v.sort();
        v
    }

    #[test]
    fn npy_uint8_and_float_with_a_seeded_split() {
        let t = tempfile::tempdir().unwrap();
        // 4 images of 1x2: image i has pixels (i, 2i).
        let data: Vec<u8> = (0..4u8).flat_map(|i| [i, 2 * i]).collect();
        let p = t.path().join("a.npy");
        std::fs::write(&p, npy("|u1", &[4, 1, 2], &data)).unwrap();
        let shape = Shape {
            test_fraction: 0.25,
            ..Default::default()
        };
        let ds = load(&p, shape, false).unwrap();
        assert_eq!((ds.train.n, ds.test.n, ds.train.dim()), (3, 1, 2));
        assert_eq!(all_sorted(&ds), vec![0, 0, 1, 2, 2, 3, 4, 6]);
        // float64 in [0, 1]: 0.5 -> round(127.5) = 128.
        let f: Vec<u8> = [0.5f64, 1.0, 0.0, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(&p, npy("<f8", &[2, 1, 2], &f)).unwrap();
        let ds = load(&p, shape, false).unwrap();
        assert_eq!(all_sorted(&ds), vec![0, 64, 128, 255]);
    }

    #[test]
    fn npz_keras_pair_rgb_and_labels() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("d.npz");
        // x_train: 2 RGB images of 1x1; x_test: 1. Labels int64.
        let lab = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        npz(
            &p,
            &[
                ("x_train", npy("|u1", &[2, 1, 1, 3], &[1, 2, 3, 4, 5, 6])),
                ("x_test", npy("|u1", &[1, 1, 1, 3], &[7, 8, 9])),
                ("y_train", npy("<i8", &[2], &lab(&[3, 4]))),
                ("y_test", npy("<i8", &[1], &lab(&[5]))),
            ],
        );
        let ds = load(&p, Shape::default(), false).unwrap();
        assert_eq!(ds.train.images, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            (ds.train.channels, ds.train.labels.clone()),
            (3, vec![3, 4])
        );
        assert_eq!(
            (ds.test.images.clone(), ds.test.labels.clone()),
            (vec![7, 8, 9], vec![5])
        );
        let te = load(&p, Shape::default(), true).unwrap().test;
        assert_eq!(te.images, vec![7, 8, 9]);
    }

    #[test]
    fn array_errors_name_the_problem() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.npy");
        let err = |bytes: Vec<u8>| {
            std::fs::write(&p, bytes).unwrap();
            format!("{:#}", load(&p, Shape::default(), false).unwrap_err())
        };
        let e = err(npy("<i4", &[2, 1, 1], &[0; 8]));
        assert!(e.contains("dtype") && e.contains("uint8"), "{e}");
        let e = err(npy("|u1", &[4, 4], &[0; 16]));
        assert!(e.contains("shape [4, 4]"), "{e}");
        let e = err(npy("|u1", &[2, 3, 4, 4], &[0; 96]));
        assert!(e.contains("channels-first"), "{e}");
        let e = err(npy("|u1", &[2, 2, 2], &[0; 5]));
        assert!(e.contains("truncated"), "{e}");
        let e = err(npy("<f4", &[2, 1, 1], &[0, 0, 0, 0, 0, 0, 0x40, 0x40]));
        assert!(e.contains("value 3") && e.contains("[0, 1]"), "{e}");
        // Too large for memory: refused from the header, before any data is read.
        let e = err(npy("|u1", &[1 << 40, 28, 28], &[]));
        assert!(e.contains("memory available"), "{e}");
        let e = err(b"not numpy".to_vec());
        assert!(e.contains("not a .npy"), "{e}");
    }
}
