//! Golden cases and properties of reassembly + extraction together.

use proptest::prelude::*;

use super::framing::Framing;
use super::HttpConfig;
use crate::reassembly::ReassemblyConfig;
use crate::segment::Segment;
use crate::testkit::{Conversation, Extract};

const LATER: u64 = 1_000_000_000_000_000_000;

fn conv() -> Conversation {
    Conversation::new("10.0.0.1:40000", "10.0.0.2:80", 1000, 5000)
}

fn run(segs: &[Segment]) -> Extract {
    let mut x = Extract::new(&[80]);
    x.feed(segs);
    x.finish(LATER);
    x
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let mut c = conv();
    let req =
        b"POST /api/books/1/reviews HTTP/1.1\r\nHost: books\r\nTransfer-Encoding: chunked\r\n\r\n\
                5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: abc\r\n\r\n";
    let mut segs = c.handshake();
    segs.extend(c.client_data(req, 13));
    segs.extend(c.server_data(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 1000));
    segs.extend(c.close());
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    let r = &x.requests[0];
    assert_eq!(&r.raw[..], &req[..]);
    assert_eq!(r.framing, Framing::Chunked);
    assert_eq!(r.method(), "POST");
    assert_eq!(r.target(), "/api/books/1/reviews");
    assert_eq!(
        &r.body[..],
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: abc\r\n\r\n",
        "the body as framed, extensions and trailers included"
    );
    assert_eq!(x.responses.len(), 1);
    assert_eq!(
        (x.responses[0].status, x.responses[0].request_seq),
        (201, 0)
    );
}

#[test]
fn expect_100_continue_keeps_the_post() {
    let mut c = conv();
    let head =
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n";
    let mut segs = c.handshake();
    segs.extend(c.client_data(head, 1000));
    segs.extend(c.server_data(b"HTTP/1.1 100 Continue\r\n\r\n", 1000));
    segs.extend(c.client_data(b"0123456789", 1000));
    segs.extend(c.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1000));
    segs.extend(c.client_data(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n", 1000));
    segs.extend(c.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1000));
    let x = run(&segs);
    assert_eq!(x.requests.len(), 2);
    assert_eq!(&x.requests[0].body[..], b"0123456789");
    assert_eq!(x.requests[1].target(), "/next");
    let statuses: Vec<_> = x
        .responses
        .iter()
        .map(|m| (m.request_seq, m.status))
        .collect();
    assert_eq!(statuses, [(0, 200), (1, 200)], "the 100 is not the answer");
}

#[test]
fn expect_100_rejected_gives_up_that_request_only() {
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(
        b"PUT /big HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        1000,
    ));
    segs.extend(c.server_data(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n",
        1000,
    ));
    segs.extend(c.client_data(b"GET /after HTTP/1.1\r\n\r\n", 1000));
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    assert_eq!(x.requests[0].target(), "/after");
    assert_eq!(x.r.handler().stats().dropped_expect_rejected, 1);
    assert_eq!(
        x.responses.len(),
        0,
        "413 answered a request that was not replayed"
    );
}

