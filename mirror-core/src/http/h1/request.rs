//! The request side of an HTTP/1 connection (the role a server plays): requests come out
//! whole, with their exact bytes, for replay. A TLS record, the h2c preface, frames where a
//! request was expected, `CONNECT` and upgrades other than h2c end HTTP/1 here.

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;

use super::pairing::Pending;
use super::{
    ends_chunked, parse_length, AfterHead, DropReason, H1Conn, Head, HeadError, MessageParser, Role,
};
use crate::exchange::ConnId;
use crate::http::framing::{find_request_start, Framing};
use crate::http::h2::frame::{find_frames, DEFAULT_MAX_FRAME};
use crate::http::{Ctx, HttpEvent, HttpStats, StopReason, Switch, WireOrigin, HEADER_SLOTS};
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
    pub fn shared_method_and_target(&self) -> (ByteString, ByteString) {
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

/// Reads what a server reads: requests.
pub(super) struct Server;

impl Role for Server {
    fn parser(c: &mut H1Conn) -> &mut MessageParser {
        &mut c.req
    }

    fn find_start(buf: &[u8]) -> Option<usize> {
        find_request_start(buf)
    }

    /// A connection joined mid-stream may be HTTP/2: frames where a request was expected.
    fn hunt_elsewhere(c: &mut H1Conn, cx: &mut Ctx) -> bool {
        let p = &mut c.req;
        match find_frames(&p.buf, p.frames_from, DEFAULT_MAX_FRAME) {
            Ok(at) => {
                cx.stats.resync_skipped_bytes += at as u64;
                p.buf.advance(at);
                c.hand_to_h2(Switch::Frames);
                true
            }
            Err(next) => {
                p.frames_from = next;
                false
            }
        }
    }

    fn is_http1(c: &mut H1Conn, cx: &mut Ctx) -> bool {
        let p = &mut c.req;
        if p.at_stream_start && p.buf.len() >= 3 {
            p.at_stream_start = false;
            // A TLS handshake record: the bytes are encrypted.
            if p.buf[0] == 0x16 && p.buf[1] == 0x03 {
                c.stop(cx.stats, StopReason::Tls);
                return false;
            }
        }
        if c.req.buf.starts_with(b"PRI * HTTP/2.0") {
            c.hand_to_h2(Switch::Preface);
            return false;
        }
        true
    }

    fn parse_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError> {
        parse_request_head(buf, max_headers)
    }

    fn on_head(c: &mut H1Conn, cx: &mut Ctx, head: &mut Head, _ts: TimestampNs) -> AfterHead {
        let p = &c.req;
        if &p.buf[head.method.clone()] == b"CONNECT" {
            cx.stats.dropped_stopped += 1;
            c.stop(cx.stats, StopReason::Connect);
            return AfterHead::Halt;
        }
        let upgrade = upgrade_to(&p.buf, head);
        match upgrade {
            // Replayed as a plain request; its answer says which protocol follows.
            Some(Upgrade::H2c) => c.h2c_upgrade = Some(c.next_seq),
            Some(Upgrade::Other) => {
                cx.stats.dropped_stopped += 1;
                c.stop(cx.stats, StopReason::Upgrade);
                return AfterHead::Halt;
            }
            None => {}
        }
        head.seq = c.next_seq;
        c.next_seq += 1;
        if cx.cfg.track_responses {
            let pending = pending(&c.req, head, upgrade == Some(Upgrade::H2c));
            let early = c.pairing.take_early(c.req.start_base, cx.stats);
            let pending = Pending { early, ..pending };
            c.pairing.expect(pending, cx.cfg.max_pending, cx.stats);
        }
        c.req.keep = true;
        AfterHead::Body
    }

    fn on_end(c: &mut H1Conn, cx: &mut Ctx, head: Head, bytes: BytesMut, ts: TimestampNs) {
        let seq = head.seq;
        let p = &c.req;
        let keep = p.keep && p.drop_reason.is_none();
        let mut pending = c.pairing.find(seq);
        if let Some(pending) = pending.as_mut() {
            pending.last_ts = Some(ts);
            pending.dropped = !keep;
        }
        if keep {
            let raw = bytes.freeze();
            cx.stats.requests += 1;
            cx.stats.request_bytes += raw.len() as u64;
            let at = WireOrigin {
                conn: cx.info.id,
                seq,
                client: cx.info.client,
                server: cx.info.server,
                first_ts: p.first_ts,
                last_ts: ts,
            };
            let request = Request::assemble(raw, head, at);
            if let Some(pending) = pending {
                (pending.method, pending.target) = request.shared_method_and_target();
            }
            cx.events
                .push(HttpEvent::Request(crate::http::Request::H1(request)));
        } else {
            Self::count_lost(cx.stats, p.drop_reason.unwrap_or(DropReason::Incomplete));
        }
        super::response::report_early(c, cx, seq);
    }

    fn count_lost(stats: &mut HttpStats, why: DropReason) {
        let counter = match why {
            DropReason::Gap => &mut stats.dropped_gap,
            DropReason::OversizeHead => &mut stats.dropped_oversize_head,
            DropReason::OversizeBody => &mut stats.dropped_oversize_body,
            DropReason::Memory => &mut stats.dropped_memory,
            DropReason::Malformed => &mut stats.dropped_malformed,
            DropReason::Incomplete => &mut stats.dropped_incomplete,
        };
        *counter += 1;
    }

    /// A request whose head parsed and that cannot be framed any more: its response is
    /// framed but not reported.
    fn unframed(c: &mut H1Conn) {
        if let Some(head) = &c.req.head {
            if let Some(pending) = c.pairing.find(head.seq) {
                pending.dropped = true;
                pending.last_ts = Some(c.req.first_ts);
            }
        }
    }
}

/// The request the connection now waits an answer for. Its method and target are kept only
/// for an h2c upgrade, whose answer HTTP/2 may carry before the body ends; otherwise they
/// share the request's bytes once it is whole.
fn pending(p: &MessageParser, head: &Head, h2c: bool) -> Pending {
    let (method, target) = if h2c {
        let copy = |r: &Range<usize>| {
            ByteString::from(String::from_utf8_lossy(&p.buf[r.clone()]).into_owned())
        };
        (copy(&head.method), copy(&head.target))
    } else {
        Default::default()
    };
    Pending {
        seq: head.seq,
        method,
        target,
        head: &p.buf[head.method.clone()] == b"HEAD",
        last_ts: None,
        expect_continue: head.expect_continue,
        dropped: false,
        early: None,
    }
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
    let (framing, expect_continue) = request_framing(req.headers)?;
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

/// How a request's headers delimit its body, and whether it waits for `100 Continue`.
fn request_framing(headers: &[httparse::Header<'_>]) -> Result<(Framing, bool), HeadError> {
    let mut chunked = false;
    let mut expect_continue = false;
    let mut length: Option<u64> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the final coding of a request (RFC 9112 6.3); anything else
            // can't be framed.
            if !ends_chunked(h.value) {
                return Err(HeadError::Malformed);
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(HeadError::Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    };
    Ok((framing, expect_continue))
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
        let value = &buf[v.clone()];
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = Some(if value.trim_ascii().eq_ignore_ascii_case(b"h2c") {
                Upgrade::H2c
            } else {
                Upgrade::Other
            });
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        }
    }
    upgrade.filter(|_| connection_upgrade)
}
