//! Response heads: the kernel describes each response segment (flow, sequence, length, flags
//! and its first bytes) in a ring buffer instead of cloning it, and marks there where each
//! clone stands. The capture thread reads the records between ring blocks and puts the clones
//! back among them in the kernel's order (`HeadMerge`); described segments become `Segment`s
//! whose uncaptured rest is `elided`. Connections that heads cannot frame are listed
//! in `FULL_RESPONSES`, after which the kernel clones their responses whole.

use std::collections::{HashMap as StdHashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::error::{CaptureError, Result};
use aya::maps::{HashMap, MapData, RingBuf};
use bytes::{Bytes, BytesMut};
use mirror_common::AddrKey;
use smallvec::SmallVec;

use super::{CaptureStats, SegmentBatch};
use crate::segment::{parse_record, MarkKey, Record, Segment, TimestampNs};
use crate::FastHash;

/// The kernel's list of connections whose responses are cloned whole.
pub struct FullResponses {
    map: HashMap<MapData, u32, u8>,
}

impl FullResponses {
    pub(super) fn new(map: HashMap<MapData, u32, u8>) -> Self {
        FullResponses { map }
    }

    /// From now on, the kernel clones the responses of the connection between `client` and
    /// `server` whole.
    pub fn insert(&mut self, client: SocketAddr, server: SocketAddr) -> Result<()> {
        let hash = mirror_common::flow_hash(
            &AddrKey::from_ip(client.ip()).addr,
            &AddrKey::from_ip(server.ip()).addr,
            client.port(),
            server.port(),
        );
        self.map
            .insert(hash, 1, 0)
            .map_err(CaptureError::map(mirror_common::MAP_FULL_RESPONSES))
    }
}

/// CLOCK_REALTIME less CLOCK_MONOTONIC, in nanoseconds: records carry the monotonic clock,
/// clones (and everything downstream) the real-time one.
pub(super) fn realtime_offset_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

pub(super) fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Longest a mark waits for its clone (lost when the capture ring was full) once the reader
/// has caught up with the capture ring, before the records behind it go on.
const MARK_WAIT_NS: u64 = 20_000_000;
/// Longest a mark waits for its clone while the reader is behind, its clone perhaps in a block
/// not read yet: the records behind it must go on some time even under a load that never lets
/// the reader catch up.
const MARK_WAIT_BEHIND_NS: u64 = 1_000_000_000;
/// Longest a clone waits for its mark to become readable.
const ORPHAN_WAIT_NS: u64 = 5_000_000;
/// Most clones waiting for their mark's turn: beyond it, marks stop being waited for.
const MAX_WAITING: usize = 1 << 16;

/// How far the capture ring had been read when clones are merged, which says whether a mark
/// waiting for its clone may be given up for lost by its age: a reader that was descheduled or
/// busy finds marks older than `MARK_WAIT_NS` whose clones sit in blocks it has not read yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// More blocks were ready to be read.
    Behind,
    /// No block was ready when looked at after the merge's `now`: every clone made before
    /// `now` less the block retire time (a few milliseconds) has been read.
    CaughtUp,
    /// The stop: nothing more comes.
    Flush,
}

/// Puts the clones back in the kernel's order among the response-head records, read from the
/// kernel's ring buffer (`HeadMerge::merge`).
pub(super) struct HeadMerge {
    ring: RingBuf<MapData>,
    ring_bytes: usize,
    /// The share of the ring the last read found full: the backlog the reader left the kernel.
    fill: f64,
    order: KernelOrder,
}

impl HeadMerge {
    pub(super) fn new(ring: RingBuf<MapData>, ring_bytes: u32) -> Self {
        HeadMerge {
            ring,
            ring_bytes: ring_bytes as usize,
            fill: 0.0,
            order: KernelOrder::default(),
        }
    }

    /// How full the ring was when last read, 0 to 1.
    pub(super) fn fill(&self) -> f64 {
        self.fill
    }

    /// Whether records or clones wait here for their turn (which comes with time, too).
    pub(super) fn holds(&self) -> bool {
        self.order.holds()
    }

    /// Takes the clones just read from the capture ring (their marks are in the records ring
    /// by then: the program writes a mark before its clone is received) and returns what can
    /// go on, in the kernel's order; `now` was read before `progress` was found.
    pub(super) fn merge(
        &mut self,
        clones: SegmentBatch,
        stats: &CaptureStats,
        now: TimestampNs,
        progress: Progress,
    ) -> SegmentBatch {
        self.read(stats);
        self.order.merge(clones, stats, now, progress)
    }

