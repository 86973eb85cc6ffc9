//! The products and vector math of the fused step: `matmul` on candle's own `gemm` (with its
//! AVX-512 kernels switched on, chosen at run time), and the elementwise functions in forms the
//! compiler vectorizes: `exp`, `ln(1 + y)`, softplus with its sigmoid, tanh, a lane-parallel sum,
//! column sums and a stable log-sum-exp.
//!
//! Each loop that must vectorize runs inside `simd!`, which compiles it for AVX-512 or AVX2+FMA
//! when the CPU has them (detected once per call, a cached atomic load).

use gemm::Parallelism;

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them (so the loops vectorize
/// 16- or 8-wide and `exp`'s floor is one instruction), else as plain x86-64.
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
pub(crate) use simd;

/// e^x for f32 in a form the compiler vectorizes: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2],
/// p the degree-6 Taylor polynomial (relative error < 2e-7 on that interval).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
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
pub fn ln1p_unit(y: f32) -> f32 {
    let s = y / (2.0 + y);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0))))))
}

/// log(1 + e^a) and its derivative sigmoid(a), from one exp.
#[inline(always)]
pub fn softplus_and_sigmoid(a: f32) -> (f32, f32) {
    let e = exp_f32(-a.abs());
    let inv = 1.0 / (1.0 + e);
    let sig = if a >= 0.0 { inv } else { e * inv };
    (a.max(0.0) + ln1p_unit(e), sig)
}

/// tanh(a) = sign(a) (1 - e^{-2|a|}) / (1 + e^{-2|a|}), finite for any a.
#[inline(always)]
pub fn tanh_f32(a: f32) -> f32 {
    let e = exp_f32(-2.0 * a.abs());
    ((1.0 - e) / (1.0 + e)).copysign(a)
}

/// sqrt(2 / pi) and the cubic coefficient of GELU's tanh form (candle's `gelu`).
pub const GELU_C: f32 = 0.797_884_6;
pub const GELU_A: f32 = 0.044_715;

