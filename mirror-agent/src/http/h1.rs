//! HTTP/1.x message extraction (httparse for the head).
//!
//! Requests (client → server) come out whole, with their exact bytes, for replay. Responses
//! (server → client) are framed but not kept: their status and timing come out, paired in
//! order with the connection's requests, and with content comparison on
//! (`HttpConfig::content`) their code, chosen headers and body once read to the end. Anything dropped is counted by reason in `HttpStats`.
//! A connection that turns out to speak HTTP/2 (a preface, an `Upgrade: h2c` accepted with 101,
//! or frames where a request was expected) is handed over (`H1Conn::switch`).

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;

use super::framing::{find_request_start, find_response_start, BodyDecoder, Framing};
use super::h2::frame::{find_frames, DEFAULT_MAX_FRAME};
use super::{
    HttpEvent, HttpExtractor, HttpStats, LiveContent, ResponseMeta, StopReason, Switch, WireOrigin,
    HEADER_SLOTS,
};
use crate::exchange::content::ContentBuilder;
use crate::reassembly::{ConnId, ConnInfo, Direction};
use crate::segment::TimestampNs;
/// One request extracted from a live HTTP/1 connection, with its exact bytes.
#[derive(Clone, Debug)]
pub struct Request {
    pub conn: ConnId,
    /// Index of the request on its connection (0, 1, …): pairs it with its response.
    pub seq: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The whole message as it crossed the wire: head and framed body.
    pub raw: Bytes,
    /// The body as framed on the wire (chunked encoding included); a slice of `raw`.
    pub body: Bytes,
    pub framing: Framing,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    method: Range<usize>,
    target: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// Capture times of the first and last byte.
    pub first_ts: TimestampNs,
    pub last_ts: TimestampNs,
}

impl Request {
    pub fn method(&self) -> &str {
        std::str::from_utf8(&self.raw[self.method.clone()]).unwrap_or("")
    }
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.raw[self.target.clone()]).unwrap_or("")
    }
    /// The method and target as strings sharing `raw`; empty unless UTF-8, like `target()`.
    pub(super) fn shared_method_and_target(&self) -> (ByteString, ByteString) {
        let shared = |part: &Range<usize>| {
            ByteString::try_from(self.raw.slice(part.clone())).unwrap_or_default()
        };
        (shared(&self.method), shared(&self.target))
    }
    /// Header names and values, in order, exactly as sent.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| {
            (
                std::str::from_utf8(&self.raw[n.clone()]).unwrap_or(""),
                &self.raw[v.clone()],
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
    pub fn head(&self) -> &[u8] {
        &self.raw[..self.raw.len() - self.body.len()]
    }

    /// A request read back from its wire bytes (a recording's), head parsed as the extractor
    /// parses it and the body taken as framed. None when the head does not parse.
    pub fn from_wire(raw: Bytes, at: WireOrigin) -> Option<Request> {
        let head = parse_request_head(&raw, HEADER_SLOTS).ok()?;
        Some(Request::assemble(raw, head, at))
    }

    pub fn origin(&self) -> WireOrigin {
        WireOrigin {
            conn: self.conn,
            seq: self.seq,
            client: self.client,
            server: self.server,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
        }
    }

    /// The request whose whole message is `raw` and whose head is `head`.
    fn assemble(raw: Bytes, head: Head, at: WireOrigin) -> Request {
        Request {
            conn: at.conn,
            seq: at.seq,
            client: at.client,
            server: at.server,
            body: raw.slice(head.len..),
            framing: head.framing,
            version: head.version,
            method: head.method,
            target: head.target,
            headers: head.headers,
            first_ts: at.first_ts,
            last_ts: at.last_ts,
            raw,
        }
    }
}

/// Which side of an HTTP/1 connection a parser reads, as hyper's `proto::h1::role` splits
/// them: `Server` reads what a server reads (requests, kept whole for replay), `Client` what a
/// client reads (responses, framed and paired). The direction is chosen once, where bytes come
/// in; everything below is generic over it.
trait Role {
    /// This side carries requests.
    const REQUESTS: bool;
    fn parser(c: &mut H1Conn) -> &mut MessageParser;
    /// Where a message may start in bytes joined mid-stream.
    fn find_start(buf: &[u8]) -> Option<usize>;
    fn parse_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError>;
}

struct Server;
struct Client;

impl Role for Server {
    const REQUESTS: bool = true;
    fn parser(c: &mut H1Conn) -> &mut MessageParser {
        &mut c.req
    }
    fn find_start(buf: &[u8]) -> Option<usize> {
        find_request_start(buf)
    }
    fn parse_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError> {
        parse_request_head(buf, max_headers)
    }
}

impl Role for Client {
    const REQUESTS: bool = false;
    fn parser(c: &mut H1Conn) -> &mut MessageParser {
        &mut c.resp
    }
    fn find_start(buf: &[u8]) -> Option<usize> {
        find_response_start(buf)
    }
    fn parse_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError> {
        parse_response_head(buf, max_headers)
    }
}

