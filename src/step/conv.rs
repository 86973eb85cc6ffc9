//! 2-D convolution and transposed convolution as layers on plain buffers (the building blocks of
//! a convolutional encoder and decoder, as in Kingma et al. 2016's and Tomczak & Welling 2018's
//! conv VAEs), on the step's products:
//!
//! - convolution, y = W * x + b: the input's patches laid out as rows ("im2row": one row per
//!   output position, c_in k k wide), one product with W^T, the result transposed to NCHW;
//!   backward dW = dY^T R, dR = dY W, dx = the patches' gradients added back ("row2im");
//! - transposed convolution (the convolution's adjoint, as `conv_transpose2d`): one product of the
//!   input's positions with W (c_in, c_out k k), the rows added into the output (row2im); backward
//!   dR = im2row(dy), dW = X^T dR, dx = dR W^T.
//!
//! Activations are NCHW per image, as candle's (so a flattened image is candle's flatten), the
//! weights in the checkpoint's layout: (c_out, c_in, k, k) for a convolution, (c_in, c_out, k, k)
//! for a transposed one. Not yet wired into `Fused` (issue 32): its gradient tests against
//! candle's autograd are in this file.

use super::math::matmul;

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

/// Patches of `b` images `x` (b, c, h, w) as rows `r` (b ho wo, c k k): row (img, oy, ox),
/// column (ci, ky, kx); zeros where the kernel hangs over the padding.
pub fn im2row(r: &mut [f32], x: &[f32], g: Geom, b: usize, par: bool) {
    let per = g.positions() * g.patch();
    per_images(r, per, b, par, |r, i0, n| match g.k {
        3 => im2row_part::<3>(r, x, g, i0, n),
        4 => im2row_part::<4>(r, x, g, i0, n),
        5 => im2row_part::<5>(r, x, g, i0, n),
        _ => im2row_part::<0>(r, x, g, i0, n),
    });
}

