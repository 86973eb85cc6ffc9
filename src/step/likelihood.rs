//! The decoder's likelihood p(x|z) as the last layer: per-row -log p(x|z) of the decoder output
//! against the image, and its gradient w.r.t. the output.
//!
//! - Bernoulli (Kingma & Welling 2013, Appendix C.1): NLL = max(l, 0) - l x + log(1 + e^-|l|),
//!   finite for any logit l; d/dl = sigmoid(l) - x.
//! - Gaussian with mean sigmoid(l) and log-variance lv per pixel (Appendix C.2), with its
//!   log-normalizer: NLL = 1/2 ((x - m)^2 / var + lv + ln 2 pi); d/dl = -(x - m)/var m (1 - m),
//!   d/dlv = 1/2 (1 - (x - m)^2 / var) (zero below the floor `MIN_LOGVAR`, as the clamp has it).
//!
//! Output rows are image-major samples: row r decodes a sample of image r / S. Each forward
//! adds the output layer's bias `ob` (D) itself; each backward takes a weight per row (1/S for a
//! sample mean, the normalized importance weight for IWAE).

use super::math::{exp_f32, lane_sum, simd, softplus_and_sigmoid};
use crate::loss::LN_2PI;

/// Bernoulli forward over the rows of `out` (rows, D): NLL per row into `nll`, and with `GRAD`
/// d(NLL)/d(logit) times `scale` into `d` (rows, D). `x` holds the images, row r against image
/// r / s. The logits are not needed after this, so their slots take the pixels' losses.
pub fn bernoulli_forward<const GRAD: bool>(
    out: &mut [f32],
    x: &[f32],
    d: &mut [f32],
    nll: &mut [f32],
    ob: &[f32],
    s: usize,
    scale: f32,
) {
    let dim = ob.len();
    simd!({
        for (r, o) in out.chunks_exact_mut(dim).enumerate() {
            let x = &x[(r / s) * dim..(r / s + 1) * dim];
            if GRAD {
                let d = &mut d[r * dim..(r + 1) * dim];
                for j in 0..dim {
                    let l = o[j] + ob[j];
                    let (sp, sig) = softplus_and_sigmoid(l);
                    o[j] = sp - l * x[j];
                    d[j] = (sig - x[j]) * scale;
                }
            } else {
                for j in 0..dim {
                    let l = o[j] + ob[j];
                    o[j] = softplus_and_sigmoid(l).0 - l * x[j];
                }
            }
            nll[r] = lane_sum(o);
        }
    })
}

/// Bernoulli backward: the forward's unit-weight gradient rows scaled by each row's weight `c`.
pub fn bernoulli_backward(d: &mut [f32], c: &[f32], dim: usize) {
    simd!({
        for (row, &w) in d.chunks_exact_mut(dim).zip(c) {
            for v in row.iter_mut() {
                *v *= w;
            }
        }
    })
}

/// Per-pixel log-variance after the floor and its inverse: `lv` (D), `inv` (D) from the raw
/// parameter (`learned`) or the fixed value.
pub fn gaussian_prepare(
    lv: &mut [f32],
    inv: &mut [f32],
    learned: Option<&[f32]>,
    fixed: f32,
    floor: f32,
) {
    for j in 0..lv.len() {
        lv[j] = learned.map_or(fixed, |raw| raw[j].max(floor));
        inv[j] = exp_f32(-lv[j]);
    }
}

/// Gaussian forward: means m = sigmoid(l) into `out`'s slots, NLL per row into `nll`.
pub fn gaussian_forward(
    out: &mut [f32],
    x: &[f32],
    nll: &mut [f32],
    ob: &[f32],
    lv: &[f32],
    inv: &[f32],
    s: usize,
) {
    let dim = ob.len();
    let half_ln2pi = 0.5 * LN_2PI as f32;
    simd!({
        for (r, o) in out.chunks_exact_mut(dim).enumerate() {
            let x = &x[(r / s) * dim..(r / s + 1) * dim];
            let mut acc = 0f32;
            for j in 0..dim {
                let m = softplus_and_sigmoid(o[j] + ob[j]).1;
                let res = x[j] - m;
                acc += 0.5 * (res * res * inv[j] + lv[j]) + half_ln2pi;
                o[j] = m;
            }
            nll[r] = acc;
        }
    })
}

