//! End-to-end tests: run the built `vae` binary in a temporary directory on the shipped data.

mod common;

use common::*;
use std::path::{Path, PathBuf};

#[test]
fn tiny_train_writes_checkpoint_and_learns() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &[]);
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.toml",
        "metrics.csv",
        "state.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let latest = std::fs::read_to_string(t.path().join("runs/latest")).unwrap();
    assert!(latest.trim().ends_with("runs/tiny"), "{latest}");
    let m = metrics(&run);
    assert_eq!(m.len(), 3, "epoch 0 (untrained) + 2 epochs");
    let untrained: f64 = m[0][5].parse().unwrap();
    let trained: f64 = m[2][5].parse().unwrap();
    // Untrained: logits near 0 cost about 784 ln 2 = 543 nats; 2 epochs on 300 images reach
    // roughly 300. Well below means below 70% of the untrained figure.
    assert!(untrained > 500.0, "{untrained}");
    assert!(
        trained < 0.7 * untrained,
        "test -ELBO {trained} vs untrained {untrained}"
    );
    // A second run of the same name goes beside it, never over it.
    ok(
        t.path(),
        &tiny_args(&["--set", "data.limit=50", "--set", "train.epochs=1"]),
    );
    assert!(t.path().join("runs/tiny-run2/model.safetensors").is_file());
    assert_eq!(metrics(&run).len(), 3);
}

