//! `plot`: SVG charts from the JSON lines of `--json` runs — the latency
//! distribution (commit → ack per percentile, one line per rate and wake-up
//! mode) and the drain throughput per relay count (relay and bound H, one
//! line per store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

use crate::output::Output;

#[derive(Debug, Args)]
pub(crate) struct PlotArgs {
    /// Files of JSON lines written by `drain --json` and `latency --json`.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Directory for `latency.svg` and `drain.svg`.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
}

/// The highest percentile shown: 99.99 (four nines).
const MAX_NINES: f64 = 4.0;

pub(crate) fn run(args: PlotArgs, out: Output) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for path in &args.inputs {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let value: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON line", path.display(), n + 1))?;
            lines.push(value);
        }
    }
    let latency: Vec<&Value> = lines
        .iter()
        .filter(|v| v["scenario"] == "latency")
        .collect();
    let drain: Vec<&Value> = lines.iter().filter(|v| v["scenario"] == "drain").collect();
    if latency.is_empty() && drain.is_empty() {
        bail!("no drain or latency lines in the input");
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    if !latency.is_empty() {
        let path = args.out_dir.join("latency.svg");
        latency_chart(&latency, &path)?;
        out.line(format!("wrote {}", path.display()))?;
    }
    if !drain.is_empty() {
        let path = args.out_dir.join("drain.svg");
        drain_chart(&drain, &path)?;
        out.line(format!("wrote {}", path.display()))?;
    }
    Ok(())
}

/// `q` as "nines": 0.9 → 1, 0.99 → 2, … (capped at [`MAX_NINES`]).
fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        MAX_NINES
    } else {
        (-(1.0 - q).log10()).min(MAX_NINES)
    }
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn latency_chart(lines: &[&Value], path: &Path) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for line in lines {
        let (qs, ms) = (
            numbers(&line["curve_quantiles"]),
            numbers(&line["curve_ms"]),
        );
        if qs.is_empty() || qs.len() != ms.len() {
            continue; // a line from before the curve was recorded
        }
        let wakeup = if line["wakeup"] == true {
            "NOTIFY"
        } else {
            "polling"
        };
        let label = format!("{} ev/s, {wakeup}", line["rate"]);
        let points: Vec<(f64, f64)> = qs
            .iter()
            .zip(&ms)
            .filter(|(q, _)| nines(**q) <= MAX_NINES && **q < 1.0)
            .map(|(q, m)| (nines(*q), m.max(0.01)))
            .collect();
        series.push((label, points));
    }
    if series.is_empty() {
        bail!("the latency lines carry no curve_ms (rerun latency with this version)");
    }
    let max_ms = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "commit → JetStream ack latency by percentile",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..MAX_NINES, (0.05f64..max_ms * 2.0).log_scale())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms (log scale)")
        .x_labels(MAX_NINES as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(draw)?;
    for (i, (label, points)) in series.into_iter().enumerate() {
        line_with_points(&mut chart, label, points, Palette99::pick(i).to_rgba())?;
    }
    finish(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(draw)?;
    Ok(())
}

/// One series: a line through the points, a dot on each, and a legend entry.
fn line_with_points<'a, CT>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBAColor,
) -> anyhow::Result<()>
where
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
        .map_err(draw)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )
        .map_err(draw)?;
    Ok(())
}

/// The legend box.
fn finish<'a, CT>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)
}

fn percentile_label(nines: f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-nines));
    if q < 0.5 {
        "p0".into()
    } else {
        format!("p{}", (q * 100.0).round() / 100.0)
    }
}

fn drain_chart(lines: &[&Value], path: &Path) -> anyhow::Result<()> {
    // store → relays → (relay ev/s, bound H)
    let mut by_store: BTreeMap<String, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    for line in lines {
        let store = line["store"].as_str().unwrap_or("?").to_owned();
        let relays = line["relays"].as_u64().unwrap_or(1);
        let rate = line["events_per_s"].as_f64().unwrap_or(0.0);
        let bound = line["baseline_events_per_s"]
            .as_f64()
            .or_else(|| line["bound_h_per_s"].as_f64())
            .unwrap_or(0.0);
        by_store
            .entry(store)
            .or_default()
            .insert(relays, (rate, bound));
    }
    let max_relays = by_store
        .values()
        .flat_map(|m| m.keys().copied())
        .max()
        .unwrap_or(1);
    let max_rate = by_store
        .values()
        .flat_map(|m| m.values().map(|(r, h)| r.max(*h)))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("drain throughput by relay count", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.5f64..max_relays as f64 + 0.5, 0f64..max_rate * 1.1)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("relays")
        .y_desc("events/s")
        .x_labels(usize::try_from(max_relays).unwrap_or(8).min(16))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(draw)?;
    for (i, (store, points)) in by_store.iter().enumerate() {
        let color = Palette99::pick(2 * i).to_rgba();
        let bound_color = Palette99::pick(2 * i + 1).to_rgba();
        let relay: Vec<(f64, f64)> = points.iter().map(|(n, (r, _))| (*n as f64, *r)).collect();
        let bound: Vec<(f64, f64)> = points.iter().map(|(n, (_, h))| (*n as f64, *h)).collect();
        for (label, data, c) in [
            (format!("{store}: relay"), relay, color),
            (format!("{store}: bound H (same run)"), bound, bound_color),
        ] {
            line_with_points(&mut chart, label, data, c)?;
        }
    }
    finish(&mut chart, SeriesLabelPosition::MiddleRight)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart failed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_and_their_labels() {
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(nines(1.0), MAX_NINES);
        assert_eq!(percentile_label(2.0), "p99");
        assert_eq!(percentile_label(0.0), "p0");
    }

    #[test]
    fn charts_are_written_from_json_lines() {
        let dir = std::env::temp_dir().join(format!("proclaim-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        std::fs::write(
            &input,
            r#"{"scenario":"latency","rate":1000,"wakeup":true,"curve_quantiles":[0.5,0.99,0.999,1.0],"curve_ms":[0.7,2.7,9.6,15.3]}
{"scenario":"drain","store":"postgres","relays":1,"events_per_s":12000,"baseline_events_per_s":40000}
{"scenario":"drain","store":"postgres","relays":3,"events_per_s":12400,"baseline_events_per_s":37000}
"#,
        )
        .unwrap();
        run(
            PlotArgs {
                inputs: vec![input],
                out_dir: dir.clone(),
            },
            Output::new(false),
        )
        .unwrap();
        let latency = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        let drain = std::fs::read_to_string(dir.join("drain.svg")).unwrap();
        assert!(latency.starts_with("<svg") && latency.contains("1000 ev/s, NOTIFY"));
        assert!(drain.contains("postgres: relay") && drain.contains("polyline"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
