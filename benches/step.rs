//! `cargo bench`: one training step (forward, backward, Adam) of the reference recipe
//! (784-400-20, batch 128) on real MNIST batches, for the fused CPU step and for candle's
//! autograd, with the epoch time and images/s they imply (469 steps for 60,000 images).
//! Plain timing, no harness: `cargo bench -- --steps N` changes the count (default 300).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;
use vae::config::Config;
use vae::engine::Trainer;
use vae::optim::AdamConfig;
use vae::step::Fused;
use vae::{data, model};

fn report(name: &str, mut times: Vec<f64>, n: usize, bs: usize) {
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let epoch = mean * n.div_ceil(bs) as f64;
    println!(
        "{name:<16} step median {:6.2} ms  mean {:6.2} ms  min {:6.2} ms  -> epoch {:5.2} s, {:6.0} images/s",
        med * 1e3,
        mean * 1e3,
        times[0] * 1e3,
        epoch,
        n as f64 / epoch
    );
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    vae::device::init_cpu_threads();
    let cfg = Config::default();
    let dev = Device::Cpu;
    let ds = data::load(&cfg.data, 0, 1)?;
    let (n, dim, bs, z) = (
        ds.train.n,
        ds.train.dim(),
        cfg.train.batch_size,
        cfg.model.latent,
    );
    let px = ds.train.pixels_f32();
    let mut rng = StdRng::seed_from_u64(1);
    let params = model::init_params(&cfg.model, dim, &mut rng, &dev)?;
    let eps: Vec<f32> = (0..bs * z)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    println!(
        "reference recipe 784-400-20, batch {bs}, {} threads, {} timed steps",
        candle_core::utils::get_num_threads(),
        steps
    );

    let adam = AdamConfig {
        normalize_grad: false,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        adamax: false,
    };
    let mut f = Fused::new(&cfg, dim, &params, adam, bs)?;
    let mut times = Vec::new();
    for i in 0..steps + 20 {
        let t = Instant::now();
        let off = (i % 400) * bs * dim;
        f.x_mut(bs).copy_from_slice(&px[off..off + bs * dim]);
        f.eps_mut(bs).copy_from_slice(&eps);
        f.step(bs)?;
        if i >= 20 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    report("fused", times, n, bs);
    if args.iter().any(|a| a == "--fused-only") {
        return Ok(());
    }

    let x_all = Tensor::from_vec(px, (n, dim), &dev)?;
    let et = Tensor::from_vec(eps, (bs, z), &dev)?;
    let mut tr = Trainer::new(&cfg, dim, params, &dev)?;
    let auto_steps = (steps / 4).max(20);
    let mut times = Vec::new();
    for i in 0..auto_steps + 5 {
        let t = Instant::now();
        let o = vae::train::objective(&cfg, 0, 1);
        let s = tr.step(&x_all.narrow(0, (i % 400) * bs, bs)?, &et, &o)?;
        s.to_vec1::<f32>()?;
        if i >= 5 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    report("candle autograd", times, n, bs);
    Ok(())
}
