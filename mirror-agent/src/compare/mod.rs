//! Compare stage: the lab's table, live and mirror side by side.
//!
//! For each (endpoint, version tag, result code): count, average, p50 and p99 duration. Live
//! rows come from the captured responses (`ResponseMeta`), mirror rows from the replay outcomes;
//! mirror errors get pseudo-codes (`timeout`, `refused`, `reset`, `error`). Each mirrored request
//! is also paired with the live response to the same request, to count status mismatches and
//! the mirror/live latency ratio per endpoint. Endpoints are capped: beyond `max_endpoints`,
//! new ones are reported as `other`.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::exchange::{ConnId, MirrorOutcome, MirrorResult, OutcomeSink};
use crate::http::{LiveContent, ResponseMeta};
use crate::{FastMap, FastSet};
use diffs::DiffConfig;
use waiting::Waiting;
use worker::ContentWorker;

pub mod content;
pub mod diffs;
mod endpoint;
pub mod gate;
mod histogram;
pub mod page;
mod report;
#[cfg(test)]
mod tests;
mod verdict;
mod waiting;
pub mod worker;

use endpoint::write_endpoint_name;
pub use endpoint::{endpoint_name, RouteTemplate};
pub use histogram::{SeriesHistogram, BUCKETS_S};
pub use report::{
    format_table, LatencyRatio, Mismatch, Paired, PressureSeen, Report, Row, Sampling,
};
pub use verdict::{judge, verdict_lines, verdicts, Verdict, VerdictKind};

