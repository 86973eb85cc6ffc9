//! Plots with axes and text, drawn by plotters on its bitmap backend and encoded as PNG here:
//! the training curves of a run (-ELBO, reconstruction, KL per epoch, train, validation and test),
//! and the latent scatter of the test set's posterior means coloured by label.
//!
//! Text uses DejaVu Sans compiled into the binary (assets/, Bitstream Vera licence), so plots
//! need no system fonts.

use crate::picture::Picture;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::sync::Once;

static FONT: Once = Once::new();
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn font() {
    FONT.call_once(|| {
        // The bytes are a valid TTF compiled in; failure would leave text undrawn, not crash.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT_BYTES);
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// One epoch's figures, as metrics.csv holds them: train values are absent for epoch 0, test
/// values on epochs between `train.eval_every`, validation without `data.valid`.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub epoch: f64,
    pub train: Option<[f64; 3]>,
    pub test: Option<[f64; 3]>,
    /// The validation -ELBO.
    pub valid: Option<f64>,
}

/// From this many epochs on, the epoch axis is logarithmic: a long run's first epochs (where the
/// loss falls by tens of nats) and its stepped learning-rate stages (Burda et al.'s are 3^i
/// epochs long) then share the width, instead of the first hundred epochs taking a sliver.
const LOG_EPOCHS: f64 = 100.0;

/// Above this many points a series is drawn as a line without a dot per epoch.
const DOTS_MAX: usize = 60;

/// Four panels against epoch, train, validation and test: the -ELBO over the whole run, the
/// -ELBO zoomed on the last 90% of its epochs (a long run's first epochs fall by tens of nats,
/// which squeezes the rest of the curve into a few pixels), the reconstruction term and the KL.
/// PNG bytes.
pub fn curves(points: &[Point], title: &str) -> Result<Vec<u8>> {
    font();
    let (w, h) = (1400u32, 900u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
        let panels = root.split_evenly((2, 2));
        // Epoch 0 (untrained) is far above the rest; the axes start at epoch 1 when there is one.
        let shown: Vec<&Point> = if points.len() > 1 {
            points.iter().filter(|p| p.epoch >= 1.0).collect()
        } else {
            points.iter().collect()
        };
        let (cut, tail) = last_90_percent(&shown);
        let zoom = format!("-ELBO (nats), epochs {cut:.0} on: the last 90%");
        panel(&panels[0], &shown, 0, "-ELBO (nats)")?;
        panel(&panels[1], &tail, 0, &zoom)?;
        panel(&panels[2], &shown, 1, "reconstruction -log p(x|z) (nats)")?;
        panel(&panels[3], &shown, 2, "KL(q(z|x) || p(z)) (nats)")?;
        root.present().map_err(err)?;
    }
    crate::picture::png_rgb(&buf, w, h)
}

/// The first epoch of the last 90% of the shown epochs, and those points (all of them when
/// there are fewer than three epochs, where a zoom has nothing to leave out).
fn last_90_percent<'a>(shown: &[&'a Point]) -> (f64, Vec<&'a Point>) {
    let first = shown.first().map_or(0.0, |p| p.epoch);
    let last = shown.last().map_or(first, |p| p.epoch);
    let cut = if last - first >= 2.0 {
        (first + 0.1 * (last - first)).ceil().max(first + 1.0)
    } else {
        first
    };
    (
        cut,
        shown.iter().copied().filter(|p| p.epoch >= cut).collect(),
    )
}

