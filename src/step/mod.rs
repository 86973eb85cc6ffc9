//! The fused CPU training step, in the manner of llm.c's train_gpt2.c: the model, objectives and
//! Adam of `model`, `loss` and `optim` written out by hand as forward / backward pairs on plain
//! preallocated buffers, one file per layer kind, with the products on `gemm`.
//!
//! - `math`: matrix products and vector math (exp, tanh, softplus, log-sum-exp);
//! - `linear`: the dense layer and its activation;
//! - `latent`: q(z|x), z = mu + sigma eps with S samples per image, the closed-form KL;
//! - `conditional`: a second stochastic layer's density p(z1|z2) scored at z1;
//! - `upper`: the chain wiring's second stochastic layer, q(z2|z1) and p(z1|z2) with their MLPs
//!   (Burda et al. 2015);
//! - `hvae`: the hvae wiring's two layers (Tomczak & Welling 2018), its concatenated branches;
//! - `conv`: convolution and transposed convolution;
//! - `convnet`: a conv network's convolutions before the encoder's dense layers and transposed
//!   convolutions after the decoder's (`model.arch = "conv"`);
//! - `planar`: a planar flow step (Rezende & Mohamed 2015);
//! - `likelihood`: Bernoulli and Gaussian p(x|z);
//! - `objective`: ELBO / Monte-Carlo mean, the IWAE bound (Burda et al. 2015), free bits;
//! - `adam`: the optimizer;
//! - `iw`: the importance-weighted -log p(x) estimate on the same forward.
//!
//! This file lays the parameters out in one flat buffer (`Net`) and runs the pairs in order
//! (`Fused::step`). A step over B images and S samples runs the encoder on B rows and the flows
//! and decoder on B S rows as one product each (never S small ones). Each layer's Adam update
//! runs as soon as its gradient is final, while its buffers are in cache; the output layer's
//! runs on one core beside the rest of the backward on the other.
//!
//! Layout: W (in, out) row-major, the transpose of the checkpoint's (out, in). The encoder's heads
//! are one (H, Hc) matrix: mu columns, then logvar, then an amortized flow's K (2Z + 1)
//! parameters. Order in `theta`: encoder layers, head, global flows, decoder layers, output
//! layer, learned decoder log-variance, so that everything before the output layer is updated
//! by one worker and the rest by the other.
//!
//! `tests::matches_autograd` checks every family's loss and gradients against candle's autograd.

pub mod adam;
pub mod conditional;
pub mod conv;
pub mod convnet;
pub mod hvae;
pub mod iaf;
pub mod iw;
pub mod latent;
pub mod likelihood;
pub mod linear;
pub mod math;
pub mod objective;
pub mod planar;
pub mod prior;
pub mod upper;

use crate::config::{
    Activation, Config, DecoderKind, FlowParams, ModelConfig, ModelKind, Prior, Wiring,
};
use crate::loss::MIN_LOGVAR;
use crate::optim::AdamConfig;
use adam::{adam_range, AdamStep, Moments};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use latent::Dims;
use linear::Lin;
use objective::Kind;
use std::collections::HashMap;

/// The parameter layout of a model in one flat buffer.
#[derive(Debug, Clone)]
pub struct Net {
    pub cfg: ModelConfig,
    pub dim: usize,
    enc: Vec<Lin>,
    /// (H, Hc): mu, logvar (VAE), amortized flow parameters.
    head: Lin,
    /// Global flows' (u, w, b) per step, K (2Z + 1) values from this offset.
    global_flows: Option<usize>,
    /// A mixture prior's means (K, Z) then log-variances (K, Z), from this offset.
    prior: Option<usize>,
    /// The VampPrior's pseudo-inputs (K, D), from this offset.
    vamp: Option<usize>,
    /// The chain wiring's second stochastic layer, q(z2|z1) and p(z1|z2).
    upper: Option<upper::Upper>,
    /// The hvae wiring's layers beyond `enc` (its h(x)), `head`, `dec` (its h'(z1)) and `out`.
    hvae: Option<hvae::Hvae>,
    dec: Vec<Lin>,
    /// The output layer. A conv network's is its last transposed convolution (`conv`), and
    /// this marks only where its parameters start (`w`, `b`; no dense weights).
    out: Lin,
    /// `arch = "conv"`: the convolutions around the dense layers.
    conv: Option<convnet::ConvNet>,
    /// Learned decoder log-variance (D) offset, if any.
    dec_lv: Option<usize>,
    size: usize,
}

impl Net {
    pub fn new(cfg: &ModelConfig, dim: usize) -> Self {
        let mut size = 0usize;
        let z = cfg.latent;
        // A gated layer's product has twice its outputs: [linear | gate].
        let wide = if cfg.activation == Activation::Gated {
            2
        } else {
            1
        };
        // The hvae wiring: the encoder and decoder hold their first layers, h(x) and h'(z1); their
        // heads read the joint networks' tops.
        let is_hvae = !cfg.upper.is_empty() && cfg.wiring == Wiring::Hvae;
        let tops = hvae::tops(&cfg.hidden);
        let n_enc = if is_hvae { 1 } else { cfg.hidden.len() };
        // A conv network: its convolutions first; the dense layers read their features.
        let mut conv = (cfg.arch == crate::config::Arch::Conv)
            .then(|| convnet::ConvNet::alloc_enc(&mut size, cfg));
        let mut enc = Vec::new();
        let mut prev = conv.as_ref().map_or(dim, |c| c.feat);
        for &h in &cfg.hidden[..n_enc] {
            enc.push(Lin::alloc(&mut size, prev, wide * h));
            prev = h;
        }
        if is_hvae {
            prev = tops.0;
        }
        let amortized = if cfg.flow_params == FlowParams::Amortized {
            cfg.flows * (2 * z + 1)
        } else {
            0
        };
        let hc = match cfg.kind {
            ModelKind::Vae => 2 * z + amortized,
            ModelKind::Ae => z,
        };
        let head = Lin::alloc(&mut size, prev, hc);
        let global_flows = if cfg.flows > 0 && cfg.flow_params == FlowParams::Global {
            size += cfg.flows * (2 * z + 1);
            Some(size - cfg.flows * (2 * z + 1))
        } else {
            None
        };
        let prior = if cfg.prior == Prior::Mog {
            size += 2 * cfg.prior_components * z;
            Some(size - 2 * cfg.prior_components * z)
        } else {
            None
        };
        let vamp = if cfg.prior == Prior::Vamp {
            size += cfg.prior_components * dim;
            Some(size - cfg.prior_components * dim)
        } else {
            None
        };
        // A conv hvae: q(z2|x) reads the convolutions' features, and p(x|z1, z2)'s joint network
        // ends in the layer to the features (for an MLP decoder, `dec` holds that layer).
        let feat = conv.as_ref().map(|c| c.feat);
        let hvae = is_hvae.then(|| hvae::Hvae::alloc(&mut size, cfg, feat.unwrap_or(dim), feat));
        let upper = cfg.upper.first().filter(|_| !is_hvae).map(|u| {
            let lv = (
                cfg.logvar_min.map_or(f32::NEG_INFINITY, |v| v as f32),
                cfg.logvar_max.map_or(f32::INFINITY, |v| v as f32),
            );
            upper::Upper::alloc(&mut size, (z, u.latent), &u.hidden, cfg.activation, lv)
        });
        let mut dec = Vec::new();
        let mut prev = z;
        for &h in cfg.hidden.iter().rev().take(n_enc) {
            dec.push(Lin::alloc(&mut size, prev, wide * h));
            prev = h;
        }
        if is_hvae {
            prev = tops.1;
        }
        let out = match conv.as_mut() {
            Some(c) => {
                if !is_hvae {
                    dec.push(Lin::alloc(&mut size, prev, wide * c.feat));
                }
                c.alloc_dec(&mut size);
                let o = c.out_layer();
                Lin {
                    w: o.w,
                    b: o.b,
                    n_in: 0,
                    n_out: 0,
                }
            }
            None => Lin::alloc(&mut size, prev, dim),
        };
        let dec_lv = if cfg.decoder == DecoderKind::Gaussian && cfg.learn_sigma {
            size += dim;
            Some(size - dim)
        } else {
            None
        };
        Net {
            cfg: cfg.clone(),
            dim,
            enc,
            head,
            global_flows,
            prior,
            vamp,
            upper,
            hvae,
            dec,
            out,
            conv,
            dec_lv,
            size,
        }
    }

