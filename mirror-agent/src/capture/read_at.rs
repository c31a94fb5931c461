//! Where each request was read: on the wire, inside a pod's network namespace, or from a TLS
//! library's calls. A connection comes from one source only, and which one follows from its
//! server address: a `--tls-port` is never a wire port, and a pod attached inside is attached
//! nowhere else. So the source is told by the address, without carrying a tag through every
//! stage.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadAt {
    /// A host veth, an interface, `lo` of the node.
    Wire,
    /// A pod's own `lo`, inside its network namespace (meshes, `--in-pod`).
    InPod,
    /// Around `SSL_read`/`SSL_write` in the process (`--tls-port`).
    TlsLibrary,
}

impl ReadAt {
    pub const ALL: [ReadAt; 3] = [ReadAt::Wire, ReadAt::InPod, ReadAt::TlsLibrary];

    /// The name in metrics, `/report` and exports.
    pub fn label(self) -> &'static str {
        match self {
            ReadAt::Wire => "wire",
            ReadAt::InPod => "in_pod",
            ReadAt::TlsLibrary => "tls_library",
        }
    }

    /// The code in recordings.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<ReadAt> {
        ReadAt::ALL.get(usize::from(code)).copied()
    }
}

/// Tells each connection's source, and counts requests by it. Cloned handles share one state:
/// the agent updates the pods attached inside, the pipeline asks and counts.
#[derive(Clone, Debug, Default)]
pub struct Provenance(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    tls_ports: Vec<u16>,
    in_pod: RwLock<HashSet<IpAddr>>,
    requests: [AtomicU64; 3],
}

impl Provenance {
    pub fn new(tls_ports: Vec<u16>) -> Provenance {
        Provenance(Arc::new(Inner {
            tls_ports,
            ..Inner::default()
        }))
    }

    /// A pod attached inside its namespace (`true`), or gone or attached on its veth.
    pub fn set_in_pod(&self, ip: IpAddr, inside: bool) {
        let mut set = self.0.in_pod.write().unwrap();
        if inside {
            set.insert(ip);
        } else {
            set.remove(&ip);
        }
    }

    /// Where the connection to `server` was read.
    pub fn of(&self, server: SocketAddr) -> ReadAt {
        if self.0.tls_ports.contains(&server.port()) {
            ReadAt::TlsLibrary
        } else if self.0.in_pod.read().unwrap().contains(&server.ip()) {
            ReadAt::InPod
        } else {
            ReadAt::Wire
        }
    }

    /// Where the connection to `server` was read, counting one request there.
    pub fn count(&self, server: SocketAddr) -> ReadAt {
        let at = self.of(server);
        self.0.requests[usize::from(at.code())].fetch_add(1, Ordering::Relaxed);
        at
    }

    /// Requests read at each source so far.
    pub fn requests(&self) -> [(ReadAt, u64); 3] {
        ReadAt::ALL.map(|at| {
            (
                at,
                self.0.requests[usize::from(at.code())].load(Ordering::Relaxed),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_follows_the_server_address() {
        let p = Provenance::new(vec![8443]);
        let pod: IpAddr = "10.1.0.2".parse().unwrap();
        assert_eq!(p.of("10.1.0.2:8080".parse().unwrap()), ReadAt::Wire);
        p.set_in_pod(pod, true);
        assert_eq!(p.count("10.1.0.2:8080".parse().unwrap()), ReadAt::InPod);
        assert_eq!(
            p.count("10.1.0.2:8443".parse().unwrap()),
            ReadAt::TlsLibrary
        );
        assert_eq!(
            p.count("[fd00::2]:8443".parse().unwrap()),
            ReadAt::TlsLibrary
        );
        p.set_in_pod(pod, false);
        assert_eq!(p.count("10.1.0.2:8080".parse().unwrap()), ReadAt::Wire);
        assert_eq!(
            p.requests(),
            [
                (ReadAt::Wire, 1),
                (ReadAt::InPod, 1),
                (ReadAt::TlsLibrary, 2)
            ]
        );
        for at in ReadAt::ALL {
            assert_eq!(ReadAt::from_code(at.code()), Some(at));
        }
        assert_eq!(ReadAt::from_code(3), None);
    }
}
