//! One direction of a connection: where its stream stands (`DirState`), the out-of-order
//! pieces it holds, and how a segment's bytes are accepted, held, delivered in order exactly
//! once, or given up as a gap (`DirCtx`). The flow table in `mod.rs` owns the connections and
//! hands each segment to its direction here.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{ConnInfo, Direction, ReassemblyConfig, ReassemblyStats, StreamHandler};
use crate::segment::{Segment, SeqNumber, TcpFlags, TimestampNs};

/// Part of a segment's payload: bytes captured, or a length whose bytes were not.
#[derive(Clone, Copy)]
pub(super) enum Span<'a> {
    Data(&'a [u8]),
    Elided(u64),
}

impl Span<'_> {
    #[inline]
    pub(super) fn len(&self) -> u64 {
        match self {
            Span::Data(d) => d.len() as u64,
            Span::Elided(n) => *n,
        }
    }

    /// Bytes of memory it takes when held.
    #[inline]
    pub(super) fn held(&self) -> usize {
        match self {
            Span::Data(d) => d.len(),
            Span::Elided(_) => 0,
        }
    }

    /// The part from `from` to `to` (offsets into the span).
    #[inline]
    pub(super) fn slice(&self, from: u64, to: u64) -> Self {
        match self {
            Span::Data(d) => Span::Data(&d[from as usize..to as usize]),
            Span::Elided(_) => Span::Elided(to - from),
        }
    }
}

/// A `Span` held out of order.
pub(super) enum Piece {
    Data(Bytes),
    Elided(u64),
}

impl Piece {
    #[inline]
    pub(super) fn span(&self) -> Span<'_> {
        match self {
            Piece::Data(d) => Span::Data(d),
            Piece::Elided(n) => Span::Elided(*n),
        }
    }
}

#[derive(Default)]
pub(super) struct DirState {
    /// Sequence number of the SYN, when seen.
    pub(super) isn: Option<SeqNumber>,
    /// Sequence number of the next byte to deliver; None until the first segment.
    pub(super) next_seq: Option<SeqNumber>,
    /// Bytes delivered (or declared lost) so far: the stream offset of `next_seq`.
    pub(super) delivered: u64,
    /// Out-of-order pieces keyed by stream offset; they never overlap.
    pub(super) ooo: BTreeMap<u64, Piece>,
    /// Bytes held in `ooo` (elided pieces hold none).
    pub(super) ooo_bytes: usize,
    /// Stream offset of the FIN, once seen.
    pub(super) fin_at: Option<u64>,
    pub(super) ended: bool,
    /// Capture time at which the current hole was first waited on.
    pub(super) hole_since: TimestampNs,
    /// Joined mid-stream on a segment without payload: where the stream stands is only a
    /// guess until data (or a FIN) arrives, and bytes before that are not counted lost.
    pub(super) provisional: bool,
    /// Joined mid-stream: the sequence and acknowledgement numbers of the first segment seen.
    /// They recognise this connection's own handshake when it arrives late (clones made on
    /// two CPUs reach the capture ring in either order: a server's first bytes can overtake
    /// the SYN).
    pub(super) joined: Option<(SeqNumber, SeqNumber)>,
}

impl DirState {
    /// Notes a segment's place in a direction's stream before its bytes are accepted. Returns
    /// whether this segment starts the direction (the handler is told once).
    #[inline]
    pub(super) fn observe(
        &mut self,
        seg: &Segment,
        is_syn: bool,
        stats: &mut ReassemblyStats,
    ) -> bool {
        if self.next_seq.is_none() {
            if is_syn {
                self.isn = Some(seg.seq());
                self.next_seq = Some(seg.seq() + 1);
            } else {
                self.next_seq = Some(seg.seq());
                self.provisional = seg.is_empty() && !seg.flags.contains(TcpFlags::FIN);
                self.joined = seg
                    .flags
                    .contains(TcpFlags::ACK)
                    .then(|| (seg.seq(), seg.ack()));
                stats.midstream_joins += 1;
            }
            return true;
        }
        if is_syn && self.isn.is_none() {
            // A late SYN-ACK (`late_handshake`): its retransmissions are duplicates.
            self.isn = Some(seg.seq());
        } else if self.provisional && (!seg.is_empty() || seg.flags.contains(TcpFlags::FIN)) {
            // The first bytes of a joined direction: the stream begins here for this agent,
            // like everything before the join.
            self.provisional = false;
            if offset_of(self, seg.seq()) > self.delivered as i64 {
                self.next_seq = Some(seg.seq());
            }
        }
        false
    }