#[test]
fn pipelined_gets_pair_in_order() {
    let mut c = conv();
    let reqs = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nHEAD /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n";
    let resps = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\nContent-Length: 50\r\n\r\n\
                  HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nerr\r\n0\r\n\r\n";
    let mut segs = c.handshake();
    segs.extend(c.client_data(reqs, 1000));
    c.advance(2_000_000);
    segs.extend(c.server_data(resps, 7));
    segs.extend(c.close());
    let x = run(&segs);
    let targets: Vec<_> = x.requests.iter().map(|r| r.target().to_string()).collect();
    assert_eq!(targets, ["/a", "/b", "/c"]);
    // What a mirror's outcome keeps: slices of each request's own bytes.
    let shared: Vec<_> = x
        .requests
        .iter()
        .map(|r| r.shared_method_and_target())
        .collect();
    let shared: Vec<_> = shared.iter().map(|(m, t)| (&m[..], &t[..])).collect();
    assert_eq!(shared, [("GET", "/a"), ("HEAD", "/b"), ("GET", "/c")]);
    let got: Vec<_> = x.responses.iter().map(|m| (&*m.target, m.status)).collect();
    assert_eq!(
        got,
        [("/a", 200), ("/b", 404), ("/c", 500)],
        "HEAD's response has no body"
    );
    assert!(x.responses.iter().all(|m| m.duration_ns() == 2_000_000));
    // The live side's results, too, point into the requests' bytes rather than copy them.
    for (m, r) in x.responses.iter().zip(&x.requests) {
        let raw = r.raw.as_ptr_range();
        assert!(raw.contains(&m.method.as_ptr()) && raw.contains(&m.target.as_ptr()));
    }
}

#[test]
fn no_body_statuses() {
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(
        b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
        1000,
    ));
    segs.extend(c.server_data(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        1000,
    ));
    let x = run(&segs);
    let got: Vec<_> = x.responses.iter().map(|m| m.status).collect();
    assert_eq!(got, [204, 304, 200]);
}

#[test]
fn body_split_one_byte_per_segment() {
    let mut c = conv();
    let req = b"PUT /x HTTP/1.1\r\nContent-Length: 26\r\n\r\nabcdefghijklmnopqrstuvwxyz";
    let mut segs = c.handshake();
    segs.extend(c.client_data(req, 1));
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    assert_eq!(&x.requests[0].raw[..], &req[..]);
}

#[test]
fn sequence_wraparound() {
    let mut c = Conversation::new(
        "[fd00::1]:40000",
        "[fd00::2]:80",
        u32::MAX - 20,
        u32::MAX - 3,
    );
    let req = b"POST /wrap HTTP/1.1\r\nContent-Length: 40\r\n\r\n0123456789012345678901234567890123456789";
    let mut segs = c.handshake();
    segs.extend(c.client_data(req, 9));
    segs.extend(c.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 5));
    segs.swap(4, 5); // a little reordering across the wrap
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    assert_eq!(&x.requests[0].raw[..], &req[..]);
    assert_eq!(x.responses.len(), 1);
}

#[test]
fn rst_in_the_middle_of_a_body_drops_that_request() {
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(b"GET /ok HTTP/1.1\r\n\r\n", 1000));
    segs.extend(c.client_data(
        b"POST /cut HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly-part",
        1000,
    ));
    segs.push(c.reset());
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    assert_eq!(x.requests[0].target(), "/ok");
    let st = x.r.handler().stats();
    assert_eq!(st.dropped_incomplete, 1);
    assert_eq!(x.r.stats().closed_rst, 1);
}

#[test]
fn mid_stream_join_skips_to_the_next_request() {
    let mut c = conv();
    // No handshake: the agent starts while a body is in flight.
    let mut segs = c.client_data(b"ody-of-an-earlier-request\x00\x01", 1000);
    segs.extend(c.client_data(b"GET /books/7 HTTP/1.1\r\nHost: h\r\n\r\n", 1000));
    segs.extend(c.server_data(b"tail of an earlier response", 1000));
    segs.extend(c.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1000));
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    assert_eq!(x.requests[0].target(), "/books/7");
    assert_eq!(x.responses.len(), 1);
    let st = x.r.handler().stats();
    assert_eq!(st.resync_skipped_bytes, 27 + 27);
    assert_eq!(x.r.stats().midstream_joins, 2);
}

