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
use smallvec::SmallVec;

use super::program::kernel_addr;
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
            &kernel_addr(client.ip()).addr,
            &kernel_addr(server.ip()).addr,
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
fn realtime_offset_ns() -> i64 {
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

/// Longest a mark waits for its clone (lost when the capture ring was full) before the
/// records behind it go on.
const MARK_WAIT_NS: u64 = 20_000_000;
/// Longest a clone waits for its mark to become readable.
const ORPHAN_WAIT_NS: u64 = 5_000_000;
/// Most clones waiting for their mark's turn: beyond it, marks stop being waited for.
const MAX_WAITING: usize = 1 << 16;

/// Puts the clones back in the kernel's order among the response-head records. The ring holds,
/// in the order the program ran, the records and a `CloneMark` for each clone; a clone goes
/// out at its mark's place. A mark whose clone is lost (a full capture ring) is known lost as
/// soon as a later clone of the same CPU arrives, and is waited for `MARK_WAIT_NS` at most.
pub(super) struct HeadMerge {
    ring: RingBuf<MapData>,
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

impl HeadMerge {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        HeadMerge {
            ring,
            queue: VecDeque::new(),
            marked: StdHashMap::default(),
            waiting: Default::default(),
            arrived: StdHashMap::default(),
            next_position: 0,
            orphans: VecDeque::new(),
        }
    }

    /// Whether records or clones wait here for their turn (which comes with time, too).
    pub(super) fn holds(&self) -> bool {
        !self.queue.is_empty() || !self.orphans.is_empty()
    }

    /// Takes the clones just read from the capture ring (their marks are in the records ring
    /// by then: the program writes a mark before its clone is received) and returns what can
    /// go on, in the kernel's order. `flush` gives up waiting (at the stop).
    pub(super) fn merge(
        &mut self,
        clones: SegmentBatch,
        stats: &CaptureStats,
        flush: bool,
    ) -> SegmentBatch {
        self.read(stats);
        let now = crate::pipeline::now_ns();
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
            self.release(&mut out, stats, Some(position), flush, now);
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
        self.release(&mut out, stats, None, flush, now);
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
        flush: bool,
        now: u64,
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
            let lost = flush
                || self.arrived.get(cpu).is_some_and(|p| *p > position)
                || ts.saturating_add(MARK_WAIT_NS) <= now
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

    /// Appends what the ring holds to `queue`.
    fn read(&mut self, stats: &CaptureStats) {
        let mut buf = BytesMut::new();
        let mut ends = Vec::new();
        while let Some(item) = self.ring.next() {
            buf.extend_from_slice(&item);
            ends.push(buf.len());
        }
        if ends.is_empty() {
            return;
        }
        let all: Bytes = buf.freeze();
        let offset = realtime_offset_ns();
        let mut start = 0;
        for end in ends {
            stats.head_records.fetch_add(1, Ordering::Relaxed);
            match parse_record(&all.slice(start..end), offset) {
                Ok(r) => {
                    let position = self.next_position;
                    if let Record::Mark(key, _, cpu) = &r {
                        self.next_position += 1;
                        self.marked.entry(*key).or_default().push((position, *cpu));
                    }
                    self.queue.push_back((position, r));
                }
                Err(e) => stats.frame_error(e),
            }
            start = end;
        }
    }
}
