//! AF_PACKET socket with a TPACKET_V3 mmap receive ring.
//!
//! Frames are never copied: each ring block is wrapped in a `Bytes` owner, frames are slices of
//! it, and the block goes back to the kernel when its last slice is dropped. A consumer that holds
//! a slice holds the block, so downstream stages copy what they keep.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use libc::{c_int, c_void, tpacket3_hdr, tpacket_block_desc, tpacket_req3};

/// Ring geometry. A block must hold the largest frame: GSO/GRO skbs reach 64 KiB (more with BIG
/// TCP), so blocks are 1 MiB by default.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    pub block_size: usize,
    pub block_count: usize,
    /// The kernel hands a partly filled block over after this many milliseconds.
    pub retire_ms: u32,
}

/// How long the reader pauses after a wake-up that brought no block.
const SPURIOUS_WAKE_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            block_size: 1 << 20,
            block_count: 32,
            retire_ms: 4,
        }
    }
}

/// The mmap'd ring and the socket it belongs to. Unmapped (then closed) when the last block owner
/// and the reader are gone.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; blocks are handed between the kernel and exactly one
// user-side owner through the block status word.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and nothing references them any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Owns one block while user space reads it; returns it to the kernel on drop.
struct BlockOwner {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
    /// This block's flag in `PacketRing::handed_out`.
    handed_out: Arc<[AtomicBool]>,
    index: usize,
}

impl AsRef<[u8]> for BlockOwner {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the block lies inside the mapping and the kernel does not write it while its
        // status is TP_STATUS_USER, which holds until this owner is dropped.
        unsafe { std::slice::from_raw_parts(self.map.ptr.add(self.offset), self.len) }
    }
}

impl Drop for BlockOwner {
    fn drop(&mut self) {
        // The kernel's first, then the flag: a block the reader sees as ready is never one it
        // has already read.
        block_status(&self.map, self.offset).store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.handed_out[self.index].store(false, Ordering::Release);
    }
}

fn block_status(map: &Mapping, offset: usize) -> &AtomicU32 {
    // SAFETY: block_status is the first u32 of the v1 block header, inside the mapping and 4-byte
    // aligned (blocks are page aligned).
    unsafe {
        let desc = map.ptr.add(offset) as *const tpacket_block_desc;
        &*(std::ptr::addr_of!((*desc).hdr.bh1.block_status) as *const AtomicU32)
    }
}

/// One captured frame: a zero-copy slice of its ring block.
pub struct Frame {
    pub data: Bytes,
    /// Length on the wire; larger than `data.len()` only if the block could not hold it.
    pub wire_len: usize,
    pub ts_ns: u64,
}

/// Socket-level counters, accumulated from PACKET_STATISTICS (which resets on each read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    pub packets: u64,
    pub drops: u64,
    pub freezes: u64,
}

pub struct PacketRing {
    map: Arc<Mapping>,
    cfg: RingConfig,
    next_block: usize,
    /// Blocks read and still held downstream. Their status stays TP_STATUS_USER until released,
    /// so a reader that has come round the ring must not take such a block for a new one: it
    /// would hand the same frames out twice.
    handed_out: Arc<[AtomicBool]>,
}

