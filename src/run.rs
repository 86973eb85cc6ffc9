//! The run directory, after nanoGPT's `out_dir` habit: `runs/<name>/` holds `config.toml` (the
//! resolved config), `model.safetensors`, `optimizer.safetensors`, `state.json` and
//! `metrics.csv`; `runs/latest` names the newest run so later commands need no `--run`.
//!
//! Every file is written to a temporary name in the same directory, synced, then renamed over the
//! old one: a killed process leaves the old file or the new one, never a torn one.

use crate::config::{self, Config};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optimizer.safetensors";
/// With a validation split, the latest weights (for `--resume`); `MODEL_FILE` is then the best.
pub const LAST_FILE: &str = "last.safetensors";
/// With `train.ema`: the latest moving average of the weights (`model.safetensors` holds the
/// average too: the latest, or the best epoch's with a validation split).
pub const EMA_FILE: &str = "ema.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.csv";
pub const LATEST_FILE: &str = "latest";

/// Progress recorded beside each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Image size the model was trained on (input dimension = rows * cols * channels).
    pub rows: usize,
    pub cols: usize,
    /// 1 (grey) or 3 (RGB); absent in runs from before colour: 1.
    #[serde(default = "one")]
    pub channels: usize,
    /// The data's class names, for the scatter's legend (empty: the label values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// A run stopped inside an epoch: batches of epoch `epoch + 1` already done, and that
    /// epoch's partial sums, so a resume continues exactly there.
    #[serde(default)]
    pub partial: Option<Partial>,
    /// The model section the checkpoint was trained with, to catch an edited config.toml.
    #[serde(default)]
    pub model: Option<crate::config::ModelConfig>,
    /// With a validation split: the best epoch so far and the early-stopping count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<Best>,
}

fn one() -> usize {
    1
}

/// The best validation -ELBO so far, its epoch, and epochs since (counted after warm-up).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub nelbo: f64,
    pub epoch: usize,
    pub since: usize,
    /// Training ended early: `since` reached `train.patience`.
    #[serde(default)]
    pub stopped: bool,
}

/// The part of an epoch done before an interruption.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Partial {
    pub batches: usize,
    pub recon_sum: f64,
    pub kl_sum: f64,
    pub seconds: f64,
}

/// Holds a lock file in a run directory while one process writes there: `<run>/lock` for a
/// training, `<run>/iw-K.lock` for `vae eval --iw K` (two estimates appending to one `iw-K.csv`
/// would lose each other's lines: each rewrites the file when it starts). Removed on drop.
pub struct Lock {
    path: PathBuf,
}

/// The error when a live process holds the lock (as against one that cannot be created).
#[derive(Debug)]
pub struct Held(String);

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Held {}

impl Lock {
    /// Takes the run's training lock, refusing when a live process holds it; a lock left by a
    /// killed process is taken over.
    pub fn take(run: &Path) -> Result<Lock> {
        Lock::take_named(run, "lock", "another training")
    }

    /// Takes `<run>/<name>`; `holder` says who holds it in the refusal ("another training").
    /// A live holder gives a [`Held`] error.
    pub fn take_named(run: &Path, name: &str, holder: &str) -> Result<Lock> {
        let path = run.join(name);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(Lock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid: Option<i32> = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse().ok());
                    if let Some(pid) = pid.filter(|&p| alive(p)) {
                        return Err(Held(format!(
                            "{}: {holder} (pid {pid}) is writing this run; wait for it or stop it",
                            run.display()
                        ))
                        .into());
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot create", path.display()))
                }
            }
        }
        bail!("{}: cannot take the lock", path.display())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn alive(pid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: kill with signal 0 only checks that the process exists.
        pid > 0 && unsafe { libc::kill(pid, 0) } == 0
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Refuses a config.toml whose `[model]` differs from the one the checkpoint was trained with
/// (recorded in state.json), naming the keys.
pub fn check_model_unchanged(run: &Path, state: &State, cfg: &Config) -> Result<()> {
    let Some(trained) = &state.model else {
        return Ok(());
    };
    if *trained == cfg.model {
        return Ok(());
    }
    let table = |m: &crate::config::ModelConfig| -> toml::Table {
        toml::Table::try_from(m).unwrap_or_default()
    };
    let (a, b) = (table(trained), table(&cfg.model));
    let keys: Vec<String> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "model.{k} = {v} (trained with {})",
                a.get(k).map(|x| x.to_string()).unwrap_or_default()
            )
        })
        .collect();
    bail!(
        "{}: {} differs from the checkpoint's training: {}; restore it or train a new run",
        run.display(),
        CONFIG_FILE,
        keys.join(", ")
    )
}

/// Removes temporary files a killed process left in `dir`.
pub fn clean_temporaries(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with('.') && n.contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Replaces `path` atomically: `write` fills a temporary file in the same directory, which is
/// synced and renamed over `path`; on failure the temporary file is removed.
fn replace_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| -> Result<()> {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomically(path, |tmp| Ok(std::fs::write(tmp, bytes)?))
}

/// Saves tensors as plain safetensors, atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    replace_atomically(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp)?;
        // The safetensors writer creates the file 0600; a checkpoint is as shareable as a config.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    })
}

/// Loads a safetensors file onto `dev`, with a message naming the file when it is damaged.
pub fn load_tensors(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        bail!(
            "{}: no such file; the run has no checkpoint yet (train it first)",
            path.display()
        );
    }
    candle_core::safetensors::load(path, dev).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a readable safetensors file ({e}); the checkpoint is damaged",
            path.display()
        )
    })
}

