//! TCP stream reassembly for a passive observer.
//!
//! One `Reassembler` owns the flow table. Connections are keyed by their 4-tuple, oriented
//! client → server, with one sequence space per direction. Each direction's bytes are handed to
//! a `StreamHandler` exactly once and in order; what can't be delivered is reported as a gap.
//!
//! Memory is bounded for any input: a cap on connections (least recently active evicted), on
//! out-of-order bytes per direction and in total. A hole that is not filled within
//! `hole_timeout` or that would overflow a cap is declared lost and reported to the handler.
//! Every such event is counted in `ReassemblyStats`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroUsize;

use bytes::Bytes;
use lru::LruCache;

use crate::segment::{Segment, TcpFlags, TimestampNs};

/// Unique id of a connection for the life of the agent.
pub type ConnId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server: requests.
    ToServer = 0,
    /// Server to client: responses.
    ToClient = 1,
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
    fn data(
        &mut self,
        conn: &mut Self::Conn,
        info: &ConnInfo,
        dir: Direction,
        data: &[u8],
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
    /// Ports of the live service: they orient connections. Without a match, the SYN's sender is
    /// the client, else the destination is taken as the server.
    pub server_ports: Vec<u16>,
    pub max_flows: usize,
    pub max_ooo_bytes_per_dir: usize,
    pub max_ooo_segments_per_dir: usize,
    pub max_ooo_bytes_total: usize,
    pub hole_timeout_ns: u64,
    pub idle_timeout_ns: u64,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            server_ports: Vec::new(),
            max_flows: 65_536,
            max_ooo_bytes_per_dir: 1 << 20,
            max_ooo_segments_per_dir: 1024,
            max_ooo_bytes_total: 128 << 20,
            hole_timeout_ns: 500_000_000,
            idle_timeout_ns: 120_000_000_000,
        }
    }
}

/// Counters. Every payload byte handed in is delivered, a duplicate, held out of order, or
/// discarded at close; `lost_bytes` counts the sequence space never seen (holes given up on, and
/// what was missing before a FIN when the connection closed).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReassemblyStats {
    pub segments: u64,
    pub payload_bytes: u64,
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
    /// Out-of-order bytes thrown away because their connection closed before the hole filled.
    pub discarded_bytes: u64,
    /// Segments of a connection that has already closed (late retransmissions); ignored.
    pub after_close_segments: u64,
    /// Gauge: out-of-order bytes held now.
    pub ooo_bytes_held: u64,
}

#[derive(Default)]
struct DirState {
    /// Sequence number of the next byte to deliver; None until the first segment.
    next_seq: Option<u32>,
    /// Bytes delivered (or declared lost) so far: the stream offset of `next_seq`.
    delivered: u64,
    /// Out-of-order pieces keyed by stream offset; they never overlap.
    ooo: BTreeMap<u64, Bytes>,
    ooo_bytes: usize,
    /// Stream offset of the FIN, once seen.
    fin_at: Option<u64>,
    ended: bool,
    /// Capture time at which the current hole was first waited on.
    hole_since: TimestampNs,
}

impl DirState {
    /// Waiting on a hole: data or a FIN lies beyond what was delivered.
    fn waiting(&self) -> bool {
        !self.ooo.is_empty() || self.fin_at.is_some_and(|f| f > self.delivered)
    }
}

struct Flow<C> {
    info: ConnInfo,
    dirs: [DirState; 2],
    conn: C,
    last_ts: TimestampNs,
}

/// Connection key, oriented (client, server).
type ConnKey = (SocketAddr, SocketAddr);

pub struct Reassembler<H: StreamHandler> {
    cfg: ReassemblyConfig,
    flows: LruCache<ConnKey, Flow<H::Conn>>,
    /// Connections that hold out-of-order data, for the hole timeout.
    with_holes: HashSet<ConnKey>,
    /// Recently closed connections, so that late retransmissions do not reopen them.
    closed: LruCache<ConnKey, ()>,
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
            with_holes: HashSet::new(),
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

