//! Plots with axes and text, drawn by plotters on its bitmap backend and encoded as PNG here:
//! the training curves of a run (-ELBO, reconstruction, KL per epoch, train and test), and the
//! latent scatter of the test set's posterior means coloured by label.
//!
//! Text uses DejaVu Sans compiled into the binary (assets/, Bitstream Vera licence), so plots
//! need no system fonts.

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

/// One epoch's figures, as metrics.csv holds them; train values are absent for epoch 0.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub epoch: f64,
    pub train: Option<[f64; 3]>,
    pub test: [f64; 3],
}

/// Three panels, -ELBO, reconstruction and KL against epoch, train and test; PNG bytes.
pub fn curves(points: &[Point], title: &str) -> Result<Vec<u8>> {
    font();
    let (w, h) = (1500u32, 460u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
        let panels = root.split_evenly((1, 3));
        let names = [
            "-ELBO (nats)",
            "reconstruction -log p(x|z) (nats)",
            "KL(q(z|x) || p(z)) (nats)",
        ];
        for (k, area) in panels.iter().enumerate() {
            // Epoch 0 (untrained) is far above the rest; the axes start at epoch 1 when there is one.
            let shown: Vec<&Point> = if points.len() > 1 {
                points.iter().filter(|p| p.epoch >= 1.0).collect()
            } else {
                points.iter().collect()
            };
            let vals: Vec<f64> = shown
                .iter()
                .flat_map(|p| std::iter::once(p.test[k]).chain(p.train.map(|t| t[k])))
                .filter(|v| v.is_finite())
                .collect();
            let (lo, hi) = vals
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
            let pad = ((hi - lo) * 0.08).max(0.5);
            let (x0, x1) = epoch_range(&shown);
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .caption(names[k], ("sans-serif", 17))
                .x_label_area_size(38)
                .y_label_area_size(56)
                .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .x_labels(((x1 - x0).ceil() as usize + 1).clamp(2, 12))
                .x_label_formatter(&|x| epoch_label(*x))
                .y_label_formatter(&|y| format!("{y:.1}"))
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 14))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(err)?;
            let train: Vec<(f64, f64)> = shown
                .iter()
                .filter_map(|p| p.train.map(|t| (p.epoch, t[k])))
                .collect();
            let test: Vec<(f64, f64)> = shown.iter().map(|p| (p.epoch, p.test[k])).collect();
            for (label, points, colour) in [
                ("train", train, RGBColor(31, 119, 180)),
                ("test", test, RGBColor(255, 127, 14)),
            ] {
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(err)?;
            }
            // -ELBO and reconstruction fall, KL usually rises: keep the legend off the lines.
            let corner = if k == 2 {
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
        }
        root.present().map_err(err)?;
    }
    crate::picture::png_rgb(&buf, w, h)
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

/// Reads a run's metrics.csv into plot points.
pub fn read_metrics(text: &str) -> Vec<Point> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
            let train = match (num(2), num(3), num(4)) {
                (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                _ => None,
            };
            Some(Point {
                epoch: num(0)?,
                train,
                test: [num(5)?, num(6)?, num(7)?],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_axis_labels_whole_epochs_once() {
        // Ticks at 1, 1.25, ..., 2 label as "1", "", "", "", "2": each epoch once.
        let labels: Vec<String> = (0..5).map(|i| epoch_label(1.0 + 0.25 * i as f64)).collect();
        assert_eq!(labels, vec!["1", "", "", "", "2"]);
        // A 1-epoch run is drawn inside [0.5, 1.5]; 2 epochs inside [0.5, 2.5].
        let p = |e: f64| Point {
            epoch: e,
            train: None,
            test: [1.0, 1.0, 0.0],
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
        let png = curves(&pts, "test").unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (1500, 460));
        let xy: Vec<(f32, f32)> = (0..100)
            .map(|i| (i as f32 * 0.1, (i % 10) as f32))
            .collect();
        let labels: Vec<u8> = (0..100).map(|i| (i % 10) as u8).collect();
        let png = scatter(&xy, &labels, &[], "t", ("x", "y")).unwrap();
        assert_eq!(image::load_from_memory(&png).unwrap().width(), 900);
    }
}
