//! The chain wiring's second stochastic layer as a forward / backward pair (Burda, Grosse &
//! Salakhutdinov 2015, section 2's k-layer model; their code yburda/iwae): above the z1 (rows,
//! Z1) that `latent` draws,
//!
//! - q(z2|z1): z1 -> MLP -> [mu2 | logvar2] (rows, 2 Z2), z2 = mu2 + sigma2 e2, one per row
//!   (`latent::gaussian_forward` with one sample per row);
//! - p(z1|z2): z2 -> the MLP's widths reversed -> [mu1 | logvar1] (rows, 2 Z1), scored at z1
//!   (`conditional::density_forward`).
//!
//! The forward adds log q(z2|z1) - log p(z1|z2) to each row's log q - log p; the caller's prior
//! adds -log p(z2) and its gradient dz2 between the backward's two halves: `p_backward` (p(z1|z2)
//! and its MLP, down to dz2) and `q_backward` (q(z2|z1) and its MLP, down to dz1). Both add into
//! the dz1 that the decoder left, so the first layer's `gaussian_backward` sees the whole of it.
//! Each layer's Adam step runs as soon as its gradient is final, as in `Fused`.
//!
//! Rows are samples, image-major, as everywhere in the step; every row is its own sample of z1,
//! so this layer has no images, only rows.

use super::adam::{adam_range, AdamStep, Moments};
use super::conditional;
use super::latent::{self, Dims};
use super::linear::{self, Lin};
use super::mlp_backward;
use crate::config::Activation;

/// The second layer's parameters in `theta`: q(z2|z1)'s hidden layers and head (H, 2 Z2), then
/// p(z1|z2)'s hidden layers and head (H, 2 Z1). Heads are [mu | logvar] column blocks.
#[derive(Debug, Clone)]
pub struct Upper {
    pub enc: Vec<Lin>,
    pub qhead: Lin,
    pub dec: Vec<Lin>,
    pub phead: Lin,
    pub z1: usize,
    pub z2: usize,
    act: Activation,
    lv: (f32, f32),
}

impl Upper {
    /// Lays the layer out from `size` on: Z1 -> hidden -> 2 Z2, then Z2 -> hidden reversed ->
    /// 2 Z1 (a gated layer's product twice as wide); `lv` is the log-variance clip.
    pub fn alloc(
        size: &mut usize,
        (z1, z2): (usize, usize),
        hidden: &[usize],
        act: Activation,
        lv: (f32, f32),
    ) -> Self {
        let wide = if act == Activation::Gated { 2 } else { 1 };
        let mut enc = Vec::new();
        let mut prev = z1;
        for &h in hidden {
            enc.push(Lin::alloc(size, prev, wide * h));
            prev = h;
        }
        let qhead = Lin::alloc(size, prev, 2 * z2);
        let mut dec = Vec::new();
        let mut prev = z2;
        for &h in hidden.iter().rev() {
            dec.push(Lin::alloc(size, prev, wide * h));
            prev = h;
        }
        let phead = Lin::alloc(size, prev, 2 * z1);
        Upper {
            enc,
            qhead,
            dec,
            phead,
            z1,
            z2,
            act,
            lv,
        }
    }

    /// One call's shapes for a Gaussian head of `z` dimensions over `rows` rows.
    fn dims(&self, rows: usize, z: usize) -> Dims {
        Dims {
            b: rows,
            s: 1,
            z,
            hc: 2 * z,
            lv_min: self.lv.0,
            lv_max: self.lv.1,
        }
    }

    /// Where its parameters end in `theta`.
    pub fn end(&self) -> usize {
        self.phead.end()
    }

    /// Forward over `rows` rows of z1: draws z2 into `w.z2` from the noise in `w.eps2` and adds
    /// log q(z2|z1) - log p(z1|z2) to `lq` (rows).
    pub fn forward(&self, th: &[f32], w: &mut UpperWork, z1: &[f32], lq: &mut [f32], rows: usize) {
        let (act, par) = (self.act, w.par);
        linear::mlp_forward(
            &self.enc,
            z1,
            &mut w.enc_a,
            &mut w.enc_h,
            th,
            rows,
            act,
            par,
        );
        let top = &w.enc_h[self.enc.len() - 1];
        linear::linear_forward(&mut w.qhd, top, th, self.qhead, rows, par);
        latent::gaussian_forward(
            &mut w.qhd,
            &th[self.qhead.b..self.qhead.end()],
            &w.eps2,
            &mut w.sigma2,
            &mut w.z2,
            &mut w.lq2,
            &mut w.kl_img,
            &mut w.kl_dim,
            self.dims(rows, self.z2),
        );
        for (l, q2) in lq[..rows].iter_mut().zip(&w.lq2) {
            *l += q2;
        }
        let pw = conditional::NetWork {
            pre: &mut w.dec_a,
            out: &mut w.dec_h,
            hd: &mut w.phd,
            inv: &mut w.inv,
        };
        let d = self.dims(rows, self.z1);
        self.p_net().forward(th, &w.z2, z1, pw, lq, par, d);
    }

