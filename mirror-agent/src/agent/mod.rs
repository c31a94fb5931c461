//! The running agent: the pipeline's stages wired once, in order — capture → reassemble → parse →
//! replay → compare — each owning its state. `main.rs` only turns the command line into an
//! `AgentConfig`, starts the agent and stops it on a signal, as mini-redis's server binary calls
//! `server::run`.

use mirror_core::counters::Counters;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::capture::error::chain;
use crate::capture::read_at::Provenance;
use crate::capture::{
    named_counters, netdev, Capture, CaptureConfig, CaptureError, CaptureStats, Hook, KernelReport,
};
use crate::compare::{CompareConfig, Comparison, Report};
use crate::cpu_budget::{self, Load};
use crate::dump::StreamDump;
use crate::metrics::{self, Sources};
use crate::mirrorings::selection::LanePod;
use crate::mirrorings::{self, Feeds, Mirrorings, MirroringsConfig};
use crate::pipeline::{self, Pipeline, PipelineConfig, PipelineStats};
use crate::pods::{self, MirroredPod, MirroredPods, PodChange, PodSelector};
use crate::record::writer::RecordError;
use crate::record::{RecordConfig, RecordStats};
use crate::replay::{self, MirrorError, ReplayConfig, ReplayStats, Replayer};
use crate::segment::FrameError;
use crate::shedding::{Shedding, SheddingConfig};

mod events;

use events::PipelineEvents;

/// Why the agent could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The mirror cannot be replayed to from here: its route, or a feedback loop.
    #[error("mirror {name}")]
    MirrorRoute {
        name: String,
        #[source]
        source: Box<CaptureError>,
    },
    #[error("mirror {name}")]
    Mirror {
        name: String,
        #[source]
        source: MirrorError,
    },
    #[error("--selector needs the Kubernetes API")]
    Kubernetes(#[source] kube::Error),
    #[error("--metrics {addr}: cannot listen there")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the capture thread panicked in the pipeline")]
    PipelinePanicked,
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
    #[error("--record")]
    Record(#[source] RecordError),
}

type Result<T, E = AgentError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub capture: CaptureConfig,
    /// Reassembly and HTTP extraction.
    pub pipeline: PipelineConfig,
    /// The mirrors, each sent every request; none: capture and extract only.
    pub mirrors: Vec<MirrorTarget>,
    pub compare: CompareConfig,
    /// Follow the pods that match a label selector (`--selector`).
    pub pods: Option<PodSelector>,
    /// Pods to attach inside their network namespace from the start (`--pod-ip … --in-pod`).
    pub in_pod: Vec<std::net::IpAddr>,
    /// Serve `/metrics` and `/report` here.
    pub metrics: Option<SocketAddr>,
    /// Log the counters every this many seconds (0: only at exit).
    pub stats_interval: u64,
    /// The limits that shed whole connections in the kernel: the live service's CPU pressure,
    /// the agent's CPU budget, its backlog (needs `capture.matching.sticky_sampling`).
    pub shedding: SheddingConfig,
    /// Keep every extracted request and its live response on disk (`--record`).
    pub record: Option<RecordConfig>,
    /// Mirrorings declared in a file (`--config`) or the API (`--traffic-mirrors`), added,
    /// changed and removed at run time.
    pub mirrorings: Option<MirroringsConfig>,
}

/// One mirror: its name (the version tag of its rows) and how its requests are replayed.
#[derive(Clone, Debug)]
pub struct MirrorTarget {
    pub name: String,
    pub replay: ReplayConfig,
    /// The address its URL resolved to.
    pub addr: SocketAddr,
}

/// A running mirror: its name and its own replay stage (caps, queue, workers, counters).
#[derive(Clone)]
struct Mirror {
    name: String,
    replayer: Replayer,
}

/// What the kernel program reports, refreshed once a second.
type KernelCounters = Arc<Mutex<KernelReport>>;

