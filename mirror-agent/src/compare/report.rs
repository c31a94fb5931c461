//! What the comparison reports: the rows, divergences and verdicts, as `/report` serves them,
//! and the seed's table that the agent prints and `mirror-agent report` shows.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::diffs::{ContentRow, NotCompared};
use super::verdict::{verdicts, Verdict};
use super::Side;

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
    /// The mirror's version tag.
    #[serde(default)]
    pub mirror: String,
    pub live_code: String,
    pub mirror_code: String,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyRatio {
    pub name: String,
    /// The mirror's version tag.
    #[serde(default)]
    pub mirror: String,
    pub pairs: u64,
    /// Mean of mirror duration / live duration over paired requests.
    pub mean_ratio: f64,
}

/// Requests of one endpoint paired with their live response, per mirror.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub name: String,
    /// The mirror's version tag.
    pub mirror: String,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub mismatches: Vec<Mismatch>,
    pub latency_ratios: Vec<LatencyRatio>,
    /// Pairs per endpoint and mirror, timed or not.
    #[serde(default)]
    pub paired: Vec<Paired>,
    /// One verdict per endpoint and mirror (`judge`), for machines; the table words them.
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
    /// The mirrors' version tags, in the agent's order.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Content comparison per endpoint and mirror (`--compare-bodies`).
    #[serde(default)]
    pub content: Vec<ContentRow>,
    #[serde(default)]
    pub content_not_compared: Option<NotCompared>,
    /// Results folded into `other` by the endpoint cap.
    pub other_endpoint_results: u64,
    /// Results folded into `other` series by the series cap (the memory budget).
    #[serde(default)]
    pub other_series_results: u64,
    /// Live responses or mirror outcomes that never met a partner before being evicted.
    pub unpaired_evicted: u64,
    /// The share of new connections mirrored under a CPU budget (`--cpu-budget`).
    #[serde(default)]
    pub sampling: Option<Sampling>,
    /// Requests extracted by where they were read (`wire`, `in_pod`, `tls_library`).
    #[serde(default)]
    pub requests_read_at: std::collections::BTreeMap<String, u64>,
}

impl Report {
    /// Fills `requests_read_at` from the pipeline's counts.
    pub fn set_read_at(&mut self, read_at: &crate::capture::read_at::Provenance) {
        self.requests_read_at = read_at
            .requests()
            .into_iter()
            .map(|(at, n)| (at.label().to_string(), n))
            .collect();
    }
}

/// The share of connections mirrored, and the limits that set it (`shedding`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Share of new connections mirrored, 0 to 1.
    pub share: f64,
    /// The agent's CPU budget, in cores, when it has one.
    #[serde(default)]
    pub cpu_budget: Option<f64>,
    /// The agent's CPU use over the last second, in cores: its threads and its kernel
    /// program's work in the live path (measured with a budget).
    pub cpu_used: f64,
    /// Of `cpu_used`, the kernel program's work in the live path.
    #[serde(default)]
    pub live_path_used: f64,
    /// The live service's CPU pressure, when mirroring is shed by it.
    #[serde(default)]
    pub pressure: Option<PressureSeen>,
    /// The share the backlog limit allows, 0 to 1.
    #[serde(default = "one")]
    pub backlog_share: f64,
}

fn one() -> f64 {
    1.0
}

/// The live service's CPU pressure, as the shedding saw it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PressureSeen {
    /// Share of time some task of the live service waited for a CPU (PSI `some`), smoothed.
    pub pressure: f64,
    /// Above this, new connections are shed.
    pub threshold: f64,
    /// The live cgroups read; 0: the node's pressure stood for them.
    pub cgroups: usize,
    /// The share of new connections this limit allows, 0 to 1.
    pub share: f64,
    /// The node's idle CPU share over the last second: with spare CPU the pressure is not shed
    /// for. None until a second has been measured.
    #[serde(default)]
    pub node_idle: Option<f64>,
}

impl PressureSeen {
    /// `40% idle now`, or that it is not measured yet.
    pub fn idle_words(&self) -> String {
        match self.node_idle {
            Some(idle) => format!("{:.0}% idle now", idle * 100.0),
            None => "idle share not measured yet".to_string(),
        }
    }

