//! Every family of the fused step against candle's autograd on the same parameters, batch and
//! noise: the logged -ELBO terms and every parameter's gradient.
//!
//! Tolerance: 2e-4 of the largest gradient of the tensor (3e-4 with flows). Both sides compute
//! in f32 with sums in different orders over a few dozen terms, so agreement is ~1e-6 relative;
//! a wrong term (a missing factor, a sign, a sample's weight) moves gradients by a large fraction
//! of their scale, far beyond that.

use super::*;
use crate::config::{Activation, TrainConfig};
use crate::model::{self, Objective, Vae};
use candle_core::DType;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

fn config(model: ModelConfig, mc: usize, iw: usize) -> Config {
    Config {
        model,
        train: TrainConfig {
            mc_samples: mc,
            iw_samples: iw,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Adam's (or Adamax's) settings of these tests: beta1 0.9, beta2 0.999, eps 1e-8.
fn adam_cfg(lr: f64, weight_decay: f64, normalize_grad: bool, adamax: bool) -> AdamConfig {
    AdamConfig {
        normalize_grad,
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
        adamax,
    }
}

/// Seeded parameters, a batch x in [0, 1] (b, dim) and noise eps (b S, Z), drawn in that order.
fn fixture(
    cfg: &ModelConfig,
    dim: usize,
    b: usize,
    s: usize,
    seed: u64,
) -> (HashMap<String, Tensor>, Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut params = model::init_params(cfg, dim, &mut rng, &Device::Cpu).unwrap();
    // Global flow parameters start at U(-1/sqrt(Z), ..); make them larger so the flow matters.
    for (k, t) in params.iter_mut() {
        if k.starts_with("flow.") {
            *t = (t.clone() * 4.0).unwrap();
        }
        // Pseudo-inputs start N(0.05, 0.01^2); spread them to N(0.5, 0.6^2) so that some lie
        // outside the clip to [0, 1], where no gradient may reach them.
        if k == "prior.pseudo_inputs" {
            *t = t.affine(60.0, 0.5 - 0.05 * 60.0).unwrap();
        }
    }
    let x: Vec<f32> = (0..b * dim).map(|_| rng.random::<f32>()).collect();
    let eps: Vec<f32> = (0..b * s * cfg.noise_dim())
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    (params, x, eps)
}

/// The candle model on `params` (through a VarMap, for autograd) and the batch and noise as
/// tensors: the side the fused step is checked against.
fn candle_side(
    cfg: &ModelConfig,
    dim: usize,
    params: &HashMap<String, Tensor>,
    x: &[f32],
    eps: &[f32],
) -> (candle_nn::VarMap, Vae, Tensor, Tensor) {
    let dev = Device::Cpu;
    let vm = model::varmap_from(params.clone()).unwrap();
    let m = Vae::new(cfg, dim, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let xt = Tensor::from_vec(x.to_vec(), (x.len() / dim, dim), &dev).unwrap();
    let zd = cfg.noise_dim();
    let et = Tensor::from_vec(eps.to_vec(), (eps.len() / zd, zd), &dev).unwrap();
    (vm, m, xt, et)
}

/// One family: `mc` / `iw` samples, a KL weight, and free bits at the median of the
/// dimensions' batch-mean KL (so some dimensions are under it and some are not).
fn check_with(model: ModelConfig, mc: usize, iw: usize, kl_weight: f64, median_free_bits: bool) {
    let cfg = config(model.clone(), mc, iw);
    let s = mc.max(iw);
    // A conv network reads its image; an MLP 12 values.
    let dim = model.image.map_or(12, |[c, h, w]| c * h * w);
    let b = 5;
    let (params, x, eps) = fixture(&model, dim, b, s, 3);
    let adam = adam_cfg(1e-2, 0.01, false, false);
    let (vm, m, xt, et) = candle_side(&model, dim, &params, &x, &eps);
    let free_bits = if median_free_bits {
        let dims = m.samples(&xt, &et, s).unwrap().kl_dims.unwrap();
        let mut v = dims.mean(0).unwrap().to_vec1::<f32>().unwrap();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2 - 1] as f64 + v[v.len() / 2] as f64) / 2.0
    } else {
        0.0
    };
    let o = Objective {
        samples: s,
        iwae: iw > 1,
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
        // After the step ckl holds each dimension's weight: 0 where under the free bits.
        let c = &f.work.ckl;
        assert!(
            c.contains(&0.0) && c.iter().any(|v| *v > 0.0),
            "free bits split nothing: {c:?}"
        );
    }
    let what = format!("{model:?} mc {mc} iw {iw} kl {kl_weight} fb {free_bits}");
    assert!(
        (fr - r).abs() < 1e-4 * r.abs().max(1.0),
        "{what}: recon {fr} vs {r}"
    );
    assert!(
        (fk - k).abs() < 1e-4 * k.abs().max(1.0),
        "{what}: kl {fk} vs {k}"
    );
    let tol = if model.flows > 0 { 3e-4 } else { 2e-4 };
    let fg = f.grads().unwrap();
    let data = vm.data().lock().unwrap();
    assert_eq!(fg.len(), data.len(), "{what}: tensor count");
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
                (g - w).abs() <= tol * scale,
                "{what}: d{name}[{i}] = {g}, autograd {w}"
            );
        }
    }
    // The forward-only evaluation equals the candle model's -ELBO terms on the same images and
    // noise, one sample each, over more images than the buffers hold (11 against 8).
    let x11: Vec<f32> = x.iter().chain(&x).chain(&x[..dim]).copied().collect();
    let mut rng = StdRng::seed_from_u64(17);
    let e11: Vec<f32> = (0..11 * model.noise_dim())
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let (er, ek) = f.evaluate(&x11, &e11).unwrap();
    let (_, m11, xt11, et11) = candle_side(&model, dim, &params, &x11, &e11);
    let (tr, tk) = m11.neg_elbo_terms(&xt11, &et11).unwrap();
    let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let (tr, tk) = (sum(tr), sum(tk));
    assert!(
        (er - tr).abs() < 1e-4 * tr.abs().max(1.0),
        "{what}: evaluated recon {er} vs {tr}"
    );
    assert!(
        (ek - tk).abs() < 1e-4 * tk.abs().max(1.0),
        "{what}: evaluated kl {ek} vs {tk}"
    );
    // And the parameters round-trip through the checkpoint layout unchanged.
    let back = f.params().unwrap();
    for (name, t) in &params {
        assert_eq!(
            back[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
}

fn check(model: ModelConfig) {
    check_with(model, 1, 1, 1.0, false)
}

/// A conv network on `image` [c, h, w] with `layers` [out channels, kernel, stride].
fn convnet(
    image: [usize; 3],
    layers: Vec<[usize; 3]>,
    hidden: Vec<usize>,
    latent: usize,
) -> ModelConfig {
    ModelConfig {
        arch: crate::config::Arch::Conv,
        conv: layers,
        image: Some(image),
        ..small(hidden, latent)
    }
}

#[test]
fn conv_network_every_activation_objective_and_prior() {
    // 8x8 grey through kernel 4 stride 2 (padding 1) then kernel 3 stride 2 (padding 1, output
    // padding 1): 8 -> 4 -> 2; a non-square colour image through stride 1 then 2.
    let grey = || convnet([1, 8, 8], vec![[3, 4, 2], [4, 3, 2]], vec![6], 3);
    let colour = || convnet([3, 4, 6], vec![[2, 3, 1], [3, 2, 2]], vec![5], 2);
    for act in [
        Activation::Relu,
        Activation::Tanh,
        Activation::Elu,
        Activation::Gated,
    ] {
        check(ModelConfig {
            activation: act,
            ..grey()
        });
        check(ModelConfig {
            activation: act,
            ..colour()
        });
    }
    check_with(grey(), 3, 1, 0.5, false);
    check_with(colour(), 1, 3, 1.0, false);
    check(ModelConfig {
        prior: Prior::Mog,
        prior_components: 3,
        flows: 2,
        ..grey()
    });
    check(ModelConfig {
        decoder: DecoderKind::Gaussian,
        learn_sigma: true,
        logvar_min: Some(-2.0),
        logvar_max: Some(1.0),
        ..colour()
    });
    check_with(grey(), 1, 1, 1.0, true);
    // The VampPrior: its pseudo-inputs are images through the convolutions.
    for act in [Activation::Relu, Activation::Gated] {
        check(ModelConfig {
            prior: Prior::Vamp,
            prior_components: 3,
            activation: act,
            ..grey()
        });
    }
    check_with(
        ModelConfig {
            prior: Prior::Vamp,
            prior_components: 2,
            ..colour()
        },
        1,
        3,
        1.0,
        false,
    );
}

fn small(hidden: Vec<usize>, latent: usize) -> ModelConfig {
    ModelConfig {
        hidden,
        latent,
        ..Default::default()
    }
}

/// Two stochastic layers, chain wiring: x -> `hidden` -> z1 (`z`.0) -> `upper` -> z2 (`z`.1).
fn chain(hidden: Vec<usize>, upper: Vec<usize>, z: (usize, usize)) -> ModelConfig {
    ModelConfig {
        upper: vec![crate::config::Upper {
            latent: z.1,
            hidden: upper,
        }],
        ..small(hidden, z.0)
    }
}

#[test]
fn plain_vae_every_activation_and_decoder() {
    for act in [
        Activation::Relu,
        Activation::Tanh,
        Activation::Softplus,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::Elu,
        Activation::Gated,
    ] {
        check(ModelConfig {
            activation: act,
            ..small(vec![7, 5], 3)
        });
    }
    // Gated layers with IWAE samples and flows.
    check_with(
        ModelConfig {
            activation: Activation::Gated,
            flows: 2,
            ..small(vec![6, 4], 3)
        },
        1,
        3,
        1.0,
        false,
    );
    check(small(vec![6], 2));
    check(ModelConfig {
        decoder: DecoderKind::Gaussian,
        sigma: 0.5,
        learn_sigma: true,
        ..small(vec![6], 2)
    });
    check(ModelConfig {
        decoder: DecoderKind::Gaussian,
        sigma: 0.3,
        ..small(vec![6], 2)
    });
}

#[test]
fn logvar_clip() {
    // A clip narrow enough that some of the fixture's log-variances fall outside it.
    check(ModelConfig {
        logvar_min: Some(-0.05),
        logvar_max: Some(0.05),
        ..small(vec![7, 5], 4)
    });
    check_with(
        ModelConfig {
            logvar_min: Some(-0.05),
            logvar_max: Some(0.05),
            ..small(vec![7], 3)
        },
        1,
        3,
        1.0,
        false,
    );
}

#[test]
fn kl_weight_and_free_bits() {
    check_with(small(vec![7, 5], 3), 1, 1, 0.37, false);
    check_with(small(vec![7, 5], 4), 1, 1, 1.0, true);
    // Free bits with Monte-Carlo samples: the closed-form KL is the same for all of them.
    check_with(small(vec![7, 5], 4), 3, 1, 1.0, true);
}

#[test]
fn monte_carlo_and_iwae_samples() {
    for s in [2, 4] {
        check_with(small(vec![7, 5], 3), s, 1, 1.0, false);
        check_with(small(vec![7, 5], 3), 1, s, 1.0, false);
    }
    check_with(small(vec![7, 5], 3), 3, 1, 0.5, false);
    check_with(
        ModelConfig {
            activation: Activation::Tanh,
            decoder: DecoderKind::Gaussian,
            learn_sigma: true,
            sigma: 0.4,
            ..small(vec![6, 6], 2)
        },
        1,
        3,
        1.0,
        false,
    );
}

#[test]
fn planar_flows_amortized_and_global() {
    for fp in [FlowParams::Amortized, FlowParams::Global] {
        let m = ModelConfig {
            flows: 3,
            flow_params: fp,
            ..small(vec![7], 3)
        };
        check(m.clone());
        check_with(m.clone(), 1, 1, 0.4, false);
        check_with(m.clone(), 2, 1, 1.0, false);
        check_with(m, 1, 3, 1.0, false);
    }
}

#[test]
fn mixture_prior() {
    use crate::config::Prior;
    let mog = ModelConfig {
        prior: Prior::Mog,
        prior_components: 4,
        ..small(vec![7], 3)
    };
    check(mog.clone());
    check_with(mog.clone(), 1, 1, 0.3, false);
    check_with(mog.clone(), 2, 1, 1.0, false);
    check_with(mog.clone(), 1, 3, 1.0, false);
    check_with(ModelConfig { flows: 2, ..mog }, 1, 3, 1.0, false);
}

#[test]
fn vamp_prior() {
    use crate::config::Prior;
    // Pseudo-inputs start N(0.05, 0.01^2) (inside the clip); the fixture's may fall outside
    // [0, 1] too, where no gradient reaches them.
    let vamp = ModelConfig {
        prior: Prior::Vamp,
        prior_components: 4,
        ..small(vec![7], 3)
    };
    check(vamp.clone());
    check_with(vamp.clone(), 1, 1, 0.3, false);
    check_with(vamp.clone(), 2, 1, 1.0, false);
    check_with(vamp.clone(), 1, 3, 1.0, false);
    check(ModelConfig {
        activation: crate::config::Activation::Gated,
        logvar_min: Some(-1.0),
        logvar_max: Some(0.5),
        ..ModelConfig {
            hidden: vec![6, 5],
            ..vamp.clone()
        }
    });
    check(ModelConfig {
        activation: crate::config::Activation::Gated,
        logvar_min: Some(-0.05),
        logvar_max: Some(0.05),
        ..vamp
    });
}

#[test]
fn conv_networks_with_two_stochastic_layers() {
    // Tomczak & Welling's convHVAE layout: the hvae wiring with the convolutions' features
    // shared by q(z2|x) and q(z1|x, z2)'s branch, p(x|z1, z2)'s joint network ending in the
    // layer to the transposed convolutions; every activation, Monte-Carlo and IWAE samples, the
    // VampPrior through the convolutions and q(z2|x), a colour image, and the chain wiring.
    use crate::config::{Arch, Prior};
    let conv = |m: ModelConfig, image: [usize; 3], layers: Vec<[usize; 3]>| ModelConfig {
        arch: Arch::Conv,
        conv: layers,
        image: Some(image),
        ..m
    };
    let grey = |m: ModelConfig| conv(m, [1, 8, 8], vec![[3, 4, 2], [4, 3, 2]]);
    for act in [Activation::Relu, Activation::Tanh, Activation::Gated] {
        check(ModelConfig {
            activation: act,
            ..grey(hvae(vec![6, 5], vec![5], (3, 2)))
        });
    }
    let h = grey(hvae(vec![6], vec![5, 4], (3, 2)));
    check(h.clone());
    check_with(h.clone(), 3, 1, 0.5, false);
    check_with(h.clone(), 1, 3, 1.0, false);
    for act in [Activation::Relu, Activation::Gated] {
        check(ModelConfig {
            prior: Prior::Vamp,
            prior_components: 3,
            activation: act,
            logvar_min: Some(-0.5),
            logvar_max: Some(0.5),
            ..h.clone()
        });
    }
    check_with(
        ModelConfig {
            prior: Prior::Vamp,
            prior_components: 2,
            ..conv(
                hvae(vec![5, 4], vec![4], (2, 2)),
                [3, 4, 6],
                vec![[2, 3, 1], [3, 2, 2]],
            )
        },
        1,
        3,
        1.0,
        false,
    );
    check(ModelConfig {
        decoder: DecoderKind::Gaussian,
        learn_sigma: true,
        sigma: 0.5,
        ..h
    });
    // The chain wiring: the convolutions around q(z1|x) and p(x|z1) only.
    check(grey(chain(vec![6], vec![5], (3, 2))));
    check_with(
        ModelConfig {
            prior: Prior::Mog,
            prior_components: 3,
            activation: Activation::Gated,
            ..grey(chain(vec![6, 5], vec![5], (3, 2)))
        },
        1,
        3,
        1.0,
        false,
    );
}

#[test]
fn two_stochastic_layers_chain() {
    // Burda et al.'s wiring: every activation (gated's split products included), the KL weight
    // on the whole log q - log p, Monte-Carlo and IWAE samples, the mixture prior on z2, the
    // log-variance clip on all four heads, and a Gaussian decoder.
    for act in [
        Activation::Tanh,
        Activation::Relu,
        Activation::Softplus,
        Activation::Gated,
    ] {
        check(ModelConfig {
            activation: act,
            ..chain(vec![7, 6], vec![5, 4], (4, 3))
        });
    }
    let c = chain(vec![7], vec![5], (4, 2));
    check_with(c.clone(), 1, 1, 0.4, false);
    check_with(c.clone(), 3, 1, 1.0, false);
    check_with(c.clone(), 1, 3, 1.0, false);
    check_with(
        ModelConfig {
            prior: crate::config::Prior::Mog,
            prior_components: 3,
            ..c.clone()
        },
        1,
        3,
        1.0,
        false,
    );
    check(ModelConfig {
        logvar_min: Some(-0.05),
        logvar_max: Some(0.05),
        ..chain(vec![7, 5], vec![5, 4], (4, 3))
    });
    check(ModelConfig {
        decoder: DecoderKind::Gaussian,
        learn_sigma: true,
        sigma: 0.5,
        ..c
    });
}

/// Two stochastic layers, hvae wiring: x -> `hidden` (its first width the branches', the rest
/// the joint layers') with z1 (`z`.0), `upper`'s widths for q(z2|x) and p(z1|z2) with z2 (`z`.1).
fn hvae(hidden: Vec<usize>, upper: Vec<usize>, z: (usize, usize)) -> ModelConfig {
    ModelConfig {
        wiring: crate::config::Wiring::Hvae,
        ..chain(hidden, upper, z)
    }
}

#[test]
fn two_stochastic_layers_hvae() {
    // Tomczak & Welling's wiring: the branches and joint layers (with and without joint layers),
    // every activation kind, the KL weight, Monte-Carlo and IWAE samples, the three priors on z2
    // (the VampPrior through q(z2|x) at its pseudo-inputs), the log-variance clip, a Gaussian
    // decoder.
    use crate::config::Prior;
    for act in [Activation::Tanh, Activation::Relu, Activation::Gated] {
        check(ModelConfig {
            activation: act,
            ..hvae(vec![6, 5], vec![5, 4], (3, 2))
        });
    }
    check(hvae(vec![6], vec![5], (3, 2)));
    let h = hvae(vec![6, 5], vec![5], (3, 2));
    check_with(h.clone(), 1, 1, 0.4, false);
    check_with(h.clone(), 3, 1, 1.0, false);
    check_with(h.clone(), 1, 3, 1.0, false);
    for prior in [Prior::Mog, Prior::Vamp] {
        let p = ModelConfig {
            prior,
            prior_components: 3,
            ..h.clone()
        };
        check(p.clone());
        check_with(p, 1, 3, 1.0, false);
    }
    check(ModelConfig {
        activation: Activation::Gated,
        prior: Prior::Vamp,
        prior_components: 4,
        logvar_min: Some(-0.05),
        logvar_max: Some(0.05),
        ..hvae(vec![6, 5], vec![5, 4], (3, 2))
    });
    check(ModelConfig {
        decoder: DecoderKind::Gaussian,
        learn_sigma: true,
        sigma: 0.5,
        ..h
    });
}

#[test]
fn autoencoder() {
    check(ModelConfig {
        kind: ModelKind::Ae,
        ..small(vec![7, 5], 3)
    });
}

#[test]
fn adam_step_matches_optim() {
    // The same first steps through the fused path and through optim::Adam give the same weights:
    // plain Adam and AdamNormGrad (each tensor's gradient divided by its norm), on a plain model
    // and on one whose tensors are column blocks of shared matrices (gated layers, amortized
    // flows in the head).
    let gated = ModelConfig {
        activation: Activation::Gated,
        flows: 2,
        ..small(vec![6], 2)
    };
    let two = ModelConfig {
        activation: Activation::Gated,
        ..chain(vec![6], vec![5], (3, 2))
    };
    for (model, normalize, adamax) in [
        (small(vec![6], 2), false, false),
        (small(vec![6], 2), true, false),
        (small(vec![6], 2), false, true),
        (gated.clone(), false, false),
        (gated.clone(), true, false),
        (gated, false, true),
        (two.clone(), false, false),
        (two, true, true),
        (
            ModelConfig {
                prior: crate::config::Prior::Vamp,
                prior_components: 3,
                ..hvae(vec![6, 5], vec![5], (3, 2))
            },
            true,
            false,
        ),
    ] {
        let cfg = config(model.clone(), 1, 1);
        let (dim, b) = (9, 4);
        let (params, x, eps) = fixture(&model, dim, b, 1, 5);
        let ac = adam_cfg(1e-2, 0.1, normalize, adamax);
        let (vm, m, xt, et) = candle_side(&model, dim, &params, &x, &eps);
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
                assert!(
                    (u - w).abs() < 1e-5,
                    "{model:?} normalize {normalize} adamax {adamax}: {name}: {u} vs {w}"
                );
            }
        }
        assert_eq!(f.adam_state().unwrap().len(), opt.state().len());
    }
}

