//! The training loop: minibatch SGD on the -ELBO with the reparameterization gradient (Kingma &
//! Welling 2013, Algorithm 1, one sample of z per image, M = batch size), optimized with Adam.
//! As in pytorch/examples `vae/main.py`, the loss is the batch's summed -ELBO; the logged figures
//! are per example.
//!
//! Every random draw (init, shuffles, eps, binarization) comes from one `StdRng` seeded with
//! `seed`, in a fixed order, so a seed and a device give one sequence of numbers.

use crate::config::{Binarize, Config};
use crate::data;
use crate::device;
use crate::eval::{self, Totals};
use crate::model::{self, Vae};
use crate::optim::{Adam, AdamConfig};
use crate::run::{self, State};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
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

/// The model with its optimizer: what one training step needs.
pub struct Trainer {
    pub model: Vae,
    pub varmap: VarMap,
    pub adam: Adam,
}

impl Trainer {
    /// Fresh parameters from `rng` (PyTorch's `nn.Linear` init) and zero Adam moments.
    pub fn new(cfg: &Config, dim: usize, rng: &mut StdRng, dev: &Device) -> Result<Self> {
        let params = model::init_params(&cfg.model, dim, rng, dev)?;
        let varmap = model::varmap_from(params)?;
        let model = Vae::new(&cfg.model, dim, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
        let adam = Adam::new(
            &varmap,
            AdamConfig {
                lr: cfg.train.lr,
                beta1: cfg.train.beta1,
                beta2: cfg.train.beta2,
                eps: cfg.train.adam_eps,
                weight_decay: cfg.train.weight_decay,
            },
        )?;
        Ok(Trainer { model, varmap, adam })
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

/// `vae train`: trains `cfg` into a new run directory and returns it.
pub fn train(cfg: &Config, opts: &Options) -> Result<PathBuf> {
    let dev = device::open(&cfg.device).context("key `device` / --device")?;
    let ds = data::load_dir(&cfg.data.dir, cfg.data.limit, cfg.data.test_limit)?;
    let dim = ds.train.dim();
    let mut rng = StdRng::seed_from_u64(cfg.seed);

    // Parameters first, so a seed's init does not depend on the data options.
    let mut tr = Trainer::new(cfg, dim, &mut rng, &dev)?;

    let mut train_px = ds.train.pixels_f32();
    if cfg.data.binarize == Binarize::Static {
        data::binarize_in_place(&mut train_px, &mut rng);
    }
    let n = ds.train.n;
    // (N, D) on the device for the whole run; batches are gathered there by index.
    let x_train = Tensor::from_vec(train_px, (n, dim), &dev)?;
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
        "run {}  device {}  data {} ({} train, {} test images of {}x{})",
        run_dir.display(),
        device::describe(&dev),
        ds.dir.display(),
        n,
        ds.test.n,
        ds.train.rows,
        ds.train.cols
    );

    let mut csv = String::from(CSV_HEADER);
    let row0 = EpochRow {
        epoch: 0,
        step: 0,
        train: None,
        test: eval::evaluate(&tr.model, &x_test, cfg.train.eval_batch_size, cfg.seed)?,
        seconds: 0.0,
    };
    println!("{}", row0.line(cfg.train.epochs));
    csv.push_str(&row0.csv());

    let bs = cfg.train.batch_size;
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
        // Running sums of [recon, kl] over the epoch, kept on the device: no host sync per step.
        let mut acc = Tensor::zeros(2, DType::F32, &dev)?;
        for chunk in order.chunks(bs) {
            let b = chunk.len();
            let idx = Tensor::from_slice(chunk, b, &dev)?;
            let mut x = x_train.index_select(&idx, 0)?;
            if cfg.data.binarize == Binarize::Dynamic {
                let u: Vec<f32> = (0..b * dim).map(|_| rng.random::<f32>()).collect();
                x = Tensor::from_vec(u, (b, dim), &dev)?
                    .lt(&x)?
                    .to_dtype(DType::F32)?;
            }
            let eps = eval::normal(&mut rng, b, cfg.model.latent, &dev)?;
            acc = (acc + tr.step(&x, &eps)?)?;
            bar.inc(1);
        }
        let sums = acc.to_vec1::<f32>()?;
        let seconds = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let train = Totals {
            n,
            recon: sums[0] as f64 / n as f64,
            kl: sums[1] as f64 / n as f64,
        };
        let test = eval::evaluate(&tr.model, &x_test, cfg.train.eval_batch_size, cfg.seed)?;
        let row = EpochRow {
            epoch,
            step: tr.adam.step,
            train: Some(train),
            test,
            seconds,
        };
        println!("{}", row.line(cfg.train.epochs));
        csv.push_str(&row.csv());

        // The checkpoint: weights, then moments, then state.json last, which names the epoch.
        run::save_tensors(&run_dir.join(run::MODEL_FILE), &model::snapshot(&tr.varmap)?)?;
        run::save_tensors(&run_dir.join(run::OPTIM_FILE), &tr.adam.state())?;
        let state = State {
            format: 1,
            epoch,
            step: tr.adam.step,
            rows: ds.train.rows,
            cols: ds.train.cols,
        };
        run::write_atomic(
            &run_dir.join(run::STATE_FILE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        run::write_atomic(&run_dir.join(run::METRICS_FILE), csv.as_bytes())?;
    }
    println!(
        "saved {}  (vae eval --run {} for the full test set)",
        run_dir.display(),
        run_dir.display()
    );
    Ok(run_dir)
}
