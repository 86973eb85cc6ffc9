//! Nothing a user types or a file holds crashes the binary or costs a good checkpoint: divergence,
//! interruption (SIGINT, SIGKILL), damaged and mismatched files, concurrent use, hostile
//! arguments.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Every file under `dir` with its length and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                m.insert(e.path(), (md.len(), md.modified().unwrap()));
            }
        }
    }
    m
}

fn spawn<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn divergence_stops_and_keeps_the_last_good_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &["--set", "train.epochs=1"]);
    let before = std::fs::read(run.join("model.safetensors")).unwrap();
    // A learning rate of 1e30 sends the weights to infinity in one step.
    let o = vae(
        t.path(),
        &[
            "train",
            "--resume",
            "-q",
            "--set",
            "train.epochs=2",
            "--set",
            "train.lr=1e30",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("diverged") && err.contains("epoch 2") && err.contains("train.lr"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        before,
        "the good checkpoint changed"
    );
    ok(t.path(), &["eval"]);
    assert!(!run.join("lock").exists(), "the lock outlived the run");
}

/// SIGINT mid-run: the step finishes, a checkpoint is written, the exit says how to resume, and
/// the resumed run ends exactly where an unbroken one does.
#[test]
fn interrupt_checkpoints_and_resumes_exactly() {
    let args = [
        "--set",
        "train.epochs=3",
        "--set",
        "data.limit=20000",
        "--set",
        "train.engine=autograd",
        "--set",
        "data.binarize=dynamic",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let unbroken = tiny(a.path(), &args);
    let child = spawn(b.path(), &tiny_args(&args));
    // Wait for the first checkpoint, then interrupt somewhere in epoch 2.
    let state = b.path().join("runs/tiny/state.json");
    let t0 = Instant::now();
    while !state.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // The run ended before the signal arrived; nothing to resume.
        eprintln!("note: the run finished before SIGINT");
    } else {
        eprintln!("{err}");
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert!(
            err.contains("interrupted") && err.contains("--resume"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        ok(b.path(), &["train", "--resume", "-q"]);
    }
    let rb = b.path().join("runs/tiny");
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(unbroken.join(f)).unwrap() == std::fs::read(rb.join(f)).unwrap(),
            "{f} differs after interrupt + resume ({err})"
        );
    }
    // The logged means agree to rounding: an interrupted epoch's sum is resumed from the host,
    // not the device's f32 accumulator, so its last digit may differ.
    let (ma, mb) = (metrics(&unbroken), metrics(&rb));
    assert_eq!(ma.len(), mb.len());
    for (ra, rb) in ma.iter().zip(&mb) {
        for (x, y) in ra[..8].iter().zip(&rb[..8]) {
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(x), Ok(y)) => assert!((x - y).abs() < 1e-3, "{ra:?} vs {rb:?}"),
                _ => assert_eq!(x, y),
            }
        }
    }
}

/// SIGKILL at a moment picked from the clock: whatever was on disk stays usable.
#[test]
fn sigkill_at_a_random_moment_leaves_a_usable_run() {
    let t = tempfile::tempdir().unwrap();
    let d = format!("data.dir={}", data_dir());
    let args = [
        "train",
        "-c",
        "tiny.toml",
        "-q",
        "--set",
        &d,
        "--set",
        "data.limit=5000",
        "--set",
        "train.epochs=40",
    ];
    let mut child = spawn(t.path(), &args);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let wait = 300 + (nanos % 1500) as u64;
    std::thread::sleep(Duration::from_millis(wait));
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let run = t.path().join("runs/tiny");
    eprintln!(
        "killed after {wait} ms; state.json present: {}",
        run.join("state.json").exists()
    );
    if run.join("state.json").exists() {
        let out = ok(t.path(), &["eval", "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(v["neg_elbo"].as_f64().unwrap().is_finite());
        // The killed process's lock and temporary files do not block the resume.
        ok(
            t.path(),
            &["train", "--resume", "-q", "--set", "train.epochs=41"],
        );
        assert!(std::fs::read_dir(&run)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".tmp")));
    } else {
        // Killed before the first checkpoint: before the run directory existed (a loaded
        // machine may take longer than the shortest wait to start), before its config was
        // written, or before epoch 0 was saved. Each is one clean line.
        let o = vae(t.path(), &["eval"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.lines().count() == 1, "{err}");
        assert!(
            ["no checkpoint yet", "no runs/latest", "not a run directory"]
                .iter()
                .any(|m| err.contains(m)),
            "{err}"
        );
    }
}

#[test]
fn a_second_training_into_a_run_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &["--set", "train.epochs=1"]);
    // A live process (this test) holds the lock.
    std::fs::write(run.join("lock"), format!("{}\n", std::process::id())).unwrap();
    fails(
        t.path(),
        &["train", "--resume", "-q", "--set", "train.epochs=2"],
        "another training",
    );
    // A dead one's lock is taken over.
    std::fs::write(run.join("lock"), "999999999\n").unwrap();
    ok(
        t.path(),
        &["train", "--resume", "-q", "--set", "train.epochs=2"],
    );
}

