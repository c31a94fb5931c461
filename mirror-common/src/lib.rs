//! Types shared by the TC program (`mirror-ebpf`) and the agent (`mirror-agent`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel reads it from maps that the agent fills.
#![no_std]

/// Name of the TC classifier in the eBPF object.
pub const PROGRAM_NAME: &str = "mirror_tc";

/// Map names, shared so that the agent cannot ask for a map the object does not have.
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_LIVE_PORTS: &str = "LIVE_PORTS";
pub const MAP_LIVE_ADDRS: &str = "LIVE_ADDRS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_DECISIONS: &str = "DECISIONS";
pub const MAP_RESPONSE_HEADS: &str = "RESPONSE_HEADS";
pub const MAP_FULL_RESPONSES: &str = "FULL_RESPONSES";
pub const MAP_HEARTBEAT: &str = "HEARTBEAT";
/// Per CPU, one `u64`: nanoseconds the program spent mirroring (see `mirror-ebpf`'s `WORK_NS`).
pub const MAP_WORK_NS: &str = "WORK_NS";

/// Upper bounds of the maps the agent fills.
pub const MAX_LIVE_PORTS: u32 = 64;
pub const MAX_LIVE_ADDRS: u32 = 4096;
/// Connections whose sampling decision the kernel remembers (least recently used go first).
pub const MAX_DECISIONS: u32 = 65_536;
/// Connections whose responses are cloned whole although heads are the default.
pub const MAX_FULL_RESPONSES: u32 = 65_536;
/// Bytes of the `RESPONSE_HEADS` ring buffer (a power of two, a multiple of the page size):
/// about 13k records, 40 ms of 20k responses/s with 16 segments each still to read.
pub const RESPONSE_HEADS_RING_BYTES: u32 = 4 << 20;
/// Payload bytes a response head record carries: a status line and typical headers.
pub const HEAD_BYTES: usize = 256;
/// Payload bytes a segment record carries at most (`FLAG_PAYLOAD_RECORDS`): a request with
/// its headers, cookies and a small body. Longer segments are cloned.
pub const PAYLOAD_RECORD_BYTES: usize = 4096;
/// Bytes of the `RESPONSE_HEADS` ring with `FLAG_PAYLOAD_RECORDS`, which then carries the
/// requests too: 60 ms of 170k requests/s of 400 bytes, and 4k records of the largest size.
pub const PAYLOAD_RING_BYTES: u32 = 16 << 20;

/// The program clones nothing until the agent has written a config with this flag.
pub const FLAG_ENABLED: u32 = 1 << 0;
/// Also clone packets whose *source* port is a live port (the live service's responses).
pub const FLAG_RESPONSES: u32 = 1 << 1;
/// Only clone when the service-side address is in `LIVE_ADDRS`.
pub const FLAG_ADDR_FILTER: u32 = 1 << 2;
/// Decide each connection's sampling once, at its first packet seen, and remember it in
/// `DECISIONS`: a change of `sample_ppm` then admits or sheds new connections only.
pub const FLAG_STICKY_SAMPLING: u32 = 1 << 3;
/// With `FLAG_RESPONSES`: describe response segments in `RESPONSE_HEADS` records (flow,
/// sequence, length, flags and the first `HEAD_BYTES`) instead of cloning them, except on
/// connections listed in `FULL_RESPONSES`.
pub const FLAG_RESPONSE_HEADS: u32 = 1 << 4;
/// Copy the payload of every segment to mirror whole (a request's, or a response's on a
/// connection whose responses are whole) into a `RESPONSE_HEADS` record when it fits in
/// `PAYLOAD_RECORD_BYTES`, instead of cloning it onto the mirror interface.
pub const FLAG_PAYLOAD_RECORDS: u32 = 1 << 5;

/// `sample_ppm` value that mirrors every flow.
pub const SAMPLE_ALL: u32 = 1_000_000;

