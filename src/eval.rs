//! Test-set evaluation: the mean -ELBO per example in nats with its reconstruction and KL terms
//! (Kingma & Welling 2013, eq. 10, one sample of z per image, as pytorch/examples reports it).
//! The noise comes from a fixed stream of the run's seed, so one checkpoint always gives one figure.

use crate::config::{Binarize, Config};
use crate::data::{self, Split};
use crate::model::{self, Vae};
use crate::run::{self, State};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Salts that give evaluation and test binarization their own streams of the one seed.
const EVAL_SALT: u64 = 0x6576_616c; // "eval"
const TEST_BINARIZE_SEED: u64 = 0x7465_7374; // "test": one binarized test set for every run

/// Per-example means over a split, in nats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Totals {
    pub n: usize,
    pub recon: f64,
    pub kl: f64,
}

impl Totals {
    pub fn nelbo(&self) -> f64 {
        self.recon + self.kl
    }
}

/// The test split's pixels (n * D); binarized once, with a fixed seed, when the config binarizes.
pub fn test_pixels(cfg: &Config, split: &Split) -> Vec<f32> {
    let mut px = split.pixels_f32();
    if cfg.data.binarize != Binarize::None {
        data::binarize_in_place(&mut px, &mut StdRng::seed_from_u64(TEST_BINARIZE_SEED));
    }
    px
}

/// The test split as a (n, D) tensor, as `test_pixels`.
pub fn test_tensor(cfg: &Config, split: &Split, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        test_pixels(cfg, split),
        (split.n, split.dim()),
        dev,
    )?)
}

/// -ELBO terms of `x` (n, D) in batches of `batch`.
pub fn evaluate(model: &Vae, x: &Tensor, batch: usize, seed: u64) -> Result<Totals> {
    let mut rng = StdRng::seed_from_u64(seed ^ EVAL_SALT);
    let n = x.dim(0)?;
    // [recon, kl] summed in f64 on the device and read once at the end, so a GPU is not
    // stopped after every batch.
    let mut sums: Option<Tensor> = None;
    let mut i = 0;
    while i < n {
        let b = batch.min(n - i);
        let xb = x.narrow(0, i, b)?;
        let eps = model::normal(&mut rng, b, model.cfg.noise_dim(), x.device())?;
        let (r, k) = model.neg_elbo_terms(&xb, &eps)?;
        let s = Tensor::stack(&[r.sum_all()?, k.sum_all()?], 0)?.to_dtype(DType::F64)?;
        sums = Some(match sums {
            Some(a) => (a + s)?,
            None => s,
        });
        i += b;
    }
    let (recon, kl) = match sums {
        Some(s) => {
            let v = s.to_vec1::<f64>()?;
            (v[0], v[1])
        }
        None => (0.0, 0.0),
    };
    Ok(Totals {
        n,
        recon: recon / n as f64,
        kl: kl / n as f64,
    })
}