    /// p(z1|z2)'s network.
    fn p_net(&self) -> conditional::Net<'_> {
        conditional::Net {
            layers: &self.dec,
            head: self.phead,
            act: self.act,
        }
    }

    /// Back through p(z1|z2) for per-row weights `cq` on log q - log p: adds its d/dz1 into
    /// `dz1` (rows, Z1), leaves d/dz2 in `w.dz2` (rows, Z2) for the prior to add to, and steps
    /// the head and MLP of p(z1|z2).
    #[allow(clippy::too_many_arguments)]
    pub fn p_backward(
        &self,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        w: &mut UpperWork,
        z1: &[f32],
        cq: &[f32],
        dz1: &mut [f32],
        rows: usize,
    ) {
        let d = self.dims(rows, self.z1);
        let fwd = (&w.dec_a[..], &w.dec_h[..], &w.phd[..], &w.inv[..]);
        let (s, zs) = ((&mut w.s1, &mut w.s2), (&w.z2[..], z1, cq));
        self.p_net()
            .backward(th, st, adam, zs, fwd, &mut w.d_hd, s, dz1, w.par, d);
        let n = rows * self.z2;
        w.dz2[..n].copy_from_slice(&w.s1[..n]);
    }

    /// Back through q(z2|z1) from d/dz2 in `w.dz2` (the prior's share added) and the weights
    /// `cq` (log q(z2|z1)'s -1/2 logvar term): adds d/dz1 into `dz1` and steps q(z2|z1)'s head
    /// and MLP.
    #[allow(clippy::too_many_arguments)]
    pub fn q_backward(
        &self,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        w: &mut UpperWork,
        z1: &[f32],
        cq: &[f32],
        dz1: &mut [f32],
        rows: usize,
    ) {
        let (act, par) = (self.act, w.par);
        latent::gaussian_backward(
            &mut w.d_hd,
            &w.qhd,
            &w.sigma2,
            &w.eps2,
            &w.dz2,
            Some(cq),
            &w.no_kl,
            self.dims(rows, self.z2),
        );
        let top = &w.enc_h[self.enc.len() - 1];
        let l = self.qhead;
        linear::linear_backward(st.g, Some(&mut w.s1), top, &w.d_hd, th, l, rows, par);
        adam_range(adam, th, st, l.w, l.end());
        let (acts, d) = ((&w.enc_a[..], &w.enc_h[..]), (&mut w.s1, &mut w.s2));
        let shape = (rows, act, par);
        mlp_backward(&self.enc, z1, acts, d, th, st, adam, shape, true, &None);
        for (a, b) in dz1[..rows * self.z1].iter_mut().zip(&w.s1) {
            *a += b;
        }
    }

    /// Splits each row's noise [e1 (Z1) | e2 (Z2)] of `noise` (rows, Z1 + Z2), the model's
    /// layout, into `w.e1` (rows, Z1) and `w.eps2` (rows, Z2).
    pub fn split_noise(&self, noise: &[f32], w: &mut UpperWork, rows: usize) {
        let (z1, z2) = (self.z1, self.z2);
        for (r, row) in noise[..rows * (z1 + z2)].chunks_exact(z1 + z2).enumerate() {
            w.e1[r * z1..(r + 1) * z1].copy_from_slice(&row[..z1]);
            w.eps2[r * z2..(r + 1) * z2].copy_from_slice(&row[z1..]);
        }
    }
}

/// The second layer's buffers for `rows` sample rows: z1's noise alone (rows, Z1) and z2's
/// (rows, Z2); q(z2|z1)'s pre-activations, activations and head (rows, 2 Z2, bias added),
/// sigma2 and z2 (rows, Z2), log q(z2|z1) (rows) and the head's KL outputs (unused: this layer's
/// KL is Monte-Carlo); p(z1|z2)'s pre-activations, activations, head (rows, 2 Z1) and e^-logvar
/// (rows, Z1); a head gradient, d/dz2, and two scratch buffers the widest layer wide.
pub struct UpperWork {
    par: bool,
    pub e1: Vec<f32>,
    eps2: Vec<f32>,
    enc_a: Vec<Vec<f32>>,
    enc_h: Vec<Vec<f32>>,
    qhd: Vec<f32>,
    sigma2: Vec<f32>,
    pub z2: Vec<f32>,
    lq2: Vec<f32>,
    kl_img: Vec<f32>,
    kl_dim: Vec<f32>,
    dec_a: Vec<Vec<f32>>,
    dec_h: Vec<Vec<f32>>,
    phd: Vec<f32>,
    inv: Vec<f32>,
    d_hd: Vec<f32>,
    pub dz2: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
    /// Zero weights on the closed-form KL (Z2): this layer's KL is Monte-Carlo.
    no_kl: Vec<f32>,
}

impl UpperWork {
    pub fn new(u: &Upper, rows: usize, par: bool) -> Self {
        let (z1, z2) = (u.z1, u.z2);
        let wide = |l: &Lin| linear::out_width(*l, u.act);
        let widest = u
            .enc
            .iter()
            .chain(&u.dec)
            .map(|l| l.n_out)
            .chain([2 * z1, 2 * z2])
            .max()
            .unwrap_or(0);
        let vecs = |ls: &[Lin], f: &dyn Fn(&Lin) -> usize| -> Vec<Vec<f32>> {
            ls.iter().map(|l| vec![0.0; rows * f(l)]).collect()
        };
        UpperWork {
            par,
            e1: vec![0.0; rows * z1],
            eps2: vec![0.0; rows * z2],
            enc_a: vecs(&u.enc, &|l| l.n_out),
            enc_h: vecs(&u.enc, &wide),
            qhd: vec![0.0; rows * 2 * z2],
            sigma2: vec![0.0; rows * z2],
            z2: vec![0.0; rows * z2],
            lq2: vec![0.0; rows],
            kl_img: vec![0.0; rows],
            kl_dim: vec![0.0; z2],
            dec_a: vecs(&u.dec, &|l| l.n_out),
            dec_h: vecs(&u.dec, &wide),
            phd: vec![0.0; rows * 2 * z1],
            inv: vec![0.0; rows * z1],
            d_hd: vec![0.0; rows * 2 * z1.max(z2)],
            dz2: vec![0.0; rows * z2],
            s1: vec![0.0; rows * widest],
            s2: vec![0.0; rows * widest],
            no_kl: vec![0.0; z2],
        }
    }
}
