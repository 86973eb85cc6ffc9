//! `cargo bench --bench fma_peak`: the machine's f32 multiply-add ceiling, the figure an
//! epoch's product rate is stated against (docs/results.md). A loop of independent fused
//! multiply-adds on registers only (no memory traffic): 12 accumulators, enough to cover the
//! FMA latency (4 cycles) on two FMA ports, in the widest vectors the CPU has (AVX-512: 16
//! lanes; AVX2+FMA: 8), on one thread and on both cores at once. An FMA counts 2 FLOP.
//! Plain timing, no harness; each figure is the best of 5 runs of about 0.2 s.

use std::time::Instant;

const ACC: usize = 12;

/// FLOP per call of `kernel`: `iters` rounds of ACC vector FMAs of `lanes` lanes.
fn flops(iters: u64, lanes: usize) -> f64 {
    iters as f64 * (ACC * lanes * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); ACC];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); ACC];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

/// A kernel: `iters` rounds of FMAs, returning a value the optimizer must keep.
type Kernel = fn(u64) -> f32;

/// The widest kernel this CPU runs: (name, lanes, the kernel).
fn widest() -> Option<(&'static str, usize, Kernel)> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected.
            return Some(("AVX-512 (zmm)", 16, |n| unsafe { fma_avx512(n) }));
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected.
            return Some(("AVX2+FMA (ymm)", 8, |n| unsafe { fma_avx2(n) }));
        }
    }
    None
}

/// Best GFLOP/s of 5 runs of `threads` threads each running `kernel(iters)`.
fn rate(kernel: Kernel, lanes: usize, iters: u64, threads: usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sink: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| s.spawn(move || kernel(iters)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let dt = start.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        best = best.max(flops(iters, lanes) * threads as f64 / dt / 1e9);
    }
    best
}

fn main() {
    let Some((name, lanes, kernel)) = widest() else {
        println!("no AVX2+FMA or AVX-512 on this CPU: no vector FMA ceiling to measure");
        return;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // About 0.2 s a run at 100 GFLOP/s.
    let iters = (2e10 / flops(1, lanes)) as u64;
    let one = rate(kernel, lanes, iters, 1);
    println!("f32 FMA ceiling, {name}: one thread {one:7.1} GFLOP/s");
    if cores > 1 {
        let all = rate(kernel, lanes, iters, cores);
        println!(
            "f32 FMA ceiling, {name}: {cores} threads {all:7.1} GFLOP/s ({:.2}x one)",
            all / one
        );
    }
}
