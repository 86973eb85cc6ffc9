//! The picture commands: prior samples, the learned manifold (Kingma & Welling 2013, Figure 4),
//! reconstructions, latent interpolation, the latent scatter, and the pictures `vae train`
//! writes each epoch (a sample grid and a reconstruction grid, as pytorch/examples does, and the
//! training curves).

use crate::eval::{self, Loaded};
use crate::picture::{self, Output};
use crate::plot;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// The training curves' file in a run directory.
pub const CURVES_FILE: &str = "curves.png";

/// The most cells one grid may hold (a 128 x 128 grid of 28 x 28 digits is 3.7k pixels square).
pub const MAX_CELLS: usize = 16_384;
/// Rows decoded at once, so memory stays bounded whatever the count.
const CHUNK: usize = 1024;

/// Options shared by the picture commands.
pub struct Common {
    pub output: Output,
    pub scale: usize,
}

fn check_scale(scale: usize) -> Result<()> {
    if !(1..=16).contains(&scale) {
        bail!("--scale {scale}: use 1 to 16");
    }
    Ok(())
}

/// Decoder pixel means for `z` (n, Z) on the host, in chunks.
pub fn decode_means(l: &Loaded, z: &[f32]) -> Result<Vec<f32>> {
    let zd = l.model.cfg.top_latent();
    let mut out = Vec::with_capacity(z.len() / zd * l.dim());
    for c in z.chunks(CHUNK * zd) {
        let t = Tensor::from_slice(c, (c.len() / zd, zd), &l.dev)?;
        let m = l.model.mean(&l.model.decode_top(&t)?)?;
        out.extend(m.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The dimensions of the noise below the top layer that ancestral sampling draws: Z1 with two
/// stochastic layers, else none.
pub fn lower_noise(l: &Loaded) -> usize {
    if l.model.cfg.upper.is_empty() {
        0
    } else {
        l.model.cfg.latent
    }
}

/// Pixel means of ancestral samples below top-layer codes `z` (n, Z_top): with two layers z1
/// from p(z1|z2) for the noise `e1` (n, Z1); with one, the decoder's means at z.
pub fn decode_ancestral(l: &Loaded, z: &[f32], e1: &[f32]) -> Result<Vec<f32>> {
    let (zd, ld) = (l.model.cfg.top_latent(), lower_noise(l));
    if ld == 0 {
        return decode_means(l, z);
    }
    let mut out = Vec::with_capacity(z.len() / zd * l.dim());
    for (c, e) in z.chunks(CHUNK * zd).zip(e1.chunks(CHUNK * ld)) {
        let n = c.len() / zd;
        let t = Tensor::from_slice(c, (n, zd), &l.dev)?;
        let et = Tensor::from_slice(e, (n, ld), &l.dev)?;
        let m = l.model.mean(&l.model.decode_ancestral(&t, &et)?)?;
        out.extend(m.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The codes of `x` (n, D) at the posterior's centre (n, Z) on the host, in chunks: the means
/// mu, carried through the flows when the model has them (`Vae::code`).
pub fn encode_means(l: &Loaded, x: &[f32]) -> Result<Vec<f32>> {
    let d = l.dim();
    let mut out = Vec::with_capacity(x.len() / d * l.model.cfg.top_latent());
    for c in x.chunks(CHUNK * d) {
        let t = Tensor::from_slice(c, (c.len() / d, d), &l.dev)?;
        out.extend(l.model.code(&t)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

fn write_grid(
    out: &Output,
    cells: &[f32],
    n: usize,
    l: &Loaded,
    cols: usize,
    scale: usize,
) -> Result<(u32, u32)> {
    let g = picture::grid(cells, n, l.cell(), cols, scale);
    out.write(&g.png()?)?;
    Ok((g.width, g.height))
}

fn said(out: &Output, what: &str, wh: (u32, u32)) {
    if let Output::File(p) = out {
        eprintln!("wrote {} ({what}, {}x{} pixels)", p.display(), wh.0, wh.1);
    }
}

/// `vae sample`: `n` draws z ~ N(0, temperature^2 I) (the run's prior), decoded to pixel means
/// (or, with `draw`, to a sample of p(x|z)), as a grid as square as `n` allows. Two stochastic
/// layers are sampled ancestrally: z2 from the prior, z1 from p(z1|z2) (its noise scaled by the
/// temperature too), then the decoder.
pub fn sample(
    l: &Loaded,
    n: usize,
    seed: u64,
    temperature: f64,
    draw: bool,
    c: &Common,
) -> Result<()> {
    if n == 0 || n > MAX_CELLS {
        bail!("-n {n}: give 1 to {MAX_CELLS} images");
    }
    if !(temperature.is_finite() && temperature >= 0.0) {
        bail!("--temperature {temperature}: give a finite number >= 0 (1 samples the prior)");
    }
    check_scale(c.scale)?;
    c.output.check()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let zd = l.model.cfg.top_latent();
    let eps: Vec<f32> = (0..n * zd)
        .map(|_| {
            let e: f32 = StandardNormal.sample(&mut rng);
            e * temperature as f32
        })
        .collect::<Vec<f32>>();
    // A mixture prior: a uniform component per image, then its Gaussian scaled by temperature.
    let k = l.model.prior_components();
    let pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
    let z = prior_z(l, &eps, &pick)?;
    let e1: Vec<f32> = (0..n * lower_noise(l))
        .map(|_| {
            let e: f32 = StandardNormal.sample(&mut rng);
            e * temperature as f32
        })
        .collect();
    let mut px = decode_ancestral(l, &z, &e1)?;
    if draw {
        match l.model.decoder_logvar()? {
            None => px
                .iter_mut()
                .for_each(|p| *p = if rng.random::<f32>() < *p { 1.0 } else { 0.0 }),
            Some(lv) => {
                let lv = lv.flatten_all()?.to_vec1::<f32>()?;
                let d = l.dim();
                for (k, p) in px.iter_mut().enumerate() {
                    let s = (0.5 * lv[if lv.len() == 1 { 0 } else { k % d }]).exp();
                    let e: f32 = StandardNormal.sample(&mut rng);
                    *p = (*p + s * e).clamp(0.0, 1.0);
                }
            }
        }
    }
    let wh = write_grid(&c.output, &px, n, l, picture::square_cols(n), c.scale)?;
    said(&c.output, &format!("{n} samples"), wh);
    Ok(())
}

/// The latent dimensions ordered by mean KL(q(z_j|x) || N(0,1)) over `x`, largest first:
/// (dimension, nats).
pub fn kl_per_dim(l: &Loaded, x: &[f32]) -> Result<Vec<(usize, f64)>> {
    let d = l.dim();
    let zd = l.model.cfg.top_latent();
    let mut kl = vec![0f64; zd];
    for c in x.chunks(CHUNK * d) {
        let t = Tensor::from_slice(c, (c.len() / d, d), &l.dev)?;
        let (mu, lv) = l.model.encode_top(&t)?;
        // 1/2 (mu^2 + e^lv - lv - 1) per (image, dimension), summed over images: (Z,).
        let k = (((mu.sqr()? + lv.exp()?)? - &lv)? - 1.0)?
            .sum(0)?
            .to_dtype(DType::F64)?;
        for (a, b) in kl.iter_mut().zip(k.to_vec1::<f64>()?) {
            *a += 0.5 * b;
        }
    }
    let n = (x.len() / d) as f64;
    let mut v: Vec<(usize, f64)> = kl.into_iter().map(|k| k / n).enumerate().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(v)
}

/// `vae manifold`: with `dim` 2, an N x N grid of z over the prior's quantiles in two latent
/// dimensions (the others at 0), decoded; with `dim` 1, one row per latent dimension.
pub fn manifold(
    l: &Loaded,
    dim: usize,
    steps: usize,
    axes: Option<(usize, usize)>,
    c: &Common,
) -> Result<()> {
    let zd = l.model.cfg.top_latent();
    if dim != 1 && dim != 2 {
        bail!("--dim {dim}: use 2 (a grid over two latent dimensions) or 1 (each dimension traversed)");
    }
    if !(2..=100).contains(&steps) {
        bail!("--steps {steps}: use 2 to 100");
    }
    check_scale(c.scale)?;
    let (centre, q) = prior_grid(l, steps)?;
    let (z, n, cols) = if dim == 1 {
        if axes.is_some() {
            bail!("--axes applies to --dim 2; --dim 1 draws every latent dimension");
        }
        c.output.check()?;
        eprintln!(
            "manifold: one row per latent dimension (0 to {}), others held at the prior's centre",
            zd - 1
        );
        let mut z: Vec<f32> = (0..zd * steps).flat_map(|_| centre.clone()).collect();
        for j in 0..zd {
            for (s, &v) in q[j].iter().enumerate() {
                z[(j * steps + s) * zd + j] = v;
            }
        }
        (z, zd * steps, steps)
    } else {
        if zd < 2 {
            bail!("the run's latent space is 1-D; use --dim 1");
        }
        let (a, b) = match axes {
            Some((a, b)) => {
                if a >= zd || b >= zd || a == b {
                    bail!("--axes {a},{b}: give two different dimensions below {zd}");
                }
                c.output.check()?;
                eprintln!(
                    "manifold: latent dimensions {a} (across) and {b} (down), others held at the prior's centre"
                );
                (a, b)
            }
            None if zd == 2 => {
                c.output.check()?;
                eprintln!("manifold: the whole 2-D latent space");
                (0, 1)
            }
            None => {
                c.output.check()?;
                let test = l.test_split(0)?;
                let x = test.pixels_f32();
                let kl = kl_per_dim(l, &x)?;
                let ((a, ka), (b, kb)) = (kl[0], kl[1]);
                eprintln!(
                    "manifold: latent dimensions {a} (across) and {b} (down), the two most informative \
                     (mean KL {ka:.2} and {kb:.2} nats over the test set); the other {} held at the prior's centre",
                    zd - 2
                );
                (a, b)
            }
        };
        let mut z: Vec<f32> = (0..steps * steps).flat_map(|_| centre.clone()).collect();
        for r in 0..steps {
            for col in 0..steps {
                let k = (r * steps + col) * zd;
                z[k + a] = q[a][col];
                // Row 0 at the top holds the largest value, so "up" is up.
                z[k + b] = q[b][steps - 1 - r];
            }
        }
        (z, steps * steps, steps)
    };
    let px = decode_means(l, &z)?;
    let wh = write_grid(&c.output, &px, n, l, cols, c.scale)?;
    said(&c.output, &format!("manifold, {dim}-D, {steps} steps"), wh);
    Ok(())
}

/// The prior's centre (Z) and, per latent dimension, `steps` quantiles (i + 1/2) / steps of its
/// marginal: N(0, 1)'s at 0 for the standard normal; for a mixture, its mean and its marginals'
/// quantiles estimated from 100,000 draws of a fixed seed.
fn prior_grid(l: &Loaded, steps: usize) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let zd = l.model.cfg.top_latent();
    let k = l.model.prior_components();
    if k == 1 && l.model.cfg.prior == crate::config::Prior::Normal {
        return Ok((vec![0.0; zd], vec![picture::normal_quantiles(steps); zd]));
    }
    let n = 100_000;
    let z = prior_draws(l, n, 0x6d61_6e69)?; // "mani"
    let mut centre = vec![0f32; zd];
    let mut q = Vec::with_capacity(zd);
    for j in 0..zd {
        let mut col: Vec<f32> = (0..n).map(|i| z[i * zd + j]).collect();
        centre[j] = col.iter().map(|v| *v as f64).sum::<f64>() as f32 / n as f32;
        col.sort_by(|a, b| a.total_cmp(b));
        q.push(
            (0..steps)
                .map(|s| col[((s as f64 + 0.5) / steps as f64 * n as f64) as usize])
                .collect(),
        );
    }
    Ok((centre, q))
}

/// `n` draws of z from the run's prior (n * Z on the host), from a stream of `seed`: a uniform
/// component, then its Gaussian.
pub fn prior_draws(l: &Loaded, n: usize, seed: u64) -> Result<Vec<f32>> {
    let zd = l.model.cfg.top_latent();
    let mut rng = StdRng::seed_from_u64(seed);
    let eps: Vec<f32> = (0..n * zd)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let k = l.model.prior_components();
    let pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
    prior_z(l, &eps, &pick)
}

/// z = the prior's transform of standard-normal `eps` (n * Z) with components `pick`.
pub fn prior_z(l: &Loaded, eps: &[f32], pick: &[usize]) -> Result<Vec<f32>> {
    let zd = l.model.cfg.top_latent();
    let t = Tensor::from_slice(eps, (eps.len() / zd, zd), &l.dev)?;
    Ok(l.model.prior_z(&t, pick)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Parses "3,17,42".
pub fn parse_indices(s: &str) -> Result<Vec<usize>> {
    if s.trim().is_empty() {
        bail!("--index: empty list; give image numbers, e.g. 3,17,42");
    }
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .with_context(|| format!("--index {s}: {t:?} is not an image number"))
        })
        .collect()
}

fn check_indices(idx: &[usize], n: usize) -> Result<()> {
    if let Some(&i) = idx.iter().find(|&&i| i >= n) {
        bail!("image {i}: the test set has {n} images (0 to {})", n - 1);
    }
    Ok(())
}

/// `vae reconstruct`: test images above their reconstructions (decoded posterior means), up to
/// `cols` to a row.
pub fn reconstruct(l: &Loaded, idx: &[usize], cols: usize, c: &Common) -> Result<()> {
    if idx.is_empty() || idx.len() > MAX_CELLS / 2 {
        bail!("-n / --index: give 1 to {} images", MAX_CELLS / 2);
    }
    check_scale(c.scale)?;
    let test = l.test_split(0)?;
    check_indices(idx, test.n)?;
    c.output.check()?;
    let px = eval::test_pixels(&l.cfg, &test);
    let png = reconstruction_png(l, &px, idx, cols, c.scale)?;
    c.output.write(&png)?;
    if let Output::File(p) = &c.output {
        eprintln!(
            "wrote {} ({} test images over their reconstructions)",
            p.display(),
            idx.len()
        );
    }
    Ok(())
}

/// Rows of originals, each above the row of their reconstructions; PNG bytes.
pub fn reconstruction_png(
    l: &Loaded,
    px: &[f32],
    idx: &[usize],
    cols: usize,
    scale: usize,
) -> Result<Vec<u8>> {
    let d = l.dim();
    let mut x = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        x.extend_from_slice(&px[i * d..(i + 1) * d]);
    }
    let rec = reconstruct_means(l, &x)?;
    let cols = cols.clamp(1, idx.len());
    let rows = idx.len().div_ceil(cols);
    // One grid per pair of rows (originals over their reconstructions), a white gap between
    // pairs so that each reconstruction is read against the image above it, not the one below.
    let mut pairs = Vec::with_capacity(rows);
    for r in 0..rows {
        // NaN cells (a last pair's empty places) are left as separator colour.
        let mut cells = vec![f32::NAN; 2 * cols * d];
        for k in r * cols..((r + 1) * cols).min(idx.len()) {
            let col = k % cols;
            cells[col * d..(col + 1) * d].copy_from_slice(&x[k * d..(k + 1) * d]);
            cells[(cols + col) * d..(cols + col + 1) * d].copy_from_slice(&rec[k * d..(k + 1) * d]);
        }
        pairs.push(picture::grid(&cells, 2 * cols, l.cell(), cols, scale));
    }
    let s = scale.max(1);
    let pic = picture::stack(&pairs, PAIR_GAP * s);
    let cell_h = l.cell().0 * s;
    let mut labels = Vec::with_capacity(2 * rows);
    for r in 0..rows {
        let top = r * (2 * (cell_h + s) + s + PAIR_GAP * s) + s + cell_h / 2;
        labels.push((top as u32, "original"));
        labels.push(((top + cell_h + s) as u32, "reconstruction"));
    }
    plot::label_rows(&pic, &labels, label_size(cell_h))?.png()
}

/// White pixels (times the scale) between one pair of reconstruction rows and the next.
pub const PAIR_GAP: usize = 6;

/// Row labels' text height for cells `cell_h` pixels high: about 40% of the cell, 11 px at least.
fn label_size(cell_h: usize) -> u32 {
    ((cell_h as f64 * 0.4).round() as u32).max(11)
}

/// Reconstructions' pixel means of `x` (n, D): the decoder at every layer's posterior mean
/// (`Vae::reconstruct`), in chunks.
pub fn reconstruct_means(l: &Loaded, x: &[f32]) -> Result<Vec<f32>> {
    let d = l.dim();
    let mut out = Vec::with_capacity(x.len());
    for c in x.chunks(CHUNK * d) {
        let t = Tensor::from_slice(c, (c.len() / d, d), &l.dev)?;
        let m = l.model.mean(&l.model.reconstruct(&t)?)?;
        out.extend(m.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// `vae interpolate`: the decoded straight line between the posterior means of two test images
/// (and, with `slerp`, the spherical path below it), the two images at the ends of each row.
pub fn interpolate(
    l: &Loaded,
    from: usize,
    to: usize,
    steps: usize,
    slerp: bool,
    c: &Common,
) -> Result<()> {
    if !(2..=100).contains(&steps) {
        bail!("--steps {steps}: use 2 to 100");
    }
    check_scale(c.scale)?;
    let test = l.test_split(0)?;
    check_indices(&[from, to], test.n)?;
    c.output.check()?;
    let px = eval::test_pixels(&l.cfg, &test);
    let d = l.dim();
    let zd = l.model.cfg.top_latent();
    let mut x = px[from * d..(from + 1) * d].to_vec();
    x.extend_from_slice(&px[to * d..(to + 1) * d]);
    let mu = encode_means(l, &x)?;
    let (a, b) = (&mu[..zd], &mu[zd..]);
    let ts: Vec<f32> = (0..steps).map(|i| i as f32 / (steps - 1) as f32).collect();
    let mut z = Vec::new();
    for &t in &ts {
        z.extend(a.iter().zip(b).map(|(u, v)| (1.0 - t) * u + t * v));
    }
    let mut paths = 1;
    if slerp {
        paths = 2;
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = a.iter().zip(b).map(|(u, v)| u * v).sum::<f32>() / (norm(a) * norm(b)).max(1e-12);
        let omega = cos.clamp(-1.0, 1.0).acos();
        for &t in &ts {
            let (wa, wb) = if omega.sin().abs() < 1e-6 {
                (1.0 - t, t)
            } else {
                (
                    ((1.0 - t) * omega).sin() / omega.sin(),
                    (t * omega).sin() / omega.sin(),
                )
            };
            z.extend(a.iter().zip(b).map(|(u, v)| wa * u + wb * v));
        }
    }
    let dec = decode_means(l, &z)?;
    let cols = steps + 2;
    let mut cells = Vec::with_capacity(paths * cols * d);
    for p in 0..paths {
        cells.extend_from_slice(&x[..d]);
        cells.extend_from_slice(&dec[p * steps * d..(p + 1) * steps * d]);
        cells.extend_from_slice(&x[d..]);
    }
    let g = picture::grid(&cells, paths * cols, l.cell(), cols, c.scale);
    let s = c.scale.max(1);
    let cell_h = l.cell().0 * s;
    let names = ["linear", "slerp"];
    let labels: Vec<(u32, &str)> = (0..paths)
        .map(|p| ((s + p * (cell_h + s) + cell_h / 2) as u32, names[p]))
        .collect();
    let g = plot::label_rows(&g, &labels, label_size(cell_h))?;
    c.output.write(&g.png()?)?;
    let wh = (g.width, g.height);
    said(
        &c.output,
        &format!(
            "test images {from} and {to} at the ends, {}",
            if slerp {
                "linear above spherical"
            } else {
                "linear path"
            }
        ),
        wh,
    );
    Ok(())
}

/// Principal components of `n` rows of `k` values: the mean, the axes (unit vectors, largest
/// variance first) and each axis's share of the total variance. The covariance's eigenvectors come
/// from cyclic Jacobi rotations (Golub & Van Loan, Matrix Computations, section 8.5). That is
/// exact to rounding, and k (the latent size) is small.
pub struct Pca {
    pub mean: Vec<f64>,
    pub axes: Vec<Vec<f64>>,
    pub frac: Vec<f64>,
}

pub fn pca(v: &[f32], k: usize) -> Pca {
    let n = (v.len() / k).max(1);
    let mut mean = vec![0f64; k];
    for r in v.chunks_exact(k) {
        for (m, x) in mean.iter_mut().zip(r) {
            *m += *x as f64 / n as f64;
        }
    }
    // a: the covariance (k, k), row-major; e: the accumulated rotations, columns the eigenvectors.
    let mut a = vec![0f64; k * k];
    for r in v.chunks_exact(k) {
        for i in 0..k {
            let d = r[i] as f64 - mean[i];
            for j in 0..k {
                a[i * k + j] += d * (r[j] as f64 - mean[j]) / n as f64;
            }
        }
    }
    let mut e = vec![0f64; k * k];
    for i in 0..k {
        e[i * k + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum();
        let diag: f64 = (0..k).map(|i| a[i * k + i] * a[i * k + i]).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                // The rotation that zeroes a[p][q]: t = tan(theta), the smaller root.
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for i in 0..k {
                    let (aip, aiq) = (a[i * k + p], a[i * k + q]);
                    a[i * k + p] = c * aip - s * aiq;
                    a[i * k + q] = s * aip + c * aiq;
                }
                for j in 0..k {
                    let (apj, aqj) = (a[p * k + j], a[q * k + j]);
                    a[p * k + j] = c * apj - s * aqj;
                    a[q * k + j] = s * apj + c * aqj;
                }
                for i in 0..k {
                    let (eip, eiq) = (e[i * k + p], e[i * k + q]);
                    e[i * k + p] = c * eip - s * eiq;
                    e[i * k + q] = s * eip + c * eiq;
                }
            }
        }
    }
    let total: f64 = (0..k)
        .map(|i| a[i * k + i].max(0.0))
        .sum::<f64>()
        .max(1e-300);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| a[y * k + y].total_cmp(&a[x * k + x]));
    Pca {
        mean,
        axes: order
            .iter()
            .map(|&j| (0..k).map(|i| e[i * k + j]).collect())
            .collect(),
        frac: order
            .iter()
            .map(|&j| a[j * k + j].max(0.0) / total)
            .collect(),
    }
}

/// `vae scatter`: the test set's posterior means, one dot per image coloured by class; 2-D
/// latents as they are, more dimensions projected onto their first two principal components.
pub fn scatter(l: &Loaded, limit: usize, c: &Common) -> Result<()> {
    let zd = l.model.cfg.top_latent();
    if zd < 2 {
        bail!("the run's latent space is 1-D; the scatter needs at least 2 dimensions");
    }
    let test = l.test_split(limit)?;
    c.output.check()?;
    let px = eval::test_pixels(&l.cfg, &test);
    let mu = encode_means(l, &px)?;
    let what = if l.model.is_ae() {
        "autoencoder codes"
    } else {
        "posterior means"
    };
    let (xy, title, axes): (Vec<(f32, f32)>, String, (String, String)) = if zd == 2 {
        (
            mu.chunks_exact(2).map(|p| (p[0], p[1])).collect(),
            format!("{what} of {} test images (2-D latent space)", test.n),
            ("z[0]".into(), "z[1]".into()),
        )
    } else {
        let Pca { axes: ax, frac, .. } = pca(&mu, zd);
        let proj =
            |r: &[f32], a: &[f64]| r.iter().zip(a).map(|(x, w)| *x as f64 * w).sum::<f64>() as f32;
        (
            mu.chunks_exact(zd)
                .map(|r| (proj(r, &ax[0]), proj(r, &ax[1])))
                .collect(),
            format!(
                "{what} of {} test images, {zd}-D projected by PCA ({:.0}% of variance)",
                test.n,
                100.0 * (frac[0] + frac[1])
            ),
            (
                format!("PC 1 ({:.0}%)", 100.0 * frac[0]),
                format!("PC 2 ({:.0}%)", 100.0 * frac[1]),
            ),
        )
    };
    let png = plot::scatter(
        &xy,
        &test.labels,
        &l.state.classes,
        &title,
        (&axes.0, &axes.1),
    )?;
    c.output.write(&png)?;
    if let Output::File(p) = &c.output {
        eprintln!("wrote {} ({title})", p.display());
    }
    Ok(())
}

/// The pictures `vae train` leaves each epoch: `pictures/sample-EEE.png` (64 samples from one
/// fixed set of z, so epochs compare), `pictures/reconstruction-EEE.png` (the first 8 test images
/// over their reconstructions), and `curves.png`.
pub fn epoch_pictures(
    l: &Loaded,
    run_dir: &Path,
    epoch: usize,
    z: &[f32],
    test_px: &[f32],
    metrics_csv: &str,
) -> Result<()> {
    let dir = run_dir.join("pictures");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let zd = l.model.cfg.top_latent();
    let n = z.len() / (zd + lower_noise(l));
    // The fixed standard-normal draws through the run's prior (component i mod K for image i),
    // then (two layers) the fixed noise of z1 for ancestral samples.
    let (z, e1) = z.split_at(n * zd);
    let z = prior_z(l, z, &(0..n).collect::<Vec<_>>())?;
    let px = decode_ancestral(l, &z, e1)?;
    let g = picture::grid(&px, n, l.cell(), picture::square_cols(n), 1);
    crate::run::write_atomic(&dir.join(format!("sample-{epoch:03}.png")), &g.png()?)?;
    let k = (test_px.len() / l.dim()).min(8);
    let idx: Vec<usize> = (0..k).collect();
    let png = reconstruction_png(l, test_px, &idx, 8, 1)?;
    crate::run::write_atomic(&dir.join(format!("reconstruction-{epoch:03}.png")), &png)?;
    let png = plot::curves(&plot::read_metrics(metrics_csv), &curves_title(run_dir))?;
    crate::run::write_atomic(&run_dir.join(CURVES_FILE), &png)
}

/// The curves' title: the run directory's own name, not the path it was given (an absolute
/// path would put the machine's layout into every shipped picture).
fn curves_title(run_dir: &Path) -> String {
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run_dir.display().to_string());
    format!("{name}: -ELBO per example")
}

/// `vae curves`: the training curves from the run's metrics.csv.
pub fn curves(run_dir: &Path, c: &Common) -> Result<()> {
    let path = run_dir.join(crate::run::METRICS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let points = plot::read_metrics(&text);
    if points.is_empty() {
        bail!("{}: no epochs recorded yet", path.display());
    }
    c.output.check()?;
    c.output
        .write(&plot::curves(&points, &curves_title(run_dir))?)?;
    if let Output::File(p) = &c.output {
        eprintln!("wrote {} ({} epochs)", p.display(), points.len() - 1);
    }
    Ok(())
}

/// The fixed z of the per-epoch sample grids, from the run's seed on a stream of its own.
pub fn fixed_z(seed: u64, n: usize, latent: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7361_6d70); // "samp"
    (0..n * latent)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_title_names_the_run_not_its_path() {
        assert_eq!(
            curves_title(Path::new("/work/long-runs/planar-flows10")),
            "planar-flows10: -ELBO per example"
        );
        assert_eq!(curves_title(Path::new("runs/a/")), "a: -ELBO per example");
        assert_eq!(curves_title(Path::new("..")), "..: -ELBO per example");
    }

    #[test]
    fn pca_finds_the_axes_of_known_data() {
        // Points t * (1, 1, 0) / sqrt 2 + u * (0, 0, 1) + v * (1, -1, 0) / sqrt 2 with spreads
        // 3 > 2 > 1 (t, u, v in {-s, s}): the axes in that order, variance shares 9:4:1 of 14.
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let mut v = Vec::new();
        for a in [-3.0f32, 3.0] {
            for b in [-2.0f32, 2.0] {
                for c in [-1.0f32, 1.0] {
                    v.extend_from_slice(&[a * r + c * r + 5.0, a * r - c * r, b]);
                }
            }
        }
        let p = pca(&v, 3);
        assert!((p.mean[0] - 5.0).abs() < 1e-9 && p.mean[1].abs() < 1e-9);
        let want = [[r, r, 0.0], [0.0, 0.0, 1.0], [r, -r, 0.0]];
        for (axis, w) in p.axes.iter().zip(want) {
            let dot: f64 = axis.iter().zip(w).map(|(a, b)| a * b as f64).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-6, "{axis:?} vs {w:?}");
        }
        for (f, w) in p.frac.iter().zip([9.0, 4.0, 1.0]) {
            assert!((f - w / 14.0).abs() < 1e-6, "{:?}", p.frac); // f32 inputs
        }
    }
}
