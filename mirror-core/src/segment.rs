//! The capture stage's output: one parsed TCP segment per captured frame.
//!
//! Parsing is pure (no root, no kernel) so that it can be tested on crafted and hostile frames.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// One direction of a TCP connection, as seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl FlowKey {
    /// The opposite direction of the same connection.
    pub fn reverse(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
        }
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

/// TCP flags that the reassembler needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);

    pub const fn empty() -> Self {
        TcpFlags(0)
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
    pub const fn from_bits(bits: u8) -> Self {
        TcpFlags(bits & 0x1f)
    }
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (flag, c) in [
            (Self::SYN, 'S'),
            (Self::FIN, 'F'),
            (Self::RST, 'R'),
            (Self::PSH, 'P'),
            (Self::ACK, '.'),
        ] {
            if self.contains(flag) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Capture time, nanoseconds since the Unix epoch (the kernel's receive timestamp).
pub type TimestampNs = u64;

/// A TCP sequence number. Arithmetic wraps at 2^32, and the distance between two numbers is
/// signed (RFC 9293 3.4): numbers up to 2^31 ahead are after, the rest before. The wraparound
/// stays here, as in smoltcp's `wire::tcp::SeqNumber`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqNumber(pub u32);

impl std::ops::Add<usize> for SeqNumber {
    type Output = SeqNumber;
    /// `n` bytes further (modulo 2^32: a stream offset's low bits).
    fn add(self, n: usize) -> SeqNumber {
        SeqNumber(self.0.wrapping_add(n as u32))
    }
}

impl std::ops::Sub for SeqNumber {
    type Output = i64;
    /// How far `self` is after `other` (negative: before).
    fn sub(self, other: SeqNumber) -> i64 {
        i64::from(self.0.wrapping_sub(other.0) as i32)
    }
}

impl Segment {
    pub fn seq(&self) -> SeqNumber {
        SeqNumber(self.seq)
    }
    pub fn ack(&self) -> SeqNumber {
        SeqNumber(self.ack)
    }
}

/// A TCP segment handed from the capture stage to reassembly.
///
/// `payload` is a zero-copy view into the capture ring: the ring block it points into is returned
/// to the kernel only when every view of it is dropped. Consumers copy what they keep.
#[derive(Clone, Debug)]
pub struct Segment {
    pub flow: FlowKey,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: Bytes,
    /// Payload bytes after `payload` that were not captured (a response segment described by
    /// its head only): they occupy sequence space, but their content is unknown.
    pub elided: u32,
    pub ts: TimestampNs,
}

impl Segment {
    /// Sequence space the payload occupies, captured or not.
    pub fn len(&self) -> usize {
        self.payload.len() + self.elided as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a captured frame did not yield a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameError {
    /// Shorter than its headers say, or headers that do not parse.
    Malformed,
    /// Not IPv4 or IPv6.
    NotIp,
    /// IP, but not TCP.
    NotTcp,
    /// An IP fragment: the kernel program passes these over, so one here is unexpected.
    Fragment,
}

impl FrameError {
    pub const ALL: [FrameError; 4] = [
        FrameError::Malformed,
        FrameError::NotIp,
        FrameError::NotTcp,
        FrameError::Fragment,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FrameError::Malformed => "malformed",
            FrameError::NotIp => "not_ip",
            FrameError::NotTcp => "not_tcp",
            FrameError::Fragment => "fragment",
        }
    }
}

/// Parses an Ethernet frame. `frame` is the whole frame; `payload` of the result is a slice of it
/// (no copy), trimmed to the IP length so that Ethernet padding never leaks into the stream.
pub fn parse_frame(frame: &Bytes, ts: TimestampNs) -> Result<Segment, FrameError> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|_| FrameError::Malformed)?;
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            if ip.is_payload_fragmented() {
                return Err(FrameError::Fragment);
            }
            let h = ip.header();
            (
                Ipv4Addr::from(h.source()).into(),
                Ipv4Addr::from(h.destination()).into(),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            if ip.is_payload_fragmented() {
                return Err(FrameError::Fragment);
            }
            let h = ip.header();
            (
                Ipv6Addr::from(h.source()).into(),
                Ipv6Addr::from(h.destination()).into(),
            )
        }
        Some(NetSlice::Arp(_)) | None => return Err(FrameError::NotIp),
    };
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return Err(FrameError::NotTcp);
    };
    let mut flags = TcpFlags::empty();
    for (set, flag) in [
        (tcp.fin(), TcpFlags::FIN),
        (tcp.syn(), TcpFlags::SYN),
        (tcp.rst(), TcpFlags::RST),
        (tcp.psh(), TcpFlags::PSH),
        (tcp.ack(), TcpFlags::ACK),
    ] {
        if set {
            flags = flags.union(flag);
        }
    }
    Ok(Segment {
        flow: FlowKey {
            src: SocketAddr::new(src_ip, tcp.source_port()),
            dst: SocketAddr::new(dst_ip, tcp.destination_port()),
        },
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags,
        payload: frame.slice_ref(tcp.payload()),
        elided: 0,
        ts,
    })
}

