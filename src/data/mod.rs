//! The data a run trains on, whatever `data.dir` names:
//! - a directory of MNIST-format IDX files (`idx`),
//! - a folder of images, optionally with one subfolder per class (`folder`),
//! - or a NumPy `.npy` / `.npz` file (`array`).
//!
//! Every reader ends in the same `Split`.
//! - Images are held as bytes, one per pixel and channel, and b / 255 is the pixel. MNIST's
//!   60,000 training images take 47 MB.
//! - Images are row-major with interleaved channels, (H, W, C). PNG and NumPy's N x H x W x C use
//!   the same layout, so the model's input is the H*W*C bytes of one image.
//! - Where the data has no train/test split of its own, a fixed seed draws `data.test_fraction`
//!   of it for the test set. Every run over the same files then scores the same test images.

pub mod array;
pub mod folder;
#[cfg(feature = "hub")]
pub mod hub;
pub mod idx;

use crate::config::DataConfig;
use anyhow::{bail, Result};
use image::DynamicImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// The seed of the train/test draw for data without a split of its own. It is fixed, not the run's
/// seed, so runs with different seeds are scored on the same test images.
const SPLIT_SEED: u64 = 0x0073_706c_6974; // "split"

/// One split: `n` images of `rows*cols*channels` bytes each, row-major with interleaved channels,
/// and their labels (empty for unlabelled data).
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// The name of each label value (a folder's class subfolders); empty: the values themselves.
    pub classes: Vec<String>,
}

impl Split {
    /// Bytes per image: the model's input size.
    pub fn dim(&self) -> usize {
        self.rows * self.cols * self.channels
    }

    /// No images, in the shape of `other`.
    pub fn empty_like(other: &Split) -> Split {
        Split {
            images: Vec::new(),
            labels: Vec::new(),
            n: 0,
            rows: other.rows,
            cols: other.cols,
            channels: other.channels,
            classes: other.classes.clone(),
        }
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
            ..Split::empty_like(self)
        }
    }

    fn truncate(&mut self, limit: usize) {
        if limit > 0 && limit < self.n {
            self.n = limit;
            self.images.truncate(limit * self.dim());
            self.labels.truncate(limit);
        }
    }

    /// Pixels scaled to [0, 1]; shape (n, dim) flattened.
    pub fn pixels_f32(&self) -> Vec<f32> {
        to_pixels(&self.images)
    }

    /// "28x28" or "32x32 RGB": the image size as a user reads it.
    pub fn describe_size(&self) -> String {
        describe_size(self.rows, self.cols, self.channels)
    }
}