#[test]
fn eval_prints_finite_numbers() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &["--set", "train.epochs=1"]);
    let out = ok(t.path(), &["eval", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (total, recon, kl) = (
        v["neg_elbo"].as_f64().unwrap(),
        v["recon"].as_f64().unwrap(),
        v["kl"].as_f64().unwrap(),
    );
    assert!(total.is_finite() && recon.is_finite() && kl.is_finite());
    assert!((total - recon - kl).abs() < 1e-6 && kl >= 0.0 && recon > 0.0);
    assert_eq!(v["images"].as_u64(), Some(10000));
    // On the same 1,000 test images (tiny.toml's test_limit) eval reproduces the run's last
    // test -ELBO: the same noise stream and the same forward.
    let out = ok(t.path(), &["eval", "--json", "--limit", "1000"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let logged: f64 = metrics(&run).last().unwrap()[5].parse().unwrap();
    let got = v["neg_elbo"].as_f64().unwrap();
    assert!(
        (got - logged).abs() < 1e-3,
        "eval {got}, metrics.csv {logged}"
    );
    let text = ok(t.path(), &["eval", "--run", run.to_str().unwrap()]);
    assert!(text.contains("test -ELBO") && text.contains("KL"), "{text}");
    // K = 1 is a one-sample -ELBO, not a tighter bound; one image is "1 image".
    let one = ok(t.path(), &["eval", "--iw", "1", "--limit", "1"]);
    assert!(one.contains("over 1 image,"), "{one}");
    assert!(!one.contains("tighter than the -ELBO"), "{one}");
    assert!(one.contains("no tighter"), "{one}");
    let two = ok(t.path(), &["eval", "--iw", "2", "--limit", "2"]);
    assert!(
        two.contains("over 2 images,") && two.contains("tighter than the -ELBO"),
        "{two}"
    );
}

#[test]
fn same_seed_same_numbers() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["--set", "train.epochs=1", "--set", "data.binarize=dynamic"];
    let (ra, rb) = (tiny(a.path(), &extra), tiny(b.path(), &extra));
    let wa = std::fs::read(ra.join("model.safetensors")).unwrap();
    let wb = std::fs::read(rb.join("model.safetensors")).unwrap();
    assert!(wa == wb, "same seed gave different weights");
    let c = tempfile::tempdir().unwrap();
    let rc = tiny(
        c.path(),
        &[
            "--set",
            "train.epochs=1",
            "--set",
            "data.binarize=dynamic",
            "--set",
            "seed=2",
        ],
    );
    assert!(
        std::fs::read(rc.join("model.safetensors")).unwrap() != wa,
        "seed had no effect"
    );
}

#[test]
fn bad_input_is_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    fails(p, &["train", "--config", "nope.toml"], "nope.toml");
    std::fs::write(p.join("bad.toml"), "[train]\nlrr = 1\n").unwrap();
    fails(p, &["train", "--config", "bad.toml"], "lrr");
    std::fs::write(p.join("syntax.toml"), "seed = 1\n[train\n").unwrap();
    fails(p, &["train", "--config", "syntax.toml"], "line 2");
    fails(
        p,
        &["train", "--set", "train.batch_size=0"],
        "train.batch_size",
    );
    fails(p, &["train", "--set", "model.latent=-3"], "model.latent");
    fails(p, &["train", "--set", "train.lr=fast"], "train.lr");
    fails(p, &["train", "--set", "data.dir=/no/such/dir"], "data.dir");
    fails(p, &["train", "--device", "cuda"], "cuda");
    // A truncated IDX file.
    let d = p.join("broken");
    std::fs::create_dir(&d).unwrap();
    for f in [
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(Path::new(&data_dir()).join(f), d.join(f)).unwrap();
    }
    let mut img = 2051u32.to_be_bytes().to_vec();
    for v in [60000u32, 28, 28] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    img.extend_from_slice(&[0u8; 1000]);
    std::fs::write(d.join("train-images-idx3-ubyte"), img).unwrap();
    let set = format!("data.dir={}", d.display());
    fails(p, &["train", "--set", &set], "truncated");
    // No run yet, and a directory that is not a run.
    fails(p, &["eval"], "runs/latest");
    std::fs::create_dir(p.join("empty")).unwrap();
    fails(p, &["eval", "--run", "empty"], "config.toml");
    // Nothing was half-written by any of the above.
    assert!(
        !p.join("runs").exists(),
        "a failed command left runs/ behind"
    );
    // A run directory with a config but no checkpoint.
    std::fs::write(p.join("empty/config.toml"), "").unwrap();
    fails(p, &["eval", "--run", "empty"], "model.safetensors");
}

/// A run stopped after epoch 1 and resumed ends with the same weights, moments and metrics as one
/// that never stopped (same seed, same device), on both engines, on the fused step with
/// several importance samples and flows (whose noise is S rows per image), and with a
/// validation split (best and last weights, the early-stopping count).
#[test]
fn resume_matches_an_unbroken_run() {
    let k_samples = ["--set", "train.iw_samples=3", "--set", "model.flows=2"];
    let valid = ["--set", "data.valid=50", "--set", "train.patience=5"];
    for (engine, extra) in [
        ("fused", &[][..]),
        ("autograd", &[][..]),
        ("fused", &k_samples[..]),
        ("fused", &valid[..]),
    ] {
        let e = format!("train.engine={engine}");
        let mut common = vec![
            "--set",
            e.as_str(),
            "--set",
            "data.binarize=dynamic",
            "--set",
            "data.limit=200",
        ];
        common.extend_from_slice(extra);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut args = common.to_vec();
        args.extend(["--set", "train.epochs=3"]);
        let ra = tiny(a.path(), &args);
        let mut args = common.to_vec();
        args.extend(["--set", "train.epochs=1"]);
        let rb = tiny(b.path(), &args);
        let out = ok(
            b.path(),
            &["train", "--resume", "-q", "--set", "train.epochs=3"],
        );
        assert!(
            out.contains("resuming") && out.contains("after epoch 1"),
            "{out}"
        );
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "state.json",
            "last.safetensors",
        ] {
            if f == "last.safetensors" && extra != valid {
                continue;
            }
            let (x, y) = (
                std::fs::read(ra.join(f)).unwrap(),
                std::fs::read(rb.join(f)).unwrap(),
            );
            assert!(
                x == y,
                "{engine}: {f} differs between the resumed and the unbroken run"
            );
        }
        let strip = |m: Vec<Vec<String>>| -> Vec<Vec<String>> {
            // Everything but the wall-clock columns.
            m.into_iter().map(|r| r[..8].to_vec()).collect()
        };
        assert_eq!(
            strip(metrics(&ra)),
            strip(metrics(&rb)),
            "{engine}: metrics differ"
        );
        // A finished run says how to train longer.
        fails(b.path(), &["train", "--resume", "-q"], "train.epochs");
        // The model cannot change under a resumed run.
        fails(
            b.path(),
            &[
                "train",
                "--resume",
                "-q",
                "--set",
                "model.latent=3",
                "--set",
                "train.epochs=5",
            ],
            "model",
        );
    }
}