enum State {
    /// Looking for a message start.
    Hunt,
    Head,
    Body(BodyDecoder),
    Stopped,
}

/// The head of the message being read.
struct Head {
    len: usize,
    version: u8,
    method: Range<usize>,
    target: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    framing: Framing,
    status: u16,
    seq: u64,
    expect_continue: bool,
}

/// One direction's parser.
struct MessageParser {
    state: State,
    buf: BytesMut,
    /// Bytes of `buf` already searched for the end of the head.
    head_scanned: usize,
    head: Option<Head>,
    /// The message is kept (its bytes accumulate in `buf`).
    keep: bool,
    /// Part of the message was lost or refused: it is framed to the end, then dropped.
    drop_reason: Option<DropReason>,
    first_ts: TimestampNs,
    body_bytes: u64,
    at_stream_start: bool,
    /// Stream offset of the chunk being fed (requests: a lower bound of the message's start).
    chunk_base: u64,
    /// The acknowledgement carried with the chunk being fed (see `StreamHandler::data`).
    chunk_ack: Option<u64>,
    /// `chunk_base` and `chunk_ack` when the current message began.
    start_base: u64,
    start_ack: Option<u64>,
    /// Responses: the content of the response being read, when it is compared.
    content: Option<Collecting>,
}

/// A live response's content being gathered for comparison.
struct Collecting {
    seq: u64,
    method: ByteString,
    target: ByteString,
    builder: ContentBuilder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropReason {
    Gap,
    OversizeBody,
    Memory,
}

impl MessageParser {
    fn new() -> Self {
        MessageParser {
            state: State::Hunt,
            buf: BytesMut::new(),
            head_scanned: 0,
            head: None,
            keep: false,
            drop_reason: None,
            first_ts: 0,
            body_bytes: 0,
            at_stream_start: false,
            chunk_base: 0,
            chunk_ack: None,
            start_base: 0,
            start_ack: None,
            content: None,
        }
    }

