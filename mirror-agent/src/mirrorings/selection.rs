//! Which pods each declared mirroring covers: a pod watch per mirroring (its namespace, its
//! label selector, this node), run by `pods::watch`. Changes come back tagged with the
//! mirroring and the watch they came from, so that those of a watch already replaced are
//! ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::Client;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::pods::{self, PodChange, PodSelector};

/// A pod change of a declared mirroring.
#[derive(Debug)]
pub struct LanePod {
    pub key: String,
    pub watch: u64,
    pub change: PodChange,
}

/// How this agent finds pods for declared mirrorings.
pub struct PodWatches {
    client: Client,
    /// This node's name: only its pods have veths here.
    node: Option<String>,
    /// Attach inside every pod's namespace (`--in-pod`).
    in_pod: bool,
    tx: mpsc::Sender<LanePod>,
    next: u64,
}

/// A running watch and the pods it found, by pod key.
pub struct Selected {
    pub namespace: String,
    pub labels: String,
    pub watch: u64,
    /// The watch, and the task that tags its changes.
    tasks: [JoinHandle<()>; 2],
    pub pods: BTreeMap<String, IpAddr>,
    pub since: std::time::Instant,
}

impl Drop for Selected {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PodWatches {
    pub fn new(
        client: Client,
        node: Option<String>,
        in_pod: bool,
        tx: mpsc::Sender<LanePod>,
    ) -> PodWatches {
        PodWatches {
            client,
            node,
            in_pod,
            tx,
            next: 0,
        }
    }

    /// Starts watching the pods of `namespace` matching `labels` for mirroring `key`.
    pub fn start(&mut self, key: &str, namespace: &str, labels: &str) -> Selected {
        self.next += 1;
        let watch = self.next;
        let (tx, mut rx) = mpsc::channel(256);
        let sel = PodSelector {
            labels: labels.to_string(),
            namespace: Some(namespace.to_string()),
            node: self.node.clone(),
            in_pod: self.in_pod,
        };
        let (client, out, key) = (self.client.clone(), self.tx.clone(), key.to_string());
        let watching = tokio::spawn(pods::watch(client, sel, tx));
        let tagging = tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let lane_pod = LanePod {
                    key: key.clone(),
                    watch,
                    change,
                };
                if out.send(lane_pod).await.is_err() {
                    break;
                }
            }
        });
        Selected {
            namespace: namespace.to_string(),
            labels: labels.to_string(),
            watch,
            tasks: [watching, tagging],
            pods: BTreeMap::new(),
            since: std::time::Instant::now(),
        }
    }
}

impl Selected {
    /// Applies a change of this watch's; returns whether it changed the set.
    pub fn apply(&mut self, change: &PodChange) -> bool {
        match change {
            PodChange::Mirror { pod, ip, .. } => self.pods.insert(pod.clone(), *ip) != Some(*ip),
            PodChange::Forget { pod, .. } => self.pods.remove(pod).is_some(),
        }
    }

    /// What forgetting every pod takes.
    pub fn release(&self) -> Vec<PodChange> {
        self.pods
            .iter()
            .map(|(pod, ip)| PodChange::Forget {
                pod: pod.clone(),
                ip: *ip,
            })
            .collect()
    }
}
