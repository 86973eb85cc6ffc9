//! The training loop: minibatch SGD on the -ELBO with the reparameterization gradient (Kingma &
//! Welling 2013, Algorithm 1, one sample of z per image, M = batch size), optimized with Adam.
//! As in pytorch/examples `vae/main.py`, the loss is the batch's summed -ELBO; the logged figures
//! are per example.
//!
//! Every random draw (init, shuffles, eps, binarization) comes from one `StdRng` seeded with
//! `seed`, in a fixed order, so a seed and a device give one sequence of numbers.

use crate::config::{Arch, Binarize, Config, ModelKind, OutputBias};
use crate::data;
use crate::device;
use crate::engine::{skip_draws, Engine, Sums};
use crate::eval::{self, Loaded, Totals};
use crate::interrupt;
use crate::model::{self, Objective, Vae};
use crate::pictures;
use crate::run::{self, Best, Partial, State};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Options {
    /// `--run DIR`: train into this directory instead of `<out_dir>/<name>`.
    pub run: Option<PathBuf>,
    /// `--quiet`: no config echo and no progress bar.
    pub quiet: bool,
}

const CSV_HEADER: &str =
    "epoch,step,train_nelbo,train_recon,train_kl,test_nelbo,test_recon,test_kl,train_seconds,images_per_s,valid_nelbo\n";

/// Salt of the validation images' one binarization.
const VALID_SALT: u64 = 0x7661_6c69; // "vali"

/// One epoch's line, for the terminal and for metrics.csv.
struct EpochRow {
    epoch: usize,
    step: u64,
    train: Option<Totals>,
    /// None on an epoch `train.eval_every` skips.
    test: Option<Totals>,
    valid: Option<Totals>,
    seconds: f64,
    /// `train.eval_every`, for the line of a skipped epoch.
    every: usize,
}

impl EpochRow {
    fn csv(&self) -> String {
        let (tr, ips) = match self.train {
            Some(t) => (
                format!("{:.4},{:.4},{:.4}", t.nelbo(), t.recon, t.kl),
                format!("{:.1}", t.n as f64 / self.seconds),
            ),
            None => (",,".to_string(), String::new()),
        };
        let valid = self
            .valid
            .map(|v| format!("{:.4}", v.nelbo()))
            .unwrap_or_default();
        let test = self
            .test
            .map(|t| format!("{:.4},{:.4},{:.4}", t.nelbo(), t.recon, t.kl))
            .unwrap_or_else(|| ",,".into());
        format!(
            "{},{},{},{},{:.3},{},{}\n",
            self.epoch, self.step, tr, test, self.seconds, ips, valid
        )
    }

    fn line(&self, epochs: usize) -> String {
        let valid = self
            .valid
            .map(|v| format!("valid -ELBO {:7.2}  ", v.nelbo()))
            .unwrap_or_default();
        let test = match self.test {
            Some(t) => format!(
                "{valid}test -ELBO {:7.2} (recon {:7.2}, KL {:6.2})",
                t.nelbo(),
                t.recon,
                t.kl
            ),
            None => format!("{valid}(test every {} epochs)", self.every),
        };
        match self.train {
            Some(t) => format!(
                "epoch {:>3}/{epochs}  train -ELBO {:7.2} (recon {:7.2}, KL {:6.2})  {test}  {:6.2} s  {:7.0} img/s",
                self.epoch,
                t.nelbo(),
                t.recon,
                t.kl,
                self.seconds,
                t.n as f64 / self.seconds
            ),
            None => format!("epoch {:>3}/{epochs}  (untrained){:>46}{test}", 0, ""),
        }
    }
}

/// The objective of the step after `step` steps: S samples, IWAE or ELBO, and the KL weight
/// beta * min(1, step / (kl_warmup_epochs * steps per epoch)), rising linearly per step (the
/// annealing of Bowman et al. 2016).
pub fn objective(cfg: &Config, step: u64, steps_per_epoch: usize) -> Objective {
    let t = &cfg.train;
    let ramp = if t.kl_warmup_epochs == 0 {
        1.0
    } else {
        (step as f64 / (t.kl_warmup_epochs * steps_per_epoch) as f64).min(1.0)
    };
    Objective {
        samples: t.mc_samples.max(t.iw_samples),
        iwae: t.iw_samples > 1,
        kl_weight: t.beta * ramp,
        free_bits: t.free_bits,
    }
}

