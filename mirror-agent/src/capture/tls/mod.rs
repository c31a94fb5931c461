//! The second capture source: plaintext read by uprobes on OpenSSL's `libssl` in the processes
//! of services that terminate TLS themselves (see `mirror-ebpf`'s `tls.rs`).
//!
//! The probes are attached per process, to the library file it maps (opened through
//! `/proc/PID/root`, so a container's own file): a uprobe scoped to a process puts its
//! breakpoint in that process alone, and every other process mapping the same file (a client
//! on the node, a load generator) runs without a trap. The processes are those given, or those
//! in the network namespace of a pod given; the kernel side also checks them against
//! `TLS_PIDS`. `rescan` finds processes and libraries that appeared since, and detaches from
//! processes that exited.

pub mod procfs;
pub mod streams;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::{UProbeLinkId, UProbeScope};
use aya::programs::{FEntry, KProbe, TracePoint, UProbe};
use aya::Ebpf;
use mirror_common::tls::{
    TlsCounter, MAP_TLS_COUNTERS, MAP_TLS_DATA, MAP_TLS_PIDS, PROG_FREE, PROG_READ_ENTRY,
    PROG_READ_EX_ENTRY, PROG_RETURN, PROG_SOCK_IO, PROG_SOCK_STATE, PROG_TCP_RECV_FENTRY,
    PROG_TCP_SEND_FENTRY, PROG_TCP_SOCK, PROG_WRITE_ENTRY, PROG_WRITE_EX_ENTRY, TLS_COUNTER_COUNT,
};

use super::error::{CaptureError, Result};
use super::netns::Netns;

/// Whose TLS is read.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    /// Ports the processes serve TLS on: connections to them are mirrored.
    pub ports: Vec<u16>,
    /// Processes given by pid.
    pub pids: Vec<u32>,
    /// Pods by address: the processes in their network namespaces.
    pub pods: Vec<IpAddr>,
}

/// The library functions probed: entry program and symbol, and whether a library must have it.
const ENTRIES: [(&str, &str, bool); 4] = [
    (PROG_READ_ENTRY, "SSL_read", true),
    (PROG_WRITE_ENTRY, "SSL_write", true),
    (PROG_READ_EX_ENTRY, "SSL_read_ex", false),
    (PROG_WRITE_EX_ENTRY, "SSL_write_ex", false),
];

/// The TLS probes' state in the agent: what is attached, and to whom it listens.
pub struct TlsCapture {
    cfg: TlsConfig,
    /// Each process read, the library files attached in it and the links to detach when it
    /// is gone.
    attached: HashMap<u32, Attached>,
    /// Files that could not be attached (no symbols, say): not tried again.
    refused: HashSet<(u64, u64)>,
    pids: HashSet<u32>,
    /// The pods' namespaces, found once.
    pods: Vec<(IpAddr, Option<Netns>)>,
}