#[derive(Clone, Debug)]
pub struct CompareConfig {
    pub live_label: String,
    /// One version tag per mirror, in the order the agent numbers its mirrors.
    pub mirror_labels: Vec<String>,
    pub routes: Vec<RouteTemplate>,
    pub max_endpoints: usize,
    /// (endpoint, version, code) series at most; results beyond go to `other` series.
    pub max_series: usize,
    /// Requests whose live response or mirror outcomes wait for the rest, at most.
    pub max_pending: usize,
    /// Compare contents, not only status and timing (`--compare-bodies`).
    pub diffs: Option<DiffConfig>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            live_label: "live".into(),
            mirror_labels: vec!["mirror".into()],
            routes: Vec::new(),
            max_endpoints: 500,
            max_series: 4096,
            max_pending: 100_000,
            diffs: None,
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

/// Where a result comes from: `LIVE`, or mirror `n` as `n + 1`.
type Source = u8;
const LIVE: Source = 0;

/// Most mirrors one agent compares (their index is kept in a byte).
pub const MAX_MIRRORS: usize = 32;

/// Codes past which a numbered `grpc-status` (one without a name) is counted as `other`.
const MAX_CODES: usize = 2048;

/// A `grpc-status` with no name, shown as `grpc-N`.
fn numbered(grpc_status: u32) -> bool {
    grpc_status > 16
}

/// Endpoint names and result codes are few and repeat with every result: each is allocated
/// once and shared.
type Name = Arc<str>;

/// The shared copy of `s`, added to `set` if it is new.
fn intern(set: &mut FastSet<Name>, s: &str) -> Name {
    match set.get(s) {
        Some(n) => Arc::clone(n),
        None => {
            let n: Name = s.into();
            set.insert(Arc::clone(&n));
            n
        }
    }
}

/// The code for `key`: from `cache`, or made by `code` and interned in `codes`, then kept in
/// `cache` while it has room. HTTP statuses have three digits and gRPC's named codes are 17,
/// but a `grpc-status` can be any number: numbered ones fold into `other` once the codes are
/// many.
fn cached_code<K: std::hash::Hash + Eq>(
    cache: &mut FastMap<K, Name>,
    codes: &mut FastSet<Name>,
    key: K,
    numbered_grpc: bool,
    code: impl FnOnce() -> String,
) -> Name {
    if let Some(c) = cache.get(&key) {
        return Arc::clone(c);
    }
    let code = code();
    let c = if numbered_grpc && codes.len() >= MAX_CODES && !codes.contains(code.as_str()) {
        intern(codes, "other")
    } else {
        intern(codes, &code)
    };
    if cache.len() < MAX_CODES {
        cache.insert(key, Arc::clone(&c));
    }
    c
}

struct Half {
    name: Name,
    code: Name,
    ns: Option<u64>,
}

/// One request's results, until the live response has met every mirror's outcome.
#[derive(Default)]
struct Pending {
    live: Option<Half>,
    /// Mirror outcomes that came before the live response.
    early: Vec<(Source, Half)>,
    /// Mirrors paired with the live response so far.
    paired: usize,
}

/// What pairing found, per endpoint and mirror.
#[derive(Default)]
struct Pairs {
    /// (endpoint, mirror, live code, mirror code) → count.
    mismatches: BTreeMap<(Name, Source, Name, Name), u64>,
    /// (endpoint, mirror) → (pairs, sum of mirror/live duration ratios).
    ratios: BTreeMap<(Name, Source), (u64, f64)>,
    /// (endpoint, mirror) → pairs, timed or not: what a verdict's share is of.
    paired: BTreeMap<(Name, Source), u64>,
}

impl Pairs {
    fn pair(&mut self, live: &Half, src: Source, mirror: &Half) {
        *self.paired.entry((live.name.clone(), src)).or_default() += 1;
        if live.code != mirror.code {
            *self
                .mismatches
                .entry((
                    live.name.clone(),
                    src,
                    live.code.clone(),
                    mirror.code.clone(),
                ))
                .or_default() += 1;
        }
        if let (Some(l), Some(m)) = (live.ns, mirror.ns) {
            if l > 0 {
                let e = self.ratios.entry((live.name.clone(), src)).or_default();
                e.0 += 1;
                e.1 += m as f64 / l as f64;
            }
        }
    }
}

pub struct Comparator {
    cfg: CompareConfig,
    aggs: BTreeMap<(Name, Source, Name), Agg>,
    endpoints: FastSet<Name>,
    /// Result codes seen (statuses have three digits: a thousand at most, with the others).
    codes: FastSet<Name>,
    /// The code of a live status (and `grpc-status`), and of a mirror's result, found without
    /// formatting it again.
    live_codes: FastMap<(u16, Option<u32>), Name>,
    mirror_codes: FastMap<MirrorResult, Name>,
    /// The endpoint name being looked up, kept for its capacity.
    name_buf: String,
    other: u64,
    other_series: u64,
    pending: Waiting<Pending>,
    pairs: Pairs,
    evicted: u64,
    sampling: Option<Sampling>,
}

impl Comparator {
    pub fn new(cfg: CompareConfig) -> Self {
        Comparator {
            cfg,
            aggs: BTreeMap::new(),
            endpoints: FastSet::default(),
            codes: FastSet::default(),
            live_codes: FastMap::default(),
            mirror_codes: FastMap::default(),
            name_buf: String::new(),
            other: 0,
            other_series: 0,
            pending: Waiting::new(),
            pairs: Pairs::default(),
            evicted: 0,
            sampling: None,
        }
    }

    pub fn config(&self) -> &CompareConfig {
        &self.cfg
    }

    /// The endpoint name for a request, `other` once the cap is reached.
    pub fn endpoint(&mut self, method: &str, target: &str) -> Name {
        write_endpoint_name(&mut self.name_buf, method, target, &self.cfg.routes);
        if let Some(n) = self.endpoints.get(self.name_buf.as_str()) {
            return Arc::clone(n);
        }
        if self.endpoints.len() >= self.cfg.max_endpoints {
            self.other += 1;
            return intern(&mut self.codes, "other");
        }
        intern(&mut self.endpoints, &self.name_buf)
    }

    pub fn live(&mut self, m: &ResponseMeta) {
        let name = self.endpoint(&m.method, &m.target);
        let code = cached_code(
            &mut self.live_codes,
            &mut self.codes,
            (m.status, m.grpc_status),
            m.grpc_status.is_some_and(numbered),
            || m.code(),
        );
        self.record(
            LIVE,
            (m.conn, m.request_seq),
            name,
            code,
            Some(m.duration_ns()),
        );
    }

