//! The hvae wiring's two stochastic layers as a forward / backward pair (Tomczak & Welling 2018,
//! section 4's two-level VAE; their code jmtomczak/vae_vampprior, models/HVAE_2level.py):
//!
//! - q(z2|x): x -> MLP -> [mu2 | logvar2] (B, 2 Z2), z2 = mu2 + sigma2 e2, S samples per image;
//! - q(z1|x, z2): [h(x) | g(z2)] (rows, 2 b) -> joint MLP -> [mu1 | logvar1] (rows, 2 Z1), where
//!   h is the encoder's first layer (on B images, repeated to their S samples) and g one layer on
//!   z2; z1 = mu1 + sigma1 e1, one per row;
//! - p(z1|z2): z2 -> MLP -> [mu1 | logvar1], scored at z1 (`conditional`);
//! - p(x|z1, z2): [h'(z1) | g'(z2)] (rows, 2 r) -> joint MLP -> the output layer, where h' is the
//!   decoder's first layer;
//! - the prior (normal, mixture, or the VampPrior of q(z2|x) at pseudo-inputs) on z2.
//!
//! A concatenation's forward copies its two branches side by side; its backward splits the
//! gradient back (the image branch h(x) summing over its S sample rows). Each sample row's
//! log q - log p is log q(z2|x) + log q(z1|x, z2) - log p(z1|z2) - log p(z2), and every backward
//! step weights its terms per row by `cq` as `latent`, `conditional` and `prior` do. Each layer's
//! Adam step runs as soon as its gradient is final, as in `Fused`.

use super::adam::{adam_range, AdamStep, Moments};
use super::latent::{self, Dims};
use super::linear::{self, Lin};
use super::{add_pseudo_grad, conditional, mlp_backward, Net, Work};
use crate::config::{Activation, ModelConfig};

/// The layers beyond `Net`'s own (whose `enc` is h(x), `head` q(z1|x, z2)'s, `dec` h'(z1) and
/// `out` the output layer), heads as [mu | logvar] column blocks.
#[derive(Debug, Clone)]
pub struct Hvae {
    /// q(z2|x): hidden layers on x, head (H, 2 Z2).
    pub q2: Vec<Lin>,
    pub q2head: Lin,
    /// q(z1|x, z2): the branch g on z2 and the joint layers on [h(x) | g(z2)].
    pub qz2: Lin,
    pub qjoint: Vec<Lin>,
    /// p(z1|z2): hidden layers on z2, head (H, 2 Z1).
    pub p1: Vec<Lin>,
    pub p1head: Lin,
    /// p(x|z1, z2): the branch g' on z2 and the joint layers on [h'(z1) | g'(z2)].
    pub pz2: Lin,
    pub pjoint: Vec<Lin>,
    pub z1: usize,
    pub z2: usize,
    /// The widths of the two branches of q(z1|x, z2) and of p(x|z1, z2).
    pub bq: usize,
    pub bp: usize,
}

/// The width of q(z1|x, z2)'s top (its head's input) and p(x|z1, z2)'s (the output layer's
/// input) for the bottom layer's widths `h`: the joint network's last width, or the
/// concatenation's when there is no joint layer.
pub fn tops(h: &[usize]) -> (usize, usize) {
    if h.len() > 1 {
        (h[h.len() - 1], h[0])
    } else {
        (2 * h[0], 2 * h[0])
    }
}