    /// Parameters in all.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The dimensions of the top stochastic layer, which the prior scores.
    fn z_top(&self) -> usize {
        self.cfg.top_latent()
    }

    fn hc(&self) -> usize {
        self.head.n_out
    }

    fn dims(&self, b: usize, s: usize) -> Dims {
        Dims {
            b,
            s,
            z: self.cfg.latent,
            hc: self.hc(),
            lv_min: self.cfg.logvar_min.map_or(f32::NEG_INFINITY, |v| v as f32),
            lv_max: self.cfg.logvar_max.map_or(f32::INFINITY, |v| v as f32),
        }
    }

    /// The mixture prior with its component means (K, Z) and this step's constants.
    fn mixture<'a>(
        &self,
        means: &'a [f32],
        inv: &'a [f32],
        lv_sum: &'a [f32],
    ) -> prior::Mixture<'a> {
        let (k, z) = (self.cfg.prior_components, self.z_top());
        prior::Mixture {
            means: &means[..k * z],
            inv,
            lv_sum,
            k,
            z,
        }
    }

    /// Whether the prior is a mixture (learned Gaussians, or the VampPrior).
    fn has_mixture(&self) -> bool {
        self.prior.is_some() || self.vamp.is_some()
    }

    /// Whether the KL term is the Monte-Carlo log q - log p (flows, a mixture prior, or two
    /// stochastic layers).
    fn mc_kl(&self) -> bool {
        self.cfg.flows > 0 || self.has_mixture() || self.upper.is_some() || self.hvae.is_some()
    }

    /// The network whose q the VampPrior's components are: the encoder's hidden layers and head,
    /// or with the hvae wiring q(z2|x)'s.
    fn pseudo_net(&self) -> (&[Lin], Lin) {
        match &self.hvae {
            Some(h) => (&h.q2, h.q2head),
            None => (&self.enc, self.head),
        }
    }

    /// The shapes of the pseudo-inputs' Gaussian head, `k` rows.
    fn pseudo_dims(&self, k: usize) -> Dims {
        let (_, head) = self.pseudo_net();
        Dims {
            z: self.z_top(),
            hc: head.n_out,
            ..self.dims(k, 1)
        }
    }

    /// The VampPrior's components (Tomczak & Welling 2018, eq. 9): the encoder's q(z|u_k) at
    /// the pseudo-inputs clipped to [0, 1], u (K, D) -> means and clipped log-variances (K, Z).
    fn pseudo_forward(&self, th: &[f32], pw: &mut PseudoWork, par: bool) {
        let (k, d, z, act) = (
            self.cfg.prior_components,
            self.dim,
            self.z_top(),
            self.cfg.activation,
        );
        let (layers, head) = self.pseudo_net();
        let off = self.vamp.unwrap_or(0);
        for (x, u) in pw.x.iter_mut().zip(&th[off..off + k * d]) {
            *x = u.clamp(0.0, 1.0);
        }
        // A conv network's pseudo-inputs are images: through its convolutions first.
        let xin = self.dense_input(th, &pw.x, pw.cv.as_mut(), k, par);
        linear::mlp_forward(layers, xin, &mut pw.enc_a, &mut pw.enc_h, th, k, act, par);
        let top = &pw.enc_h[layers.len() - 1];
        linear::linear_forward(&mut pw.hd, top, th, head, k, par);
        let (hc, hb) = (head.n_out, &th[head.b..head.end()]);
        let dm = self.pseudo_dims(k);
        for r in 0..k {
            for j in 0..z {
                pw.hd[r * hc + j] += hb[j];
                pw.hd[r * hc + z + j] += hb[z + j];
                pw.mean[r * z + j] = pw.hd[r * hc + j];
                pw.logv[r * z + j] = dm.clip_logvar(pw.hd[r * hc + z + j]);
            }
        }
    }

    /// Back from the VampPrior's component means and log-variances (their gradients in
    /// `pw.gm`, `pw.gl`) through the encoder at the pseudo-inputs: the encoder's and the head's
    /// share into `pw.grad` (added to the data's before their Adam steps), the pseudo-inputs'
    /// into `g` (zero where the clip holds).
    fn pseudo_backward(&self, th: &[f32], pw: &mut PseudoWork, g: &mut [f32], par: bool) {
        let (k, d, z, act) = (
            self.cfg.prior_components,
            self.dim,
            self.z_top(),
            self.cfg.activation,
        );
        let (layers, head) = self.pseudo_net();
        let (hc, dm) = (head.n_out, self.pseudo_dims(k));
        for r in 0..k {
            for j in 0..z {
                pw.d_hd[r * hc + j] = pw.gm[r * z + j];
                pw.d_hd[r * hc + z + j] = dm.logvar_open(pw.hd[r * hc + z + j]) * pw.gl[r * z + j];
            }
        }
        let top = &pw.enc_h[layers.len() - 1];
        linear::linear_backward(
            &mut pw.grad,
            Some(&mut pw.d1),
            top,
            &pw.d_hd,
            th,
            head,
            k,
            par,
        );
        let conv = match (&self.conv, &pw.cv) {
            (Some(c), Some(cw)) => Some((c, cw)),
            _ => None,
        };
        for (i, l) in layers.iter().enumerate().rev() {
            let input: &[f32] = match (i, conv) {
                (0, Some((c, cw))) => c.features(cw, k),
                (0, None) => &pw.x,
                _ => &pw.enc_h[i - 1],
            };
            linear::layer_backward(
                &mut pw.grad,
                true,
                &mut pw.d1,
                &mut pw.d2,
                (input, &pw.enc_a[i], &pw.enc_h[i]),
                th,
                *l,
                k,
                act,
                par,
            );
        }
        // A conv network: on through its convolutions to the pseudo-inputs' gradient.
        let dx: &[f32] = match (&self.conv, pw.cv.as_mut()) {
            (Some(c), Some(cw)) => {
                c.pseudo_backward(th, &mut pw.grad, cw, &pw.x, &pw.d1, k, par);
                cw.input_grad(k * d)
            }
            _ => &pw.d1,
        };
        let off = self.vamp.unwrap_or(0);
        for (i, (gv, dx)) in g[off..off + k * d].iter_mut().zip(dx).enumerate() {
            let u = th[off + i];
            *gv = if (0.0..=1.0).contains(&u) { *dx } else { 0.0 };
        }
    }

    /// What the encoder's dense layers read for `b` images `x`: a conv network's features (its
    /// convolutions run first, their activations kept in `cv` for the backward), else `x`.
    fn dense_input<'a>(
        &self,
        th: &[f32],
        x: &'a [f32],
        cv: Option<&'a mut convnet::ConvNetWork>,
        b: usize,
        par: bool,
    ) -> &'a [f32] {
        match (&self.conv, cv) {
            (Some(c), Some(cw)) => {
                c.enc_forward(th, x, cw, b, par);
                c.features(cw, b)
            }
            _ => x,
        }
    }

    fn is_ae(&self) -> bool {
        self.cfg.kind == ModelKind::Ae
    }

    /// Where flow step k's parameter rows are, in the head product (amortized) or in theta.
    fn flow_params(&self, k: usize, b: usize, s: usize) -> planar::Params {
        let (z, per_step) = (self.cfg.latent, 2 * self.cfg.latent + 1);
        match self.global_flows {
            Some(off) => planar::Params {
                off: off + k * per_step,
                stride: 0,
                n: 1,
                per: b * s,
            },
            None => planar::Params {
                off: 2 * z + k * per_step,
                stride: self.hc(),
                n: b,
                per: s,
            },
        }
    }

    /// The forward pass through the decoder's output product (its bias not yet added) for `b`
    /// images of `w.x` and `s` samples each of `w.eps`. Leaves per sample row
    /// `w.lq` = log q(z_K|x) - log p(z_K) (the ln 2 pi terms cancel), per image `w.kl_img`, and
    /// per dimension the batch's `w.kl_dim`; returns the batch's summed closed-form KL.
    fn forward(&self, th: &[f32], w: &mut Work, b: usize, s: usize) -> f64 {
        if let Some(h) = &self.hvae {
            h.forward(self, th, w, b, s);
            return 0.0;
        }
        let (z, act, par, rows) = (self.cfg.latent, self.cfg.activation, w.par, b * s);
        // Two layers: each row's noise [e1 | e2] split into z1's and z2's.
        if let (Some(u), Some(uw)) = (&self.upper, w.up.as_mut()) {
            u.split_noise(&w.eps, uw, rows);
        }
        let xin = self.dense_input(th, &w.x, w.cv.as_mut(), b, par);
        linear::mlp_forward(&self.enc, xin, &mut w.enc_a, &mut w.enc_h, th, b, act, par);
        let top = &w.enc_h[self.enc.len() - 1];
        linear::linear_forward(&mut w.hd, top, th, self.head, b, par);
        let hb = &th[self.head.b..self.head.end()];
        let d = self.dims(b, s);
        let kl = if self.is_ae() {
            latent::identity_forward(&mut w.hd, hb, &mut w.zs[0], b, z);
            w.lq[..rows].fill(0.0);
            0.0
        } else {
            let e1: &[f32] = match &w.up {
                Some(uw) => &uw.e1,
                None => &w.eps,
            };
            latent::gaussian_forward(
                &mut w.hd,
                hb,
                e1,
                &mut w.sigma,
                &mut w.zs[0],
                &mut w.lq,
                &mut w.kl_img,
                &mut w.kl_dim,
                d,
            )
        };
        for k in 0..self.cfg.flows {
            let (zin, zout) = w.zs.split_at_mut(k + 1);
            let p = self.flow_params(k, b, s);
            let buf: &[f32] = if self.global_flows.is_some() {
                th
            } else {
                &w.hd
            };
            planar::planar_forward(
                &zin[k],
                &mut zout[0],
                buf,
                p,
                z,
                w.flow.cache(k, p.n, rows, z),
                &mut w.lq,
            );
        }
        // Two layers: log q(z2|z1) - log p(z1|z2), and the prior scores z2.
        let zk = match (&self.upper, w.up.as_mut()) {
            (Some(u), Some(uw)) => {
                u.forward(th, uw, &w.zs[0], &mut w.lq, rows);
                &uw.z2[..rows * u.z2]
            }
            _ => &w.zs[self.cfg.flows][..rows * z],
        };
        if !self.is_ae() {
            self.prior_forward(th, zk, &mut w.pr, &mut w.lq[..rows], par);
        }
        linear::mlp_forward(
            &self.dec,
            &w.zs[self.cfg.flows],
            &mut w.dec_a,
            &mut w.dec_h,
            th,
            rows,
            act,
            par,
        );
        let last = &w.dec_h[self.dec.len() - 1];
        match (&self.conv, w.cv.as_mut()) {
            (Some(c), Some(cw)) => c.dec_forward(th, last, &mut w.out, cw, rows, par),
            _ => linear::linear_forward(&mut w.out, last, th, self.out, rows, par),
        }
        kl
    }

    /// The output layer's bias per pixel (D), which the likelihood pass adds: the dense output
    /// layer's, or a conv network's per-channel bias spread over the pixels by the forward.
    fn out_bias<'a>(&self, th: &'a [f32], cv: &'a Option<convnet::ConvNetWork>) -> &'a [f32] {
        match cv {
            Some(cw) => &cw.ob[..self.dim],
            None => &th[self.out.b..self.out.end()],
        }
    }

    /// The prior at the top layer's samples `zk` (rows, Z): adds -log p(z) to `lq` (rows; the
    /// ln 2 pi terms cancel log q's). A mixture keeps its responsibilities for the backward; the
    /// VampPrior first runs the encoder over its pseudo-inputs.
    fn prior_forward(&self, th: &[f32], zk: &[f32], pr: &mut PriorWork, lq: &mut [f32], par: bool) {
        let z = self.z_top();
        match (self.prior, pr.pw.as_mut()) {
            (None, Some(pw)) => {
                self.pseudo_forward(th, pw, par);
                prior::mixture_prepare(&pw.logv, &mut pr.pinv, &mut pr.plv, z);
                let mx = self.mixture(&pw.mean, &pr.pinv, &pr.plv);
                prior::mixture_forward(zk, &mx, &mut pr.resp, lq);
            }
            (None, None) => prior::normal_forward(zk, lq, z),
            (Some(off), _) => {
                let kz = self.cfg.prior_components * z;
                prior::mixture_prepare(&th[off + kz..off + 2 * kz], &mut pr.pinv, &mut pr.plv, z);
                let mx = self.mixture(&th[off..off + kz], &pr.pinv, &pr.plv);
                prior::mixture_forward(zk, &mx, &mut pr.resp, lq);
            }
        }
    }

    /// Back through the prior for per-row weights `cq`: adds d/dz into `dz` (rows, Z), the
    /// mixture's own gradients (or the VampPrior's: its pseudo-inputs', and the encoder's share
    /// into `pr.pw.grad`), and steps the prior's parameters.
    #[allow(clippy::too_many_arguments)]
    fn prior_backward(
        &self,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        zk: &[f32],
        cq: &[f32],
        dz: &mut [f32],
        pr: &mut PriorWork,
        par: bool,
    ) {
        let z = self.z_top();
        match (self.prior, pr.pw.as_mut()) {
            (None, Some(pw)) => {
                let mx = self.mixture(&pw.mean, &pr.pinv, &pr.plv);
                let (gm, gl) = (&mut pw.gm, &mut pw.gl);
                prior::mixture_backward(zk, &mx, &pr.resp, cq, dz, gm, gl);
                self.pseudo_backward(th, pw, st.g, par);
                let off = self.vamp.unwrap_or(0);
                let n = self.cfg.prior_components * self.dim;
                adam_range(adam, th, st, off, off + n);
            }
            (None, None) => prior::normal_backward(zk, cq, dz, z),
            (Some(off), _) => {
                let kz = self.cfg.prior_components * z;
                let (gm, gl) = st.g[off..off + 2 * kz].split_at_mut(kz);
                let mx = self.mixture(&th[off..off + kz], &pr.pinv, &pr.plv);
                prior::mixture_backward(zk, &mx, &pr.resp, cq, dz, gm, gl);
                adam_range(adam, th, st, off, off + 2 * kz);
            }
        }
    }

    /// Every checkpoint tensor: its name, shape, and where its k-th element (row-major) lives
    /// in a flat buffer. A checkpoint weight (out, in) is read as the transpose of (in, out).
    fn tensor_map(&self) -> Vec<Placed> {
        let mut v: Vec<Placed> = Vec::new();
        let mut lin = |name: String, l: Lin, col0: usize, cols: usize| {
            let (w, n_out, n_in, b) = (l.w, l.n_out, l.n_in, l.b);
            // Checkpoint element (o, i) at flat index o * n_in + i lives at w + i * n_out + col0 + o.
            v.push((
                format!("{name}.weight"),
                vec![cols, n_in],
                Box::new(move |k| w + (k % n_in) * n_out + col0 + k / n_in),
            ));
            v.push((
                format!("{name}.bias"),
                vec![cols],
                Box::new(move |k| b + col0 + k),
            ));
        };
        let act = self.cfg.activation;
        for (i, l) in self.enc.iter().enumerate() {
            let w = linear::out_width(*l, act);
            lin(format!("encoder.hidden.{i}"), *l, 0, w);
            if act == Activation::Gated {
                lin(format!("encoder.hidden.{i}.gate"), *l, w, w);
            }
        }
        let z = self.cfg.latent;
        lin("encoder.mu".into(), self.head, 0, z);
        if !self.is_ae() {
            lin("encoder.logvar".into(), self.head, z, z);
            if self.cfg.flows > 0 && self.global_flows.is_none() {
                lin("encoder.flow".into(), self.head, 2 * z, self.hc() - 2 * z);
            }
        }
        for (i, l) in self.dec.iter().enumerate() {
            let w = linear::out_width(*l, act);
            lin(format!("decoder.hidden.{i}"), *l, 0, w);
            if act == Activation::Gated {
                lin(format!("decoder.hidden.{i}.gate"), *l, w, w);
            }
        }
        // (A conv network's output layer is among its convolutions, added at the end.)
        if self.conv.is_none() {
            lin("decoder.out".into(), self.out, 0, self.dim);
        }
        if let Some(h) = &self.hvae {
            for (net, layers, first) in h.named() {
                for (i, l) in layers.iter().enumerate() {
                    let w = linear::out_width(*l, act);
                    lin(format!("{net}.{}", first + i), *l, 0, w);
                    if act == Activation::Gated {
                        lin(format!("{net}.{}.gate", first + i), *l, w, w);
                    }
                }
            }
            for (net, head, zo) in [("encoder2", h.q2head, h.z2), ("decoder2", h.p1head, h.z1)] {
                lin(format!("{net}.mu"), head, 0, zo);
                lin(format!("{net}.logvar"), head, zo, zo);
            }
        }
        if let Some(u) = &self.upper {
            for (net, layers, head, zo) in [
                ("encoder2", &u.enc, u.qhead, u.z2),
                ("decoder2", &u.dec, u.phead, u.z1),
            ] {
                for (i, l) in layers.iter().enumerate() {
                    let w = linear::out_width(*l, act);
                    lin(format!("{net}.hidden.{i}"), *l, 0, w);
                    if act == Activation::Gated {
                        lin(format!("{net}.hidden.{i}.gate"), *l, w, w);
                    }
                }
                lin(format!("{net}.mu"), head, 0, zo);
                lin(format!("{net}.logvar"), head, zo, zo);
            }
        }
        if let Some(off) = self.dec_lv {
            v.push((
                "decoder.logvar".into(),
                vec![self.dim],
                Box::new(move |k| off + k),
            ));
        }
        if let Some(off) = self.prior {
            let z = self.z_top();
            let kz = self.cfg.prior_components * z;
            let shape = vec![self.cfg.prior_components, z];
            v.push((
                "prior.means".into(),
                shape.clone(),
                Box::new(move |i| off + i),
            ));
            v.push((
                "prior.logvars".into(),
                shape,
                Box::new(move |i| off + kz + i),
            ));
        }
        if let Some(off) = self.vamp {
            let shape = vec![self.cfg.prior_components, self.dim];
            v.push((
                "prior.pseudo_inputs".into(),
                shape,
                Box::new(move |i| off + i),
            ));
        }
        if let Some(off) = self.global_flows {
            for k in 0..self.cfg.flows {
                let o = off + k * (2 * z + 1);
                v.push((format!("flow.{k}.u"), vec![1, z], Box::new(move |i| o + i)));
                v.push((
                    format!("flow.{k}.w"),
                    vec![1, z],
                    Box::new(move |i| o + z + i),
                ));
                v.push((
                    format!("flow.{k}.b"),
                    vec![1, 1],
                    Box::new(move |_| o + 2 * z),
                ));
            }
        }
        if let Some(c) = &self.conv {
            v.extend(c.tensors());
        }
        v
    }

    /// Every tensor's block in the flat buffer (for per-tensor gradient norms).
    fn blocks(&self) -> Vec<adam::Block> {
        let mut v = Vec::new();
        let act = self.cfg.activation;
        let z = self.cfg.latent;
        let mut lin = |l: Lin, col0: usize, cols: usize| {
            v.push(adam::Block {
                start: l.w + col0,
                rows: l.n_in,
                width: cols,
                stride: l.n_out,
            });
            v.push(adam::Block {
                start: l.b + col0,
                rows: 1,
                width: cols,
                stride: cols,
            });
        };
        let mut up: Vec<Lin> = self
            .upper
            .iter()
            .flat_map(|u| u.enc.iter().chain(&u.dec).copied())
            .collect();
        if let Some(h) = &self.hvae {
            up.extend(h.named().iter().flat_map(|(_, ls, _)| ls.iter().copied()));
        }
        for l in self.enc.iter().chain(&self.dec).chain(&up) {
            let w = linear::out_width(*l, act);
            lin(*l, 0, w);
            if act == Activation::Gated {
                lin(*l, w, w);
            }
        }
        let heads = match (&self.upper, &self.hvae) {
            (Some(u), _) => vec![(u.qhead, u.z2), (u.phead, u.z1)],
            (_, Some(h)) => vec![(h.q2head, h.z2), (h.p1head, h.z1)],
            _ => vec![],
        };
        for (head, zo) in heads {
            lin(head, 0, zo);
            lin(head, zo, zo);
        }
        lin(self.head, 0, z);
        if !self.is_ae() {
            lin(self.head, z, z);
            if self.hc() > 2 * z {
                lin(self.head, 2 * z, self.hc() - 2 * z);
            }
        }
        if self.conv.is_none() {
            lin(self.out, 0, self.dim);
        }
        let one = |start: usize, width: usize| adam::Block {
            start,
            rows: 1,
            width,
            stride: width,
        };
        if let Some(o) = self.dec_lv {
            v.push(one(o, self.dim));
        }
        if let Some(o) = self.prior {
            let kz = self.cfg.prior_components * self.z_top();
            v.extend([one(o, kz), one(o + kz, kz)]);
        }
        if let Some(o) = self.vamp {
            v.push(one(o, self.cfg.prior_components * self.dim));
        }
        if let Some(off) = self.global_flows {
            for k in 0..self.cfg.flows {
                let o = off + k * (2 * z + 1);
                v.extend([one(o, z), one(o + z, z), one(o + 2 * z, 1)]);
            }
        }
        if let Some(c) = &self.conv {
            v.extend(c.blocks());
        }
        v.sort_by_key(|b| b.start);
        v
    }

    /// A flat buffer as checkpoint tensors (`model::param_specs` names).
    pub fn export(&self, src: &[f32]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, shape, at) in self.tensor_map() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|k| src[at(k)]).collect();
            out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Checkpoint tensors into a flat buffer; every tensor must be there with its shape.
    pub fn import(&self, map: &HashMap<String, Tensor>, dst: &mut [f32]) -> Result<()> {
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
            let data = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            for (k, v) in data.into_iter().enumerate() {
                dst[at(k)] = v;
            }
        }
        Ok(())
    }
}

