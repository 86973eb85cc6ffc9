//! `vae explore`: the latent space in a browser.
//!
//! The output is one self-contained HTML file. It needs no server, no network and no CDN, and
//! works from a file opened offline. It holds:
//! - the decoder's weights, float16 by default;
//! - the posterior means of the test set (`Vae::code`: mu, carried through any flows);
//! - the codes' principal axes.
//!
//! The page (`explore.html`):
//! - draws the codes as a scatter coloured by class;
//! - decodes the point under the pointer live, with the MLP forward written in JavaScript;
//! - shows the interpolation strip of a drag between two points.
//!
//! A latent space of more than two dimensions is viewed through two directions: principal
//! components or latent axes. Sliders set the other directions.
//!
//! Float16 weights halve the file. Their rounding (relative 2^-11) moves a decoded pixel by far
//! less than 1/255. `--precision f32` keeps the weights exact, and the page then matches
//! `Vae::decode` to float32 rounding.

use crate::config::Activation;
use crate::eval::{self, Loaded};
use crate::picture::Output;
use crate::pictures;
use anyhow::{bail, Context, Result};
use serde_json::json;

/// The page; `explore` puts the data in place of `DATA_MARKER`.
const PAGE: &str = include_str!("explore.html");
const DATA_MARKER: &str = "/*VAE_DATA*/null";

/// How the weights are stored in the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// IEEE half floats: half the bytes, pixels within 1/255 of the float32 decoder.
    F16,
    /// The checkpoint's float32 weights, exactly.
    F32,
}

/// Standard base64 (RFC 4648, section 4) with padding: how the page carries binary arrays.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let v = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(T[(v >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// `v` as little-endian float16 or float32 bytes, base64.
fn floats(v: &[f32], p: Precision) -> String {
    let bytes: Vec<u8> = match p {
        Precision::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Precision::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    base64(&bytes)
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::Tanh => "tanh",
        Activation::Softplus => "softplus",
        Activation::Sigmoid => "sigmoid",
        Activation::Gelu => "gelu",
        Activation::Elu => "elu",
        Activation::Gated => "gated",
    }
}

