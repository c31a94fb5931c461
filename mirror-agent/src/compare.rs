//! Compare stage: the lab's table, live and mirror side by side.
//!
//! For each (endpoint, version tag, result code): count, average, p50 and p99 duration. Live
//! rows come from the captured responses (`ResponseMeta`), mirror rows from the replay outcomes;
//! mirror errors get pseudo-codes (`timeout`, `refused`, `reset`, `error`). Each mirrored request
//! is also paired with the live response to the same request, to count status mismatches and
//! the mirror/live latency ratio per endpoint. Endpoints are capped: beyond `max_endpoints`,
//! new ones are reported as `other`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::http::ResponseMeta;
use crate::reassembly::ConnId;
use crate::replay::MirrorOutcome;

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

/// A user's route template, e.g. `/api/books/{id}/reviews`: `{…}` matches one path segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTemplate {
    text: String,
    segments: Vec<Option<String>>,
}

impl std::str::FromStr for RouteTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("route {s:?} must start with /"));
        }
        let segments = s
            .split('/')
            .skip(1)
            .map(|seg| {
                if seg.starts_with('{') && seg.ends_with('}') {
                    None
                } else {
                    Some(seg.to_string())
                }
            })
            .collect();
        Ok(RouteTemplate {
            text: s.to_string(),
            segments,
        })
    }
}

impl RouteTemplate {
    fn matches(&self, path: &str) -> bool {
        let mut parts = path.split('/').skip(1);
        for seg in &self.segments {
            match (parts.next(), seg) {
                (None, _) => return false,
                (Some(p), Some(lit)) if p != lit => return false,
                _ => {}
            }
        }
        parts.next().is_none()
    }
}

/// `METHOD /path` with the query dropped and identifier-like segments (numbers, UUIDs, long hex)
/// replaced by `{id}`, unless a route template matches first.
pub fn endpoint_name(method: &str, target: &str, routes: &[RouteTemplate]) -> String {
    // Absolute-form targets keep only their path.
    let target = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map(|p| &target[i + 3 + p..])
            .unwrap_or("/"),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let path = if path.is_empty() { "/" } else { path };
    if let Some(r) = routes.iter().find(|r| r.matches(path)) {
        return format!("{method} {}", r.text);
    }
    let mut out = String::with_capacity(path.len() + method.len() + 1);
    out.push_str(method);
    out.push(' ');
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if is_identifier(seg) { "{id}" } else { seg });
    }
    out
}

fn is_identifier(seg: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let parts: Vec<&str> = seg.split('-').collect();
    if parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| hex(p))
    {
        return true;
    }
    seg.len() >= 16 && hex(seg)
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

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub version: String,
    pub side: Side,
    pub code: String,
    pub count: u64,
    /// Results with a duration, which the average and percentiles are over: all live ones;
    /// mirror answers pipelined behind another request are untimed (`--pipeline-depth`).
    #[serde(default)]
    pub timed: u64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    pub name: String,
    pub live_code: String,
    pub mirror_code: String,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyRatio {
    pub name: String,
    pub pairs: u64,
    /// Mean of mirror duration / live duration over paired requests.
    pub mean_ratio: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub mismatches: Vec<Mismatch>,
    pub latency_ratios: Vec<LatencyRatio>,
    /// Results folded into `other` by the endpoint cap.
    pub other_endpoint_results: u64,
    /// Results folded into `other` series by the series cap (the memory budget).
    #[serde(default)]
    pub other_series_results: u64,
    /// Live responses or mirror outcomes that never met their other half before being evicted.
    pub unpaired_evicted: u64,
    /// The share of new connections mirrored under a CPU budget (`--cpu-budget`).
    #[serde(default)]
    pub sampling: Option<Sampling>,
}

/// What a CPU budget lets through.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Share of new connections mirrored, 0 to 1.
    pub share: f64,
    pub cpu_budget: f64,
    /// The agent's CPU use over the last second, in cores.
    pub cpu_used: f64,
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

/// Upper bounds (seconds) of the exported duration histograms.
pub const BUCKETS_S: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One (endpoint, version, code) series as a Prometheus histogram.
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
            .map(|((name, side, code), a)| {
                let mut buckets = Vec::with_capacity(BUCKETS_S.len() + 1);
                let mut below = 0;
                for b in BUCKETS_S {
                    let upto = a.hist.count_between(0, (b * 1e6) as u64);
                    buckets.push((b, upto - below));
                    below = upto;
                }
                buckets.push((f64::INFINITY, a.timed() - below));
                SeriesHistogram {
                    name: name.clone(),
                    version: match side {
                        Side::Live => self.cfg.live_label.clone(),
                        Side::Mirror => self.cfg.mirror_label.clone(),
                    },
                    code: code.clone(),
                    sum_seconds: a.sum_ns as f64 / 1e9,
                    count: a.timed(),
                    buckets,
                }
            })
            .collect()
    }
}