impl Hvae {
    /// p(z1|z2)'s network.
    fn p1_net(&self, act: Activation) -> conditional::Net<'_> {
        conditional::Net {
            layers: &self.p1,
            head: self.p1head,
            act,
        }
    }

    /// Lays out the layers beyond `Net`'s own from `size` on, for `cfg` (two layers, hvae) and
    /// inputs of `dim` values (a conv network's features). A conv decoder's `feat` features
    /// end p(x|z1, z2)'s joint network. The widths are the candle model's
    /// (`model::param_specs`).
    pub fn alloc(size: &mut usize, cfg: &ModelConfig, dim: usize, feat: Option<usize>) -> Self {
        let wide = if cfg.activation == Activation::Gated {
            2
        } else {
            1
        };
        let (h, u) = (&cfg.hidden, &cfg.upper[0]);
        let (z1, z2) = (cfg.latent, u.latent);
        let (bq, bp) = (h[0], h[h.len() - 1]);
        let mlp = |size: &mut usize, dims: Vec<usize>| -> Vec<Lin> {
            dims.windows(2)
                .map(|w| Lin::alloc(size, w[0], wide * w[1]))
                .collect()
        };
        let q2 = mlp(
            size,
            std::iter::once(dim)
                .chain(u.hidden.iter().copied())
                .collect(),
        );
        let q2head = Lin::alloc(size, u.hidden[u.hidden.len() - 1], 2 * z2);
        let qz2 = Lin::alloc(size, z2, wide * bq);
        let qjoint = mlp(
            size,
            std::iter::once(2 * bq)
                .chain(h[1..].iter().copied())
                .collect(),
        );
        let p1 = mlp(
            size,
            std::iter::once(z2)
                .chain(u.hidden.iter().rev().copied())
                .collect(),
        );
        let p1head = Lin::alloc(size, u.hidden[0], 2 * z1);
        let pz2 = Lin::alloc(size, z2, wide * bp);
        let rev: Vec<usize> = h.iter().rev().copied().collect();
        let pjoint = mlp(
            size,
            std::iter::once(2 * bp)
                .chain(rev[1..].iter().copied())
                .chain(feat)
                .collect(),
        );
        Hvae {
            q2,
            q2head,
            qz2,
            qjoint,
            p1,
            p1head,
            pz2,
            pjoint,
            z1,
            z2,
            bq,
            bp,
        }
    }

    /// Every layer (for the per-tensor blocks and the checkpoint names).
    pub fn named(&self) -> Vec<(String, &[Lin], usize)> {
        vec![
            ("encoder2.hidden".into(), &self.q2[..], 0),
            ("encoder.z2".into(), std::slice::from_ref(&self.qz2), 0),
            ("encoder.hidden".into(), &self.qjoint[..], 1),
            ("decoder2.hidden".into(), &self.p1[..], 0),
            ("decoder.z2".into(), std::slice::from_ref(&self.pz2), 0),
            ("decoder.hidden".into(), &self.pjoint[..], 1),
        ]
    }

    /// The output layer's input: p(x|z1, z2)'s top (rows, width).
    pub fn p_top<'a>(&self, hw: &'a HvaeWork) -> &'a [f32] {
        match self.pjoint.len() {
            0 => &hw.catp,
            n => &hw.pj_h[n - 1],
        }
    }

    /// Forward over `b` images of `w.x` and `s` samples each of `w.eps` (rows [e1 | e2]): leaves
    /// each row's log q - log p in `w.lq`, z1 in `w.zs[0]`, and the output layer's product (bias
    /// not yet added) in `w.out`.
    pub fn forward(&self, net: &Net, th: &[f32], w: &mut Work, b: usize, s: usize) {
        let (act, par, rows) = (net.cfg.activation, w.par, b * s);
        let (z1, z2) = (self.z1, self.z2);
        let d = net.dims(b, s);
        let Some(hw) = w.hv.as_mut() else { return };
        // The noise rows [e1 | e2] as z1's and z2's.
        for (r, row) in w.eps[..rows * (z1 + z2)].chunks_exact(z1 + z2).enumerate() {
            hw.e1[r * z1..(r + 1) * z1].copy_from_slice(&row[..z1]);
            hw.e2[r * z2..(r + 1) * z2].copy_from_slice(&row[z1..]);
        }
        // x's features, which q(z2|x) and q(z1|x, z2)'s branch h(x) share: a conv network's
        // convolutions (b, feat), else the pixels.
        let xin = net.dense_input(th, &w.x, w.cv.as_mut(), b, par);
        // q(z2|x) on the images, S samples each; lq starts at log q(z2|x).
        linear::mlp_forward(&self.q2, xin, &mut hw.q2_a, &mut hw.q2_h, th, b, act, par);
        let top = &hw.q2_h[self.q2.len() - 1];
        linear::linear_forward(&mut hw.q2hd, top, th, self.q2head, b, par);
        latent::gaussian_forward(
            &mut hw.q2hd,
            &th[self.q2head.b..self.q2head.end()],
            &hw.e2,
            &mut hw.sigma2,
            &mut hw.z2,
            &mut w.lq,
            &mut hw.kl_img2,
            &mut hw.kl_dim2,
            Dims {
                z: z2,
                hc: 2 * z2,
                ..d
            },
        );
        // q(z1|x, z2): [h(x) repeated over the samples | g(z2)] through the joint layers.
        linear::mlp_forward(&net.enc, xin, &mut w.enc_a, &mut w.enc_h, th, b, act, par);
        let qz2 = std::slice::from_ref(&self.qz2);
        linear::mlp_forward(qz2, &hw.z2, &mut hw.gz_a, &mut hw.gz_h, th, rows, act, par);
        concat(&mut hw.catq, &w.enc_h[0], s, &hw.gz_h[0], self.bq, rows);
        linear::mlp_forward(
            &self.qjoint,
            &hw.catq,
            &mut hw.qj_a,
            &mut hw.qj_h,
            th,
            rows,
            act,
            par,
        );
        let top: &[f32] = match self.qjoint.len() {
            0 => &hw.catq,
            n => &hw.qj_h[n - 1],
        };
        linear::linear_forward(&mut hw.hd1, top, th, net.head, rows, par);
        let d1 = Dims {
            b: rows,
            s: 1,
            z: z1,
            hc: 2 * z1,
            ..d
        };
        latent::gaussian_forward(
            &mut hw.hd1,
            &th[net.head.b..net.head.end()],
            &hw.e1,
            &mut hw.sigma1,
            &mut w.zs[0],
            &mut hw.lq1,
            &mut hw.kl_img1,
            &mut hw.kl_dim1,
            d1,
        );
        for (l, q1) in w.lq[..rows].iter_mut().zip(&hw.lq1) {
            *l += q1;
        }
        // p(z1|z2) scored at z1, and the prior at z2.
        let pw = conditional::NetWork {
            pre: &mut hw.p1_a,
            out: &mut hw.p1_h,
            hd: &mut hw.phd,
            inv: &mut hw.inv,
        };
        self.p1_net(act)
            .forward(th, &hw.z2, &w.zs[0], pw, &mut w.lq, par, d1);
        net.prior_forward(th, &hw.z2[..rows * z2], &mut w.pr, &mut w.lq[..rows], par);
        // p(x|z1, z2): [h'(z1) | g'(z2)] through the joint layers to the output layer.
        linear::mlp_forward(
            &net.dec,
            &w.zs[0],
            &mut w.dec_a,
            &mut w.dec_h,
            th,
            rows,
            act,
            par,
        );
        let pz2 = std::slice::from_ref(&self.pz2);
        linear::mlp_forward(pz2, &hw.z2, &mut hw.gp_a, &mut hw.gp_h, th, rows, act, par);
        concat(&mut hw.catp, &w.dec_h[0], 1, &hw.gp_h[0], self.bp, rows);
        linear::mlp_forward(
            &self.pjoint,
            &hw.catp,
            &mut hw.pj_a,
            &mut hw.pj_h,
            th,
            rows,
            act,
            par,
        );
        match (&net.conv, w.cv.as_mut()) {
            (Some(c), Some(cw)) => c.dec_forward(th, self.p_top(hw), &mut w.out, cw, rows, par),
            _ => linear::linear_forward(&mut w.out, self.p_top(hw), th, net.out, rows, par),
        }
    }

    /// Backward from d(loss)/d(output layer's input) in `w.d1` (rows, width), or for a conv
    /// network from its output layer's d(input) (`ConvNet::out_backward`), down to every
    /// layer's gradient, with per-row weights `w.cq` on log q - log p; steps each layer.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        net: &Net,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        w: &mut Work,
        b: usize,
        s: usize,
    ) {
        let (act, rows, (z1, z2)) = (net.cfg.activation, b * s, (self.z1, self.z2));
        let d = net.dims(b, s);
        let Work {
            x,
            enc_a,
            enc_h,
            dec_a,
            dec_h,
            zs,
            cq,
            d1,
            d2,
            pr,
            hv,
            cv,
            par,
            ..
        } = w;
        let (par, cq, z1s) = (*par, &cq[..rows], &zs[0]);
        let Some(hw) = hv.as_mut() else { return };
        let step = |th: &mut [f32], st: &mut Moments, l: Lin| step_layer(adam, th, st, l);
        // A conv network: back through its hidden transposed convolutions to d(features) in d1.
        if let (Some(c), Some(cw)) = (&net.conv, cv.as_mut()) {
            c.dec_backward(th, st, adam, cw, self.p_top(hw), d1, rows, par);
        }
        // p(x|z1, z2)'s joint layers, down to d[h'(z1) | g'(z2)] in d1 (rows, 2 bp).
        let shape = (rows, act, par);
        let acts = (&hw.pj_a[..], &hw.pj_h[..]);
        mlp_backward(
            &self.pjoint,
            &hw.catp,
            acts,
            (d1, d2),
            th,
            st,
            adam,
            shape,
            true,
            &None,
        );
        // g'(z2)'s half into s1, h'(z1)'s packed at the front of d1; each branch down to its z.
        split(d1, &mut hw.s1, self.bp, rows);
        let l = net.dec[0];
        let ah = (&z1s[..], &dec_a[0][..], &dec_h[0][..]);
        linear::layer_backward(st.g, true, d1, d2, ah, th, l, rows, act, par);
        step(th, st, l);
        hw.dz1[..rows * z1].copy_from_slice(&d1[..rows * z1]);
        let ah = (&hw.z2[..], &hw.gp_a[0][..], &hw.gp_h[0][..]);
        linear::layer_backward(
            st.g, true, &mut hw.s1, &mut hw.s2, ah, th, self.pz2, rows, act, par,
        );
        step(th, st, self.pz2);
        hw.dz2[..rows * z2].copy_from_slice(&hw.s1[..rows * z2]);
        // p(z1|z2): dz1 and its head and layers, down to dz2.
        let dz1d = Dims {
            b: rows,
            s: 1,
            z: z1,
            hc: 2 * z1,
            ..d
        };
        let fwd = (&hw.p1_a[..], &hw.p1_h[..], &hw.phd[..], &hw.inv[..]);
        let (sc, zs) = ((&mut hw.s1, &mut hw.s2), (&hw.z2[..], &z1s[..], cq));
        self.p1_net(act).backward(
            th,
            st,
            adam,
            zs,
            fwd,
            &mut hw.d_hd,
            sc,
            &mut hw.dz1,
            par,
            dz1d,
        );
        add(&mut hw.dz2, &hw.s1, rows * z2);
        // The prior at z2.
        net.prior_backward(th, st, adam, &hw.z2[..rows * z2], cq, &mut hw.dz2, pr, par);
        // q(z1|x, z2): from dz1 through its head and joint layers to d[h(x) | g(z2)] in s1.
        let no_kl = &hw.no_kl;
        latent::gaussian_backward(
            &mut hw.d_hd,
            &hw.hd1,
            &hw.sigma1,
            &hw.e1,
            &hw.dz1,
            Some(cq),
            &no_kl[..z1],
            dz1d,
        );
        let top: &[f32] = match self.qjoint.len() {
            0 => &hw.catq,
            n => &hw.qj_h[n - 1],
        };
        let l = net.head;
        linear::linear_backward(st.g, Some(&mut hw.s1), top, &hw.d_hd, th, l, rows, par);
        step(th, st, l);
        let (acts, ds) = ((&hw.qj_a[..], &hw.qj_h[..]), (&mut hw.s1, &mut hw.s2));
        let q = &self.qjoint;
        mlp_backward(q, &hw.catq, acts, ds, th, st, adam, shape, true, &None);
        // h(x)'s half summed over each image's samples into d1 (B, bq); g(z2)'s packed in s1.
        let bq = self.bq;
        d1[..b * bq].fill(0.0);
        for r in 0..rows {
            let img = r / s;
            for j in 0..bq {
                d1[img * bq + j] += hw.s1[r * 2 * bq + j];
            }
        }
        for r in 0..rows {
            hw.s1.copy_within(r * 2 * bq + bq..(r + 1) * 2 * bq, r * bq);
        }
        let ah = (&hw.z2[..], &hw.gz_a[0][..], &hw.gz_h[0][..]);
        linear::layer_backward(
            st.g, true, &mut hw.s1, &mut hw.s2, ah, th, self.qz2, rows, act, par,
        );
        step(th, st, self.qz2);
        add(&mut hw.dz2, &hw.s1, rows * z2);
        // h(x): with a conv network, down to d(features) (b, feat) in d1, for the convolutions.
        let conv = net.conv.as_ref().zip(cv.as_mut());
        let xin: &[f32] = match &conv {
            Some((c, cw)) => c.features(cw, b),
            None => x,
        };
        let l = net.enc[0];
        let ah = (xin, &enc_a[0][..], &enc_h[0][..]);
        linear::layer_backward(st.g, conv.is_some(), d1, d2, ah, th, l, b, act, par);
        step(th, st, l);
        // q(z2|x): from dz2 (every path's share) through its head and layers, the VampPrior's
        // share at the pseudo-inputs added before each Adam step.
        latent::gaussian_backward(
            &mut hw.d_hd,
            &hw.q2hd,
            &hw.sigma2,
            &hw.e2,
            &hw.dz2,
            Some(cq),
            &no_kl[..z2],
            Dims {
                z: z2,
                hc: 2 * z2,
                ..d
            },
        );
        let top = &hw.q2_h[self.q2.len() - 1];
        let l = self.q2head;
        linear::linear_backward(st.g, Some(&mut hw.s1), top, &hw.d_hd, th, l, b, par);
        add_pseudo_grad(&pr.pw, st.g, l.w, l.end());
        step(th, st, l);
        let (acts, ds) = ((&hw.q2_a[..], &hw.q2_h[..]), (&mut hw.s1, &mut hw.s2));
        let shape = (b, act, par);
        let want = conv.is_some();
        mlp_backward(&self.q2, xin, acts, ds, th, st, adam, shape, want, &pr.pw);
        // A conv network: both branches' d(features) summed, back through the convolutions.
        if let Some((c, cw)) = conv {
            add(d1, &hw.s1, b * c.feat);
            c.enc_backward(th, st, adam, &pr.pw, cw, x, d1, b, par);
        }
    }
}

