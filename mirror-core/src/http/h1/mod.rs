//! HTTP/1.x message extraction (httparse for the head), split by role as hyper's
//! `proto::h1::role` splits it: `request` reads what a server reads (requests, kept whole with
//! their exact bytes for replay), `response` what a client reads (responses, framed but not
//! kept: their status and timing, paired in order with the connection's requests by
//! `pairing`, and with content comparison on, their code, chosen headers and body).
//!
//! This module owns a connection's state (`H1Conn`) and the one parse loop both roles run:
//! hunt for a start, read a head, frame a body. The loop never branches on the role; it calls
//! the `Role` at the points where requests and responses differ. Anything dropped is counted
//! by reason in `HttpStats`. A connection that turns out to speak HTTP/2 (a preface, an
//! `Upgrade: h2c` accepted with 101, or frames where a request was expected) is handed over
//! (`H1Conn::hand_over`).

mod pairing;
mod request;
mod response;

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

use super::framing::{BodyDecoder, Framing};
use super::{Ctx, HttpStats, StopReason, Switch};
use crate::reassembly::Direction;
use crate::segment::TimestampNs;
use pairing::Pairing;
use request::Server;
use response::{Client, Collecting};

pub use request::Request;
pub use response::{parse_client_response, ClientResponseHead, MalformedResponse};

/// One side of a connection: `Server` reads requests, `Client` reads responses. The parse
/// loop calls these where the two differ.
trait Role {
    fn parser(c: &mut H1Conn) -> &mut MessageParser;
    /// Where a message may start in bytes joined mid-stream.
    fn find_start(buf: &[u8]) -> Option<usize>;
    /// No message starts in the buffer: whether its bytes went to HTTP/2 instead.
    fn hunt_elsewhere(_c: &mut H1Conn, _cx: &mut Ctx) -> bool {
        false
    }
    /// Before a head is parsed: whether the bytes can be HTTP/1 (false: the connection stopped
    /// or was handed over).
    fn is_http1(_c: &mut H1Conn, _cx: &mut Ctx) -> bool {
        true
    }
    fn parse_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError>;
    /// A head parsed (this side may complete it): what the message is to the connection.
    fn on_head(c: &mut H1Conn, cx: &mut Ctx, head: &mut Head, ts: TimestampNs) -> AfterHead;
    /// The message ended; `bytes` are its wire bytes when it was kept.
    fn on_end(c: &mut H1Conn, cx: &mut Ctx, head: Head, bytes: BytesMut, ts: TimestampNs);
    /// A message lost for `why`, counted as this side counts its losses.
    fn count_lost(stats: &mut HttpStats, why: DropReason);
    /// The message whose head parsed cannot be framed any more.
    fn unframed(_c: &mut H1Conn) {}
    /// Bytes were lost where the framing did not survive them.
    fn framing_lost(_c: &mut H1Conn, _stats: &mut HttpStats) {}
}

/// What follows a parsed head.
enum AfterHead {
    /// Frame the body of this message.
    Body,
    /// The head was all of it (an interim response): read the next message.
    Next,
    /// The connection stopped or was handed over.
    Halt,
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

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    Malformed,
    TooManyHeaders,
}