/// A record of the kernel's `RESPONSE_HEADS` ring.
#[derive(Clone, Debug)]
pub enum Record {
    /// A segment described by its head: its payload is the head's bytes, the rest `elided`.
    Head(Segment),
    /// Where a clone stands in the kernel's order, and the CPU that made it.
    Mark(MarkKey, TimestampNs, u32),
}

/// What identifies a clone and its `CloneMark`: flow, sequence number, payload length, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MarkKey {
    pub flow: FlowKey,
    pub seq: u32,
    pub len: u32,
    pub flags: TcpFlags,
}

impl MarkKey {
    pub fn of(seg: &Segment) -> MarkKey {
        MarkKey {
            flow: seg.flow,
            seq: seg.seq,
            len: seg.len() as u32,
            flags: seg.flags,
        }
    }
}

/// Parses a record of the `RESPONSE_HEADS` ring: a `SegmentRecord` of any payload size or a
/// `CloneMark`, told apart by size. `realtime_offset_ns` takes the kernel's monotonic time to
/// the capture clock.
pub fn parse_record(bytes: &Bytes, realtime_offset_ns: i64) -> Result<Record, FrameError> {
    use mirror_common::{CloneMark, HeadRecord};
    if bytes.len() < std::mem::size_of::<CloneMark>() {
        return Err(FrameError::Malformed);
    }
    // SAFETY: the length is checked, CloneMark (SegmentRecord's leading fields) is plain data
    // valid for any bytes, and the read is unaligned.
    let rec: CloneMark = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr = |a: [u8; 16]| -> Result<IpAddr, FrameError> {
        match rec.ip_version {
            4 => Ok(Ipv6Addr::from(a).to_canonical()),
            6 => Ok(Ipv6Addr::from(a).into()),
            _ => Err(FrameError::Malformed),
        }
    };
    let flow = FlowKey {
        src: SocketAddr::new(addr(rec.src)?, rec.sport),
        dst: SocketAddr::new(addr(rec.dst)?, rec.dport),
    };
    let flags = TcpFlags::from_bits(rec.tcp_flags);
    let ts = (rec.ts_ns as i64).saturating_add(realtime_offset_ns).max(0) as u64;
    if bytes.len() < std::mem::size_of::<HeadRecord>() {
        let key = MarkKey {
            flow,
            seq: rec.seq,
            len: rec.payload_len,
            flags,
        };
        return Ok(Record::Mark(key, ts, rec.cpu));
    }
    let head_len = rec.head_len as usize;
    let at = std::mem::offset_of!(HeadRecord, head);
    if at + head_len > bytes.len() || head_len > rec.payload_len as usize {
        return Err(FrameError::Malformed);
    }
    Ok(Record::Head(Segment {
        flow,
        seq: rec.seq,
        ack: rec.ack,
        flags,
        payload: bytes.slice(at..at + head_len),
        elided: rec.payload_len - head_len as u32,
        ts,
    }))
}

