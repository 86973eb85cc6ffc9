//! The dense layer and its activation, forward and backward on plain buffers:
//! a = x W + b, h = act(a) (an MLP layer), and the backward
//! dW = x^T da, db = colsum(da), dx = da W^T, da = dh * act'(a).
//!
//! A gated layer (Dauphin et al. 2017, as Tomczak & Welling 2018 use it) is one product with
//! twice the outputs, [a | g] = x [W1 | W2] + [b1 | b2], and h = a * sigmoid(g); its backward
//! gives da = dh * sigmoid(g), dg = dh * a * sigmoid(g) (1 - sigmoid(g)).
//!
//! A weight is stored (in, out) row-major, the transpose of the checkpoint's PyTorch-style
//! (out, in), because x (B, in) @ W (in, out) is gemm's fast case. A layer's bias is added by the
//! pass that reads its product (`act_forward` here; the latent and likelihood passes for the
//! heads and the output layer), so no pass over a product is spent on the bias alone.

use super::math::{exp_f32, matmul, simd, softplus_and_sigmoid, tanh_f32, GELU_A, GELU_C};
use crate::config::Activation;

/// A linear layer's place in `theta`: W (n_in, n_out) row-major at `w`, bias (n_out) at `b`.
#[derive(Debug, Clone, Copy)]
pub struct Lin {
    pub w: usize,
    pub b: usize,
    pub n_in: usize,
    pub n_out: usize,
}

impl Lin {
    /// The next layer of `n_in` -> `n_out` in a flat buffer whose `size` it advances.
    pub fn alloc(size: &mut usize, n_in: usize, n_out: usize) -> Lin {
        let l = Lin {
            w: *size,
            b: *size + n_in * n_out,
            n_in,
            n_out,
        };
        *size += n_in * n_out + n_out;
        l
    }

    /// One past its last parameter.
    pub fn end(&self) -> usize {
        self.b + self.n_out
    }
}

/// y (rows, n_out) = x (rows, n_in) W, without the bias.
pub fn linear_forward(y: &mut [f32], x: &[f32], th: &[f32], l: Lin, rows: usize, par: bool) {
    matmul(
        y,
        &x[..rows * l.n_in],
        &th[l.w..l.b],
        (rows, l.n_out, l.n_in),
        false,
        false,
        par,
    );
}

/// The weight and bias gradients dW = x^T dy, db = colsum(dy) into `g`, and dx = dy W^T into
/// `dx` when given.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    g: &mut [f32],
    dx: Option<&mut [f32]>,
    x: &[f32],
    dy: &[f32],
    th: &[f32],
    l: Lin,
    rows: usize,
    par: bool,
) {
    let dy = &dy[..rows * l.n_out];
    let (g_w, g_b) = g[l.w..l.end()].split_at_mut(l.b - l.w);
    matmul(
        g_w,
        &x[..rows * l.n_in],
        dy,
        (l.n_in, l.n_out, rows),
        true,
        false,
        par,
    );
    super::math::col_sums(g_b, dy, l.n_out);
    if let Some(dx) = dx {
        // dx (B, in) = dy W^T, W read transposed in place. (gemm computes dx^T = W dy^T 15%
        // quicker, but transposing it back costs more than that saves.)
        matmul(
            dx,
            dy,
            &th[l.w..l.b],
            (rows, l.n_in, l.n_out),
            false,
            true,
            par,
        );
    }
}

#[inline(always)]
fn act_fwd(act: Activation, a: f32) -> f32 {
    match act {
        Activation::Relu => a.max(0.0),
        Activation::Tanh => tanh_f32(a),
        Activation::Softplus => softplus_and_sigmoid(a).0,
        Activation::Sigmoid => softplus_and_sigmoid(a).1,
        // candle's `gelu`: the tanh form, 1/2 a (1 + tanh(c (a + 0.044715 a^3))).
        Activation::Gelu => 0.5 * a * (1.0 + tanh_f32(GELU_C * (a + GELU_A * a * a * a))),
        Activation::Elu => {
            if a > 0.0 {
                a
            } else {
                exp_f32(a) - 1.0
            }
        }
        // Not elementwise: `gated_forward` takes it (never reached through here).
        Activation::Gated => a,
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
        Activation::Gelu => {
            let t = tanh_f32(GELU_C * (a + GELU_A * a * a * a));
            0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * a * a)
        }
        // e^a = h + 1 below 0.
        Activation::Elu => {
            if a > 0.0 {
                1.0
            } else {
                h + 1.0
            }
        }
        // Not elementwise: `gated_backward` takes it (never reached through here).
        Activation::Gated => 1.0,
    }
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
            Activation::Gated => $f::<5>($($arg),*),
            Activation::Elu => $f::<6>($($arg),*),
        }
    };
}

