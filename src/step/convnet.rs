//! A conv network's convolutions on the fused step (`model.arch = "conv"`, the networks of
//! `crate::convnet`): the encoder's convolutions before its dense layers and the decoder's
//! transposed convolutions after them, each layer with its activation, as forward / backward
//! pairs over `conv`'s layers. The dense layers, heads, latent, flows, prior and objective are
//! the MLP's, unchanged: the encoder's first dense layer reads the features (B, c_L h_L w_L) and
//! the decoder's last dense layer writes them.
//!
//! Activations are NHWC, (h w, c) per image as `conv` computes them: the data's own (H, W, C)
//! layout goes in as it is and the output comes out in it, and the features the dense layers
//! read are flattened (h, w, c), as the candle model flattens them.
//!
//! A hidden layer's bias is added by its activation pass (per position, as the dense layers'
//! are); the output layer (the last transposed convolution) leaves its bias to the likelihood
//! pass, as the MLP's output layer does: its per-channel bias is spread over the pixels
//! (`ConvNetWork::ob`).

use super::adam::{adam_range, AdamStep, Block, Moments};
use super::conv::{self, ConvWork, Geom};
use super::linear;
use crate::config::{Activation, ModelConfig};

/// One convolution (encoder) or transposed convolution (decoder, `t`) in `theta`, W (c, k k g.c)
/// row-major (a row's patch is (ky, kx, channel)) then its bias. `g` is the image side's geometry: the input's for a convolution, the
/// output's for a transposed one. `c` is the grid side's channels: a convolution's outputs, a
/// transposed one's inputs. The product's output channels (`c`, or `g.c` when transposed) are
/// twice the layer's with a gate: [a | gate], the gate's weights after a's in each row.
#[derive(Debug, Clone, Copy)]
pub struct CLayer {
    pub w: usize,
    pub b: usize,
    pub g: Geom,
    pub c: usize,
    pub t: bool,
    pub wide: usize,
}

impl CLayer {
    fn alloc(size: &mut usize, g: Geom, c: usize, t: bool, wide: usize) -> Self {
        let l = CLayer {
            w: *size,
            b: *size + c * g.patch(),
            g,
            c,
            t,
            wide,
        };
        *size = l.end();
        l
    }

    /// The layer's activated output channels (the product's, halved with a gate).
    fn channels(&self) -> usize {
        self.n_bias() / self.wide
    }

    /// The product's output channels (bias values).
    fn n_bias(&self) -> usize {
        if self.t {
            self.g.c
        } else {
            self.c
        }
    }

    pub fn end(&self) -> usize {
        self.b + self.n_bias()
    }

    /// Values per image: of the input, of the product, of the activated output.
    fn sizes(&self) -> (usize, usize, usize) {
        let (img, grid) = (self.g.c * self.g.h * self.g.w, self.c * self.g.positions());
        let (inp, prod) = if self.t { (grid, img) } else { (img, grid) };
        (inp, prod, prod / self.wide)
    }

    /// The product (no bias: the activation pass adds it) for `rows` images of `x`.
    fn forward(
        &self,
        y: &mut [f32],
        x: &[f32],
        th: &[f32],
        rows: usize,
        cw: &mut ConvWork,
        par: bool,
    ) {
        let wt = &th[self.w..self.b];
        if self.t {
            conv::convt_forward(y, x, wt, None, self.g, self.c, rows, cw, par);
        } else {
            conv::conv_forward(y, x, wt, None, self.g, self.c, rows, cw, par);
        }
    }

