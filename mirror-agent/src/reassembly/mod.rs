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

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;

use bytes::Bytes;
use lru::LruCache;

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

/// Counters. Every payload byte handed in (captured or elided) is delivered, a duplicate, held
/// out of order, or discarded (it came after its connection closed); `lost_bytes` counts the
/// sequence space never seen inside one connection (holes given up on, and what was missing
/// before a FIN).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    pub segments: u64,
    pub payload_bytes: u64,
    /// Of `payload_bytes`, those described but not captured (response bodies).
    pub elided_bytes: u64,
    pub delivered_bytes: u64,
    /// Bytes that arrived again (retransmissions, overlaps); the first copy was kept.
    pub duplicate_bytes: u64,
    /// Overlapping copies whose bytes differed from the first copy.
    pub overlap_conflicts: u64,
    pub out_of_order_segments: u64,
    /// Holes given up on, by cause.
    pub holes_timeout: u64,
    pub holes_overflow: u64,
    pub lost_bytes: u64,
    pub connections: u64,
    pub midstream_joins: u64,
    pub closed_fin: u64,
    pub closed_rst: u64,
    pub evicted_idle: u64,
    pub evicted_full: u64,
    /// Connections ended because a new one took over their 4-tuple: announced by a SYN, or
    /// (its SYN not seen) by bytes beyond the old FIN or a sequence jump.
    pub superseded_by_syn: u64,
    pub superseded_without_syn: u64,
    /// Retransmitted SYNs (same initial sequence number): not a new connection.
    pub duplicate_syns: u64,
    /// SYNs that arrived after their connection's first bytes (see `DirState::joined`).
    pub late_syns: u64,
    /// Of `segments`, those of connections seen for `LONG_LIVED_NS` or more: the load that
    /// shedding new connections does not remove (the CPU budget's sign that it must drop
    /// admitted ones).
    pub long_lived_segments: u64,
    /// Segments of a connection that has already closed (late retransmissions), and their
    /// payload bytes; ignored.
    pub after_close_segments: u64,
    pub discarded_bytes: u64,
    /// Gauge: out-of-order bytes held now.
    pub ooo_bytes_held: u64,
}

/// Part of a segment's payload: bytes captured, or a length whose bytes were not.
#[derive(Clone, Copy)]
enum Span<'a> {
    Data(&'a [u8]),
    Elided(u64),
}

impl Span<'_> {
    fn len(&self) -> u64 {
        match self {
            Span::Data(d) => d.len() as u64,
            Span::Elided(n) => *n,
        }
    }

    /// Bytes of memory it takes when held.
    fn held(&self) -> usize {
        match self {
            Span::Data(d) => d.len(),
            Span::Elided(_) => 0,
        }
    }

    /// The part from `from` to `to` (offsets into the span).
    fn slice(&self, from: u64, to: u64) -> Self {
        match self {
            Span::Data(d) => Span::Data(&d[from as usize..to as usize]),
            Span::Elided(_) => Span::Elided(to - from),
        }
    }
}

/// A `Span` held out of order.
enum Piece {
    Data(Bytes),
    Elided(u64),
}

impl Piece {
    fn span(&self) -> Span<'_> {
        match self {
            Piece::Data(d) => Span::Data(d),
            Piece::Elided(n) => Span::Elided(*n),
        }
    }
}

#[derive(Default)]
struct DirState {
    /// Sequence number of the SYN, when seen.
    isn: Option<SeqNumber>,
    /// Sequence number of the next byte to deliver; None until the first segment.
    next_seq: Option<SeqNumber>,
    /// Bytes delivered (or declared lost) so far: the stream offset of `next_seq`.
    delivered: u64,
    /// Out-of-order pieces keyed by stream offset; they never overlap.
    ooo: BTreeMap<u64, Piece>,
    /// Bytes held in `ooo` (elided pieces hold none).
    ooo_bytes: usize,
    /// Stream offset of the FIN, once seen.
    fin_at: Option<u64>,
    ended: bool,
    /// Capture time at which the current hole was first waited on.
    hole_since: TimestampNs,
    /// Joined mid-stream on a segment without payload: where the stream stands is only a
    /// guess until data (or a FIN) arrives, and bytes before that are not counted lost.
    provisional: bool,
    /// Joined mid-stream: the sequence and acknowledgement numbers of the first segment seen.
    /// They recognise this connection's own handshake when it arrives late (clones made on
    /// two CPUs reach the capture ring in either order: a server's first bytes can overtake
    /// the SYN).
    joined: Option<(SeqNumber, SeqNumber)>,
}

impl DirState {
    /// Waiting on a hole: data or a FIN lies beyond what was delivered.
    fn waiting(&self) -> bool {
        !self.ooo.is_empty() || self.fin_at.is_some_and(|f| f > self.delivered)
    }

    /// Sequence number just past everything this direction sent that was seen (data and FIN
    /// alike), once data or its FIN is delivered.
    fn end_seq(&self) -> Option<SeqNumber> {
        let next = self.next_seq?;
        let beyond = self.fin_at.unwrap_or(0).saturating_sub(self.delivered);
        Some(next + beyond as usize)
    }