    fn in_message(&self) -> bool {
        match self.state {
            State::Head => !self.buf.is_empty(),
            State::Body(_) => true,
            State::Hunt | State::Stopped => false,
        }
    }
}

/// Per-connection state, kept in the reassembler's flow table.
pub struct H1Conn {
    req: MessageParser,
    resp: MessageParser,
    next_seq: u64,
    /// Requests whose responses have not been seen, oldest first.
    pending: VecDeque<Pending>,
    /// Request bytes fed so far (data and gaps).
    req_fed: u64,
    /// Responses seen before their request: on a pod's veth, requests and responses cross two
    /// hooks that may run on two CPUs, and their clones can reach the ring out of order. The
    /// response's acknowledgement says the server had request bytes the agent has not read yet;
    /// it waits here for them.
    early: VecDeque<EarlyResponse>,
    /// Set when the connection turns out to speak HTTP/2: both parsers stop, holding the bytes
    /// from where HTTP/2 begins.
    pub(super) switch: Option<Switch>,
    /// The request that asked for `Upgrade: h2c`, until the server answers it.
    h2c_upgrade: Option<u64>,
    /// Offset of `req.buf` from which frames are still looked for (see `find_frames`).
    frames_from: usize,
    /// The connection's responses were asked for whole (`HttpEvent::FullResponses`).
    pub(super) full_responses_asked: bool,
}

/// The earliest response held for a request that starts at `start` or later (a lower bound of
/// its stream offset): held responses acknowledging no more than that answered requests that
/// were never read, and are counted unpaired.
fn take_early(
    early: &mut VecDeque<EarlyResponse>,
    start: u64,
    stats: &mut HttpStats,
) -> Option<EarlyResponse> {
    while let Some(e) = early.pop_front() {
        if e.ack > start {
            return Some(e);
        }
        stats.unpaired_responses += 1;
    }
    None
}

/// Most responses held per connection while their requests are on their way.
const MAX_EARLY: usize = 8;

#[derive(Clone, Copy, Debug)]
struct EarlyResponse {
    status: u16,
    first_ts: TimestampNs,
    /// How far the request stream was acknowledged when the response started.
    ack: u64,
}

struct Pending {
    seq: u64,
    /// Shared with the request's bytes once it is complete (empty until then, but for an
    /// `Upgrade: h2c` request, which HTTP/2 may take over before its body ends).
    method: ByteString,
    target: ByteString,
    head: bool,
    connect: bool,
    /// None until the request's last byte is seen.
    last_ts: Option<TimestampNs>,
    expect_continue: bool,
    /// The request was dropped: its response is framed but not reported.
    dropped: bool,
    /// Its response, when that was seen before the request.
    early: Option<EarlyResponse>,
}

impl HttpExtractor {
    /// Feeds one direction's bytes.
    fn feed<R: Role>(&mut self, c: &mut H1Conn, info: &ConnInfo, mut data: &[u8], ts: TimestampNs) {
        loop {
            let p = R::parser(c);
            match &mut p.state {
                State::Stopped => break,
                State::Hunt => {
                    if data.is_empty() && p.buf.is_empty() {
                        break;
                    }
                    if self.buffered + data.len() > self.cfg.max_buffered_bytes {
                        // Over the global cap: skip rather than buffer.
                        self.stats.resync_skipped_bytes += (p.buf.len() + data.len()) as u64;
                        p.buf.clear();
                        break;
                    }
                    p.buf.extend_from_slice(data);
                    data = &[];
                    let found = R::find_start(&p.buf);
                    match found {
                        Some(at) => {
                            self.stats.resync_skipped_bytes += at as u64;
                            p.buf.advance(at);
                            c.frames_from = 0;
                            self.begin_message::<R>(c, ts);
                        }
                        None => {
                            if R::REQUESTS {
                                let p = &mut c.req;
                                match find_frames(&p.buf, c.frames_from, DEFAULT_MAX_FRAME) {
                                    Ok(at) => {
                                        self.stats.resync_skipped_bytes += at as u64;
                                        p.buf.advance(at);
                                        Self::hand_to_h2(c, Switch::Frames);
                                        break;
                                    }
                                    Err(next) => c.frames_from = next,
                                }
                            }
                            let p = R::parser(c);
                            // Keep a tail in case a start line straddles the next segment.
                            let keep = self.cfg.max_head_bytes.min(p.buf.len());
                            let skip = p.buf.len() - keep;
                            self.stats.resync_skipped_bytes += skip as u64;
                            p.buf.advance(skip);
                            if R::REQUESTS {
                                c.frames_from = c.frames_from.saturating_sub(skip);
                            }
                            break;
                        }
                    }
                }
                State::Head => {
                    if p.buf.is_empty() {
                        p.first_ts = ts;
                        p.start_base = p.chunk_base;
                        p.start_ack = p.chunk_ack;
                    }
                    if self.buffered + data.len() > self.cfg.max_buffered_bytes {
                        if R::REQUESTS && !p.buf.is_empty() {
                            self.stats.dropped_memory += 1;
                        }
                        p.buf.clear();
                        p.state = State::Hunt;
                        continue;
                    }
                    p.buf.extend_from_slice(data);
                    data = &[];
                    if p.buf.is_empty() {
                        break;
                    }
                    if !self.try_head::<R>(c, info, ts) {
                        break;
                    }
                }
                State::Body(decoder) => {
                    if data.is_empty() {
                        break;
                    }
                    let content = &mut p.content;
                    let fed = decoder.feed_with(data, self.cfg.max_head_bytes, &mut |b| {
                        if let Some(c) = content.as_mut() {
                            c.builder.push(b);
                        }
                    });
                    let (n, done) = match fed {
                        Ok(v) => v,
                        Err(_) => {
                            self.malformed::<R>(c);
                            continue;
                        }
                    };
                    let p = R::parser(c);
                    p.body_bytes += n as u64;
                    if p.keep {
                        let total = p.buf.len() + n;
                        if p.body_bytes > self.cfg.max_body_bytes as u64 {
                            p.drop_reason = Some(DropReason::OversizeBody);
                        } else if self.buffered + n > self.cfg.max_buffered_bytes {
                            p.drop_reason = Some(DropReason::Memory);
                        }
                        if p.drop_reason.is_some() {
                            p.keep = false;
                            p.buf.clear();
                        } else {
                            p.buf.extend_from_slice(&data[..n]);
                            debug_assert_eq!(p.buf.len(), total);
                        }
                    }
                    data = &data[n..];
                    if done {
                        self.finish_message::<R>(c, info, ts);
                    }
                }
            }
        }
    }

    fn begin_message<R: Role>(&mut self, c: &mut H1Conn, ts: TimestampNs) {
        let p = R::parser(c);
        if p.content.take().is_some() {
            self.stats.content_incomplete += 1;
        }
        p.state = State::Head;
        p.head_scanned = 0;
        p.head = None;
        p.keep = false;
        p.drop_reason = None;
        p.body_bytes = 0;
        p.first_ts = ts;
        p.start_base = p.chunk_base;
        p.start_ack = p.chunk_ack;
    }

