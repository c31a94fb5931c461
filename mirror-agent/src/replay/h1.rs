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
            || cfg
                .secret_headers
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.name().as_str()))
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
    let mut baggage = None;
    for (name, value) in req.headers() {
        if name.eq_ignore_ascii_case("host") {
            original_host = Some(value);
        } else if cfg.mark.as_ref().is_some_and(|m| m.owns(name)) {
            baggage = baggage.or(name.eq_ignore_ascii_case("baggage").then_some(value));
        } else if !dropped(name) {
            line(&mut head, name.as_bytes(), value);
        }
    }
    let host = mirror_authority(cfg, original_host)?;
    line(&mut head, b"Host", host.as_bytes());
    for (name, value) in &cfg.add_headers {
        line(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    for secret in &cfg.secret_headers {
        line(
            &mut head,
            secret.name().as_str().as_bytes(),
            secret.value().as_bytes(),
        );
    }
    if let Some(mark) = &cfg.mark {
        line(
            &mut head,
            mark.header.as_str().as_bytes(),
            mark.mirror.as_bytes(),
        );
        line(&mut head, b"baggage", &mark.baggage(baggage));
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
mod tests;
