//! A conditional Gaussian density as a layer: the second stochastic layer's p(z1|z2) = N(mu,
//! diag e^logvar), its [mu | logvar] the head of an MLP on z2, scored at the z1 drawn below it
//! (Burda et al. 2015, section 2's multi-layer model; Tomczak & Welling 2018's HVAE). Each
//! sample's log q - log p gets -log p(z1|z2) = 1/2 sum_j (logvar_j + (z1_j - mu_j)^2 e^-logvar_j)
//! (the Z/2 ln 2 pi cancels log q's), and the backward, weighted per sample by `cq` (the sample's
//! weight on log q - log p in the loss), gives d(loss)/d[mu | logvar] for the head and
//! d(loss)/dz1 for the layer below:
//!
//!   d/dmu = -cq (z1 - mu) e^-lv,  d/dlv = cq (1 - (z1 - mu)^2 e^-lv) / 2,  d/dz1 = cq (z1 - mu) e^-lv.
//!
//! The sampled side of the same layer, q(z2|z1) = z2 = mu + sigma eps per row, is
//! `latent::gaussian_forward` / `gaussian_backward` with one sample per row. Rows are samples,
//! image-major as everywhere in the step; `hd` is (rows, Hc) with mu in columns [0, Z) and the raw
//! logvar in [Z, 2Z).

use super::adam::{adam_range, AdamStep, Moments};
use super::latent::Dims;
use super::linear::{self, Lin};
use super::math::{exp_f32, simd};
use crate::config::Activation;

/// The network of p(z1|z2): its MLP's layers on z2 and the [mu | logvar] head on their top,
/// the same in both wirings (the chain's `Upper::dec`, the hvae's `Hvae::p1`).
#[derive(Debug, Clone, Copy)]
pub struct Net<'a> {
    pub layers: &'a [Lin],
    pub head: Lin,
    pub act: Activation,
}

/// p(z1|z2)'s forward buffers: the MLP's pre-activations and activations, the head's output
/// (rows, 2Z1) and e^-logvar (rows, Z1).
pub struct NetWork<'a> {
    pub pre: &'a mut [Vec<f32>],
    pub out: &'a mut [Vec<f32>],
    pub hd: &'a mut [f32],
    pub inv: &'a mut [f32],
}

/// The forward's buffers as the backward reads them: pre-activations, activations, head, e^-lv.
type Kept<'a> = (&'a [Vec<f32>], &'a [Vec<f32>], &'a [f32], &'a [f32]);

impl Net<'_> {
    /// The MLP on `z2` (rows, Z2), the head, and -log p(z1|z2) at `z1` added to `lq`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        th: &[f32],
        z2: &[f32],
        z1: &[f32],
        w: NetWork,
        lq: &mut [f32],
        par: bool,
        d: Dims,
    ) {
        let rows = d.b;
        linear::mlp_forward(self.layers, z2, w.pre, w.out, th, rows, self.act, par);
        let top = &w.out[self.layers.len() - 1];
        linear::linear_forward(w.hd, top, th, self.head, rows, par);
        let hb = &th[self.head.b..self.head.end()];
        density_forward(w.hd, hb, z1, w.inv, lq, d);
    }

    /// Back from the per-row weights `cq`: d/dz1 added into `dz1`, the head's and the MLP's
    /// gradients and Adam steps, and d/dz2 (rows, Z2) left in `s.0`. `d_hd` (rows, 2Z1) and `s`
    /// are scratch; `pre`, `out`, `hd`, `inv` are the forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        (z2, z1, cq): (&[f32], &[f32], &[f32]),
        (pre, out, hd, inv): Kept,
        d_hd: &mut [f32],
        s: (&mut Vec<f32>, &mut Vec<f32>),
        dz1: &mut [f32],
        par: bool,
        d: Dims,
    ) {
        let rows = d.b;
        density_backward(d_hd, hd, inv, z1, cq, dz1, d);
        let top = &out[self.layers.len() - 1];
        let l = self.head;
        linear::linear_backward(st.g, Some(&mut *s.0), top, d_hd, th, l, rows, par);
        adam_range(adam, th, st, l.w, l.end());
        let shape = (rows, self.act, par);
        super::mlp_backward(
            self.layers,
            z2,
            (pre, out),
            s,
            th,
            st,
            adam,
            shape,
            true,
            &None,
        );
    }
}

/// Forward. Adds the head bias `hb` (2Z) to every row of `hd`, writes each row's e^-logvar
/// (logvar clipped as `d` says) into `inv` (rows, Z), and adds -log p(z1|z2) to `lq` (rows).
/// `d.b` is the number of rows (one sample each: `d.s` is 1).
pub fn density_forward(
    hd: &mut [f32],
    hb: &[f32],
    z1: &[f32],
    inv: &mut [f32],
    lq: &mut [f32],
    d: Dims,
) {
    let Dims { b: rows, z, hc, .. } = d;
    simd!({
        for r in 0..rows {
            let row = &mut hd[r * hc..(r + 1) * hc];
            for (v, bias) in row[..2 * z].iter_mut().zip(hb) {
                *v += bias;
            }
            let mut acc = 0f32;
            for j in 0..z {
                let lv = d.clip_logvar(row[z + j]);
                let iv = exp_f32(-lv);
                inv[r * z + j] = iv;
                let diff = z1[r * z + j] - row[j];
                acc += lv + diff * diff * iv;
            }
            lq[r] += 0.5 * acc;
        }
    })
}