/// [a | g] per row into `cat` (rows, 2 n): `a` has one row per `s` rows (an image's, repeated
/// over its samples), `g` one per row; both n wide.
fn concat(cat: &mut [f32], a: &[f32], s: usize, g: &[f32], n: usize, rows: usize) {
    for r in 0..rows {
        let (ai, out) = (r / s, &mut cat[r * 2 * n..(r + 1) * 2 * n]);
        out[..n].copy_from_slice(&a[ai * n..(ai + 1) * n]);
        out[n..].copy_from_slice(&g[r * n..(r + 1) * n]);
    }
}

/// The backward of `concat` with one row each: d[a | g] (rows, 2 n) in `d` becomes d/da packed
/// at its front (rows, n), and d/dg goes to `dg` (rows, n).
fn split(d: &mut [f32], dg: &mut [f32], n: usize, rows: usize) {
    for r in 0..rows {
        dg[r * n..(r + 1) * n].copy_from_slice(&d[r * 2 * n + n..(r + 1) * 2 * n]);
        d.copy_within(r * 2 * n..r * 2 * n + n, r * n);
    }
}

/// One layer's Adam step.
fn step_layer(adam: &Option<AdamStep>, th: &mut [f32], st: &mut Moments, l: Lin) {
    adam_range(adam, th, st, l.w, l.end());
}