/// Why a message was not handed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropReason {
    Gap,
    OversizeHead,
    OversizeBody,
    Memory,
    Malformed,
    /// The stream ended inside it.
    Incomplete,
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
    /// Offset of `buf` from which HTTP/2 frames are still looked for (see `find_frames`).
    frames_from: usize,
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
            frames_from: 0,
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

    /// A message starts at the front of the buffer.
    fn begin(&mut self, stats: &mut HttpStats, ts: TimestampNs) {
        self.drop_content(stats);
        self.state = State::Head;
        self.head_scanned = 0;
        self.head = None;
        self.keep = false;
        self.drop_reason = None;
        self.body_bytes = 0;
        self.first_ts = ts;
        self.start_base = self.chunk_base;
        self.start_ack = self.chunk_ack;
    }

    /// A response whose bytes will not all be read: its content is not compared.
    fn drop_content(&mut self, stats: &mut HttpStats) {
        if self.content.take().is_some() {
            stats.content_incomplete += 1;
        }
    }

    /// Keeps `body` (just framed) unless the message outgrew its caps.
    fn keep_body(&mut self, cx: &Ctx, body: &[u8]) {
        if self.body_bytes > cx.cfg.max_body_bytes as u64 {
            self.drop_reason = Some(DropReason::OversizeBody);
        } else if cx.buffered + body.len() > cx.cfg.max_buffered_bytes {
            self.drop_reason = Some(DropReason::Memory);
        }
        if self.drop_reason.is_some() {
            self.keep = false;
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(body);
        }
    }

    /// Loses sync: hunt for the next message start.
    fn resync(&mut self) {
        if self.head.take().is_some() {
            self.buf.clear();
        }
        self.state = State::Hunt;
    }

    /// Where the head ends in the buffer, once the blank line that ends it has arrived.
    fn head_end(&mut self) -> Option<usize> {
        let from = self.head_scanned.saturating_sub(2);
        let buf = &self.buf;
        let end = memchr::memchr_iter(b'\n', &buf[from..])
            .map(|i| from + i + 1)
            .find(|&i| buf[i..].starts_with(b"\r\n") || buf[i..].starts_with(b"\n"))
            .map(|i| i + if buf[i] == b'\r' { 2 } else { 1 });
        if end.is_none() {
            self.head_scanned = self.buf.len();
        }
        end
    }
}

/// Per-connection state, kept in the reassembler's flow table.
pub struct H1Conn {
    req: MessageParser,
    resp: MessageParser,
    next_seq: u64,
    pairing: Pairing,
    /// Request bytes fed so far (data and gaps).
    req_fed: u64,
    /// Set when the connection turns out to speak HTTP/2: both parsers stop, holding the bytes
    /// from where HTTP/2 begins.
    pub(super) switch: Option<Switch>,
    /// The request that asked for `Upgrade: h2c`, until the server answers it.
    h2c_upgrade: Option<u64>,
    /// The connection's responses were asked for whole (`HttpEvent::FullResponses`).
    pub(super) full_responses_asked: bool,
}

impl H1Conn {
    pub(super) fn open() -> H1Conn {
        H1Conn {
            req: MessageParser::new(),
            resp: MessageParser::new(),
            next_seq: 0,
            pairing: Pairing::default(),
            req_fed: 0,
            switch: None,
            h2c_upgrade: None,
            full_responses_asked: false,
        }
    }

    pub(super) fn held(&self) -> usize {
        self.req.buf.len() + self.resp.buf.len()
    }

    pub(super) fn start(&mut self, dir: Direction, from_syn: bool) {
        let p = match dir {
            Direction::ToServer => &mut self.req,
            Direction::ToClient => &mut self.resp,
        };
        if from_syn {
            p.state = State::Head;
            p.at_stream_start = true;
        }
    }

    pub(super) fn data(
        &mut self,
        cx: &mut Ctx,
        dir: Direction,
        data: &[u8],
        ts: TimestampNs,
        ack: Option<u64>,
    ) {
        match dir {
            Direction::ToServer => {
                self.req.chunk_base = self.req_fed;
                self.req.chunk_ack = ack;
                self.req_fed += data.len() as u64;
                self.feed::<Server>(cx, data, ts);
            }
            Direction::ToClient => {
                self.resp.chunk_base = 0;
                self.resp.chunk_ack = ack;
                self.feed::<Client>(cx, data, ts);
            }
        }
    }

    pub(super) fn gap(&mut self, cx: &mut Ctx, dir: Direction, lost: u64, ts: TimestampNs) {
        match dir {
            Direction::ToServer => {
                self.req_fed += lost;
                self.lose::<Server>(cx, lost, ts);
            }
            Direction::ToClient => self.lose::<Client>(cx, lost, ts),
        }
    }

