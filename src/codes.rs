//! `vae encode` and `vae decode`: a trained model's codes out to NumPy and back in.
//!
//! `encode` writes the posterior q(z|x) of every image of a split as a `.npz` archive (the
//! format of `numpy.savez`: a zip of `.npy` members, NEP 1) that `numpy.load` reads:
//! - `mu`, `logvar` (N, Z) float32: the top stochastic layer's posterior mean and log-variance,
//!   the code space that `vae decode`, `sample`, `manifold` and `scatter` work in;
//! - with two stochastic layers also `mu1`, `logvar1` (N, Z1): the bottom layer's q(z1|x);
//! - with planar flows also `z` (N, Z): the mean carried through the flows, the code the
//!   decoder sees for the image (`Vae::code`), which `vae decode` prefers when present;
//! - an autoencoder has `mu` alone (z = mu, no variance);
//! - `y` (N,) uint8 where the data has labels.
//!
//! `decode` reads codes (N, Z) from a `.npy`, or from a `.npz`'s `z` or else `mu`, and decodes
//! them to pixel means as the pictures do (two stochastic layers: through p(z1|z2)'s mean): a PNG
//! grid, or with `-o X.npy` the means as a float32 array (N, H, W) or (N, H, W, C) in [0, 1].

use crate::config::Binarize;
use crate::data::{self, Split};
use crate::eval::{self, Loaded};
use crate::picture::{self, Output};
use crate::pictures;
use anyhow::{bail, Context, Result};
use npyz::{NpyFile, Order, TypeChar};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::io::{Cursor, Read, Seek, Write};
use std::path::Path;

/// Seed of the training images' one binarization when the run binarizes its data: the same
/// bits on every call, as `eval`'s test set has.
const TRAIN_BINARIZE_SEED: u64 = 0x636f_6465; // "code"

/// Which images `vae encode` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Test,
    Train,
}