/// A checkpoint tensor's name, shape, and where its k-th element (row-major) lives in a buffer.
pub(crate) type Placed = (String, Vec<usize>, Box<dyn Fn(usize) -> usize>);

/// The VampPrior's share of the encoder's and head's gradient (computed at the pseudo-inputs)
/// added to the data's in `g[lo..hi]`, before that range's Adam step.
fn add_pseudo_grad(pw: &Option<PseudoWork>, g: &mut [f32], lo: usize, hi: usize) {
    if let Some(pw) = pw {
        for (a, b) in g[lo..hi].iter_mut().zip(&pw.grad[lo..hi]) {
            *a += b;
        }
    }
}

/// An MLP's hidden layers backward, last to first, from d(loss)/d(its output) in `d.0`: each
/// layer's gradients into `st.g`, the VampPrior's share (`pseudo`) added, and its Adam step as
/// soon as they are final; d(loss)/d(`input`) left in `d.0` when `want_dx`. `acts` are the
/// forward's pre-activations and activations, `rows` rows each.
#[allow(clippy::too_many_arguments)]
fn mlp_backward(
    layers: &[Lin],
    input: &[f32],
    acts: (&[Vec<f32>], &[Vec<f32>]),
    d: (&mut Vec<f32>, &mut Vec<f32>),
    th: &mut [f32],
    st: &mut Moments,
    adam: &Option<AdamStep>,
    (rows, act, par): (usize, Activation, bool),
    want_dx: bool,
    pseudo: &Option<PseudoWork>,
) {
    let (pre, out) = acts;
    for (i, l) in layers.iter().enumerate().rev() {
        let x: &[f32] = if i == 0 { input } else { &out[i - 1] };
        let ah = (x, &pre[i][..], &out[i][..]);
        linear::layer_backward(st.g, i > 0 || want_dx, d.0, d.1, ah, th, *l, rows, act, par);
        add_pseudo_grad(pseudo, st.g, l.w, l.end());
        adam_range(adam, th, st, l.w, l.end());
    }
}