    /// `len` response bytes were described but not captured: skipped inside a body of known
    /// length (or one that runs to the close); anywhere else the framing is lost.
    pub(super) fn elided(&mut self, cx: &mut Ctx, dir: Direction, len: u64, ts: TimestampNs) {
        if dir == Direction::ToServer {
            // The kernel describes responses only; requests are always whole.
            self.gap(cx, dir, len, ts);
            return;
        }
        let p = &mut self.resp;
        p.drop_content(cx.stats);
        match &mut p.state {
            State::Body(BodyDecoder::Length { remaining }) if len <= *remaining => {
                *remaining -= len;
                p.body_bytes += len;
                if *remaining == 0 {
                    self.finish::<Client>(cx, ts);
                }
            }
            State::Body(BodyDecoder::UntilClose) | State::Stopped => {}
            State::Hunt => self.lose::<Client>(cx, len, ts),
            State::Head | State::Body(_) => {
                cx.stats.responses_unframed_heads += 1;
                cx.ask_full_responses(&mut self.full_responses_asked);
                self.lose::<Client>(cx, len, ts);
            }
        }
    }

    pub(super) fn end(&mut self, cx: &mut Ctx, dir: Direction) {
        match dir {
            Direction::ToServer => self.end_stream::<Server>(cx),
            Direction::ToClient => self.end_stream::<Client>(cx),
        }
    }

    pub(super) fn close(mut self, cx: &mut Ctx) {
        self.end_stream::<Server>(cx);
        self.end_stream::<Client>(cx);
        self.pairing.close(cx.stats);
    }

    /// Feeds one direction's bytes.
    fn feed<R: Role>(&mut self, cx: &mut Ctx, mut data: &[u8], ts: TimestampNs) {
        loop {
            let more = match R::parser(self).state {
                State::Stopped => false,
                State::Hunt => self.hunt::<R>(cx, &mut data, ts),
                State::Head => self.read_head::<R>(cx, &mut data, ts),
                State::Body(_) => self.read_body::<R>(cx, &mut data, ts),
            };
            if !more {
                break;
            }
        }
    }

    /// Looks for a message start in what arrived. Returns whether parsing can go on.
    fn hunt<R: Role>(&mut self, cx: &mut Ctx, data: &mut &[u8], ts: TimestampNs) -> bool {
        let p = R::parser(self);
        if data.is_empty() && p.buf.is_empty() {
            return false;
        }
        if cx.buffered + data.len() > cx.cfg.max_buffered_bytes {
            // Over the global cap: skip rather than buffer.
            cx.stats.resync_skipped_bytes += (p.buf.len() + data.len()) as u64;
            p.buf.clear();
            return false;
        }
        p.buf.extend_from_slice(data);
        *data = &[];
        if let Some(at) = R::find_start(&p.buf) {
            cx.stats.resync_skipped_bytes += at as u64;
            p.buf.advance(at);
            p.frames_from = 0;
            p.begin(cx.stats, ts);
            return true;
        }
        if R::hunt_elsewhere(self, cx) {
            return false;
        }
        let p = R::parser(self);
        // Keep a tail in case a start line straddles the next segment.
        let keep = cx.cfg.max_head_bytes.min(p.buf.len());
        let skip = p.buf.len() - keep;
        cx.stats.resync_skipped_bytes += skip as u64;
        p.buf.advance(skip);
        p.frames_from = p.frames_from.saturating_sub(skip);
        false
    }

    /// Gathers a head. Returns whether parsing can go on.
    fn read_head<R: Role>(&mut self, cx: &mut Ctx, data: &mut &[u8], ts: TimestampNs) -> bool {
        let p = R::parser(self);
        if p.buf.is_empty() {
            p.first_ts = ts;
            p.start_base = p.chunk_base;
            p.start_ack = p.chunk_ack;
        }
        if cx.buffered + data.len() > cx.cfg.max_buffered_bytes {
            if !p.buf.is_empty() {
                R::count_lost(cx.stats, DropReason::Memory);
            }
            p.buf.clear();
            p.state = State::Hunt;
            return true;
        }
        p.buf.extend_from_slice(data);
        *data = &[];
        if p.buf.is_empty() {
            return false;
        }
        self.try_head::<R>(cx, ts)
    }

