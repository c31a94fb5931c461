//! Reassembly + HTTP extraction on one core, fed prepared segments (no capture).
//! `cargo bench -p mirror-agent --bench pipeline`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mirror_agent::http::{HttpConfig, HttpEvent, HttpExtractor};
use mirror_agent::reassembly::{Reassembler, ReassemblyConfig};
use mirror_agent::segment::Segment;
use mirror_agent::testkit::Conversation;

const CONNS: u16 = 100;

/// `per_conn` requests on each of `CONNS` keep-alive connections, connections interleaved.
fn workload(per_conn: usize, request: &[u8], mss: usize) -> (Vec<Segment>, usize, usize) {
    let mut convs: Vec<Conversation> = (0..CONNS)
        .map(|i| {
            Conversation::new(
                &format!("10.1.{}.{}:{}", i / 250, i % 250, 30000 + i),
                "10.2.0.1:80",
                1000 + i as u32,
                9,
            )
        })
        .collect();
    let mut segs: Vec<Segment> = convs.iter_mut().flat_map(|c| c.handshake()).collect();
    for _ in 0..per_conn {
        for c in convs.iter_mut() {
            segs.extend(c.client_data(request, mss));
        }
    }
    let bytes = per_conn * CONNS as usize * request.len();
    (segs, per_conn * CONNS as usize, bytes)
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// `per_conn` unary gRPC calls on each of `CONNS` HTTP/2 connections, as grpc clients send them:
/// HEADERS (HPACK with Huffman strings and the dynamic table, a request id that changes every
/// call) and one DATA frame that ends the stream, one call per segment.
fn grpc_workload(per_conn: usize) -> (Vec<Segment>, usize) {
    use mirror_agent::http::h2::frame::{DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE};
    let mut segs = Vec::new();
    let mut convs: Vec<(Conversation, httlib_hpack::Encoder)> = (0..CONNS)
        .map(|i| {
            let mut c = Conversation::new(
                &format!("10.1.{}.{}:{}", i / 250, i % 250, 30000 + i),
                "10.2.0.1:80",
                1000 + i as u32,
                9,
            );
            segs.extend(c.handshake());
            segs.extend(c.client_data(PREFACE, 1448));
            (c, httlib_hpack::Encoder::with_dynamic_size(4096))
        })
        .collect();
    let message = [
        0u8, 0, 0, 0, 12, 8, 2, 18, 8, b'r', b'e', b'v', b'i', b'e', b'w', b's', b'!',
    ];
    for call in 0..per_conn {
        for (c, enc) in convs.iter_mut() {
            let mut block = Vec::new();
            let id = format!("{call:016x}");
            for (n, v) in [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/bookstore.Books/GetReviews"),
                (":authority", "bookservice:8080"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("user-agent", "grpc-rust/0.13"),
                ("x-request-id", id.as_str()),
            ] {
                let flags = 0x1 | 0x2 | 0x4 | 0x10;
                enc.encode(
                    (n.as_bytes().to_vec(), v.as_bytes().to_vec(), flags),
                    &mut block,
                )
                .unwrap();
            }
            let stream = 2 * call as u32 + 1;
            let mut wire = frame(HEADERS, END_HEADERS, stream, &block);
            wire.extend(frame(DATA, END_STREAM, stream, &message));
            segs.extend(c.client_data(&wire, 1448));
        }
    }
    (segs, per_conn * CONNS as usize)
}

fn run(segs: &[Segment]) -> usize {
    let mut r = Reassembler::new(
        ReassemblyConfig {
            server_ports: vec![80],
            ..Default::default()
        },
        HttpExtractor::new(HttpConfig {
            // The bench has no responses: streams close when their request ends.
            track_responses: false,
            ..Default::default()
        }),
    );
    let mut n = 0;
    for s in segs {
        r.process(s);
        n += r
            .handler_mut()
            .drain()
            .filter(|e| matches!(e, HttpEvent::Request(_)))
            .count();
    }
    n
}

fn bench(c: &mut Criterion) {
    let get = b"GET /api/books/2/reviews HTTP/1.1\r\nHost: bookservice\r\nUser-Agent: poller/1.0\r\nAccept: */*\r\n\r\n";
    let (in_order, n_small, bytes_small) = workload(100, get, 1448);
    let mut reordered = in_order.clone();
    // 10% of segments swapped with their successor: each arrives out of order once.
    let mut i = 3 * CONNS as usize;
    while i + 1 < reordered.len() {
        reordered.swap(i, i + 1);
        i += 10;
    }
    let mut post =
        b"POST /api/books/1/reviews HTTP/1.1\r\nHost: bookservice\r\nContent-Length: 65536\r\n\r\n"
            .to_vec();
    post.extend((0..65536u32).map(|i| (i % 251) as u8));
    let (big, n_big, bytes_big) = workload(2, &post, 1448);

    let mut g = c.benchmark_group("reassembly+http");
    for (name, segs, n, bytes) in [
        ("small GETs in order", &in_order, n_small, bytes_small),
        (
            "small GETs, 10% reordered",
            &reordered,
            n_small,
            bytes_small,
        ),
        ("64 KiB POSTs", &big, n_big, bytes_big),
    ] {
        assert_eq!(run(segs), n, "{name}: every request extracted");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{name} (requests)"), |b| {
            b.iter_batched(|| (), |_| run(segs), BatchSize::SmallInput)
        });
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("{name} (bytes)"), |b| {
            b.iter_batched(|| (), |_| run(segs), BatchSize::SmallInput)
        });
    }
    // The cost of HTTP/2 framing, HPACK and stream tracking per request, next to the small
    // GETs' per-request cost above.
    let (grpc, n_grpc) = grpc_workload(100);
    assert_eq!(run(&grpc), n_grpc, "gRPC: every call extracted");
    g.throughput(Throughput::Elements(n_grpc as u64));
    g.bench_function("gRPC unary calls, HTTP/2 + HPACK (requests)", |b| {
        b.iter_batched(|| (), |_| run(&grpc), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
