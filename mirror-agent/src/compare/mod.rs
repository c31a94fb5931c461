//! Compare stage: the lab's table, live and mirror side by side.
//!
//! For each (endpoint, version tag, result code): count, average, p50 and p99 duration. Live
//! rows come from the captured responses (`ResponseMeta`), mirror rows from the replay outcomes;
//! mirror errors get pseudo-codes (`timeout`, `refused`, `reset`, `error`). Each mirrored request
//! is also paired with the live response to the same request, to count status mismatches and
//! the mirror/live latency ratio per endpoint. Endpoints are capped: beyond `max_endpoints`,
//! new ones are reported as `other`.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::http::ResponseMeta;
use crate::reassembly::ConnId;
use crate::replay::MirrorOutcome;

mod endpoint;
mod histogram;
mod report;
#[cfg(test)]
mod tests;

pub use endpoint::{endpoint_name, RouteTemplate};
pub use histogram::{SeriesHistogram, BUCKETS_S};
pub use report::{format_table, verdicts, LatencyRatio, Mismatch, Report, Row, Sampling};

#[derive(Clone, Debug)]
pub struct CompareConfig {
    pub live_label: String,
    pub mirror_label: String,
    pub routes: Vec<RouteTemplate>,
    pub max_endpoints: usize,
    /// (endpoint, version, code) series at most; results beyond go to `other` series.
    pub max_series: usize,
    /// Live responses or mirror outcomes waiting for their other half, at most.
    pub max_pending: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            live_label: "live".into(),
            mirror_label: "mirror".into(),
            routes: Vec::new(),
            max_endpoints: 500,
            max_series: 4096,
            max_pending: 100_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    Live,
    Mirror,
}

struct Agg {
    /// Every result, timed or not.
    count: u64,
    /// Over timed results only, as is the histogram.
    sum_ns: u128,
    /// Microseconds, two significant digits (1 % precision on percentiles) and 32-bit counts:
    /// about a tenth of the memory of three digits and 64-bit counts, so that many series fit.
    hist: Histogram<u32>,
}

impl Agg {
    fn new() -> Self {
        Agg {
            count: 0,
            sum_ns: 0,
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
        }
    }
    fn add(&mut self, ns: Option<u64>) {
        self.count += 1;
        if let Some(ns) = ns {
            self.sum_ns += ns as u128;
            self.hist.saturating_record((ns / 1000).max(1));
        }
    }
    fn timed(&self) -> u64 {
        self.hist.len()
    }
}

/// Bytes one series costs: its histogram's counts, its key's strings and the map's node.
pub fn series_bytes() -> u64 {
    let counts = Agg::new().hist.distinct_values() * std::mem::size_of::<u32>();
    (counts + std::mem::size_of::<Agg>() + 256) as u64
}

type PairKey = (ConnId, u64);

struct Half {
    name: String,
    code: String,
    ns: Option<u64>,
}

pub struct Comparator {
    cfg: CompareConfig,
    aggs: BTreeMap<(String, Side, String), Agg>,
    endpoints: HashSet<String>,
    other: u64,
    other_series: u64,
    waiting: [HashMap<PairKey, Half>; 2],
    order: VecDeque<(Side, PairKey)>,
    mismatches: BTreeMap<(String, String, String), u64>,
    ratios: BTreeMap<String, (u64, f64)>,
    evicted: u64,
    sampling: Option<Sampling>,
}

impl Comparator {
    pub fn new(cfg: CompareConfig) -> Self {
        Comparator {
            cfg,
            aggs: BTreeMap::new(),
            endpoints: HashSet::new(),
            other: 0,
            other_series: 0,
            waiting: [HashMap::new(), HashMap::new()],
            order: VecDeque::new(),
            sampling: None,
            mismatches: BTreeMap::new(),
            ratios: BTreeMap::new(),
            evicted: 0,
        }
    }

    pub fn config(&self) -> &CompareConfig {
        &self.cfg
    }

    /// The endpoint name for a request, `other` once the cap is reached.
    pub fn endpoint(&mut self, method: &str, target: &str) -> String {
        let name = endpoint_name(method, target, &self.cfg.routes);
        if self.endpoints.contains(&name) {
            return name;
        }
        if self.endpoints.len() >= self.cfg.max_endpoints {
            self.other += 1;
            return "other".into();
        }
        self.endpoints.insert(name.clone());
        name
    }

    pub fn live(&mut self, m: &ResponseMeta) {
        let name = self.endpoint(&m.method, &m.target);
        let code = m.code();
        self.record(
            Side::Live,
            (m.conn, m.request_seq),
            name,
            code,
            Some(m.duration_ns()),
        );
    }

    pub fn mirror(&mut self, o: &MirrorOutcome) {
        let name = self.endpoint(&o.method, &o.target);
        self.record(
            Side::Mirror,
            (o.conn, o.seq),
            name,
            o.result.code(),
            o.duration.map(|d| d.as_nanos() as u64),
        );
    }