#[test]
fn lost_segment_in_a_length_body_drops_only_that_request() {
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(b"POST /a HTTP/1.1\r\nContent-Length: 30\r\n\r\n", 1000));
    let body = c.client_data(b"aaaaaaaaaabbbbbbbbbbcccccccccc", 10);
    segs.push(body[0].clone());
    segs.push(body[2].clone()); // body[1] never arrives
    segs.extend(c.client_data(b"GET /b HTTP/1.1\r\n\r\n", 1000));
    let x = run(&segs);
    assert_eq!(
        x.requests.iter().map(|r| r.target()).collect::<Vec<_>>(),
        ["/b"]
    );
    assert_eq!(x.r.handler().stats().dropped_gap, 1);
    assert_eq!(x.r.stats().lost_bytes, 10);
    assert_eq!(x.r.stats().holes_timeout, 1);
}

#[test]
fn a_fin_after_a_hole_ends_the_connection_after_the_hole_timeout() {
    let mut x = Extract::new(&[80]);
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(b"GET /a HTTP/1.1\r\n\r\n", 1000));
    let lost = c.client_data(b"POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 1000);
    segs.extend(c.close());
    x.feed(&segs);
    assert_eq!(x.r.flow_count(), 1);
    x.r.tick(c.ts + 1_000_000_000);
    assert_eq!(
        x.r.flow_count(),
        0,
        "closed after the hole timeout, not the idle timeout"
    );
    assert_eq!(x.r.stats().lost_bytes, lost[0].payload.len() as u64);
    assert_eq!(x.r.stats().closed_fin, 1);
}