/// The wall clock in nanoseconds: the agent's "now" beside the kernel's packet stamps.
pub fn now_ns() -> TimestampNs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    #[test]
    fn sequence_numbers_wrap_and_compare_across_zero() {
        let near_end = SeqNumber(u32::MAX - 9);
        let past = near_end + 20;
        assert_eq!(past, SeqNumber(10));
        assert_eq!(past - near_end, 20);
        assert_eq!(near_end - past, -20);
        assert_eq!(SeqNumber(5) - SeqNumber(5), 0);
        // Half the space away is the farthest "before"; one less is "after".
        assert_eq!(SeqNumber(0) + (1usize << 31) - SeqNumber(0), -(1i64 << 31));
        assert_eq!(
            SeqNumber(0) + ((1usize << 31) - 1) - SeqNumber(0),
            (1i64 << 31) - 1
        );
    }
    use proptest::prelude::*;

    pub(crate) fn tcp_v4_frame(payload: &[u8], seq: u32, syn: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, seq, 65535)
            .ack(7);
        if syn {
            b = b.syn();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn tcp_v6_frame(payload: &[u8], seq: u32) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40001, 8080, seq, 65535)
            .psh()
            .ack(1);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn ipv4_segment() {
        let frame = Bytes::from(tcp_v4_frame(b"GET / HTTP/1.1\r\n\r\n", 1000, false));
        let seg = parse_frame(&frame, 5).unwrap();
        assert_eq!(seg.flow.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(seg.flow.dst, "10.0.0.2:80".parse().unwrap());
        assert_eq!(seg.seq, 1000);
        assert_eq!(seg.ack, 7);
        assert!(seg.flags.contains(TcpFlags::ACK));
        assert!(!seg.flags.contains(TcpFlags::SYN));
        assert_eq!(&seg.payload[..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(seg.ts, 5);
    }

    #[test]
    fn ipv6_segment() {
        let frame = Bytes::from(tcp_v6_frame(b"hello", 42));
        let seg = parse_frame(&frame, 0).unwrap();
        assert_eq!(
            seg.flow.src,
            "[fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd]:40001"
                .parse()
                .unwrap()
        );
        assert_eq!(seg.flow.dst.port(), 8080);
        assert_eq!(seg.flow.reverse().src.port(), 8080);
        assert!(seg.flags.contains(TcpFlags::PSH.union(TcpFlags::ACK)));
        assert_eq!(&seg.payload[..], b"hello");
    }

    #[test]
    fn gso_sized_frame_is_kept_whole() {
        // GRO/GSO skbs far above the MTU reach the mirror interface whole.
        let body: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
        let frame = Bytes::from(tcp_v4_frame(&body, 1, false));
        let seg = parse_frame(&frame, 0).unwrap();
        assert_eq!(seg.payload.len(), 60_000);
        assert_eq!(&seg.payload[..], &body[..]);
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut raw = tcp_v4_frame(b"", 1, true);
        raw.resize(60, 0xee); // minimum Ethernet frame
        let seg = parse_frame(&Bytes::from(raw), 0).unwrap();
        assert!(seg.payload.is_empty());
        assert!(seg.flags.contains(TcpFlags::SYN));
    }

    #[test]
    fn truncated_frames_are_malformed() {
        let raw = tcp_v4_frame(b"some payload bytes", 1, false);
        for cut in [0, 5, 14, 20, 33, 40, raw.len() - 1] {
            let frame = Bytes::copy_from_slice(&raw[..cut]);
            assert!(parse_frame(&frame, 0).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn non_tcp_and_non_ip_are_classified() {
        let mut udp = Vec::new();
        PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 1)
            .udp(1, 2)
            .write(&mut udp, b"x")
            .unwrap();
        assert_eq!(
            parse_frame(&Bytes::from(udp), 0).unwrap_err(),
            FrameError::NotTcp
        );
        let mut arp = vec![0u8; 42];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert!(parse_frame(&Bytes::from(arp), 0).is_err());
        let mut other = vec![0u8; 60];
        other[12] = 0x88;
        other[13] = 0xcc; // LLDP
        assert_eq!(
            parse_frame(&Bytes::from(other), 0).unwrap_err(),
            FrameError::NotIp
        );
    }

    #[test]
    fn ipv4_fragment_is_flagged() {
        let mut raw = tcp_v4_frame(b"0123456789", 1, false);
        raw[14 + 6] = 0x20; // more fragments
        assert_eq!(
            parse_frame(&Bytes::from(raw), 0).unwrap_err(),
            FrameError::Fragment
        );
    }

    /// A record's bytes as the kernel writes them: the record's leading fields, then the
    /// payload's first `head_len` bytes of a record holding `N`.
    fn record_bytes<const N: usize>(payload: &[u8], payload_len: u32, head_len: u16) -> Bytes {
        let mut rec = mirror_common::SegmentRecord::<N> {
            src: mirror_common::AddrKey::from_v4([10, 0, 0, 1]).addr,
            dst: mirror_common::AddrKey::from_v4([10, 0, 0, 2]).addr,
            sport: 40000,
            dport: 80,
            tcp_flags: 0x18,
            ip_version: 4,
            head_len,
            seq: 77,
            ack: 5,
            payload_len,
            _pad: 0,
            ts_ns: 1_000,
            head: [0; N],
        };
        rec.head[..payload.len()].copy_from_slice(payload);
        // SAFETY: plain #[repr(C)] data, read as the bytes the ring hands over.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const mirror_common::SegmentRecord<N>).cast::<u8>(),
                std::mem::size_of_val(&rec),
            )
        };
        Bytes::copy_from_slice(raw)
    }

    #[test]
    fn a_payload_record_is_a_whole_segment() {
        use mirror_common::PAYLOAD_RECORD_BYTES;
        let body: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let bytes = record_bytes::<PAYLOAD_RECORD_BYTES>(&body, 3000, 3000);
        let Ok(Record::Head(seg)) = parse_record(&bytes, 0) else {
            panic!("a segment record");
        };
        assert_eq!(&seg.payload[..], &body[..]);
        assert_eq!((seg.elided, seg.seq, seg.ts), (0, 77, 1_000));
        assert_eq!(seg.flow.src, "10.0.0.1:40000".parse().unwrap());
    }

    #[test]
    fn a_head_record_elides_the_rest_and_a_lying_length_is_malformed() {
        use mirror_common::HEAD_BYTES;
        let head = [b'h'; HEAD_BYTES];
        let bytes = record_bytes::<HEAD_BYTES>(&head, 9000, HEAD_BYTES as u16);
        let Ok(Record::Head(seg)) = parse_record(&bytes, 0) else {
            panic!("a segment record");
        };
        assert_eq!(
            (seg.payload.len(), seg.elided),
            (HEAD_BYTES, 9000 - HEAD_BYTES as u32)
        );
        let past_the_record = record_bytes::<HEAD_BYTES>(&head, 9000, HEAD_BYTES as u16 + 1);
        assert_eq!(
            parse_record(&past_the_record, 0).unwrap_err(),
            FrameError::Malformed
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse_frame(&Bytes::from(data), 0);
        }

        #[test]
        fn mutated_frames_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8),
        ) {
            let mut raw = tcp_v4_frame(&payload, 9, false);
            for (at, v) in flips {
                let n = raw.len();
                raw[at % n] = v;
            }
            if let Ok(seg) = parse_frame(&Bytes::from(raw.clone()), 0) {
                prop_assert!(seg.payload.len() <= raw.len());
            }
        }
    }
}
