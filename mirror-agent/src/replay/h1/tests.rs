use super::*;
use crate::replay::{parse_mirror_url, HostMode};
use crate::testkit::{Conversation, Extract};
use hyper::header::{HeaderName, HeaderValue};

/// The request the agent extracts from `wire`, sent by a client to port 8080.
fn extract(wire: &[u8]) -> h1::Request {
    let mut c = Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", 7, 9);
    let mut x = Extract::new(&[8080]);
    x.feed(&c.handshake());
    x.feed(&c.client_data(wire, 1400));
    assert_eq!(x.requests.len(), 1);
    x.requests.remove(0)
}

fn config(mirror: &str) -> ReplayConfig {
    ReplayConfig::new(parse_mirror_url(mirror).unwrap())
}

fn written(o: &Outgoing) -> Vec<u8> {
    [&o.head[..], &o.body[..]].concat()
}

#[test]
fn chunked_bodies_go_out_as_they_came() {
    let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n";
    let wire = [
        &b"POST /up HTTP/1.1\r\nHost: live\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
        body,
    ]
    .concat();
    let o = serialize(&config("http://mirror:9090"), &extract(&wire)).unwrap();
    assert_eq!(
        written(&o),
        [
            &b"POST /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nHost: mirror:9090\r\n\r\n"
                [..],
            body
        ]
        .concat()
    );
    assert!(!o.idempotent);
}

#[test]
fn length_bodies_keep_their_length_and_names_keep_their_case() {
    let o = serialize(
        &config("http://mirror:9090"),
        &extract(b"PUT /r HTTP/1.1\r\nHost: h\r\nX-Trace-ID: 7\r\ncontent-length: 5\r\n\r\nhello"),
    )
    .unwrap();
    assert_eq!(
        written(&o),
        b"PUT /r HTTP/1.1\r\nX-Trace-ID: 7\r\nHost: mirror:9090\r\nContent-Length: 5\r\n\r\nhello"
    );
    assert!(o.idempotent);
    let o = serialize(
        &config("http://mirror:9090"),
        &extract(b"GET / HTTP/1.0\r\n\r\n"),
    )
    .unwrap();
    assert_eq!(o.head(), "GET / HTTP/1.1\r\nHost: mirror:9090\r\n\r\n");
}

#[test]
fn hop_by_hop_and_dropped_headers_stay_behind() {
    let mut cfg = config("http://mirror:9090/shadow/");
    cfg.drop_headers = vec![HeaderName::from_static("authorization")];
    cfg.add_headers = vec![(
        HeaderName::from_static("x-mirrored"),
        HeaderValue::from_static("1"),
    )];
    let o = serialize(
        &cfg,
        &extract(
            b"GET http://live.example/api/x?y=1 HTTP/1.1\r\nHost: live.example\r\n\
              Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
              Upgrade: h2c\r\nAuthorization: Bearer s\r\nX-Keep: a\r\nX-Keep: b\r\n\r\n",
        ),
    )
    .unwrap();
    assert_eq!(
        o.head(),
        "GET /shadow/api/x?y=1 HTTP/1.1\r\nX-Keep: a\r\nX-Keep: b\r\nHost: mirror:9090\r\n\
         x-mirrored: 1\r\n\r\n"
    );
}