/// The page for the run `l`, its scatter holding the first `limit` test images (0 = all).
pub fn page(l: &Loaded, limit: usize, precision: Precision) -> Result<String> {
    let cfg = &l.model.cfg;
    let zd = cfg.top_latent();
    if zd < 2 {
        bail!("the run's latent space is 1-D; the explorer needs a plane (vae manifold --dim 1 traverses it)");
    }
    let test = l.test_split(limit)?;
    let px = eval::test_pixels(&l.cfg, &test);
    let codes = pictures::encode_means(l, &px)?;
    let get = |name: &str| -> Result<Vec<f32>> {
        l.params
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", l.dir.display()))?
            .flatten_all()?
            .to_vec1::<f32>()
            .with_context(|| format!("{}: tensor {name}", l.dir.display()))
    };
    // The decoder: hidden layers (the encoder's widths reversed), then the output layer. With a
    // second stochastic layer the page decodes a code of z2 through p(z1|z2)'s mean first: its
    // hidden layers, then its mu head (`linear`: no activation), as `vae`'s pictures do
    // (`Vae::decode_top`). The hvae wiring's first decoder layer on z1 carries the branch on z2
    // (`z2`: a layer on the code itself) whose output the page appends to its own.
    let hvae = !cfg.upper.is_empty() && cfg.wiring == crate::config::Wiring::Hvae;
    let mut layers = Vec::new();
    let mut prev = zd;
    let gated = cfg.activation == Activation::Gated;
    let mut names: Vec<(String, usize)> = Vec::new();
    if let Some(u) = cfg.upper.first() {
        for (i, &h) in u.hidden.iter().rev().enumerate() {
            names.push((format!("decoder2.hidden.{i}"), h));
        }
        names.push(("decoder2.mu".into(), cfg.latent));
    }
    for (i, &h) in cfg.hidden.iter().rev().enumerate() {
        names.push((format!("decoder.hidden.{i}"), h));
    }
    // A conv network: the dense layers end at the last convolution's features, (h, w, c), which
    // the transposed convolutions (`convt` layers, PyTorch's (in, out, k, k) kernels) take back
    // to the image.
    let conv_geo = match cfg.arch {
        crate::config::Arch::Conv => {
            let geo = cfg.conv_layers(cfg.image_shape()?)?;
            let feat = geo.last().map_or(0, |g| g.out_size());
            names.push((format!("decoder.hidden.{}", cfg.hidden.len()), feat));
            geo
        }
        crate::config::Arch::Mlp => Vec::new(),
    };
    let dense = |name: &str, nin: usize, nout: usize| -> Result<serde_json::Value> {
        let mut layer = json!({
            "in": nin, "out": nout,
            "w": floats(&get(&format!("{name}.weight"))?, precision),
            "b": floats(&get(&format!("{name}.bias"))?, precision),
        });
        if name == "decoder2.mu" {
            layer["linear"] = true.into();
        } else if gated {
            layer["gw"] = floats(&get(&format!("{name}.gate.weight"))?, precision).into();
            layer["gb"] = floats(&get(&format!("{name}.gate.bias"))?, precision).into();
        }
        Ok(layer)
    };
    for (name, h) in names {
        let mut layer = dense(&name, prev, h)?;
        prev = h;
        if hvae && name == "decoder.hidden.0" {
            layer["z2"] = dense("decoder.z2.0", zd, h)?;
            prev = 2 * h;
        }
        layers.push(layer);
    }
    let n_conv = conv_geo.len();
    for (j, g) in conv_geo.iter().rev().enumerate() {
        let last = j + 1 == n_conv;
        let name = if last {
            "decoder.out".to_string()
        } else {
            format!("decoder.conv.{j}")
        };
        let mut layer = json!({
            "convt": true, "last": last,
            "cin": g.c_out, "cout": g.c_in, "k": g.k, "s": g.s, "p": g.p,
            "hin": g.h / g.s, "win": g.w / g.s, "hout": g.h, "wout": g.w,
            "w": floats(&get(&format!("{name}.weight"))?, precision),
            "b": floats(&get(&format!("{name}.bias"))?, precision),
        });
        if gated && !last {
            layer["gw"] = floats(&get(&format!("{name}.gate.weight"))?, precision).into();
            layer["gb"] = floats(&get(&format!("{name}.gate.bias"))?, precision).into();
        }
        layers.push(layer);
    }
    if n_conv == 0 {
        layers.push(json!({
            "in": prev, "out": l.dim(),
            "w": floats(&get("decoder.out.weight")?, precision),
            "b": floats(&get("decoder.out.bias")?, precision),
        }));
    }
    let pca = pictures::pca(&codes, zd);
    let title = l
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| l.dir.display().to_string());
    let data = json!({
        "title": title,
        "epoch": l.state.epoch,
        "rows": l.state.rows,
        "cols": l.state.cols,
        "channels": l.state.channels,
        "latent": zd,
        "stochastic_layers": cfg.layers(),
        "activation": activation_name(l.model.cfg.activation),
        "hidden": l.model.cfg.hidden,
        // A conv network's layers as [channels, kernel, stride], for the page's subtitle.
        "conv": match l.model.cfg.arch {
            crate::config::Arch::Conv => l.model.cfg.conv.clone(),
            crate::config::Arch::Mlp => Vec::new(),
        },
        "decoder": format!("{:?}", l.model.cfg.decoder).to_lowercase(),
        "kind": format!("{:?}", l.model.cfg.kind).to_lowercase(),
        "precision": match precision { Precision::F16 => "f16", Precision::F32 => "f32" },
        "layers": layers,
        "n": test.n,
        "codes": floats(&codes, precision),
        "labels": if test.labels.len() == test.n { test.labels.clone() } else { Vec::new() },
        "classes": l.state.classes,
        "pca": { "mean": pca.mean, "axes": pca.axes, "frac": pca.frac },
    });
    // JSON inside a <script> element: "</" would end it early, so it is written "<\/".
    let text = serde_json::to_string(&data)?.replace("</", "<\\/");
    Ok(PAGE.replacen(DATA_MARKER, &text, 1))
}

/// `vae explore`: writes the page to `out`.
pub fn explore(l: &Loaded, limit: usize, precision: Precision, out: &Output) -> Result<()> {
    out.check_for("an HTML page")?;
    let html = page(l, limit, precision)?;
    out.write(html.as_bytes())?;
    if let Output::File(p) = out {
        eprintln!(
            "wrote {} ({:.1} MB; open it in a browser, no server needed)",
            p.display(),
            html.len() as f64 / 1e6
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_place_for_its_data() {
        assert_eq!(PAGE.matches(DATA_MARKER).count(), 1);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        // RFC 4648, section 10.
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        // Every 6-bit value once: the alphabet's ends.
        assert_eq!(base64(&[0xff, 0xff, 0xff]), "////");
        assert_eq!(base64(&[0xfb, 0xef, 0xbe]), "++++");
    }

    #[test]
    fn float16_bytes_round_as_ieee_half() {
        // 1.0 = 0x3c00, -2.0 = 0xc000, 65504 = 0x7bff (largest), 2^-24 = 0x0001 (smallest).
        let b = floats(&[1.0, -2.0, 65504.0, 5.960_464_5e-8], Precision::F16);
        assert_eq!(b, base64(&[0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00]));
    }
}
