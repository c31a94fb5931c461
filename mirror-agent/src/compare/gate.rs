//! CI gates: whether a report (an agent's `/report`, or a replay's) passes the conditions a
//! pipeline sets (`--fail-on`), and the same as JUnit XML (`--junit`), one test case per
//! endpoint and mirror, the format CI systems already show.
//!
//! A gate never passes on nothing: a report in which no request was paired with a live
//! response checked nothing, and fails whatever the conditions.

use std::fmt;
use std::str::FromStr;

use super::{Report, Verdict, VerdictKind};

/// Below this many milliseconds more than live, `slower=F` does not fire: sub-millisecond means
/// move by more than any factor from run to run.
const SLOWER_FLOOR_MS: f64 = 1.0;

/// What fails a gate, per endpoint and mirror.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Condition {
    /// A failure where live succeeded: a 5xx, a transport error, a gRPC server failure.
    Failure,
    /// Any other status code than live's, failures included.
    Mismatch,
    /// Fields that differ beyond the noise (`--compare-bodies`).
    Regression,
    /// The verdict's `slower` (over twice live's mean and 100 ms more), or with a factor: a mean
    /// over that many times live's, and `SLOWER_FLOOR_MS` more.
    Slower(Option<f64>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "unknown gate condition {0:?}. Fix: use failure, mismatch, regression, slower or slower=F \
     (a factor over 1, e.g. slower=1.5), comma-separated"
)]
pub struct ConditionError(String);

impl FromStr for Condition {
    type Err = ConditionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConditionError(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "failure" | "failures" => Ok(Condition::Failure),
            "mismatch" | "mismatches" => Ok(Condition::Mismatch),
            "regression" | "regressions" | "content" => Ok(Condition::Regression),
            "slower" => Ok(Condition::Slower(None)),
            other => {
                let factor = other.strip_prefix("slower=").ok_or_else(bad)?;
                match factor.parse::<f64>() {
                    Ok(f) if f.is_finite() && f > 1.0 => Ok(Condition::Slower(Some(f))),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Failure => f.write_str("failure"),
            Condition::Mismatch => f.write_str("mismatch"),
            Condition::Regression => f.write_str("regression"),
            Condition::Slower(None) => f.write_str("slower"),
            Condition::Slower(Some(x)) => write!(f, "slower={x}"),
        }
    }
}

impl Condition {
    /// Why `v` fails this condition, if it does.
    fn reason(&self, v: &Verdict) -> Option<String> {
        let found = |kinds: &[VerdictKind]| {
            let details: Vec<&str> = v
                .findings
                .iter()
                .filter(|f| kinds.contains(&f.kind))
                .map(|f| f.detail.as_str())
                .collect();
            (!details.is_empty()).then(|| format!("{self}: {}", details.join("; ")))
        };
        match self {
            Condition::Failure => found(&[VerdictKind::Fails]),
            Condition::Mismatch => found(&[VerdictKind::Fails, VerdictKind::Differs]),
            Condition::Regression => found(&[VerdictKind::Content]),
            Condition::Slower(None) => found(&[VerdictKind::Slower]),
            Condition::Slower(Some(factor)) => {
                let (live, mirror) = (v.live_ms?, v.mirror_ms?);
                (mirror > factor * live && mirror - live > SLOWER_FLOOR_MS).then(|| {
                    format!(
                        "{self}: {mirror:.1} ms vs {live:.1} ms live (×{:.2})",
                        mirror / live.max(f64::MIN_POSITIVE)
                    )
                })
            }
        }
    }
}

fn kind_word(kind: VerdictKind) -> &'static str {
    match kind {
        VerdictKind::Fails => "fails",
        VerdictKind::Differs => "differs",
        VerdictKind::Content => "content",
        VerdictKind::Slower => "slower",
        VerdictKind::Match => "match",
    }
}

/// One endpoint on one mirror, as the gate saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub endpoint: String,
    pub mirror: String,
    pub paired: u64,
    /// Why it fails; empty when it passes.
    pub reasons: Vec<String>,
    /// The verdict's findings, whether or not they fail the gate.
    pub findings: Vec<String>,
}

