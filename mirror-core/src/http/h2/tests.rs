//! HTTP/2 extraction through reassembly: frames cut anywhere, header blocks over CONTINUATION,
//! padding, joins, the h2c upgrade, caps. Header blocks come from httlib-hpack's encoder
//! (Huffman strings, incremental indexing).

use super::frame::*;
use super::hpack::tests::Enc;
use crate::http::{h2, HttpConfig};
use crate::reassembly::ReassemblyConfig;
use crate::segment::Segment;
use crate::testkit::{Conversation, Extract};

const LATER: u64 = 1_000_000_000_000_000_000;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A gRPC message: not compressed, 4-byte length, payload.
fn grpc_message(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0];
    m.extend((payload.len() as u32).to_be_bytes());
    m.extend(payload);
    m
}

fn request_fields(i: usize) -> Vec<(String, String)> {
    vec![
        (":method".into(), "POST".into()),
        (":scheme".into(), "http".into()),
        (":path".into(), format!("/pkg.Books/Get{}", i % 2)),
        (":authority".into(), "books:8080".into()),
        ("content-type".into(), "application/grpc".into()),
        ("te".into(), "trailers".into()),
        ("x-request-id".into(), format!("id-{i}")),
    ]
}

fn refs(f: &[(String, String)]) -> Vec<(&str, &str)> {
    f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

/// A client and server byte stream of `calls` unary gRPC calls on streams 1, 3, 5, …; the
/// server answers call i with grpc-status i % 3.
struct Wire {
    client: Vec<u8>,
    server: Vec<u8>,
    /// Where each call's frames start in `client`.
    call_starts: Vec<usize>,
}

fn unary_calls(calls: usize) -> Wire {
    let (mut ce, mut se) = (Enc::new(4096), Enc::new(4096));
    let mut client = PREFACE.to_vec();
    client.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
    let mut server = frame(SETTINGS, 0, 0, &[]);
    server.extend(frame(SETTINGS, ACK, 0, &[]));
    let mut call_starts = Vec::new();
    for i in 0..calls {
        let id = 2 * i as u32 + 1;
        call_starts.push(client.len());
        let block = ce.block(&refs(&request_fields(i)));
        client.extend(frame(HEADERS, END_HEADERS, id, &block));
        client.extend(frame(
            DATA,
            END_STREAM,
            id,
            &grpc_message(format!("book {i}").as_bytes()),
        ));
        let head = se.block(&[(":status", "200"), ("content-type", "application/grpc")]);
        server.extend(frame(HEADERS, END_HEADERS, id, &head));
        server.extend(frame(DATA, 0, id, &grpc_message(b"answer")));
        let status = (i % 3).to_string();
        let trailers = se.block(&[("grpc-status", &status)]);
        server.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &trailers));
    }
    Wire {
        client,
        server,
        call_starts,
    }
}

fn conv() -> Conversation {
    Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", 1000, 5000)
}

fn run(segs: &[Segment]) -> Extract {
    run_with(segs, HttpConfig::default())
}

fn run_with(segs: &[Segment], hc: HttpConfig) -> Extract {
    let rc = ReassemblyConfig {
        server_ports: vec![8080],
        ..Default::default()
    };
    let mut x = Extract::with(rc, hc);
    x.feed(segs);
    x.finish(LATER);
    x
}