    /// Sequence number just past the highest byte (or FIN, which takes one) seen, out of
    /// order ones included: the most the peer can acknowledge of what was seen.
    fn highest_seq(&self) -> Option<SeqNumber> {
        let next = self.next_seq?;
        let ooo_end = self
            .ooo
            .last_key_value()
            .map_or(0, |(k, v)| k + v.span().len());
        let fin_end = self.fin_at.map_or(0, |f| f + 1);
        let high = ooo_end.max(fin_end).max(self.delivered);
        Some(next + (high - self.delivered) as usize)
    }

    /// Whether a segment at `seq` carrying `len` bytes cannot belong to this direction's
    /// connection: it lies past the FIN, too far from the next byte either way, or past a hole
    /// while acknowledging bytes the peer was never seen to send. Loss of both directions at
    /// once is what a new connection on the same 4-tuple looks like when its SYN was missed.
    fn foreign(&self, seg: &Segment, peer: &DirState, max_jump: u32) -> bool {
        let Some(next) = self.next_seq else {
            return false;
        };
        let rel = seg.seq() - next;
        let at = self.delivered as i64 + rel;
        let past_fin = self
            .fin_at
            .is_some_and(|f| at > f as i64 || (at == f as i64 && !seg.is_empty()));
        let acks_unseen = seg.flags.contains(TcpFlags::ACK)
            && peer.highest_seq().is_some_and(|h| seg.ack() - h > 0);
        past_fin || rel.unsigned_abs() > max_jump as u64 || (rel > 0 && acks_unseen)
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
                    return;
                }
                if !is_syn {
                    self.stats.superseded_without_syn += 1;
                }
                self.closed.pop(&key);
            }
            let client = self.client_of(seg);
            self.open_flow(key, client, seg.ts);
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
        let d = &mut flow.dirs[dir as usize];
        if d.next_seq.is_none() {
            if is_syn {
                d.isn = Some(seg.seq());
                d.next_seq = Some(seg.seq() + 1);
            } else {
                d.next_seq = Some(seg.seq());
                d.provisional = seg.is_empty() && !seg.flags.contains(TcpFlags::FIN);
                d.joined = seg
                    .flags
                    .contains(TcpFlags::ACK)
                    .then(|| (seg.seq(), seg.ack()));
                stats.midstream_joins += 1;
            }
            handler.start(&mut flow.conn, &flow.info, dir, is_syn);
        } else if is_syn && d.isn.is_none() {
            // A late SYN-ACK (`late_handshake`): its retransmissions are duplicates.
            d.isn = Some(seg.seq());
        } else if d.provisional && (!seg.is_empty() || seg.flags.contains(TcpFlags::FIN)) {
            // The first bytes of a joined direction: the stream begins here for this agent,
            // like everything before the join.
            d.provisional = false;
            if offset_of(d, seg.seq()) > d.delivered as i64 {
                d.next_seq = Some(seg.seq());
            }
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
            let fin = offset_of(d, data_seq + seg.len());
            if fin >= d.delivered as i64 {
                if d.ooo.is_empty() && fin > d.delivered as i64 {
                    // A FIN beyond a hole waits like out-of-order data.
                    d.hole_since = seg.ts;
                }
                d.fin_at = Some(fin as u64);
            }
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

/// Stream offset of `seq` relative to what was delivered (may be negative: already delivered).
fn offset_of(d: &DirState, seq: SeqNumber) -> i64 {
    let next = d.next_seq.expect("direction started");
    d.delivered as i64 + (seq - next)
}

/// What one direction's processing needs, borrowed apart from the flow table.
struct DirCtx<'a, H: StreamHandler> {
    cfg: &'a ReassemblyConfig,
    stats: &'a mut ReassemblyStats,
    ooo_total: &'a mut usize,
    handler: &'a mut H,
    conn: &'a mut H::Conn,
    info: &'a ConnInfo,
    dir: Direction,
    /// The segment's acknowledgement, as an offset in the other direction's stream.
    ack: Option<u64>,
}

