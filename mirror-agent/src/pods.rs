//! Pods selected by label (`--selector`): which of this node's pods are mirrored, as they come
//! and go across rollouts. A pod is mirrored from when it is Ready until it is deleted.
//!
//! `PodSet` is the pure part: pod states in, attach and detach decisions out, testable without
//! a cluster. `watch` feeds it from the Kubernetes API with kube-rs's watcher, which lists,
//! watches, resumes a dropped watch, and lists again after `410 Gone`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::mpsc;

/// A pod mirrored now, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirroredPod {
    pub pod: String,
    pub ip: std::net::IpAddr,
    /// Where the program is attached, as `Target` shows it.
    pub iface: String,
    /// Attached inside the pod's namespace rather than on its host veth.
    pub in_pod: bool,
    pub mesh: Option<Mesh>,
}

/// The pods mirrored now, and the attachments that failed, by reason.
#[derive(Clone, Debug, Default)]
pub struct PodsReport {
    pub mirrored: Vec<MirroredPod>,
    pub attach_failures: BTreeMap<&'static str, u64>,
}

pub type MirroredPods = std::sync::Arc<std::sync::Mutex<PodsReport>>;

/// A service mesh whose proxy hands the pod's application its plaintext inside the pod, over
/// the pod's `lo`, while the wire between nodes carries mTLS: such a pod is mirrored from inside
/// its network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    /// An `istio-proxy` sidecar (Envoy connects to the app at POD_IP:port from 127.0.0.6).
    IstioSidecar,
    /// Istio ambient: ztunnel's in-pod sockets connect to the app with the client's address.
    IstioAmbient,
    /// A `linkerd-proxy` sidecar (connects to the original POD_IP:port).
    Linkerd,
}

impl Mesh {
    /// What a pod's metadata says: the annotations the meshes' injectors and CNI write, or the
    /// proxy containers (a native sidecar is an init container). `istio.io/dataplane-mode=none`
    /// opts a pod out of ambient.
    fn of(pod: &Pod) -> Option<Mesh> {
        let meta = &pod.metadata;
        let annotated = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
        let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
        let spec = pod.spec.as_ref();
        let containers = spec.into_iter().flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        });
        let has_container = |name: &str| containers.clone().any(|c| c.name == name);
        if annotated("sidecar.istio.io/status").is_some() || has_container("istio-proxy") {
            return Some(Mesh::IstioSidecar);
        }
        if annotated("linkerd.io/proxy-version").is_some() || has_container("linkerd-proxy") {
            return Some(Mesh::Linkerd);
        }
        // istio-cni annotates every pod it redirects, whether the pod or its namespace asked.
        let ambient = label("istio.io/dataplane-mode").map(String::as_str) == Some("ambient")
            || annotated("ambient.istio.io/redirection").map(String::as_str) == Some("enabled");
        let opted_out = label("istio.io/dataplane-mode").map(String::as_str) == Some("none");
        (ambient && !opted_out).then_some(Mesh::IstioAmbient)
    }

    /// For metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Mesh::IstioSidecar => "istio_sidecar",
            Mesh::IstioAmbient => "istio_ambient",
            Mesh::Linkerd => "linkerd",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mesh::IstioSidecar => "Istio (sidecar)",
            Mesh::IstioAmbient => "Istio (ambient)",
            Mesh::Linkerd => "Linkerd",
        }
    }
}

/// What matters of a pod for mirroring it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    /// `namespace/name`.
    pub key: String,
    pub ip: Option<IpAddr>,
    pub ready: bool,
    /// A pod on the node's network has no veth of its own to attach to.
    pub host_network: bool,
    pub mesh: Option<Mesh>,
    /// The pod's UID: its cgroup's name on the node.
    pub uid: Option<String>,
}

impl PodState {
    pub fn from_pod(pod: &Pod) -> PodState {
        let meta = &pod.metadata;
        let key = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("")
        );
        let status = pod.status.as_ref();
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        PodState {
            key,
            ip,
            ready,
            host_network,
            mesh: Mesh::of(pod),
            uid: meta.uid.clone(),
        }
    }

    /// Ready, with an address, behind a veth of its own.
    fn mirrorable(&self) -> Option<IpAddr> {
        if self.host_network || !self.ready {
            return None;
        }
        self.ip
    }
}

/// A decision for the capture stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodChange {
    Mirror {
        pod: String,
        ip: IpAddr,
        mesh: Option<Mesh>,
        uid: Option<String>,
    },
    Forget {
        pod: String,
        ip: IpAddr,
    },
}

/// The pods mirrored now, by key.
#[derive(Debug, Default)]
pub struct PodSet {
    mirrored: BTreeMap<String, IpAddr>,
}

