//! The fused CPU training step: the same model, loss and Adam as `model`, `loss` and `optim`, but
//! forward and backward written out by hand (Kingma & Welling 2013, eq. 10, and its gradients) on
//! preallocated buffers, with the matrix products on `gemm` (candle's own CPU matmul, built with
//! its AVX-512 kernels) and each elementwise stage one pass. No allocation and no graph per step.
//!
//! Candle's autograd spends ~20 ms a step on this model (graph, an allocation per intermediate,
//! twelve tensor ops per parameter for Adam); this path takes ~3.6-4.3 ms on two cores. The big
//! products are cut in halves, one per core; the loss pass is split by rows; the output layer's
//! Adam update runs beside the rest of the backward.
//! `tests::matches_autograd` checks its loss and gradients against candle's autograd.
//!
//! Layout: every parameter lives in one flat buffer `theta`; a weight is stored (in, out)
//! row-major, the transpose of the checkpoint's (out, in), because x (B, in) @ W (in, out) is
//! gemm's fast case. The two encoder heads are one (H, 2Z) matrix: mu columns, then logvar.

use crate::config::{Activation, DecoderKind, ModelConfig};
use crate::loss::LN_2PI;
use crate::model::MIN_LOGVAR;
use crate::optim::AdamConfig;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::collections::HashMap;

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (so the loops vectorize 8-wide and
/// `exp`'s floor is one instruction), else as plain x86-64.
macro_rules! simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn fast512<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                // SAFETY: the features were detected above.
                unsafe { fast512(|| $body) }
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                // SAFETY: the features were detected above.
                unsafe { fast(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// e^x for f32 in a form the compiler vectorizes: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
/// p the degree-6 Taylor polynomial (relative error < 2e-7 on that interval).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits. This stands in
    // for `floor` and `as i32`, whose saturating conversion does not vectorize (16 scalar
    // conversions per vector, 4x the cost of the whole rest).
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in [-126, 127], so its biased exponent n + 127 is in range.
    let bits = t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127);
    p * f32::from_bits(bits << 23)
}

/// ln(1 + y) for y in [0, 1] (the softplus tail): ln(1+y) = 2 atanh(s), s = y / (2 + y) <= 1/3,
/// odd series to s^11 (error < 1e-7).
#[inline(always)]
fn ln1p_unit(y: f32) -> f32 {
    let s = y / (2.0 + y);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0))))))
}

/// log(1 + e^a) and its derivative sigmoid(a), from one exp.
#[inline(always)]
fn softplus_and_sigmoid(a: f32) -> (f32, f32) {
    let e = exp_f32(-a.abs());
    let inv = 1.0 / (1.0 + e);
    let sig = if a >= 0.0 { inv } else { e * inv };
    (a.max(0.0) + ln1p_unit(e), sig)
}

#[inline(always)]
fn act_fwd(act: Activation, a: f32) -> f32 {
    match act {
        Activation::Relu => a.max(0.0),
        Activation::Tanh => {
            let e = exp_f32(-2.0 * a.abs());
            ((1.0 - e) / (1.0 + e)).copysign(a)
        }
        Activation::Softplus => softplus_and_sigmoid(a).0,
        Activation::Sigmoid => softplus_and_sigmoid(a).1,
        Activation::Gelu => f32::NAN, // not supported here; `supports` keeps it on the autograd path
    }
}