/// The random stream of epoch `epoch` (1-based): shuffle, binarization and eps all come from it,
/// so a run resumed at any step reproduces the draws of one that never stopped.
pub fn epoch_rng(seed: u64, epoch: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A checkpoint's parameters, Adam moments and step count.
type Resumed = (HashMap<String, Tensor>, HashMap<String, Tensor>, u64);

/// Where training starts: fresh, or from a run's checkpoint.
struct Start {
    /// The run directory when resuming; a fresh run's is created once data and model are ready,
    /// so a bad input leaves nothing behind.
    run_dir: Option<PathBuf>,
    /// Epochs completed.
    epoch: usize,
    /// Model parameters, optimizer moments (`m.*`, `v.*`) and steps taken, when resuming.
    resumed: Option<Resumed>,
    /// metrics.csv so far.
    csv: String,
    /// Progress inside the next epoch, for a run interrupted there.
    partial: Option<Partial>,
    /// The best validation epoch so far, with a validation split.
    best: Option<Best>,
}

/// `vae train`: trains `cfg` into a new run directory and returns it.
pub fn train(cfg: &Config, opts: &Options) -> Result<PathBuf> {
    let start = Start {
        run_dir: None,
        epoch: 0,
        resumed: None,
        csv: String::from(CSV_HEADER),
        partial: None,
        best: None,
    };
    run_training(cfg, opts, start)
}

/// `vae train --resume`: continues a run from its last checkpoint, with the model, Adam's moments
/// and step count, and the random streams where they were. `overrides` may change keys that do
/// not change the model (e.g. `train.epochs` to train longer).
pub fn resume(run_arg: Option<&str>, overrides: &[String], opts: &Options) -> Result<PathBuf> {
    let run_dir = run::find(run_arg)?;
    let path = run_dir.join(run::CONFIG_FILE);
    let saved = run::load_config(&run_dir)?;
    let cfg = crate::config::resolve(
        &crate::config::Source {
            label: path.display().to_string(),
            text: saved.to_toml()?,
        },
        overrides,
    )?;
    if cfg.model != saved.model || cfg.data != saved.data || cfg.seed != saved.seed {
        bail!(
            "--set: a resumed run keeps its model, data and seed ({}); change training keys only, \
             or start a new run",
            path.display()
        );
    }
    if !run_dir.join(run::STATE_FILE).exists() {
        // Stopped before its first checkpoint (diverged or killed in epoch 1): nothing to
        // continue from, so the run starts again from its beginning, in the same directory,
        // with the training keys --set may have changed (a lower train.lr, say).
        println!(
            "{} has no checkpoint yet; training it again from its start",
            run_dir.display()
        );
        let start = Start {
            run_dir: Some(run_dir),
            epoch: 0,
            resumed: None,
            csv: String::from(CSV_HEADER),
            partial: None,
            best: None,
        };
        return run_training(&cfg, opts, start);
    }
    let state = run::load_state(&run_dir)?;
    run::check_model_unchanged(&run_dir, &state, &cfg)?;
    if state.epoch >= cfg.train.epochs && state.partial.is_none() {
        bail!(
            "{} has finished its {} epochs; to train longer pass --set train.epochs=N with N > {}",
            run_dir.display(),
            state.epoch,
            state.epoch
        );
    }
    if let Some(b) = state.valid.filter(|b| b.stopped) {
        bail!(
            "{} stopped early after epoch {} ({} epochs without a better validation -ELBO than \
             epoch {}'s); to train on, pass --set train.patience=N with N > {}",
            run_dir.display(),
            state.epoch,
            b.since,
            b.epoch,
            b.since
        );
    }
    let dev = device::open(&cfg.device).context("key `device` / --device")?;
    // With a validation split the run's model is the best epoch, with a moving average it is
    // the average: either way training goes on from the last weights.
    let model_path = run_dir.join(if cfg.data.valid > 0 || cfg.train.ema > 0.0 {
        run::LAST_FILE
    } else {
        run::MODEL_FILE
    });
    let params = run::load_tensors(&model_path, &Device::Cpu)?;
    let mut cfg = cfg;
    cfg.model.image = Some([state.channels, state.rows, state.cols]);
    model::check_params(
        &params,
        &cfg.model,
        state.rows * state.cols * state.channels,
        &model_path.display().to_string(),
    )?;
    let moments = run::load_tensors(&run_dir.join(run::OPTIM_FILE), &Device::Cpu)?;
    let params = params
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&dev)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let csv_path = run_dir.join(run::METRICS_FILE);
    let old = std::fs::read_to_string(&csv_path).unwrap_or_default();
    // Rows of completed epochs only: a row past the checkpoint belongs to work being redone.
    let mut csv = String::from(CSV_HEADER);
    for line in old.lines().skip(1) {
        let e: Option<usize> = line.split(',').next().and_then(|v| v.parse().ok());
        if e.is_some_and(|e| e <= state.epoch) {
            csv.push_str(line);
            csv.push('\n');
        }
    }
    println!(
        "resuming {} after epoch {} (step {})",
        run_dir.display(),
        state.epoch,
        state.step
    );
    let start = Start {
        run_dir: Some(run_dir),
        epoch: state.epoch,
        resumed: Some((params, moments, state.step)),
        csv,
        partial: state.partial.clone(),
        best: state.valid,
    };
    run_training(&cfg, opts, start)
}