/// The single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorConfig {
    /// ifindex of the mirror interface (the agent's veth end) that clones are sent out of.
    pub mirror_ifindex: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Flows mirrored, in parts per million, decided by a symmetric hash of the 4-tuple so that a
    /// connection's requests and responses are kept or skipped together.
    pub sample_ppm: u32,
    /// With `FLAG_STICKY_SAMPLING`: connections already mirrored whose hash is at or above this
    /// (in parts per million) are dropped for the rest of their life. `SAMPLE_ALL` (or 0, an
    /// unset config) keeps them all; lowered only when the agent must shed load it admitted.
    pub keep_admitted_ppm: u32,
    /// With `FLAG_RESPONSE_HEADS`: connections whose flow hash is under this (in parts per
    /// million, as `sample_ppm`) have their responses cloned whole from their first segment,
    /// for content comparison. 0: none.
    pub whole_responses_ppm: u32,
    pub _pad: u32,
}

/// The single entry of the `HEARTBEAT` array map: the agent's sign of life. An attachment can
/// outlive its agent (a clsact filter, before tcx links on 6.6, stays after the process is
/// killed), and would go on cloning towards a mirror interface nobody reads. The program
/// passes over every packet once the beat is older than `stale_after_ns` (`SkipAgentGone`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// CLOCK_MONOTONIC nanoseconds (the clock of `bpf_ktime_get_ns`) of the agent's last beat.
    pub at_ns: u64,
    /// 0: no heartbeat is kept (never stale).
    pub stale_after_ns: u64,
}

impl Heartbeat {
    /// Whether the agent is taken for gone at `now_ns`.
    #[inline(always)]
    pub const fn is_stale(&self, now_ns: u64) -> bool {
        self.stale_after_ns != 0 && now_ns.saturating_sub(self.at_ns) > self.stale_after_ns
    }
}

/// One segment in a `RESPONSE_HEADS` record: flow, sequence numbers, flags and the first `N`
/// payload bytes. A response segment is described by its head (`HeadRecord`): everything the
/// agent needs to time a response, read its status and frame the stream, without the body. With
/// `FLAG_PAYLOAD_RECORDS`, a segment mirrored whole is a record too, of the smallest size that
/// holds its payload (`HeadRecord` or `PayloadRecord`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SegmentRecord<const N: usize> {
    /// Source and destination addresses, IPv4 mapped as `::ffff:a.b.c.d`.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (FIN, SYN, RST, PSH, ACK, ...).
    pub tcp_flags: u8,
    /// 4 or 6.
    pub ip_version: u8,
    /// Bytes of `head` that hold payload: `min(payload_len, N)`.
    pub head_len: u16,
    pub seq: u32,
    pub ack: u32,
    /// TCP payload bytes of the segment, of which `head` holds the first `head_len`.
    pub payload_len: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC nanoseconds when the program saw the segment.
    pub ts_ns: u64,
    pub head: [u8; N],
}

pub type HeadRecord = SegmentRecord<HEAD_BYTES>;
pub type PayloadRecord = SegmentRecord<PAYLOAD_RECORD_BYTES>;

/// A clone's place in the program's order (`FLAG_RESPONSE_HEADS`): written to
/// `RESPONSE_HEADS` right after the clone, so that the agent can put the clones, which reach it
/// through the capture ring, back among the records in the order the program saw them. The
/// same leading fields as `SegmentRecord`, without the head.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloneMark {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ip_version: u8,
    /// Always 0.
    pub head_len: u16,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
    /// The CPU that cloned: one CPU's clones reach the capture ring in the order of its marks,
    /// so a later clone of the same CPU proves an earlier one lost.
    pub cpu: u32,
    pub ts_ns: u64,
}

/// Key of `LIVE_ADDRS`: an IPv6 address, or an IPv4 address mapped as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
}

impl AddrKey {
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_v6(addr: [u8; 16]) -> Self {
        Self { addr }
    }