pub struct Agent {
    /// What `/metrics` reads, kept for the final counters.
    sources: Sources,
    capture: Capture,
    /// The stream dump (`--dump`), once the pipeline (on the capture thread) has finished.
    pipeline_done: pipeline::Finished,
    pipeline_stats: Arc<Mutex<PipelineStats>>,
    mirrors: Vec<Mirror>,
    comparison: Comparison,
    kernel: KernelCounters,
    /// What to mirror and forget, from the pod watcher.
    pod_changes: Option<tokio::sync::mpsc::Receiver<PodChange>>,
    /// Attach every selected pod inside its namespace (`--in-pod`), meshed or not.
    in_pod: bool,
    mirrored_pods: MirroredPods,
    stats_interval: u64,
    /// How long queued and in-flight mirror requests may finish at stop.
    grace: Duration,
    ready: String,
    shedding: Shedding,
    /// Capture and records ring drops at the last look, to see new ones (backlog).
    ring_drops: u64,
    /// The declared mirrorings, and what they receive and send.
    mirrorings: Option<Mirrorings>,
    feeds: Feeds,
    /// Pods attached to, by how many mirrorings (the `--selector` one and declared ones) cover
    /// each: the capture lets a pod go when the last one does.
    pod_refs: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// What the agent did, for the exit summary.
pub struct Summary {
    pub kernel: KernelReport,
    pub capture: Arc<CaptureStats>,
    pub pipeline: PipelineStats,
    /// Each mirror's name and replay counters.
    pub replay: Vec<(String, Arc<ReplayStats>)>,
    /// The recording stage's counters (`--record`).
    pub record: Option<Arc<RecordStats>>,
    pub report: Report,
    /// The reassembled streams, when the pipeline recorded them (`--dump`).
    pub dump: Option<StreamDump>,
    /// The final counters and comparison, as `/metrics` would have served them last.
    pub metrics: String,
}

impl Agent {
    /// Starts every stage on `rt` and attaches the program. Returns once the agent mirrors.
    pub fn start(cfg: AgentConfig, rt: &tokio::runtime::Handle) -> Result<Agent> {
        let _enter = rt.enter();
        // Compare: fed by the pipeline (live responses) and the replayer (mirror outcomes).
        let comparison = Comparison::new(cfg.compare.clone()).map_err(AgentError::Thread)?;
        // Replay: ready before anything is captured.
        let mirrors = start_mirrors(&cfg.mirrors, rt, &comparison);

        // Capture: the program is attached and cloning from here on.
        let mut capture = Capture::start(&cfg.capture)?;
        for m in &cfg.mirrors {
            check_no_loop(&capture, &cfg.capture, &m.name, m.addr)?;
        }

        // Reassemble and parse, on the capture thread.
        let pipeline_stats = Arc::new(Mutex::new(PipelineStats::default()));
        let (lanes, lane_table) = std::sync::mpsc::channel();
        let events = PipelineEvents::new(&cfg, &mirrors, &comparison, &mut capture, lane_table)?;
        let record_stats = events.recording.as_ref().map(|r| Arc::clone(r.stats()));
        let read_at = events.read_at.clone();
        let (pipeline, pipeline_done) =
            Pipeline::new(cfg.pipeline.clone(), Arc::clone(&pipeline_stats), events);
        capture.feed(Box::new(pipeline))?;

        let kernel = KernelCounters::default();
        let mirrored_pods = attach_in_pods(&mut capture, &cfg.in_pod, &read_at)?;
        let pod_changes = watch_pods(cfg.pods.as_ref(), rt)?;
        let (mirrorings, feeds) = match &cfg.mirrorings {
            Some(m) => {
                let (m, f) = mirrorings::start(m, lanes, rt).map_err(AgentError::Kubernetes)?;
                (Some(m), f)
            }
            None => (None, Feeds::default()),
        };
        let sources = Sources {
            pods: Arc::clone(&mirrored_pods),
            comparison: comparison.clone(),
            capture: Some(Arc::clone(capture.stats())),
            kernel: Arc::clone(&kernel),
            pipeline: Arc::clone(&pipeline_stats),
            replay: mirrors
                .iter()
                .map(|m| (m.name.clone(), Arc::clone(m.replayer.stats())))
                .collect(),
            record: record_stats,
            tls: cfg.capture.tls.is_some().then(|| metrics::TlsSources {
                stats: Arc::clone(capture.tls_stats()),
                report: Arc::default(),
            }),
            read_at,
            lanes: mirrorings
                .as_ref()
                .map(|m| Arc::clone(m.views()))
                .unwrap_or_default(),
        };
        if let Some(addr) = cfg.metrics {
            let bound = rt
                .block_on(metrics::serve(addr, sources.clone()))
                .map_err(|source| AgentError::Metrics { addr, source })?;
            log::info!("metrics on http://{bound}/metrics, comparison on http://{bound}/report");
        }
        let ready = ready_line(&cfg, &capture);
        Ok(Agent {
            sources,
            capture,
            pipeline_done,
            pipeline_stats,
            mirrors,
            comparison,
            kernel,
            pod_changes,
            mirrored_pods,
            in_pod: cfg.pods.as_ref().is_some_and(|p| p.in_pod),
            stats_interval: cfg.stats_interval,
            grace: stop_grace(&cfg.mirrors),
            ready,
            shedding: Shedding::new(&cfg.shedding),
            ring_drops: 0,
            mirrorings,
            feeds,
            pod_refs: Default::default(),
        })
    }

