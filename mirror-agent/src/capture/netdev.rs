//! Interface helpers for the capture stage: lookups, the mirror veth pair, and per-interface locks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// ifindex of `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

/// Link types the program can parse: both carry an Ethernet header at TC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Ethernet,
    /// `lo`: every packet crosses its egress and then its ingress.
    Loopback,
}

/// Checks that `name` exists and is an Ethernet or loopback interface (the program parses
/// Ethernet headers, which loopback skbs carry too).
pub fn check_target_iface(name: &str) -> Result<LinkKind> {
    ifindex(name).map_err(|_| {
        anyhow!(
            "interface {name:?} does not exist in this network namespace \
             (list them with `ip link`; for a pod, use --pod-ip or run in the node's namespace)"
        )
    })?;
    let hw = hw_type(name).with_context(|| format!("reading the link type of {name}"))?;
    match hw {
        libc::ARPHRD_ETHER => Ok(LinkKind::Ethernet),
        libc::ARPHRD_LOOPBACK => Ok(LinkKind::Loopback),
        _ => bail!(
            "interface {name:?} has link type {hw}, not Ethernet: mirror-agent attaches to \
             Ethernet interfaces such as a pod's veth or eth0, or to lo"
        ),
    }
}

fn hw_type(name: &str) -> io::Result<u16> {
    let sock = DgramSocket::new()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(sock.0, libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Sets IFF_UP on `name` in the calling thread's network namespace.
pub fn set_up(name: &str) -> io::Result<()> {
    let sock = DgramSocket::new()?;
    let mut req = ifreq(name)?;
    // SAFETY: valid ifreq, flags read then written back.
    unsafe {
        if libc::ioctl(sock.0, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        if libc::ioctl(sock.0, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Turns IPv6 off on `name` (or on `default` for interfaces created later), so that the mirror
/// interface sends no router solicitations. Kernels without IPv6 have nothing to turn off.
pub fn disable_ipv6(name: &str) -> io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

struct DgramSocket(i32);

impl DgramSocket {
    fn new() -> io::Result<Self> {
        // SAFETY: plain socket call, checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(DgramSocket(fd))
        }
    }
}

impl Drop for DgramSocket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Runs an iproute2 command (`ip` or `tc`) and turns a failure into an error that says what ran.
pub fn iproute2(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow!(
                "`{program}` was not found: install iproute2 (Debian: apt-get install iproute2)"
            )
        } else {
            anyhow!("running `{program} {}`: {e}", args.join(" "))
        }
    })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the veth pair: `host` in the current namespace, `peer` in the namespace of thread
/// `peer_tid`. Both ends get the largest MTU so that no clone is too big for the pair.
pub fn create_veth(host: &str, peer: &str, peer_tid: i32) -> Result<()> {
    let tid = peer_tid.to_string();
    iproute2(
        "ip",
        &[
            "link", "add", "name", host, "mtu", "65535", "type", "veth", "peer", "name", peer,
            "mtu", "65535", "netns", &tid,
        ],
    )
    .context("creating the mirror veth pair")?;
    Ok(())
}

/// Deletes a link if it still exists (a veth also goes when its peer's namespace dies).
pub fn delete_link(name: &str) {
    if ifindex(name).is_ok() {
        if let Err(e) = iproute2("ip", &["link", "del", "dev", name]) {
            log::debug!("removing {name}: {e:#}");
        }
    }
}

/// Removes classic TC filters of ours left on `iface` by an agent that died (netlink attach
/// survives its process). Only called while holding the interface's lock, so no live agent owns
/// them. Returns how many were removed.
pub fn remove_stale_filters(iface: &str, program_name: &str) -> usize {
    let mut removed = 0;
    for hook in ["ingress", "egress"] {
        let Ok(out) = iproute2("tc", &["filter", "show", "dev", iface, hook]) else {
            continue;
        };
        for line in out.lines().filter(|l| l.contains(program_name)) {
            let pref = line
                .split_whitespace()
                .skip_while(|w| *w != "pref")
                .nth(1)
                .map(str::to_owned);
            if let Some(pref) = pref {
                match iproute2("tc", &["filter", "del", "dev", iface, hook, "pref", &pref]) {
                    Ok(_) => {
                        log::warn!("removed a stale {program_name} filter on {iface} {hook}");
                        removed += 1;
                    }
                    Err(e) => log::warn!("could not remove a stale filter on {iface}: {e:#}"),
                }
            }
        }
    }
    removed
}

/// An exclusive claim on one interface of one network namespace, held for the agent's life and
/// released by the kernel when the process dies, however it dies.
pub struct TargetLock {
    _file: File,
    path: PathBuf,
}

impl TargetLock {
    pub fn acquire(dir: &std::path::Path, iface: &str) -> Result<TargetLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the lock directory {}", dir.display()))?;
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        let path = dir.join(format!("{netns}-{iface}.lock"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "interface {iface:?} is already mirrored by another mirror-agent (pid {}): stop \
                 it first, or give one agent all the ports (--port 80,8080)",
                owner.trim()
            );
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(TargetLock { _file: file, path })
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The host-side interface that routes to a pod's address, as a CNI sets it up: a direct route
/// over the pod's veth. Errors name what was found instead.
pub fn iface_for_pod(ip: std::net::IpAddr) -> Result<String> {
    let out = iproute2("ip", &["-j", "route", "get", &ip.to_string()])
        .with_context(|| format!("no route to pod IP {ip} in this network namespace (is the agent in the node's namespace, hostNetwork: true?)"))?;
    let routes: serde_json::Value =
        serde_json::from_str(&out).context("parsing `ip -j route get`")?;
    let route = routes
        .get(0)
        .ok_or_else(|| anyhow!("no route to pod IP {ip}"))?;
    let dev = route["dev"]
        .as_str()
        .ok_or_else(|| anyhow!("the route to {ip} names no interface"))?;
    if dev == "lo" || route["type"].as_str() == Some("local") {
        bail!(
            "{ip} is an address of this host, not a pod behind a veth: attach with --iface instead"
        );
    }
    if let Some(gw) = route["gateway"].as_str() {
        bail!("pod IP {ip} is reached via gateway {gw} on {dev}, so it is not a pod on this node: run the agent on the pod's node");
    }
    Ok(dev.to_string())
}
