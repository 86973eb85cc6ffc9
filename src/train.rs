//! The training loop: minibatch SGD on the -ELBO with the reparameterization gradient (Kingma &
//! Welling 2013, Algorithm 1, one sample of z per image, M = batch size), optimized with Adam.
//! As in pytorch/examples `vae/main.py`, the loss is the batch's summed -ELBO; the logged figures
//! are per example.
//!
//! Every random draw (init, shuffles, eps, binarization) comes from one `StdRng` seeded with
//! `seed`, in a fixed order, so a seed and a device give one sequence of numbers.

use crate::config::{Binarize, Config, EngineKind};
use crate::data;
use crate::device;
use crate::eval::{self, Loaded, Totals};
use crate::interrupt;
use crate::model::{self, Objective, Vae};
use crate::optim::{Adam, AdamConfig};
use crate::pictures;
use crate::run::{self, Partial, State};
use crate::step::Fused;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
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
    "epoch,step,train_nelbo,train_recon,train_kl,test_nelbo,test_recon,test_kl,train_seconds,images_per_s\n";

/// One epoch's line, for the terminal and for metrics.csv.
struct EpochRow {
    epoch: usize,
    step: u64,
    train: Option<Totals>,
    test: Totals,
    seconds: f64,
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
        format!(
            "{},{},{},{:.4},{:.4},{:.4},{:.3},{}\n",
            self.epoch,
            self.step,
            tr,
            self.test.nelbo(),
            self.test.recon,
            self.test.kl,
            self.seconds,
            ips
        )
    }

    fn line(&self, epochs: usize) -> String {
        let test = format!(
            "test -ELBO {:7.2} (recon {:7.2}, KL {:6.2})",
            self.test.nelbo(),
            self.test.recon,
            self.test.kl
        );
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

/// The model with its optimizer, on candle's autograd: any device, any config.
pub struct Trainer {
    pub model: Vae,
    pub varmap: VarMap,
    pub adam: Adam,
}

fn adam_config(cfg: &Config) -> AdamConfig {
    AdamConfig {
        lr: cfg.train.lr,
        beta1: cfg.train.beta1,
        beta2: cfg.train.beta2,
        eps: cfg.train.adam_eps,
        weight_decay: cfg.train.weight_decay,
    }
}

impl Trainer {
    /// Builds the model on `params` with zero Adam moments.
    pub fn new(
        cfg: &Config,
        dim: usize,
        params: HashMap<String, Tensor>,
        dev: &Device,
    ) -> Result<Self> {
        let varmap = model::varmap_from(params)?;
        let model = Vae::new(
            &cfg.model,
            dim,
            VarBuilder::from_varmap(&varmap, DType::F32, dev),
        )?;
        let adam = Adam::new(&varmap, adam_config(cfg))?;
        Ok(Trainer {
            model,
            varmap,
            adam,
        })
    }

    /// One Adam step on the batch's objective (the summed -ELBO for the reference recipe);
    /// `x` (B, D), `eps` (B S, Z). Returns the batch's summed true -ELBO terms [recon, kl] as a
    /// (2,) tensor left on the device.
    pub fn step(&mut self, x: &Tensor, eps: &Tensor, o: &Objective) -> Result<Tensor> {
        let (loss, rs, ks) = self.model.training_loss(x, eps, o)?;
        let grads = loss.backward()?;
        self.adam.step(&grads)?;
        Ok(Tensor::stack(&[rs.detach(), ks.detach()], 0)?)
    }
}

/// Which implementation of the step a run uses (`train.engine`).
#[allow(clippy::large_enum_variant)] // one per run
pub enum Engine {
    /// The hand-written CPU step of `fused`, with the training set on the host as bytes
    /// (pixel = byte / 255), converted a batch at a time.
    Fused { f: Box<Fused>, bytes: Vec<u8> },
    /// Candle autograd, with the training set as one (N, D) tensor on the device.
    Autograd {
        t: Trainer,
        x: Tensor,
        epoch: Option<EpochDraws>,
    },
}

/// One epoch's batch order and noise, uploaded once (`Engine::begin_epoch`), so that a step on
/// the device reads its images and eps by `narrow` and uploads nothing.
pub struct EpochDraws {
    /// The remaining image indices of the epoch, in order, (n,) u32.
    order: Tensor,
    /// Their eps, one block of (B S, Z) rows per batch, end to end.
    eps: Tensor,
    /// How many images of `order` the steps have read; their eps are the first `at * S` rows.
    at: usize,
}

impl Engine {
    pub fn new(
        cfg: &Config,
        dim: usize,
        params: HashMap<String, Tensor>,
        bytes: Vec<u8>,
        dev: &Device,
    ) -> Result<Self> {
        let cpu = matches!(dev, Device::Cpu);
        let fused = match cfg.train.engine {
            EngineKind::Auto => cpu,
            EngineKind::Fused => {
                if !cpu {
                    bail!("key `train.engine`: \"fused\" runs on the CPU only; use \"auto\" or --device cpu");
                }
                true
            }
            EngineKind::Autograd => false,
        };
        if fused {
            let f = Fused::new(cfg, dim, &params, adam_config(cfg), cfg.train.batch_size)?;
            Ok(Engine::Fused {
                f: Box::new(f),
                bytes,
            })
        } else {
            let n = bytes.len() / dim;
            let x = Tensor::from_vec(data::to_pixels(&bytes), (n, dim), dev)?;
            Ok(Engine::Autograd {
                t: Trainer::new(cfg, dim, params, dev)?,
                x,
                epoch: None,
            })
        }
    }

    /// Before an epoch's steps: the autograd engine uploads the images `order` of the steps to
    /// come and draws all their eps now, in the order the steps would (without dynamic
    /// binarization, whose per-pixel uniforms come between the steps' eps and stay per step).
    /// The draws are the same numbers either way; this keeps uploads out of the steps.
    pub fn begin_epoch(
        &mut self,
        order: &[u32],
        dynamic: bool,
        noise_rows_per_image: usize,
        latent: usize,
        rng: &mut StdRng,
    ) -> Result<()> {
        if let Engine::Autograd { x, epoch, .. } = self {
            *epoch = None;
            if !dynamic && !order.is_empty() {
                let dev = x.device();
                *epoch = Some(EpochDraws {
                    order: Tensor::from_slice(order, order.len(), dev)?,
                    eps: eval::normal(rng, order.len() * noise_rows_per_image, latent, dev)?,
                    at: 0,
                });
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Fused { .. } => "fused CPU step",
            Engine::Autograd { .. } => "candle autograd",
        }
    }

    /// One step on the training images `idx`; draws binarization uniforms (dynamic only), then
    /// eps, from `rng` in that order, whichever the engine. Returns the summed [recon, kl],
    /// left on the device for the autograd engine.
    fn step(
        &mut self,
        idx: &[u32],
        dynamic: bool,
        latent: usize,
        o: &Objective,
        rng: &mut StdRng,
    ) -> Result<Sums> {
        let b = idx.len();
        match self {
            Engine::Fused { f, bytes } => {
                let x = f.x_mut(b);
                let dim = x.len() / b;
                for (row, &i) in x.chunks_exact_mut(dim).zip(idx) {
                    let i = i as usize;
                    for (v, &p) in row.iter_mut().zip(&bytes[i * dim..(i + 1) * dim]) {
                        *v = data::pixel(p);
                    }
                }
                if dynamic {
                    for v in x.iter_mut() {
                        *v = if rng.random::<f32>() < *v { 1.0 } else { 0.0 };
                    }
                }
                for e in f.eps_mut(b) {
                    *e = StandardNormal.sample(rng);
                }
                f.set_kl(o.kl_weight, o.free_bits);
                let (r, k) = f.step(b)?;
                Ok(Sums::Host(r, k))
            }
            Engine::Autograd {
                t,
                x,
                epoch: Some(e),
            } => {
                // The epoch's draws are on the device already (not with dynamic binarization).
                let it = e.order.narrow(0, e.at, b)?;
                let eps = e.eps.narrow(0, e.at * o.samples, b * o.samples)?;
                e.at += b;
                let xb = x.index_select(&it, 0)?;
                Ok(Sums::Device(t.step(&xb, &eps, o)?))
            }
            Engine::Autograd { t, x, epoch: None } => {
                let dev = x.device().clone();
                let dim = x.dim(1)?;
                let it = Tensor::from_slice(idx, b, &dev)?;
                let mut xb = x.index_select(&it, 0)?;
                if dynamic {
                    let u: Vec<f32> = (0..b * dim).map(|_| rng.random::<f32>()).collect();
                    xb = Tensor::from_vec(u, (b, dim), &dev)?
                        .lt(&xb)?
                        .to_dtype(DType::F32)?;
                }
                let eps = eval::normal(rng, b * o.samples, latent, &dev)?;
                Ok(Sums::Device(t.step(&xb, &eps, o)?))
            }
        }
    }

    /// The parameters in checkpoint layout.
    pub fn params(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Engine::Fused { f, .. } => f.params(),
            Engine::Autograd { t, .. } => Ok(model::snapshot(&t.varmap)?),
        }
    }

    pub fn optimizer_state(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Engine::Fused { f, .. } => f.adam_state(),
            Engine::Autograd { t, .. } => Ok(t.adam.state()),
        }
    }

    /// Restores Adam's moments (`m.<name>`, `v.<name>`) and step count from a checkpoint.
    pub fn load_optimizer(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        match self {
            Engine::Fused { f, .. } => f.load_adam_state(state, step),
            Engine::Autograd { t, .. } => t.adam.load_state(state, step),
        }
    }

    pub fn steps(&self) -> u64 {
        match self {
            Engine::Fused { f, .. } => f.step,
            Engine::Autograd { t, .. } => t.adam.step,
        }
    }

    /// A candle model of the current parameters on `dev`, for evaluation.
    fn eval_model(&self, cfg: &Config, dim: usize, dev: &Device) -> Result<Vae> {
        let params = self.params()?;
        let params = params
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(dev)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Vae::new(
            &cfg.model,
            dim,
            VarBuilder::from_tensors(params, DType::F32, dev),
        )?)
    }
}

