//! What each node's agent says in a TrafficMirror's status: its own entry of `status.nodes`
//! (pods mirrored, requests mirrored and not mirrored by reason, the verdict, conditions),
//! written by server-side apply with a field manager of its own, so that the API server merges
//! the nodes' entries and no agent overwrites another's.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::spec::{Condition, NodeStatus, TrafficMirror};
use super::Refused;
use crate::compare::Report;
use crate::compare::{judge, VerdictKind};
use crate::replay::ReplayStats;

/// This node's entries, by mirroring, on their way to the writer.
pub type StatusBatch = Vec<(String, NodeStatus)>;

/// An unchanged entry is written again after this long, so that a stale one shows its age.
pub const REFRESH: Duration = Duration::from_secs(60);

/// How often the agent computes its entries.
pub const EVERY: Duration = Duration::from_secs(2);

/// A selector's watch that has found no pod for this long says so.
pub const NO_PODS_AFTER: Duration = Duration::from_secs(5);

/// The verdict in one line: per candidate, how many endpoints fail, differ, regress, are
/// slower or match.
pub fn verdict_line(report: &Report) -> String {
    let judged = judge(report);
    let parts: Vec<String> = report
        .mirrors
        .iter()
        .map(|m| {
            let mine: Vec<VerdictKind> = judged
                .iter()
                .filter(|v| &v.mirror == m)
                .map(|v| v.verdict)
                .collect();
            if mine.is_empty() {
                return format!("{m}: nothing paired yet");
            }
            let words = [
                (VerdictKind::Fails, "fails"),
                (VerdictKind::Differs, "differs"),
                (VerdictKind::Content, "content"),
                (VerdictKind::Slower, "slower"),
                (VerdictKind::Match, "match"),
            ];
            let counts: Vec<String> = words
                .iter()
                .filter_map(|(k, w)| {
                    let n = mine.iter().filter(|v| *v == k).count();
                    (n > 0).then(|| format!("{n} {w}"))
                })
                .collect();
            format!("{m}: {}", counts.join(", "))
        })
        .collect();
    parts.join("; ")
}

/// Requests mirrored, and not mirrored by reason, over a mirroring's candidates.
pub fn traffic(replay: &[&ReplayStats]) -> (u64, BTreeMap<String, u64>) {
    let mut dropped = BTreeMap::new();
    let mut sent = 0;
    for r in replay {
        sent += r.sent.load(Ordering::Relaxed);
        for (reason, n) in [
            ("queue_full", &r.dropped_queue_full),
            ("rate_limit", &r.dropped_rate_limit),
            ("backoff", &r.dropped_backoff),
            ("unsendable", &r.dropped_unsendable),
            ("stopped", &r.dropped_at_stop),
            ("write_policy", &r.filtered_write_policy),
            ("method", &r.filtered_method),
            ("path", &r.filtered_path),
        ] {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                *dropped.entry(reason.to_string()).or_default() += n;
            }
        }
    }
    (sent, dropped)
}

/// The entry of a mirroring refused on this node.
pub fn refused(node: &str, generation: i64, r: &Refused) -> NodeStatus {
    NodeStatus {
        node: node.to_string(),
        observed_generation: generation,
        conditions: vec![
            condition("Ready", false, r.reason, r.message.clone()),
            condition("Degraded", true, r.reason, r.message.clone()),
        ],
        ..NodeStatus::default()
    }
}

pub fn condition(type_: &str, on: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if on { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
    }
}

/// Writes the entries it is sent, each when it changed or is older than `REFRESH`, until the
/// sender is dropped. A refused write is logged (with the RBAC rule it needs) and tried again
/// with the next batch.
pub async fn write(client: Client, node: String, mut rx: mpsc::Receiver<StatusBatch>) {
    let manager = format!("mirror-agent/{node}");
    let params = PatchParams::apply(&manager).force();
    let mut written: BTreeMap<String, (NodeStatus, Instant)> = BTreeMap::new();
    // Keys whose last write failed, so that a lasting failure is logged once.
    let mut failing = std::collections::BTreeSet::new();
    while let Some(batch) = rx.recv().await {
        for (key, status) in batch {
            let fresh = written
                .get(&key)
                .is_some_and(|(s, at)| *s == status && at.elapsed() < REFRESH);
            if fresh {
                continue;
            }
            let (ns, name) = key.split_once('/').unwrap_or(("default", &key));
            let api: Api<TrafficMirror> = Api::namespaced(client.clone(), ns);
            let body = serde_json::json!({
                "apiVersion": "mirror-agent.dev/v1alpha1",
                "kind": "TrafficMirror",
                "status": {"nodes": [status]},
            });
            match api.patch_status(name, &params, &Patch::Apply(&body)).await {
                Ok(_) => {
                    failing.remove(&key);
                    written.insert(key, (status, Instant::now()));
                }
                // Deleted since: its watch event is on its way.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    log::debug!("TrafficMirror {key} is gone: no status written")
                }
                Err(e) if failing.insert(key.clone()) => log::warn!(
                    "writing the status of TrafficMirror {key}: {e}; the agent's \
                     ServiceAccount needs patch on trafficmirrors/status \
                     (deploy/daemonset.yaml); retrying"
                ),
                Err(e) => log::debug!("writing the status of TrafficMirror {key}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{Comparator, CompareConfig};
    use crate::exchange::{MirrorOutcome, MirrorResult};
    use crate::http::ResponseMeta;

    #[test]
    fn the_verdict_line_counts_endpoints_per_candidate() {
        let mut c = Comparator::new(CompareConfig {
            mirror_labels: vec!["v3".into(), "v4".into()],
            ..CompareConfig::default()
        });
        for (seq, target, status) in [(0, "/a", 404), (1, "/b", 200)] {
            c.live(&ResponseMeta {
                conn: 1,
                server: "10.0.0.2:80".parse().unwrap(),
                request_seq: seq,
                method: "GET".into(),
                target: target.into(),
                status: 200,
                grpc_status: None,
                request_last_ts: 0,
                response_first_ts: 1_000_000,
            });
            c.mirror(
                0,
                &MirrorOutcome {
                    conn: 1,
                    seq,
                    method: "GET".into(),
                    target: target.into(),
                    result: MirrorResult::Status(status),
                    duration: Some(Duration::from_millis(1)),
                    content: None,
                },
            );
        }
        assert_eq!(
            verdict_line(&c.report()),
            "v3: 1 differs, 1 match; v4: nothing paired yet"
        );
    }

    #[test]
    fn traffic_sums_candidates_and_names_only_reasons_seen() {
        let (a, b) = (ReplayStats::default(), ReplayStats::default());
        a.sent.store(5, Ordering::Relaxed);
        b.sent.store(2, Ordering::Relaxed);
        b.filtered_write_policy.store(3, Ordering::Relaxed);
        let (sent, dropped) = traffic(&[&a, &b]);
        assert_eq!(sent, 7);
        assert_eq!(dropped, BTreeMap::from([("write_policy".to_string(), 3)]));
    }
}
