//! Adam on flat buffers (Kingma & Ba 2015, Algorithm 1, with PyTorch's placement of eps and
//! decoupled weight decay, Loshchilov & Hutter 2019), or Adamax (their section 7.1): the same
//! update as `optim::Adam`, one
//! vectorized pass per parameter range, run by the backward as soon as a layer's gradient is
//! final (while parameters, gradient and moments are still in cache).

use super::math::simd;
use crate::optim::AdamConfig;
use rayon::prelude::*;

/// One Adam step's constants.
#[derive(Clone, Copy)]
pub struct AdamStep {
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    decay: f32,
    /// Adamax: `v` holds u = max(b2 u, |g| + eps), and the step is step_size m / u.
    adamax: bool,
}

impl AdamStep {
    /// The constants of step `t` (1-based) at learning rate `lr`.
    pub fn new(c: &AdamConfig, t: u64, lr: f64) -> Self {
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        AdamStep {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            step_size: (lr / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: c.eps as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            adamax: c.adamax,
        }
    }

    /// Updates `th` from its gradient `g` and moments `m`, `v`, in parallel chunks.
    pub fn apply(&self, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        assert!(th.len() == m.len() && m.len() == v.len() && v.len() == g.len());
        const CHUNK: usize = 1 << 15;
        if th.len() < 2 * CHUNK {
            self.apply_1(th, m, v, g);
        } else {
            th.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((th, m), v), g)| self.apply_1(th, m, v, g));
        }
    }

    /// `apply` on this thread.
    fn apply_1(&self, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let a = *self;
        if a.adamax {
            return simd!({
                for i in 0..th.len() {
                    let gi = g[i];
                    let mi = a.b1 * m[i] + (1.0 - a.b1) * gi;
                    let ui = (a.b2 * v[i]).max(gi.abs() + a.eps);
                    m[i] = mi;
                    v[i] = ui;
                    th[i] = th[i] * a.decay - a.step_size * mi / ui;
                }
            });
        }
        simd!({
            for i in 0..th.len() {
                let gi = g[i];
                let mi = a.b1 * m[i] + (1.0 - a.b1) * gi;
                let vi = a.b2 * v[i] + (1.0 - a.b2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                th[i] = th[i] * a.decay - a.step_size * mi / (vi.sqrt() * a.inv_sqrt_bc2 + a.eps);
            }
        })
    }
}

/// One parameter tensor's place in a flat buffer: `rows` runs of `width` values, `stride` apart,
/// from `start` (a weight's column block, or a bias).
#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub start: usize,
    pub rows: usize,
    pub width: usize,
    pub stride: usize,
}

/// Divides the gradient of the tensor at `b` (offsets relative to `g`) by its L2 norm + eps.
pub fn normalize_block(g: &mut [f32], b: Block, eps: f64) {
    let mut ss = 0f64;
    for r in 0..b.rows {
        let o = b.start + r * b.stride;
        ss += g[o..o + b.width]
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>();
    }
    let k = (1.0 / (ss.sqrt() + eps)) as f32;
    for r in 0..b.rows {
        let o = b.start + r * b.stride;
        for v in &mut g[o..o + b.width] {
            *v *= k;
        }
    }
}

/// The optimizer's buffers beside the parameters: gradient and both moments, one flat slot each,
/// starting at parameter `base`; with `blocks`, each tensor's gradient is divided by its norm
/// before its update.
pub struct Moments<'a> {
    pub g: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    pub base: usize,
    /// Every tensor's block, by start (empty: no normalization).
    pub blocks: &'a [Block],
}

impl<'a> Moments<'a> {
    /// The buffers of parameters `[0, k)` and `[k, end)`, for two workers.
    pub fn split_at(self, k: usize) -> (Moments<'a>, Moments<'a>) {
        let (g1, g2) = self.g.split_at_mut(k);
        let (m1, m2) = self.m.split_at_mut(k);
        let (v1, v2) = self.v.split_at_mut(k);
        (
            Moments {
                g: g1,
                m: m1,
                v: v1,
                base: self.base,
                blocks: self.blocks,
            },
            Moments {
                g: g2,
                m: m2,
                v: v2,
                base: self.base + k,
                blocks: self.blocks,
            },
        )
    }
}

/// Adam on `[lo, hi)` of the parameters, when there is a step to take.
pub fn adam_range(adam: &Option<AdamStep>, th: &mut [f32], s: &mut Moments, lo: usize, hi: usize) {
    if let Some(a) = adam {
        // The tensors starting in this range (a layer's tensors lie within its range).
        for b in s.blocks {
            if b.start >= s.base + lo && b.start < s.base + hi {
                let rel = Block {
                    start: b.start - s.base,
                    ..*b
                };
                normalize_block(s.g, rel, crate::optim::NORM_EPS);
            }
        }
        a.apply(
            &mut th[lo..hi],
            &mut s.m[lo..hi],
            &mut s.v[lo..hi],
            &s.g[lo..hi],
        );
    }
}
