//! The MLP variational autoencoder of Kingma & Welling (2013), Appendix C: an encoder giving
//! mu and log sigma^2 of a diagonal Gaussian q(z|x), the reparameterization z = mu + sigma * eps
//! (section 2.4), and a decoder giving Bernoulli logits or a Gaussian mean for p(x|z).
//!
//! Options beyond the textbook: a chain of planar flows after q(z|x) (Rezende & Mohamed 2015,
//! eq. 10-13), S samples of z per image (the Monte-Carlo ELBO), the importance-weighted bound
//! (Burda et al. 2015, eq. 8), and `kind = "ae"`: the same networks with z = mu and no KL.
//!
//! Tensor names (the checkpoint format; `Linear` weights are (out, in) as in PyTorch):
//! `encoder.hidden.{i}.{weight,bias}`, `encoder.mu.*`, `encoder.logvar.*` (not for an AE),
//! `decoder.hidden.{i}.*`, `decoder.out.*`, `decoder.logvar` (D,) for a learned Gaussian;
//! with flows, `encoder.flow.*` (amortized: K (2Z + 1) outputs) or `flow.{k}.{u,w,b}` (global).

pub mod iaf;

use crate::config::{
    Activation, Arch, DecoderKind, FlowParams, ModelConfig, ModelKind, Prior, Wiring,
};
use crate::convnet::{activate, ConvDecoder, ConvEncoder};
use crate::loss::{self, MIN_LOGVAR};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::Rng;
use std::collections::HashMap;

pub struct Mlp {
    layers: Vec<Linear>,
    /// With `activation = "gated"`: each layer's gate, `<layer>.gate`.
    gates: Vec<Linear>,
    act: Activation,
}

impl Mlp {
    fn new(dims: &[usize], act: Activation, vb: VarBuilder) -> Result<Self> {
        Self::new_at(dims, act, vb, 0)
    }

    /// The layers named `first`, `first + 1`, ... under `vb` (a network continued after others).
    fn new_at(dims: &[usize], act: Activation, vb: VarBuilder, first: usize) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(first + i)))
            .collect::<Result<Vec<_>>>()?;
        let gates = if act == Activation::Gated {
            dims.windows(2)
                .enumerate()
                .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(first + i).pp("gate")))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![]
        };
        Ok(Mlp { layers, gates, act })
    }

    /// Every layer followed by the activation: (B, dims[0]) -> (B, dims[last]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = match self.gates.get(i) {
                Some(g) => (l.forward(&h)? * candle_nn::ops::sigmoid(&g.forward(&h)?)?)?,
                None => activate(&l.forward(&h)?, self.act)?,
            };
        }
        Ok(h)
    }
}

pub struct Vae {
    pub cfg: ModelConfig,
    pub input_dim: usize,
    enc: Mlp,
    enc_mu: Linear,
    /// None for an autoencoder.
    enc_logvar: Option<Linear>,
    flows: Flows,
    dec: Mlp,
    /// The dense output layer (None for a conv network, whose last transposed convolution is
    /// `decoder.out`).
    dec_out: Option<Linear>,
    /// `arch = "conv"`: the convolutions before `enc` and the transposed ones after `dec`.
    conv: Option<(ConvEncoder, ConvDecoder)>,
    /// Gaussian decoder only: learned (D,) or fixed (1,) log-variance.
    dec_logvar: Option<Tensor>,
    /// The prior's parameters, if it has any.
    prior: PriorParams,
    /// A second stochastic layer, if the model has one.
    upper: Option<Second>,
}

/// The second stochastic layer's networks, by wiring.
#[allow(clippy::large_enum_variant)] // one per model, never in a collection
enum Second {
    Chain(Chain),
    Hvae(Hvae),
}

/// Tomczak & Welling's two-level VAE (2018; jmtomczak/vae_vampprior, models/HVAE_2level.py):
/// q(z2|x) q(z1|x, z2), p(z2) p(z1|z2) p(x|z1, z2). With `hidden = [[b, j...], [h...]]`:
/// q(z2|x) runs x through h, p(z1|z2) runs z2 through h reversed; q(z1|x, z2) concatenates a
/// layer of b units on x (the Vae's `enc`, `encoder.hidden.0`) and one on z2 (`encoder.z2.0`)
/// and runs the 2b through j (`encoder.hidden.1`, ...); p(x|z1, z2) mirrors it (the Vae's
/// `dec` on z1 and `decoder.z2.0` on z2, then `decoder.hidden.1`, ..., and `decoder.out`).
struct Hvae {
    /// q(z2|x).
    q2: GaussianNet,
    q1_z2: Mlp,
    q1_joint: Mlp,
    /// p(z1|z2).
    p1: GaussianNet,
    px_z2: Mlp,
    px_joint: Mlp,
}

/// Burda et al.'s second stochastic layer (2015, section 5; yburda/iwae): q(z2|z1) (z1 through
/// `upper.hidden`) and p(z1|z2) (z2 through them mirrored).
struct Chain {
    q: GaussianNet,
    p: GaussianNet,
}

/// A diagonal Gaussian whose mu and log sigma^2 are two linear heads on an MLP of its input,
/// named `<name>.hidden.i`, `<name>.mu`, `<name>.logvar`: a second stochastic layer's q(z2|.)
/// (`encoder2`) and p(z1|z2) (`decoder2`).
struct GaussianNet {
    mlp: Mlp,
    mu: Linear,
    logvar: Linear,
}

impl GaussianNet {
    /// `dims` from the input to the last hidden width, then heads of `out` dimensions.
    fn new(dims: &[usize], out: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        let top = dims[dims.len() - 1];
        Ok(GaussianNet {
            mlp: Mlp::new(dims, act, vb.pp("hidden"))?,
            mu: candle_nn::linear(top, out, vb.pp("mu"))?,
            logvar: candle_nn::linear(top, out, vb.pp("logvar"))?,
        })
    }

    /// mu, logvar (N, out) each, the log-variance clipped as configured (Tomczak & Welling clip
    /// every Gaussian head to [-6, 2]).
    fn forward(&self, x: &Tensor, cfg: &ModelConfig) -> Result<(Tensor, Tensor)> {
        let h = self.mlp.forward(x)?;
        let lv = clip_logvar(&self.logvar.forward(&h)?, cfg)?;
        Ok((self.mu.forward(&h)?, lv))
    }
}

/// log N(z; mu, exp(lv)) without its -1/2 ln 2 pi per dimension (both sides of the bound
/// carry the same count, so they cancel), summed over dimensions: (N, Z) -> (N,).
fn log_normal(z: &Tensor, mu: &Tensor, lv: &Tensor) -> Result<Tensor> {
    let q = ((z - mu)?.sqr()? * lv.neg()?.exp()?)?;
    (q + lv)?.sum(1)? * -0.5
}

/// The prior p(z) and its parameters.
enum PriorParams {
    /// N(0, I).
    Normal,
    /// A mixture's means and log-variances, (K, Z) each.
    Mog(Tensor, Tensor),
    /// The VampPrior's pseudo-inputs u (K, D): p(z) = (1/K) sum_k q(z | clip(u_k, 0, 1)).
    Vamp(Tensor),
}

/// Planar flow parameters: none, one head giving each image its flow, or one shared flow.
enum Flows {
    None,
    /// (B, K (2Z + 1)): per step, u (Z), w (Z), b (1).
    Amortized(Linear),
    /// Per step (u, w, b) of shapes (1, Z), (1, Z), (1, 1).
    Global(Vec<(Tensor, Tensor, Tensor)>),
}

/// Per-sample terms for S samples of z per image, rows image-major (b * S + s), each (B S,).
pub struct Samples {
    /// -log p(x|z_K) in nats.
    pub recon: Tensor,
    /// The KL term of the -ELBO: the analytic KL(q(z|x) || N(0, I)) (the same for an image's S
    /// samples) without flows; the Monte-Carlo log q(z_K|x) - log p(z_K) with them.
    pub kl: Tensor,
    /// log q(z_K|x) - log p(z_K), always Monte-Carlo: the importance weights' other half.
    pub log_q_over_p: Tensor,
    /// The analytic KL per image and dimension (B, Z), for free bits; None with flows or an AE.
    pub kl_dims: Option<Tensor>,
}

/// How a training step weighs its terms.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    /// Samples of z per image.
    pub samples: usize,
    /// Train on the importance-weighted bound over the samples instead of their mean ELBO.
    pub iwae: bool,
    /// Weight on the KL term (beta, times the warm-up ramp).
    pub kl_weight: f64,
    /// Free bits per latent dimension, nats (0 = off).
    pub free_bits: f64,
}

/// The output of one pass: decoder output (B, D), and q(z|x)'s mu, logvar (B, Z).
pub struct Forward {
    pub out: Tensor,
    pub mu: Tensor,
    pub logvar: Tensor,
}

