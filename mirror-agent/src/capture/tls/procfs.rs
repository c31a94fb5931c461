//! What `/proc` tells of the processes whose TLS is read: the TLS libraries they map, the
//! network namespace they are in, and the addresses of one of their sockets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::streams::SocketLookup;

/// A TLS library mapped by a process: the path to open it by (through the process's root, so
/// that a container's file is found from the host), and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    pub path: PathBuf,
    /// Device and inode: a uprobe binds to the file, so each file is attached once.
    pub id: (u64, u64),
}

/// The OpenSSL `libssl` files process `pid` maps (1.1 and 3.x; BoringSSL and others built
/// into a binary have no such file).
pub fn libssl_of(pid: u32) -> Vec<Library> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out: Vec<Library> = Vec::new();
    for path in maps_paths(&maps) {
        let file = path.rsplit('/').next().unwrap_or("");
        if !file.starts_with("libssl.so") {
            continue;
        }
        let through_root = PathBuf::from(format!("/proc/{pid}/root{path}"));
        let Ok(meta) = std::fs::metadata(&through_root) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if !out.iter().any(|l| l.id == id) {
            out.push(Library {
                path: through_root,
                id,
            });
        }
    }
    out
}

/// The file paths of a `/proc/PID/maps` text (a deleted file's, replaced since it was mapped,
/// is left out: it cannot be opened by that name).
fn maps_paths(maps: &str) -> impl Iterator<Item = &str> {
    maps.lines().filter_map(|l| {
        let path = l.splitn(6, ' ').nth(5)?.trim_start();
        (path.starts_with('/') && !path.ends_with(" (deleted)")).then_some(path)
    })
}

/// Processes (by tgid) whose network namespace has this inode.
pub fn processes_in_netns(inode: u64) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode)
        })
        .collect()
}

/// Whether process `pid` still runs.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Socket addresses from `/proc/PID/net/tcp{,6}`, seen from the process's namespace.
#[derive(Default)]
pub struct ProcSockets {
    /// Per process, the sockets last read, by inode: connections are looked up in bulk.
    cache: HashMap<u32, HashMap<u64, (SocketAddr, SocketAddr)>>,
}

impl SocketLookup for ProcSockets {
    fn lookup(&mut self, tgid: u32, fd: i32) -> Option<(SocketAddr, SocketAddr)> {
        let link = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
        let inode: u64 = link
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        if let Some(found) = self.cache.get(&tgid).and_then(|c| c.get(&inode)) {
            return Some(*found);
        }
        // A socket newer than the cache: read the tables again.
        let mut table = HashMap::new();
        for file in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{tgid}/net/{file}")) {
                table.extend(parse_tcp_table(&text));
            }
        }
        let found = table.get(&inode).copied();
        self.cache.insert(tgid, table);
        found
    }
}

/// The sockets of a `/proc/net/tcp` or `tcp6` text: inode → (local, remote).
fn parse_tcp_table(text: &str) -> impl Iterator<Item = (u64, (SocketAddr, SocketAddr))> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local = parse_addr(f.get(1)?)?;
        let remote = parse_addr(f.get(2)?)?;
        let inode = f.get(9)?.parse().ok()?;
        Some((inode, (local, remote)))
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the address is printed as the
/// kernel holds it, in 32-bit words of host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_tables_parse_as_the_kernel_prints_them() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0200007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 20 4 30 10 -1\n";
        let got: Vec<_> = parse_tcp_table(v4).collect();
        assert_eq!(
            got,
            [(
                12345,
                (
                    "127.0.0.1:8080".parse().unwrap(),
                    "127.0.0.2:54321".parse().unwrap()
                )
            )]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 000080FE00000000FF0000020100A8C0:01BB 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let got: Vec<_> = parse_tcp_table(v6).collect();
        assert_eq!(got[0].0, 777);
        assert_eq!(got[0].1 .0, "[fe80::200:ff:c0a8:1]:443".parse().unwrap());
        assert_eq!(got[0].1 .1, "[::1]:50000".parse().unwrap());
    }

    #[test]
    fn mapped_files_are_found_and_deleted_ones_left_out() {
        let maps = "7f00-7f01 r--p 00000000 08:01 131 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
                    7f01-7f02 r-xp 00001000 08:01 131 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
                    7f02-7f03 r--p 00000000 08:01 99  /opt/old/libssl.so.1.1 (deleted)\n\
                    7f03-7f04 rw-p 00000000 00:00 0   [heap]\n";
        let paths: Vec<_> = maps_paths(maps).collect();
        assert_eq!(
            paths,
            [
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/usr/lib/x86_64-linux-gnu/libssl.so.3"
            ]
        );
        // This test process maps no libssl of its own.
        assert!(libssl_of(std::process::id()).is_empty());
    }
}
