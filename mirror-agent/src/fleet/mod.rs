//! The fleet's table: every node's agent, summed in Prometheus.
//!
//! Each agent holds only its node's share of a service. `gather` reads the agents' series from
//! Prometheus over a window and builds the same `Report` that one agent serves on `/report`:
//! the seed's table per endpoint, version tag and result code, the status mismatches, the
//! content differences and the verdicts. Counts are exact (`counting::increase` over the raw
//! samples, restarts included); quantiles are interpolated in the summed buckets as
//! `histogram_quantile` does.

mod counting;
mod prom;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::compare::diffs::{ContentRow, FieldRow};
use crate::compare::{judge, Mismatch, Paired, Report, Row, SeriesHistogram, Side};

pub use counting::{increase, quantile, Point};
pub use prom::{Labels, Prometheus, Sample, Series};

/// Why the fleet's table could not be read; each names what to check or change.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("--prometheus {0}: https is not supported; reach Prometheus over http, e.g. `kubectl -n monitoring port-forward svc/prometheus 9090` and --prometheus http://127.0.0.1:9090")]
    Https(String),
    #[error("--prometheus {0}: not a URL like http://prometheus.monitoring:9090")]
    BadUrl(String),
    #[error("Prometheus at {url} does not answer ({reason}): check --prometheus")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered HTTP {status} with something other than Prometheus's API ({body:?}): is --prometheus Prometheus's address?")]
    NotPrometheus {
        url: String,
        status: u16,
        body: String,
    },
    #[error("Prometheus refused `{query}` ({kind}: {error}); check --selector")]
    Refused {
        query: String,
        kind: String,
        error: String,
    },
    #[error("Prometheus answered `{query}` with {what}")]
    Unexpected { query: String, what: String },
    #[error("--selector {0:?}: give label matchers without braces, e.g. namespace=\"shop\",job=\"mirror-agent\"")]
    Selector(String),
    #[error("Prometheus has no mirror_requests_total series in the last {window}: {why}")]
    NoSeries { window: String, why: String },
    #[error("the series come from {} mirrorings ({}): name one with --mirroring", .0.len(), .0.join(", "))]
    ManyMirrorings(Vec<String>),
    #[error("no series of mirroring {wanted} in the last {window}; the agents report: {}", .found.join(", "))]
    NoSuchMirroring {
        wanted: String,
        window: String,
        found: Vec<String>,
    },
    #[error("the agents export different series, so their sums would be wrong: {0}. Run one mirror-agent version on every node, or leave the others out with --selector")]
    MixedAgents(String),
}

/// Which series, over which window.
#[derive(Clone, Debug)]
pub struct FleetQuery {
    /// PromQL label matchers added to every selector, without braces (`job="mirror-agent"`).
    pub selector: String,
    /// A declared mirroring (`NAMESPACE/NAME`); None: the only one there is.
    pub mirroring: Option<String>,
    pub window: Duration,
}

/// The fleet's comparison over the window.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub report: Report,
    /// Per endpoint, version and code: the summed buckets (for the page's charts).
    pub hists: Vec<SeriesHistogram>,
    /// Each agent (`instance`) seen, with its version.
    pub agents: BTreeMap<String, String>,
    /// The mirroring shown: `""` for the agents' own --mirror flags.
    pub mirroring: String,
    /// The window, as PromQL writes it.
    pub window: String,
}