    /// From d(product) `dy` and the forward's input `x`: the layer's gradients into `g`, dx into
    /// `dx` when given.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        g: &mut [f32],
        dx: Option<&mut [f32]>,
        dy: &[f32],
        x: &[f32],
        th: &[f32],
        rows: usize,
        cw: &mut ConvWork,
        par: bool,
    ) {
        let (gw, gb) = g[self.w..self.end()].split_at_mut(self.b - self.w);
        let wt = &th[self.w..self.b];
        if self.t {
            conv::convt_backward(gw, gb, dx, dy, x, wt, self.g, self.c, rows, cw, par);
        } else {
            conv::conv_backward(gw, gb, dx, dy, wt, self.g, self.c, rows, cw, par);
        }
    }

    /// The checkpoint tensors of this layer under `name` (with `.gate` twins when gated):
    /// (name, shape, where element i of it lives). PyTorch's layouts, (c_out, c_in, k, k) for a
    /// convolution and (c_in, c_out, k, k) for a transposed one, against ours: a weight row's
    /// patch is (ky, kx, channel), and a gated layer's product channels are [a | gate].
    fn tensors(&self, name: &str) -> Vec<super::Placed> {
        let kk = self.g.k * self.g.k;
        let mut v: Vec<super::Placed> = Vec::new();
        let (w, b, k) = (self.w, self.b, self.g.k);
        for part in 0..self.wide {
            let suffix = if part == 0 { "" } else { ".gate" };
            if self.t {
                // Ours (c_in, k k g.c); theirs (c_in, c_out, k, k).
                let (c_in, c_out, gc) = (self.c, self.g.c / self.wide, self.g.c);
                v.push((
                    format!("{name}{suffix}.weight"),
                    vec![c_in, c_out, k, k],
                    Box::new(move |i| {
                        let (ci, co, t) = (i / (c_out * kk), (i / kk) % c_out, i % kk);
                        w + (ci * kk + t) * gc + part * c_out + co
                    }),
                ));
                v.push((
                    format!("{name}{suffix}.bias"),
                    vec![c_out],
                    Box::new(move |i| b + part * c_out + i),
                ));
            } else {
                // Ours (c, k k c_in) with c = [a's c_out | gate's c_out]; theirs (c_out, c_in, k, k).
                let (c_out, c_in) = (self.c / self.wide, self.g.c);
                v.push((
                    format!("{name}{suffix}.weight"),
                    vec![c_out, c_in, k, k],
                    Box::new(move |i| {
                        let (co, ci, t) = (i / (c_in * kk), (i / kk) % c_in, i % kk);
                        w + ((part * c_out + co) * kk + t) * c_in + ci
                    }),
                ));
                v.push((
                    format!("{name}{suffix}.bias"),
                    vec![c_out],
                    Box::new(move |i| b + part * c_out + i),
                ));
            }
        }
        v
    }

    /// The same tensors as Adam's per-tensor blocks.
    fn blocks(&self) -> Vec<Block> {
        let kk = self.g.k * self.g.k;
        let mut v = Vec::new();
        let one = |start: usize, width: usize| Block {
            start,
            rows: 1,
            width,
            stride: width,
        };
        for part in 0..self.wide {
            if self.t {
                let c_out = self.g.c / self.wide;
                v.push(Block {
                    start: self.w + part * c_out,
                    rows: self.c * kk,
                    width: c_out,
                    stride: self.g.c,
                });
                v.push(one(self.b + part * c_out, c_out));
            } else {
                let c_out = self.c / self.wide;
                let n = c_out * self.g.patch();
                v.push(one(self.w + part * n, n));
                v.push(one(self.b + part * c_out, c_out));
            }
        }
        v
    }
}

/// The conv network's layers: the encoder's convolutions bottom first, and the decoder's
/// transposed convolutions in the order applied, the last the output layer.
#[derive(Debug, Clone)]
pub struct ConvNet {
    pub enc: Vec<CLayer>,
    pub dec: Vec<CLayer>,
    /// The data's [channels, height, width].
    pub image: [usize; 3],
    /// Features per image at the top (c_L h_L w_L): the dense layers' side.
    pub feat: usize,
    act: Activation,
}

impl ConvNet {
    /// The encoder's convolutions, allocated from `size` (the decoder's come later,
    /// `alloc_dec`, so that the output layer is the last of the network's parameters).
    pub fn alloc_enc(size: &mut usize, cfg: &ModelConfig) -> Self {
        let image = cfg.image.unwrap_or([1, 1, 1]);
        let geo = cfg.conv_layers(image).unwrap_or_default();
        let wide = if cfg.activation == Activation::Gated {
            2
        } else {
            1
        };
        let enc = geo
            .iter()
            .map(|l| {
                CLayer::alloc(
                    size,
                    Geom::new(l.c_in, (l.h, l.w), l.k, l.s, l.p),
                    wide * l.c_out,
                    false,
                    wide,
                )
            })
            .collect();
        ConvNet {
            enc,
            dec: Vec::new(),
            image,
            feat: geo.last().map_or(0, |l| l.out_size()),
            act: cfg.activation,
        }
    }

    /// The decoder's transposed convolutions, mirroring the encoder's: hidden ones first, then
    /// the output layer (to the data's channels, without activation or gate).
    pub fn alloc_dec(&mut self, size: &mut usize) {
        let n = self.enc.len();
        let layers: Vec<CLayer> = self
            .enc
            .iter()
            .rev()
            .enumerate()
            .map(|(j, e)| {
                let wide = if j + 1 == n { 1 } else { e.wide };
                let g = Geom {
                    c: wide * e.g.c,
                    ..e.g
                };
                CLayer::alloc(size, g, e.c / e.wide, true, wide)
            })
            .collect();
        self.dec = layers;
    }