/// "28x28" or "32x32 RGB".
pub fn describe_size(rows: usize, cols: usize, channels: usize) -> String {
    if channels == 3 {
        format!("{rows}x{cols} RGB")
    } else {
        format!("{rows}x{cols}")
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

/// How the images are to be shaped, from the `data` keys: the channel count (or as the data is)
/// and the size (or as the data is).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    pub channels: Option<usize>,
    pub resize: Option<[usize; 2]>,
    pub test_fraction: f64,
}

impl Shape {
    pub fn of(cfg: &DataConfig) -> Shape {
        Shape {
            channels: cfg.channels,
            resize: cfg.resize,
            test_fraction: cfg.test_fraction,
        }
    }
}

/// Where `data.dir` points: as given, else (for a relative path) beside the crate's sources,
/// so a fresh clone's binary finds its shipped `data/mnist` from any working directory.
pub fn resolve(dir: &str) -> Result<PathBuf> {
    let p = PathBuf::from(dir);
    if p.exists() {
        return Ok(p);
    }
    if p.is_relative() {
        let q = Path::new(env!("CARGO_MANIFEST_DIR")).join(&p);
        if q.exists() {
            return Ok(q);
        }
    }
    bail!(
        "key `data.dir`: no file or directory {dir}; point it at MNIST-format IDX files, a folder \
         of images or a .npy/.npz file (--set data.dir=PATH)"
    )
}

/// Reads the data `cfg` names, both splits (`test_only`: the test split alone, the training split
/// left empty), keeping the first `limit` / `test_limit` images (0 = all).
fn read(cfg: &DataConfig, shape: Shape, test_only: bool) -> Result<Dataset> {
    if let Some(source) = &cfg.source {
        return reshape(from_hub(source)?, shape);
    }
    let p = resolve(&cfg.dir)?;
    let ds = if p.is_file() {
        array::load(&p, shape, test_only)?
    } else if idx::is_idx_dir(&p) {
        reshape(idx::load(&p, test_only)?, shape)?
    } else {
        folder::load(&p, shape, test_only)?
    };
    if !test_only && ds.train.n > 0 && ds.train.dim() != ds.test.dim() {
        bail!(
            "{}: training images are {} but test images {}",
            p.display(),
            ds.train.describe_size(),
            ds.test.describe_size()
        );
    }
    Ok(ds)
}

/// Loads both splits of the data `cfg` names, keeping the first `limit` / `test_limit` images
/// (0 = all).
pub fn load(cfg: &DataConfig, limit: usize, test_limit: usize) -> Result<Dataset> {
    let mut ds = read(cfg, Shape::of(cfg), false)?;
    ds.train.truncate(limit);
    ds.test.truncate(test_limit);
    Ok(ds)
}

/// Loads only the test split (for evaluation and pictures), keeping the first `test_limit` (0 =
/// all). `channels` is the run's: auto-detection on the test images alone could decide otherwise.
pub fn load_test(cfg: &DataConfig, channels: usize, test_limit: usize) -> Result<Split> {
    let mut shape = Shape::of(cfg);
    shape.channels = Some(channels);
    let mut test = read(cfg, shape, true)?.test;
    test.truncate(test_limit);
    Ok(test)
}

#[cfg(feature = "hub")]
fn from_hub(source: &str) -> Result<Dataset> {
    hub::load(source)
}

#[cfg(not(feature = "hub"))]
fn from_hub(source: &str) -> Result<Dataset> {
    bail!(
        "key `data.source` = {source:?} needs the `hub` feature: cargo build --release \
         --features hub (or leave data.source out to read data.dir)"
    )
}

/// The grey images of MNIST-format data (files or the hub) resized or widened to RGB as
/// `shape` asks; as they are when it asks for neither.
fn reshape(mut ds: Dataset, shape: Shape) -> Result<Dataset> {
    if shape.channels == Some(3) || shape.resize.is_some() {
        ds.train = reshape_split(ds.train, shape)?;
        ds.test = reshape_split(ds.test, shape)?;
    }
    Ok(ds)
}

fn reshape_split(s: Split, shape: Shape) -> Result<Split> {
    let mut b = Builder::new(shape);
    b.reserve(s.n, s.rows, s.cols);
    for (k, img) in s.images.chunks_exact(s.dim().max(1)).enumerate() {
        let g = image::GrayImage::from_raw(s.cols as u32, s.rows as u32, img.to_vec())
            .ok_or_else(|| anyhow::anyhow!("image {k}: wrong length"))?;
        b.push(DynamicImage::ImageLuma8(g), &|| format!("image {k}"))?;
    }
    Ok(b.into_split(s.labels, s.classes))
}

/// The seeded train/test draw for data without a split of its own: the positions of `n` items
/// that go to the training and to the test set, each in the drawn order.
pub fn draw_split(n: usize, test_fraction: f64, what: &Path) -> Result<(Vec<usize>, Vec<usize>)> {
    if n < 2 {
        bail!(
            "{}: {n} image(s); a train/test split needs at least 2",
            what.display()
        );
    }
    let n_test = ((n as f64 * test_fraction).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SPLIT_SEED));
    let test = order.split_off(n - n_test);
    Ok((order, test))
}

