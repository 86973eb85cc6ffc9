//! q(z|x) as a layer: the encoder head's [mu | logvar] (B, 2Z) to S samples per image
//! z = mu + sigma * eps (Kingma & Welling 2013, eq. 10's reparameterization), with the closed-form
//! KL(q(z|x) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - logvar - 1) (their Appendix B) and the
//! per-sample log q(z|x) that the Monte-Carlo KL and the importance weights need.
//!
//! Rows of z are image-major: image b's samples are rows b S .. b S + S - 1, as `eps` (B S, Z).
//! The autoencoder's "layer" is z = mu.

use super::math::{exp_f32, simd};

/// Shapes of one call: `b` images, `s` samples each, `z` latent dimensions, and `hc` columns of
/// the head product (mu, logvar, then any amortized flow parameters).
#[derive(Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub s: usize,
    pub z: usize,
    pub hc: usize,
    /// The clip on logvar (`model.logvar_min`, `model.logvar_max`; infinite when off).
    pub lv_min: f32,
    pub lv_max: f32,
}

impl Dims {
    /// The head's raw log-variance clipped to [lv_min, lv_max].
    #[inline(always)]
    pub fn clip_logvar(&self, raw: f32) -> f32 {
        raw.clamp(self.lv_min, self.lv_max)
    }

    /// 1 where the gradient passes the clip (strictly inside it), else 0.
    #[inline(always)]
    pub fn logvar_open(&self, raw: f32) -> f32 {
        (raw > self.lv_min && raw < self.lv_max) as u8 as f32
    }
}

/// Forward. Adds the head bias `hb` (Hc) to every row of `hd` (B, Hc); then per image
/// sigma = exp(logvar / 2) into `sigma` (B, Z), and per sample z = mu + sigma eps into `z`
/// (B S, Z) and lq = -1/2 sum_j (eps_j^2 + logvar_j) into `lq` (B S): log q(z|x) without its
/// -Z/2 ln 2 pi, which log p(z) cancels. The KL per image into `kl_img` (B) and summed over the
/// batch per dimension into `kl_dim` (Z). Returns the batch's summed KL.
#[allow(clippy::too_many_arguments)]
pub fn gaussian_forward(
    hd: &mut [f32],
    hb: &[f32],
    eps: &[f32],
    sigma: &mut [f32],
    z_out: &mut [f32],
    lq: &mut [f32],
    kl_img: &mut [f32],
    kl_dim: &mut [f32],
    d: Dims,
) -> f64 {
    let Dims { b, s, z, hc, .. } = d;
    simd!({
        let mut kl = 0f64;
        kl_dim.fill(0.0);
        for r in 0..b {
            let row = &mut hd[r * hc..(r + 1) * hc];
            for (v, bias) in row.iter_mut().zip(hb) {
                *v += bias;
            }
            let mut acc = 0f32;
            let mut lv_sum = 0f32;
            for j in 0..z {
                let (mu, lv) = (row[j], d.clip_logvar(row[z + j]));
                let sd = exp_f32(0.5 * lv);
                sigma[r * z + j] = sd;
                let k = mu * mu + sd * sd - lv - 1.0;
                kl_dim[j] += 0.5 * k;
                acc += k;
                lv_sum += lv;
            }
            kl_img[r] = 0.5 * acc;
            kl += 0.5 * acc as f64;
            for t in r * s..(r + 1) * s {
                let mut e2 = 0f32;
                for j in 0..z {
                    let e = eps[t * z + j];
                    z_out[t * z + j] = row[j] + sigma[r * z + j] * e;
                    e2 += e * e;
                }
                lq[t] = -0.5 * (e2 + lv_sum);
            }
        }
        kl
    })
}