    /// An address as the kernel program keys and hashes it: IPv4 (also IPv4-mapped IPv6)
    /// mapped into IPv6.
    pub const fn from_ip(ip: core::net::IpAddr) -> Self {
        match ip.to_canonical() {
            core::net::IpAddr::V4(v4) => Self::from_v4(v4.octets()),
            core::net::IpAddr::V6(v6) => Self::from_v6(v6.octets()),
        }
    }
}

/// Indices of the per-CPU `COUNTERS` array. Every packet the program sees lands in `Seen` and in
/// exactly one outcome: `Cloned`, `CloneDropped`, `CloneErrors`, `HeadRecorded`, `HeadRingFull`,
/// `PayloadRecorded`, `PayloadRingFull`, or one of the `Skip*` reasons.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Seen = 0,
    /// Matched a live port (and address filter) in either direction, before sampling.
    Matched,
    /// Of `Matched`, those that are responses (source port is live).
    MatchedResponses,
    Cloned,
    CloneErrors,
    SkipDisabled,
    SkipNotIp,
    SkipNotTcp,
    SkipIpv6ExtHeaders,
    SkipIpv4Fragments,
    SkipUnreadable,
    SkipOtherPort,
    SkipOtherAddr,
    SkipSampledOut,
    /// Pure ACKs: no payload and no SYN, FIN or RST, so nothing for reassembly.
    SkipNoPayload,
    /// Of `Cloned` and `CloneDropped`, segments towards the service whose payload starts like a
    /// request (`is_request_start`). The agent counts the same on what it receives: the
    /// difference is the requests whose first segment was lost after the program cloned it.
    ClonedRequestStarts,
    /// Segments described by a `RESPONSE_HEADS` record instead of a clone: response heads, and
    /// SYN, FIN and RST without payload.
    HeadRecorded,
    /// Segments whose head record did not fit: the ring buffer was full. The agent sees the
    /// hole in the stream and counts the bytes lost.
    HeadRingFull,
    /// Of `Cloned`, clones whose `CloneMark` did not fit in the ring buffer: the agent places
    /// them as they come.
    MarksRingFull,
    /// Clones the mirror device dropped (`bpf_clone_redirect` returned NET_XMIT_DROP).
    CloneDropped,
    /// Of `Cloned`, clones queued under congestion (NET_XMIT_CN).
    CloneCongested,
    /// Matched packets passed over because the agent's heartbeat is stale: it was killed or
    /// is frozen, and its attachment outlived it.
    SkipAgentGone,
    /// Failed attempts to store a connection's sampling decision (`FLAG_STICKY_SAMPLING`): the
    /// map's bucket lock gave up under contention, or it had no free entry. The program tries
    /// again once; a connection whose decision is still not stored is decided again at its
    /// next packet, at the rate of that moment.
    DecisionStoreFailed,
    /// Of `SkipSampledOut`, segments towards the service whose payload starts like a request:
    /// the requests that sampling and shedding passed over, each counted once at its start.
    SampledOutRequestStarts,
    /// Segments mirrored whole whose payload was copied into a record (`FLAG_PAYLOAD_RECORDS`)
    /// instead of cloned.
    PayloadRecorded,
    /// Segments whose payload record did not fit: the ring buffer was full.
    PayloadRingFull,
    /// Of `PayloadRingFull`, segments towards the service whose payload starts like a request:
    /// the requests lost that way.
    PayloadRingFullRequestStarts,
}