/// d act / d a, from the pre-activation `a` and the output `h`.
#[inline(always)]
fn act_grad(act: Activation, a: f32, h: f32) -> f32 {
    match act {
        Activation::Relu => {
            if a > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Tanh => 1.0 - h * h,
        Activation::Softplus => softplus_and_sigmoid(a).1,
        Activation::Sigmoid => h * (1.0 - h),
        Activation::Gelu => f32::NAN,
    }
}

/// Whether the fused step implements `cfg`: the VAE with one sample of z, no flows, any
/// activation but GELU; beta, KL warm-up and free bits included.
pub fn supports(cfg: &crate::config::Config) -> bool {
    let m = &cfg.model;
    m.activation != Activation::Gelu
        && m.kind == crate::config::ModelKind::Vae
        && m.flows == 0
        && cfg.train.mc_samples == 1
        && cfg.train.iw_samples == 1
}

/// One Adam step's constants (Kingma & Ba 2015, Algorithm 1, with PyTorch's placement of eps
/// and decoupled weight decay): the same update as `optim::Adam`.
#[derive(Clone, Copy)]
struct AdamStep {
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    decay: f32,
}

impl AdamStep {
    fn new(c: &AdamConfig, t: u64) -> Self {
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        AdamStep {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            step_size: (c.lr / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: c.eps as f32,
            decay: (1.0 - c.lr * c.weight_decay) as f32,
        }
    }

    /// Updates `th` from its gradient `g` and moments `m`, `v`, in parallel chunks.
    fn apply(&self, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
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

/// Adam on `[lo, hi)` of the parameters, when there is a step to take.
fn adam_range(
    adam: &Option<AdamStep>,
    th: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    lo: usize,
    hi: usize,
) {
    if let Some(a) = adam {
        a.apply(&mut th[lo..hi], &mut m[lo..hi], &mut v[lo..hi], &g[lo..hi]);
    }
}

/// A linear layer's place in `theta`: W (n_in, n_out) row-major at `w`, bias (n_out) at `b`.
#[derive(Debug, Clone, Copy)]
struct Lin {
    w: usize,
    b: usize,
    n_in: usize,
    n_out: usize,
}

/// Strides of a (rows, cols) operand stored row-major, or stored transposed (cols, rows):
/// (column stride, row stride), in elements.
fn strides(rows: usize, cols: usize, transposed: bool) -> (usize, usize) {
    if transposed {
        (rows, 1)
    } else {
        (1, cols)
    }
}

/// A raw pointer that two workers may share: `matmul` hands each one a disjoint part of C.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: only used to write disjoint column blocks of one buffer from two threads.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that a closure captures the `Shared`, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[allow(clippy::too_many_arguments)] // the BLAS shape: dst, two operands, three sizes, two flags
/// C (m, n) = A (m, k) @ B (k, n), row-major; `a_t`: A is stored (k, m); `b_t`: B is stored (n, k).
///
/// A big product is cut in two halves of C (row blocks, or column blocks when C has few rows),
/// one single-threaded gemm per worker: 5-8% faster per training step than gemm's own
/// two-thread split (measured alternating 25-step blocks in one process). Small products stay
/// on one thread: the hand-off costs more than it saves.
fn matmul(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, a_t: bool, b_t: bool) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_cs, a_rs) = strides(m, k, a_t);
    let (b_cs, b_rs) = strides(k, n, b_t);
    // Halves on 16-row (16-column) boundaries, gemm's vector width.
    let (m1, n1) = ((m / 2).div_ceil(16) * 16, (n / 2).div_ceil(16) * 16);
    let by_rows = m >= 256 || n < 256;
    if m * n * k < 1 << 23 || (by_rows && m1 >= m) || (!by_rows && n1 >= n) {
        return gemm_1(c, n, m, n, k, a, a_cs, a_rs, b, b_cs, b_rs);
    }
    if by_rows {
        let (c1, c2) = c.split_at_mut(m1 * n);
        rayon::join(
            || gemm_1(c1, n, m1, n, k, a, a_cs, a_rs, b, b_cs, b_rs),
            || {
                gemm_1(
                    c2,
                    n,
                    m - m1,
                    n,
                    k,
                    &a[m1 * a_rs..],
                    a_cs,
                    a_rs,
                    b,
                    b_cs,
                    b_rs,
                )
            },
        );
    } else {
        let cp = Shared(c.as_mut_ptr());
        // SAFETY: the two calls write the disjoint column blocks [0, n1) and [n1, n) of C, whose
        // (m, n) extent `c` holds (asserted above); the operands are only read.
        let part = |j0: usize, nn: usize| unsafe {
            gemm_raw(
                cp.get().add(j0),
                n,
                m,
                nn,
                k,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr().add(j0 * b_cs),
                b_cs,
                b_rs,
            )
        };
        rayon::join(|| part(0, n1), || part(n1, n - n1));
    }
}

#[allow(clippy::too_many_arguments)]
/// C (m, n) = A (m, k) @ B (k, n) on this thread, C row-major with row stride `c_rs`, A and B
/// strided; panics if a slice is shorter than its extent.
fn gemm_1(
    c: &mut [f32],
    c_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_cs: usize,
    a_rs: usize,
    b: &[f32],
    b_cs: usize,
    b_rs: usize,
) {
    let extent = |rows: usize, cols: usize, cs: usize, rs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        c.len() >= extent(m, n, 1, c_rs)
            && a.len() >= extent(m, k, a_cs, a_rs)
            && b.len() >= extent(k, n, b_cs, b_rs)
    );
    // SAFETY: each slice holds its operand's extent (asserted above).
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            c_rs,
            m,
            n,
            k,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
        )
    }
}