/// Backward. `dz` (B S, Z) is d(loss)/dz; `cq` (B S), when given, the weight of each sample's
/// log q(z|x) - log p(z) in the loss (its -1/2 logvar term lands here; its z terms are in `dz`);
/// `ckl` (Z) the weight of each dimension's closed-form KL. Writes d(loss)/d[mu | logvar] into
/// columns [0, 2Z) of `d_hd` (B, Hc):
/// dmu = sum_s dz + ckl mu, dlogvar = sum_s (dz eps sigma / 2 - cq / 2) + ckl (sigma^2 - 1) / 2.
#[allow(clippy::too_many_arguments)]
pub fn gaussian_backward(
    d_hd: &mut [f32],
    hd: &[f32],
    sigma: &[f32],
    eps: &[f32],
    dz: &[f32],
    cq: Option<&[f32]>,
    ckl: &[f32],
    d: Dims,
) {
    let Dims { b, s, z, hc, .. } = d;
    simd!({
        for r in 0..b {
            let q: f32 = cq.map_or(0.0, |c| c[r * s..(r + 1) * s].iter().sum());
            for j in 0..z {
                let (mu, sd) = (hd[r * hc + j], sigma[r * z + j]);
                let (mut gm, mut ge) = (0f32, 0f32);
                for t in r * s..(r + 1) * s {
                    gm += dz[t * z + j];
                    ge += dz[t * z + j] * eps[t * z + j];
                }
                let c = ckl[j];
                d_hd[r * hc + j] = gm + c * mu;
                // The clip passes no gradient where it holds.
                let open = d.logvar_open(hd[r * hc + z + j]);
                d_hd[r * hc + z + j] = open * (0.5 * ge * sd - 0.5 * q + c * 0.5 * (sd * sd - 1.0));
            }
        }
    })
}

/// The autoencoder's forward: z = mu, the head product plus its bias, (B, Z).
pub fn identity_forward(hd: &mut [f32], hb: &[f32], z_out: &mut [f32], b: usize, z: usize) {
    for r in 0..b {
        for j in 0..z {
            hd[r * z + j] += hb[j];
            z_out[r * z + j] = hd[r * z + j];
        }
    }
}

/// The autoencoder's backward: dmu = dz.
pub fn identity_backward(d_hd: &mut [f32], dz: &[f32], b: usize, z: usize) {
    d_hd[..b * z].copy_from_slice(&dz[..b * z]);
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;

    #[test]
    fn hand_values() {
        // One image, Z = 2: mu = [1, -2], logvar = [0, ln 4] (sigma = [1, 2]) after a bias of
        // [0.5, 0, 0, 0] on a head product [0.5, -2, 0, ln 4]; eps = [0.5, -1]:
        // z = [1.5, -4]; KL = 1/2 (1 + 1 - 0 - 1) + 1/2 (4 + 4 - ln 4 - 1) = 0.5 + 2.806853;
        // lq = -1/2 (0.25 + 1 + 0 + ln 4) = -1.318147.
        let mut hd = vec![0.5f32, -2.0, 0.0, 4f32.ln()];
        let hb = [0.5f32, 0.0, 0.0, 0.0];
        let (mut sg, mut z, mut lq, mut ki, mut kd) =
            ([0f32; 2], [0f32; 2], [0f32], [0f32], [0f32; 2]);
        let d = Dims {
            b: 1,
            s: 1,
            z: 2,
            hc: 4,
            lv_min: f32::NEG_INFINITY,
            lv_max: f32::INFINITY,
        };
        let kl = gaussian_forward(
            &mut hd,
            &hb,
            &[0.5, -1.0],
            &mut sg,
            &mut z,
            &mut lq,
            &mut ki,
            &mut kd,
            d,
        );
        assert!(
            (z[0] - 1.5).abs() < 1e-6 && (z[1] + 4.0).abs() < 1e-5,
            "{z:?}"
        );
        assert!(
            (kl - 3.306853).abs() < 1e-5 && (ki[0] as f64 - kl).abs() < 1e-6,
            "{kl}"
        );
        assert!((kd[0] - 0.5).abs() < 1e-6 && (kd[1] - 2.806853).abs() < 1e-5);
        assert!((lq[0] + 1.318147).abs() < 1e-5, "{lq:?}");
        // Backward with dz = [1, 1], no MC term, KL weight 1: dmu = 1 + mu = [2, -1];
        // dlogvar = eps sigma / 2 + (sigma^2 - 1) / 2 = [0.25 + 0, -1 + 1.5] = [0.25, 0.5].
        let mut g = [0f32; 4];
        gaussian_backward(
            &mut g,
            &hd,
            &sg,
            &[0.5, -1.0],
            &[1.0, 1.0],
            None,
            &[1.0, 1.0],
            d,
        );
        let want = [2.0f32, -1.0, 0.25, 0.5];
        for (a, b) in g.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{g:?}");
        }
    }
}
