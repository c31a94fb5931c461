//! The comparison's series as Prometheus histograms.

use super::Comparator;

/// Upper bounds (seconds) of the exported duration histograms: from 100 µs, so that a fleet's
/// quantiles stay within a bucket of the truth for sub-millisecond endpoints, to 30 s.
pub const BUCKETS_S: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// One (endpoint, version, code) series as a Prometheus histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesHistogram {
    pub name: String,
    pub version: String,
    pub code: String,
    pub sum_seconds: f64,
    pub count: u64,
    /// Per-bucket counts for `BUCKETS_S` then +Inf.
    pub buckets: Vec<(f64, u64)>,
}

impl Comparator {
    pub fn histograms(&self) -> Vec<SeriesHistogram> {
        self.aggs
            .iter()
            .map(|((name, src, code), a)| {
                let mut buckets = Vec::with_capacity(BUCKETS_S.len() + 1);
                let mut below = 0;
                for b in BUCKETS_S {
                    let upto = a.hist.count_between(0, (b * 1e6) as u64);
                    buckets.push((b, upto - below));
                    below = upto;
                }
                buckets.push((f64::INFINITY, a.timed() - below));
                SeriesHistogram {
                    name: name.to_string(),
                    version: self.label(*src).to_string(),
                    code: code.to_string(),
                    sum_seconds: a.sum_ns as f64 / 1e9,
                    count: a.timed(),
                    buckets,
                }
            })
            .collect()
    }
}