pub const COUNTER_COUNT: u32 = Counter::PayloadRingFullRequestStarts as u32 + 1;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Seen,
        Counter::Matched,
        Counter::MatchedResponses,
        Counter::Cloned,
        Counter::CloneErrors,
        Counter::SkipDisabled,
        Counter::SkipNotIp,
        Counter::SkipNotTcp,
        Counter::SkipIpv6ExtHeaders,
        Counter::SkipIpv4Fragments,
        Counter::SkipUnreadable,
        Counter::SkipOtherPort,
        Counter::SkipOtherAddr,
        Counter::SkipSampledOut,
        Counter::SkipNoPayload,
        Counter::ClonedRequestStarts,
        Counter::HeadRecorded,
        Counter::HeadRingFull,
        Counter::MarksRingFull,
        Counter::CloneDropped,
        Counter::CloneCongested,
        Counter::SkipAgentGone,
        Counter::DecisionStoreFailed,
        Counter::SampledOutRequestStarts,
        Counter::PayloadRecorded,
        Counter::PayloadRingFull,
        Counter::PayloadRingFullRequestStarts,
    ];

    /// Stable snake_case name, used in metrics labels and dumps.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Seen => "seen",
            Counter::Matched => "matched",
            Counter::MatchedResponses => "matched_responses",
            Counter::Cloned => "cloned",
            Counter::CloneErrors => "clone_errors",
            Counter::SkipDisabled => "skip_disabled",
            Counter::SkipNotIp => "skip_not_ip",
            Counter::SkipNotTcp => "skip_not_tcp",
            Counter::SkipIpv6ExtHeaders => "skip_ipv6_ext_headers",
            Counter::SkipIpv4Fragments => "skip_ipv4_fragments",
            Counter::SkipUnreadable => "skip_unreadable",
            Counter::SkipOtherPort => "skip_other_port",
            Counter::SkipOtherAddr => "skip_other_addr",
            Counter::SkipSampledOut => "skip_sampled_out",
            Counter::SkipNoPayload => "skip_no_payload",
            Counter::ClonedRequestStarts => "cloned_request_starts",
            Counter::HeadRecorded => "head_recorded",
            Counter::HeadRingFull => "head_ring_full",
            Counter::MarksRingFull => "marks_ring_full",
            Counter::CloneDropped => "clone_dropped",
            Counter::CloneCongested => "clone_congested",
            Counter::SkipAgentGone => "skip_agent_gone",
            Counter::DecisionStoreFailed => "decision_store_failed",
            Counter::SampledOutRequestStarts => "sampled_out_request_starts",
            Counter::PayloadRecorded => "payload_recorded",
            Counter::PayloadRingFull => "payload_ring_full",
            Counter::PayloadRingFullRequestStarts => "payload_ring_full_request_starts",
        }
    }
}

/// What `bpf_clone_redirect` says of a clone. It returns 0 when the clone was handed to the
/// mirror device, or a negative error; some kernels (patched ones, and paths where the device's
/// own verdict comes back) return the device's positive NET_XMIT code instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneResult {
    Sent,
    /// NET_XMIT_CN: queued under congestion; senders count it as sent.
    SentCongested,
    /// NET_XMIT_DROP: the device dropped it (a veth peer's full backlog, say).
    Dropped,
    /// A negative error, or a code no kernel documents.
    Failed,
}

#[inline(always)]
pub const fn clone_result(ret: i64) -> CloneResult {
    match ret {
        0 => CloneResult::Sent,
        2 => CloneResult::SentCongested,
        1 => CloneResult::Dropped,
        _ => CloneResult::Failed,
    }
}

/// Bytes of payload that `is_request_start` looks at.
pub const REQUEST_START_LEN: usize = 4;

/// Whether a segment's payload starts like an HTTP/1.x request line (a method and its space, as
/// far as four bytes show it). The kernel and the agent apply the same test to the same
/// segments, so that their counts can be compared.
#[inline(always)]
pub fn is_request_start(p: &[u8; REQUEST_START_LEN]) -> bool {
    matches!(
        p,
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"TRAC" | b"CONN"
    )
}

/// Symmetric flow hash: the same value for both directions of a connection, so that sampling
/// keeps or skips a whole TCP connection. Used by the kernel; the agent uses it in tests.
#[inline(always)]
pub fn flow_hash(a: &[u8; 16], b: &[u8; 16], port_a: u16, port_b: u16) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    let mut i = 0;
    while i < 16 {
        // XOR of the two addresses does not depend on which side is the source.
        let w = u32::from_ne_bytes([
            a[i] ^ b[i],
            a[i + 1] ^ b[i + 1],
            a[i + 2] ^ b[i + 2],
            a[i + 3] ^ b[i + 3],
        ]);
        h = mix(h ^ w);
        i += 4;
    }
    let (lo, hi) = if port_a < port_b {
        (port_a, port_b)
    } else {
        (port_b, port_a)
    };
    mix(h ^ ((lo as u32) << 16 | hi as u32))
}