fn assert_call(r: &h2::Request, i: usize) {
    let want: Vec<(String, String)> = request_fields(i);
    let got: Vec<(String, String)> = r
        .fields
        .iter()
        .map(|(n, v)| {
            (
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        &r.body[..],
        &grpc_message(format!("book {i}").as_bytes())[..]
    );
    assert_eq!(r.seq, 2 * i as u64 + 1);
}

#[test]
fn calls_come_out_whole_wherever_segments_cut_the_frames() {
    let w = unary_calls(3);
    for mss in 1..=w.client.len().min(200) {
        let mut c = conv();
        let mut segs = c.handshake();
        segs.extend(c.client_data(&w.client, mss));
        segs.extend(c.server_data(&w.server, mss.max(7) - 6));
        segs.extend(c.close());
        let x = run(&segs);
        assert_eq!(x.h2_requests.len(), 3, "mss {mss}");
        for (i, r) in x.h2_requests.iter().enumerate() {
            assert_call(r, i);
            assert!(r.from_start);
        }
        let codes: Vec<_> = x
            .responses
            .iter()
            .map(|m| (m.request_seq, m.code()))
            .collect();
        assert_eq!(
            codes,
            [
                (1, "OK".to_string()),
                (3, "CANCELLED".into()),
                (5, "UNKNOWN".into())
            ],
            "mss {mss}"
        );
        let s = x.r.handler().stats();
        assert_eq!((s.h2_connections, s.requests, s.responses), (1, 3, 3));
        assert_eq!(s.buffered_bytes, 0);
    }
}

#[test]
fn continuation_padding_and_priority_are_understood() {
    let mut ce = Enc::new(4096);
    let block = ce.block(&refs(&request_fields(0)));
    let (a, rest) = block.split_at(5);
    let (b, c) = rest.split_at(7);
    let mut client = PREFACE.to_vec();
    client.extend(frame(SETTINGS, 0, 0, &[]));
    // HEADERS padded and with priority, then two CONTINUATIONs.
    let mut headers = vec![3, 0, 0, 0, 0, 16];
    headers.extend(a);
    headers.extend([0, 0, 0]);
    client.extend(frame(HEADERS, PADDED | PRIORITY_FLAG, 1, &headers));
    client.extend(frame(CONTINUATION, 0, 1, b));
    client.extend(frame(CONTINUATION, END_HEADERS, 1, c));
    // A padded DATA frame, then the rest with END_STREAM.
    let message = grpc_message(b"book 0");
    let mut data = vec![4];
    data.extend(&message[..4]);
    data.extend([0; 4]);
    client.extend(frame(DATA, PADDED, 1, &data));
    client.extend(frame(DATA, END_STREAM, 1, &message[4..]));
    for mss in [1000, 10, 1] {
        let mut c = conv();
        let mut segs = c.handshake();
        segs.extend(c.client_data(&client, mss));
        let x = run(&segs);
        assert_eq!(
            x.h2_requests.len(),
            1,
            "mss {mss}: {:?}",
            x.r.handler().stats()
        );
        assert_call(&x.h2_requests[0], 0);
    }
}

#[test]
fn trailers_only_responses_and_request_trailers() {
    let (mut ce, mut se) = (Enc::new(4096), Enc::new(4096));
    let mut client = PREFACE.to_vec();
    client.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &ce.block(&refs(&request_fields(0))),
    ));
    client.extend(frame(DATA, 0, 1, &grpc_message(b"book 0")));
    client.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &ce.block(&[("x-checksum", "abc")]),
    ));
    // A gRPC error without a body: status and grpc-status in one HEADERS frame.
    let server = frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &se.block(&[
            (":status", "200"),
            ("grpc-status", "13"),
            ("grpc-message", "boom"),
        ]),
    );
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(&client, 1000));
    segs.extend(c.server_data(&server, 1000));
    let x = run(&segs);
    assert_eq!(x.h2_requests.len(), 1);
    let r = &x.h2_requests[0];
    assert_eq!(r.trailers.len(), 1);
    assert_eq!(&r.trailers[0].1[..], b"abc");
    assert_eq!(x.responses[0].code(), "INTERNAL");
}

