//! The planar flow step as a layer (Rezende & Mohamed 2015, eq. 10-13):
//! f(z) = z + u^ tanh(w.z + b), with u^ = u + (m(w.u) - w.u) w / |w|^2, m(a) = softplus(a) - 1,
//! so that w.u^ = m(w.u) >= -1 and f is invertible (their Appendix A.1), and
//! log|det df/dz| = log|1 + (1 - tanh^2) m| (eq. 12, using w.u^ = m), computed as
//! log(tanh^2 + (1 - tanh^2) softplus(w.u)), the same value without f32 cancellation.
//!
//! A step's parameters come per "parameter row": amortized flows read (u, w, b) of image p from
//! the encoder head's output, shared by that image's S samples; a global flow has one parameter
//! row for all samples. `Params` says where they are in a buffer.

use super::math::{simd, softplus_and_sigmoid, tanh_f32};

/// Where the parameter rows of one flow step lie in a buffer: row p's u (Z), w (Z), b (1) at
/// `off + p * stride`; `n` rows, each shared by `per` consecutive samples.
#[derive(Clone, Copy)]
pub struct Params {
    pub off: usize,
    pub stride: usize,
    pub n: usize,
    pub per: usize,
}

impl Params {
    fn at(&self, p: usize) -> usize {
        self.off + p * self.stride
    }
}

/// The step's per-row constants, kept from forward to backward: u^ (n, Z), m (n); per sample
/// tanh(a) (rows) and det = 1 + (1 - tanh^2) m (rows); and the backward's scratch (2 Z).
pub struct Cache<'a> {
    pub uh: &'a mut [f32],
    pub m: &'a mut [f32],
    pub h: &'a mut [f32],
    pub det: &'a mut [f32],
    pub sums: &'a mut [f32],
}

/// Forward over `p.n * p.per` samples: z_out = f(z_in) (rows, Z), and lq[r] -= log|det| (so
/// that lq, log q(z_0|x), becomes log q(z_k|x)).
pub fn planar_forward(
    z_in: &[f32],
    z_out: &mut [f32],
    buf: &[f32],
    p: Params,
    zd: usize,
    c: Cache,
    lq: &mut [f32],
) {
    simd!({
        for i in 0..p.n {
            let o = p.at(i);
            let (u, w, b) = (&buf[o..o + zd], &buf[o + zd..o + 2 * zd], buf[o + 2 * zd]);
            let (wu, w2) = (dot(w, u), dot(w, w));
            let sp = softplus_and_sigmoid(wu).0;
            let m = sp - 1.0;
            let coef = (m - wu) / w2;
            let uh = &mut c.uh[i * zd..(i + 1) * zd];
            for j in 0..zd {
                uh[j] = u[j] + coef * w[j];
            }
            c.m[i] = m;
            for r in i * p.per..(i + 1) * p.per {
                let zi = &z_in[r * zd..(r + 1) * zd];
                let h = tanh_f32(dot(w, zi) + b);
                let zo = &mut z_out[r * zd..(r + 1) * zd];
                for j in 0..zd {
                    zo[j] = zi[j] + uh[j] * h;
                }
                // det = 1 + (1 - h^2) m, written as h^2 + (1 - h^2) softplus(w.u): two terms
                // >= 0, so no cancellation. The first form rounds to exactly 0 in f32 once
                // w.u < -17 (m = -1) and |h| < 2e-4, where the true det is about 3e-8: a
                // training run diverged there (log 0) at epoch 181.
                let det = h * h + (1.0 - h * h) * sp;
                c.h[r] = h;
                c.det[r] = det;
                lq[r] -= det.abs().ln();
            }
        }
    })
}