#[test]
fn the_mark_names_the_mirror_and_joins_the_clients_baggage() {
    let mut cfg = config("http://mirror:9090");
    cfg.mark = Some(crate::replay::Mark::new(
        HeaderName::from_static("x-mirrored"),
        "V2 cand",
    ));
    let o = serialize(
        &cfg,
        &extract(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Mirrored: spoofed\r\n\
              baggage: userId=alice,tenant=7\r\n\r\n",
        ),
    )
    .unwrap();
    assert_eq!(
        o.head(),
        "GET / HTTP/1.1\r\nHost: mirror:9090\r\nx-mirrored: V2%20cand\r\n\
         baggage: userId=alice,tenant=7,mirror-shadow=V2%20cand\r\n\r\n"
    );
    let o = serialize(&cfg, &extract(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")).unwrap();
    assert!(o
        .head()
        .ends_with("baggage: mirror-shadow=V2%20cand\r\n\r\n"));
}

#[test]
fn host_modes() {
    let req = extract(b"GET / HTTP/1.1\r\nHost: books:8080\r\n\r\n");
    let mut cfg = config("http://[::1]:9090");
    for (mode, want) in [
        (HostMode::Mirror, "[::1]:9090"),
        (HostMode::Keep, "books:8080"),
        (HostMode::Shadow, "books-shadow:8080"),
    ] {
        cfg.host = mode;
        let o = serialize(&cfg, &req).unwrap();
        assert!(
            o.head().contains(&format!("\r\nHost: {want}\r\n")),
            "{mode:?}"
        );
    }
    cfg.host = HostMode::Shadow;
    let o = serialize(&cfg, &extract(b"GET / HTTP/1.1\r\nHost: books\r\n\r\n")).unwrap();
    assert!(o.head().contains("\r\nHost: books-shadow\r\n"));
}

/// A mirror that reads what it is sent and answers with `script`, all of it at once, `delay`
/// after the first `wait_for` requests have arrived, then closes if `close`.
async fn mirror(
    script: &'static [u8],
    wait_for: usize,
    delay: Duration,
    close: bool,
) -> (ReplayConfig, tokio::task::JoinHandle<Vec<u8>>) {
    paced_mirror(vec![script], wait_for, delay, close).await
}

/// A mirror that, once the first `wait_for` requests have arrived, writes each piece of
/// `script` `gap` after the previous one, then closes if `close`.
async fn paced_mirror(
    script: Vec<&'static [u8]>,
    wait_for: usize,
    gap: Duration,
    close: bool,
) -> (ReplayConfig, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = config(&format!("http://{}", listener.local_addr().unwrap()));
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.windows(4).filter(|w| w == b"\r\n\r\n").count() < wait_for {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed early");
            got.extend_from_slice(&buf[..n]);
        }
        for piece in script {
            tokio::time::sleep(gap).await;
            s.write_all(piece).await.unwrap();
        }
        if !close {
            // Hold the connection open until the client is done with it.
            let _ = s.read(&mut buf).await;
        }
        got
    });
    (cfg, task)
}

fn outgoing(cfg: &ReplayConfig, wire: &[u8]) -> Outgoing {
    serialize(cfg, &extract(wire)).unwrap()
}

/// `GET /0` … `GET /{n-1}`, as written to the mirror of `cfg`.
fn numbered_gets(cfg: &ReplayConfig, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            outgoing(
                cfg,
                format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            )
        })
        .collect()
}

/// Opens a connection to the mirror of `cfg` and sends `reqs` on it as one batch.
async fn send_batch(
    cfg: &ReplayConfig,
    reqs: &[Outgoing],
    timeout: Duration,
) -> (Vec<Fate>, bool, Conn) {
    let mut conn = Conn::open(cfg).await.unwrap();
    let batch: Vec<&Outgoing> = reqs.iter().collect();
    let (fates, reusable) = conn.exchange(&batch, timeout, 16, None).await;
    (fates, reusable, conn)
}

fn statuses(fates: &[Fate]) -> Vec<Option<MirrorResult>> {
    fates.iter().map(|f| f.as_ref().map(|a| a.result)).collect()
}

#[tokio::test]
async fn a_batch_is_answered_in_order_whatever_the_framing() {
    let script: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc\
        HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4;x=1\r\nwxyz\r\n0\r\nT: 1\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n\
        HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n\
        HTTP/1.1 304 Not Modified\r\n\r\n";
    let (cfg, server) = mirror(script, 5, Duration::ZERO, false).await;
    let reqs = [
        outgoing(&cfg, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"HEAD /c HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"DELETE /d HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"GET /e HTTP/1.1\r\nHost: h\r\n\r\n"),
    ];
    let (fates, reusable, conn) = send_batch(&cfg, &reqs, Duration::from_secs(5)).await;
    use MirrorResult::Status;
    assert_eq!(
        statuses(&fates),
        [
            Some(Status(200)),
            Some(Status(404)),
            Some(Status(200)),
            Some(Status(204)),
            Some(Status(304))
        ]
    );
    assert!(reusable);
    let timed: Vec<bool> = fates
        .iter()
        .map(|f| f.as_ref().unwrap().took.is_some())
        .collect();
    assert_eq!(
        timed,
        [true, false, false, false, false],
        "only the first answer's start is known"
    );
    assert_eq!(conn.depth(), 2, "fast answers deepen the next batch");
    drop(conn);
    let got = server.await.unwrap();
    let sent: Vec<u8> = reqs.iter().flat_map(written).collect();
    assert_eq!(got, sent, "the mirror got the batch byte for byte");
}