/// `600s` as PromQL takes it; at least a second.
fn promql_duration(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// Reads the fleet's comparison from Prometheus over the `window` before `now` (Unix seconds).
pub async fn gather(prom: &Prometheus, q: &FleetQuery, now: f64) -> Result<Fleet, FleetError> {
    if q.selector.contains(['{', '}']) {
        return Err(FleetError::Selector(q.selector.clone()));
    }
    let mut reader = Reader {
        prom,
        selector: q.selector.trim().trim_matches(',').to_string(),
        window: promql_duration(q.window),
        now,
        mirroring: String::new(),
        starts: Starts::default(),
    };
    reader.starts = reader.starts().await?;
    let requests = reader.counted("mirror_requests_total").await?;
    if requests.is_empty() {
        return Err(reader.why_empty().await);
    }
    reader.mirroring = pick_mirroring(&requests, q, &reader.window)?;
    let requests = reader.of_mirroring(requests);
    let agents = reader.agents(&requests).await?;
    let bucket_series = reader.counted("mirror_request_duration_seconds_bucket");
    let buckets = reader.of_mirroring(bucket_series.await?);
    check_same_series(&requests, &buckets)?;
    let series = ["endpoint", "version", "code"];
    let sums = reader.sum_by("mirror_request_duration_seconds_sum", &series);
    let sums = sums.await?;
    let counts = reader.sum_by("mirror_request_duration_seconds_count", &series);
    let counts = counts.await?;
    let active = sum(&requests, &series);
    let hists = histograms(&active, &buckets, &sums, &counts);
    let mut report = Report {
        content: reader.content().await?,
        ..Report::default()
    };
    let paired = reader.sum_by("mirror_paired_total", &["endpoint", "mirror"]);
    let paired = paired.await?;
    let mismatch_by = ["endpoint", "mirror", "live_code", "mirror_code"];
    let mismatches = reader.sum_by("mirror_status_mismatch_total", &mismatch_by);
    let mismatches = mismatches.await?;
    report.mirrors = mirrors(&paired, &mismatches, &report.content);
    report.rows = rows(&report.mirrors, &active, &hists);
    report.paired = paired
        .iter()
        .filter(|(_, n)| **n >= 0.5)
        .map(|(k, n)| Paired {
            name: k[0].clone(),
            mirror: k[1].clone(),
            count: n.round() as u64,
        })
        .collect();
    report.mismatches = mismatches
        .iter()
        .filter(|(_, n)| **n >= 0.5)
        .map(|(k, n)| Mismatch {
            name: k[0].clone(),
            mirror: k[1].clone(),
            live_code: k[2].clone(),
            mirror_code: k[3].clone(),
            count: n.round() as u64,
        })
        .collect();
    report.verdicts = judge(&report);
    Ok(Fleet {
        report,
        hists,
        agents,
        mirroring: reader.mirroring,
        window: reader.window,
    })
}

/// Queries with the report's selector, window and mirroring.
struct Reader<'a> {
    prom: &'a Prometheus,
    selector: String,
    window: String,
    now: f64,
    /// The mirroring shown, `""` for the agents' own; set once the requests were read.
    mirroring: String,
    starts: Starts,
}

/// Each agent's process start times (`process_start_time_seconds`), which tell a restart.
#[derive(Default)]
struct Starts {
    /// Per instance: the last value before the window.
    before: BTreeMap<String, f64>,
    /// Per instance: (time, start time) inside the window, oldest first.
    inside: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Starts {
    /// The start time of the process that `instance` ran at `t`.
    fn at(&self, instance: &str, t: f64) -> Option<f64> {
        self.inside
            .get(instance)
            .and_then(|v| v.iter().rev().find(|(ts, _)| *ts <= t).map(|(_, s)| *s))
            .or_else(|| self.before.get(instance).copied())
    }
}

/// A series' increase over the window, with its labels.
type Counted = Vec<(Labels, f64)>;

impl Reader<'_> {
    /// Each series of a counter with what it added over the window.
    async fn counted(&self, metric: &str) -> Result<Counted, FleetError> {
        let (inside, before) = self.around_window(metric).await?;
        let before: BTreeMap<Labels, f64> =
            before.into_iter().map(|s| (s.labels, s.value)).collect();
        Ok(inside
            .into_iter()
            .map(|s| {
                let instance = instance_of(&s.labels);
                let before = before.get(&s.labels).map(|&value| Point {
                    value,
                    started: self.starts.before.get(&instance).copied(),
                });
                let points: Vec<Point> = s
                    .values
                    .iter()
                    .map(|&(t, value)| Point {
                        value,
                        started: self.starts.at(&instance, t),
                    })
                    .collect();
                (s.labels, increase(before, &points))
            })
            .collect())
    }

    /// The agents' start times over the window, and before it.
    async fn starts(&self) -> Result<Starts, FleetError> {
        let (inside, before) = self.around_window("process_start_time_seconds").await?;
        Ok(Starts {
            before: before
                .into_iter()
                .map(|s| (instance_of(&s.labels), s.value))
                .collect(),
            inside: inside
                .into_iter()
                .map(|s| (instance_of(&s.labels), s.values))
                .collect(),
        })
    }