/// The batch's KL as the step reports it (and the evaluation): none for an autoencoder, the
/// closed form `kl_closed` where the model has one, else the samples' mean log q - log p over
/// the `rows` sample rows, `s` to an image.
fn logged_kl(kind: Kind, net: &Net, w: &Work, kl_closed: f64, rows: usize, s: usize) -> f64 {
    if kind == Kind::Ae {
        0.0
    } else if !net.mc_kl() {
        kl_closed
    } else {
        w.lq[..rows].iter().map(|&v| v as f64).sum::<f64>() / s as f64
    }
}

/// The flows' kept values, all steps end to end: u^ (K, n, Z), m (K, n), tanh and det (K, rows);
/// and the backward's two Z-wide sums.
#[derive(Default)]
struct FlowWork {
    uh: Vec<f32>,
    m: Vec<f32>,
    h: Vec<f32>,
    det: Vec<f32>,
    sums: Vec<f32>,
    /// Capacities per step: parameter rows and sample rows.
    n_cap: usize,
    rows_cap: usize,
}

impl FlowWork {
    fn new(flows: usize, n_cap: usize, rows_cap: usize, z: usize) -> Self {
        FlowWork {
            uh: vec![0.0; flows * n_cap * z],
            m: vec![0.0; flows * n_cap],
            h: vec![0.0; flows * rows_cap],
            det: vec![0.0; flows * rows_cap],
            sums: vec![0.0; 2 * z],
            n_cap,
            rows_cap,
        }
    }

