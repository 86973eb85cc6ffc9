//! Your own data end to end: a folder of generated colour PNGs in class subfolders, a .npy and a
//! .npz written here, each trained on, evaluated and drawn by the real binary.

mod common;

use common::*;
use image::{ColorType, Rgb, RgbImage};
use std::io::Write;
use std::path::Path;

/// 12x10 RGB squares, one colour per class, with a bright patch that moves with the index.
fn square(class: usize, i: usize) -> RgbImage {
    let colour = [[220, 30, 30], [30, 200, 40], [40, 60, 230]][class];
    let mut img = RgbImage::from_pixel(10, 12, Rgb([0, 0, 0]));
    let (x0, y0) = (i % 6, (i / 6) % 8);
    for y in y0..y0 + 4 {
        for x in x0..x0 + 4 {
            img.put_pixel(x as u32, y as u32, Rgb(colour));
        }
    }
    img
}

fn folder(root: &Path, per_class: usize) {
    for (c, name) in ["blue", "green", "red"].iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        // PNG, and JPEG for one class.
        let ext = if *name == "green" { "jpg" } else { "png" };
        for i in 0..per_class {
            square(2 - c, i)
                .save(d.join(format!("{i:03}.{ext}")))
                .unwrap();
        }
    }
}

/// A version-1.0 .npy: magic, header length, the header dict padded to 64 bytes, then the data.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
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

fn is_rgb(png: &[u8]) -> bool {
    image::load_from_memory(png).unwrap().color() == ColorType::Rgb8
}

fn train(dir: &Path, data: &str, extra: &[&str]) -> String {
    let d = format!("data.dir={data}");
    let mut args = vec![
        "train",
        "--config",
        "tiny.toml",
        "-q",
        "--set",
        &d,
        "--set",
        "model.hidden=[64]",
        "--set",
        "train.batch_size=10",
    ];
    args.extend_from_slice(extra);
    ok(dir, &args)
}

#[test]
fn a_folder_of_colour_pngs_trains_evaluates_and_draws_in_colour() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("squares");
    folder(&data, 20);
    std::fs::write(data.join("README.txt"), "skipped: not an image").unwrap();
    train(
        t.path(),
        data.to_str().unwrap(),
        &["--set", "model.latent=2", "--set", "data.test_fraction=0.2"],
    );
    let run = t.path().join("runs/tiny");
    let state = std::fs::read_to_string(run.join("state.json")).unwrap();
    assert!(state.contains("\"channels\": 3"), "{state}");
    assert!(state.contains("\"red\""), "{state}");
    // 60 images: 12 drawn for the test set; the model's input is 12 * 10 * 3.
    let out = ok(t.path(), &["eval", "--json", "--iw", "10"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["neg_elbo"].as_f64().unwrap().is_finite(), "{out}");
    assert!(v["iw_nll"].as_f64().unwrap().is_finite(), "{out}");
    // Every picture in colour; cells 10 wide and 12 high, 1-pixel separators.
    let s = ok_bytes(t.path(), &["sample", "-n", "4"]);
    assert_eq!(png_size(&s), (2 * 11 + 1, 2 * 13 + 1));
    assert!(is_rgb(&s));
    for args in [
        &["manifold", "--dim", "2"][..],
        &["reconstruct", "-n", "4"],
        &["interpolate"],
        &["scatter"],
    ] {
        let png = ok_bytes(t.path(), args);
        assert!(is_rgb(&png), "{args:?} is not RGB");
    }
    // Training's own pictures too.
    let g = std::fs::read(run.join("pictures/sample-002.png")).unwrap();
    assert!(is_rgb(&g));
}

