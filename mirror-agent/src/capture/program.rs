//! Loading, configuring and attaching the TC program.

use std::net::IpAddr;

use super::error::{CaptureError, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use mirror_common::{
    AddrKey, Counter, Heartbeat, MirrorConfig, COUNTER_COUNT, FLAG_ADDR_FILTER, FLAG_ENABLED,
    FLAG_PAYLOAD_RECORDS, FLAG_RESPONSES, FLAG_RESPONSE_HEADS, FLAG_STICKY_SAMPLING, MAP_CONFIG,
    MAP_COUNTERS, MAP_FULL_RESPONSES, MAP_HEARTBEAT, MAP_LIVE_ADDRS, MAP_LIVE_PORTS,
    MAP_RESPONSE_HEADS, MAP_WORK_NS, MAX_LIVE_ADDRS, MAX_LIVE_PORTS, PROGRAM_NAME, SAMPLE_ALL,
};

/// The kernel object, built by `cargo xtask build-ebpf` (see build.rs).
#[cfg(not(ebpf_object_missing))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MIRROR_EBPF_OBJECT"));
/// Built without the kernel object (see build.rs): loading says so.
#[cfg(ebpf_object_missing)]
static EBPF_OBJECT: &[u8] = &[];

/// How the program is attached to an interface hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum AttachMode {
    /// tcx where the kernel accepts a tcx link (6.6+, or a backport such as RHEL 9's 5.14),
    /// else a classic clsact filter. Decided by trying, not by the version number.
    Auto,
    /// tcx links: they vanish with the process, so a crashed agent leaves nothing cloning.
    Tcx,
    /// A clsact filter over netlink, for kernels before 6.6. Stale ones are removed at start.
    Netlink,
}

