//! Which cgroups the live service runs in, where `cpu.pressure` is: the cgroup v2 directories of
//! the processes that listen on a mirrored port (on a mirrored address, when addresses are
//! given), found through `/proc`; and those of the selected pods, found by UID in the node's
//! cgroup tree (the DaemonSet mounts it at `HOST_CGROUP`), for an agent that cannot see the
//! pods' processes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the live service's CPU pressure is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The `cpu.pressure` files of its cgroups.
    Cgroups(Vec<PathBuf>),
    /// No cgroup of its own could be read: no listener found, cgroup v1 only, or a process in
    /// the root cgroup. The node's PSI stands for it. Says why.
    Node(&'static str),
}

/// Where the DaemonSet mounts the node's cgroup tree (a container sees only its own).
pub const HOST_CGROUP: &str = "/host/sys/fs/cgroup";

/// What identifies the live service: its ports, and its addresses and pods when known.
#[derive(Clone, Debug, Default)]
pub struct LiveService {
    pub ports: Vec<u16>,
    pub addrs: Vec<IpAddr>,
    /// The selected pods' UIDs, by address.
    pub pod_uids: Vec<(IpAddr, String)>,
}

impl LiveService {
    /// Looks through `/proc` and the cgroup tree now.
    pub fn find(&self) -> Found {
        let mount = cgroup2_mount();
        let listeners = self.listening_processes();
        let mut dirs = BTreeSet::new();
        if let Some(mount) = &mount {
            let own = cgroup_of(std::process::id());
            dirs.extend(
                listeners
                    .iter()
                    .filter_map(|p| cgroup_of(*p))
                    .filter(|c| Some(c) != own.as_ref())
                    .filter_map(|c| cgroup_dir(mount, &c)),
            );
        }
        let roots = [Some(PathBuf::from(HOST_CGROUP)), mount.clone()];
        for (_, uid) in &self.pod_uids {
            dirs.extend(roots.iter().flatten().find_map(|r| pod_cgroup(r, uid)));
        }
        let files: Vec<PathBuf> = dirs
            .into_iter()
            .map(|d| d.join("cpu.pressure"))
            .filter(|f| f.exists())
            .collect();
        if !files.is_empty() {
            return Found::Cgroups(files);
        }
        Found::Node(if mount.is_none() && !Path::new(HOST_CGROUP).exists() {
            "no cgroup v2 hierarchy is mounted (cgroup v1)"
        } else if self.pod_uids.is_empty() && listeners.is_empty() {
            "no process found listening on a mirrored port"
        } else {
            "the live processes are in the root cgroup or the agent's own, or their cgroups have no cpu.pressure"
        })
    }

    /// Processes holding a socket that listens on a mirrored port (and address), other than
    /// this one. Namespaces are read once each, through one of their processes.
    fn listening_processes(&self) -> Vec<u32> {
        let mut by_netns: HashMap<u64, Vec<u32>> = HashMap::new();
        for pid in all_pids() {
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                by_netns.entry(m.ino()).or_default().push(pid);
            }
        }
        let me = std::process::id();
        let mut found = Vec::new();
        for pids in by_netns.values() {
            let Some(&first) = pids.first() else { continue };
            let local = if self.addrs.is_empty() {
                Vec::new()
            } else {
                local_addrs(first)
            };
            let inodes = listening_inodes(first, &self.ports, &self.addrs, &local);
            if inodes.is_empty() {
                continue;
            }
            found.extend(
                pids.iter()
                    .copied()
                    .filter(|p| *p != me && holds_any(*p, &inodes)),
            );
        }
        found
    }
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Inodes of the sockets listening on one of `ports` in the namespace of `pid`, bound to one
/// of `addrs` (or to a wildcard in a namespace that has one of them, `local`); any address when
/// `addrs` is empty.
fn listening_inodes(pid: u32, ports: &[u16], addrs: &[IpAddr], local: &[IpAddr]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for l in parse_listeners(&text) {
            let addr_ok = addrs.is_empty()
                || addrs.contains(&l.addr)
                || (l.addr.is_unspecified() && local.iter().any(|a| addrs.contains(a)));
            if ports.contains(&l.port) && addr_ok {
                inodes.insert(l.inode);
            }
        }
    }
    inodes
}

#[derive(Debug, PartialEq, Eq)]
struct Listener {
    addr: IpAddr,
    port: u16,
    inode: u64,
}

/// The LISTEN sockets (state 0A) of a `/proc/net/tcp` or `tcp6` table.
fn parse_listeners(text: &str) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (addr, port) = f.get(1)?.split_once(':')?;
            Some(Listener {
                addr: hex_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// An address as `/proc/net/tcp*` writes it: 32-bit words in host (little-endian) order.
fn hex_addr(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// The addresses of `pid`'s network namespace: IPv4 from the routing trie's local entries,
/// IPv6 from `if_inet6`.
fn local_addrs(pid: u32) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(trie) = std::fs::read_to_string(format!("/proc/{pid}/net/fib_trie")) {
        let mut last: Option<IpAddr> = None;
        for line in trie.lines() {
            let t = line.trim();
            if let Some(a) = t.strip_prefix("|-- ") {
                last = a.parse().ok();
            } else if t.contains("host LOCAL") {
                out.extend(last);
            }
        }
    }
    if let Ok(v6) = std::fs::read_to_string(format!("/proc/{pid}/net/if_inet6")) {
        out.extend(v6.lines().filter_map(|l| {
            let hex = l.split_whitespace().next()?;
            let bytes: Vec<u8> = (0..16)
                .map(|i| u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok())
                .collect::<Option<_>>()?;
            Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?))
        }));
    }
    out
}