    /// Tries to parse a complete head from the buffer. Returns whether parsing can go on.
    fn try_head<R: Role>(&mut self, c: &mut H1Conn, info: &ConnInfo, ts: TimestampNs) -> bool {
        let p = R::parser(c);
        if R::REQUESTS && p.at_stream_start && p.buf.len() >= 3 {
            p.at_stream_start = false;
            if p.buf[0] == 0x16 && p.buf[1] == 0x03 {
                self.stop(c, StopReason::Tls);
                return false;
            }
        }
        let p = R::parser(c);
        if R::REQUESTS && p.buf.starts_with(b"PRI * HTTP/2.0") {
            Self::hand_to_h2(c, Switch::Preface);
            return false;
        }
        // Only parse once the blank line that ends the head has arrived.
        let from = p.head_scanned.saturating_sub(2);
        let head_end = match memchr::memchr_iter(b'\n', &p.buf[from..])
            .map(|i| from + i + 1)
            .find(|&i| p.buf[i..].starts_with(b"\r\n") || p.buf[i..].starts_with(b"\n"))
        {
            Some(i) => i + if p.buf[i] == b'\r' { 2 } else { 1 },
            None => {
                p.head_scanned = p.buf.len();
                if p.buf.len() > self.cfg.max_head_bytes {
                    // All of it is one oversize head; nothing in it can be framed.
                    self.count_bad_head::<R>(true);
                    p.buf.clear();
                    p.state = State::Hunt;
                    return true;
                }
                return false;
            }
        };
        let parsed = R::parse_head(&p.buf[..head_end], self.cfg.max_headers);
        let mut head = match parsed {
            Ok(h) if h.len <= self.cfg.max_head_bytes => h,
            other => {
                self.count_bad_head::<R>(!matches!(other, Err(HeadError::Malformed)));
                // The body's framing is unknown: look for the next message after this head.
                p.buf.advance(head_end);
                p.state = State::Hunt;
                return true;
            }
        };
        if R::REQUESTS {
            // Disjoint from the connection's other fields, which requests update.
            let p = &mut c.req;
            if &p.buf[head.method.clone()] == b"CONNECT" {
                self.stats.dropped_stopped += 1;
                self.stop(c, StopReason::Connect);
                return false;
            }
            let upgrade = upgrade_to(&p.buf, &head);
            match upgrade {
                // Replayed as a plain request; its answer says which protocol follows.
                Some(Upgrade::H2c) => c.h2c_upgrade = Some(c.next_seq),
                Some(Upgrade::Other) => {
                    self.stats.dropped_stopped += 1;
                    self.stop(c, StopReason::Upgrade);
                    return false;
                }
                None => {}
            }
            head.seq = c.next_seq;
            c.next_seq += 1;
            if self.cfg.track_responses {
                if c.pending.len() >= self.cfg.max_pending {
                    c.pending.pop_front();
                    self.stats.pending_overflow += 1;
                }
                let start = p.start_base;
                let (method, target) = if upgrade == Some(Upgrade::H2c) {
                    let copy = |r: &Range<usize>| {
                        ByteString::from(String::from_utf8_lossy(&p.buf[r.clone()]).into_owned())
                    };
                    (copy(&head.method), copy(&head.target))
                } else {
                    Default::default()
                };
                let is_head = &p.buf[head.method.clone()] == b"HEAD";
                let early = take_early(&mut c.early, start, &mut self.stats);
                c.pending.push_back(Pending {
                    seq: head.seq,
                    method,
                    target,
                    head: is_head,
                    connect: false,
                    last_ts: None,
                    expect_continue: head.expect_continue,
                    dropped: false,
                    early,
                });
            }
            p.keep = true;
        } else {
            let p = &mut c.resp;
            let status = head.status;
            if (100..200).contains(&status) {
                if status == 101 {
                    match c.h2c_upgrade {
                        Some(seq) => {
                            p.buf.advance(head.len);
                            Self::hand_to_h2(c, Switch::Upgraded { seq });
                        }
                        None => self.stop(c, StopReason::Upgrade),
                    }
                    return false;
                }
                // Interim response (100 Continue, 103 Early Hints): not the answer.
                p.buf.advance(head.len);
                self.begin_message::<R>(c, ts);
                return true;
            }
            let next = c.pending.iter().position(|r| r.early.is_none());
            let Some(req) = next.and_then(|i| c.pending.remove(i)) else {
                // The server had request bytes not read here yet: the request is on its way.
                let ack = p.start_ack.filter(|a| *a > c.req_fed);
                match ack {
                    Some(ack) if c.early.len() < MAX_EARLY => c.early.push_back(EarlyResponse {
                        status,
                        first_ts: p.first_ts,
                        ack,
                    }),
                    _ => self.stats.unpaired_responses += 1,
                }
                head.framing = response_framing(head.framing, status, false);
                p.head = Some(head);
                return self.enter_body::<R>(c, info, ts);
            };
            head.framing = response_framing(head.framing, status, req.head);
            if head.framing == Framing::Chunked {
                // Chunk sizes are spread through the body: heads alone cannot frame it.
                self.ask_full_responses(&mut c.full_responses_asked, info);
            }
            if req.connect && (200..300).contains(&status) {
                self.stop(c, StopReason::Connect);
                return false;
            }
            self.answer_expect(c, &req, status);
            if !req.dropped {
                if let Some(last) = req.last_ts {
                    self.stats.responses += 1;
                    let p = &mut c.resp;
                    let compared = self
                        .cfg
                        .content
                        .as_ref()
                        .filter(|cfg| cfg.compares(info.client, info.server));
                    if let Some(cfg) = compared {
                        p.content = Some(Collecting {
                            seq: req.seq,
                            method: req.method.clone(),
                            target: req.target.clone(),
                            builder: ContentBuilder::from_head(cfg, status, &p.buf[..head.len]),
                        });
                    }
                    self.events.push(HttpEvent::Response(ResponseMeta {
                        conn: info.id,
                        request_seq: req.seq,
                        method: req.method,
                        target: req.target,
                        status,
                        grpc_status: None,
                        request_last_ts: last,
                        response_first_ts: p.first_ts,
                    }));
                } else {
                    self.stats.unpaired_responses += 1;
                }
            }
        }
        let p = R::parser(c);
        p.head = Some(head);
        self.enter_body::<R>(c, info, ts)
    }