/// The probes of one process.
#[derive(Default)]
struct Attached {
    libraries: HashSet<(u64, u64)>,
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl TlsCapture {
    /// Loads the probes and the tracepoints. Nothing is read until `rescan` lists processes.
    pub fn start(ebpf: &mut Ebpf, cfg: TlsConfig) -> Result<TlsCapture> {
        for (name, _, _) in ENTRIES {
            uprobe(ebpf, name)?.load().map_err(program_error(name))?;
        }
        for name in [PROG_RETURN, PROG_FREE] {
            uprobe(ebpf, name)?.load().map_err(program_error(name))?;
        }
        ensure_tracefs();
        let tp = tracepoint(ebpf, PROG_SOCK_STATE)?;
        tp.load().map_err(program_error(PROG_SOCK_STATE))?;
        tp.attach("sock", "inet_sock_set_state")
            .map_err(program_error("the sock/inet_sock_set_state tracepoint"))?;
        let how = socket_probes(ebpf)?;
        log::info!("TLS: a call's socket is learned from {how}");
        let pods = cfg.pods.iter().map(|ip| (*ip, None)).collect();
        Ok(TlsCapture {
            cfg,
            attached: HashMap::new(),
            refused: HashSet::new(),
            pids: HashSet::new(),
            pods,
        })
    }

    pub fn ports(&self) -> &[u16] {
        &self.cfg.ports
    }

    /// Finds the selected processes now, attaches to the libraries they map that are not yet
    /// attached, and updates the kernel's list of processes read. Errors about one process or
    /// library are logged and the others go on.
    pub fn rescan(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let mut now: HashSet<u32> = self
            .cfg
            .pids
            .iter()
            .copied()
            .filter(|p| procfs::alive(*p))
            .collect();
        for (ip, ns) in &mut self.pods {
            if ns.is_none() {
                match super::netns::find_by_addr(*ip) {
                    Ok(found) => *ns = Some(found),
                    Err(e) => log::debug!("TLS: {e}"),
                }
            }
            if let Some(ns) = ns {
                now.extend(procfs::processes_in_netns(ns.inode()));
            }
        }
        for pid in &now {
            self.attach_process(ebpf, *pid);
        }
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|p| !now.contains(p))
            .copied()
            .collect();
        for pid in gone {
            if let Some(a) = self.attached.remove(&pid) {
                detach(ebpf, a.links);
            }
        }
        let mut pids: aya::maps::HashMap<_, u32, u8> = aya::maps::HashMap::try_from(
            ebpf.map_mut(MAP_TLS_PIDS)
                .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {MAP_TLS_PIDS}")))?,
        )
        .map_err(CaptureError::map(MAP_TLS_PIDS))?;
        for gone in self.pids.difference(&now) {
            let _ = pids.remove(gone);
        }
        for new in now.difference(&self.pids) {
            pids.insert(new, 1, 0)
                .map_err(CaptureError::map(MAP_TLS_PIDS))?;
            log::info!("TLS: reading the TLS calls of pid {new}");
        }
        self.pids = now;
        Ok(())
    }

    /// Attaches the probes to the libssl files `pid` maps that are not attached in it yet.
    /// A uprobe scoped to one process puts its breakpoint in that process only: the node's
    /// other processes that map the same file (clients, load generators) run untouched.
    fn attach_process(&mut self, ebpf: &mut Ebpf, pid: u32) {
        let Some(scope) = std::num::NonZeroU32::new(pid) else {
            return;
        };
        for lib in procfs::libssl_of(pid) {
            let done = self
                .attached
                .get(&pid)
                .is_some_and(|a| a.libraries.contains(&lib.id));
            if done || self.refused.contains(&lib.id) {
                continue;
            }
            match attach_library(ebpf, &lib.path, UProbeScope::OneProcess(scope)) {
                Ok(links) => {
                    log::info!(
                        "TLS: attached {} probes to {} in pid {pid}",
                        links.len(),
                        lib.path.display()
                    );
                    let a = self.attached.entry(pid).or_default();
                    a.libraries.insert(lib.id);
                    a.links.extend(links);
                }
                Err(e) => {
                    log::warn!(
                        "TLS: cannot attach to {} (pid {pid}): {}; that process's TLS is not mirrored",
                        lib.path.display(),
                        super::error::chain(&e)
                    );
                    self.refused.insert(lib.id);
                }
            }
        }
    }

    /// Reads the TLS of the processes in this pod's network namespace too, from the next
    /// `rescan` (a pod that `--selector` found).
    pub fn follow_pod(&mut self, ip: IpAddr) {
        if !self.pods.iter().any(|(p, _)| *p == ip) {
            self.pods.push((ip, None));
        }
    }

    /// Stops reading the processes of this pod (it is gone); they leave at the next `rescan`.
    pub fn forget_pod(&mut self, ip: IpAddr) {
        self.pods.retain(|(p, _)| *p != ip);
    }

    /// Processes read now.
    pub fn processes(&self) -> usize {
        self.pids.len()
    }

    /// Library files that could not be attached.
    pub fn refused(&self) -> usize {
        self.refused.len()
    }

    /// Library files attached now, in any process.
    pub fn libraries(&self) -> usize {
        self.attached
            .values()
            .flat_map(|a| a.libraries.iter())
            .collect::<HashSet<_>>()
            .len()
    }
}

