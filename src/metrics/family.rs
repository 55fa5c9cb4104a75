//! Counters, gauges and histograms, each in a family with fixed label names, rendered
//! in Prometheus' text exposition format 0.0.4. Handles are cheap clones of shared
//! atomics, so a hot path (bytes of a blob) looks its series up once and then only adds.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One series' value and how it renders.
pub trait Metric: Clone + Send + Sync {
    /// The `# TYPE` word.
    const TYPE: &'static str;
    /// Appends the series' sample lines; `labels` is `a="x",b="y"` (maybe empty).
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

/// A count that only goes up.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels, ""), self.get());
    }
}

/// A value that goes up and down.
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// +1 until the returned guard is dropped (so an early return or a panic
    /// cannot leave the gauge counting something that is over).
    pub fn hold(&self) -> GaugeGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(self.clone())
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels, ""), self.get());
    }
}

/// One unit of a [`Gauge`], given back on drop.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Observations counted into fixed buckets (upper bounds), with their sum.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Arc<Mutex<HistogramState>>,
}

#[derive(Debug)]
struct HistogramState {
    /// Per bucket, not cumulative; one more than `bounds` for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            state: Arc::new(Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            })),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.counts[bucket] += 1;
        state.sum += value;
    }

    /// (cumulative counts per bucket including `+Inf`, sum).
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let cumulative = state
            .counts
            .iter()
            .scan(0, |total, n| {
                *total += n;
                Some(*total)
            })
            .collect();
        (cumulative, state.sum)
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let (cumulative, sum) = self.snapshot();
        let bounds = self.bounds.iter().map(|b| b.to_string());
        for (le, count) in bounds.chain(["+Inf".to_string()]).zip(&cumulative) {
            let le = format!("le=\"{le}\"");
            let _ = writeln!(out, "{name}_bucket{} {count}", braces(labels, &le));
        }
        let count = cumulative.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels, ""));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels, ""));
    }
}

/// `{labels,extra}`, or nothing when both are empty.
fn braces(labels: &str, extra: &str) -> String {
    match (labels.is_empty(), extra.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("{{{labels}}}"),
        (true, false) => format!("{{{extra}}}"),
        (false, false) => format!("{{{labels},{extra}}}"),
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every series of one metric: one per combination of label values.
pub struct Family<M: Metric, const N: usize> {
    name: &'static str,
    help: &'static str,
    labels: [&'static str; N],
    make: fn() -> M,
    series: Mutex<Vec<([String; N], M)>>,
}

impl<M: Metric, const N: usize> Family<M, N> {
    /// A family; one without labels has its single series from the start, so it
    /// renders (as 0) before anything happened.
    pub fn new(
        name: &'static str,
        help: &'static str,
        labels: [&'static str; N],
        make: fn() -> M,
    ) -> Self {
        let series = if N == 0 {
            vec![(std::array::from_fn(|_| String::new()), make())]
        } else {
            Vec::new()
        };
        Family {
            name,
            help,
            labels,
            make,
            series: Mutex::new(series),
        }
    }

    /// The series with these label values (in the order of the label names), created
    /// on first use.
    pub fn with(&self, values: [&str; N]) -> M {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, metric)) = series.iter().find(|(v, _)| v.iter().eq(values.iter())) {
            return metric.clone();
        }
        let metric = (self.make)();
        series.push((values.map(str::to_string), metric.clone()));
        metric
    }

    /// `# HELP`, `# TYPE` and every series, sorted by label values.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        for (values, metric) in series {
            let labels: Vec<String> = self
                .labels
                .iter()
                .zip(&values)
                .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
                .collect();
            metric.render(self.name, &labels.join(","), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_family_renders_sorted_series_with_escaped_labels() {
        let family: Family<Counter, 2> =
            Family::new("x_total", "Things.", ["a", "b"], Counter::default);
        family.with(["z", "1"]).inc();
        family.with(["q\"\\\n", "2"]).add(5);
        family.with(["z", "1"]).inc();
        let mut out = String::new();
        family.render(&mut out);
        assert_eq!(
            out,
            "# HELP x_total Things.\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"\\\\\\n\",b=\"2\"} 5\nx_total{a=\"z\",b=\"1\"} 2\n"
        );
    }

    #[test]
    fn unlabelled_gauge_renders_zero_and_follows_its_guards() {
        let family: Family<Gauge, 0> = Family::new("g", "G.", [], Gauge::default);
        let gauge = family.with([]);
        let mut out = String::new();
        family.render(&mut out);
        assert!(out.ends_with("\ng 0\n"), "{out}");
        let one = gauge.hold();
        let two = gauge.hold();
        assert_eq!(gauge.get(), 2);
        drop(one);
        drop(two);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        static BOUNDS: [f64; 3] = [0.5, 1.0, 2.5];
        let family: Family<Histogram, 1> =
            Family::new("d_seconds", "D.", ["r"], || Histogram::new(&BOUNDS));
        let h = family.with(["x"]);
        for v in [0.25, 0.5, 0.75, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        family.render(&mut out);
        let samples: Vec<&str> = out.lines().skip(2).collect();
        assert_eq!(
            samples,
            [
                "d_seconds_bucket{r=\"x\",le=\"0.5\"} 2",
                "d_seconds_bucket{r=\"x\",le=\"1\"} 3",
                "d_seconds_bucket{r=\"x\",le=\"2.5\"} 3",
                "d_seconds_bucket{r=\"x\",le=\"+Inf\"} 4",
                "d_seconds_sum{r=\"x\"} 4.5",
                "d_seconds_count{r=\"x\"} 4",
            ]
        );
    }
}