    /// After a complete head: frames the bytes already buffered behind it.
    fn enter_body<R: Role>(&mut self, c: &mut H1Conn, info: &ConnInfo, ts: TimestampNs) -> bool {
        let p = R::parser(c);
        let head = p.head.as_ref().expect("head parsed");
        let head_len = head.len;
        let Some(mut decoder) = BodyDecoder::new(head.framing) else {
            self.finish_message::<R>(c, info, ts);
            return true;
        };
        let content = &mut p.content;
        let fed = decoder.feed_with(&p.buf[head_len..], self.cfg.max_head_bytes, &mut |b| {
            if let Some(c) = content.as_mut() {
                c.builder.push(b);
            }
        });
        let (n, done) = match fed {
            Ok(v) => v,
            Err(_) => {
                self.malformed::<R>(c);
                return true;
            }
        };
        p.body_bytes = n as u64;
        if p.keep && p.body_bytes > self.cfg.max_body_bytes as u64 {
            p.keep = false;
            p.drop_reason = Some(DropReason::OversizeBody);
        }
        if done {
            self.finish_message::<R>(c, info, ts);
            return true;
        }
        if !p.keep {
            p.buf.clear();
        }
        p.state = State::Body(decoder);
        true
    }

    /// The current message ended at `head.len + body_bytes` into the buffer (or, for messages
    /// not kept, the buffer holds only what follows it).
    fn finish_message<R: Role>(&mut self, c: &mut H1Conn, info: &ConnInfo, ts: TimestampNs) {
        let p = R::parser(c);
        let head = p.head.take().expect("head parsed");
        // The buffer starts with the message while its head is there, or while it is kept.
        let in_buf = !matches!(p.state, State::Body(_)) || p.keep;
        let len = if in_buf {
            (head.len + p.body_bytes as usize).min(p.buf.len())
        } else {
            0
        };
        let bytes = p.buf.split_to(len);
        if R::REQUESTS {
            let seq = head.seq;
            let p = &mut c.req;
            let keep = p.keep && p.drop_reason.is_none();
            let mut pending = c.pending.iter_mut().find(|x| x.seq == seq);
            if let Some(pending) = pending.as_mut() {
                pending.last_ts = Some(ts);
                pending.dropped = !keep;
            }
            if keep {
                let raw = bytes.freeze();
                self.stats.requests += 1;
                self.stats.request_bytes += raw.len() as u64;
                let at = WireOrigin {
                    conn: info.id,
                    seq,
                    client: info.client,
                    server: info.server,
                    first_ts: p.first_ts,
                    last_ts: ts,
                };
                let request = Request::assemble(raw, head, at);
                if let Some(pending) = pending {
                    (pending.method, pending.target) = request.shared_method_and_target();
                }
                self.events
                    .push(HttpEvent::Request(super::Request::H1(request)));
            } else {
                match p.drop_reason {
                    Some(DropReason::Gap) => self.stats.dropped_gap += 1,
                    Some(DropReason::OversizeBody) => self.stats.dropped_oversize_body += 1,
                    Some(DropReason::Memory) => self.stats.dropped_memory += 1,
                    None => self.stats.dropped_incomplete += 1,
                }
            }
            self.report_early(c, info, seq);
        } else {
            self.emit_content(info, &mut c.resp);
        }
        self.begin_message::<R>(c, ts);
    }

    /// The response read to its end: its content goes to the comparison.
    fn emit_content(&mut self, info: &ConnInfo, p: &mut MessageParser) {
        if let Some(done) = p.content.take() {
            self.stats.content_responses += 1;
            self.events.push(HttpEvent::ResponseContent(LiveContent {
                conn: info.id,
                request_seq: done.seq,
                method: done.method,
                target: done.target,
                content: Arc::new(done.builder.finish()),
            }));
        }
    }

    /// Reports the response held for request `seq`, now that the request is complete.
    fn report_early(&mut self, c: &mut H1Conn, info: &ConnInfo, seq: u64) {
        let Some(i) = c
            .pending
            .iter()
            .position(|r| r.seq == seq && r.early.is_some())
        else {
            return;
        };
        let req = c.pending.remove(i).expect("position is in range");
        let (Some(e), Some(last)) = (req.early, req.last_ts) else {
            return;
        };
        if req.dropped {
            return;
        }
        self.stats.responses += 1;
        self.stats.early_responses += 1;
        self.events.push(HttpEvent::Response(ResponseMeta {
            conn: info.id,
            request_seq: req.seq,
            method: req.method,
            target: req.target,
            status: e.status,
            grpc_status: None,
            request_last_ts: last,
            response_first_ts: e.first_ts,
        }));
    }