    /// Frames body bytes. Returns whether parsing can go on.
    fn read_body<R: Role>(&mut self, cx: &mut Ctx, data: &mut &[u8], ts: TimestampNs) -> bool {
        let p = R::parser(self);
        let State::Body(decoder) = &mut p.state else {
            return false;
        };
        if data.is_empty() {
            return false;
        }
        let fed = frame_body(decoder, &mut p.content, data, cx.cfg.max_head_bytes);
        let Ok((n, done)) = fed else {
            self.malformed::<R>(cx.stats);
            return true;
        };
        p.body_bytes += n as u64;
        if p.keep {
            p.keep_body(cx, &data[..n]);
        }
        *data = &data[n..];
        if done {
            self.finish::<R>(cx, ts);
        }
        true
    }

    /// Tries to parse a complete head from the buffer. Returns whether parsing can go on.
    fn try_head<R: Role>(&mut self, cx: &mut Ctx, ts: TimestampNs) -> bool {
        if !R::is_http1(self, cx) {
            return false;
        }
        let p = R::parser(self);
        let Some(head_end) = p.head_end() else {
            if p.buf.len() > cx.cfg.max_head_bytes {
                // All of it is one oversize head; nothing in it can be framed.
                R::count_lost(cx.stats, DropReason::OversizeHead);
                p.buf.clear();
                p.state = State::Hunt;
                return true;
            }
            return false;
        };
        let mut head = match R::parse_head(&p.buf[..head_end], cx.cfg.max_headers) {
            Ok(h) if h.len <= cx.cfg.max_head_bytes => h,
            other => {
                let why = match other {
                    Err(HeadError::Malformed) => DropReason::Malformed,
                    _ => DropReason::OversizeHead,
                };
                R::count_lost(cx.stats, why);
                // The body's framing is unknown: look for the next message after this head.
                p.buf.advance(head_end);
                p.state = State::Hunt;
                return true;
            }
        };
        match R::on_head(self, cx, &mut head, ts) {
            AfterHead::Body => {
                R::parser(self).head = Some(head);
                self.enter_body::<R>(cx, ts)
            }
            AfterHead::Next => true,
            AfterHead::Halt => false,
        }
    }