/// `evaluate` on host pixels `x` (n, D) through `f(images, noise) -> summed (recon, kl)` (the
/// fused step's forward): the same noise stream as `evaluate` draws, so the two agree.
pub fn evaluate_host(
    x: &[f32],
    dim: usize,
    noise_dim: usize,
    batch: usize,
    seed: u64,
    mut f: impl FnMut(&[f32], &[f32]) -> Result<(f64, f64)>,
) -> Result<Totals> {
    let mut rng = StdRng::seed_from_u64(seed ^ EVAL_SALT);
    let n = x.len() / dim;
    let (mut recon, mut kl) = (0f64, 0f64);
    let mut eps: Vec<f32> = Vec::new();
    let mut i = 0;
    while i < n {
        let b = batch.min(n - i);
        eps.clear();
        eps.extend((0..b * noise_dim).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
        let (r, k) = f(&x[i * dim..(i + b) * dim], &eps)?;
        recon += r;
        kl += k;
        i += b;
    }
    Ok(Totals {
        n,
        recon: recon / n as f64,
        kl: kl / n as f64,
    })
}

/// Sample rows (images times samples) per pass of the candle estimate: a GPU wants them many.
const IW_ROWS: usize = 8192;

/// The importance-weighted estimate of log p(x) (Burda, Grosse & Salakhutdinov 2015, eq. 8)
/// on the candle model (a GPU's path): log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), per
/// image of `x` (n, D), by a running logsumexp over chunks of samples so memory stays bounded
/// whatever K. Returns -log p(x) in nats per image.
///
/// The noise is the fused estimator's (`step::iw`): image group g of
/// `step::iw::images_per_group(k)` images draws its samples' noise, image after image, from
/// `group_rng(seed, g)`. So the two paths give one figure up to float rounding, and `first`
/// (the index of `x`'s first image in the whole set, a multiple of the group) lets an estimate
/// computed in parts equal one computed at once, as the fused one.
pub fn iw_nll(model: &Vae, x: &Tensor, first: usize, k: usize, seed: u64) -> Result<Vec<f64>> {
    use crate::step::iw::{group_rng, images_per_group};
    let (n, _) = x.dims2()?;
    let group = images_per_group(k);
    if k == 0 || !first.is_multiple_of(group) {
        bail!("--iw {k}: need K >= 1 and a slice starting at a multiple of {group}, not {first}");
    }
    let zd = model.cfg.noise_dim();
    let dev = x.device();
    let mut per_image = Vec::with_capacity(n);
    // Images per call: whole groups, together at most IW_ROWS sample rows (at least one group).
    // A group of more than one image has K <= 256, so its samples fit one chunk.
    let per_pass = ((IW_ROWS / k).max(1) / group).max(1) * group;
    let chunk = k.min(IW_ROWS);
    let mut i = 0;
    while i < n {
        let b = per_pass.min(n - i);
        let xb = x.narrow(0, i, b)?;
        // One stream per group in this pass, drawn from in image order.
        let g0 = (first + i) / group;
        let mut rngs: Vec<StdRng> = (0..b.div_ceil(group))
            .map(|g| group_rng(seed, g0 + g))
            .collect();
        // Running (max, scaled sum) per image.
        let mut m = vec![f64::NEG_INFINITY; b];
        let mut s = vec![0f64; b];
        let mut done = 0;
        while done < k {
            let c = chunk.min(k - done);
            // (b * c, zd), image-major: image j's c rows from its group's stream.
            let mut eps = Vec::with_capacity(b * c * zd);
            for j in 0..b {
                let rng = &mut rngs[j / group];
                eps.extend((0..c * zd).map(|_| -> f32 { StandardNormal.sample(&mut *rng) }));
            }
            let eps = Tensor::from_vec(eps, (b * c, zd), dev)?;
            let lw = model
                .log_weights(&xb, &eps, c)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            for (j, row) in lw.iter().enumerate() {
                let mx = row.iter().copied().fold(m[j], f64::max);
                s[j] = s[j] * (m[j] - mx).exp() + row.iter().map(|v| (v - mx).exp()).sum::<f64>();
                m[j] = mx;
            }
            done += c;
        }
        for j in 0..b {
            per_image.push(-(m[j] + s[j].ln() - (k as f64).ln()));
        }
        i += b;
    }
    Ok(per_image)
}

/// The file in a run directory that keeps `vae eval --iw K`'s per-image estimates.
fn iw_file(k: usize) -> String {
    format!("iw-{k}.csv")
}

/// FNV-1a (64 bits) over the checkpoint's tensors, by name in sorted order: names the weights an
/// estimate was computed from, so a kept estimate is never mixed with a later epoch's.
fn params_digest(params: &HashMap<String, Tensor>) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    for name in names {
        eat(name.as_bytes());
        let v = params[name]
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()
            .with_context(|| format!("reading tensor {name}"))?;
        for x in v {
            eat(&x.to_le_bytes());
        }
    }
    Ok(h)
}

/// The per-image estimates already in `text` (an `iw-K.csv`) under `header`, by image index;
/// none when the file was written for other weights, K, seed or data. A line torn by a kill
/// while appending (the last one, without its newline) or not of the form `index,value` is
/// skipped: that image is computed again.
fn parse_iw_file(text: &str, header: &str) -> Option<BTreeMap<usize, f64>> {
    let mut lines = text.lines();
    if lines.next() != Some(header) {
        return None;
    }
    let whole = if text.ends_with('\n') {
        text.len()
    } else {
        text.rfind('\n')?
    };
    let mut known = BTreeMap::new();
    for line in text[..whole].lines().skip(1) {
        let Some((i, v)) = line.split_once(',') else {
            continue;
        };
        // Strict: an index of digits only, so no fragment passes for another image.
        if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let (Ok(i), Ok(v)) = (i.parse::<usize>(), v.parse::<f64>()) {
            if v.is_finite() {
                known.insert(i, v);
            }
        }
    }
    Some(known)
}