impl Vae {
    pub fn new(cfg: &ModelConfig, input_dim: usize, vb: VarBuilder) -> Result<Self> {
        let hvae = !cfg.upper.is_empty() && cfg.wiring == Wiring::Hvae;
        // hvae: `enc` and `dec` are the branches on x and on z1 (their first width only); the
        // heads sit on the joint networks' top (`hvae_top`).
        let widths = if hvae {
            &cfg.hidden[..1]
        } else {
            &cfg.hidden[..]
        };
        // A conv network's dense layers read (and the decoder's write) the last convolution's
        // features.
        let feat = cfg
            .dense_input(input_dim)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let conv = match cfg.arch {
            Arch::Mlp => None,
            Arch::Conv => Some((
                ConvEncoder::new(cfg, vb.pp("encoder.conv"))?,
                ConvDecoder::new(cfg, vb.clone())?,
            )),
        };
        let enc_dims: Vec<usize> = std::iter::once(feat)
            .chain(widths.iter().copied())
            .collect();
        let top = if hvae {
            hvae_top(&cfg.hidden)
        } else {
            *enc_dims.last().unwrap_or(&input_dim)
        };
        let dec_first: Vec<usize> = cfg.hidden.iter().rev().copied().collect();
        let dec_widths = if hvae {
            &dec_first[..1]
        } else {
            &dec_first[..]
        };
        // A conv network's layer to the features ends `dec` (hvae: its joint network, below).
        let dec_dims: Vec<usize> = std::iter::once(cfg.latent)
            .chain(dec_widths.iter().copied())
            .chain(conv.as_ref().filter(|_| !hvae).map(|_| feat))
            .collect();
        let enc = Mlp::new(&enc_dims, cfg.activation, vb.pp("encoder.hidden"))?;
        let enc_mu = candle_nn::linear(top, cfg.latent, vb.pp("encoder.mu"))?;
        let enc_logvar = match cfg.kind {
            ModelKind::Vae => Some(candle_nn::linear(top, cfg.latent, vb.pp("encoder.logvar"))?),
            ModelKind::Ae => None,
        };
        let z = cfg.latent;
        let flows = match (cfg.flows, cfg.flow_params) {
            (0, _) => Flows::None,
            (k, FlowParams::Amortized) => Flows::Amortized(candle_nn::linear(
                top,
                k * (2 * z + 1),
                vb.pp("encoder.flow"),
            )?),
            (k, FlowParams::Global) => Flows::Global(
                (0..k)
                    .map(|i| {
                        let p = vb.pp(format!("flow.{i}"));
                        Ok((
                            p.get((1, z), "u")?,
                            p.get((1, z), "w")?,
                            p.get((1, 1), "b")?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let dec = Mlp::new(&dec_dims, cfg.activation, vb.pp("decoder.hidden"))?;
        // hvae: the decoder's joint network ends at the first width too (`hidden_top` mirrored).
        let dec_out = match conv {
            Some(_) => None,
            None => Some(candle_nn::linear(
                if hvae {
                    hvae_out(&cfg.hidden)
                } else {
                    cfg.hidden[0]
                },
                input_dim,
                vb.pp("decoder.out"),
            )?),
        };
        let dec_logvar = match (cfg.decoder, cfg.learn_sigma) {
            (DecoderKind::Bernoulli, _) => None,
            (DecoderKind::Gaussian, true) => Some(vb.get(input_dim, "decoder.logvar")?),
            (DecoderKind::Gaussian, false) => {
                Some(Tensor::new(&[(2.0 * cfg.sigma.ln()) as f32], vb.device())?)
            }
        };
        let upper = match cfg.upper.first() {
            None => None,
            Some(u) => {
                let act = cfg.activation;
                // q(z2|.) runs its input (x for hvae, z1 for the chain) up through the second
                // layer's widths; p(z1|z2) runs z2 down through them. A conv hvae's q(z2|x)
                // reads the convolutions' features, which q(z1|x, z2)'s branch on x shares.
                let q_in = if hvae { feat } else { cfg.latent };
                let up: Vec<usize> = std::iter::once(q_in)
                    .chain(u.hidden.iter().copied())
                    .collect();
                let down: Vec<usize> = std::iter::once(u.latent)
                    .chain(u.hidden.iter().rev().copied())
                    .collect();
                let q = GaussianNet::new(&up, u.latent, act, vb.pp("encoder2"))?;
                let p = GaussianNet::new(&down, cfg.latent, act, vb.pp("decoder2"))?;
                Some(if hvae {
                    let (b, h) = (cfg.hidden[0], &cfg.hidden);
                    let joint: Vec<usize> = std::iter::once(2 * b)
                        .chain(h[1..].iter().copied())
                        .collect();
                    let rev: Vec<usize> = h.iter().rev().copied().collect();
                    // A conv decoder: the joint network ends in a layer to the features that
                    // the transposed convolutions read (`decoder.hidden.{n}`, as one layer's).
                    let pjoint: Vec<usize> = std::iter::once(2 * rev[0])
                        .chain(rev[1..].iter().copied())
                        .chain(conv.as_ref().map(|_| feat))
                        .collect();
                    Second::Hvae(Hvae {
                        q2: q,
                        q1_z2: Mlp::new(&[u.latent, b], act, vb.pp("encoder.z2"))?,
                        q1_joint: Mlp::new_at(&joint, act, vb.pp("encoder.hidden"), 1)?,
                        p1: p,
                        px_z2: Mlp::new(&[u.latent, rev[0]], act, vb.pp("decoder.z2"))?,
                        px_joint: Mlp::new_at(&pjoint, act, vb.pp("decoder.hidden"), 1)?,
                    })
                } else {
                    Second::Chain(Chain { q, p })
                })
            }
        };
        let prior = match cfg.prior {
            Prior::Normal => PriorParams::Normal,
            Prior::Mog => {
                let k = (cfg.prior_components, cfg.top_latent());
                PriorParams::Mog(vb.get(k, "prior.means")?, vb.get(k, "prior.logvars")?)
            }
            Prior::Vamp => {
                PriorParams::Vamp(vb.get((cfg.prior_components, input_dim), "prior.pseudo_inputs")?)
            }
        };
        Ok(Vae {
            prior,
            upper,
            cfg: cfg.clone(),
            input_dim,
            enc,
            enc_mu,
            enc_logvar,
            flows,
            dec,
            dec_out,
            conv,
            dec_logvar,
        })
    }

    /// q(z|x): (B, D) -> mu, logvar, each (B, Z). An autoencoder's logvar is all zeros (unused).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.encode_full(x)?.0)
    }

    /// q(z|x) and, with amortized flows, the flow parameters (B, K (2Z + 1)).
    fn encode_full(&self, x: &Tensor) -> Result<((Tensor, Tensor), Option<Tensor>)> {
        let h = self.enc_forward(x)?;
        let mu = self.enc_mu.forward(&h)?;
        let lv = match &self.enc_logvar {
            Some(l) => clip_logvar(&l.forward(&h)?, &self.cfg)?,
            None => mu.zeros_like()?,
        };
        let fp = match &self.flows {
            Flows::Amortized(head) => Some(head.forward(&h)?),
            _ => None,
        };
        Ok(((mu, lv), fp))
    }

    /// Whether this is the autoencoder baseline (no sampling, no KL).
    pub fn is_ae(&self) -> bool {
        self.cfg.kind == ModelKind::Ae
    }

    /// S samples of z per image through the flows, decoded; `eps` is (B S, Z), image-major.
    pub fn samples(&self, x: &Tensor, eps: &Tensor, s: usize) -> Result<Samples> {
        match &self.upper {
            Some(Second::Chain(c)) => return self.samples_chain(c, x, eps, s),
            Some(Second::Hvae(h)) => return self.samples_hvae(h, x, eps, s),
            None => {}
        }
        let ((mu, lv), fp) = self.encode_full(x)?;
        let xr = repeat_rows(x, s)?;
        if self.is_ae() {
            let out = self.decode(&repeat_rows(&mu, s)?)?;
            let recon = self.recon_nll(&out, &xr)?;
            let zero = recon.zeros_like()?;
            return Ok(Samples {
                recon,
                kl: zero.clone(),
                log_q_over_p: zero,
                kl_dims: None,
            });
        }
        let (mur, lvr) = (repeat_rows(&mu, s)?, repeat_rows(&lv, s)?);
        let mut z = Self::reparameterize(&mur, &lvr, eps)?;
        let mut logdet: Option<Tensor> = None;
        let steps = self.flow_steps(fp.as_ref(), s)?;
        for (u, w, b) in &steps {
            let (z2, ld) = planar(&z, u, w, b)?;
            z = z2;
            logdet = Some(match logdet {
                Some(acc) => (acc + ld)?,
                None => ld,
            });
        }
        let out = self.decode(&z)?;
        let recon = self.recon_nll(&out, &xr)?;
        // log q(z_K|x) - log p(z_K) = 1/2 sum(z_K^2 - eps^2 - logvar) - sum_k log|det J_k|
        // (the ln 2 pi terms cancel).
        let mut lqp = match &self.prior {
            PriorParams::Normal => (((z.sqr()? - eps.sqr()?)? - &lvr)?.sum(1)? * 0.5)?,
            _ => (((eps.sqr()? + &lvr)?.sum(1)? * -0.5)? - self.log_prior(&z)?)?,
        };
        if let Some(ld) = &logdet {
            lqp = (lqp - ld)?;
        }
        let (kl, kl_dims) = if steps.is_empty() && matches!(self.prior, PriorParams::Normal) {
            let dims = ((((mu.sqr()? + lv.exp()?)? - &lv)? - 1.0)? * 0.5)?;
            (
                repeat_rows(&dims.sum_keepdim(1)?, s)?.squeeze(1)?,
                Some(dims),
            )
        } else {
            (lqp.clone(), None)
        };
        Ok(Samples {
            recon,
            kl,
            log_q_over_p: lqp,
            kl_dims,
        })
    }

    /// Two stochastic layers, chain wiring: `eps` (B S, Z1 + Z2) holds each sample's noise for
    /// z1 (its first Z1 columns) and z2. z1 = mu1(x) + sigma1(x) e1, z2 = mu2(z1) + sigma2(z1) e2
    /// (Burda et al. 2015 train on exactly these weights).
    fn samples_chain(&self, c: &Chain, x: &Tensor, eps: &Tensor, s: usize) -> Result<Samples> {
        let (e1, e2) = self.split_noise(eps)?;
        let (mu1, lv1) = self.encode(x)?;
        let q1 = (repeat_rows(&mu1, s)?, repeat_rows(&lv1, s)?);
        let z1 = Self::reparameterize(&q1.0, &q1.1, &e1)?;
        let q2 = c.q.forward(&z1, &self.cfg)?;
        let z2 = Self::reparameterize(&q2.0, &q2.1, &e2)?;
        let out = self.decode(&z1)?;
        self.two_layer_samples(&out, x, s, [(&e1, &q1.1), (&e2, &q2.1)], &z1, &z2, &c.p)
    }

    /// Two stochastic layers, hvae wiring: `eps` as for the chain (z1's noise first). z2 =
    /// mu2(x) + sigma2(x) e2, z1 = mu1(x, z2) + sigma1(x, z2) e1, as Tomczak & Welling's code.
    fn samples_hvae(&self, h: &Hvae, x: &Tensor, eps: &Tensor, s: usize) -> Result<Samples> {
        let (e1, e2) = self.split_noise(eps)?;
        let f = self.features(x)?;
        let (mu2, lv2) = h.q2.forward(&f, &self.cfg)?;
        let q2 = (repeat_rows(&mu2, s)?, repeat_rows(&lv2, s)?);
        let z2 = Self::reparameterize(&q2.0, &q2.1, &e2)?;
        let hx = repeat_rows(&self.enc.forward(&f)?, s)?;
        let q1 = self.hvae_q1(h, &hx, &z2)?;
        let z1 = Self::reparameterize(&q1.0, &q1.1, &e1)?;
        let out = self.hvae_px(h, &z1, &z2)?;
        self.two_layer_samples(&out, x, s, [(&e1, &q1.1), (&e2, &q2.1)], &z1, &z2, &h.p1)
    }

    /// A sample row's noise (B S, Z1 + Z2) as z1's (B S, Z1) and z2's (B S, Z2).
    fn split_noise(&self, eps: &Tensor) -> Result<(Tensor, Tensor)> {
        let z1d = self.cfg.latent;
        Ok((
            eps.narrow(1, 0, z1d)?,
            eps.narrow(1, z1d, eps.dim(1)? - z1d)?,
        ))
    }

    /// Both wirings' terms from the decoder's output `out` (B S, D), each layer's (noise,
    /// logvar) and the samples z1, z2: the KL term is the one-sample
    /// log q(z1|.) + log q(z2|.) - log p(z1|z2) - log p(z2).
    #[allow(clippy::too_many_arguments)]
    fn two_layer_samples(
        &self,
        out: &Tensor,
        x: &Tensor,
        s: usize,
        noise_logvar: [(&Tensor, &Tensor); 2],
        z1: &Tensor,
        z2: &Tensor,
        p1: &GaussianNet,
    ) -> Result<Samples> {
        let recon = self.recon_nll(out, &repeat_rows(x, s)?)?;
        // log q at z = mu + sigma e is -1/2 sum(lv + e^2): the quadratic is e^2 exactly.
        let [(e1, lv1), (e2, lv2)] = noise_logvar;
        let log_q = (((e1.sqr()? + lv1)?.sum(1)? + (e2.sqr()? + lv2)?.sum(1)?)? * -0.5)?;
        let (pmu1, plv1) = p1.forward(z2, &self.cfg)?;
        let log_p = (log_normal(z1, &pmu1, &plv1)? + self.log_prior(z2)?)?;
        let lqp = (log_q - log_p)?;
        Ok(Samples {
            recon,
            kl: lqp.clone(),
            log_q_over_p: lqp,
            kl_dims: None,
        })
    }

    /// q(z1|x, z2) from the x branch's output `hx` (N, b) and z2 (N, Z2): mu1, logvar1.
    fn hvae_q1(&self, h: &Hvae, hx: &Tensor, z2: &Tensor) -> Result<(Tensor, Tensor)> {
        let j = h
            .q1_joint
            .forward(&Tensor::cat(&[hx, &h.q1_z2.forward(z2)?], 1)?)?;
        let lv = match &self.enc_logvar {
            Some(l) => clip_logvar(&l.forward(&j)?, &self.cfg)?,
            None => {
                return Err(candle_core::Error::Msg(
                    "hvae needs q's log-variance".into(),
                ))
            }
        };
        Ok((self.enc_mu.forward(&j)?, lv))
    }

    /// p(x|z1, z2)'s raw output (N, D): the joint network's top through the output layer, or
    /// a conv network's features through its transposed convolutions.
    fn hvae_px(&self, h: &Hvae, z1: &Tensor, z2: &Tensor) -> Result<Tensor> {
        let j = Tensor::cat(&[&self.dec.forward(z1)?, &h.px_z2.forward(z2)?], 1)?;
        let top = h.px_joint.forward(&j)?;
        match &self.conv {
            Some((_, c)) => c.forward(&top),
            None => self.out_layer()?.forward(&top),
        }
    }

    /// The encoder's hidden layers on `x` (B, D): the convolutions first for a conv network.
    fn enc_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.enc.forward(&self.features(x)?)
    }

    /// What the encoder's dense layers read: a conv network's features (B, feat), else `x`.
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        match &self.conv {
            Some((c, _)) => c.forward(x),
            None => Ok(x.clone()),
        }
    }

    /// The dense output layer (an MLP's).
    fn out_layer(&self) -> Result<&Linear> {
        self.dec_out.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("a conv network has no dense output layer".into())
        })
    }

    /// q at the top stochastic layer: mu, logvar (B, Z_top); with two layers, q(z2|x) (chain:
    /// q(z2|z1) at z1's posterior mean).
    pub fn encode_top(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.upper {
            None => self.encode(x),
            Some(Second::Chain(c)) => c.q.forward(&self.encode(x)?.0, &self.cfg),
            Some(Second::Hvae(h)) => h.q2.forward(&self.features(x)?, &self.cfg),
        }
    }

    /// The decoder's raw output for a code `z` of the top stochastic layer (B, Z_top): with two
    /// layers, through p(z1|z2)'s mean. The pictures decode this way.
    pub fn decode_top(&self, z: &Tensor) -> Result<Tensor> {
        match &self.upper {
            None => self.decode(z),
            Some(Second::Chain(c)) => self.decode(&c.p.forward(z, &self.cfg)?.0),
            Some(Second::Hvae(h)) => self.hvae_px(h, &h.p1.forward(z, &self.cfg)?.0, z),
        }
    }

    /// Ancestral sampling below a code `z` of the top layer (B, Z_top): with two layers, z1 =
    /// mu + sigma e1 from p(z1|z2) for the noise `e1` (B, Z1), then the decoder's raw output;
    /// with one layer, the decoder's output at z.
    pub fn decode_ancestral(&self, z: &Tensor, e1: &Tensor) -> Result<Tensor> {
        match &self.upper {
            None => self.decode(z),
            Some(Second::Chain(c)) => {
                let (mu, lv) = c.p.forward(z, &self.cfg)?;
                self.decode(&Self::reparameterize(&mu, &lv, e1)?)
            }
            Some(Second::Hvae(h)) => {
                let (mu, lv) = h.p1.forward(z, &self.cfg)?;
                self.hvae_px(h, &Self::reparameterize(&mu, &lv, e1)?, z)
            }
        }
    }

    /// The decoder's raw output at the posterior means of every layer (B, D): a reconstruction.
    /// Two layers: the chain's z1 = mu1(x); the hvae's z2 = mu2(x), then z1 = mu1(x, z2).
    pub fn reconstruct(&self, x: &Tensor) -> Result<Tensor> {
        match &self.upper {
            None => self.decode(&self.code(x)?),
            Some(Second::Chain(_)) => self.decode(&self.encode(x)?.0),
            Some(Second::Hvae(h)) => {
                let f = self.features(x)?;
                let mu2 = h.q2.forward(&f, &self.cfg)?.0;
                let mu1 = self.hvae_q1(h, &self.enc.forward(&f)?, &mu2)?.0;
                self.hvae_px(h, &mu1, &mu2)
            }
        }
    }

    /// Each flow step's (u, w, b) for S samples per image: from the amortized head's output
    /// `fp` (B, K (2Z + 1)), repeated per sample, or the global parameters.
    fn flow_steps(&self, fp: Option<&Tensor>, s: usize) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
        let zd = self.cfg.latent;
        Ok(match &self.flows {
            Flows::None => vec![],
            Flows::Global(v) => v.clone(),
            Flows::Amortized(_) => {
                let fp = repeat_rows(
                    fp.ok_or_else(|| candle_core::Error::Msg("flow head".into()))?,
                    s,
                )?;
                let w = 2 * zd + 1;
                (0..self.cfg.flows)
                    .map(|k| {
                        Ok((
                            fp.narrow(1, k * w, zd)?,
                            fp.narrow(1, k * w + zd, zd)?,
                            fp.narrow(1, k * w + 2 * zd, 1)?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        })
    }

    /// log p(z) of a mixture prior without its -Z/2 ln 2 pi (which log q's cancels):
    /// logsumexp_k [-1/2 sum_j ((z_j - m_kj)^2 e^-lv_kj + lv_kj)] - ln K; z (N, Z) -> (N,).
    /// The standard normal's is -|z|^2 / 2.
    pub fn log_prior(&self, z: &Tensor) -> Result<Tensor> {
        let Some((m, lv)) = self.mixture()? else {
            return z.sqr()?.sum(1)? * -0.5;
        };
        let diff = z.unsqueeze(1)?.broadcast_sub(&m.unsqueeze(0)?)?; // (N, K, Z)
        let quad = diff
            .sqr()?
            .broadcast_mul(&lv.neg()?.exp()?.unsqueeze(0)?)?
            .sum(2)?;
        let comp = (quad.broadcast_add(&lv.sum(1)?.unsqueeze(0)?)? * -0.5)?; // (N, K)
        logsumexp_rows(&comp)? - (m.dim(0)? as f64).ln()
    }

    /// z from the prior for standard-normal `eps` (n, Z): eps itself, or m_k + sigma_k eps with
    /// component `pick[i]` for row i under a mixture.
    pub fn prior_z(&self, eps: &Tensor, pick: &[usize]) -> Result<Tensor> {
        let Some((m, lv)) = self.mixture()? else {
            return Ok(eps.clone());
        };
        let k = m.dim(0)?;
        let idx = Tensor::from_vec(
            pick.iter().map(|&p| (p % k) as u32).collect::<Vec<_>>(),
            pick.len(),
            eps.device(),
        )?;
        let (mk, lk) = (m.index_select(&idx, 0)?, lv.index_select(&idx, 0)?);
        mk + ((lk * 0.5)?.exp()? * eps)?
    }

    /// The VampPrior's pseudo-inputs, unclipped (tests).
    #[cfg(test)]
    fn var_pseudo(&self) -> Tensor {
        match &self.prior {
            PriorParams::Vamp(u) => u.clone(),
            _ => panic!("not a VampPrior"),
        }
    }

    /// Components of the prior (1 for the standard normal).
    pub fn prior_components(&self) -> usize {
        match &self.prior {
            PriorParams::Normal => 1,
            PriorParams::Mog(m, _) => m.dims()[0],
            PriorParams::Vamp(u) => u.dims()[0],
        }
    }

    /// A mixture prior's component means and log-variances, (K, Z) each; None for N(0, I).
    /// The VampPrior's are the encoder's q(z|u_k) at its pseudo-inputs clipped to [0, 1]
    /// (Tomczak & Welling 2018, eq. 9), recomputed from the current weights at every call so
    /// the gradient reaches both the pseudo-inputs and the encoder.
    pub fn mixture(&self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match &self.prior {
            PriorParams::Normal => None,
            PriorParams::Mog(m, lv) => Some((m.clone(), lv.clone())),
            PriorParams::Vamp(u) => Some(self.encode_top(&u.clamp(0f32, 1f32)?)?),
        })
    }

    /// The code the decoder sees for `x` (B, D) at the posterior's centre: mu, carried through
    /// the flows when there are any (z_K = f_K(...f_1(mu)), eps = 0), (B, Z). The pictures
    /// (reconstructions, interpolations, scatter) show this.
    pub fn code(&self, x: &Tensor) -> Result<Tensor> {
        // Two stochastic layers: the top layer's posterior mean (the chain's at z1's mean).
        if let Some(Second::Hvae(h)) = &self.upper {
            return Ok(h.q2.forward(&self.features(x)?, &self.cfg)?.0);
        }
        let ((mu, _), fp) = self.encode_full(x)?;
        let mut z = mu;
        for (u, w, b) in &self.flow_steps(fp.as_ref(), 1)? {
            z = planar(&z, u, w, b)?.0;
        }
        match &self.upper {
            Some(Second::Chain(c)) => Ok(c.q.forward(&z, &self.cfg)?.0),
            _ => Ok(z),
        }
    }

    /// The loss a training step minimizes, and the batch's summed true -ELBO terms [recon, kl]
    /// (per image, averaged over its samples; beta = 1, no free bits) for the log.
    pub fn training_loss(
        &self,
        x: &Tensor,
        eps: &Tensor,
        o: &Objective,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = o.samples;
        let t = self.samples(x, eps, s)?;
        let inv_s = 1.0 / s as f64;
        let recon_sum = (t.recon.sum_all()? * inv_s)?;
        let kl_sum = (t.kl.sum_all()? * inv_s)?;
        let loss = if o.iwae {
            // -sum_b [logsumexp_s log w_bs - ln S], log w = -(recon + log q/p).
            let b = x.dim(0)?;
            let logw = (t.recon + &t.log_q_over_p)?.neg()?.reshape((b, s))?;
            (logsumexp_rows(&logw)? - (s as f64).ln())?
                .sum_all()?
                .neg()?
        } else if o.free_bits > 0.0 {
            // Kingma et al. 2016: sum_j max(lambda, batch-mean KL_j), times the batch size so it
            // sits beside the batch-summed reconstruction.
            let dims = t
                .kl_dims
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("free bits need the analytic KL".into()))?;
            let b = x.dim(0)? as f64;
            let per_dim = (dims.mean(0)?.maximum(o.free_bits)?.sum_all()? * (b * o.kl_weight))?;
            (&recon_sum + per_dim)?
        } else {
            (&recon_sum + (&kl_sum * o.kl_weight)?)?
        };
        Ok((loss, recon_sum, kl_sum))
    }

    /// log p(x, z) - log q(z|x) for S samples per image, (B, S): the importance weights of
    /// Burda et al. (2015), whose logsumexp minus ln S bounds log p(x).
    pub fn log_weights(&self, x: &Tensor, eps: &Tensor, s: usize) -> Result<Tensor> {
        let t = self.samples(x, eps, s)?;
        // log p(z) - log q(z|x) above omits nothing: both ln 2 pi terms cancelled.
        (t.recon + t.log_q_over_p)?.neg()?.reshape((x.dim(0)?, s))
    }

    /// The decoder's raw output (B, Z) -> (B, D): Bernoulli logits, or the pre-sigmoid Gaussian mean.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match &self.conv {
            Some((_, c)) => c.forward(&self.dec.forward(z)?),
            None => self.out_layer()?.forward(&self.dec.forward(z)?),
        }
    }

    /// Pixel means of p(x|z) from `decode`'s output: sigmoid for both decoders, so means lie in [0, 1].
    pub fn mean(&self, out: &Tensor) -> Result<Tensor> {
        candle_nn::ops::sigmoid(out)
    }

    /// z = mu + exp(logvar / 2) * eps (Kingma & Welling eq. 10's reparameterization).
    pub fn reparameterize(mu: &Tensor, logvar: &Tensor, eps: &Tensor) -> Result<Tensor> {
        mu + (logvar * 0.5)?.exp()? * eps
    }

    /// One pass with the given noise `eps` (B, Z).
    pub fn forward(&self, x: &Tensor, eps: &Tensor) -> Result<Forward> {
        let (mu, logvar) = self.encode(x)?;
        let z = Self::reparameterize(&mu, &logvar, eps)?;
        Ok(Forward {
            out: self.decode(&z)?,
            mu,
            logvar,
        })
    }

    /// The Gaussian decoder's log-variance after the floor; None for Bernoulli.
    pub fn decoder_logvar(&self) -> Result<Option<Tensor>> {
        match &self.dec_logvar {
            None => Ok(None),
            Some(lv) if self.cfg.learn_sigma => Ok(Some(lv.maximum(MIN_LOGVAR)?)),
            Some(lv) => Ok(Some(lv.clone())),
        }
    }

    /// -log p(x|z) per example in nats: (B,).
    pub fn recon_nll(&self, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self.decoder_logvar()? {
            None => loss::bernoulli_nll(out, x),
            Some(lv) => loss::gaussian_nll(&self.mean(out)?, &lv, x),
        }
    }

    /// Reconstruction NLL and KL per example, each (B,); their sum is the -ELBO (one sample of
    /// z; with flows the KL is its one-sample estimate; an autoencoder's KL is 0).
    pub fn neg_elbo_terms(&self, x: &Tensor, eps: &Tensor) -> Result<(Tensor, Tensor)> {
        // The closed-form KL is the standard normal prior's only: a mixture prior (mog, vamp)
        // takes the one-sample log q(z|x) - log p(z) of `samples`, as training does.
        let normal = matches!(self.prior, PriorParams::Normal);
        if matches!(self.flows, Flows::None) && !self.is_ae() && normal && self.upper.is_none() {
            let f = self.forward(x, eps)?;
            return Ok((
                self.recon_nll(&f.out, x)?,
                loss::kl_std_normal(&f.mu, &f.logvar)?,
            ));
        }
        let t = self.samples(x, eps, 1)?;
        Ok((t.recon, t.kl))
    }
}

/// The hvae wiring's q(z1|x, z2) top width for `hidden[0] = [b, j...]`: the last joint width,
/// or the concatenated 2b without joint layers.
fn hvae_top(h: &[usize]) -> usize {
    if h.len() > 1 {
        h[h.len() - 1]
    } else {
        2 * h[0]
    }
}

/// The hvae wiring's p(x|z1, z2) top width: `hidden[0]` mirrored, so its first width (or 2b).
fn hvae_out(h: &[usize]) -> usize {
    if h.len() > 1 {
        h[0]
    } else {
        2 * h[0]
    }
}

/// The encoder's log-variance clipped to [model.logvar_min, model.logvar_max] (Tomczak & Welling's
/// hardtanh to [-6, 2]); no gradient flows where the clip holds. Unbounded by default.
fn clip_logvar(lv: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
    let mut lv = lv.clone();
    if let Some(lo) = cfg.logvar_min {
        lv = lv.maximum(lo)?;
    }
    if let Some(hi) = cfg.logvar_max {
        lv = lv.minimum(hi)?;
    }
    Ok(lv)
}

/// Sets the decoder's output bias to the logit of each pixel's mean over `pixels` (n, D),
/// clipped to [0.001, 0.999] (`model.output_bias = "data-mean"`).
pub fn data_mean_output_bias(
    params: &mut HashMap<String, Tensor>,
    pixels: &[u8],
    dim: usize,
) -> Result<()> {
    // A conv decoder's output bias is per channel (C,): the mean over the channel's pixels
    // (interleaved, pixel i in channel i mod C).
    let width = match params.get("decoder.out.bias") {
        Some(t) => t.dim(0)?,
        None => dim,
    };
    let per = if width < dim { dim / width } else { 1 };
    let n = (pixels.len() / dim).max(1) * per;
    let mut sum = vec![0f64; width];
    for row in pixels.chunks_exact(dim) {
        for (i, &p) in row.iter().enumerate() {
            sum[i % width] += crate::data::pixel(p) as f64;
        }
    }
    let dim = width;
    let bias: Vec<f32> = sum
        .iter()
        .map(|s| {
            let p = (s / n as f64).clamp(0.001, 0.999);
            (p / (1.0 - p)).ln() as f32
        })
        .collect();
    let dev = params
        .get("decoder.out.bias")
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    params.insert(
        "decoder.out.bias".into(),
        Tensor::from_vec(bias, dim, &dev)?,
    );
    Ok(())
}

/// The fan-in marker of the VampPrior's pseudo-inputs, which start N(0.05, 0.01^2).
const PSEUDO_INPUT_INIT: usize = usize::MAX - 1;

/// Every parameter's name, shape, and fan-in, in a fixed order.
pub fn param_specs(cfg: &ModelConfig, input_dim: usize) -> Vec<(String, Vec<usize>, usize)> {
    let mut v = Vec::new();
    let mut lin = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i], i));
        v.push((format!("{name}.bias"), vec![o], i));
    };
    let gated = cfg.activation == Activation::Gated;
    let hvae = !cfg.upper.is_empty() && cfg.wiring == Wiring::Hvae;
    let conv = cfg.arch == Arch::Conv;
    // A conv network's dense layers start (and the decoder's end) at its features.
    let feat = cfg.dense_input(input_dim).unwrap_or(input_dim);
    let mut prev = feat;
    for (i, &h) in cfg.hidden.iter().enumerate() {
        // hvae: layer 0 is the branch on x, the later ones the joint network on [x; z2] (2b).
        if hvae && i == 1 {
            prev = 2 * cfg.hidden[0];
        }
        lin(format!("encoder.hidden.{i}"), prev, h);
        if gated {
            lin(format!("encoder.hidden.{i}.gate"), prev, h);
        }
        prev = h;
    }
    if hvae {
        prev = hvae_top(&cfg.hidden);
    }
    lin("encoder.mu".into(), prev, cfg.latent);
    if cfg.kind == ModelKind::Vae {
        lin("encoder.logvar".into(), prev, cfg.latent);
    }
    if cfg.flows > 0 && cfg.flow_params == FlowParams::Amortized {
        lin(
            "encoder.flow".into(),
            prev,
            cfg.flows * (2 * cfg.latent + 1),
        );
    }
    let mut prev = cfg.latent;
    let last = *cfg.hidden.last().unwrap_or(&0);
    for (i, &h) in cfg.hidden.iter().rev().enumerate() {
        if hvae && i == 1 {
            prev = 2 * last;
        }
        lin(format!("decoder.hidden.{i}"), prev, h);
        if gated {
            lin(format!("decoder.hidden.{i}.gate"), prev, h);
        }
        prev = h;
    }
    if hvae {
        prev = hvae_out(&cfg.hidden);
    }
    if conv {
        let i = cfg.hidden.len();
        lin(format!("decoder.hidden.{i}"), prev, feat);
        if gated {
            lin(format!("decoder.hidden.{i}.gate"), prev, feat);
        }
    } else {
        lin("decoder.out".into(), prev, input_dim);
    }
    // The second stochastic layer: q(z2|z1) (chain) or q(z2|x) (hvae) up, p(z1|z2) down; hvae's
    // branches on z2 into q(z1|x, z2) and p(x|z1, z2).
    if let Some(u) = cfg.upper.first() {
        if hvae {
            for (net, w) in [("encoder.z2.0", cfg.hidden[0]), ("decoder.z2.0", last)] {
                lin(net.into(), u.latent, w);
                if gated {
                    lin(format!("{net}.gate"), u.latent, w);
                }
            }
        }
        let mut prev = if hvae { feat } else { cfg.latent };
        for (i, &h) in u.hidden.iter().enumerate() {
            lin(format!("encoder2.hidden.{i}"), prev, h);
            if gated {
                lin(format!("encoder2.hidden.{i}.gate"), prev, h);
            }
            prev = h;
        }
        lin("encoder2.mu".into(), prev, u.latent);
        lin("encoder2.logvar".into(), prev, u.latent);
        let mut prev = u.latent;
        for (i, &h) in u.hidden.iter().rev().enumerate() {
            lin(format!("decoder2.hidden.{i}"), prev, h);
            if gated {
                lin(format!("decoder2.hidden.{i}.gate"), prev, h);
            }
            prev = h;
        }
        lin("decoder2.mu".into(), prev, cfg.latent);
        lin("decoder2.logvar".into(), prev, cfg.latent);
    }
    if conv {
        v.extend(crate::convnet::param_specs(cfg));
    }
    if cfg.decoder == DecoderKind::Gaussian && cfg.learn_sigma {
        v.push(("decoder.logvar".into(), vec![input_dim], 0));
    }
    if cfg.prior == Prior::Vamp {
        v.push((
            "prior.pseudo_inputs".into(),
            vec![cfg.prior_components, input_dim],
            PSEUDO_INPUT_INIT,
        ));
    }
    if cfg.prior == Prior::Mog {
        let k = vec![cfg.prior_components, cfg.top_latent()];
        // Means start at U(-1, 1) (fan-in 1); log-variances at 0 (a flag fan-in of usize::MAX).
        v.push(("prior.means".into(), k.clone(), 1));
        v.push(("prior.logvars".into(), k, usize::MAX));
    }
    if cfg.flows > 0 && cfg.flow_params == FlowParams::Global {
        for k in 0..cfg.flows {
            v.push((format!("flow.{k}.u"), vec![1, cfg.latent], cfg.latent));
            v.push((format!("flow.{k}.w"), vec![1, cfg.latent], cfg.latent));
            v.push((format!("flow.{k}.b"), vec![1, 1], cfg.latent));
        }
    }
    v
}