    /// A final response to a request that sent `Expect: 100-continue` and whose body has not
    /// started: the client may never send the body, so that request is given up.
    fn answer_expect(&mut self, c: &mut H1Conn, req: &Pending, status: u16) {
        if !req.expect_continue || status < 200 {
            return;
        }
        let p = &mut c.req;
        let waiting = matches!(p.state, State::Body(_))
            && p.body_bytes == 0
            && p.head.as_ref().is_some_and(|h| h.seq == req.seq);
        if waiting {
            self.stats.dropped_expect_rejected += 1;
            p.head = None;
            p.buf.clear();
            p.state = State::Hunt;
        }
    }

    fn count_bad_head<R: Role>(&mut self, oversize: bool) {
        match (R::REQUESTS, oversize) {
            (true, true) => self.stats.dropped_oversize_head += 1,
            (true, false) => self.stats.dropped_malformed += 1,
            (false, _) => self.stats.malformed_responses += 1,
        }
    }

    /// A body that cannot be framed: drop the message and hunt for the next one.
    fn malformed<R: Role>(&mut self, c: &mut H1Conn) {
        if R::REQUESTS {
            self.stats.dropped_malformed += 1;
            Self::note_unframed_request(c);
        } else {
            self.stats.malformed_responses += 1;
        }
        Self::resync::<R>(c);
    }

    /// A request whose head parsed cannot be framed any more: mark it dropped for pairing.
    fn note_unframed_request(c: &mut H1Conn) {
        if let Some(head) = &c.req.head {
            if let Some(pending) = c.pending.iter_mut().find(|x| x.seq == head.seq) {
                pending.dropped = true;
                pending.last_ts = Some(c.req.first_ts);
            }
        }
    }

    /// Loses sync: hunt for the next message start.
    fn resync<R: Role>(c: &mut H1Conn) {
        let p = R::parser(c);
        if p.head.take().is_some() {
            p.buf.clear();
        }
        p.state = State::Hunt;
    }

    /// Stops both parsers where they are, keeping their bytes for HTTP/2 (`H1Conn::hand_over`).
    fn hand_to_h2(c: &mut H1Conn, how: Switch) {
        c.switch = Some(how);
        c.req.state = State::Stopped;
        c.resp.state = State::Stopped;
    }

    fn stop(&mut self, c: &mut H1Conn, reason: StopReason) {
        self.stats.stopped(reason);
        self.drop_content(&mut c.resp);
        for p in [&mut c.req, &mut c.resp] {
            p.state = State::Stopped;
            p.buf = BytesMut::new();
            p.head = None;
        }
        c.pending.clear();
    }

    /// A response whose bytes will not all be read: its content is not compared.
    fn drop_content(&mut self, p: &mut MessageParser) {
        if p.content.take().is_some() {
            self.stats.content_incomplete += 1;
        }
    }

    /// `lost` bytes of the stream will never arrive.
    fn lose<R: Role>(&mut self, c: &mut H1Conn, info: &ConnInfo, lost: u64, ts: TimestampNs) {
        if !R::REQUESTS {
            self.drop_content(&mut c.resp);
        }
        let framing_survives = match &R::parser(c).state {
            State::Body(BodyDecoder::Length { remaining }) => lost <= *remaining,
            State::Body(BodyDecoder::UntilClose) | State::Stopped => true,
            _ => false,
        };
        if !R::REQUESTS && !framing_survives {
            // Whole responses may have been in the hole: which request the next response
            // answers is unknown, and pairing by order could pair it with the wrong one.
            self.stats.unpaired_requests += c.pending.len() as u64;
            c.pending.clear();
        }
        let p = R::parser(c);
        match &mut p.state {
            State::Stopped => {}
            State::Hunt => {
                // Bytes on either side of a hole must not be stitched into one start line.
                self.stats.resync_skipped_bytes += p.buf.len() as u64;
                p.buf.clear();
            }
            State::Head => {
                if !p.buf.is_empty() && R::REQUESTS {
                    self.stats.dropped_gap += 1;
                }
                // What follows the hole starts mid-message.
                p.buf.clear();
                p.state = State::Hunt;
            }
            State::Body(BodyDecoder::Length { remaining }) if lost <= *remaining => {
                // The framing survives: skip the lost bytes and drop the message at its end.
                *remaining -= lost;
                let done = *remaining == 0;
                p.body_bytes += lost;
                if R::REQUESTS {
                    p.drop_reason.get_or_insert(DropReason::Gap);
                    p.keep = false;
                    p.buf.clear();
                }
                if done {
                    self.finish_message::<R>(c, info, ts);
                }
            }
            State::Body(BodyDecoder::UntilClose) => {}
            State::Body(_) => {
                if R::REQUESTS {
                    self.stats.dropped_gap += 1;
                    Self::note_unframed_request(c);
                }
                Self::resync::<R>(c);
            }
        }
    }