#[test]
fn npy_and_npz_arrays_train_and_evaluate() {
    let t = tempfile::tempdir().unwrap();
    // 40 grey 6x5 images as float32 in [0, 1].
    let floats: Vec<u8> = (0..40 * 30)
        .flat_map(|i| (((i * 7) % 11) as f32 / 10.0).to_le_bytes())
        .collect();
    let p = t.path().join("grey.npy");
    std::fs::write(&p, npy("<f4", &[40, 6, 5], &floats)).unwrap();
    train(
        t.path(),
        p.to_str().unwrap(),
        &["--set", "data.binarize=dynamic"],
    );
    let out = ok(t.path(), &["eval", "--json"]);
    assert!(out.contains("neg_elbo"), "{out}");
    let s = ok_bytes(t.path(), &["sample", "-n", "4"]);
    assert_eq!(png_size(&s), (2 * 6 + 1, 2 * 7 + 1));
    assert!(!is_rgb(&s));

    // Keras' layout in an .npz (deflated), RGB, int64 labels; resized to 4x4 and made grey.
    let npz = t.path().join("pair.npz");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&npz).unwrap());
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let img = |n: usize| {
        (0..n * 8 * 8 * 3)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
    };
    let lab = |n: usize| {
        (0..n as i64)
            .flat_map(|i| (i % 3).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    for (name, bytes) in [
        ("x_train", npy("|u1", &[30, 8, 8, 3], &img(30))),
        ("x_test", npy("|u1", &[10, 8, 8, 3], &img(10))),
        ("y_train", npy("<i8", &[30], &lab(30))),
        ("y_test", npy("<i8", &[10], &lab(10))),
    ] {
        z.start_file(format!("{name}.npy"), opts).unwrap();
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
    let out = train(
        t.path(),
        npz.to_str().unwrap(),
        &[
            "--set",
            "data.resize=[4, 4]",
            "--set",
            "data.channels=1",
            "--set",
            "model.decoder=gaussian",
            "--set",
            "model.learn_sigma=true",
        ],
    );
    assert!(out.contains("30 train, 10 test images of 4x4"), "{out}");
    ok(t.path(), &["eval"]);
    let s = ok_bytes(t.path(), &["scatter"]);
    assert!(is_rgb(&s)); // the scatter plot itself is always RGB
}

#[test]
fn bad_data_gets_one_line_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("mixed");
    folder(&data, 3);
    let set = |d: &Path| format!("data.dir={}", d.display());
    fn args(d: &str) -> Vec<&str> {
        vec!["train", "-c", "tiny.toml", "-q", "--set", d]
    }
    // One image of another size: the first that differs is named, with the fix.
    RgbImage::new(7, 7).save(data.join("red/zzz.png")).unwrap();
    let d = set(&data);
    fails(t.path(), &args(&d), "zzz.png: 7x7 pixels");
    // A truncated image.
    std::fs::write(data.join("red/zzz.png"), b"\x89PNG\r\n\x1a\n").unwrap();
    fails(t.path(), &args(&d), "zzz.png: cannot decode");
    // Not a PNG at all: the decoder's cause is said once, not "X.: X.".
    std::fs::write(data.join("red/zzz.png"), b"junk").unwrap();
    let o = vae(t.path(), &args(&d));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("Invalid PNG signature").count(), 1, "{err}");
    // An empty folder.
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = set(&empty);
    fails(t.path(), &args(&e), "no images here");
    // An array of the wrong type and of the wrong rank.
    let p = t.path().join("x.npy");
    let a = set(&p);
    std::fs::write(&p, npy("<i4", &[2, 2, 2], &[0; 32])).unwrap();
    fails(t.path(), &args(&a), "dtype '<i4'");
    std::fs::write(&p, npy("|u1", &[8, 2], &[0; 16])).unwrap();
    fails(t.path(), &args(&a), "shape [8, 2]");
    // Too large for memory: refused from the header alone.
    std::fs::write(&p, npy("|u1", &[1 << 40, 28, 28], &[])).unwrap();
    fails(t.path(), &args(&a), "memory available");
}

/// A conv network on the colour squares (12 x 10 RGB, through a stride-2 and a stride-1
/// convolution): the fused step trains it, autograd on the same draws reaches the same test
/// -ELBO, and the pictures are in colour.
#[test]
fn a_conv_network_on_colour_pngs_trains_on_the_fused_step() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("squares");
    folder(&data, 20);
    let conv = [
        "--set",
        "model.latent=4",
        "--set",
        "data.test_fraction=0.2",
        "--set",
        "model.arch=\"conv\"",
        "--set",
        "model.conv=[[6, 4, 2], [8, 3, 1]]",
    ];
    let out = train(t.path(), data.to_str().unwrap(), &conv);
    assert!(out.contains("engine fused CPU step"), "{out}");
    let a = t.path().join("other");
    std::fs::create_dir_all(&a).unwrap();
    let mut args = conv.to_vec();
    args.extend(["--set", "train.engine=autograd"]);
    train(&a, data.to_str().unwrap(), &args);
    let last = |r: &Path| -> f64 {
        let m = std::fs::read_to_string(r.join("metrics.csv")).unwrap();
        m.lines()
            .last()
            .unwrap()
            .split(',')
            .nth(5)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (f, g) = (
        last(&t.path().join("runs/tiny")),
        last(&a.join("runs/tiny")),
    );
    assert!((f - g).abs() < 0.05, "test -ELBO fused {f}, autograd {g}");
    for args in [&["sample", "-n", "4"][..], &["reconstruct", "-n", "4"]] {
        assert!(is_rgb(&ok_bytes(t.path(), args)), "{args:?} is not RGB");
    }
}