    fn cache(&mut self, k: usize, n: usize, rows: usize, z: usize) -> planar::Cache<'_> {
        let (nc, rc) = (self.n_cap, self.rows_cap);
        planar::Cache {
            uh: &mut self.uh[k * nc * z..(k * nc + n) * z],
            m: &mut self.m[k * nc..k * nc + n],
            h: &mut self.h[k * rc..k * rc + rows],
            det: &mut self.det[k * rc..k * rc + rows],
            sums: &mut self.sums,
        }
    }
}

/// Per-batch buffers, sized for `cap` images of `s` samples each.
pub struct Work {
    cap: usize,
    s: usize,
    /// Whether products may use both workers (training), or stay on this thread (the IW
    /// estimate runs one `Work` per worker).
    par: bool,
    /// Images (B, D) and noise (B S, Z); two layers: (B S, Z1 + Z2), each row [e1 | e2].
    x: Vec<f32>,
    eps: Vec<f32>,
    /// Encoder pre-activations and activations, one pair per hidden layer, (B, H_i).
    enc_a: Vec<Vec<f32>>,
    enc_h: Vec<Vec<f32>>,
    /// The head's output (B, Hc), bias added.
    hd: Vec<f32>,
    sigma: Vec<f32>,
    /// z before each flow step and after the last, (B S, Z) each.
    zs: Vec<Vec<f32>>,
    flow: FlowWork,
    /// log q(z_K|x) - log p(z_K) per sample (B S).
    lq: Vec<f32>,
    kl_img: Vec<f32>,
    /// Per latent dimension, the batch's summed KL; then the KL weights (free bits).
    kl_dim: Vec<f32>,
    ckl: Vec<f32>,
    dec_a: Vec<Vec<f32>>,
    dec_h: Vec<Vec<f32>>,
    /// Decoder output (B S, D) and its gradient.
    out: Vec<f32>,
    d_out: Vec<f32>,
    /// -log p(x|z) per sample, and each sample's weight on log q - log p in the loss.
    nll: Vec<f32>,
    cq: Vec<f32>,
    /// Two scratch buffers for back-propagated activations, the widest layer wide.
    d1: Vec<f32>,
    d2: Vec<f32>,
    d_hd: Vec<f32>,
    /// IWAE: the sample rows the backward keeps (`objective::iwae_keep`), and the decoder's
    /// input gathered to them.
    keep: Vec<u32>,
    zc: Vec<f32>,
    /// The prior's buffers.
    pr: PriorWork,
    /// Gaussian decoder: floored log-variance and its inverse (D), and the second worker's share
    /// of the learned log-variance's gradient.
    lv: Vec<f32>,
    inv: Vec<f32>,
    g_lv2: Vec<f32>,
    /// The second stochastic layer's buffers: the chain wiring's, or the hvae wiring's.
    up: Option<upper::UpperWork>,
    hv: Option<hvae::HvaeWork>,
    /// A conv network's buffers.
    cv: Option<convnet::ConvNetWork>,
}

/// A mixture prior's buffers: inverse variances (K, Z), log-variance sums (K), responsibilities
/// (B S, K); and the VampPrior's, the encoder's pass over the pseudo-inputs.
struct PriorWork {
    pinv: Vec<f32>,
    plv: Vec<f32>,
    resp: Vec<f32>,
    pw: Option<PseudoWork>,
}

/// The VampPrior's buffers, K pseudo-inputs: the clipped inputs (K, D), the encoder's
/// pre-activations and activations, the head's output (K, Hc, bias added), the components'
/// means and clipped log-variances (K, Z) and their gradients, the head's gradient, two scratch
/// buffers, and the encoder's and head's share of the parameter gradient (up to the head's end).
pub(crate) struct PseudoWork {
    x: Vec<f32>,
    enc_a: Vec<Vec<f32>>,
    enc_h: Vec<Vec<f32>>,
    hd: Vec<f32>,
    mean: Vec<f32>,
    logv: Vec<f32>,
    gm: Vec<f32>,
    gl: Vec<f32>,
    d_hd: Vec<f32>,
    d1: Vec<f32>,
    d2: Vec<f32>,
    grad: Vec<f32>,
    /// A conv network's buffers for the pseudo-inputs' pass through its convolutions.
    cv: Option<convnet::ConvNetWork>,
}

impl Work {
    pub fn new(net: &Net, cap: usize, s: usize, par: bool) -> Self {
        let cfg = &net.cfg;
        let (z, dim, rows) = (cfg.latent, net.dim, cap * s);
        let zt = net.z_top();
        let wide = if cfg.activation == Activation::Gated {
            2
        } else {
            1
        };
        // The hvae wiring's output layer reads a concatenation twice as wide.
        let cat = if net.hvae.is_some() { 2 } else { 1 };
        let widest = cat * wide * cfg.hidden.iter().copied().max().unwrap_or(0);
        // A conv network's dense side also writes its features (and reads their gradient).
        let feat = net.conv.as_ref().map(|c| c.feat);
        let widest = widest.max(wide * feat.unwrap_or(0));
        // (The hvae wiring's layer to the features is its joint network's, in `hv`.)
        let dec_feat = feat.filter(|_| net.hvae.is_none());
        let flow_n = if net.global_flows.is_some() { 1 } else { cap };
        let vecs = |n: usize, it: &mut dyn Iterator<Item = usize>| -> Vec<Vec<f32>> {
            it.map(|h| vec![0.0; n * h]).collect()
        };
        Work {
            cap,
            s,
            par,
            x: vec![0.0; cap * dim],
            eps: vec![0.0; rows * cfg.noise_dim()],
            enc_a: vecs(cap, &mut cfg.hidden.iter().map(|h| wide * h)),
            enc_h: vecs(cap, &mut cfg.hidden.iter().copied()),
            hd: vec![0.0; cap * net.hc()],
            sigma: vec![0.0; cap * z],
            zs: (0..=cfg.flows).map(|_| vec![0.0; rows * z]).collect(),
            flow: FlowWork::new(cfg.flows, flow_n, rows, z),
            lq: vec![0.0; rows],
            kl_img: vec![0.0; cap],
            kl_dim: vec![0.0; z],
            ckl: vec![0.0; z],
            dec_a: vecs(
                rows,
                &mut cfg.hidden.iter().rev().chain(&dec_feat).map(|h| wide * h),
            ),
            dec_h: vecs(rows, &mut cfg.hidden.iter().rev().chain(&dec_feat).copied()),
            out: vec![0.0; rows * dim],
            d_out: vec![0.0; rows * dim],
            nll: vec![0.0; rows],
            cq: vec![0.0; rows],
            d1: vec![0.0; rows * widest.max(net.hc()).max(z)],
            d2: vec![0.0; rows * widest.max(net.hc()).max(z)],
            d_hd: vec![0.0; cap * net.hc()],
            keep: Vec::with_capacity(rows),
            zc: vec![0.0; rows * z],
            pr: PriorWork {
                pinv: vec![
                    0.0;
                    if net.has_mixture() {
                        cfg.prior_components * zt
                    } else {
                        0
                    }
                ],
                plv: vec![
                    0.0;
                    if net.has_mixture() {
                        cfg.prior_components
                    } else {
                        0
                    }
                ],
                resp: vec![
                    0.0;
                    if net.has_mixture() {
                        rows * cfg.prior_components
                    } else {
                        0
                    }
                ],
                pw: net.vamp.map(|_| {
                    let k = cfg.prior_components;
                    let (layers, head) = net.pseudo_net();
                    let wd = layers
                        .iter()
                        .map(|l| l.n_out)
                        .chain([head.n_out, dim])
                        .chain(net.conv.as_ref().map(|c| c.feat))
                        .max()
                        .unwrap_or(dim);
                    let out_w = |l: &Lin| linear::out_width(*l, cfg.activation);
                    PseudoWork {
                        x: vec![0.0; k * dim],
                        enc_a: vecs(k, &mut layers.iter().map(|l| l.n_out)),
                        enc_h: vecs(k, &mut layers.iter().map(out_w)),
                        hd: vec![0.0; k * head.n_out],
                        mean: vec![0.0; k * zt],
                        logv: vec![0.0; k * zt],
                        gm: vec![0.0; k * zt],
                        gl: vec![0.0; k * zt],
                        d_hd: vec![0.0; k * head.n_out],
                        d1: vec![0.0; k * wd],
                        d2: vec![0.0; k * wd],
                        grad: vec![0.0; head.end()],
                        cv: net
                            .conv
                            .as_ref()
                            .map(|c| convnet::ConvNetWork::new(c, k, 0)),
                    }
                }),
            },
            lv: vec![0.0; dim],
            inv: vec![0.0; dim],
            g_lv2: vec![0.0; dim],
            up: net
                .upper
                .as_ref()
                .map(|u| upper::UpperWork::new(u, rows, par)),
            hv: net
                .hvae
                .as_ref()
                .map(|h| hvae::HvaeWork::new(h, cfg.activation, cap, s)),
            cv: net
                .conv
                .as_ref()
                .map(|c| convnet::ConvNetWork::new(c, cap, rows)),
        }
    }
}