/// a[..n] += b[..n].
fn add(a: &mut [f32], b: &[f32], n: usize) {
    for (x, y) in a[..n].iter_mut().zip(&b[..n]) {
        *x += y;
    }
}

/// The hvae wiring's buffers for `cap` images of `s` samples (rows = cap s): the noise split;
/// q(z2|x)'s pre-activations, activations and head (cap rows), sigma2, z2 (rows, Z2) and the
/// head's unused closed-form KL outputs; the branches, concatenations and joint layers of
/// q(z1|x, z2) and p(x|z1, z2); q(z1|.)'s head, sigma1, log q(z1|.); p(z1|z2)'s layers, head and
/// e^-logvar; the backward's head gradient, dz1, dz2 and two scratch buffers.
pub struct HvaeWork {
    e1: Vec<f32>,
    e2: Vec<f32>,
    q2_a: Vec<Vec<f32>>,
    q2_h: Vec<Vec<f32>>,
    q2hd: Vec<f32>,
    sigma2: Vec<f32>,
    z2: Vec<f32>,
    kl_img2: Vec<f32>,
    kl_dim2: Vec<f32>,
    gz_a: Vec<Vec<f32>>,
    gz_h: Vec<Vec<f32>>,
    catq: Vec<f32>,
    qj_a: Vec<Vec<f32>>,
    qj_h: Vec<Vec<f32>>,
    hd1: Vec<f32>,
    sigma1: Vec<f32>,
    lq1: Vec<f32>,
    kl_img1: Vec<f32>,
    kl_dim1: Vec<f32>,
    p1_a: Vec<Vec<f32>>,
    p1_h: Vec<Vec<f32>>,
    phd: Vec<f32>,
    inv: Vec<f32>,
    gp_a: Vec<Vec<f32>>,
    gp_h: Vec<Vec<f32>>,
    catp: Vec<f32>,
    pj_a: Vec<Vec<f32>>,
    pj_h: Vec<Vec<f32>>,
    d_hd: Vec<f32>,
    dz1: Vec<f32>,
    dz2: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
    no_kl: Vec<f32>,
}