    /// Appends what the ring holds to the records waiting.
    fn read(&mut self, stats: &CaptureStats) {
        let mut buf = BytesMut::new();
        let mut ends = Vec::new();
        while let Some(item) = self.ring.next() {
            buf.extend_from_slice(&item);
            ends.push(buf.len());
        }
        // Each record also takes an 8-byte header in the ring.
        self.fill = (buf.len() + 8 * ends.len()) as f64 / self.ring_bytes.max(1) as f64;
        if ends.is_empty() {
            return;
        }
        let all: Bytes = buf.freeze();
        let offset = realtime_offset_ns();
        let mut start = 0;
        for end in ends {
            stats.head_records.fetch_add(1, Ordering::Relaxed);
            match parse_record(&all.slice(start..end), offset) {
                Ok(r) => self.order.push(r),
                Err(e) => stats.frame_error(e),
            }
            start = end;
        }
    }
}

/// The records in the kernel's order, and the clones waiting for their marks' turn. The records
/// hold a `CloneMark` for each clone; a clone goes out at its mark's place. A mark whose clone
/// is lost (a full capture ring) is known lost as soon as a later clone of the same CPU arrives,
/// and is waited for `MARK_WAIT_NS` at most once the reader has caught up.
#[derive(Default)]
struct KernelOrder {
    /// Records and marks read and not yet placed, in the kernel's order, each mark with its
    /// position among all marks.
    queue: VecDeque<(u64, Record)>,
    /// Marks in `queue` by key: their positions and CPUs, oldest first (rarely more than one,
    /// so inline). Hashed with foldhash: SipHash was a tenth of this thread's time.
    marked: StdHashMap<MarkKey, SmallVec<[(u64, u32); 2]>, FastHash>,
    /// Clones whose mark is in `queue`, by mark position.
    waiting: std::collections::BTreeMap<u64, Segment>,
    /// Per CPU, the latest mark position whose clone arrived.
    arrived: StdHashMap<u32, u64, FastHash>,
    next_position: u64,
    /// Clones whose mark was not readable yet (the ring hands records over in reservation
    /// order, and an earlier one may still be being written), with when they were read.
    orphans: VecDeque<(TimestampNs, Segment)>,
}

impl KernelOrder {
    fn holds(&self) -> bool {
        !self.queue.is_empty() || !self.orphans.is_empty()
    }

    /// Appends a record read from the kernel's ring.
    fn push(&mut self, r: Record) {
        let position = self.next_position;
        if let Record::Mark(key, _, cpu) = &r {
            self.next_position += 1;
            self.marked.entry(*key).or_default().push((position, *cpu));
        }
        self.queue.push_back((position, r));
    }

    fn merge(
        &mut self,
        clones: SegmentBatch,
        stats: &CaptureStats,
        now: TimestampNs,
        progress: Progress,
    ) -> SegmentBatch {
        let flush = progress == Progress::Flush;
        let mut out = Vec::with_capacity(clones.len() + self.queue.len());
        let orphans = std::mem::take(&mut self.orphans);
        let clones = orphans
            .into_iter()
            .chain(clones.into_iter().map(|c| (now, c)));
        for (read_at, mut c) in clones {
            let key = MarkKey::of(&c);
            let Some((position, cpu)) = self.take_mark(&key) else {
                if flush || read_at.saturating_add(ORPHAN_WAIT_NS) <= now {
                    // Its mark did not fit in the ring (counted by the kernel): as it comes.
                    out.push(c);
                } else {
                    c.payload = Bytes::copy_from_slice(&c.payload);
                    self.orphans.push_back((read_at, c));
                }
                continue;
            };
            let latest = self.arrived.entry(cpu).or_default();
            *latest = (*latest).max(position);
            self.release(&mut out, stats, Some(position), now, progress);
            if let Some((front, Record::Mark(_, ts, _))) = self.queue.front() {
                if *front == position {
                    // Its turn already (the usual case): on at once, without a copy.
                    c.ts = *ts;
                    self.queue.pop_front();
                    out.push(c);
                    continue;
                }
            }
            // Held apart from its capture-ring block, which goes back to the kernel.
            c.payload = Bytes::copy_from_slice(&c.payload);
            self.waiting.insert(position, c);
        }
        self.release(&mut out, stats, None, now, progress);
        if flush {
            out.extend(std::mem::take(&mut self.waiting).into_values());
        }
        out
    }

