//! The convolutional networks of `model.arch = "conv"` on candle (the oracle, the checkpoint's
//! names and the GPU path): convolutions on the image before the encoder's dense layers, and
//! transposed convolutions after the decoder's dense layers mirroring them, the last one to the
//! data's channels. The stride-2 pairs are those of the DCGAN-style conv VAEs (Radford et al.
//! 2016) that the peer `torch_vae.py --arch conv` and Tomczak & Welling's convHVAE (2018) use;
//! transposed convolutions rather than upsampling then convolution, because they are the exact
//! adjoint of the encoder's layers and the peer's network, so the two can be timed side by side.
//!
//! The dense layers next to the convolutions see the features flattened (h, w, c) (the data's
//! own order, and the fused step's): a PyTorch model reading the checkpoint permutes to (h, w, c)
//! before its flatten. Tensor names, PyTorch layouts: `encoder.conv.{i}.{weight,bias}` (c_out, c_in, k, k), bottom
//! first; `decoder.conv.{j}.*` (c_in, c_out, k, k) in the order the decoder applies them, and the
//! last, to the data's channels, `decoder.out.*` (its bias per channel). With
//! `activation = "gated"` each hidden layer has a `.gate` twin: h = conv(x) * sigmoid(conv'(x))
//! (Tomczak & Welling's GatedConv2d).

use crate::config::{Activation, ConvLayer, ModelConfig};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// A convolution's (or transposed convolution's) weight and bias.
struct Kernel {
    w: Tensor,
    b: Tensor,
}

impl Kernel {
    /// Weight `shape` (PyTorch's layout), bias `n_bias` values, under `vb`.
    fn new(shape: (usize, usize, usize, usize), n_bias: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Kernel {
            w: vb.get(shape, "weight")?,
            b: vb.get(n_bias, "bias")?,
        })
    }

    /// y = conv(x) + b on NCHW `x`.
    fn conv(&self, x: &Tensor, l: &ConvLayer) -> Result<Tensor> {
        x.conv2d(&self.w, l.p, l.s, 1, 1)?
            .broadcast_add(&self.b.reshape((1, (), 1, 1))?)
    }

    /// y = conv_transpose(x) + b, the adjoint of layer `l`'s convolution.
    fn convt(&self, x: &Tensor, l: &ConvLayer) -> Result<Tensor> {
        x.conv_transpose2d(&self.w, l.p, l.op, l.s, 1)?
            .broadcast_add(&self.b.reshape((1, (), 1, 1))?)
    }
}

/// A hidden layer: its kernel, and with the gated activation its gate's.
struct Layer {
    k: Kernel,
    gate: Option<Kernel>,
}

impl Layer {
    fn apply(&self, x: &Tensor, l: &ConvLayer, act: Activation, t: bool) -> Result<Tensor> {
        let f = |k: &Kernel| if t { k.convt(x, l) } else { k.conv(x, l) };
        match &self.gate {
            Some(g) => f(&self.k)? * candle_nn::ops::sigmoid(&f(g)?)?,
            None => activate(&f(&self.k)?, act),
        }
    }
}

/// The encoder's convolutions: (B, C H W) images -> (B, c_L h_L w_L) features, flattened NCHW.
pub struct ConvEncoder {
    geo: Vec<ConvLayer>,
    layers: Vec<Layer>,
    act: Activation,
    image: [usize; 3],
}

/// The decoder's transposed convolutions: (B, c_L h_L w_L) features -> (B, C H W) raw output.
pub struct ConvDecoder {
    geo: Vec<ConvLayer>,
    /// Applied first to last; the last maps to the data's channels, without activation.
    layers: Vec<Layer>,
    act: Activation,
}

fn layer(
    shape: (usize, usize, usize, usize),
    n: usize,
    gated: bool,
    vb: VarBuilder,
) -> Result<Layer> {
    Ok(Layer {
        k: Kernel::new(shape, n, vb.clone())?,
        gate: if gated {
            Some(Kernel::new(shape, n, vb.pp("gate"))?)
        } else {
            None
        },
    })
}

/// The layers of `cfg`'s conv network on its image, as a candle error when they do not fit.
pub fn geometry(cfg: &ModelConfig) -> Result<(Vec<ConvLayer>, [usize; 3])> {
    let image = cfg
        .image_shape()
        .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
    let geo = cfg
        .conv_layers(image)
        .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
    Ok((geo, image))
}