    pub fn out_layer(&self) -> CLayer {
        self.dec[self.dec.len() - 1]
    }

    fn channels(&self) -> usize {
        self.image[0]
    }

    /// Every tensor's checkpoint name, shape and place.
    pub fn tensors(&self) -> Vec<super::Placed> {
        let mut v = Vec::new();
        for (i, l) in self.enc.iter().enumerate() {
            v.extend(l.tensors(&format!("encoder.conv.{i}")));
        }
        let n = self.dec.len();
        for (j, l) in self.dec.iter().enumerate() {
            let name = if j + 1 == n {
                "decoder.out".to_string()
            } else {
                format!("decoder.conv.{j}")
            };
            v.extend(l.tensors(&name));
        }
        v
    }

    pub fn blocks(&self) -> Vec<Block> {
        self.enc
            .iter()
            .chain(&self.dec)
            .flat_map(|l| l.blocks())
            .collect()
    }

    /// The widest per-image activation or product, for the dense side's scratch buffers.
    pub fn widest(&self) -> usize {
        self.enc
            .iter()
            .chain(&self.dec)
            .map(|l| {
                let (a, b, _) = l.sizes();
                a.max(b)
            })
            .max()
            .unwrap_or(0)
    }

    /// The encoder's convolutions on `b` images `x` (b, H W C): the features (b, feat) are
    /// `cw.enc_h`'s last.
    pub fn enc_forward(&self, th: &[f32], x: &[f32], cw: &mut ConvNetWork, b: usize, par: bool) {
        for (i, l) in self.enc.iter().enumerate() {
            let (_, np, no) = l.sizes();
            let (prev, rest) = cw.enc_h.split_at_mut(i);
            let input: &[f32] = if i == 0 { x } else { &prev[i - 1] };
            let pre = &mut cw.enc_pre[i];
            l.forward(pre, input, th, b, &mut cw.enc_cw[i], par);
            let bias = &th[l.b..l.end()];
            act_fwd(
                &mut pre[..b * np],
                &mut rest[0][..b * no],
                bias,
                self.act,
                par,
            );
        }
    }

