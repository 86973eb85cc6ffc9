//! The MLP variational autoencoder of Kingma & Welling (2013), Appendix C: an encoder giving
//! mu and log sigma^2 of a diagonal Gaussian q(z|x), the reparameterization z = mu + sigma * eps
//! (section 2.4), and a decoder giving Bernoulli logits or a Gaussian mean for p(x|z).
//!
//! Tensor names (the checkpoint format; `Linear` weights are (out, in) as in PyTorch):
//! `encoder.hidden.{i}.{weight,bias}`, `encoder.mu.*`, `encoder.logvar.*`,
//! `decoder.hidden.{i}.*`, `decoder.out.*`, and `decoder.logvar` (D,) for a learned Gaussian.

use crate::config::{Activation, DecoderKind, ModelConfig};
use crate::loss;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::Rng;
use std::collections::HashMap;

/// A learned Gaussian decoder's sigma is kept >= 0.01: MNIST's border pixels are always 0, and
/// without a floor their variance collapses and the likelihood runs to infinity.
pub const MIN_LOGVAR: f64 = -9.210_340_371_976_182; // ln(0.01^2)

pub struct Mlp {
    layers: Vec<Linear>,
    act: Activation,
}

impl Mlp {
    fn new(dims: &[usize], act: Activation, vb: VarBuilder) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp { layers, act })
    }

    /// Every layer followed by the activation: (B, dims[0]) -> (B, dims[last]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = activate(&l.forward(&h)?, self.act)?;
        }
        Ok(h)
    }
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Relu => x.relu(),
        Activation::Tanh => x.tanh(),
        // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), finite for any x.
        Activation::Softplus => x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?,
        Activation::Sigmoid => candle_nn::ops::sigmoid(x),
        Activation::Gelu => x.gelu(),
    }
}

pub struct Vae {
    pub cfg: ModelConfig,
    pub input_dim: usize,
    enc: Mlp,
    enc_mu: Linear,
    enc_logvar: Linear,
    dec: Mlp,
    dec_out: Linear,
    /// Gaussian decoder only: learned (D,) or fixed (1,) log-variance.
    dec_logvar: Option<Tensor>,
}

/// The output of one pass: decoder output (B, D), and q(z|x)'s mu, logvar (B, Z).
pub struct Forward {
    pub out: Tensor,
    pub mu: Tensor,
    pub logvar: Tensor,
}

impl Vae {
    pub fn new(cfg: &ModelConfig, input_dim: usize, vb: VarBuilder) -> Result<Self> {
        let enc_dims: Vec<usize> = std::iter::once(input_dim)
            .chain(cfg.hidden.iter().copied())
            .collect();
        let top = *enc_dims.last().unwrap_or(&input_dim);
        let dec_dims: Vec<usize> = std::iter::once(cfg.latent)
            .chain(cfg.hidden.iter().rev().copied())
            .collect();
        let enc = Mlp::new(&enc_dims, cfg.activation, vb.pp("encoder.hidden"))?;
        let enc_mu = candle_nn::linear(top, cfg.latent, vb.pp("encoder.mu"))?;
        let enc_logvar = candle_nn::linear(top, cfg.latent, vb.pp("encoder.logvar"))?;
        let dec = Mlp::new(&dec_dims, cfg.activation, vb.pp("decoder.hidden"))?;
        let dec_out = candle_nn::linear(cfg.hidden[0], input_dim, vb.pp("decoder.out"))?;
        let dec_logvar = match (cfg.decoder, cfg.learn_sigma) {
            (DecoderKind::Bernoulli, _) => None,
            (DecoderKind::Gaussian, true) => Some(vb.get(input_dim, "decoder.logvar")?),
            (DecoderKind::Gaussian, false) => {
                Some(Tensor::new(&[(2.0 * cfg.sigma.ln()) as f32], vb.device())?)
            }
        };
        Ok(Vae {
            cfg: cfg.clone(),
            input_dim,
            enc,
            enc_mu,
            enc_logvar,
            dec,
            dec_out,
            dec_logvar,
        })
    }

    /// q(z|x): (B, D) -> mu, logvar, each (B, Z).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.enc.forward(x)?;
        Ok((self.enc_mu.forward(&h)?, self.enc_logvar.forward(&h)?))
    }

    /// The decoder's raw output (B, Z) -> (B, D): Bernoulli logits, or the pre-sigmoid Gaussian mean.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.dec_out.forward(&self.dec.forward(z)?)
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

    /// Reconstruction NLL and KL per example, each (B,); their sum is the -ELBO.
    pub fn neg_elbo_terms(&self, x: &Tensor, eps: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = self.forward(x, eps)?;
        Ok((
            self.recon_nll(&f.out, x)?,
            loss::kl_std_normal(&f.mu, &f.logvar)?,
        ))
    }
}

/// Every parameter's name, shape, and fan-in, in a fixed order.
pub fn param_specs(cfg: &ModelConfig, input_dim: usize) -> Vec<(String, Vec<usize>, usize)> {
    let mut v = Vec::new();
    let mut lin = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i], i));
        v.push((format!("{name}.bias"), vec![o], i));
    };
    let mut prev = input_dim;
    for (i, &h) in cfg.hidden.iter().enumerate() {
        lin(format!("encoder.hidden.{i}"), prev, h);
        prev = h;
    }
    lin("encoder.mu".into(), prev, cfg.latent);
    lin("encoder.logvar".into(), prev, cfg.latent);
    let mut prev = cfg.latent;
    for (i, &h) in cfg.hidden.iter().rev().enumerate() {
        lin(format!("decoder.hidden.{i}"), prev, h);
        prev = h;
    }
    lin("decoder.out".into(), prev, input_dim);
    if cfg.decoder == DecoderKind::Gaussian && cfg.learn_sigma {
        v.push(("decoder.logvar".into(), vec![input_dim], 0));
    }
    v
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
}
