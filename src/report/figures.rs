//! Figures of a report, each as PNG and SVG: training curves, mIoU per
//! evaluation with error bars, per-class IoU bars, a confusion heat map; and
//! attention maps per scale for a few validation images (PNG).

use super::{AggRow, SuiteSummary};
use crate::data::cityscapes::CLASSES;
use crate::eval::metrics::Confusion;
use crate::model::Fusion;
use crate::store::{Status, Store};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Registers the embedded font once (plotters' ab_glyph backend has none).
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn perr(e: impl std::fmt::Display) -> Error {
    Error::Report(e.to_string())
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws with `f` into `<stem>.png` and `<stem>.svg`.
fn both(
    dir: &Path,
    stem: &str,
    size: (u32, u32),
    png_fn: impl Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
    svg_fn: impl Fn(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    crate::atomic::write_with(&png, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        png_fn(&root)?;
        root.present().map_err(perr)
    })?;
    crate::atomic::write_with(&svg, |tmp| {
        let root = SVGBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        svg_fn(&root)?;
        root.present().map_err(perr)
    })?;
    Ok(vec![png, svg])
}

/// Per variant, its loss curve: (step, mean over seeds).
type Curves = Vec<(String, Vec<(f64, f64)>)>;

/// Per variant, the mean over its runs (seeds) of the step metric
/// `key_of(run)` names, times `scale`, step by step.
fn mean_curves(
    store: &Store,
    s: &SuiteSummary,
    scale: f64,
    key_of: impl Fn(&crate::store::RunRow) -> Option<String>,
) -> Result<Curves> {
    let mut by_var: BTreeMap<String, BTreeMap<i64, Vec<f64>>> = BTreeMap::new();
    for r in &s.runs {
        let Some(key) = key_of(r) else {
            continue;
        };
        for (step, v) in store.metric(r.id, &key)? {
            if v.is_finite() {
                by_var
                    .entry(r.variant.clone())
                    .or_default()
                    .entry(step)
                    .or_default()
                    .push(scale * v);
            }
        }
    }
    Ok(super::variant_order(&s.runs)
        .into_iter()
        .filter_map(|v| {
            by_var.remove(&v).map(|m| {
                let pts = m
                    .into_iter()
                    .map(|(k, xs)| (k as f64, xs.iter().sum::<f64>() / xs.len() as f64))
                    .collect();
                (v, pts)
            })
        })
        .collect())
}

/// Validation mIoU (%) per step of each variant's first evaluation set
/// (runs with `[eval] every`).
fn val_curves(store: &Store, s: &SuiteSummary) -> Result<Curves> {
    mean_curves(store, s, 100.0, |r| {
        let cfg = serde_json::from_str::<crate::config::RunConfig>(&r.config_json).ok()?;
        cfg.eval.sets.first().map(crate::eval::val_metric)
    })
}

/// Mean loss per step over the seeds of each variant.
fn curves(store: &Store, s: &SuiteSummary) -> Result<Curves> {
    mean_curves(store, s, 1.0, |_| Some("loss".to_string()))
}

/// What the figures draw.
struct Data {
    baseline: String,
    curves: Curves,
    /// Validation mIoU (%) during training (`[eval] every`), per variant.
    val_curves: Curves,
    rows: Vec<AggRow>,
    classes: Vec<(String, Vec<Option<f64>>)>,
    confusion: Option<(String, Confusion)>,
}

fn draw_curves<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Data) -> Result<()> {
    // a centred moving average over 1% of the steps (at least 5)
    let smooth: Curves = d
        .curves
        .iter()
        .map(|(n, pts)| {
            let w = (pts.len() / 100).max(5) / 2;
            let s = (0..pts.len())
                .map(|i| {
                    let (a, b) = (i.saturating_sub(w), (i + w + 1).min(pts.len()));
                    let m = pts[a..b].iter().map(|p| p.1).sum::<f64>() / (b - a) as f64;
                    (pts[i].0, m)
                })
                .collect();
            (n.clone(), s)
        })
        .collect();
    line_chart(
        root,
        &smooth,
        "training loss (mean over seeds, moving average over 1% of the steps)",
        "loss",
    )
}

fn draw_val_curves<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Data) -> Result<()> {
    line_chart(
        root,
        &d.val_curves,
        "validation mIoU during training (first evaluation set, mean over seeds)",
        "mIoU %",
    )
}