impl<H: StreamHandler> DirCtx<'_, H> {
    fn accept(&mut self, d: &mut DirState, seq: SeqNumber, span: Span<'_>, ts: TimestampNs) {
        if span.len() == 0 {
            return;
        }
        let mut at = offset_of(d, seq);
        let mut span = span;
        let end = at + span.len() as i64;
        if end <= d.delivered as i64 {
            self.stats.duplicate_bytes += span.len();
            return;
        }
        if at < d.delivered as i64 {
            let skip = (d.delivered as i64 - at) as u64;
            self.stats.duplicate_bytes += skip;
            span = span.slice(skip, span.len());
            at = d.delivered as i64;
        }
        let at = at as u64;
        if at == d.delivered {
            self.deliver(d, span, ts, self.ack);
            self.drain(d, ts);
            return;
        }
        if let Span::Data(_) = span {
            // A segment's elided rest follows its data wherever the data goes: one count.
            self.stats.out_of_order_segments += 1;
        }
        if d.ooo.is_empty() {
            d.hole_since = ts;
        }
        // Make room, giving up on the oldest hole, until the new piece fits or is deliverable.
        loop {
            let fits = d.ooo_bytes + span.held() <= self.cfg.max_ooo_bytes_per_dir
                && d.ooo.len() < self.cfg.max_ooo_segments_per_dir
                && *self.ooo_total + span.held() <= self.cfg.max_ooo_bytes_total;
            if fits {
                break;
            }
            self.stats.holes_overflow += 1;
            let before = d.delivered;
            self.skip_hole_to(d, at, ts);
            if d.delivered >= at || d.delivered == before {
                break;
            }
        }
        if at <= d.delivered {
            let skip = d.delivered - at;
            if skip < span.len() {
                self.stats.duplicate_bytes += skip;
                self.deliver(d, span.slice(skip, span.len()), ts, self.ack);
                self.drain(d, ts);
            } else {
                self.stats.duplicate_bytes += span.len();
            }
            return;
        }
        self.insert_ooo(d, at, span);
    }

    /// Stores the parts of `span` at `at` that no buffered piece covers (first copy wins) and
    /// counts overlaps whose bytes differ (where both copies were captured).
    fn insert_ooo(&mut self, d: &mut DirState, at: u64, span: Span<'_>) {
        let end = at + span.len();
        let start_key = d
            .ooo
            .range(..=at)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(at);
        let covered: Vec<(u64, u64)> = d
            .ooo
            .range(start_key..end)
            .map(|(k, v)| (*k, k + v.span().len()))
            .filter(|(_, e)| *e > at)
            .collect();
        let mut cursor = at;
        for (s, e) in covered.iter().copied().chain([(end, end)]) {
            if s > cursor {
                let piece = match span.slice(cursor - at, s.min(end) - at) {
                    Span::Data(d) => Piece::Data(Bytes::copy_from_slice(d)),
                    Span::Elided(n) => Piece::Elided(n),
                };
                let held = piece.span().held();
                d.ooo.insert(cursor, piece);
                d.ooo_bytes += held;
                *self.ooo_total += held;
            }
            if s < end {
                // A buffered piece (not the end sentinel) overlaps the new span: compare.
                let (os, oe) = (s.max(at), e.min(end));
                self.stats.duplicate_bytes += oe - os;
                let existing = d.ooo[&s].span().slice(os - s, oe - s);
                if let (Span::Data(a), Span::Data(b)) = (existing, span.slice(os - at, oe - at)) {
                    if a != b {
                        self.stats.overlap_conflicts += 1;
                    }
                }
            }
            cursor = cursor.max(e);
            if cursor >= end {
                break;
            }
        }
    }

    fn deliver(&mut self, d: &mut DirState, span: Span<'_>, ts: TimestampNs, ack: Option<u64>) {
        let len = span.len();
        d.delivered += len;
        d.next_seq = d.next_seq.map(|n| n + len as usize);
        self.stats.delivered_bytes += len;
        match span {
            Span::Data(data) => self
                .handler
                .data(self.conn, self.info, self.dir, data, ts, ack),
            Span::Elided(n) => self.handler.elided(self.conn, self.info, self.dir, n, ts),
        }
    }

    /// Delivers buffered pieces that have become contiguous.
    fn drain(&mut self, d: &mut DirState, ts: TimestampNs) {
        while let Some(entry) = d.ooo.first_entry() {
            let at = *entry.key();
            if at > d.delivered {
                break;
            }
            let piece = entry.remove();
            let span = piece.span();
            d.ooo_bytes -= span.held();
            *self.ooo_total -= span.held();
            let skip = d.delivered - at;
            if skip < span.len() {
                self.deliver(d, span.slice(skip, span.len()), ts, None);
            }
        }
        if !d.ooo.is_empty() {
            d.hole_since = ts;
        }
    }

    /// Gives up on the hole before the first buffered piece (or before the FIN).
    fn skip_hole(&mut self, d: &mut DirState, ts: TimestampNs) {
        if let Some(next) = d.ooo.first_key_value().map(|(k, _)| *k).or(d.fin_at) {
            self.skip_hole_to(d, next, ts);
        }
    }

    /// Declares the bytes up to the first buffered piece (or `limit`, if no piece is earlier)
    /// lost, then delivers what follows contiguously.
    fn skip_hole_to(&mut self, d: &mut DirState, limit: u64, ts: TimestampNs) {
        let target = d
            .ooo
            .first_key_value()
            .map(|(k, _)| *k)
            .unwrap_or(limit)
            .min(limit);
        if target <= d.delivered {
            return;
        }
        let lost = target - d.delivered;
        self.stats.lost_bytes += lost;
        d.delivered = target;
        d.next_seq = d.next_seq.map(|n| n + lost as usize);
        self.handler.gap(self.conn, self.info, self.dir, lost, ts);
        self.drain(d, ts);
    }

    fn check_end(&mut self, d: &mut DirState, ts: TimestampNs) {
        if !d.ended && d.fin_at.is_some_and(|f| d.delivered >= f) {
            d.ended = true;
            self.handler.end(self.conn, self.info, self.dir, ts);
        }
    }
}

#[cfg(test)]
mod tests;