    /// Once a second: the live service's CPU pressure, the agent's CPU use (its threads, and
    /// its kernel program's work in the live path, read just before) and its backlog set the
    /// share of connections the kernel mirrors.
    fn apply_shedding(&mut self) {
        let drops = self.capture.stats().ring_drops.load(Ordering::Relaxed)
            + self.kernel.lock().unwrap().records_ring_full();
        let new_drops = drops > self.ring_drops;
        self.ring_drops = drops;
        // The fullest stage: the replay queues, the capture or records ring (the parse stage
        // backs up into them); a frame or record a ring dropped is a full backlog.
        let backlog = self
            .mirrors
            .iter()
            .map(|m| m.replayer.queue_fill())
            .fold(self.capture.stats().take_backlog(), f64::max);
        let (segments, long_lived_segments) = {
            let r = &self.pipeline_stats.lock().unwrap().reassembly;
            (r.segments, r.long_lived_segments)
        };
        let load = Load {
            cpu: cpu_budget::process_cpu_time(),
            live_path: self.kernel.lock().unwrap().work,
            at: std::time::Instant::now(),
            backlog: if new_drops { 1.0 } else { backlog },
            segments,
            long_lived_segments,
        };
        if let Some(rates) = self.shedding.tick(load) {
            log::info!(
                "mirroring {:.1} % of new connections, keeping {:.1} % of admitted ones: {}; backlog {:.0} %",
                f64::from(rates.new) / 1e4,
                f64::from(rates.keep_admitted) / 1e4,
                self.shedding.describe(),
                load.backlog * 100.0
            );
            if let Err(e) = self.capture.set_sampling(rates.new, rates.keep_admitted) {
                log::warn!("cannot change the sampling rate: {}", chain(&e));
            }
        }
        self.comparison.set_sampling(self.shedding.sampling());
    }

    /// The line that says what is mirrored, where.
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    /// Mirrors until `shutdown` completes, then stops the stages in pipeline order: capture
    /// (reading what its ring still holds), the pipeline, then replay with a grace for requests
    /// in flight, then the comparison.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Summary> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut seconds = 0u64;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(change) = next_change(&mut self.pod_changes) => self.apply_counted(change),
                Some(declared) = next_change(&mut self.feeds.declared) => {
                    if let Some(m) = self.mirrorings.as_mut() {
                        for released in m.declare(declared).await {
                            self.apply_counted(released);
                        }
                    }
                }
                Some(lane_pod) = next_change(&mut self.feeds.pods) => self.apply_lane_pod(lane_pod),
                _ = tick.tick() => {
                    seconds += 1;
                    self.second(seconds);
                }
            }
        }
        let Agent {
            capture,
            pipeline_done,
            pipeline_stats,
            mirrors,
            comparison,
            grace,
            sources,
            mirrorings,
            ..
        } = self;
        let capture_stats = Arc::clone(capture.stats());
        // The final counters include the TLS probes' last second.
        if let (Some(tls), Some(report)) = (&sources.tls, capture.tls_report()) {
            *tls.report.lock().unwrap() = report;
        }
        let work = capture.kernel_work().unwrap_or_default();
        let kernel = KernelReport {
            packets: named_counters(&capture.stop()?),
            work,
        };
        // The capture thread has ended: the pipeline finished on it, or died with it.
        let dump = pipeline_done
            .try_recv()
            .map_err(|_| AgentError::PipelinePanicked)?;
        // The mirrors drain side by side: the grace is spent once, not once per mirror.
        let drained = futures::future::join_all(
            mirrors
                .into_iter()
                .map(|m| async move { (m.name, m.replayer.drain(grace).await) }),
        );
        let declared_drained = async {
            if let Some(m) = mirrorings {
                m.drain_all().await;
            }
        };
        let (replay_stats, ()) = futures::future::join(drained, declared_drained).await;
        let pipeline = pipeline_stats.lock().unwrap().clone();
        // The content worker settles what it was given, so that the final counters include it.
        if let Some(content) = comparison.content() {
            content.settle();
        }
        *sources.kernel.lock().unwrap() = kernel.clone();
        Ok(Summary {
            metrics: metrics::render(&sources),
            kernel,
            capture: capture_stats,
            pipeline,
            replay: replay_stats,
            record: sources.record.clone(),
            report: {
                let mut r = comparison.report();
                r.set_read_at(&sources.read_at);
                r
            },
            dump,
        })
    }
}