fn line_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curves: &Curves,
    caption: &str,
    y_desc: &str,
) -> Result<()> {
    let xmax = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    // RMI's log-det term makes the loss negative as it learns: span the data.
    let ys = || curves.iter().flat_map(|c| c.1.iter().map(|p| p.1));
    let (ymin, ymax) = (ys().fold(f64::MAX, f64::min), ys().fold(f64::MIN, f64::max));
    let (ymin, ymax) = if ymin < ymax { (ymin, ymax) } else { (0.0, 1.0) };
    let pad = 0.05 * (ymax - ymin);
    let mut ch = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..xmax, (ymin - pad)..(ymax + pad))
        .map_err(perr)?;
    ch.configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("step")
        .y_desc(y_desc)
        .draw()
        .map_err(perr)?;
    for (i, (name, pts)) in curves.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        ch.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(perr)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    Ok(())
}

/// An evaluation's label: the variant, then its fusion where the variant
/// is not named after it, the scales and flip.
fn eval_label(r: &AggRow) -> String {
    let (v, k) = (&r.key.variant, &r.key.eval);
    let fusion = if v.starts_with(k.fusion.name()) {
        String::new()
    } else {
        format!("{} ", k.fusion)
    };
    format!("{v} · {fusion}{}{}", k.scales, if k.flip { " flip" } else { "" })
}

/// Each evaluation's difference from the baseline (the report's delta:
/// its same evaluation, or its first) in points, with the half width of
/// its 95% confidence interval: (row index, delta, half width).
fn effects(d: &Data) -> Vec<(usize, f64, f64)> {
    d.rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, 100.0 * r.delta?, 100.0 * r.ci95?)))
        .collect()
}

fn draw_miou<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Data) -> Result<()> {
    let (left, right) = root.split_horizontally((62).percent_width());
    let n = d.rows.len().max(1);
    let labels: Vec<String> = d.rows.iter().map(eval_label).collect();
    let label_at = |y: &f64| -> String {
        let i = y.round();
        if (y - i).abs() > 1e-6 || i < 0.0 {
            return String::new();
        }
        labels
            .get(n.saturating_sub(1 + i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let lo = d.rows.iter().map(|r| r.mean - r.std).fold(1.0, f64::min).max(0.0) * 100.0;
    let hi = d.rows.iter().map(|r| r.mean + r.std).fold(0.0, f64::max).min(1.0) * 100.0;
    let pad = ((hi - lo) * 0.1).max(1.0);
    let mut ch = ChartBuilder::on(&left)
        .caption("mIoU % (mean ± std over seeds)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(300)
        .build_cartesian_2d((lo - pad).max(0.0)..(hi + pad).min(100.0), -0.5..n as f64 - 0.5)
        .map_err(perr)?;
    ch.configure_mesh()
        .y_labels(n)
        .disable_y_mesh()
        .y_label_formatter(&label_at)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("mIoU %")
        .draw()
        .map_err(perr)?;
    let variants = variant_order_rows(&d.rows);
    let colour =
        |r: &AggRow| PALETTE[variants.iter().position(|v| *v == r.key.variant).unwrap_or(0) % PALETTE.len()];
    ch.draw_series(d.rows.iter().enumerate().map(|(i, r)| {
        let y = (n - 1 - i) as f64;
        ErrorBar::new_horizontal(
            y,
            100.0 * (r.mean - r.std),
            100.0 * r.mean,
            100.0 * (r.mean + r.std),
            colour(r).filled(),
            8,
        )
    }))
    .map_err(perr)?;
    // The effects: difference from the baseline with its 95% interval.
    let eff = effects(d);
    let span = eff
        .iter()
        .map(|(_, dl, h)| dl.abs() + h)
        .fold(1.0, f64::max)
        .min(100.0)
        * 1.1;
    let mut ch = ChartBuilder::on(&right)
        .caption(
            format!("Δ vs {} (points, 95% CI)", d.baseline),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(5)
        .build_cartesian_2d(-span..span, -0.5..n as f64 - 0.5)
        .map_err(perr)?;
    ch.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_label_formatter(&|x| format!("{x:+.0}"))
        .x_desc("points")
        .draw()
        .map_err(perr)?;
    ch.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, -0.5), (0.0, n as f64 - 0.5)],
        BLACK.stroke_width(1),
    )))
    .map_err(perr)?;
    ch.draw_series(eff.iter().map(|&(i, dl, h)| {
        let y = (n - 1 - i) as f64;
        ErrorBar::new_horizontal(y, dl - h, dl, dl + h, colour(&d.rows[i]).filled(), 8)
    }))
    .map_err(perr)?;
    Ok(())
}