#[inline(always)]
const fn mix(mut x: u32) -> u32 {
    // murmur3 finaliser
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    x
}

/// Plaintext read around a TLS library's calls (`SSL_read`, `SSL_write` and their `_ex`
/// forms), by uprobes in the processes the agent selects (`TLS_PIDS`).
pub mod tls {
    /// Map names.
    pub const MAP_TLS_PIDS: &str = "TLS_PIDS";
    pub const MAP_TLS_DATA: &str = "TLS_DATA";
    pub const MAP_TLS_COUNTERS: &str = "TLS_COUNTERS";

    /// Program names: the uprobes on the library's functions, the return probe they share,
    /// the kprobe on `tcp_sendmsg`/`tcp_recvmsg` that finds the socket an SSL call uses, and
    /// the tracepoint that learns sockets' addresses as they become established.
    pub const PROG_READ_ENTRY: &str = "ssl_read_entry";
    pub const PROG_READ_EX_ENTRY: &str = "ssl_read_ex_entry";
    pub const PROG_WRITE_ENTRY: &str = "ssl_write_entry";
    pub const PROG_WRITE_EX_ENTRY: &str = "ssl_write_ex_entry";
    pub const PROG_RETURN: &str = "ssl_return";
    pub const PROG_FREE: &str = "ssl_free";
    pub const PROG_TCP_SOCK: &str = "ssl_tcp_sock";
    pub const PROG_TCP_SEND_FENTRY: &str = "ssl_tcp_send";
    pub const PROG_TCP_RECV_FENTRY: &str = "ssl_tcp_recv";
    pub const PROG_SOCK_STATE: &str = "ssl_sock_state";
    pub const PROG_SOCK_IO: &str = "ssl_sock_io";

    /// Processes whose TLS calls are read; the agent fills it.
    pub const MAX_TLS_PIDS: u32 = 4096;
    /// TLS connections followed at once (least recently used go first).
    pub const MAX_TLS_STREAMS: u32 = 65_536;
    /// Established TCP sockets whose addresses are kept (least recently used go first).
    pub const MAX_SOCKETS: u32 = 262_144;
    /// Bytes of the `TLS_DATA` ring buffer when TLS capture is on (a power of two).
    pub const TLS_RING_BYTES: u32 = 16 << 20;
    /// Data bytes of a large record: a whole TLS record's plaintext.
    pub const BIG_CHUNK: usize = 16 << 10;
    /// Data bytes of a small record, for most requests' and responses' heads.
    pub const SMALL_CHUNK: usize = 1 << 10;
    /// Big chunks one call is cut into at most (256 KiB); a longer call ends its connection's
    /// mirroring (`TooLong`), since its bytes cannot all be read.
    pub const MAX_CHUNKS: usize = 16;

    /// What a record says.
    pub const KIND_READ: u8 = 0;
    pub const KIND_WRITE: u8 = 1;
    /// `SSL_free`: the connection is over.
    pub const KIND_CLOSE: u8 = 2;
    /// A call longer than `MAX_CHUNKS` big chunks: its bytes from `offset` on are missing.
    pub const KIND_TOO_LONG: u8 = 3;

