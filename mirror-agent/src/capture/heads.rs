//! Response heads: the kernel describes each response segment (flow, sequence, length, flags
//! and its first bytes) in a ring buffer instead of cloning it. The capture thread reads the
//! records between ring blocks and merges them among the clones by time (`HeadMerge`), as
//! `Segment`s whose uncaptured rest is `elided`. Connections that heads cannot frame are listed
//! in `FULL_RESPONSES`, after which the kernel clones their responses whole.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use aya::maps::{HashMap, MapData, RingBuf};
use bytes::{Bytes, BytesMut};

use super::{CaptureStats, SegmentBatch};
use crate::segment::{parse_head_record, Segment, TimestampNs};

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
            &kernel_addr(client.ip()),
            &kernel_addr(server.ip()),
            client.port(),
            server.port(),
        );
        self.map.insert(hash, 1, 0)?;
        Ok(())
    }
}

/// An address as the kernel program hashes it: IPv4 mapped into IPv6.
fn kernel_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// CLOCK_REALTIME less CLOCK_MONOTONIC, in nanoseconds: records carry the monotonic clock,
/// clones (and everything downstream) the real-time one.
fn realtime_offset_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// A clone is stamped when the capture ring receives it, a little after the kernel program
/// saw it; a record when the program saw it. A record is placed after every clone stamped up
/// to this much later than itself, so that a response never precedes the handshake or request
/// that came before it on the wire.
const CLONE_LAG_NS: u64 = 2_000_000;
/// Longest a record waits for clones to pass it (when few clones come).
const MAX_HOLD_NS: u64 = 20_000_000;
/// Most records held: beyond it the oldest go on at once.
const MAX_HELD: usize = 1 << 16;

/// Merges response-head records among the clones, in time order.
pub(super) struct HeadMerge {
    ring: RingBuf<MapData>,
    /// Records read and not yet placed, oldest first.
    held: VecDeque<Segment>,
    /// Newest clone time seen.
    newest_clone: TimestampNs,
}

impl HeadMerge {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        HeadMerge {
            ring,
            held: VecDeque::new(),
            newest_clone: 0,
        }
    }

    /// Reads the records the ring holds and places those that are due among `batch` (clones,
    /// in ring order): each before the first clone stamped more than `CLONE_LAG_NS` after it.
    /// `flush` places them all (at the stop).
    pub(super) fn merge(
        &mut self,
        batch: SegmentBatch,
        stats: &CaptureStats,
        flush: bool,
    ) -> SegmentBatch {
        read_records(&mut self.ring, stats, &mut self.held);
        if let Some(newest) = batch.iter().map(|s| s.ts).max() {
            self.newest_clone = self.newest_clone.max(newest);
        }
        let now = crate::pipeline::now_ns();
        let due = |rec: &Segment, held: usize| {
            flush
                || held > MAX_HELD
                || rec.ts + CLONE_LAG_NS < self.newest_clone
                || rec.ts + MAX_HOLD_NS <= now
        };
        let mut out = Vec::with_capacity(batch.len() + self.held.len());
        let mut clones = batch.into_iter().peekable();
        while let Some(rec) = self.held.front() {
            if !due(rec, self.held.len()) {
                break;
            }
            while let Some(c) = clones.next_if(|c| c.ts <= rec.ts + CLONE_LAG_NS) {
                out.push(c);
            }
            out.extend(self.held.pop_front());
        }
        out.extend(clones);
        out
    }
}

/// Appends the records the ring holds, as segments on the capture clock, in time order.
fn read_records(ring: &mut RingBuf<MapData>, stats: &CaptureStats, held: &mut VecDeque<Segment>) {
    let mut buf = BytesMut::new();
    let mut ends = Vec::new();
    while let Some(item) = ring.next() {
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
        stats
            .head_records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match parse_head_record(&all.slice(start..end), offset) {
            Ok(seg) => held.push_back(seg),
            Err(e) => stats.frame_error(e),
        }
        start = end;
    }
    // Records from several CPUs interleave in reservation order, nearly sorted.
    held.make_contiguous().sort_by_key(|s| s.ts);
}