impl Agent {
    /// Once a second: the kernel's counters, shedding, statuses, TLS processes, the log.
    fn second(&mut self, seconds: u64) {
        if let Ok(c) = self.capture.kernel_counters() {
            self.capture.account_lost_requests(&c);
            self.kernel.lock().unwrap().packets = named_counters(&c);
        }
        if let Ok(work) = self.capture.kernel_work() {
            self.kernel.lock().unwrap().work = work;
        }
        self.apply_shedding();
        if seconds.is_multiple_of(mirrorings::status::EVERY.as_secs()) {
            self.send_statuses();
        }
        self.tick_tls(seconds);
        if self.stats_interval > 0 && seconds.is_multiple_of(self.stats_interval) {
            log::info!("kernel {:?}", self.kernel.lock().unwrap().packets);
            log::info!("capture {}", format_capture(self.capture.stats()));
            log::info!("pipeline {:?}", self.pipeline_stats.lock().unwrap());
        }
    }

    /// With TLS capture: every 2 s, processes and libraries that appeared are found; every
    /// second, the probes' counters are refreshed for `/metrics`.
    fn tick_tls(&mut self, seconds: u64) {
        let Some(tls) = &self.sources.tls else {
            return;
        };
        if seconds.is_multiple_of(2) {
            self.capture.rescan_tls();
        }
        if let Some(report) = self.capture.tls_report() {
            *tls.report.lock().unwrap() = report;
        }
    }

    /// Attaches to a pod on its host veth, or inside its network namespace when it is in a mesh
    /// (its wire carries mTLS) or `--in-pod` says so. Returns where, and whether inside.
    fn attach_pod(
        &mut self,
        pod: &str,
        ip: std::net::IpAddr,
        mesh: Option<pods::Mesh>,
    ) -> Result<(String, bool), crate::capture::CaptureError> {
        if let Some(mesh) = mesh {
            log::info!(
                "pod {pod} ({ip}) is in the {} mesh: its wire carries mTLS; attaching inside the \
                 pod, where the proxy hands the application plaintext",
                mesh.name()
            );
        }
        if mesh.is_some() || self.in_pod {
            Ok((self.capture.add_pod_in_netns(ip)?, true))
        } else {
            Ok((self.capture.add_pod(ip)?, false))
        }
    }

    /// A pod change of the `--selector` watch or of a declared mirroring: the capture attaches
    /// when the first one covers the pod, and detaches when the last one lets it go.
    fn apply_counted(&mut self, change: PodChange) {
        match &change {
            PodChange::Mirror { ip, .. } => {
                let n = self.pod_refs.entry(*ip).or_default();
                *n += 1;
                if *n == 1 {
                    self.apply(change);
                }
            }
            PodChange::Forget { ip, .. } => {
                let Some(n) = self.pod_refs.get_mut(ip) else {
                    return;
                };
                *n -= 1;
                if *n == 0 {
                    self.pod_refs.remove(ip);
                    self.apply(change);
                }
            }
        }
    }

    fn apply_lane_pod(&mut self, lane_pod: LanePod) {
        if let Some(change) = self.mirrorings.as_mut().and_then(|m| m.pod(lane_pod)) {
            self.apply_counted(change);
        }
    }

