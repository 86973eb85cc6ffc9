//! One step of an inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever &
//! Welling 2016, "Improving Variational Inference with Inverse Autoregressive Flow", Algorithm 1)
//! as a layer: a MADE (Germain et al. 2015) with two masked hidden layers of `width` ELU units,
//! the encoder's context h added through a dense layer to the first pre-activation, gives
//! [m, s] from z; then
//!
//!   sigma = sigmoid(s + SHIFT),  z' = sigma * z + (1 - sigma) * m,  log q -= sum_i log sigma_i.
//!
//! Shapes, R = B S sample rows sharing each image's context over its S samples:
//!   z (R, Z), h (B, C);  a1 = z W1 + (h Wc + bc) + b1, h1 = elu(a1)  (R, W);
//!   a2 = h1 W2 + b2, h2 = elu(a2)  (R, W);  [m | s] = h2 Wo + bo  (R, 2Z).
//! W1, W2 and Wo are masked (`crate::made::Masks`): m_i and s_i depend on z_j only for j < i,
//! so dz'/dz is triangular with diagonal sigma and log|det| = sum log sigma. The masks are kept
//! as each row's first connected column: the stored weights hold zeros there from the start, the
//! products run dense, and the backward zeroes the same entries of the weight gradients.
//!
//! The backward, with g = dL/dz' and cq each row's weight on log q (dL/d log sigma_i = -cq):
//!   dm = g (1 - sigma), ds = g (z - m) sigma (1 - sigma) - cq (1 - sigma), dz = g sigma + ...;
//!   then the three dense layers' backward (`linear`), elu'(a) = 1 for a > 0, else elu(a) + 1,
//!   and the context's: dcw = sum over an image's samples of da1, dWc = h^T dcw, dh = dcw Wc^T.

use super::linear::{linear_backward, linear_forward, Lin};
use super::math::{exp_f32, simd, softplus_and_sigmoid};
use crate::made::{Masks, SHIFT};

/// One step's parameters in `theta` and its masks.
#[derive(Debug, Clone)]
pub struct Made {
    /// z (Z) -> width, masked.
    pub l1: Lin,
    /// The context h (C) -> width, dense.
    pub ctx: Lin,
    /// width -> width, masked.
    pub l2: Lin,
    /// width -> [m | s] (2Z), masked.
    pub out: Lin,
    pub masks: Masks,
}

impl Made {
    /// The next step's layers in a flat buffer whose `size` it advances.
    pub fn alloc(size: &mut usize, zd: usize, width: usize, context: usize) -> Made {
        Made {
            l1: Lin::alloc(size, zd, width),
            ctx: Lin::alloc(size, context, width),
            l2: Lin::alloc(size, width, width),
            out: Lin::alloc(size, width, 2 * zd),
            masks: Masks::new(zd, width),
        }
    }

    /// Zeroes the masked entries of the step's weights in `buf` (the parameters at
    /// initialization, their gradients after each backward).
    pub fn mask(&self, buf: &mut [f32]) {
        // The layers lie in the order l1, ctx, l2, out: split the three weights apart.
        let (l1, l2, out) = (&self.l1, &self.l2, &self.out);
        let (head, rest) = buf[l1.w..out.b].split_at_mut(l2.w - l1.w);
        let (mid, tail) = rest.split_at_mut(out.w - l2.w);
        self.masks.apply(
            &mut head[..l1.b - l1.w],
            &mut mid[..l2.b - l2.w],
            &mut tail[..out.b - out.w],
        );
    }
}

/// What the forward keeps for the backward, and the backward's scratch: each (R, W) but `ms`
/// (R, 2Z), `sig` (R, Z) and `cw` (B, W).
pub struct Cache<'a> {
    pub a1: &'a mut [f32],
    pub h1: &'a mut [f32],
    pub a2: &'a mut [f32],
    pub h2: &'a mut [f32],
    pub ms: &'a mut [f32],
    pub sig: &'a mut [f32],
    pub cw: &'a mut [f32],
}

