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

#[cfg(test)]
mod tests {
    use super::*;

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