    /// This node's entries of the declared mirrorings' statuses, to their writer.
    fn send_statuses(&self) {
        if let (Some(m), Some((node, tx))) = (&self.mirrorings, &self.feeds.status) {
            // A writer still busy with the last batch skips this one.
            let _ = tx.try_send(m.statuses(node));
        }
    }

    /// Attaches to a pod that appeared, or detaches from one that went. A pod that cannot be
    /// mirrored from here (no route, not on this node, no namespace found) is logged, counted by
    /// reason and skipped; the other pods stay mirrored.
    fn apply(&mut self, change: PodChange) {
        match change {
            PodChange::Mirror { pod, ip, mesh, uid } => {
                self.capture.tls_follow_pod(ip, true);
                self.shedding.follow_pod(ip, uid);
                self.mirror_pod(pod, ip, mesh)
            }
            PodChange::Forget { pod, ip } => {
                self.capture.tls_follow_pod(ip, false);
                self.shedding.forget_pod(ip);
                self.forget_pod(pod, ip)
            }
        }
    }

    fn mirror_pod(&mut self, pod: String, ip: std::net::IpAddr, mesh: Option<pods::Mesh>) {
        match self.attach_pod(&pod, ip, mesh) {
            Ok((iface, in_pod)) => {
                self.sources.read_at.set_in_pod(ip, in_pod);
                log::info!("mirroring pod {pod} ({ip}) at {iface}");
                let mirrored = MirroredPod {
                    pod,
                    ip,
                    iface,
                    in_pod,
                    mesh,
                };
                self.mirrored_pods.lock().unwrap().mirrored.push(mirrored);
            }
            Err(e) => {
                log::warn!("cannot mirror pod {pod} ({ip}): {}", chain(&e));
                let mut pods = self.mirrored_pods.lock().unwrap();
                *pods.attach_failures.entry(e.pod_reason()).or_default() += 1;
            }
        }
    }

    fn forget_pod(&mut self, pod: String, ip: std::net::IpAddr) {
        self.sources.read_at.set_in_pod(ip, false);
        if let Err(e) = self.capture.remove_pod(ip) {
            log::warn!("detaching from pod {pod} ({ip}): {}", chain(&e));
        }
        let mut pods = self.mirrored_pods.lock().unwrap();
        if pods.mirrored.iter().any(|p| p.ip == ip) {
            log::info!("pod {pod} ({ip}) is gone: no longer mirrored");
        }
        pods.mirrored.retain(|p| p.ip != ip);
    }
}

/// Attaches inside the network namespaces of the `--in-pod` pods given by address.
fn attach_in_pods(
    capture: &mut Capture,
    ips: &[std::net::IpAddr],
    read_at: &Provenance,
) -> Result<MirroredPods> {
    let mirrored_pods = MirroredPods::default();
    for &ip in ips {
        let iface = capture.add_pod_in_netns(ip)?;
        log::info!("pod {ip}: attached to {iface}");
        read_at.set_in_pod(ip, true);
        mirrored_pods.lock().unwrap().mirrored.push(MirroredPod {
            pod: ip.to_string(),
            ip,
            iface,
            in_pod: true,
            mesh: None,
        });
    }
    Ok(mirrored_pods)
}

/// The next change from a watcher; never, without one.
async fn next_change<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Refuses a mirror whose replayed requests the program would capture again. Runs before the
/// pipeline starts, so nothing has been replayed when it refuses.
fn check_no_loop(
    capture: &Capture,
    cfg: &CaptureConfig,
    name: &str,
    mirror: SocketAddr,
) -> Result<()> {
    let egress_watched: Vec<String> = capture
        .attachments()
        .iter()
        .filter(|(t, hook, _)| *hook == Hook::Egress || t.iface == "lo")
        .map(|(t, _, _)| t.iface.clone())
        .collect();
    let via = netdev::route_iface(mirror.ip()).map_err(|source| AgentError::MirrorRoute {
        name: name.to_string(),
        source: Box::new(source),
    })?;
    let passed = replay::check_no_loop(
        mirror,
        &cfg.matching.ports,
        &cfg.matching.addrs,
        &via,
        &egress_watched,
    )
    .map_err(|source| AgentError::Mirror {
        name: name.to_string(),
        source,
    })?;
    log::info!("{passed}");
    Ok(())
}

