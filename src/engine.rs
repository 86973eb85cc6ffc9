//! The two implementations of a training step behind one interface: the fused CPU step
//! (`step::Fused`, hand-written forward and backward) and candle's autograd (any device, the
//! oracle), with the draws each step takes from the epoch's random stream in one fixed order
//! (binarization uniforms, then eps), whichever engine runs it.

use crate::config::{Config, EngineKind};
use crate::data;
use crate::model::{self, Objective, Vae};
use crate::optim::{Adam, AdamConfig};
use crate::step::Fused;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::HashMap;

/// The model with its optimizer, on candle's autograd: any device, any config.
pub struct Trainer {
    pub model: Vae,
    pub varmap: VarMap,
    pub adam: Adam,
    /// `train.ema`: the decay and each variable's moving average, updated after every step.
    pub ema: Option<(f64, HashMap<String, Tensor>)>,
}

pub fn adam_config(cfg: &Config) -> AdamConfig {
    AdamConfig {
        normalize_grad: cfg.train.normalize_grad,
        lr: cfg.train.lr,
        beta1: cfg.train.beta1,
        beta2: cfg.train.beta2,
        eps: cfg.train.adam_eps,
        weight_decay: cfg.train.weight_decay,
        adamax: cfg.train.optimizer == crate::config::Optimizer::Adamax,
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
            ema: None,
        })
    }

    /// One Adam step on the batch's objective (the summed -ELBO for the reference recipe);
    /// `x` (B, D), `eps` (B S, Z). Returns the batch's summed true -ELBO terms [recon, kl] as a
    /// (2,) tensor left on the device.
    pub fn step(&mut self, x: &Tensor, eps: &Tensor, o: &Objective) -> Result<Tensor> {
        let (loss, rs, ks) = self.model.training_loss(x, eps, o)?;
        let grads = loss.backward()?;
        self.adam.step(&grads)?;
        if let Some((d, e)) = self.ema.as_mut() {
            for (name, w) in model::snapshot(&self.varmap)? {
                if let Some(ev) = e.get_mut(&name) {
                    *ev = ((&*ev * *d)? + (w * (1.0 - *d))?)?;
                }
            }
        }
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
                    eps: model::normal(rng, order.len() * noise_rows_per_image, latent, dev)?,
                    at: 0,
                });
            }
        }
        Ok(())
    }

    /// The learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Engine::Fused { f, .. } => f.set_lr(lr),
            Engine::Autograd { t, .. } => t.adam.set_lr(lr),
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
    pub fn step(
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
                let eps = model::normal(rng, b * o.samples, latent, &dev)?;
                Ok(Sums::Device(t.step(&xb, &eps, o)?))
            }
        }
    }

    /// The -ELBO terms summed over the images `x` (n, D), one sample each from `eps`, on the
    /// fused step's forward; `None` for the autograd engine, which evaluates the candle model.
    pub fn evaluate_fused(&mut self, x: &[f32], eps: &[f32]) -> Option<Result<(f64, f64)>> {
        match self {
            Engine::Fused { f, .. } => Some(f.evaluate(x, eps)),
            Engine::Autograd { .. } => None,
        }
    }

    /// The parameters in checkpoint layout.
    pub fn params(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Engine::Fused { f, .. } => f.params(),
            Engine::Autograd { t, .. } => Ok(model::snapshot(&t.varmap)?),
        }
    }

    /// Keeps a moving average of the weights with `decay` from now on (`train.ema`), started at
    /// `start` (a resumed run's average, checkpoint layout) or at the current weights.
    pub fn set_ema(&mut self, decay: f64, start: Option<&HashMap<String, Tensor>>) -> Result<()> {
        match self {
            Engine::Fused { f, .. } => f.set_ema(decay, start),
            Engine::Autograd { t, .. } => {
                let now = model::snapshot(&t.varmap)?;
                let mut e = HashMap::new();
                for (name, w) in now {
                    let v = match start.and_then(|s| s.get(&name)) {
                        Some(s) => s.to_device(w.device())?,
                        None => w.copy()?,
                    };
                    e.insert(name, v);
                }
                t.ema = Some((decay, e));
                Ok(())
            }
        }
    }

    /// The moving average of the weights, checkpoint layout, when one is kept.
    pub fn ema_params(&self) -> Result<Option<HashMap<String, Tensor>>> {
        match self {
            Engine::Fused { f, .. } => f.ema_params(),
            Engine::Autograd { t, .. } => Ok(t.ema.as_ref().map(|(_, e)| e.clone())),
        }
    }

    /// The weights evaluations use: the moving average when one is kept, else the weights.
    pub fn eval_params(&self) -> Result<HashMap<String, Tensor>> {
        match self.ema_params()? {
            Some(e) => Ok(e),
            None => self.params(),
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
    /// A candle model of the current parameters on `dev`, with the tensors it was built from.
    pub fn eval_model(
        &self,
        cfg: &Config,
        dim: usize,
        dev: &Device,
    ) -> Result<(Vae, HashMap<String, Tensor>)> {
        let params = self.eval_params()?;
        let params = params
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(dev)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(params.clone(), DType::F32, dev);
        Ok((Vae::new(&cfg.model, dim, vb)?, params))
    }
}

/// A batch's summed [recon, kl]: on the host, or left on the device to avoid a sync.
pub enum Sums {
    Host(f64, f64),
    Device(Tensor),
}

/// The draws one batch of `b` images takes from the epoch's stream, discarded: the same count
/// and order as `Engine::step`.
pub fn skip_draws(b: usize, dynamic: bool, dim: usize, noise_per_image: usize, rng: &mut StdRng) {
    if dynamic {
        for _ in 0..b * dim {
            let _: f32 = rng.random();
        }
    }
    for _ in 0..b * noise_per_image {
        let _: f32 = StandardNormal.sample(rng);
    }
}