/// Every TCP send and receive names its socket; a TLS call's are its connection's. Learned from
/// the first that loads of: the `sock/sock_send_length` and `sock/sock_recv_length` tracepoints
/// (6.5+, a stable format), kprobes on `tcp_sendmsg` and `tcp_recvmsg`, fentry on them (BTF
/// trampolines). Returns which; the error names why each failed.
fn socket_probes(ebpf: &mut Ebpf) -> Result<&'static str> {
    let tracepoints = (|| -> Result<()> {
        let tp = tracepoint(ebpf, PROG_SOCK_IO)?;
        tp.load().map_err(program_error(PROG_SOCK_IO))?;
        for event in ["sock_send_length", "sock_recv_length"] {
            tp.attach("sock", event)
                .map_err(program_error(&format!("the sock/{event} tracepoint")))?;
        }
        Ok(())
    })();
    let Err(tracepoint_error) = tracepoints else {
        return Ok("the sock_send_length/sock_recv_length tracepoints");
    };
    let kprobes = (|| -> Result<()> {
        let kp: &mut KProbe = ebpf
            .program_mut(PROG_TCP_SOCK)
            .ok_or_else(|| CaptureError::ObjectIncomplete(format!("program {PROG_TCP_SOCK}")))?
            .try_into()
            .map_err(program_error(PROG_TCP_SOCK))?;
        kp.load().map_err(program_error(PROG_TCP_SOCK))?;
        for f in ["tcp_sendmsg", "tcp_recvmsg"] {
            kp.attach(f, 0).map_err(program_error(f))?;
        }
        Ok(())
    })();
    let Err(kprobe_error) = kprobes else {
        return Ok("kprobes on tcp_sendmsg/tcp_recvmsg");
    };
    let fentry = (|| -> Result<()> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| CaptureError::Tls {
            what: "no kernel BTF for fentry".into(),
            source: Box::new(aya::programs::ProgramError::Btf(e)),
        })?;
        for (name, f) in [
            (PROG_TCP_SEND_FENTRY, "tcp_sendmsg"),
            (PROG_TCP_RECV_FENTRY, "tcp_recvmsg"),
        ] {
            let fe: &mut FEntry = ebpf
                .program_mut(name)
                .ok_or_else(|| CaptureError::ObjectIncomplete(format!("program {name}")))?
                .try_into()
                .map_err(program_error(name))?;
            fe.load(f, &btf).map_err(program_error(name))?;
            fe.attach().map_err(program_error(name))?;
        }
        Ok(())
    })();
    match fentry {
        Ok(()) => Ok("fentry on tcp_sendmsg/tcp_recvmsg"),
        Err(fentry_error) => Err(CaptureError::TlsNoSocketProbe {
            tracepoints: super::error::chain(&tracepoint_error),
            kprobes: super::error::chain(&kprobe_error),
            fentry: super::error::chain(&fentry_error),
        }),
    }
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut TracePoint> {
    ebpf.program_mut(name)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("program {name}")))?
        .try_into()
        .map_err(program_error(name))
}

/// A tracepoint is found through tracefs. A fresh mount namespace (a container's, or `ip netns
/// exec`'s) may have sysfs without it: it is mounted there, at its usual place, for this
/// namespace only.
fn ensure_tracefs() {
    const AT: &str = "/sys/kernel/tracing";
    if std::path::Path::new(AT).join("events").exists()
        || std::path::Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return;
    }
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, at, fs) = (c("tracefs"), c(AT), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), at.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        log::info!(
            "TLS: mounted tracefs at {AT} in the agent's mount namespace, to find tracepoints"
        );
    } else {
        log::warn!(
            "TLS: no tracefs, and mounting it at {AT} failed ({}); mount tracefs (or \
             debugfs) into the agent",
            std::io::Error::last_os_error()
        );
    }
}

/// The kernel side's counters, by name.
pub fn kernel_counters(ebpf: &Ebpf) -> Result<Vec<(&'static str, u64)>> {
    let map = ebpf
        .map(MAP_TLS_COUNTERS)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {MAP_TLS_COUNTERS}")))?;
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(CaptureError::map(MAP_TLS_COUNTERS))?;
    let mut out = Vec::with_capacity(TLS_COUNTER_COUNT as usize);
    for c in TlsCounter::ALL {
        let n = counters
            .get(&(c as u32), 0)
            .map_err(CaptureError::map(MAP_TLS_COUNTERS))?
            .iter()
            .sum();
        out.push((c.name(), n));
    }
    Ok(out)
}

