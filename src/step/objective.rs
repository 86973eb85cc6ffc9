//! The objectives over an image's S samples, as per-sample weights on the sample's terms:
//! - the ELBO, or its Monte-Carlo mean over S samples: -ELBO = 1/S sum_s [-log p(x|z_s)
//!   + KL term]; every sample's reconstruction weighs 1/S;
//! - the importance-weighted bound (Burda, Grosse & Salakhutdinov 2015, eq. 8 and 14):
//!   -log 1/S sum_s w_s with log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x), whose gradient
//!   weighs sample s's terms by its normalized weight w~_s = w_s / sum_t w_t.

use super::math::logsumexp;

/// Which bound a step minimizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The (Monte-Carlo) ELBO, with a KL weight; free bits on its closed-form KL.
    Elbo,
    /// The importance-weighted bound.
    Iwae,
    /// The autoencoder: the reconstruction alone.
    Ae,
}

/// IWAE forward and backward for one image: from its S samples' `nll` = -log p(x|z_s) and
/// `lqp` = log q(z_s|x) - log p(z_s), the bound -(logsumexp_s log w_s - ln S) (returned) and
/// the normalized weights w~_s into `c` (its gradient w.r.t. each sample's nll and lqp).
pub fn iwae(nll: &[f32], lqp: &[f32], c: &mut [f32]) -> f64 {
    let s = nll.len();
    let mut lw = [0f64; 64];
    let mut big = Vec::new();
    let lw: &mut [f64] = if s <= 64 {
        &mut lw[..s]
    } else {
        big.resize(s, 0.0);
        &mut big
    };
    for i in 0..s {
        lw[i] = -(nll[i] as f64 + lqp[i] as f64);
    }
    let lse = logsumexp(lw);
    for i in 0..s {
        c[i] = (lw[i] - lse).exp() as f32;
    }
    -(lse - (s as f64).ln())
}

/// Below this fraction of its image's largest normalized weight, a sample's terms in the IWAE
/// gradient are under f32's rounding of the largest sample's term (2^-24): the backward leaves
/// such samples out.
pub const IW_NEGLIGIBLE: f32 = 1.0 / 16_777_216.0;

/// The samples of each image (runs of `s` in `c`) whose normalized weight is at least
/// `IW_NEGLIGIBLE` of the image's largest, as increasing row indices into `keep`; the others'
/// weights in `c` become 0.
pub fn iwae_keep(c: &mut [f32], s: usize, keep: &mut Vec<u32>) {
    keep.clear();
    for (b, w) in c.chunks_exact_mut(s).enumerate() {
        let cut = w.iter().copied().fold(0f32, f32::max) * IW_NEGLIGIBLE;
        for (j, v) in w.iter_mut().enumerate() {
            if *v >= cut {
                keep.push((b * s + j) as u32);
            } else {
                *v = 0.0;
            }
        }
    }
}

/// The free-bits mask of Kingma et al. (2016) as per-dimension KL weights: `kl_dim` (Z) holds the
/// batch's summed KL per dimension; a dimension whose batch-mean KL is under `free_bits` nats
/// is not penalized (weight 0), the others weigh `weight`.
pub fn kl_weights(ckl: &mut [f32], kl_dim: &[f32], b: usize, weight: f32, free_bits: f32) {
    for (c, &k) in ckl.iter_mut().zip(kl_dim) {
        let under = free_bits > 0.0 && k / (b as f32) < free_bits;
        *c = if under { 0.0 } else { weight };
    }
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;

    #[test]
    fn iwae_hand_values() {
        // Two samples with log w = [-1, -1 - ln 3]: w~ = [3/4, 1/4];
        // bound = -(log(e^-1 (1 + 1/3)) - ln 2) = 1 - ln(4/3) + ln 2 = 1.405465.
        let mut c = [0f32; 2];
        let b = iwae(&[0.5, 0.5 + 3f32.ln()], &[0.5, 0.5], &mut c);
        assert!(
            (c[0] - 0.75).abs() < 1e-6 && (c[1] - 0.25).abs() < 1e-6,
            "{c:?}"
        );
        assert!((b - 1.405465).abs() < 1e-5, "{b}");
        // One sample: the ELBO, weight 1.
        let mut c = [0f32; 1];
        assert!((iwae(&[2.0], &[1.0], &mut c) - 3.0).abs() < 1e-9 && c[0] == 1.0);
    }

    #[test]
    fn negligible_samples_are_dropped() {
        // Image 0: weights [1 - 1e-9, 1e-9]: the second is under 2^-24 of the first. Image 1:
        // [0.5, 0.5]: both kept.
        let mut c = [1.0 - 1e-9, 1e-9, 0.5, 0.5];
        let mut keep = Vec::new();
        iwae_keep(&mut c, 2, &mut keep);
        assert_eq!(keep, vec![0, 2, 3]);
        assert_eq!(c[1], 0.0);
    }

    #[test]
    fn free_bits_mask() {
        // Batch of 2: dimension means [0.1, 0.5]; with 0.25 free bits the first is free.
        let mut c = [9f32; 2];
        kl_weights(&mut c, &[0.2, 1.0], 2, 0.7, 0.25);
        assert_eq!(c, [0.0, 0.7]);
    }
}
