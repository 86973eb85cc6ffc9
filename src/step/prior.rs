//! The prior p(z) as a layer: each sample's log q - log p gets -log p(z_K), and the backward
//! gives d(loss)/dz_K and the prior's own parameters' gradients, weighted per sample by `cq`
//! (the sample's weight on log q - log p in the loss). The Z/2 ln 2 pi of log p cancels log q's.
//!
//! - The standard normal: -log p(z) = |z|^2 / 2; d/dz = z.
//! - A mixture of K diagonal Gaussians with uniform weights (learned means m_k and log-variances
//!   lv_k): log p(z) = logsumexp_k c_k - ln K, c_k = -1/2 sum_j ((z_j - m_kj)^2 e^-lv_kj + lv_kj);
//!   with responsibilities r_k = softmax_k c_k, d log p/dz = -sum_k r_k (z - m_k) e^-lv_k,
//!   d/dm_k = r_k (z - m_k) e^-lv_k, d/dlv_kj = r_k ((z_j - m_kj)^2 e^-lv_kj - 1) / 2.
//! - The VampPrior (Tomczak & Welling 2018) is that mixture with m_k, lv_k = q(z|u_k) of the
//!   encoder at pseudo-inputs u_k; `Net::pseudo_forward` / `pseudo_backward` (mod.rs) carry
//!   them to and from the encoder.

use super::math::{exp_f32, simd};

/// Standard normal forward: lq[r] += |z_r|^2 / 2 over `rows` rows of `z` (rows, Z).
pub fn normal_forward(z: &[f32], lq: &mut [f32], zd: usize) {
    for (l, v) in lq.iter_mut().zip(z.chunks_exact(zd)) {
        *l += 0.5 * v.iter().map(|t| t * t).sum::<f32>();
    }
}

/// Standard normal backward: dz += cq z.
pub fn normal_backward(z: &[f32], cq: &[f32], dz: &mut [f32], zd: usize) {
    for ((d, v), &c) in dz.chunks_exact_mut(zd).zip(z.chunks_exact(zd)).zip(cq) {
        for (a, b) in d.iter_mut().zip(v) {
            *a += c * b;
        }
    }
}

/// A mixture's means (K, Z) and the per-step constants of its log-variances: inverse variances
/// (K, Z) and each component's sum of log-variances (K).
pub struct Mixture<'a> {
    pub means: &'a [f32],
    pub inv: &'a [f32],
    pub lv_sum: &'a [f32],
    pub k: usize,
    pub z: usize,
}

/// The per-step constants: inv = e^-lv (K, Z), lv_sum (K).
pub fn mixture_prepare(logvars: &[f32], inv: &mut [f32], lv_sum: &mut [f32], z: usize) {
    for (i, row) in logvars.chunks_exact(z).enumerate() {
        lv_sum[i] = row.iter().sum();
        for (j, v) in row.iter().enumerate() {
            inv[i * z + j] = exp_f32(-v);
        }
    }
}

/// Mixture forward over the rows of `zs` (rows, Z): lq[r] -= log p(z_r), and the
/// responsibilities r_k into `resp` (rows, K).
pub fn mixture_forward(zs: &[f32], mx: &Mixture, resp: &mut [f32], lq: &mut [f32]) {
    let (k, zd) = (mx.k, mx.z);
    let ln_k = (k as f32).ln();
    simd!({
        for (r, zr) in zs.chunks_exact(zd).enumerate() {
            let c = &mut resp[r * k..(r + 1) * k];
            for (i, ci) in c.iter_mut().enumerate() {
                let (m, inv) = (
                    &mx.means[i * zd..(i + 1) * zd],
                    &mx.inv[i * zd..(i + 1) * zd],
                );
                let mut q = 0f32;
                for j in 0..zd {
                    let d = zr[j] - m[j];
                    q += d * d * inv[j];
                }
                *ci = -0.5 * (q + mx.lv_sum[i]);
            }
            let top = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in c.iter_mut() {
                *v = exp_f32(*v - top);
                sum += *v;
            }
            for v in c.iter_mut() {
                *v /= sum;
            }
            lq[r] -= top + sum.ln() - ln_k;
        }
    })
}

/// Mixture backward: with the loss weighing each sample's -log p(z) by `cq`, adds
/// d(loss)/dz into `dz` (rows, Z) and writes d(loss)/d means and d/d logvars into `g_m`, `g_lv`
/// (K, Z each, overwritten).
pub fn mixture_backward(
    zs: &[f32],
    mx: &Mixture,
    resp: &[f32],
    cq: &[f32],
    dz: &mut [f32],
    g_m: &mut [f32],
    g_lv: &mut [f32],
) {
    let (k, zd) = (mx.k, mx.z);
    g_m.fill(0.0);
    g_lv.fill(0.0);
    simd!({
        for (r, zr) in zs.chunks_exact(zd).enumerate() {
            let c = cq[r];
            if c == 0.0 {
                continue;
            }
            let d = &mut dz[r * zd..(r + 1) * zd];
            for i in 0..k {
                let w = c * resp[r * k + i];
                let (m, inv) = (
                    &mx.means[i * zd..(i + 1) * zd],
                    &mx.inv[i * zd..(i + 1) * zd],
                );
                let (gm, gl) = (
                    &mut g_m[i * zd..(i + 1) * zd],
                    &mut g_lv[i * zd..(i + 1) * zd],
                );
                for j in 0..zd {
                    let diff = zr[j] - m[j];
                    let t = diff * inv[j];
                    d[j] += w * t;
                    gm[j] -= w * t;
                    gl[j] -= w * 0.5 * (t * diff - 1.0);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixture_hand_values() {
        // Z = 1, two components N(0, 1) and N(2, 1), z = 1: c = [-1/2, -1/2], so r = [1/2, 1/2]
        // and log p = -1/2 + ln 2 - ln 2 = -0.5 (without -1/2 ln 2 pi); lq -= -0.5.
        let (means, logvars) = ([0.0f32, 2.0], [0.0f32, 0.0]);
        let (mut inv, mut lvs) = ([0f32; 2], [0f32; 2]);
        mixture_prepare(&logvars, &mut inv, &mut lvs, 1);
        let mx = Mixture {
            means: &means,
            inv: &inv,
            lv_sum: &lvs,
            k: 2,
            z: 1,
        };
        let (mut resp, mut lq) = ([0f32; 2], [0f32]);
        mixture_forward(&[1.0], &mx, &mut resp, &mut lq);
        assert!(
            (lq[0] - 0.5).abs() < 1e-6 && (resp[0] - 0.5).abs() < 1e-6,
            "{lq:?} {resp:?}"
        );
        // Weight 1: dz = sum r_k (z - m_k) = 1/2 (1) + 1/2 (-1) = 0; dm = -r (z - m) = [-1/2, 1/2];
        // dlv = -r ((z - m)^2 - 1) / 2 = [0, 0].
        let (mut dz, mut gm, mut gl) = ([0f32], [0f32; 2], [9f32; 2]);
        mixture_backward(&[1.0], &mx, &resp, &[1.0], &mut dz, &mut gm, &mut gl);
        assert!(dz[0].abs() < 1e-6 && (gm[0] + 0.5).abs() < 1e-6 && (gm[1] - 0.5).abs() < 1e-6);
        assert!(gl.iter().all(|v| v.abs() < 1e-6));
    }
}