/// Refuses a data set of `bytes` that would not fit in the machine's available memory, before
/// any of it is read.
pub fn check_fits(bytes: u128, what: &Path, n: usize, size: &str) -> Result<()> {
    if let Some(avail) = crate::device::available_bytes() {
        if bytes > avail as u128 {
            bail!(
                "{}: {n} images of {size} need {:.1} GiB as bytes, more than the {:.1} GiB of \
                 memory available; set `data.limit`, a smaller `data.resize`, or use fewer images",
                what.display(),
                bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// Gathers decoded images into one byte buffer of a single size and channel count.
/// - The first image sets the size unless `data.resize` does, and every later one must match it.
/// - With `data.channels` absent, the buffer stays grey while every image is. The first image
///   with colour widens it to RGB in place, so grey data costs one byte per pixel.
pub struct Builder {
    shape: Shape,
    buf: Vec<u8>,
    n: usize,
    /// (rows, cols) and the image that set them.
    size: Option<(usize, usize, String)>,
    channels: usize,
}

impl Builder {
    pub fn new(shape: Shape) -> Builder {
        Builder {
            shape,
            buf: Vec::new(),
            n: 0,
            size: None,
            channels: shape.channels.unwrap_or(1),
        }
    }

    /// Reserves room for `n` images of `rows x cols` at the channel count in force now.
    pub fn reserve(&mut self, n: usize, rows: usize, cols: usize) {
        let (r, c) = match self.shape.resize {
            Some([h, w]) => (h, w),
            None => (rows, cols),
        };
        self.buf.reserve(n * r * c * self.channels);
    }

    /// Adds one image; `name` names it in errors (a file, or an array and index).
    pub fn push(&mut self, img: DynamicImage, name: &dyn Fn() -> String) -> Result<()> {
        let img = match self.shape.resize {
            Some([h, w]) if (img.height() as usize, img.width() as usize) != (h, w) => {
                img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
            }
            _ => img,
        };
        let (rows, cols) = (img.height() as usize, img.width() as usize);
        match &self.size {
            None => self.size = Some((rows, cols, name())),
            Some((r, c, first)) if (*r, *c) != (rows, cols) => bail!(
                "{}: {rows}x{cols} pixels, but {first} is {r}x{c}; every image must have one \
                 size, or set `data.resize = [height, width]`",
                name()
            ),
            _ => {}
        }
        let img = over_black(img);
        if !img.color().has_color() {
            // Grey: repeated into RGB when the buffer is colour, as it is when grey.
            let luma = img.to_luma8();
            if self.channels == 3 {
                self.buf.extend(luma.as_raw().iter().flat_map(|&v| [v; 3]));
            } else {
                self.buf.extend_from_slice(luma.as_raw());
            }
        } else if self.shape.channels == Some(1) {
            // Colour asked to be grey (`data.channels = 1`): luma.
            self.buf.extend_from_slice(img.to_luma8().as_raw());
        } else {
            let rgb = img.to_rgb8();
            let colour = rgb.pixels().any(|p| p.0[0] != p.0[1] || p.0[1] != p.0[2]);
            if colour && self.channels == 1 {
                self.widen();
            }
            if self.channels == 3 {
                self.buf.extend_from_slice(rgb.as_raw());
            } else {
                // Colour with no channel count asked for, all its pixels grey (r = g = b):
                // one channel as it is.
                self.buf.extend(rgb.as_raw().chunks_exact(3).map(|p| p[0]));
            }
        }
        self.n += 1;
        Ok(())
    }

    /// Grey so far, colour from now: every byte of the buffer becomes three, in place.
    fn widen(&mut self) {
        let n = self.buf.len();
        self.buf.resize(3 * n, 0);
        for i in (0..n).rev() {
            let v = self.buf[i];
            self.buf[3 * i..3 * i + 3].fill(v);
        }
        self.channels = 3;
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The images gathered as a split, with their labels and class names.
    pub fn into_split(self, labels: Vec<u8>, classes: Vec<String>) -> Split {
        let n = self.n;
        let (images, rows, cols, channels) = self.finish();
        Split {
            images,
            labels,
            n,
            rows,
            cols,
            channels,
            classes,
        }
    }

    /// The images gathered, as (bytes, rows, cols, channels).
    pub fn finish(self) -> (Vec<u8>, usize, usize, usize) {
        let (r, c) = self.size.map(|(r, c, _)| (r, c)).unwrap_or((0, 0));
        (self.buf, r, c, self.channels)
    }
}

/// Transparency composited over black, the background of MNIST and of a Bernoulli decoder's
/// "off" pixels; images without an alpha channel pass unchanged.
fn over_black(img: DynamicImage) -> DynamicImage {
    if !img.color().has_alpha() {
        return img;
    }
    let colour = img.color().has_color();
    let mut rgba = img.to_rgba8();
    for p in rgba.pixels_mut() {
        let a = p.0[3] as u32;
        for v in &mut p.0[..3] {
            *v = ((*v as u32 * a + 127) / 255) as u8;
        }
    }
    let rgb = DynamicImage::ImageRgba8(rgba).to_rgb8();
    if colour {
        DynamicImage::ImageRgb8(rgb)
    } else {
        DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(rgb).to_luma8())
    }
}

/// Splits the builder's images, in the order pushed, into the first `n_train` and the rest.
pub fn into_dataset(
    dir: &Path,
    b: Builder,
    labels: Vec<u8>,
    n_train: usize,
    classes: Vec<String>,
) -> Dataset {
    let n = b.len();
    let mut train = b.into_split(labels, classes);
    let test = train.split_off_last(n - n_train);
    Dataset {
        dir: dir.to_path_buf(),
        train,
        test,
    }
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

/// Context for a read error of `path`.
pub fn cannot_read(path: &Path) -> String {
    format!("{}: cannot read", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Rgb, RgbImage, RgbaImage};

    #[test]
    fn byte_binarization_draws_as_the_f32_one() {
        use rand::rngs::StdRng;
        // Every byte value a few times; the two paths must consume the same draws and agree.
        let bytes: Vec<u8> = (0..2048).map(|i| (i % 256) as u8).collect();
        let split = Split {
            images: bytes.clone(),
            labels: vec![],
            n: 1,
            rows: 1,
            cols: bytes.len(),
            channels: 1,
            classes: vec![],
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
        let cfg = DataConfig {
            dir: "/nonexistent/mnist".into(),
            ..Default::default()
        };
        let e = format!("{:#}", load(&cfg, 0, 0).unwrap_err());
        assert!(e.contains("data.dir"), "{e}");
    }

    #[test]
    fn builder_widens_to_colour_in_place_and_composites_alpha() {
        let mut b = Builder::new(Shape::default());
        let grey = GrayImage::from_raw(2, 1, vec![10, 200]).unwrap();
        b.push(DynamicImage::ImageLuma8(grey), &|| "a".into())
            .unwrap();
        // An RGB image whose pixels are all grey stays one channel.
        let rgb_grey = RgbImage::from_pixel(2, 1, Rgb([7, 7, 7]));
        b.push(DynamicImage::ImageRgb8(rgb_grey), &|| "b".into())
            .unwrap();
        assert_eq!(b.channels, 1);
        // Half-transparent red over black: (255 * 128 + 127) / 255 = 128.
        let mut red = RgbaImage::new(2, 1);
        red.put_pixel(0, 0, image::Rgba([255, 0, 0, 128]));
        red.put_pixel(1, 0, image::Rgba([0, 0, 255, 255]));
        b.push(DynamicImage::ImageRgba8(red), &|| "c".into())
            .unwrap();
        let (buf, r, c, ch) = b.finish();
        assert_eq!((r, c, ch), (1, 2, 3));
        assert_eq!(
            buf,
            vec![10, 10, 10, 200, 200, 200, 7, 7, 7, 7, 7, 7, 128, 0, 0, 0, 0, 255]
        );
    }

    #[test]
    fn builder_names_the_first_image_of_another_size_and_resizes() {
        let mut b = Builder::new(Shape::default());
        let img = |w, h| DynamicImage::ImageLuma8(GrayImage::new(w, h));
        b.push(img(3, 2), &|| "first.png".into()).unwrap();
        let e = b
            .push(img(2, 3), &|| "second.png".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("second.png: 3x2 pixels")
                && e.contains("first.png is 2x3")
                && e.contains("data.resize"),
            "{e}"
        );
        let mut b = Builder::new(Shape {
            resize: Some([4, 5]),
            channels: Some(3),
            ..Default::default()
        });
        b.push(img(3, 2), &|| "x".into()).unwrap();
        b.push(img(9, 9), &|| "y".into()).unwrap();
        let (buf, r, c, ch) = b.finish();
        assert_eq!((buf.len(), r, c, ch), (2 * 4 * 5 * 3, 4, 5, 3));
    }

    #[test]
    fn split_draw_is_fixed_and_disjoint() {
        let p = Path::new("d");
        let (tr, te) = draw_split(10, 0.25, p).unwrap();
        // round(2.5) = 3 test items; the same draw every time.
        assert_eq!((tr.len(), te.len()), (7, 3));
        assert_eq!(draw_split(10, 0.25, p).unwrap(), (tr.clone(), te.clone()));
        let mut all: Vec<usize> = tr.iter().chain(&te).copied().collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // A tiny fraction still leaves one test image; a large one still leaves one to train on.
        assert_eq!(draw_split(5, 0.01, p).unwrap().1.len(), 1);
        assert_eq!(draw_split(5, 0.99, p).unwrap().0.len(), 1);
        assert!(draw_split(1, 0.5, p).is_err());
    }
}