    /// The encoder's features after `enc_forward` (b, feat).
    pub fn features<'a>(&self, cw: &'a ConvNetWork, b: usize) -> &'a [f32] {
        &cw.enc_h[self.enc.len() - 1][..b * self.feat]
    }

    /// Back through the encoder's convolutions from d(features) `d` (b, feat), for the images
    /// `x`: each layer's gradients into `st.g`, the VampPrior's share (`pseudo`) added, and its
    /// Adam step. The first layer's input needs no gradient.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enc_backward(
        &self,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        pseudo: &Option<super::PseudoWork>,
        cw: &mut ConvNetWork,
        x: &[f32],
        d: &[f32],
        b: usize,
        par: bool,
    ) {
        cw.da[..b * self.feat].copy_from_slice(&d[..b * self.feat]);
        for i in (0..self.enc.len()).rev() {
            self.enc_layer_backward(i, st.g, th, cw, x, b, i > 0, par);
            let l = self.enc[i];
            super::add_pseudo_grad(pseudo, st.g, l.w, l.end());
            adam_range(adam, th, st, l.w, l.end());
        }
    }

    /// The VampPrior's pass back through the convolutions at its pseudo-inputs `x` (k images)
    /// from d(features) `d`: the layers' gradients into `g` (added to the data's before their
    /// Adam steps), and d(x) left for `ConvNetWork::input_grad`.
    #[allow(clippy::too_many_arguments)]
    pub fn pseudo_backward(
        &self,
        th: &[f32],
        g: &mut [f32],
        cw: &mut ConvNetWork,
        x: &[f32],
        d: &[f32],
        k: usize,
        par: bool,
    ) {
        cw.da[..k * self.feat].copy_from_slice(&d[..k * self.feat]);
        for i in (0..self.enc.len()).rev() {
            self.enc_layer_backward(i, g, th, cw, x, k, true, par);
        }
    }

    /// Encoder layer `i`'s backward from d(its output) in `cw.da`: its gradients into `g`, and
    /// d(its input) into `cw.da` when `want_dx`.
    #[allow(clippy::too_many_arguments)]
    fn enc_layer_backward(
        &self,
        i: usize,
        g: &mut [f32],
        th: &[f32],
        cw: &mut ConvNetWork,
        x: &[f32],
        b: usize,
        want_dx: bool,
        par: bool,
    ) {
        let l = self.enc[i];
        let (_, np, no) = l.sizes();
        let (pre, h) = (&cw.enc_pre[i][..b * np], &cw.enc_h[i][..b * no]);
        act_back(&mut cw.da, &mut cw.db, pre, h, l.channels(), self.act, par);
        let input: &[f32] = if i == 0 { x } else { &cw.enc_h[i - 1] };
        let dx = if want_dx { Some(&mut cw.db[..]) } else { None };
        l.backward(g, dx, &cw.da, input, th, b, &mut cw.enc_cw[i], par);
        std::mem::swap(&mut cw.da, &mut cw.db);
    }

    /// The decoder's transposed convolutions on `rows` rows of features `f` (rows, feat): the
    /// output (rows, H W C) into `out` without the output layer's bias, which `cw.ob` holds
    /// spread over the pixels for the likelihood pass.
    #[allow(clippy::too_many_arguments)]
    pub fn dec_forward(
        &self,
        th: &[f32],
        f: &[f32],
        out: &mut [f32],
        cw: &mut ConvNetWork,
        rows: usize,
        par: bool,
    ) {
        let n = self.dec.len();
        for (j, l) in self.dec.iter().enumerate() {
            let (prev, rest) = cw.dec_h.split_at_mut(j);
            let input: &[f32] = if j == 0 { f } else { &prev[j - 1] };
            if j + 1 == n {
                l.forward(out, input, th, rows, &mut cw.dec_cw[j], par);
            } else {
                let (_, np, no) = l.sizes();
                let pre = &mut cw.dec_pre[j];
                l.forward(pre, input, th, rows, &mut cw.dec_cw[j], par);
                let bias = &th[l.b..l.end()];
                act_fwd(
                    &mut pre[..rows * np],
                    &mut rest[0][..rows * no],
                    bias,
                    self.act,
                    par,
                );
            }
        }
        let (ol, c) = (self.out_layer(), self.channels());
        let dim = self.image.iter().product::<usize>();
        for (i, v) in cw.ob[..dim].iter_mut().enumerate() {
            *v = th[ol.b + i % c];
        }
    }

    /// Back through the output layer from d(output) `d_out` (rows, H W C), for its input `f`
    /// (the decoder's features when it is the only layer): its gradients into `g`; d(its input)
    /// kept in `cw.da` for `dec_backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn out_backward(
        &self,
        g: &mut [f32],
        th: &[f32],
        d_out: &[f32],
        f: &[f32],
        cw: &mut ConvNetWork,
        rows: usize,
        par: bool,
    ) {
        let n = self.dec.len();
        let input: &[f32] = if n == 1 { f } else { &cw.dec_h[n - 2] };
        let l = self.out_layer();
        let dx = Some(&mut cw.da[..]);
        l.backward(g, dx, d_out, input, th, rows, &mut cw.dec_cw[n - 1], par);
    }

    /// Back through the decoder's hidden transposed convolutions from `cw.da` (after
    /// `out_backward`), each layer's Adam step as its gradient is final: d(features) (rows,
    /// feat) into `d`. `f` is the decoder's features (the first layer's input).
    #[allow(clippy::too_many_arguments)]
    pub fn dec_backward(
        &self,
        th: &mut [f32],
        st: &mut Moments,
        adam: &Option<AdamStep>,
        cw: &mut ConvNetWork,
        f: &[f32],
        d: &mut [f32],
        rows: usize,
        par: bool,
    ) {
        let n = self.dec.len();
        for j in (0..n - 1).rev() {
            let l = self.dec[j];
            let (_, np, no) = l.sizes();
            let (pre, h) = (&cw.dec_pre[j][..rows * np], &cw.dec_h[j][..rows * no]);
            act_back(&mut cw.da, &mut cw.db, pre, h, l.channels(), self.act, par);
            let input: &[f32] = if j == 0 { f } else { &cw.dec_h[j - 1] };
            let dx = Some(&mut cw.db[..]);
            l.backward(st.g, dx, &cw.da, input, th, rows, &mut cw.dec_cw[j], par);
            adam_range(adam, th, st, l.w, l.end());
            std::mem::swap(&mut cw.da, &mut cw.db);
        }
        d[..rows * self.feat].copy_from_slice(&cw.da[..rows * self.feat]);
    }
}