/// `im2row` on images i0.. i0 + n into `r` (theirs only). `K` is the kernel's side when it is
/// one of the common ones (0: read it from `g`), so that each kernel row's copy is a few moves
/// rather than a call.
fn im2row_part<const K: usize>(r: &mut [f32], x: &[f32], g: Geom, i0: usize, n: usize) {
    let k = if K > 0 { K } else { g.k };
    let (pr, hw) = (g.patch(), g.h * g.w);
    for img in 0..n {
        let xi = &x[(i0 + img) * g.c * hw..][..g.c * hw];
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                let row = &mut r[((img * g.ho + oy) * g.wo + ox) * pr..][..pr];
                let x0 = (ox * g.s) as isize - g.p as isize;
                let (lo, hi) = inside(x0, k, g.w);
                for ci in 0..g.c {
                    for ky in 0..k {
                        let dst = &mut row[(ci * k + ky) * k..][..k];
                        let y = (oy * g.s + ky) as isize - g.p as isize;
                        if y < 0 || y >= g.h as isize || lo == hi {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = (ci * hw + y as usize * g.w) as isize + x0;
                        if lo == 0 && hi == k {
                            let s = src as usize;
                            dst.copy_from_slice(&xi[s..s + k]);
                        } else {
                            for (t, d) in dst.iter_mut().enumerate() {
                                *d = if t >= lo && t < hi {
                                    xi[(src + t as isize) as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2row`: each patch row of `r` added back into the image `x` (b, c, h, w),
/// which it overwrites first.
pub fn row2im(x: &mut [f32], r: &[f32], g: Geom, b: usize, par: bool) {
    per_images(x, g.c * g.h * g.w, b, par, |x, i0, n| match g.k {
        3 => row2im_part::<3>(x, r, g, i0, n),
        4 => row2im_part::<4>(x, r, g, i0, n),
        5 => row2im_part::<5>(x, r, g, i0, n),
        _ => row2im_part::<0>(x, r, g, i0, n),
    });
}

/// `row2im` for images i0.. i0 + n into `x` (theirs only); `K` as for `im2row_part`.
fn row2im_part<const K: usize>(x: &mut [f32], r: &[f32], g: Geom, i0: usize, n: usize) {
    let k = if K > 0 { K } else { g.k };
    let (pr, hw) = (g.patch(), g.h * g.w);
    x.fill(0.0);
    for img in 0..n {
        let xi = &mut x[img * g.c * hw..][..g.c * hw];
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                let row = &r[(((i0 + img) * g.ho + oy) * g.wo + ox) * pr..][..pr];
                let x0 = (ox * g.s) as isize - g.p as isize;
                let (lo, hi) = inside(x0, k, g.w);
                if lo == hi {
                    continue;
                }
                for ci in 0..g.c {
                    for ky in 0..k {
                        let y = (oy * g.s + ky) as isize - g.p as isize;
                        if y < 0 || y >= g.h as isize {
                            continue;
                        }
                        let src = &row[(ci * k + ky) * k..][..k];
                        let at = (ci * hw + y as usize * g.w) as isize + x0;
                        if lo == 0 && hi == k {
                            let a = at as usize;
                            for (d, v) in xi[a..a + k].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            for (t, v) in src.iter().enumerate().take(hi).skip(lo) {
                                xi[(at + t as isize) as usize] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// (b, n, c) -> (b, c, n) per image: position-major rows to NCHW, or back with n and c swapped.
pub fn transpose(out: &mut [f32], v: &[f32], b: usize, n: usize, c: usize, par: bool) {
    per_images(out, n * c, b, par, |out, i0, m| {
        for img in 0..m {
            let (src, dst) = (
                &v[(i0 + img) * n * c..][..n * c],
                &mut out[img * n * c..][..n * c],
            );
            // In tiles, so that both sides' reads and writes stay within a few cache lines.
            const T: usize = 16;
            for i0 in (0..n).step_by(T) {
                for j0 in (0..c).step_by(T) {
                    for i in i0..(i0 + T).min(n) {
                        for j in j0..(j0 + T).min(c) {
                            dst[j * n + i] = src[i * c + j];
                        }
                    }
                }
            }
        }
    });
}

/// Scratch for one layer: patch rows, and position-major outputs or gradients.
pub struct ConvWork {
    pub rows: Vec<f32>,
    pub pm: Vec<f32>,
    pub d_rows: Vec<f32>,
}

impl ConvWork {
    /// Buffers for `b` images of a layer whose patch side is `g` and whose other side has
    /// `c_other` channels.
    pub fn new(g: Geom, c_other: usize, b: usize) -> Self {
        let n = b * g.positions();
        ConvWork {
            // The transposed convolution's backward also holds dX (b n, c_other) here.
            rows: vec![0.0; n * g.patch().max(c_other)],
            pm: vec![0.0; n * c_other],
            d_rows: vec![0.0; n * g.patch()],
        }
    }
}

/// Convolution forward: y (b, c_out, ho, wo) = W (c_out, c k k) * x (b, c, h, w) + bias (c_out).
#[allow(clippy::too_many_arguments)]
pub fn conv_forward(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    g: Geom,
    c_out: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let (n, pr) = (g.positions(), g.patch());
    im2row(&mut cw.rows, x, g, b, par);
    // (b n, c_out) = R (b n, c k k) W^T.
    matmul(
        &mut cw.pm,
        &cw.rows,
        wt,
        (b * n, c_out, pr),
        false,
        true,
        par,
    );
    for row in cw.pm[..b * n * c_out].chunks_exact_mut(c_out) {
        for (v, bb) in row.iter_mut().zip(bias) {
            *v += bb;
        }
    }
    transpose(y, &cw.pm, b, n, c_out, par);
}

/// Convolution backward from dy (b, c_out, ho, wo), after `conv_forward` on the same `cw`: dW
/// (c_out, c k k) and db (c_out) written, dx (b, c, h, w) written when given.
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
    let (n, pr) = (g.positions(), g.patch());
    transpose(&mut cw.pm, dy, b, c_out, n, par);
    let dym = &cw.pm[..b * n * c_out];
    matmul(gw, dym, &cw.rows, (c_out, pr, b * n), true, false, par);
    gb[..c_out].fill(0.0);
    for row in dym.chunks_exact(c_out) {
        for (a, v) in gb.iter_mut().zip(row) {
            *a += v;
        }
    }
    if let Some(dx) = dx {
        matmul(
            &mut cw.d_rows,
            dym,
            wt,
            (b * n, pr, c_out),
            false,
            false,
            par,
        );
        row2im(dx, &cw.d_rows, g, b, par);
    }
}

/// Transposed convolution forward: y (b, c_out, h, w) from x (b, c_in, ho, wo), the adjoint of a
/// convolution whose patch side `g` is y's (g.c = c_out) and whose grid is x's; W (c_in, c_out k k),
/// bias (c_out).
#[allow(clippy::too_many_arguments)]
pub fn convt_forward(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    g: Geom,
    c_in: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let (n, pr, hw) = (g.positions(), g.patch(), g.h * g.w);
    transpose(&mut cw.pm, x, b, c_in, n, par);
    // R (b n, c_out k k) = X (b n, c_in) W.
    matmul(
        &mut cw.rows,
        &cw.pm,
        wt,
        (b * n, pr, c_in),
        false,
        false,
        par,
    );
    row2im(y, &cw.rows, g, b, par);
    for img in 0..b {
        for (c, bb) in bias.iter().enumerate().take(g.c) {
            for v in &mut y[(img * g.c + c) * hw..][..hw] {
                *v += bb;
            }
        }
    }
}

/// Transposed convolution backward from dy (b, c_out, h, w), after `convt_forward` on the same
/// `cw` (which holds x position-major): dW (c_in, c_out k k) and db (c_out) written, dx (b, c_in,
/// ho, wo) written when given.
#[allow(clippy::too_many_arguments)]
pub fn convt_backward(
    gw: &mut [f32],
    gb: &mut [f32],
    dx: Option<&mut [f32]>,
    dy: &[f32],
    wt: &[f32],
    g: Geom,
    c_in: usize,
    b: usize,
    cw: &mut ConvWork,
    par: bool,
) {
    let (n, pr, hw) = (g.positions(), g.patch(), g.h * g.w);
    im2row(&mut cw.d_rows, dy, g, b, par);
    let dr = &cw.d_rows[..b * n * pr];
    matmul(gw, &cw.pm, dr, (c_in, pr, b * n), true, false, par);
    gb[..g.c].fill(0.0);
    for img in 0..b {
        for (c, a) in gb.iter_mut().enumerate().take(g.c) {
            *a += dy[(img * g.c + c) * hw..][..hw].iter().sum::<f32>();
        }
    }
    if let Some(dx) = dx {
        // dX (b n, c_in) = dR W^T, back to NCHW through the rows buffer.
        matmul(&mut cw.rows, dr, wt, (b * n, c_in, pr), false, true, par);
        transpose(dx, &cw.rows, b, n, c_in, par);
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

    #[test]
    fn hand_values() {
        // One 1-channel 3x3 image 1..9, a 2x2 kernel of ones at stride 1 without padding: each
        // output is its patch's sum, [[12, 16], [24, 28]], plus a bias of 0.5.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let g = Geom::new(1, (3, 3), 2, 1, 0);
        assert_eq!((g.ho, g.wo), (2, 2));
        let mut cw = ConvWork::new(g, 1, 1);
        let mut y = [0f32; 4];
        conv_forward(&mut y, &x, &[1.0; 4], &[0.5], g, 1, 1, &mut cw, false);
        assert_eq!(y, [12.5, 16.5, 24.5, 28.5]);
        // The transposed convolution of a single 1 at (0, 0) of the 2x2 grid spreads the kernel
        // [[1, 2], [3, 4]] into the 3x3 output's top-left corner.
        let mut y = [0f32; 9];
        convt_forward(
            &mut y,
            &[1.0, 0.0, 0.0, 0.0],
            &[1.0, 2.0, 3.0, 4.0],
            &[0.0],
            g,
            1,
            1,
            &mut cw,
            false,
        );
        assert_eq!(y, [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    }

    /// Both layers against candle's conv2d / conv_transpose2d and their autograd, the loss
    /// sum(y * dy) for a random dy: y, dW, db and dx, for stride 2 with padding (the conv VAE's
    /// down- and up-sampling) and stride 1.
    #[test]
    fn matches_candle_autograd() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(4);
        for (b, c_in, c_out, side, k, s, p) in [
            (2, 3, 4, 6, 4, 2, 1),
            (3, 2, 5, 5, 3, 1, 1),
            (1, 2, 3, 7, 3, 2, 0),
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
            let mut cw = ConvWork::new(g, c_out, b);
            let mut y = vec![0f32; b * c_out * g.positions()];
            conv_forward(&mut y, &x, &w, &bias, g, c_out, b, &mut cw, false);
            close("conv y", &y, &flat(&yt));
            let (mut gw, mut gb, mut dx) =
                (vec![0f32; w.len()], vec![0f32; c_out], vec![0f32; x.len()]);
            conv_backward(
                &mut gw,
                &mut gb,
                Some(&mut dx),
                &dy,
                &w,
                g,
                c_out,
                b,
                &mut cw,
                false,
            );
            close("conv dW", &gw, &flat(grads.get(&wv).unwrap()));
            close("conv db", &gb, &flat(grads.get(&bv).unwrap()));
            close("conv dx", &dx, &flat(grads.get(&xv).unwrap()));

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
            let mut cw = ConvWork::new(gt, ci, b);
            let mut y = vec![0f32; b * co * side * side];
            convt_forward(&mut y, &x, &w, &bias, gt, ci, b, &mut cw, false);
            close("convt y", &y, &flat(&yt));
            let (mut gw, mut gb, mut dx) =
                (vec![0f32; w.len()], vec![0f32; co], vec![0f32; x.len()]);
            convt_backward(
                &mut gw,
                &mut gb,
                Some(&mut dx),
                &dy,
                &w,
                gt,
                ci,
                b,
                &mut cw,
                false,
            );
            close("convt dW", &gw, &flat(grads.get(&wv).unwrap()));
            close("convt db", &gb, &flat(grads.get(&bv).unwrap()));
            close("convt dx", &dx, &flat(grads.get(&xv).unwrap()));
        }
    }
}