    /// A FIN after the byte at `end` (exclusive); one beyond a hole waits like out-of-order data.
    #[inline]
    pub(super) fn fin(&mut self, end: SeqNumber, ts: TimestampNs) {
        let fin = offset_of(self, end);
        if fin >= self.delivered as i64 {
            if self.ooo.is_empty() && fin > self.delivered as i64 {
                self.hole_since = ts;
            }
            self.fin_at = Some(fin as u64);
        }
    }

    /// Waiting on a hole: data or a FIN lies beyond what was delivered.
    #[inline]
    pub(super) fn waiting(&self) -> bool {
        !self.ooo.is_empty() || self.fin_at.is_some_and(|f| f > self.delivered)
    }

    /// Sequence number just past everything this direction sent that was seen (data and FIN
    /// alike), once data or its FIN is delivered.
    #[inline]
    pub(super) fn end_seq(&self) -> Option<SeqNumber> {
        let next = self.next_seq?;
        let beyond = self.fin_at.unwrap_or(0).saturating_sub(self.delivered);
        Some(next + beyond as usize)
    }

    /// Sequence number just past the highest byte (or FIN, which takes one) seen, out of
    /// order ones included: the most the peer can acknowledge of what was seen.
    #[inline]
    pub(super) fn highest_seq(&self) -> Option<SeqNumber> {
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
    #[inline]
    pub(super) fn foreign(&self, seg: &Segment, peer: &DirState, max_jump: u32) -> bool {
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

/// Stream offset of `seq` relative to what was delivered (may be negative: already delivered).
#[inline]
pub(super) fn offset_of(d: &DirState, seq: SeqNumber) -> i64 {
    let next = d.next_seq.expect("direction started");
    d.delivered as i64 + (seq - next)
}

/// What one direction's processing needs, borrowed apart from the flow table.
pub(super) struct DirCtx<'a, H: StreamHandler> {
    pub(super) cfg: &'a ReassemblyConfig,
    pub(super) stats: &'a mut ReassemblyStats,
    pub(super) ooo_total: &'a mut usize,
    pub(super) handler: &'a mut H,
    pub(super) conn: &'a mut H::Conn,
    pub(super) info: &'a ConnInfo,
    pub(super) dir: Direction,
    /// The segment's acknowledgement, as an offset in the other direction's stream.
    pub(super) ack: Option<u64>,
}

impl<H: StreamHandler> DirCtx<'_, H> {
    pub(super) fn accept(
        &mut self,
        d: &mut DirState,
        seq: SeqNumber,
        span: Span<'_>,
        ts: TimestampNs,
    ) {
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
    pub(super) fn insert_ooo(&mut self, d: &mut DirState, at: u64, span: Span<'_>) {
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

    pub(super) fn deliver(
        &mut self,
        d: &mut DirState,
        span: Span<'_>,
        ts: TimestampNs,
        ack: Option<u64>,
    ) {
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
    pub(super) fn drain(&mut self, d: &mut DirState, ts: TimestampNs) {
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
    pub(super) fn skip_hole(&mut self, d: &mut DirState, ts: TimestampNs) {
        if let Some(next) = d.ooo.first_key_value().map(|(k, _)| *k).or(d.fin_at) {
            self.skip_hole_to(d, next, ts);
        }
    }

    /// Declares the bytes up to the first buffered piece (or `limit`, if no piece is earlier)
    /// lost, then delivers what follows contiguously.
    pub(super) fn skip_hole_to(&mut self, d: &mut DirState, limit: u64, ts: TimestampNs) {
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

    pub(super) fn check_end(&mut self, d: &mut DirState, ts: TimestampNs) {
        if !d.ended && d.fin_at.is_some_and(|f| d.delivered >= f) {
            d.ended = true;
            self.handler.end(self.conn, self.info, self.dir, ts);
        }
    }
}
