//! Arbitrary segments through reassembly and HTTP extraction, with small caps: never a panic,
//! and memory stays under the configured caps whatever arrives.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mirror_agent::http::HttpConfig;
use mirror_agent::reassembly::ReassemblyConfig;
use mirror_agent::segment::{FlowKey, Segment, TcpFlags};
use mirror_agent::testkit::Extract;

const OOO_TOTAL: usize = 64 << 10;
const BUFFERED: usize = 128 << 10;

fuzz_target!(|data: &[u8]| {
    let rc = ReassemblyConfig {
        server_ports: vec![80],
        max_flows: 4,
        max_ooo_bytes_per_dir: 16 << 10,
        max_ooo_segments_per_dir: 32,
        max_ooo_bytes_total: OOO_TOTAL,
        hole_timeout_ns: 1_000,
        idle_timeout_ns: 1_000_000,
        max_seq_jump: 64 << 10,
        reset_linger_ns: 500,
        ..Default::default()
    };
    let hc = HttpConfig {
        max_head_bytes: 4096,
        max_body_bytes: 8192,
        max_buffered_bytes: BUFFERED,
        response_heads: true,
        ..Default::default()
    };
    let mut x = Extract::with(rc, hc);
    let mut ts = 0u64;
    let mut rest = data;
    // Each op: [flags, conn+dir, seq (4, little endian), len (2)] then `len` payload bytes.
    // Flag bit 0x20 (not a TCP flag here) elides as many bytes again after the payload, as a
    // response head record does.
    while rest.len() >= 8 {
        let rest_flags = rest[0];
        let flags = TcpFlags::from_bits(rest[0]);
        let who = rest[1];
        let seq = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]);
        let len = (u16::from_le_bytes([rest[6], rest[7]]) as usize).min(rest.len() - 8);
        let payload = bytes::Bytes::copy_from_slice(&rest[8..8 + len]);
        rest = &rest[8 + len..];
        let client = format!("10.0.0.1:{}", 1000 + (who as u16 & 0x7)).parse().unwrap();
        let server = "10.0.0.2:80".parse().unwrap();
        let flow = if who & 0x80 == 0 { FlowKey { src: client, dst: server } } else { FlowKey { src: server, dst: client } };
        ts += (who as u64 >> 3 & 0xf) * 100;
        let elided = if rest_flags & 0x20 != 0 { len as u32 * 7 } else { 0 };
        x.feed([&Segment { flow, seq, ack: seq.rotate_left(16), flags, payload, elided, ts }]);
        if who & 0x40 != 0 {
            x.r.tick(ts);
        }
        assert!(x.r.stats().ooo_bytes_held as usize <= OOO_TOTAL);
        assert!(x.r.handler().stats().buffered_bytes as usize <= BUFFERED + (u16::MAX as usize));
        assert!(x.r.flow_count() <= 4);
    }
    x.finish(ts + 10_000_000);
    assert_eq!(x.r.stats().ooo_bytes_held, 0);
    assert_eq!(x.r.handler().stats().buffered_bytes, 0);
});