impl ConvEncoder {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (geo, image) = geometry(cfg)?;
        let gated = cfg.activation == Activation::Gated;
        let layers = geo
            .iter()
            .enumerate()
            .map(|(i, l)| layer((l.c_out, l.c_in, l.k, l.k), l.c_out, gated, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ConvEncoder {
            geo,
            layers,
            act: cfg.activation,
            image,
        })
    }

    /// (B, C H W) -> (B, c_L h_L w_L).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The data's pixels are (H, W, C) interleaved; the convolutions read NCHW.
        let [c, h, w] = self.image;
        let mut t = x
            .reshape(((), h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        for (l, g) in self.layers.iter().zip(&self.geo) {
            t = l.apply(&t, g, self.act, false)?;
        }
        // The features go to the dense layers flattened (h, w, c), as the fused step keeps them.
        t.permute((0, 2, 3, 1))?.contiguous()?.flatten_from(1)
    }
}

impl ConvDecoder {
    /// `vb` is the root: the layers are `decoder.conv.{j}` and `decoder.out`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (geo, _) = geometry(cfg)?;
        let gated = cfg.activation == Activation::Gated;
        let n = geo.len();
        let layers = geo
            .iter()
            .rev()
            .enumerate()
            .map(|(j, l)| {
                let shape = (l.c_out, l.c_in, l.k, l.k);
                if j + 1 == n {
                    layer(shape, l.c_in, false, vb.pp("decoder.out"))
                } else {
                    layer(shape, l.c_in, gated, vb.pp("decoder.conv").pp(j))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ConvDecoder {
            geo,
            layers,
            act: cfg.activation,
        })
    }

    /// (N, c_L h_L w_L) -> (N, C H W), the last layer's output raw (logits or means).
    pub fn forward(&self, f: &Tensor) -> Result<Tensor> {
        let top = self.geo[self.geo.len() - 1];
        // The features are (h, w, c) (see `ConvEncoder::forward`).
        let mut t = f
            .reshape(((), top.h / top.s, top.w / top.s, top.c_out))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let n = self.layers.len();
        for (j, (l, g)) in self.layers.iter().zip(self.geo.iter().rev()).enumerate() {
            t = if j + 1 == n {
                l.k.convt(&t, g)?
            } else {
                l.apply(&t, g, self.act, true)?
            };
        }
        // Back to the data's (H, W, C) interleaved pixels.
        t.permute((0, 2, 3, 1))?.contiguous()?.flatten_from(1)
    }
}

/// The checkpoint tensors of `cfg`'s convolutions: (name, shape, fan-in as PyTorch's default
/// initialization counts it: the weight's size(1) k k, for either kind). Empty when the image
/// does not fit the layers (building the model reports that).
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, usize)> {
    let Ok((geo, _)) = geometry(cfg) else {
        return vec![];
    };
    let gated = cfg.activation == Activation::Gated;
    let mut v = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, n_bias: usize, fan: usize| {
        v.push((format!("{name}.weight"), shape, fan));
        v.push((format!("{name}.bias"), vec![n_bias], fan));
    };
    for (i, l) in geo.iter().enumerate() {
        let shape = vec![l.c_out, l.c_in, l.k, l.k];
        let fan = l.c_in * l.k * l.k;
        push(format!("encoder.conv.{i}"), shape.clone(), l.c_out, fan);
        if gated {
            push(format!("encoder.conv.{i}.gate"), shape, l.c_out, fan);
        }
    }
    let n = geo.len();
    for (j, l) in geo.iter().rev().enumerate() {
        let shape = vec![l.c_out, l.c_in, l.k, l.k];
        let fan = l.c_in * l.k * l.k;
        if j + 1 == n {
            push("decoder.out".into(), shape, l.c_in, fan);
        } else {
            push(format!("decoder.conv.{j}"), shape.clone(), l.c_in, fan);
            if gated {
                push(format!("decoder.conv.{j}.gate"), shape, l.c_in, fan);
            }
        }
    }
    v
}

/// An elementwise activation on candle, for the dense layers (`model::Mlp`) and the
/// convolutions alike.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Relu => x.relu(),
        Activation::Tanh => x.tanh(),
        // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), finite for any x.
        Activation::Softplus => x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?,
        Activation::Sigmoid => candle_nn::ops::sigmoid(x),
        Activation::Gelu => x.gelu(),
        Activation::Elu => x.elu(1.0),
        // The gate needs its own linear map; `Mlp` applies it.
        Activation::Gated => Err(candle_core::Error::Msg(
            "the gated activation is a layer of its own, not a function".into(),
        )),
    }
}