fn run_training(cfg: &Config, opts: &Options, start: Start) -> Result<PathBuf> {
    // Row 0 is the untrained model: measured only on a fresh start. A run resumed inside epoch 1
    // already has it in metrics.csv, and its weights are no longer the untrained ones.
    let fresh = start.resumed.is_none();
    // The session's copy gains the data's image shape (`Session::open`).
    let mut shaped = cfg.clone();
    let mut s = Session::open(&mut shaped, opts, start)?;
    if fresh {
        let (m0, _) = s.model()?;
        let row0 = EpochRow {
            epoch: 0,
            step: 0,
            train: None,
            test: Some(s.evaluate(&m0)?),
            valid: s.evaluate_valid(&m0)?,
            seconds: 0.0,
            every: cfg.train.eval_every,
        };
        s.log(&row0);
        run::write_atomic(&s.run_dir.join(run::METRICS_FILE), s.csv.as_bytes())?;
    }
    for epoch in s.done + 1..=cfg.train.epochs {
        let (train, seconds) = s.train_epoch(epoch)?;
        if !s.end_epoch(epoch, train, seconds)? {
            break;
        }
    }
    if let Some(mb) = peak_rss_mb() {
        println!("peak resident memory {mb:.0} MB");
    }
    for line in advice(&s.csv, cfg) {
        eprintln!("{line}");
    }
    println!(
        "saved {}  (vae eval --run {} for the full test set)",
        s.run_dir.display(),
        s.run_dir.display()
    );
    Ok(s.run_dir)
}

/// Below this mean KL per latent dimension (nats) over the last epochs, the posterior has
/// collapsed onto the prior: the decoder ignores z and every sample is the same average image.
pub const COLLAPSED_KL_PER_DIM: f64 = 0.1;
/// Fewer optimizer steps than this and samples are still blurs (the reference recipe makes
/// 4,690; a folder of 200 images at batch 128 makes 20 in its 10 epochs).
pub const FEW_STEPS: u64 = 1000;
/// Epochs whose train KL the collapse check averages.
const LAST_EPOCHS: usize = 3;

/// What a finished run should tell its user about itself, from its metrics.csv: a collapsed
/// KL, or too few steps for recognizable samples, each one line with what to try.
fn advice(csv: &str, cfg: &Config) -> Vec<String> {
    // Rows of trained epochs: (step, train KL).
    let rows: Vec<(u64, f64)> = csv
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let epoch: usize = f.first()?.parse().ok()?;
            let step: u64 = f.get(1)?.parse().ok()?;
            let kl: f64 = f.get(4)?.parse().ok()?;
            (epoch > 0).then_some((step, kl))
        })
        .collect();
    let Some(&(steps, _)) = rows.last() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let dims = cfg.model.latent + cfg.model.upper.iter().map(|u| u.latent).sum::<usize>();
    if cfg.model.kind == ModelKind::Vae && dims > 0 {
        let last = &rows[rows.len().saturating_sub(LAST_EPOCHS)..];
        let kl = last.iter().map(|r| r.1).sum::<f64>() / last.len() as f64;
        if kl / (dims as f64) < COLLAPSED_KL_PER_DIM {
            let mut tries = vec![
                "more images or epochs (--set train.epochs=N)".to_string(),
                "a KL warm-up (--set train.kl_warmup_epochs=10)".to_string(),
            ];
            if cfg.train.beta > 1.0 {
                tries.push(format!("a smaller train.beta (it is {})", cfg.train.beta));
            }
            if cfg.model.upper.is_empty() && cfg.model.latent > 2 {
                tries.push(format!(
                    "a smaller latent (--set model.latent={})",
                    cfg.model.latent / 2
                ));
            }
            out.push(format!(
                "warning: the KL term collapsed to {:.3} nat per latent dimension ({kl:.2} over \
                 {dims}) in the last {} epochs: the decoder ignores z, so samples are one \
                 average image; try {}",
                kl / dims as f64,
                last.len(),
                tries.join(", ")
            ));
        }
    }
    if steps < FEW_STEPS {
        out.push(format!(
            "note: {steps} optimizer steps in all; samples stay blurs until about {FEW_STEPS} or \
             more (one step per batch of {}): train longer (--set train.epochs=N) or on more images",
            cfg.train.batch_size
        ));
    }
    out
}

/// A training run under way: its config, data, engine and run directory (held locked).
struct Session<'a> {
    cfg: &'a Config,
    quiet: bool,
    dev: Device,
    ds: data::Dataset,
    dim: usize,
    engine: Engine,
    /// The validation images' pixels (n, D; binarized once), and the best epoch on them.
    x_valid: Option<Vec<f32>>,
    best: Option<Best>,
    run_dir: PathBuf,
    lock: Option<run::Lock>,
    /// Epochs completed before this process, metrics.csv so far, and progress inside the next
    /// epoch for a run interrupted there.
    done: usize,
    csv: String,
    partial: Option<Partial>,
    picture_z: Vec<f32>,
    test_px: Vec<f32>,
}

