//! A folder of images as a data set, in any format the `image` crate reads here: PNG, JPEG, BMP,
//! GIF (first frame), WebP and TIFF.
//!
//! Three layouts are understood:
//! - `DIR/train/` and `DIR/test/`, each holding the images or one subfolder per class;
//! - `DIR/<class>/*.png`: the classes, drawn into train and test by `data.test_fraction`;
//! - `DIR/*.png`: unlabelled images, drawn the same way.
//!
//! Class names are the subfolder names, sorted. Files of other types (a README, `.DS_Store`) and
//! hidden files are skipped. Images are decoded on every core, in chunks, into one byte buffer
//! (`Builder`).

use super::{check_fits, draw_split, into_dataset, Builder, Dataset, Shape};
use anyhow::{bail, Context, Result};
use image::DynamicImage;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// File extensions read as images (lower case).
pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];

/// Images decoded at once: enough to keep every core busy, few enough to bound the memory of
/// decoded but not yet copied images.
const CHUNK: usize = 512;

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// A directory's entries, sorted: (image files, subdirectories).
fn entries(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| super::cannot_read(dir))? {
        let p = e.with_context(|| super::cannot_read(dir))?.path();
        if hidden(&p) {
            continue;
        }
        if p.is_dir() {
            dirs.push(p);
        } else if is_image(&p) {
            files.push(p);
        }
    }
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}

/// The images of one set directory: its own files (unlabelled), or its class subfolders' files
/// as (class name, files). Not both.
enum Set {
    Loose(Vec<PathBuf>),
    Classes(Vec<(String, Vec<PathBuf>)>),
}

fn list_set(dir: &Path) -> Result<Set> {
    let (files, dirs) = entries(dir)?;
    let mut classes = Vec::new();
    for d in dirs {
        let (f, _) = entries(&d)?;
        if !f.is_empty() {
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            classes.push((name, f));
        }
    }
    match (files.is_empty(), classes.is_empty()) {
        (true, true) => bail!(
            "{}: no images here ({}), nor in class subfolders; key `data.dir` must name MNIST-format \
             IDX files, a folder of images, or a .npy/.npz file",
            dir.display(),
            EXTENSIONS.join(", ")
        ),
        (false, true) => Ok(Set::Loose(files)),
        (true, false) => Ok(Set::Classes(classes)),
        (false, false) => bail!(
            "{}: holds both images ({}) and class folders ({}); put every image in a class \
             folder, or none",
            dir.display(),
            files[0].display(),
            classes[0].0
        ),
    }
}

/// The (file, label) pairs of a set, labels indexing `names`.
fn labelled(set: Set, names: &[String]) -> Vec<(PathBuf, u8)> {
    match set {
        Set::Loose(f) => f.into_iter().map(|p| (p, 0)).collect(),
        Set::Classes(c) => c
            .into_iter()
            .flat_map(|(name, files)| {
                let l = names.iter().position(|n| *n == name).unwrap_or(0) as u8;
                files.into_iter().map(move |p| (p, l))
            })
            .collect(),
    }
}

fn class_names(sets: &[&Set]) -> Result<Vec<String>> {
    let mut names: Vec<String> = sets
        .iter()
        .flat_map(|s| match s {
            Set::Loose(_) => Vec::new(),
            Set::Classes(c) => c.iter().map(|(n, _)| n.clone()).collect(),
        })
        .collect();
    names.sort();
    names.dedup();
    if names.len() > 256 {
        bail!("{} class folders; at most 256 classes", names.len());
    }
    Ok(names)
}

fn decode(p: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(p)
        .with_context(|| super::cannot_read(p))?
        .with_guessed_format()
        .with_context(|| super::cannot_read(p))?
        .decode()
        .with_context(|| {
            format!(
                "{}: cannot decode the image (damaged or truncated?)",
                p.display()
            )
        })
}

