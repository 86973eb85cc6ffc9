//! The terms of the negative ELBO of Kingma & Welling (2013), eq. 10, per example in nats:
//! reconstruction NLL -log p(x|z) summed over pixels, and the closed-form KL(q(z|x) || N(0, I))
//! of their Appendix B: 1/2 * sum(mu^2 + sigma^2 - log sigma^2 - 1).

use candle_core::{Result, Tensor};

/// A learned Gaussian decoder's sigma is kept >= 0.01: MNIST's border pixels are always 0, and
/// without a floor their variance collapses and the likelihood runs to infinity.
pub const MIN_LOGVAR: f64 = -9.210_340_371_976_182; // ln(0.01^2)

/// ln(2 pi), the Gaussian log-normalizer per dimension.
pub const LN_2PI: f64 = 1.837_877_066_409_345_3;

/// Bernoulli NLL of `x` in [0,1] under `logits`, summed over pixels: (B, D), (B, D) -> (B,).
/// The stable form max(l, 0) - l x + log(1 + exp(-|l|)): finite for any finite logit.
pub fn bernoulli_nll(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((logits.relu()? - (logits * x)?)? + softplus_neg_abs)?.sum(1)
}

/// Gaussian NLL of `x` under N(mean, exp(logvar)), summed over pixels, log-normalizer included:
/// 1/2 * sum((x - mean)^2 / var + logvar + ln 2 pi). `mean` is (B, D); `logvar` is (B, D), (D,)
/// or (1,) and broadcasts.
pub fn gaussian_nll(mean: &Tensor, logvar: &Tensor, x: &Tensor) -> Result<Tensor> {
    let sq = (x - mean)?.sqr()?;
    let t = (sq
        .broadcast_mul(&logvar.neg()?.exp()?)?
        .broadcast_add(logvar)?
        + LN_2PI)?;
    t.sum(1)? * 0.5
}

/// KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions: (B, Z), (B, Z) -> (B,).
pub fn kl_std_normal(mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let t = ((mu.sqr()? + logvar.exp()?)? - logvar)?;
    (t - 1.0)?.sum(1)? * 0.5
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], cols: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (v.len() / cols, cols), &Device::Cpu).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn bce_hand_values_and_extremes() {
        // Rows: [l=0,x=1] -> ln 2 = 0.693147; [l=2,x=0.25] -> 2 - 0.5 + ln(1+e^-2) = 1.626928;
        // [l=100,x=1] -> ln(1+e^-100) ~ 0; [l=100,x=0] -> 100; [l=-100,x=1] -> 100; [l=-100,x=0] -> 0.
        let l = t(&[0.0, 2.0, 100.0, 100.0, -100.0, -100.0], 1);
        let x = t(&[1.0, 0.25, 1.0, 0.0, 1.0, 0.0], 1);
        let got = bernoulli_nll(&l, &x).unwrap().to_vec1::<f32>().unwrap();
        close(&got, &[0.693147, 1.626928, 0.0, 100.0, 100.0, 0.0], 1e-5);
        assert!(got.iter().all(|v| v.is_finite()));
        // Summed over a row: 0.693147 + 1.626928 = 2.320075.
        let row = bernoulli_nll(&t(&[0.0, 2.0], 2), &t(&[1.0, 0.25], 2)).unwrap();
        close(&row.to_vec1::<f32>().unwrap(), &[2.320075], 1e-5);
    }

    #[test]
    fn kl_hand_values() {
        // [mu=0,lv=0] -> 0; [mu=1,lv=0] -> 0.5; [mu=0,lv=ln 2] -> 0.5*(2 - 0.693147 - 1) = 0.153426;
        // a 2-d row [mu=(1,2), lv=0] -> 0.5*(1 + 4) = 2.5.
        let mu = t(&[0.0, 1.0, 0.0], 1);
        let lv = t(&[0.0, 0.0, std::f32::consts::LN_2], 1);
        close(
            &kl_std_normal(&mu, &lv).unwrap().to_vec1::<f32>().unwrap(),
            &[0.0, 0.5, 0.153426],
            1e-6,
        );
        let two = kl_std_normal(&t(&[1.0, 2.0], 2), &t(&[0.0, 0.0], 2)).unwrap();
        close(&two.to_vec1::<f32>().unwrap(), &[2.5], 1e-6);
    }

    #[test]
    fn gaussian_hand_values() {
        // [x=mean, lv=0] -> 0.5 ln 2pi = 0.918939;
        // [x-mean=1, lv=ln 4] -> 0.5*(1/4 + 1.386294 + 1.837877) = 1.737086.
        let mean = t(&[0.5, 0.0], 1);
        let x = t(&[0.5, 1.0], 1);
        let lv = t(&[0.0, 4f32.ln()], 1);
        close(
            &gaussian_nll(&mean, &lv, &x)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &[0.918939, 1.737086],
            1e-5,
        );
        // A (D,) log-variance broadcasts over the batch: two rows of the first case.
        let m2 = t(&[0.5, 0.5], 1);
        let lv1 = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        close(
            &gaussian_nll(&m2, &lv1, &m2)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &[0.918939, 0.918939],
            1e-5,
        );
    }
}