    fn orient(&self, seg: &Segment) -> (ConnKey, Direction) {
        let (src, dst) = (seg.flow.src, seg.flow.dst);
        let ports = &self.cfg.server_ports;
        let to_server = if ports.contains(&dst.port()) {
            true
        } else if ports.contains(&src.port()) {
            false
        } else if seg.flags.contains(TcpFlags::SYN) {
            !seg.flags.contains(TcpFlags::ACK)
        } else {
            true
        };
        if to_server {
            ((src, dst), Direction::ToServer)
        } else {
            ((dst, src), Direction::ToClient)
        }
    }

    pub fn process(&mut self, seg: &Segment) {
        self.stats.segments += 1;
        self.stats.payload_bytes += seg.payload.len() as u64;
        let (key, dir) = self.orient(seg);
        let is_syn = seg.flags.contains(TcpFlags::SYN);
        if !self.flows.contains(&key) {
            if self.closed.contains(&key) && !is_syn {
                self.stats.after_close_segments += 1;
                return;
            }
            self.closed.pop(&key);
            self.open_flow(key, seg.ts);
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
        if seg.flags.contains(TcpFlags::RST) {
            self.close_flow(&key, CloseReason::Rst, seg.ts);
            return;
        }
        let d = &mut flow.dirs[dir as usize];
        if d.next_seq.is_none() {
            if is_syn {
                d.next_seq = Some(seg.seq.wrapping_add(1));
            } else {
                d.next_seq = Some(seg.seq);
                stats.midstream_joins += 1;
            }
            handler.start(&mut flow.conn, &flow.info, dir, is_syn);
        }
        let data_seq = if is_syn {
            seg.seq.wrapping_add(1)
        } else {
            seg.seq
        };
        let mut ctx = DirCtx {
            cfg,
            stats,
            ooo_total,
            handler,
            conn: &mut flow.conn,
            info: &flow.info,
            dir,
        };
        ctx.accept(d, data_seq, &seg.payload, seg.ts);
        if seg.flags.contains(TcpFlags::FIN) {
            let fin = offset_of(d, data_seq.wrapping_add(seg.payload.len() as u32));
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

    fn open_flow(&mut self, key: ConnKey, ts: TimestampNs) {
        if self.flows.len() >= self.cfg.max_flows {
            if let Some((old, _)) = self.flows.peek_lru() {
                let old = *old;
                self.close_flow(&old, CloseReason::Evicted, ts);
            }
        }
        let info = ConnInfo {
            id: self.next_id,
            client: key.0,
            server: key.1,
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
                last_ts: ts,
            },
        );
    }

    fn close_flow(&mut self, key: &ConnKey, reason: CloseReason, ts: TimestampNs) {
        let Some(flow) = self.flows.pop(key) else {
            return;
        };
        for d in &flow.dirs {
            self.ooo_total -= d.ooo_bytes;
            self.stats.discarded_bytes += d.ooo_bytes as u64;
            // With the FIN seen, the bytes still missing before it are known to be lost.
            if let Some(fin) = d.fin_at {
                let missing = fin
                    .saturating_sub(d.delivered)
                    .saturating_sub(d.ooo_bytes as u64);
                self.stats.lost_bytes += missing;
            }
        }
        self.with_holes.remove(key);
        match reason {
            CloseReason::Fin => self.stats.closed_fin += 1,
            CloseReason::Rst => self.stats.closed_rst += 1,
            CloseReason::Idle => self.stats.evicted_idle += 1,
            CloseReason::Evicted => self.stats.evicted_full += 1,
            CloseReason::Shutdown => {}
        }
        if matches!(reason, CloseReason::Fin | CloseReason::Rst) {
            self.closed.put(*key, ());
        }
        self.handler.close(flow.conn, &flow.info, reason, ts);
    }
}

/// Stream offset of `seq` relative to what was delivered (may be negative: already delivered).
fn offset_of(d: &DirState, seq: u32) -> i64 {
    let next = d.next_seq.expect("direction started");
    d.delivered as i64 + seq.wrapping_sub(next) as i32 as i64
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
}

impl<H: StreamHandler> DirCtx<'_, H> {
    fn accept(&mut self, d: &mut DirState, seq: u32, payload: &[u8], ts: TimestampNs) {
        if payload.is_empty() {
            return;
        }
        let mut at = offset_of(d, seq);
        let mut data = payload;
        let end = at + data.len() as i64;
        if end <= d.delivered as i64 {
            self.stats.duplicate_bytes += data.len() as u64;
            return;
        }
        if at < d.delivered as i64 {
            let skip = (d.delivered as i64 - at) as usize;
            self.stats.duplicate_bytes += skip as u64;
            data = &data[skip..];
            at = d.delivered as i64;
        }
        let at = at as u64;
        if at == d.delivered {
            self.deliver(d, data, ts);
            self.drain(d, ts);
            return;
        }
        self.stats.out_of_order_segments += 1;
        if d.ooo.is_empty() {
            d.hole_since = ts;
        }
        // Make room, giving up on the oldest hole, until the new piece fits or is deliverable.
        loop {
            let fits = d.ooo_bytes + data.len() <= self.cfg.max_ooo_bytes_per_dir
                && d.ooo.len() < self.cfg.max_ooo_segments_per_dir
                && *self.ooo_total + data.len() <= self.cfg.max_ooo_bytes_total;
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
            let skip = (d.delivered - at) as usize;
            if skip < data.len() {
                self.stats.duplicate_bytes += skip as u64;
                self.deliver(d, &data[skip..], ts);
                self.drain(d, ts);
            } else {
                self.stats.duplicate_bytes += data.len() as u64;
            }
            return;
        }
        self.insert_ooo(d, at, data);
    }

    /// Stores the parts of `data` at `at` that no buffered piece covers (first copy wins) and
    /// counts overlaps whose bytes differ.
    fn insert_ooo(&mut self, d: &mut DirState, at: u64, data: &[u8]) {
        let end = at + data.len() as u64;
        let start_key = d
            .ooo
            .range(..=at)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(at);
        let covered: Vec<(u64, u64)> = d
            .ooo
            .range(start_key..end)
            .map(|(k, v)| (*k, k + v.len() as u64))
            .filter(|(_, e)| *e > at)
            .collect();
        let mut cursor = at;
        for (s, e) in covered.iter().copied().chain([(end, end)]) {
            if s > cursor {
                let piece = &data[(cursor - at) as usize..(s.min(end) - at) as usize];
                d.ooo.insert(cursor, Bytes::copy_from_slice(piece));
                d.ooo_bytes += piece.len();
                *self.ooo_total += piece.len();
            }
            if s < end {
                // A buffered piece (not the end sentinel) overlaps the new data: compare.
                let (os, oe) = (s.max(at), e.min(end));
                let existing = &d.ooo[&s];
                let a = &existing[(os - s) as usize..(oe - s) as usize];
                let b = &data[(os - at) as usize..(oe - at) as usize];
                self.stats.duplicate_bytes += oe - os;
                if a != b {
                    self.stats.overlap_conflicts += 1;
                }
            }
            cursor = cursor.max(e);
            if cursor >= end {
                break;
            }
        }
    }

    fn deliver(&mut self, d: &mut DirState, data: &[u8], ts: TimestampNs) {
        d.delivered += data.len() as u64;
        d.next_seq = Some(d.next_seq.unwrap().wrapping_add(data.len() as u32));
        self.stats.delivered_bytes += data.len() as u64;
        self.handler.data(self.conn, self.info, self.dir, data, ts);
    }

    /// Delivers buffered pieces that have become contiguous.
    fn drain(&mut self, d: &mut DirState, ts: TimestampNs) {
        while let Some(entry) = d.ooo.first_entry() {
            let at = *entry.key();
            if at > d.delivered {
                break;
            }
            let piece = entry.remove();
            d.ooo_bytes -= piece.len();
            *self.ooo_total -= piece.len();
            let skip = (d.delivered - at) as usize;
            if skip < piece.len() {
                self.deliver(d, &piece[skip..], ts);
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
        d.next_seq = Some(d.next_seq.unwrap().wrapping_add(lost as u32));
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