/// One line per endpoint where the mirror diverges from live: faults first, then slowness;
/// a single "matches" line when nothing diverges.
pub fn verdicts(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for m in &r.mismatches {
        let failing = m.mirror_code.starts_with('5') || m.mirror_code.parse::<u16>().is_err();
        if failing && !(m.live_code.starts_with('5')) {
            out.push(format!(
                "mirror fails on {}: {}× {} where live answered {}",
                m.name, m.count, m.mirror_code, m.live_code
            ));
        }
    }
    let mut by_name: BTreeMap<&str, [(u64, f64); 2]> = BTreeMap::new();
    for row in &r.rows {
        let e = &mut by_name.entry(&row.name).or_default()[row.side as usize];
        e.0 += row.timed;
        e.1 += row.avg_ms * row.timed as f64;
    }
    for (name, [live, mirror]) in &by_name {
        if live.0 == 0 || mirror.0 == 0 {
            continue;
        }
        let (l, m) = (live.1 / live.0 as f64, mirror.1 / mirror.0 as f64);
        if m > 2.0 * l && m - l > 100.0 {
            out.push(format!(
                "mirror slower on {name}: {} ms vs {} ms live",
                fmt_ms(m),
                fmt_ms(l)
            ));
        }
    }
    if out.is_empty() {
        let both = by_name.values().filter(|[l, m]| l.0 > 0 && m.0 > 0).count();
        out.push(format!(
            "mirror matches live: same status codes, similar durations on {both} endpoints"
        ));
    }
    out
}