#[inline(always)]
fn elu(a: f32) -> f32 {
    if a > 0.0 {
        a
    } else {
        exp_f32(a) - 1.0
    }
}

/// a += bias per row, then h = elu(a) (rows of `n`).
fn bias_elu(a: &mut [f32], h: &mut [f32], bias: &[f32], n: usize) {
    simd!({
        for (ar, hr) in a.chunks_exact_mut(n).zip(h.chunks_exact_mut(n)) {
            for ((av, hv), b) in ar.iter_mut().zip(hr.iter_mut()).zip(bias) {
                *av += b;
                *hv = elu(*av);
            }
        }
    })
}

/// d (the gradient at h) *= elu'(a), in place.
fn elu_backward(d: &mut [f32], a: &[f32], h: &[f32]) {
    simd!({
        for ((dv, av), hv) in d.iter_mut().zip(a).zip(h) {
            *dv *= if *av > 0.0 { 1.0 } else { hv + 1.0 };
        }
    })
}

/// The forward of one step over `rows` = B `per` samples: z_out from z_in (rows, Z) and the
/// context `h` (B, C); lq[r] -= sum_i log sigma_i.
#[allow(clippy::too_many_arguments)]
pub fn iaf_forward(
    z_in: &[f32],
    h: &[f32],
    z_out: &mut [f32],
    th: &[f32],
    m: &Made,
    rows: usize,
    per: usize,
    c: Cache,
    lq: &mut [f32],
    par: bool,
) {
    let (zd, w) = (m.masks.zd, m.masks.width);
    let b = rows / per;
    // The context's share of the first pre-activation, once per image: cw = h Wc + bc + b1.
    linear_forward(c.cw, h, th, m.ctx, b, par);
    let (bc, b1) = (&th[m.ctx.b..m.ctx.end()], &th[m.l1.b..m.l1.end()]);
    linear_forward(c.a1, z_in, th, m.l1, rows, par);
    simd!({
        for (i, cwr) in c.cw[..b * w].chunks_exact_mut(w).enumerate() {
            for ((v, x), y) in cwr.iter_mut().zip(bc).zip(b1) {
                *v += x + y;
            }
            for r in i * per..(i + 1) * per {
                let (ar, hr) = (&mut c.a1[r * w..(r + 1) * w], &mut c.h1[r * w..(r + 1) * w]);
                for ((av, hv), cv) in ar.iter_mut().zip(hr.iter_mut()).zip(cwr.iter()) {
                    *av += cv;
                    *hv = elu(*av);
                }
            }
        }
    });
    linear_forward(c.a2, c.h1, th, m.l2, rows, par);
    bias_elu(
        &mut c.a2[..rows * w],
        &mut c.h2[..rows * w],
        &th[m.l2.b..m.l2.end()],
        w,
    );
    linear_forward(c.ms, c.h2, th, m.out, rows, par);
    let bo = &th[m.out.b..m.out.end()];
    simd!({
        for r in 0..rows {
            let msr = &mut c.ms[r * 2 * zd..(r + 1) * 2 * zd];
            for (v, bv) in msr.iter_mut().zip(bo) {
                *v += bv;
            }
            let mut logdet = 0f32;
            for i in 0..zd {
                let (mv, sv) = (msr[i], msr[zd + i] + SHIFT);
                // log sigmoid(s) = -softplus(-s); sigmoid(s) from the same exp.
                let (sp, sg) = softplus_and_sigmoid(-sv);
                let sigma = 1.0 - sg;
                logdet -= sp;
                c.sig[r * zd + i] = sigma;
                let zv = z_in[r * zd + i];
                z_out[r * zd + i] = sigma * zv + (1.0 - sigma) * mv;
            }
            lq[r] -= logdet;
        }
    })
}