impl PodSet {
    /// A pod was added or changed.
    pub fn apply(&mut self, pod: &PodState) -> Vec<PodChange> {
        if pod.host_network && pod.ready {
            log::warn!(
                "pod {} uses the node's network (hostNetwork): it has no veth to mirror; skipped",
                pod.key
            );
        }
        let mut out = Vec::new();
        let have = self.mirrored.get(&pod.key).copied();
        // A pod is mirrored from when it is Ready until it is gone: a terminating pod is no
        // longer Ready but still answers its open connections, and they are live traffic.
        let keeps_serving = !pod.host_network && have.is_some() && have == pod.ip;
        let want = if keeps_serving {
            have
        } else {
            pod.mirrorable()
        };
        if have == want {
            return out;
        }
        if let Some(ip) = have {
            self.mirrored.remove(&pod.key);
            out.push(PodChange::Forget {
                pod: pod.key.clone(),
                ip,
            });
        }
        if let Some(ip) = want {
            self.mirrored.insert(pod.key.clone(), ip);
            out.push(PodChange::Mirror {
                pod: pod.key.clone(),
                ip,
                mesh: pod.mesh,
                uid: pod.uid.clone(),
            });
        }
        out
    }

    /// A pod is gone.
    pub fn delete(&mut self, key: &str) -> Vec<PodChange> {
        self.mirrored
            .remove(key)
            .map(|ip| PodChange::Forget {
                pod: key.to_string(),
                ip,
            })
            .into_iter()
            .collect()
    }