/// Direction of travel through an interface, as seen by TC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub fn opposite(self) -> Hook {
        match self {
            Hook::Ingress => Hook::Egress,
            Hook::Egress => Hook::Ingress,
        }
    }
    fn tc(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// What the program matches.
#[derive(Clone, Debug)]
pub struct MatchConfig {
    pub ports: Vec<u16>,
    /// Service addresses; empty means any address, unless `addr_filter`.
    pub addrs: Vec<IpAddr>,
    /// Match only the listed addresses even while there are none: pods selected by label come
    /// and go, and no address must not mean every address.
    pub addr_filter: bool,
    pub responses: bool,
    /// Describe response segments by their heads instead of cloning them (see the kernel
    /// program); connections that need more are cloned whole on the parse stage's request.
    pub response_heads: bool,
    /// Copy the payload of segments mirrored whole into ring-buffer records instead of cloning
    /// them onto the mirror interface (`FLAG_PAYLOAD_RECORDS`); longer ones are still cloned.
    pub payload_records: bool,
    /// Connections mirrored, in parts per million (the upper limit when a CPU budget lowers it).
    pub sample_ppm: u32,
    /// Decide each connection once and remember it (`FLAG_STICKY_SAMPLING`): needed when the
    /// rate changes at run time, so that it sheds or admits whole connections only.
    pub sticky_sampling: bool,
    /// With response heads: connections (parts per million) whose responses are cloned whole
    /// for content comparison.
    pub whole_responses_ppm: u32,
}

impl MatchConfig {
    /// The kernel's `cloned_request_starts` test, applied to a received clone: towards a live
    /// port, and its payload starts like a request. (The kernel's address filter already held
    /// for every clone.)
    pub fn is_request_start(&self, seg: &crate::segment::Segment) -> bool {
        let head = seg
            .payload
            .get(..mirror_common::REQUEST_START_LEN)
            .and_then(|h| h.try_into().ok());
        self.ports.contains(&seg.flow.dst.port())
            && head.is_some_and(mirror_common::is_request_start)
    }

    /// Whether the program writes records (then every clone gets a mark among them).
    pub fn records(&self) -> bool {
        (self.responses && self.response_heads) || self.payload_records
    }

    fn filters_addrs(&self) -> bool {
        self.addr_filter || !self.addrs.is_empty()
    }
}

pub struct KernelProgram {
    ebpf: Ebpf,
    /// Attached hooks by target key (`Target::key`: the interface and its namespace), so that
    /// one can be detached while the others keep cloning.
    links: std::collections::HashMap<(String, Hook), SchedClassifierLinkId>,
}

impl KernelProgram {
    /// Loads the object and the TC program, with a records ring of `records_ring_bytes`; with
    /// `tls`, the plaintext ring gets its full size (the TLS probes are loaded by
    /// `tls::TlsCapture`).
    pub fn load(ebpf_log: bool, records_ring_bytes: u32, tls: bool) -> Result<KernelProgram> {
        // aya-log's kernel side logs everything unless told otherwise; keep it off by default.
        if EBPF_OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        let level: u8 = if ebpf_log { 0xff } else { 0 };
        let mut loader = EbpfLoader::new();
        loader.override_global("AYA_LOG_LEVEL", &level, false);
        loader.map_max_entries(MAP_RESPONSE_HEADS, records_ring_bytes);
        if tls {
            loader.map_max_entries(
                mirror_common::tls::MAP_TLS_DATA,
                mirror_common::tls::TLS_RING_BYTES,
            );
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| match super::memlock::limiting() {
                Some((kernel, limit)) => CaptureError::Memlock {
                    kernel,
                    limit,
                    source: Box::new(e),
                },
                None => CaptureError::Load(Box::new(e)),
            })?;
        if ebpf_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => spawn_log_forwarder(logger)?,
                Err(e) => log::warn!("eBPF logging unavailable: {e}"),
            }
        }
        let prog: &mut SchedClassifier = program(&mut ebpf)?;
        let verifying = std::time::Instant::now();
        prog.load()
            .map_err(|e| CaptureError::Rejected(Box::new(e)))?;
        // The verifier's work grows with the kernel's age (older ones prune fewer paths): worth
        // seeing when a start is slow.
        if let Some(n) = prog
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count())
        {
            log::info!(
                "the kernel verified the TC program in {:.0?} ({n} instructions processed)",
                verifying.elapsed()
            );
        }
        Ok(KernelProgram {
            ebpf,
            links: Default::default(),
        })
    }

    /// Fills the maps, then enables the program (the flag is written last).
    pub fn configure(&mut self, m: &MatchConfig, mirror_ifindex: u32) -> Result<()> {
        if m.ports.is_empty() || m.ports.len() > MAX_LIVE_PORTS as usize {
            return Err(CaptureError::Ports {
                given: m.ports.len(),
                max: MAX_LIVE_PORTS,
            });
        }
        if m.addrs.len() > MAX_LIVE_ADDRS as usize {
            return Err(CaptureError::TooManyAddrs {
                max: MAX_LIVE_ADDRS,
            });
        }
        let mut ports: HashMap<_, u16, u8> =
            HashMap::try_from(map(&mut self.ebpf, MAP_LIVE_PORTS)?)
                .map_err(CaptureError::map(MAP_LIVE_PORTS))?;
        for p in &m.ports {
            ports
                .insert(p, 1, 0)
                .map_err(CaptureError::map(MAP_LIVE_PORTS))?;
        }
        for a in &m.addrs {
            self.set_live_addr(*a, true)?;
        }
        let mut flags = FLAG_ENABLED;
        if m.responses {
            flags |= FLAG_RESPONSES;
            if m.response_heads {
                flags |= FLAG_RESPONSE_HEADS;
            }
        }
        if m.filters_addrs() {
            flags |= FLAG_ADDR_FILTER;
        }
        if m.sticky_sampling {
            flags |= FLAG_STICKY_SAMPLING;
        }
        if m.payload_records {
            flags |= FLAG_PAYLOAD_RECORDS;
        }
        let cfg = MirrorConfig {
            mirror_ifindex,
            flags,
            sample_ppm: m.sample_ppm,
            keep_admitted_ppm: SAMPLE_ALL,
            whole_responses_ppm: m.whole_responses_ppm,
            _pad: 0,
        };
        config_map(&mut self.ebpf)?
            .set(0, cfg, 0)
            .map_err(CaptureError::map(MAP_CONFIG))
    }

    /// Adds `ip` to the live addresses (or removes it), while the program runs.
    pub fn set_live_addr(&mut self, ip: IpAddr, live: bool) -> Result<()> {
        let mut addrs: HashMap<_, AddrKey, u8> =
            HashMap::try_from(map(&mut self.ebpf, MAP_LIVE_ADDRS)?)
                .map_err(CaptureError::map(MAP_LIVE_ADDRS))?;
        let key = AddrKey::from_ip(ip);
        if live {
            if addrs.keys().count() >= MAX_LIVE_ADDRS as usize {
                return Err(CaptureError::TooManyAddrs {
                    max: MAX_LIVE_ADDRS,
                });
            }
            addrs
                .insert(key, 1, 0)
                .map_err(CaptureError::map(MAP_LIVE_ADDRS))?;
        } else if let Err(e) = addrs.remove(&key) {
            log::debug!("removing live address {ip}: {e}");
        }
        Ok(())
    }

    /// Detaches one hook; the others keep cloning. A clsact filter is removed over netlink in
    /// the calling thread's namespace: call it in the interface's.
    pub fn detach(&mut self, key: &str, hook: Hook) -> Result<()> {
        if let Some(id) = self.links.remove(&(key.to_string(), hook)) {
            program(&mut self.ebpf)?
                .detach(id)
                .map_err(|source| CaptureError::Detach {
                    iface: key.to_string(),
                    hook: hook.name(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The ring buffer of response-head records, to be read by one owner.
    pub fn take_response_heads(&mut self) -> Result<RingBuf<MapData>> {
        RingBuf::try_from(take_map(&mut self.ebpf, MAP_RESPONSE_HEADS)?)
            .map_err(CaptureError::map(MAP_RESPONSE_HEADS))
    }

    /// The heartbeat map, to be refreshed by one owner.
    pub fn take_heartbeat(&mut self) -> Result<Array<MapData, Heartbeat>> {
        Array::try_from(take_map(&mut self.ebpf, MAP_HEARTBEAT)?)
            .map_err(CaptureError::map(MAP_HEARTBEAT))
    }

    /// The list of connections whose responses are cloned whole, to be filled by one owner.
    pub fn take_full_responses(&mut self) -> Result<super::heads::FullResponses> {
        let map = HashMap::try_from(take_map(&mut self.ebpf, MAP_FULL_RESPONSES)?)
            .map_err(CaptureError::map(MAP_FULL_RESPONSES))?;
        Ok(super::heads::FullResponses::new(map))
    }

    /// Changes the share of new connections mirrored, and of admitted ones kept, while the
    /// program runs.
    pub fn set_sampling(&mut self, new_ppm: u32, keep_admitted_ppm: u32) -> Result<()> {
        let mut config = config_map(&mut self.ebpf)?;
        let mut cfg = config.get(&0, 0).map_err(CaptureError::map(MAP_CONFIG))?;
        if cfg.flags & FLAG_ENABLED == 0 {
            return Ok(());
        }
        cfg.sample_ppm = new_ppm;
        cfg.keep_admitted_ppm = keep_admitted_ppm;
        config.set(0, cfg, 0).map_err(CaptureError::map(MAP_CONFIG))
    }

    /// Stops all cloning at once, before links are detached.
    pub fn disable(&mut self) -> Result<()> {
        config_map(&mut self.ebpf)?
            .set(0, MirrorConfig::default(), 0)
            .map_err(CaptureError::map(MAP_CONFIG))
    }

    /// Attaches to one hook of `iface` in the calling thread's namespace, remembered as `key`.
    /// Returns the mode actually used.
    pub fn attach(
        &mut self,
        iface: &str,
        key: &str,
        hook: Hook,
        mode: AttachMode,
    ) -> Result<AttachMode> {
        let prog = program(&mut self.ebpf)?;
        // Auto tries tcx on every kernel: vendors backport it, so the version says too little.
        let use_tcx = mode != AttachMode::Netlink;
        if use_tcx {
            match prog.attach_with_options(
                iface,
                hook.tc(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => {
                    self.links.insert((key.to_string(), hook), id);
                    return Ok(AttachMode::Tcx);
                }
                Err(source) if mode == AttachMode::Tcx => {
                    return Err(CaptureError::Tcx {
                        iface: iface.to_string(),
                        hook: hook.name(),
                        source: Box::new(source),
                    })
                }
                Err(e) => log::info!(
                    "this kernel refused a tcx link on {iface} {} ({e}); attaching a clsact filter",
                    hook.name()
                ),
            }
        }
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            // Already present is fine; anything else shows up in the attach error below.
            log::debug!("adding clsact to {iface}: {e}");
        }
        let id = prog
            .attach_with_options(
                iface,
                hook.tc(),
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|source| CaptureError::Clsact {
                iface: iface.to_string(),
                hook: hook.name(),
                source: Box::new(source),
            })?;
        self.links.insert((key.to_string(), hook), id);
        Ok(AttachMode::Netlink)
    }

    /// The loaded object, for the TLS probes that share its maps.
    pub(super) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(super) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The kernel's id of the loaded program (`bpftool prog show id N`).
    pub fn id(&mut self) -> Result<u32> {
        Ok(program(&mut self.ebpf)?
            .info()
            .map_err(|e| CaptureError::Program(Box::new(e)))?
            .id())
    }

    /// Kernel counters summed over CPUs, indexed by `Counter`.
    pub fn counters(&self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(MAP_COUNTERS)
                .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {MAP_COUNTERS}")))?,
        )
        .map_err(CaptureError::map(MAP_COUNTERS))?;
        let mut out = [0u64; COUNTER_COUNT as usize];
        for c in Counter::ALL {
            out[c as usize] = counters
                .get(&(c as u32), 0)
                .map_err(CaptureError::map(MAP_COUNTERS))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Time the program spent mirroring in the live path, summed over CPUs (`MAP_WORK_NS`).
    pub fn work(&self) -> Result<std::time::Duration> {
        let work: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(MAP_WORK_NS)
                .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {MAP_WORK_NS}")))?,
        )
        .map_err(CaptureError::map(MAP_WORK_NS))?;
        let ns = work
            .get(&0, 0)
            .map_err(CaptureError::map(MAP_WORK_NS))?
            .iter()
            .sum();
        Ok(std::time::Duration::from_nanos(ns))
    }
}

/// Forwards the kernel's log records to this process's logger for the rest of its life.
fn spawn_log_forwarder(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    use std::os::fd::AsRawFd;
    std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || loop {
            let mut pfd = libc::pollfd {
                fd: logger.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 500) };
            logger.flush();
        })
        .map_err(CaptureError::io("starting the eBPF log thread"))?;
    Ok(())
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("program {PROGRAM_NAME}")))?
        .try_into()
        .map_err(|e| CaptureError::Program(Box::new(e)))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {name}")))
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {name}")))
}

fn config_map(ebpf: &mut Ebpf) -> Result<Array<&mut aya::maps::MapData, MirrorConfig>> {
    Array::try_from(map(ebpf, MAP_CONFIG)?).map_err(CaptureError::map(MAP_CONFIG))
}