/// `data.valid`: the held-out images get a validation -ELBO per epoch, the run's model is the
/// best epoch by it (the last weights stay in last.safetensors for --resume), and
/// `train.patience` stops a run whose validation -ELBO no longer improves.
#[test]
fn validation_split_keeps_the_best_epoch_and_stops_early() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(
        t.path(),
        &["--set", "data.valid=100", "--set", "train.epochs=3"],
    );
    let m = metrics(&run);
    assert_eq!(m.len(), 4);
    let valid: Vec<f64> = m.iter().map(|r| r[10].parse().unwrap()).collect();
    assert!(valid.iter().all(|v| v.is_finite() && *v > 0.0), "{valid:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    let best = state["valid"]["epoch"].as_u64().unwrap() as usize;
    let argmin = (1..=3)
        .min_by(|a, b| valid[*a].total_cmp(&valid[*b]))
        .unwrap();
    assert_eq!(best, argmin, "best epoch vs {valid:?}");
    assert!(run.join("last.safetensors").is_file());
    let same = std::fs::read(run.join("model.safetensors")).unwrap()
        == std::fs::read(run.join("last.safetensors")).unwrap();
    assert_eq!(same, best == 3, "model.safetensors is the best epoch's");
    let text = ok(t.path(), &["eval"]);
    assert!(
        text.contains(&format!("epoch {best} (best validation")),
        "{text}"
    );

    // A learning rate too small to move the validation -ELBO: patience 1 stops after epoch 2.
    let u = tempfile::tempdir().unwrap();
    let d = format!("data.dir={}", data_dir());
    let out = ok(
        u.path(),
        &[
            "train",
            "-c",
            "tiny.toml",
            "-q",
            "--set",
            &d,
            "--set",
            "data.valid=100",
            "--set",
            "train.patience=1",
            "--set",
            "train.lr=1e-12",
            "--set",
            "train.epochs=5",
        ],
    );
    assert!(out.contains("early stopping"), "{out}");
    assert_eq!(metrics(&u.path().join("runs/tiny")).len(), 3, "epochs 0-2");
    fails(
        u.path(),
        &["train", "--resume", "-q", "--set", "train.epochs=9"],
        "train.patience",
    );
    // Patience needs a validation split.
    fails(
        u.path(),
        &["train", "-c", "tiny.toml", "--set", "train.patience=3"],
        "data.valid",
    );
}

