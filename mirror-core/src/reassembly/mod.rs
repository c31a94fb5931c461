//! TCP stream reassembly for a passive observer.
//!
//! One `Reassembler` owns the flow table. Connections are keyed by their 4-tuple (either way
//! round), oriented client → server, with one sequence space per direction. Each direction's
//! bytes are handed to a `StreamHandler` exactly once and in order; what can't be delivered is
//! reported as a gap.
//!
//! A 4-tuple carries one connection after another (TIME_WAIT reuse, busy clients), and a capture
//! that drops packets can miss any SYN, FIN or RST. So a tracked flow ends, and a new connection
//! starts on its 4-tuple, on evidence that the old one is over: a SYN that is not a retransmission
//! of the flow's own, bytes beyond the flow's FIN, or a sequence number too far from where the
//! flow stands to belong to it. Orientation comes from the SYN; ports (and addresses) decide only
//! for connections joined mid-stream. Bytes of two connections are never joined into one stream,
//! and `lost_bytes` counts only sequence space missing inside one connection.
//!
//! Memory is bounded for any input: a cap on connections (least recently active evicted), on
//! out-of-order bytes per direction and in total. A hole that is not filled within
//! `hole_timeout` or that would overflow a cap is declared lost and reported to the handler.
//! Every such event is counted in `ReassemblyStats`.

mod direction;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;

use lru::LruCache;

use self::direction::{offset_of, DirCtx, DirState, Span};

use crate::segment::{Segment, SeqNumber, TcpFlags, TimestampNs};
use crate::FastSet;

pub use crate::exchange::ConnId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server: requests.
    ToServer = 0,
    /// Server to client: responses.
    ToClient = 1,
}

impl Direction {
    pub fn reverse(self) -> Direction {
        match self {
            Direction::ToServer => Direction::ToClient,
            Direction::ToClient => Direction::ToServer,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub id: ConnId,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions ended with FIN, in order.
    Fin,
    Rst,
    /// No segment for `idle_timeout`.
    Idle,
    /// Pushed out by a new connection while the table was full.
    Evicted,
    /// A new connection started on the same 4-tuple before this one's end was seen.
    Superseded,
    /// The agent is stopping.
    Shutdown,
}

/// Receives each direction's bytes in order, once. `Conn` is the handler's per-connection state,
/// stored in the reassembler's table so that it lives and dies with the connection.
pub trait StreamHandler {
    type Conn;
    fn open(&mut self, info: &ConnInfo) -> Self::Conn;
    /// The direction's first sequence number is known. `from_syn`: the stream is seen from its
    /// start; otherwise the agent joined mid-stream and the first bytes may be mid-message.
    fn start(&mut self, conn: &mut Self::Conn, info: &ConnInfo, dir: Direction, from_syn: bool);
    /// `ack`: how far the other direction's stream is acknowledged by the segment that carried
    /// `data`, as an offset in that stream (None when unknown: out-of-order data released
    /// later, or the other direction not seen yet). It orders the two directions when their
    /// captures reach the agent out of order.
    fn data(
        &mut self,
        conn: &mut Self::Conn,
        info: &ConnInfo,
        dir: Direction,
        data: &[u8],
        ts: TimestampNs,
        ack: Option<u64>,
    );
    /// `len` bytes at this point of the stream were sent but not captured, by design (a
    /// response described by its head): they are not lost, but their content is unknown.
    fn elided(
        &mut self,
        conn: &mut Self::Conn,
        info: &ConnInfo,
        dir: Direction,
        len: u64,
        ts: TimestampNs,
    );
    /// `lost` bytes at this point of the stream will never arrive.
    fn gap(
        &mut self,
        conn: &mut Self::Conn,
        info: &ConnInfo,
        dir: Direction,
        lost: u64,
        ts: TimestampNs,
    );
    /// The direction ended (FIN) after all its bytes were delivered.
    fn end(&mut self, conn: &mut Self::Conn, info: &ConnInfo, dir: Direction, ts: TimestampNs);
    fn close(&mut self, conn: Self::Conn, info: &ConnInfo, reason: CloseReason, ts: TimestampNs);
}

#[derive(Clone, Debug)]
pub struct ReassemblyConfig {
    /// Ports of the live service: they orient connections joined mid-stream (a SYN orients the
    /// others). With no match, or a live port on both ends, a segment that starts with a status
    /// line comes from the server, anything else from the client.
    pub server_ports: Vec<u16>,
    /// Addresses of the live service (empty: any); they tell the server when both ends use a
    /// live port.
    pub server_addrs: Vec<IpAddr>,
    pub max_flows: usize,
    pub max_ooo_bytes_per_dir: usize,
    pub max_ooo_segments_per_dir: usize,
    pub max_ooo_bytes_total: usize,
    pub hole_timeout_ns: u64,
    pub idle_timeout_ns: u64,
    /// Farthest a segment may start from its direction's next byte, ahead or behind, and still
    /// belong to the tracked connection; beyond it, a new connection (whose SYN was not seen)
    /// has taken over the 4-tuple. Out-of-order data farther ahead than the per-direction cap
    /// could not be held anyway.
    pub max_seq_jump: u32,
    /// How long a connection stays open after a RST for bytes sent before it that arrive
    /// later (with response heads, a clone whose mark did not fit in the ring, or one waited
    /// for in vain, can still be placed out of order). 0: closed at once.
    pub reset_linger_ns: u64,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            server_ports: Vec::new(),
            server_addrs: Vec::new(),
            max_flows: 65_536,
            max_ooo_bytes_per_dir: 1 << 20,
            max_ooo_segments_per_dir: 1024,
            max_ooo_bytes_total: 128 << 20,
            hole_timeout_ns: 500_000_000,
            idle_timeout_ns: 120_000_000_000,
            max_seq_jump: 1 << 20,
            reset_linger_ns: 0,
        }
    }
}