    /// A metric's raw samples inside the window, and each series' last value before it.
    async fn around_window(&self, metric: &str) -> Result<(Vec<Series>, Vec<Sample>), FleetError> {
        let sel = format!("{metric}{{{}}}", self.selector);
        let inside = self
            .prom
            .matrix(&format!("{sel}[{}]", self.window), self.now)
            .await?;
        let before = self
            .prom
            .vector(&format!("{sel} offset {}", self.window), self.now)
            .await?;
        Ok((inside, before))
    }

    /// Only the series of the mirroring shown.
    fn of_mirroring<T>(&self, series: Vec<(Labels, T)>) -> Vec<(Labels, T)> {
        series
            .into_iter()
            .filter(|(l, _)| mirroring_of(l) == self.mirroring)
            .collect()
    }

    /// A counter's increases over the window, summed by `by` over the agents.
    async fn sum_by(
        &self,
        metric: &str,
        by: &[&str],
    ) -> Result<BTreeMap<Vec<String>, f64>, FleetError> {
        Ok(sum(&self.of_mirroring(self.counted(metric).await?), by))
    }

    /// A gauge's latest value per series of the mirroring shown.
    async fn latest(&self, metric: &str) -> Result<Vec<Sample>, FleetError> {
        let samples = self
            .prom
            .vector(&format!("{metric}{{{}}}", self.selector), self.now)
            .await?;
        Ok(samples
            .into_iter()
            .filter(|s| mirroring_of(&s.labels) == self.mirroring)
            .collect())
    }