/// Sum of `v` in 16 lanes (a plain f32 sum is a serial chain the compiler may not reorder).
#[inline(always)]
pub fn lane_sum(v: &[f32]) -> f32 {
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

/// Column sums of `d` (rows, n) into `out` (n).
pub fn col_sums(out: &mut [f32], d: &[f32], n: usize) {
    simd!({
        out.fill(0.0);
        for r in d.chunks_exact(n) {
            for (o, v) in out.iter_mut().zip(r) {
                *o += v;
            }
        }
    })
}

/// Moves rows `keep[i]` of `buf` (rows of `width`) to row i, in place; `keep` increasing.
pub fn gather_rows(buf: &mut [f32], keep: &[u32], width: usize) {
    for (i, &r) in keep.iter().enumerate() {
        let r = r as usize;
        if r != i {
            buf.copy_within(r * width..(r + 1) * width, i * width);
        }
    }
}

/// The inverse of `gather_rows` over `rows` rows: row i goes back to row `keep[i]`, and the
/// rows not kept become zero.
pub fn scatter_rows(buf: &mut [f32], keep: &[u32], width: usize, rows: usize) {
    let mut next = rows;
    for (i, &r) in keep.iter().enumerate().rev() {
        let r = r as usize;
        buf[(r + 1) * width..next * width].fill(0.0);
        if r != i {
            buf.copy_within(i * width..(i + 1) * width, r * width);
        }
        next = r;
    }
    buf[..next * width].fill(0.0);
}

/// log sum_i e^{v_i}, stable (the max taken out), in f64: the importance weights' scale.
pub fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
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

/// The smallest product (m n k multiply-adds) split between the two workers. Batch-20 recipes'
/// products are 0.02-3 M; splitting them made Burda et al.'s two-layer k = 1 epoch about 1.35x
/// faster and their one-layer and IWAE k = 5 epochs about 1.25x (2-core Zen 3, alternating
/// whole epochs), where the earlier 8 M left them on one thread; the batch-128 reference
/// recipe's and the conv network's epochs did not move, its IWAE k = 5 epoch (640-row products
/// of 20 latents) about 1.1x faster.
const PAR_MIN: usize = 1 << 16;

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

#[allow(clippy::too_many_arguments)] // the BLAS shape: dst, two operands, three sizes, flags
/// C (m, n) = A (m, k) @ B (k, n), row-major; `a_t`: A is stored (k, m); `b_t`: B is stored
/// (n, k). `par`: may use both workers.
///
/// A big product is cut in two halves of C (row blocks, or column blocks when C has few rows),
/// one single-threaded gemm per worker: 5-8% faster per training step than gemm's own
/// two-thread split (measured alternating 25-step blocks in one process). Products under
/// `PAR_MIN` stay on one thread: the hand-off costs more than it saves.
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    par: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_cs, a_rs) = strides(m, k, a_t);
    let (b_cs, b_rs) = strides(k, n, b_t);
    // Halves on 16-row (16-column) boundaries, gemm's vector width.
    let (m1, n1) = ((m / 2).div_ceil(16) * 16, (n / 2).div_ceil(16) * 16);
    // Rows when there are many (measured), columns when C is wide; between, whichever halves
    // are more even (20 rows split 16 + 4, 200 columns 112 + 88).
    let by_rows = m >= 256 || (n < 256 && (n1 >= n || m1 * n <= n1 * m));
    if !par || m * n * k < PAR_MIN || (by_rows && m1 >= m) || (!by_rows && n1 >= n) {
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

#[cfg(test)]
#[allow(clippy::approx_constant)] // hand-computed expected values, written as computed
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn exp_ln1p_tanh_are_accurate() {
        for i in -800..=800 {
            let x = i as f32 * 0.1;
            let (a, b) = (exp_f32(x), x.exp());
            assert!((a - b).abs() <= 3e-7 * b, "exp({x}) = {a}, want {b}");
            let (t, u) = (tanh_f32(x), x.tanh());
            assert!((t - u).abs() <= 3e-7, "tanh({x}) = {t}, want {u}");
        }
        for i in 0..=1000 {
            let y = i as f32 / 1000.0;
            assert!((ln1p_unit(y) - y.ln_1p()).abs() < 2e-7, "ln1p({y})");
        }
        // Hand values: e^0 = 1, e^1 = 2.718282, softplus(0) = ln 2 = 0.693147, sigmoid(0) = 0.5.
        assert!((exp_f32(0.0) - 1.0).abs() < 1e-7 && (exp_f32(1.0) - 2.718_282).abs() < 1e-6);
        let (sp, sg) = softplus_and_sigmoid(0.0);
        assert!((sp - 0.693_147).abs() < 1e-6 && sg == 0.5);
        // Extremes stay finite: softplus(100) = 100, softplus(-100) ~ 0.
        assert_eq!(softplus_and_sigmoid(100.0).0, 100.0);
        assert!(softplus_and_sigmoid(-100.0).0 < 1e-30);
    }

    #[test]
    fn gather_and_scatter_rows() {
        // Rows [a, b, c, d] of width 2; keep rows 1 and 3: gathered [b, d, ..]; scattered back
        // [0, b, 0, d].
        let mut v = vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5];
        gather_rows(&mut v, &[1, 3], 2);
        assert_eq!(&v[..4], &[2.0, 2.5, 4.0, 4.5]);
        scatter_rows(&mut v, &[1, 3], 2, 4);
        assert_eq!(v, vec![0.0, 0.0, 2.0, 2.5, 0.0, 0.0, 4.0, 4.5]);
        let mut v = vec![1.0, 2.0, 3.0];
        scatter_rows(&mut v, &[], 1, 3);
        assert_eq!(v, vec![0.0; 3]);
    }

    #[test]
    fn logsumexp_hand_values() {
        // log(e^0 + e^0) = ln 2; log(e^-1000 + e^-1000) = -1000 + ln 2 (no underflow).
        assert!((logsumexp(&[0.0, 0.0]) - std::f64::consts::LN_2).abs() < 1e-12);
        assert!((logsumexp(&[-1000.0, -1000.0]) + 1000.0 - std::f64::consts::LN_2).abs() < 1e-9);
        assert_eq!(logsumexp(&[f64::NEG_INFINITY]), f64::NEG_INFINITY);
    }

    #[test]
    fn matmul_matches_naive() {
        // Shapes for each path: one thread (small), halves by rows (m >= 256), halves by
        // columns (few rows, wide), a batch of 10 whose row halves would be empty (columns,
        // 112 + 88), a batch of 20 (columns: 64 + 36 against rows' 16 + 4), and rows as the
        // more even split (32 + 16 against 32 + 8).
        let mut rng = StdRng::seed_from_u64(2);
        let shapes = [
            (5, 7, 3),
            (300, 20, 1400),
            (64, 400, 330),
            (10, 200, 4200),
            (20, 100, 50),
            (48, 40, 64),
        ];
        for (m, n, k) in shapes {
            for (a_t, b_t) in [(false, false), (true, false), (false, true)] {
                for par in [true, false] {
                    let a: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
                    let mut c = vec![f32::NAN; m * n];
                    matmul(&mut c, &a, &b, (m, n, k), a_t, b_t, par);
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
    }
}