/// A batch's summed [recon, kl]: on the host, or left on the device to avoid a sync.
enum Sums {
    Host(f64, f64),
    Device(Tensor),
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
}

/// `vae train`: trains `cfg` into a new run directory and returns it.
pub fn train(cfg: &Config, opts: &Options) -> Result<PathBuf> {
    let start = Start {
        run_dir: None,
        epoch: 0,
        resumed: None,
        csv: String::from(CSV_HEADER),
        partial: None,
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
    let dev = device::open(&cfg.device).context("key `device` / --device")?;
    let model_path = run_dir.join(run::MODEL_FILE);
    let params = run::load_tensors(&model_path, &Device::Cpu)?;
    model::check_params(
        &params,
        &cfg.model,
        state.rows * state.cols,
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
    };
    run_training(&cfg, opts, start)
}

fn run_training(cfg: &Config, opts: &Options, start: Start) -> Result<PathBuf> {
    let dev = device::open(&cfg.device).context("key `device` / --device")?;
    let mut ds = data::load_dir(&cfg.data.dir, cfg.data.limit, cfg.data.test_limit)?;
    let dim = ds.train.dim();
    let n = ds.train.n;
    // The init stream: parameters first, then the static binarization, so a seed's init does not
    // depend on the data options. A resumed run replays it to binarize identically.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let fresh = model::init_params(&cfg.model, dim, &mut rng, &dev)?;
    // Kept as bytes (b / 255 is the pixel): a quarter of the f32 copy's memory.
    let mut train_bytes = std::mem::take(&mut ds.train.images);
    if cfg.data.binarize == Binarize::Static {
        data::binarize_bytes_in_place(&mut train_bytes, &mut rng);
    }
    let Start {
        run_dir,
        epoch: done,
        resumed,
        mut csv,
        partial,
    } = start;
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
    let x_test = eval::test_tensor(cfg, &ds.test, &dev)?;
    let run_dir = match run_dir {
        Some(d) => d,
        None => run::create(cfg, opts.run.as_deref())?,
    };
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
        "run {}  device {}  engine {}  data {} ({} train, {} test images of {}x{})",
        run_dir.display(),
        device::describe(&dev),
        engine.name(),
        ds.dir.display(),
        n,
        ds.test.n,
        ds.train.rows,
        ds.train.cols
    );

    let evaluate = |engine: &Engine| -> Result<(Totals, Vae)> {
        let m = engine.eval_model(cfg, dim, &dev)?;
        Ok((
            eval::evaluate(&m, &x_test, cfg.train.eval_batch_size, cfg.seed)?,
            m,
        ))
    };
    let picture_z = pictures::fixed_z(cfg.seed, 64, cfg.model.latent);
    let test_px = eval::test_pixels(cfg, &ds.test);
    if done == 0 {
        let row0 = EpochRow {
            epoch: 0,
            step: 0,
            train: None,
            test: evaluate(&engine)?.0,
            seconds: 0.0,
        };
        println!("{}", row0.line(cfg.train.epochs));
        csv.push_str(&row0.csv());
    }

    let bs = cfg.train.batch_size;
    let dynamic = cfg.data.binarize == Binarize::Dynamic;
    let steps_per_epoch = n.div_ceil(bs);
    let show_bar = !opts.quiet && std::io::stderr().is_terminal();
    let mut partial = partial;
    for epoch in done + 1..=cfg.train.epochs {
        let bar = if show_bar {
            let b = ProgressBar::new(steps_per_epoch as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(epoch.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        let t0 = Instant::now();
        let mut rng = epoch_rng(cfg.seed, epoch);
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut rng);
        // Running sums of [recon, kl]; the autograd engine keeps them on the device and they are
        // read every DIVERGENCE_CHECK steps (the fused engine's are on the host every step).
        let (mut host, mut on_dev) = ((0f64, 0f64), None::<Tensor>);
        let (mut skip, mut seconds_before) = (0, 0.0);
        if let Some(p) = partial.take() {
            // Resuming inside this epoch: replay the draws of the batches already done.
            let o = objective(cfg, engine.steps(), steps_per_epoch);
            for chunk in order.chunks(bs).take(p.batches) {
                skip_draws(
                    chunk.len(),
                    dynamic,
                    dim,
                    cfg.model.latent * o.samples,
                    &mut rng,
                );
            }
            (skip, host, seconds_before) = (p.batches, (p.recon_sum, p.kl_sum), p.seconds);
            bar.inc(skip as u64);
        }
        let samples = objective(cfg, engine.steps(), steps_per_epoch).samples;
        let rest = &order[(skip * bs).min(order.len())..];
        engine.begin_epoch(rest, dynamic, samples, cfg.model.latent, &mut rng)?;
        for (k, chunk) in order.chunks(bs).enumerate().skip(skip) {
            let o = objective(cfg, engine.steps(), steps_per_epoch);
            match engine.step(chunk, dynamic, cfg.model.latent, &o, &mut rng)? {
                Sums::Host(r, kl) => {
                    host = (host.0 + r, host.1 + kl);
                    if !(r + kl).is_finite() {
                        return Err(diverged(&run_dir, epoch, k + 1, steps_per_epoch, cfg));
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
                    return Err(diverged(&run_dir, epoch, k + 1, steps_per_epoch, cfg));
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
                checkpoint(&engine, &run_dir, cfg, &ds, epoch - 1, Some(p))?;
                stop_interrupted(lock, &run_dir, epoch, k + 1, steps_per_epoch);
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
                &run_dir,
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
        let (test, model) = evaluate(&engine)?;
        let row = EpochRow {
            epoch,
            step: engine.steps(),
            train: Some(train),
            test,
            seconds,
        };
        println!("{}", row.line(cfg.train.epochs));
        csv.push_str(&row.csv());
        let state = checkpoint(&engine, &run_dir, cfg, &ds, epoch, None)?;
        run::write_atomic(&run_dir.join(run::METRICS_FILE), csv.as_bytes())?;
        let l = Loaded {
            dir: run_dir.clone(),
            cfg: cfg.clone(),
            state,
            model,
            dev: dev.clone(),
        };
        pictures::epoch_pictures(&l, &run_dir, epoch, &picture_z, &test_px, &csv)?;
        if interrupt::requested() && epoch < cfg.train.epochs {
            stop_interrupted(lock, &run_dir, epoch + 1, 0, steps_per_epoch);
        }
    }
    if let Some(mb) = peak_rss_mb() {
        println!("peak resident memory {mb:.0} MB");
    }
    println!(
        "saved {}  (vae eval --run {} for the full test set)",
        run_dir.display(),
        run_dir.display()
    );
    drop(lock);
    Ok(run_dir)
}

/// Steps between the autograd engine's finiteness checks (each reads one number to the host).
const DIVERGENCE_CHECK: usize = 50;

/// Writes the checkpoint: weights, then moments, then state.json last, which names the epoch
/// (and, for an interruption, how far into the next one). Each file is replaced atomically.
fn checkpoint(
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
    run::save_tensors(&run_dir.join(run::MODEL_FILE), &params)?;
    run::save_tensors(&run_dir.join(run::OPTIM_FILE), &engine.optimizer_state()?)?;
    let state = State {
        format: 1,
        epoch,
        step: engine.steps(),
        rows: ds.train.rows,
        cols: ds.train.cols,
        partial,
        model: Some(cfg.model.clone()),
    };
    run::write_atomic(
        &run_dir.join(run::STATE_FILE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    Ok(state)
}

/// The draws one batch of `b` images takes from the epoch's stream, discarded: the same count
/// and order as `Engine::step`.
fn skip_draws(b: usize, dynamic: bool, dim: usize, noise_per_image: usize, rng: &mut StdRng) {
    if dynamic {
        for _ in 0..b * dim {
            let _: f32 = rng.random();
        }
    }
    for _ in 0..b * noise_per_image {
        let _: f32 = StandardNormal.sample(rng);
    }
}

fn diverged(
    run_dir: &Path,
    epoch: usize,
    batch: usize,
    per_epoch: usize,
    cfg: &Config,
) -> anyhow::Error {
    anyhow::anyhow!(
        "training diverged at epoch {epoch}, batch {batch}/{per_epoch}: the loss is not finite. \
         The last good checkpoint in {} is untouched; try a lower learning rate \
         (--set train.lr={:e}) or KL warm-up (--set train.kl_warmup_epochs=5) and \
         `vae train --resume --run {}`",
        run_dir.display(),
        cfg.train.lr / 10.0,
        run_dir.display()
    )
}

/// Ends the process after an interruption's checkpoint, releasing the lock first.
fn stop_interrupted(
    lock: run::Lock,
    run_dir: &Path,
    epoch: usize,
    batch: usize,
    per_epoch: usize,
) -> ! {
    drop(lock);
    eprintln!(
        "interrupted: checkpoint saved at epoch {epoch}, batch {batch}/{per_epoch} in {}; \
         continue with `vae train --resume --run {}`",
        run_dir.display(),
        run_dir.display()
    );
    std::process::exit(130)
}

/// This process's peak resident set (VmHWM in /proc/self/status), Linux only.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