    /// A full list (after a relist): pods not in it are gone, the others are applied.
    pub fn resync(&mut self, pods: &[PodState]) -> Vec<PodChange> {
        let gone: Vec<String> = self
            .mirrored
            .keys()
            .filter(|k| !pods.iter().any(|p| &p.key == *k))
            .cloned()
            .collect();
        let mut out: Vec<PodChange> = gone.iter().flat_map(|k| self.delete(k)).collect();
        for p in pods {
            out.extend(self.apply(p));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.mirrored.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mirrored.is_empty()
    }
}

/// Which pods to mirror.
#[derive(Clone, Debug)]
pub struct PodSelector {
    /// A label selector, e.g. `app=bookservice`.
    pub labels: String,
    /// None: all namespaces.
    pub namespace: Option<String>,
    /// This node's name (from the downward API): only its pods have veths here.
    pub node: Option<String>,
    /// Attach inside every pod's namespace, meshed or not (`--in-pod`).
    pub in_pod: bool,
}

/// Watches the selected pods and sends what to mirror and forget, until `changes` is closed.
/// API errors (unreachable, forbidden) are logged with what to fix, and the watch is retried
/// with backoff; the pods already mirrored stay mirrored meanwhile.
pub async fn watch(client: Client, sel: PodSelector, changes: mpsc::Sender<PodChange>) {
    let api: Api<Pod> = match &sel.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut cfg = watcher::Config::default().labels(&sel.labels);
    if let Some(node) = &sel.node {
        cfg = cfg.fields(&format!("spec.nodeName={node}"));
    }
    let mut set = PodSet::default();
    let mut listing: Vec<PodState> = Vec::new();
    let stream = watcher::watcher(api, cfg).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let decided = match event {
            Ok(watcher::Event::Apply(pod)) => set.apply(&PodState::from_pod(&pod)),
            Ok(watcher::Event::Delete(pod)) => set.delete(&PodState::from_pod(&pod).key),
            Ok(watcher::Event::Init) => {
                listing.clear();
                Vec::new()
            }
            Ok(watcher::Event::InitApply(pod)) => {
                listing.push(PodState::from_pod(&pod));
                Vec::new()
            }
            Ok(watcher::Event::InitDone) => {
                let out = set.resync(&listing);
                log::info!(
                    "pods matching {:?}{}: {} mirrorable",
                    sel.labels,
                    sel.node
                        .as_deref()
                        .map(|n| format!(" on node {n}"))
                        .unwrap_or_default(),
                    set.len()
                );
                out
            }
            Err(e) => {
                log::warn!("{}", explain(&e));
                Vec::new()
            }
        };
        for change in decided {
            if changes.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// A watch error with what to do about it.
fn explain(e: &watcher::Error) -> String {
    let text = e.to_string();
    if text.contains("403") || text.to_ascii_lowercase().contains("forbidden") {
        format!(
            "the Kubernetes API refused to list or watch pods ({text}): the agent's \
             ServiceAccount needs a ClusterRole with get, list and watch on pods \
             (deploy/daemonset.yaml has one); retrying"
        )
    } else {
        format!("watching pods failed ({text}); retrying with backoff, current pods stay mirrored")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(key: &str, ip: Option<&str>, ready: bool) -> PodState {
        PodState {
            key: key.into(),
            ip: ip.map(|i| i.parse().unwrap()),
            ready,
            host_network: false,
            mesh: None,
            uid: None,
        }
    }

    fn mirror(pod: &str, ip: &str) -> PodChange {
        PodChange::Mirror {
            pod: pod.into(),
            ip: ip.parse().unwrap(),
            mesh: None,
            uid: None,
        }
    }

    fn forget(pod: &str, ip: &str) -> PodChange {
        PodChange::Forget {
            pod: pod.into(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn a_pod_is_mirrored_once_ready_and_forgotten_when_gone() {
        let mut s = PodSet::default();
        assert_eq!(s.apply(&pod("d/a", None, false)), []);
        assert_eq!(s.apply(&pod("d/a", Some("10.0.0.5"), false)), []);
        assert_eq!(
            s.apply(&pod("d/a", Some("10.0.0.5"), true)),
            [mirror("d/a", "10.0.0.5")]
        );
        assert_eq!(s.apply(&pod("d/a", Some("10.0.0.5"), true)), []);
        // Terminating: not Ready, but it still answers its open connections until it is gone.
        assert_eq!(s.apply(&pod("d/a", Some("10.0.0.5"), false)), []);
        assert_eq!(s.delete("d/a"), [forget("d/a", "10.0.0.5")]);
        // Never Ready: never mirrored.
        assert_eq!(s.apply(&pod("d/b", Some("10.0.0.6"), false)), []);
        assert!(s.is_empty());
    }

    #[test]
    fn host_network_pods_and_new_addresses() {
        let mut s = PodSet::default();
        let mut h = pod("d/h", Some("192.168.1.10"), true);
        h.host_network = true;
        assert_eq!(s.apply(&h), []);
        s.apply(&pod("d/a", Some("10.0.0.5"), true));
        assert_eq!(
            s.apply(&pod("d/a", Some("10.0.0.6"), true)),
            [forget("d/a", "10.0.0.5"), mirror("d/a", "10.0.0.6")]
        );
    }

    #[test]
    fn a_relist_forgets_what_went_missing() {
        let mut s = PodSet::default();
        s.apply(&pod("d/a", Some("10.0.0.5"), true));
        s.apply(&pod("d/b", Some("10.0.0.7"), true));
        let out = s.resync(&[
            pod("d/b", Some("10.0.0.7"), true),
            pod("d/c", Some("10.0.0.9"), true),
        ]);
        assert_eq!(out, [forget("d/a", "10.0.0.5"), mirror("d/c", "10.0.0.9")]);
        assert_eq!(s.len(), 2);
    }

    fn meshed(json: serde_json::Value) -> Option<Mesh> {
        let pod: Pod = serde_json::from_value(json).unwrap();
        PodState::from_pod(&pod).mesh
    }

    #[test]
    fn meshes_are_told_by_their_marks() {
        let c = |name: &str| serde_json::json!({"name": name, "image": "x"});
        assert_eq!(
            meshed(
                serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [c("app")]}})
            ),
            None
        );
        assert_eq!(
            meshed(
                serde_json::json!({"metadata": {"name": "p", "annotations": {"sidecar.istio.io/status": "{}"}}})
            ),
            Some(Mesh::IstioSidecar)
        );
        // A native sidecar: the proxy is an init container.
        assert_eq!(
            meshed(serde_json::json!({"metadata": {"name": "p"},
                "spec": {"containers": [c("app")], "initContainers": [c("istio-proxy")]}})),
            Some(Mesh::IstioSidecar)
        );
        assert_eq!(
            meshed(
                serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [c("app"), c("linkerd-proxy")]}})
            ),
            Some(Mesh::Linkerd)
        );
        assert_eq!(
            meshed(
                serde_json::json!({"metadata": {"name": "p", "annotations": {"linkerd.io/proxy-version": "edge-24.1.1"}}})
            ),
            Some(Mesh::Linkerd)
        );
        assert_eq!(
            meshed(
                serde_json::json!({"metadata": {"name": "p", "labels": {"istio.io/dataplane-mode": "ambient"}}})
            ),
            Some(Mesh::IstioAmbient)
        );
        // Enrolled through its namespace's label: the CNI's annotation says so.
        assert_eq!(
            meshed(
                serde_json::json!({"metadata": {"name": "p", "annotations": {"ambient.istio.io/redirection": "enabled"}}})
            ),
            Some(Mesh::IstioAmbient)
        );
        assert_eq!(
            meshed(serde_json::json!({"metadata": {"name": "p",
                "labels": {"istio.io/dataplane-mode": "none"},
                "annotations": {"ambient.istio.io/redirection": "enabled"}}})),
            None
        );
    }
}