fn draw_classes<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &Data) -> Result<()> {
    let k = CLASSES.len();
    let present: Vec<usize> = (0..k)
        .filter(|&c| {
            d.classes
                .iter()
                .any(|(_, v)| v.get(c).copied().flatten().is_some())
        })
        .collect();
    let groups = present.len().max(1);
    let nv = d.classes.len().max(1);
    // One row per class (top to bottom), one bar per variant inside it.
    let mut ch = ChartBuilder::on(root)
        .caption(
            "per-class IoU (first evaluation of each variant)",
            ("sans-serif", 20),
        )
        .margin(10)
        .margin_right(25)
        .x_label_area_size(35)
        .y_label_area_size(110)
        .build_cartesian_2d(0.0..100.0, -0.5..groups as f64 - 0.5)
        .map_err(perr)?;
    ch.configure_mesh()
        .y_labels(groups)
        .disable_y_mesh()
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            present
                .get(groups.saturating_sub(1 + i as usize))
                .map(|&c| CLASSES[c].name.to_string())
                .unwrap_or_default()
        })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("IoU %")
        .draw()
        .map_err(perr)?;
    let h = 0.8 / nv as f64;
    for (vi, (name, vals)) in d.classes.iter().enumerate() {
        let c = PALETTE[vi % PALETTE.len()];
        ch.draw_series(present.iter().enumerate().filter_map(|(g, &cl)| {
            vals.get(cl).copied().flatten().map(|v| {
                let y0 = (groups - 1 - g) as f64 + 0.4 - (vi + 1) as f64 * h;
                Rectangle::new([(0.0, y0), (100.0 * v, y0 + h)], c.filled())
            })
        }))
        .map_err(perr)?
        .label(name.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    Ok(())
}

/// The heat map's colour for a share in [0, 1]: white to blue.
fn heat(v: f64) -> RGBColor {
    RGBColor((255.0 * (1.0 - v)) as u8, (255.0 * (1.0 - 0.6 * v)) as u8, 255)
}

fn draw_confusion<DB: DrawingBackend>(full: &DrawingArea<DB, Shift>, d: &Data) -> Result<()> {
    let Some((title, conf)) = &d.confusion else {
        return Ok(());
    };
    let (root, bar) = full.split_horizontally((88).percent_width());
    // the colour bar: the share of a row that each colour means
    {
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(40)
            .margin_bottom(55)
            .margin_right(10)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)
            .map_err(perr)?;
        cb.configure_mesh()
            .disable_mesh()
            .x_labels(0)
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.1}"))
            .y_label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 13))
            .y_desc("share of the row")
            .draw()
            .map_err(perr)?;
        cb.draw_series((0..100).map(|k| {
            let (a, b) = (k as f64 / 100.0, (k + 1) as f64 / 100.0);
            Rectangle::new([(0.0, a), (1.0, b)], heat(a).filled())
        }))
        .map_err(perr)?;
    }
    let root = &root;
    let k = conf.k;
    let present: Vec<usize> = (0..k).filter(|&g| (0..=k).any(|p| conf.at(g, p) > 0)).collect();
    let n = present.len().max(1);
    let span = -0.5..n as f64 - 0.5;
    let mut ch = ChartBuilder::on(root)
        .caption(
            format!("confusion, rows = ground truth, row-normalised: {title}"),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(100)
        .build_cartesian_2d(span.clone(), span)
        .map_err(perr)?;
    // Class i sits at integer position i (row i from the top).
    let name = |v: f64, flip: bool| -> String {
        let i = v.round();
        if (v - i).abs() > 1e-6 || i < 0.0 {
            return String::new();
        }
        let idx = if flip {
            n.saturating_sub(1 + i as usize)
        } else {
            i as usize
        };
        present
            .get(idx)
            .map(|&c| CLASSES[c].name.to_string())
            .unwrap_or_default()
    };
    ch.configure_mesh()
        .disable_mesh()
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&|x| {
            // columns are narrow: abbreviate
            let s = name(*x, false);
            if s.chars().count() > 8 {
                format!("{}.", s.chars().take(7).collect::<String>())
            } else {
                s
            }
        })
        .y_label_formatter(&|y| name(*y, true))
        .x_label_style(("sans-serif", 10))
        .x_desc("prediction")
        .draw()
        .map_err(perr)?;
    ch.draw_series(present.iter().enumerate().flat_map(|(gi, &g)| {
        let row: u64 = (0..=k).map(|p| conf.at(g, p)).sum();
        present.iter().enumerate().map(move |(pi, &p)| {
            let v = conf.at(g, p) as f64 / row.max(1) as f64;
            let (x, y) = (pi as f64, (n - 1 - gi) as f64);
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat(v).filled())
        })
    }))
    .map_err(perr)?;
    // the shares themselves, where they are not negligible
    ch.draw_series(present.iter().enumerate().flat_map(|(gi, &g)| {
        let row: u64 = (0..=k).map(|p| conf.at(g, p)).sum();
        present.iter().enumerate().filter_map(move |(pi, &p)| {
            let v = conf.at(g, p) as f64 / row.max(1) as f64;
            (v >= 0.01).then(|| {
                let colour = if v > 0.5 { WHITE } else { BLACK };
                Text::new(
                    format!("{v:.2}"),
                    (pi as f64 - 0.25, (n - 1 - gi) as f64 + 0.1),
                    ("sans-serif", 11).into_font().color(&colour),
                )
            })
        })
    }))
    .map_err(perr)?;
    Ok(())
}