impl<'a> Session<'a> {
    /// Loads the data, builds the engine (fresh or from the checkpoint), creates or reopens the
    /// run directory and prints the header.
    fn open(cfg: &'a mut Config, opts: &Options, start: Start) -> Result<Self> {
        let dev = device::open(&cfg.device).context("key `device` / --device")?;
        let mut ds = data::load(&cfg.data, cfg.data.limit, cfg.data.test_limit)?;
        let dim = ds.train.dim();
        // A conv network is built for the data's image shape; a size its strides do not divide
        // stops here, naming the layer.
        let image = [ds.train.channels, ds.train.rows, ds.train.cols];
        cfg.model.image = Some(image);
        if cfg.model.arch == Arch::Conv {
            cfg.model
                .conv_layers(image)
                .with_context(|| format!("data {}", ds.dir.display()))?;
        }
        let cfg: &'a Config = cfg;
        check_memory(cfg, dim)?;
        let x_valid = if cfg.data.valid > 0 {
            if cfg.data.valid >= ds.train.n {
                bail!(
                    "key `data.valid`: {} validation images leave none of the {} training images",
                    cfg.data.valid,
                    ds.train.n
                );
            }
            let v = ds.train.split_off_last(cfg.data.valid);
            let mut px = data::to_pixels(&v.images);
            if cfg.data.binarize != Binarize::None {
                data::binarize_in_place(&mut px, &mut StdRng::seed_from_u64(cfg.seed ^ VALID_SALT));
            }
            Some(px)
        } else {
            None
        };
        // The init stream: parameters first, then the static binarization, so a seed's init
        // does not depend on the data options. A resumed run replays it to binarize identically.
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut fresh = model::init_params(&cfg.model, dim, &mut rng, &dev)?;
        if cfg.model.output_bias == OutputBias::DataMean {
            model::data_mean_output_bias(&mut fresh, &ds.train.images, dim)?;
        }
        // Kept as bytes (b / 255 is the pixel): a quarter of the f32 copy's memory.
        let mut train_bytes = std::mem::take(&mut ds.train.images);
        if cfg.data.binarize == Binarize::Static {
            data::binarize_bytes_in_place(&mut train_bytes, &mut rng);
        }
        let Start {
            run_dir,
            epoch: done,
            resumed,
            csv,
            partial,
            best,
        } = start;
        let resuming = resumed.is_some();
        let (params, moments) = match resumed {
            Some((p, m, step)) => (p, Some((m, step))),
            None => (fresh, None),
        };
        let mut engine = Engine::new(cfg, dim, params, train_bytes, &dev)?;
        if let Some((m, step)) = moments {
            engine
                .load_optimizer(&m, step)
                .context("optimizer.safetensors")?;
        }
        let run_dir = match run_dir {
            Some(d) => d,
            None => run::create(cfg, opts.run.as_deref())?,
        };
        if cfg.train.ema > 0.0 {
            // A resumed run's average goes on from its file; a fresh one (or a run that turns
            // the average on when resumed) starts it at the current weights.
            let file = run_dir.join(run::EMA_FILE);
            let start = if resuming && file.is_file() {
                Some(run::load_tensors(&file, &Device::Cpu)?)
            } else {
                None
            };
            engine.set_ema(cfg.train.ema, start.as_ref())?;
        }
        let lock = run::Lock::take(&run_dir)?;
        run::clean_temporaries(&run_dir);
        interrupt::install();
        run::write_atomic(&run_dir.join(run::CONFIG_FILE), cfg.to_toml()?.as_bytes())?;
        run::set_latest(Path::new(&cfg.out_dir), &run_dir)?;
        if !opts.quiet {
            println!(
                "# resolved config (saved as {})",
                run_dir.join(run::CONFIG_FILE).display()
            );
            print!("{}", cfg.to_toml()?);
            println!("#");
        }
        println!(
            "run {}  device {}  engine {}  data {} ({} train, {} test images of {})",
            run_dir.display(),
            device::describe(&dev),
            engine.name(),
            ds.dir.display(),
            ds.train.n,
            ds.test.n,
            ds.train.describe_size()
        );
        let test_px = eval::test_pixels(cfg, &ds.test);
        Ok(Session {
            cfg,
            quiet: opts.quiet,
            dev,
            dim,
            engine,
            x_valid,
            best,
            run_dir,
            lock: Some(lock),
            done,
            csv,
            partial,
            picture_z: pictures::fixed_z(cfg.seed, 64, cfg.model.noise_dim()),
            test_px,
            ds,
        })
    }

    /// A candle model of the current parameters and its tensors, built once per evaluation
    /// point.
    fn model(&self) -> Result<(Vae, HashMap<String, Tensor>)> {
        self.engine.eval_model(self.cfg, self.dim, &self.dev)
    }