/// One panel: figure `k` (0 -ELBO, 1 reconstruction, 2 KL) of `shown` against epoch, with the
/// validation -ELBO on the -ELBO panels; the y range fits what is shown.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    shown: &[&Point],
    k: usize,
    caption: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let valid_k = |p: &Point| if k == 0 { p.valid } else { None };
    let vals: Vec<f64> = shown
        .iter()
        .flat_map(|p| {
            [p.test.map(|t| t[k]), p.train.map(|t| t[k]), valid_k(p)]
                .into_iter()
                .flatten()
        })
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = vals
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(0.5);
    let (x0, x1) = epoch_range(shown);
    // A log axis plots log10(epoch) on a linear one and labels its ticks as epochs.
    let log_x = x1 - 0.5 >= LOG_EPOCHS;
    let tx = |e: f64| if log_x { e.log10() } else { e };
    let (x0, x1) = if log_x {
        (tx(x0 + 0.5) - 0.03, tx(x1 - 0.5) + 0.03)
    } else {
        (x0, x1)
    };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(caption, ("sans-serif", 17))
        .x_label_area_size(38)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(if log_x { "epoch (log scale)" } else { "epoch" })
        .x_labels(if log_x {
            10
        } else {
            ((x1 - x0).ceil() as usize + 1).clamp(2, 12)
        })
        .x_label_formatter(&|x| {
            if log_x {
                format!("{:.0}", 10f64.powf(*x))
            } else {
                epoch_label(*x)
            }
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    let series = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        shown
            .iter()
            .filter_map(|p| f(p).map(|v| (tx(p.epoch), v)))
            .collect()
    };
    let train = series(&|p| p.train.map(|t| t[k]));
    let valid = series(&valid_k);
    let test = series(&|p| p.test.map(|t| t[k]));
    for (label, points, colour) in [
        ("train", train, RGBColor(31, 119, 180)),
        ("validation", valid, RGBColor(44, 160, 44)),
        ("test", test, RGBColor(255, 127, 14)),
    ] {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        if points.len() <= DOTS_MAX {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(err)?;
        }
    }
    // Keep the legend off the lines' right end: the upper corner where the curves end
    // low (a falling -ELBO, a KL under warm-up), the lower where they end high (a rising KL).
    let end = vals.last().copied().unwrap_or(lo);
    let corner = if end > (lo + hi) / 2.0 {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    };
    chart
        .configure_series_labels()
        .position(corner)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// `pic` with a white band on its left holding a label for each of its rows of cells: `rows`
/// gives each label's vertical centre in pixels and its text. The band is as wide as the longest
/// label; the text is `size` pixels high. Grey pictures stay grey.
pub fn label_rows(pic: &Picture, rows: &[(u32, &str)], size: u32) -> Result<Picture> {
    font();
    let style = ("sans-serif", size as f64).into_font();
    let text_w = rows
        .iter()
        .map(|(_, t)| style.box_size(t).map(|(w, _)| w).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let band = text_w + size;
    let (w, h) = (band + pic.width, pic.height);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let pos = plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Left,
            plotters::style::text_anchor::VPos::Center,
        );
        let text = style.color(&BLACK).pos(pos);
        for (y, t) in rows {
            root.draw_text(t, &text, ((size / 2) as i32, *y as i32))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    let c = pic.channels;
    let mut px = vec![0u8; (w * h) as usize * c];
    for y in 0..h as usize {
        for x in 0..w as usize {
            for k in 0..c {
                px[(y * w as usize + x) * c + k] = if x < band as usize {
                    rgb[(y * w as usize + x) * 3 + k]
                } else {
                    pic.px[(y * pic.width as usize + x - band as usize) * c + k]
                };
            }
        }
    }
    Ok(Picture {
        px,
        width: w,
        height: h,
        channels: c,
    })
}

/// Matplotlib's "tab10" colours, one per digit.
const TAB10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// The most classes the scatter's legend lists; more would run off the picture.
const LEGEND_MAX: usize = 20;

/// One dot per image at `xy`, coloured by `labels` (the tab10 colours, repeating after ten), with
/// a legend naming each class by `names[label]` (or the label's value when `names` is empty).
/// Without labels every dot takes the first colour and there is no legend. PNG bytes.
pub fn scatter(
    xy: &[(f32, f32)],
    labels: &[u8],
    names: &[String],
    title: &str,
    axes: (&str, &str),
) -> Result<Vec<u8>> {
    font();
    let (w, h) = (900u32, 820u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        // The axes cover the central 99.8% of the points so a few outliers do not shrink the rest.
        let range = |f: &dyn Fn(&(f32, f32)) -> f32| {
            let mut v: Vec<f32> = xy.iter().map(f).filter(|v| v.is_finite()).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            if v.is_empty() {
                return (-1.0, 1.0);
            }
            let (a, b) = (v[v.len() / 1000], v[v.len() - 1 - v.len() / 1000]);
            let pad = ((b - a) * 0.05).max(1e-3);
            ((a - pad) as f64, (b + pad) as f64)
        };
        let (x0, x1) = range(&|p| p.0);
        let (y0, y1) = range(&|p| p.1);
        let mut chart = ChartBuilder::on(&root)
            .margin(16)
            .caption(title, ("sans-serif", 19))
            .x_label_area_size(42)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(axes.0)
            .y_desc(axes.1)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(err)?;
        let unlabelled = labels.len() != xy.len();
        let groups = if unlabelled {
            1
        } else {
            labels.iter().map(|&l| l as usize + 1).max().unwrap_or(1)
        };
        for d in 0..groups {
            let (r, g, b) = TAB10[d % TAB10.len()];
            let c = RGBColor(r, g, b);
            let pts: Vec<(f64, f64)> = xy
                .iter()
                .enumerate()
                .filter(|(i, p)| {
                    (unlabelled || labels[*i] as usize == d)
                        && (p.0 as f64) >= x0
                        && (p.0 as f64) <= x1
                        && (p.1 as f64) >= y0
                        && (p.1 as f64) <= y1
                })
                .map(|(_, p)| (p.0 as f64, p.1 as f64))
                .collect();
            let series = chart
                .draw_series(
                    pts.into_iter()
                        .map(|p| Circle::new(p, 2, c.mix(0.6).filled())),
                )
                .map_err(err)?;
            if !unlabelled && d < LEGEND_MAX {
                let name = names.get(d).cloned().unwrap_or_else(|| d.to_string());
                series
                    .label(name)
                    .legend(move |(x, y)| Circle::new((x + 6, y), 5, c.filled()));
            }
        }
        if !unlabelled {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    crate::picture::png_rgb(&buf, w, h)
}

/// The x range of the shown epochs, half an epoch beyond the first and last, so that a 1- or
/// 2-epoch run has its points inside the frame.
fn epoch_range(shown: &[&Point]) -> (f64, f64) {
    let first = shown.first().map(|p| p.epoch).unwrap_or(0.0);
    let last = shown.last().map(|p| p.epoch).unwrap_or(first);
    (first - 0.5, last.max(first) + 0.5)
}

/// An x tick's label: whole epochs only, so no epoch is printed twice (plotters also puts
/// ticks between whole numbers on a short axis).
fn epoch_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

/// Reads a run's metrics.csv into plot points, its columns found by their header names; an
/// epoch with none of the figures is left out.
pub fn read_metrics(text: &str) -> Vec<Point> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let cols = |names: [&str; 3]| names.map(col);
    let (epoch, valid) = (col("epoch"), col("valid_nelbo"));
    let train = cols(["train_nelbo", "train_recon", "train_kl"]);
    let test = cols(["test_nelbo", "test_recon", "test_kl"]);
    lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: Option<usize>| f.get(i?).and_then(|s| s.trim().parse::<f64>().ok());
            let three = |c: [Option<usize>; 3]| Some([num(c[0])?, num(c[1])?, num(c[2])?]);
            let p = Point {
                epoch: num(epoch)?,
                train: three(train),
                test: three(test),
                valid: num(valid),
            };
            (p.train.is_some() || p.test.is_some() || p.valid.is_some()).then_some(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zoom_keeps_the_last_90_percent_of_epochs() {
        let p = |e: f64| Point {
            epoch: e,
            train: None,
            test: Some([1.0, 1.0, 0.0]),
            valid: None,
        };
        let pts: Vec<Point> = (1..=100).map(|e| p(e as f64)).collect();
        let refs: Vec<&Point> = pts.iter().collect();
        // Epochs 1..100: 10% of the 99-epoch span is 9.9, so the zoom starts at epoch 11.
        let (cut, tail) = last_90_percent(&refs);
        assert_eq!(cut, 11.0);
        assert_eq!(tail.len(), 90);
        assert_eq!(tail[0].epoch, 11.0);
        // 3 epochs: the zoom drops the first; 2 epochs: nothing to leave out.
        let (cut, tail) = last_90_percent(&refs[..3]);
        assert_eq!((cut, tail.len()), (2.0, 2));
        let (cut, tail) = last_90_percent(&refs[..2]);
        assert_eq!((cut, tail.len()), (1.0, 2));
    }

    #[test]
    fn epoch_axis_labels_whole_epochs_once() {
        // Ticks at 1, 1.25, ..., 2 label as "1", "", "", "", "2": each epoch once.
        let labels: Vec<String> = (0..5).map(|i| epoch_label(1.0 + 0.25 * i as f64)).collect();
        assert_eq!(labels, vec!["1", "", "", "", "2"]);
        // A 1-epoch run is drawn inside [0.5, 1.5]; 2 epochs inside [0.5, 2.5].
        let p = |e: f64| Point {
            epoch: e,
            train: None,
            test: Some([1.0, 1.0, 0.0]),
            valid: None,
        };
        let (a, b) = (p(1.0), p(2.0));
        assert_eq!(epoch_range(&[&a]), (0.5, 1.5));
        assert_eq!(epoch_range(&[&a, &b]), (0.5, 2.5));
    }

    #[test]
    fn curves_and_scatter_render() {
        let csv = "epoch,step,train_nelbo,train_recon,train_kl,test_nelbo,test_recon,test_kl,s,ips\n\
                   0,0,,,,540,539,1,0,\n1,10,160,150,10,130,110,20,1,100\n2,20,120,100,20,115,92,23,1,100\n";
        let pts = read_metrics(csv);
        assert_eq!(pts.len(), 3);
        assert!(pts[0].train.is_none() && pts[1].train == Some([160.0, 150.0, 10.0]));
        assert!(pts[2].test == Some([115.0, 92.0, 23.0]) && pts[2].valid.is_none());
        let png = curves(&pts, "test").unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (1400, 900));
        // A long run with validation every epoch and the test set every 10th (the log axis).
        let mut csv = String::from(
            "epoch,step,train_nelbo,train_recon,train_kl,test_nelbo,test_recon,test_kl,\
             train_seconds,images_per_s,valid_nelbo\n0,0,,,,200,199,1,0,,201\n",
        );
        for e in 1..=300 {
            let v = 90.0 + 50.0 / e as f64;
            let test = if e % 10 == 0 {
                format!("{},{},25", v + 1.0, v - 24.0)
            } else {
                ",,".into()
            };
            csv += &format!(
                "{e},{},{v},{},25,{test},1,100,{}\n",
                e * 10,
                v - 25.0,
                v + 1.2
            );
        }
        let pts = read_metrics(&csv);
        assert_eq!(pts.len(), 301);
        assert_eq!(pts.iter().filter(|p| p.test.is_some()).count(), 31);
        assert!(pts[7].test.is_none() && pts[7].valid.is_some() && pts[7].train.is_some());
        assert!((pts[300].valid.unwrap() - (90.0 + 50.0 / 300.0 + 1.2)).abs() < 1e-9);
        curves(&pts, "long").unwrap();
        let xy: Vec<(f32, f32)> = (0..100)
            .map(|i| (i as f32 * 0.1, (i % 10) as f32))
            .collect();
        let labels: Vec<u8> = (0..100).map(|i| (i % 10) as u8).collect();
        let png = scatter(&xy, &labels, &[], "t", ("x", "y")).unwrap();
        assert_eq!(image::load_from_memory(&png).unwrap().width(), 900);
    }
}
