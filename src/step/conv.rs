//! 2-D convolution and transposed convolution as layers on plain buffers (the building blocks of
//! a convolutional encoder and decoder, as in Kingma et al. 2016's and Tomczak & Welling 2018's
//! conv VAEs), on the step's products. Images are NHWC, position-major: an image is (h w, c)
//! rows of channels, the data's own layout and the products' natural output, so no pass
//! transposes anything.
//!
//! - convolution, y = W * x (+ b): the input's patches laid out as rows ("im2row": one row per
//!   output position, (ky, kx, c_in) wide, each kernel row one copy of k c_in contiguous values),
//!   one product R W^T giving y (b ho wo, c_out); backward dW = dY^T R, dR = dY W, dx = the
//!   patches' gradients added back ("row2im");
//! - transposed convolution (the convolution's adjoint, as `conv_transpose2d`): R = X W with X
//!   (b n, c_in), W (c_in, (ky, kx, c_out)), the rows added into the output (row2im); backward
//!   dR = im2row(dy), dW = X^T dR, dx = dR W^T.
//!
//! A weight is stored with its patch index (ky, kx, c): a convolution's (c_out, k k c_in), a
//! transposed one's (c_in, k k c_out); `step::convnet` maps them to and from PyTorch's layouts.
//! Biases: `conv_forward` / `convt_forward` add one when given (the tests); the network leaves it
//! to the activation pass, which adds a bias anyway.

use super::math::{self, lane_sum, matmul};

/// A convolution's geometry on the image side: `c` channels of `h` x `w`, a `k` x `k` kernel at
/// stride `s` with `p` zeros of padding, giving an `ho` x `wo` grid of positions.
#[derive(Debug, Clone, Copy)]
pub struct Geom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// The grid of a convolution of `c` x `h` x `w` by a `k`-kernel at stride `s`, padding `p`:
    /// (h + 2p - k) / s + 1 positions a side.
    pub fn new(c: usize, (h, w): (usize, usize), k: usize, s: usize, p: usize) -> Self {
        Geom {
            c,
            h,
            w,
            k,
            s,
            p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (w + 2 * p - k) / s + 1,
        }
    }

    /// Values in one patch row: c k k.
    pub fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Positions per image.
    pub fn positions(&self) -> usize {
        self.ho * self.wo
    }
}

/// Runs `f(out_part, first_image, images)` over `b` images' slices of `out` (`per` values each):
/// on two halves side by side when `par`, so that the layout passes around the products use
/// both workers as the products do.
fn per_images<F>(out: &mut [f32], per: usize, b: usize, par: bool, f: F)
where
    F: Fn(&mut [f32], usize, usize) + Sync,
{
    if par && b >= 2 {
        let h = b / 2;
        let (lo, hi) = out[..b * per].split_at_mut(h * per);
        rayon::join(|| f(lo, 0, h), || f(hi, h, b - h));
    } else {
        f(&mut out[..b * per], 0, b);
    }
}

/// The kernel columns kx whose input column x = x0 + kx lies inside a row of `w`: [lo, hi).
#[inline(always)]
fn inside(x0: isize, k: usize, w: usize) -> (usize, usize) {
    let lo = (-x0).clamp(0, k as isize) as usize;
    let hi = (w as isize - x0).clamp(lo as isize, k as isize) as usize;
    (lo, hi)
}

/// The output columns whose kernel lies wholly inside the row (ox s - p >= 0 and
/// ox s - p + k <= w): no padding to fill or skip.
fn inner_cols(g: Geom) -> std::ops::Range<usize> {
    let lo = g.p.div_ceil(g.s).min(g.wo);
    let hi = if g.w + g.p >= g.k {
        (g.w + g.p - g.k) / g.s + 1
    } else {
        0
    };
    lo..hi.clamp(lo, g.wo)
}

/// `dst` += `src`, in 8-value pieces (the runs are short: no call per run).
#[inline(always)]
fn add_run(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (mut d8, mut s8) = (dst[..n].chunks_exact_mut(8), src[..n].chunks_exact(8));
    for (d, s) in (&mut d8).zip(&mut s8) {
        for i in 0..8 {
            d[i] += s[i];
        }
    }
    for (d, s) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
        *d += *s;
    }
}