/// For a conv network, errors unless its layers fit the image it is built for.
fn check_supported(m: &ModelConfig) -> Result<()> {
    if m.arch == crate::config::Arch::Conv {
        m.conv_layers(m.image_shape()?)?;
    }
    Ok(())
}

/// The fused trainer: parameters, gradients, Adam moments and work buffers.
pub struct Fused {
    net: Net,
    adam: AdamConfig,
    theta: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    pub step: u64,
    work: Work,
    kind: Kind,
    /// Weight on the KL term (beta times the warm-up ramp), free bits, and the learning rate for
    /// the next step.
    kl_weight: f32,
    free_bits: f32,
    lr: f64,
    /// IWAE: run the backward over every sample, negligible weights included (for tests).
    pub iw_all_rows: bool,
    /// Every tensor's block, when Adam normalizes each tensor's gradient; else empty.
    blocks: Vec<adam::Block>,
    /// `train.ema`: the decay and the moving average of theta, e = d e + (1 - d) theta after
    /// every step; `evaluate` and `ema_params` use it.
    ema: Option<(f32, Vec<f32>)>,
}

impl Fused {
    /// Takes parameters in the checkpoint layout (`model::param_specs` names) and zero moments;
    /// `cap` images per batch at most, with the config's samples per image.
    pub fn new(
        cfg: &Config,
        dim: usize,
        params: &HashMap<String, Tensor>,
        adam: AdamConfig,
        cap: usize,
    ) -> Result<Self> {
        let m = &cfg.model;
        let t = &cfg.train;
        let kind = if m.kind == ModelKind::Ae {
            Kind::Ae
        } else if t.iw_samples > 1 {
            Kind::Iwae
        } else {
            Kind::Elbo
        };
        let s = t.mc_samples.max(t.iw_samples);
        check_supported(m)?;
        let net = Net::new(m, dim);
        let size = net.size();
        let work = Work::new(&net, cap, s, true);
        let mut theta = vec![0.0; size];
        net.import(params, &mut theta)?;
        Ok(Fused {
            adam,
            theta,
            grad: vec![0.0; size],
            m: vec![0.0; size],
            v: vec![0.0; size],
            step: 0,
            work,
            kind,
            kl_weight: 1.0,
            free_bits: 0.0,
            lr: adam.lr,
            iw_all_rows: false,
            blocks: if adam.normalize_grad {
                net.blocks()
            } else {
                Vec::new()
            },
            ema: None,
            net,
        })
    }

    /// Keeps a moving average of the parameters with `decay` from now on, started at `start`
    /// (checkpoint layout; a resumed run's average) or at the current parameters.
    pub fn set_ema(&mut self, decay: f64, start: Option<&HashMap<String, Tensor>>) -> Result<()> {
        let mut e = self.theta.clone();
        if let Some(p) = start {
            self.net
                .import(p, &mut e)
                .context("the moving average of the weights")?;
        }
        self.ema = Some((decay as f32, e));
        Ok(())
    }

    /// The moving average of the parameters in checkpoint layout, when one is kept.
    pub fn ema_params(&self) -> Result<Option<HashMap<String, Tensor>>> {
        self.ema
            .as_ref()
            .map(|(_, e)| self.net.export(e))
            .transpose()
    }

    /// Sets the KL weight (beta times the warm-up ramp) and the free bits (nats per dimension)
    /// of the following steps. The returned -ELBO terms are unweighted whatever these are.
    pub fn set_kl(&mut self, weight: f64, free_bits: f64) {
        self.kl_weight = weight as f32;
        self.free_bits = free_bits as f32;
    }

    /// Sets the learning rate of the following steps (a schedule's value).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The input images (rows, D) to fill before `step`.
    pub fn x_mut(&mut self, rows: usize) -> &mut [f32] {
        &mut self.work.x[..rows * self.net.dim]
    }

    /// The noise (rows S, Z), image-major, to fill before `step`; two layers: (rows S, Z1 + Z2),
    /// each row [e1 | e2] as the candle model takes it.
    pub fn eps_mut(&mut self, rows: usize) -> &mut [f32] {
        &mut self.work.eps[..rows * self.work.s * self.net.cfg.noise_dim()]
    }

    /// Forward, backward and one Adam step on the first `rows` images of the work buffers.
    /// Returns the batch's summed -ELBO terms (recon, kl) in nats, each image's averaged over
    /// its samples (the true -ELBO: beta = 1, no free bits).
    pub fn step(&mut self, rows: usize) -> Result<(f64, f64)> {
        if rows == 0 || rows > self.work.cap {
            bail!("batch of {rows} images for a buffer of {}", self.work.cap);
        }
        self.step += 1;
        let a = AdamStep::new(&self.adam, self.step, self.lr);
        // On a pool worker: the step's parallel products and joins then hand work to the other
        // worker directly instead of each waking the pool from outside.
        let sums = rayon::scope(|_| self.forward_backward(rows, Some(a)));
        if let Some((d, e)) = self.ema.as_mut() {
            // Elementwise, so in chunks on both workers as Adam's update is (a large flow's
            // tens of millions of parameters would otherwise wait on one core each step).
            use rayon::prelude::*;
            let d = *d;
            let blend = |e: &mut [f32], th: &[f32]| {
                math::simd!({
                    for (ev, tv) in e.iter_mut().zip(th) {
                        *ev = d * *ev + (1.0 - d) * tv;
                    }
                })
            };
            e.par_chunks_mut(1 << 15)
                .zip(self.theta.par_chunks(1 << 15))
                .for_each(|(e, th)| blend(e, th));
        }
        Ok(sums)
    }