#[test]
fn stop_on_upgrade_connect_and_tls_hand_http2_over() {
    type Counter = fn(&super::HttpStats) -> u64;
    let cases: [(&[u8], Counter); 4] = [
        (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET /x HTTP/1.1\r\n\r\n", |s| s.stopped_upgrade),
        (b"CONNECT a:443 HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n", |s| s.stopped_connect),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /x HTTP/1.1\r\n\r\n", |s| s.h2_connections),
        (b"\x16\x03\x01\x02\x00\x01GET /x HTTP/1.1\r\n\r\n", |s| s.stopped_tls),
    ];
    for (data, counter) in cases {
        let mut c = conv();
        let mut segs = c.handshake();
        segs.extend(c.client_data(data, 1000));
        let x = run(&segs);
        assert!(x.requests.is_empty(), "{:?}", String::from_utf8_lossy(data));
        assert_eq!(counter(&x.r.handler().stats()), 1);
    }
}

#[test]
fn conflicting_overlap_keeps_the_first_copy_and_counts() {
    let mut c = conv();
    let mut segs = c.handshake();
    let data = c.client_data(b"GET /first HTTP/1.1\r\n\r\n", 6);
    let mut evil = data[2].clone();
    evil.payload = bytes::Bytes::from_static(b"XXXXXX");
    segs.push(data[0].clone());
    segs.push(data[2].clone()); // out of order: buffered
    segs.push(evil); // same range, different bytes
    segs.extend(data[1..].iter().cloned());
    let x = run(&segs);
    assert_eq!(x.requests.len(), 1);
    assert_eq!(x.requests[0].target(), "/first");
    assert_eq!(x.r.stats().overlap_conflicts, 1);
}

#[test]
fn oversize_and_malformed_are_counted_and_resync() {
    let hc = HttpConfig {
        max_body_bytes: 10,
        max_head_bytes: 200,
        ..HttpConfig::default()
    };
    let mut x = Extract::with(
        ReassemblyConfig {
            server_ports: vec![80],
            ..Default::default()
        },
        hc,
    );
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(
        b"POST /big HTTP/1.1\r\nContent-Length: 11\r\n\r\n01234567890",
        1000,
    ));
    segs.extend(c.client_data(b"GET /bad\x01path HTTP/1.1\r\n\r\n", 1000));
    let long_header = format!("GET /long HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(300));
    segs.extend(c.client_data(long_header.as_bytes(), 1000));
    segs.extend(c.client_data(b"GET /fine HTTP/1.1\r\n\r\n", 1000));
    x.feed(&segs);
    x.finish(LATER);
    assert_eq!(
        x.requests.iter().map(|r| r.target()).collect::<Vec<_>>(),
        ["/fine"]
    );
    let st = x.r.handler().stats();
    assert_eq!(
        (
            st.dropped_oversize_body,
            st.dropped_malformed,
            st.dropped_oversize_head
        ),
        (1, 1, 1)
    );
}

#[test]
fn flow_cap_evicts_least_recent_and_memory_stays_bounded() {
    let rc = ReassemblyConfig {
        server_ports: vec![80],
        max_flows: 8,
        max_ooo_bytes_total: 1000,
        ..Default::default()
    };
    let mut x = Extract::with(rc, HttpConfig::default());
    for i in 0..50u16 {
        let mut c = Conversation::new(&format!("10.0.0.1:{}", 1000 + i), "10.0.0.2:80", 1, 1);
        let mut segs = c.handshake();
        let d = c.client_data(&vec![b'z'; 600], 100);
        segs.extend(d.into_iter().skip(1)); // a hole at the start: all of it is out of order
        x.feed(&segs);
        assert!(x.r.flow_count() <= 8);
        assert!(x.r.stats().ooo_bytes_held <= 1000);
    }
    assert_eq!(x.r.stats().evicted_full, 42);
}

#[test]
fn unfinished_heads_on_many_connections_stay_under_the_global_cap() {
    let hc = HttpConfig {
        max_buffered_bytes: 200_000,
        ..HttpConfig::default()
    };
    let mut x = Extract::with(
        ReassemblyConfig {
            server_ports: vec![80],
            ..Default::default()
        },
        hc,
    );
    for i in 0..100u16 {
        let mut c = Conversation::new(&format!("10.0.1.1:{}", 2000 + i), "10.0.0.2:80", 1, 1);
        let mut segs = c.handshake();
        let head = format!("GET /{} HTTP/1.1\r\nX: {}", i, "v".repeat(40_000));
        segs.extend(c.client_data(head.as_bytes(), 1400));
        x.feed(&segs);
        assert!(x.r.handler().stats().buffered_bytes <= 200_000 + 1400);
    }
    assert!(x.r.handler().stats().dropped_memory > 0);
}

/// A valid request of the generated kind, serialised.
fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("PATCH")
    ];
    let path = "/[a-z0-9/]{0,20}";
    let headers = prop::collection::vec(("X-[A-Za-z]{1,8}", "[ -~]{0,30}"), 0..5);
    let body = prop::collection::vec(any::<u8>(), 0..2000);
    let chunked = any::<bool>();
    let chunk_sizes = prop::collection::vec(1usize..700, 1..6);
    (method, path, headers, body, chunked, chunk_sizes).prop_map(
        |(m, p, hs, body, chunked, sizes)| {
            let mut out = format!("{m} /{p} HTTP/1.1\r\nHost: svc\r\n").into_bytes();
            for (k, v) in hs {
                out.extend(format!("{k}: {}\r\n", v.trim()).bytes());
            }
            if body.is_empty() && m == "GET" {
                out.extend(b"\r\n");
            } else if chunked {
                out.extend(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut rest = &body[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = sizes[i % sizes.len()].min(rest.len());
                    out.extend(format!("{n:x}\r\n").bytes());
                    out.extend(&rest[..n]);
                    out.extend(b"\r\n");
                    rest = &rest[n..];
                    i += 1;
                }
                out.extend(b"0\r\n\r\n");
            } else {
                out.extend(format!("Content-Length: {}\r\n\r\n", body.len()).bytes());
                out.extend(&body);
            }
            out
        },
    )
}

/// Random segment cuts of `len` bytes.
fn cuts(len: usize, seeds: &[usize]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < len {
        let n = 1 + seeds[i % seeds.len()] % 1400;
        out.push((at, (at + n).min(len)));
        at += n;
        i += 1;
    }
    out
}