/// Patches of `b` NHWC images `x` (b, h, w, c) as rows `r` (b ho wo, k k c): row (img, oy, ox),
/// column (ky, kx, ci); zeros where the kernel hangs over the padding. Each kernel row is one
/// copy of the (kx, ci) values under it, contiguous in the image.
pub fn im2row(r: &mut [f32], x: &[f32], g: Geom, b: usize, par: bool) {
    // Runs of k c values: a one-channel 4x4 kernel's as fixed 4-value moves (a call to memcpy
    // or memset per run would cost more than the run).
    match g.k * g.c {
        4 => im2row_n::<4>(r, x, g, b, par),
        9 => im2row_n::<9>(r, x, g, b, par),
        12 => im2row_n::<12>(r, x, g, b, par),
        16 => im2row_n::<16>(r, x, g, b, par),
        _ => im2row_n::<0>(r, x, g, b, par),
    }
}

/// `im2row` with runs of `KC` = k c values, or any length when `KC` is 0.
fn im2row_n<const KC: usize>(r: &mut [f32], x: &[f32], g: Geom, b: usize, par: bool) {
    let (pr, k, c) = (g.patch(), g.k, g.c);
    let kc = if KC == 0 { k * c } else { KC };
    let img_len = g.h * g.w * c;
    let inner_x = inner_cols(g);
    per_images(r, g.positions() * pr, b, par, |r, i0, n| {
        for img in 0..n {
            let xi = &x[(i0 + img) * img_len..][..img_len];
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let row = &mut r[((img * g.ho + oy) * g.wo + ox) * pr..][..pr];
                    let x0 = (ox * g.s) as isize - g.p as isize;
                    let inner = inner_x.contains(&ox);
                    for (ky, dst) in row.chunks_exact_mut(kc).enumerate() {
                        let y = (oy * g.s + ky) as isize - g.p as isize;
                        if y < 0 || y >= g.h as isize {
                            dst.fill(0.0);
                        } else if inner {
                            let at = (y as usize * g.w) as isize + x0;
                            dst.copy_from_slice(&xi[at as usize * c..][..kc]);
                        } else {
                            let (lo, hi) = inside(x0, k, g.w);
                            dst.fill(0.0);
                            let at = (y as usize * g.w) as isize + x0 + lo as isize;
                            let n = (hi - lo) * c;
                            dst[lo * c..][..n].copy_from_slice(&xi[at as usize * c..][..n]);
                        }
                    }
                }
            }
        }
    });
}

/// The adjoint of `im2row`: each patch row of `r` added back into the NHWC images `x`
/// (b, h, w, c), which it overwrites first.
pub fn row2im(x: &mut [f32], r: &[f32], g: Geom, b: usize, par: bool) {
    match g.k * g.c {
        4 => row2im_n::<4>(x, r, g, b, par),
        9 => row2im_n::<9>(x, r, g, b, par),
        12 => row2im_n::<12>(x, r, g, b, par),
        16 => row2im_n::<16>(x, r, g, b, par),
        _ => row2im_n::<0>(x, r, g, b, par),
    }
}

/// `row2im` with runs of `KC` = k c values, or any length when `KC` is 0.
fn row2im_n<const KC: usize>(x: &mut [f32], r: &[f32], g: Geom, b: usize, par: bool) {
    let (pr, k, c) = (g.patch(), g.k, g.c);
    let kc = if KC == 0 { k * c } else { KC };
    let img_len = g.h * g.w * c;
    let inner_x = inner_cols(g);
    per_images(x, img_len, b, par, |x, i0, n| {
        x.fill(0.0);
        for img in 0..n {
            let xi = &mut x[img * img_len..][..img_len];
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let row = &r[(((i0 + img) * g.ho + oy) * g.wo + ox) * pr..][..pr];
                    let x0 = (ox * g.s) as isize - g.p as isize;
                    let inner = inner_x.contains(&ox);
                    for (ky, src) in row.chunks_exact(kc).enumerate() {
                        let y = (oy * g.s + ky) as isize - g.p as isize;
                        if y < 0 || y >= g.h as isize {
                            continue;
                        }
                        if inner {
                            let at = ((y as usize * g.w) as isize + x0) as usize * c;
                            add_run(&mut xi[at..][..kc], src);
                        } else {
                            let (lo, hi) = inside(x0, k, g.w);
                            let at = (y as usize * g.w) as isize + x0 + lo as isize;
                            let n = (hi - lo) * c;
                            add_run(&mut xi[at as usize * c..][..n], &src[lo * c..][..n]);
                        }
                    }
                }
            }
        }
    });
}

/// Adds `bias` (c) to every row of `y` (rows, c).
fn add_bias(y: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    for row in y.chunks_exact_mut(c) {
        for (v, bb) in row.iter_mut().zip(bias) {
            *v += bb;
        }
    }
}