const ACTS: [Activation; 7] = [
    Activation::Relu,
    Activation::Tanh,
    Activation::Softplus,
    Activation::Sigmoid,
    Activation::Gelu,
    Activation::Gated,
    Activation::Elu,
];

/// The width of a hidden layer's output: a gated layer's product has twice its outputs.
pub fn out_width(l: Lin, act: Activation) -> usize {
    if act == Activation::Gated {
        l.n_out / 2
    } else {
        l.n_out
    }
}

/// Gated forward: adds `bias` (2n) to every row of `a` (rows, 2n) = [a | g], and writes
/// h = a * sigmoid(g) (rows, n).
pub fn gated_forward(a: &mut [f32], h: &mut [f32], bias: &[f32], n: usize) {
    simd!({
        for (ar, hr) in a.chunks_exact_mut(2 * n).zip(h.chunks_exact_mut(n)) {
            for (av, bv) in ar.iter_mut().zip(bias) {
                *av += bv;
            }
            let (lin, gate) = ar.split_at(n);
            for j in 0..n {
                hr[j] = lin[j] * softplus_and_sigmoid(gate[j]).1;
            }
        }
    })
}

/// Gated backward: from dh (rows, n) and the forward's [a | g] (rows, 2n), writes
/// [da | dg] = [dh sigmoid(g) | dh a sigmoid(g) (1 - sigmoid(g))] into `d` (rows, 2n).
pub fn gated_backward(dh: &[f32], a: &[f32], d: &mut [f32], n: usize) {
    simd!({
        for ((dr, ar), hr) in d
            .chunks_exact_mut(2 * n)
            .zip(a.chunks_exact(2 * n))
            .zip(dh.chunks_exact(n))
        {
            for j in 0..n {
                let s = softplus_and_sigmoid(ar[n + j]).1;
                dr[j] = hr[j] * s;
                dr[n + j] = hr[j] * ar[j] * s * (1.0 - s);
            }
        }
    })
}

/// An MLP layer's backward: from dh (rows, out width) in `d1` to the weight and bias gradients
/// in `g` and, when `want_dx`, dx (rows, n_in) left in `d1`; `d2` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn layer_backward(
    g: &mut [f32],
    want_dx: bool,
    d1: &mut Vec<f32>,
    d2: &mut Vec<f32>,
    (input, a, h): (&[f32], &[f32], &[f32]),
    th: &[f32],
    l: Lin,
    rows: usize,
    act: Activation,
    par: bool,
) {
    let n = rows * l.n_out;
    if act == Activation::Gated {
        gated_backward(&d1[..n / 2], &a[..n], &mut d2[..n], l.n_out / 2);
        let dx = if want_dx { Some(&mut d1[..]) } else { None };
        linear_backward(g, dx, input, d2, th, l, rows, par);
    } else {
        act_backward(&mut d1[..n], &a[..n], &h[..n], act);
        let dx = if want_dx { Some(&mut d2[..]) } else { None };
        linear_backward(g, dx, input, d1, th, l, rows, par);
        std::mem::swap(d1, d2);
    }
}

