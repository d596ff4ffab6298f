//! `--plot FILE.svg`: a picture of a timeline ([`crate::timeline`]), three
//! panels over quanta:
//! 1. CPU: each pCPU's demand (or, past [`MAX_CPU_LINES`] pCPUs, the
//!    busiest, median and least busy pCPU) against the lower bound, with a
//!    tick under the axis wherever pins changed (taller for more pins);
//! 2. memory: balloon target (solid) against guest use (dashed, same
//!    colour) for the [`TOP_DOMAINS`] domains whose target moved most;
//! 3. host memory available against the reserve.
//!
//! Aggregates rather than one line per domain or pCPU: a 1,000-domain,
//! 64-pCPU host stays readable. SVG only (plotters' SVG backend; no font
//! or bitmap dependencies): the text is SVG text, rendered by the viewer.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::timeline::TimelineRecord;
use crate::KIB_PER_MIB;

/// Up to this many pCPUs, one line each; beyond, aggregates.
pub const MAX_CPU_LINES: usize = 8;
/// Domains drawn in the memory panel.
pub const TOP_DOMAINS: usize = 6;

/// Errors drawing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to draw.
    #[error("plot {path}: the timeline has no quantum")]
    Empty {
        /// The SVG file.
        path: PathBuf,
    },
    /// Drawing or writing failed.
    #[error("plot {path}: {detail}")]
    Draw {
        /// The SVG file.
        path: PathBuf,
        /// plotters' message.
        detail: String,
    },
}

/// A colour per series, distinguishable (and not red, which marks pins).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
];
const PIN_MARK: RGBColor = RGBColor(214, 39, 40);

fn gib(kib: u64) -> f64 {
    kib as f64 / (KIB_PER_MIB * KIB_PER_MIB) as f64
}