    /// The loss pass over the decoder's output: each sample's -log p(x|z) and its gradient,
    /// weighted by the objective; rows split by images between the two workers. Returns the
    /// batch's summed reconstruction term (each image's mean over its samples).
    fn loss_pass(&mut self, b: usize) -> f64 {
        let (net, w, th) = (&self.net, &mut self.work, &self.theta);
        let (s, dim) = (w.s, net.dim);
        let iwae = self.kind == Kind::Iwae;
        let ob = net.out_bias(th, &w.cv);
        let gaussian = net.cfg.decoder == DecoderKind::Gaussian;
        if gaussian {
            let learned = net.dec_lv.map(|o| &th[o..o + dim]);
            let fixed = (2.0 * net.cfg.sigma.ln()) as f32;
            likelihood::gaussian_prepare(&mut w.lv, &mut w.inv, learned, fixed, MIN_LOGVAR as f32);
        }
        // Half the images each, at an image boundary.
        let h = b.div_ceil(2);
        let (o1, o2) = w.out[..b * s * dim].split_at_mut(h * s * dim);
        let (d1, d2) = w.d_out[..b * s * dim].split_at_mut(h * s * dim);
        let (x1, x2) = w.x[..b * dim].split_at(h * dim);
        let (n1, n2) = w.nll[..b * s].split_at_mut(h * s);
        let (c1, c2) = w.cq[..b * s].split_at_mut(h * s);
        let (q1, q2) = w.lq[..b * s].split_at(h * s);
        let (lv, inv) = (&w.lv, &w.inv);
        let g_lv2 = &mut w.g_lv2;
        let g_lv1: &mut [f32] = match net.dec_lv {
            Some(o) => &mut self.grad[o..o + dim],
            None => &mut [],
        };
        let learned_raw = net.dec_lv.map(|o| &th[o..o + dim]);
        let half = |out: &mut [f32],
                    d: &mut [f32],
                    x: &[f32],
                    nll: &mut [f32],
                    c: &mut [f32],
                    lq: &[f32],
                    g_lv: &mut [f32]|
         -> f64 {
            g_lv.fill(0.0);
            let n_img = x.len() / dim;
            // A few images at a time, so that the IWAE weighting reads rows still in cache.
            let chunk = (64 / s).max(1);
            let mut total = 0f64;
            let mut i = 0;
            while i < n_img {
                let k = chunk.min(n_img - i);
                let (r0, r1) = (i * s, (i + k) * s);
                let (o, dd) = (&mut out[r0 * dim..r1 * dim], &mut d[r0 * dim..r1 * dim]);
                let xi = &x[i * dim..(i + k) * dim];
                let scale = if iwae { 1.0 } else { 1.0 / s as f32 };
                if gaussian {
                    likelihood::gaussian_forward(o, xi, &mut nll[r0..r1], ob, lv, inv, s);
                } else {
                    likelihood::bernoulli_forward::<true>(
                        o,
                        xi,
                        dd,
                        &mut nll[r0..r1],
                        ob,
                        s,
                        scale,
                    );
                }
                if iwae {
                    for j in 0..k {
                        let (a, e) = (r0 + j * s, r0 + (j + 1) * s);
                        objective::iwae(&nll[a..e], &lq[a..e], &mut c[a..e]);
                    }
                } else {
                    c[r0..r1].fill(scale);
                }
                if gaussian {
                    let learned = learned_raw.map(|raw| (raw, &mut *g_lv));
                    likelihood::gaussian_backward(
                        dd,
                        o,
                        xi,
                        &c[r0..r1],
                        inv,
                        learned,
                        MIN_LOGVAR as f32,
                        s,
                    );
                } else if iwae {
                    likelihood::bernoulli_backward(dd, &c[r0..r1], dim);
                }
                total += nll[r0..r1].iter().map(|&v| v as f64).sum::<f64>();
                i += k;
            }
            total / s as f64
        };
        let g2: &mut [f32] = if net.dec_lv.is_some() { g_lv2 } else { &mut [] };
        let (t1, t2) = rayon::join(
            || half(o1, d1, x1, n1, c1, q1, g_lv1),
            || half(o2, d2, x2, n2, c2, q2, g2),
        );
        if let Some(o) = net.dec_lv {
            for (a, b) in self.grad[o..o + dim].iter_mut().zip(&w.g_lv2) {
                *a += b;
            }
        }
        t1 + t2
    }