/// Rows repeated `s` times in place, image-major: (B, n) -> (B s, n).
pub fn repeat_rows(t: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let (b, n) = t.dims2()?;
    t.unsqueeze(1)?
        .expand((b, s, n))?
        .contiguous()?
        .reshape((b * s, n))
}

/// log sum_j exp(x_ij) per row, stable: (B, S) -> (B,).
pub fn logsumexp_rows(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(1)?.detach();
    (x.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?.squeeze(1)
}

/// One planar flow step f(z) = z + u^ tanh(w.z + b) (Rezende & Mohamed 2015, eq. 10), with u^
/// = u + (m(w.u) - w.u) w / |w|^2, m(a) = -1 + softplus(a), so w.u^ >= -1 and f is invertible
/// (their Appendix A.1). z (N, Z); u, w (N, Z) or (1, Z); b (N, 1) or (1, 1). Returns f(z) and
/// log|det df/dz| = log|1 + (1 - tanh^2) w.u^| (eq. 12), (N,).
pub fn planar(z: &Tensor, u: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let wu = (w * u)?.sum_keepdim(1)?;
    let softplus = (wu.relu()? + (wu.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let m = (&softplus - 1.0)?;
    let w2 = w.sqr()?.sum_keepdim(1)?;
    let u_hat = (u + w.broadcast_mul(&((m.clone() - &wu)? / w2)?)?)?;
    let a = z.broadcast_mul(w)?.sum_keepdim(1)?.broadcast_add(b)?;
    let h = a.tanh()?;
    let z2 = z.broadcast_add(&u_hat.broadcast_mul(&h)?)?;
    // w.u^ = m by construction; 1 + (1 - h^2) m written as h^2 + (1 - h^2) softplus(w.u), which
    // does not cancel to 0 in f32 when w.u << 0 and h ~ 0 (step/planar.rs says more).
    let h2 = h.sqr()?;
    let det = (&h2 + (h2.neg()? + 1.0)?.broadcast_mul(&softplus)?)?;
    Ok((z2, det.abs()?.log()?.squeeze(1)?))
}

/// Fresh parameters from the host RNG: PyTorch's `nn.Linear` default, U(-1/sqrt(fan_in),
/// 1/sqrt(fan_in)) for weights and biases; a learned decoder log-variance starts at ln(sigma^2).
pub fn init_params(
    cfg: &ModelConfig,
    input_dim: usize,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    for (name, shape, fan_in) in param_specs(cfg, input_dim) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if fan_in == 0 {
            vec![(2.0 * cfg.sigma.ln()) as f32; n]
        } else if fan_in == usize::MAX {
            vec![0.0; n]
        } else if fan_in == PSEUDO_INPUT_INIT {
            // N(0.05, 0.01^2), as Tomczak & Welling's code starts MNIST's pseudo-inputs.
            (0..n)
                .map(|_| {
                    0.05 + 0.01
                        * rand_distr::Distribution::<f32>::sample(&rand_distr::StandardNormal, rng)
                })
                .collect()
        } else {
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        };
        m.insert(name, Tensor::from_vec(data, shape, dev)?);
    }
    Ok(m)
}

/// Checks a loaded tensor map against the config: every name present with its shape, nothing else.
pub fn check_params(
    map: &HashMap<String, Tensor>,
    cfg: &ModelConfig,
    input_dim: usize,
    file: &str,
) -> anyhow::Result<()> {
    let specs = param_specs(cfg, input_dim);
    for (name, shape, _) in &specs {
        let t = map.get(name).with_context(|| {
            format!("{file}: no tensor `{name}`; the checkpoint does not match its config.toml")
        })?;
        if t.dims() != shape.as_slice() {
            bail!(
                "{file}: tensor `{name}` has shape {:?}, the config wants {shape:?}; \
                 was config.toml edited after training?",
                t.dims()
            );
        }
        if t.dtype() != DType::F32 {
            bail!("{file}: tensor `{name}` is {:?}, expected F32", t.dtype());
        }
    }
    if let Some(extra) = map.keys().find(|k| !specs.iter().any(|(n, _, _)| n == *k)) {
        bail!("{file}: unexpected tensor `{extra}`; the checkpoint does not match its config.toml");
    }
    Ok(())
}

/// A VarMap holding `params` as trainable variables.
pub fn varmap_from(params: HashMap<String, Tensor>) -> Result<VarMap> {
    let vm = VarMap::new();
    {
        let mut data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        for (k, t) in params {
            data.insert(k, Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}

/// The model's current parameters, by name.
pub fn snapshot(vm: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

/// `n` standard normals from the host RNG as a (rows, cols) tensor on `dev`.
pub fn normal(
    rng: &mut rand::rngs::StdRng,
    rows: usize,
    cols: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng))
        .collect();
    Tensor::from_vec(v, (rows, cols), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn data_mean_bias_is_the_pixel_logit() {
        // Two 2-pixel images [0, 255] and [0, 51]: means [0, 0.6] -> logits [logit(0.001), ln 1.5].
        let cfg = ModelConfig {
            hidden: vec![3],
            latent: 2,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut p = init_params(&cfg, 2, &mut rng, &Device::Cpu).unwrap();
        data_mean_output_bias(&mut p, &[0, 255, 0, 51], 2).unwrap();
        let b = p["decoder.out.bias"].to_vec1::<f32>().unwrap();
        assert!(
            (b[0] + 6.906755).abs() < 1e-4 && (b[1] - 0.405465).abs() < 1e-5,
            "{b:?}"
        );
    }

    #[test]
    fn reparameterization_with_fixed_eps() {
        // mu = [1, -2], logvar = [0, ln 4] (sigma = [1, 2]), eps = [0.5, -1]:
        // z = [1 + 1*0.5, -2 + 2*(-1)] = [1.5, -4].
        let d = Device::Cpu;
        let mu = Tensor::new(&[[1f32, -2.0]], &d).unwrap();
        let lv = Tensor::new(&[[0f32, 4f32.ln()]], &d).unwrap();
        let eps = Tensor::new(&[[0.5f32, -1.0]], &d).unwrap();
        let z = Vae::reparameterize(&mu, &lv, &eps)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (z[0][0] - 1.5).abs() < 1e-6 && (z[0][1] + 4.0).abs() < 1e-6,
            "{z:?}"
        );
    }

    #[test]
    fn shapes_names_and_init_bounds() {
        let cfg = ModelConfig {
            hidden: vec![16, 8],
            latent: 3,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let p = init_params(&cfg, 10, &mut rng, &Device::Cpu).unwrap();
        check_params(&p, &cfg, 10, "x").unwrap();
        // encoder 10-16-8 (2 linears), heads 8->3 (2), decoder 3-8-16 (2), out 16->10 (1):
        // 7 linears, 14 tensors.
        assert_eq!(p.len(), 14);
        assert_eq!(p["encoder.hidden.0.weight"].dims(), &[16, 10]);
        assert_eq!(p["decoder.hidden.1.weight"].dims(), &[16, 8]);
        assert_eq!(p["decoder.out.weight"].dims(), &[10, 16]);
        let w = p["encoder.hidden.0.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = 1.0 / 10f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= b));
        let vm = varmap_from(p).unwrap();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let m = Vae::new(&cfg, 10, vb).unwrap();
        let x = Tensor::zeros((4, 10), DType::F32, &Device::Cpu).unwrap();
        let eps = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let (r, k) = m.neg_elbo_terms(&x, &eps).unwrap();
        assert_eq!((r.dims(), k.dims()), (&[4][..], &[4][..]));
    }

    #[test]
    fn mismatched_checkpoint_names_the_tensor() {
        let cfg = ModelConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let p = init_params(&cfg, 784, &mut rng, &Device::Cpu).unwrap();
        let other = ModelConfig {
            latent: 2,
            ..Default::default()
        };
        let e = check_params(&p, &other, 784, "m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("encoder.mu.weight") && e.contains("[20, 400]"),
            "{e}"
        );
    }

    #[test]
    fn planar_logdet_matches_finite_differences() {
        // f(z) = z + u^ tanh(w.z + b) in 3-D, in f64; the Jacobian by central differences
        // (h = 1e-6), its determinant by cofactors, against the analytic log|det|.
        let d = Device::Cpu;
        let u = Tensor::new(&[[0.7f64, -1.3, 0.4]], &d).unwrap();
        let w = Tensor::new(&[[-0.9f64, 0.5, 1.1]], &d).unwrap();
        let b = Tensor::new(&[[0.3f64]], &d).unwrap();
        for z0 in [[0.2f64, -0.4, 1.0], [-1.5, 0.8, 0.1], [0.0, 0.0, 0.0]] {
            let z = Tensor::new(&[z0], &d).unwrap();
            let (_, ld) = planar(&z, &u, &w, &b).unwrap();
            let analytic = ld.to_vec1::<f64>().unwrap()[0];
            let f = |v: [f64; 3]| -> Vec<f64> {
                let t = Tensor::new(&[v], &d).unwrap();
                planar(&t, &u, &w, &b).unwrap().0.to_vec2::<f64>().unwrap()[0].clone()
            };
            let h = 1e-6;
            let mut j = [[0f64; 3]; 3];
            for c in 0..3 {
                let (mut p, mut m) = (z0, z0);
                p[c] += h;
                m[c] -= h;
                let (fp, fm) = (f(p), f(m));
                for r in 0..3 {
                    j[r][c] = (fp[r] - fm[r]) / (2.0 * h);
                }
            }
            let det = j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
                - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
                + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]);
            assert!(
                (det.abs().ln() - analytic).abs() < 1e-6,
                "z = {z0:?}: {} vs {analytic}",
                det.abs().ln()
            );
        }
        // The invertibility fix: w.u = -2.1 here would fold the flow; w.u^ = m(-2.1) > -1.
        let u = Tensor::new(&[[2.0f64, 0.0, 0.0]], &d).unwrap();
        let w = Tensor::new(&[[-1.05f64, 0.0, 0.0]], &d).unwrap();
        let z = Tensor::new(&[[0.0f64, 0.0, 0.0]], &d).unwrap();
        let (_, ld) = planar(&z, &u, &w, &Tensor::new(&[[0.0f64]], &d).unwrap()).unwrap();
        assert!(ld.to_vec1::<f64>().unwrap()[0].is_finite());
    }

    fn model_of(cfg: &ModelConfig, dim: usize) -> Vae {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let p = init_params(cfg, dim, &mut rng, &Device::Cpu).unwrap();
        check_params(&p, cfg, dim, "x").unwrap();
        Vae::new(
            cfg,
            dim,
            VarBuilder::from_tensors(p, DType::F32, &Device::Cpu),
        )
        .unwrap()
    }

    /// A tensor as rows of f64.
    fn v2(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
    }

    /// One row (1, n) of f32 from f64 values.
    fn row_f32(v: &[f64]) -> Tensor {
        let v: Vec<f32> = v.iter().map(|&a| a as f32).collect();
        Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
    }

    /// log N(z; mu, diag e^lv), its ln 2 pi terms included.
    fn ln_n(z: &[f64], mu: &[f64], lv: &[f64]) -> f64 {
        z.iter()
            .zip(mu)
            .zip(lv)
            .map(|((z, m), l)| -0.5 * (l + (z - m).powi(2) / l.exp() + loss::LN_2PI))
            .sum()
    }

    /// log Bernoulli(x | sigmoid(logits)), summed over pixels.
    fn ln_bernoulli(logits: &[f64], x: &[f64]) -> f64 {
        logits
            .iter()
            .zip(x)
            .map(|(l, x)| x * l - (1.0 + l.exp()).ln())
            .sum()
    }

    /// Burda et al.'s two-layer chain, 6-4-3 up and 2 on top: `samples` against log p(x, z1, z2) -
    /// log q(z1, z2 | x) written out from the full Gaussian and Bernoulli densities, ln 2 pi
    /// terms included, at z1, z2 built here from the same noise.
    #[test]
    fn two_layer_chain_weights_are_the_joint_over_the_proposal() {
        let d = Device::Cpu;
        let cfg = ModelConfig {
            hidden: vec![5],
            latent: 3,
            upper: vec![crate::config::Upper {
                latent: 2,
                hidden: vec![4],
            }],
            activation: Activation::Tanh,
            ..Default::default()
        };
        let m = model_of(&cfg, 6);
        let Some(Second::Chain(c)) = m.upper.as_ref() else {
            panic!("a chain")
        };
        let x = Tensor::new(&[[0f32, 1., 1., 0., 1., 0.], [1., 0., 0., 1., 1., 1.]], &d).unwrap();
        let eps = Tensor::new(
            &[[0.3f32, -1.2, 0.5, 0.7, -0.1], [-0.4, 0.9, 1.1, -1.5, 0.2]],
            &d,
        )
        .unwrap();
        let t = m.samples(&x, &eps, 1).unwrap();
        let got = (t.recon + &t.log_q_over_p)
            .unwrap()
            .neg()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // The same by hand, row by row, in f64.
        let (mu1, lv1) = m.encode(&x).unwrap();
        let (mu1, lv1, e) = (v2(&mu1), v2(&lv1), v2(&eps));
        for r in 0..2 {
            let z1: Vec<f64> = (0..3)
                .map(|j| mu1[r][j] + (0.5 * lv1[r][j]).exp() * e[r][j])
                .collect();
            let z1t = row_f32(&z1);
            let (mu2, lv2) = c.q.forward(&z1t, &cfg).unwrap();
            let (mu2, lv2) = (v2(&mu2)[0].clone(), v2(&lv2)[0].clone());
            let z2: Vec<f64> = (0..2)
                .map(|j| mu2[j] + (0.5 * lv2[j]).exp() * e[r][3 + j])
                .collect();
            let z2t = row_f32(&z2);
            let (pm, pl) = c.p.forward(&z2t, &cfg).unwrap();
            let (pm, pl) = (v2(&pm)[0].clone(), v2(&pl)[0].clone());
            let log_px = ln_bernoulli(&v2(&m.decode(&z1t).unwrap())[0], &v2(&x)[r]);
            let log_p = log_px + ln_n(&z1, &pm, &pl) + ln_n(&z2, &[0.0; 2], &[0.0; 2]);
            let log_q = ln_n(&z1, &mu1[r], &lv1[r]) + ln_n(&z2, &mu2, &lv2);
            let want = log_p - log_q;
            assert!(
                (got[r] as f64 - want).abs() < 1e-3,
                "row {r}: {} against {want}",
                got[r]
            );
        }
        // The one-sample -ELBO is these weights' negative, and the KL term carries no closed form.
        let (recon, kl) = m.neg_elbo_terms(&x, &eps).unwrap();
        let nelbo = (recon + kl).unwrap().to_vec1::<f32>().unwrap();
        for r in 0..2 {
            assert!((nelbo[r] + got[r]).abs() < 1e-3);
        }
        // The pictures' space is the top layer: codes and decodes are 2-D.
        assert_eq!(m.code(&x).unwrap().dims(), &[2, 2]);
        let z = Tensor::zeros((3, 2), DType::F32, &d).unwrap();
        assert_eq!(m.decode_top(&z).unwrap().dims(), &[3, 6]);
    }

    /// Tomczak & Welling's two-level wiring, gated, with the log-variance clip: `samples`
    /// against the densities written out at z2 ~ q(z2|x), z1 ~ q(z1|x, z2) built here from the
    /// same noise; their VampPrior on z2 is the mixture of q(z2|u_k).
    #[test]
    fn hvae_weights_are_the_joint_over_the_proposal() {
        let d = Device::Cpu;
        for prior in [Prior::Normal, Prior::Vamp] {
            let cfg = ModelConfig {
                hidden: vec![5, 4],
                latent: 3,
                upper: vec![crate::config::Upper {
                    latent: 2,
                    hidden: vec![6, 5],
                }],
                wiring: Wiring::Hvae,
                activation: Activation::Gated,
                logvar_min: Some(-6.0),
                logvar_max: Some(2.0),
                prior,
                prior_components: 3,
                ..Default::default()
            };
            let m = model_of(&cfg, 6);
            let Some(Second::Hvae(h)) = m.upper.as_ref() else {
                panic!("hvae")
            };
            let x =
                Tensor::new(&[[0f32, 1., 1., 0., 1., 0.], [1., 0., 0., 1., 1., 1.]], &d).unwrap();
            let eps = Tensor::new(
                &[[0.3f32, -1.2, 0.5, 0.7, -0.1], [-0.4, 0.9, 1.1, -1.5, 0.2]],
                &d,
            )
            .unwrap();
            let t = m.samples(&x, &eps, 1).unwrap();
            let got = (t.recon + &t.log_q_over_p)
                .unwrap()
                .neg()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (e, xs) = (v2(&eps), v2(&x));
            let (mu2, lv2) = h.q2.forward(&x, &cfg).unwrap();
            let (mu2, lv2) = (v2(&mu2), v2(&lv2));
            for r in 0..2 {
                let z2: Vec<f64> = (0..2)
                    .map(|j| mu2[r][j] + (0.5 * lv2[r][j]).exp() * e[r][3 + j])
                    .collect();
                let xr = x.narrow(0, r, 1).unwrap();
                let hx = m.enc.forward(&xr).unwrap();
                let (mu1, lv1) = m.hvae_q1(h, &hx, &row_f32(&z2)).unwrap();
                let (mu1, lv1) = (v2(&mu1)[0].clone(), v2(&lv1)[0].clone());
                assert!(lv1.iter().all(|l| (-6.0..=2.0).contains(l)));
                let z1: Vec<f64> = (0..3)
                    .map(|j| mu1[j] + (0.5 * lv1[j]).exp() * e[r][j])
                    .collect();
                let (pm, pl) = h.p1.forward(&row_f32(&z2), &cfg).unwrap();
                let (pm, pl) = (v2(&pm)[0].clone(), v2(&pl)[0].clone());
                let logits = v2(&m.hvae_px(h, &row_f32(&z1), &row_f32(&z2)).unwrap());
                let log_px = ln_bernoulli(&logits[0], &xs[r]);
                // log p(z2): N(0, I), or (1/K) sum_k q(z2 | clip(u_k)) over the pseudo-inputs.
                let log_pz2 = match m.mixture().unwrap() {
                    None => ln_n(&z2, &[0.0; 2], &[0.0; 2]),
                    Some((cm, cl)) => {
                        let (cm, cl) = (v2(&cm), v2(&cl));
                        let comps: Vec<f64> = (0..3).map(|k| ln_n(&z2, &cm[k], &cl[k])).collect();
                        let mx = comps.iter().cloned().fold(f64::MIN, f64::max);
                        mx + comps.iter().map(|c| (c - mx).exp()).sum::<f64>().ln() - 3f64.ln()
                    }
                };
                let log_p = log_px + ln_n(&z1, &pm, &pl) + log_pz2;
                let log_q = ln_n(&z1, &mu1, &lv1) + ln_n(&z2, &mu2[r], &lv2[r]);
                let want = log_p - log_q;
                assert!(
                    (got[r] as f64 - want).abs() < 1e-3,
                    "{prior:?} row {r}: {} against {want}",
                    got[r]
                );
            }
            // The VampPrior's components are q(z2|u) at the clipped pseudo-inputs.
            if prior == Prior::Vamp {
                let u = m.var_pseudo().clamp(0f32, 1f32).unwrap();
                let (a, _) = h.q2.forward(&u, &cfg).unwrap();
                let (b, _) = m.mixture().unwrap().unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            }
            assert_eq!(m.code(&x).unwrap().dims(), &[2, 2]);
            let z = Tensor::zeros((3, 2), DType::F32, &d).unwrap();
            assert_eq!(m.decode_top(&z).unwrap().dims(), &[3, 6]);
        }
    }

    #[test]
    fn iw_bound_is_tighter_than_the_elbo_on_the_same_samples() {
        // Per image, log (1/S) sum_s w_s >= (1/S) sum_s log w_s (Jensen), for any samples.
        let d = Device::Cpu;
        for flows in [0, 2] {
            let cfg = ModelConfig {
                hidden: vec![8],
                latent: 3,
                flows,
                ..Default::default()
            };
            let m = model_of(&cfg, 6);
            let x = Tensor::new(
                &[
                    [0.0f32, 1.0, 0.5, 0.2, 0.9, 0.0],
                    [1.0, 1.0, 0.0, 0.0, 0.3, 0.7],
                ],
                &d,
            )
            .unwrap();
            let s = 16;
            let eps = Tensor::randn(0f32, 1.0, (2 * s, 3), &d).unwrap();
            let lw = m.log_weights(&x, &eps, s).unwrap();
            let iw = (logsumexp_rows(&lw).unwrap() - (s as f64).ln())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let elbo = lw.mean(1).unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in iw.iter().zip(&elbo) {
                assert!(a >= b, "flows {flows}: IW {a} < ELBO {b}");
            }
            // And the ELBO from `samples` is the mean log weight: -(recon + kl) averaged, since
            // E[log q/p] = KL; here on the same samples with flows they agree exactly.
            if flows > 0 {
                let t = m.samples(&x, &eps, s).unwrap();
                let neg = (t.recon + t.kl)
                    .unwrap()
                    .neg()
                    .unwrap()
                    .reshape((2, s))
                    .unwrap()
                    .mean(1)
                    .unwrap();
                let neg = neg.to_vec1::<f32>().unwrap();
                for (a, b) in neg.iter().zip(&elbo) {
                    assert!((a - b).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn code_runs_the_flows_on_the_posterior_mean() {
        // With eps = 0 the sample is z_K = f(mu): decoding `code` gives the same reconstruction
        // as one sample of `samples`, and with flows the code is not mu itself.
        for fp in [FlowParams::Amortized, FlowParams::Global] {
            let cfg = ModelConfig {
                hidden: vec![8],
                latent: 3,
                flows: 2,
                flow_params: fp,
                ..Default::default()
            };
            let m = model_of(&cfg, 6);
            let x = Tensor::new(&[[0.0f32, 1.0, 0.5, 0.2, 0.9, 0.0]], &Device::Cpu).unwrap();
            let eps = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
            let want = m
                .samples(&x, &eps, 1)
                .unwrap()
                .recon
                .to_vec1::<f32>()
                .unwrap();
            let code = m.code(&x).unwrap();
            let got = m
                .recon_nll(&m.decode(&code).unwrap(), &x)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                (got[0] - want[0]).abs() < 1e-4,
                "{fp:?}: {got:?} vs {want:?}"
            );
            let mu = m.encode(&x).unwrap().0;
            let moved = (code - mu).unwrap().abs().unwrap().sum_all().unwrap();
            assert!(
                moved.to_scalar::<f32>().unwrap() > 1e-4,
                "{fp:?}: the flows did nothing"
            );
        }
    }

    #[test]
    fn autoencoder_has_no_logvar_and_no_kl() {
        let cfg = ModelConfig {
            hidden: vec![8],
            latent: 3,
            kind: ModelKind::Ae,
            ..Default::default()
        };
        let names: Vec<String> = param_specs(&cfg, 6).into_iter().map(|s| s.0).collect();
        assert!(!names.iter().any(|n| n.contains("logvar")), "{names:?}");
        let m = model_of(&cfg, 6);
        let x = Tensor::new(&[[0.0f32, 1.0, 0.5, 0.2, 0.9, 0.0]], &Device::Cpu).unwrap();
        // eps is ignored: z = mu.
        let e1 = Tensor::new(&[[5.0f32, -5.0, 5.0]], &Device::Cpu).unwrap();
        let e2 = Tensor::new(&[[0.0f32, 0.0, 0.0]], &Device::Cpu).unwrap();
        let (r1, k1) = m.neg_elbo_terms(&x, &e1).unwrap();
        let (r2, _) = m.neg_elbo_terms(&x, &e2).unwrap();
        assert_eq!(r1.to_vec1::<f32>().unwrap(), r2.to_vec1::<f32>().unwrap());
        assert_eq!(k1.to_vec1::<f32>().unwrap(), vec![0.0]);
    }

    #[test]
    fn free_bits_and_beta_weigh_the_kl() {
        // With kl_weight 0 the loss is the reconstruction alone; with free bits above every
        // dimension's KL the KL part is the constant B * Z * lambda.
        let cfg = ModelConfig {
            hidden: vec![8],
            latent: 3,
            ..Default::default()
        };
        let m = model_of(&cfg, 6);
        let x = Tensor::new(
            &[
                [0.0f32, 1.0, 0.5, 0.2, 0.9, 0.0],
                [1.0, 1.0, 0.0, 0.0, 0.3, 0.7],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let eps = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let o = |kl_weight, free_bits| Objective {
            samples: 1,
            iwae: false,
            kl_weight,
            free_bits,
        };
        let (l0, r, k) = m.training_loss(&x, &eps, &o(0.0, 0.0)).unwrap();
        let (l0, r, k) = (
            l0.to_scalar::<f32>().unwrap(),
            r.to_scalar::<f32>().unwrap(),
            k.to_scalar::<f32>().unwrap(),
        );
        assert!((l0 - r).abs() < 1e-4 && k > 0.0);
        let (l1, _, _) = m.training_loss(&x, &eps, &o(1.0, 100.0)).unwrap();
        // 2 images * 3 dimensions * 100 nats = 600 on top of the reconstruction.
        assert!((l1.to_scalar::<f32>().unwrap() - (r + 600.0)).abs() < 1e-2);
    }

    #[test]
    fn vamp_prior_is_the_mixture_of_q_at_the_clipped_pseudo_inputs() {
        // K = 2 pseudo-inputs of D = 3, one with entries outside [0, 1] (clipped to 1 and 0).
        let cfg = ModelConfig {
            hidden: vec![5],
            latent: 2,
            prior: Prior::Vamp,
            prior_components: 2,
            ..Default::default()
        };
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut p = init_params(&cfg, 3, &mut rng, &dev).unwrap();
        let u = Tensor::new(&[[0.2f32, 0.7, 0.4], [1.7, -0.3, 0.5]], &dev).unwrap();
        p.insert("prior.pseudo_inputs".into(), u);
        let vars: HashMap<String, candle_core::Var> = p
            .iter()
            .map(|(k, v)| (k.clone(), candle_core::Var::from_tensor(v).unwrap()))
            .collect();
        let tensors: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let m = Vae::new(&cfg, 3, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap();
        // The components are q(z|u_k) at the clipped inputs.
        let clipped = Tensor::new(&[[0.2f32, 0.7, 0.4], [1.0, 0.0, 0.5]], &dev).unwrap();
        let (mu, lv) = m.encode(&clipped).unwrap();
        let (mu, lv) = (mu.to_vec2::<f32>().unwrap(), lv.to_vec2::<f32>().unwrap());
        let z = Tensor::new(&[[0.3f32, -1.1]], &dev).unwrap();
        // log p(z) + Z/2 ln 2 pi = logsumexp_k [-1/2 sum_j ((z_j - m_kj)^2 e^-lv_kj + lv_kj)] - ln 2.
        let zv = [0.3f64, -1.1];
        let comp: Vec<f64> = (0..2)
            .map(|k| {
                -0.5 * (0..2)
                    .map(|j| {
                        let (m, l) = (mu[k][j] as f64, lv[k][j] as f64);
                        (zv[j] - m).powi(2) * (-l).exp() + l
                    })
                    .sum::<f64>()
            })
            .collect();
        let top = comp[0].max(comp[1]);
        let want = top + ((comp[0] - top).exp() + (comp[1] - top).exp()).ln() - 2f64.ln();
        let lp = m.log_prior(&z).unwrap();
        let got = lp.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(m.prior_components(), 2);
        // The gradient reaches the pseudo-inputs inside [0, 1] and the encoder; the clip
        // passes none to the entries outside it.
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let gu = grads
            .get(vars["prior.pseudo_inputs"].as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(gu[0].iter().all(|g| g.abs() > 0.0), "{gu:?}");
        assert_eq!((gu[1][0], gu[1][1]), (0.0, 0.0));
        assert!(gu[1][2].abs() > 0.0);
        let genc = grads.get(vars["encoder.mu.weight"].as_tensor()).unwrap();
        assert!(
            genc.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn a_mixture_prior_is_evaluated_with_its_own_kl() {
        // The evaluation's KL is the training's: log q(z|x) - log p(z) at the same sample, not
        // the closed-form KL to N(0, I) (which the test -ELBO of mog runs used to report).
        for prior in [Prior::Mog, Prior::Vamp] {
            let cfg = ModelConfig {
                hidden: vec![8],
                latent: 3,
                prior,
                prior_components: 4,
                ..Default::default()
            };
            let m = model_of(&cfg, 6);
            let x = Tensor::new(&[[0.0f32, 1.0, 0.5, 0.2, 0.9, 0.0]], &Device::Cpu).unwrap();
            let eps = Tensor::new(&[[0.3f32, -0.8, 1.1]], &Device::Cpu).unwrap();
            let (_, kl) = m.neg_elbo_terms(&x, &eps).unwrap();
            let want = m.samples(&x, &eps, 1).unwrap().kl;
            let (kl, want) = (kl.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
            assert!(
                (kl[0] - want[0]).abs() < 1e-5,
                "{prior:?}: {kl:?} vs {want:?}"
            );
            let (mu, lv) = m.encode(&x).unwrap();
            let normal = loss::kl_std_normal(&mu, &lv)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                (kl[0] - normal[0]).abs() > 1e-3,
                "{prior:?}: the N(0, I) KL"
            );
        }
    }
}