    /// The test -ELBO of model `m` (the test pixels are `test_px`, binarized once).
    fn evaluate(&mut self, m: &Vae) -> Result<Totals> {
        let (cfg, dim, dev) = (self.cfg, self.dim, &self.dev);
        eval_pixels(&mut self.engine, m, &self.test_px, cfg, dim, dev)
    }

    /// The validation -ELBO of model `m`, with a validation split.
    fn evaluate_valid(&mut self, m: &Vae) -> Result<Option<Totals>> {
        let (cfg, dim, dev) = (self.cfg, self.dim, &self.dev);
        match &self.x_valid {
            Some(px) => Ok(Some(eval_pixels(&mut self.engine, m, px, cfg, dim, dev)?)),
            None => Ok(None),
        }
    }

    /// Prints an epoch's line and adds it to metrics.csv (in memory).
    fn log(&mut self, row: &EpochRow) {
        println!("{}", row.line(self.cfg.train.epochs));
        self.csv.push_str(&row.csv());
    }

    /// One epoch's steps: its shuffle, binarization and noise from the epoch's stream (replayed
    /// up to where an interrupted run stopped), a checkpoint and exit on SIGINT / SIGTERM.
    /// Returns the training -ELBO terms and the training seconds.
    fn train_epoch(&mut self, epoch: usize) -> Result<(Totals, f64)> {
        let (cfg, n) = (self.cfg, self.ds.train.n);
        let bs = cfg.train.batch_size;
        let dynamic = cfg.data.binarize == Binarize::Dynamic;
        let steps_per_epoch = n.div_ceil(bs);
        let bar = self.progress(epoch, steps_per_epoch);
        let t0 = Instant::now();
        let mut rng = epoch_rng(cfg.seed, epoch);
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut rng);
        // Running sums of [recon, kl]; the autograd engine keeps them on the device and they are
        // read every DIVERGENCE_CHECK steps (the fused engine's are on the host every step).
        let (mut host, mut on_dev) = ((0f64, 0f64), None::<Tensor>);
        let (mut skip, mut seconds_before) = (0, 0.0);
        let samples = objective(cfg, self.engine.steps(), steps_per_epoch).samples;
        if let Some(p) = self.partial.take() {
            // Resuming inside this epoch: replay the draws of the batches already done.
            for chunk in order.chunks(bs).take(p.batches) {
                skip_draws(
                    chunk.len(),
                    dynamic,
                    self.dim,
                    cfg.model.noise_dim() * samples,
                    &mut rng,
                );
            }
            (skip, host, seconds_before) = (p.batches, (p.recon_sum, p.kl_sum), p.seconds);
            bar.inc(skip as u64);
        }
        let rest = &order[(skip * bs).min(order.len())..];
        self.engine
            .begin_epoch(rest, dynamic, samples, cfg.model.noise_dim(), &mut rng)?;
        self.engine.set_lr(crate::schedule::lr(&cfg.train, epoch));
        for (k, chunk) in order.chunks(bs).enumerate().skip(skip) {
            let o = objective(cfg, self.engine.steps(), steps_per_epoch);
            match self
                .engine
                .step(chunk, dynamic, cfg.model.noise_dim(), &o, &mut rng)?
            {
                Sums::Host(r, kl) => {
                    host = (host.0 + r, host.1 + kl);
                    if !(r + kl).is_finite() {
                        return Err(diverged(&self.run_dir, epoch, k + 1, steps_per_epoch, cfg));
                    }
                }
                Sums::Device(t) => {
                    on_dev = Some(match on_dev {
                        Some(a) => (a + t)?,
                        None => t,
                    })
                }
            }
            if let Some(t) = on_dev.as_ref().filter(|_| (k + 1) % DIVERGENCE_CHECK == 0) {
                if !t.sum_all()?.to_scalar::<f32>()?.is_finite() {
                    return Err(diverged(&self.run_dir, epoch, k + 1, steps_per_epoch, cfg));
                }
            }
            bar.inc(1);
            if interrupt::requested() && k + 1 < steps_per_epoch {
                bar.finish_and_clear();
                if let Some(t) = on_dev.take() {
                    let v = t.to_vec1::<f32>()?;
                    host = (host.0 + v[0] as f64, host.1 + v[1] as f64);
                }
                let p = Partial {
                    batches: k + 1,
                    recon_sum: host.0,
                    kl_sum: host.1,
                    seconds: seconds_before + t0.elapsed().as_secs_f64(),
                };
                checkpoint(
                    self.best,
                    false,
                    &self.engine,
                    &self.run_dir,
                    cfg,
                    &self.ds,
                    epoch - 1,
                    Some(p),
                )?;
                self.stop(epoch, k + 1, steps_per_epoch);
            }
        }
        if let Some(t) = on_dev {
            let v = t.to_vec1::<f32>()?;
            host = (host.0 + v[0] as f64, host.1 + v[1] as f64);
        }
        let seconds = seconds_before + t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        if !(host.0 + host.1).is_finite() {
            return Err(diverged(
                &self.run_dir,
                epoch,
                steps_per_epoch,
                steps_per_epoch,
                cfg,
            ));
        }
        let train = Totals {
            n,
            recon: host.0 / n as f64,
            kl: host.1 / n as f64,
        };
        Ok((train, seconds))
    }

    /// After an epoch's steps: the test (and validation) -ELBO, the epoch's line, the checkpoint,
    /// metrics.csv and the pictures; an interruption that came during them stops here. Returns
    /// whether training goes on (false: early stopping).
    fn end_epoch(&mut self, epoch: usize, train: Totals, seconds: f64) -> Result<bool> {
        let cfg = self.cfg;
        let every = cfg.train.eval_every;
        let (model, params) = self.model()?;
        let test = if epoch.is_multiple_of(every) || epoch == cfg.train.epochs {
            Some(self.evaluate(&model)?)
        } else {
            None
        };
        let valid = self.evaluate_valid(&model)?;
        let row = EpochRow {
            epoch,
            step: self.engine.steps(),
            train: Some(train),
            test,
            valid,
            seconds,
            every,
        };
        self.log(&row);
        // The best validation epoch; epochs without a better one count after the KL warm-up.
        let mut improved = false;
        if let Some(v) = valid {
            let b = match self.best {
                Some(b) if v.nelbo() >= b.nelbo => Best {
                    since: b.since + (epoch > cfg.train.kl_warmup_epochs) as usize,
                    ..b
                },
                _ => {
                    improved = true;
                    Best {
                        nelbo: v.nelbo(),
                        epoch,
                        since: 0,
                        stopped: false,
                    }
                }
            };
            let stop = cfg.train.patience > 0 && b.since >= cfg.train.patience;
            self.best = Some(Best { stopped: stop, ..b });
        }
        let state = checkpoint(
            self.best,
            improved,
            &self.engine,
            &self.run_dir,
            cfg,
            &self.ds,
            epoch,
            None,
        )?;
        run::write_atomic(&self.run_dir.join(run::METRICS_FILE), self.csv.as_bytes())?;
        // The epoch's pictures with its test evaluation (skipped epochs draw none).
        if test.is_some() {
            let l = Loaded {
                dir: self.run_dir.clone(),
                cfg: cfg.clone(),
                state,
                model,
                params,
                dev: self.dev.clone(),
            };
            pictures::epoch_pictures(
                &l,
                &self.run_dir,
                epoch,
                &self.picture_z,
                &self.test_px,
                &self.csv,
            )?;
        }
        if let Some(b) = self.best.filter(|b| b.stopped) {
            println!(
                "early stopping: no better validation -ELBO for {} epochs; the run's model is \
                 epoch {} (validation -ELBO {:.2})",
                b.since, b.epoch, b.nelbo
            );
            return Ok(false);
        }
        if interrupt::requested() && epoch < cfg.train.epochs {
            let steps_per_epoch = self.ds.train.n.div_ceil(cfg.train.batch_size);
            self.stop(epoch + 1, 0, steps_per_epoch);
        }
        Ok(true)
    }

    /// The epoch's progress bar on stderr when it is a terminal, else a hidden one.
    fn progress(&self, epoch: usize, steps: usize) -> ProgressBar {
        if self.quiet || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let b = ProgressBar::new(steps as u64);
        b.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(epoch.to_string());
        b
    }

    /// Ends the process after an interruption's checkpoint, releasing the lock first.
    fn stop(&mut self, epoch: usize, batch: usize, per_epoch: usize) -> ! {
        drop(self.lock.take());
        eprintln!(
            "interrupted: checkpoint saved at epoch {epoch}, batch {batch}/{per_epoch} in {}; \
             continue with `vae train --resume --run {}`",
            self.run_dir.display(),
            self.run_dir.display()
        );
        std::process::exit(130)
    }
}