    /// Moves to `out` what leads `queue` and may go: records, and marks whose clone waits
    /// (the clone goes, timed when the program saw it, as records are, so that live durations
    /// run between two instants on one clock) or is known lost. Stops at a mark still waited for,
    /// and at the mark at `in_hand`, whose clone the caller holds.
    fn release(
        &mut self,
        out: &mut Vec<Segment>,
        stats: &CaptureStats,
        in_hand: Option<u64>,
        now: TimestampNs,
        progress: Progress,
    ) {
        while let Some((position, front)) = self.queue.front() {
            let position = *position;
            let Record::Mark(_, ts, cpu) = front else {
                if let Some((_, Record::Head(seg))) = self.queue.pop_front() {
                    out.push(seg);
                }
                continue;
            };
            if let Some(mut c) = self.waiting.remove(&position) {
                c.ts = *ts;
                self.queue.pop_front();
                out.push(c);
                continue;
            }
            if in_hand == Some(position) {
                break;
            }
            let wait = if progress == Progress::CaughtUp {
                MARK_WAIT_NS
            } else {
                MARK_WAIT_BEHIND_NS
            };
            let lost = progress == Progress::Flush
                || self.arrived.get(cpu).is_some_and(|p| *p > position)
                || ts.saturating_add(wait) <= now
                || self.waiting.len() > MAX_WAITING;
            if !lost {
                break;
            }
            if let Some((_, Record::Mark(key, ..))) = self.queue.pop_front() {
                self.forget(key, position);
            }
            stats.marks_unmatched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The oldest mark of `key` still in `queue`; an entry left empty goes, so that `marked`
    /// holds only marks in `queue`.
    fn take_mark(&mut self, key: &MarkKey) -> Option<(u64, u32)> {
        let marks = self.marked.get_mut(key)?;
        let oldest = (!marks.is_empty()).then(|| marks.remove(0));
        if marks.is_empty() {
            self.marked.remove(key);
        }
        oldest
    }

    /// Drops a mark given up on from `marked`.
    fn forget(&mut self, key: MarkKey, position: u64) {
        if let Some(q) = self.marked.get_mut(&key) {
            q.retain(|(p, _)| *p != position);
            if q.is_empty() {
                self.marked.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Conversation;

    const MS: u64 = 1_000_000;
    /// The client's initial sequence number: its SYN's.
    const SYN: u32 = 1000;

    /// A connection's SYN described in a record, then two request clones made on two CPUs,
    /// their marks in the kernel's order.
    fn kernel_order() -> (KernelOrder, Segment, Segment) {
        let mut c = Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", SYN, 5000);
        let syn = c.handshake().remove(0);
        let mut data = c.client_data(&[b'x'; 200], 100);
        let (a, b) = (data.remove(0), data.remove(0));
        let mut order = KernelOrder::default();
        order.push(Record::Head(syn));
        order.push(Record::Mark(MarkKey::of(&a), 10 * MS, 0));
        order.push(Record::Mark(MarkKey::of(&b), 10 * MS, 1));
        (order, a, b)
    }

    fn seqs(out: &[Segment]) -> Vec<u32> {
        out.iter().map(|s| s.seq).collect()
    }

    /// A reader that was descheduled comes back long after the marks were written, the clones
    /// still in blocks it has not read, the later one first: the earlier mark is not given up.
    #[test]
    fn a_reader_behind_waits_for_clones_in_blocks_not_read_yet() {
        let (mut order, a, b) = kernel_order();
        let stats = CaptureStats::default();
        let out = order.merge(vec![b.clone()], &stats, 500 * MS, Progress::Behind);
        assert_eq!(
            seqs(&out),
            [SYN],
            "the SYN only: the first clone's turn comes first"
        );
        let out = order.merge(vec![a.clone()], &stats, 501 * MS, Progress::CaughtUp);
        assert_eq!(seqs(&out), [a.seq, b.seq]);
        assert_eq!(stats.marks_unmatched.load(Ordering::Relaxed), 0);
        assert!(!order.holds());
    }

    /// Once the reader has caught up, a clone not there after `MARK_WAIT_NS` was lost: the
    /// records and clones behind its mark go on.
    #[test]
    fn a_reader_caught_up_gives_a_mark_up_after_its_wait() {
        let (mut order, _, b) = kernel_order();
        let stats = CaptureStats::default();
        let out = order.merge(vec![b.clone()], &stats, 25 * MS, Progress::CaughtUp);
        assert_eq!(seqs(&out), [SYN], "not before its wait");
        let out = order.merge(Vec::new(), &stats, 31 * MS, Progress::CaughtUp);
        assert_eq!(seqs(&out), [b.seq]);
        assert_eq!(stats.marks_unmatched.load(Ordering::Relaxed), 1);
    }

    /// A load that never lets the reader catch up still moves the records on, a second late.
    #[test]
    fn a_reader_always_behind_gives_a_mark_up_after_a_second() {
        let (mut order, _, b) = kernel_order();
        let stats = CaptureStats::default();
        let out = order.merge(vec![b.clone()], &stats, 900 * MS, Progress::Behind);
        assert_eq!(seqs(&out), [SYN]);
        let out = order.merge(Vec::new(), &stats, 1_011 * MS, Progress::Behind);
        assert_eq!(seqs(&out), [b.seq]);
        assert_eq!(stats.marks_unmatched.load(Ordering::Relaxed), 1);
    }
}
