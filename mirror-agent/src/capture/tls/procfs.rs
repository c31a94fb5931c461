//! What `/proc` tells of the processes whose TLS is read: the TLS libraries they map and the
//! network namespace they are in.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A TLS library mapped by a process: the path to open it by (through the process's root, so
/// that a container's file is found from the host), and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    pub path: PathBuf,
    /// Device and inode: a uprobe binds to the file, so each file is attached once.
    pub id: (u64, u64),
}

/// The OpenSSL `libssl` files process `pid` maps (1.1 and 3.x; BoringSSL and others built
/// into a binary have no such file). A file replaced since it was mapped (a package upgrade
/// under a running server) is reached through `/proc/PID/map_files/`, which still opens the
/// inode the process runs.
pub fn libssl_of(pid: u32) -> Vec<Library> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out: Vec<Library> = Vec::new();
    for m in mapped_files(&maps) {
        let file = m.path.rsplit('/').next().unwrap_or("");
        if !file.starts_with("libssl.so") {
            continue;
        }
        let path = if m.deleted {
            PathBuf::from(format!("/proc/{pid}/map_files/{}", m.range))
        } else {
            PathBuf::from(format!("/proc/{pid}/root{}", m.path))
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if !out.iter().any(|l| l.id == id) {
            out.push(Library { path, id });
        }
    }
    out
}

/// A file mapping of `/proc/PID/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapped<'a> {
    range: &'a str,
    path: &'a str,
    /// Replaced or removed since it was mapped: the name no longer opens it.
    deleted: bool,
}

fn mapped_files(maps: &str) -> impl Iterator<Item = Mapped<'_>> {
    maps.lines().filter_map(|l| {
        let mut fields = l.splitn(6, ' ');
        let range = fields.next()?;
        let path = fields.nth(4)?.trim_start();
        if !path.starts_with('/') {
            return None;
        }
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        Some(Mapped {
            range,
            path,
            deleted,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_files_are_found_and_deleted_ones_marked() {
        let maps = "7f00-7f01 r--p 00000000 08:01 131 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
                    7f01-7f02 r-xp 00001000 08:01 131 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
                    7f02-7f03 r--p 00000000 08:01 99  /opt/old/libssl.so.1.1 (deleted)\n\
                    7f03-7f04 rw-p 00000000 00:00 0   [heap]\n";
        let found: Vec<_> = mapped_files(maps)
            .map(|m| (m.range, m.path, m.deleted))
            .collect();
        assert_eq!(
            found,
            [
                ("7f00-7f01", "/usr/lib/x86_64-linux-gnu/libssl.so.3", false),
                ("7f01-7f02", "/usr/lib/x86_64-linux-gnu/libssl.so.3", false),
                ("7f02-7f03", "/opt/old/libssl.so.1.1", true),
            ]
        );
        // This test process maps no libssl of its own.
        assert!(libssl_of(std::process::id()).is_empty());
    }
}
