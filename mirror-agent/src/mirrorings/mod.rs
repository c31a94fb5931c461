//! Declared mirrorings (TrafficMirror objects): the agent adds, changes and removes them while it
//! runs. Each one is a lane of the pipeline (`lanes`): its live servers (its ports, and the pods
//! its own watch selects: `selection`), its candidates' replay stages, its own comparison.
//! `Mirrorings` owns the running lanes and turns each new declared set into changes of the
//! pipeline's lane table; `source` reads the declarations, `status` reports on them.

pub mod lanes;
pub mod selection;
pub mod source;
pub mod spec;
pub mod status;

use std::collections::{BTreeMap, HashSet};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use hyper::header::HeaderName;

use crate::compare::{CompareConfig, Comparison};
use crate::pods::PodChange;
use crate::record::{RecordConfig, RecordStats, Recorder};
use crate::redact::Redactor;
use crate::replay::secrets::{SecretHeader, SecretWatch, REREAD_EVERY};
use crate::replay::{self, Mark, ReplayConfig, ReplayStats, Replayer, TlsOptions};
use lanes::{Lane, LaneChange, LaneMirror, LaneRecord};
use selection::{LanePod, PodWatches, Selected};
use source::{Declaration, Declared};
use spec::{Mirroring, NodeStatus, TrafficMirrorSpec};

/// What every declared mirroring's stages start from: the agent's own settings (caps, timeouts,
/// memory plan), with each candidate's URL and rewrites set on top.
#[derive(Clone, Debug)]
pub struct LaneTemplate {
    pub replay: ReplayConfig,
    pub tls: TlsOptions,
    /// `--mark`: each candidate's requests carry its name in this header.
    pub mark: Option<HeaderName>,
    pub compare: CompareConfig,
    /// The ports the capture reads; a mirroring of another port would see nothing.
    pub captured_ports: Vec<u16>,
    /// How long a removed mirroring's requests in flight may finish.
    pub grace: Duration,
    /// Where and how mirrorings that ask are recorded (`--record-mirrorings`): each in its
    /// directory's NAMESPACE/NAME.
    pub record: Option<RecordConfig>,
    /// The HMAC key of redaction (`--redact-key`).
    pub redact_key: Option<Vec<u8>>,
}

/// Where declared mirrorings come from.
#[derive(Clone, Debug)]
pub enum Declarations {
    /// A YAML file (`--config`).
    File(std::path::PathBuf),
    /// TrafficMirror objects in the Kubernetes API, of one namespace or all
    /// (`--traffic-mirrors`).
    Cluster { namespace: Option<String> },
}

/// Declared mirrorings: where from, what their stages start from, and for pods this node.
#[derive(Clone, Debug)]
pub struct MirroringsConfig {
    pub declarations: Declarations,
    pub template: LaneTemplate,
    pub node: Option<String>,
    /// Attach inside every selected pod's namespace (`--in-pod`).
    pub in_pod: bool,
}

/// What the agent's main loop receives and sends for declared mirrorings (nothing, without).
#[derive(Default)]
pub struct Feeds {
    pub declared: Option<tokio::sync::mpsc::Receiver<Declared>>,
    pub pods: Option<tokio::sync::mpsc::Receiver<LanePod>>,
    /// This node's name and where its status entries go (declared in the API only).
    pub status: Option<(String, tokio::sync::mpsc::Sender<status::StatusBatch>)>,
}

