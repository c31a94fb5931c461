//! Capture stage: the TC program clones the live service's segments onto a veth pair that the
//! agent owns, and a reader thread turns the frames of the far end into `Segment` batches.
//!
//! The far end of the veth lives in a network namespace private to the reader thread. When the
//! agent exits, however it exits, that namespace dies and takes the veth pair with it, and tcx
//! links die with the process: nothing is left cloning.

pub mod error;
pub mod heads;
pub mod heartbeat;
pub mod memlock;
pub mod netdev;
pub mod netns;
pub mod program;
pub mod read_at;
pub mod ring;
pub mod rtnl;
pub mod tls;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirror_common::{Counter, COUNTER_COUNT, PROGRAM_NAME};

pub use self::error::CaptureError;
use self::error::Result;
use self::heads::{FullResponses, HeadMerge, Progress};
use self::netns::Netns;
use self::program::KernelProgram;
pub use self::program::{AttachMode, Hook, MatchConfig};
use self::ring::{PacketRing, RingConfig};
use crate::segment::{parse_frame, FrameError, Segment};

/// One interface hook that live requests cross.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub iface: String,
    /// The hook that requests cross; responses cross the opposite one.
    pub hook: Hook,
    /// The network namespace the interface is in (a pod's `lo`); None: the agent's own.
    pub netns: Option<Netns>,
}

impl Target {
    /// An interface of the agent's own namespace.
    pub fn here(iface: impl Into<String>, hook: Hook) -> Target {
        Target {
            iface: iface.into(),
            hook,
            netns: None,
        }
    }

    /// Names the interface uniquely across namespaces (every pod has an `lo`), for its lock and
    /// its links.
    pub fn key(&self) -> String {
        match &self.netns {
            None => self.iface.clone(),
            Some(ns) => format!("{}@netns:{}", self.iface, ns.inode()),
        }
    }

    /// Runs `f` in the target's namespace.
    fn within<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        within(self.netns.as_ref(), f)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.netns {
            None => f.write_str(&self.iface),
            Some(ns) => write!(
                f,
                "{} inside netns {} ({})",
                self.iface,
                ns.inode(),
                ns.origin().display()
            ),
        }
    }
}

/// Runs `f` in `netns`, or right here for None.
fn within<T: Send>(netns: Option<&Netns>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match netns {
        None => f(),
        Some(ns) => ns.run(f).map_err(CaptureError::io(format!(
            "entering network namespace {} ({})",
            ns.inode(),
            ns.origin().display()
        )))?,
    }
}

/// A pod mirrored now: where, and for one attached inside its namespace, the mirror veth's end
/// in the reader's namespace (deleting it deletes the pair).
struct PodAttachment {
    target: Target,
    peer: Option<String>,
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub targets: Vec<Target>,
    pub matching: MatchConfig,
    pub attach_mode: AttachMode,
    pub ring: RingConfig,
    /// Bytes of the kernel's records ring (a power of two, at least a page): heads, marks and,
    /// with `payload_records`, requests.
    pub records_ring_bytes: u32,
    pub ebpf_log: bool,
    pub lock_dir: PathBuf,
    /// Read the clones. Off only to measure the kernel side alone: clones then die in the
    /// mirror namespace unread.
    pub read_clones: bool,
    /// Read plaintext around OpenSSL's calls in these processes (`--tls-port`).
    pub tls: Option<tls::TlsConfig>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            targets: Vec::new(),
            matching: MatchConfig {
                ports: Vec::new(),
                addrs: Vec::new(),
                addr_filter: false,
                responses: true,
                response_heads: false,
                payload_records: false,
                sample_ppm: mirror_common::SAMPLE_ALL,
                sticky_sampling: false,
                whole_responses_ppm: 0,
            },
            attach_mode: AttachMode::Auto,
            ring: RingConfig::default(),
            records_ring_bytes: mirror_common::RESPONSE_HEADS_RING_BYTES,
            ebpf_log: false,
            lock_dir: PathBuf::from("/run/mirror-agent"),
            read_clones: true,
            tls: None,
        }
    }
}