    /// The stream ended (FIN) or the connection closed: a message in progress is incomplete,
    /// except a response delimited by the close.
    fn end_stream<R: Role>(&mut self, c: &mut H1Conn, info: &ConnInfo) {
        let p = R::parser(c);
        if R::REQUESTS && p.in_message() {
            self.stats.dropped_incomplete += 1;
        }
        if matches!(p.state, State::Body(BodyDecoder::UntilClose)) {
            self.emit_content(info, p);
        }
        self.drop_content(p);
        p.head = None;
        p.buf = BytesMut::new();
        p.state = State::Stopped;
    }
}

impl H1Conn {
    pub(super) fn held(&self) -> usize {
        self.req.buf.len() + self.resp.buf.len()
    }

    /// What HTTP/2 takes over when the connection switches (`switch` is set): the bytes each
    /// parser held from where HTTP/2 begins, and the request that asked for the upgrade.
    pub(super) fn hand_over(&mut self) -> Handover {
        let upgrade = self.h2c_upgrade.take().and_then(|seq| {
            let i = self.pending.iter().position(|p| p.seq == seq)?;
            let p = self.pending.remove(i)?;
            (!p.dropped).then_some(UpgradeRequest {
                seq,
                method: p.method.to_string(),
                target: p.target.to_string(),
                last_ts: p.last_ts,
            })
        });
        Handover {
            to_server: std::mem::take(&mut self.req.buf).freeze(),
            to_client: std::mem::take(&mut self.resp.buf).freeze(),
            upgrade,
        }
    }
}

/// See `H1Conn::hand_over`.
pub struct Handover {
    pub to_server: Bytes,
    pub to_client: Bytes,
    pub upgrade: Option<UpgradeRequest>,
}

/// The HTTP/1.1 request whose response comes on HTTP/2 stream 1 after an `Upgrade: h2c`.
pub struct UpgradeRequest {
    pub seq: u64,
    pub method: String,
    pub target: String,
    /// None while the request's body is still on its way.
    pub last_ts: Option<TimestampNs>,
}

impl HttpExtractor {
    pub(super) fn h1_open() -> H1Conn {
        H1Conn {
            req: MessageParser::new(),
            resp: MessageParser::new(),
            next_seq: 0,
            pending: VecDeque::new(),
            req_fed: 0,
            early: VecDeque::new(),
            switch: None,
            h2c_upgrade: None,
            frames_from: 0,
            full_responses_asked: false,
        }
    }

    pub(super) fn h1_start(c: &mut H1Conn, dir: Direction, from_syn: bool) {
        let p = match dir {
            Direction::ToServer => Server::parser(c),
            Direction::ToClient => Client::parser(c),
        };
        if from_syn {
            p.state = State::Head;
            p.at_stream_start = true;
        }
    }

    pub(super) fn h1_data(
        &mut self,
        c: &mut H1Conn,
        info: &ConnInfo,
        dir: Direction,
        data: &[u8],
        ts: TimestampNs,
        ack: Option<u64>,
    ) {
        match dir {
            Direction::ToServer => {
                c.req.chunk_base = c.req_fed;
                c.req.chunk_ack = ack;
                c.req_fed += data.len() as u64;
                self.feed::<Server>(c, info, data, ts);
            }
            Direction::ToClient => {
                c.resp.chunk_base = 0;
                c.resp.chunk_ack = ack;
                self.feed::<Client>(c, info, data, ts);
            }
        }
    }

    pub(super) fn h1_gap(
        &mut self,
        c: &mut H1Conn,
        info: &ConnInfo,
        dir: Direction,
        lost: u64,
        ts: TimestampNs,
    ) {
        match dir {
            Direction::ToServer => {
                c.req_fed += lost;
                self.lose::<Server>(c, info, lost, ts);
            }
            Direction::ToClient => self.lose::<Client>(c, info, lost, ts),
        }
    }

    /// `len` response bytes were described but not captured: skipped inside a body of known
    /// length (or one that runs to the close); anywhere else the framing is lost.
    pub(super) fn h1_elided(
        &mut self,
        c: &mut H1Conn,
        info: &ConnInfo,
        dir: Direction,
        len: u64,
        ts: TimestampNs,
    ) {
        if dir == Direction::ToServer {
            // The kernel describes responses only; requests are always whole.
            self.h1_gap(c, info, dir, len, ts);
            return;
        }
        self.drop_content(&mut c.resp);
        let p = &mut c.resp;
        match &mut p.state {
            State::Body(BodyDecoder::Length { remaining }) if len <= *remaining => {
                *remaining -= len;
                p.body_bytes += len;
                if *remaining == 0 {
                    self.finish_message::<Client>(c, info, ts);
                }
            }
            State::Body(BodyDecoder::UntilClose) | State::Stopped => {}
            State::Hunt => self.lose::<Client>(c, info, len, ts),
            State::Head | State::Body(_) => {
                self.stats.responses_unframed_heads += 1;
                self.ask_full_responses(&mut c.full_responses_asked, info);
                self.lose::<Client>(c, info, len, ts);
            }
        }
    }

    pub(super) fn h1_end(&mut self, c: &mut H1Conn, info: &ConnInfo, dir: Direction) {
        match dir {
            Direction::ToServer => self.end_stream::<Server>(c, info),
            Direction::ToClient => self.end_stream::<Client>(c, info),
        }
    }