/// Column sums of `d` (rows, c) into `gb` (c): a one-channel layer's as one lane sum, the
/// rows in two halves on both workers with `par`.
fn col_sums(gb: &mut [f32], d: &[f32], par: bool) {
    let c = gb.len();
    let rows = d.len() / c;
    if c == 1 {
        gb[0] = lane_sum(d);
    } else if par && rows >= 2 {
        let h = rows / 2 * c;
        let mut other = vec![0.0; c];
        rayon::join(
            || math::col_sums(gb, &d[..h], c),
            || math::col_sums(&mut other, &d[h..], c),
        );
        for (a, o) in gb.iter_mut().zip(&other) {
            *a += o;
        }
    } else {
        math::col_sums(gb, d, c);
    }
}

/// Scratch for one layer: the patch rows and their gradient.
pub struct ConvWork {
    pub rows: Vec<f32>,
    pub d_rows: Vec<f32>,
}

impl ConvWork {
    /// Buffers for `b` images of a layer whose patch side is `g`.
    pub fn new(g: Geom, b: usize) -> Self {
        let n = b * g.positions() * g.patch();
        ConvWork {
            rows: vec![0.0; n],
            d_rows: vec![0.0; n],
        }
    }
}

/// Convolution forward: y (b ho wo, c_out) = im2row(x) W^T (+ bias) for NHWC x (b, h, w, c),
/// W (c_out, k k c).
#[allow(clippy::too_many_arguments)]
pub fn conv_forward(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    g: Geom,
    c_out: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let m = b * g.positions();
    im2row(&mut cw.rows, x, g, b, par);
    matmul(y, &cw.rows, wt, (m, c_out, g.patch()), false, true, par);
    if let Some(bias) = bias {
        add_bias(&mut y[..m * c_out], bias);
    }
}

/// Convolution backward from dy (b ho wo, c_out), after `conv_forward` on the same `cw`: dW
/// (c_out, k k c) and db (c_out) written, dx (b, h, w, c) written when given.
#[allow(clippy::too_many_arguments)]
pub fn conv_backward(
    gw: &mut [f32],
    gb: &mut [f32],
    dx: Option<&mut [f32]>,
    dy: &[f32],
    wt: &[f32],
    g: Geom,
    c_out: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let (m, pr) = (b * g.positions(), g.patch());
    let dy = &dy[..m * c_out];
    matmul(gw, dy, &cw.rows, (c_out, pr, m), true, false, par);
    col_sums(&mut gb[..c_out], dy, par);
    if let Some(dx) = dx {
        matmul(&mut cw.d_rows, dy, wt, (m, pr, c_out), false, false, par);
        row2im(dx, &cw.d_rows, g, b, par);
    }
}

/// Transposed convolution forward: y (b, h, w, g.c) NHWC from x (b ho wo, c_in), the adjoint of
/// a convolution whose patch side `g` is y's and whose grid is x's; W (c_in, k k g.c), + bias
/// (g.c) when given.
#[allow(clippy::too_many_arguments)]
pub fn convt_forward(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    g: Geom,
    c_in: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let m = b * g.positions();
    matmul(&mut cw.rows, x, wt, (m, g.patch(), c_in), false, false, par);
    row2im(y, &cw.rows, g, b, par);
    if let Some(bias) = bias {
        add_bias(&mut y[..b * g.h * g.w * g.c], bias);
    }
}

