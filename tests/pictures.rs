//! The picture commands end to end on a tiny trained run.

mod common;

use common::*;
use std::path::Path;

/// A tiny run (latent 8) in `dir`; a 28x28 cell grid of c columns is 29c + 1 pixels wide.
fn trained(dir: &Path) {
    tiny(dir, &[]);
}

fn grid_px(cells: u32) -> u32 {
    29 * cells + 1
}

/// Whether the first `band` columns of the PNG at `path` hold dark (text) pixels.
fn has_text(path: &Path, band: u32) -> bool {
    let img = image::open(path).unwrap().to_luma8();
    (0..img.height()).any(|y| (0..band).any(|x| img.get_pixel(x, y).0[0] < 100))
}

#[test]
fn sample_writes_a_square_grid_and_is_reproducible() {
    let t = tempfile::tempdir().unwrap();
    trained(t.path());
    let a = ok_bytes(t.path(), &["sample", "-n", "64"]);
    assert_eq!(png_size(&a), (grid_px(8), grid_px(8)));
    let b = ok_bytes(t.path(), &["sample", "-n", "64"]);
    assert!(a == b, "the same seed gave different bytes");
    let c = ok_bytes(t.path(), &["sample", "-n", "64", "--seed", "2"]);
    assert!(a != c, "--seed had no effect");
    ok(
        t.path(),
        &[
            "sample",
            "-n",
            "10",
            "-o",
            "ten.png",
            "--temperature",
            "0.5",
            "--draw",
            "--scale",
            "2",
        ],
    );
    // 10 cells: 4 columns, 3 rows, at scale 2: 2 * (29 * 4 + 1) by 2 * (29 * 3 + 1).
    assert_eq!(
        png_size(&std::fs::read(t.path().join("ten.png")).unwrap()),
        (234, 176)
    );
    // Training left its pictures too.
    let run = t.path().join("runs/tiny");
    for f in [
        "pictures/sample-002.png",
        "pictures/reconstruction-002.png",
        "curves.png",
    ] {
        assert!(png_size(&std::fs::read(run.join(f)).unwrap()).0 > 0, "{f}");
    }
    assert_eq!(
        png_size(&std::fs::read(run.join("pictures/sample-001.png")).unwrap()),
        (grid_px(8), grid_px(8))
    );
}