/// A report judged by a gate.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub cases: Vec<Case>,
    /// Requests paired with a live response, in all.
    pub paired: u64,
}

/// Judges `report` against `conditions`. With no conditions, every finding fails its case
/// (what `--junit` shows without `--fail-on`).
pub fn judge(report: &Report, conditions: &[Condition]) -> Outcome {
    let cases: Vec<Case> = report
        .verdicts
        .iter()
        .map(|v| {
            let findings: Vec<String> = v
                .findings
                .iter()
                .map(|f| format!("{}: {}", kind_word(f.kind), f.detail))
                .collect();
            let reasons = if conditions.is_empty() {
                findings.clone()
            } else {
                conditions.iter().filter_map(|c| c.reason(v)).collect()
            };
            Case {
                endpoint: v.name.clone(),
                mirror: v.mirror.clone(),
                paired: v.paired,
                reasons,
                findings,
            }
        })
        .collect();
    Outcome {
        paired: cases.iter().map(|c| c.paired).sum(),
        cases,
    }
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.paired > 0 && self.cases.iter().all(|c| c.reasons.is_empty())
    }

    /// One line per failing endpoint and mirror, or why nothing could be checked.
    pub fn failures(&self) -> Vec<String> {
        if self.paired == 0 {
            return vec![
                "no request was paired with a live response, so nothing was checked: was \
                 traffic mirrored (or the recording empty)?"
                    .to_string(),
            ];
        }
        self.cases
            .iter()
            .filter(|c| !c.reasons.is_empty())
            .map(|c| format!("{} on {}: {}", c.endpoint, c.mirror, c.reasons.join("; ")))
            .collect()
    }

    /// JUnit XML: a suite per mirror, a case per endpoint; a case fails with its reasons, and
    /// a case without paired requests is skipped.
    pub fn junit(&self, run: &str) -> String {
        use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};
        let mut report = quick_junit::Report::new(run);
        let mut mirrors: Vec<&str> = self.cases.iter().map(|c| c.mirror.as_str()).collect();
        mirrors.dedup();
        if self.paired == 0 {
            let mut suite = TestSuite::new(run);
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            status.set_message(self.failures().join("\n"));
            suite.add_test_case(TestCase::new("paired requests", status));
            report.add_test_suite(suite);
        }
        for mirror in mirrors {
            let mut suite = TestSuite::new(mirror);
            for c in self.cases.iter().filter(|c| c.mirror == mirror) {
                let status = if !c.reasons.is_empty() {
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    s.set_message(c.reasons.join("; "));
                    s
                } else if c.paired == 0 {
                    let mut s = TestCaseStatus::skipped();
                    s.set_message("no request paired with a live response");
                    s
                } else {
                    TestCaseStatus::success()
                };
                let mut case = TestCase::new(c.endpoint.as_str(), status);
                case.set_classname(mirror);
                case.add_property(("paired", c.paired.to_string().as_str()));
                if !c.findings.is_empty() {
                    case.set_system_out(c.findings.join("\n"));
                }
                suite.add_test_case(case);
            }
            report.add_test_suite(suite);
        }
        report
            .to_string()
            .expect("a JUnit report of plain strings serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::super::verdict::Finding;
    use super::*;

    fn verdict(name: &str, findings: Vec<(VerdictKind, &str)>, ms: (f64, f64)) -> Verdict {
        let findings: Vec<Finding> = findings
            .into_iter()
            .map(|(kind, d)| Finding {
                kind,
                detail: d.to_string(),
            })
            .collect();
        Verdict {
            name: name.into(),
            mirror: "cand".into(),
            verdict: findings.first().map_or(VerdictKind::Match, |f| f.kind),
            paired: 10,
            mismatched: 0,
            live_ms: Some(ms.0),
            mirror_ms: Some(ms.1),
            findings,
        }
    }

    fn report(verdicts: Vec<Verdict>) -> Report {
        Report {
            verdicts,
            ..serde_json::from_str(
                r#"{"rows":[],"mismatches":[],"latency_ratios":[],
                    "other_endpoint_results":0,"unpaired_evicted":0}"#,
            )
            .unwrap()
        }
    }

    fn conditions(s: &str) -> Vec<Condition> {
        s.split(',').map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn conditions_parse_and_bad_ones_name_the_fix() {
        assert_eq!(
            conditions("mismatch,regression,slower=1.5"),
            [
                Condition::Mismatch,
                Condition::Regression,
                Condition::Slower(Some(1.5))
            ]
        );
        for bad in ["slower=0.5", "slower=x", "faster", "slower=inf"] {
            let e = bad.parse::<Condition>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("Fix:"), "{e}");
        }
    }

    #[test]
    fn each_condition_fails_only_what_it_names() {
        let r = report(vec![
            verdict("GET /a", vec![], (10.0, 11.0)),
            verdict(
                "GET /b",
                vec![(
                    VerdictKind::Differs,
                    "404 where live answered 200 ×10 of 10 paired",
                )],
                (10.0, 10.0),
            ),
            verdict(
                "GET /c",
                vec![(VerdictKind::Fails, "3× 503 where live answered 200")],
                (1.0, 1.0),
            ),
            verdict(
                "GET /d",
                vec![(VerdictKind::Content, "$.price differs")],
                (1.0, 1.0),
            ),
            verdict("GET /e", vec![], (10.0, 16.0)),
            // 3× slower but by half a millisecond: noise, not a regression.
            verdict("GET /f", vec![], (0.25, 0.75)),
        ]);
        let failing = |c: &str| -> Vec<String> {
            let o = judge(&r, &conditions(c));
            o.cases
                .iter()
                .filter(|c| !c.reasons.is_empty())
                .map(|c| c.endpoint.clone())
                .collect()
        };
        assert_eq!(failing("failure"), ["GET /c"]);
        assert_eq!(failing("mismatch"), ["GET /b", "GET /c"]);
        assert_eq!(failing("regression"), ["GET /d"]);
        assert_eq!(failing("slower=1.5"), ["GET /e"]);
        assert!(failing("slower").is_empty());
        assert_eq!(failing("slower=1.7"), Vec::<String>::new());
        let o = judge(&r, &conditions("mismatch,slower=1.5"));
        assert!(!o.passed());
        let lines = o.failures();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("GET /b on cand: mismatch: 404 where live answered 200"));
        assert!(
            lines[2].contains("slower=1.5: 16.0 ms vs 10.0 ms live (×1.60)"),
            "{lines:?}"
        );
        assert!(judge(&r, &conditions("regression")).failures()[0].contains("$.price"));
        let only_a = report(vec![verdict("GET /a", vec![], (10.0, 11.0))]);
        assert!(judge(&only_a, &conditions("mismatch,regression,slower=1.5")).passed());
    }

    #[test]
    fn nothing_paired_never_passes() {
        let mut v = verdict("GET /a", vec![], (1.0, 1.0));
        v.paired = 0;
        for r in [report(vec![]), report(vec![v])] {
            let o = judge(&r, &conditions("mismatch"));
            assert!(!o.passed());
            assert!(o.failures()[0].contains("nothing was checked"));
            assert!(o.junit("replay").contains("failures=\"1\""));
        }
    }

    #[test]
    fn junit_has_a_case_per_endpoint_and_mirror() {
        let r = report(vec![
            verdict("GET /a", vec![], (10.0, 11.0)),
            verdict(
                "GET /b & <c>",
                vec![(VerdictKind::Differs, "404 where live answered 200")],
                (1.0, 1.0),
            ),
        ]);
        let xml = judge(&r, &conditions("mismatch")).junit("replay");
        assert!(
            xml.contains(r#"<testsuites name="replay" tests="2" failures="1" errors="0""#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<testcase name="GET /b &amp; &lt;c&gt;" classname="cand""#),
            "{xml}"
        );
        assert!(
            xml.contains("mismatch: 404 where live answered 200"),
            "{xml}"
        );
        // Without conditions, every finding fails its case.
        let none = judge(&r, &[]);
        assert_eq!(
            none.cases.iter().filter(|c| !c.reasons.is_empty()).count(),
            1
        );
    }
}
