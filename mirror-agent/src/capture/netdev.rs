//! Interface helpers for the capture stage: lookups, the mirror veth pair, and per-interface locks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::error::{CaptureError, Result};

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
    ifindex(name).map_err(|_| CaptureError::NoSuchInterface {
        iface: name.to_string(),
    })?;
    let hw = hw_type(name).map_err(CaptureError::io(format!("reading the link type of {name}")))?;
    match hw {
        libc::ARPHRD_ETHER => Ok(LinkKind::Ethernet),
        libc::ARPHRD_LOOPBACK => Ok(LinkKind::Loopback),
        _ => Err(CaptureError::NotEthernet {
            iface: name.to_string(),
            hw,
        }),
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

/// Keeps IPv6 quiet on `name` (no address, so no router solicitations or DAD) through
/// rtnetlink: `/proc/sys` is read-only in containers. Call it before the link is up.
pub fn quiet_ipv6(name: &str) -> Result<()> {
    let index = ifindex(name).map_err(CaptureError::io(format!("finding {name}")))?;
    Ok(super::rtnl::quiet_ipv6(name, index)?)
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

/// Deletes a link if it still exists (a veth also goes when its peer's namespace dies).
pub fn delete_link(name: &str) {
    if let Ok(index) = ifindex(name) {
        if let Err(e) = super::rtnl::delete_link(name, index) {
            log::debug!("{}", super::error::chain(&e));
        }
    }
}

/// Removes classic TC filters of ours left on `iface` by an agent that died (netlink attach
/// survives its process). Only called while holding the interface's lock, so no live agent owns
/// them.
pub fn remove_stale_filters(iface: &str, program_name: &str) {
    use aya::programs::tc::{qdisc_detach_program, TcAttachType, TcError};
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        match qdisc_detach_program(iface, hook, program_name) {
            Ok(()) => log::warn!("removed a stale {program_name} filter on {iface} {hook:?}"),
            // No clsact qdisc, or none of our filters: nothing was left behind.
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::debug!("looking for stale filters on {iface} {hook:?}: {e}"),
        }
    }
}

/// An exclusive claim on one interface of one network namespace, held for the agent's life and
/// released by the kernel when the process dies, however it dies.
pub struct TargetLock {
    _file: File,
    path: PathBuf,
}

impl TargetLock {
    pub fn acquire(dir: &std::path::Path, iface: &str) -> Result<TargetLock> {
        let lock_error = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| CaptureError::Lock { path, source }
        };
        std::fs::create_dir_all(dir).map_err(lock_error(dir))?;
        // The calling thread's: it may be in a pod's namespace (see `netns`).
        let netns = std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        let path = dir.join(format!("{netns}-{iface}.lock"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(lock_error(&path))?;
        // SAFETY: valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(CaptureError::InterfaceBusy {
                iface: iface.to_string(),
                pid: owner.trim().to_string(),
            });
        }
        file.set_len(0)
            .and_then(|()| write!(file, "{}", std::process::id()))
            .map_err(lock_error(&path))?;
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
    use netlink_packet_route::route::RouteType;
    let route =
        super::rtnl::route_get(ip).map_err(|source| CaptureError::NoRouteToPod { ip, source })?;
    let dev = out_iface(ip, &route)?;
    if dev == "lo" || route.kind == RouteType::Local {
        return Err(CaptureError::HostAddress { ip });
    }
    if let Some(gateway) = route.gateway {
        return Err(CaptureError::PodNotLocal {
            ip,
            gateway,
            iface: dev,
        });
    }
    Ok(dev)
}

/// The interface that packets to `ip` leave through (`lo` for this host's own addresses).
pub fn route_iface(ip: std::net::IpAddr) -> Result<String> {
    out_iface(ip, &super::rtnl::route_get(ip)?)
}

/// The name of the interface `route` (to `ip`) leaves through.
fn out_iface(ip: std::net::IpAddr, route: &super::rtnl::Route) -> Result<String> {
    let index = route
        .oif
        .ok_or(CaptureError::RouteWithoutInterface { ip })?;
    ifname(index).map_err(CaptureError::io(format!("naming interface {index}")))
}

/// The name of interface `index` in the calling thread's network namespace.
pub fn ifname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}