/// Two `eval --iw K` on one run would each rewrite iw-K.csv and lose the other's lines: the
/// second is refused while the first lives, a dead one's lock is taken over, and the lock is
/// gone after a finished estimate.
#[test]
fn a_second_iw_estimate_on_a_run_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let run = tiny(t.path(), &["--set", "train.epochs=1"]);
    let lock = run.join("iw-3.lock");
    std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    fails(
        t.path(),
        &["eval", "--iw", "3", "--limit", "4"],
        "another `vae eval --iw 3`",
    );
    assert!(!run.join("iw-3.csv").exists());
    // Another K is another file, and not held.
    ok(t.path(), &["eval", "--iw", "2", "--limit", "4"]);
    std::fs::write(&lock, "999999999\n").unwrap();
    ok(t.path(), &["eval", "--iw", "3", "--limit", "4"]);
    let kept = std::fs::read_to_string(run.join("iw-3.csv")).unwrap();
    assert_eq!(kept.lines().count(), 5, "{kept}");
    assert!(!lock.exists() && !run.join("iw-2.lock").exists());
}

#[test]
fn damaged_and_mismatched_files() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let run = tiny(p, &["--set", "train.epochs=1"]);
    let model = run.join("model.safetensors");
    let good = std::fs::read(&model).unwrap();
    // Truncated.
    std::fs::write(&model, &good[..good.len() / 2]).unwrap();
    fails(p, &["eval"], "model.safetensors");
    // Corrupted header.
    let mut bad = good.clone();
    for b in bad.iter_mut().skip(8).take(40) {
        *b = b'#';
    }
    std::fs::write(&model, &bad).unwrap();
    fails(p, &["eval"], "model.safetensors");
    std::fs::write(&model, &good).unwrap();
    // A config edited after training: the shape changes, or only the activation.
    let cfg = run.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("latent = 8", "latent = 9")).unwrap();
    fails(p, &["eval"], "model.latent");
    std::fs::write(
        &cfg,
        text.replace("activation = \"relu\"", "activation = \"tanh\""),
    )
    .unwrap();
    fails(p, &["sample", "-o", "x.png"], "model.activation");
    std::fs::write(&cfg, &text).unwrap();
    // A damaged state.json.
    std::fs::write(run.join("state.json"), "{ not json").unwrap();
    fails(p, &["eval"], "state.json");
    assert!(!p.join("x.png").exists());
}

#[test]
fn hostile_arguments_fail_cleanly_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    tiny(p, &["--set", "train.epochs=1"]);
    std::fs::create_dir(p.join("adir")).unwrap();
    let before = snapshot(p);
    let cases: &[(&[&str], &str)] = &[
        (&["sample", "-n", "-1"], "-1"),
        (
            &["sample", "-n", "99999999999999999999999"],
            "99999999999999999999999",
        ),
        (&["sample", "-n", "0", "-o", "x.png"], "'0' for '-n <N>'"),
        (
            &["sample", "--temperature", "NaN", "-o", "x.png"],
            "--temperature",
        ),
        (
            &["sample", "--temperature=-1", "-o", "x.png"],
            "--temperature",
        ),
        (&["sample", "-o", ""], "-o"),
        (&["sample", "-o", "/proc/nope/x.png"], "/proc/nope/x.png"),
        (&["sample", "--run", ""], "--run"),
        (
            &["manifold", "--steps", "0", "-o", "x.png"],
            "'0' for '--steps",
        ),
        (
            &["manifold", "--steps", "1000000", "-o", "x.png"],
            "'1000000' for '--steps",
        ),
        (&["manifold", "--axes", "", "-o", "x.png"], "--axes"),
        (&["reconstruct", "--index", "", "-o", "x.png"], "--index"),
        (&["reconstruct", "--index", "-3", "-o", "x.png"], "-3"),
        (&["interpolate", "--steps", "NaN", "-o", "x.png"], "NaN"),
        (&["train", "--config", ""], "--config"),
        (&["train", "--config", "adir"], "directory"),
        (&["train", "--set", ""], "--set"),
        (&["train", "--set", "train.lr=nan"], "train.lr"),
        (&["train", "--set", "train.lr=inf"], "train.lr"),
        (&["train", "--set", "train.epochs=1e99"], "train.epochs"),
        (
            &["train", "--set", "train.batch_size=-5"],
            "train.batch_size",
        ),
        (&["train", "--set", "name="], "name"),
        (&["train", "--set", "name=../escape"], "name"),
        (&["train", "--set", "data.dir=adir"], "adir"),
        (&["train", "--set", "out_dir=/proc/nope"], "/proc/nope"),
        (&["eval", "--iw", "99999999999"], "--iw"),
        (&["eval", "--run", "adir"], "adir"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        fails(p, args, needle);
    }
    let after = snapshot(p);
    assert_eq!(before, after, "a failed command created or changed files");
}