/// Loads the folder `dir`: both sets, or the test set alone (`test_only`).
pub fn load(dir: &Path, shape: Shape, test_only: bool) -> Result<Dataset> {
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    let (train, test, names) = if train_dir.is_dir() && test_dir.is_dir() {
        let (tr, te) = (list_set(&train_dir)?, list_set(&test_dir)?);
        if matches!(tr, Set::Classes(_)) != matches!(te, Set::Classes(_)) {
            bail!(
                "{}: one of train/ and test/ has class folders and the other not; give both the \
                 same layout",
                dir.display()
            );
        }
        let names = class_names(&[&tr, &te])?;
        (labelled(tr, &names), labelled(te, &names), names)
    } else {
        let set = list_set(dir)?;
        let names = class_names(&[&set])?;
        let all = labelled(set, &names);
        let (tr, te) = draw_split(all.len(), shape.test_fraction, dir)?;
        let pick = |ix: &[usize]| ix.iter().map(|&i| all[i].clone()).collect::<Vec<_>>();
        (pick(&tr), pick(&te), names)
    };
    if test.is_empty() {
        bail!("{}: no test images", test_dir.display());
    }
    let files: Vec<(PathBuf, u8)> = if test_only {
        test
    } else {
        train.iter().chain(&test).cloned().collect()
    };
    let n_train = if test_only { 0 } else { train.len() };
    // The first image's size (or data.resize) and RGB estimate the bytes before the rest is read.
    let first = decode(&files[0].0)?;
    let (h, w) = match shape.resize {
        Some([h, w]) => (h, w),
        None => (first.height() as usize, first.width() as usize),
    };
    let c = shape
        .channels
        .unwrap_or(if first.color().has_color() { 3 } else { 1 });
    check_fits(
        files.len() as u128 * (h * w * c) as u128,
        dir,
        files.len(),
        &super::describe_size(h, w, c),
    )?;
    let mut b = Builder::new(shape);
    b.reserve(files.len(), h, w);
    for chunk in files.chunks(CHUNK) {
        let imgs: Vec<Result<DynamicImage>> = chunk.par_iter().map(|(p, _)| decode(p)).collect();
        for (img, (p, _)) in imgs.into_iter().zip(chunk) {
            b.push(img?, &|| p.display().to_string())?;
        }
    }
    let labels = if names.is_empty() {
        Vec::new()
    } else {
        files.iter().map(|(_, l)| *l).collect()
    };
    Ok(into_dataset(dir, b, labels, n_train, names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn grey(p: &Path, v: u8, w: u32, h: u32) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        GrayImage::from_pixel(w, h, Luma([v])).save(p).unwrap();
    }

    #[test]
    fn class_folders_label_by_sorted_name_and_split() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..6 {
            grey(&t.path().join(format!("b/{i}.png")), 200, 3, 2);
            grey(&t.path().join(format!("a/{i}.png")), 10, 3, 2);
        }
        std::fs::write(t.path().join("a/notes.txt"), "not an image").unwrap();
        let shape = Shape {
            test_fraction: 0.25,
            ..Default::default()
        };
        let ds = load(t.path(), shape, false).unwrap();
        assert_eq!((ds.train.n, ds.test.n), (9, 3));
        assert_eq!((ds.train.rows, ds.train.cols, ds.train.channels), (2, 3, 1));
        assert_eq!(ds.train.classes, vec!["a", "b"]);
        // Every image's pixels carry its class: a = 10, b = 200.
        for s in [&ds.train, &ds.test] {
            for (k, &l) in s.labels.iter().enumerate() {
                let want = if l == 0 { 10 } else { 200 };
                assert!(s.images[k * 6..(k + 1) * 6].iter().all(|&v| v == want));
            }
        }
        // The test set alone is the same images.
        let te = load(t.path(), shape, true).unwrap().test;
        assert_eq!(
            (te.images.clone(), te.labels.clone()),
            (ds.test.images, ds.test.labels)
        );
    }

    #[test]
    fn train_test_folders_colour_and_errors() {
        let t = tempfile::tempdir().unwrap();
        let rgb = |p: &Path| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            RgbImage::from_pixel(2, 2, Rgb([255, 0, 0]))
                .save(p)
                .unwrap();
        };
        grey(&t.path().join("train/x/0.png"), 5, 2, 2);
        rgb(&t.path().join("train/y/0.png"));
        grey(&t.path().join("test/x/0.png"), 5, 2, 2);
        let ds = load(t.path(), Shape::default(), false).unwrap();
        assert_eq!((ds.train.n, ds.test.n, ds.train.channels), (2, 1, 3));
        assert_eq!(&ds.train.images[..3], &[5, 5, 5]);
        assert_eq!(&ds.train.images[12..15], &[255, 0, 0]);
        assert_eq!(ds.test.labels, vec![0]);
        // A truncated image is named.
        let bad = t.path().join("test/x/1.png");
        let good = std::fs::read(t.path().join("test/x/0.png")).unwrap();
        std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
        let e = format!("{:#}", load(t.path(), Shape::default(), false).unwrap_err());
        assert!(e.contains("1.png: cannot decode"), "{e}");
        // An empty folder, and loose images beside class folders.
        let empty = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            load(empty.path(), Shape::default(), false).unwrap_err()
        );
        assert!(e.contains("no images here"), "{e}");
        grey(&empty.path().join("loose.png"), 1, 2, 2);
        grey(&empty.path().join("c/0.png"), 1, 2, 2);
        let e = format!(
            "{:#}",
            load(empty.path(), Shape::default(), false).unwrap_err()
        );
        assert!(e.contains("both images") && e.contains("loose.png"), "{e}");
    }
}