/// Variant order of aggregated rows.
pub(super) fn variant_order_rows(rows: &[AggRow]) -> Vec<String> {
    let mut v: Vec<String> = vec![];
    for r in rows {
        if !v.contains(&r.key.variant) {
            v.push(r.key.variant.clone());
        }
    }
    v
}

/// Draws every figure into `dir`; returns the files.
pub fn draw_all(store: &Store, s: &SuiteSummary, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let mut classes: Vec<(String, Vec<Option<f64>>)> = vec![];
    for r in &s.rows {
        if !classes.iter().any(|(v, _)| *v == r.key.variant) {
            classes.push((r.key.variant.clone(), r.class_iou.clone()));
        }
    }
    // Confusion of the best row, summed over its seeds.
    let best = s.rows.iter().max_by(|a, b| a.mean.total_cmp(&b.mean));
    let confusion = best.map(|b| {
        let mut total: Option<Confusion> = None;
        for (run, e) in &s.evals {
            if run.variant == b.key.variant && e.key() == b.key.eval {
                match &mut total {
                    None => total = Some(e.confusion.clone()),
                    Some(t) => t.merge(&e.confusion),
                }
            }
        }
        (eval_label(b), total)
    });
    let data = Data {
        baseline: s.baseline.clone(),
        curves: curves(store, s)?,
        val_curves: val_curves(store, s)?,
        rows: s.rows.clone(),
        classes,
        confusion: confusion.and_then(|(t, c)| c.map(|c| (t, c))),
    };
    let mut files = vec![];
    files.extend(both(
        dir,
        "training_curves",
        (900, 500),
        |r| draw_curves(r, &data),
        |r| draw_curves(r, &data),
    )?);
    if !data.val_curves.is_empty() {
        files.extend(both(
            dir,
            "validation_miou",
            (900, 500),
            |r| draw_val_curves(r, &data),
            |r| draw_val_curves(r, &data),
        )?);
    }
    files.extend(both(
        dir,
        "miou",
        (1000, 600),
        |r| draw_miou(r, &data),
        |r| draw_miou(r, &data),
    )?);
    files.extend(both(
        dir,
        "class_iou",
        (1100, 550),
        |r| draw_classes(r, &data),
        |r| draw_classes(r, &data),
    )?);
    if data.confusion.is_some() {
        files.extend(both(
            dir,
            "confusion",
            (750, 700),
            |r| draw_confusion(r, &data),
            |r| draw_confusion(r, &data),
        )?);
    }
    files.extend(attention_maps(store, s, dir)?);
    Ok(files)
}

