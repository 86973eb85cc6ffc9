//! Image grids as PNG: cells of decoded pixel means in [0, 1], a thin separator between cells,
//! written whole to a file (atomically) or to standard output; and the inverse normal CDF that
//! places the manifold's grid on the prior's quantiles (Kingma & Welling 2013, Figure 4).

use anyhow::{bail, Context, Result};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// Grey level of the separator lines between cells.
const SEPARATOR: u8 = 128;

/// Where a picture goes.
#[derive(Debug, Clone)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl Output {
    /// `-o FILE`, `-o -` for standard output, or `default` when no -o was given. A folder
    /// (`-o out/`, or one that exists) gets `default_file` inside it, as `cp` would.
    pub fn from_arg(arg: Option<&Path>, default: Output, default_file: &str) -> Output {
        match arg {
            Some(p) if p.as_os_str() == "-" => Output::Stdout,
            Some(p) if p.is_dir() || p.as_os_str().to_string_lossy().ends_with('/') => {
                Output::File(p.join(default_file))
            }
            Some(p) => Output::File(p.to_path_buf()),
            None => default,
        }
    }

    /// Refuses binary output to a terminal before any work is done.
    pub fn check(&self) -> Result<()> {
        self.check_for("a PNG")
    }

    /// `check` for output that is `what` (a PNG, an HTML page).
    pub fn check_for(&self, what: &str) -> Result<()> {
        match self {
            Output::Stdout if std::io::stdout().is_terminal() => {
                bail!(
                    "refusing to write {what} to the terminal; redirect it (> file) or use -o FILE"
                )
            }
            Output::File(p) if p.as_os_str().is_empty() => {
                bail!("-o: empty path; give a file name, or - for stdout")
            }
            Output::File(p) if p.is_dir() => {
                bail!("-o {}: is a directory; give a file name", p.display())
            }
            Output::File(p)
                if p.parent()
                    .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) =>
            {
                let d = p.parent().unwrap_or(Path::new("."));
                bail!(
                    "-o {}: the folder {} does not exist; create it first (mkdir -p {})",
                    p.display(),
                    d.display(),
                    d.display()
                )
            }
            _ => Ok(()),
        }
    }

    /// Writes all of `png`: to a file atomically, or to stdout in one piece.
    pub fn write(&self, png: &[u8]) -> Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(png)
                    .and_then(|_| out.flush())
                    .context("writing the PNG to standard output")
            }
            Output::File(p) => {
                // A device, pipe or link (`-o /dev/stdout`) is written through, never replaced by
                // the rename that makes a regular file's write atomic.
                let special = std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_file());
                if special {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(p)
                        .with_context(|| format!("-o {}: cannot open", p.display()))?;
                    f.write_all(png)
                        .and_then(|_| f.flush())
                        .with_context(|| format!("-o {}: cannot write", p.display()))
                } else {
                    crate::run::write_atomic(p, png).with_context(|| format!("-o {}", p.display()))
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Output::Stdout => "standard output".into(),
            Output::File(p) => p.display().to_string(),
        }
    }
}

/// Columns for `n` cells laid out as square as the count allows: ceil(sqrt(n)) (8 for 64).
pub fn square_cols(n: usize) -> usize {
    let mut c = (n as f64).sqrt().floor() as usize;
    while c * c < n {
        c += 1;
    }
    c.max(1)
}

/// An 8-bit picture, grey (1 channel) or RGB (3), row-major with interleaved channels.
pub struct Picture {
    pub px: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub channels: usize,
}

impl Picture {
    pub fn png(&self) -> Result<Vec<u8>> {
        if self.channels == 3 {
            png_rgb(&self.px, self.width, self.height)
        } else {
            png_gray(&self.px, self.width, self.height)
        }
    }
}

