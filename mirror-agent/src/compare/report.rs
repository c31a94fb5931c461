//! What the comparison reports: the rows, divergences and verdicts, as `/report` serves them,
//! and the seed's table that the agent prints and `mirror-agent report` shows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::diffs::{ContentRow, NotCompared};
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub mismatches: Vec<Mismatch>,
    pub latency_ratios: Vec<LatencyRatio>,
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
}

/// What a CPU budget lets through.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Share of new connections mirrored, 0 to 1.
    pub share: f64,
    pub cpu_budget: f64,
    /// The agent's CPU use over the last second, in cores: its threads and its kernel
    /// program's work in the live path.
    pub cpu_used: f64,
    /// Of `cpu_used`, the kernel program's work in the live path.
    #[serde(default)]
    pub live_path_used: f64,
}

/// One line per endpoint and mirror where the mirror diverges from live: faults first, then
/// slowness; a "matches" line for a mirror where nothing diverges. With one mirror it is just
/// "mirror"; with several, each is named by its tag.
pub fn verdicts(r: &Report) -> Vec<String> {
    let who = |label: &str| {
        if r.mirrors.len() > 1 {
            format!("mirror {label}")
        } else {
            "mirror".to_string()
        }
    };
    let mut out = Vec::new();
    let content = content_verdicts(r, &who);
    let mut diverged: BTreeSet<&str> = content.iter().map(|(label, _)| *label).collect();
    for m in &r.mismatches {
        let failing = m.mirror_code.starts_with('5') || m.mirror_code.parse::<u16>().is_err();
        if failing && !(m.live_code.starts_with('5')) {
            diverged.insert(&m.mirror);
            out.push(format!(
                "{} fails on {}: {}× {} where live answered {}",
                who(&m.mirror),
                m.name,
                m.count,
                m.mirror_code,
                m.live_code
            ));
        }
    }
    // Per endpoint: live (timed results, sum of ms), then per mirror tag the same.
    type Timed = (u64, f64);
    let mut live: BTreeMap<&str, Timed> = BTreeMap::new();
    let mut mirrors: BTreeMap<&str, BTreeMap<&str, Timed>> = r
        .mirrors
        .iter()
        .map(|m| (m.as_str(), BTreeMap::new()))
        .collect();
    for row in &r.rows {
        let e = match row.side {
            Side::Live => live.entry(&row.name).or_default(),
            Side::Mirror => mirrors
                .entry(&row.version)
                .or_default()
                .entry(&row.name)
                .or_default(),
        };
        e.0 += row.timed;
        e.1 += row.avg_ms * row.timed as f64;
    }
    let mut matching = Vec::new();
    for (label, by_name) in &mirrors {
        let mut both = 0;
        for (name, m) in by_name {
            let l = live.get(name).copied().unwrap_or_default();
            if l.0 == 0 || m.0 == 0 {
                continue;
            }
            both += 1;
            let (l, m) = (l.1 / l.0 as f64, m.1 / m.0 as f64);
            if m > 2.0 * l && m - l > 100.0 {
                diverged.insert(label);
                out.push(format!(
                    "{} slower on {name}: {} ms vs {} ms live",
                    who(label),
                    fmt_ms(m),
                    fmt_ms(l)
                ));
            }
        }
        if !diverged.contains(label) {
            matching.push(format!(
                "{} matches live: same status codes, similar durations on {both} endpoints",
                who(label)
            ));
        }
    }
    out.extend(content.into_iter().map(|(_, line)| line));
    out.extend(matching);
    out
}

/// Most fields named in a content verdict line.
const VERDICT_FIELDS: usize = 5;

/// One line per endpoint and candidate mirror whose content differs beyond the noise.
fn content_verdicts<'a>(r: &'a Report, who: &dyn Fn(&str) -> String) -> Vec<(&'a str, String)> {
    let pct = |x: f64| format!("{:.0}%", x * 100.0);
    let mut out = Vec::new();
    for row in r.content.iter().filter(|c| !c.secondary) {
        let fields: Vec<String> = row
            .fields
            .iter()
            .filter(|f| f.regression)
            .take(VERDICT_FIELDS)
            .map(|f| match (&f.live_example, &f.mirror_example) {
                (Some(_), None) => format!("{} missing ({})", f.path, pct(f.rate)),
                (None, Some(_)) => format!("{} added ({})", f.path, pct(f.rate)),
                _ => format!(
                    "{} ({} vs {} noise)",
                    f.path,
                    pct(f.rate),
                    pct(f.noise_rate)
                ),
            })
            .collect();
        if !fields.is_empty() {
            out.push((
                row.mirror.as_str(),
                format!(
                    "{} differs on {}: {}",
                    who(&row.mirror),
                    row.name,
                    fields.join(", ")
                ),
            ));
        }
    }
    out
}

/// `tag: ` before a divergence when there are several mirrors to tell apart.
fn on_mirror(r: &Report, label: &str) -> String {
    if r.mirrors.len() > 1 {
        format!("{label}: ")
    } else {
        String::new()
    }
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
        let _ = writeln!(
            out,
            "\nmirrored {:.0}% of new connections: CPU budget {:.2} cores (agent used {:.2}, {:.2} of it cloning in the live path)",
            s.share * 100.0,
            s.cpu_budget,
            s.cpu_used,
            s.live_path_used
        );
    }
    let _ = writeln!(out);
    for v in verdicts(r) {
        let _ = writeln!(out, "verdict: {v}");
    }
    out
}