/// Gaussian backward with row weights `c`: d(loss)/d(logit) into `d` (rows, D), and with a
/// learned variance d(loss)/d(raw logvar) added into `g_lv` (D); `raw` is the unfloored value.
#[allow(clippy::too_many_arguments)]
pub fn gaussian_backward(
    d: &mut [f32],
    means: &[f32],
    x: &[f32],
    c: &[f32],
    inv: &[f32],
    learned: Option<(&[f32], &mut [f32])>,
    floor: f32,
    s: usize,
) {
    let dim = inv.len();
    simd!({
        let mut learned = learned;
        for (r, (dr, m)) in d
            .chunks_exact_mut(dim)
            .zip(means.chunks_exact(dim))
            .enumerate()
        {
            let x = &x[(r / s) * dim..(r / s + 1) * dim];
            let w = c[r];
            for j in 0..dim {
                let res = x[j] - m[j];
                dr[j] = -w * res * inv[j] * m[j] * (1.0 - m[j]);
            }
            if let Some((raw, g)) = learned.as_mut() {
                for j in 0..dim {
                    let res = x[j] - m[j];
                    if raw[j] >= floor {
                        g[j] += w * 0.5 * (1.0 - res * res * inv[j]);
                    }
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;

    #[test]
    fn bernoulli_hand_values() {
        // Two samples of one 2-pixel image x = [1, 0.25]; logits [0, 2] (bias [0, 1] on
        // [0, 1]) and [0, 0]. Row 0: ln 2 + (2 - 0.5 + ln(1 + e^-2)) = 0.693147 + 1.626928;
        // row 1: ln 2 + ln 2. Gradients (scale 1/2): row 0 [(0.5 - 1)/2, (0.880797 - 0.25)/2].
        let mut out = [0.0f32, 1.0, 0.0, -1.0];
        let (mut d, mut nll) = ([0f32; 4], [0f32; 2]);
        bernoulli_forward::<true>(
            &mut out,
            &[1.0, 0.25],
            &mut d,
            &mut nll,
            &[0.0, 1.0],
            2,
            0.5,
        );
        assert!(
            (nll[0] - 2.320075).abs() < 1e-5 && (nll[1] - 1.386294).abs() < 1e-5,
            "{nll:?}"
        );
        assert!(
            (d[0] + 0.25).abs() < 1e-6 && (d[1] - 0.315399).abs() < 1e-5,
            "{d:?}"
        );
        bernoulli_backward(&mut d, &[2.0, 0.0], 2);
        assert!((d[0] + 0.5).abs() < 1e-6 && d[2] == 0.0);
    }

    #[test]
    fn gaussian_hand_values() {
        // One pixel x = 1, logit 0 (m = 1/2), lv = 0: NLL = 1/2 (1/4 + 0 + ln 2 pi) = 1.043939;
        // d/dl = -(1/2)(1/4) = -0.125; d/dlv = 1/2 (1 - 1/4) = 0.375.
        let (mut lv, mut inv) = ([0f32], [0f32]);
        gaussian_prepare(&mut lv, &mut inv, Some(&[0.0]), 0.0, -9.0);
        let (mut out, mut nll) = ([0f32], [0f32]);
        gaussian_forward(&mut out, &[1.0], &mut nll, &[0.0], &lv, &inv, 1);
        assert!((nll[0] - 1.043939).abs() < 1e-5 && out[0] == 0.5);
        let (mut d, mut g) = ([0f32], [0f32]);
        gaussian_backward(
            &mut d,
            &out,
            &[1.0],
            &[1.0],
            &inv,
            Some((&[0.0], &mut g)),
            -9.0,
            1,
        );
        assert!((d[0] + 0.125).abs() < 1e-6 && (g[0] - 0.375).abs() < 1e-6);
    }
}
