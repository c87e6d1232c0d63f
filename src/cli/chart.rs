//! The charts of `pskv bench`: bandwidth and latency against message
//! size, both axes logarithmic. Sizes are ticked at powers of two and
//! labeled exactly ("4 B", "64 KiB", "32 MiB"); rates and times at 1, 2 and
//! 5 of each decade, in the unit that reads right at that scale ("100 KB/s",
//! "12 GB/s", "850 ns", "3.4 ms"), never as "0.000".

use std::path::Path;

use super::error::{CliError, CliResult};

const KIB: f64 = 1024.0;

/// One line of a chart: its legend and its points (size in bytes, value).
pub struct Series {
    /// The legend.
    pub label: String,
    /// (bytes, value), ascending in bytes.
    pub points: Vec<(f64, f64)>,
}

/// The ticks of the size axis for the sizes measured: those sizes when
/// they are all powers of two and at most `max` (a bench's cases), else
/// the powers of two from the smallest size up to the largest, every
/// second, third, ... of them when there would be more than `max`.
pub fn size_ticks(sizes: &[f64], max: usize) -> Vec<f64> {
    let mut s: Vec<f64> = sizes
        .iter()
        .copied()
        .filter(|x| *x > 0.0 && x.is_finite())
        .collect();
    s.sort_by(f64::total_cmp);
    s.dedup();
    let (Some(&lo), Some(&hi)) = (s.first(), s.last()) else {
        return Vec::new();
    };
    if s.len() <= max.max(1) && s.iter().all(|x| x.log2().fract() == 0.0) {
        return s;
    }
    let (a, b) = (lo.log2().floor() as i32, hi.log2().ceil() as i32);
    let n = (b - a + 1) as usize;
    let step = n.div_ceil(max.max(1)).max(1);
    (a..=b).step_by(step).map(|e| 2f64.powi(e)).collect()
}

/// A byte count: exact for powers of two ("1 KiB", "32 MiB"), else with
/// three significant digits ("97.7 KiB").
pub fn size_label(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= KIB && u + 1 < units.len() {
        v /= KIB;
        u += 1;
    }
    format!("{} {}", significant(v), units[u])
}

/// The 1, 2 and 5 of every decade from below `lo` to above `hi`; only the
/// powers of ten when there would be more than `max`.
pub fn decade_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    if !(lo > 0.0 && hi >= lo && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let all: Vec<f64> = (a..=b)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|v| *v >= lo && *v <= hi)
        .collect();
    if all.len() <= max {
        return all;
    }
    (a..=b).map(|e| 10f64.powi(e)).collect()
}

/// A rate in bytes per second, with an SI prefix: "120 B/s", "100 KB/s",
/// "1.5 GB/s".
pub fn rate_label(bytes_per_s: f64) -> String {
    thousands(bytes_per_s, &[" B/s", " KB/s", " MB/s", " GB/s", " TB/s"])
}

/// Events per second: "3/s", "1.2k/s", "45M/s".
pub fn count_rate_label(per_s: f64) -> String {
    thousands(per_s, &["/s", "k/s", "M/s", "G/s"])
}

/// `v` in the largest of `units` (each 1000 times the one before) that
/// keeps it at least 1, to three significant digits.
fn thousands(mut v: f64, units: &[&str]) -> String {
    let mut u = 0;
    // From 999.5 up, three digits would print "1000": the next unit.
    while v >= 999.5 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{}{}", significant(v), units[u])
}

/// A time in seconds: "850 ns", "12 µs", "3.4 ms", "1.2 s".
pub fn time_label(s: f64) -> String {
    let (v, unit) = if s >= 0.9995 {
        (s, "s")
    } else if s >= 0.9995e-3 {
        (s * 1e3, "ms")
    } else if s >= 0.9995e-6 {
        (s * 1e6, "µs")
    } else {
        (s * 1e9, "ns")
    };
    format!("{} {unit}", significant(v))
}