/// The same connection seen whole and seen from the middle of a frame: the joined view only
/// ever yields calls the whole view yields too, and drops (and counts) the rest.
#[test]
fn a_join_yields_a_subset_of_the_whole_view_and_never_a_different_call() {
    let w = unary_calls(12);
    let mut whole_conv = conv();
    let mut segs = whole_conv.handshake();
    segs.extend(whole_conv.client_data(&w.client, 50));
    let whole = run(&segs);
    assert_eq!(whole.h2_requests.len(), 12);
    for join_at in [w.call_starts[4] + 3, w.call_starts[6], w.call_starts[9] - 1] {
        let mut c = conv();
        c.client_seq = c.client_seq.wrapping_add(1 + join_at as u32);
        let mut segs = c.client_data(&w.client[join_at..], 50);
        // Later calls that only use entries inserted after the join.
        let mut ce = Enc::new(4096);
        let fresh: Vec<u8> = (0..3)
            .flat_map(|i| {
                let mut f = frame(
                    HEADERS,
                    END_HEADERS,
                    101 + 2 * i,
                    &ce.block(&[
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/pkg.Books/New"),
                        (":authority", "books:8080"),
                    ]),
                );
                f.extend(frame(DATA, END_STREAM, 101 + 2 * i, b"x"));
                f
            })
            .collect();
        segs.extend(c.client_data(&fresh, 50));
        let joined = run(&segs);
        let s = joined.r.handler().stats();
        assert_eq!(s.h2_joined_connections, 1);
        let from_whole: Vec<_> = joined.h2_requests.iter().filter(|r| r.seq < 100).collect();
        for r in &from_whole {
            let w = whole.h2_requests.iter().find(|x| x.seq == r.seq).unwrap();
            assert_eq!((&r.fields, &r.body), (&w.fields, &w.body));
            assert!(!r.from_start);
        }
        // The fresh calls' first one inserts its fields; the encoder is a different one here,
        // so that all three resolve from entries seen after the join.
        let fresh_got = joined.h2_requests.iter().filter(|r| r.seq > 100).count();
        assert_eq!(fresh_got, 3, "join at {join_at}");
        let whole_after = w.call_starts.iter().filter(|&&s| s >= join_at).count() as u64;
        assert_eq!(
            from_whole.len() as u64 + s.dropped_hpack_unknown_index,
            whole_after,
            "join at {join_at}: {s:?}"
        );
    }
}

#[test]
fn an_accepted_h2c_upgrade_goes_on_as_http2() {
    let mut se = Enc::new(4096);
    let mut ce = Enc::new(4096);
    let mut client =
        b"GET /books HTTP/1.1\r\nHost: books\r\nConnection: Upgrade, HTTP2-Settings\r\n\
        Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            .to_vec();
    let mut server =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec();
    server.extend(frame(SETTINGS, 0, 0, &[]));
    server.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &se.block(&[(":status", "204")]),
    ));
    client.extend(PREFACE);
    client.extend(frame(SETTINGS, 0, 0, &[]));
    client.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &ce.block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/books/2"),
            (":authority", "books"),
        ]),
    ));
    server.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &se.block(&[(":status", "200")]),
    ));
    let mut c = conv();
    let mut segs = c.handshake();
    let preface_at = client.windows(5).position(|w| w == b"PRI *").unwrap();
    let (upgrade, rest) = client.split_at(preface_at);
    segs.extend(c.client_data(upgrade, 1000));
    segs.extend(c.server_data(&server, 30));
    segs.extend(c.client_data(rest, 1000));
    let x = run(&segs);
    assert_eq!(
        x.requests.len(),
        1,
        "the upgrading request, as HTTP/1.1: {:?}",
        x.r.handler().stats()
    );
    assert_eq!(x.requests[0].target(), "/books");
    assert_eq!(x.h2_requests.len(), 1);
    assert_eq!(x.h2_requests[0].path(), "/books/2");
    let (method, path) =
        crate::http::Request::H2(x.h2_requests[0].clone()).shared_method_and_target();
    assert_eq!((&method[..], &path[..]), ("GET", "/books/2"));
    let got: Vec<_> = x
        .responses
        .iter()
        .map(|m| (m.request_seq, &*m.target, m.status))
        .collect();
    assert_eq!(got, [(0, "/books", 204), (3, "/books/2", 200)]);
    let s = x.r.handler().stats();
    assert_eq!((s.h2_connections, s.h2_upgrades), (1, 1));
}

