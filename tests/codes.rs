//! `vae encode` and `vae decode` on a tiny run: the arrays load as NumPy writes them, the codes
//! decode back to the model's own reconstructions, and bad code files are one line each.

mod common;

use common::*;
use std::io::Read;
use std::path::Path;

/// An `.npz` member read back with npyz: (shape, values as f64).
fn member(npz: &Path, name: &str) -> (Vec<u64>, Vec<f64>) {
    let f = std::fs::File::open(npz).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    let mut bytes = Vec::new();
    z.by_name(&format!("{name}.npy"))
        .unwrap_or_else(|_| panic!("{} has no {name}", npz.display()))
        .read_to_end(&mut bytes)
        .unwrap();
    npy(&bytes)
}

fn npy(bytes: &[u8]) -> (Vec<u64>, Vec<f64>) {
    let f = npyz::NpyFile::new(bytes).unwrap();
    let shape = f.shape().to_vec();
    let v = match f.dtype().descr().trim_matches('\'') {
        "<f4" => f
            .into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        "|u1" => f
            .into_vec::<u8>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        d => panic!("unexpected dtype {d}"),
    };
    (shape, v)
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], payload: &[u8]) {
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    h.push_str(&" ".repeat((64 - (10 + h.len() + 1) % 64) % 64));
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(payload);
    std::fs::write(path, b).unwrap();
}

#[test]
fn encode_writes_numpy_arrays_and_decode_gives_back_the_reconstructions() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let run = tiny(p, &[]);
    let out = ok(p, &["encode", "-o", "codes.npz"]);
    assert!(out.is_empty(), "{out}");
    let npz = p.join("codes.npz");
    let (shape, mu) = member(&npz, "mu");
    let z = shape[1] as usize;
    assert_eq!(
        shape,
        vec![10000, z as u64],
        "every test image, tiny.toml's latent"
    );
    let (lshape, logvar) = member(&npz, "logvar");
    assert_eq!(lshape, shape);
    let (yshape, y) = member(&npz, "y");
    assert_eq!(yshape, vec![10000]);
    assert_eq!(
        &y[..5],
        &[7.0, 2.0, 1.0, 0.0, 4.0],
        "MNIST's first test labels"
    );

    // The library's own posterior and reconstructions of the first 16 test images.
    let l = vae::eval::open(Some(run.to_str().unwrap()), Some("cpu")).unwrap();
    let test = l.test_split(16).unwrap();
    let px = vae::eval::test_pixels(&l.cfg, &test);
    let t = candle_core::Tensor::from_slice(&px, (16, 784), &candle_core::Device::Cpu).unwrap();
    let (m, lv) = l.model.encode(&t).unwrap();
    let close = |lib: candle_core::Tensor, file: &[f64], what: &str| {
        let lib = lib.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in lib.iter().zip(file).enumerate() {
            assert!(
                (f64::from(*a) - b).abs() < 1e-5,
                "{what}[{i}]: library {a}, file {b}"
            );
        }
    };
    close(m, &mu[..16 * z], "mu");
    close(lv, &logvar[..16 * z], "logvar");
    let rec = vae::pictures::reconstruct_means(&l, &px).unwrap();
    // decode of the codes file (its `mu`) to an array: the same pixel means.
    ok(p, &["decode", "codes.npz", "-o", "x.npy"]);
    let (xshape, x) = npy(&std::fs::read(p.join("x.npy")).unwrap());
    assert_eq!(xshape, vec![10000, 28, 28]);
    let worst = rec
        .iter()
        .zip(&x)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-5,
        "decode(encode(x)) differs from the reconstruction by {worst}"
    );
    // Their own first code, decoded: a .npy of (1, Z) float64 also works, as a PNG grid.
    let first: Vec<u8> = mu[..z].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&p.join("one.npy"), "<f8", &[1, z], &first);
    ok(p, &["decode", "one.npy", "--scale", "2", "-o", "one.png"]);
    let img = image::open(p.join("one.png")).unwrap();
    assert!(img.width() >= 56 && img.height() >= 56);

    // The training split, with the run's data.
    ok(p, &["encode", "--split", "train", "-o", "train.npz"]);
    let (tshape, _) = member(&p.join("train.npz"), "mu");
    assert_eq!(tshape, vec![60000, z as u64]);
}