fn segments_for(c: &mut Conversation, stream: &[u8], ranges: &[(usize, usize)]) -> Vec<Segment> {
    let base = c.client_seq;
    let all = c.client_data(stream, usize::MAX);
    let template = all.into_iter().next();
    ranges
        .iter()
        .map(|&(s, e)| {
            let mut seg = template.clone().unwrap();
            seg.seq = base.wrapping_add(s as u32);
            seg.payload = bytes::Bytes::copy_from_slice(&stream[s..e]);
            seg
        })
        .collect()
}

/// Moves each element at most `window` places (a bounded reordering).
fn reorder<T>(v: &mut [T], swaps: &[(usize, usize)], window: usize) {
    if v.len() < 2 {
        return;
    }
    for &(a, d) in swaps {
        let i = a % v.len();
        let j = (i + 1 + d % window).min(v.len() - 1);
        v.swap(i, j);
    }
}

proptest! {
    #[test]
    fn any_valid_requests_survive_cutting_reordering_and_duplication(
        reqs in prop::collection::vec(request_strategy(), 1..12),
        seeds in prop::collection::vec(1usize..5000, 1..20),
        swaps in prop::collection::vec((any::<usize>(), any::<usize>()), 0..30),
        dups in prop::collection::vec((any::<usize>(), 1usize..3000), 0..8),
        isn in any::<u32>(),
    ) {
        let stream: Vec<u8> = reqs.concat();
        let mut c = Conversation::new("10.9.0.1:5555", "10.9.0.2:80", isn, 7);
        let mut segs = c.handshake();
        let mut ranges = cuts(stream.len(), &seeds);
        // Duplicates and overlaps: extra copies of arbitrary ranges of the same bytes.
        for &(at, len) in &dups {
            let s = at % stream.len();
            ranges.push((s, (s + len).min(stream.len())));
        }
        let mut data = segments_for(&mut c, &stream, &ranges);
        reorder(&mut data, &swaps, 4);
        segs.extend(data);
        segs.extend(c.close());
        let x = run(&segs);
        let got: Vec<&[u8]> = x.requests.iter().map(|r| &r.raw[..]).collect();
        let want: Vec<&[u8]> = reqs.iter().map(|r| &r[..]).collect();
        prop_assert_eq!(got, want);
        let st = x.r.handler().stats();
        prop_assert_eq!(st.dropped_gap + st.dropped_incomplete + st.dropped_malformed, 0);
        prop_assert_eq!(x.r.stats().lost_bytes, 0);
    }

    #[test]
    fn a_lost_segment_drops_exactly_the_requests_it_touched(
        reqs in prop::collection::vec(request_strategy(), 2..10),
        seeds in prop::collection::vec(1usize..3000, 1..20),
        victim in any::<usize>(),
    ) {
        let stream: Vec<u8> = reqs.concat();
        let mut c = Conversation::new("10.9.0.1:5556", "10.9.0.2:80", 99, 7);
        let mut segs = c.handshake();
        let ranges = cuts(stream.len(), &seeds);
        let v = victim % ranges.len();
        let (ls, le) = ranges[v];
        let mut data = segments_for(&mut c, &stream, &ranges);
        data.remove(v);
        segs.extend(data);
        segs.extend(c.close());
        let x = run(&segs);

        let mut bounds = Vec::new();
        let mut at = 0;
        for r in &reqs {
            bounds.push((at, at + r.len()));
            at += r.len();
        }
        let touched = |&(s, e): &(usize, usize)| s < le && ls < e;
        let want: Vec<&[u8]> = reqs.iter().zip(&bounds).filter(|(_, b)| !touched(b)).map(|(r, _)| &r[..]).collect();
        let got: Vec<&[u8]> = x.requests.iter().map(|r| &r.raw[..]).collect();
        prop_assert_eq!(got, want);
        // A touched request whose head was seen (it started before the hole) is counted as
        // dropped; one that started inside the hole never showed a head: its bytes are counted
        // as lost or skipped instead.
        let seen_touched = bounds.iter().filter(|b| touched(b) && b.0 < ls).count() as u64;
        let st = x.r.handler().stats();
        prop_assert_eq!(st.dropped_gap + st.dropped_incomplete + st.dropped_malformed, seen_touched);
        let rs = x.r.stats();
        prop_assert_eq!(rs.lost_bytes, (le - ls) as u64);
        prop_assert_eq!(rs.payload_bytes, rs.delivered_bytes + rs.duplicate_bytes + rs.discarded_bytes);
    }
}