/// Three significant digits, no trailing zeros: 1, 2.5, 97.7, 850.
fn significant(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// What a chart shows on its value axis.
pub struct Axis {
    /// The axis description.
    pub desc: &'static str,
    /// How a value reads.
    pub label: fn(f64) -> String,
}

/// Draws `series` against message size as an SVG file at `path`.
pub fn draw(path: &Path, title: &str, axis: Axis, series: &[Series]) -> CliResult {
    use plotters::coord::combinators::BindKeyPoints;
    use plotters::prelude::*;
    // Only what a log scale can show: finite, positive values.
    let ok = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0;
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            label: s.label.clone(),
            points: s.points.iter().copied().filter(ok).collect(),
        })
        .collect();
    let pts = || series.iter().flat_map(|s| s.points.iter().copied());
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::MAX, 0.0f64, f64::MAX, 0.0f64);
    for (x, y) in pts() {
        xlo = xlo.min(x);
        xhi = xhi.max(x);
        ylo = ylo.min(y);
        yhi = yhi.max(y);
    }
    if xhi == 0.0 {
        return Err(CliError::Failed(format!("{title}: nothing to chart")));
    }
    let err =
        |e: &dyn std::fmt::Display| CliError::Failed(format!("drawing {}: {e}", path.display()));
    let (xlo, xhi) = (xlo / 1.5, xhi * 1.5);
    let (ylo, yhi) = (ylo / 2.0, yhi * 2.0);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let sizes: Vec<f64> = pts().map(|(x, _)| x).collect();
    let x = (xlo..xhi).log_scale().with_key_points(
        size_ticks(&sizes, 12)
            .into_iter()
            .filter(|t| *t >= xlo && *t <= xhi)
            .collect(),
    );
    let y = (ylo..yhi).log_scale().with_key_points(
        decade_ticks(ylo, yhi, 12)
            .into_iter()
            .filter(|t| *t >= ylo && *t <= yhi)
            .collect(),
    );
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(&e))?;
    let label = axis.label;
    c.configure_mesh()
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_desc("bytes per key (one key)")
        .y_desc(axis.desc)
        .x_label_formatter(&|x| size_label(*x))
        .y_label_formatter(&|y| label(*y))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().filter(|s| !s.points.is_empty()).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(s.label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench's sizes get power-of-two ticks with exact labels (the old
    /// chart ticked at "98 KiB" and "977 KiB").
    #[test]
    fn size_ticks_are_powers_of_two_with_exact_labels() {
        // The bench's cases: ticked where they were measured.
        let cases = [
            4.0,
            4.0 * KIB,
            256.0 * KIB,
            4.0 * KIB * KIB,
            32.0 * KIB * KIB,
        ];
        let labels: Vec<String> = size_ticks(&cases, 12)
            .iter()
            .map(|t| size_label(*t))
            .collect();
        assert_eq!(labels, ["4 B", "4 KiB", "256 KiB", "4 MiB", "32 MiB"]);
        // Every power of two from 4 B to 32 MiB: every second one.
        let all: Vec<f64> = (2..=25).map(|e| 2f64.powi(e)).collect();
        let ticks = size_ticks(&all, 12);
        assert!(ticks.len() <= 12 && ticks.len() >= 6, "{ticks:?}");
        for t in &ticks {
            assert_eq!(t.log2().fract(), 0.0, "{t}");
        }
        let labels: Vec<String> = ticks.iter().map(|t| size_label(*t)).collect();
        assert_eq!(labels[0], "4 B");
        assert!(labels.iter().all(|l| !l.contains('.')), "{labels:?}");
        // Sizes that are not powers of two still get power-of-two ticks.
        let odd = size_ticks(&[100.0, 100_000.0], 12);
        assert!(odd.iter().all(|t| t.log2().fract() == 0.0), "{odd:?}");
        assert!(size_ticks(&[], 4).is_empty());
        assert_eq!(size_label(1024.0), "1 KiB");
        assert_eq!(size_label(256.0 * KIB), "256 KiB");
        assert_eq!(size_label(100_000.0), "97.7 KiB");
    }

    /// Tiny and huge values read right: 1e-4 GB/s is "100 KB/s", never
    /// "0.000".
    #[test]
    fn rates_and_times_read_right_at_any_scale() {
        assert_eq!(rate_label(1e-4 * 1e9), "100 KB/s");
        assert_eq!(rate_label(120.0), "120 B/s");
        assert_eq!(rate_label(1.5e9), "1.5 GB/s");
        assert_eq!(rate_label(12.34e9), "12.3 GB/s");
        assert_eq!(time_label(850e-9), "850 ns");
        assert_eq!(time_label(4.2e-6), "4.2 µs");
        assert_eq!(time_label(3.4e-3), "3.4 ms");
        assert_eq!(time_label(1.25), "1.25 s");
        assert_eq!(time_label(0.9996), "1 s");
        assert_eq!(rate_label(999.6e3), "1 MB/s");
        assert_eq!(count_rate_label(3.0), "3/s");
        assert_eq!(count_rate_label(1234.0), "1.23k/s");
        assert_eq!(count_rate_label(999.7), "1k/s");
        for v in decade_ticks(2e5, 3e9, 30) {
            let l = rate_label(v);
            assert!(!l.starts_with("0"), "{v}: {l}");
            let m = v / 10f64.powi(v.log10().floor() as i32);
            assert!([1.0, 2.0, 5.0].iter().any(|k| (m - k).abs() < 1e-9), "{v}");
        }
        let few = decade_ticks(1e2, 1e11, 8);
        assert_eq!(few.len(), 10, "{few:?}");
        assert!(decade_ticks(-1.0, 1.0, 8).is_empty());
    }
}