/// Backward. `g` (rows, Z) holds d(loss)/d z_out and becomes d(loss)/d z_in; `cq` (rows) is each
/// sample's weight on log q - log p, so d(loss)/d log|det| = -cq. The gradients of (u, w, b) go
/// to `gbuf` at the rows `gp` names (written, not added).
///
/// Per parameter row, with a = w.z + b, h = tanh a:
/// dh = g.u^ - cq (-2 h m) / det, da = dh (1 - h^2), dz_in = g + da w, and summed over its
/// samples du^ = g h, dw = da z, db = da, dm = -cq (1 - h^2) / det; then through u^'s constraint
/// (coef = (m - w.u) / |w|^2): dcoef = du^.w, dm += dcoef / |w|^2,
/// d(w.u) = dm sigmoid(w.u) - dcoef / |w|^2, d|w|^2 = -dcoef coef / |w|^2,
/// du = du^ + d(w.u) w, dw += coef du^ + d(w.u) u + 2 d|w|^2 w.
#[allow(clippy::too_many_arguments)]
pub fn planar_backward(
    g: &mut [f32],
    z_in: &[f32],
    buf: &[f32],
    p: Params,
    zd: usize,
    c: Cache,
    cq: Option<&[f32]>,
    gbuf: &mut [f32],
    gp: Params,
) {
    simd!({
        let (guh, gwa) = c.sums[..2 * zd].split_at_mut(zd);
        for i in 0..p.n {
            let o = p.at(i);
            let (u, w) = (&buf[o..o + zd], &buf[o + zd..o + 2 * zd]);
            let (uh, m) = (&c.uh[i * zd..(i + 1) * zd], c.m[i]);
            guh.fill(0.0);
            gwa.fill(0.0);
            let (mut gb, mut gm) = (0f32, 0f32);
            for r in i * p.per..(i + 1) * p.per {
                let (h, det) = (c.h[r], c.det[r]);
                let gld = -cq.map_or(0.0, |q| q[r]);
                let gr = &mut g[r * zd..(r + 1) * zd];
                let zi = &z_in[r * zd..(r + 1) * zd];
                let one_h2 = 1.0 - h * h;
                let dh = dot(gr, uh) + gld * (-2.0 * h * m) / det;
                gm += gld * one_h2 / det;
                let da = dh * one_h2;
                for j in 0..zd {
                    guh[j] += gr[j] * h;
                    gwa[j] += da * zi[j];
                    gr[j] += da * w[j];
                }
                gb += da;
            }
            let (wu, w2) = (dot(w, u), dot(w, w));
            let coef = (m - wu) / w2;
            let gcoef = dot(guh, w);
            let gm_tot = gm + gcoef / w2;
            let gwu = gm_tot * softplus_and_sigmoid(wu).1 - gcoef / w2;
            let gw2 = -gcoef * coef / w2;
            let go = gp.at(i);
            for j in 0..zd {
                gbuf[go + j] = guh[j] + gwu * w[j];
                gbuf[go + zd + j] = gwa[j] + coef * guh[j] + gwu * u[j] + 2.0 * gw2 * w[j];
            }
            gbuf[go + 2 * zd] = gb;
        }
    })
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;

    #[test]
    fn hand_values() {
        // Z = 1, u = 1, w = 1, b = 0: w.u = 1, m = softplus(1) - 1 = 0.313262, coef = m - 1,
        // u^ = m. At z = 0: a = 0, h = 0, f(z) = 0, det = 1 + m, log det = 0.272513.
        let buf = [1.0f32, 1.0, 0.0];
        let p = Params {
            off: 0,
            stride: 0,
            n: 1,
            per: 1,
        };
        let (mut uh, mut m, mut h, mut det, mut lq) = ([0f32], [0f32], [0f32], [0f32], [0f32]);
        let mut zo = [9f32];
        planar_forward(
            &[0.0],
            &mut zo,
            &buf,
            p,
            1,
            Cache {
                uh: &mut uh,
                m: &mut m,
                h: &mut h,
                det: &mut det,
                sums: &mut [],
            },
            &mut lq,
        );
        assert!((m[0] - 0.313_262).abs() < 1e-6 && (uh[0] - m[0]).abs() < 1e-6);
        assert!(
            zo[0].abs() < 1e-7 && (lq[0] + 0.272_513).abs() < 1e-5,
            "{zo:?} {lq:?}"
        );
    }

    #[test]
    fn contracting_step_keeps_a_finite_log_det() {
        // The state where a run diverged, Z = 1: u = -17.8 / w with w = 1, so w.u = -17.8,
        // m = softplus(-17.8) - 1 = -1 + 1.8602e-8 (-1 in f32), b = -1.2587e-4 and z = 0, so
        // h = tanh(b) = -1.2587e-4. det = 1 + (1 - h^2) m = h^2 + (1 - h^2) softplus(w.u)
        // = 1.5843e-8 + 1.8602e-8 = 3.4445e-8, log det = -17.184; the form 1 + (1 - h^2) m
        // gives 0 in f32 and log det = -inf.
        let buf = [-17.8f32, 1.0, -1.2587e-4];
        let p = Params {
            off: 0,
            stride: 0,
            n: 1,
            per: 1,
        };
        let (mut uh, mut m, mut h, mut det, mut lq) = ([0f32], [0f32], [0f32], [0f32], [0f32]);
        let mut zo = [0f32];
        planar_forward(
            &[0.0],
            &mut zo,
            &buf,
            p,
            1,
            Cache {
                uh: &mut uh,
                m: &mut m,
                h: &mut h,
                det: &mut det,
                sums: &mut [],
            },
            &mut lq,
        );
        assert!((det[0] / 3.4445e-8 - 1.0).abs() < 2e-3, "{det:?}");
        assert!((lq[0] - 17.184).abs() < 2e-3, "{lq:?}");
    }
}