#[test]
fn a_lost_response_never_shifts_the_pairing() {
    let mut c = conv();
    let mut segs = c.handshake();
    let ok = |code: u16| format!("HTTP/1.1 {code} OK\r\nContent-Length: 2\r\n\r\nok");
    for (i, code) in [(1, 200), (2, 404), (3, 500), (4, 201)] {
        segs.extend(c.client_data(format!("GET /r/{i} HTTP/1.1\r\n\r\n").as_bytes(), 1000));
        let resp = c.server_data(ok(code).as_bytes(), 1000);
        // The response to /r/2 never reaches the agent.
        if i != 2 {
            segs.extend(resp);
        }
    }
    segs.extend(c.close());
    let x = run(&segs);
    assert_eq!(x.requests.len(), 4);
    let paired: Vec<(u64, u16)> = x
        .responses
        .iter()
        .map(|r| (r.request_seq, r.status))
        .collect();
    // /r/3's 500 is never taken for /r/2's answer: the hole is given up on once the later
    // responses are buffered behind it, so they are left unpaired rather than paired by order.
    assert_eq!(paired, [(0, 200)]);
    let st = x.r.handler().stats();
    assert_eq!((st.unpaired_requests, st.unpaired_responses), (3, 2));
}

#[test]
fn a_response_captured_before_its_request_is_paired_with_it() {
    // Requests and responses cross two hooks, possibly on two CPUs: their clones can reach the
    // agent in either order. The response's acknowledgement tells which request it answers.
    let mut c = conv();
    let mut segs = c.handshake();
    let ok = |code: u16| format!("HTTP/1.1 {code} OK\r\nContent-Length: 2\r\n\r\nok");
    for (i, code) in [(1, 200), (2, 404), (3, 201), (4, 500)] {
        let req = c.client_data(format!("GET /r/{i} HTTP/1.1\r\n\r\n").as_bytes(), 1000);
        c.advance(1_000_000);
        let resp = c.server_data(ok(code).as_bytes(), 1000);
        c.advance(20_000_000);
        // The first and third exchanges arrive response first.
        if i % 2 == 1 {
            segs.extend(resp);
            segs.extend(req);
        } else {
            segs.extend(req);
            segs.extend(resp);
        }
    }
    segs.extend(c.close());
    let x = run(&segs);
    let paired: Vec<(u64, u16)> = x
        .responses
        .iter()
        .map(|r| (r.request_seq, r.status))
        .collect();
    assert_eq!(paired.len(), 4, "{paired:?}");
    let mut sorted = paired.clone();
    sorted.sort();
    assert_eq!(sorted, [(0, 200), (1, 404), (2, 201), (3, 500)]);
    let st = x.r.handler().stats();
    assert_eq!((st.early_responses, st.unpaired_responses), (2, 0));
}

/// Extraction with responses described by their heads (`--response-capture heads`).
fn heads_extract() -> Extract {
    Extract::with(
        ReassemblyConfig {
            server_ports: vec![80],
            ..Default::default()
        },
        HttpConfig {
            response_heads: true,
            ..Default::default()
        },
    )
}

fn response_with_body(status: u16, len: usize) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status} X\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    r.extend(std::iter::repeat_n(b'b', len));
    r
}

fn statuses(x: &Extract) -> Vec<(u64, u16)> {
    x.responses
        .iter()
        .map(|r| (r.request_seq, r.status))
        .collect()
}

