//! The response side of an HTTP/1 connection (the role a client plays): responses are framed
//! but not kept. Each final response is paired with the oldest request waiting for it, and
//! its status and timing come out (`ResponseMeta`); with content comparison on, its code,
//! chosen headers and body too (`LiveContent`). Interim responses are skipped, and a `101`
//! to an `Upgrade: h2c` hands the connection to HTTP/2. Also the replay stage's parser of the
//! responses its own connections read (`parse_client_response`).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use bytestring::ByteString;

use super::pairing::{EarlyResponse, Pending};
use super::{
    ends_chunked, parse_length, AfterHead, DropReason, H1Conn, Head, HeadError, MessageParser,
    Role, State,
};
use crate::exchange::content::ContentBuilder;
use crate::http::framing::{find_response_start, Framing};
use crate::http::HEADER_SLOTS;
use crate::http::{Ctx, HttpEvent, HttpStats, LiveContent, ResponseMeta, StopReason, Switch};
use crate::segment::TimestampNs;

/// A live response's content being gathered for comparison.
pub(super) struct Collecting {
    seq: u64,
    method: ByteString,
    target: ByteString,
    pub builder: ContentBuilder,
}

/// Reads what a client reads: responses.
pub(super) struct Client;

impl Role for Client {
    fn parser(c: &mut H1Conn) -> &mut MessageParser {
        &mut c.resp
    }

    fn find_start(buf: &[u8]) -> Option<usize> {
        find_response_start(buf)
    }

    fn parse_head(buf: &[u8], max_headers: usize) -> Result<Head, HeadError> {
        parse_response_head(buf, max_headers)
    }

    fn on_head(c: &mut H1Conn, cx: &mut Ctx, head: &mut Head, ts: TimestampNs) -> AfterHead {
        let status = head.status;
        if (100..200).contains(&status) {
            return interim(c, cx, head, ts);
        }
        let Some(req) = c.pairing.next_unanswered() else {
            // The server had request bytes not read here yet: the request is on its way.
            let p = &c.resp;
            match p.start_ack.filter(|a| *a > c.req_fed) {
                Some(ack) => {
                    let first_ts = p.first_ts;
                    let early = EarlyResponse {
                        status,
                        first_ts,
                        ack,
                    };
                    c.pairing.hold_early(early, cx.stats)
                }
                None => cx.stats.unpaired_responses += 1,
            }
            head.framing = response_framing(head.framing, status, false);
            return AfterHead::Body;
        };
        head.framing = response_framing(head.framing, status, req.head);
        if head.framing == Framing::Chunked {
            // Chunk sizes are spread through the body: heads alone cannot frame it.
            cx.ask_full_responses(&mut c.full_responses_asked);
        }
        answer_expect(c, cx.stats, &req, status);
        if !req.dropped {
            report(c, cx, req, head);
        }
        AfterHead::Body
    }

    fn on_end(c: &mut H1Conn, cx: &mut Ctx, _head: Head, _bytes: BytesMut, _ts: TimestampNs) {
        emit_content(cx, &mut c.resp);
    }

    fn count_lost(stats: &mut HttpStats, why: DropReason) {
        // Only what cannot be a response is counted: the rest is counted by the request it
        // answers.
        if matches!(why, DropReason::Malformed | DropReason::OversizeHead) {
            stats.malformed_responses += 1;
        }
    }

    fn framing_lost(c: &mut H1Conn, stats: &mut HttpStats) {
        c.pairing.forget(stats);
    }
}

/// A 1xx: `101` hands an h2c upgrade to HTTP/2; the others (`100 Continue`, `103 Early
/// Hints`) are not the answer, which follows.
fn interim(c: &mut H1Conn, cx: &mut Ctx, head: &Head, ts: TimestampNs) -> AfterHead {
    let p = &mut c.resp;
    if head.status == 101 {
        match c.h2c_upgrade {
            Some(seq) => {
                p.buf.advance(head.len);
                c.hand_to_h2(Switch::Upgraded { seq });
            }
            None => c.stop(cx.stats, StopReason::Upgrade),
        }
        return AfterHead::Halt;
    }
    p.buf.advance(head.len);
    p.begin(cx.stats, ts);
    AfterHead::Next
}

/// The response to `req`, a request read whole: its status and timing go on, and its content
/// is gathered when it is compared.
fn report(c: &mut H1Conn, cx: &mut Ctx, req: Pending, head: &Head) {
    let Some(last) = req.last_ts else {
        cx.stats.unpaired_responses += 1;
        return;
    };
    cx.stats.responses += 1;
    let p = &mut c.resp;
    let compared = cx
        .cfg
        .content
        .as_ref()
        .filter(|cfg| cfg.compares(cx.info.client, cx.info.server));
    if let Some(cfg) = compared {
        p.content = Some(Collecting {
            seq: req.seq,
            method: req.method.clone(),
            target: req.target.clone(),
            builder: ContentBuilder::from_head(cfg, head.status, &p.buf[..head.len]),
        });
    }
    cx.events.push(HttpEvent::Response(ResponseMeta {
        conn: cx.info.id,
        server: cx.info.server,
        request_seq: req.seq,
        method: req.method,
        target: req.target,
        status: head.status,
        grpc_status: None,
        request_last_ts: last,
        response_first_ts: p.first_ts,
    }));
}

/// Reports the response held for request `seq`, now that the request is complete.
pub(super) fn report_early(c: &mut H1Conn, cx: &mut Ctx, seq: u64) {
    let Some((req, e)) = c.pairing.answered_early(seq) else {
        return;
    };
    let Some(last) = req.last_ts.filter(|_| !req.dropped) else {
        return;
    };
    cx.stats.responses += 1;
    cx.stats.early_responses += 1;
    cx.events.push(HttpEvent::Response(ResponseMeta {
        conn: cx.info.id,
        server: cx.info.server,
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
fn answer_expect(c: &mut H1Conn, stats: &mut HttpStats, req: &Pending, status: u16) {
    if !req.expect_continue || status < 200 {
        return;
    }
    let p = &mut c.req;
    let waiting = matches!(p.state, State::Body(_))
        && p.body_bytes == 0
        && p.head.as_ref().is_some_and(|h| h.seq == req.seq);
    if waiting {
        stats.dropped_expect_rejected += 1;
        p.head = None;
        p.buf.clear();
        p.state = State::Hunt;
    }
}

/// The response read to its end: its content goes to the comparison.
pub(super) fn emit_content(cx: &mut Ctx, p: &mut MessageParser) {
    if let Some(done) = p.content.take() {
        cx.stats.content_responses += 1;
        cx.events.push(HttpEvent::ResponseContent(LiveContent {
            conn: cx.info.id,
            server: cx.info.server,
            request_seq: done.seq,
            method: done.method,
            target: done.target,
            content: Arc::new(done.builder.finish()),
        }));
    }
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
            chunked = ends_chunked(h.value);
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

/// Responses to HEAD, and 1xx/204/304 responses, have no body whatever their headers say.
fn response_framing(framing: Framing, status: u16, to_head: bool) -> Framing {
    if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::None
    } else {
        framing
    }
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
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
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