/// A fresh run directory: `--run DIR` exactly (refused if it already holds a checkpoint), else
/// `<out_dir>/<name>`, or `<name>-run2`, `-run3`, … if that is taken. Never overwrites a run.
pub fn create(cfg: &Config, explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(d) => {
            if d.join(MODEL_FILE).exists() || d.join(STATE_FILE).exists() {
                bail!(
                    "--run {}: already holds a trained run; name a new directory",
                    d.display()
                );
            }
            if d.exists() && !d.is_dir() {
                bail!("--run {}: exists and is not a directory", d.display());
            }
            d.to_path_buf()
        }
        None => {
            let base = Path::new(&cfg.out_dir);
            // A second run of a name is `<name>-run2`, not `<name>-2`: `mnist-2` would read as
            // a config of its own beside `mnist-2d`.
            let mut d = base.join(&cfg.name);
            let mut k = 2;
            while d.exists() {
                d = base.join(format!("{}-run{k}", cfg.name));
                k += 1;
            }
            d
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "{}: cannot create the run directory; check key `out_dir` or --run",
            dir.display()
        )
    })?;
    Ok(dir)
}

/// Points `<out_dir>/latest` at `run`.
pub fn set_latest(out_dir: &Path, run: &Path) -> Result<()> {
    let abs =
        std::fs::canonicalize(run).with_context(|| format!("{}: cannot resolve", run.display()))?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))?;
    write_atomic(
        &out_dir.join(LATEST_FILE),
        format!("{}\n", abs.display()).as_bytes(),
    )
}

/// The run a command works on: `--run DIR` (a directory, or a name under `runs/`), else the one
/// `runs/latest` names.
pub fn find(run: Option<&str>) -> Result<PathBuf> {
    match run {
        Some("") => bail!("--run: empty path; give a run directory"),
        Some(r) => {
            let p = PathBuf::from(r);
            let q = Path::new("runs").join(r);
            let dir = if p.is_dir() {
                p
            } else if q.is_dir() {
                q
            } else {
                bail!(
                    "--run {r}: no such run directory{}",
                    runs_hint(Path::new("runs"))
                )
            };
            // A folder without a config is not a run (`--run configs`, `--run runs`): name the
            // runs inside it, or those under runs/, instead of failing on a missing file later.
            // A run whose config was lost still opens, to say what is missing.
            if !dir.join(CONFIG_FILE).is_file() && !dir.join(STATE_FILE).is_file() {
                let inside = runs_in(&dir);
                if !inside.is_empty() {
                    bail!(
                        "--run {r}: not a run directory (no {CONFIG_FILE}); the runs in it: {}",
                        list(&inside)
                    );
                }
                bail!(
                    "--run {r}: not a run directory (no {CONFIG_FILE}){}",
                    runs_hint(Path::new("runs"))
                );
            }
            Ok(dir)
        }
        None => {
            let latest = Path::new("runs").join(LATEST_FILE);
            let text = std::fs::read_to_string(&latest).map_err(|_| {
                anyhow::anyhow!(
                    "no run given and no {} here; train one first or pass --run DIR",
                    latest.display()
                )
            })?;
            let p = PathBuf::from(text.trim());
            if !p.is_dir() {
                bail!(
                    "{}: names {}, which is gone; pass --run DIR",
                    latest.display(),
                    p.display()
                );
            }
            Ok(p)
        }
    }
}

/// The run directories directly inside `dir` (those holding a config), sorted.
pub fn runs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.join(CONFIG_FILE).is_file())
        .collect();
    out.sort();
    out
}

/// Up to 12 paths, comma-separated, with the count of the rest.
fn list(paths: &[PathBuf]) -> String {
    let mut s: Vec<String> = paths
        .iter()
        .take(12)
        .map(|p| p.display().to_string())
        .collect();
    if paths.len() > 12 {
        s.push(format!("and {} more", paths.len() - 12));
    }
    s.join(", ")
}

/// "; the runs under runs/: a, b" or "; there are no runs under runs/ yet (vae train makes one)".
fn runs_hint(runs: &Path) -> String {
    let r = runs_in(runs);
    if r.is_empty() {
        format!(
            "; there are no runs under {}/ here yet (`vae train` makes one)",
            runs.display()
        )
    } else {
        format!("; the runs under {}/: {}", runs.display(), list(&r))
    }
}

/// A run's saved config.
pub fn load_config(run: &Path) -> Result<Config> {
    let path = run.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow::anyhow!(
            "{}: missing; {} is not a run directory",
            path.display(),
            run.display()
        )
    })?;
    config::resolve(
        &config::Source {
            label: path.display().to_string(),
            text,
        },
        &[],
    )
}

pub fn load_state(run: &Path) -> Result<State> {
    let path = run.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow::anyhow!(
            "{}: missing; the run has no checkpoint yet (it stopped before epoch 1 ended)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: damaged", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn new_runs_never_overwrite() {
        let t = tempfile::tempdir().unwrap();
        let cfg = Config {
            out_dir: t.path().display().to_string(),
            name: "r".into(),
            ..Default::default()
        };
        let a = create(&cfg, None).unwrap();
        let b = create(&cfg, None).unwrap();
        assert_eq!(a.file_name().unwrap(), "r");
        assert_eq!(b.file_name().unwrap(), "r-run2");
        std::fs::write(a.join(MODEL_FILE), b"x").unwrap();
        assert!(create(&cfg, Some(&a)).is_err());
    }

    #[test]
    fn tensors_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.safetensors");
        let mut h = HashMap::new();
        h.insert(
            "w".to_string(),
            Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
        );
        save_tensors(&p, &h).unwrap();
        let back = load_tensors(&p, &Device::Cpu).unwrap();
        assert_eq!(
            back["w"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        std::fs::write(&p, b"garbage").unwrap();
        let e = load_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains("damaged"), "{e}");
    }
}