#[test]
fn iw_estimate_matches_candle_log_weights() {
    // The streaming estimate against candle's log weights on the same noise: one pass (K = 5,
    // several images per group) and several passes (K = 700 > 512 rows, one image per group),
    // with flows and without, Bernoulli and learned Gaussian.
    let models = [
        small(vec![7], 3),
        ModelConfig {
            flows: 2,
            ..small(vec![7], 3)
        },
        ModelConfig {
            decoder: DecoderKind::Gaussian,
            learn_sigma: true,
            sigma: 0.5,
            ..small(vec![6], 2)
        },
        ModelConfig {
            prior: crate::config::Prior::Mog,
            prior_components: 3,
            ..small(vec![7], 3)
        },
        ModelConfig {
            prior: crate::config::Prior::Vamp,
            prior_components: 3,
            ..small(vec![7], 3)
        },
        chain(vec![7], vec![5, 4], (3, 2)),
        ModelConfig {
            prior: crate::config::Prior::Vamp,
            prior_components: 3,
            ..hvae(vec![7, 6], vec![5], (3, 2))
        },
        // A conv hvae with the VampPrior (images of 1 x 4 x 4).
        ModelConfig {
            prior: crate::config::Prior::Vamp,
            prior_components: 3,
            arch: crate::config::Arch::Conv,
            conv: vec![[2, 2, 2]],
            image: Some([1, 4, 4]),
            ..hvae(vec![7], vec![5], (3, 2))
        },
    ];
    for model in models {
        let dim = model.image.map_or(12, |[c, h, w]| c * h * w);
        for k in [5usize, 700] {
            let (params, x, _) = fixture(&model, dim, 3, 1, 7);
            let got = iw::neg_log_likelihood(&model, dim, &params, &x, 0, k, 11).unwrap();
            // The same images computed in slices (a resumed `eval --iw`) give the same values.
            let g = iw::images_per_group(k);
            assert_eq!(g, if k == 5 { 102 } else { 1 });
            if g == 1 {
                let tail =
                    iw::neg_log_likelihood(&model, dim, &params, &x[dim..], 1, k, 11).unwrap();
                assert_eq!(
                    &got[1..],
                    &tail[..],
                    "{model:?} K {k}: a slice from image 1"
                );
            } else {
                assert!(
                    iw::neg_log_likelihood(&model, dim, &params, &x[dim..], 1, k, 11).is_err(),
                    "a slice not on a group's first image is refused"
                );
            }
            // The estimator's groups: all 3 images in one (K = 5), or one image each (K = 700).
            let per_group = if k == 5 { 3 } else { 1 };
            for g in 0..3 / per_group {
                let mut rng = iw::group_rng(11, g);
                let eps: Vec<f32> = (0..per_group * k * model.noise_dim())
                    .map(|_| StandardNormal.sample(&mut rng))
                    .collect();
                let xs = &x[g * per_group * dim..(g + 1) * per_group * dim];
                let (_, m, xt, et) = candle_side(&model, dim, &params, xs, &eps);
                let lw = m.log_weights(&xt, &et, k).unwrap();
                let want = ((model::logsumexp_rows(&lw).unwrap() - (k as f64).ln()).unwrap()
                    * -1.0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (j, w) in want.iter().enumerate() {
                    let v = got[g * per_group + j];
                    assert!(
                        (v - *w as f64).abs() < 1e-3 * (*w as f64).abs().max(1.0),
                        "{model:?} K {k} image {}: {v} vs {w}",
                        g * per_group + j
                    );
                }
            }
        }
    }
}

#[test]
fn iwae_leaves_out_only_negligible_samples() {
    // Wide weights (large logits, 20 samples of a 100-pixel image) so that many samples' normalized
    // weights fall under 2^-24 of their image's largest: the compacted backward must give the
    // gradients of the backward over every sample, to f32 rounding.
    let model = small(vec![16], 3);
    let cfg = config(model.clone(), 1, 20);
    let (dim, b, s) = (100, 4, 20);
    let (mut params, x, eps) = fixture(&model, dim, b, s, 9);
    for t in params.values_mut() {
        *t = (t.clone() * 3.0).unwrap();
    }
    let x: Vec<f32> = x.iter().map(|v| (*v > 0.5) as u8 as f32).collect();
    let adam = adam_cfg(1e-3, 0.0, false, false);
    let mut grads = Vec::new();
    for all in [false, true] {
        let mut f = Fused::new(&cfg, dim, &params, adam, b).unwrap();
        f.iw_all_rows = all;
        f.x_mut(b).copy_from_slice(&x);
        f.eps_mut(b).copy_from_slice(&eps);
        f.loss_and_grads(b);
        if !all {
            let kept = f.work.keep.len();
            assert!(kept * 8 < b * s * 7, "only {kept} of {} left out", b * s);
        }
        grads.push(f.grads().unwrap());
    }
    for (name, t) in &grads[1] {
        let want = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = grads[0][name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "d{name}[{i}] = {g}, all rows {w}"
            );
        }
    }
}