    /// An outcome of mirror number `mirror` (0-based, as in `mirror_labels`). Returns its
    /// endpoint's name.
    pub fn mirror(&mut self, mirror: usize, o: &MirrorOutcome) -> Name {
        let name = self.endpoint(&o.method, &o.target);
        let src = Source::try_from(mirror + 1).unwrap_or(Source::MAX);
        let code = cached_code(
            &mut self.mirror_codes,
            &mut self.codes,
            o.result,
            matches!(o.result, MirrorResult::Grpc(_, g) if numbered(g)),
            || o.result.code(),
        );
        self.record(
            src,
            (o.conn, o.seq),
            Arc::clone(&name),
            code,
            o.duration.map(|d| d.as_nanos() as u64),
        );
        name
    }

    /// The version tag of a source.
    fn label(&self, src: Source) -> &str {
        match src {
            LIVE => &self.cfg.live_label,
            m => self
                .cfg
                .mirror_labels
                .get(usize::from(m) - 1)
                .map_or("mirror", String::as_str),
        }
    }

    fn record(&mut self, src: Source, key: PairKey, name: Name, code: Name, ns: Option<u64>) {
        let mut series = (Arc::clone(&name), src, Arc::clone(&code));
        if !self.aggs.contains_key(&series) && self.aggs.len() >= self.cfg.max_series {
            // Over the cap: one `other` series per source and code, as long as a little
            // headroom lasts, then one per source.
            self.other_series += 1;
            series.0 = intern(&mut self.codes, "other");
            if !self.aggs.contains_key(&series) && self.aggs.len() >= self.cfg.max_series + 64 {
                series.2 = intern(&mut self.codes, "other");
            }
        }
        self.aggs.entry(series).or_insert_with(Agg::new).add(ns);
        let mirrors = self.cfg.mirror_labels.len();
        if mirrors == 0 {
            return;
        }
        let half = Half { name, code, ns };
        let evicted = &mut self.evicted;
        let p = self.pending.entry(key, self.cfg.max_pending, |p| {
            // Its halves that met nothing are counted.
            let live_alone = p.live.is_some() && p.paired == 0;
            *evicted += u64::from(live_alone) + p.early.len() as u64;
        });
        if src == LIVE {
            for (m, early) in p.early.drain(..) {
                self.pairs.pair(&half, m, &early);
                p.paired += 1;
            }
            p.live = Some(half);
        } else if let Some(live) = &p.live {
            self.pairs.pair(live, src, &half);
            p.paired += 1;
        } else {
            p.early.push((src, half));
        }
        if p.paired >= mirrors {
            self.pending.remove(&key);
        }
    }

    pub fn report(&self) -> Report {
        let ms = |us: u64| us as f64 / 1000.0;
        Report {
            rows: self
                .aggs
                .iter()
                .map(|((name, src, code), a)| Row {
                    name: name.to_string(),
                    version: self.label(*src).to_string(),
                    side: if *src == LIVE {
                        Side::Live
                    } else {
                        Side::Mirror
                    },
                    code: code.to_string(),
                    count: a.count,
                    timed: a.timed(),
                    avg_ms: a.sum_ns as f64 / a.timed().max(1) as f64 / 1e6,
                    p50_ms: ms(a.hist.value_at_quantile(0.5)),
                    p99_ms: ms(a.hist.value_at_quantile(0.99)),
                })
                .collect(),
            mismatches: self
                .pairs
                .mismatches
                .iter()
                .map(|((name, src, l, m), n)| Mismatch {
                    name: name.to_string(),
                    mirror: self.label(*src).to_string(),
                    live_code: l.to_string(),
                    mirror_code: m.to_string(),
                    count: *n,
                })
                .collect(),
            latency_ratios: self
                .pairs
                .ratios
                .iter()
                .map(|((name, src), (n, sum))| LatencyRatio {
                    name: name.to_string(),
                    mirror: self.label(*src).to_string(),
                    pairs: *n,
                    mean_ratio: sum / *n as f64,
                })
                .collect(),
            paired: self
                .pairs
                .paired
                .iter()
                .map(|((name, src), n)| Paired {
                    name: name.to_string(),
                    mirror: self.label(*src).to_string(),
                    count: *n,
                })
                .collect(),
            verdicts: Vec::new(),
            mirrors: self.cfg.mirror_labels.clone(),
            content: Vec::new(),
            content_not_compared: None,
            other_endpoint_results: self.other,
            other_series_results: self.other_series,
            unpaired_evicted: self.evicted,
            sampling: self.sampling,
            requests_read_at: Default::default(),
        }
    }
}

/// The comparison as the other stages see it: the pipeline records live responses, the replay
/// stage mirror outcomes, and metrics read reports, all through one shared `Comparator`; with
/// `--compare-bodies`, contents go on to the comparison's own thread.
#[derive(Clone)]
pub struct Comparison {
    shared: Arc<Mutex<Comparator>>,
    content: Option<Arc<ContentWorker>>,
}

impl Comparison {
    /// Fails only when contents are compared and their thread cannot start.
    pub fn new(cfg: CompareConfig) -> std::io::Result<Self> {
        let content = match cfg.diffs.clone() {
            Some(d) => Some(Arc::new(ContentWorker::start(
                d,
                cfg.mirror_labels.clone(),
            )?)),
            None => None,
        };
        Ok(Comparison {
            shared: Arc::new(Mutex::new(Comparator::new(cfg))),
            content,
        })
    }