/// The line that says the agent mirrors: ports, where it is attached, the pods it follows.
fn ready_line(cfg: &AgentConfig, capture: &Capture) -> String {
    let attached: Vec<String> = capture
        .attachments()
        .iter()
        .map(|(t, hook, mode)| format!("{} {} ({mode:?})", t.iface, hook.name()))
        .collect();
    let mut on = attached;
    if let Some(sel) = &cfg.pods {
        on.push(format!(
            "the pods matching {:?} as they become Ready",
            sel.labels
        ));
    }
    let declared = cfg.mirrorings.as_ref().map(|m| &m.declarations);
    if let Some(mirrorings::Declarations::Cluster { .. }) = declared {
        on.push("the pods each TrafficMirror selects as they become Ready".into());
    }
    let on = on.join(" and ");
    let tls = match (&cfg.capture.tls, capture.tls_report()) {
        (Some(tls), Some(report)) => format!(
            "; TLS plaintext on ports {:?} from {} processes ({} libraries)",
            tls.ports, report.processes, report.libraries
        ),
        _ => String::new(),
    };
    // With only --tls-port, nothing is read from the wire.
    let wire = if cfg.capture.matching.ports.is_empty() && cfg.pods.is_none() && declared.is_none()
    {
        "nothing from the wire".to_string()
    } else {
        format!("mirroring ports {:?} on {on}", cfg.capture.matching.ports)
    };
    format!(
        "ready: {wire}{tls}; mirror interface {}; program id {}",
        capture.mirror_interface(),
        capture.program_id()
    )
}

/// Pods matching the selector as they come and go, watched on `rt`.
fn watch_pods(
    selector: Option<&PodSelector>,
    rt: &tokio::runtime::Handle,
) -> Result<Option<tokio::sync::mpsc::Receiver<pods::PodChange>>> {
    let Some(sel) = selector else {
        return Ok(None);
    };
    let client = rt
        .block_on(kube::Client::try_default())
        .map_err(AgentError::Kubernetes)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    rt.spawn(pods::watch(client, sel.clone(), tx));
    Ok(Some(rx))
}

/// Replay: one stage per mirror, each with its own queue and workers, so that a slow or dead
/// mirror holds up nobody else; their outcomes go to the comparison.
fn start_mirrors(
    mirrors: &[MirrorTarget],
    rt: &tokio::runtime::Handle,
    comparison: &Comparison,
) -> Vec<Mirror> {
    mirrors
        .iter()
        .enumerate()
        .map(|(i, m)| Mirror {
            name: m.name.clone(),
            replayer: Replayer::start(m.replay.clone(), rt, Box::new(comparison.outcomes_of(i))),
        })
        .collect()
}

/// How long a stop waits for answers in flight: the longest mirror timeout, at most 5 s.
fn stop_grace(mirrors: &[MirrorTarget]) -> Duration {
    mirrors
        .iter()
        .map(|m| m.replay.timeout.min(Duration::from_secs(5)))
        .max()
        .unwrap_or(Duration::ZERO)
}

impl Summary {
    /// The counters, one stage a line, for the exit log.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!("kernel counters: {:?}", self.kernel.packets),
            format!(
                "kernel work in the live path: {:.3} s",
                self.kernel.work.as_secs_f64()
            ),
            format!("capture: {}", format_capture(&self.capture)),
            format!("reassembly: {}", self.pipeline.reassembly.summary()),
            format!("http: {}", self.pipeline.http.summary()),
        ];
        match self.replay.as_slice() {
            [(_, r)] => out.push(format!("replay: {}", r.summary())),
            several => {
                for (name, r) in several {
                    out.push(format!("replay {name}: {}", r.summary()));
                }
            }
        }
        if let Some(r) = &self.record {
            out.push(format!("record: {}", r.summary()));
        }
        out
    }
}

/// The frame errors by reason, then the capture's declared counters.
fn format_capture(s: &CaptureStats) -> String {
    let errors = FrameError::ALL
        .iter()
        .zip(&s.frame_errors)
        .map(|(e, c)| format!("{}={} ", e.name(), c.load(Ordering::Relaxed)));
    errors.collect::<String>() + &s.summary()
}
