//! One inverse autoregressive flow step (Kingma et al. 2016, Algorithm 1) in candle, beside the
//! fused step's `step::iaf`: the oracle its gradients are checked against and the GPU path. The
//! MADE's masks (`crate::made`) multiply the weights as dense 0/1 tensors, which autograd then
//! keeps off the masked entries.
//!
//! z (R, Z) and the context h (R, C) (each image's, repeated over its samples):
//!   h1 = elu(z (W1 . M1)^T + b1 + h Wc^T + bc), h2 = elu(h1 (W2 . M2)^T + b2),
//!   [m | s] = h2 (Wo . Mo)^T + bo, sigma = sigmoid(s + SHIFT),
//!   z' = sigma z + (1 - sigma) m, log|det dz'/dz| = sum_i log sigma_i.
//!
//! Tensor names under the step's prefix: `l1`, `ctx`, `l2`, `out`, each `.weight` (out, in) and
//! `.bias`, as PyTorch's `nn.Linear` (the masked weights stored dense, zeros where masked).

use crate::made::{Masks, SHIFT};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

pub struct IafStep {
    l1: Linear,
    ctx: Linear,
    l2: Linear,
    out: Linear,
    /// The dense masks, (out, in) as the weights.
    m1: Tensor,
    m2: Tensor,
    mo: Tensor,
    zd: usize,
}

/// x W^T + b with W multiplied by its mask.
fn masked(l: &Linear, mask: &Tensor, x: &Tensor) -> Result<Tensor> {
    let w = (l.weight() * mask)?;
    let y = x.matmul(&w.t()?)?;
    match l.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// log sigmoid(s) = min(s, 0) - log(1 + e^-|s|), finite for any s.
fn log_sigmoid(s: &Tensor) -> Result<Tensor> {
    s.minimum(0f32)? - (s.abs()?.neg()?.exp()? + 1.0)?.log()?
}

impl IafStep {
    pub fn new(zd: usize, width: usize, context: usize, vb: VarBuilder) -> Result<IafStep> {
        let dev = vb.device().clone();
        let (d1, d2, dout) = Masks::new(zd, width).dense();
        Ok(IafStep {
            l1: candle_nn::linear(zd, width, vb.pp("l1"))?,
            ctx: candle_nn::linear(context, width, vb.pp("ctx"))?,
            l2: candle_nn::linear(width, width, vb.pp("l2"))?,
            out: candle_nn::linear(width, 2 * zd, vb.pp("out"))?,
            m1: Tensor::from_vec(d1, (width, zd), &dev)?,
            m2: Tensor::from_vec(d2, (width, width), &dev)?,
            mo: Tensor::from_vec(dout, (2 * zd, width), &dev)?,
            zd,
        })
    }

    /// z' (R, Z) and log|det dz'/dz| (R) for z (R, Z) and the context h (R, C).
    pub fn forward(&self, z: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let a1 = (masked(&self.l1, &self.m1, z)? + self.ctx.forward(h)?)?;
        let h1 = a1.elu(1.0)?;
        let h2 = masked(&self.l2, &self.m2, &h1)?.elu(1.0)?;
        let ms = masked(&self.out, &self.mo, &h2)?;
        let m = ms.narrow(1, 0, self.zd)?;
        let s = (ms.narrow(1, self.zd, self.zd)? + f64::from(SHIFT))?;
        let sigma = candle_nn::ops::sigmoid(&s)?;
        let zo = ((&sigma * z)? + (sigma.affine(-1.0, 1.0)? * m)?)?;
        let logdet = log_sigmoid(&s)?.sum(1)?;
        Ok((zo, logdet))
    }
}