mirror_core::stage_counters! {
    /// Userspace capture counters. Every frame read from the ring ends in `segments` or in one
    /// `frame_errors` reason or in `truncated`; every response-head record in `segments` or in one
    /// `frame_errors` reason.
    #[derive(Debug, Default)]
    pub struct CaptureStats {
        pub bytes: AtomicU64 => Counter "mirror_capture_bytes"
            "Bytes of frames read from the capture ring",
        pub frames: AtomicU64 => Counter "mirror_capture_frames"
            "Frames read from the capture ring",
        /// Records read from the response-head ring (`--response-capture heads`): heads and
        /// clone marks.
        pub head_records: AtomicU64 => Counter "mirror_capture_head_records"
            "Records read from the response-head ring (heads and clone marks)",
        /// Clone marks whose clone never came (the capture ring was full): the records behind
        /// them went on after a short wait.
        pub marks_unmatched: AtomicU64 => Counter "mirror_capture_marks_unmatched"
            "Clone marks whose clone never came (the capture ring was full)",
        /// Clones towards the service that start like a request: what reached the agent of the
        /// kernel's `cloned_request_starts`.
        pub request_starts: AtomicU64 => Counter "mirror_capture_request_starts"
            "Clones towards the service that start like a request",
        /// Requests whose first segment the kernel cloned but the agent never received (a full
        /// ring, a full backlog), the kernel's count less `request_starts`, and those whose
        /// record did not fit in the ring (`payload_ring_full_request_starts`).
        pub requests_lost: AtomicU64 => Counter "mirror_capture_requests_lost"
            "Requests whose first segment the kernel cloned but the agent never received, or whose record did not fit in the ring",
        /// Frames the kernel could not put in the ring (it was full).
        pub ring_drops: AtomicU64 => Counter "mirror_capture_ring_drops"
            "Frames the kernel could not put in the capture ring (it was full)",
        pub ring_freezes: AtomicU64 => Counter "mirror_capture_ring_freezes"
            "Times the kernel froze the capture ring's queue because every block was full",
        pub ring_packets: AtomicU64 => Counter "mirror_capture_ring_packets"
            "Packets the kernel delivered to the capture socket",
        pub segments: AtomicU64 => Counter "mirror_capture_segments"
            "TCP segments handed to reassembly",
        pub truncated: AtomicU64 => Counter "mirror_capture_truncated"
            "Frames cut short by the ring's frame size",
        pub frame_errors: [AtomicU64; FrameError::ALL.len()],
        /// The fullest the capture ring has been since the last `take_backlog`, in parts per
        /// million.
        backlog_ppm: AtomicU64,
}
}

impl CaptureStats {
    /// How full the capture ring has been (0 to 1) since the last call.
    pub fn take_backlog(&self) -> f64 {
        self.backlog_ppm.swap(0, Ordering::Relaxed) as f64 / 1e6
    }

