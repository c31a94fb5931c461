//! Plaintext chunks from the TLS probes, turned into the segments of a TCP connection, so that
//! reassembly, HTTP/1 and HTTP/2 extraction, pairing and comparison take them as they take the
//! wire's.
//!
//! A connection is a process's `SSL *`, and each record carries its socket's addresses. It is
//! mirrored when its local port is a TLS live port: the process serves it. Its reads are then the client's bytes
//! and its writes the server's. Sequence numbers are the chunks' stream offsets after a
//! synthetic SYN from each side; `SSL_free` closes both directions. A chunk that is not where
//! the last one ended (the ring was full, or a call was too long to read) resets the connection
//! and stops its mirroring: a request is never spliced from bytes around a hole.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use mirror_common::tls::{ChunkHead, SockTuple, KIND_CLOSE, KIND_READ, KIND_TOO_LONG, KIND_WRITE};

use crate::segment::{FlowKey, Segment, TcpFlags, TimestampNs};

/// A socket's local and peer addresses.
fn addrs(t: &SockTuple) -> (SocketAddr, SocketAddr) {
    let ip = |a: [u8; 16]| {
        let v6 = Ipv6Addr::from(a);
        match (t.ip_version, v6.to_ipv4_mapped()) {
            (4, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    };
    (
        SocketAddr::new(ip(t.local), t.local_port),
        SocketAddr::new(ip(t.peer), t.peer_port),
    )
}

mirror_core::stage_counters! {
    /// What became of the TLS probes' records. Every record ends in `chunks` or `closes`, or in
    /// one of the reasons it was not mirrored.
    #[derive(Debug, Default)]
    pub struct TlsStats {
        pub chunks: AtomicU64 => Counter "mirror_tls_chunks"
            "Plaintext chunks from the TLS probes handed to reassembly",
        pub bytes: AtomicU64 => Counter "mirror_tls_bytes"
            "Plaintext bytes from the TLS probes handed to reassembly",
        pub connections: AtomicU64 => Counter "mirror_tls_connections"
            "TLS connections mirrored (their local port is a TLS live port)",
        pub closes: AtomicU64 => Counter "mirror_tls_closes"
            "TLS connections closed by SSL_free",
        pub not_live_port: AtomicU64 => Counter "mirror_tls_not_mirrored" [reason = "not_live_port"]
            "TLS records not mirrored, by reason",
        pub lost: AtomicU64 => Counter "mirror_tls_not_mirrored" [reason = "gap"],
        pub too_long: AtomicU64 => Counter "mirror_tls_not_mirrored" [reason = "too_long"],
        pub evicted: AtomicU64 => Counter "mirror_tls_not_mirrored" [reason = "evicted"],
        pub malformed: AtomicU64 => Counter "mirror_tls_not_mirrored" [reason = "malformed"],
    }
}

/// Connections followed at once; the least recently used are forgotten beyond it.
const MAX_CONNECTIONS: usize = 65_536;

/// A connection's state.
enum Conn {
    Mirrored {
        /// The client's direction (`peer → local`).
        flow: FlowKey,
        /// Bytes each direction has had so far: reads (the client's), writes (the server's).
        next: [u64; 2],
    },
    /// Not a live port, or stopped after a hole: its records are passed over.
    Ignored,
}

pub struct TlsStreams {
    ports: Vec<u16>,
    conns: lru::LruCache<(u32, u64), Conn>,
    /// Added to the records' monotonic clock to make it real time, as the segments carry.
    realtime_offset_ns: i64,
}

impl TlsStreams {
    pub fn new(ports: Vec<u16>, realtime_offset_ns: i64) -> Self {
        TlsStreams {
            ports,
            conns: lru::LruCache::new(NonZeroUsize::new(MAX_CONNECTIONS).unwrap()),
            realtime_offset_ns,
        }
    }

    /// One record: its head and data. Segments it makes go to `out`.
    pub fn record(
        &mut self,
        head: &ChunkHead,
        data: &[u8],
        stats: &TlsStats,
        out: &mut Vec<Segment>,
    ) {
        let key = (head.tgid, head.ssl);
        let ts = (head.ts_ns as i64 + self.realtime_offset_ns) as TimestampNs;
        if head.kind == KIND_CLOSE {
            if let Some(Conn::Mirrored { flow, next }) = self.conns.pop(&key) {
                out.push(segment(
                    flow,
                    next[0],
                    next[1],
                    TcpFlags::FIN,
                    Bytes::new(),
                    ts,
                ));
                out.push(segment(
                    flow.reverse(),
                    next[1],
                    next[0],
                    TcpFlags::FIN,
                    Bytes::new(),
                    ts,
                ));
                bump(&stats.closes, 1);
            }
            return;
        }
        if !self.conns.contains(&key) {
            let conn = self.open(head, ts, stats, out);
            if let Some((_, Conn::Mirrored { .. })) = self.conns.push(key, conn) {
                bump(&stats.evicted, 1);
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let Conn::Mirrored { flow, next } = conn else {
            return;
        };
        let (flow, next) = (*flow, next);
        let dir = match head.kind {
            KIND_READ => 0,
            KIND_WRITE => 1,
            KIND_TOO_LONG => {
                bump(&stats.too_long, 1);
                out.push(reset(flow, next, ts));
                self.conns.put(key, Conn::Ignored);
                return;
            }
            _ => {
                bump(&stats.malformed, 1);
                return;
            }
        };
        if head.offset != next[dir] || data.len() != head.len as usize {
            bump(&stats.lost, 1);
            out.push(reset(flow, next, ts));
            self.conns.put(key, Conn::Ignored);
            return;
        }
        let (this, other) = if dir == 0 {
            (flow, next[1])
        } else {
            (flow.reverse(), next[0])
        };
        let payload = Bytes::copy_from_slice(data);
        out.push(segment(this, next[dir], other, TcpFlags::PSH, payload, ts));
        next[dir] += data.len() as u64;
        bump(&stats.chunks, 1);
        bump(&stats.bytes, data.len() as u64);
    }

    /// A connection's first record: mirrored, with its handshake, or ignored.
    fn open(
        &mut self,
        head: &ChunkHead,
        ts: TimestampNs,
        stats: &TlsStats,
        out: &mut Vec<Segment>,
    ) -> Conn {
        let (local, peer) = addrs(&head.conn);
        if !self.ports.contains(&local.port()) {
            bump(&stats.not_live_port, 1);
            return Conn::Ignored;
        }
        let flow = FlowKey {
            src: peer,
            dst: local,
        };
        // Each side's initial sequence number is 0, so that stream offset n is sequence n + 1.
        out.push(Segment {
            flow,
            seq: 0,
            ack: 0,
            flags: TcpFlags::SYN,
            payload: Bytes::new(),
            elided: 0,
            ts,
        });
        out.push(Segment {
            flow: flow.reverse(),
            seq: 0,
            ack: 1,
            flags: TcpFlags::SYN.union(TcpFlags::ACK),
            payload: Bytes::new(),
            elided: 0,
            ts,
        });
        bump(&stats.connections, 1);
        Conn::Mirrored { flow, next: [0, 0] }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A segment at stream offset `at`, acknowledging offset `acked` of the other direction.
fn segment(
    flow: FlowKey,
    at: u64,
    acked: u64,
    flags: TcpFlags,
    payload: Bytes,
    ts: TimestampNs,
) -> Segment {
    Segment {
        flow,
        seq: (at as u32).wrapping_add(1),
        ack: (acked as u32).wrapping_add(1),
        flags: flags.union(TcpFlags::ACK),
        payload,
        elided: 0,
        ts,
    }
}

/// The client resets the connection where its bytes stop.
fn reset(flow: FlowKey, next: &[u64; 2], ts: TimestampNs) -> Segment {
    segment(flow, next[0], next[1], TcpFlags::RST, Bytes::new(), ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(local: &str, peer: &str) -> SockTuple {
        let (l, p): (SocketAddr, SocketAddr) = (local.parse().unwrap(), peer.parse().unwrap());
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        SockTuple {
            local: v6(l),
            peer: v6(p),
            local_port: l.port(),
            peer_port: p.port(),
            ip_version: if l.is_ipv4() { 4 } else { 6 },
            _pad: [0; 3],
        }
    }

    fn head_on(conn: SockTuple, kind: u8, offset: u64, len: usize) -> ChunkHead {
        ChunkHead {
            ssl: 0xabc,
            offset,
            ts_ns: 1,
            conn,
            tgid: 7,
            len: len as u32,
            kind,
            _pad: [0; 7],
        }
    }

    fn head(kind: u8, offset: u64, len: usize) -> ChunkHead {
        head_on(tuple("10.0.0.2:8443", "10.0.0.1:40000"), kind, offset, len)
    }

    fn streams() -> TlsStreams {
        TlsStreams::new(vec![8443], 0)
    }

    #[test]
    fn reads_and_writes_become_a_connection_in_order() {
        let mut s = streams();
        let stats = TlsStats::default();
        let mut out = Vec::new();
        s.record(&head(KIND_READ, 0, 5), b"GET /", &stats, &mut out);
        s.record(&head(KIND_READ, 5, 11), b" HTTP/1.1\r\n", &stats, &mut out);
        s.record(&head(KIND_WRITE, 0, 4), b"HTTP", &stats, &mut out);
        s.record(&head(KIND_CLOSE, 16, 0), b"", &stats, &mut out);
        let shown: Vec<String> = out
            .iter()
            .map(|g| {
                format!(
                    "{} {} {} {} {}",
                    g.flow,
                    g.flags,
                    g.seq,
                    g.ack,
                    g.payload.len()
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "10.0.0.1:40000 -> 10.0.0.2:8443 S 0 0 0",
                "10.0.0.2:8443 -> 10.0.0.1:40000 S. 0 1 0",
                "10.0.0.1:40000 -> 10.0.0.2:8443 P. 1 1 5",
                "10.0.0.1:40000 -> 10.0.0.2:8443 P. 6 1 11",
                "10.0.0.2:8443 -> 10.0.0.1:40000 P. 1 17 4",
                "10.0.0.1:40000 -> 10.0.0.2:8443 F. 17 5 0",
                "10.0.0.2:8443 -> 10.0.0.1:40000 F. 5 17 0",
            ]
        );
        assert_eq!(stats.chunks.load(Ordering::Relaxed), 3);
        assert_eq!(stats.closes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_hole_resets_and_stops_the_connection() {
        let mut s = streams();
        let stats = TlsStats::default();
        let mut out = Vec::new();
        s.record(&head(KIND_READ, 0, 3), b"GET", &stats, &mut out);
        // Bytes 3..10 never came.
        s.record(&head(KIND_READ, 10, 3), b"abc", &stats, &mut out);
        s.record(&head(KIND_READ, 13, 3), b"def", &stats, &mut out);
        assert!(out.last().unwrap().flags.contains(TcpFlags::RST));
        assert_eq!(
            out.len(),
            4,
            "SYN, SYN-ACK, data, RST; nothing after the hole"
        );
        assert_eq!(stats.lost.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn clients_are_not_mirrored_and_ipv6_keeps_its_addresses() {
        let stats = TlsStats::default();
        let mut out = Vec::new();
        let mut s = streams();
        let client = tuple("10.0.0.2:51000", "10.0.0.9:443");
        s.record(&head_on(client, KIND_WRITE, 0, 3), b"GET", &stats, &mut out);
        assert!(out.is_empty());
        assert_eq!(stats.not_live_port.load(Ordering::Relaxed), 1);
        let mut v6 = head_on(tuple("[fd00::2]:8443", "[fd00::1]:50000"), KIND_READ, 0, 3);
        v6.ssl += 1;
        s.record(&v6, b"GET", &stats, &mut out);
        assert_eq!(out[0].flow.to_string(), "[fd00::1]:50000 -> [fd00::2]:8443");
    }
}