#[tokio::test]
async fn requests_after_a_close_are_left_unanswered_and_a_cut_answer_is_a_reset() {
    let (cfg, _server) = mirror(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        3,
        Duration::ZERO,
        true,
    )
    .await;
    let reqs = [
        outgoing(&cfg, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"),
    ];
    let (fates, reusable, _) = send_batch(&cfg, &reqs, Duration::from_secs(5)).await;
    assert_eq!(
        statuses(&fates),
        [Some(MirrorResult::Status(200)), None, None]
    );
    assert!(!reusable);

    let (cfg, _server) = mirror(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        2,
        Duration::ZERO,
        true,
    )
    .await;
    let reqs = [
        outgoing(&cfg, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"),
        outgoing(&cfg, b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"),
    ];
    let (fates, _, _) = send_batch(&cfg, &reqs, Duration::from_secs(5)).await;
    assert_eq!(
        statuses(&fates),
        [Some(MirrorResult::Reset), Some(MirrorResult::Reset)],
        "the second may have been processed: never sent again"
    );
}

#[tokio::test]
async fn a_late_first_answer_then_the_batch_at_once_keeps_pipelining() {
    // A busy mirror: nothing for 20 ms (past FAST_ANSWER), then every answer at once.
    let (cfg, _server) = mirror(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        4,
        Duration::from_millis(20),
        false,
    )
    .await;
    let reqs = numbered_gets(&cfg, 4);
    let mut conn = Conn::open(&cfg).await.unwrap();
    conn.depth = 4;
    let batch: Vec<&Outgoing> = reqs.iter().collect();
    let (fates, _) = conn
        .exchange(&batch, Duration::from_secs(5), 64, None)
        .await;
    assert_eq!(statuses(&fates), vec![Some(MirrorResult::Status(200)); 4]);
    assert!(
        conn.depth() >= 4,
        "a late first answer with the rest right behind keeps the depth: {}",
        conn.depth()
    );
}

#[tokio::test]
async fn a_slow_answer_shallows_the_next_batch_and_one_past_the_timeout_ends_the_connection() {
    let (cfg, _server) = mirror(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        1,
        SLOW_FIRST_ANSWER + Duration::from_millis(30),
        false,
    )
    .await;
    let req = outgoing(&cfg, b"GET /slowish HTTP/1.1\r\nHost: h\r\n\r\n");
    let mut conn = Conn::open(&cfg).await.unwrap();
    conn.depth = 8;
    let (fates, reusable) = conn
        .exchange(&[&req], Duration::from_secs(5), 16, None)
        .await;
    let Answered { result, took, .. } = fates[0].clone().unwrap();
    assert_eq!(result, MirrorResult::Status(200));
    assert!(took >= Some(SLOW_FIRST_ANSWER), "{took:?}");
    assert!(reusable);
    assert_eq!(conn.depth(), 1, "one request at a time after a slow answer");

    let (cfg, _server) = mirror(b"", 1, Duration::ZERO, false).await;
    let req = outgoing(&cfg, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n");
    let mut conn = Conn::open(&cfg).await.unwrap();
    conn.depth = 8;
    let t = Instant::now();
    let (fates, reusable) = conn
        .exchange(&[&req], Duration::from_millis(200), 16, None)
        .await;
    assert_eq!(statuses(&fates), [Some(MirrorResult::Timeout)]);
    assert!(!reusable);
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn a_batch_answered_fast_one_by_one_but_slowly_in_all_halves_the_depth() {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    // Each answer 3 ms after the one before (under FAST_ANSWER), 18 ms in all.
    let (cfg, _server) = paced_mirror(vec![OK; 6], 6, Duration::from_millis(3), false).await;
    let reqs = numbered_gets(&cfg, 6);
    let mut conn = Conn::open(&cfg).await.unwrap();
    conn.depth = 8;
    let batch: Vec<&Outgoing> = reqs.iter().collect();
    let (fates, reusable) = conn
        .exchange(&batch, Duration::from_secs(5), 64, None)
        .await;
    assert_eq!(statuses(&fates), vec![Some(MirrorResult::Status(200)); 6]);
    assert!(reusable);
    // 4 when no gap was stretched past FAST_ANSWER by a busy machine, else 1.
    assert!(
        conn.depth() <= 4,
        "a batch longer than FAST_BATCH must not deepen the next one: {}",
        conn.depth()
    );
}

#[tokio::test]
async fn answers_until_close_and_malformed_answers() {
    let (cfg, _server) = mirror(
        b"HTTP/1.0 200 OK\r\n\r\nbody to the end",
        1,
        Duration::ZERO,
        true,
    )
    .await;
    let req = [outgoing(&cfg, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")];
    let (fates, reusable, _) = send_batch(&cfg, &req, Duration::from_secs(5)).await;
    assert_eq!(statuses(&fates), [Some(MirrorResult::Status(200))]);
    assert!(!reusable);

    let (cfg, _server) = mirror(b"SSH-2.0-OpenSSH\r\n\r\n", 1, Duration::ZERO, false).await;
    let (fates, reusable, _) = send_batch(&cfg, &req, Duration::from_secs(5)).await;
    assert_eq!(statuses(&fates), [Some(MirrorResult::Error)]);
    assert!(!reusable);
}