    fn note_backlog(&self, fill: f64) {
        self.backlog_ppm
            .fetch_max((fill.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn frame_error(&self, e: FrameError) {
        let i = FrameError::ALL.iter().position(|x| *x == e).unwrap_or(0);
        self.frame_errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

pub type SegmentBatch = Vec<Segment>;

/// The next stage, run on the capture thread: each batch goes on straight from the ring, with
/// no wake-up of another thread, and a stage that falls behind backs up into the ring, where
/// the CPU budget sees it and the kernel counts what did not fit.
pub trait BatchSink: Send {
    /// The segments of one ring block, in the order the kernel cloned them.
    fn batch(&mut self, batch: SegmentBatch);
    /// Called after every look at the ring, at least every 100 ms, busy or idle.
    fn poll(&mut self);
    /// Called once, after the last batch.
    fn finish(self: Box<Self>);
}

/// A running capture. Dropping it (or calling `stop`) disables the program, detaches it and
/// removes the mirror interface.
pub struct Capture {
    program: Option<KernelProgram>,
    program_id: u32,
    host_veth: String,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// Where the reader thread gets its next stage, once, from `feed`.
    sink_tx: Option<mpsc::Sender<Box<dyn BatchSink>>>,
    full_responses: Option<FullResponses>,
    heartbeat: Option<heartbeat::HeartbeatThread>,
    stats: Arc<CaptureStats>,
    /// The kernel's `cloned_request_starts` at the previous `account_lost_requests`.
    kernel_request_starts: AtomicU64,
    attached: Vec<(Target, Hook, AttachMode)>,
    /// One lock per interface attached to (by `Target::key`), released when the agent lets the
    /// interface go.
    locks: HashMap<String, netdev::TargetLock>,
    /// Pods attached by address while running, and where.
    pods: HashMap<IpAddr, PodAttachment>,
    /// Keys of the interfaces given at start: they stay attached whatever pods come and go.
    fixed: Vec<String>,
    /// The reader thread's namespace, where the mirror veths of in-pod attachments end.
    reader_netns: Netns,
    /// The host mirror veth's index; each pod's mirror veth gets it too (see `add_pod_in_netns`).
    mirror_ifindex: u32,
    /// In-pod mirror veths made so far, to name the next.
    pod_veths: u32,
    /// The TLS probes, when on.
    tls: Option<tls::TlsCapture>,
    tls_stats: Arc<tls::streams::TlsStats>,
    responses: bool,
    attach_mode: AttachMode,
    lock_dir: PathBuf,
}

impl Capture {
    /// Attaches the program and starts the reader thread. The reader reads nothing before
    /// `feed` gives it its next stage: until then, the clones wait in the ring.
    pub fn start(cfg: &CaptureConfig) -> Result<Capture> {
        preflight()?;
        if cfg.targets.is_empty() && !cfg.matching.addr_filter && cfg.tls.is_none() {
            return Err(CaptureError::NothingToAttach);
        }
        let mut locks = HashMap::new();
        for t in &cfg.targets {
            if let std::collections::hash_map::Entry::Vacant(slot) = locks.entry(t.key()) {
                t.within(|| netdev::check_target_iface(&t.iface))?;
                slot.insert(lock_iface(&cfg.lock_dir, t)?);
            }
        }

        let stats = Arc::new(CaptureStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (sink_tx, sink_rx) = mpsc::channel::<Box<dyn BatchSink>>();
        // Unique per agent on the node: in containers every agent is pid 1.
        let tag = unique_tag();
        let host_veth = format!("mirr{tag:08x}");
        // Every mirror veth of this agent, here and inside pods, has this index: the program
        // is configured with one. High and random, so that no pod's own interfaces hold it.
        let mirror_ifindex = MIRROR_IFINDEX_BASE | (tag & 0x0fff_ffff);
        let (heads_tx, heads_rx) = mpsc::channel::<HeadMerge>();
        let (tls_tx, tls_rx) = mpsc::channel::<tls::TlsSource>();
        let (reader, reader_netns, ready) = spawn_reader(
            cfg.read_clones.then_some(cfg.ring),
            cfg.matching.clone(),
            Sources {
                heads: heads_rx,
                tls: tls_rx,
            },
            sink_rx,
            Arc::clone(&stats),
            Arc::clone(&stop),
            (host_veth.clone(), mirror_ifindex),
        )?;
        let mut capture = Capture {
            program: None,
            program_id: 0,
            host_veth: host_veth.clone(),
            stop,
            reader: Some(reader),
            sink_tx: Some(sink_tx),
            full_responses: None,
            heartbeat: None,
            stats,
            kernel_request_starts: AtomicU64::new(0),
            attached: Vec::new(),
            locks,
            pods: HashMap::new(),
            fixed: cfg.targets.iter().map(Target::key).collect(),
            reader_netns,
            mirror_ifindex,
            pod_veths: 0,
            tls: None,
            tls_stats: Arc::default(),
            responses: cfg.matching.responses,
            attach_mode: cfg.attach_mode,
            lock_dir: cfg.lock_dir.clone(),
        };
        ready()?;
        netdev::quiet_ipv6(&host_veth)?;
        netdev::set_up(&host_veth).map_err(CaptureError::io("bringing the mirror interface up"))?;

        capture.start_program(cfg, &heads_tx, &tls_tx)?;
        Ok(capture)
    }

    /// Loads the kernel program, attaches it to the targets, hands its rings to the reader
    /// thread and enables it; with TLS capture, the probes too.
    fn start_program(
        &mut self,
        cfg: &CaptureConfig,
        heads_tx: &mpsc::Sender<HeadMerge>,
        tls_tx: &mpsc::Sender<tls::TlsSource>,
    ) -> Result<()> {
        let mut program =
            KernelProgram::load(cfg.ebpf_log, cfg.records_ring_bytes, cfg.tls.is_some())?;
        for t in &cfg.targets {
            self.attach_target(&mut program, t)?;
        }
        if cfg.matching.records() {
            // The capture thread reads the records with the clones, from before the program
            // is enabled, so that no record waits unread.
            let merge = HeadMerge::new(program.take_response_heads()?, cfg.records_ring_bytes);
            heads_tx
                .send(merge)
                .map_err(|_| CaptureError::ThreadExited)?;
            self.full_responses = Some(program.take_full_responses()?);
        }
        self.heartbeat = Some(heartbeat::HeartbeatThread::start(
            program.take_heartbeat()?,
        )?);
        if let Some(tls_cfg) = &cfg.tls {
            self.start_tls(&mut program, tls_cfg.clone(), tls_tx)?;
        }
        // Only TLS ports: the TC program stays off, attached nowhere.
        if !cfg.matching.ports.is_empty() {
            program.configure(&cfg.matching, self.mirror_ifindex)?;
        }
        self.program_id = program.id()?;
        self.program = Some(program);
        Ok(())
    }

    /// Loads the TLS probes, hands their ring to the reader thread, and finds the processes.
    fn start_tls(
        &mut self,
        program: &mut KernelProgram,
        cfg: tls::TlsConfig,
        to_reader: &mpsc::Sender<tls::TlsSource>,
    ) -> Result<()> {
        let mut probes = tls::TlsCapture::start(program.ebpf_mut(), cfg)?;
        let ring = tls::take_ring(program.ebpf_mut())?;
        let source =
            tls::TlsSource::new(ring, probes.ports().to_vec(), Arc::clone(&self.tls_stats));
        to_reader
            .send(source)
            .map_err(|_| CaptureError::ThreadExited)?;
        probes.rescan(program.ebpf_mut())?;
        if probes.processes() == 0 {
            log::warn!(
                "TLS: no process to read yet (a --tls-pid that is not running, or a pod whose \
                 network namespace is not found); looked for again every 2 s"
            );
        } else if probes.libraries() == 0 {
            log::warn!(
                "TLS: none of the {} processes maps OpenSSL's libssl: their TLS is not read \
                 (statically linked TLS, Go's crypto/tls and rustls are not supported)",
                probes.processes()
            );
        }
        self.tls = Some(probes);
        Ok(())
    }

    /// Finds processes and TLS libraries that appeared, and forgets processes that exited; call
    /// it every few seconds. Nothing without TLS capture.
    pub fn rescan_tls(&mut self) {
        if let (Some(probes), Some(program)) = (self.tls.as_mut(), self.program.as_mut()) {
            if let Err(e) = probes.rescan(program.ebpf_mut()) {
                log::warn!("TLS: {}", error::chain(&e));
            }
        }
    }

    /// With TLS capture, reads (or stops reading) the TLS of a pod's processes, found in its
    /// network namespace; nothing without.
    pub fn tls_follow_pod(&mut self, ip: IpAddr, follow: bool) {
        if let Some(probes) = self.tls.as_mut() {
            if follow {
                probes.follow_pod(ip);
            } else {
                probes.forget_pod(ip);
            }
        }
        if follow {
            self.rescan_tls();
        }
    }

    /// The TLS probes' kernel counters by name, and the processes and libraries read now.
    pub fn tls_report(&self) -> Option<TlsReport> {
        let probes = self.tls.as_ref()?;
        let kernel = tls::kernel_counters(self.program.as_ref()?.ebpf()).ok()?;
        Some(TlsReport {
            kernel,
            processes: probes.processes(),
            libraries: probes.libraries(),
            refused: probes.refused(),
        })
    }

    pub fn tls_stats(&self) -> &Arc<tls::streams::TlsStats> {
        &self.tls_stats
    }

    /// Gives the reader thread the stage its batches go to, and starts the reading.
    pub fn feed(&mut self, sink: Box<dyn BatchSink>) -> Result<()> {
        self.sink_tx
            .take()
            .ok_or(CaptureError::ThreadExited)?
            .send(sink)
            .map_err(|_| CaptureError::ThreadExited)
    }

    /// Attaches to the target's hook, and to the opposite one for responses (on lo one hook
    /// sees both directions). Each hook once: a packet cloned twice would be a request replayed
    /// twice.
    fn attach_target(&mut self, program: &mut KernelProgram, t: &Target) -> Result<()> {
        let lo = t.within(|| netdev::check_target_iface(&t.iface))? == netdev::LinkKind::Loopback;
        let mut hooks = vec![t.hook];
        if self.responses && !lo {
            hooks.push(t.hook.opposite());
        }
        let key = t.key();
        for hook in hooks {
            if self
                .attached
                .iter()
                .any(|(a, h, _)| a.key() == key && *h == hook)
            {
                continue;
            }
            let mode = self.attach_mode;
            let mode = t.within(|| program.attach(&t.iface, &key, hook, mode))?;
            self.attached.push((t.clone(), hook, mode));
        }
        Ok(())
    }

    /// Starts mirroring the pod at `ip` while running: its address joins the live filter, and
    /// its host-side veth (found by route) is attached unless it already is. Returns where.
    pub fn add_pod(&mut self, ip: IpAddr) -> Result<String> {
        if let Some(p) = self.pods.get(&ip) {
            return Ok(p.target.to_string());
        }
        let iface = netdev::iface_for_pod(ip)?;
        // The hook requests cross: the veth's egress, towards the pod.
        let target = Target::here(iface, Hook::Egress);
        self.attach_pod(ip, target, None)
    }

    /// Starts mirroring the pod at `ip` inside its own network namespace, on its `lo`: where a
    /// mesh proxy (Istio, Linkerd) hands the application plaintext that crossed the node
    /// encrypted. The namespace is the one whose interfaces carry `ip`.
    ///
    /// The program's clones leave through a veth whose one end is made inside the pod's
    /// namespace with the host mirror veth's interface index, so that the one index the program
    /// is configured with names a mirror veth in every namespace, and whose other end is in the
    /// reader's namespace, where the capture socket reads every interface. Nothing is left in
    /// the pod when the agent dies: the reader's namespace dies with it, and the pair with it.
    pub fn add_pod_in_netns(&mut self, ip: IpAddr) -> Result<String> {
        if let Some(p) = self.pods.get(&ip) {
            return Ok(p.target.to_string());
        }
        let ns = netns::find_by_addr(ip)?;
        self.pod_veths += 1;
        let peer = format!("mirror{}", self.pod_veths);
        let end = self.host_veth.clone();
        let (index, reader_fd) = (self.mirror_ifindex, self.reader_netns.fd());
        within(Some(&ns), || {
            Ok(rtnl::create_veth(&end, index, &peer, reader_fd)?)
        })?;
        let up = |at: &Netns, name: &str| {
            within(Some(at), || {
                netdev::quiet_ipv6(name)?;
                netdev::set_up(name).map_err(CaptureError::io(format!("bringing {name} up")))
            })
        };
        let target = Target {
            iface: "lo".into(),
            hook: Hook::Ingress,
            netns: Some(ns.clone()),
        };
        let ready = up(&self.reader_netns, &peer).and_then(|()| up(&ns, &end));
        match ready.and_then(|()| self.attach_pod(ip, target, Some(peer.clone()))) {
            Ok(at) => Ok(at),
            Err(e) => {
                self.delete_pod_veth(&peer);
                Err(e)
            }
        }
    }

    /// Attaches `target` for the pod at `ip`, then adds its address to the live filter.
    fn attach_pod(&mut self, ip: IpAddr, target: Target, peer: Option<String>) -> Result<String> {
        let key = target.key();
        let mut program = self.program.take().ok_or(CaptureError::Stopping)?;
        // Both hooks first, the address last: the address filter holds the pod's packets back
        // until both directions are seen, or a request cloned before the response hook is on
        // would wait for an answer that never comes, and pair with the next one.
        let attached = (|| {
            if !self.locks.contains_key(&key) {
                let lock = lock_iface(&self.lock_dir, &target)?;
                self.locks.insert(key.clone(), lock);
            }
            self.attach_target(&mut program, &target)?;
            program.set_live_addr(ip, true)
        })();
        self.program = Some(program);
        if let Err(e) = attached {
            self.release_iface_if_unused(&key);
            let _ = self.program.as_mut().map(|p| p.set_live_addr(ip, false));
            return Err(e);
        }
        let at = target.to_string();
        self.pods.insert(ip, PodAttachment { target, peer });
        Ok(at)
    }

    /// Stops mirroring the pod at `ip`: its address leaves the live filter at once, and its
    /// interface is detached when no other mirrored pod is behind it.
    pub fn remove_pod(&mut self, ip: IpAddr) -> Result<()> {
        let Some(pod) = self.pods.remove(&ip) else {
            return Ok(());
        };
        if let Some(program) = self.program.as_mut() {
            program.set_live_addr(ip, false)?;
        }
        self.release_iface_if_unused(&pod.target.key());
        if let Some(peer) = &pod.peer {
            self.delete_pod_veth(peer);
        }
        Ok(())
    }

    /// Deletes an in-pod mirror veth by its end in the reader's namespace.
    fn delete_pod_veth(&self, peer: &str) {
        let deleted = within(Some(&self.reader_netns), || {
            netdev::delete_link(peer);
            Ok(())
        });
        if let Err(e) = deleted {
            log::warn!("deleting the mirror veth {peer}: {}", error::chain(&e));
        }
    }

    /// Detaches from the interface `key` names and lets its lock go, unless a pod or a start
    /// target still uses it.
    fn release_iface_if_unused(&mut self, key: &str) {
        if self.fixed.iter().any(|f| f == key) || self.pods.values().any(|p| p.target.key() == key)
        {
            return;
        }
        if let Some(program) = self.program.as_mut() {
            for (t, hook, _) in self.attached.iter().filter(|(t, _, _)| t.key() == key) {
                // A pod's veth or namespace that is gone took its links with it.
                if let Err(e) = t.within(|| program.detach(key, *hook)) {
                    log::debug!("{}", error::chain(&e));
                }
            }
        }
        self.attached.retain(|(t, _, _)| t.key() != key);
        self.locks.remove(key);
    }

    /// The hooks attached, with the mode used for each.
    pub fn attachments(&self) -> &[(Target, Hook, AttachMode)] {
        &self.attached
    }

    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    pub fn mirror_interface(&self) -> &str {
        &self.host_veth
    }

    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }

    /// The kernel's list of connections whose responses are cloned whole, for the parse stage
    /// (once; None unless responses are described by their heads).
    pub fn take_full_responses(&mut self) -> Option<FullResponses> {
        self.full_responses.take()
    }

    /// Changes the share of new connections the kernel mirrors, and of admitted connections
    /// it keeps mirroring (a CPU budget's levers).
    pub fn set_sampling(&mut self, new_ppm: u32, keep_admitted_ppm: u32) -> Result<()> {
        self.program
            .as_mut()
            .ok_or(CaptureError::Stopping)?
            .set_sampling(new_ppm, keep_admitted_ppm)
    }

    pub fn kernel_counters(&self) -> Result<[u64; COUNTER_COUNT as usize]> {
        self.program
            .as_ref()
            .ok_or(CaptureError::Stopping)?
            .counters()
    }

    /// Time the kernel program has spent mirroring in the live path so far.
    pub fn kernel_work(&self) -> Result<std::time::Duration> {
        self.program.as_ref().ok_or(CaptureError::Stopping)?.work()
    }

    /// Updates `requests_lost` from the kernel's counters; call it about once a second. While
    /// running, the kernel's count from the previous call is compared with what has been
    /// received by now, so that segments still on their way are not taken for lost (an
    /// underestimate at worst); `stop` makes the count exact.
    pub fn account_lost_requests(&self, kernel: &[u64; COUNTER_COUNT as usize]) {
        let now = kernel[Counter::ClonedRequestStarts as usize];
        let before = self.kernel_request_starts.swap(now, Ordering::Relaxed);
        self.record_lost_requests(before, kernel);
    }

    /// Requests whose first segment the kernel cloned (`cloned`) and that were not received,
    /// and those whose record did not fit in the ring.
    fn record_lost_requests(&self, cloned: u64, kernel: &[u64; COUNTER_COUNT as usize]) {
        let received = self.stats.request_starts.load(Ordering::Relaxed);
        let unrecorded = kernel[Counter::PayloadRingFullRequestStarts as usize];
        self.stats.requests_lost.fetch_max(
            cloned.saturating_sub(received) + unrecorded,
            Ordering::Relaxed,
        );
    }

    /// Disables, detaches, stops the reader (after it has read what the ring still holds) and
    /// removes the mirror interface. Returns the final kernel counters.
    pub fn stop(mut self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let counters = self.shutdown();
        if let Ok(c) = &counters {
            self.record_lost_requests(c[Counter::ClonedRequestStarts as usize], c);
        }
        counters
    }

    fn shutdown(&mut self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let mut counters = Err(CaptureError::Stopping);
        if let Some(mut program) = self.program.take() {
            if let Err(e) = program.disable() {
                log::warn!("disabling the program: {}", error::chain(&e));
            }
            // Nothing is cloned any more: these counts are final.
            counters = program.counters();
            // Dropping the program detaches every link and filter it owns.
            drop(program);
        }
        self.heartbeat = None;
        self.stop.store(true, Ordering::Relaxed);
        // Never fed: the reader stops waiting for its stage.
        self.sink_tx = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        netdev::delete_link(&self.host_veth);
        // The reader's namespace would take them too, but later: the kernel frees a namespace
        // asynchronously. A pod is left as it was found when the agent exits.
        for pod in self.pods.values().filter_map(|p| p.peer.as_deref()) {
            self.delete_pod_veth(pod);
        }
        counters
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The mirror veths' interface index is this with 28 random bits: above the indexes kernels
/// hand out (they count up from 1 in each namespace), and a valid positive `int`.
const MIRROR_IFINDEX_BASE: u32 = 0x4000_0000;

/// 32 random bits from the kernel, or (without getrandom) from the clock and pid.
fn unique_tag() -> u32 {
    let mut tag = 0u32;
    // SAFETY: writes at most 4 bytes into `tag`.
    let n = unsafe { libc::getrandom(std::ptr::addr_of_mut!(tag).cast(), 4, 0) };
    if n != 4 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        tag = nanos ^ std::process::id().rotate_left(16);
    }
    tag
}

/// Claims the target's interface for this agent and removes filters a dead agent left there.
fn lock_iface(dir: &std::path::Path, t: &Target) -> Result<netdev::TargetLock> {
    t.within(|| {
        let lock = netdev::TargetLock::acquire(dir, &t.iface)?;
        netdev::remove_stale_filters(&t.iface, PROGRAM_NAME);
        Ok(lock)
    })
}

fn preflight() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 12;
    const CAP_NET_RAW: u64 = 13;
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_BPF: u64 = 39;
    let has = |c: u64| cap_eff & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        return Err(CaptureError::MissingCapabilities { missing });
    }
    // The binary prepares before its first thread; a library caller gets the limit raised here.
    memlock::prepare();
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        log::warn!("this kernel exposes no BTF (/sys/kernel/btf/vmlinux); if loading fails, use a kernel built with CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

/// Starts the reader thread. It moves into a fresh network namespace, waits there for the veth
/// peer, opens the ring on every interface of that namespace (the mirror veths of pods attached
/// later end there too; unless `ring_cfg` is None) and then reads until stopped. Returns the
/// thread, its namespace, and a closure that creates the veth pair and waits until the reader
/// is ready.
fn spawn_reader(
    ring_cfg: Option<RingConfig>,
    matching: MatchConfig,
    sources: Sources,
    sink: mpsc::Receiver<Box<dyn BatchSink>>,
    stats: Arc<CaptureStats>,
    stop: Arc<AtomicBool>,
    (host_veth, mirror_ifindex): (String, u32),
) -> Result<(JoinHandle<()>, Netns, impl FnOnce() -> Result<()>)> {
    const PEER: &str = "mirror0";
    let (tid_tx, tid_rx) = mpsc::channel::<std::io::Result<i32>>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let handle = std::thread::Builder::new()
        .name("mirror-capture".into())
        .spawn(move || {
            // SAFETY: unshare only affects this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let _ = tid_tx.send(Err(std::io::Error::last_os_error()));
                return;
            }
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(Ok(unsafe { libc::gettid() }));
            if go_rx.recv().is_err() {
                return;
            }
            let ring = (|| -> Result<Option<PacketRing>> {
                netdev::quiet_ipv6(PEER)?;
                netdev::set_up(PEER).map_err(CaptureError::io(format!("bringing {PEER} up")))?;
                // Index 0: every interface here. This namespace's `lo` stays down, and
                // nothing but the mirror veths' ends is ever added.
                ring_cfg
                    .map(|cfg| PacketRing::open(0, cfg))
                    .transpose()
                    .map_err(CaptureError::io("opening the capture ring"))
            })();
            match ring {
                Ok(Some(ring)) => {
                    let _ = ready_tx.send(Ok(()));
                    if let Ok(sink) = sink.recv() {
                        read_loop(ring, sources, &matching, sink, &stats, &stop);
                    }
                }
                Ok(None) => {
                    let _ = ready_tx.send(Ok(()));
                    if let Ok(mut sink) = sink.recv() {
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(100));
                            sink.poll();
                        }
                        sink.finish();
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(CaptureError::io("starting the capture thread"))?;
    let tid = tid_rx
        .recv()
        .map_err(|_| CaptureError::ThreadExited)?
        .map_err(CaptureError::Namespace)?;
    let netns = Netns::open(std::path::Path::new(&format!(
        "/proc/self/task/{tid}/ns/net"
    )))
    .map_err(CaptureError::Namespace)?;
    let peer_netns = netns.clone();
    let ready = move || -> Result<()> {
        rtnl::create_veth(&host_veth, mirror_ifindex, PEER, peer_netns.fd())?;
        go_tx.send(()).map_err(|_| CaptureError::ThreadExited)?;
        ready_rx.recv().map_err(|_| CaptureError::ThreadExited)?
    };
    Ok((handle, netns, ready))
}

/// How long the reader waits for a block while response-head records come, in milliseconds.
const BUSY_POLL_MS: i32 = 5;
/// The longest it waits when nothing has come for a while.
const IDLE_POLL_MS: i32 = 80;

/// Reads the clones, and the response-head records once `heads` hands them over, merged.
/// What the reader merges with the clones, handed over once the program is loaded.
struct Sources {
    heads: mpsc::Receiver<HeadMerge>,
    tls: mpsc::Receiver<tls::TlsSource>,
}

/// At the end: what the head merge still holds and the TLS records waiting.
fn hand_on_the_rest(
    merge: Option<&mut HeadMerge>,
    tls: &mut TlsFeed,
    sink: &mut dyn BatchSink,
    stats: &CaptureStats,
) {
    let mut rest = Vec::new();
    if let Some(m) = merge {
        rest = m.merge(rest, stats, crate::segment::now_ns(), Progress::Flush);
    }
    tls.drain(&mut rest);
    if !rest.is_empty() {
        hand_on(sink, rest, stats);
    }
}

fn read_loop(
    mut ring: PacketRing,
    sources: Sources,
    matching: &MatchConfig,
    mut sink: Box<dyn BatchSink>,
    stats: &CaptureStats,
    stop: &AtomicBool,
) {
    let mut last_stats = Instant::now();
    // After the stop, what the ring still holds (blocks retire within a few milliseconds) is
    // read too, so that nothing the kernel cloned is left unread.
    let mut drain_until: Option<Instant> = None;
    // With response heads, no clone is read before the merge is here: it comes before the
    // program is enabled (or never, if loading fails, when the sender is dropped).
    let mut merge: Option<HeadMerge> = matching
        .records()
        .then(|| sources.heads.recv().ok())
        .flatten();
    let mut tls = TlsFeed::new(sources.tls);
    let mut idle_poll_ms = BUSY_POLL_MS;
    loop {
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            drain_until = Some(Instant::now() + Duration::from_millis(50));
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            hand_on_the_rest(merge.as_mut(), &mut tls, sink.as_mut(), stats);
            break;
        }
        // Records are read between blocks: come back often while they come. Under traffic a
        // block retires every few milliseconds and wakes the poll anyway; an idle node is
        // polled less and less often, down to every `IDLE_POLL_MS`.
        let records = merge.is_some() || tls.on();
        let timeout_ms = match (drain_until.is_some(), records) {
            (true, true) => BUSY_POLL_MS,
            (false, true) => idle_poll_ms,
            (true, false) => 10,
            (false, false) => 100,
        };
        let records_before = stats.head_records.load(Ordering::Relaxed);
        let (res, mut batch) = read_block(&mut ring, timeout_ms, matching, stats);
        if let Err(e) = res {
            log::error!("capture ring: {e}");
            break;
        }
        if let Some(m) = merge.as_mut() {
            // In this order: a clone made before `now` (less the block retire time) is in a
            // block read or ready by the time the ring is looked at.
            let now = crate::segment::now_ns();
            let progress = if ring.next_block_ready() {
                Progress::Behind
            } else {
                Progress::CaughtUp
            };
            batch = m.merge(batch, stats, now, progress);
        }
        let tls_records = tls.drain(&mut batch);
        let idle = matches!(res, Ok(0))
            && tls_records == 0
            && stats.head_records.load(Ordering::Relaxed) == records_before
            && !merge.as_ref().is_some_and(HeadMerge::holds);
        idle_poll_ms = if idle {
            (idle_poll_ms * 2).min(IDLE_POLL_MS)
        } else {
            BUSY_POLL_MS
        };
        stats.note_backlog(ring.fill());
        if let Some(m) = &merge {
            stats.note_backlog(m.fill());
        }
        if !batch.is_empty() {
            hand_on(sink.as_mut(), batch, stats);
        }
        sink.poll();
        if last_stats.elapsed() >= Duration::from_millis(500) {
            accumulate_ring_stats(&ring, stats);
            last_stats = Instant::now();
        }
    }
    accumulate_ring_stats(&ring, stats);
    sink.finish();
}

/// The TLS probes' records, once their source is handed over (after the program loads).
struct TlsFeed {
    rx: mpsc::Receiver<tls::TlsSource>,
    source: Option<tls::TlsSource>,
}

impl TlsFeed {
    fn new(rx: mpsc::Receiver<tls::TlsSource>) -> Self {
        TlsFeed { rx, source: None }
    }

    fn on(&mut self) -> bool {
        if self.source.is_none() {
            self.source = self.rx.try_recv().ok();
        }
        self.source.is_some()
    }

    /// Appends the segments of the records waiting; returns how many records were read.
    fn drain(&mut self, out: &mut SegmentBatch) -> usize {
        if !self.on() {
            return 0;
        }
        self.source.as_mut().map_or(0, |s| s.drain(out))
    }
}

/// Waits up to `timeout_ms` for a block of clones and parses its frames into segments, each
/// frame counted, and those that do not parse counted by reason.
fn read_block(
    ring: &mut PacketRing,
    timeout_ms: i32,
    matching: &MatchConfig,
    stats: &CaptureStats,
) -> (std::io::Result<usize>, SegmentBatch) {
    let mut batch = Vec::new();
    let res = ring.poll_block(timeout_ms, |frame| {
        stats.frames.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes
            .fetch_add(frame.data.len() as u64, Ordering::Relaxed);
        if frame.data.len() < frame.wire_len {
            stats.truncated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match parse_frame(&frame.data, frame.ts_ns) {
            Ok(seg) => {
                if matching.is_request_start(&seg) {
                    stats.request_starts.fetch_add(1, Ordering::Relaxed);
                }
                batch.push(seg)
            }
            Err(e) => stats.frame_error(e),
        }
    });
    (res, batch)
}

fn hand_on(sink: &mut dyn BatchSink, batch: SegmentBatch, stats: &CaptureStats) {
    stats
        .segments
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    sink.batch(batch);
}

fn accumulate_ring_stats(ring: &PacketRing, stats: &CaptureStats) {
    if let Ok(s) = ring.take_stats() {
        stats.ring_packets.fetch_add(s.packets, Ordering::Relaxed);
        stats.ring_drops.fetch_add(s.drops, Ordering::Relaxed);
        stats.ring_freezes.fetch_add(s.freezes, Ordering::Relaxed);
    }
}

/// What the TLS probes report, for logs and metrics.
#[derive(Clone, Debug, Default)]
pub struct TlsReport {
    /// The kernel side's counters by name.
    pub kernel: Vec<(&'static str, u64)>,
    pub processes: usize,
    pub libraries: usize,
    /// Library files that could not be attached.
    pub refused: usize,
}

/// What the kernel program reports, for logs and metrics.
#[derive(Clone, Debug, Default)]
pub struct KernelReport {
    /// Packets by outcome (`named_counters`).
    pub packets: Vec<(&'static str, u64)>,
    /// Time spent mirroring in the live path (clones, records), all CPUs.
    pub work: std::time::Duration,
}

impl KernelReport {
    /// Segments whose record did not fit in the records ring: the reader fell behind.
    pub fn records_ring_full(&self) -> u64 {
        let full = [
            Counter::HeadRingFull.name(),
            Counter::PayloadRingFull.name(),
        ];
        self.packets
            .iter()
            .filter(|(name, _)| full.contains(name))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Names and values of the kernel counters, for logs and metrics.
pub fn named_counters(values: &[u64; COUNTER_COUNT as usize]) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .map(|c| (c.name(), values[*c as usize]))
        .collect()
}
