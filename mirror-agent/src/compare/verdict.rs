//! The verdict: per endpoint and mirror, whether the candidate matches live and, if not, how.
//! `judge` gives one `Verdict` per endpoint and mirror (`/report`'s `verdicts`); `verdicts`
//! words them for the table, the exit summary and the lab.
//!
//! No share threshold hides a status difference: one paired request in 100,000 answered with
//! another code makes the endpoint `differs`. The line gives the count and the share of pairs,
//! and says when live itself answered the mirror's code on that endpoint, which points at live
//! flapping rather than at the candidate; the reader, or a gate on `/report`, decides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::report::Report;
use super::Side;

/// What a mirror does on an endpoint, worst first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictKind {
    /// Answered a failure where live did not: a 5xx, a transport error (`timeout`, `refused`,
    /// `reset`, `error`), or a gRPC server-side failure (`UNKNOWN`, `DEADLINE_EXCEEDED`,
    /// `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`, an unnamed code).
    Fails,
    /// Answered another status code (or gRPC status) than live, not a failure.
    Differs,
    /// Same codes, but fields differ beyond the noise (`--compare-bodies`).
    Content,
    /// On average over twice as slow as live, and over 100 ms slower.
    Slower,
    /// Same codes on every paired request, similar durations, no content regression.
    Match,
}

/// One finding about an endpoint on a mirror.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: VerdictKind,
    /// What was seen, e.g. `200 where live answered 404 ×20 of 20 paired`.
    pub detail: String,
}

/// The verdict on one endpoint for one mirror.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub name: String,
    /// The mirror's version tag.
    pub mirror: String,
    /// The worst of `findings`, or `match` when there are none.
    pub verdict: VerdictKind,
    /// Requests paired with their live response.
    pub paired: u64,
    /// Of `paired`, those answered with another code than live's.
    pub mismatched: u64,
    /// Mean durations over timed results, when both sides have some.
    pub live_ms: Option<f64>,
    pub mirror_ms: Option<f64>,
    /// Worst first; empty for a match.
    pub findings: Vec<Finding>,
}

/// A mirror slower than this factor of live's mean, and by more than `SLOWER_BY_MS`, is slower.
const SLOWER_FACTOR: f64 = 2.0;
const SLOWER_BY_MS: f64 = 100.0;

/// Most fields named in a content finding.
const VERDICT_FIELDS: usize = 5;

/// A failure code: an HTTP 5xx, a transport error, a gRPC server-side failure or unnamed code.
fn is_failure(code: &str) -> bool {
    match code.parse::<u16>() {
        Ok(status) => status >= 500,
        Err(_) => {
            matches!(
                code,
                "timeout"
                    | "refused"
                    | "reset"
                    | "error"
                    | "UNKNOWN"
                    | "DEADLINE_EXCEEDED"
                    | "INTERNAL"
                    | "UNAVAILABLE"
                    | "DATA_LOSS"
            ) || code.starts_with("grpc-")
        }
    }
}