/// `vae eval --iw K`: the estimate of -log p(x) per test image (`n` images), computed by
/// `estimate(first, end)` (images `first..end`, `first` a multiple of the estimator's group) in
/// blocks of image groups; each block's values are appended to the run directory's `iw-K.csv`
/// as it finishes, and images already there (for the same weights, K, seed and data) are not
/// computed again. A group of images draws its noise from a stream of its own index
/// (`step::iw`; the candle path draws the same), so an estimate stopped (Ctrl-C, a lost
/// machine) and continued equals one run at once. Ctrl-C stops after the current block.
fn iw_resumable(
    l: &Loaded,
    n: usize,
    k: usize,
    mut estimate: impl FnMut(usize, usize) -> Result<Vec<f64>>,
) -> Result<Vec<f64>> {
    use std::io::Write;
    let seed = l.cfg.seed;
    let path = l.dir.join(iw_file(k));
    let header = format!(
        "# vae eval --iw: K={k} seed={seed} weights=fnv1a64:{:016x} data={} binarize={:?}; \
         index,neg_log_p",
        params_digest(&l.params)?,
        l.cfg.data.dir,
        l.cfg.data.binarize
    );
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let kept = old.as_deref().and_then(|t| parse_iw_file(t, &header));
    if kept.is_none() && old.as_deref().is_some_and(|t| !t.is_empty()) {
        eprintln!(
            "{}: kept for other weights, K, seed or data; computing afresh",
            path.display()
        );
    }
    let kept = kept.unwrap_or_default();
    // Rewritten from what parsed (every image kept, also beyond this --limit), so a torn tail
    // is gone before anything is appended after it: appending "40,..." to a torn "12" would
    // otherwise read as image 1240.
    let mut text = format!("{header}\n");
    for (i, v) in &kept {
        text.push_str(&format!("{i},{v}\n"));
    }
    // One estimate at a time keeps a run's iw-K.csv (a second one's rewrite above would cut
    // off the first one's appends); a run directory this user cannot write (someone else's
    // run) still gets its estimate, computed whole and kept nowhere.
    let lock = match run::Lock::take_named(
        &l.dir,
        &format!("iw-{k}.lock"),
        &format!("another `vae eval --iw {k}`"),
    ) {
        Ok(lock) => Some(lock),
        Err(e) if e.is::<run::Held>() => return Err(e),
        Err(e) => {
            eprintln!("not keeping the estimate's progress: {e:#}");
            None
        }
    };
    let mut file = lock.as_ref().and_then(|_| {
        run::write_atomic(&path, text.as_bytes())
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {} to append", path.display()))
            })
            .map_err(|e| eprintln!("not keeping the estimate's progress: {e:#}"))
            .ok()
    });
    let mut known: Vec<Option<f64>> = (0..n).map(|i| kept.get(&i).copied()).collect();
    let have = known.iter().filter(|v| v.is_some()).count();
    if have == n {
        eprintln!("all {n} images' estimates taken from {}", path.display());
    } else if have > 0 {
        eprintln!(
            "continuing the estimate in {}: {have} of {n} images already done",
            path.display()
        );
    }
    if file.is_some() {
        crate::interrupt::install();
    }
    let bar = progress_bar(n as u64, "IW estimate");
    bar.inc(have as u64);
    // Blocks of whole groups, a few per worker at first (seconds for a conv network at
    // K = 5000), doubled while a block takes under two seconds, so a small network's many
    // quick blocks do not pay the per-block set-up (weights imported, buffers allocated) often.
    let group = crate::step::iw::images_per_group(k);
    let mut block = group * 4 * rayon::current_num_threads().max(1);
    let mut start = 0;
    while start < n {
        let end = (start + block).min(n);
        let t0 = std::time::Instant::now();
        if known[start..end].iter().any(Option::is_none) {
            let per = estimate(start, end)?;
            let mut lines = String::new();
            for (j, v) in per.iter().enumerate() {
                if known[start + j].is_none() {
                    bar.inc(1);
                    lines.push_str(&format!("{},{v}\n", start + j));
                    known[start + j] = Some(*v);
                }
            }
            if let Some(f) = &mut file {
                f.write_all(lines.as_bytes())
                    .and_then(|_| f.flush())
                    .with_context(|| format!("appending to {}", path.display()))?;
            }
        }
        start = end;
        if t0.elapsed().as_secs_f64() < 2.0 {
            block = (2 * block).min(1 << 20);
        }
        if start < n && crate::interrupt::requested() {
            bar.finish_and_clear();
            drop(lock);
            // As training's interruption: status 130 and the way to continue.
            eprintln!(
                "interrupted: {start} of {n} images' estimates are kept in {}; the same \
                 command continues from there",
                path.display()
            );
            std::process::exit(130)
        }
    }
    bar.finish_and_clear();
    Ok(known.into_iter().flatten().collect())
}