#[test]
fn bad_code_files_and_mismatched_data_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    tiny(p, &["--set", "train.epochs=1"]);
    let z = 8; // tiny.toml's latent
    write_npy(
        &p.join("wide.npy"),
        "<f4",
        &[2, z + 1],
        &vec![0; 4 * 2 * (z + 1)],
    );
    fails(
        p,
        &["decode", "wide.npy", "-o", "x.png"],
        "wide.npy: shape [2, 9]; the run's codes are (N, 8)",
    );
    write_npy(&p.join("ints.npy"), "<i4", &[1, z], &vec![0; 4 * z]);
    fails(
        p,
        &["decode", "ints.npy", "-o", "x.png"],
        "ints.npy: dtype <i4; codes must be float32 or float64",
    );
    let mut nan = vec![0f32; 2 * z];
    nan[z + 3] = f32::NAN;
    let bytes: Vec<u8> = nan.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&p.join("nan.npy"), "<f4", &[2, z], &bytes);
    fails(
        p,
        &["decode", "nan.npy", "-o", "x.png"],
        "nan.npy: code 1 has a non-finite value (NaN) at dimension 3",
    );
    std::fs::write(p.join("junk.npy"), b"not an array").unwrap();
    fails(
        p,
        &["decode", "junk.npy", "-o", "x.png"],
        "junk.npy: not a NumPy .npy array",
    );
    fails(
        p,
        &["decode", "missing.npy", "-o", "x.png"],
        "missing.npy: cannot open",
    );
    // Images of another size than the run's.
    std::fs::create_dir(p.join("imgs")).unwrap();
    for i in 0..3 {
        image::RgbImage::new(10, 12)
            .save(p.join(format!("imgs/{i}.png")))
            .unwrap();
    }
    fails(
        p,
        &["encode", "--data", "imgs", "-o", "c.npz"],
        "--data imgs: ",
    );
    assert!(!p.join("c.npz").exists() && !p.join("x.png").exists());
}

/// Two stochastic layers: the top layer's posterior as `mu`, `logvar` (what decode takes) and
/// the bottom layer's as `mu1`, `logvar1`, each against the library's.
#[test]
fn two_layers_write_each_layers_posterior() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let two = [
        "--set",
        "model.latent=[8,4]",
        "--set",
        "model.hidden=[[32],[16]]",
        "--set",
        "train.epochs=1",
    ];
    let run = tiny(p, &two);
    ok(p, &["encode", "-o", "codes.npz"]);
    let npz = p.join("codes.npz");
    let l = vae::eval::open(Some(run.to_str().unwrap()), Some("cpu")).unwrap();
    let px = vae::eval::test_pixels(&l.cfg, &l.test_split(4).unwrap());
    let x = candle_core::Tensor::from_slice(&px, (4, 784), &candle_core::Device::Cpu).unwrap();
    let (top, bottom) = (l.model.encode_top(&x).unwrap(), l.model.encode(&x).unwrap());
    for (name, want, width) in [
        ("mu", &top.0, 4),
        ("logvar", &top.1, 4),
        ("mu1", &bottom.0, 8),
        ("logvar1", &bottom.1, 8),
    ] {
        let (shape, got) = member(&npz, name);
        assert_eq!(shape, vec![10000, width as u64], "{name}");
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert!(
                (f64::from(*a) - b).abs() < 1e-5,
                "{name}[{i}]: library {a}, file {b}"
            );
        }
    }
    // decode takes the top layer's codes.
    ok(p, &["decode", "codes.npz", "-o", "x.npy"]);
}