#[allow(clippy::too_many_arguments)]
/// `gemm_1` on raw pointers.
///
/// # Safety
/// The pointers must be valid for the extents the sizes and strides describe, and C's must not
/// be written by anyone else meanwhile.
unsafe fn gemm_raw(
    c: *mut f32,
    c_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_cs: usize,
    a_rs: usize,
    b: *const f32,
    b_cs: usize,
    b_rs: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        false,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Calls `$f::<ACT>(args)` with the activation as a const generic, so each inner loop is
/// compiled for one activation and vectorizes.
macro_rules! with_act {
    ($act:expr, $f:ident($($arg:expr),*)) => {
        match $act {
            Activation::Relu => $f::<0>($($arg),*),
            Activation::Tanh => $f::<1>($($arg),*),
            Activation::Softplus => $f::<2>($($arg),*),
            Activation::Sigmoid => $f::<3>($($arg),*),
            Activation::Gelu => $f::<4>($($arg),*),
        }
    };
}

const ACTS: [Activation; 5] = [
    Activation::Relu,
    Activation::Tanh,
    Activation::Softplus,
    Activation::Sigmoid,
    Activation::Gelu,
];

/// Adds `bias` to every row of `a` (rows, n) and writes act(a) to `h`.
fn bias_act(a: &mut [f32], h: &mut [f32], bias: &[f32], n: usize, act: Activation) {
    fn go<const A: usize>(a: &mut [f32], h: &mut [f32], bias: &[f32], n: usize) {
        simd!({
            for (ar, hr) in a.chunks_exact_mut(n).zip(h.chunks_exact_mut(n)) {
                for ((av, hv), bv) in ar.iter_mut().zip(hr.iter_mut()).zip(bias) {
                    *av += bv;
                    *hv = act_fwd(ACTS[A], *av);
                }
            }
        })
    }
    with_act!(act, go(a, h, bias, n))
}

/// d[j] *= act'(a[j]) in place.
fn act_backward(d: &mut [f32], a: &[f32], h: &[f32], act: Activation) {
    fn go<const A: usize>(d: &mut [f32], a: &[f32], h: &[f32]) {
        simd!({
            for ((dv, av), hv) in d.iter_mut().zip(a).zip(h) {
                *dv *= act_grad(ACTS[A], *av, *hv);
            }
        })
    }
    with_act!(act, go(d, a, h))
}

/// Sum of `v` in 16 lanes (a plain f32 sum is a serial chain the compiler may not reorder).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The Bernoulli NLL of rows of logits `out` (rows, D) without their bias `ob` (D) against `x`,
/// summed; d(NLL)/d(logit) into `d_out`. A function of its own so that `simd!`'s body is
/// compiled with the wide instructions (a closure nested in a closure is not inlined there).
fn bernoulli_rows(out: &mut [f32], x: &[f32], d_out: &mut [f32], ob: &[f32]) -> f64 {
    let dim = ob.len();
    simd!({
        let mut total = 0f64;
        for ((o, x), d) in out
            .chunks_exact_mut(dim)
            .zip(x.chunks_exact(dim))
            .zip(d_out.chunks_exact_mut(dim))
        {
            for j in 0..dim {
                let l = o[j] + ob[j];
                // max(l,0) - l x + log(1 + e^-|l|); d/dl = sigmoid(l) - x. The logit is not
                // needed after this, so its slot takes the pixel's loss.
                let (sp, sig) = softplus_and_sigmoid(l);
                o[j] = sp - l * x[j];
                d[j] = sig - x[j];
            }
            total += lane_sum(o) as f64;
        }
        total
    })
}

/// Column sums of `d` (rows, n) into `out` (n).
fn col_sums(out: &mut [f32], d: &[f32], n: usize) {
    simd!({
        out.fill(0.0);
        for r in d.chunks_exact(n) {
            for (o, v) in out.iter_mut().zip(r) {
                *o += v;
            }
        }
    })
}

/// An MLP's hidden layers forward over `b` rows: a_i = h_{i-1} W_i + b_i, h_i = act(a_i), with
/// h_{-1} = `input`; pre-activations into `pre`, outputs into `out`.
fn forward_layers(
    layers: &[Lin],
    input: &[f32],
    pre: &mut [Vec<f32>],
    out: &mut [Vec<f32>],
    th: &[f32],
    b: usize,
    act: Activation,
) {
    for (i, l) in layers.iter().enumerate() {
        let (prev, rest) = out.split_at_mut(i);
        let x: &[f32] = if i == 0 { input } else { &prev[i - 1] };
        let (a, h) = (&mut pre[i], &mut rest[0]);
        matmul(
            a,
            &x[..b * l.n_in],
            &th[l.w..l.b],
            b,
            l.n_out,
            l.n_in,
            false,
            false,
        );
        bias_act(
            &mut a[..b * l.n_out],
            &mut h[..b * l.n_out],
            &th[l.b..l.b + l.n_out],
            l.n_out,
            act,
        );
    }
}

/// Per-batch buffers, sized for `cap` rows.
struct Work {
    x: Vec<f32>,
    eps: Vec<f32>,
    /// Encoder pre-activations and activations, one pair per hidden layer.
    enc_a: Vec<Vec<f32>>,
    enc_h: Vec<Vec<f32>>,
    /// (B, 2Z): mu then logvar per row.
    ml: Vec<f32>,
    sigma: Vec<f32>,
    z: Vec<f32>,
    dec_a: Vec<Vec<f32>>,
    dec_h: Vec<Vec<f32>>,
    out: Vec<f32>,
    d_out: Vec<f32>,
    /// Two scratch buffers for back-propagated activations, the widest layer wide.
    d1: Vec<f32>,
    d2: Vec<f32>,
    d_ml: Vec<f32>,
    /// Per latent dimension, the batch's summed KL (for free bits).
    kl_dim: Vec<f32>,
}

/// The fused trainer: parameters, gradients, Adam moments and work buffers.
pub struct Fused {
    cfg: ModelConfig,
    adam: AdamConfig,
    dim: usize,
    theta: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    pub step: u64,
    enc: Vec<Lin>,
    head: Lin,
    dec: Vec<Lin>,
    out: Lin,
    /// Learned decoder log-variance (D) offset, if any.
    dec_lv: Option<usize>,
    work: Work,
    cap: usize,
    /// Weight on the KL term (beta times the warm-up ramp) and free bits, for the next step.
    kl_weight: f32,
    free_bits: f32,
}

impl Fused {
    /// Takes parameters in the checkpoint layout (`model::param_specs` names) and zero moments.
    pub fn new(
        cfg: &ModelConfig,
        dim: usize,
        params: &HashMap<String, Tensor>,
        adam: AdamConfig,
        cap: usize,
    ) -> Result<Self> {
        if cfg.activation == Activation::Gelu
            || cfg.kind != crate::config::ModelKind::Vae
            || cfg.flows > 0
        {
            bail!(
                "the fused CPU step implements the plain VAE without GELU, not {:?}",
                cfg
            );
        }
        let mut size = 0usize;
        let mut lin = |n_in: usize, n_out: usize| {
            let l = Lin {
                w: size,
                b: size + n_in * n_out,
                n_in,
                n_out,
            };
            size += n_in * n_out + n_out;
            l
        };
        let mut enc = Vec::new();
        let mut prev = dim;
        for &h in &cfg.hidden {
            enc.push(lin(prev, h));
            prev = h;
        }
        let head = lin(prev, 2 * cfg.latent);
        let mut dec = Vec::new();
        let mut prev = cfg.latent;
        for &h in cfg.hidden.iter().rev() {
            dec.push(lin(prev, h));
            prev = h;
        }
        let out = lin(prev, dim);
        let dec_lv = if cfg.decoder == DecoderKind::Gaussian && cfg.learn_sigma {
            size += dim;
            Some(size - dim)
        } else {
            None
        };
        let widest = cfg.hidden.iter().copied().max().unwrap_or(0);
        let z = cfg.latent;
        let work = Work {
            x: vec![0.0; cap * dim],
            eps: vec![0.0; cap * z],
            enc_a: cfg.hidden.iter().map(|&h| vec![0.0; cap * h]).collect(),
            enc_h: cfg.hidden.iter().map(|&h| vec![0.0; cap * h]).collect(),
            ml: vec![0.0; cap * 2 * z],
            sigma: vec![0.0; cap * z],
            z: vec![0.0; cap * z],
            dec_a: cfg
                .hidden
                .iter()
                .rev()
                .map(|&h| vec![0.0; cap * h])
                .collect(),
            dec_h: cfg
                .hidden
                .iter()
                .rev()
                .map(|&h| vec![0.0; cap * h])
                .collect(),
            out: vec![0.0; cap * dim],
            d_out: vec![0.0; cap * dim],
            d1: vec![0.0; cap * widest.max(2 * z)],
            d2: vec![0.0; cap * widest.max(2 * z)],
            d_ml: vec![0.0; cap * 2 * z],
            kl_dim: vec![0.0; z],
        };
        let mut f = Fused {
            cfg: cfg.clone(),
            adam,
            dim,
            theta: vec![0.0; size],
            grad: vec![0.0; size],
            m: vec![0.0; size],
            v: vec![0.0; size],
            step: 0,
            enc,
            head,
            dec,
            out,
            dec_lv,
            work,
            cap,
            kl_weight: 1.0,
            free_bits: 0.0,
        };
        f.import(params, Which::Theta)?;
        Ok(f)
    }

    /// Sets the KL weight (beta times the warm-up ramp) and the free bits (nats per dimension)
    /// of the following steps. The returned -ELBO terms are unweighted whatever these are.
    pub fn set_kl(&mut self, weight: f64, free_bits: f64) {
        self.kl_weight = weight as f32;
        self.free_bits = free_bits as f32;
    }

    /// The batch capacity; `x_mut` and `eps_mut` hold `rows` rows of it.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The input rows (rows, D) to fill before `step`.
    pub fn x_mut(&mut self, rows: usize) -> &mut [f32] {
        &mut self.work.x[..rows * self.dim]
    }

    /// The noise rows (rows, Z) to fill before `step`.
    pub fn eps_mut(&mut self, rows: usize) -> &mut [f32] {
        &mut self.work.eps[..rows * self.cfg.latent]
    }

    /// Forward, backward and one Adam step on the first `rows` rows of the work buffers.
    /// Returns the batch's summed (recon, kl) in nats.
    pub fn step(&mut self, rows: usize) -> Result<(f64, f64)> {
        if rows == 0 || rows > self.cap {
            bail!("batch of {rows} rows for a buffer of {}", self.cap);
        }
        self.step += 1;
        let a = AdamStep::new(&self.adam, self.step);
        // On a pool worker: the step's dozen parallel products and joins then hand work to the
        // other worker directly instead of each waking the pool from outside.
        Ok(rayon::scope(|_| self.forward_backward(rows, Some(a))))
    }

    /// Forward and backward over `b` rows; with `adam`, each layer's parameters are updated as
    /// soon as its gradient is final and its weights have been used for the last time, while
    /// both are still in cache (the update is the same as one pass after the backward).
    fn forward_backward(&mut self, b: usize, adam: Option<AdamStep>) -> (f64, f64) {
        let (dim, z, act) = (self.dim, self.cfg.latent, self.cfg.activation);
        let mut theta = std::mem::take(&mut self.theta);
        let (m, v) = (&mut self.m, &mut self.v);
        let g = &mut self.grad;
        let w = &mut self.work;
        let th = &mut theta;

        // Encoder: a_i = h_{i-1} W_i + b_i, h_i = act(a_i).
        forward_layers(&self.enc, &w.x, &mut w.enc_a, &mut w.enc_h, th, b, act);
        // Heads: [mu | logvar] = h_L W_head + b_head, (B, 2Z).
        let hl = self.head;
        let top = &w.enc_h[self.enc.len() - 1];
        matmul(
            &mut w.ml,
            &top[..b * hl.n_in],
            &th[hl.w..hl.b],
            b,
            2 * z,
            hl.n_in,
            false,
            false,
        );
        // Reparameterize, and the KL 1/2 sum(mu^2 + sigma^2 - logvar - 1).
        let hb = &th[hl.b..hl.b + 2 * z];
        let kl = simd!({
            let mut kl = 0f64;
            w.kl_dim.fill(0.0);
            for r in 0..b {
                let row = &mut w.ml[r * 2 * z..(r + 1) * 2 * z];
                let mut acc = 0f32;
                for j in 0..z {
                    row[j] += hb[j];
                    row[z + j] += hb[z + j];
                    let (mu, lv) = (row[j], row[z + j]);
                    let s = exp_f32(0.5 * lv);
                    w.sigma[r * z + j] = s;
                    w.z[r * z + j] = mu + s * w.eps[r * z + j];
                    let k = mu * mu + s * s - lv - 1.0;
                    w.kl_dim[j] += 0.5 * k;
                    acc += k;
                }
                kl += 0.5 * acc as f64;
            }
            kl
        });
        // Decoder.
        forward_layers(&self.dec, &w.z, &mut w.dec_a, &mut w.dec_h, th, b, act);
        let lo = self.out;
        let last = &w.dec_h[self.dec.len() - 1];
        matmul(
            &mut w.out,
            &last[..b * lo.n_in],
            &th[lo.w..lo.b],
            b,
            dim,
            lo.n_in,
            false,
            false,
        );

        // Reconstruction NLL and its gradient d_out, in one pass over (B, D).
        let ob = &th[lo.b..lo.b + dim];
        let recon = match (self.cfg.decoder, self.dec_lv) {
            (DecoderKind::Bernoulli, _) => {
                // Rows split between the two threads: (B, D) exps are the step's largest
                // elementwise cost.
                let h = b.div_ceil(2) * dim;
                let (o1, o2) = w.out[..b * dim].split_at_mut(h);
                let (x1, x2) = w.x[..b * dim].split_at(h);
                let (d1, d2) = w.d_out[..b * dim].split_at_mut(h);
                let (t1, t2) = rayon::join(
                    || bernoulli_rows(o1, x1, d1, ob),
                    || bernoulli_rows(o2, x2, d2, ob),
                );
                t1 + t2
            }
            (DecoderKind::Gaussian, lv_off) => {
                let fixed = (2.0 * self.cfg.sigma.ln()) as f32;
                // The learned log-variance's gradient slots (D), or an empty slice.
                let g_lv: &mut [f32] = match lv_off {
                    Some(off) => &mut g[off..off + dim],
                    None => &mut [],
                };
                simd!({
                    let mut total = 0f64;
                    g_lv.fill(0.0);
                    for r in 0..b {
                        let o = &mut w.out[r * dim..(r + 1) * dim];
                        let x = &w.x[r * dim..(r + 1) * dim];
                        let d = &mut w.d_out[r * dim..(r + 1) * dim];
                        for j in 0..dim {
                            let l = o[j] + ob[j];
                            let (raw, learned) = match lv_off {
                                Some(off) => (th[off + j], true),
                                None => (fixed, false),
                            };
                            let lv = raw.max(MIN_LOGVAR as f32);
                            let inv = exp_f32(-lv);
                            let m = softplus_and_sigmoid(l).1;
                            let res = x[j] - m;
                            o[j] = 0.5 * (res * res * inv + lv + LN_2PI as f32);
                            // d/dl of 1/2 (x - m)^2 / var, m = sigmoid(l).
                            d[j] = -res * inv * m * (1.0 - m);
                            if learned && raw >= MIN_LOGVAR as f32 {
                                g_lv[j] += 0.5 * (1.0 - res * res * inv);
                            }
                        }
                        total += lane_sum(o) as f64;
                    }
                    total
                })
            }
        };

        // Back through the output layer: dW = h^T d_out, db = colsum, dh = d_out W^T.
        {
            let last = &w.dec_h[self.dec.len() - 1][..b * lo.n_in];
            let d_out = &w.d_out[..b * dim];
            let (g_w, g_b) = g[lo.w..lo.b + dim].split_at_mut(lo.b - lo.w);
            let (d1, w_out) = (&mut w.d1, &th[lo.w..lo.b]);
            matmul(g_w, last, d_out, lo.n_in, dim, b, true, false);
            col_sums(g_b, d_out, dim);
            // dh (B, H) = d_out W^T, W read transposed in place. (gemm computes dh^T = W d_out^T
            // 15% quicker, but transposing it back costs more than that saves.)
            matmul(d1, d_out, w_out, b, lo.n_in, dim, false, true);
        }
        // The output layer's Adam step (and the learned decoder log-variance's, stored after it)
        // on one thread, while the other goes on down the decoder and the heads, whose
        // products are too small to share.
        let (th_lo, th_hi) = th.split_at_mut(lo.w);
        let (g_lo, g_hi) = g.split_at_mut(lo.w);
        let (m_lo, m_hi) = m.split_at_mut(lo.w);
        let (v_lo, v_hi) = v.split_at_mut(lo.w);
        let (dec, kw, fb) = (&self.dec, self.kl_weight, self.free_bits);
        rayon::join(
            || adam_range(&adam, th_hi, m_hi, v_hi, g_hi, 0, g_hi.len()),
            || {
                let (th, g, m, v) = (th_lo, g_lo, m_lo, v_lo);
                // Decoder layers, last to first; d1 holds d(loss)/d(output of the layer).
                for (i, l) in dec.iter().enumerate().rev() {
                    let n = b * l.n_out;
                    act_backward(&mut w.d1[..n], &w.dec_a[i][..n], &w.dec_h[i][..n], act);
                    let input: &[f32] = if i == 0 { &w.z } else { &w.dec_h[i - 1] };
                    matmul(
                        &mut g[l.w..l.b],
                        &input[..b * l.n_in],
                        &w.d1[..n],
                        l.n_in,
                        l.n_out,
                        b,
                        true,
                        false,
                    );
                    col_sums(&mut g[l.b..l.b + l.n_out], &w.d1[..n], l.n_out);
                    matmul(
                        &mut w.d2,
                        &w.d1[..n],
                        &th[l.w..l.b],
                        b,
                        l.n_in,
                        l.n_out,
                        false,
                        true,
                    );
                    adam_range(&adam, th, m, v, g, l.w, l.b + l.n_out);
                    std::mem::swap(&mut w.d1, &mut w.d2);
                }
                // d1 now holds dz (B, Z). Through the reparameterization and the weighted KL:
                // dmu = dz + c_j mu; dlogvar = dz eps sigma / 2 + c_j (sigma^2 - 1) / 2, where c_j is the
                // KL weight, or 0 for a dimension whose batch-mean KL is under the free bits.
                for j in 0..z {
                    let under = fb > 0.0 && w.kl_dim[j] / (b as f32) < fb;
                    w.kl_dim[j] = if under { 0.0 } else { kw };
                }
                simd!({
                    for r in 0..b {
                        for j in 0..z {
                            let (mu, s, e, dz) = (
                                w.ml[r * 2 * z + j],
                                w.sigma[r * z + j],
                                w.eps[r * z + j],
                                w.d1[r * z + j],
                            );
                            let c = w.kl_dim[j];
                            w.d_ml[r * 2 * z + j] = dz + c * mu;
                            w.d_ml[r * 2 * z + z + j] = 0.5 * dz * e * s + c * 0.5 * (s * s - 1.0);
                        }
                    }
                });
                let top = &w.enc_h[self.enc.len() - 1];
                matmul(
                    &mut g[hl.w..hl.b],
                    &top[..b * hl.n_in],
                    &w.d_ml[..b * 2 * z],
                    hl.n_in,
                    2 * z,
                    b,
                    true,
                    false,
                );
                col_sums(&mut g[hl.b..hl.b + 2 * z], &w.d_ml[..b * 2 * z], 2 * z);
                matmul(
                    &mut w.d1,
                    &w.d_ml[..b * 2 * z],
                    &th[hl.w..hl.b],
                    b,
                    hl.n_in,
                    2 * z,
                    false,
                    true,
                );
                adam_range(&adam, th, m, v, g, hl.w, hl.b + 2 * z);
            },
        );
        // Encoder layers, last to first.
        for (i, l) in self.enc.iter().enumerate().rev() {
            let n = b * l.n_out;
            act_backward(&mut w.d1[..n], &w.enc_a[i][..n], &w.enc_h[i][..n], act);
            let input: &[f32] = if i == 0 { &w.x } else { &w.enc_h[i - 1] };
            col_sums(&mut g[l.b..l.b + l.n_out], &w.d1[..n], l.n_out);
            matmul(
                &mut g[l.w..l.b],
                &input[..b * l.n_in],
                &w.d1[..n],
                l.n_in,
                l.n_out,
                b,
                true,
                false,
            );
            if i > 0 {
                matmul(
                    &mut w.d2,
                    &w.d1[..n],
                    &th[l.w..l.b],
                    b,
                    l.n_in,
                    l.n_out,
                    false,
                    true,
                );
                std::mem::swap(&mut w.d1, &mut w.d2);
            }
            adam_range(&adam, th, m, v, g, l.w, l.b + l.n_out);
        }
        self.theta = theta;
        (recon, kl)
    }

    /// Every tensor in checkpoint layout: (name, offset, rows, cols, source stride, column
    /// offset). A checkpoint weight (out, in) is read from `theta` as the transpose of (in, out).
    fn tensor_map(&self) -> Vec<Placed<'_>> {
        let mut v: Vec<Placed<'_>> = Vec::new();
        let mut lin = |name: String, l: Lin, col0: usize, cols: usize| {
            let (w, n_out) = (l.w, l.n_out);
            // Checkpoint element (o, i) at flat index o * n_in + i lives at w + i * n_out + col0 + o.
            let n_in = l.n_in;
            v.push((
                format!("{name}.weight"),
                vec![cols, n_in],
                Box::new(move |k| w + (k % n_in) * n_out + col0 + k / n_in),
            ));
            let b = l.b;
            v.push((
                format!("{name}.bias"),
                vec![cols],
                Box::new(move |k| b + col0 + k),
            ));
        };
        for (i, l) in self.enc.iter().enumerate() {
            lin(format!("encoder.hidden.{i}"), *l, 0, l.n_out);
        }
        let z = self.cfg.latent;
        lin("encoder.mu".into(), self.head, 0, z);
        lin("encoder.logvar".into(), self.head, z, z);
        for (i, l) in self.dec.iter().enumerate() {
            lin(format!("decoder.hidden.{i}"), *l, 0, l.n_out);
        }
        lin("decoder.out".into(), self.out, 0, self.dim);
        if let Some(off) = self.dec_lv {
            v.push((
                "decoder.logvar".into(),
                vec![self.dim],
                Box::new(move |k| off + k),
            ));
        }
        v
    }

    fn export(&self, which: Which) -> Result<HashMap<String, Tensor>> {
        let src = match which {
            Which::Theta => &self.theta,
            Which::M => &self.m,
            Which::V => &self.v,
            Which::Grad => &self.grad,
        };
        let mut out = HashMap::new();
        for (name, shape, at) in self.tensor_map() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|k| src[at(k)]).collect();
            out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Ok(out)
    }

    fn import(&mut self, map: &HashMap<String, Tensor>, which: Which) -> Result<()> {
        let mut dst = match which {
            Which::Theta => std::mem::take(&mut self.theta),
            Which::M => std::mem::take(&mut self.m),
            Which::V => std::mem::take(&mut self.v),
            Which::Grad => std::mem::take(&mut self.grad),
        };
        for (name, shape, at) in self.tensor_map() {
            let t = map
                .get(&name)
                .with_context(|| format!("no tensor `{name}`"))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                );
            }
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            for (k, v) in data.into_iter().enumerate() {
                dst[at(k)] = v;
            }
        }
        match which {
            Which::Theta => self.theta = dst,
            Which::M => self.m = dst,
            Which::V => self.v = dst,
            Which::Grad => self.grad = dst,
        }
        Ok(())
    }

    /// The parameters, checkpoint layout (the names of `model::param_specs`).
    pub fn params(&self) -> Result<HashMap<String, Tensor>> {
        self.export(Which::Theta)
    }

    /// Adam's moments as `m.<name>`, `v.<name>`, as `optim::Adam::state` names them.
    pub fn adam_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut h = HashMap::new();
        for (k, t) in self.export(Which::M)? {
            h.insert(format!("m.{k}"), t);
        }
        for (k, t) in self.export(Which::V)? {
            h.insert(format!("v.{k}"), t);
        }
        Ok(h)
    }

    /// Restores the moments saved by `adam_state` and the step count.
    pub fn load_adam_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let part = |prefix: &str| -> HashMap<String, Tensor> {
            state
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
                .collect()
        };
        self.import(&part("m."), Which::M)
            .context("Adam first moments")?;
        self.import(&part("v."), Which::V)
            .context("Adam second moments")?;
        self.step = step;
        Ok(())
    }

    /// The last step's gradients, checkpoint layout (for tests).
    pub fn grads(&self) -> Result<HashMap<String, Tensor>> {
        self.export(Which::Grad)
    }

    /// Forward and backward without the Adam step (for tests).
    pub fn loss_and_grads(&mut self, rows: usize) -> (f64, f64) {
        self.forward_backward(rows, None)
    }
}

