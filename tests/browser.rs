//! `vae explore` in a real browser: headless Chromium loads the page from a file, decodes a known
//! z (and the interpolation strip to a second one) through the page's own code path, and the
//! pixels it reports are compared with `vae`'s own decoder.
//!
//! Opt-in, because it needs Chromium, which CI does not install:
//!
//!     apt-get install -y chromium
//!     cargo test --release --test browser -- --ignored
//!
//! `VAE_CHROMIUM=/path/to/chrome` picks another binary.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> PathBuf {
    let p = PathBuf::from(std::env::var("VAE_CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    assert!(
        p.exists(),
        "{} not found: apt-get install -y chromium, or set VAE_CHROMIUM",
        p.display()
    );
    p
}

/// Loads `page#probe=...` headless; returns (the page's #probe-out JSON, chromium's stderr).
fn probe(page: &Path, arg: serde_json::Value) -> (serde_json::Value, String) {
    let arg = arg.to_string();
    // Percent-encode everything but the unreserved characters.
    let enc: String = arg
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}#probe={enc}", page.display()))
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed");
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom
        .find("<pre id=\"probe-out\"")
        .expect("no #probe-out in the page");
    let body = &dom[start..];
    let json = &body[body.find('>').unwrap() + 1..body.find("</pre>").unwrap()];
    let json = json.replace("&quot;", "\"").replace("&amp;", "&");
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("#probe-out is not JSON ({e}): {json:.300}"));
    (v, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
#[ignore = "needs Chromium: apt-get install -y chromium; cargo test --release --test browser -- --ignored"]
fn the_page_decodes_as_vae_does() {
    // Every activation's forward in the page, two hidden layers, and a colour run's layout.
    for set in [
        &[][..],
        &["model.activation=gated"],
        &["model.activation=gelu", "model.hidden=[32, 16]"],
        &["model.activation=tanh"],
        &["model.activation=softplus"],
        &["model.activation=sigmoid"],
        &["model.activation=elu"],
        &["data.channels=3", "model.latent=2"],
        &[
            "model.arch=\"conv\"",
            "model.conv=[[4, 4, 2], [8, 3, 2]]",
            "model.hidden=[32]",
        ],
        &[
            "model.arch=\"conv\"",
            "model.conv=[[4, 4, 2]]",
            "model.activation=gated",
            "data.channels=3",
        ],
        // Two stochastic layers (chain): the page decodes z2 through p(z1|z2)'s mean.
        &[
            "model.latent=[6, 3]",
            "model.hidden=[[32], [16, 16]]",
            "model.activation=tanh",
        ],
        // The hvae wiring: then [h'(z1) | g'(z2)] through the joint layer, gated.
        &[
            "model.latent=[6, 3]",
            "model.hidden=[[16, 24], [16]]",
            "model.wiring=hvae",
            "model.activation=gated",
        ],
        // The hvae wiring on a conv network: the joint layer ends at the transposed
        // convolutions' features.
        &[
            "model.arch=\"conv\"",
            "model.conv=[[4, 4, 2], [8, 3, 2]]",
            "model.latent=[6, 3]",
            "model.hidden=[[16], [16]]",
            "model.wiring=hvae",
            "model.activation=gated",
        ],
    ] {
        let mut extra = Vec::new();
        for s in set {
            extra.extend(["--set", s]);
        }
        decodes_as_vae_does(&extra);
    }
}

fn decodes_as_vae_does(extra: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), extra);
    let l = vae::eval::open(Some(run.to_str().unwrap()), Some("cpu")).unwrap();
    let zd = l.model.cfg.top_latent();
    // A known z and a second one for the strip; the strip's 5th of 10 cells is at 4/9.
    let z: Vec<f32> = (0..zd).map(|k| (k as f32 + 1.0).sin() * 1.3).collect();
    let to: Vec<f32> = (0..zd).map(|k| (k as f32 * 0.7).cos() - 0.5).collect();
    let mid: Vec<f32> = z
        .iter()
        .zip(&to)
        .map(|(a, b)| (1.0 - 4.0 / 9.0) * a + 4.0 / 9.0 * b)
        .collect();
    let want = vae::pictures::decode_means(&l, &z).unwrap();
    let want_to = vae::pictures::decode_means(&l, &to).unwrap();
    let want_mid = vae::pictures::decode_means(&l, &mid).unwrap();

    for (precision, tol) in [("f32", 1e-4f32), ("f16", 1.0 / 255.0)] {
        let page = t.path().join(format!("explore-{precision}.html"));
        ok(
            t.path(),
            &[
                "explore",
                "--precision",
                precision,
                "-o",
                page.to_str().unwrap(),
            ],
        );
        let html = std::fs::read_to_string(&page).unwrap();
        // Self-contained: nothing is fetched.
        for needle in ["src=", "href=", "http://", "https://", "@import"] {
            assert!(!html.contains(needle), "the page refers to {needle}");
        }
        let (v, stderr) = probe(&page, serde_json::json!({ "z": z, "to": to }));
        assert_eq!(v["errors"], serde_json::json!([]), "page errors: {v}");
        let console: Vec<&str> = stderr.lines().filter(|l| l.contains("CONSOLE")).collect();
        assert!(console.is_empty(), "the console got: {console:?}");
        // The subtitle names a conv network's layers (channels@kernel/stride) before the dense ones.
        let sub = v["subtitle"].as_str().unwrap_or_default();
        let conv: Vec<String> = l
            .model
            .cfg
            .conv
            .iter()
            .map(|[c, k, s]| format!("{c}@{k}x{k}/{s}"))
            .collect();
        let is_conv = l.model.cfg.arch == vae::config::Arch::Conv;
        let named = format!("conv {}, dense [", conv.join(" "));
        assert_eq!(sub.contains(&named), is_conv, "{extra:?}: subtitle {sub:?}");
        let got = floats(&v["pixels"]);
        let d = max_diff(&got, &want);
        assert!(
            d < tol,
            "{extra:?} {precision}: decoded pixels differ by {d} (tolerance {tol})"
        );
        // What a reader sees: no empty strip square before the strip is drawn, and each
        // coordinate of the z readout on one line (8 of them take two lines in its 300 px).
        assert_eq!(v["strip_hidden_at_load"], true, "{}", v["z_readout"]);
        assert_eq!(v["strip_shown"], true);
        assert_eq!(v["z_readout"]["coordinates"], zd);
        assert_eq!(v["z_readout"]["whole"], true, "{}", v["z_readout"]);
        let strip = v["strip"].as_array().expect("a strip");
        assert_eq!(strip.len(), 10);
        assert!(max_diff(&floats(&strip[0]), &want) < tol);
        assert!(max_diff(&floats(&strip[4]), &want_mid) < tol);
        assert!(max_diff(&floats(&strip[9]), &want_to) < tol);
        // The pointer itself: down at one point of the plane, moved to another, up there.
        let (v, _) = probe(
            &page,
            serde_json::json!({ "drag": [[-0.5, 0.3], [0.8, -0.4]] }),
        );
        assert_eq!(v["errors"], serde_json::json!([]), "page errors: {v}");
        let dg = &v["drag"];
        let (pz, ends) = (floats(&dg["z"]), dg["ends"].as_array().expect("a strip"));
        let (a, b) = (floats(&ends[0]), floats(&ends[1]));
        assert!(max_diff(&pz, &b) < 1e-6 && max_diff(&a, &b) > 0.1, "{dg}");
        if zd == 2 {
            // On a 2-D run the plane is z: the pointer lands within a canvas pixel or two.
            assert!(
                max_diff(&a, &[-0.5, 0.3]) < 0.05 && max_diff(&b, &[0.8, -0.4]) < 0.05,
                "{dg}"
            );
        }
        let dec = |z: &[f32]| vae::pictures::decode_means(&l, z).unwrap();
        assert!(max_diff(&floats(&dg["pixels"]), &dec(&pz)) < tol);
        let strip = dg["strip"].as_array().expect("a strip");
        assert!(max_diff(&floats(&strip[0]), &dec(&a)) < tol);
        assert!(max_diff(&floats(&strip[9]), &dec(&b)) < tol);
        eprintln!(
            "{extra:?} {precision}: largest pixel difference {d:.2e}, page {} bytes",
            html.len()
        );
    }
}