    /// A TCP connection's addresses, from the socket's own view: IPv4 as IPv4-mapped IPv6,
    /// ports in host byte order.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SockTuple {
        pub local: [u8; 16],
        pub peer: [u8; 16],
        pub local_port: u16,
        pub peer_port: u16,
        /// 4 or 6.
        pub ip_version: u8,
        pub _pad: [u8; 3],
    }

    /// The head of every `TLS_DATA` record; `len` data bytes follow it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ChunkHead {
        /// The `SSL *`: with `tgid`, names the connection.
        pub ssl: u64,
        /// Offset of the first data byte in this direction of the connection.
        pub offset: u64,
        pub ts_ns: u64,
        /// The connection's socket, as the kernel saw it become established.
        pub conn: SockTuple,
        pub tgid: u32,
        pub len: u32,
        pub kind: u8,
        pub _pad: [u8; 7],
    }

    #[repr(C)]
    pub struct SmallChunk {
        pub head: ChunkHead,
        pub data: [u8; SMALL_CHUNK],
    }

    #[repr(C)]
    pub struct BigChunk {
        pub head: ChunkHead,
        pub data: [u8; BIG_CHUNK],
    }

    /// What the kernel side counts, by outcome.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum TlsCounter {
        /// Calls returned with data, in selected processes.
        Calls = 0,
        /// Bytes of plaintext put in the ring.
        Bytes,
        /// Calls on a connection whose socket no TCP send or receive showed (a memory BIO, as
        /// asyncio, Node and Envoy use): not mirrored.
        NoSocket,
        /// Calls on a socket established before the probes were loaded: its addresses are
        /// unknown, and it is not mirrored.
        UnknownSocket,
        /// Records that did not fit in the ring: their connection's mirroring ends there.
        RingFull,
        /// Calls longer than `MAX_CHUNKS` big chunks.
        TooLong,
        /// User memory that could not be read.
        ReadFailed,
    }

    pub const TLS_COUNTER_COUNT: u32 = TlsCounter::ReadFailed as u32 + 1;

    impl TlsCounter {
        pub const ALL: [TlsCounter; TLS_COUNTER_COUNT as usize] = [
            TlsCounter::Calls,
            TlsCounter::Bytes,
            TlsCounter::NoSocket,
            TlsCounter::UnknownSocket,
            TlsCounter::RingFull,
            TlsCounter::TooLong,
            TlsCounter::ReadFailed,
        ];

        pub const fn name(self) -> &'static str {
            match self {
                TlsCounter::Calls => "calls",
                TlsCounter::Bytes => "bytes",
                TlsCounter::NoSocket => "no_socket",
                TlsCounter::UnknownSocket => "unknown_socket",
                TlsCounter::RingFull => "ring_full",
                TlsCounter::TooLong => "too_long",
                TlsCounter::ReadFailed => "read_failed",
            }
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain #[repr(C)] data with no padding-sensitive invariants.
    unsafe impl aya::Pod for MirrorConfig {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl<const N: usize> aya::Pod for SegmentRecord<N> {}
    unsafe impl aya::Pod for CloneMark {}
    unsafe impl aya::Pod for Heartbeat {}
    unsafe impl aya::Pod for super::tls::ChunkHead {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn clone_results_by_value() {
        assert_eq!(clone_result(0), CloneResult::Sent);
        assert_eq!(clone_result(1), CloneResult::Dropped, "NET_XMIT_DROP");
        assert_eq!(clone_result(2), CloneResult::SentCongested, "NET_XMIT_CN");
        for failed in [-1, -22, -100, 3, 0x10] {
            assert_eq!(clone_result(failed), CloneResult::Failed, "{failed}");
        }
    }

    #[test]
    fn a_heartbeat_goes_stale_only_when_kept_and_old() {
        let hb = Heartbeat {
            at_ns: 10_000,
            stale_after_ns: 1_000,
        };
        assert!(!hb.is_stale(10_500));
        assert!(!hb.is_stale(11_000));
        assert!(hb.is_stale(11_001));
        assert!(
            !hb.is_stale(5),
            "a beat written after the packet's clock read"
        );
        assert!(
            !Heartbeat::default().is_stale(u64::MAX),
            "no heartbeat kept"
        );
    }

    #[test]
    fn every_counter_has_its_place_and_name() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COUNTER_COUNT as usize);
    }
}