/// Attention per scale of the first attention-fused evaluation, from its
/// first finished run, on the first validation images: the maps its
/// evaluation wrote into the run folder (artifacts of kind `attention`).
fn attention_maps(store: &Store, s: &SuiteSummary, dir: &Path) -> Result<Vec<PathBuf>> {
    let Some(row) = s
        .rows
        .iter()
        .find(|r| matches!(r.key.eval.fusion, Fusion::Hierarchical | Fusion::Explicit))
    else {
        return Ok(vec![]);
    };
    let Some(run) = s
        .runs
        .iter()
        .find(|r| r.variant == row.key.variant && r.status == Status::Finished)
    else {
        return Ok(vec![]);
    };
    let mut saved: Vec<PathBuf> = store
        .artifacts(run.id)?
        .into_iter()
        .filter(|a| a.is_attention_of(&row.key.eval))
        .map(|a| PathBuf::from(a.path))
        .collect();
    saved.sort();
    let mut files = vec![];
    for (i, f) in saved.iter().enumerate() {
        let a = crate::eval::read_attention(f)?;
        let img = &a.image;
        // one labelled panel: the input, then each scale's weight map
        let mut maps: Vec<(String, usize, usize, Vec<f32>)> = vec![];
        for (sc, t) in &a.maps {
            let (_, _, h, w) = t.dims4()?;
            maps.push((
                format!("{}x", crate::model::scales::format_scale(*sc)),
                h,
                w,
                t.flatten_all()?.to_vec1()?,
            ));
        }
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let cell_w = 300usize;
        let cell_h = (cell_w * ih / iw.max(1)).max(40);
        let cols = 1 + maps.len();
        let size = ((cols * cell_w + 20) as u32, (cell_h + 110) as u32);
        let p = dir.join(format!("attention_{i}_{}.png", a.name));
        crate::atomic::write_with(&p, |tmp| {
            let root = BitMapBackend::new(tmp, size).into_drawing_area();
            root.fill(&WHITE).map_err(perr)?;
            root.draw(&Text::new(
                format!(
                    "{}, seed {}: the weight the fusion gives each scale's prediction (white 1, black 0)",
                    eval_label(row),
                    run.seed
                ),
                (10, 8),
                ("sans-serif", 16).into_font(),
            ))
            .map_err(perr)?;
            let at = |c: usize| (10 + c * cell_w) as i32;
            let top = 60i32;
            // the input, nearest-neighbour resized into its cell
            let cw = cell_w - 10;
            for y in 0..cell_h {
                for x in 0..cw {
                    let px = img.get_pixel((x * iw / cw) as u32, (y * ih / cell_h) as u32);
                    root.draw_pixel((at(0) + x as i32, top + y as i32), &RGBColor(px[0], px[1], px[2]))
                        .map_err(perr)?;
                }
            }
            root.draw(&Text::new(
                "input",
                (at(0), top + cell_h as i32 + 8),
                ("sans-serif", 15).into_font(),
            ))
            .map_err(perr)?;
            for (c, (label, h, w, v)) in maps.iter().enumerate() {
                for y in 0..cell_h {
                    for x in 0..cw {
                        let a = v[(y * h / cell_h) * w + x * w / cw].clamp(0.0, 1.0);
                        let g = (255.0 * a) as u8;
                        root.draw_pixel((at(c + 1) + x as i32, top + y as i32), &RGBColor(g, g, g))
                            .map_err(perr)?;
                    }
                }
                root.draw(&Text::new(
                    label.clone(),
                    (at(c + 1), top + cell_h as i32 + 8),
                    ("sans-serif", 15).into_font(),
                ))
                .map_err(perr)?;
            }
            root.present().map_err(perr)
        })?;
        files.push(p);
    }
    Ok(files)
}