/// The backward of one step. `g` (rows, Z) holds dL/dz_out and becomes dL/dz_in; `cq` (rows)
/// each row's weight on log q (None: 0); the step's parameter gradients are written into
/// `gth` (at the step's offsets, masked entries zero) and dL/dh (B, C) is added to `dh`.
/// `d1` (rows, W), `d2` (at least rows W and B C) and `dz` (rows, Z) are scratch.
#[allow(clippy::too_many_arguments)]
pub fn iaf_backward(
    g: &mut [f32],
    z_in: &[f32],
    h: &[f32],
    dh: &mut [f32],
    th: &[f32],
    gth: &mut [f32],
    m: &Made,
    rows: usize,
    per: usize,
    c: Cache,
    cq: Option<&[f32]>,
    (d1, d2, dz): (&mut [f32], &mut [f32], &mut [f32]),
    par: bool,
) {
    let (zd, w) = (m.masks.zd, m.masks.width);
    let b = rows / per;
    // d[m | s] into ms (its values are read first), and g's direct term g sigma.
    simd!({
        for r in 0..rows {
            let q = cq.map_or(0.0, |q| q[r]);
            for i in 0..zd {
                let k = r * 2 * zd;
                let (mv, sigma) = (c.ms[k + i], c.sig[r * zd + i]);
                let gv = g[r * zd + i];
                let zv = z_in[r * zd + i];
                c.ms[k + i] = gv * (1.0 - sigma);
                c.ms[k + zd + i] = (gv * (zv - mv) * sigma - q) * (1.0 - sigma);
                g[r * zd + i] = gv * sigma;
            }
        }
    });
    // The output layer: dWo = h2^T dms, dbo, dh2 = dms Wo^T.
    linear_backward(gth, Some(&mut *d2), c.h2, c.ms, th, m.out, rows, par);
    elu_backward(&mut d2[..rows * w], c.a2, c.h2);
    linear_backward(gth, Some(&mut *d1), c.h1, d2, th, m.l2, rows, par);
    elu_backward(&mut d1[..rows * w], c.a1, c.h1);
    // The first layer: dW1 = z^T da1, db1 = colsum(da1), and dz += da1 W1^T.
    linear_backward(gth, Some(&mut *dz), z_in, d1, th, m.l1, rows, par);
    simd!({
        for (gv, dv) in g[..rows * zd].iter_mut().zip(&dz[..rows * zd]) {
            *gv += dv;
        }
    });
    // The context: each image's da1 summed over its samples, then its dense layer.
    simd!({
        for i in 0..b {
            let cwr = &mut c.cw[i * w..(i + 1) * w];
            cwr.copy_from_slice(&d1[i * per * w..(i * per + 1) * w]);
            for r in i * per + 1..(i + 1) * per {
                for (v, d) in cwr.iter_mut().zip(&d1[r * w..(r + 1) * w]) {
                    *v += d;
                }
            }
        }
    });
    // dWc = h^T dcw, dbc = colsum(dcw), and dh += dcw Wc^T (through d2, free again).
    let cn = m.ctx.n_in;
    assert!(
        d2.len() >= b * cn,
        "iaf_backward: d2 holds max(R W, B C) values"
    );
    linear_backward(gth, Some(&mut d2[..b * cn]), h, c.cw, th, m.ctx, b, par);
    for (a, t) in dh[..b * cn].iter_mut().zip(&d2[..b * cn]) {
        *a += t;
    }
    m.mask(gth);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A step with seeded parameters (masked), a batch of z and contexts.
    struct Fixture {
        m: Made,
        th: Vec<f32>,
        z: Vec<f32>,
        h: Vec<f32>,
        rows: usize,
        per: usize,
    }

    fn fixture(zd: usize, width: usize, ctx: usize, b: usize, per: usize, seed: u64) -> Fixture {
        let mut size = 0;
        let m = Made::alloc(&mut size, zd, width, ctx);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut th: Vec<f32> = (0..size).map(|_| rng.random_range(-0.6..0.6)).collect();
        m.mask(&mut th);
        let rows = b * per;
        let z = (0..rows * zd)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let h = (0..b * ctx).map(|_| rng.random_range(-1.0..1.0)).collect();
        Fixture {
            m,
            th,
            z,
            h,
            rows,
            per,
        }
    }

    /// The step's buffers for a fixture, owned.
    struct Bufs {
        a1: Vec<f32>,
        h1: Vec<f32>,
        a2: Vec<f32>,
        h2: Vec<f32>,
        ms: Vec<f32>,
        sig: Vec<f32>,
        cw: Vec<f32>,
    }

    impl Bufs {
        fn new(f: &Fixture) -> Bufs {
            let (zd, w, r) = (f.m.masks.zd, f.m.masks.width, f.rows);
            let rw = || vec![0.0; r * w];
            Bufs {
                a1: rw(),
                h1: rw(),
                a2: rw(),
                h2: rw(),
                ms: vec![0.0; r * 2 * zd],
                sig: vec![0.0; r * zd],
                cw: vec![0.0; r / f.per * w],
            }
        }

        fn cache(&mut self) -> Cache<'_> {
            Cache {
                a1: &mut self.a1,
                h1: &mut self.h1,
                a2: &mut self.a2,
                h2: &mut self.h2,
                ms: &mut self.ms,
                sig: &mut self.sig,
                cw: &mut self.cw,
            }
        }
    }

    /// Forward on `z`; returns (z_out, lq, [m | s]) and the buffers.
    fn run(f: &Fixture, z: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Bufs) {
        let mut bufs = Bufs::new(f);
        let zd = f.m.masks.zd;
        let (mut zo, mut lq) = (vec![0.0; f.rows * zd], vec![0.0; f.rows]);
        let c = bufs.cache();
        iaf_forward(
            z, &f.h, &mut zo, &f.th, &f.m, f.rows, f.per, c, &mut lq, false,
        );
        let ms = bufs.ms.clone();
        (zo, lq, ms, bufs)
    }

    /// The pair on L = sum_r (sum_i u_ri z'_ri + cq_r lq_r): (z', lq, dL/dz, dL/dtheta, dL/dh).
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    fn grads(f: &Fixture, u: &[f32], cq: &[f32]) -> Grads {
        let (zd, w, r) = (f.m.masks.zd, f.m.masks.width, f.rows);
        let (zo, lq, _, mut bufs) = run(f, &f.z);
        let mut g = u.to_vec();
        let (mut gth, mut dh) = (vec![0f32; f.th.len()], vec![0f32; f.h.len()]);
        let (mut d1, mut d2, mut dz) = (vec![0.0; r * w], vec![0.0; r * w], vec![0.0; r * zd]);
        let scratch = (&mut d1[..], &mut d2[..], &mut dz[..]);
        let (h, th, m, c) = (&f.h, &f.th, &f.m, bufs.cache());
        iaf_backward(
            &mut g,
            &f.z,
            h,
            &mut dh,
            th,
            &mut gth,
            m,
            r,
            f.per,
            c,
            Some(cq),
            scratch,
            false,
        );
        (zo, lq, g, gth, dh)
    }

    /// Seeded weights u (rows, Z) on z' and cq (rows) on lq.
    fn loss_weights(f: &Fixture, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let u = (0..f.rows * f.m.masks.zd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let cq = (0..f.rows).map(|_| rng.random_range(0.5..1.5)).collect();
        (u, cq)
    }

    #[test]
    fn hand_values_of_a_one_dimensional_step() {
        // Z = 1: no input reaches the hidden units, so m and s are functions of the context
        // alone. With every weight 0 but the output biases (m 0.5, s 0.5): s + SHIFT = 2,
        // sigma = sigmoid(2) = 0.880797, z' = 0.880797 z + 0.119203 * 0.5, log sigma = -0.126928.
        let mut size = 0;
        let m = Made::alloc(&mut size, 1, 2, 1);
        let mut th = vec![0f32; size];
        th[m.out.b] = 0.5;
        th[m.out.b + 1] = 0.5;
        let f = Fixture {
            m,
            th,
            z: vec![2.0],
            h: vec![0.3],
            rows: 1,
            per: 1,
        };
        let (zo, lq, _, _) = run(&f, &f.z);
        assert!(
            (zo[0] - (0.880_797 * 2.0 + 0.119_203 * 0.5)).abs() < 1e-5,
            "{zo:?}"
        );
        assert!((lq[0] - 0.126_928).abs() < 1e-5, "{lq:?}");
    }

    #[test]
    fn m_and_s_depend_on_earlier_dimensions_only() {
        // Moving z_j changes m_i, s_i only for i > j (exactly nothing for i <= j), and changes
        // some of them for each j < Z - 1: the Jacobian is strictly triangular in this order.
        let f = fixture(5, 12, 3, 2, 3, 7);
        let zd = 5;
        let (_, _, base, _) = run(&f, &f.z);
        for j in 0..zd {
            let mut z = f.z.clone();
            for r in 0..f.rows {
                z[r * zd + j] += 0.7;
            }
            let (_, _, moved, _) = run(&f, &z);
            let mut later_moved = false;
            for r in 0..f.rows {
                for i in 0..zd {
                    for half in 0..2 {
                        let k = r * 2 * zd + half * zd + i;
                        if i <= j {
                            assert_eq!(
                                moved[k], base[k],
                                "row {r}: z_{j} moved output {i} (half {half})"
                            );
                        } else if moved[k] != base[k] {
                            later_moved = true;
                        }
                    }
                }
            }
            assert_eq!(
                later_moved,
                j + 1 < zd,
                "z_{j} should reach some later output"
            );
        }
    }

    /// The backward against central differences of the forward (accumulated in f64): a check
    /// of the pair on its own; the next test checks it against candle's autograd.
    #[test]
    fn backward_matches_finite_differences() {
        let f = fixture(4, 6, 3, 2, 2, 11);
        let (u, cq) = loss_weights(&f, 5);
        let loss = |th: &[f32], z: &[f32], h: &[f32]| -> f64 {
            let g = Fixture {
                m: f.m.clone(),
                th: th.to_vec(),
                z: z.to_vec(),
                h: h.to_vec(),
                ..f
            };
            let (zo, lq, _, _) = run(&g, z);
            let a: f64 = zo
                .iter()
                .zip(&u)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            a + lq
                .iter()
                .zip(&cq)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let (_, _, g, gth, dh) = grads(&f, &u, &cq);
        let eps = 1e-2f32;
        let num = |plus: f64, minus: f64| (plus - minus) / (2.0 * eps as f64);
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() < 2e-3 * (1.0 + b.abs()),
                "{what}: backward {a}, differences {b}"
            );
        };
        // Masked weights are structurally zero: their gradient must be 0, not the slope a
        // dense perturbation would give.
        let mut connected = vec![1f32; f.th.len()];
        f.m.mask(&mut connected);
        let nudged = |v: &[f32], i: usize, by: f32| {
            let mut v = v.to_vec();
            v[i] += by;
            v
        };
        for i in 0..f.th.len() {
            if connected[i] == 0.0 {
                assert_eq!(gth[i], 0.0, "masked theta[{i}]");
                continue;
            }
            let n = num(
                loss(&nudged(&f.th, i, eps), &f.z, &f.h),
                loss(&nudged(&f.th, i, -eps), &f.z, &f.h),
            );
            close(gth[i] as f64, n, &format!("theta[{i}]"));
        }
        for (i, gi) in g.iter().enumerate() {
            let n = num(
                loss(&f.th, &nudged(&f.z, i, eps), &f.h),
                loss(&f.th, &nudged(&f.z, i, -eps), &f.h),
            );
            close(*gi as f64, n, &format!("z[{i}]"));
        }
        for (i, di) in dh.iter().enumerate() {
            let n = num(
                loss(&f.th, &f.z, &nudged(&f.h, i, eps)),
                loss(&f.th, &f.z, &nudged(&f.h, i, -eps)),
            );
            close(*di as f64, n, &format!("h[{i}]"));
        }
    }

    /// The pair against candle's autograd on `model::iaf::IafStep` (the oracle): the same
    /// parameters, z and contexts, the same L; every gradient, of the weights (masked entries
    /// included: zero on both sides), of z and of the context.
    #[test]
    fn backward_matches_candle_autograd() {
        use candle_core::{Device, Tensor, Var};
        let (zd, w, cn, b, per) = (6, 10, 4, 3, 2);
        let f = fixture(zd, w, cn, b, per, 23);
        let r = f.rows;
        let (u, cq) = loss_weights(&f, 9);
        let (zo, lq, g, gth, dh) = grads(&f, &u, &cq);
        // The candle side: (out, in) weights, the transposes of theta's (in, out).
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let lins = [
            ("l1", f.m.l1),
            ("ctx", f.m.ctx),
            ("l2", f.m.l2),
            ("out", f.m.out),
        ];
        let t2 = |v: &[f32], rows: usize, cols: usize| {
            Tensor::from_slice(v, (rows, cols), &dev)
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
        };
        {
            let mut data = vm.data().lock().unwrap();
            for (name, l) in lins {
                let wt = t2(&f.th[l.w..l.b], l.n_in, l.n_out);
                data.insert(format!("{name}.weight"), Var::from_tensor(&wt).unwrap());
                let bt = Tensor::from_slice(&f.th[l.b..l.end()], l.n_out, &dev).unwrap();
                data.insert(format!("{name}.bias"), Var::from_tensor(&bt).unwrap());
            }
        }
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
        let step = crate::model::iaf::IafStep::new(zd, w, cn, vb).unwrap();
        let zv = Var::from_tensor(&Tensor::from_slice(&f.z, (r, zd), &dev).unwrap()).unwrap();
        let hv = Var::from_tensor(&Tensor::from_slice(&f.h, (b, cn), &dev).unwrap()).unwrap();
        // Each image's context repeated over its samples, image-major.
        let hrows = hv
            .as_tensor()
            .unsqueeze(1)
            .unwrap()
            .broadcast_as((b, per, cn))
            .unwrap();
        let (zo_c, logdet) = step
            .forward(zv.as_tensor(), &hrows.reshape((r, cn)).unwrap())
            .unwrap();
        let ut = Tensor::from_slice(&u, (r, zd), &dev).unwrap();
        let cqt = Tensor::from_slice(&cq, r, &dev).unwrap();
        // lq = -logdet.
        let zu = (zo_c.clone() * ut).unwrap().sum_all().unwrap();
        let loss = (zu - (logdet.clone() * cqt).unwrap().sum_all().unwrap()).unwrap();
        let gr = loss.backward().unwrap();
        let vecf = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let near = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 2e-4 * scale,
                    "{what}[{i}]: fused {x}, candle {y} (scale {scale})"
                );
            }
        };
        near(&zo, &vecf(&zo_c), "z'");
        near(&lq, &vecf(&logdet.neg().unwrap()), "lq");
        near(&g, &vecf(gr.get(zv.as_tensor()).unwrap()), "dz");
        near(&dh, &vecf(gr.get(hv.as_tensor()).unwrap()), "dh");
        let data = vm.data().lock().unwrap();
        for (name, l) in lins {
            let gw = gr.get(data[&format!("{name}.weight")].as_tensor()).unwrap();
            let gw = vecf(&gw.t().unwrap().contiguous().unwrap());
            near(&gth[l.w..l.b], &gw, &format!("{name}.weight"));
            let gb = vecf(gr.get(data[&format!("{name}.bias")].as_tensor()).unwrap());
            near(&gth[l.b..l.end()], &gb, &format!("{name}.bias"));
        }
    }
}