/// A grid of images.
/// - `images` holds `n` cells, each `h * w * c` pixel means in [0, 1], row-major with interleaved
///   channels (`cell` = (h, w, c), c = 1 grey or 3 RGB).
/// - Cells are laid out `cols` to a row, each scaled `scale` times (nearest neighbour).
/// - Separators 1 pixel wide (`scale` pixels when scaled) run between cells and around the edge.
/// - NaN pixels (blank cells) take the separator's grey.
pub fn grid(
    images: &[f32],
    n: usize,
    cell: (usize, usize, usize),
    cols: usize,
    scale: usize,
) -> Picture {
    let (h, w, c) = cell;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let s = scale.max(1);
    let (ch, cw) = (h * s, w * s);
    let width = cols * cw + (cols + 1) * s;
    let height = rows * ch + (rows + 1) * s;
    let mut px = vec![SEPARATOR; width * height * c];
    for k in 0..n {
        let (r, col) = (k / cols, k % cols);
        let (y0, x0) = (s + r * (ch + s), s + col * (cw + s));
        let img = &images[k * h * w * c..(k + 1) * h * w * c];
        for y in 0..ch {
            let start = ((y0 + y) * width + x0) * c;
            let row = &mut px[start..start + cw * c];
            for (i, p) in row.iter_mut().enumerate() {
                let (x, ch_) = (i / c, i % c);
                let v = img[((y / s) * w + x / s) * c + ch_];
                if !v.is_nan() {
                    *p = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
    Picture {
        px,
        width: width as u32,
        height: height as u32,
        channels: c,
    }
}

/// `pictures` stacked top to bottom, `gap` pixels of white between them; each as wide as the
/// widest (narrower ones are padded with white on the right). All must have the same channels.
pub fn stack(pictures: &[Picture], gap: usize) -> Picture {
    let c = pictures.first().map_or(1, |p| p.channels);
    let width = pictures.iter().map(|p| p.width as usize).max().unwrap_or(0);
    let height = pictures.iter().map(|p| p.height as usize).sum::<usize>()
        + gap * pictures.len().saturating_sub(1);
    let mut px = vec![255u8; width * height * c];
    let mut y0 = 0;
    for p in pictures {
        let pw = p.width as usize * c;
        for y in 0..p.height as usize {
            let dst = (y0 + y) * width * c;
            px[dst..dst + pw].copy_from_slice(&p.px[y * pw..(y + 1) * pw]);
        }
        y0 += p.height as usize + gap;
    }
    Picture {
        px,
        width: width as u32,
        height: height as u32,
        channels: c,
    }
}

/// The pictures are small, so the best compression costs milliseconds and saves half the bytes.
fn encoder(out: &mut Vec<u8>) -> PngEncoder<&mut Vec<u8>> {
    PngEncoder::new_with_quality(out, CompressionType::Best, FilterType::Adaptive)
}

/// PNG bytes of 8-bit grey pixels.
pub fn png_gray(px: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    png(px, width, height, ExtendedColorType::L8)
}

/// PNG bytes of 8-bit RGB pixels.
pub fn png_rgb(px: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    png(px, width, height, ExtendedColorType::Rgb8)
}

fn png(px: &[u8], width: u32, height: u32, color: ExtendedColorType) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encoder(&mut out)
        .write_image(px, width, height, color)
        .context("encoding PNG")?;
    Ok(out)
}

/// The standard normal quantile function Phi^-1(p), p in (0, 1): Acklam's rational
/// approximation (relative error < 1.2e-9).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let lo = 0.024_25;
    if p < lo {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - lo {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

/// `steps` quantiles (i + 1/2) / steps of N(0, 1), lowest first: a grid covering the prior's
/// mass evenly.
pub fn normal_quantiles(steps: usize) -> Vec<f32> {
    (0..steps)
        .map(|i| inverse_normal_cdf((i as f64 + 0.5) / steps as f64) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_cdf_known_quantiles() {
        // Phi^-1(0.5) = 0, Phi^-1(0.975) = 1.959964, Phi^-1(0.025) = -1.959964,
        // Phi^-1(0.8413447) = 1 (Phi(1) = 0.8413447), Phi^-1(0.001) = -3.090232.
        assert!(inverse_normal_cdf(0.5).abs() < 1e-12);
        assert!((inverse_normal_cdf(0.975) - 1.959_964).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.025) + 1.959_964).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.841_344_7) - 1.0).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.001) + 3.090_232).abs() < 1e-5);
        let q = normal_quantiles(4);
        // (i + 1/2)/4 = 0.125, 0.375, 0.625, 0.875 -> -1.150349, -0.318639, 0.318639, 1.150349.
        assert!((q[0] + 1.150_349).abs() < 1e-5 && (q[1] + 0.318_639).abs() < 1e-5);
        assert!((q[2] - 0.318_639).abs() < 1e-5 && (q[3] - 1.150_349).abs() < 1e-5);
    }

    #[test]
    fn grid_layout() {
        assert_eq!(
            (
                square_cols(64),
                square_cols(10),
                square_cols(1),
                square_cols(2)
            ),
            (8, 4, 1, 2)
        );
        // 3 cells of 2x2 in 2 columns, scale 1: width 2*2 + 3 = 7, height 2*2 + 3 = 7.
        let imgs = vec![1.0f32; 12];
        let g = grid(&imgs, 3, (2, 2, 1), 2, 1);
        let px = &g.px;
        assert_eq!((g.width, g.height, px.len()), (7, 7, 49));
        assert_eq!(px[0], SEPARATOR);
        assert_eq!(px[7 + 1], 255); // first pixel of the first cell at (1, 1)
        assert_eq!(px[4 * 7 + 4], SEPARATOR); // the empty fourth cell

        // Scale 2 doubles cells and separators: 2*4 + 3*2 = 14.
        let g2 = grid(&imgs, 3, (2, 2, 1), 2, 2);
        assert_eq!((g2.width, g2.height), (14, 14));
        // RGB: one 1x2 cell of (red, blue) pixels; 3 bytes per pixel, 4x3 picture.
        let rgb = grid(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 1, (1, 2, 3), 1, 1);
        assert_eq!((rgb.width, rgb.height, rgb.px.len()), (4, 3, 36));
        let at = |x: usize, y: usize| &rgb.px[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3];
        assert_eq!(
            (at(1, 1), at(2, 1), at(0, 0)),
            (&[255, 0, 0][..], &[0, 0, 255][..], &[SEPARATOR; 3][..])
        );
        let img = image::load_from_memory(&rgb.png().unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(img.get_pixel(2, 1).0, [0, 0, 255]);
    }

    #[test]
    fn png_decodes_to_its_size() {
        let bytes = grid(&vec![0.5f32; 64 * 4], 64, (2, 2, 1), 8, 1)
            .png()
            .unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (8 * 2 + 9, 8 * 2 + 9));
    }
}