/// A progress bar on stderr when it is a terminal, else a hidden one.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} images, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_prefix(what.to_string());
    b
}

/// A trained run, opened: its directory, config, progress and model.
pub struct Loaded {
    pub dir: PathBuf,
    pub cfg: Config,
    pub state: State,
    pub model: Vae,
    /// The checkpoint's tensors the model was built from (on `dev`), for the code that reads
    /// them directly: the fused IW estimate and `vae explore`. Read once, so a run still
    /// training cannot hand the two a different epoch.
    pub params: HashMap<String, Tensor>,
    pub dev: Device,
}

impl Loaded {
    /// The test split of the run's data (its first `limit` images, 0 = all), checked against
    /// the image size the model was trained on.
    pub fn test_split(&self, limit: usize) -> Result<Split> {
        let test = data::load_test(&self.cfg.data, self.state.channels, limit)?;
        if test.dim() != self.dim() {
            bail!(
                "key `data.dir`: {} holds {} images, the model was trained on {}",
                self.cfg.data.dir,
                test.describe_size(),
                data::describe_size(self.state.rows, self.state.cols, self.state.channels)
            );
        }
        Ok(test)
    }

    /// One image's (rows, cols, channels).
    pub fn cell(&self) -> (usize, usize, usize) {
        (self.state.rows, self.state.cols, self.state.channels)
    }

    /// Bytes (pixels times channels) per image.
    pub fn dim(&self) -> usize {
        self.state.rows * self.state.cols * self.state.channels
    }
}

/// Opens `--run DIR` (or the latest run) on `--device` (or the run's configured device): reads
/// its config, checkpoint and state, and checks every tensor against the config.
pub fn open(run_arg: Option<&str>, device: Option<&str>) -> Result<Loaded> {
    let dir = run::find(run_arg)?;
    let cfg = run::load_config(&dir)?;
    let dev = crate::device::open(device.unwrap_or(&cfg.device)).context("--device")?;
    let path = dir.join(run::MODEL_FILE);
    let params = run::load_tensors(&path, &dev)?;
    let state = run::load_state(&dir)?;
    run::check_model_unchanged(&dir, &state, &cfg)?;
    let mut cfg = cfg;
    cfg.model.image = Some([state.channels, state.rows, state.cols]);
    let dim = state.rows * state.cols * state.channels;
    model::check_params(&params, &cfg.model, dim, &path.display().to_string())?;
    let vb = VarBuilder::from_tensors(params.clone(), DType::F32, &dev);
    let model = Vae::new(&cfg.model, dim, vb)
        .with_context(|| format!("{}: building the model", path.display()))?;
    Ok(Loaded {
        dir,
        cfg,
        state,
        model,
        params,
        dev,
    })
}

/// "1 image", "2 images".
fn images(n: usize) -> String {
    if n == 1 {
        "1 image".into()
    } else {
        format!("{n} images")
    }
}

