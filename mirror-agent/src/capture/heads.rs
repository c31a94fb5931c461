//! Response heads: the kernel describes each response segment (flow, sequence, length, flags
//! and its first bytes) in a ring buffer instead of cloning it, and a reader thread turns the
//! records into `Segment`s whose uncaptured rest is `elided`. Connections that heads cannot
//! frame are listed in `FULL_RESPONSES`, after which the kernel clones their responses whole.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use aya::maps::{HashMap, MapData, RingBuf};
use bytes::{Bytes, BytesMut};
use crossbeam_channel::Sender;

use super::{send_batch, CaptureStats, SegmentBatch};
use crate::segment::{parse_head_record, Segment};

/// How often the ring is read when the kernel does not wake the reader (it wakes it only when
/// the ring is half full: a wake-up per record costs more than the record).
const POLL_INTERVAL: Duration = Duration::from_millis(5);

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

/// How long a record waits before it joins the clones. Records reach the agent within a poll
/// interval; clones take the veth, the backlog and a ring block's retirement, and under load
/// that is the slower path. Holding records this long, by the kernel's own time, keeps a
/// response behind the handshake and request clones that came before it on the wire, so that
/// reassembly sees a connection in order. Timing is unaffected: records carry their time.
const HOLD_NS: u64 = 20_000_000;
/// Most records held (about 2.5 s of 20k responses/s with 16 segments each still to read):
/// beyond it the oldest go on at once.
const MAX_HELD: usize = 1 << 16;

/// Starts the thread that reads the records until `stop`, then what the ring still holds.
pub(super) fn spawn_reader(
    mut ring: RingBuf<MapData>,
    tx: Sender<SegmentBatch>,
    stats: Arc<CaptureStats>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    Ok(std::thread::Builder::new()
        .name("mirror-heads".into())
        .spawn(move || {
            // (kernel time, segment), oldest first.
            let mut held: VecDeque<(u64, Segment)> = VecDeque::new();
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let mut pfd = libc::pollfd {
                    fd: ring.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL.as_millis() as i32) };
                read_records(&mut ring, &stats, &mut held);
                let due = monotonic_ns().saturating_sub(HOLD_NS);
                let mut batch = Vec::new();
                while let Some((at, _)) = held.front() {
                    if *at > due && held.len() <= MAX_HELD && !stopping {
                        break;
                    }
                    batch.extend(held.pop_front().map(|(_, seg)| seg));
                }
                if !batch.is_empty() && !send_batch(&tx, batch, &stats, &stop) {
                    return;
                }
                if stopping {
                    return;
                }
            }
        })?)
}

fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// Everything the ring holds now, as segments with their kernel (monotonic) time.
fn read_records(
    ring: &mut RingBuf<MapData>,
    stats: &CaptureStats,
    held: &mut VecDeque<(u64, Segment)>,
) {
    let mut buf = BytesMut::new();
    let mut ends = Vec::new();
    while let Some(item) = ring.next() {
        buf.extend_from_slice(&item);
        ends.push(buf.len());
    }
    let all: Bytes = buf.freeze();
    let offset = realtime_offset_ns();
    let mut start = 0;
    for end in ends {
        stats.head_records.fetch_add(1, Ordering::Relaxed);
        match parse_head_record(&all.slice(start..end), offset) {
            Ok(seg) => held.push_back(((seg.ts as i64 - offset).max(0) as u64, seg)),
            Err(e) => stats.frame_error(e),
        }
        start = end;
    }
}