/// A checkpoint tensor's name, shape, and where its k-th element (row-major) lives in a buffer.
type Placed<'a> = (String, Vec<usize>, Box<dyn Fn(usize) -> usize + 'a>);

#[derive(Clone, Copy)]
enum Which {
    Theta,
    M,
    V,
    Grad,
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;
    use crate::model::{self, Vae};
    use candle_core::DType;
    use candle_nn::VarBuilder;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn exp_and_ln1p_are_accurate() {
        for i in -800..=800 {
            let x = i as f32 * 0.1;
            let (a, b) = (exp_f32(x), x.exp());
            assert!((a - b).abs() <= 3e-7 * b, "exp({x}) = {a}, want {b}");
        }
        for i in 0..=1000 {
            let y = i as f32 / 1000.0;
            assert!((ln1p_unit(y) - y.ln_1p()).abs() < 2e-7, "ln1p({y})");
        }
        // Hand values: e^0 = 1, e^1 = 2.718282, softplus(0) = ln 2 = 0.693147, sigmoid(0) = 0.5.
        assert!((exp_f32(0.0) - 1.0).abs() < 1e-7 && (exp_f32(1.0) - 2.718282).abs() < 1e-6);
        let (sp, sg) = softplus_and_sigmoid(0.0);
        assert!((sp - 0.693147).abs() < 1e-6 && sg == 0.5);
        // Extremes stay finite: softplus(100) = 100, softplus(-100) ~ 0.
        assert_eq!(softplus_and_sigmoid(100.0).0, 100.0);
        assert!(softplus_and_sigmoid(-100.0).0 < 1e-30);
    }