/// `vae eval`: the whole test set of the run's data directory (or its first `limit` images);
/// with `iw` > 0 also the importance-weighted -log p(x) with that many samples.
pub fn run_eval(
    run_arg: Option<&str>,
    device: Option<&str>,
    json: bool,
    iw: usize,
    limit: usize,
) -> Result<()> {
    let l = open(run_arg, device)?;
    if iw > 0 && l.model.is_ae() {
        bail!("--iw: an autoencoder has no q(z|x) to sample, so no likelihood estimate");
    }
    if iw > 1_000_000 {
        bail!("--iw {iw}: at most 1000000 samples per image");
    }
    let test = l.test_split(limit)?;
    let cpu = matches!(l.dev, Device::Cpu);
    let (batch, seed) = (l.cfg.train.eval_batch_size, l.cfg.seed);
    // On the CPU, the fused step's forward, as training's per-epoch evaluation (candle's CPU
    // convolutions are several times slower); the same noise stream and quantity as the candle
    // model's, which a GPU uses (`step::tests` checks that the two agree on every family).
    let (px, x) = if cpu {
        (test_pixels(&l.cfg, &test), None)
    } else {
        (Vec::new(), Some(test_tensor(&l.cfg, &test, &l.dev)?))
    };
    let t = match &x {
        Some(x) => evaluate(&l.model, x, batch, seed)?,
        None => {
            let adam = crate::engine::adam_config(&l.cfg);
            let cap = l.cfg.train.batch_size;
            let mut f = crate::step::Fused::new(&l.cfg, l.dim(), &l.params, adam, cap)
                .with_context(|| format!("{}: the fused step for evaluation", l.dir.display()))?;
            let nd = l.cfg.model.noise_dim();
            evaluate_host(&px, l.dim(), nd, batch, seed, |x, e| f.evaluate(x, e))?
        }
    };
    let (run_dir, state) = (&l.dir, Some(&l.state));
    let iw_value = if iw > 0 {
        let t0 = std::time::Instant::now();
        // Kept image by image in the run directory, so that a stopped estimate continues
        // where it stopped.
        let per = if let Some(x) = &x {
            // candle's forward, on a GPU.
            iw_resumable(&l, test.n, iw, |a, b| {
                iw_nll(&l.model, &x.narrow(0, a, b - a)?, a, iw, seed)
            })?
        } else {
            // The fused forward, one worker per group of images.
            let (cfg, dim) = (&l.cfg.model, l.dim());
            iw_resumable(&l, test.n, iw, |a, b| {
                crate::step::iw::neg_log_likelihood(
                    cfg,
                    dim,
                    &l.params,
                    &px[a * dim..b * dim],
                    a,
                    iw,
                    seed,
                )
            })?
        };
        let v = crate::step::iw::mean_and_se(&per);
        eprintln!(
            "importance-weighted estimate with K = {iw}: {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Some(v)
    } else {
        None
    };
    if json {
        let v = serde_json::json!({
            "run": run_dir.display().to_string(),
            "epoch": state.map(|s| s.valid.map_or(s.epoch, |b| b.epoch)),
            "images": t.n,
            "neg_elbo": t.nelbo(),
            "recon": t.recon,
            "kl": t.kl,
            "iw_samples": if iw > 0 { Some(iw) } else { None },
            "iw_nll": iw_value.map(|v| v.0),
            "iw_se": iw_value.map(|v| v.1).filter(|v| v.is_finite()),
            "model": if l.model.is_ae() { "ae" } else { "vae" },
            "units": "nats per example",
        });
        println!("{v}");
    } else {
        // With a validation split the run's model is its best epoch, not its last.
        let epoch = state
            .map(|s| match s.valid {
                Some(b) => format!(
                    ", epoch {} (best validation -ELBO of the {} trained)",
                    b.epoch, s.epoch
                ),
                None => format!(", epoch {}", s.epoch),
            })
            .unwrap_or_default();
        if l.model.is_ae() {
            println!(
                "{}: test reconstruction -log p(x|z = mu) {:.2} nats per example over {}{epoch} \
                 (an autoencoder has no ELBO)",
                run_dir.display(),
                t.recon,
                images(t.n)
            );
        } else {
            println!(
                "{}: test -ELBO {:.2} nats (recon {:.2}, KL {:.2}) per example over {}{epoch}",
                run_dir.display(),
                t.nelbo(),
                t.recon,
                t.kl,
                images(t.n)
            );
        }
        if let Some((v, se)) = iw_value {
            let se = if se.is_finite() {
                format!(" +- {se:.2} (standard error over images)")
            } else {
                String::new()
            };
            // With K = 1 the estimate is a one-sample -ELBO: a bound no tighter than the
            // -ELBO in expectation (Burda et al. 2015, Theorem 1 holds with equality).
            let what = if iw == 1 {
                "K = 1: a one-sample estimate of the -ELBO itself, no tighter; use K > 1, e.g. --iw 5000"
                    .to_string()
            } else {
                format!("K = {iw}; an upper bound on the true -log p(x), tighter than the -ELBO")
            };
            println!("importance-weighted -log p(x) ~ {v:.2}{se} nats ({what})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_iw_file;
    use crate::config::{Activation, ModelConfig, Prior, Upper, Wiring};
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_candle_estimate_draws_the_fused_estimates_noise() {
        // A GPU's `eval --iw` (candle) and the CPU's (fused) on one model and images: the same
        // figure to f32 rounding, because the same noise; and the candle path in slices from a
        // group's first image (a resumed estimate) equals it whole. K = 5 puts all 4 images in
        // one group of 102; K = 700 gives an image a group and two chunks in the fused passes.
        let models = [
            ModelConfig {
                hidden: vec![7],
                latent: 3,
                ..Default::default()
            },
            ModelConfig {
                hidden: vec![6],
                latent: 3,
                activation: Activation::Gated,
                wiring: Wiring::Hvae,
                prior: Prior::Vamp,
                prior_components: 2,
                upper: vec![Upper {
                    latent: 2,
                    hidden: vec![5],
                }],
                ..Default::default()
            },
        ];
        let (dim, n, seed) = (12, 4, 3);
        for cfg in models {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            // Weights three times their initial scale, so that the estimate depends on the noise.
            let params: std::collections::HashMap<String, Tensor> =
                crate::model::init_params(&cfg, dim, &mut rng, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(name, t)| (name, (t * 3.0).unwrap()))
                    .collect();
            let x: Vec<f32> = (0..n * dim).map(|_| rng.random::<f32>()).collect();
            let vb = VarBuilder::from_tensors(params.clone(), DType::F32, &Device::Cpu);
            let m = crate::model::Vae::new(&cfg, dim, vb).unwrap();
            let xt = Tensor::from_vec(x.clone(), (n, dim), &Device::Cpu).unwrap();
            for k in [5, 700] {
                let fused = crate::step::iw::neg_log_likelihood(&cfg, dim, &params, &x, 0, k, seed)
                    .unwrap();
                let candle = super::iw_nll(&m, &xt, 0, k, seed).unwrap();
                for (i, (f, c)) in fused.iter().zip(&candle).enumerate() {
                    assert!(
                        (f - c).abs() < 1e-4 * f.abs(),
                        "{cfg:?} K {k} image {i}: fused {f}, candle {c}"
                    );
                }
                // Another seed moves the estimate by more than that tolerance.
                let other = super::iw_nll(&m, &xt, 0, k, seed + 1).unwrap();
                assert!((other[0] - candle[0]).abs() > 1e-3 * candle[0].abs());
                if k == 700 {
                    let tail = super::iw_nll(&m, &xt.narrow(0, 1, 3).unwrap(), 1, k, seed);
                    for (a, b) in candle[1..].iter().zip(&tail.unwrap()) {
                        assert!((a - b).abs() < 1e-9 * a.abs(), "{a} vs {b}");
                    }
                } else {
                    assert!(super::iw_nll(&m, &xt.narrow(0, 1, 3).unwrap(), 1, k, seed).is_err());
                }
            }
        }
    }

    const H: &str = "# vae eval --iw: K=5 seed=1 weights=fnv1a64:00000000000000ab data=d binarize=Dynamic; index,neg_log_p";

    #[test]
    fn a_kept_estimate_reads_back_whole_lines_only() {
        // Images 0, 1 and 7 kept (7 beyond any --limit is kept too), then a torn last line.
        let text = format!("{H}\n0,85.5\n1,90.25\n7,1e2\n2,8");
        let k = parse_iw_file(&text, H).unwrap();
        assert_eq!(
            k.into_iter().collect::<Vec<_>>(),
            [(0, 85.5), (1, 90.25), (7, 100.0)]
        );
        // The same with its newline: image 2 is whole.
        let k = parse_iw_file(&format!("{text}\n"), H).unwrap();
        assert_eq!(k.get(&2), Some(&8.0));
    }

    #[test]
    fn foreign_lines_and_headers_are_not_read() {
        // Another checkpoint's (or K's) file: nothing is taken from it.
        assert!(parse_iw_file(&format!("{H}\n0,85.5\n"), "# other").is_none());
        assert!(parse_iw_file("", H).is_none());
        // A fragment glued to a later line, a sign, a non-finite value: skipped.
        let text = format!("{H}\n12,85.140,85.3\n+3,1.0\n4,NaN\n 5,2.0\n6,inf\n9,3.5\n");
        let k = parse_iw_file(&text, H).unwrap();
        assert_eq!(k.into_iter().collect::<Vec<_>>(), [(9, 3.5)]);
    }
}