/// Steps between the autograd engine's finiteness checks (each reads one number to the host).
const DIVERGENCE_CHECK: usize = 50;

/// The -ELBO terms of the images `px` (n, D): on the fused step's forward when training is
/// fused (the candle model's convolutions are slow on the CPU), else on the candle model `m`.
/// Both draw the same noise stream and compute the same quantity (`step::tests` checks that
/// the two agree on every family).
fn eval_pixels(
    engine: &mut Engine,
    m: &Vae,
    px: &[f32],
    cfg: &Config,
    dim: usize,
    dev: &Device,
) -> Result<Totals> {
    let (batch, seed, nd) = (cfg.train.eval_batch_size, cfg.seed, cfg.model.noise_dim());
    if matches!(engine, Engine::Fused { .. }) {
        return eval::evaluate_host(px, dim, nd, batch, seed, |x, e| {
            match engine.evaluate_fused(x, e) {
                Some(r) => r,
                None => bail!("no fused step to evaluate on"),
            }
        });
    }
    let x = Tensor::from_slice(px, (px.len() / dim, dim), dev)?;
    eval::evaluate(m, &x, batch, seed)
}

/// Writes the checkpoint: weights, then moments, then state.json last, which names the epoch
/// (and, for an interruption, how far into the next one). Each file is replaced atomically.
/// With a validation split the weights go to `last.safetensors`, and to `model.safetensors`
/// only when this epoch is the best (`improved`).
#[allow(clippy::too_many_arguments)]
fn checkpoint(
    best: Option<Best>,
    improved: bool,
    engine: &Engine,
    run_dir: &Path,
    cfg: &Config,
    ds: &data::Dataset,
    epoch: usize,
    partial: Option<Partial>,
) -> Result<State> {
    let params = engine.params()?;
    for (name, t) in &params {
        if !t
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .is_finite()
        {
            bail!(
                "parameter `{name}` is not finite after epoch {epoch}; training diverged. The last \
                 good checkpoint in {} is untouched; resume it with a lower --set train.lr or \
                 with --set train.kl_warmup_epochs=N",
                run_dir.display()
            );
        }
    }
    match engine.ema_params()? {
        // The weights go on in last.safetensors; the run's model is their average.
        Some(avg) => {
            run::save_tensors(&run_dir.join(run::LAST_FILE), &params)?;
            run::save_tensors(&run_dir.join(run::EMA_FILE), &avg)?;
            if cfg.data.valid == 0 || improved {
                run::save_tensors(&run_dir.join(run::MODEL_FILE), &avg)?;
            }
        }
        None if cfg.data.valid > 0 => {
            run::save_tensors(&run_dir.join(run::LAST_FILE), &params)?;
            if improved {
                run::save_tensors(&run_dir.join(run::MODEL_FILE), &params)?;
            }
        }
        None => run::save_tensors(&run_dir.join(run::MODEL_FILE), &params)?,
    }
    run::save_tensors(&run_dir.join(run::OPTIM_FILE), &engine.optimizer_state()?)?;
    let state = State {
        format: 1,
        epoch,
        step: engine.steps(),
        rows: ds.train.rows,
        cols: ds.train.cols,
        channels: ds.train.channels,
        classes: ds.train.classes.clone(),
        partial,
        model: Some(cfg.model.clone()),
        valid: best,
    };
    run::write_atomic(
        &run_dir.join(run::STATE_FILE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    Ok(state)
}

fn diverged(
    run_dir: &Path,
    epoch: usize,
    batch: usize,
    per_epoch: usize,
    cfg: &Config,
) -> anyhow::Error {
    let kept = if run_dir.join(run::STATE_FILE).exists() {
        format!(
            "The last good checkpoint in {} is untouched",
            run_dir.display()
        )
    } else {
        format!(
            "{} has no checkpoint yet, so --resume starts it again from its beginning",
            run_dir.display()
        )
    };
    anyhow::anyhow!(
        "training diverged at epoch {epoch}, batch {batch}/{per_epoch}: the loss is not finite. \
         {kept}; try a lower learning rate (--set train.lr={:e}) or KL warm-up \
         (--set train.kl_warmup_epochs=5) with `vae train --resume --run {}`",
        cfg.train.lr / 10.0,
        run_dir.display()
    )
}

/// Refuses, before anything is allocated, a config whose parameters (with gradients and Adam's
/// two moments) and per-batch buffers would not fit in this machine's available memory, naming
/// the key that makes them so. Sizes are counted in u128, so no product overflows.
fn check_memory(cfg: &Config, dim: usize) -> Result<()> {
    let Some(avail) = crate::device::available_bytes() else {
        return Ok(());
    };
    let m = &cfg.model;
    let params: u128 = model::param_specs(m, dim)
        .iter()
        .map(|(_, shape, _)| shape.iter().map(|&v| v as u128).product::<u128>())
        .sum();
    let wide: u128 = if m.activation == crate::config::Activation::Gated {
        2
    } else {
        1
    };
    // A second stochastic layer's networks run per sample row like the decoder's: count their
    // widths (twice: up and down) and its dimensions with the first layer's.
    let hidden: u128 = m.hidden.iter().map(|&h| h as u128).sum::<u128>()
        + m.upper
            .iter()
            .flat_map(|u| u.hidden.iter())
            .map(|&h| 2 * h as u128)
            .sum::<u128>();
    let (z, d) = (m.noise_dim() as u128, dim as u128);
    let b = cfg.train.batch_size.max(cfg.train.eval_batch_size) as u128;
    let rows =
        cfg.train.batch_size as u128 * cfg.train.mc_samples.max(cfg.train.iw_samples) as u128;
    // Per image: input, pre-activations and activations, heads; per sample row: z's, decoder
    // activations, output and its gradient, two scratch rows, the prior's responsibilities.
    // A conv network: per layer its product, output and input (and their gradients' scratch),
    // and its patch rows and their gradient, per image in the encoder and per sample row in the
    // decoder.
    let conv: u128 = match (m.arch, m.image) {
        (Arch::Conv, Some(image)) => m
            .conv_layers(image)
            .map(|ls| {
                ls.iter()
                    .map(|l| {
                        let out = l.out_size() as u128;
                        let inp = (l.c_in * l.h * l.w) as u128;
                        let patches = ((l.h / l.s) * (l.w / l.s) * l.c_in * l.k * l.k) as u128;
                        (wide + 1) * (out + inp) + 2 * wide * patches
                    })
                    .sum()
            })
            .unwrap_or(0),
        _ => 0,
    };
    let per_batch = (b + rows) * conv
        + b * (d + 2 * wide * hidden + 6 * z)
        + rows
            * (z * (m.flows as u128 + 4)
                + 2 * wide * hidden
                + 2 * d
                + 2 * wide * hidden.max(z)
                + m.prior_components as u128);
    let (p_bytes, b_bytes) = (4 * 4 * params, 4 * per_batch);
    if p_bytes + b_bytes <= avail as u128 {
        return Ok(());
    }
    let gb = |v: u128| v as f64 / 1e9;
    let key = if p_bytes >= b_bytes {
        if m.latent as u128 > hidden && m.latent > dim {
            "model.latent"
        } else {
            "model.hidden"
        }
    } else if 2 * (b + rows) * conv > per_batch {
        // The convolutions' activations and patch rows fill the batch buffers.
        "model.conv"
    } else if 4 * wide * hidden > d + 6 * z + 2 * d {
        // The widths, not the batch, make the batch buffers large: each row holds them.
        "model.hidden"
    } else if rows > cfg.train.batch_size as u128 {
        "train.iw_samples / train.mc_samples"
    } else if m.latent as u128 > hidden && m.latent > dim {
        "model.latent"
    } else {
        "train.batch_size"
    };
    bail!(
        "key `{key}`: this model needs ~{:.1} GB for its parameters, gradients and Adam's moments \
         and ~{:.1} GB of batch buffers, more than the {:.1} GB this machine has available; \
         make it smaller",
        gb(p_bytes),
        gb(b_bytes),
        gb(avail as u128)
    )
}

/// This process's peak resident set (VmHWM in /proc/self/status), Linux only.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// metrics.csv with row 0 and one row per (step, train KL).
    fn csv(rows: &[(u64, f64)]) -> String {
        let mut s = String::from(CSV_HEADER);
        s.push_str("0,0,,,,550.0,540.0,10.0,0.000,,\n");
        for (i, (step, kl)) in rows.iter().enumerate() {
            s.push_str(&format!(
                "{},{step},200.0,190.0,{kl},201.0,191.0,{kl},1.0,100.0,\n",
                i + 1
            ));
        }
        s
    }

    #[test]
    fn a_collapsed_kl_is_said_and_a_healthy_one_is_not() {
        let cfg = Config::default(); // latent 20: the threshold is 2 nats in all
                                     // The last three epochs average (1.9 + 1.5 + 1.1) / 3 = 1.5 nats, 0.075 a dimension.
        let a = advice(
            &csv(&[(2000, 30.0), (3000, 1.9), (4000, 1.5), (5000, 1.1)]),
            &cfg,
        );
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(
            a[0].starts_with("warning: the KL term collapsed to 0.075 nat"),
            "{a:?}"
        );
        assert!(
            a[0].contains("(1.50 over 20) in the last 3 epochs"),
            "{a:?}"
        );
        // 2.1 nats is 0.105 a dimension: not collapsed (the first epoch's 0.5 is not counted).
        let a = advice(
            &csv(&[(2000, 0.5), (3000, 2.1), (4000, 2.1), (5000, 2.1)]),
            &cfg,
        );
        assert!(a.is_empty(), "{a:?}");
        // Two stochastic layers count both layers' dimensions: 100 + 50, so 9 nats is 0.06.
        let mut two = Config::default();
        two.model.latent = 100;
        two.model.upper = vec![crate::config::Upper {
            latent: 50,
            hidden: vec![100],
        }];
        assert_eq!(advice(&csv(&[(5000, 9.0)]), &two).len(), 1);
        // An autoencoder has no KL term to collapse.
        let mut ae = Config::default();
        ae.model.kind = ModelKind::Ae;
        assert!(advice(&csv(&[(5000, 0.0)]), &ae).is_empty());
    }

    #[test]
    fn too_few_steps_are_said() {
        let cfg = Config::default();
        let a = advice(&csv(&[(10, 40.0), (20, 33.0)]), &cfg);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(a[0].starts_with("note: 20 optimizer steps in all"), "{a:?}");
        assert!(advice(&csv(&[(999, 40.0), (1000, 33.0)]), &cfg).is_empty());
        // Row 0 alone (nothing trained) says nothing.
        assert!(advice(&csv(&[]), &cfg).is_empty());
    }
}