/// Adds `bias` (n) to every row of `a` (rows, n) and writes h = act(a).
pub fn act_forward(a: &mut [f32], h: &mut [f32], bias: &[f32], n: usize, act: Activation) {
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

/// d *= act'(a), elementwise in place: dh into da.
pub fn act_backward(d: &mut [f32], a: &[f32], h: &[f32], act: Activation) {
    fn go<const A: usize>(d: &mut [f32], a: &[f32], h: &[f32]) {
        simd!({
            for ((dv, av), hv) in d.iter_mut().zip(a).zip(h) {
                *dv *= act_grad(ACTS[A], *av, *hv);
            }
        })
    }
    with_act!(act, go(d, a, h))
}

/// An MLP's hidden layers forward over `rows` rows: a_i = h_{i-1} W_i + b_i, h_i = act(a_i),
/// with h_{-1} = `input`; pre-activations into `pre`, outputs into `out`.
#[allow(clippy::too_many_arguments)]
pub fn mlp_forward(
    layers: &[Lin],
    input: &[f32],
    pre: &mut [Vec<f32>],
    out: &mut [Vec<f32>],
    th: &[f32],
    rows: usize,
    act: Activation,
    par: bool,
) {
    for (i, l) in layers.iter().enumerate() {
        let (prev, rest) = out.split_at_mut(i);
        let x: &[f32] = if i == 0 { input } else { &prev[i - 1] };
        let (a, h) = (&mut pre[i], &mut rest[0]);
        linear_forward(a, x, th, *l, rows, par);
        let w = out_width(*l, act);
        let (a, h, bias) = (
            &mut a[..rows * l.n_out],
            &mut h[..rows * w],
            &th[l.b..l.end()],
        );
        if act == Activation::Gated {
            gated_forward(a, h, bias, w);
        } else {
            act_forward(a, h, bias, l.n_out, act);
        }
    }
}

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;

    #[test]
    fn gated_hand_values() {
        // n = 1: a = 2, g = 0 (sigmoid 1/2): h = 1; dh = 1: da = 1/2, dg = 2 * 1/4 = 1/2.
        let (mut a, mut h) = ([2.0f32, -1.0], [0f32]);
        gated_forward(&mut a, &mut h, &[0.0, 1.0], 1);
        assert!((h[0] - 1.0).abs() < 1e-6 && a[1] == 0.0);
        let mut d = [0f32; 2];
        gated_backward(&[1.0], &a, &mut d, 1);
        assert!(
            (d[0] - 0.5).abs() < 1e-6 && (d[1] - 0.5).abs() < 1e-6,
            "{d:?}"
        );
    }

    #[test]
    fn activations_hand_values_and_slopes() {
        // relu(-1) = 0, tanh(0.5) = 0.462117, softplus(0) = ln 2, sigmoid(0) = 1/2,
        // gelu(1) = 0.841192 (tanh form), gelu(0) = 0 with slope 1/2.
        let close = |a: f32, b: f32| (a - b).abs() < 2e-6;
        assert_eq!(act_fwd(Activation::Relu, -1.0), 0.0);
        assert!(close(act_fwd(Activation::Tanh, 0.5), 0.462_117));
        assert!(close(act_fwd(Activation::Softplus, 0.0), 0.693_147));
        assert!(close(act_fwd(Activation::Sigmoid, 0.0), 0.5));
        assert!(close(act_fwd(Activation::Gelu, 1.0), 0.841_192));
        assert!(close(act_grad(Activation::Gelu, 0.0, 0.0), 0.5));
        // elu(1) = 1, elu(-1) = e^-1 - 1 = -0.632121 with slope e^-1 = 0.367879.
        assert_eq!(act_fwd(Activation::Elu, 1.0), 1.0);
        assert!(close(act_fwd(Activation::Elu, -1.0), -0.632_121));
        assert!(close(
            act_grad(Activation::Elu, -1.0, -0.632_121),
            0.367_879
        ));
        // Every slope against central differences (f32, h = 1e-2: error O(h^2)); not gated.
        for act in ACTS.iter().filter(|a| **a != Activation::Gated) {
            let act = *act;
            for i in -30..=30 {
                let a = i as f32 * 0.17 + 0.01;
                let h = 1e-2;
                let fd = (act_fwd(act, a + h) - act_fwd(act, a - h)) / (2.0 * h);
                let g = act_grad(act, a, act_fwd(act, a));
                assert!((fd - g).abs() < 2e-3, "{act:?} at {a}: {g} vs {fd}");
            }
        }
    }
}
