//! What can go wrong in the capture stage, typed so that the binary can name the fix (see
//! `main.rs`) and callers can tell a missing privilege from a missing interface.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use super::rtnl::RtnlError;

/// The kernel library's errors are boxed: they are large, and rare.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("missing capabilities {}", .missing.join(", "))]
    MissingCapabilities { missing: Vec<&'static str> },
    #[error("nothing to attach to")]
    NothingToAttach,
    #[error("interface {iface:?} does not exist in this network namespace")]
    NoSuchInterface { iface: String },
    #[error("interface {iface:?} has link type {hw}, not Ethernet or loopback")]
    NotEthernet { iface: String, hw: u16 },
    #[error("interface {iface:?} is already mirrored by another mirror-agent (pid {pid})")]
    InterfaceBusy { iface: String, pid: String },
    #[error("lock file {}", .path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no route to pod IP {ip} in this network namespace")]
    NoRouteToPod {
        ip: IpAddr,
        #[source]
        source: RtnlError,
    },
    #[error("{ip} is an address of this host, not a pod behind a veth")]
    HostAddress { ip: IpAddr },
    #[error(
        "pod IP {ip} is reached via gateway {gateway} on {iface}, so it is not a pod on this node"
    )]
    PodNotLocal {
        ip: IpAddr,
        gateway: IpAddr,
        iface: String,
    },
    #[error(transparent)]
    PodNetns(#[from] super::netns::NotFound),
    #[error("the route to {ip} names no interface")]
    RouteWithoutInterface { ip: IpAddr },
    /// A link or route operation the kernel refused (creating the veth pair, a route lookup).
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    /// A socket or interface call on `what`.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("creating the mirror namespace (unshare CLONE_NEWNET)")]
    Namespace(#[source] io::Error),
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// Loading failed on a kernel that charges BPF maps to a memlock limit the agent could not
    /// raise (before 5.11, without `CAP_SYS_RESOURCE`).
    #[error(
        "loading the eBPF object on kernel {} with a memlock limit of {}",
        .kernel.map_or("(unknown)".to_string(), |k| k.to_string()),
        super::memlock::human(*.limit)
    )]
    Memlock {
        kernel: Option<super::memlock::Kernel>,
        limit: u64,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the kernel rejected the TC program")]
    Rejected(#[source] Box<aya::programs::ProgramError>),
    #[error("tcx attach to {iface} {hook} failed")]
    Tcx {
        iface: String,
        hook: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching a clsact filter to {iface} {hook}")]
    Clsact {
        iface: String,
        hook: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("detaching from {iface} {hook}")]
    Detach {
        iface: String,
        hook: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{given} live ports given; the program matches between 1 and {max}")]
    Ports { given: usize, max: u32 },
    #[error("more than {max} service addresses")]
    TooManyAddrs { max: u32 },
    /// Built without the kernel object (build.rs warned).
    #[error("this agent was built without its eBPF object")]
    NoObject,
    /// The object does not hold what this binary expects: a build mismatch, never the user's.
    #[error("{0} missing from the eBPF object")]
    ObjectIncomplete(String),
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("the TC program")]
    Program(#[source] Box<aya::programs::ProgramError>),
    #[error("TLS probes: {what}")]
    Tls {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// None of the ways to learn a TLS call's socket loaded; each one's failure is named.
    #[error("TLS probes: nothing tells which socket a TLS call uses (the kernel needs 6.5+ for the sock tracepoints, CONFIG_KPROBES, or BTF trampolines for fentry): sock tracepoints: {tracepoints}; kprobes: {kprobes}; fentry: {fentry}")]
    TlsNoSocketProbe {
        tracepoints: String,
        kprobes: String,
        fentry: String,
    },
    #[error("the capture thread exited early")]
    ThreadExited,
    #[error("the capture is stopping")]
    Stopping,
}

impl CaptureError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> CaptureError {
        let what = what.into();
        move |source| CaptureError::Io { what, source }
    }

    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
        move |source| CaptureError::Map {
            map,
            source: Box::new(source),
        }
    }

    /// Why a pod could not be attached, for the `mirror_pod_attach_failures` counter.
    pub fn pod_reason(&self) -> &'static str {
        match self {
            _ if self.permission_denied() => "permission",
            CaptureError::PodNetns(_) => "netns_not_found",
            CaptureError::NoRouteToPod { .. }
            | CaptureError::PodNotLocal { .. }
            | CaptureError::HostAddress { .. }
            | CaptureError::RouteWithoutInterface { .. } => "no_local_route",
            CaptureError::InterfaceBusy { .. } => "interface_busy",
            CaptureError::Io { .. } if self.to_string().contains("network namespace") => {
                "netns_unenterable"
            }
            _ => "other",
        }
    }

    /// True when the kernel said no for want of a privilege.
    pub fn permission_denied(&self) -> bool {
        let kind = match self {
            CaptureError::Netlink(e) => Some(e.kind()),
            CaptureError::Io { source, .. } | CaptureError::Namespace(source) => {
                Some(source.kind())
            }
            _ => None,
        };
        kind == Some(io::ErrorKind::PermissionDenied)
    }
}

pub type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// An error and its causes on one line, "what: why: why", for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