/// Whether `pid` has an open file that is one of these sockets.
fn holds_any(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        })
        .any(|i| inodes.contains(&i))
}

/// The cgroup of a Kubernetes pod by its UID, as the kubelet names it: `pod<uid>` (cgroupfs
/// driver) or `kubepods-<qos>-pod<uid with _>.slice` (systemd driver), within the kubelet's
/// directories (`kubepods…`, its QoS classes) at most four levels under `root`.
fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let (plain, slice) = (
        format!("pod{uid}"),
        format!("pod{}.slice", uid.replace('-', "_")),
    );
    let mut level = vec![root.to_path_buf()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name == plain || name.ends_with(&slice) {
                    return Some(e.path());
                }
                let kubelets = name.contains("kubepods")
                    || ["burstable", "besteffort", "kubelet.slice"].contains(&&*name);
                if kubelets && e.path().is_dir() {
                    next.push(e.path());
                }
            }
        }
        level = next;
    }
    None
}

/// The cgroup v2 path of `pid` (`0::/path` in `/proc/PID/cgroup`).
fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The directory of cgroup `path` under the v2 mount; None for the root (the node's PSI) and
/// for paths outside the mount (a cgroup namespace hides them).
fn cgroup_dir(mount: &Path, path: &str) -> Option<PathBuf> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == "..") {
        return None;
    }
    Some(mount.join(rel))
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&info).or_else(mount_private_cgroup2)
}

/// `ip netns exec` (and some container setups) give the agent a fresh `/sys` without the cgroup
/// mounts: the v2 hierarchy is then mounted at the empty `/sys/fs/cgroup`, in the agent's own
/// mount namespace only (never in init's, the host's).
fn mount_private_cgroup2() -> Option<PathBuf> {
    const AT: &str = "/sys/fs/cgroup";
    let ns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
    let in_inits = ns("1").is_ok_and(|init| ns("self").is_ok_and(|own| own == init));
    if in_inits || std::fs::read_dir(AT).ok()?.next().is_some() {
        return None;
    }
    let c = |s: &str| std::ffi::CString::new(s).ok();
    let (src, at) = (c("cgroup2")?, c(AT)?);
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            at.as_ptr(),
            src.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        log::info!(
            "no cgroup v2 mount, and mounting one at {AT} failed ({})",
            std::io::Error::last_os_error()
        );
        return None;
    }
    log::info!("mounted the cgroup v2 hierarchy at {AT} in the agent's mount namespace, to read the live service's CPU pressure");
    Some(PathBuf::from(AT))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (mount, fs) = l.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2")
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_from_the_tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
           1: 0200000A:1F90 0300000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n\
           2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(v4),
            vec![
                Listener {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 8080,
                    inode: 4242
                },
                Listener {
                    addr: "0.0.0.0".parse().unwrap(),
                    port: 80,
                    inode: 4444
                },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(v6),
            vec![Listener {
                addr: "::1".parse().unwrap(),
                port: 8080,
                inode: 5151
            }]
        );
    }

    #[test]
    fn the_v2_mount_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      37 35 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "37 35 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(v1), None);
    }

    #[test]
    fn the_root_and_hidden_cgroups_stand_for_the_node() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(cgroup_dir(mount, "/"), None);
        assert_eq!(cgroup_dir(mount, "/../../kubepods/pod1"), None);
        assert_eq!(
            cgroup_dir(mount, "/kubepods/burstable/pod1/c1"),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/burstable/pod1/c1"))
        );
    }

    #[test]
    fn a_pods_cgroup_is_found_by_uid_with_either_kubelet_driver() {
        let uid = "5f0c1e2a-93b4-4a8e-9a51-0c3d2b7e6f10";
        let root = tempfile::tempdir().unwrap();
        let cgroupfs = root
            .path()
            .join("kubepods/burstable")
            .join(format!("pod{uid}"));
        std::fs::create_dir_all(cgroupfs.join("c1")).unwrap();
        assert_eq!(pod_cgroup(root.path(), uid), Some(cgroupfs));
        let root = tempfile::tempdir().unwrap();
        let systemd = root
            .path()
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        std::fs::create_dir_all(&systemd).unwrap();
        std::fs::create_dir_all(root.path().join("system.slice/pod-lookalike")).unwrap();
        assert_eq!(pod_cgroup(root.path(), uid), Some(systemd));
        assert_eq!(pod_cgroup(root.path(), "another-uid"), None);
    }

    #[test]
    fn this_test_listening_is_found_as_the_live_service() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let svc = LiveService {
            ports: vec![port],
            ..LiveService::default()
        };
        // Other processes of this namespace only: the test's own socket does not count.
        assert!(svc.listening_processes().is_empty());
        let addrs = local_addrs(std::process::id());
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
    }
}