    pub fn live(&self, m: &ResponseMeta) {
        self.lock().live(m);
    }

    pub fn mirror(&self, mirror: usize, o: &MirrorOutcome) {
        let name = self.lock().mirror(mirror, o);
        if let Some(w) = &self.content {
            let answered = matches!(o.result, MirrorResult::Status(_) | MirrorResult::Grpc(..));
            w.mirror(
                (o.conn, o.seq),
                name.to_string(),
                mirror,
                answered,
                o.content.clone(),
            );
        }
    }

    /// A live response's content, read whole (`--compare-bodies`).
    pub fn live_content(&self, l: &LiveContent) {
        if let Some(w) = &self.content {
            let name = self.lock().endpoint(&l.method, &l.target);
            w.live(
                (l.conn, l.request_seq),
                name.to_string(),
                &l.method,
                &l.target,
                Arc::clone(&l.content),
            );
        }
    }

    /// The report, with its verdicts.
    pub fn report(&self) -> Report {
        let mut r = self.lock().report();
        self.add_content(&mut r);
        r.verdicts = judge(&r);
        r
    }

    pub fn set_sampling(&self, s: Sampling) {
        self.lock().sampling = Some(s);
    }

    /// The report and the series' histograms, taken together.
    pub fn snapshot(&self) -> (Report, Vec<SeriesHistogram>) {
        let (mut r, h) = {
            let c = self.lock();
            (c.report(), c.histograms())
        };
        self.add_content(&mut r);
        r.verdicts = judge(&r);
        (r, h)
    }

    /// The content comparison's handle, if contents are compared.
    pub fn content(&self) -> Option<&ContentWorker> {
        self.content.as_deref()
    }

    /// Where mirror `mirror`'s replay stage sends its outcomes.
    pub fn outcomes_of(&self, mirror: usize) -> MirrorOutcomes {
        MirrorOutcomes {
            comparison: self.clone(),
            mirror,
        }
    }

    fn add_content(&self, r: &mut Report) {
        if let Some(w) = &self.content {
            let (rows, not) = w.report();
            r.content = rows;
            r.content_not_compared = Some(not);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Comparator> {
        // A panic while recording cannot leave the aggregates half-updated in a way that
        // matters for a report; keep serving them.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl From<Comparator> for Comparison {
    fn from(c: Comparator) -> Self {
        Comparison {
            shared: Arc::new(Mutex::new(c)),
            content: None,
        }
    }
}

/// One mirror's outcomes, on their way into the comparison.
pub struct MirrorOutcomes {
    comparison: Comparison,
    mirror: usize,
}

impl OutcomeSink for MirrorOutcomes {
    fn outcome(&self, o: MirrorOutcome) {
        log::debug!(
            "mirror {} {} -> {} in {:?}",
            o.method,
            o.target,
            o.result.code(),
            o.duration
        );
        self.comparison.mirror(self.mirror, &o);
    }
}