#[test]
fn manifold_reconstruct_interpolate_scatter() {
    let t = tempfile::tempdir().unwrap();
    trained(t.path());
    let run = t.path().join("runs/tiny");
    // Standard output is a pipe here: the PNG goes there (the one rule of picture commands).
    let o = vae(t.path(), &["manifold", "--dim", "2", "--steps", "5"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("most informative"),
        "manifold should say which axes it chose: {err}"
    );
    assert_eq!(png_size(&o.stdout), (grid_px(5), grid_px(5)));
    assert!(!run.join("manifold.png").exists(), "a pipe took the PNG");
    ok(
        t.path(),
        &["manifold", "--axes", "0,3", "--steps", "4", "-o", "ax.png"],
    );
    assert_eq!(
        png_size(&std::fs::read(t.path().join("ax.png")).unwrap()),
        (grid_px(4), grid_px(4))
    );
    // --dim 1: one row per latent dimension (8), --steps columns.
    ok(
        t.path(),
        &["manifold", "--dim", "1", "--steps", "6", "-o", "m1.png"],
    );
    assert_eq!(
        png_size(&std::fs::read(t.path().join("m1.png")).unwrap()),
        (grid_px(6), grid_px(8))
    );
    // 5 images, 8 to a row: one row of originals over one of reconstructions, behind a band
    // of row labels.
    ok(t.path(), &["reconstruct", "-n", "5", "-o", "r.png"]);
    let (w, h) = png_size(&std::fs::read(t.path().join("r.png")).unwrap());
    assert_eq!(h, grid_px(2));
    let band = w - grid_px(5);
    assert!(band > 40, "no label band: {w}");
    assert!(
        has_text(&t.path().join("r.png"), band),
        "the labels are blank"
    );
    ok(
        t.path(),
        &[
            "reconstruct",
            "--index",
            "3,17,42,9999",
            "--cols",
            "2",
            "-o",
            "r2.png",
        ],
    );
    // Two pairs of rows, 6 white pixels between the pairs; the same label band.
    assert_eq!(
        png_size(&std::fs::read(t.path().join("r2.png")).unwrap()),
        (grid_px(2) + band, 2 * grid_px(2) + 6)
    );
    // 6 steps plus the two images at the ends; two rows with --slerp.
    ok(
        t.path(),
        &[
            "interpolate",
            "--from",
            "0",
            "--to",
            "1",
            "--steps",
            "6",
            "--slerp",
            "-o",
            "i.png",
        ],
    );
    let (w, h) = png_size(&std::fs::read(t.path().join("i.png")).unwrap());
    assert_eq!(h, grid_px(2));
    assert!(w > grid_px(8) + 20, "no label band: {w}");
    assert!(
        has_text(&t.path().join("i.png"), w - grid_px(8)),
        "the labels are blank"
    );
    let png = ok_bytes(t.path(), &["scatter", "--limit", "500"]);
    assert_eq!(png_size(&png), (900, 820));
}

#[test]
fn picture_bad_input() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    fails(p, &["sample", "-n", "4", "-o", "x.png"], "runs/latest");
    trained(p);
    fails(p, &["sample", "-n", "0", "-o", "x.png"], "'0' for '-n <N>'");
    fails(
        p,
        &["sample", "-n", "100000000", "-o", "x.png"],
        "'100000000' for '-n <N>'",
    );
    fails(
        p,
        &["sample", "--temperature", "NaN", "-o", "x.png"],
        "--temperature",
    );
    fails(
        p,
        &["sample", "-o", "/nonexistent/dir/x.png"],
        "the folder /nonexistent/dir does not exist",
    );
    fails(
        p,
        &["sample", "-o", "missing/"],
        "the folder missing does not exist; create it first",
    );
    fails(
        p,
        &["manifold", "--dim", "3", "-o", "x.png"],
        "'3' for '--dim <DIM>'",
    );
    fails(
        p,
        &["manifold", "--axes", "0,8", "-o", "x.png"],
        "--axes 0,8",
    );
    fails(
        p,
        &["manifold", "--axes", "2,2", "-o", "x.png"],
        "--axes 2,2",
    );
    fails(
        p,
        &["manifold", "--axes", "x", "-o", "x.png"],
        "'x' for '--axes <I,J>'",
    );
    fails(
        p,
        &["manifold", "--steps", "1", "-o", "x.png"],
        "'1' for '--steps <STEPS>'",
    );
    fails(
        p,
        &["reconstruct", "--index", "10000", "-o", "x.png"],
        "image 10000",
    );
    fails(
        p,
        &["reconstruct", "--index", "1,a", "-o", "x.png"],
        "--index 1,a",
    );
    fails(
        p,
        &["interpolate", "--to", "12345", "-o", "x.png"],
        "image 12345",
    );
    fails(
        p,
        &["sample", "--scale", "0", "-o", "x.png"],
        "'0' for '--scale <SCALE>'",
    );
    std::fs::create_dir(p.join("norun")).unwrap();
    std::fs::write(p.join("norun/config.toml"), "").unwrap();
    fails(
        p,
        &["sample", "--run", "norun", "-o", "x.png"],
        "model.safetensors",
    );
    assert!(
        !p.join("x.png").exists(),
        "a failed command left an output file"
    );
    let leftovers: Vec<_> = std::fs::read_dir(p)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Runs `vae` in `dir` with a pseudo-terminal as its standard output.
fn on_a_terminal(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::os::fd::FromRawFd;
    // The master end stays here, the slave becomes the child's stdout.
    let (master, slave) = unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let s = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(s >= 0, "open pts");
        (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s))
    };
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(args)
        .current_dir(dir)
        .stdout(slave)
        .output()
        .unwrap();
    drop(master);
    o
}

