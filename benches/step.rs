//! `cargo bench`: one training step (forward, backward, Adam) of the reference recipe
//! (784-400-20, batch 128) on real MNIST batches, and an epoch's throughput in images/s.
//! Plain timing (median of repeats), no harness: `cargo bench -- --steps N` to change the count.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;
use vae::config::Config;
use vae::train::Trainer;
use vae::{data, eval};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let cfg = Config::default();
    let dev = Device::Cpu;
    let ds = data::load_dir(&cfg.data.dir, 0, 1)?;
    let (n, dim, bs) = (ds.train.n, ds.train.dim(), cfg.train.batch_size);
    let px = ds.train.pixels_f32();
    let x_all = Tensor::from_vec(px, (n, dim), &dev)?;
    let mut rng = StdRng::seed_from_u64(1);
    let mut tr = Trainer::new(&cfg, dim, &mut rng, &dev)?;
    let batches: Vec<Tensor> = (0..16)
        .map(|i| x_all.narrow(0, i * bs, bs))
        .collect::<candle_core::Result<_>>()?;
    let eps = eval::normal(&mut rng, bs, cfg.model.latent, &dev)?;

    for b in batches.iter().take(10) {
        tr.step(b, &eps)?;
    }
    let mut times = Vec::with_capacity(steps);
    for i in 0..steps {
        let t = Instant::now();
        let s = tr.step(&batches[i % batches.len()], &eps)?;
        s.to_vec1::<f32>()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let epoch_steps = n.div_ceil(bs) as f64;
    println!(
        "train step, batch {bs}, 784-400-20: median {:.2} ms, mean {:.2} ms, min {:.2} ms over {steps} steps",
        med * 1e3,
        mean * 1e3,
        times[0] * 1e3
    );
    println!(
        "epoch estimate: {:.2} s ({:.0} images/s) at the mean step time, {} threads",
        mean * epoch_steps,
        n as f64 / (mean * epoch_steps),
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