/// Backward. Writes d(loss)/d[mu | logvar] into columns [0, 2Z) of `d_hd` (rows, Hc) and adds
/// d(loss)/dz1 into `dz1` (rows, Z), for per-row weights `cq` (rows).
pub fn density_backward(
    d_hd: &mut [f32],
    hd: &[f32],
    inv: &[f32],
    z1: &[f32],
    cq: &[f32],
    dz1: &mut [f32],
    d: Dims,
) {
    let Dims { b: rows, z, hc, .. } = d;
    simd!({
        for r in 0..rows {
            let c = cq[r];
            for j in 0..z {
                let (mu, iv) = (hd[r * hc + j], inv[r * z + j]);
                let diff = z1[r * z + j] - mu;
                let g = c * diff * iv;
                d_hd[r * hc + j] = -g;
                dz1[r * z + j] += g;
                // The clip passes no gradient where it holds.
                let open = d.logvar_open(hd[r * hc + z + j]);
                d_hd[r * hc + z + j] = open * 0.5 * c * (1.0 - diff * diff * iv);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn dims(rows: usize, z: usize, lo: f32, hi: f32) -> Dims {
        Dims {
            b: rows,
            s: 1,
            z,
            hc: 2 * z,
            lv_min: lo,
            lv_max: hi,
        }
    }

    #[test]
    fn hand_values() {
        // One row, Z = 2: mu = [1, -1], logvar = [0, ln 4] after a bias of [0.5, 0, 0, 0] on
        // [0.5, -1, 0, ln 4]; z1 = [2, 1]: -log p = 1/2 (0 + 1 + ln 4 + 4 / 4) = 1.693147.
        let mut hd = vec![0.5f32, -1.0, 0.0, 4f32.ln()];
        let (z1, mut inv, mut lq) = ([2f32, 1.0], [0f32; 2], [0.25f32]);
        let d = dims(1, 2, f32::NEG_INFINITY, f32::INFINITY);
        density_forward(&mut hd, &[0.5, 0.0, 0.0, 0.0], &z1, &mut inv, &mut lq, d);
        assert!((lq[0] - (0.25 + 1.693147)).abs() < 1e-5, "{lq:?}");
        assert!((inv[1] - 0.25).abs() < 1e-6);
        // cq = 2: dmu = -2 (z1 - mu) e^-lv = [-2, -1]; dlv = (1 - (z1 - mu)^2 e^-lv) = [0, 0];
        // dz1 = [2, 1] added to [1, 1].
        let (mut g, mut dz) = ([0f32; 4], [1f32, 1.0]);
        density_backward(&mut g, &hd, &inv, &z1, &[2.0], &mut dz, d);
        let want = [-2.0f32, -1.0, 0.0, 0.0];
        for (a, b) in g.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{g:?}");
        }
        assert!(
            (dz[0] - 3.0).abs() < 1e-6 && (dz[1] - 2.0).abs() < 1e-6,
            "{dz:?}"
        );
    }

    /// The pair against candle's autograd on rows of random heads and targets, with a clip that
    /// holds for some entries: sum_r cq_r (-log p(z1_r | head_r)).
    #[test]
    fn gradients_match_autograd() {
        let (rows, z) = (7, 3);
        let dev = Device::Cpu;
        let mut rng = 12345u64;
        let mut next = || {
            // A small LCG: reproducible values in [-2, 2).
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        let head: Vec<f32> = (0..rows * 2 * z).map(|_| next()).collect();
        let z1: Vec<f32> = (0..rows * z).map(|_| next()).collect();
        let cq: Vec<f32> = (0..rows).map(|r| 0.2 + 0.3 * r as f32).collect();
        let (lo, hi) = (-1.5f32, 1.5f32);
        let d = dims(rows, z, lo, hi);
        let mut hd = head.clone();
        let (mut inv, mut lq) = (vec![0f32; rows * z], vec![0f32; rows]);
        density_forward(&mut hd, &vec![0.0; 2 * z], &z1, &mut inv, &mut lq, d);
        let (mut g, mut dz) = (vec![0f32; rows * 2 * z], vec![0f32; rows * z]);
        density_backward(&mut g, &hd, &inv, &z1, &cq, &mut dz, d);

        let hv = Var::from_vec(head.clone(), (rows, 2 * z), &dev).unwrap();
        let zv = Var::from_vec(z1.clone(), (rows, z), &dev).unwrap();
        let mu = hv.narrow(1, 0, z).unwrap();
        let lv = hv
            .narrow(1, z, z)
            .unwrap()
            .maximum(lo as f64)
            .unwrap()
            .minimum(hi as f64)
            .unwrap();
        let nlp = (((zv.as_tensor() - &mu).unwrap().sqr().unwrap()
            * lv.neg().unwrap().exp().unwrap())
        .unwrap()
            + &lv)
            .unwrap()
            .sum(1)
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let c = Tensor::from_vec(cq.clone(), rows, &dev).unwrap();
        let loss = (&nlp * &c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let want_g = grads
            .get(&hv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want_dz = grads
            .get(&zv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want_lq = nlp.to_vec1::<f32>().unwrap();
        for (a, b) in lq.iter().zip(&want_lq) {
            assert!((a - b).abs() < 1e-4, "lq {a} vs {b}");
        }
        // Entries where the clip holds get no logvar gradient on both sides.
        let clipped = head
            .chunks(2 * z)
            .flat_map(|r| r[z..].to_vec())
            .filter(|v| *v <= lo || *v >= hi)
            .count();
        assert!(clipped > 0, "the test should exercise the clip");
        for (i, (a, b)) in g.iter().zip(&want_g).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "d_hd[{i}] {a} vs {b}"
            );
        }
        for (i, (a, b)) in dz.iter().zip(&want_dz).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "dz1[{i}] {a} vs {b}"
            );
        }
    }
}