#[test]
fn moving_average_follows_its_formula() {
    // e_0 = theta_0, e_t = d e_{t-1} + (1 - d) theta_t after each step, d = 0.8; and
    // `evaluate` scores the average, not the weights.
    let model = small(vec![6], 2);
    let cfg = config(model.clone(), 1, 1);
    let (dim, b) = (9, 4);
    let (params, x, eps) = fixture(&model, dim, b, 1, 3);
    let ac = adam_cfg(1e-2, 0.0, false, false);
    let mut f = Fused::new(&cfg, dim, &params, ac, b).unwrap();
    f.set_ema(0.8, None).unwrap();
    let flat = |h: &HashMap<String, Tensor>| -> Vec<f32> {
        let mut names: Vec<&String> = h.keys().collect();
        names.sort();
        names
            .iter()
            .flat_map(|n| h[*n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let mut want = flat(&f.params().unwrap());
    for _ in 0..3 {
        f.x_mut(b).copy_from_slice(&x);
        f.eps_mut(b).copy_from_slice(&eps);
        f.step(b).unwrap();
        let now = flat(&f.params().unwrap());
        for (e, t) in want.iter_mut().zip(&now) {
            *e = 0.8 * *e + 0.2 * t;
        }
    }
    let got = flat(&f.ema_params().unwrap().unwrap());
    for (i, (a, w)) in got.iter().zip(&want).enumerate() {
        assert!((a - w).abs() < 1e-6, "element {i}: {a} vs {w}");
    }
    // The average's -ELBO, against a trainer built on the average itself.
    let avg = f.ema_params().unwrap().unwrap();
    let mut g = Fused::new(&cfg, dim, &avg, ac, b).unwrap();
    let before = flat(&f.params().unwrap());
    let (r1, k1) = f.evaluate(&x, &eps[..b * 2]).unwrap();
    let (r2, k2) = g.evaluate(&x, &eps[..b * 2]).unwrap();
    assert_eq!((r1, k1), (r2, k2));
    // And the weights came back after the evaluation (they differ from the average).
    assert_eq!(flat(&f.params().unwrap()), before);
    assert_ne!(before, got);
}