    /// Each agent that counted requests, with its version (`mirror_agent_info`); an agent
    /// without one runs a version from before it, which exports other series.
    async fn agents(&self, requests: &Counted) -> Result<BTreeMap<String, String>, FleetError> {
        let info: BTreeMap<String, String> = self
            .prom
            .vector(
                &format!(
                    "last_over_time(mirror_agent_info{{{}}}[{}])",
                    self.selector, self.window
                ),
                self.now,
            )
            .await?
            .into_iter()
            .map(|s| (instance_of(&s.labels), label(&s.labels, "version")))
            .collect();
        let mut agents = BTreeMap::new();
        let mut older = BTreeSet::new();
        for (labels, _) in requests {
            let instance = instance_of(labels);
            match info.get(&instance) {
                Some(v) => {
                    agents.insert(instance, v.clone());
                }
                None => {
                    older.insert(instance);
                }
            }
        }
        if !older.is_empty() && !agents.is_empty() {
            return Err(FleetError::MixedAgents(format!(
                "{} export no mirror_agent_info (a mirror-agent older than the others, without mirror_paired_total, so its pairs would be missing from the verdicts)",
                older.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        agents.extend(older.into_iter().map(|i| (i, "unknown".to_string())));
        Ok(agents)
    }

    /// Why there are no series, as plainly as Prometheus lets us tell.
    async fn why_empty(&self) -> FleetError {
        let window = self.window.clone();
        let count = |q: String| async move {
            let v = self.prom.vector(&q, self.now).await?;
            Ok::<_, FleetError>(v.first().map_or(0.0, |s| s.value))
        };
        let all = count(format!(
            "count(last_over_time(mirror_requests_total[{window}]))"
        ))
        .await;
        let agents = count(format!(
            "count(last_over_time(mirror_agent_info[{window}]))"
        ))
        .await;
        let why = match (all, agents) {
            (Err(e), _) | (_, Err(e)) => return e,
            (Ok(n), _) if n > 0.0 => format!(
                "the selector {{{}}} matches none of the {n} series there are; see them with `mirror_requests_total` in Prometheus",
                self.selector
            ),
            (Ok(_), Ok(a)) if a > 0.0 => format!(
                "Prometheus scrapes {a} agents, but none has mirrored a request yet"
            ),
            _ => "no agent's metrics are scraped: add the scrape job of README's \"Across a cluster\" and check Prometheus's targets page".to_string(),
        };
        FleetError::NoSeries { window, why }
    }
}

/// A series' `mirroring` label, `""` for the agent's own --mirror flags.
fn mirroring_of(labels: &Labels) -> String {
    label(labels, "mirroring")
}

fn label(labels: &Labels, name: &str) -> String {
    labels.get(name).cloned().unwrap_or_default()
}

fn instance_of(labels: &Labels) -> String {
    label(labels, "instance")
}

/// The mirroring asked for, or the only one there is.
fn pick_mirroring(requests: &Counted, q: &FleetQuery, window: &str) -> Result<String, FleetError> {
    let found: BTreeSet<String> = requests.iter().map(|(l, _)| mirroring_of(l)).collect();
    let named = |m: &String| {
        if m.is_empty() {
            "the agents' own --mirror flags".to_string()
        } else {
            m.clone()
        }
    };
    match &q.mirroring {
        Some(m) if found.contains(m) => Ok(m.clone()),
        Some(m) => Err(FleetError::NoSuchMirroring {
            wanted: m.clone(),
            window: window.to_string(),
            found: found.iter().map(named).collect(),
        }),
        None if found.len() == 1 => Ok(found.into_iter().next().unwrap_or_default()),
        None => Err(FleetError::ManyMirrorings(
            found.iter().map(named).collect(),
        )),
    }
}

/// Agents whose requests carry other label names, or whose histograms other buckets, cannot
/// be summed with the rest.
fn check_same_series(requests: &Counted, buckets: &Counted) -> Result<(), FleetError> {
    let mut shapes: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (l, _) in requests {
        let names = l
            .keys()
            .filter(|k| !matches!(k.as_str(), "instance" | "job"))
            .cloned();
        shapes.entry(instance_of(l)).or_default().0.extend(names);
    }
    for (l, _) in buckets {
        shapes
            .entry(instance_of(l))
            .or_default()
            .1
            .insert(label(l, "le"));
    }
    let mut kinds: BTreeMap<&(BTreeSet<String>, BTreeSet<String>), Vec<&str>> = BTreeMap::new();
    for (instance, shape) in &shapes {
        kinds.entry(shape).or_default().push(instance);
    }
    if kinds.len() <= 1 {
        return Ok(());
    }
    let described: Vec<String> = kinds
        .iter()
        .map(|((names, les), instances)| {
            format!(
                "{} label requests by {} and bucket durations by {} bounds",
                instances.join(", "),
                names.iter().cloned().collect::<Vec<_>>().join("/"),
                les.len()
            )
        })
        .collect();
    Err(FleetError::MixedAgents(described.join("; ")))
}

/// Increases summed by the values of `by` (missing labels count as `""`).
fn sum(series: &Counted, by: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let mut out: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for (labels, n) in series {
        let key = by.iter().map(|b| label(labels, b)).collect();
        *out.entry(key).or_default() += n;
    }
    out
}

/// The mirrors' tags: every `mirror` label of pairs, mismatches and content.
fn mirrors(
    paired: &BTreeMap<Vec<String>, f64>,
    mismatches: &BTreeMap<Vec<String>, f64>,
    content: &[ContentRow],
) -> Vec<String> {
    let set: BTreeSet<String> = paired
        .keys()
        .chain(mismatches.keys())
        .map(|k| k[1].clone())
        .chain(content.iter().map(|c| c.mirror.clone()))
        .collect();
    set.into_iter().collect()
}

/// Per endpoint, version and code: requests, and from the histogram the timed ones, their mean
/// and quantiles. Series with no request in the window are left out.
fn rows(
    mirrors: &[String],
    requests: &BTreeMap<Vec<String>, f64>,
    hists: &[SeriesHistogram],
) -> Vec<Row> {
    requests
        .iter()
        .filter(|(_, n)| **n >= 0.5)
        .map(|(k, n)| {
            let h = hists
                .iter()
                .find(|h| h.name == k[0] && h.version == k[1] && h.code == k[2]);
            let ms = |q: f64| h.and_then(|h| hist_quantile(q, h)).map_or(0.0, |s| s * 1e3);
            Row {
                name: k[0].clone(),
                version: k[1].clone(),
                side: if mirrors.contains(&k[1]) {
                    Side::Mirror
                } else {
                    Side::Live
                },
                code: k[2].clone(),
                count: n.round() as u64,
                timed: h.map_or(0, |h| h.count),
                avg_ms: h
                    .filter(|h| h.count > 0)
                    .map_or(0.0, |h| h.sum_seconds * 1e3 / h.count as f64),
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
            }
        })
        .collect()
}

/// A series histogram's quantile, in seconds.
pub fn hist_quantile(q: f64, h: &SeriesHistogram) -> Option<f64> {
    let mut below = 0.0;
    let cumulative: Vec<(f64, f64)> = h
        .buckets
        .iter()
        .map(|&(le, n)| {
            below += n as f64;
            (le, below)
        })
        .collect();
    quantile(q, &cumulative)
}

/// The summed buckets of each (endpoint, version, code) with requests in the window (`active`:
/// requests per endpoint, version and code).
fn histograms(
    active: &BTreeMap<Vec<String>, f64>,
    buckets: &Counted,
    sums: &BTreeMap<Vec<String>, f64>,
    counts: &BTreeMap<Vec<String>, f64>,
) -> Vec<SeriesHistogram> {
    let by = ["endpoint", "version", "code"];
    let mut cumulative: BTreeMap<Vec<String>, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    for (labels, n) in buckets {
        let key: Vec<String> = by.iter().map(|b| label(labels, b)).collect();
        let le = match label(labels, "le").as_str() {
            "+Inf" => f64::INFINITY,
            s => s.parse().unwrap_or(f64::NAN),
        };
        if le.is_nan() {
            continue;
        }
        // Sorted by bound: f64's bits order positive numbers and +Inf.
        let e = cumulative
            .entry(key)
            .or_default()
            .entry(le.to_bits())
            .or_insert((le, 0.0));
        e.1 += n;
    }
    cumulative
        .into_iter()
        .filter(|(k, _)| active.get(k).is_some_and(|n| *n >= 0.5))
        .map(|(k, bounds)| {
            let mut below = 0.0;
            let buckets = bounds
                .values()
                .map(|&(le, upto)| {
                    let inside = (upto - below).max(0.0).round() as u64;
                    below = upto.max(below);
                    (le, inside)
                })
                .collect();
            SeriesHistogram {
                sum_seconds: sums.get(&k).copied().unwrap_or(0.0),
                count: counts.get(&k).copied().unwrap_or(0.0).round() as u64,
                name: k[0].clone(),
                version: k[1].clone(),
                code: k[2].clone(),
                buckets,
            }
        })
        .collect()
}

impl Reader<'_> {
    /// Content comparison summed over the agents: compared answers by result, differing
    /// fields; a field is a regression when any agent's latest view says so, and its noise is
    /// the highest any agent measured.
    async fn content(&self) -> Result<Vec<ContentRow>, FleetError> {
        let compared = self
            .sum_by(
                "mirror_content_compared_total",
                &["endpoint", "mirror", "result"],
            )
            .await?;
        let fields = self
            .sum_by(
                "mirror_content_field_differences_total",
                &["endpoint", "mirror", "path"],
            )
            .await?;
        let mut flags: BTreeMap<Vec<String>, (f64, bool)> = BTreeMap::new();
        for (metric, regression) in [
            ("mirror_content_field_noise_ratio", false),
            ("mirror_content_field_regression", true),
        ] {
            for s in self.latest(metric).await? {
                let key = ["endpoint", "mirror", "path"]
                    .iter()
                    .map(|b| label(&s.labels, b))
                    .collect();
                let e = flags.entry(key).or_default();
                if regression {
                    e.1 |= s.value >= 1.0;
                } else {
                    e.0 = e.0.max(s.value);
                }
            }
        }
        let mut rows: BTreeMap<(String, String), ContentRow> = BTreeMap::new();
        for (k, n) in &compared {
            let row = rows.entry((k[0].clone(), k[1].clone())).or_default();
            let n = n.round() as u64;
            row.compared += n;
            match k[2].as_str() {
                "identical" => row.identical += n,
                _ => row.differing += n,
            }
        }
        for (k, n) in &fields {
            let Some(row) = rows.get_mut(&(k[0].clone(), k[1].clone())) else {
                continue;
            };
            let (noise_rate, regression) = flags.get(k).copied().unwrap_or_default();
            row.fields.push(FieldRow {
                path: k[2].clone(),
                differing: n.round() as u64,
                rate: n / row.compared.max(1) as f64,
                noise_rate,
                regression,
                live_example: None,
                mirror_example: None,
            });
        }
        Ok(rows
            .into_iter()
            .filter(|(_, r)| r.compared > 0)
            .map(|((name, mirror), mut r)| {
                r.name = name;
                r.mirror = mirror;
                r.fields.sort_by_key(|f| std::cmp::Reverse(f.differing));
                r
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