/// h = act(a + bias) per position row of the product `pre` (its width the bias's); gated:
/// h = (a + b_a) * sigmoid(gate + b_g) of each row's [a | gate] halves. With `par`, the rows
/// in two halves on both workers (the pass is a third of a layer's memory traffic).
fn act_fwd(pre: &mut [f32], h: &mut [f32], bias: &[f32], act: Activation, par: bool) {
    let c = bias.len();
    let rows = pre.len() / c;
    if par && rows >= 2 {
        let r = rows / 2;
        let (p0, p1) = pre.split_at_mut(r * c);
        let (h0, h1) = h.split_at_mut(r * (h.len() / rows));
        rayon::join(
            || act_fwd(p0, h0, bias, act, false),
            || act_fwd(p1, h1, bias, act, false),
        );
    } else if act == Activation::Gated {
        linear::gated_forward(pre, h, bias, c / 2);
    } else {
        linear::act_forward(pre, h, bias, c, act);
    }
}

/// d(output) in `d` (h's length) -> d(product) in `d` (`t` scratch): times act'(a), or, for
/// a gated layer of `ch` channels, [d a | d gate] per position row.
#[allow(clippy::too_many_arguments)]
fn act_back(
    d: &mut Vec<f32>,
    t: &mut Vec<f32>,
    pre: &[f32],
    h: &[f32],
    ch: usize,
    act: Activation,
    par: bool,
) {
    let n = h.len();
    if act == Activation::Gated {
        gated_back(&d[..n], pre, &mut t[..2 * n], ch, par);
        std::mem::swap(d, t);
    } else {
        relu_like_back(&mut d[..n], pre, h, ch, act, par);
    }
}

/// `linear::gated_backward` over rows of `ch` outputs, in two halves with `par`.
fn gated_back(dh: &[f32], pre: &[f32], d: &mut [f32], ch: usize, par: bool) {
    let rows = dh.len() / ch;
    if par && rows >= 2 {
        let r = rows / 2;
        let (d0, d1) = d.split_at_mut(2 * r * ch);
        rayon::join(
            || gated_back(&dh[..r * ch], &pre[..2 * r * ch], d0, ch, false),
            || gated_back(&dh[r * ch..], &pre[2 * r * ch..], d1, ch, false),
        );
    } else {
        linear::gated_backward(dh, pre, d, ch);
    }
}

/// `linear::act_backward` over rows of `ch` values, in two halves with `par`.
fn relu_like_back(d: &mut [f32], pre: &[f32], h: &[f32], ch: usize, act: Activation, par: bool) {
    let rows = d.len() / ch;
    if par && rows >= 2 {
        let r = rows / 2 * ch;
        let (d0, d1) = d.split_at_mut(r);
        rayon::join(
            || relu_like_back(d0, &pre[..r], &h[..r], ch, act, false),
            || relu_like_back(d1, &pre[r..], &h[r..], ch, act, false),
        );
    } else {
        linear::act_backward(d, pre, h, act);
    }
}

/// A conv network's buffers: per layer its patch rows, products and activations; two gradient
/// buffers; the output bias spread over the pixels.
pub struct ConvNetWork {
    enc_cw: Vec<ConvWork>,
    enc_pre: Vec<Vec<f32>>,
    enc_h: Vec<Vec<f32>>,
    dec_cw: Vec<ConvWork>,
    dec_pre: Vec<Vec<f32>>,
    dec_h: Vec<Vec<f32>>,
    da: Vec<f32>,
    db: Vec<f32>,
    pub ob: Vec<f32>,
}

impl ConvNetWork {
    /// The first `n` values of d(input) after `ConvNet::pseudo_backward`.
    pub fn input_grad(&self, n: usize) -> &[f32] {
        &self.da[..n]
    }

    /// For `cap` images and `rows` sample rows.
    pub fn new(net: &ConvNet, cap: usize, rows: usize) -> Self {
        let dim: usize = net.image.iter().product();
        let widest = net.widest().max(dim);
        let n = net.dec.len();
        ConvNetWork {
            enc_cw: net.enc.iter().map(|l| ConvWork::new(l.g, cap)).collect(),
            enc_pre: net
                .enc
                .iter()
                .map(|l| vec![0.0; cap * l.sizes().1])
                .collect(),
            enc_h: net
                .enc
                .iter()
                .map(|l| vec![0.0; cap * l.sizes().2])
                .collect(),
            dec_cw: net.dec.iter().map(|l| ConvWork::new(l.g, rows)).collect(),
            dec_pre: net.dec[..n - 1]
                .iter()
                .map(|l| vec![0.0; rows * l.sizes().1])
                .collect(),
            dec_h: net.dec[..n - 1]
                .iter()
                .map(|l| vec![0.0; rows * l.sizes().2])
                .collect(),
            da: vec![0.0; rows.max(cap) * widest],
            db: vec![0.0; rows.max(cap) * widest],
            ob: vec![0.0; dim],
        }
    }
}
