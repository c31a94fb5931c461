//! Arbitrary HTTP/2 traffic after a client preface: frames, HPACK blocks and stream events in
//! any order, cut anywhere, with holes. Never a panic, and after every segment the buffered
//! bytes and tracked streams stay under the configured caps.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mirror_agent::http::h2::frame::PREFACE;
use mirror_agent::http::HttpConfig;
use mirror_agent::reassembly::ReassemblyConfig;
use mirror_agent::testkit::{Conversation, Extract};

const BUFFERED: usize = 64 << 10;
const STREAMS: usize = 8;
const FLOWS: usize = 2;

fuzz_target!(|data: &[u8]| {
    let rc = ReassemblyConfig {
        server_ports: vec![8080],
        max_flows: FLOWS,
        ..Default::default()
    };
    let hc = HttpConfig {
        max_head_bytes: 2048,
        max_body_bytes: 4096,
        max_buffered_bytes: BUFFERED,
        max_pending: STREAMS,
        max_hpack_table: 4096,
        ..Default::default()
    };
    let mut x = Extract::with(rc, hc);
    let mut c = Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", 7, 9);
    x.feed(&c.handshake());
    x.feed(&c.client_data(PREFACE, 1400));
    let mut rest = data;
    // Each op: [who, len (2, little endian)] then `len` bytes. who & 1: server to client;
    // who & 2: the bytes are lost (a hole) instead of sent; who & 4: time passes.
    while rest.len() >= 3 {
        let who = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let segs = match (who & 1 == 1, who & 2 == 2) {
            (false, false) => c.client_data(bytes, 1400),
            (true, false) => c.server_data(bytes, 1400),
            (false, true) => {
                c.client_seq = c.client_seq.wrapping_add(len as u32);
                Vec::new()
            }
            (true, true) => {
                c.server_seq = c.server_seq.wrapping_add(len as u32);
                Vec::new()
            }
        };
        if who & 4 != 0 {
            c.advance(10_000_000);
            x.r.tick(c.ts);
        }
        for s in &segs {
            x.feed([s]);
            let st = x.r.handler().stats();
            assert!(st.buffered_bytes as usize <= BUFFERED + 1400, "{st:?}");
            assert!(st.h2_open_streams as usize <= FLOWS * (STREAMS + 8), "{st:?}");
            assert!(st.h2_streaming_bytes as usize <= BUFFERED + 1400, "{st:?}");
            for r in &x.h2_requests {
                assert!(r.body.len() <= 4096);
            }
        }
        x.h2_requests.clear();
    }
    x.finish(c.ts + 1_000_000_000_000);
    x.h2_requests.clear();
    let st = x.r.handler().stats();
    assert_eq!((st.buffered_bytes, st.h2_open_streams, st.h2_streaming_bytes), (0, 0, 0), "{st:?}");
});
