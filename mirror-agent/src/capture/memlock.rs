//! The memlock limit, which kernels before 5.11 charge BPF maps and programs to (5.11 and later
//! charge the memory cgroup instead). A container runtime's default limit is small (64 KiB
//! under runc and Docker), far below what the agent's maps need, and raising it takes
//! `CAP_SYS_RESOURCE`. The DaemonSet grants that capability for this alone: `prepare` raises the
//! limit on kernels that need it and then gives the capability up, on every kernel, before the
//! agent starts a thread, so that no thread of the agent ever holds it afterwards.

use std::sync::OnceLock;

use aya::util::KernelVersion;
use caps::{CapSet, Capability};

/// What `prepare` found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memlock {
    /// 5.11 or later: BPF memory is the memory cgroup's business.
    NotCharged,
    /// Before 5.11, and the limit is (now) unlimited.
    Unlimited { raised_from: Option<u64> },
    /// Before 5.11, and the limit stays at this many bytes: loading may fail.
    Limited { bytes: u64 },
}

/// The kernel's version as `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The running kernel, if its version can be read.
pub fn kernel() -> Option<Kernel> {
    let code = KernelVersion::current().ok()?.code();
    Some(Kernel {
        major: code >> 16,
        minor: (code >> 8) & 0xff,
    })
}

/// Whether this kernel charges BPF memory to the memlock limit.
pub fn charges_memlock(k: Kernel) -> bool {
    (k.major, k.minor) < (5, 11)
}

static STATE: OnceLock<(Option<Kernel>, Memlock)> = OnceLock::new();

/// Raises the memlock limit where the kernel needs it, then drops `CAP_SYS_RESOURCE`. Call it
/// once, before any thread starts: capabilities belong to each thread, and threads started later
/// inherit the starting thread's. Logs what it did.
pub fn prepare() -> Memlock {
    STATE
        .get_or_init(|| {
            let k = kernel();
            let state = match k {
                Some(k) if !charges_memlock(k) => Memlock::NotCharged,
                _ => raise(),
            };
            match (k, state) {
                (_, Memlock::NotCharged) => {}
                (Some(k), Memlock::Unlimited { raised_from: Some(b) }) => log::info!(
                    "kernel {k} charges BPF maps to the memlock limit: raised it from {} to unlimited",
                    human(b)
                ),
                (_, Memlock::Unlimited { .. }) => {}
                (k, Memlock::Limited { bytes }) => log::warn!(
                    "kernel {} charges BPF maps to the memlock limit, which stays at {}: \
                     loading may fail without CAP_SYS_RESOURCE",
                    k.map_or("(unknown)".to_string(), |k| k.to_string()),
                    human(bytes)
                ),
            }
            drop_sys_resource();
            (k, state)
        })
        .1
}

/// The kernel and limit when loading can fail for the limit: before 5.11 with a finite one.
pub fn limiting() -> Option<(Option<Kernel>, u64)> {
    match STATE.get() {
        Some((k, Memlock::Limited { bytes })) => Some((*k, *bytes)),
        _ => None,
    }
}

fn raise() -> Memlock {
    let current = match getrlimit() {
        Some(l) => l,
        None => return Memlock::Limited { bytes: 0 },
    };
    if current.rlim_cur == libc::RLIM_INFINITY {
        return Memlock::Unlimited { raised_from: None };
    }
    if setrlimit(libc::RLIM_INFINITY, libc::RLIM_INFINITY) {
        return Memlock::Unlimited {
            raised_from: Some(current.rlim_cur),
        };
    }
    // Without the capability the soft limit can still go up to the hard one.
    if current.rlim_max > current.rlim_cur && setrlimit(current.rlim_max, current.rlim_max) {
        if current.rlim_max == libc::RLIM_INFINITY {
            return Memlock::Unlimited {
                raised_from: Some(current.rlim_cur),
            };
        }
        return Memlock::Limited {
            bytes: current.rlim_max,
        };
    }
    Memlock::Limited {
        bytes: current.rlim_cur,
    }
}

fn getrlimit() -> Option<libc::rlimit> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes one rlimit into `l`.
    (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut l) } == 0).then_some(l)
}

fn setrlimit(cur: libc::rlim_t, max: libc::rlim_t) -> bool {
    let l = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: reads one rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &l) == 0 }
}

/// Gives up `CAP_SYS_RESOURCE` for good (effective and permitted): nothing else needs it.
fn drop_sys_resource() {
    let held = caps::has_cap(None, CapSet::Permitted, Capability::CAP_SYS_RESOURCE);
    if !matches!(held, Ok(true)) {
        return;
    }
    for set in [CapSet::Effective, CapSet::Permitted] {
        if let Err(e) = caps::drop(None, set, Capability::CAP_SYS_RESOURCE) {
            log::warn!("could not drop CAP_SYS_RESOURCE from the {set:?} set: {e}");
            return;
        }
    }
    log::info!("CAP_SYS_RESOURCE dropped: only the memlock limit of kernels before 5.11 needs it");
}

/// Bytes as KiB, MiB or GiB.
pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kernels_before_5_11_charge_memlock() {
        let k = |major, minor| Kernel { major, minor };
        assert!(charges_memlock(k(5, 10)));
        assert!(charges_memlock(k(4, 19)));
        assert!(!charges_memlock(k(5, 11)));
        assert!(!charges_memlock(k(6, 1)));
        assert_eq!(k(5, 10).to_string(), "5.10");
        assert_eq!(human(64 << 10), "64 KiB");
        assert_eq!(human(8 << 20), "8 MiB");
    }
}