    pub(super) fn h1_close(&mut self, mut c: H1Conn, info: &ConnInfo) {
        self.end_stream::<Server>(&mut c, info);
        self.end_stream::<Client>(&mut c, info);
        self.stats.unpaired_responses += c.early.len() as u64;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    Malformed,
    TooManyHeaders,
}

fn header_ranges(
    base: &[u8],
    headers: &[httparse::Header<'_>],
) -> Vec<(Range<usize>, Range<usize>)> {
    let start = base.as_ptr() as usize;
    headers
        .iter()
        .map(|h| {
            let n = h.name.as_ptr() as usize - start;
            let v = h.value.as_ptr() as usize - start;
            (n..n + h.name.len(), v..v + h.value.len())
        })
        .collect()
}

fn range_of(base: &[u8], part: &str) -> Range<usize> {
    let at = part.as_ptr() as usize - base.as_ptr() as usize;
    at..at + part.len()
}

fn parse_request_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; HEADER_SLOTS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots[..max_headers]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    };
    let method = range_of(buf, req.method.ok_or(HeadError::Malformed)?);
    let target = range_of(buf, req.path.ok_or(HeadError::Malformed)?);
    let version = req.version.ok_or(HeadError::Malformed)?;
    let mut framing = Framing::None;
    let mut expect_continue = false;
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the final coding of a request (RFC 9112 6.3); anything else can't
            // be framed.
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            if trim(last).eq_ignore_ascii_case(b"chunked") {
                framing = Framing::Chunked;
            } else {
                return Err(HeadError::Malformed);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(HeadError::Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = trim(h.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    if framing != Framing::Chunked {
        if let Some(n) = length {
            framing = Framing::Length(n);
        }
    }
    Ok(Head {
        len,
        version,
        method,
        target,
        headers: header_ranges(buf, req.headers),
        framing,
        status: 0,
        seq: 0,
        expect_continue,
    })
}

fn parse_response_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut resp = httparse::Response::new(&mut slots[..max_headers]);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    };
    let framing = response_body_framing(resp.headers)?;
    Ok(Head {
        len,
        version: resp.version.ok_or(HeadError::Malformed)?,
        method: 0..0,
        target: 0..0,
        headers: Vec::new(),
        framing,
        status: resp.code.ok_or(HeadError::Malformed)?,
        seq: 0,
        expect_continue: false,
    })
}

/// How a response's headers delimit its body (before the status and method are considered).
fn response_body_framing(headers: &[httparse::Header<'_>]) -> Result<Framing, HeadError> {
    let mut framing = Framing::UntilClose;
    let mut chunked = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = trim(last).eq_ignore_ascii_case(b"chunked");
            framing = if chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
        } else if h.name.eq_ignore_ascii_case("content-length") && !chunked {
            framing = Framing::Length(parse_length(h.value).ok_or(HeadError::Malformed)?);
        }
    }
    Ok(framing)
}

/// A response head as a client reads it on its own connection (the replay stage's).
#[derive(Debug, PartialEq, Eq)]
pub struct ClientResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// The response is not HTTP/1.
#[derive(Debug, thiserror::Error)]
#[error("malformed HTTP/1 response head")]
pub struct MalformedResponse;

/// Parses a response head at the start of `buf`: None while it is incomplete.
pub fn parse_client_response(
    buf: &[u8],
    to_head: bool,
) -> Result<Option<ClientResponseHead>, MalformedResponse> {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(MalformedResponse),
    };
    let status = resp.code.ok_or(MalformedResponse)?;
    let framing = response_body_framing(resp.headers).map_err(|_| MalformedResponse)?;
    let connection_says = |token: &[u8]| {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .any(|t| trim(t).eq_ignore_ascii_case(token))
    };
    let keep_alive = match resp.version {
        Some(1) => !connection_says(b"close"),
        _ => connection_says(b"keep-alive"),
    };
    let framing = response_framing(framing, status, to_head);
    Ok(Some(ClientResponseHead {
        len,
        status,
        framing,
        keep_alive: keep_alive && framing != Framing::UntilClose && status != 101,
    }))
}

/// Responses to HEAD, and 1xx/204/304 responses, have no body whatever their headers say.
fn response_framing(framing: Framing, status: u16, to_head: bool) -> Framing {
    if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::None
    } else {
        framing
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    H2c,
    Other,
}

/// The protocol a request asks to upgrade to, if it asks (`Upgrade` named in `Connection`).
fn upgrade_to(buf: &[u8], head: &Head) -> Option<Upgrade> {
    let mut upgrade = None;
    let mut connection_upgrade = false;
    for (n, v) in &head.headers {
        let name = &buf[n.clone()];
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = Some(if trim(&buf[v.clone()]).eq_ignore_ascii_case(b"h2c") {
                Upgrade::H2c
            } else {
                Upgrade::Other
            });
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= buf[v.clone()]
                .split(|b| *b == b',')
                .any(|t| trim(t).eq_ignore_ascii_case(b"upgrade"));
        }
    }
    upgrade.filter(|_| connection_upgrade)
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}