/// Sizes that cannot be allocated are refused before allocating, in one line naming the key.
#[test]
fn sizes_too_large_for_memory_are_refused_by_key() {
    let t = tempfile::tempdir().unwrap();
    for (set, key) in [
        ("model.hidden=[4000000000]", "model.hidden"),
        ("model.latent=3000000000", "model.latent"),
        ("train.batch_size=2000000000", "train.batch_size"),
    ] {
        fails(t.path(), &tiny_args(&["--set", set]), key);
        assert!(!t.path().join("runs").exists(), "{set}: left a run behind");
    }
    // A second stochastic layer's widths count too.
    fails(
        t.path(),
        &tiny_args(&[
            "--set",
            "model.latent=[8, 4]",
            "--set",
            "model.hidden=[[100], [4000000000]]",
        ]),
        "key `model.hidden`: this model needs",
    );
    // So do a conv network's activations and patch rows (a few parameters, wide activations).
    fails(
        t.path(),
        &tiny_args(&[
            "--set",
            "model.arch=\"conv\"",
            "--set",
            "model.conv=[[100000, 2, 2]]",
            "--set",
            "model.hidden=[1]",
        ]),
        "key `model.conv`: this model needs",
    );
}

/// Usage errors: one line with clap's tip kept, the same range message however a negative number
/// is written, and exit status 2 (the README's table); runtime errors exit 1.
#[test]
fn usage_errors_keep_their_tips_and_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let usage = |args: &[&str], needles: &[&str]| {
        let o = vae(p, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "vae {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        for n in needles {
            assert!(err.contains(n), "vae {args:?}: expected {n:?} in {err}");
        }
    };
    usage(&["smaple"], &["similar subcommand exists", "'sample'"]);
    usage(&["train", "--confg", "x"], &["'--config'"]);
    for args in [
        &["sample", "-n", "-5"][..],
        &["sample", "-n=-5"],
        &["sample", "-n", "0"],
    ] {
        usage(args, &["for '-n <N>'", "give 1 to 16384 images"]);
    }
    for args in [
        &["sample", "--temperature", "-1"][..],
        &["sample", "--temperature=-1"],
    ] {
        usage(
            args,
            &[
                "'-1' for '--temperature <TEMPERATURE>'",
                "finite number >= 0",
            ],
        );
    }
    usage(&["reconstruct", "-n", "0"], &["'-n <N>'"]);
    usage(
        &["reconstruct", "--cols", "0"],
        &["'0' for '--cols <COLS>'"],
    );
    usage(&["eval", "--iw", "-3"], &["'-3' for '--iw <K>'"]);
    // Every malformed flag value is a usage error, whatever parses it.
    usage(
        &["reconstruct", "--index", "3,x"],
        &["'3,x' for '--index", "\"x\" is not an image number"],
    );
    usage(&["manifold", "--axes", "1"], &["'1' for '--axes <I,J>'"]);
    usage(
        &["sample", "--device", "tpu"],
        &["'tpu' for '--device", "cuda:N"],
    );
    usage(
        &["train", "--set", "nokey"],
        &["'nokey' for '--set", "KEY=VALUE"],
    );
    // Another trainer's flag: the --set line that does it, with the value given.
    usage(
        &["train", "--epochs", "5"],
        &[
            "unexpected argument '--epochs'",
            "vae train --set train.epochs=5",
        ],
    );
    usage(
        &["train", "--batch-size=64"],
        &["--set train.batch_size=64"],
    );
    usage(&["train", "--lr", "3e-4"], &["--set train.lr=3e-4"]);
    usage(
        &["train", "--hidden", "200,200"],
        &["--set 'model.hidden=[200,200]'"],
    );
    // A runtime error: status 1.
    let o = vae(p, &["eval", "--run", "nothere"]);
    assert_eq!(o.status.code(), Some(1));
}