/// A tiny run with `model.prior = prior` of `k` components in `dir`: its metrics rows, and the
/// -ELBO and IW estimate (K = 20) of its first 50 test images.
fn prior_run(dir: &Path, prior: &str, k: &str) -> (PathBuf, Vec<Vec<String>>, f64, f64) {
    let (p, c) = (
        format!("model.prior={prior}"),
        format!("model.prior_components={k}"),
    );
    let run = tiny(dir, &["--set", &p, "--set", &c]);
    let m = metrics(&run);
    let out = ok(dir, &["eval", "--json", "--iw", "20", "--limit", "50"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (elbo, iw) = (
        v["neg_elbo"].as_f64().unwrap(),
        v["iw_nll"].as_f64().unwrap(),
    );
    (run, m, elbo, iw)
}

/// A mixture prior trains on the fused step, and eval --iw, sample and manifold use it.
#[test]
fn mixture_prior_trains_evaluates_and_draws() {
    let t = tempfile::tempdir().unwrap();
    let (_, m, elbo, iw) = prior_run(t.path(), "mog", "3");
    let (untrained, trained): (f64, f64) = (m[0][5].parse().unwrap(), m[2][5].parse().unwrap());
    assert!(trained < 0.8 * untrained, "{trained} vs {untrained}");
    assert!(iw.is_finite() && iw < elbo + 5.0, "IW {iw} vs -ELBO {elbo}");
    for cmd in [["sample", "-o", "s.png"], ["manifold", "-o", "m.png"]] {
        ok(t.path(), &cmd);
    }
    for f in ["s.png", "m.png"] {
        assert!(std::fs::metadata(t.path().join(f)).unwrap().len() > 100);
    }
}

/// `train.eval_every`: the test set (and the epoch's pictures) every N epochs and at the last;
/// the other epochs' rows leave the test columns empty, and the curves still draw.
#[test]
fn eval_every_skips_test_epochs() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(
        t.path(),
        &["--set", "train.epochs=3", "--set", "train.eval_every=2"],
    );
    let m = metrics(&run);
    let has_test: Vec<bool> = m.iter().map(|r| !r[5].is_empty()).collect();
    assert_eq!(has_test, vec![true, false, true, true], "{m:?}");
    assert!(
        m[1][2].parse::<f64>().unwrap() > 0.0,
        "epoch 1 still logs its training -ELBO"
    );
    let pics = run.join("pictures");
    assert!(!pics.join("sample-001.png").exists());
    assert!(pics.join("sample-002.png").is_file() && pics.join("sample-003.png").is_file());
    assert!(run.join("curves.png").is_file());
}

#[test]
fn vamp_prior_trains_evaluates_and_samples() {
    let t = tempfile::tempdir().unwrap();
    let (run, m, elbo, iw) = prior_run(t.path(), "vamp", "20");
    // Test -ELBO before training and after two epochs.
    let first: f64 = m[0][5].parse().unwrap();
    let last: f64 = m[2][5].parse().unwrap();
    assert!(last.is_finite() && last < first, "{m:?}");
    assert!(iw.is_finite() && iw < elbo + 1.0, "IW {iw} vs -ELBO {elbo}");
    assert!(png_size(&ok_bytes(t.path(), &["sample", "-n", "4"])).0 > 0);
    assert!(png_size(&ok_bytes(t.path(), &["manifold"])).0 > 0);
    // The checkpoint holds the pseudo-inputs; flows are refused by name.
    let names = std::fs::read(run.join("model.safetensors")).unwrap();
    assert!(String::from_utf8_lossy(&names).contains("prior.pseudo_inputs"));
    let vamp = [
        "train",
        "-c",
        "tiny.toml",
        "--set",
        "model.prior=vamp",
        "--set",
    ];
    fails(
        t.path(),
        &[&vamp[..], &["model.flows=2"]].concat(),
        "model.flows = 0",
    );
}

/// Trains tiny with `args` in `dir` (the fused step, as `auto` picks on the CPU) and again on
/// autograd in a temporary directory: the same draws, so the same test -ELBO after the last
/// epoch up to f32 rounding. Returns the fused run's directory.
fn fused_as_autograd(dir: &Path, args: &[&str]) -> PathBuf {
    let out = ok(dir, &tiny_args(args));
    assert!(out.contains("engine fused CPU step"), "{out}");
    let run = dir.join("runs/tiny");
    let c = tempfile::tempdir().unwrap();
    let mut args = args.to_vec();
    args.extend(["--set", "train.engine=autograd"]);
    let other = tiny(c.path(), &args);
    let last = |r: &Path| -> f64 { metrics(r).last().unwrap()[5].parse().unwrap() };
    let (f, g) = (last(&run), last(&other));
    assert!((f - g).abs() < 0.05, "test -ELBO fused {f}, autograd {g}");
    run
}

/// Two stochastic layers (Burda et al.'s chain) end to end on a tiny config: the fused step
/// trains them (autograd, on the same draws, reaches the same test -ELBO), a resumed run ends
/// where an unbroken one does, `eval --iw` scores them, the pictures and the explorer draw the
/// top layer.
#[test]
fn two_stochastic_layers_train_resume_evaluate_and_draw() {
    let two = [
        "--set",
        "model.latent=[8, 4]",
        "--set",
        "model.hidden=[[64], [32]]",
        "--set",
        "model.activation=tanh",
        "--set",
        "data.binarize=dynamic",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = two.to_vec();
    args.extend(["--set", "train.epochs=2"]);
    let run = fused_as_autograd(a.path(), &args);
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        cfg.contains("latent = [8, 4]") && cfg.contains("wiring = \"chain\""),
        "{cfg}"
    );
    // One epoch, then resumed to two: the same weights as the unbroken run.
    let mut args = two.to_vec();
    args.extend(["--set", "train.epochs=1"]);
    tiny(b.path(), &args);
    ok(
        b.path(),
        &["train", "--resume", "-q", "--set", "train.epochs=2"],
    );
    assert!(
        std::fs::read(run.join("model.safetensors")).unwrap()
            == std::fs::read(b.path().join("runs/tiny/model.safetensors")).unwrap(),
        "resume differs from an unbroken run"
    );
    let out = ok(
        a.path(),
        &["eval", "--json", "--iw", "20", "--limit", "100"],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (nelbo, iw) = (
        v["neg_elbo"].as_f64().unwrap(),
        v["iw_nll"].as_f64().unwrap(),
    );
    assert!(
        iw.is_finite() && iw < nelbo + 1.0,
        "-log p(x) {iw}, -ELBO {nelbo}"
    );
    assert!(v["iw_se"].as_f64().is_some_and(|s| s > 0.0), "{v}");
    // The checkpoint holds both layers' networks under readable names.
    let params =
        vae::run::load_tensors(&run.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    for name in [
        "encoder2.hidden.0.weight",
        "encoder2.mu.weight",
        "decoder2.logvar.weight",
    ] {
        assert!(params.contains_key(name), "{name} missing");
    }
    assert_eq!(params["encoder2.mu.weight"].dims(), &[4, 32]);
    assert_eq!(params["decoder2.mu.weight"].dims(), &[8, 32]);
    for cmd in [
        &["sample", "-n", "16", "-o", "s.png"][..],
        &["manifold", "--steps", "5", "-o", "m.png"],
        &["reconstruct", "-n", "4", "-o", "r.png"],
        &["scatter", "--limit", "200", "-o", "c.png"],
    ] {
        ok(a.path(), cmd);
    }
    // The explorer decodes the chain's top layer (tests/browser.rs checks its pixels).
    ok(a.path(), &["explore", "--limit", "100", "-o", "e.html"]);
}

/// Tomczak & Welling's two-level wiring with their VampPrior on z2, gated units and the
/// log-variance clip: the fused step trains it (autograd, on the same draws, reaches the same
/// test -ELBO), scores it with --iw, and samples from the prior (z2 from a pseudo-input's
/// q(z2|u), z1 at p(z1|z2)'s mean).
#[test]
fn hvae_with_the_vamp_prior_trains_evaluates_and_samples() {
    let t = tempfile::tempdir().unwrap();
    let args = vec![
        "--set",
        "model.latent=[8, 4]",
        "--set",
        "model.hidden=[[32, 32], [32, 32]]",
        "--set",
        "model.wiring=hvae",
        "--set",
        "model.prior=vamp",
        "--set",
        "model.prior_components=10",
        "--set",
        "model.activation=gated",
        "--set",
        "model.logvar_min=-6",
        "--set",
        "model.logvar_max=2",
    ];
    let run = fused_as_autograd(t.path(), &args);
    let m = metrics(&run);
    let (first, last): (f64, f64) = (m[0][5].parse().unwrap(), m[2][5].parse().unwrap());
    assert!(last < first, "test -ELBO {first} -> {last}");
    let params =
        vae::run::load_tensors(&run.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(params["encoder.z2.0.weight"].dims(), &[32, 4]);
    assert_eq!(params["encoder.hidden.1.weight"].dims(), &[32, 64]);
    assert_eq!(params["decoder.z2.0.gate.weight"].dims(), &[32, 4]);
    assert_eq!(params["encoder2.hidden.0.weight"].dims(), &[32, 784]);
    assert_eq!(params["prior.pseudo_inputs"].dims(), &[10, 784]);
    let out = ok(t.path(), &["eval", "--json", "--iw", "10", "--limit", "50"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["iw_nll"].as_f64().unwrap().is_finite(), "{v}");
    ok(t.path(), &["sample", "-n", "9", "-o", "s.png"]);
    // The explorer decodes the hvae wiring's top layer (tests/browser.rs checks its pixels).
    ok(t.path(), &["explore", "--limit", "50", "-o", "e.html"]);
}

/// Tomczak & Welling's convHVAE layout on a tiny config: the hvae wiring with a conv network
/// (the convolutions' features shared by q(z2|x) and q(z1|x, z2), the decoder's joint network
/// ending in the transposed convolutions) and the VampPrior through them. The fused step trains
/// it (autograd, on the same draws, reaches the same test -ELBO), `eval --iw` scores it, the
/// pictures and the explorer draw it; the chain wiring with convolutions trains too.
#[test]
fn conv_networks_with_two_stochastic_layers_train_evaluate_and_draw() {
    let t = tempfile::tempdir().unwrap();
    let args = [
        "--set",
        "model.arch=\"conv\"",
        "--set",
        "model.conv=[[4, 4, 2], [8, 3, 2]]",
        "--set",
        "model.latent=[8, 4]",
        "--set",
        "model.hidden=[[32], [32]]",
        "--set",
        "model.wiring=hvae",
        "--set",
        "model.prior=vamp",
        "--set",
        "model.prior_components=5",
        "--set",
        "model.activation=gated",
        "--set",
        "model.logvar_min=-6",
        "--set",
        "model.logvar_max=2",
    ];
    let run = fused_as_autograd(t.path(), &args);
    let m = metrics(&run);
    let (first, last): (f64, f64) = (m[0][5].parse().unwrap(), m[2][5].parse().unwrap());
    assert!(last < first, "test -ELBO {first} -> {last}");
    let params =
        vae::run::load_tensors(&run.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    // 28 -> 14 -> 7 at 8 channels: 392 features, read by q(z2|x) and h(x), written by the
    // joint network's last layer (2 x 32 wide) for the transposed convolutions.
    assert_eq!(params["encoder.conv.0.weight"].dims(), &[4, 1, 4, 4]);
    assert_eq!(params["encoder2.hidden.0.weight"].dims(), &[32, 392]);
    assert_eq!(params["encoder.hidden.0.weight"].dims(), &[32, 392]);
    assert_eq!(params["decoder.hidden.1.gate.weight"].dims(), &[392, 64]);
    assert_eq!(params["decoder.out.weight"].dims(), &[4, 1, 4, 4]);
    assert_eq!(params["prior.pseudo_inputs"].dims(), &[5, 784]);
    let out = ok(t.path(), &["eval", "--json", "--iw", "10", "--limit", "50"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["iw_nll"].as_f64().unwrap().is_finite(), "{v}");
    for cmd in [
        &["sample", "-n", "9", "-o", "s.png"][..],
        &["reconstruct", "-n", "8", "-o", "r.png"],
        &["explore", "--limit", "50", "-o", "e.html"],
    ] {
        ok(t.path(), cmd);
    }
    // The chain wiring: the convolutions around q(z1|x) and p(x|z1).
    let c = tempfile::tempdir().unwrap();
    let mut chain = args[..8].to_vec();
    chain.extend(["--set", "model.activation=relu"]);
    fused_as_autograd(c.path(), &chain);
}

/// A conv network (`model.arch = "conv"`) end to end on a tiny config: the fused step trains it
/// (autograd on the same draws reaches the same test -ELBO), a resumed run ends where an
/// unbroken one does, `eval --iw` scores it, the pictures draw it, and the layers' names and
/// shapes are PyTorch's. A size the strides do not divide is one line naming the layer.
#[test]
fn conv_network_trains_resumes_evaluates_and_draws() {
    let conv = [
        "--set",
        "model.arch=\"conv\"",
        "--set",
        "model.conv=[[4, 4, 2], [8, 3, 2]]",
        "--set",
        "model.hidden=[32]",
        "--set",
        "model.activation=gated",
        "--set",
        "data.binarize=dynamic",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = conv.to_vec();
    args.extend(["--set", "train.epochs=2"]);
    let run = fused_as_autograd(a.path(), &args);
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains("arch = \"conv\""), "{cfg}");
    // The VampPrior too: its pseudo-inputs go through the convolutions on the fused step.
    let v = tempfile::tempdir().unwrap();
    let mut vamp = conv.to_vec();
    vamp.extend([
        "--set",
        "model.prior=vamp",
        "--set",
        "model.prior_components=5",
    ]);
    vamp.extend(["--set", "train.epochs=1"]);
    fused_as_autograd(v.path(), &vamp);
    // PyTorch's layouts: Conv2d (out, in, k, k), ConvTranspose2d (in, out, k, k), 28 -> 14 -> 7.
    // The checkpoint's safetensors header: 8 bytes of length, then JSON.
    let st = std::fs::read(run.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let head: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    for (name, shape) in [
        ("encoder.conv.0.weight", vec![4, 1, 4, 4]),
        ("encoder.conv.1.gate.weight", vec![8, 4, 3, 3]),
        ("encoder.hidden.0.weight", vec![32, 8 * 7 * 7]),
        ("decoder.hidden.1.weight", vec![8 * 7 * 7, 32]),
        ("decoder.conv.0.weight", vec![8, 4, 3, 3]),
        ("decoder.out.weight", vec![4, 1, 4, 4]),
        ("decoder.out.bias", vec![1]),
    ] {
        let got: Vec<u64> = serde_json::from_value(head[name]["shape"].clone())
            .unwrap_or_else(|_| panic!("{name} missing: {head}"));
        assert_eq!(got, shape, "{name}");
    }
    // One epoch, then resumed to two: the same weights as the unbroken run.
    let mut args = conv.to_vec();
    args.extend(["--set", "train.epochs=1"]);
    tiny(b.path(), &args);
    let rb = b.path().join("runs/tiny");
    ok(
        b.path(),
        &[
            "train",
            "--resume",
            "--run",
            rb.to_str().unwrap(),
            "-q",
            "--set",
            "train.epochs=2",
        ],
    );
    let last = |r: &Path| metrics(r).last().unwrap()[5].clone();
    assert_eq!(last(&run), last(&rb));
    let out = ok(a.path(), &["eval", "--json", "--iw", "20", "--limit", "50"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (elbo, iw) = (
        v["neg_elbo"].as_f64().unwrap(),
        v["iw_nll"].as_f64().unwrap(),
    );
    assert!(iw.is_finite() && iw < elbo + 1.0, "{out}");
    let s = ok_bytes(a.path(), &["sample", "-n", "4"]);
    assert_eq!(png_size(&s), (2 * 29 + 1, 2 * 29 + 1));
    for args in [
        &["manifold", "--dim", "2"][..],
        &["reconstruct", "-n", "4"],
        &["interpolate"],
        &["scatter"],
    ] {
        ok_bytes(a.path(), args);
    }
    // 28 -> 14 -> 7, and a third stride-2 layer cannot halve 7.
    let mut args = conv.to_vec();
    args.extend(["--set", "model.conv=[[4, 4, 2], [8, 4, 2], [8, 4, 2]]"]);
    fails(
        a.path(),
        &tiny_args(&args),
        "key `model.conv[2]` (stride 2): the layer's input is 7 x 7",
    );
}

/// `vae eval --iw` keeps each test image's estimate in the run directory (`iw-K.csv`): a
/// stopped estimate (here a torn file, as a kill while appending leaves it) continues where it
/// stopped and gives, bit for bit, the figure of one computed at once; a --limit below what is
/// kept keeps the rest; new weights start afresh.
#[test]
fn iw_estimate_continues_where_it_stopped() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &["--set", "train.epochs=1"]);
    // K = 600: more samples than one pass holds, so each image is its own group.
    let iw = |limit: &str| -> (f64, f64) {
        let out = ok(
            t.path(),
            &["eval", "--json", "--iw", "600", "--limit", limit],
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        (v["iw_nll"].as_f64().unwrap(), v["iw_se"].as_f64().unwrap())
    };
    let file = run.join("iw-600.csv");
    let lines = || std::fs::read_to_string(&file).unwrap().lines().count();
    iw("3");
    assert_eq!(lines(), 1 + 3, "header and three images");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, &text[..text.len() - 5]).unwrap();
    let resumed = iw("7");
    assert_eq!(lines(), 1 + 7);
    iw("2");
    assert_eq!(
        lines(),
        1 + 7,
        "a smaller --limit keeps the images beyond it"
    );
    std::fs::remove_file(&file).unwrap();
    let fresh = iw("7");
    assert_eq!(resumed, fresh, "continued and computed at once");
    assert!(fresh.0.is_finite() && fresh.0 > 50.0, "{fresh:?}");
    // Another epoch's weights: the kept estimate is not theirs.
    let header = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    ok(
        t.path(),
        &["train", "--resume", "-q", "--set", "train.epochs=2"],
    );
    iw("2");
    let now = std::fs::read_to_string(&file).unwrap();
    assert_ne!(now.lines().next().unwrap(), header);
    assert_eq!(now.lines().count(), 1 + 2);
}

/// A run whose KL collapses says so at its end, with what to try; a healthy one does not.
#[test]
fn a_collapsed_kl_is_said_at_the_end_of_training() {
    let t = tempfile::tempdir().unwrap();
    // A KL weight of 200 pushes q(z|x) onto the prior within tiny.toml's two epochs.
    let o = vae(t.path(), &tiny_args(&["--set", "train.beta=200"]));
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let warn: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("KL term collapsed"))
        .collect();
    assert_eq!(warn.len(), 1, "{err}");
    assert!(
        warn[0].contains("a smaller train.beta (it is 200)"),
        "{err}"
    );
    let o = vae(t.path(), &tiny_args(&["--set", "train.epochs=3"]));
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("collapsed"), "{err}");
    // tiny.toml's few steps are said too.
    assert!(err.contains("optimizer steps in all"), "{err}");
}

/// `train.ema`: the run's model is the moving average (what eval and the per-epoch test score),
/// the weights go on in last.safetensors, a resumed run ends bit for bit where an unbroken one
/// does, and the autograd engine's average scores the same.
#[test]
fn the_moving_average_is_the_model_and_resumes_exactly() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let ema = ["--set", "train.ema=0.9", "--set", "train.epochs=3"];
    let run = tiny(p, &ema);
    let read = |r: &Path, f: &str| std::fs::read(r.join(f)).unwrap();
    assert_eq!(
        read(&run, "model.safetensors"),
        read(&run, "ema.safetensors")
    );
    assert_ne!(
        read(&run, "model.safetensors"),
        read(&run, "last.safetensors")
    );
    // eval scores the average: the run's last test -ELBO on the same 1,000 images.
    let out = ok(p, &["eval", "--json", "--limit", "1000"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let logged: f64 = metrics(&run)[3][5].parse().unwrap();
    assert!(
        (v["neg_elbo"].as_f64().unwrap() - logged).abs() < 1e-3,
        "{v} vs {logged}"
    );
    // One epoch, then resumed to three: the same files.
    let name = ["--set", "name=broken"];
    ok(
        p,
        &tiny_args(&[&ema[..2], &["--set", "train.epochs=1"], &name[..]].concat()),
    );
    ok(
        p,
        &[
            "train",
            "-q",
            "--resume",
            "--run",
            "runs/broken",
            "--set",
            "train.epochs=3",
        ],
    );
    let broken = p.join("runs/broken");
    for f in [
        "model.safetensors",
        "last.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(
            read(&run, f) == read(&broken, f),
            "{f} differs after resume"
        );
    }
    // The autograd engine's average: the same test -ELBO to f32 rounding.
    let auto = ["--set", "train.engine=autograd", "--set", "name=auto"];
    ok(p, &tiny_args(&[&ema[..], &auto[..]].concat()));
    let other: f64 = metrics(&p.join("runs/auto"))[3][5].parse().unwrap();
    // (Its raw weights score about 85 nats apart from the average here, so the bound tells.)
    assert!(
        (other - logged).abs() < 5e-2,
        "autograd {other} vs fused {logged}"
    );
    let auto = p.join("runs/auto");
    assert_eq!(
        read(&auto, "model.safetensors"),
        read(&auto, "ema.safetensors")
    );
    assert_ne!(
        read(&auto, "model.safetensors"),
        read(&auto, "last.safetensors")
    );
}
