//! HTTP/1 to the mirror: requests written as bytes, those waiting pipelined in one write.
//!
//! hyper's HTTP/1 client sends one request at a time on a connection, so every mirrored request
//! cost a write, a read and a wake-up of its own; on loopback the write alone (it also runs the
//! mirror's receive path) was a quarter of the agent's CPU. A worker here writes the requests
//! that are waiting, up to a depth, in one write and reads the answers in order (RFC 9112
//! 9.3.2). What keeps pipelining safe and the timings honest:
//! - a request whose method is not idempotent is never written behind another one, so a
//!   connection that closes under a batch never leaves one unanswered behind an answered one;
//! - requests left unanswered where the mirror closed cleanly (after `Connection: close`, or at a
//!   response boundary) were not processed: idempotent ones go out again on a new connection,
//!   once; the others count as resets;
//! - only the first answer of a batch is timed (from the write to its head). When the mirror
//!   started on a later one is not known: the previous answer's arrival as the agent read it
//!   comes late when the agent is busy, and would make the answer read short (a 300 ms endpoint
//!   averaged 295 ms). Later answers count for their status, not for durations;
//! - the depth doubles while answers come within `FAST_ANSWER` of each other and falls back to
//!   one request as soon as one is slower, or the batch's first answer takes longer than
//!   `SLOW_FIRST_ANSWER`, so that a slow answer holds up at most one batch; it halves when a
//!   batch's answers, each fast, spread over more than `FAST_BATCH`, so that pipelining does
//!   not stack a mirror's answers deeper than that behind each other. A first answer that is
//!   merely late (a mirror busy on a saturated node gets the CPU late, then answers the whole
//!   batch at once) keeps pipelining: falling back to one request a write then would cost the
//!   agent and the mirror a write and a read per request exactly when CPU is scarcest (at
//!   saturation the mirror got 1.1 to 1.4 requests a write, against 36 at 20k req/s).
//!
//! The bytes keep the client's header names, case and order, and a chunked body goes out as it
//! came (extensions and trailers included). Only hop-by-hop headers, `--drop-header`, Host and
//! `--add-header` change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tls::{Alpn, MirrorStream};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{connect_mirror, mirror_authority, mirror_path, ReplayConfig, Unsendable};
use crate::exchange::content::{Content, ContentBuilder, ContentCapture};
use crate::exchange::MirrorResult;
use crate::http::framing::{BodyDecoder, Framing};
use crate::http::h1::{self, parse_client_response};

/// Headers that describe one hop's connection, never forwarded (RFC 9110 7.6.1), besides those
/// named in Connection. Content-Length is written from the body's framing; Transfer-Encoding
/// stands only on chunked requests, whose body goes out as it came, so it is kept.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "content-length",
];

/// Answers that come this soon after the mirror could start on them let the depth grow. The
/// time includes the agent's own delay in reading, so a tighter bound would stop pipelining
/// exactly when the agent is busiest and needs it most.
const FAST_ANSWER: Duration = Duration::from_millis(5);

/// A batch whose first answer (from the write) takes longer than this was slow at the mirror's
/// end: the next batch is one request. Below it, the wait is taken for the mirror's or the
/// agent's own scheduling, which pipelining relieves.
const SLOW_FIRST_ANSWER: Duration = Duration::from_millis(50);

/// Batches answered this soon, from the first answer to the last, let the depth grow; longer
/// ones halve it, so that the last answer of a batch waits about this long behind the others
/// (a deep batch of answers that are each just under `FAST_ANSWER` would wait for all of them).
/// Against a mirror that takes 1 ms a request the depth moves between 8 and 16; against one that
/// answers in microseconds it reaches `--pipeline-depth`.
const FAST_BATCH: Duration = Duration::from_millis(10);

/// Longest chunk-size or trailer line accepted in an answer.
const MAX_LINE: usize = 64 << 10;

/// The next batch's depth after one whose answers were `slow` (see `exchange`) and spread over
/// `spread` from the first to the last: one after a slow answer, half after a wide spread,
/// else twice as deep, up to `max_depth`.
fn next_depth(depth: usize, slow: bool, spread: Duration, max_depth: usize) -> usize {
    if slow {
        1
    } else if spread > FAST_BATCH {
        (depth / 2).max(1)
    } else {
        (depth * 2).min(max_depth.max(1))
    }
}

/// A request as it will be written to the mirror.
#[derive(Clone, Debug)]
pub struct Outgoing {
    head: Vec<u8>,
    body: Bytes,
    /// The answer has no body whatever its headers say.
    to_head: bool,
    /// May be written behind another request, and sent again when left unanswered.
    pub idempotent: bool,
}