#[test]
fn heads_frame_length_delimited_responses_with_their_bodies_elided() {
    let mut c = conv();
    let mut segs = c.handshake();
    for (i, len) in [16 << 10, 0, 3000].into_iter().enumerate() {
        c.advance(1_000_000);
        segs.extend(c.client_data(
            format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            1000,
        ));
        c.advance(2_000_000);
        let resp = response_with_body(200 + i as u16, len);
        let mut described = c.server_heads(&resp, 1400);
        if described.len() > 4 {
            // Out of order, and one retransmitted: still no loss.
            described.swap(2, 3);
            described.insert(4, described[1].clone());
        }
        segs.extend(described);
    }
    segs.extend(c.close());
    let elided: u64 = segs.iter().map(|s| u64::from(s.elided)).sum();
    let mut x = heads_extract();
    x.feed(&segs);
    x.finish(LATER);
    assert_eq!(statuses(&x), [(0, 200), (1, 201), (2, 202)]);
    assert!(x
        .responses
        .iter()
        .all(|r| r.response_first_ts - r.request_last_ts == 2_000_000));
    let r = x.r.stats();
    assert_eq!(r.lost_bytes, 0);
    assert_eq!(r.elided_bytes, elided);
    assert!(elided > 15 << 10, "the bodies were elided: {r:?}");
    assert_eq!(r.out_of_order_segments, 1);
    let h = x.r.handler().stats();
    assert_eq!((h.responses_unframed_heads, h.unpaired_requests), (0, 0));
    assert!(x.full_responses.is_empty(), "nothing needed whole");
}

#[test]
fn heads_ask_for_chunked_responses_whole_and_never_mispair() {
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n", 1000));
    let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend(b"400\r\n");
        chunked.extend([b'c'; 0x400]);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    segs.extend(c.server_heads(&chunked, 1400));
    // The kernel now clones this connection's responses whole.
    segs.extend(c.client_data(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n", 1000));
    segs.extend(c.server_data(&response_with_body(404, 10), 1400));
    segs.extend(c.close());
    let mut x = heads_extract();
    x.feed(&segs);
    x.finish(LATER);
    assert_eq!(x.full_responses, [(c.client, c.server)]);
    assert_eq!(statuses(&x), [(0, 200), (1, 404)]);
    assert_eq!(x.responses[1].target, "/next");
    assert!(x.r.handler().stats().responses_unframed_heads >= 1);
}

#[test]
fn heads_count_responses_they_cannot_see_and_never_shift_the_pairing() {
    let mut c = conv();
    let mut segs = c.handshake();
    // Pipelined: the second response starts inside the first one's elided segment.
    segs.extend(c.client_data(
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
        1000,
    ));
    let mut both = response_with_body(200, 600);
    both.extend(response_with_body(500, 10));
    segs.extend(c.server_heads(&both, 1400));
    // A head longer than a record: its status is seen, its end is not.
    segs.extend(c.client_data(b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n", 1000));
    let cookie = "x".repeat(400);
    let long = format!("HTTP/1.1 201 OK\r\nSet-Cookie: {cookie}\r\nContent-Length: 2\r\n\r\nok");
    segs.extend(c.server_heads(long.as_bytes(), 1400));
    segs.extend(c.client_data(b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n", 1000));
    segs.extend(c.server_data(&response_with_body(203, 1), 1400));
    segs.extend(c.close());
    let mut x = heads_extract();
    x.feed(&segs);
    x.finish(LATER);
    // /b and /c are never answered with someone else's status.
    assert_eq!(statuses(&x), [(0, 200), (3, 203)]);
    let h = x.r.handler().stats();
    assert_eq!(h.responses_unframed_heads, 2);
    assert_eq!(h.unpaired_requests, 2);
    assert_eq!(x.full_responses, [(c.client, c.server)]);
}