#[test]
fn responses_whose_clone_came_first_are_paired() {
    let w = unary_calls(2);
    // The second call's answer arrives before its request.
    let second = w.call_starts[1];
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(&w.client[..second], 2000));
    segs.extend(c.server_data(&w.server, 2000));
    segs.extend(c.client_data(&w.client[second..], 2000));
    let x = run(&segs);
    assert_eq!(x.h2_requests.len(), 2);
    assert_eq!(x.responses.len(), 2);
    assert_eq!(x.r.handler().stats().early_responses, 1);
}

#[test]
fn caps_on_streams_bodies_and_header_blocks_are_counted() {
    let mut ce = Enc::new(4096);
    let mut client = PREFACE.to_vec();
    // Three streams open at once with a cap of two.
    for id in [1, 3, 5] {
        client.extend(frame(
            HEADERS,
            END_HEADERS,
            id,
            &ce.block(&refs(&request_fields(id as usize))),
        ));
    }
    for id in [1, 3, 5] {
        client.extend(frame(DATA, END_STREAM, id, b"body"));
    }
    // Both answered: their streams close.
    let mut se = Enc::new(4096);
    let mut server = Vec::new();
    for id in [1, 3] {
        server.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &se.block(&[(":status", "200")]),
        ));
    }
    let first = client.len();
    // A body over the cap.
    client.extend(frame(
        HEADERS,
        END_HEADERS,
        7,
        &ce.block(&refs(&request_fields(7))),
    ));
    client.extend(frame(DATA, END_STREAM, 7, &[1; 300]));
    // A header block over the cap: the table is unknown from then on.
    let big = "v".repeat(600);
    client.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        9,
        &ce.block(&[(":method", "GET"), ("x-big", &big)]),
    ));
    // References entries inserted before the oversize block: dropped, not guessed.
    client.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        11,
        &ce.block(&refs(&request_fields(1))),
    ));
    let hc = HttpConfig {
        max_pending: 2,
        max_body_bytes: 200,
        max_head_bytes: 512,
        ..Default::default()
    };
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(&client[..first], 100));
    segs.extend(c.server_data(&server, 100));
    segs.extend(c.client_data(&client[first..], 100));
    let x = run_with(&segs, hc);
    let s = x.r.handler().stats();
    let got: Vec<u64> = x.h2_requests.iter().map(|r| r.seq).collect();
    assert_eq!(got, [1, 3], "{s:?}");
    assert_eq!(x.responses.len(), 2);
    assert_eq!(s.dropped_h2_streams_over_cap, 1);
    assert_eq!(s.dropped_oversize_body, 1);
    assert_eq!(s.dropped_oversize_head, 1);
    assert_eq!(s.dropped_hpack_unknown_index, 1);
    assert_eq!(s.buffered_bytes, 0);
}

#[test]
fn a_hole_drops_the_stream_it_hit_and_a_reset_the_stream_it_ends() {
    let w = unary_calls(4);
    let mut c = conv();
    let mut segs = c.handshake();
    let client = c.client_data(&w.client, 40);
    // Lose one segment inside call 1's frames.
    let lost_at = w.call_starts[1] + 45;
    let lost = lost_at / 40;
    for (i, s) in client.into_iter().enumerate() {
        if i != lost {
            segs.push(s);
        }
    }
    let x = run(&segs);
    let s = x.r.handler().stats();
    let got: Vec<u64> = x.h2_requests.iter().map(|r| r.seq).collect();
    assert!(!got.contains(&3), "call 1 lost bytes: {got:?}");
    assert!(got.contains(&1));
    assert!(s.dropped_gap + s.dropped_hpack_unknown_index >= 1, "{s:?}");
    // Every call is either extracted or counted.
    assert_eq!(
        got.len() as u64 + s.dropped_gap + s.dropped_hpack_unknown_index + s.dropped_malformed,
        4,
        "{s:?}"
    );

    let mut ce = Enc::new(4096);
    let mut client = PREFACE.to_vec();
    client.extend(frame(
        HEADERS,
        END_HEADERS,
        1,
        &ce.block(&refs(&request_fields(0))),
    ));
    client.extend(frame(DATA, 0, 1, b"part"));
    client.extend(frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(&client, 1000));
    let x = run(&segs);
    assert!(x.h2_requests.is_empty());
    assert_eq!(x.r.handler().stats().h2_reset_streams, 1);
}