impl HvaeWork {
    pub fn new(h: &Hvae, act: Activation, cap: usize, s: usize) -> Self {
        let rows = cap * s;
        let (z1, z2) = (h.z1, h.z2);
        let out = |l: &Lin| linear::out_width(*l, act);
        let pre = |ls: &[Lin], n: usize| -> Vec<Vec<f32>> {
            ls.iter().map(|l| vec![0.0; n * l.n_out]).collect()
        };
        let post = |ls: &[Lin], n: usize| -> Vec<Vec<f32>> {
            ls.iter().map(|l| vec![0.0; n * out(l)]).collect()
        };
        let one = |l: &Lin| std::slice::from_ref(l).to_vec();
        let widest = h
            .named()
            .iter()
            .flat_map(|(_, ls, _)| ls.iter().map(|l| l.n_out))
            .chain([2 * h.bq, 2 * h.bp, 2 * z1, 2 * z2])
            .max()
            .unwrap_or(0);
        HvaeWork {
            e1: vec![0.0; rows * z1],
            e2: vec![0.0; rows * z2],
            q2_a: pre(&h.q2, cap),
            q2_h: post(&h.q2, cap),
            q2hd: vec![0.0; cap * 2 * z2],
            sigma2: vec![0.0; cap * z2],
            z2: vec![0.0; rows * z2],
            kl_img2: vec![0.0; cap],
            kl_dim2: vec![0.0; z2],
            gz_a: pre(&one(&h.qz2), rows),
            gz_h: post(&one(&h.qz2), rows),
            catq: vec![0.0; rows * 2 * h.bq],
            qj_a: pre(&h.qjoint, rows),
            qj_h: post(&h.qjoint, rows),
            hd1: vec![0.0; rows * 2 * z1],
            sigma1: vec![0.0; rows * z1],
            lq1: vec![0.0; rows],
            kl_img1: vec![0.0; rows],
            kl_dim1: vec![0.0; z1],
            p1_a: pre(&h.p1, rows),
            p1_h: post(&h.p1, rows),
            phd: vec![0.0; rows * 2 * z1],
            inv: vec![0.0; rows * z1],
            gp_a: pre(&one(&h.pz2), rows),
            gp_h: post(&one(&h.pz2), rows),
            catp: vec![0.0; rows * 2 * h.bp],
            pj_a: pre(&h.pjoint, rows),
            pj_h: post(&h.pjoint, rows),
            d_hd: vec![0.0; rows * 2 * z1.max(z2)],
            dz1: vec![0.0; rows * z1],
            dz2: vec![0.0; rows * z2],
            s1: vec![0.0; rows * widest],
            s2: vec![0.0; rows * widest],
            no_kl: vec![0.0; z1.max(z2)],
        }
    }
}
