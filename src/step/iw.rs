//! The importance-weighted estimate of log p(x) (Burda, Grosse & Salakhutdinov 2015, eq. 8) on
//! the fused forward: log p(x) ~ log 1/K sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), per image.
//!
//! Each worker takes whole groups of images with its own buffers and single-threaded products
//! (no hand-off per product), and streams over the K samples in passes of at most `ROWS` rows
//! with a running log-sum-exp, so memory stays a few MB whatever K. The noise of image group g
//! comes from its own stream of the seed, so the figure does not depend on the thread count.

use super::likelihood;
use super::{Net, Work};
use crate::config::{DecoderKind, ModelConfig, ModelKind};
use crate::loss::MIN_LOGVAR;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use std::collections::HashMap;

/// Sample rows decoded per pass (images times samples): big enough for gemm to run near its
/// peak, small enough that a pass's buffers stay in L2/L3.
const ROWS: usize = 512;
const SALT: u64 = 0x6977_6165; // "iwae"

/// Images per group (one noise stream, one worker's pass) with `k` samples each: as many as fill
/// `ROWS` sample rows, at least one.
pub fn images_per_group(k: usize) -> usize {
    (ROWS / k.max(1)).max(1)
}

/// -log p(x) per image of `x` (n, D) with `k` importance samples, for the model `params` of
/// `cfg`. `first` is the index of `x`'s first
/// image in the whole set, a multiple of `images_per_group(k)`: image i's noise is then the
/// same whichever slice it is computed in, so an estimate computed in parts (`vae eval --iw`
/// resuming) equals one computed at once.
pub fn neg_log_likelihood(
    cfg: &ModelConfig,
    dim: usize,
    params: &HashMap<String, Tensor>,
    x: &[f32],
    first: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    if cfg.kind == ModelKind::Ae {
        bail!("--iw: an autoencoder has no q(z|x) to sample, so no likelihood estimate");
    }
    if k == 0 || !x.len().is_multiple_of(dim) {
        bail!("--iw {k}: need K >= 1 and whole images");
    }
    super::check_supported(cfg)?;
    let net = Net::new(cfg, dim);
    let mut th = vec![0f32; net.size()];
    net.import(params, &mut th)?;
    let n = x.len() / dim;
    let (s, imgs) = (k.min(ROWS), images_per_group(k));
    if !first.is_multiple_of(imgs) {
        bail!("--iw {k}: a slice of the images must start at a multiple of {imgs}, not {first}");
    }
    let g0 = first / imgs;
    let passes = k.div_ceil(s);
    // Each sample row's noise: [e1 | e2] with two stochastic layers.
    let z = cfg.noise_dim();
    let mut result = vec![0f64; n];
    result.par_chunks_mut(imgs).enumerate().for_each_init(
        || Work::new(&net, imgs, s, false),
        |w, (g, res)| {
            let b = res.len();
            let mut rng = group_rng(seed, g0 + g);
            let i0 = g * imgs;
            w.x[..b * dim].copy_from_slice(&x[i0 * dim..(i0 + b) * dim]);
            // Running (max, sum of e^(lw - max)) per image.
            let mut acc = vec![(f64::NEG_INFINITY, 0f64); b];
            if cfg.decoder == DecoderKind::Gaussian {
                let learned = net.dec_lv.map(|o| &th[o..o + dim]);
                let fixed = (2.0 * cfg.sigma.ln()) as f32;
                likelihood::gaussian_prepare(
                    &mut w.lv,
                    &mut w.inv,
                    learned,
                    fixed,
                    MIN_LOGVAR as f32,
                );
            }
            for p in 0..passes {
                let sp = s.min(k - p * s);
                for e in &mut w.eps[..b * sp * z] {
                    *e = StandardNormal.sample(&mut rng);
                }
                net.forward(&th, w, b, sp);
                let rows = b * sp;
                let ob = net.out_bias(&th, &w.cv);
                let out = &mut w.out[..rows * dim];
                match cfg.decoder {
                    DecoderKind::Bernoulli => likelihood::bernoulli_forward::<false>(
                        out,
                        &w.x,
                        &mut [],
                        &mut w.nll[..rows],
                        ob,
                        sp,
                        1.0,
                    ),
                    DecoderKind::Gaussian => likelihood::gaussian_forward(
                        out,
                        &w.x,
                        &mut w.nll[..rows],
                        ob,
                        &w.lv,
                        &w.inv,
                        sp,
                    ),
                }
                for (j, (m, sum)) in acc.iter_mut().enumerate() {
                    let r = j * sp..(j + 1) * sp;
                    let lw = w.nll[r.clone()]
                        .iter()
                        .zip(&w.lq[r])
                        .map(|(a, q)| -(*a as f64 + *q as f64));
                    for v in lw {
                        if v > *m {
                            *sum = *sum * (*m - v).exp() + 1.0;
                            *m = v;
                        } else {
                            *sum += (v - *m).exp();
                        }
                    }
                }
            }
            for (r, (m, sum)) in res.iter_mut().zip(&acc) {
                *r = -(m + sum.ln() - (k as f64).ln());
            }
        },
    );
    Ok(result)
}

/// The noise stream of image group `g`.
pub fn group_rng(seed: u64, g: usize) -> StdRng {
    StdRng::seed_from_u64(
        (seed ^ SALT).wrapping_add((g as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    )
}

/// Mean and standard error over images of per-image values.
pub fn mean_and_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_se_hand_values() {
        // [1, 2, 3]: mean 2, sample variance 1, standard error 1/sqrt(3) = 0.577350.
        let (m, se) = mean_and_se(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (se - 0.577_350).abs() < 1e-6);
    }
}