impl Outgoing {
    /// The request line and headers, as written.
    #[cfg(test)]
    pub fn head(&self) -> &str {
        std::str::from_utf8(&self.head).unwrap()
    }
}

/// RFC 9110 9.2.2.
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// The mirror request for a live HTTP/1 request: same method, target (under the mirror's path
/// prefix), headers and body; hop-by-hop and dropped headers left out; Host as `--host` says.
pub fn serialize(cfg: &ReplayConfig, req: &h1::Request) -> Result<Outgoing, Unsendable> {
    let connection_tokens: Vec<String> = req
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    // Names are compared in place: a lowercased copy per header was most of this function.
    let dropped = |name: &str| {
        HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || connection_tokens
                .iter()
                .any(|t| name.eq_ignore_ascii_case(t))
            || cfg
                .drop_headers
                .iter()
                .any(|d| name.eq_ignore_ascii_case(d.as_str()))
    };
    let mut head = Vec::with_capacity(req.head().len() + 64);
    let line = |head: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    head.extend_from_slice(req.method().as_bytes());
    head.push(b' ');
    head.extend_from_slice(mirror_path(cfg, req.target()).as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let mut original_host = None;
    for (name, value) in req.headers() {
        if name.eq_ignore_ascii_case("host") {
            original_host = Some(value);
        } else if !dropped(name) {
            line(&mut head, name.as_bytes(), value);
        }
    }
    let host = mirror_authority(cfg, original_host)?;
    line(&mut head, b"Host", host.as_bytes());
    for (name, value) in &cfg.add_headers {
        line(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Framing::Length(n) = req.framing {
        let mut digits = itoa::Buffer::new();
        line(&mut head, b"Content-Length", digits.format(n).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    Ok(Outgoing {
        head,
        body: req.body.clone(),
        to_head: req.method() == "HEAD",
        idempotent: idempotent(req.method()),
    })
}

/// How one request of a batch ended, or None when the mirror closed cleanly before answering
/// it (it was not processed).
pub type Fate = Option<Answered>;

/// One request's end.
#[derive(Clone, Debug)]
pub struct Answered {
    pub result: MirrorResult,
    /// None: untimed, being behind another request in its batch.
    pub took: Option<Duration>,
    /// The answer read whole, when contents are compared.
    pub content: Option<Arc<Content>>,
}

impl Answered {
    fn failed(result: MirrorResult, took: Option<Duration>) -> Fate {
        Some(Answered {
            result,
            took,
            content: None,
        })
    }
}

/// A worker's connection to the mirror.
pub struct Conn {
    stream: MirrorStream,
    /// Bytes read and not yet parsed.
    buf: BytesMut,
    /// The batch being written.
    out: Vec<u8>,
    /// When the last read returned.
    last_read: Instant,
    /// How many requests the next batch may hold.
    depth: usize,
}

/// An answer read to its end.
struct Answer {
    status: u16,
    /// When its head arrived.
    head_at: Instant,
    /// Whether the connection stays open after it.
    keep_alive: bool,
    content: Option<Content>,
}

/// Why reading an answer stopped.
enum ReadStop {
    /// The mirror closed the connection where an answer would start.
    ClosedAtBoundary,
    Failed(MirrorResult),
}

impl Conn {
    pub async fn open(cfg: &ReplayConfig) -> Result<Conn, MirrorResult> {
        Ok(Conn {
            stream: connect_mirror(cfg, Alpn::Http1).await?,
            buf: BytesMut::with_capacity(16 << 10),
            out: Vec::new(),
            last_read: Instant::now(),
            depth: 1,
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Resolves when the idle connection is closed by the mirror, fails, or receives bytes
    /// nobody asked for; it cannot carry a request then.
    pub async fn unusable(&mut self) {
        // Anything (bytes, the end, an error) makes it unusable; a TLS record that carries no
        // data (a session ticket) reads as nothing and is waited past.
        let _ = self.stream.read_buf(&mut self.buf).await;
    }

    /// Writes `batch` in one write and reads its answers in order, each within `timeout` of when
    /// the mirror could start on it. Returns a fate per request, and whether the connection can
    /// carry another batch. `max_depth` caps how deep the next batch may be.
    pub async fn exchange(
        &mut self,
        batch: &[&Outgoing],
        timeout: Duration,
        max_depth: usize,
        content: Option<&ContentCapture>,
    ) -> (Vec<Fate>, bool) {
        let mut fates: Vec<Fate> = vec![None; batch.len()];
        self.out.clear();
        for o in batch {
            self.out.extend_from_slice(&o.head);
            self.out.extend_from_slice(&o.body);
        }
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.stream.write_all(&self.out)).await {
            Err(_) => {
                fates.fill(Answered::failed(
                    MirrorResult::Timeout,
                    Some(started.elapsed()),
                ));
                return (fates, false);
            }
            // Refused or reset under the write: none of it was answered; the caller decides.
            Ok(Err(_)) => return (fates, false),
            Ok(Ok(())) => {}
        }
        // When the mirror could start on the next request, as far as the agent knows: the write,
        // then each answer's end as read. Good enough to bound waits and choose the depth.
        let mut since = Instant::now();
        let mut slow = false;
        let mut first_answer = None;
        for (i, o) in batch.iter().enumerate() {
            let timed = |took: Duration| (i == 0).then_some(took);
            match self.read_answer(o.to_head, since + timeout, content).await {
                Ok(answer) => {
                    let took = answer.head_at.saturating_duration_since(since);
                    slow |= took
                        > if i == 0 {
                            SLOW_FIRST_ANSWER
                        } else {
                            FAST_ANSWER
                        };
                    first_answer.get_or_insert(answer.head_at);
                    fates[i] = Some(Answered {
                        result: MirrorResult::Status(answer.status),
                        took: timed(took),
                        content: answer.content.map(Arc::new),
                    });
                    let keep_alive = answer.keep_alive;
                    since = self.last_read.max(since);
                    if !keep_alive {
                        return (fates, false);
                    }
                }
                Err(ReadStop::ClosedAtBoundary) => return (fates, false),
                Err(ReadStop::Failed(result)) => {
                    // The rest was written and may have been processed: not sent again.
                    let rest = if result == MirrorResult::Timeout {
                        MirrorResult::Timeout
                    } else {
                        MirrorResult::Reset
                    };
                    fates[i] = Answered::failed(result, timed(since.elapsed()));
                    for f in &mut fates[i + 1..] {
                        *f = Answered::failed(rest, None);
                    }
                    return (fates, false);
                }
            }
        }
        let spread = self
            .last_read
            .saturating_duration_since(first_answer.unwrap_or(started));
        self.depth = next_depth(self.depth, slow, spread, max_depth);
        // Bytes beyond the last answer were never asked for.
        (fates, self.buf.is_empty())
    }

    /// Reads one answer (after any interim 1xx ones) to its end.
    async fn read_answer(
        &mut self,
        to_head: bool,
        deadline: Instant,
        content: Option<&ContentCapture>,
    ) -> Result<Answer, ReadStop> {
        loop {
            let head = loop {
                match parse_client_response(&self.buf, to_head) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {
                        if self.fill(deadline).await? == 0 {
                            return Err(if self.buf.is_empty() {
                                ReadStop::ClosedAtBoundary
                            } else {
                                ReadStop::Failed(MirrorResult::Reset)
                            });
                        }
                    }
                    Err(_) => return Err(ReadStop::Failed(MirrorResult::Error)),
                }
            };
            let head_at = self.last_read;
            let interim = (100..200).contains(&head.status) && head.status != 101;
            let mut collect = match content {
                Some(cfg) if !interim => Some(ContentBuilder::from_head(
                    cfg,
                    head.status,
                    &self.buf[..head.len],
                )),
                _ => None,
            };
            self.buf.advance(head.len);
            if interim {
                continue;
            }
            if let Some(mut body) = BodyDecoder::new(head.framing) {
                loop {
                    let (n, done) = body
                        .feed_with(&self.buf, MAX_LINE, &mut |b| {
                            if let Some(c) = collect.as_mut() {
                                c.push(b);
                            }
                        })
                        .map_err(|_| ReadStop::Failed(MirrorResult::Error))?;
                    self.buf.advance(n);
                    if done {
                        break;
                    }
                    if self.fill(deadline).await? == 0 {
                        if head.framing == Framing::UntilClose {
                            break;
                        }
                        return Err(ReadStop::Failed(MirrorResult::Reset));
                    }
                }
            }
            return Ok(Answer {
                status: head.status,
                head_at,
                keep_alive: head.keep_alive,
                content: collect.map(ContentBuilder::finish),
            });
        }
    }

    /// Reads what the mirror sent, by the deadline. Returns how many bytes came (0: closed).
    async fn fill(&mut self, deadline: Instant) -> Result<usize, ReadStop> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 << 10);
        }
        let read = tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.buf));
        match read.await {
            Err(_) => Err(ReadStop::Failed(MirrorResult::Timeout)),
            Ok(Err(e)) => Err(ReadStop::Failed(super::classify(&e))),
            Ok(Ok(n)) => {
                self.last_read = Instant::now();
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
                &b"POST /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nHost: mirror:9090\r\n\r\n"[..],
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
            &extract(
                b"PUT /r HTTP/1.1\r\nHost: h\r\nX-Trace-ID: 7\r\ncontent-length: 5\r\n\r\nhello",
            ),
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
}