/// A folder that is not a run is answered with the runs that are: inside it, else under runs/.
#[test]
fn a_folder_that_is_not_a_run_names_the_runs() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    std::fs::create_dir(p.join("configs")).unwrap();
    fails(
        p,
        &["sample", "--run", "configs", "-o", "x.png"],
        "--run configs: not a run directory (no config.toml); there are no runs under runs/ here yet",
    );
    tiny(p, &["--set", "train.epochs=1", "--set", "data.limit=50"]);
    fails(
        p,
        &["sample", "--run", "configs", "-o", "x.png"],
        "not a run directory (no config.toml); the runs under runs/: runs/tiny",
    );
    // `--run runs`: the folder of runs itself.
    fails(
        p,
        &["eval", "--run", "runs"],
        "--run runs: not a run directory (no config.toml); the runs in it: runs/tiny",
    );
    // A missing one names them too.
    fails(
        p,
        &["eval", "--run", "tinny"],
        "no such run directory; the runs under runs/: runs/tiny",
    );
}

/// A key given with --set is blamed on the --set, a key in the file on the file.
#[test]
fn a_bad_key_is_blamed_on_where_it_came_from() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    fails(
        p,
        &["train", "--config", "tiny.toml", "--set", "model.latnet=2"],
        "--set model.latnet=2: key `model.latnet`: unknown field `latnet`",
    );
    fails(
        p,
        &["train", "--config", "tiny.toml", "--set", "model.latent=0"],
        "--set model.latent=0: key `model.latent` must be positive",
    );
    std::fs::write(p.join("bad.toml"), "[model]\nlatnet = 2\n").unwrap();
    fails(
        p,
        &["train", "--config", "bad.toml", "--set", "train.lr=1e-3"],
        "bad.toml: key `model.latnet`",
    );
}

/// Divergence in epoch 1 leaves no checkpoint; the advice printed (`--resume` with a lower rate)
/// works: the run starts again from its beginning in the same directory.
#[test]
fn divergence_in_the_first_epoch_resumes_from_the_start() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let o = vae(p, &tiny_args(&["--set", "train.lr=1e30"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("epoch 1") && err.contains("no checkpoint yet") && err.contains("--resume"),
        "{err}"
    );
    let run = p.join("runs/tiny");
    assert!(!run.join("state.json").exists());
    let out = ok(p, &["train", "--resume", "-q", "--set", "train.lr=1e-3"]);
    assert!(out.contains("again from its start"), "{out}");
    let rows = metrics(&run);
    let epochs: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(epochs, ["0", "1", "2"]);
    ok(p, &["eval"]);
}

/// Waits up to a minute for `f` to exist.
fn wait_for(f: &Path) {
    let t0 = Instant::now();
    while !f.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A run interrupted inside epoch 1 and resumed keeps the untrained model's row 0: the same
/// figures as an unbroken run's, not a value measured after training began.
#[test]
fn resume_inside_the_first_epoch_keeps_row_zero() {
    let args = [
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit=60000",
        "--set",
        "train.batch_size=20",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let unbroken = tiny(a.path(), &args);
    let child = spawn(b.path(), &tiny_args(&args));
    // metrics.csv appears with row 0, before the first step.
    wait_for(&b.path().join("runs/tiny/metrics.csv"));
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("note: the run finished before SIGINT");
        return;
    }
    assert_eq!(out.status.code(), Some(130), "{err}");
    let state = std::fs::read_to_string(b.path().join("runs/tiny/state.json")).unwrap();
    assert!(state.contains("\"epoch\": 0"), "{state}");
    ok(b.path(), &["train", "--resume", "-q"]);
    let (ma, mb) = (metrics(&unbroken), metrics(&b.path().join("runs/tiny")));
    assert_eq!(mb.len(), 2, "{mb:?}");
    assert_eq!(ma[0], mb[0], "row 0 changed on resume");
}

/// Two SIGINTs at one moment (`timeout -s INT` signals the process and its group) are one
/// request: the run checkpoints and says how to resume, instead of exiting silently.
#[test]
fn two_signals_at_once_are_one_request() {
    let t = tempfile::tempdir().unwrap();
    let child = spawn(
        t.path(),
        &tiny_args(&["--set", "data.limit=60000", "--set", "train.epochs=20"]),
    );
    wait_for(&t.path().join("runs/tiny/metrics.csv"));
    std::thread::sleep(Duration::from_millis(200));
    // Two kills back to back can merge into one pending signal; a moment between them makes
    // the process take both, as it does under `timeout -s INT`.
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(2));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: checkpoint saved") && err.contains("--resume"),
        "{err}"
    );
    assert!(t.path().join("runs/tiny/state.json").exists());
}