/// Milliseconds, with a decimal below 10 ms so that sub-millisecond averages do not read as 0.
fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// The seed's table: per endpoint, version and code, sorted by name then version, live rows
/// and mirror rows together; then the divergences.
pub fn format_table(r: &Report) -> String {
    let mut rows = r.rows.clone();
    rows.sort_by(|a, b| {
        (&a.name, a.side, &a.version, &a.code).cmp(&(&b.name, b.side, &b.version, &b.code))
    });
    let w_name = rows.iter().map(|x| x.name.len()).max().unwrap_or(4).max(4);
    let w_ver = rows
        .iter()
        .map(|x| x.version.len())
        .max()
        .unwrap_or(7)
        .max(10);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w_name$}  {:<w_ver$}  {:>10}  {:>13}  {:>12}  {:>9}  {:>9}",
        "name", "podVersion", "resultCode", "duration (ms)", "requestCount", "p50 (ms)", "p99 (ms)"
    );
    for x in &rows {
        let _ = writeln!(
            out,
            "{:<w_name$}  {:<w_ver$}  {:>10}  {:>13.1}  {:>12}  {:>9.1}  {:>9.1}",
            x.name, x.version, x.code, x.avg_ms, x.count, x.p50_ms, x.p99_ms
        );
    }
    if !r.mismatches.is_empty() {
        let _ = writeln!(out, "\nstatus mismatches (live → mirror):");
        for m in &r.mismatches {
            let _ = writeln!(
                out,
                "  {}  {} → {}  ×{}",
                m.name, m.live_code, m.mirror_code, m.count
            );
        }
    }
    if !r.latency_ratios.is_empty() {
        let _ = writeln!(out, "\nmirror/live latency ratio (paired requests):");
        for l in &r.latency_ratios {
            let _ = writeln!(
                out,
                "  {}  {:.2}× over {} pairs",
                l.name, l.mean_ratio, l.pairs
            );
        }
    }
    if r.other_endpoint_results > 0 {
        let _ = writeln!(
            out,
            "\n{} results folded into `other` by the endpoint cap",
            r.other_endpoint_results
        );
    }
    if r.other_series_results > 0 {
        let _ = writeln!(
            out,
            "\n{} results folded into `other` series by the memory budget (--memory-budget)",
            r.other_series_results
        );
    }
    if let Some(s) = &r.sampling {
        let _ = writeln!(
            out,
            "\nmirrored {:.0}% of new connections: CPU budget {:.2} cores (agent used {:.2})",
            s.share * 100.0,
            s.cpu_budget,
            s.cpu_used
        );
    }
    let _ = writeln!(out);
    for v in verdicts(r) {
        let _ = writeln!(out, "verdict: {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::MirrorResult;
    use std::time::Duration;

    fn live(conn: u64, seq: u64, target: &str, status: u16, ms: u64) -> ResponseMeta {
        ResponseMeta {
            conn,
            request_seq: seq,
            method: "GET".into(),
            target: target.into(),
            status,
            grpc_status: None,
            request_last_ts: 1_000,
            response_first_ts: 1_000 + ms * 1_000_000,
        }
    }

    fn mirror(conn: u64, seq: u64, target: &str, result: MirrorResult, ms: u64) -> MirrorOutcome {
        MirrorOutcome {
            conn,
            seq,
            method: "GET".into(),
            target: target.into(),
            result,
            duration: Some(Duration::from_millis(ms)),
        }
    }

    #[test]
    fn normalises_paths() {
        let r: Vec<RouteTemplate> = vec!["/api/{tenant}/books".parse().unwrap()];
        assert_eq!(
            endpoint_name("GET", "/api/books/2/reviews?page=3", &[]),
            "GET /api/books/{id}/reviews"
        );
        assert_eq!(
            endpoint_name("GET", "/u/123e4567-e89b-12d3-a456-426614174000/x", &[]),
            "GET /u/{id}/x"
        );
        assert_eq!(
            endpoint_name("PUT", "/blob/deadbeefdeadbeef00", &[]),
            "PUT /blob/{id}"
        );
        assert_eq!(
            endpoint_name("GET", "/v2/cafe", &[]),
            "GET /v2/cafe",
            "short words stay"
        );
        assert_eq!(
            endpoint_name("GET", "/api/acme/books?x", &r),
            "GET /api/{tenant}/books"
        );
        assert_eq!(
            endpoint_name("GET", "/api/acme/books/1", &r),
            "GET /api/acme/books/{id}"
        );
        assert_eq!(
            endpoint_name("GET", "http://h:80/a/7?q", &[]),
            "GET /a/{id}"
        );
        assert_eq!(endpoint_name("GET", "", &[]), "GET /");
    }

    #[test]
    fn aggregates_match_a_reference() {
        let mut c = Comparator::new(CompareConfig::default());
        let durations: Vec<u64> = (1..=200).map(|i| (i * 7919) % 1000 + 1).collect();
        for (i, ms) in durations.iter().enumerate() {
            c.live(&live(1, i as u64, "/api/books/1", 200, *ms));
        }
        let r = c.report();
        let row = &r.rows[0];
        let mut sorted = durations.clone();
        sorted.sort();
        let avg = durations.iter().sum::<u64>() as f64 / durations.len() as f64;
        assert_eq!(row.count, 200);
        assert!((row.avg_ms - avg).abs() < 1e-9);
        // HdrHistogram with 3 significant digits: within 0.1%.
        let p50 = sorted[99] as f64;
        let p99 = sorted[197] as f64;
        assert!(
            (row.p50_ms - p50).abs() <= p50 * 0.002 + 0.001,
            "{} vs {p50}",
            row.p50_ms
        );
        assert!(
            (row.p99_ms - p99).abs() <= p99 * 0.002 + 0.001,
            "{} vs {p99}",
            row.p99_ms
        );
    }

    #[test]
    fn untimed_mirror_answers_count_but_leave_durations_alone() {
        let mut c = Comparator::new(CompareConfig::default());
        for seq in 0..4 {
            c.live(&live(1, seq, "/a", 200, 300));
            let mut o = mirror(1, seq, "/a", MirrorResult::Status(200), 300);
            if seq > 0 {
                // Pipelined behind the first: its start is unknown.
                o.duration = None;
            }
            c.mirror(&o);
        }
        let r = c.report();
        let m = r.rows.iter().find(|x| x.side == Side::Mirror).unwrap();
        assert_eq!((m.count, m.timed), (4, 1));
        assert!((m.avg_ms - 300.0).abs() < 1e-9, "{}", m.avg_ms);
        assert_eq!(r.latency_ratios[0].pairs, 1);
        let h = c.histograms();
        let mh = h.iter().find(|x| x.version == c.cfg.mirror_label).unwrap();
        assert_eq!(mh.count, 1);
        assert_eq!(mh.buckets.iter().map(|b| b.1).sum::<u64>(), 1);
        assert!(verdicts(&r)[0].starts_with("mirror matches live"));
    }

    #[test]
    fn pairs_by_request_and_counts_mismatches_in_any_order() {
        let mut c = Comparator::new(CompareConfig {
            mirror_label: "V4MIR".into(),
            ..Default::default()
        });
        // Pipelined requests on one connection; outcomes arrive out of order; one mirror error.
        c.mirror(&mirror(
            9,
            1,
            "/api/books/2/reviews",
            MirrorResult::Status(500),
            30,
        ));
        c.live(&live(9, 0, "/api/books/1/reviews", 200, 10));
        c.live(&live(9, 1, "/api/books/2/reviews", 200, 10));
        c.mirror(&mirror(
            9,
            0,
            "/api/books/1/reviews",
            MirrorResult::Status(200),
            20,
        ));
        c.live(&live(9, 2, "/api/books/3/reviews", 200, 10));
        c.mirror(&mirror(
            9,
            2,
            "/api/books/3/reviews",
            MirrorResult::Timeout,
            2000,
        ));
        let r = c.report();
        assert_eq!(
            r.mismatches,
            vec![
                Mismatch {
                    name: "GET /api/books/{id}/reviews".into(),
                    live_code: "200".into(),
                    mirror_code: "500".into(),
                    count: 1
                },
                Mismatch {
                    name: "GET /api/books/{id}/reviews".into(),
                    live_code: "200".into(),
                    mirror_code: "timeout".into(),
                    count: 1
                },
            ]
        );
        assert_eq!(r.latency_ratios[0].pairs, 3);
        assert!((r.latency_ratios[0].mean_ratio - (2.0 + 3.0 + 200.0) / 3.0).abs() < 1e-9);
        let codes: Vec<(&str, &str, u64)> = r
            .rows
            .iter()
            .map(|x| (x.version.as_str(), x.code.as_str(), x.count))
            .collect();
        assert_eq!(
            codes,
            [
                ("live", "200", 3),
                ("V4MIR", "200", 1),
                ("V4MIR", "500", 1),
                ("V4MIR", "timeout", 1)
            ]
        );
        let table = format_table(&r);
        assert!(
            table.contains("V4MIR") && table.contains("timeout") && table.contains("200 → 500"),
            "{table}"
        );
    }

    #[test]
    fn verdicts_name_faults_and_slowness() {
        let mut c = Comparator::new(CompareConfig::default());
        for i in 0..10 {
            c.live(&live(1, i, "/api/books/2/reviews", 200, 15));
            let result = if i % 2 == 0 {
                MirrorResult::Status(500)
            } else {
                MirrorResult::Status(200)
            };
            c.mirror(&mirror(1, i, "/api/books/2/reviews", result, 1208));
            c.live(&live(2, i, "/api/books", 200, 5));
            c.mirror(&mirror(2, i, "/api/books", MirrorResult::Status(200), 6));
        }
        let v = verdicts(&c.report());
        assert_eq!(
            v,
            [
                "mirror fails on GET /api/books/{id}/reviews: 5× 500 where live answered 200",
                "mirror slower on GET /api/books/{id}/reviews: 1208 ms vs 15 ms live",
            ]
        );
        let mut same = Comparator::new(CompareConfig::default());
        let mut quick = Comparator::new(CompareConfig::default());
        quick.live(&live(1, 0, "/r", 200, 0));
        quick.mirror(&mirror(1, 0, "/r", MirrorResult::Status(200), 1200));
        assert_eq!(
            verdicts(&quick.report()),
            ["mirror slower on GET /r: 1200 ms vs 0.0 ms live"]
        );
        same.live(&live(1, 0, "/a", 200, 5));
        same.mirror(&mirror(1, 0, "/a", MirrorResult::Status(200), 6));
        assert_eq!(
            verdicts(&same.report()),
            ["mirror matches live: same status codes, similar durations on 1 endpoints"]
        );
    }

    #[test]
    fn cardinality_cap_folds_into_other() {
        let mut c = Comparator::new(CompareConfig {
            max_endpoints: 3,
            ..Default::default()
        });
        for i in 0..50 {
            c.live(&live(1, i, &format!("/random/path-{i}/x"), 200, 1));
        }
        let r = c.report();
        let names: HashSet<&str> = r.rows.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names.len(), 4);
        assert!(names.contains("other"));
        assert_eq!(r.other_endpoint_results, 47);
    }

    #[test]
    fn pending_halves_are_bounded() {
        let mut c = Comparator::new(CompareConfig {
            max_pending: 10,
            ..Default::default()
        });
        for i in 0..1000 {
            c.live(&live(1, i, "/a", 200, 1)); // never mirrored (filtered, sampled out)
        }
        assert!(c.waiting[0].len() <= 10);
        assert_eq!(c.report().unpaired_evicted, 990);
    }
}