/// `×20 of 20 paired`, with the share when it is not all of them.
fn share(count: u64, paired: u64) -> String {
    if count >= paired {
        format!("×{count} of {paired} paired")
    } else {
        let pct = count as f64 * 100.0 / paired.max(1) as f64;
        let digits = if pct >= 1.0 { 0 } else { 3 };
        format!("×{count} of {paired} paired ({pct:.digits$}%)")
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

/// What `judge` gathers per endpoint and mirror.
#[derive(Default)]
struct Seen {
    paired: u64,
    /// (live code, mirror code, count).
    mismatches: Vec<(String, String, u64)>,
    /// Timed results and their summed milliseconds.
    timed: (u64, f64),
    content: Option<String>,
}

/// One verdict per endpoint and mirror that has something to judge: requests paired with live,
/// or content compared. Mirrors in the agent's order, endpoints by name.
pub fn judge<'a>(r: &'a Report) -> Vec<Verdict> {
    let index = |label: &str| {
        r.mirrors
            .iter()
            .position(|m| m == label)
            .unwrap_or(r.mirrors.len())
    };
    let mut seen: BTreeMap<(usize, &'a str, &'a str), Seen> = BTreeMap::new();
    let at = |mirror: &'a str, name: &'a str| (index(mirror), mirror, name);
    for p in &r.paired {
        seen.entry(at(&p.mirror, &p.name)).or_default().paired += p.count;
    }
    for m in &r.mismatches {
        seen.entry(at(&m.mirror, &m.name))
            .or_default()
            .mismatches
            .push((m.live_code.clone(), m.mirror_code.clone(), m.count));
    }
    // Live: timed results per endpoint, and each code's count (does live itself flap?).
    let mut live_timed: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
    let mut live_codes: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for row in &r.rows {
        let timed = match row.side {
            Side::Live => {
                *live_codes.entry((&row.name, &row.code)).or_default() += row.count;
                live_timed.entry(&row.name).or_default()
            }
            Side::Mirror => match seen.get_mut(&at(&row.version, &row.name)) {
                Some(s) => &mut s.timed,
                None => continue,
            },
        };
        timed.0 += row.timed;
        timed.1 += row.avg_ms * row.timed as f64;
    }
    for row in r.content.iter().filter(|c| !c.secondary) {
        if let Some(detail) = content_detail(row) {
            seen.entry(at(&row.mirror, &row.name)).or_default().content = Some(detail);
        }
    }

    let mut out = Vec::new();
    for ((_, mirror, name), s) in seen {
        let mut findings = Vec::new();
        let mut mismatches = s.mismatches;
        mismatches.sort_by_key(|m| std::cmp::Reverse(m.2));
        for (live, cand, count) in &mismatches {
            let live_answered = live_codes.get(&(name, cand.as_str())).copied();
            findings.push(status_finding(live, cand, *count, s.paired, live_answered));
        }
        if let Some(detail) = s.content {
            findings.push(Finding {
                kind: VerdictKind::Content,
                detail,
            });
        }
        let mean = |(n, sum): (u64, f64)| (n > 0).then(|| sum / n as f64);
        let live_ms = live_timed.get(name).copied().and_then(mean);
        let mirror_ms = mean(s.timed);
        findings.extend(slower_finding(live_ms, mirror_ms));
        if findings.is_empty() && s.paired == 0 {
            continue;
        }
        findings.sort_by_key(|f| f.kind);
        out.push(Verdict {
            name: name.to_string(),
            mirror: mirror.to_string(),
            verdict: findings.first().map_or(VerdictKind::Match, |f| f.kind),
            paired: s.paired,
            mismatched: mismatches.iter().map(|m| m.2).sum(),
            live_ms,
            mirror_ms,
            findings,
        });
    }
    out
}

/// A mirror over `SLOWER_FACTOR` times live's mean duration and `SLOWER_BY_MS` more is slower.
fn slower_finding(live_ms: Option<f64>, mirror_ms: Option<f64>) -> Option<Finding> {
    let (l, m) = (live_ms?, mirror_ms?);
    (m > SLOWER_FACTOR * l && m - l > SLOWER_BY_MS).then(|| Finding {
        kind: VerdictKind::Slower,
        detail: format!("{} ms vs {} ms live", fmt_ms(m), fmt_ms(l)),
    })
}

/// What `count` paired requests answered with `cand` where live answered `live` say: a failure,
/// or a difference worded with its share and, when live itself answered `cand` on this endpoint
/// (`live_answered` times), that live may flap.
fn status_finding(
    live: &str,
    cand: &str,
    count: u64,
    paired: u64,
    live_answered: Option<u64>,
) -> Finding {
    if is_failure(cand) && !is_failure(live) {
        return Finding {
            kind: VerdictKind::Fails,
            detail: format!("{count}× {cand} where live answered {live}"),
        };
    }
    let mut detail = format!("{cand} where live answered {live} {}", share(count, paired));
    if let Some(n) = live_answered {
        detail.push_str(&format!(
            "; live itself answered {cand} ×{n} here, so live may flap"
        ));
    }
    Finding {
        kind: VerdictKind::Differs,
        detail,
    }
}

/// The content regressions of one endpoint on one candidate, if any.
fn content_detail(row: &super::diffs::ContentRow) -> Option<String> {
    let pct = |x: f64| format!("{:.0}%", x * 100.0);
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
    (!fields.is_empty()).then(|| fields.join(", "))
}

/// The verdict in words: one line per finding, failures first, then status differences,
/// content, slowness; then a "matches" line for each mirror whose every endpoint matches. With
/// one mirror it is just "mirror"; with several, each is named by its tag.
pub fn verdicts(r: &Report) -> Vec<String> {
    verdict_lines(r).into_iter().map(|(_, line)| line).collect()
}

/// `verdicts`' lines, each with its kind: a finding's, `Match` for a mirror that matches
/// everywhere, None for one with nothing to judge yet.
pub fn verdict_lines(r: &Report) -> Vec<(Option<VerdictKind>, String)> {
    let who = |label: &str| {
        if r.mirrors.len() > 1 {
            format!("mirror {label}")
        } else {
            "mirror".to_string()
        }
    };
    let judged = judge(r);
    let mut findings: Vec<(VerdictKind, String)> = judged
        .iter()
        .flat_map(|v| {
            v.findings.iter().map(|f| {
                let word = match f.kind {
                    VerdictKind::Fails => "fails on",
                    VerdictKind::Slower => "slower on",
                    _ => "differs on",
                };
                (
                    f.kind,
                    format!("{} {word} {}: {}", who(&v.mirror), v.name, f.detail),
                )
            })
        })
        .collect();
    findings.sort_by_key(|f| f.0);
    let mut out: Vec<(Option<VerdictKind>, String)> = findings
        .into_iter()
        .map(|(k, line)| (Some(k), line))
        .collect();
    for label in &r.mirrors {
        let mine: Vec<&Verdict> = judged.iter().filter(|v| &v.mirror == label).collect();
        if mine.is_empty() {
            out.push((
                None,
                format!(
                    "{}: nothing to judge yet, no request paired with its live response",
                    who(label)
                ),
            ));
        } else if mine.iter().all(|v| v.verdict == VerdictKind::Match) {
            out.push((
                Some(VerdictKind::Match),
                format!(
                    "{} matches live: same status codes, similar durations on {} endpoints",
                    who(label),
                    mine.len()
                ),
            ));
        }
    }
    out
}