    /// Forward and backward over `b` images; with `adam`, each layer's parameters are updated as
    /// soon as its gradient is final and its weights have been used for the last time.
    fn forward_backward(&mut self, b: usize, adam: Option<AdamStep>) -> (f64, f64) {
        let s = self.work.s;
        let rows = b * s;
        let kl_closed = self.net.forward(&self.theta, &mut self.work, b, s);
        let recon = self.loss_pass(b);
        let (net, kind) = (&self.net, self.kind);
        let (z, act, flows) = (net.cfg.latent, net.cfg.activation, net.cfg.flows);
        let w = &mut self.work;
        let kl = logged_kl(kind, net, w, kl_closed, rows, s);
        // Each sample's weight on log q - log p (IWAE: its normalized weight, already in cq;
        // the ELBO with flows: the KL weight over S), and the closed-form KL's per dimension.
        let kw = self.kl_weight;
        let use_cq = match kind {
            Kind::Iwae => true,
            Kind::Elbo if net.mc_kl() => {
                w.cq[..rows].fill(kw / s as f32);
                true
            }
            _ => false,
        };
        if kind == Kind::Elbo && !net.mc_kl() {
            objective::kl_weights(&mut w.ckl, &w.kl_dim, b, kw, self.free_bits);
        } else {
            w.ckl.fill(0.0);
        }

        // IWAE: samples whose weight is negligible (under f32 rounding of their image's largest)
        // leave the decoder's backward; when enough do, its rows are gathered to those kept.
        let mut brows = rows;
        // (Not with the hvae wiring, whose decoder's rows are two branches and a joint network.)
        // (Nor with a conv network, whose decoder's caches are per layer.)
        let compact = kind == Kind::Iwae
            && !self.iw_all_rows
            && net.hvae.is_none()
            && net.conv.is_none()
            && {
                objective::iwae_keep(&mut w.cq[..rows], s, &mut w.keep);
                w.keep.len() * 8 < rows * 7
            };
        if compact {
            brows = w.keep.len();
            math::gather_rows(&mut w.d_out, &w.keep, net.dim);
            for (i, l) in net.dec.iter().enumerate() {
                math::gather_rows(&mut w.dec_a[i], &w.keep, l.n_out);
                math::gather_rows(&mut w.dec_h[i], &w.keep, linear::out_width(*l, act));
            }
            w.zc[..rows * z].copy_from_slice(&w.zs[flows][..rows * z]);
            math::gather_rows(&mut w.zc, &w.keep, z);
        }
        let mut theta = std::mem::take(&mut self.theta);
        let th = &mut theta;
        let g = &mut self.grad;
        let lo = net.out;
        // Back through the output layer: dW = h^T d_out, db = colsum, dh = d_out W^T.
        let top: &[f32] = match (&net.hvae, &w.hv) {
            (Some(h), Some(hw)) => h.p_top(hw),
            _ => &w.dec_h[net.dec.len() - 1],
        };
        match (&net.conv, w.cv.as_mut()) {
            (Some(c), Some(cw)) => c.out_backward(g, th, &w.d_out, top, cw, brows, true),
            _ => linear::linear_backward(g, Some(&mut w.d1), top, &w.d_out, th, lo, brows, true),
        }
        // The output layer's Adam step (and the learned decoder log-variance's, stored after it)
        // on one worker, while the other goes on down the decoder, flows and heads.
        let (th_lo, th_hi) = th.split_at_mut(lo.w);
        let all = Moments {
            g,
            m: &mut self.m,
            v: &mut self.v,
            base: 0,
            blocks: &self.blocks,
        };
        let (mut s_lo, mut s_hi) = all.split_at(lo.w);
        rayon::join(
            || {
                let n = th_hi.len();
                adam_range(&adam, th_hi, &mut s_hi, 0, n)
            },
            || {
                let th = th_lo;
                let st = &mut s_lo;
                if let Some(h) = &net.hvae {
                    h.backward(net, th, st, &adam, w, b, s);
                    return;
                }
                // A conv network's transposed convolutions, down to d(features) in d1.
                if let (Some(c), Some(cw)) = (&net.conv, w.cv.as_mut()) {
                    let f = &w.dec_h[net.dec.len() - 1];
                    c.dec_backward(th, st, &adam, cw, f, &mut w.d1, brows, true);
                }
                // Decoder layers, last to first; d1 holds d(loss)/d(output of the layer).
                let z_in: &[f32] = if compact { &w.zc } else { &w.zs[flows] };
                let (acts, ds) = ((&w.dec_a[..], &w.dec_h[..]), (&mut w.d1, &mut w.d2));
                let shape = (brows, act, true);
                mlp_backward(&net.dec, z_in, acts, ds, th, st, &adam, shape, true, &None);
                if compact {
                    math::scatter_rows(&mut w.d1, &w.keep, z, rows);
                }
                // d1 holds dz_K (B S, Z). Two layers: back through p(z1|z2) (adding to dz1) to
                // dz2, where the prior adds its share, then through q(z2|z1) (adding to dz1).
                if let (Some(u), Some(uw)) = (&net.upper, w.up.as_mut()) {
                    let (z1, cq) = (&w.zs[0], &w.cq[..rows]);
                    u.p_backward(th, st, &adam, uw, z1, cq, &mut w.d1, rows);
                }
                // log q - log p's -log p(z_K) = |z_K|^2 / 2 adds cq z_K.
                if use_cq {
                    let z = net.z_top();
                    let (zk, dz): (&[f32], &mut [f32]) = match w.up.as_mut() {
                        Some(uw) => (&uw.z2[..rows * z], &mut uw.dz2),
                        None => (&w.zs[flows][..rows * z], &mut w.d1),
                    };
                    let cq = &w.cq[..rows];
                    net.prior_backward(th, st, &adam, zk, cq, dz, &mut w.pr, w.par);
                }
                if let (Some(u), Some(uw)) = (&net.upper, w.up.as_mut()) {
                    let (z1, cq) = (&w.zs[0], &w.cq[..rows]);
                    u.q_backward(th, st, &adam, uw, z1, cq, &mut w.d1, rows);
                }
                let cq = if use_cq { Some(&w.cq[..rows]) } else { None };
                for k in (0..flows).rev() {
                    let p = net.flow_params(k, b, s);
                    let cache = w.flow.cache(k, p.n, rows, z);
                    match net.global_flows {
                        Some(_) => planar::planar_backward(
                            &mut w.d1, &w.zs[k], th, p, z, cache, cq, st.g, p,
                        ),
                        None => planar::planar_backward(
                            &mut w.d1,
                            &w.zs[k],
                            &w.hd,
                            p,
                            z,
                            cache,
                            cq,
                            &mut w.d_hd,
                            p,
                        ),
                    }
                }
                if let Some(off) = net.global_flows {
                    adam_range(&adam, th, st, off, off + flows * (2 * z + 1));
                }
                let d = net.dims(b, s);
                if kind == Kind::Ae {
                    latent::identity_backward(&mut w.d_hd, &w.d1, b, z);
                } else {
                    let e1: &[f32] = match &w.up {
                        Some(uw) => &uw.e1,
                        None => &w.eps,
                    };
                    latent::gaussian_backward(
                        &mut w.d_hd,
                        &w.hd,
                        &w.sigma,
                        e1,
                        &w.d1,
                        cq,
                        &w.ckl,
                        d,
                    );
                }
                let top = &w.enc_h[net.enc.len() - 1];
                linear::linear_backward(st.g, Some(&mut w.d2), top, &w.d_hd, th, net.head, b, true);
                std::mem::swap(&mut w.d1, &mut w.d2);
                if use_cq {
                    add_pseudo_grad(&w.pr.pw, st.g, net.head.w, net.head.end());
                }
                adam_range(&adam, th, st, net.head.w, net.head.end());
            },
        );
        // Encoder layers, last to first (the hvae wiring's went with the rest).
        if net.hvae.is_some() {
            self.theta = theta;
            return (recon, kl);
        }
        let mut st = Moments {
            g: &mut self.grad,
            m: &mut self.m,
            v: &mut self.v,
            base: 0,
            blocks: &self.blocks,
        };
        let pseudo = if use_cq { &w.pr.pw } else { &None };
        let (acts, ds) = ((&w.enc_a[..], &w.enc_h[..]), (&mut w.d1, &mut w.d2));
        let shape = (b, act, true);
        let xin: &[f32] = match (&net.conv, &w.cv) {
            (Some(c), Some(cw)) => c.features(cw, b),
            _ => &w.x,
        };
        let conv = net.conv.is_some();
        mlp_backward(
            &net.enc, xin, acts, ds, th, &mut st, &adam, shape, conv, pseudo,
        );
        // A conv network: on through its convolutions from d(features) in d1.
        if let (Some(c), Some(cw)) = (&net.conv, w.cv.as_mut()) {
            c.enc_backward(th, &mut st, &adam, pseudo, cw, &w.x, &w.d1, b, true);
        }
        self.theta = theta;
        (recon, kl)
    }

    /// The parameters, checkpoint layout (the names of `model::param_specs`).
    pub fn params(&self) -> Result<HashMap<String, Tensor>> {
        self.net.export(&self.theta)
    }

    /// Adam's moments as `m.<name>`, `v.<name>`, as `optim::Adam::state` names them.
    pub fn adam_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut h = HashMap::new();
        for (k, t) in self.net.export(&self.m)? {
            h.insert(format!("m.{k}"), t);
        }
        for (k, t) in self.net.export(&self.v)? {
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
        self.net
            .import(&part("m."), &mut self.m)
            .context("Adam first moments")?;
        self.net
            .import(&part("v."), &mut self.v)
            .context("Adam second moments")?;
        self.step = step;
        Ok(())
    }

    /// The last step's gradients, checkpoint layout (for tests).
    pub fn grads(&self) -> Result<HashMap<String, Tensor>> {
        self.net.export(&self.grad)
    }

    /// The -ELBO terms (recon, kl) summed over the images `x` (n, D), one sample each from
    /// `eps` (n, noise dim), as `step` reports a batch's but forward only: the per-epoch
    /// evaluation on the fused step, the same quantity as the candle model's
    /// `neg_elbo_terms` (closed-form KL where it has one, else the one-sample log q - log p).
    /// In passes of at most the buffers' capacity; the parameters are not touched.
    pub fn evaluate(&mut self, x: &[f32], eps: &[f32]) -> Result<(f64, f64)> {
        let (dim, nd) = (self.net.dim, self.net.cfg.noise_dim());
        let n = x.len() / dim;
        if x.len() != n * dim || eps.len() != n * nd {
            bail!(
                "evaluation of {} pixel values and {} noise values: not whole images of {dim} \
                 with {nd} each",
                x.len(),
                eps.len()
            );
        }
        // One sample per image whatever the training's S (the buffers hold cap S rows); on the
        // moving average of the weights when one is kept (swapped in, and back below).
        let s = std::mem::replace(&mut self.work.s, 1);
        if let Some((_, e)) = self.ema.as_mut() {
            std::mem::swap(&mut self.theta, e);
        }
        let (mut recon, mut kl) = (0f64, 0f64);
        let mut i = 0;
        while i < n {
            let b = self.work.cap.min(n - i);
            self.work.x[..b * dim].copy_from_slice(&x[i * dim..(i + b) * dim]);
            self.work.eps[..b * nd].copy_from_slice(&eps[i * nd..(i + b) * nd]);
            let (r, k) = rayon::scope(|_| {
                let kl_closed = self.net.forward(&self.theta, &mut self.work, b, 1);
                let r = self.loss_pass(b);
                (
                    r,
                    logged_kl(self.kind, &self.net, &self.work, kl_closed, b, 1),
                )
            });
            recon += r;
            kl += k;
            i += b;
        }
        self.work.s = s;
        if let Some((_, e)) = self.ema.as_mut() {
            std::mem::swap(&mut self.theta, e);
        }
        Ok((recon, kl))
    }

    /// Forward and backward without the Adam step (for tests).
    pub fn loss_and_grads(&mut self, rows: usize) -> (f64, f64) {
        self.forward_backward(rows, None)
    }
}

#[cfg(test)]
mod tests;