/// Parts a streaming request's body sends on, until its channel closes.
fn parts(r: &h2::Request) -> Vec<Option<h2::StreamPart>> {
    let mut rx = r
        .rest
        .as_ref()
        .expect("a streaming request")
        .take()
        .unwrap();
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(p) => out.push(Some(p)),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                out.push(None);
                break;
            }
        }
    }
    out
}

#[test]
fn a_request_still_arriving_is_handed_on_and_streams_or_is_cut() {
    // One copy of the body per mirror.
    for (reset, copies) in [(false, 1), (true, 1), (false, 3), (true, 2)] {
        let mut ce = Enc::new(4096);
        let mut c = conv();
        let mut segs = c.handshake();
        let mut head = PREFACE.to_vec();
        head.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &ce.block(&refs(&request_fields(0))),
        ));
        head.extend(frame(DATA, 0, 1, b"one"));
        segs.extend(c.client_data(&head, 1000));
        c.advance(30_000_000);
        segs.extend(c.client_data(&frame(DATA, 0, 1, b"two"), 1000));
        c.advance(30_000_000);
        let last = if reset {
            frame(RST_STREAM, 0, 1, &[0, 0, 0, 8])
        } else {
            let mut f = frame(DATA, 0, 1, b"three");
            f.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &ce.block(&[("x-sum", "9")]),
            ));
            f
        };
        segs.extend(c.client_data(&last, 1000));
        let x = run_with(
            &segs,
            HttpConfig {
                stream_copies: copies,
                ..Default::default()
            },
        );
        assert_eq!(x.h2_requests.len(), 1);
        let r = &x.h2_requests[0];
        // Handed on at the segment that came 30 ms later, with what had arrived by then.
        assert_eq!(&r.body[..], b"onetwo");
        let got = parts(r);
        for _ in 1..copies {
            assert_eq!(parts(r), got, "every mirror's copy is the same");
        }
        assert!(r.rest.as_ref().unwrap().take().is_none(), "{copies} copies");
        let data = |b: &'static [u8]| Some(h2::StreamPart::Data(bytes::Bytes::from_static(b)));
        let s = x.r.handler().stats();
        if reset {
            assert_eq!(got, [None], "cut: the channel closes without End");
            assert_eq!(s.h2_streams_cut, 1);
        } else {
            let trailers = vec![(
                bytes::Bytes::from_static(b"x-sum"),
                bytes::Bytes::from_static(b"9"),
            )];
            assert_eq!(
                got,
                [
                    data(b"three"),
                    Some(h2::StreamPart::Trailers(trailers)),
                    Some(h2::StreamPart::End),
                    None
                ]
            );
            assert_eq!(s.h2_streams_cut, 0);
        }
        assert_eq!((s.requests, s.h2_streamed_requests), (1, 1));
    }
}

#[test]
fn without_response_tracking_streams_end_with_their_request() {
    let w = unary_calls(50);
    let mut c = conv();
    let mut segs = c.handshake();
    segs.extend(c.client_data(&w.client, 1400));
    let hc = HttpConfig {
        track_responses: false,
        max_pending: 2,
        ..Default::default()
    };
    let x = run_with(&segs, hc);
    assert_eq!(x.h2_requests.len(), 50);
    assert_eq!(x.r.handler().stats().dropped_h2_streams_over_cap, 0);
}