/// The plaintext ring, to be read by one owner.
pub fn take_ring(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>> {
    let map = ebpf
        .take_map(MAP_TLS_DATA)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("map {MAP_TLS_DATA}")))?;
    RingBuf::try_from(map).map_err(CaptureError::map(MAP_TLS_DATA))
}

/// Attaches the probes to one library file. Returns how many were attached.
/// The probes on one library file, in `scope`; on an error, what was attached is detached.
fn attach_library(
    ebpf: &mut Ebpf,
    path: &std::path::Path,
    scope: UProbeScope,
) -> Result<Vec<(&'static str, UProbeLinkId)>> {
    let mut links = Vec::new();
    let attached = (|| -> Result<()> {
        for (name, symbol, required) in ENTRIES {
            match uprobe(ebpf, name)?.attach(symbol, path, scope) {
                Ok(link) => links.push((name, link)),
                // OpenSSL before 1.1.1 has no `_ex` forms.
                Err(_) if !required => continue,
                Err(e) => return Err(program_error(symbol)(e)),
            }
            let link = uprobe(ebpf, PROG_RETURN)?
                .attach(symbol, path, scope)
                .map_err(program_error(symbol))?;
            links.push((PROG_RETURN, link));
        }
        let link = uprobe(ebpf, PROG_FREE)?
            .attach("SSL_free", path, scope)
            .map_err(program_error("SSL_free"))?;
        links.push((PROG_FREE, link));
        Ok(())
    })();
    match attached {
        Ok(()) => Ok(links),
        Err(e) => {
            detach(ebpf, links);
            Err(e)
        }
    }
}

/// Detaches uprobe links; a link the kernel already dropped is no error.
fn detach(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (name, link) in links {
        if let Ok(p) = uprobe(ebpf, name) {
            let _ = p.detach(link);
        }
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .ok_or_else(|| CaptureError::ObjectIncomplete(format!("program {name}")))?
        .try_into()
        .map_err(program_error(name))
}

fn program_error<E: Into<aya::programs::ProgramError>>(
    what: &str,
) -> impl FnOnce(E) -> CaptureError + '_ {
    move |e| CaptureError::Tls {
        what: what.to_string(),
        source: Box::new(e.into()),
    }
}

/// The reader thread's side: the plaintext ring, drained into segments between ring blocks.
pub struct TlsSource {
    ring: RingBuf<MapData>,
    streams: streams::TlsStreams,
    stats: std::sync::Arc<streams::TlsStats>,
}

/// Records taken from the ring at one look at most, so that the wire's clones wait little.
const RECORDS_PER_DRAIN: usize = 4096;

impl TlsSource {
    pub fn new(
        ring: RingBuf<MapData>,
        ports: Vec<u16>,
        stats: std::sync::Arc<streams::TlsStats>,
    ) -> Self {
        let offset = super::heads::realtime_offset_ns();
        TlsSource {
            ring,
            streams: streams::TlsStreams::new(ports, offset),
            stats,
        }
    }

    /// Appends the segments of the records waiting to `out`. Returns how many records were read.
    pub fn drain(&mut self, out: &mut Vec<crate::segment::Segment>) -> usize {
        use mirror_common::tls::ChunkHead;
        const HEAD: usize = std::mem::size_of::<ChunkHead>();
        let mut n = 0;
        while n < RECORDS_PER_DRAIN {
            let Some(item) = self.ring.next() else {
                break;
            };
            n += 1;
            let bytes: &[u8] = &item;
            if bytes.len() < HEAD {
                self.stats
                    .malformed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            // SAFETY: at least HEAD bytes, and ChunkHead is plain data.
            let head: ChunkHead = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            match bytes.get(HEAD..HEAD + head.len as usize) {
                Some(data) => self.streams.record(&head, data, &self.stats, out),
                None => {
                    self.stats
                        .malformed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        n
    }
}