    /// The fused step against candle's autograd on the same parameters, batch and noise.
    fn check(cfg: ModelConfig) {
        check_with(cfg, 1.0, false)
    }

    /// Seeded parameters, a batch x in [0, 1] (b, dim) and noise eps (b, Z), drawn in that order.
    fn fixture(
        cfg: &ModelConfig,
        dim: usize,
        b: usize,
        seed: u64,
    ) -> (HashMap<String, Tensor>, Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let params = model::init_params(cfg, dim, &mut rng, &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..b * dim).map(|_| rng.random::<f32>()).collect();
        let eps: Vec<f32> = (0..b * cfg.latent)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        (params, x, eps)
    }

    /// The candle model on `params` (through a VarMap, for autograd) and the batch and noise as
    /// tensors: the side the fused step is checked against.
    fn candle_side(
        cfg: &ModelConfig,
        dim: usize,
        b: usize,
        params: &HashMap<String, Tensor>,
        x: &[f32],
        eps: &[f32],
    ) -> (candle_nn::VarMap, Vae, Tensor, Tensor) {
        let dev = Device::Cpu;
        let vm = model::varmap_from(params.clone()).unwrap();
        let m = Vae::new(cfg, dim, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let xt = Tensor::from_vec(x.to_vec(), (b, dim), &dev).unwrap();
        let et = Tensor::from_vec(eps.to_vec(), (b, cfg.latent), &dev).unwrap();
        (vm, m, xt, et)
    }

    /// The same with a KL weight, and with free bits at the median of the dimensions' batch-mean
    /// KL (so some dimensions are under it and some are not): the gradients of
    /// `Vae::training_loss`.
    fn check_with(cfg: ModelConfig, kl_weight: f64, median_free_bits: bool) {
        let (dim, b) = (12, 5);
        let (params, x, eps) = fixture(&cfg, dim, b, 3);
        let adam = AdamConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };

        let (vm, m, xt, et) = candle_side(&cfg, dim, b, &params, &x, &eps);
        let free_bits = if median_free_bits {
            let dims = m.samples(&xt, &et, 1).unwrap().kl_dims.unwrap();
            let mut v = dims.mean(0).unwrap().to_vec1::<f32>().unwrap();
            v.sort_by(|a, b| a.total_cmp(b));
            // Between the two middle values, away from a tie.
            (v[v.len() / 2 - 1] as f64 + v[v.len() / 2] as f64) / 2.0
        } else {
            0.0
        };
        let o = model::Objective {
            samples: 1,
            iwae: false,
            kl_weight,
            free_bits,
        };
        let (loss, r, k) = m.training_loss(&xt, &et, &o).unwrap();
        let grads = loss.backward().unwrap();
        let (r, k) = (
            r.to_scalar::<f32>().unwrap() as f64,
            k.to_scalar::<f32>().unwrap() as f64,
        );

        let mut f = Fused::new(&cfg, dim, &params, adam, 8).unwrap();
        f.set_kl(kl_weight, free_bits);
        f.x_mut(b).copy_from_slice(&x);
        f.eps_mut(b).copy_from_slice(&eps);
        let (fr, fk) = f.loss_and_grads(b);
        if free_bits > 0.0 {
            // After the step kl_dim holds each dimension's weight: 0 where under the free bits.
            let c = &f.work.kl_dim;
            assert!(
                c.contains(&0.0) && c.iter().any(|v| *v > 0.0),
                "free bits split nothing: {c:?}"
            );
        }
        assert!(
            (fr - r).abs() < 1e-4 * r.abs().max(1.0),
            "recon {fr} vs {r}"
        );
        assert!((fk - k).abs() < 1e-4 * k.abs().max(1.0), "kl {fk} vs {k}");
        let fg = f.grads().unwrap();
        let data = vm.data().lock().unwrap();
        for (name, var) in data.iter() {
            let want = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = fg[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-4 * scale,
                    "{cfg:?}: d{name}[{i}] = {g}, autograd {w}"
                );
            }
        }
        // And the parameters round-trip through the checkpoint layout unchanged.
        let back = f.params().unwrap();
        for (name, t) in &params {
            assert_eq!(
                back[name].to_vec1::<f32>().ok(),
                t.to_vec1::<f32>().ok(),
                "{name}"
            );
            assert_eq!(
                back[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn matches_autograd() {
        for act in [
            Activation::Relu,
            Activation::Tanh,
            Activation::Softplus,
            Activation::Sigmoid,
        ] {
            check(ModelConfig {
                hidden: vec![7, 5],
                latent: 3,
                activation: act,
                ..Default::default()
            });
        }
        check(ModelConfig {
            hidden: vec![6],
            latent: 2,
            ..Default::default()
        });
        check(ModelConfig {
            hidden: vec![6],
            latent: 2,
            decoder: DecoderKind::Gaussian,
            sigma: 0.5,
            learn_sigma: true,
            ..Default::default()
        });
        // A beta / warm-up weight, and free bits.
        check_with(
            ModelConfig {
                hidden: vec![7, 5],
                latent: 3,
                ..Default::default()
            },
            0.37,
            false,
        );
        check_with(
            ModelConfig {
                hidden: vec![7, 5],
                latent: 4,
                ..Default::default()
            },
            1.0,
            true,
        );
        check(ModelConfig {
            hidden: vec![6],
            latent: 2,
            decoder: DecoderKind::Gaussian,
            sigma: 0.3,
            ..Default::default()
        });
    }

    #[test]
    fn matmul_matches_naive() {
        // Shapes for each path: one thread (small), halves by rows (m >= 256), halves by
        // columns (few rows, wide), and a product big enough to split whose halves would be
        // empty (m = 10 < 16 rows, n < 256): it must run whole, not panic.
        let mut rng = StdRng::seed_from_u64(2);
        for (m, n, k) in [(5, 7, 3), (300, 20, 1400), (64, 400, 330), (10, 200, 4200)] {
            for (a_t, b_t) in [(false, false), (true, false), (false, true)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
                let mut c = vec![f32::NAN; m * n];
                matmul(&mut c, &a, &b, m, n, k, a_t, b_t);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| {
                                let x = if a_t { a[t * m + i] } else { a[i * k + t] };
                                let y = if b_t { b[j * k + t] } else { b[t * n + j] };
                                x as f64 * y as f64
                            })
                            .sum();
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (k as f64).sqrt(),
                            "({m},{n},{k}) a_t {a_t} b_t {b_t}: C[{i},{j}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn adam_step_matches_optim() {
        // The same first steps through the fused path and through optim::Adam give the same weights.
        let cfg = ModelConfig {
            hidden: vec![6],
            latent: 2,
            ..Default::default()
        };
        let (dim, b) = (9, 4);
        let (params, x, eps) = fixture(&cfg, dim, b, 5);
        let ac = AdamConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (vm, m, xt, et) = candle_side(&cfg, dim, b, &params, &x, &eps);
        let mut opt = crate::optim::Adam::new(&vm, ac).unwrap();
        let mut f = Fused::new(&cfg, dim, &params, ac, b).unwrap();
        for _ in 0..3 {
            let (r, k) = m.neg_elbo_terms(&xt, &et).unwrap();
            opt.step(
                &(r.sum_all().unwrap() + k.sum_all().unwrap())
                    .unwrap()
                    .backward()
                    .unwrap(),
            )
            .unwrap();
            f.x_mut(b).copy_from_slice(&x);
            f.eps_mut(b).copy_from_slice(&eps);
            f.step(b).unwrap();
        }
        let got = f.params().unwrap();
        for (name, t) in model::snapshot(&vm).unwrap() {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = got[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (u, w) in a.iter().zip(&g) {
                assert!((u - w).abs() < 1e-5, "{name}: {u} vs {w}");
            }
        }
        assert_eq!(f.adam_state().unwrap().len(), opt.state().len());
    }
}