/// Age from which a connection counts as long-lived (`ReassemblyStats::long_lived_segments`).
pub const LONG_LIVED_NS: u64 = 2_000_000_000;

crate::stage_counters! {
    /// Counters. Every payload byte handed in (captured or elided) is delivered, a duplicate, held
    /// out of order, or discarded (it came after its connection closed); `lost_bytes` counts the
    /// sequence space never seen inside one connection (holes given up on, and what was missing
    /// before a FIN).
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct ReassemblyStats {
        /// Segments of a connection that has already closed (late retransmissions), and their
        /// payload bytes; ignored.
        pub after_close_segments: u64 => Counter "mirror_reassembly_after_close_segments"
            "Segments of a connection already closed (late retransmissions), ignored",
        pub closed_fin: u64 => Counter "mirror_reassembly_closed_fin"
            "Connections closed by FIN",
        pub closed_rst: u64 => Counter "mirror_reassembly_closed_rst"
            "Connections closed by RST",
        pub connections: u64 => Counter "mirror_reassembly_connections"
            "Connections tracked since the start",
        pub delivered_bytes: u64 => Counter "mirror_reassembly_delivered_bytes"
            "Payload bytes delivered in order to the parse stage",
        pub discarded_bytes: u64 => Counter "mirror_reassembly_discarded_bytes"
            "Payload bytes of segments after their connection closed",
        /// Bytes that arrived again (retransmissions, overlaps); the first copy was kept.
        pub duplicate_bytes: u64 => Counter "mirror_reassembly_duplicate_bytes"
            "Bytes that arrived again (retransmissions, overlaps); the first copy kept",
        /// Retransmitted SYNs (same initial sequence number): not a new connection.
        pub duplicate_syns: u64 => Counter "mirror_reassembly_duplicate_syns"
            "Retransmitted SYNs (same initial sequence number)",
        /// Of `payload_bytes`, those described but not captured (response bodies).
        pub elided_bytes: u64 => Counter "mirror_reassembly_elided_bytes"
            "Payload bytes described but not captured (response bodies)",
        pub evicted_full: u64 => Counter "mirror_reassembly_evicted_full"
            "Connections evicted because the flow table was full",
        pub evicted_idle: u64 => Counter "mirror_reassembly_evicted_idle"
            "Connections evicted after going idle",
        pub holes_overflow: u64 => Counter "mirror_reassembly_holes_overflow"
            "Holes given up on because out-of-order memory ran out",
        /// Holes given up on, by cause.
        pub holes_timeout: u64 => Counter "mirror_reassembly_holes_timeout"
            "Holes given up on after waiting for the missing bytes",
        /// SYNs that arrived after their connection's first bytes (see `DirState::joined`).
        pub late_syns: u64 => Counter "mirror_reassembly_late_syns"
            "SYNs that arrived after their connection's first bytes",
        /// Of `segments`, those of connections seen for `LONG_LIVED_NS` or more: the load that
        /// shedding new connections does not remove (the CPU budget's sign that it must drop
        /// admitted ones).
        pub long_lived_segments: u64 => Counter "mirror_reassembly_long_lived_segments"
            "Segments of connections seen for 2 s or more, which shedding new connections does not remove",
        pub lost_bytes: u64 => Counter "mirror_reassembly_lost_bytes"
            "Sequence space never seen inside a connection",
        pub midstream_joins: u64 => Counter "mirror_reassembly_midstream_joins"
            "Connections joined after their start",
        /// Gauge: out-of-order bytes held now.
        pub ooo_bytes_held: u64 => Gauge "mirror_reassembly_ooo_bytes_held"
            "Out-of-order bytes held now",
        pub out_of_order_segments: u64 => Counter "mirror_reassembly_out_of_order_segments"
            "Segments that arrived ahead of a hole",
        /// Overlapping copies whose bytes differed from the first copy.
        pub overlap_conflicts: u64 => Counter "mirror_reassembly_overlap_conflicts"
            "Overlapping copies whose bytes differed from the first copy",
        pub payload_bytes: u64 => Counter "mirror_reassembly_payload_bytes"
            "Payload bytes handed in (captured or elided)",
        pub segments: u64 => Counter "mirror_reassembly_segments"
            "Segments handed in",
        /// Connections ended because a new one took over their 4-tuple: announced by a SYN, or
        /// (its SYN not seen) by bytes beyond the old FIN or a sequence jump.
        pub superseded_by_syn: u64 => Counter "mirror_reassembly_superseded_by_syn"
            "Connections ended because a SYN reused their 4-tuple",
        pub superseded_without_syn: u64 => Counter "mirror_reassembly_superseded_without_syn"
            "Connections ended because bytes beyond their FIN or a sequence jump reused their 4-tuple",
}
}

