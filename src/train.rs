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
use crate::fused::{self, Fused};
use crate::model::{self, Vae};
use crate::optim::{Adam, AdamConfig};
use crate::pictures;
use crate::run::{self, State};
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

    /// One Adam step on the batch's summed -ELBO; `x` (B, D), `eps` (B, Z). Returns the batch's
    /// summed [recon, kl] as a (2,) tensor left on the device.
    pub fn step(&mut self, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (recon, kl) = self.model.neg_elbo_terms(x, eps)?;
        let (rs, ks) = (recon.sum_all()?, kl.sum_all()?);
        let grads = (&rs + &ks)?.backward()?;
        self.adam.step(&grads)?;
        Ok(Tensor::stack(&[rs.detach(), ks.detach()], 0)?)
    }
}

/// Which implementation of the step a run uses (`train.engine`).
#[allow(clippy::large_enum_variant)] // one per run
pub enum Engine {
    /// The hand-written CPU step of `fused`, with the training set on the host.
    Fused { f: Box<Fused>, pixels: Vec<f32> },
    /// Candle autograd, with the training set as one (N, D) tensor on the device.
    Autograd { t: Trainer, x: Tensor },
}

impl Engine {
    pub fn new(
        cfg: &Config,
        dim: usize,
        params: HashMap<String, Tensor>,
        pixels: Vec<f32>,
        dev: &Device,
    ) -> Result<Self> {
        let cpu = matches!(dev, Device::Cpu);
        let fused = match cfg.train.engine {
            EngineKind::Auto => cpu && fused::supports(&cfg.model),
            EngineKind::Fused => {
                if !cpu {
                    bail!("key `train.engine`: \"fused\" runs on the CPU only; use \"auto\" or --device cpu");
                }
                if !fused::supports(&cfg.model) {
                    bail!("key `train.engine`: \"fused\" does not implement model.activation = gelu; use \"auto\"");
                }
                true
            }
            EngineKind::Autograd => false,
        };
        if fused {
            let f = Fused::new(
                &cfg.model,
                dim,
                &params,
                adam_config(cfg),
                cfg.train.batch_size,
            )?;
            Ok(Engine::Fused {
                f: Box::new(f),
                pixels,
            })
        } else {
            let n = pixels.len() / dim;
            let x = Tensor::from_vec(pixels, (n, dim), dev)?;
            Ok(Engine::Autograd {
                t: Trainer::new(cfg, dim, params, dev)?,
                x,
            })
        }
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
        rng: &mut StdRng,
    ) -> Result<Sums> {
        let b = idx.len();
        match self {
            Engine::Fused { f, pixels } => {
                let x = f.x_mut(b);
                let dim = x.len() / b;
                for (row, &i) in x.chunks_exact_mut(dim).zip(idx) {
                    let i = i as usize;
                    row.copy_from_slice(&pixels[i * dim..(i + 1) * dim]);
                }
                if dynamic {
                    for v in x.iter_mut() {
                        *v = if rng.random::<f32>() < *v { 1.0 } else { 0.0 };
                    }
                }
                for e in f.eps_mut(b) {
                    *e = StandardNormal.sample(rng);
                }
                let (r, k) = f.step(b)?;
                Ok(Sums::Host(r, k))
            }
            Engine::Autograd { t, x } => {
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
                let eps = eval::normal(rng, b, latent, &dev)?;
                Ok(Sums::Device(t.step(&xb, &eps)?))
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

/// `vae train`: trains `cfg` into a new run directory and returns it.
pub fn train(cfg: &Config, opts: &Options) -> Result<PathBuf> {
    let dev = device::open(&cfg.device).context("key `device` / --device")?;
    let ds = data::load_dir(&cfg.data.dir, cfg.data.limit, cfg.data.test_limit)?;
    let dim = ds.train.dim();
    let n = ds.train.n;
    let mut rng = StdRng::seed_from_u64(cfg.seed);

    // Parameters first, so a seed's init does not depend on the data options.
    let params = model::init_params(&cfg.model, dim, &mut rng, &dev)?;
    let mut train_px = ds.train.pixels_f32();
    if cfg.data.binarize == Binarize::Static {
        data::binarize_in_place(&mut train_px, &mut rng);
    }
    let mut engine = Engine::new(cfg, dim, params, train_px, &dev)?;
    let x_test = eval::test_tensor(cfg, &ds.test, &dev)?;

    let run_dir = run::create(cfg, opts.run.as_deref())?;
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
    let mut csv = String::from(CSV_HEADER);
    let row0 = EpochRow {
        epoch: 0,
        step: 0,
        train: None,
        test: evaluate(&engine)?.0,
        seconds: 0.0,
    };
    println!("{}", row0.line(cfg.train.epochs));
    csv.push_str(&row0.csv());

    let bs = cfg.train.batch_size;
    let dynamic = cfg.data.binarize == Binarize::Dynamic;
    let steps_per_epoch = n.div_ceil(bs);
    let show_bar = !opts.quiet && std::io::stderr().is_terminal();
    let mut order: Vec<u32> = (0..n as u32).collect();
    for epoch in 1..=cfg.train.epochs {
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
        order.shuffle(&mut rng);
        // Running sums of [recon, kl]; the autograd engine keeps them on the device (no host
        // sync per step).
        let (mut host, mut on_dev) = ((0f64, 0f64), None::<Tensor>);
        for chunk in order.chunks(bs) {
            match engine.step(chunk, dynamic, cfg.model.latent, &mut rng)? {
                Sums::Host(r, k) => host = (host.0 + r, host.1 + k),
                Sums::Device(t) => {
                    on_dev = Some(match on_dev {
                        Some(a) => (a + t)?,
                        None => t,
                    })
                }
            }
            bar.inc(1);
        }
        if let Some(t) = on_dev {
            let v = t.to_vec1::<f32>()?;
            host = (host.0 + v[0] as f64, host.1 + v[1] as f64);
        }
        let seconds = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
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

        // The checkpoint: weights, then moments, then state.json last, which names the epoch.
        run::save_tensors(&run_dir.join(run::MODEL_FILE), &engine.params()?)?;
        run::save_tensors(&run_dir.join(run::OPTIM_FILE), &engine.optimizer_state()?)?;
        let state = State {
            format: 1,
            epoch,
            step: engine.steps(),
            rows: ds.train.rows,
            cols: ds.train.cols,
        };
        run::write_atomic(
            &run_dir.join(run::STATE_FILE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        run::write_atomic(&run_dir.join(run::METRICS_FILE), csv.as_bytes())?;
        let l = Loaded {
            dir: run_dir.clone(),
            cfg: cfg.clone(),
            state,
            model,
            dev: dev.clone(),
        };
        pictures::epoch_pictures(&l, &run_dir, epoch, &picture_z, &test_px, &csv)?;
    }
    println!(
        "saved {}  (vae eval --run {} for the full test set)",
        run_dir.display(),
        run_dir.display()
    );
    Ok(run_dir)
}