    fn record(&mut self, side: Side, key: PairKey, name: String, code: String, ns: Option<u64>) {
        let mut series = (name.clone(), side, code.clone());
        if !self.aggs.contains_key(&series) && self.aggs.len() >= self.cfg.max_series {
            // Over the cap: one `other` series per side and code, as long as a little headroom
            // lasts, then one per side.
            self.other_series += 1;
            series.0 = "other".into();
            if !self.aggs.contains_key(&series) && self.aggs.len() >= self.cfg.max_series + 64 {
                series.2 = "other".into();
            }
        }
        self.aggs.entry(series).or_insert_with(Agg::new).add(ns);
        let other = match side {
            Side::Live => Side::Mirror,
            Side::Mirror => Side::Live,
        };
        if let Some(peer) = self.waiting[other as usize].remove(&key) {
            let (live, mirror) = match side {
                Side::Live => (Half { name, code, ns }, peer),
                Side::Mirror => (peer, Half { name, code, ns }),
            };
            self.pair(live, mirror);
            return;
        }
        if self.order.len() >= self.cfg.max_pending {
            while let Some((s, k)) = self.order.pop_front() {
                if self.waiting[s as usize].remove(&k).is_some() {
                    self.evicted += 1;
                    break;
                }
            }
        }
        self.waiting[side as usize].insert(key, Half { name, code, ns });
        self.order.push_back((side, key));
        // Keys paired since leave from the front, so that the queue holds about what waits.
        while let Some((s, k)) = self.order.front() {
            if self.waiting[*s as usize].contains_key(k) {
                break;
            }
            self.order.pop_front();
        }
        // A key that waits long (its peer lost) stops that: sweep the rest now and then.
        if self.order.len() > 2 * self.cfg.max_pending.max(1) {
            let waiting = &self.waiting;
            self.order
                .retain(|(s, k)| waiting[*s as usize].contains_key(k));
        }
    }

    fn pair(&mut self, live: Half, mirror: Half) {
        if live.code != mirror.code {
            *self
                .mismatches
                .entry((live.name.clone(), live.code, mirror.code))
                .or_default() += 1;
        }
        if let (Some(l), Some(m)) = (live.ns, mirror.ns) {
            if l > 0 {
                let e = self.ratios.entry(live.name).or_default();
                e.0 += 1;
                e.1 += m as f64 / l as f64;
            }
        }
    }

    pub fn report(&self) -> Report {
        let label = |s: Side| match s {
            Side::Live => self.cfg.live_label.clone(),
            Side::Mirror => self.cfg.mirror_label.clone(),
        };
        let ms = |us: u64| us as f64 / 1000.0;
        Report {
            rows: self
                .aggs
                .iter()
                .map(|((name, side, code), a)| Row {
                    name: name.clone(),
                    version: label(*side),
                    side: *side,
                    code: code.clone(),
                    count: a.count,
                    timed: a.timed(),
                    avg_ms: a.sum_ns as f64 / a.timed().max(1) as f64 / 1e6,
                    p50_ms: ms(a.hist.value_at_quantile(0.5)),
                    p99_ms: ms(a.hist.value_at_quantile(0.99)),
                })
                .collect(),
            mismatches: self
                .mismatches
                .iter()
                .map(|((name, l, m), n)| Mismatch {
                    name: name.clone(),
                    live_code: l.clone(),
                    mirror_code: m.clone(),
                    count: *n,
                })
                .collect(),
            latency_ratios: self
                .ratios
                .iter()
                .map(|(name, (n, sum))| LatencyRatio {
                    name: name.clone(),
                    pairs: *n,
                    mean_ratio: sum / *n as f64,
                })
                .collect(),
            other_endpoint_results: self.other,
            other_series_results: self.other_series,
            unpaired_evicted: self.evicted,
            sampling: self.sampling,
        }
    }
}

/// The comparison as the other stages see it: the pipeline records live responses, the replay
/// stage mirror outcomes, and metrics read reports, all through one shared `Comparator`.
#[derive(Clone)]
pub struct Comparison(Arc<Mutex<Comparator>>);

impl Comparison {
    pub fn new(cfg: CompareConfig) -> Self {
        Comparison(Arc::new(Mutex::new(Comparator::new(cfg))))
    }

    pub fn live(&self, m: &ResponseMeta) {
        self.lock().live(m);
    }

    pub fn mirror(&self, o: &MirrorOutcome) {
        self.lock().mirror(o);
    }

    pub fn report(&self) -> Report {
        self.lock().report()
    }

    pub fn set_sampling(&self, s: Sampling) {
        self.lock().sampling = Some(s);
    }

    /// The report and the series' histograms, taken together.
    pub fn snapshot(&self) -> (Report, Vec<SeriesHistogram>) {
        let c = self.lock();
        (c.report(), c.histograms())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Comparator> {
        // A panic while recording cannot leave the aggregates half-updated in a way that
        // matters for a report; keep serving them.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl From<Comparator> for Comparison {
    fn from(c: Comparator) -> Self {
        Comparison(Arc::new(Mutex::new(c)))
    }
}
