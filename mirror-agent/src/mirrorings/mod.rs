//! Declared mirrorings (TrafficMirror objects): the agent adds, changes and removes them while it
//! runs. Each one is a lane of the pipeline (`lanes`): its live servers, its candidates' replay
//! stages, its own comparison. `Mirrorings` owns the running lanes and turns each new declared
//! set into changes of the pipeline's lane table; `source` reads the declarations.

pub mod lanes;
pub mod source;
pub mod spec;

use std::collections::{BTreeMap, HashSet};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use hyper::header::HeaderName;

use crate::compare::{CompareConfig, Comparison};
use crate::replay::secrets::{SecretHeader, SecretWatch, REREAD_EVERY};
use crate::replay::{self, Mark, ReplayConfig, ReplayStats, Replayer, TlsOptions};
use lanes::{Lane, LaneChange, LaneMirror};
use spec::{Mirroring, TrafficMirrorSpec};

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
}

/// A running mirroring, for metrics and `/report`.
#[derive(Clone)]
pub struct LaneView {
    pub key: String,
    pub comparison: Comparison,
    /// Each candidate's name and replay counters.
    pub replay: Vec<(String, Arc<ReplayStats>)>,
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
    candidates: Vec<(String, Replayer)>,
    comparison: Comparison,
    /// Re-reads the candidates' secret headers; stops with the mirroring.
    _secrets: Option<SecretWatch>,
}

/// The running declared mirrorings. Owned by the agent's main loop.
pub struct Mirrorings {
    template: LaneTemplate,
    table: mpsc::Sender<LaneChange>,
    running: BTreeMap<String, Running>,
    refused: BTreeMap<String, Refused>,
    views: LaneViews,
    rt: tokio::runtime::Handle,
}

impl Mirrorings {
    /// Mirrorings whose lanes go to the pipeline through `table`.
    pub fn new(
        template: LaneTemplate,
        table: mpsc::Sender<LaneChange>,
        rt: tokio::runtime::Handle,
    ) -> Mirrorings {
        Mirrorings {
            template,
            table,
            running: BTreeMap::new(),
            refused: BTreeMap::new(),
            views: LaneViews::default(),
            rt,
        }
    }

    pub fn views(&self) -> &LaneViews {
        &self.views
    }

    pub fn refused(&self) -> &BTreeMap<String, Refused> {
        &self.refused
    }

    /// Makes the running mirrorings what is declared: starts the new, restarts the changed
    /// (their candidates' stages; the comparison goes on when the candidates' names and the
    /// comparison's settings stay), stops the removed. A refused one leaves the others running.
    pub async fn declare(&mut self, declared: BTreeMap<String, TrafficMirrorSpec>) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|k| !declared.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            log::info!("mirroring {key} removed: stopped");
            self.stop(&key);
        }
        self.refused.retain(|k, _| declared.contains_key(k));
        for (key, spec) in declared {
            if self.running.get(&key).is_some_and(|r| r.spec == spec) {
                continue;
            }
            match self.start(&key, spec).await {
                Ok(()) => {
                    self.refused.remove(&key);
                }
                Err(refused) => {
                    log::warn!("mirroring {key} not started: {}", refused.message);
                    self.refused.insert(key, refused);
                }
            }
        }
        self.publish();
    }

    async fn start(&mut self, key: &str, spec: TrafficMirrorSpec) -> Result<(), Refused> {
        let refuse = |reason, message: String| Refused { reason, message };
        let m = Mirroring::check(key, &spec).map_err(|e| refuse(e.reason(), e.to_string()))?;
        if let Some(p) = m
            .ports
            .iter()
            .find(|p| !self.template.captured_ports.contains(p))
        {
            return Err(refuse(
                "PortNotCaptured",
                format!(
                    "port {p} is not among the ports this agent captures ({:?}): add it to the \
                     agent's --port",
                    self.template.captured_ports
                ),
            ));
        }
        if m.selects_pods() {
            return Err(refuse(
                "NeedsKubernetes",
                format!(
                    "spec.selector ({}) needs the Kubernetes API; in a --config file, leave it \
                     out and attach the agent to the live pods (--pod-ip, --iface)",
                    m.labels
                ),
            ));
        }
        if m.bodies && self.template.compare.diffs.is_none() {
            return Err(refuse(
                "BodiesNotCaptured",
                "spec.compare.bodies needs the agent's --compare-bodies".into(),
            ));
        }
        let configs = self.replay_configs(&m).await?;
        let names: Vec<String> = m.candidates.iter().map(|c| c.name.clone()).collect();
        let comparison = match self.running.get(key) {
            Some(old) if same_comparison(&old.spec, &spec) => old.comparison.clone(),
            _ => Comparison::new(self.compare_config(&m, &names))
                .map_err(|e| refuse("Internal", format!("starting its comparison: {e}")))?,
        };
        let secrets = configs
            .iter()
            .flat_map(|c| c.secret_headers.clone())
            .collect();
        let rereads = SecretWatch::start(secrets, REREAD_EVERY)
            .map_err(|e| refuse("Internal", format!("starting its secret re-reads: {e}")))?;
        let candidates: Vec<(String, Replayer)> = names
            .iter()
            .zip(configs)
            .enumerate()
            .map(|(i, (name, cfg))| {
                let sink = Box::new(comparison.outcomes_of(i));
                (name.clone(), Replayer::start(cfg, &self.rt, sink))
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
        let lane = Lane::new(
            key.to_string(),
            m.ports.clone(),
            None::<HashSet<_>>,
            mirrors,
            comparison.clone(),
        );
        let _ = self.table.send(LaneChange::Set(Box::new(lane)));
        if let Some(old) = self.running.remove(key) {
            self.drain(old);
        }
        log::info!(
            "mirroring {key}: ports {:?} to {}",
            m.ports,
            m.candidates
                .iter()
                .map(|c| format!("{} ({})", c.name, c.url))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.running.insert(
            key.to_string(),
            Running {
                spec,
                candidates,
                comparison,
                _secrets: Some(rereads),
            },
        );
        Ok(())
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
                methods: m.methods.clone(),
                path: m.path.clone(),
                writes: m.writes.for_mirror(&c.name),
                max_rps: c.max_rps.or(self.template.replay.max_rps),
                mark: self.template.mark.clone().map(|h| Mark::new(h, &c.name)),
                secret_headers,
                ..self.template.replay.clone()
            });
        }
        Ok(out)
    }

    fn compare_config(&self, m: &Mirroring, names: &[String]) -> CompareConfig {
        let t = &self.template.compare;
        let diffs = t.diffs.clone().filter(|_| m.bodies).map(|mut d| {
            d.ignore = m.ignore.clone();
            d.secondary = m.candidates.iter().position(|c| c.secondary);
            d
        });
        CompareConfig {
            live_label: m.live_label.clone(),
            mirror_labels: names.to_vec(),
            diffs,
            ..t.clone()
        }
    }

    /// Stops a mirroring: the pipeline forgets it now, its requests in flight finish within
    /// the grace.
    fn stop(&mut self, key: &str) {
        let _ = self.table.send(LaneChange::Remove(key.to_string()));
        if let Some(old) = self.running.remove(key) {
            self.drain(old);
        }
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
