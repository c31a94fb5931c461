//! Capture stage: the TC program clones the live service's segments onto a veth pair that the
//! agent owns, and a reader thread turns the frames of the far end into `Segment` batches.
//!
//! The far end of the veth lives in a network namespace private to the reader thread. When the
//! agent exits, however it exits, that namespace dies and takes the veth pair with it, and tcx
//! links die with the process: nothing is left cloning.

pub mod netdev;
pub mod program;
pub mod ring;
pub mod rtnl;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use mirror_common::{Counter, COUNTER_COUNT, PROGRAM_NAME};

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
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub targets: Vec<Target>,
    pub matching: MatchConfig,
    pub attach_mode: AttachMode,
    pub ring: RingConfig,
    /// Capacity of the segment channel, in batches (one batch per ring block).
    pub channel_batches: usize,
    pub ebpf_log: bool,
    pub lock_dir: PathBuf,
    /// Read the clones. Off only to measure the kernel side alone: clones then die in the
    /// mirror namespace unread.
    pub read_clones: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            targets: Vec::new(),
            matching: MatchConfig {
                ports: Vec::new(),
                addrs: Vec::new(),
                responses: true,
                sample_ppm: mirror_common::SAMPLE_ALL,
            },
            attach_mode: AttachMode::Auto,
            ring: RingConfig::default(),
            channel_batches: 256,
            ebpf_log: false,
            lock_dir: PathBuf::from("/run/mirror-agent"),
            read_clones: true,
        }
    }
}

/// Userspace capture counters. Every frame read from the ring ends in `segments` or in one
/// `frame_errors` reason or in `truncated`.
#[derive(Debug, Default, serde::Serialize)]
pub struct CaptureStats {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    pub truncated: AtomicU64,
    pub frame_errors: [AtomicU64; FrameError::ALL.len()],
    /// Times the reader waited because the next stage's channel was full.
    pub channel_full_waits: AtomicU64,
    pub ring_packets: AtomicU64,
    /// Frames the kernel could not put in the ring (it was full).
    pub ring_drops: AtomicU64,
    pub ring_freezes: AtomicU64,
    /// Segments towards the service that start like a request: what reached the agent of the
    /// kernel's `cloned_request_starts`.
    pub request_starts: AtomicU64,
    /// Requests whose first segment the kernel cloned but the agent never received (a full
    /// ring, a full backlog): the kernel's count less `request_starts`.
    pub requests_lost: AtomicU64,
    /// Segments read from the ring after the stop while the next stage was still full.
    pub dropped_at_stop: AtomicU64,
}