/// Draws `records` to `path` (SVG); `title` heads the picture.
pub fn plot(records: &[TimelineRecord], title: &str, path: &Path) -> Result<(), PlotError> {
    if records.is_empty() {
        return Err(PlotError::Empty { path: path.into() });
    }
    draw(records, title, path).map_err(|e| PlotError::Draw { path: path.into(), detail: e.to_string() })
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(records: &[TimelineRecord], title: &str, path: &Path) -> DrawResult {
    let root = SVGBackend::new(path, (1400, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 26))?;
    let panels = root.split_evenly((3, 1));
    let (q0, q1) = (records[0].quantum as f64, records.last().map_or(1, |r| r.quantum) as f64 + 1.0);
    cpu_panel(&panels[0], records, q0..q1)?;
    memory_panel(&panels[1], records, q0..q1)?;
    host_panel(&panels[2], records, q0..q1)?;
    root.present()?;
    Ok(())
}

fn cpu_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    records: &[TimelineRecord],
    x: std::ops::Range<f64>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let ncpu = records.iter().map(|r| r.cpus.len()).max().unwrap_or(0);
    // Head room above the data for the legend.
    let ymax = records.iter().flat_map(|r| r.cpus.iter().map(|c| c.demand).chain([r.lower_bound])).fold(0.0, f64::max).max(0.1) * 1.45;
    let pins_total: usize = records.iter().map(|r| r.pins_applied()).sum();
    let caption = if ncpu <= MAX_CPU_LINES {
        format!("CPU: demand per pCPU vs the lower bound ({ncpu} pCPUs)")
    } else {
        format!("CPU: busiest / median / least busy of {ncpu} pCPUs vs the lower bound")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x.clone(), -ymax * 0.08..ymax)?;
    chart
        .configure_mesh()
        .x_desc("quantum")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("demand, CPUs")
        .label_style(("sans-serif", 14))
        .draw()?;
    let series = |f: &dyn Fn(&TimelineRecord) -> f64| records.iter().map(|r| (r.quantum as f64, f(r))).collect::<Vec<_>>();
    if ncpu <= MAX_CPU_LINES {
        for c in 0..ncpu {
            let color = PALETTE[c % PALETTE.len()];
            let id = records.iter().find_map(|r| r.cpus.get(c).map(|p| p.id)).unwrap_or(c as u32);
            chart
                .draw_series(LineSeries::new(series(&|r| r.cpus.get(c).map_or(0.0, |p| p.demand)), color.stroke_width(2)))?
                .label(format!("pCPU {id}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    } else {
        let pick = |r: &TimelineRecord, which: usize| {
            let mut d: Vec<f64> = r.cpus.iter().map(|c| c.demand).collect();
            d.sort_by(f64::total_cmp);
            match which {
                0 => d.last().copied().unwrap_or(0.0),
                1 => d.get(d.len() / 2).copied().unwrap_or(0.0),
                _ => d.first().copied().unwrap_or(0.0),
            }
        };
        for (which, name) in ["busiest pCPU", "median pCPU", "least busy pCPU"].into_iter().enumerate() {
            let color = PALETTE[which];
            chart
                .draw_series(LineSeries::new(series(&|r| pick(r, which)), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    chart
        .draw_series(DashedLineSeries::new(series(&|r| r.lower_bound), 8, 5, BLACK.stroke_width(3)))?
        .label("lower bound")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    // Pin changes: a tick below zero, taller for more pins.
    let most = records.iter().map(|r| r.pins_applied()).max().unwrap_or(0).max(1) as f64;
    chart
        .draw_series(records.iter().filter(|r| r.pins_applied() > 0).map(|r| {
            let h = ymax * 0.075 * (0.35 + 0.65 * r.pins_applied() as f64 / most);
            PathElement::new(vec![(r.quantum as f64, 0.0), (r.quantum as f64, -h)], PIN_MARK.stroke_width(2))
        }))?
        .label(format!("pins changed ({pins_total} in all)"))
        .legend(|(x, y)| PathElement::new(vec![(x + 10, y - 6), (x + 10, y + 6)], PIN_MARK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

fn memory_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    records: &[TimelineRecord],
    x: std::ops::Range<f64>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    // The domains whose balloon target moved most (max - min over the run).
    let mut range: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
    for r in records {
        for d in &r.domains {
            let e = range.entry(d.name.as_str()).or_insert((u64::MAX, 0));
            e.0 = e.0.min(d.target_kib);
            e.1 = e.1.max(d.target_kib);
        }
    }
    let total = range.len();
    let mut by_change: Vec<(&str, u64)> = range.into_iter().map(|(n, (lo, hi))| (n, hi - lo)).collect();
    by_change.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    // Domains whose target and use follow each other within 3 % over the
    // run (a group of alike VMs) are drawn once, their count in the legend.
    type Series = Vec<(u64, u64, Option<u64>)>;
    let mut series: std::collections::HashMap<&str, Series> = std::collections::HashMap::new();
    for r in records {
        for d in &r.domains {
            series.entry(d.name.as_str()).or_default().push((r.quantum, d.target_kib, d.used_kib));
        }
    }
    let mut top: Vec<&str> = Vec::new();
    let mut twins: Vec<usize> = Vec::new();
    for (name, _) in &by_change {
        match top.iter().position(|t| alike(&series[t], &series[name])) {
            Some(i) => twins[i] += 1,
            None if top.len() < TOP_DOMAINS => {
                top.push(name);
                twins.push(0);
            }
            None => {}
        }
    }
    let value = |r: &TimelineRecord, name: &str, used: bool| {
        r.domains.iter().find(|d| d.name == name).map(|d| gib(if used { d.used_kib.unwrap_or(0) } else { d.target_kib }))
    };
    let ymax = records
        .iter()
        .flat_map(|r| r.domains.iter().filter(|d| top.contains(&d.name.as_str())).map(|d| gib(d.target_kib.max(d.used_kib.unwrap_or(0)))))
        .fold(0.0, f64::max)
        .max(0.1)
        * 1.35;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Memory: balloon target (solid) vs guest used (dashed), top {} of {total} domains by change", top.len()),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("quantum")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("GiB")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, name) in top.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // A domain that comes and goes breaks its line: one segment per
        // run of quanta it was alive.
        for used in [false, true] {
            let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for r in records {
                match value(r, name, used) {
                    Some(v) => runs.last_mut().expect("one").push((r.quantum as f64, v)),
                    None if !runs.last().expect("one").is_empty() => runs.push(Vec::new()),
                    None => {}
                }
            }
            for (k, run) in runs.into_iter().filter(|r| !r.is_empty()).enumerate() {
                if used {
                    chart.draw_series(DashedLineSeries::new(run, 6, 4, color.stroke_width(2)))?;
                } else {
                    let s = chart.draw_series(LineSeries::new(run, color.stroke_width(3)))?;
                    if k == 0 {
                        let label = if twins[i] > 0 { format!("{name} (+{} alike)", twins[i]) } else { name.to_string() };
                        s.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
                    }
                }
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

fn host_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    records: &[TimelineRecord],
    x: std::ops::Range<f64>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let ymax = records.iter().map(|r| gib(r.host.available_kib.max(r.host.reserve_kib))).fold(0.0, f64::max).max(0.1) * 1.3;
    let mut chart = ChartBuilder::on(area)
        .caption("Host memory: available vs the reserve", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("quantum")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("GiB")
        .label_style(("sans-serif", 14))
        .draw()?;
    let available: Vec<(f64, f64)> = records.iter().map(|r| (r.quantum as f64, gib(r.host.available_kib))).collect();
    let reserve: Vec<(f64, f64)> = records.iter().map(|r| (r.quantum as f64, gib(r.host.reserve_kib))).collect();
    chart
        .draw_series(LineSeries::new(available, PALETTE[0].stroke_width(3)))?
        .label("host available")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[0].stroke_width(3)));
    chart
        .draw_series(DashedLineSeries::new(reserve, 8, 5, PIN_MARK.stroke_width(3)))?
        .label("reserve")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PIN_MARK.stroke_width(3)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// Two domains' (quantum, target, used) series are alike: the same quanta,
/// targets and uses within 3 % of the larger.
fn alike(a: &[(u64, u64, Option<u64>)], b: &[(u64, u64, Option<u64>)]) -> bool {
    let close = |x: u64, y: u64| x.abs_diff(y) <= x.max(y) / 33;
    a.len() == b.len()
        && a.iter().zip(b).all(|(p, q)| {
            p.0 == q.0
                && close(p.1, q.1)
                && match (p.2, q.2) {
                    (Some(x), Some(y)) => close(x, y),
                    (x, y) => x == y,
                }
        })
}