    /// After a complete head: frames the bytes already buffered behind it.
    fn enter_body<R: Role>(&mut self, cx: &mut Ctx, ts: TimestampNs) -> bool {
        let p = R::parser(self);
        let Some(head) = p.head.as_ref() else {
            return true;
        };
        let head_len = head.len;
        let Some(mut decoder) = BodyDecoder::new(head.framing) else {
            self.finish::<R>(cx, ts);
            return true;
        };
        let fed = frame_body(
            &mut decoder,
            &mut p.content,
            &p.buf[head_len..],
            cx.cfg.max_head_bytes,
        );
        let Ok((n, done)) = fed else {
            self.malformed::<R>(cx.stats);
            return true;
        };
        p.body_bytes = n as u64;
        if p.keep && p.body_bytes > cx.cfg.max_body_bytes as u64 {
            p.keep = false;
            p.drop_reason = Some(DropReason::OversizeBody);
        }
        if done {
            self.finish::<R>(cx, ts);
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
    fn finish<R: Role>(&mut self, cx: &mut Ctx, ts: TimestampNs) {
        let p = R::parser(self);
        let Some(head) = p.head.take() else {
            return;
        };
        // The buffer starts with the message while its head is there, or while it is kept.
        let in_buf = !matches!(p.state, State::Body(_)) || p.keep;
        let len = if in_buf {
            (head.len + p.body_bytes as usize).min(p.buf.len())
        } else {
            0
        };
        let bytes = p.buf.split_to(len);
        R::on_end(self, cx, head, bytes, ts);
        R::parser(self).begin(cx.stats, ts);
    }

    /// A body that cannot be framed: drop the message and hunt for the next one.
    fn malformed<R: Role>(&mut self, stats: &mut HttpStats) {
        R::count_lost(stats, DropReason::Malformed);
        R::unframed(self);
        R::parser(self).resync();
    }

    /// Stops both parsers where they are, keeping their bytes for HTTP/2 (`hand_over`).
    fn hand_to_h2(&mut self, how: Switch) {
        self.switch = Some(how);
        self.req.state = State::Stopped;
        self.resp.state = State::Stopped;
    }

    fn stop(&mut self, stats: &mut HttpStats, reason: StopReason) {
        stats.stopped(reason);
        self.resp.drop_content(stats);
        for p in [&mut self.req, &mut self.resp] {
            p.state = State::Stopped;
            p.buf = BytesMut::new();
            p.head = None;
        }
        self.pairing.clear();
    }

    /// `lost` bytes of the stream will never arrive.
    fn lose<R: Role>(&mut self, cx: &mut Ctx, lost: u64, ts: TimestampNs) {
        let p = R::parser(self);
        p.drop_content(cx.stats);
        let framing_survives = match &p.state {
            State::Body(BodyDecoder::Length { remaining }) => lost <= *remaining,
            State::Body(BodyDecoder::UntilClose) | State::Stopped => true,
            _ => false,
        };
        if !framing_survives {
            R::framing_lost(self, cx.stats);
        }
        let p = R::parser(self);
        match &mut p.state {
            State::Stopped | State::Body(BodyDecoder::UntilClose) => {}
            State::Hunt => {
                // Bytes on either side of a hole must not be stitched into one start line.
                cx.stats.resync_skipped_bytes += p.buf.len() as u64;
                p.buf.clear();
            }
            State::Head => {
                if !p.buf.is_empty() {
                    R::count_lost(cx.stats, DropReason::Gap);
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
                p.drop_reason.get_or_insert(DropReason::Gap);
                p.keep = false;
                p.buf.clear();
                if done {
                    self.finish::<R>(cx, ts);
                }
            }
            State::Body(_) => {
                R::count_lost(cx.stats, DropReason::Gap);
                R::unframed(self);
                R::parser(self).resync();
            }
        }
    }

    /// The stream ended (FIN) or the connection closed: a message in progress is incomplete,
    /// except a response delimited by the close.
    fn end_stream<R: Role>(&mut self, cx: &mut Ctx) {
        let p = R::parser(self);
        if p.in_message() {
            R::count_lost(cx.stats, DropReason::Incomplete);
        }
        if matches!(p.state, State::Body(BodyDecoder::UntilClose)) {
            response::emit_content(cx, p);
        }
        p.drop_content(cx.stats);
        p.head = None;
        p.buf = BytesMut::new();
        p.state = State::Stopped;
    }

    /// What HTTP/2 takes over when the connection switches (`switch` is set): the bytes each
    /// parser held from where HTTP/2 begins, and the request that asked for the upgrade.
    pub(super) fn hand_over(&mut self) -> Handover {
        let upgrade = self.h2c_upgrade.take().and_then(|seq| {
            let p = self.pairing.take(seq)?;
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

/// Frames body bytes; a response's content, when it is compared, takes them as they pass.
fn frame_body(
    decoder: &mut BodyDecoder,
    content: &mut Option<Collecting>,
    data: &[u8],
    max_line: usize,
) -> Result<(usize, bool), super::framing::BodyError> {
    decoder.feed_with(data, max_line, &mut |b| {
        if let Some(c) = content.as_mut() {
            c.builder.push(b);
        }
    })
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether a `Transfer-Encoding` value ends with `chunked`, the coding that frames the body.
fn ends_chunked(value: &[u8]) -> bool {
    let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}
