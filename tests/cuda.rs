//! The CUDA back end, end to end: training and every picture command with `--device cuda`, and
//! the same figures as the CPU up to floating-point noise. These tests need a build with
//! `--features cuda` and a GPU: a CPU build lists them as ignored, and a CUDA build on a machine
//! without a GPU says on stderr that each is skipped, and passes.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;

/// Whether a GPU answers; says on stderr that `test` is skipped when none does (written past
/// the test harness's capture, so that the skip shows).
fn gpu(test: &str) -> bool {
    match candle_core::Device::new_cuda(0) {
        Ok(_) => true,
        Err(e) => {
            let e = e.to_string();
            let cause = e.lines().next().unwrap_or_default();
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped, no CUDA device ({cause})"
            );
            false
        }
    }
}

/// The last epoch's test -ELBO of a run.
fn final_nelbo(run: &Path) -> f64 {
    let m = metrics(run);
    m.last().unwrap()[5].parse().unwrap()
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs --features cuda and a GPU")]
fn gpu_training_matches_cpu() {
    if !gpu("gpu_training_matches_cpu") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let train = |device: &str, engine: &str, name: &str| {
        let (engine, run) = (
            format!("train.engine={engine}"),
            t.path().join("runs").join(name),
        );
        let r = run.display().to_string();
        tiny(
            t.path(),
            &["--device", device, "--set", &engine, "--run", &r],
        );
        final_nelbo(&run)
    };
    let gpu = train("cuda", "auto", "gpu");
    let cpu_autograd = train("cpu", "autograd", "cpu-autograd");
    let cpu_fused = train("cpu", "fused", "cpu-fused");
    // The same seed, draws and recipe: the runs differ only by the order of floating-point sums
    // (the bar is 0.5 nat for the full recipe).
    for (what, cpu) in [("autograd", cpu_autograd), ("fused", cpu_fused)] {
        assert!(
            (gpu - cpu).abs() < 0.5,
            "test -ELBO on the GPU {gpu} vs the CPU ({what}) {cpu}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs --features cuda and a GPU")]
fn gpu_runs_every_command() {
    if !gpu("gpu_runs_every_command") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &["--device", "cuda", "--set", "model.latent=2"]);
    let r = run.display().to_string();
    let dev = ["--device", "cuda", "--run", &r];
    let out = ok(
        t.path(),
        &[
            "eval", "--json", "--iw", "50", "--device", "cuda", "--run", &r,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["neg_elbo"].as_f64().unwrap().is_finite(), "{out}");
    let png = ok_bytes(
        t.path(),
        &[&["sample", "-n", "16", "-o", "-"][..], &dev].concat(),
    );
    assert_eq!(png_size(&png).0 % 28, 0);
    for cmd in [
        &["manifold", "--steps", "5"][..],
        &["reconstruct", "-n", "4"][..],
        &["interpolate", "--steps", "4"][..],
        &["scatter", "--limit", "200"][..],
    ] {
        let file = format!("{}.png", cmd[0]);
        let path = t.path().join(&file);
        let p = path.display().to_string();
        ok(t.path(), &[cmd, &dev, &["-o", &p][..]].concat());
        assert!(png_size(&std::fs::read(&path).unwrap()).0 > 0, "{file}");
    }
}