/// Starts reading the declarations (and, with the Kubernetes API, watching pods and writing
/// status) on `rt`. Declarations from the API need a client; a file uses one when there is one,
/// for its mirrorings that select pods.
pub fn start(
    cfg: &MirroringsConfig,
    table: mpsc::Sender<LaneChange>,
    rt: &tokio::runtime::Handle,
) -> Result<(Mirrorings, Feeds), kube::Error> {
    let cluster = matches!(cfg.declarations, Declarations::Cluster { .. });
    let client = match &cfg.declarations {
        Declarations::Cluster { .. } => Some(rt.block_on(kube::Client::try_default())?),
        Declarations::File(_) => rt.block_on(kube::Client::try_default()).ok(),
    };
    let (declared_tx, declared) = tokio::sync::mpsc::channel(4);
    match &cfg.declarations {
        Declarations::File(path) => {
            rt.spawn(source::watch_file(path.clone(), declared_tx));
        }
        Declarations::Cluster { namespace } => {
            let client = client.clone().expect("made above");
            rt.spawn(source::watch_cluster(
                client,
                namespace.clone(),
                declared_tx,
            ));
        }
    }
    let (pods_tx, pods) = tokio::sync::mpsc::channel(1024);
    let watches = client
        .clone()
        .map(|c| PodWatches::new(c, cfg.node.clone(), cfg.in_pod, pods_tx));
    let status = match (&client, &cfg.node) {
        (Some(c), Some(node)) if cluster => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            rt.spawn(status::write(c.clone(), node.clone(), rx));
            Some((node.clone(), tx))
        }
        _ => None,
    };
    let feeds = Feeds {
        declared: Some(declared),
        pods: watches.is_some().then_some(pods),
        status,
    };
    let mirrorings = Mirrorings::new(cfg.template.clone(), table, rt.clone(), watches, cluster);
    Ok((mirrorings, feeds))
}

/// A running mirroring, for metrics and `/report`.
#[derive(Clone)]
pub struct LaneView {
    pub key: String,
    pub comparison: Comparison,
    /// Each candidate's name and replay counters.
    pub replay: Vec<(String, Arc<ReplayStats>)>,
    pub record: Option<Arc<RecordStats>>,
}

/// The running mirrorings, read by `/metrics` and `/report`.
pub type LaneViews = Arc<Mutex<Vec<LaneView>>>;

/// A declared mirroring that does not run, and why (shown in the log and its status).
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
}

struct Running {
    spec: TrafficMirrorSpec,
    generation: i64,
    /// The pods it covers, when it selects pods (else whatever the agent is attached to).
    selected: Option<Selected>,
    candidates: Vec<(String, Replayer)>,
    comparison: Comparison,
    /// Re-reads the candidates' secret headers; stops with the mirroring.
    _secrets: Option<SecretWatch>,
    record: Option<Arc<RecordStats>>,
}

/// The running declared mirrorings. Owned by the agent's main loop.
pub struct Mirrorings {
    template: LaneTemplate,
    table: mpsc::Sender<LaneChange>,
    running: BTreeMap<String, Running>,
    /// Refused declarations, with the generation and spec refused.
    refused: BTreeMap<String, (Refused, i64, TrafficMirrorSpec)>,
    views: LaneViews,
    rt: tokio::runtime::Handle,
    /// Pod watches, with a Kubernetes API.
    pods: Option<PodWatches>,
    /// Declared in the API: a mirroring without a selector covers its whole namespace.
    cluster: bool,
}

impl Mirrorings {
    /// Mirrorings whose lanes go to the pipeline through `table`.
    /// `pods` finds the pods of mirrorings that select some; `cluster` says the declarations come
    /// from the API, where a mirroring without a selector covers its namespace's pods.
    pub fn new(
        template: LaneTemplate,
        table: mpsc::Sender<LaneChange>,
        rt: tokio::runtime::Handle,
        pods: Option<PodWatches>,
        cluster: bool,
    ) -> Mirrorings {
        Mirrorings {
            template,
            table,
            running: BTreeMap::new(),
            refused: BTreeMap::new(),
            views: LaneViews::default(),
            rt,
            pods,
            cluster,
        }
    }

    pub fn views(&self) -> &LaneViews {
        &self.views
    }

