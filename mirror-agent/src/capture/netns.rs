//! Network namespaces other than the agent's: a pod's, to attach inside it where a mesh proxy
//! hands the application its plaintext, and the reader's private one.
//!
//! A namespace is held by an open file (`/proc/PID/ns/net` or a bind mount such as
//! `/run/netns/NAME`), and work is done in it on a short-lived thread that `setns` moves there:
//! a network namespace is per thread, so the agent's other threads never change theirs.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where CNI plugins and `ip netns` keep namespace files: containerd and CRI-O put pods'
/// namespaces under `/var/run/netns` (`cni-…`), Docker under `/var/run/docker/netns`.
const NETNS_DIRS: &[&str] = &["/var/run/netns", "/run/netns", "/var/run/docker/netns"];

/// An open network namespace.
#[derive(Clone, Debug)]
pub struct Netns {
    file: Arc<File>,
    /// Device and inode of the namespace: equal for every file that names it.
    id: (u64, u64),
    /// The file it was found through, for logs.
    origin: PathBuf,
}

impl PartialEq for Netns {
    fn eq(&self, other: &Netns) -> bool {
        self.id == other.id
    }
}

impl Eq for Netns {}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Netns {
            file: Arc::new(file),
            id: (meta.dev(), meta.ino()),
            origin: path.to_path_buf(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Netns> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// The namespace's inode number, as `ip netns identify` and `lsns` show it.
    pub fn inode(&self) -> u64 {
        self.id.1
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a thread inside this namespace and returns its result. Sockets that `f`
    /// opens live in this namespace; links and filters it creates stay when it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("mirror-netns".into())
                .spawn_scoped(s, || {
                    // SAFETY: a valid namespace fd; setns moves only this thread.
                    if unsafe { libc::setns(self.fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(f())
                })?;
            handle
                .join()
                .map_err(|_| io::Error::other("a thread in another network namespace panicked"))?
        })
    }
}

/// Why no namespace was found for a pod's address.
#[derive(Debug, thiserror::Error)]
#[error(
    "no network namespace on this node has {ip} on an interface ({searched} searched in \
     /proc/*/ns/net and {dirs}{denied}); is the pod on this node, and can the agent see the \
     node's processes (hostPID) or its netns files (a hostPath mount of /var/run/netns)?",
    dirs = NETNS_DIRS.join(", "),
    denied = if *.denied > 0 { format!("; {} could not be entered", .denied) } else { String::new() }
)]
pub struct NotFound {
    pub ip: IpAddr,
    pub searched: usize,
    pub denied: usize,
}

/// The namespace other than the caller's whose interfaces carry `ip`: a pod's, found from the
/// host by its address rather than by guessing a runtime's naming.
pub fn find_by_addr(ip: IpAddr) -> Result<Netns, NotFound> {
    let own = Netns::current().ok();
    let mut seen = std::collections::HashSet::new();
    if let Some(own) = &own {
        seen.insert(own.id);
    }
    let (mut searched, mut denied) = (0, 0);
    for path in candidates() {
        let Ok(ns) = Netns::open(&path) else {
            continue;
        };
        if !seen.insert(ns.id) {
            continue;
        }
        searched += 1;
        match ns.run(|| has_addr(ip)) {
            Ok(Ok(true)) => return Ok(ns),
            Ok(Ok(false)) => {}
            Ok(Err(_)) | Err(_) => denied += 1,
        }
    }
    Err(NotFound {
        ip,
        searched,
        denied,
    })
}

/// Namespace files: the runtimes' directories first (one file per pod), then every process's.
fn candidates() -> impl Iterator<Item = PathBuf> {
    let in_dirs = NETNS_DIRS
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()));
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    in_dirs.chain(procs)
}

/// Whether an interface of the calling thread's namespace has `ip`.
fn has_addr(ip: IpAddr) -> io::Result<bool> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = false;
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let entry = unsafe { &*at };
        if let Some(a) = sockaddr_ip(entry.ifa_addr) {
            found |= a == ip;
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: getifaddrs's addresses are sockaddr_in or sockaddr_in6 as their family says.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let v4 = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let v6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(v6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_namespace_is_itself_and_has_loopback() {
        let a = Netns::current().unwrap();
        let b = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(a, b);
        assert!(has_addr("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!has_addr("192.0.2.77".parse().unwrap()).unwrap());
    }

    #[test]
    fn an_address_nowhere_names_what_was_searched() {
        let e = find_by_addr("192.0.2.78".parse().unwrap()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("192.0.2.78") && text.contains("hostPID"),
            "{text}"
        );
    }
}