/// A `.npy` member: its bytes from a header and little-endian payload.
fn npy(descr: &str, shape: &[usize], payload: &[u8]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("{n},"),
        _ => shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64 (NEP 1).
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + payload.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An `.npz`: each (name, .npy bytes) a stored member `name.npy`, as `numpy.savez` writes.
fn npz(members: &[(&str, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(members.iter().map(|m| m.1.len()).sum::<usize>() > u32::MAX as usize / 2);
    for (name, bytes) in members {
        zip.start_file(format!("{name}.npy"), opts)?;
        zip.write_all(bytes)?;
    }
    Ok(zip.finish()?.into_inner())
}

/// The images of the split `which` of `data_dir` (the run's own data when None), as pixels in
/// [0, 1] binarized once where the run binarizes, with their labels (empty when unlabelled).
fn images(l: &Loaded, data_dir: Option<&str>, which: Which) -> Result<(Split, Vec<f32>)> {
    let mut dc = l.cfg.data.clone();
    if let Some(d) = data_dir {
        dc.dir = d.to_string();
        dc.source = None;
    }
    // The run's channels: auto-detection on other images could decide otherwise.
    dc.channels = Some(l.state.channels);
    let what = match data_dir {
        Some(d) => format!("--data {d}"),
        None => format!("key `data.dir` ({})", dc.dir),
    };
    let split = match which {
        Which::Test => data::load_test(&dc, l.state.channels, 0),
        Which::Train => data::load(&dc, 0, 0).map(|d| d.train),
    }
    .with_context(|| what.clone())?;
    if split.dim() != l.dim() {
        bail!(
            "{what}: {} images, but the model was trained on {}",
            split.describe_size(),
            data::describe_size(l.state.rows, l.state.cols, l.state.channels)
        );
    }
    // The test images as `eval` and the pictures see them (binarized once by eval's seed where
    // the run binarizes); the training images binarized once by a seed of their own.
    let px = match which {
        Which::Test => eval::test_pixels(&l.cfg, &split),
        Which::Train => {
            let mut px = split.pixels_f32();
            if l.cfg.data.binarize != Binarize::None {
                data::binarize_in_place(&mut px, &mut StdRng::seed_from_u64(TRAIN_BINARIZE_SEED));
            }
            px
        }
    };
    Ok((split, px))
}

/// Runs `f` over `x` (n, D) in chunks of images, collecting each of its two outputs (chunk,
/// width) for the whole of `x`: a posterior's mean and log-variance from one pass.
fn by_chunks(
    l: &Loaded,
    x: &[f32],
    f: impl Fn(&candle_core::Tensor) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const CHUNK: usize = 1000;
    let d = l.dim();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for c in x.chunks(CHUNK * d) {
        let t = candle_core::Tensor::from_slice(c, (c.len() / d, d), &l.dev)?;
        let (u, v) = f(&t)?;
        a.extend(u.flatten_all()?.to_vec1::<f32>()?);
        b.extend(v.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((a, b))
}

/// `vae encode`: every image's posterior as arrays in a `.npz` (the module's header lists them).
pub fn encode(l: &Loaded, data_dir: Option<&str>, which: Which, out: &Output) -> Result<()> {
    out.check_for("a .npz archive")?;
    let (split, x) = images(l, data_dir, which)?;
    let n = split.n;
    let m = &l.model;
    let top = m.cfg.top_latent();
    let mut members = Vec::new();
    let (mu, lv) = by_chunks(l, &x, |t| m.encode_top(t))?;
    members.push(("mu", npy("<f4", &[n, top], &f32_bytes(&mu))));
    if !m.is_ae() {
        members.push(("logvar", npy("<f4", &[n, top], &f32_bytes(&lv))));
    }
    if !m.cfg.upper.is_empty() {
        let z1 = m.cfg.latent;
        let (mu1, lv1) = by_chunks(l, &x, |t| m.encode(t))?;
        members.push(("mu1", npy("<f4", &[n, z1], &f32_bytes(&mu1))));
        members.push(("logvar1", npy("<f4", &[n, z1], &f32_bytes(&lv1))));
    }
    if m.cfg.flows > 0 {
        let z = pictures::encode_means(l, &x)?;
        members.push(("z", npy("<f4", &[n, top], &f32_bytes(&z))));
    }
    if split.labels.len() == n {
        members.push(("y", npy("|u1", &[n], &split.labels)));
    }
    let names: Vec<&str> = members.iter().map(|m| m.0).collect();
    out.write(&npz(&members)?)?;
    if let Output::File(p) = out {
        eprintln!(
            "wrote {} ({n} {} images: {})",
            p.display(),
            match which {
                Which::Test => "test",
                Which::Train => "training",
            },
            names.join(", ")
        );
    }
    Ok(())
}

/// Reads a float32/float64 array of codes (N, Z), or one code (Z,), from a `.npy` stream.
fn read_codes<R: Read>(r: R, what: &str, z: usize) -> Result<(usize, Vec<f32>)> {
    let f = NpyFile::new(r).with_context(|| format!("{what}: not a NumPy .npy array"))?;
    if f.order() == Order::Fortran {
        bail!("{what}: stored in Fortran order; save np.ascontiguousarray(codes) instead");
    }
    let shape: Vec<usize> = f.shape().iter().map(|&v| v as usize).collect();
    let n = match shape[..] {
        [zz] if zz == z => 1,
        [n, zz] if zz == z && n > 0 => n,
        _ => bail!(
            "{what}: shape {shape:?}; the run's codes are (N, {z}) (its top latent layer has {z} \
             dimensions)"
        ),
    };
    let float = match f.dtype() {
        npyz::DType::Plain(t) => match (t.type_char(), t.size_field()) {
            (TypeChar::Float, 4) => Some(4),
            (TypeChar::Float, 8) => Some(8),
            _ => None,
        },
        _ => None,
    };
    let v: Vec<f32> = match float {
        Some(4) => f.into_vec::<f32>()?,
        Some(8) => f.into_vec::<f64>()?.into_iter().map(|x| x as f32).collect(),
        _ => bail!(
            "{}: dtype {}; codes must be float32 or float64 (codes.astype(np.float32))",
            what,
            f.dtype().descr().trim_matches('\'')
        ),
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "{what}: code {} has a non-finite value ({}) at dimension {}",
            i / z,
            v[i],
            i % z
        );
    }
    Ok((n, v))
}

/// The codes in `path`: a `.npy`, or a `.npz`'s `z` member, else its `mu`.
fn load_codes(path: &Path, z: usize) -> Result<(usize, Vec<f32>)> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("{what}: cannot open"))?;
    let is_zip = {
        let mut magic = [0u8; 4];
        let mut f = &file;
        let got = f.read(&mut magic).unwrap_or(0);
        (&file).rewind()?;
        got == 4 && &magic == b"PK\x03\x04"
    };
    if !is_zip {
        return read_codes(std::io::BufReader::new(file), &what, z);
    }
    let mut archive =
        zip::ZipArchive::new(file).with_context(|| format!("{what}: not a readable .npz"))?;
    let names: Vec<String> = archive.file_names().map(String::from).collect();
    let pick = ["z.npy", "mu.npy"]
        .iter()
        .find(|n| names.iter().any(|m| m == *n))
        .with_context(|| {
            format!(
                "{what}: no `z` or `mu` array (it holds {}); save the codes as np.savez(f, mu=codes) \
                 or as a .npy",
                names.join(", ")
            )
        })?;
    let member = archive.by_name(pick)?;
    let label = format!("{what}:{}", pick.trim_end_matches(".npy"));
    read_codes(std::io::BufReader::new(member), &label, z)
}

/// Whether `out` names a `.npy` file (the pixel means as an array) rather than a PNG.
pub fn wants_array(out: &Output) -> bool {
    matches!(out, Output::File(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")))
}

/// `vae decode`: the codes in `path` decoded to pixel means, as a grid (`cols` wide, each image
/// `scale` times) or, for `-o X.npy`, as an array.
pub fn decode(
    l: &Loaded,
    path: &Path,
    out: &Output,
    cols: Option<usize>,
    scale: usize,
) -> Result<()> {
    let array = wants_array(out);
    out.check_for(if array { "a .npy array" } else { "a PNG" })?;
    let z = l.model.cfg.top_latent();
    let (n, codes) = load_codes(path, z)?;
    if !array && n > pictures::MAX_CELLS {
        bail!(
            "{}: {n} codes, more than a grid holds ({}); decode them to an array with -o x.npy",
            path.display(),
            pictures::MAX_CELLS
        );
    }
    let px = pictures::decode_means(l, &codes)?;
    let (h, w, c) = l.cell();
    if array {
        let shape: Vec<usize> = if c == 1 {
            vec![n, h, w]
        } else {
            vec![n, h, w, c]
        };
        out.write(&npy("<f4", &shape, &f32_bytes(&px)))?;
    } else {
        let cols = cols.unwrap_or_else(|| picture::square_cols(n)).clamp(1, n);
        let g = picture::grid(&px, n, l.cell(), cols, scale);
        out.write(&g.png()?)?;
    }
    if let Output::File(p) = out {
        eprintln!("wrote {} ({n} codes decoded)", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_padded_to_64_bytes_and_reads_back() {
        let v = [1.5f32, -2.0, 0.25, 3.0, 4.0, 5.0];
        let bytes = npy("<f4", &[2, 3], &f32_bytes(&v));
        // Magic, version 1.0, then the header length: the data starts on a 64-byte boundary.
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        assert_eq!(bytes.len(), 10 + hl + 24);
        let text = std::str::from_utf8(&bytes[10..10 + hl]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(text.ends_with('\n'));
        let (n, back) = read_codes(Cursor::new(bytes), "t.npy", 3).unwrap();
        assert_eq!((n, back), (2, v.to_vec()));
        // A 1-D shape is written with numpy's trailing comma.
        let one = npy("|u1", &[4], &[1, 2, 3, 4]);
        assert!(std::str::from_utf8(&one[10..70])
            .unwrap()
            .contains("'shape': (4,)"));
    }

    #[test]
    fn codes_of_the_wrong_shape_type_or_value_are_refused_by_name() {
        let e = |bytes: Vec<u8>| {
            read_codes(Cursor::new(bytes), "c.npy", 2)
                .unwrap_err()
                .to_string()
        };
        let bad_shape = e(npy("<f4", &[2, 3], &f32_bytes(&[0.0; 6])));
        assert!(
            bad_shape.contains("c.npy: shape [2, 3]; the run's codes are (N, 2)"),
            "{bad_shape}"
        );
        let bad_type = e(npy("<i4", &[1, 2], &[0; 8]));
        assert!(
            bad_type.contains("dtype <i4; codes must be float32 or float64"),
            "{bad_type}"
        );
        let nan = e(npy("<f4", &[2, 2], &f32_bytes(&[0.0, 1.0, 2.0, f32::NAN])));
        assert!(
            nan.contains("code 1 has a non-finite value (NaN) at dimension 1"),
            "{nan}"
        );
        // float64 codes are taken, and a single code (Z,) is one image.
        let f64s: Vec<u8> = [0.5f64, -1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let (n, v) = read_codes(Cursor::new(npy("<f8", &[2], &f64s)), "c.npy", 2).unwrap();
        assert_eq!((n, v), (1, vec![0.5, -1.0]));
    }

    #[test]
    fn npz_members_read_back_through_zip() {
        let a = npy("<f4", &[1, 2], &f32_bytes(&[1.0, 2.0]));
        let bytes = npz(&[("mu", a.clone()), ("y", npy("|u1", &[1], &[7]))]).unwrap();
        let mut z = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let names: Vec<&str> = z.file_names().collect();
        assert_eq!(names.len(), 2);
        let mut got = Vec::new();
        z.by_name("mu.npy").unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, a);
    }
}
