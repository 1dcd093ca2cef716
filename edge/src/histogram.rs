//! Prometheus histograms with fixed buckets: cheap to observe (one comparison per bucket
//! at most, no allocation) and rendered in the text exposition format. A leaf module:
//! the core records into them, the metrics snapshot carries them, `metrics` renders them.

use std::fmt::Write as _;

/// A cumulative histogram.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Latency buckets in seconds: 0.25 ms to 10 s.
pub const LATENCY_BUCKETS_S: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Batch size buckets (records per commit).
pub const BATCH_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds; +Inf is implicit).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one value.
    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends the histogram in Prometheus text format; `labels` like `core="0"`.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        self.render_samples(out, name, labels);
    }

    /// Appends the samples only (no `HELP`/`TYPE`), for one label set of a family.
    pub fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "t", "test", "core=\"0\"");
        assert!(out.contains("t_bucket{core=\"0\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{core=\"0\",le=\"2\"} 3\n"));
        assert!(out.contains("t_bucket{core=\"0\",le=\"+Inf\"} 4\n"));
        assert!(out.contains("t_sum{core=\"0\"} 6.5\n"));
        assert!(out.contains("t_count{core=\"0\"} 4\n"));
    }
}
