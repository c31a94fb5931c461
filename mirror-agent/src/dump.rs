//! `--dump <FILE>`: what the capture stage saw, one record per directional flow, so that tests and
//! users can check captured bytes against what the client sent.
//!
//! Each record is a header line followed by exactly `bytes=` raw bytes and a newline:
//! `=== flow 10.0.0.1:40000 -> 10.0.0.2:80 segments=12 bytes=3145728 gaps=0 syn=1 fin=1 rst=0`
//! The stream is ordered by sequence number and each byte appears once (first copy wins).
//! Memory is capped: segments beyond the cap are counted in the trailing `=== dropped` line.

use std::collections::BTreeMap;
use std::io::{self, Write};

use bytes::Bytes;

use crate::segment::{FlowKey, Segment, TcpFlags};

#[derive(Default)]
struct FlowRecord {
    base: Option<u32>,
    segments: u64,
    syn: bool,
    fin: bool,
    rst: bool,
    /// Offset from `base` (signed: mid-stream joins may see earlier retransmissions) to data.
    data: BTreeMap<i64, Bytes>,
}

pub struct FlowDump {
    flows: BTreeMap<FlowKey, FlowRecord>,
    held: usize,
    max_bytes: usize,
    dropped_segments: u64,
    dropped_bytes: u64,
}

impl FlowDump {
    pub fn new(max_bytes: usize) -> Self {
        FlowDump {
            flows: BTreeMap::new(),
            held: 0,
            max_bytes,
            dropped_segments: 0,
            dropped_bytes: 0,
        }
    }

    pub fn record(&mut self, seg: &Segment) {
        let rec = self.flows.entry(seg.flow).or_default();
        rec.segments += 1;
        if seg.flags.contains(TcpFlags::SYN) {
            rec.syn = true;
            rec.base = Some(seg.seq.wrapping_add(1));
        }
        rec.fin |= seg.flags.contains(TcpFlags::FIN);
        rec.rst |= seg.flags.contains(TcpFlags::RST);
        if seg.payload.is_empty() {
            return;
        }
        if self.held + seg.payload.len() > self.max_bytes {
            self.dropped_segments += 1;
            self.dropped_bytes += seg.payload.len() as u64;
            return;
        }
        let base = *rec.base.get_or_insert(seg.seq);
        let offset = seg.seq.wrapping_sub(base) as i32 as i64;
        self.held += insert_uncovered(&mut rec.data, offset, &seg.payload);
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        for (flow, rec) in &self.flows {
            let (stream, gaps) = assemble(&rec.data);
            writeln!(
                out,
                "=== flow {flow} segments={} bytes={} gaps={gaps} syn={} fin={} rst={}",
                rec.segments,
                stream.len(),
                rec.syn as u8,
                rec.fin as u8,
                rec.rst as u8
            )?;
            out.write_all(&stream)?;
            out.write_all(b"\n")?;
        }
        writeln!(
            out,
            "=== dropped segments={} bytes={}",
            self.dropped_segments, self.dropped_bytes
        )
    }
}

/// Stores the parts of `data` at `offset` that no earlier piece covers, so the first copy of each
/// byte wins and pieces never overlap. Copies: the payload is a view into the capture ring, which
/// must not be held. Returns the bytes stored.
fn insert_uncovered(pieces: &mut BTreeMap<i64, Bytes>, offset: i64, data: &[u8]) -> usize {
    let end = offset + data.len() as i64;
    let start_key = pieces
        .range(..=offset)
        .next_back()
        .map(|(k, _)| *k)
        .unwrap_or(offset);
    let covered: Vec<(i64, i64)> = pieces
        .range(start_key..end)
        .map(|(k, v)| (*k, k + v.len() as i64))
        .filter(|(_, e)| *e > offset)
        .collect();
    let mut cursor = offset;
    let mut stored = 0;
    for (s, e) in covered.into_iter().chain([(end, end)]) {
        if s > cursor {
            let piece = &data[(cursor - offset) as usize..(s.min(end) - offset) as usize];
            pieces.insert(cursor, Bytes::copy_from_slice(piece));
            stored += piece.len();
        }
        cursor = cursor.max(e);
        if cursor >= end {
            break;
        }
    }
    stored
}

/// Concatenates the (non-overlapping) pieces in offset order. Returns the stream and the number
/// of holes.
fn assemble(pieces: &BTreeMap<i64, Bytes>) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut next: Option<i64> = None;
    let mut gaps = 0;
    for (&off, data) in pieces {
        if next.is_some_and(|n| off > n) {
            gaps += 1;
        }
        out.extend_from_slice(data);
        next = Some(off + data.len() as i64);
    }
    (out, gaps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, flags: TcpFlags, data: &[u8]) -> Segment {
        Segment {
            flow: FlowKey {
                src: "1.1.1.1:1".parse().unwrap(),
                dst: "2.2.2.2:80".parse().unwrap(),
            },
            seq,
            ack: 0,
            flags,
            payload: Bytes::copy_from_slice(data),
            ts: 0,
        }
    }

    #[test]
    fn orders_dedups_and_counts_gaps() {
        let mut d = FlowDump::new(1 << 20);
        d.record(&seg(u32::MAX, TcpFlags::SYN, b""));
        d.record(&seg(5, TcpFlags::ACK, b"world"));
        d.record(&seg(0, TcpFlags::ACK, b"hello"));
        d.record(&seg(3, TcpFlags::ACK, b"loXXX")); // overlaps both: first copies win
        d.record(&seg(2, TcpFlags::ACK, b"llo"));
        d.record(&seg(20, TcpFlags::FIN, b"!"));
        let mut out = Vec::new();
        d.write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(
            "=== flow 1.1.1.1:1 -> 2.2.2.2:80 segments=6 bytes=11 gaps=1 syn=1 fin=1 rst=0\nhelloworld!\n"
        ), "{text}");
    }

    #[test]
    fn memory_cap_is_counted() {
        let mut d = FlowDump::new(8);
        d.record(&seg(0, TcpFlags::ACK, b"12345"));
        d.record(&seg(5, TcpFlags::ACK, b"67890"));
        let mut out = Vec::new();
        d.write_to(&mut out).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("=== dropped segments=1 bytes=5\n"));
    }
}