/// Transposed convolution backward from dy (b, h, w, g.c), for the forward's input `x`
/// (b ho wo, c_in): dW (c_in, k k g.c) and db (g.c) written, dx (b ho wo, c_in) written when
/// given.
#[allow(clippy::too_many_arguments)]
pub fn convt_backward(
    gw: &mut [f32],
    gb: &mut [f32],
    dx: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    wt: &[f32],
    g: Geom,
    c_in: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let (m, pr) = (b * g.positions(), g.patch());
    im2row(&mut cw.d_rows, dy, g, b, par);
    let dr = &cw.d_rows[..m * pr];
    matmul(gw, &x[..m * c_in], dr, (c_in, pr, m), true, false, par);
    col_sums(&mut gb[..g.c], &dy[..b * g.h * g.w * g.c], par);
    if let Some(dx) = dx {
        matmul(dx, dr, wt, (m, c_in, pr), false, true, par);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * scale,
                "{what}[{i}] = {g}, candle {w}"
            );
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// NCHW (b, c, h, w) values as NHWC.
    fn nhwc(v: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        let mut o = vec![0f32; v.len()];
        for i in 0..b {
            for ch in 0..c {
                for p in 0..h * w {
                    o[(i * h * w + p) * c + ch] = v[(i * c + ch) * h * w + p];
                }
            }
        }
        o
    }

    /// A PyTorch-layout kernel (rows, inner, k, k) as ours, (rows, (ky, kx, inner)).
    fn kernel(v: &[f32], rows: usize, inner: usize, k: usize) -> Vec<f32> {
        let mut o = vec![0f32; v.len()];
        for r in 0..rows {
            for c in 0..inner {
                for t in 0..k * k {
                    o[(r * k * k + t) * inner + c] = v[(r * inner + c) * k * k + t];
                }
            }
        }
        o
    }

    #[test]
    fn hand_values() {
        // One 1-channel 3x3 image 1..9, a 2x2 kernel of ones at stride 1 without padding: each
        // output is its patch's sum, [[12, 16], [24, 28]], plus a bias of 0.5.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let g = Geom::new(1, (3, 3), 2, 1, 0);
        assert_eq!((g.ho, g.wo), (2, 2));
        let mut cw = ConvWork::new(g, 1);
        let mut y = [0f32; 4];
        conv_forward(&mut y, &x, &[1.0; 4], Some(&[0.5]), g, 1, 1, &mut cw, false);
        assert_eq!(y, [12.5, 16.5, 24.5, 28.5]);
        // The transposed convolution of a single 1 at (0, 0) of the 2x2 grid spreads the kernel
        // [[1, 2], [3, 4]] into the 3x3 output's top-left corner.
        let mut y = [0f32; 9];
        let x = [1.0, 0.0, 0.0, 0.0];
        convt_forward(
            &mut y,
            &x,
            &[1.0, 2.0, 3.0, 4.0],
            None,
            g,
            1,
            1,
            &mut cw,
            false,
        );
        assert_eq!(y, [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        // Two channels interleaved: a 2x2 kernel over a 2-channel 2x2 image has one position,
        // whose patch row (ky, kx, channel) is the image's own NHWC order; with padding 1 and
        // stride 2 the first position sees only pixel (0, 0), in the row's last two slots.
        let x: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        let mut r = [0f32; 8];
        im2row(&mut r, &x, Geom::new(2, (2, 2), 2, 1, 0), 1, false);
        assert_eq!(r.to_vec(), x);
        let g = Geom::new(2, (2, 2), 2, 2, 1);
        let mut r = [0f32; 4 * 8];
        im2row(&mut r, &x, g, 1, false);
        assert_eq!(r[..8], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
    }

    /// Both layers against candle's conv2d / conv_transpose2d and their autograd, the loss
    /// sum(y * dy) for a random dy: y, dW, db and dx, for stride 2 with padding (the conv VAE's
    /// down- and up-sampling), stride 1, and an output padding. Values cross between the
    /// layouts: candle's NCHW and (out, in, k, k) kernels, ours NHWC and (out, k k in).
    #[test]
    fn matches_candle_autograd() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(4);
        for (b, c_in, c_out, side, k, s, p) in [
            (2, 3, 4, 6, 4, 2, 1),
            (3, 2, 5, 5, 3, 1, 1),
            (1, 2, 3, 7, 3, 2, 0),
            (2, 2, 3, 6, 3, 2, 1),
            (2, 1, 4, 8, 4, 2, 1),
            (2, 3, 2, 5, 3, 1, 1),
        ] {
            // Convolution: (b, c_in, side, side) -> (b, c_out, ho, wo).
            let g = Geom::new(c_in, (side, side), k, s, p);
            let (x, w, bias) = (
                rand_vec(&mut rng, b * c_in * side * side),
                rand_vec(&mut rng, c_out * c_in * k * k),
                rand_vec(&mut rng, c_out),
            );
            let dy = rand_vec(&mut rng, b * c_out * g.positions());
            let xv = Var::from_vec(x.clone(), (b, c_in, side, side), &dev).unwrap();
            let wv = Var::from_vec(w.clone(), (c_out, c_in, k, k), &dev).unwrap();
            let bv = Var::from_vec(bias.clone(), c_out, &dev).unwrap();
            let yt = xv
                .conv2d(&wv, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bv.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            let dyt = Tensor::from_vec(dy.clone(), yt.dims(), &dev).unwrap();
            let grads = (&yt * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
            let (ho, wo) = (g.ho, g.wo);
            let (xo, wo_, dyo) = (
                nhwc(&x, b, c_in, side, side),
                kernel(&w, c_out, c_in, k),
                nhwc(&dy, b, c_out, ho, wo),
            );
            let mut cw = ConvWork::new(g, b);
            let mut y = vec![0f32; b * c_out * g.positions()];
            conv_forward(&mut y, &xo, &wo_, Some(&bias), g, c_out, b, &mut cw, false);
            close("conv y", &y, &nhwc(&flat(&yt), b, c_out, ho, wo));
            let (mut gw, mut gb, mut dx) =
                (vec![0f32; w.len()], vec![0f32; c_out], vec![0f32; x.len()]);
            let dxs = Some(&mut dx[..]);
            conv_backward(
                &mut gw, &mut gb, dxs, &dyo, &wo_, g, c_out, b, &mut cw, false,
            );
            let gwt = flat(grads.get(&wv).unwrap());
            close("conv dW", &gw, &kernel(&gwt, c_out, c_in, k));
            close("conv db", &gb, &flat(grads.get(&bv).unwrap()));
            let dxt = flat(grads.get(&xv).unwrap());
            close("conv dx", &dx, &nhwc(&dxt, b, c_in, side, side));
            // Transposed convolution: (b, c_out, ho, wo) -> (b, c_in, side, side), kernel
            // (c_out, c_in, k, k): the adjoint geometry of the convolution above.
            let (ci, co) = (c_out, c_in);
            let gt = Geom::new(co, (side, side), k, s, p);
            let (x, w, bias) = (
                rand_vec(&mut rng, b * ci * gt.positions()),
                rand_vec(&mut rng, ci * co * k * k),
                rand_vec(&mut rng, co),
            );
            let dy = rand_vec(&mut rng, b * co * side * side);
            let xv = Var::from_vec(x.clone(), (b, ci, gt.ho, gt.wo), &dev).unwrap();
            let wv = Var::from_vec(w.clone(), (ci, co, k, k), &dev).unwrap();
            let bv = Var::from_vec(bias.clone(), co, &dev).unwrap();
            // Output padding where the stride leaves the output a row short of `side`.
            let op = side - ((gt.ho - 1) * s + k - 2 * p);
            let yt = xv
                .conv_transpose2d(&wv, p, op, s, 1)
                .unwrap()
                .broadcast_add(&bv.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(yt.dims(), &[b, co, side, side]);
            let dyt = Tensor::from_vec(dy.clone(), yt.dims(), &dev).unwrap();
            let grads = (&yt * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
            let (xo, wo_, dyo) = (
                nhwc(&x, b, ci, gt.ho, gt.wo),
                kernel(&w, ci, co, k),
                nhwc(&dy, b, co, side, side),
            );
            let mut cw = ConvWork::new(gt, b);
            let mut y = vec![0f32; b * co * side * side];
            convt_forward(&mut y, &xo, &wo_, Some(&bias), gt, ci, b, &mut cw, false);
            close("convt y", &y, &nhwc(&flat(&yt), b, co, side, side));
            let (mut gw, mut gb, mut dx) =
                (vec![0f32; w.len()], vec![0f32; co], vec![0f32; x.len()]);
            let dxs = Some(&mut dx[..]);
            convt_backward(
                &mut gw, &mut gb, dxs, &dyo, &xo, &wo_, gt, ci, b, &mut cw, false,
            );
            let gwt = flat(grads.get(&wv).unwrap());
            close("convt dW", &gw, &kernel(&gwt, ci, co, k));
            close("convt db", &gb, &flat(grads.get(&bv).unwrap()));
            let dxt = flat(grads.get(&xv).unwrap());
            close("convt dx", &dx, &nhwc(&dxt, b, ci, gt.ho, gt.wo));
        }
    }

    /// The fixed-run layout passes (k c = 4, 9, 12, 16) against the any-length one, on
    /// geometries with padding on every side, odd sizes and strides 1 and 2.
    #[test]
    fn fixed_runs_match_any_length() {
        let mut rng = StdRng::seed_from_u64(9);
        for (c, side, k, s, p) in [
            (1, 9, 4, 2, 1),
            (4, 6, 4, 2, 2),
            (1, 7, 3, 1, 1),
            (3, 5, 3, 2, 1),
            (3, 8, 4, 2, 1),
            (4, 2, 4, 1, 1),
            (1, 4, 4, 1, 0),
        ] {
            let g = Geom::new(c, (side, side + 1), k, s, p);
            let b = 3;
            let x = rand_vec(&mut rng, b * c * side * (side + 1));
            let n = b * g.positions() * g.patch();
            let (mut fixed, mut any) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            im2row(&mut fixed, &x, g, b, true);
            im2row_n::<0>(&mut any, &x, g, b, false);
            assert_eq!(fixed, any, "im2row {c} {side} {k} {s} {p}");
            let r = rand_vec(&mut rng, n);
            let (mut fixed, mut any) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
            row2im(&mut fixed, &r, g, b, true);
            row2im_n::<0>(&mut any, &r, g, b, false);
            assert_eq!(fixed, any, "row2im {c} {side} {k} {s} {p}");
        }
    }
}