/// What is remembered of a connection that closed, to tell its late retransmissions from a new
/// connection on the same 4-tuple.
#[derive(Clone, Copy)]
struct Ended {
    client: SocketAddr,
    /// Per direction, the sequence number just past the last byte (or FIN) seen.
    end_seq: [Option<SeqNumber>; 2],
}

impl Ended {
    /// A segment after the close: a late copy of what the connection sent (at or behind its
    /// end, within a jump), or the start of a new connection whose SYN was not seen.
    fn is_new_connection(&self, seg: &Segment, max_jump: u32) -> bool {
        let dir = if seg.flow.src == self.client {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        match self.end_seq[dir as usize] {
            Some(end) => {
                let rel = seg.seq() - end;
                rel > 0 || rel.unsigned_abs() > u64::from(max_jump)
            }
            None => false,
        }
    }
}

struct Flow<C> {
    info: ConnInfo,
    dirs: [DirState; 2],
    conn: C,
    first_ts: TimestampNs,
    last_ts: TimestampNs,
    /// When a RST was seen, while the connection lingers (`reset_linger_ns`).
    reset_at: Option<TimestampNs>,
}

/// Connection key: the two endpoints, lower first, so that both directions find the flow.
type ConnKey = (SocketAddr, SocketAddr);

#[inline]
fn conn_key(seg: &Segment) -> ConnKey {
    let (a, b) = (seg.flow.src, seg.flow.dst);
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

pub struct Reassembler<H: StreamHandler> {
    cfg: ReassemblyConfig,
    flows: LruCache<ConnKey, Flow<H::Conn>>,
    /// Connections that hold out-of-order data, for the hole timeout.
    with_holes: FastSet<ConnKey>,
    /// Connections lingering after a RST.
    resetting: FastSet<ConnKey>,
    /// Recently closed connections, so that late retransmissions do not reopen them.
    closed: LruCache<ConnKey, Ended>,
    next_id: ConnId,
    ooo_total: usize,
    stats: ReassemblyStats,
    handler: H,
}

impl<H: StreamHandler> Reassembler<H> {
    pub fn new(cfg: ReassemblyConfig, handler: H) -> Self {
        let cap = NonZeroUsize::new(cfg.max_flows.max(1)).unwrap();
        Reassembler {
            flows: LruCache::new(cap),
            with_holes: FastSet::default(),
            resetting: FastSet::default(),
            closed: LruCache::new(NonZeroUsize::new(cfg.max_flows.clamp(1, 16_384)).unwrap()),
            cfg,
            next_id: 1,
            ooo_total: 0,
            stats: ReassemblyStats::default(),
            handler,
        }
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    pub fn into_handler(self) -> H {
        self.handler
    }

    pub fn stats(&self) -> ReassemblyStats {
        let mut s = self.stats.clone();
        s.ooo_bytes_held = self.ooo_total as u64;
        s
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    fn is_server(&self, addr: SocketAddr) -> bool {
        self.cfg.server_ports.contains(&addr.port())
            && (self.cfg.server_addrs.is_empty()
                || self.cfg.server_addrs.contains(&addr.ip().to_canonical()))
    }

    /// The client of a connection first seen with `seg`.
    fn client_of(&self, seg: &Segment) -> SocketAddr {
        let (src, dst) = (seg.flow.src, seg.flow.dst);
        if seg.flags.contains(TcpFlags::SYN) {
            return if seg.flags.contains(TcpFlags::ACK) {
                dst
            } else {
                src
            };
        }
        match (self.is_server(dst), self.is_server(src)) {
            (true, false) => src,
            (false, true) => dst,
            _ if seg.payload.starts_with(b"HTTP/") => dst,
            _ => src,
        }
    }

    pub fn process(&mut self, seg: &Segment) {
        self.stats.segments += 1;
        self.stats.payload_bytes += seg.len() as u64;
        self.stats.elided_bytes += u64::from(seg.elided);
        let key = conn_key(seg);
        let is_syn = seg.flags.contains(TcpFlags::SYN);
        if !self.flow_for(key, seg) {
            return;
        }
        let Reassembler {
            flows,
            handler,
            stats,
            cfg,
            ooo_total,
            with_holes,
            ..
        } = self;
        let flow = flows.get_mut(&key).expect("flow just ensured");
        flow.last_ts = flow.last_ts.max(seg.ts);
        if seg.ts.saturating_sub(flow.first_ts) >= LONG_LIVED_NS {
            stats.long_lived_segments += 1;
        }
        if seg.flags.contains(TcpFlags::RST) {
            if self.cfg.reset_linger_ns == 0 {
                self.close_flow(&key, CloseReason::Rst, seg.ts);
            } else if flow.reset_at.is_none() {
                flow.reset_at = Some(seg.ts);
                self.resetting.insert(key);
            }
            return;
        }
        let dir = if seg.flow.src == flow.info.client {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        if flow.dirs[dir as usize].observe(seg, is_syn, stats) {
            handler.start(&mut flow.conn, &flow.info, dir, is_syn);
        }
        let data_seq = if is_syn { seg.seq() + 1 } else { seg.seq() };
        let other = &flow.dirs[1 - dir as usize];
        let ack = (seg.flags.contains(TcpFlags::ACK) && other.next_seq.is_some())
            .then(|| offset_of(other, seg.ack()))
            .and_then(|o| u64::try_from(o).ok());
        let d = &mut flow.dirs[dir as usize];
        let mut ctx = DirCtx {
            cfg,
            stats,
            ooo_total,
            handler,
            conn: &mut flow.conn,
            info: &flow.info,
            dir,
            ack,
        };
        ctx.accept(d, data_seq, Span::Data(&seg.payload), seg.ts);
        if seg.elided > 0 {
            let at = data_seq + seg.payload.len();
            ctx.accept(d, at, Span::Elided(seg.elided.into()), seg.ts);
        }
        if seg.flags.contains(TcpFlags::FIN) {
            d.fin(data_seq + seg.len(), seg.ts);
        }
        ctx.check_end(d, seg.ts);
        let has_holes = flow.dirs.iter().any(DirState::waiting);
        let both_ended = flow.dirs.iter().all(|d| d.ended);
        if has_holes {
            with_holes.insert(key);
        } else {
            with_holes.remove(&key);
        }
        if both_ended {
            self.close_flow(&key, CloseReason::Fin, seg.ts);
        }
    }

    /// Makes sure `key` has a flow for `seg`: the tracked one, or a new connection where `seg`
    /// shows the old one is over. False when `seg` is a late copy from a closed connection.
    fn flow_for(&mut self, key: ConnKey, seg: &Segment) -> bool {
        let is_syn = seg.flags.contains(TcpFlags::SYN);
        let tracked = self
            .flows
            .peek(&key)
            .map(|flow| supersedes(flow, seg, self.cfg.max_seq_jump, &mut self.stats));
        if let Some(new_client) = tracked {
            if let Some(client) = new_client {
                let was_reset = self.flows.peek(&key).is_some_and(|f| f.reset_at.is_some());
                let reason = if was_reset {
                    CloseReason::Rst
                } else {
                    CloseReason::Superseded
                };
                self.close_flow(&key, reason, seg.ts);
                self.open_flow(key, client, seg.ts);
            }
        } else {
            if let Some(ended) = self.closed.peek(&key) {
                if !is_syn && !ended.is_new_connection(seg, self.cfg.max_seq_jump) {
                    self.stats.after_close_segments += 1;
                    self.stats.discarded_bytes += seg.len() as u64;
                    return false;
                }
                if !is_syn {
                    self.stats.superseded_without_syn += 1;
                }
                self.closed.pop(&key);
            }
            let client = self.client_of(seg);
            self.open_flow(key, client, seg.ts);
        }
        true
    }

    /// Time passes: gives up on holes older than `hole_timeout` and evicts idle connections.
    /// `now` is on the capture clock (Unix epoch ns).
    pub fn tick(&mut self, now: TimestampNs) {
        let reset: Vec<ConnKey> = self
            .resetting
            .iter()
            .filter(|k| {
                self.flows.peek(*k).is_none_or(|f| {
                    f.reset_at
                        .is_some_and(|at| now.saturating_sub(at) >= self.cfg.reset_linger_ns)
                })
            })
            .copied()
            .collect();
        for key in reset {
            self.resetting.remove(&key);
            self.close_flow(&key, CloseReason::Rst, now);
        }
        let keys: Vec<ConnKey> = self.with_holes.iter().copied().collect();
        for key in keys {
            let Reassembler {
                flows,
                handler,
                stats,
                cfg,
                ooo_total,
                with_holes,
                ..
            } = self;
            let Some(flow) = flows.peek_mut(&key) else {
                with_holes.remove(&key);
                continue;
            };
            for dir in [Direction::ToServer, Direction::ToClient] {
                let d = &mut flow.dirs[dir as usize];
                if d.waiting() && now.saturating_sub(d.hole_since) >= cfg.hole_timeout_ns {
                    stats.holes_timeout += 1;
                    let mut ctx = DirCtx {
                        cfg,
                        stats,
                        ooo_total,
                        handler,
                        conn: &mut flow.conn,
                        info: &flow.info,
                        dir,
                        ack: None,
                    };
                    ctx.skip_hole(d, now);
                    ctx.check_end(d, now);
                }
            }
            if !flow.dirs.iter().any(DirState::waiting) {
                with_holes.remove(&key);
            }
            if flow.dirs.iter().all(|d| d.ended) {
                self.close_flow(&key, CloseReason::Fin, now);
            }
        }
        while let Some((key, flow)) = self.flows.peek_lru() {
            if now.saturating_sub(flow.last_ts) < self.cfg.idle_timeout_ns {
                break;
            }
            let key = *key;
            self.close_flow(&key, CloseReason::Idle, now);
        }
    }

    /// Closes every connection (the agent is stopping).
    pub fn shutdown(&mut self, now: TimestampNs) {
        while let Some((key, _)) = self.flows.peek_lru() {
            let key = *key;
            self.close_flow(&key, CloseReason::Shutdown, now);
        }
    }

    fn open_flow(&mut self, key: ConnKey, client: SocketAddr, ts: TimestampNs) {
        if self.flows.len() >= self.cfg.max_flows {
            if let Some((old, _)) = self.flows.peek_lru() {
                let old = *old;
                self.close_flow(&old, CloseReason::Evicted, ts);
            }
        }
        let server = if key.0 == client { key.1 } else { key.0 };
        let info = ConnInfo {
            id: self.next_id,
            client,
            server,
        };
        self.next_id += 1;
        self.stats.connections += 1;
        let conn = self.handler.open(&info);
        self.flows.put(
            key,
            Flow {
                info,
                dirs: Default::default(),
                conn,
                first_ts: ts,
                last_ts: ts,
                reset_at: None,
            },
        );
    }

    fn close_flow(&mut self, key: &ConnKey, reason: CloseReason, ts: TimestampNs) {
        let Some(mut flow) = self.flows.pop(key) else {
            return;
        };
        self.with_holes.remove(key);
        self.resetting.remove(key);
        for dir in [Direction::ToServer, Direction::ToClient] {
            let d = &mut flow.dirs[dir as usize];
            let mut ctx = DirCtx {
                cfg: &self.cfg,
                stats: &mut self.stats,
                ooo_total: &mut self.ooo_total,
                handler: &mut self.handler,
                conn: &mut flow.conn,
                info: &flow.info,
                dir,
                ack: None,
            };
            // No retransmission can fill the holes now: what arrived beyond them is handed over
            // after a gap, so that whole messages there still count.
            while !d.ooo.is_empty() {
                ctx.skip_hole(d, ts);
                ctx.drain(d, ts);
            }
            // With the FIN seen, the bytes still missing before it are known to be lost.
            if let Some(fin) = d.fin_at {
                self.stats.lost_bytes += fin.saturating_sub(d.delivered);
            }
        }
        match reason {
            CloseReason::Fin => self.stats.closed_fin += 1,
            CloseReason::Rst => self.stats.closed_rst += 1,
            CloseReason::Idle => self.stats.evicted_idle += 1,
            CloseReason::Evicted => self.stats.evicted_full += 1,
            CloseReason::Superseded | CloseReason::Shutdown => {}
        }
        if matches!(reason, CloseReason::Fin | CloseReason::Rst) {
            let ended = Ended {
                client: flow.info.client,
                end_seq: [0, 1].map(|i| flow.dirs[i].end_seq()),
            };
            self.closed.put(*key, ended);
        }
        self.handler.close(flow.conn, &flow.info, reason, ts);
    }
}

/// Whether `seg` starts a new connection on `flow`'s 4-tuple; if so, its client.
fn supersedes<C>(
    flow: &Flow<C>,
    seg: &Segment,
    max_jump: u32,
    stats: &mut ReassemblyStats,
) -> Option<SocketAddr> {
    let from_client = seg.flow.src == flow.info.client;
    let dir = if from_client {
        Direction::ToServer
    } else {
        Direction::ToClient
    };
    let d = &flow.dirs[dir as usize];
    let peer = &flow.dirs[1 - dir as usize];
    if seg.flags.contains(TcpFlags::SYN) {
        let synack = seg.flags.contains(TcpFlags::ACK);
        if d.isn == Some(seg.seq()) {
            stats.duplicate_syns += 1;
            return None;
        }
        if late_handshake(d, peer, seg, synack, from_client) {
            stats.late_syns += 1;
            return None;
        }
        // A SYN opens its direction of a connection not yet under way; one from the wrong
        // side, or into a connection that already carries bytes, starts another.
        let opens = d.next_seq.is_none()
            && if synack {
                !from_client
            } else {
                from_client && peer.next_seq.is_none()
            };
        if opens {
            return None;
        }
        stats.superseded_by_syn += 1;
        return Some(if synack { seg.flow.dst } else { seg.flow.src });
    }
    if seg.is_empty() && !seg.flags.contains(TcpFlags::FIN) {
        return None;
    }
    if d.foreign(seg, peer, max_jump) {
        stats.superseded_without_syn += 1;
        return Some(flow.info.client);
    }
    None
}

/// Whether a SYN (or SYN-ACK) is this connection's own, overtaken by the server's first
/// segment (clones of two CPUs cross on the way to the capture ring):
/// a SYN-ACK just before the first server byte seen, or, while nothing of the client was seen,
/// a client SYN whose next sequence number the server's first segment acknowledged. Exact
/// numbers only: a guess could join two connections of one 4-tuple.
fn late_handshake(
    d: &DirState,
    peer: &DirState,
    seg: &Segment,
    synack: bool,
    from_client: bool,
) -> bool {
    if synack {
        !from_client && d.isn.is_none() && d.joined.is_some_and(|(seq, _)| seg.seq() + 1 == seq)
    } else {
        from_client
            && d.next_seq.is_none()
            && peer.isn.is_none()
            && peer.joined.is_some_and(|(_, ack)| seg.seq() + 1 == ack)
    }
}

#[cfg(test)]
mod tests;