    /// Where the pressure was read.
    pub fn source(&self) -> String {
        match self.cgroups {
            0 => "the node's".to_string(),
            1 => "1 live cgroup".to_string(),
            n => format!("{n} live cgroups"),
        }
    }
}

/// `tag: ` before a divergence when there are several mirrors to tell apart.
fn on_mirror(r: &Report, label: &str) -> String {
    if r.mirrors.len() > 1 {
        format!("{label}: ")
    } else {
        String::new()
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
    write_divergences(&mut out, r);
    write_contents(&mut out, r);
    write_caps_and_sampling(&mut out, r);
    let _ = writeln!(out);
    for v in verdicts(r) {
        let _ = writeln!(out, "verdict: {v}");
    }
    out
}

/// Status mismatches and latency ratios, per mirror.
fn write_divergences(out: &mut String, r: &Report) {
    if !r.mismatches.is_empty() {
        let _ = writeln!(out, "\nstatus mismatches (live → mirror):");
        for m in &r.mismatches {
            let _ = writeln!(
                out,
                "  {}  {}{} → {}  ×{}",
                m.name,
                on_mirror(r, &m.mirror),
                m.live_code,
                m.mirror_code,
                m.count
            );
        }
    }
    if !r.latency_ratios.is_empty() {
        let _ = writeln!(out, "\nmirror/live latency ratio (paired requests):");
        for l in &r.latency_ratios {
            let _ = writeln!(
                out,
                "  {}  {}{:.2}× over {} pairs",
                l.name,
                on_mirror(r, &l.mirror),
                l.mean_ratio,
                l.pairs
            );
        }
    }
}

/// What content comparison found, field by field.
fn write_contents(out: &mut String, r: &Report) {
    if !r.content.is_empty() {
        let _ = writeln!(
            out,
            "\ncontent (live → mirror; noise from the secondary and repeated live answers):"
        );
        for c in &r.content {
            let _ = writeln!(
                out,
                "  {}  {}{}: {} compared, {} identical, {} differing",
                c.name,
                c.mirror,
                if c.secondary { " (secondary)" } else { "" },
                c.compared,
                c.identical,
                c.differing
            );
            for f in &c.fields {
                let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(missing)".into());
                let _ = writeln!(
                    out,
                    "    {}  {:.0}% (noise {:.0}%)  {} → {}{}",
                    f.path,
                    f.rate * 100.0,
                    f.noise_rate * 100.0,
                    show(&f.live_example),
                    show(&f.mirror_example),
                    if f.regression { "  REGRESSION" } else { "" }
                );
            }
        }
    }
}

/// What was not compared, what the caps folded, and the sampling under the CPU budget.
fn write_caps_and_sampling(out: &mut String, r: &Report) {
    if let Some(n) = &r.content_not_compared {
        let total = n.mirror_failed + n.unsupported + n.no_live + n.memory + n.busy;
        if total > 0 {
            let _ = writeln!(
                out,
                "\n{total} answers not compared: {} mirror failed, {} HTTP/2, {} no live body, {} over memory, {} while comparing was behind",
                n.mirror_failed, n.unsupported, n.no_live, n.memory, n.busy
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
        let _ = writeln!(out, "\n{}", sampling_line(s));
    }
}

/// "mirrored 40% of new connections: " and what limited it.
fn sampling_line(s: &Sampling) -> String {
    let mut limits = Vec::new();
    if let Some(cores) = s.cpu_budget {
        limits.push(format!(
            "CPU budget {cores:.2} cores (agent used {:.2}, {:.2} of it cloning in the live path)",
            s.cpu_used, s.live_path_used
        ));
    }
    if let Some(p) = &s.pressure {
        limits.push(format!(
            "live CPU pressure {:.1}% ({}; sheds above {:.0}% while the node's CPU is contended, {}; allows {:.0}%)",
            p.pressure * 100.0,
            p.source(),
            p.threshold * 100.0,
            p.idle_words(),
            p.share * 100.0
        ));
    }
    if s.backlog_share < 1.0 {
        limits.push(format!(
            "backlog (replay queue or capture ring filling) allows {:.0}%",
            s.backlog_share * 100.0
        ));
    }
    format!(
        "mirrored {:.0}% of new connections: {}",
        s.share * 100.0,
        limits.join("; ")
    )
}
