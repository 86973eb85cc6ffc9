//! `cargo bench --bench conv_products [-- --par]`: the products and layout passes of one
//! training step of the PyTorch peer's conv network (`benches/compare-pytorch.sh ... conv`:
//! 4x4 stride-2 convolutions of 32 and 64 channels, 28 -> 14 -> 7, a dense layer of 256, z = 32,
//! batch 128), each timed alone on warm buffers, in GFLOP/s, and their sum as seconds per epoch
//! (469 steps). Set beside a real epoch's time, it says how much of the epoch the products are
//! and how much is everything else. `--par`: both workers, as training runs them.
//! Last, the machine's product ceiling as the step sees it: a 2048 x 2048 x 2048 product through
//! the same `matmul` (PyTorch's own is `a @ b` on two 2048 x 2048 f32 tensors), against which
//! docs/results.md states what fraction of the ceiling an epoch reaches.
//! Plain timing, no harness.

use std::time::Instant;
use vae::step::conv::{im2row, row2im, Geom};
use vae::step::math::matmul;

/// Mean seconds of `f` over 20 calls after one warm-up, printed with its GFLOP/s.
fn time<F: FnMut()>(name: &str, flops: f64, mut f: F) -> f64 {
    f();
    let reps = 20;
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    let dt = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{name:<30} {:8.3} ms  {:7.1} GFLOP/s",
        dt * 1e3,
        flops / dt / 1e9
    );
    dt
}

fn main() {
    vae::device::init_cpu_threads();
    let par = std::env::args().any(|a| a == "--par");
    let b = 128;
    let buf = |n: usize| vec![0.01f32; n];
    let mut total = 0.0;
    // (name, m, n, k, A stored transposed, B stored transposed): `conv`'s and the dense
    // layers' calls of `matmul` in one step, m = images x positions for the convolutions.
    for (name, m, n, k, a_t, b_t) in [
        ("conv1 y (m,32,16) B^T", b * 196, 32, 16, false, true),
        ("conv1 dW (32,16,m) A^T", 32, 16, b * 196, true, false),
        ("conv2 y (m,64,512) B^T", b * 49, 64, 512, false, true),
        ("conv2 dW (64,512,m) A^T", 64, 512, b * 49, true, false),
        ("conv2 dR (m,512,64)", b * 49, 512, 64, false, false),
        ("enc dense y (b,256,3136) B^T", b, 256, 3136, false, true),
        ("enc dense dW (256,3136,b) A^T", 256, 3136, b, true, false),
        ("enc dense dx (b,3136,256)", b, 3136, 256, false, false),
        ("dec dense y (b,3136,256) B^T", b, 3136, 256, false, true),
        ("dec dense dW (3136,256,b) A^T", 3136, 256, b, true, false),
        ("dec dense dx (b,256,3136)", b, 256, 3136, false, false),
        ("convT1 R (m,512,64)", b * 49, 512, 64, false, false),
        ("convT1 dW (64,512,m) A^T", 64, 512, b * 49, true, false),
        ("convT1 dx (m,64,512) B^T", b * 49, 64, 512, false, true),
        ("convT2 R (m,16,32)", b * 196, 16, 32, false, false),
        ("convT2 dW (32,16,m) A^T", 32, 16, b * 196, true, false),
        ("convT2 dx (m,32,16) B^T", b * 196, 32, 16, false, true),
    ] {
        let (mut c, a, bm) = (buf(m * n), buf(m * k), buf(k * n));
        let flops = 2.0 * (m * n * k) as f64;
        total += time(name, flops, || {
            matmul(&mut c, &a, &bm, (m, n, k), a_t, b_t, par)
        });
    }
    // The layout passes: per step, im2row twice and row2im once on the 28 x 28 side (conv1's
    // input, convT2's output and its gradient), each twice on the 14 x 14 side.
    for (name, g, rows, ims) in [
        ("28x28x1", Geom::new(1, (28, 28), 4, 2, 1), 2.0, 1.0),
        ("14x14x32", Geom::new(32, (14, 14), 4, 2, 1), 2.0, 2.0),
    ] {
        let mut r = buf(b * g.positions() * g.patch());
        let mut x = buf(b * g.h * g.w * g.c);
        total += rows
            * time(&format!("im2row {name}"), 0.0, || {
                im2row(&mut r, &x, g, b, par)
            });
        let r2 = r.clone();
        total += ims
            * time(&format!("row2im {name}"), 0.0, || {
                row2im(&mut x, &r2, g, b, par)
            });
    }
    println!(
        "products and layout passes: {:.2} ms a step -> {:.2} s an epoch of 469 steps",
        total * 1e3,
        total * 469.0
    );
    // The ceiling: a square product large enough that packing and hand-offs are noise.
    let s = 2048;
    let (mut c, a, bm) = (buf(s * s), buf(s * s), buf(s * s));
    time("ceiling (2048,2048,2048)", 2.0 * (s * s * s) as f64, || {
        matmul(&mut c, &a, &bm, (s, s, s), false, false, par)
    });
}