    /// Makes the running mirrorings what is declared: starts the new, restarts the changed
    /// (their candidates' stages; the comparison goes on when the candidates' names and the
    /// comparison's settings stay, the pods when the selector stays), stops the removed. A
    /// refused one leaves the others running. Returns the pods no longer covered, for the
    /// capture to let go of.
    pub async fn declare(&mut self, declared: Declared) -> Vec<PodChange> {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|k| !declared.contains_key(*k))
            .cloned()
            .collect();
        let mut released = Vec::new();
        for key in gone {
            log::info!("mirroring {key} removed: stopped");
            released.extend(self.stop(&key));
        }
        self.refused.retain(|k, _| declared.contains_key(k));
        for (key, Declaration { spec, generation }) in declared {
            if let Some(r) = self.running.get_mut(&key).filter(|r| r.spec == spec) {
                r.generation = generation;
                continue;
            }
            // An invalid spec stays invalid; others (a mirror not resolving yet) are tried again.
            let same_invalid = self
                .refused
                .get(&key)
                .is_some_and(|(r, _, refused)| r.reason == "InvalidSpec" && *refused == spec);
            if same_invalid {
                continue;
            }
            match self.start(&key, spec.clone(), generation).await {
                Ok(freed) => {
                    released.extend(freed);
                    self.refused.remove(&key);
                }
                Err(refused) => {
                    log::warn!("mirroring {key} not started: {}", refused.message);
                    // It keeps running as it was, if it was; its status says why not the new.
                    self.refused.insert(key, (refused, generation, spec));
                }
            }
        }
        self.publish();
        released
    }

    /// A pod change from a mirroring's watch: the pipeline learns it, and it is returned for the
    /// capture (None when stale or no change).
    pub fn pod(&mut self, lp: LanePod) -> Option<PodChange> {
        let running = self.running.get_mut(&lp.key)?;
        let selected = running.selected.as_mut().filter(|s| s.watch == lp.watch)?;
        if !selected.apply(&lp.change) {
            return None;
        }
        let (ip, mirrored) = match &lp.change {
            PodChange::Mirror { ip, .. } => (*ip, true),
            PodChange::Forget { ip, .. } => (*ip, false),
        };
        let _ = self.table.send(LaneChange::Pod {
            key: lp.key,
            ip,
            mirrored,
        });
        Some(lp.change)
    }

    /// This node's entry for each declared mirroring's status.
    pub fn statuses(&self, node: &str) -> Vec<(String, NodeStatus)> {
        let mut out: Vec<(String, NodeStatus)> = self
            .running
            .iter()
            .map(|(key, r)| {
                let refused = self.refused.get(key).map(|(r, g, _)| (r, *g));
                (key.clone(), r.status(node, refused))
            })
            .collect();
        for (key, (refused, generation, _)) in &self.refused {
            if !self.running.contains_key(key) {
                out.push((key.clone(), status::refused(node, *generation, refused)));
            }
        }
        out
    }

    /// Starts (or restarts) a mirroring; returns the pods its old version covered and the new
    /// one does not.
    async fn start(
        &mut self,
        key: &str,
        spec: TrafficMirrorSpec,
        generation: i64,
    ) -> Result<Vec<PodChange>, Refused> {
        let m = Mirroring::check(key, &spec).map_err(|e| Refused {
            reason: e.reason(),
            message: e.to_string(),
        })?;
        let by_pods = self.admit(&m)?;
        let configs = self.replay_configs(&m).await?;
        let (record, record_stats) = self.lane_record(key, &m, &spec)?;
        let comparison = match self.running.get(key) {
            Some(old) if same_comparison(&old.spec, &spec) => old.comparison.clone(),
            _ => Comparison::new(self.compare_config(&m)).map_err(|e| Refused {
                reason: "Internal",
                message: format!("starting its comparison: {e}"),
            })?,
        };
        let secrets = configs
            .iter()
            .flat_map(|c| c.secret_headers.clone())
            .collect();
        let rereads = SecretWatch::start(secrets, REREAD_EVERY).map_err(|e| Refused {
            reason: "Internal",
            message: format!("starting its secret re-reads: {e}"),
        })?;
        let candidates: Vec<(String, Replayer)> = m
            .candidates
            .iter()
            .zip(configs)
            .enumerate()
            .map(|(i, (c, cfg))| {
                let sink = Box::new(comparison.outcomes_of(i));
                (c.name.clone(), Replayer::start(cfg, &self.rt, sink))
            })
            .collect();
        let mirrors = candidates
            .iter()
            .zip(&m.candidates)
            .map(|((_, r), c)| LaneMirror {
                replayer: r.clone(),
                sample_ppm: c.sample_ppm,
            })
            .collect();
        let (selected, released) = self.hand_over_pods(key, &m, by_pods);
        let pods = selected
            .as_ref()
            .map(|s| s.pods.values().copied().collect::<HashSet<_>>());
        let lane = Lane::new(
            key.to_string(),
            m.ports.clone(),
            pods,
            mirrors,
            comparison.clone(),
            record,
        );
        let _ = self.table.send(LaneChange::Set(Box::new(lane)));
        let to: Vec<String> = m
            .candidates
            .iter()
            .map(|c| format!("{} ({})", c.name, c.url))
            .collect();
        log::info!("mirroring {key}: ports {:?} to {}", m.ports, to.join(", "));
        let running = Running {
            spec,
            generation,
            selected,
            candidates,
            comparison,
            _secrets: Some(rereads),
            record: record_stats,
        };
        self.running.insert(key.to_string(), running);
        Ok(released)
    }

    /// Whether this agent can run `m`: its ports are captured, its pods can be found, its
    /// bodies compared. Returns whether it covers pods (rather than what the agent is attached
    /// to).
    fn admit(&self, m: &Mirroring) -> Result<bool, Refused> {
        let refuse = |reason, message: String| Err(Refused { reason, message });
        let captured = &self.template.captured_ports;
        if let Some(p) = m.ports.iter().find(|p| !captured.contains(p)) {
            return refuse(
                "PortNotCaptured",
                format!(
                    "port {p} is not among the ports this agent captures ({captured:?}): add it \
                     to the agent's --port"
                ),
            );
        }
        let by_pods = self.cluster || m.selects_pods();
        if by_pods && self.pods.is_none() {
            return refuse(
                "NeedsKubernetes",
                format!(
                    "spec.selector ({}) needs the Kubernetes API (KUBECONFIG, or a pod's \
                     ServiceAccount); without it, leave the selector out and attach the agent \
                     to the live pods (--pod-ip, --iface)",
                    m.labels
                ),
            );
        }
        if m.bodies && self.template.compare.diffs.is_none() {
            return refuse(
                "BodiesNotCaptured",
                "spec.compare.bodies needs the agent's --compare-bodies".into(),
            );
        }
        Ok(by_pods)
    }

    /// Its recording (`spec.record`): the running version's when the rules stay, else a new
    /// one in its own directory, redacted by its rules.
    fn lane_record(
        &self,
        key: &str,
        m: &Mirroring,
        spec: &TrafficMirrorSpec,
    ) -> Result<(LaneRecord, Option<Arc<RecordStats>>), Refused> {
        let Some(rules) = &m.record else {
            return Ok((LaneRecord::Off, None));
        };
        let same = self
            .running
            .get(key)
            .filter(|o| o.spec.record == spec.record);
        if let Some(stats) = same.and_then(|o| o.record.clone()) {
            return Ok((LaneRecord::KeepPrevious, Some(stats)));
        }
        let refuse = |reason, message: &str| Refused {
            reason,
            message: message.to_string(),
        };
        let base = self.template.record.as_ref().ok_or_else(|| {
            refuse(
                "RecordingNotConfigured",
                "spec.record needs the agent's --record-mirrorings DIR",
            )
        })?;
        let redactor = match (rules.is_empty(), &self.template.redact_key) {
            (true, _) => None,
            (false, Some(k)) => Some(Redactor::new(k.clone(), rules.clone())),
            (false, None) => {
                return Err(refuse(
                    "NoRedactKey",
                    "spec.record.redact needs the agent's --redact-key FILE (the HMAC key)",
                ))
            }
        };
        let cfg = RecordConfig {
            dir: base
                .dir
                .join(&m.namespace)
                .join(m.key.split('/').nth(1).unwrap_or("")),
            redactor,
            ..base.clone()
        };
        let recorder = Recorder::start(cfg).map_err(|e| Refused {
            reason: "RecordingFailed",
            message: crate::capture::error::chain(&e),
        })?;
        let stats = Arc::clone(recorder.stats());
        Ok((LaneRecord::To(recorder), Some(stats)))
    }

    /// Stops the running version of `key`, keeping its pod watch when the new one selects the
    /// same pods; returns the new version's pods and the pods no longer covered.
    fn hand_over_pods(
        &mut self,
        key: &str,
        m: &Mirroring,
        by_pods: bool,
    ) -> (Option<Selected>, Vec<PodChange>) {
        let mut old = self.running.remove(key);
        let mut released = Vec::new();
        let kept = match old.as_mut().and_then(|o| o.selected.take()) {
            Some(s) if by_pods && s.namespace == m.namespace && s.labels == m.labels => Some(s),
            Some(s) => {
                released = s.release();
                None
            }
            None => None,
        };
        if let Some(o) = old {
            self.drain(o);
        }
        let selected = match (kept, &mut self.pods) {
            (Some(s), _) => Some(s),
            (None, Some(watches)) if by_pods => Some(watches.start(key, &m.namespace, &m.labels)),
            _ => None,
        };
        (selected, released)
    }

    /// Each candidate's replay configuration, its URL resolved.
    async fn replay_configs(&self, m: &Mirroring) -> Result<Vec<ReplayConfig>, Refused> {
        let mut out = Vec::new();
        for c in &m.candidates {
            let unreachable = |e: String| Refused {
                reason: "MirrorUnreachable",
                message: format!("candidate {}: {e}", c.name),
            };
            let tls = replay::mirror_tls(&c.url, &self.template.tls)
                .map_err(|e| unreachable(e.to_string()))?;
            replay::check_mirror(&c.url, tls.as_ref())
                .await
                .map_err(|e| unreachable(crate::capture::error::chain(&e)))?;
            let secret_headers = c
                .secret_headers
                .iter()
                .cloned()
                .map(SecretHeader::load)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Refused {
                    reason: "SecretUnreadable",
                    message: format!("candidate {}: {e}", c.name),
                })?;
            out.push(ReplayConfig {
                mirror: c.url.clone(),
                tls,
                host: c.host,
                add_headers: c.set_headers.clone(),
                drop_headers: c.remove_headers.clone(),
                rewrite: c.rewrite.clone(),
                methods: m.methods.clone(),
                path: m.path.clone(),
                headers: m.headers.clone(),
                writes: m.writes.for_mirror(&c.name),
                max_rps: c.max_rps.or(self.template.replay.max_rps),
                mark: self.template.mark.clone().map(|h| Mark::new(h, &c.name)),
                secret_headers,
                ..self.template.replay.clone()
            });
        }
        Ok(out)
    }

    fn compare_config(&self, m: &Mirroring) -> CompareConfig {
        let t = &self.template.compare;
        let diffs = t.diffs.clone().filter(|_| m.bodies).map(|mut d| {
            d.ignore = m.ignore.clone();
            if !m.array_keys.is_empty() {
                d.content.array_keys = m.array_keys.clone();
            }
            d.secondary = m.candidates.iter().position(|c| c.secondary);
            d
        });
        CompareConfig {
            live_label: m.live_label.clone(),
            mirror_labels: m.candidates.iter().map(|c| c.name.clone()).collect(),
            diffs,
            ..t.clone()
        }
    }

    /// Stops a mirroring: the pipeline forgets it now, its requests in flight finish within
    /// the grace.
    fn stop(&mut self, key: &str) -> Vec<PodChange> {
        let _ = self.table.send(LaneChange::Remove(key.to_string()));
        let Some(old) = self.running.remove(key) else {
            return Vec::new();
        };
        let released = old.selected.iter().flat_map(|s| s.release()).collect();
        self.drain(old);
        released
    }

    fn drain(&self, old: Running) {
        let grace = self.template.grace;
        for (_, replayer) in old.candidates {
            self.rt.spawn(replayer.drain(grace));
        }
    }

    fn publish(&self) {
        *self.views.lock().unwrap() = self
            .running
            .iter()
            .map(|(key, r)| LaneView {
                key: key.clone(),
                comparison: r.comparison.clone(),
                replay: r
                    .candidates
                    .iter()
                    .map(|(n, rep)| (n.clone(), Arc::clone(rep.stats())))
                    .collect(),
                record: r.record.clone(),
            })
            .collect();
    }

    /// Stops every mirroring, each with the grace for its requests in flight.
    pub async fn drain_all(self) {
        let grace = self.template.grace;
        let all = self
            .running
            .into_values()
            .flat_map(|r| r.candidates)
            .map(|(_, replayer)| replayer.drain(grace));
        futures::future::join_all(all).await;
    }
}

