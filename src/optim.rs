//! Adam (Kingma & Ba 2015, Algorithm 1) with optional decoupled weight decay (Loshchilov & Hutter
//! 2019). With weight_decay = 0 it is PyTorch's `torch.optim.Adam`, the reference recipe's
//! optimizer; eps is added after the bias-corrected square root, as PyTorch does.
//!
//! `adamax`: Adamax (Kingma & Ba 2015, section 7.1, PyTorch's `torch.optim.Adamax`): the second
//! moment is replaced by u = max(beta2 u, |g| + eps) and theta -= lr / (1 - beta1^t) m / u, u kept
//! where v is (the same checkpoint names); weight decay stays decoupled for both.
//!
//! The moments are kept by parameter name so a checkpoint can store them.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Divide each parameter tensor's gradient by its L2 norm (+ 1e-7) first: the AdamNormGrad
    /// of Tomczak & Welling's code (jmtomczak/vae_vampprior, utils/optimizer.py).
    pub normalize_grad: bool,
    /// Adamax instead of Adam.
    pub adamax: bool,
}

/// Added to a gradient's norm before dividing by it (their 1.e-7).
pub const NORM_EPS: f64 = 1e-7;

struct Slot {
    name: String,
    theta: Var,
    m: Var,
    v: Var,
}

pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    /// Steps taken so far (t in the paper); the bias corrections use it.
    pub step: u64,
}

impl Adam {
    /// Zero moments for every variable of `vm`, in name order.
    pub fn new(vm: &VarMap, cfg: AdamConfig) -> Result<Self> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let slots = names
            .into_iter()
            .map(|n| {
                let theta = data[n].clone();
                let m = Var::zeros(theta.shape(), theta.dtype(), theta.device())?;
                let v = Var::zeros(theta.shape(), theta.dtype(), theta.device())?;
                Ok(Slot {
                    name: n.clone(),
                    theta,
                    m,
                    v,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Adam {
            cfg,
            slots,
            step: 0,
        })
    }

    /// The learning rate of the following steps (a schedule's value).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &self.slots {
            let Some(g) = grads.get(s.theta.as_tensor()) else {
                continue;
            };
            let normed;
            let g = if c.normalize_grad {
                let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                normed = (g / (norm + NORM_EPS))?;
                &normed
            } else {
                g
            };
            let m = ((s.m.as_tensor() * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let (v, denom) = if c.adamax {
                // u = max(beta2 u, |g| + eps); theta -= lr/bc1 * m / u
                let u = (s.v.as_tensor() * c.beta2)?.maximum(&(g.abs()? + c.eps)?)?;
                (u.clone(), u)
            } else {
                let v = ((s.v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                // theta -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
                let denom = ((v.sqrt()? * (1.0 / bc2.sqrt()))? + c.eps)?;
                (v, denom)
            };
            let mut theta = s.theta.as_tensor().clone();
            if c.weight_decay > 0.0 {
                theta = (theta * (1.0 - c.lr * c.weight_decay))?;
            }
            let theta = (theta - ((m.clone() / denom)? * (c.lr / bc1))?)?;
            s.m.set(&m)?;
            s.v.set(&v)?;
            s.theta.set(&theta)?;
        }
        Ok(())
    }

    /// Restores moments saved by `state` and the step count; every parameter must have both.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<()> {
        for s in &self.slots {
            for (prefix, var) in [("m.", &s.m), ("v.", &s.v)] {
                let name = format!("{prefix}{}", s.name);
                let t = state
                    .get(&name)
                    .ok_or_else(|| anyhow::anyhow!("no tensor `{name}`"))?;
                if t.dims() != var.dims() {
                    anyhow::bail!(
                        "tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                var.set(&t.to_device(var.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// The moments as `m.<param>` and `v.<param>` tensors.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut h = HashMap::new();
        for s in &self.slots {
            h.insert(format!("m.{}", s.name), s.m.as_tensor().clone());
            h.insert(format!("v.{}", s.name), s.v.as_tensor().clone());
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// One variable p = [1, 1] and the optimizer over it: lr 0.1, beta1 0.9, beta2 0.999.
    fn one_var(adamax: bool) -> (Var, Adam) {
        let vm = VarMap::new();
        let p = Var::from_tensor(&Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap()).unwrap();
        vm.data().lock().unwrap().insert("p".into(), p.clone());
        let cfg = AdamConfig {
            normalize_grad: false,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            adamax,
        };
        (p, Adam::new(&vm, cfg).unwrap())
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // At t = 1, m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps) ~ lr * sign(g).
        // theta = [1, 1], loss = 3*theta0 - 2*theta1, g = [3, -2], lr = 0.1 -> [0.9, 1.1].
        let (p, mut opt) = one_var(false);
        let w = Tensor::new(&[3f32, -2.0], &Device::Cpu).unwrap();
        let loss = (p.as_tensor() * &w).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] - 1.1).abs() < 1e-6,
            "{got:?}"
        );
        // Second step, same gradient: m_hat = g, v_hat = g^2 again, so another lr * sign(g).
        let loss = (p.as_tensor() * &w).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.8).abs() < 1e-5 && (got[1] - 1.2).abs() < 1e-5,
            "{got:?}"
        );
        assert_eq!(opt.state().len(), 2);
    }

    #[test]
    fn adamax_by_hand() {
        // theta = [1, 1], lr 0.1, beta1 0.9, beta2 0.999. Step 1, g = [3, -2]: m = [0.3, -0.2],
        // u = |g| = [3, 2], theta -= 0.1 / 0.1 * m / u = [0.1, -0.1] -> [0.9, 1.1].
        // Step 2, g = [1, -4]: m = [0.37, -0.58], u = max(0.999 u, |g|) = [2.997, 4],
        // theta -= 0.1 / 0.19 * m / u = [0.0649773, -0.0763158] -> [0.8350227, 1.1763158]
        // (Adam would give [0.812894, 1.196518]).
        let (p, mut opt) = one_var(true);
        let step = |opt: &mut Adam, g: [f32; 2]| {
            let w = Tensor::new(&g, &Device::Cpu).unwrap();
            let loss = (p.as_tensor() * &w).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            p.as_tensor().to_vec1::<f32>().unwrap()
        };
        let got = step(&mut opt, [3.0, -2.0]);
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] - 1.1).abs() < 1e-6,
            "{got:?}"
        );
        let got = step(&mut opt, [1.0, -4.0]);
        assert!(
            (got[0] - 0.835_022_7).abs() < 1e-5 && (got[1] - 1.176_315_8).abs() < 1e-5,
            "{got:?}"
        );
    }
}