/// On a terminal a picture command writes `<run>/<name>.png` (the one rule: stdout only when it
/// is not a terminal; `-o` wins), and `-o -` to a terminal is refused with how to redirect.
#[test]
fn pictures_on_a_terminal_go_to_the_run() {
    let t = tempfile::tempdir().unwrap();
    trained(t.path());
    let run = t.path().join("runs/tiny");
    for (cmd, file) in [
        (&["sample", "-n", "4"][..], "sample.png"),
        (&["manifold", "--steps", "4"][..], "manifold.png"),
    ] {
        let o = on_a_terminal(t.path(), cmd);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{cmd:?}: {err}");
        assert!(
            png_size(&std::fs::read(run.join(file)).unwrap()).0 > 0,
            "{file}"
        );
        assert!(
            err.contains(file),
            "{cmd:?} should say where it wrote: {err}"
        );
    }
    let o = on_a_terminal(t.path(), &["sample", "-n", "4", "-o", "-"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "wrote a PNG to a terminal");
    assert!(err.contains("terminal") && err.contains("-o"), "{err}");
}

#[test]
fn explore_writes_one_self_contained_page() {
    let t = tempfile::tempdir().unwrap();
    trained(t.path());
    // Piped: the page goes to stdout, like the pictures.
    let html = String::from_utf8(ok_bytes(t.path(), &["explore", "--limit", "100"])).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for needle in ["src=", "href=", "http://", "https://"] {
        assert!(!html.contains(needle), "the page refers to {needle}");
    }
    let open = "<script id=\"vae-data\" type=\"application/json\">";
    let start = html.find(open).unwrap() + open.len();
    let end = start + html[start..].find("</script>").unwrap();
    let v: serde_json::Value = serde_json::from_str(&html[start..end]).unwrap();
    assert_eq!(
        (v["n"].as_u64(), v["latent"].as_u64()),
        (Some(100), Some(8))
    );
    assert_eq!(v["labels"].as_array().unwrap().len(), 100);
    // The tiny decoder: 8 -> 200 -> 784, float16 (2 bytes a weight, base64: 4 chars per 3 bytes).
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(
        layers[1]["w"].as_str().unwrap().len(),
        (200 * 784 * 2usize).div_ceil(3) * 4
    );
    assert_eq!(
        v["codes"].as_str().unwrap().len(),
        (100 * 8 * 2usize).div_ceil(3) * 4
    );
    // -o FILE; the PCA axes are unit vectors.
    ok(t.path(), &["explore", "-o", "e.html", "--precision", "f32"]);
    let e = std::fs::read_to_string(t.path().join("e.html")).unwrap();
    assert!(e.len() > html.len());
    for axis in v["pca"]["axes"].as_array().unwrap() {
        let n: f64 = axis
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum();
        assert!((n - 1.0).abs() < 1e-6, "{n}");
    }
    // A 1-D latent space has no plane to explore.
    let one = tempfile::tempdir().unwrap();
    tiny(one.path(), &["--set", "model.latent=1"]);
    fails(
        one.path(),
        &["explore", "-o", "x.html"],
        "latent space is 1-D",
    );
}

/// `-o` into a folder (`-o out/`, or one that exists) writes the command's default file there;
/// a device is written through, not replaced; a write error names its cause once.
#[test]
fn output_to_a_folder_or_a_device() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    trained(p);
    std::fs::create_dir(p.join("out")).unwrap();
    ok(p, &["sample", "-n", "4", "-o", "out/"]);
    ok(p, &["reconstruct", "-n", "4", "-o", "out"]);
    for f in ["out/sample.png", "out/reconstruction.png"] {
        assert!(png_size(&std::fs::read(p.join(f)).unwrap()).0 > 0, "{f}");
    }
    if Path::new("/dev/full").exists() {
        let o = vae(p, &["sample", "-n", "4", "-o", "/dev/full"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.matches("No space left on device").count(), 1, "{err}");
        use std::os::unix::fs::FileTypeExt;
        let md = std::fs::metadata("/dev/full").unwrap();
        assert!(md.file_type().is_char_device(), "/dev/full was replaced");
    }
}