impl Running {
    /// This node's entry in its status; `refused`: its newer spec was refused (it runs on as
    /// it was).
    fn status(&self, node: &str, refused: Option<(&Refused, i64)>) -> NodeStatus {
        let stats: Vec<&ReplayStats> = self
            .candidates
            .iter()
            .map(|(_, r)| r.stats().as_ref())
            .collect();
        let (mirrored, dropped) = status::traffic(&stats);
        let mut conditions = Vec::new();
        let no_pods = self
            .selected
            .as_ref()
            .is_some_and(|s| s.pods.is_empty() && s.since.elapsed() > status::NO_PODS_AFTER);
        let unreachable = self.candidates.iter().find(|(_, r)| {
            let s = r.stats();
            s.responses.load(std::sync::atomic::Ordering::Relaxed) == 0
                && s.sent.load(std::sync::atomic::Ordering::Relaxed) > 0
        });
        let degraded = match (refused, no_pods, unreachable) {
            (Some((r, g)), _, _) => Some((
                r.reason,
                format!(
                    "generation {g} refused, the previous one runs on: {}",
                    r.message
                ),
            )),
            (None, true, _) => Some((
                "NoPodMatches",
                "no Ready pod on this node matches the selector".to_string(),
            )),
            (None, false, Some((name, _))) => Some((
                "MirrorUnreachable",
                format!("candidate {name} has not answered any request sent to it"),
            )),
            _ => None,
        };
        conditions.push(status::condition(
            "Ready",
            true,
            "Mirroring",
            "the mirroring runs on this node",
        ));
        conditions.push(match degraded {
            Some((reason, message)) => status::condition("Degraded", true, reason, message),
            None => status::condition("Degraded", false, "AsDeclared", ""),
        });
        NodeStatus {
            node: node.to_string(),
            observed_generation: self.generation,
            pods: self.selected.as_ref().map_or(0, |s| s.pods.len() as u64),
            mirrored,
            dropped,
            verdict: status::verdict_line(&self.comparison.report()),
            conditions,
        }
    }
}

/// Whether a changed spec keeps its comparison: the same candidates by name, in order, and the
/// same comparison settings.
fn same_comparison(old: &TrafficMirrorSpec, new: &TrafficMirrorSpec) -> bool {
    let names = |s: &TrafficMirrorSpec| {
        s.candidates
            .iter()
            .map(|c| (c.name.clone(), c.secondary))
            .collect::<Vec<_>>()
    };
    names(old) == names(new) && old.compare == new.compare && old.ports == new.ports
}