impl CaptureStats {
    fn frame_error(&self, e: FrameError) {
        let i = FrameError::ALL.iter().position(|x| *x == e).unwrap_or(0);
        self.frame_errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

pub type SegmentBatch = Vec<Segment>;

/// A running capture. Dropping it (or calling `stop`) disables the program, detaches it and
/// removes the mirror interface.
pub struct Capture {
    program: Option<KernelProgram>,
    program_id: u32,
    host_veth: String,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    stats: Arc<CaptureStats>,
    /// The kernel's `cloned_request_starts` at the previous `account_lost_requests`.
    kernel_request_starts: AtomicU64,
    attached: Vec<(Target, Hook, AttachMode)>,
    _locks: Vec<netdev::TargetLock>,
}

impl Capture {
    pub fn start(cfg: &CaptureConfig) -> Result<(Capture, Receiver<SegmentBatch>)> {
        preflight()?;
        if cfg.targets.is_empty() {
            bail!("nothing to attach to: give --iface or --pod-ip");
        }
        let mut locks = Vec::new();
        let mut loopbacks = Vec::new();
        let mut ifaces: Vec<&str> = cfg.targets.iter().map(|t| t.iface.as_str()).collect();
        ifaces.sort_unstable();
        ifaces.dedup();
        for iface in &ifaces {
            if netdev::check_target_iface(iface)? == netdev::LinkKind::Loopback {
                loopbacks.push(*iface);
            }
            locks.push(netdev::TargetLock::acquire(&cfg.lock_dir, iface)?);
            netdev::remove_stale_filters(iface, PROGRAM_NAME);
        }

        let stats = Arc::new(CaptureStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded(cfg.channel_batches.max(1));
        // Unique per agent on the node: in containers every agent is pid 1.
        let host_veth = format!("mirr{:08x}", unique_tag());
        let (reader, ready) = spawn_reader(
            cfg.read_clones.then_some(cfg.ring),
            cfg.matching.clone(),
            tx,
            Arc::clone(&stats),
            Arc::clone(&stop),
            host_veth.clone(),
        )?;
        let mut capture = Capture {
            program: None,
            program_id: 0,
            host_veth: host_veth.clone(),
            stop,
            reader: Some(reader),
            stats,
            kernel_request_starts: AtomicU64::new(0),
            attached: Vec::new(),
            _locks: locks,
        };
        ready()?;
        netdev::quiet_ipv6(&host_veth)?;
        netdev::set_up(&host_veth).context("bringing the mirror interface up")?;
        let mirror_ifindex = netdev::ifindex(&host_veth)?;

        let mut program = KernelProgram::load(cfg.ebpf_log)?;
        for t in &cfg.targets {
            let mut hooks = vec![t.hook];
            // On lo both directions cross every hook: one hook sees them all.
            if cfg.matching.responses && !loopbacks.contains(&t.iface.as_str()) {
                hooks.push(t.hook.opposite());
            }
            for hook in hooks {
                // Each hook once: a packet cloned twice would be a request replayed twice.
                if capture
                    .attached
                    .iter()
                    .any(|(a, h, _)| a.iface == t.iface && *h == hook)
                {
                    continue;
                }
                let mode = program.attach(&t.iface, hook, cfg.attach_mode)?;
                capture.attached.push((t.clone(), hook, mode));
            }
        }
        program.configure(&cfg.matching, mirror_ifindex)?;
        capture.program_id = program.id()?;
        capture.program = Some(program);
        Ok((capture, rx))
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

    pub fn kernel_counters(&self) -> Result<[u64; COUNTER_COUNT as usize]> {
        self.program
            .as_ref()
            .ok_or_else(|| anyhow!("program not loaded"))?
            .counters()
    }

    /// Updates `requests_lost` from the kernel's counters; call it about once a second. While
    /// running, the kernel's count from the previous call is compared with what has been
    /// received by now, so that segments still on their way are not taken for lost (an
    /// underestimate at worst); `stop` makes the count exact.
    pub fn account_lost_requests(&self, kernel: &[u64; COUNTER_COUNT as usize]) {
        let now = kernel[Counter::ClonedRequestStarts as usize];
        let before = self.kernel_request_starts.swap(now, Ordering::Relaxed);
        self.record_lost_requests(before);
    }

    fn record_lost_requests(&self, cloned: u64) {
        let received = self.stats.request_starts.load(Ordering::Relaxed);
        self.stats
            .requests_lost
            .fetch_max(cloned.saturating_sub(received), Ordering::Relaxed);
    }

    /// Disables, detaches, stops the reader (after it has read what the ring still holds) and
    /// removes the mirror interface. Returns the final kernel counters.
    pub fn stop(mut self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let counters = self.shutdown();
        if let Ok(c) = &counters {
            self.record_lost_requests(c[Counter::ClonedRequestStarts as usize]);
        }
        counters
    }

    fn shutdown(&mut self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let mut counters = Err(anyhow!("program not loaded"));
        if let Some(mut program) = self.program.take() {
            if let Err(e) = program.disable() {
                log::warn!("disabling the program: {e:#}");
            }
            // Nothing is cloned any more: these counts are final.
            counters = program.counters();
            // Dropping the program detaches every link and filter it owns.
            drop(program);
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        netdev::delete_link(&self.host_veth);
        counters
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

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
        bail!(
            "mirror-agent needs {} to load the TC program and read the mirror interface: run it \
             as root (sudo), or grant those capabilities (in Kubernetes: securityContext \
             capabilities add: [BPF, NET_ADMIN, NET_RAW, PERFMON])",
            missing.join(", ")
        );
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        log::warn!("this kernel exposes no BTF (/sys/kernel/btf/vmlinux); if loading fails, use a kernel built with CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

/// Starts the reader thread. It moves into a fresh network namespace, waits there for the veth
/// peer, opens the ring on it (unless `ring_cfg` is None) and then reads until stopped. The
/// returned closure creates the veth pair and waits until the reader is ready.
fn spawn_reader(
    ring_cfg: Option<RingConfig>,
    matching: MatchConfig,
    tx: Sender<SegmentBatch>,
    stats: Arc<CaptureStats>,
    stop: Arc<AtomicBool>,
    host_veth: String,
) -> Result<(JoinHandle<()>, impl FnOnce() -> Result<()>)> {
    const PEER: &str = "mirror0";
    let (tid_tx, tid_rx) = mpsc::channel::<Result<i32, String>>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let handle = std::thread::Builder::new()
        .name("mirror-capture".into())
        .spawn(move || {
            // SAFETY: unshare only affects this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                let _ = tid_tx.send(Err(format!("unshare(CLONE_NEWNET): {e}")));
                return;
            }
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(Ok(unsafe { libc::gettid() }));
            if go_rx.recv().is_err() {
                return;
            }
            let ring = (|| -> Result<Option<PacketRing>, String> {
                let idx = netdev::ifindex(PEER).map_err(|e| format!("veth peer missing: {e}"))?;
                netdev::quiet_ipv6(PEER).map_err(|e| format!("{e:#}"))?;
                netdev::set_up(PEER).map_err(|e| format!("bringing {PEER} up: {e}"))?;
                ring_cfg
                    .map(|cfg| PacketRing::open(idx, cfg))
                    .transpose()
                    .map_err(|e| format!("opening the capture ring: {e}"))
            })();
            match ring {
                Ok(Some(ring)) => {
                    let _ = ready_tx.send(Ok(()));
                    read_loop(ring, &matching, &tx, &stats, &stop);
                }
                Ok(None) => {
                    let _ = ready_tx.send(Ok(()));
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    let tid = tid_rx
        .recv()
        .map_err(|_| anyhow!("capture thread exited early"))?
        .map_err(|e| {
            anyhow!("{e}: mirror-agent needs CAP_SYS_ADMIN or root to create its mirror namespace")
        })?;
    let ready = move || -> Result<()> {
        netdev::create_veth(&host_veth, PEER, tid)?;
        go_tx
            .send(())
            .map_err(|_| anyhow!("capture thread exited early"))?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("capture thread exited early"))?
            .map_err(|e| anyhow!(e))
    };
    Ok((handle, ready))
}

fn read_loop(
    mut ring: PacketRing,
    matching: &MatchConfig,
    tx: &Sender<SegmentBatch>,
    stats: &CaptureStats,
    stop: &AtomicBool,
) {
    let mut last_stats = Instant::now();
    // After the stop, what the ring still holds (blocks retire within a few milliseconds) is
    // read too, so that nothing the kernel cloned is left unread.
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            drain_until = Some(Instant::now() + Duration::from_millis(50));
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let mut batch = Vec::new();
        let timeout_ms = if drain_until.is_some() { 10 } else { 100 };
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
        if let Err(e) = res {
            log::error!("capture ring: {e}");
            break;
        }
        if !batch.is_empty() {
            stats
                .segments
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let mut pending = batch;
            loop {
                match tx.send_timeout(pending, Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(SendTimeoutError::Timeout(b)) => {
                        stats.channel_full_waits.fetch_add(1, Ordering::Relaxed);
                        if stop.load(Ordering::Relaxed) {
                            stats
                                .dropped_at_stop
                                .fetch_add(b.len() as u64, Ordering::Relaxed);
                            break;
                        }
                        pending = b;
                    }
                    Err(SendTimeoutError::Disconnected(_)) => return,
                }
            }
        }
        if last_stats.elapsed() >= Duration::from_millis(500) {
            accumulate_ring_stats(&ring, stats);
            last_stats = Instant::now();
        }
    }
    accumulate_ring_stats(&ring, stats);
}

fn accumulate_ring_stats(ring: &PacketRing, stats: &CaptureStats) {
    if let Ok(s) = ring.take_stats() {
        stats.ring_packets.fetch_add(s.packets, Ordering::Relaxed);
        stats.ring_drops.fetch_add(s.drops, Ordering::Relaxed);
        stats.ring_freezes.fetch_add(s.freezes, Ordering::Relaxed);
    }
}

/// Names and values of the kernel counters, for logs and metrics.
pub fn named_counters(values: &[u64; COUNTER_COUNT as usize]) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .map(|c| (c.name(), values[*c as usize]))
        .collect()
}