impl PacketRing {
    /// Opens the socket in the calling thread's network namespace and binds it to `ifindex`.
    pub fn open(ifindex: u32, cfg: RingConfig) -> io::Result<PacketRing> {
        let page = 4096;
        if !cfg.block_size.is_multiple_of(page)
            || cfg.block_size < (1 << 16)
            || cfg.block_count == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring blocks must be a multiple of 4 KiB, at least 64 KiB, and at least one",
            ));
        }
        // Protocol 0: receive nothing until bound to the interface below.
        // SAFETY: plain syscalls; every result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(os_error("socket(AF_PACKET)"));
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt(
            &fd,
            libc::PACKET_VERSION,
            &(libc::tpacket_versions::TPACKET_V3 as c_int),
        )?;
        let frame_size = 2048usize;
        let req = tpacket_req3 {
            tp_block_size: cfg.block_size as u32,
            tp_block_nr: cfg.block_count as u32,
            tp_frame_size: frame_size as u32,
            tp_frame_nr: (cfg.block_size / frame_size * cfg.block_count) as u32,
            tp_retire_blk_tov: cfg.retire_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, libc::PACKET_RX_RING, &req)?;
        let len = cfg.block_size * cfg.block_count;
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("mmap(PACKET_RX_RING)"));
        }
        let map = Arc::new(Mapping {
            ptr: ptr.cast(),
            len,
            fd,
        });
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        let rc = unsafe {
            libc::bind(
                map.fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(os_error("bind(AF_PACKET)"));
        }
        Ok(PacketRing {
            map,
            cfg,
            next_block: 0,
            handed_out: (0..cfg.block_count)
                .map(|_| AtomicBool::new(false))
                .collect(),
        })
    }

    /// Whether the next block is the reader's: retired by the kernel, and given back by the
    /// stages that held its bytes the last time round.
    pub fn next_block_ready(&self) -> bool {
        let index = self.next_block;
        block_status(&self.map, index * self.cfg.block_size).load(Ordering::Acquire)
            & libc::TP_STATUS_USER
            != 0
            && !self.handed_out[index].load(Ordering::Acquire)
    }

    /// Waits up to `timeout_ms` for the next block and calls `on_frame` for each frame in it.
    /// Returns the number of frames (0 on timeout).
    pub fn poll_block(
        &mut self,
        timeout_ms: i32,
        mut on_frame: impl FnMut(Frame),
    ) -> io::Result<usize> {
        let index = self.next_block;
        let offset = index * self.cfg.block_size;
        if !self.next_block_ready() {
            let mut pfd = libc::pollfd {
                fd: self.map.fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLERR,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                return if err.kind() == io::ErrorKind::Interrupted {
                    Ok(0)
                } else {
                    Err(err)
                };
            }
            if !self.next_block_ready() {
                if rc > 0 {
                    // TPACKET_V3 reports readable while the block before the one the kernel
                    // fills is still ours, as it is until the next stage drops its last
                    // segment. Polling again at once would spin; the kernel retires blocks every
                    // few milliseconds and the ring absorbs a short pause.
                    std::thread::sleep(SPURIOUS_WAKE_PAUSE);
                }
                return Ok(0);
            }
        }
        self.next_block = (self.next_block + 1) % self.cfg.block_count;
        self.handed_out[index].store(true, Ordering::Release);
        let block = Bytes::from_owner(BlockOwner {
            map: Arc::clone(&self.map),
            offset,
            len: self.cfg.block_size,
            handed_out: Arc::clone(&self.handed_out),
            index,
        });
        // SAFETY: the block is ours (TP_STATUS_USER) and its header lies at its start.
        let (num_pkts, first) = unsafe {
            let desc = block.as_ptr() as *const tpacket_block_desc;
            let h = &(*desc).hdr.bh1;
            (h.num_pkts as usize, h.offset_to_first_pkt as usize)
        };
        let hdr_len = std::mem::size_of::<tpacket3_hdr>();
        let mut at = first;
        let mut frames = 0;
        for _ in 0..num_pkts {
            // The kernel wrote these offsets, but a bad one must not make us read out of bounds.
            if at + hdr_len > block.len() {
                break;
            }
            // SAFETY: bounds checked above; tpacket3_hdr is 4-byte aligned in the ring.
            let h = unsafe { &*(block.as_ptr().add(at) as *const tpacket3_hdr) };
            let start = at + h.tp_mac as usize;
            let end = start + h.tp_snaplen as usize;
            if end <= block.len() {
                on_frame(Frame {
                    data: block.slice(start..end),
                    wire_len: h.tp_len as usize,
                    ts_ns: h.tp_sec as u64 * 1_000_000_000 + h.tp_nsec as u64,
                });
                frames += 1;
            }
            if h.tp_next_offset == 0 {
                break;
            }
            at += h.tp_next_offset as usize;
        }
        Ok(frames)
    }

    /// Share of the blocks the kernel cannot fill now (handed to us and not yet given back),
    /// 0 to 1: at 1 the next frame is dropped.
    pub fn fill(&self) -> f64 {
        let ours = (0..self.cfg.block_count)
            .filter(|i| {
                block_status(&self.map, i * self.cfg.block_size).load(Ordering::Acquire)
                    & libc::TP_STATUS_USER
                    != 0
            })
            .count();
        ours as f64 / self.cfg.block_count as f64
    }

    /// Reads and resets the kernel's socket counters.
    pub fn take_stats(&self) -> io::Result<RingStats> {
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: st and len are valid for writing.
        let rc = unsafe {
            libc::getsockopt(
                self.map.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                std::ptr::addr_of_mut!(st).cast::<c_void>(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(os_error("getsockopt(PACKET_STATISTICS)"));
        }
        Ok(RingStats {
            packets: st.tp_packets as u64,
            drops: st.tp_drops as u64,
            freezes: st.tp_freeze_q_cnt as u64,
        })
    }
}

fn setsockopt<T>(fd: &OwnedFd, opt: c_int, val: &T) -> io::Result<()> {
    // SAFETY: val points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            opt,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(os_error("setsockopt(SOL_PACKET)"))
    } else {
        Ok(())
    }
}

fn os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
