//! HTTP/2 extraction (h2c): frames from both directions of a connection, header blocks through
//! one HPACK decoder per direction, streams into requests (pseudo-headers, headers, body,
//! trailers) and response metadata (`:status`, `grpc-status`, timing).
//!
//! A connection joined mid-stream is decoded from the first frame boundary found; its HPACK
//! tables begin with unknown entries (see `hpack`), and only the requests that reference them
//! are dropped (`dropped_hpack_unknown_index`). Streams per connection, header blocks and
//! bodies are capped; every drop is counted by reason in `HttpStats`.

pub mod frame;
pub mod hpack;
mod reader;
mod request;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use bytes::{Bytes, BytesMut};

use self::reader::{Block, Reader, Side};
pub use self::request::{BodyStream, InFlight, Request, StreamPart, StreamReceiver};
use self::request::{STREAM_AFTER, STREAM_AFTER_BYTES};
use super::h1::UpgradeRequest;
use super::{
    field, field_str, grpc_status, Ctx, HttpConfig, HttpEvent, HttpStats, ResponseMeta, Switch,
};
use crate::reassembly::Direction;
use crate::segment::TimestampNs;

/// Most responses held per connection for streams whose request was not read yet.
const MAX_EARLY: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqState {
    /// Headers seen, body or trailers may follow.
    Open,
    /// Handed on while still arriving: the rest goes through `Stream::tx`.
    Streaming,
    /// Handed on (or, after an upgrade, handed on by HTTP/1).
    Done,
    /// Dropped and counted; its response is framed but not reported.
    Dropped,
}

#[derive(Clone, Debug, Default)]
struct Response {
    status: Option<u16>,
    grpc_status: Option<u32>,
    first_ts: TimestampNs,
    /// A header block of the response referenced unknown entries: its status can't be known.
    unknown: bool,
    done: bool,
}

struct Stream {
    seq: u64,
    method: String,
    path: String,
    state: ReqState,
    /// A streaming request's body goes on here.
    /// One sender per copy of the body (per mirror); a copy its mirror does not keep up with
    /// is cut alone.
    tx: Vec<(mpsc::UnboundedSender<StreamPart>, InFlight)>,
    fields: Vec<(Bytes, Bytes)>,
    body: BytesMut,
    trailers: Vec<(Bytes, Bytes)>,
    first_ts: TimestampNs,
    last_ts: Option<TimestampNs>,
    response: Response,
}

pub struct H2Conn {
    client: Side,
    server: Side,
    streams: HashMap<u32, Stream>,
    /// Responses for streams whose request has not been read yet (out-of-order clones).
    early: VecDeque<(u32, Response)>,
    highest_request: u32,
    /// Client bytes were lost since the last request's HEADERS: stream ids skipped from then on
    /// are requests lost in the hole.
    client_lost: bool,
    from_start: bool,
}

impl H2Conn {
    pub fn new(cfg: &HttpConfig, how: Switch, upgrade: Option<UpgradeRequest>) -> Self {
        let from_start = how != Switch::Frames;
        let side = |reader| Side {
            reader,
            buf: BytesMut::new(),
            hpack: if from_start {
                hpack::Decoder::new(cfg.max_hpack_table, cfg.max_head_bytes)
            } else {
                hpack::Decoder::joined(cfg.max_hpack_table, cfg.max_head_bytes)
            },
            max_frame: if from_start {
                frame::DEFAULT_MAX_FRAME
            } else {
                frame::MAX_FRAME
            },
            block: None,
        };
        let (client, server) = match how {
            Switch::Preface => (side(Reader::Preface), side(Reader::Header)),
            // The server's 101 head was consumed; its frames follow. The client still sends its
            // preface.
            Switch::Upgraded { .. } => (side(Reader::Preface), side(Reader::Header)),
            Switch::Frames => (side(Reader::Header), side(Reader::Hunt { from: 0 })),
        };
        let mut c = H2Conn {
            client,
            server,
            streams: HashMap::new(),
            early: VecDeque::new(),
            highest_request: 0,
            client_lost: false,
            from_start,
        };
        if let Some(u) = upgrade {
            // The upgrading request is stream 1, half-closed by the client: its response
            // comes on stream 1 (RFC 7540 3.2).
            c.highest_request = 1;
            c.streams.insert(
                1,
                Stream {
                    seq: u.seq,
                    method: u.method,
                    path: u.target,
                    state: ReqState::Done,
                    tx: Vec::new(),
                    fields: Vec::new(),
                    body: BytesMut::new(),
                    trailers: Vec::new(),
                    first_ts: u.last_ts.unwrap_or(0),
                    last_ts: u.last_ts,
                    response: Response::default(),
                },
            );
        }
        c
    }

    pub fn held(&self) -> usize {
        let side =
            |s: &Side| s.buf.len() + s.block.as_ref().map_or(0, |b| b.buf.len()) + s.hpack.held();
        side(&self.client)
            + side(&self.server)
            + self.streams.values().map(|s| s.body.len()).sum::<usize>()
    }

    /// Streams tracked (open, or waiting for their response).
    pub fn streams(&self) -> usize {
        self.streams.len() + self.early.len()
    }

    fn side(&mut self, dir: Direction) -> &mut Side {
        match dir {
            Direction::ToServer => &mut self.client,
            Direction::ToClient => &mut self.server,
        }
    }

    pub fn feed(&mut self, ctx: &mut Ctx<'_>, dir: Direction, data: &[u8], ts: TimestampNs) {
        self.read(ctx, dir, data, ts);
        if dir == Direction::ToServer {
            self.hand_on_long_requests(ctx, ts);
        }
    }

    /// Requests still arriving a while after they began (client streaming, bidi, large
    /// bodies) are handed on now, and the rest of their body streams after them.
    fn hand_on_long_requests(&mut self, ctx: &mut Ctx<'_>, ts: TimestampNs) {
        let after = STREAM_AFTER.as_nanos() as u64;
        for s in self.streams.values_mut() {
            let long = ts.saturating_sub(s.first_ts) >= after || s.body.len() >= STREAM_AFTER_BYTES;
            if s.state != ReqState::Open || !long {
                continue;
            }
            let mut receivers = Vec::new();
            for _ in 0..ctx.cfg.stream_copies.max(1) {
                let (tx, rx) = mpsc::unbounded_channel();
                let in_flight = InFlight {
                    stream: Arc::default(),
                    all: Arc::clone(ctx.streaming),
                };
                s.tx.push((tx, in_flight.clone()));
                receivers.push(StreamReceiver { rx, in_flight });
            }
            s.state = ReqState::Streaming;
            let rest = BodyStream(Arc::new(Mutex::new(receivers)));
            let request = take_request(ctx, s, self.from_start, Some(rest), ts);
            ctx.stats.requests += 1;
            ctx.stats.h2_streamed_requests += 1;
            ctx.stats.request_bytes += request.size() as u64;
            ctx.events
                .push(HttpEvent::Request(super::Request::H2(request)));
        }
    }

    /// A header block larger than `max_head_bytes` was skipped: the entries it inserted are
    /// unknown from now on, and its request is dropped.
    fn oversize_block(&mut self, ctx: &mut Ctx<'_>, dir: Direction, stream: u32) {
        let side = self.side(dir);
        side.hpack.forget();
        side.block = None;
        if dir == Direction::ToServer {
            ctx.stats.dropped_oversize_head += 1;
            self.drop_request(ctx.stats, stream);
        }
    }

    fn header_block(&mut self, ctx: &mut Ctx<'_>, dir: Direction, block: Block, ts: TimestampNs) {
        if block.oversize {
            return self.oversize_block(ctx, dir, block.stream);
        }
        let side = self.side(dir);
        let decoded = match side.hpack.decode(&block.buf) {
            Ok(d) => d,
            Err(e) => {
                log::debug!("{}: header block does not decode: {e}", ctx.info.client);
                ctx.stats.hpack_errors += 1;
                side.hpack.forget();
                if dir == Direction::ToServer && !block.push {
                    ctx.stats.dropped_malformed += 1;
                    self.drop_request(ctx.stats, block.stream);
                }
                return;
            }
        };
        if block.push {
            ctx.stats.h2_pushes += 1;
            return;
        }
        match dir {
            Direction::ToServer => self.request_headers(ctx, block, decoded, ts),
            Direction::ToClient => self.response_headers(ctx, block, decoded, ts),
        }
    }

    fn request_headers(
        &mut self,
        ctx: &mut Ctx<'_>,
        block: Block,
        decoded: hpack::HeaderBlock,
        ts: TimestampNs,
    ) {
        let id = block.stream;
        if self.streams.contains_key(&id) {
            return self.request_trailers(ctx, block, decoded, ts);
        }
        if id <= self.highest_request || id.is_multiple_of(2) {
            // A stream from before the join, or one already dropped and forgotten.
            return;
        }
        if self.client_lost && self.highest_request > 0 {
            // Clients open streams in order: the ids skipped were requests in the hole.
            ctx.stats.dropped_gap += u64::from((id - self.highest_request) / 2 - 1);
        }
        self.client_lost = false;
        self.highest_request = id;
        if self.streams.len() >= ctx.cfg.max_pending {
            ctx.stats.dropped_h2_streams_over_cap += 1;
            return;
        }
        let text = |name: &str| {
            field(&decoded.fields, name).map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (method, path) = (text(":method"), text(":path"));
        let state = new_request_state(ctx.stats, &decoded, method.as_deref(), path.is_some());
        let response = match self.early.iter().position(|(s, _)| *s == id) {
            Some(i) => {
                ctx.stats.early_responses += 1;
                self.early.remove(i).map(|(_, r)| r).unwrap_or_default()
            }
            None => Response::default(),
        };
        self.streams.insert(
            id,
            Stream {
                seq: id as u64,
                method: method.unwrap_or_default(),
                path: path.unwrap_or_default(),
                state,
                tx: Vec::new(),
                fields: if state == ReqState::Open {
                    decoded.fields
                } else {
                    Vec::new()
                },
                body: BytesMut::new(),
                trailers: Vec::new(),
                first_ts: ts,
                last_ts: None,
                response,
            },
        );
        if block.end_stream {
            self.end_of_stream(ctx, Direction::ToServer, id, ts);
        } else {
            self.report(ctx, id);
        }
    }

    /// A header block on a stream whose request is open: its trailers.
    fn request_trailers(
        &mut self,
        ctx: &mut Ctx<'_>,
        block: Block,
        decoded: hpack::HeaderBlock,
        ts: TimestampNs,
    ) {
        let id = block.stream;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if matches!(s.state, ReqState::Open | ReqState::Streaming) {
            if decoded.unknown > 0 || decoded.too_large {
                give_up(ctx.stats, s, |st| count_unknown(st, &decoded));
            } else if s.state == ReqState::Streaming {
                send(ctx, s, StreamPart::Trailers(decoded.fields));
            } else {
                s.trailers = decoded.fields;
            }
        }
        if block.end_stream {
            self.end_of_stream(ctx, Direction::ToServer, id, ts);
        }
    }

    fn response_headers(
        &mut self,
        ctx: &mut Ctx<'_>,
        block: Block,
        decoded: hpack::HeaderBlock,
        ts: TimestampNs,
    ) {
        let id = block.stream;
        let status = field_str(&decoded.fields, ":status").and_then(|v| v.parse::<u16>().ok());
        let response = match self.streams.get_mut(&id) {
            Some(s) => &mut s.response,
            None => match self.early.iter().position(|(s, _)| *s == id) {
                Some(i) => &mut self.early[i].1,
                None if id > self.highest_request && status.is_some() => {
                    // The request is on its way (its clone is behind this one).
                    if self.early.len() >= MAX_EARLY {
                        self.early.pop_front();
                        ctx.stats.unpaired_responses += 1;
                    }
                    self.early.push_back((id, Response::default()));
                    &mut self.early.back_mut().expect("just pushed").1
                }
                None => return,
            },
        };
        if decoded.unknown > 0 {
            response.unknown = true;
        }
        match (response.status, status) {
            (_, Some(s)) if (100..200).contains(&s) => return,
            (None, Some(s)) => {
                response.status = Some(s);
                response.first_ts = ts;
            }
            (None, None) if !response.unknown => {
                ctx.stats.malformed_responses += 1;
                response.unknown = true;
            }
            _ => {}
        }
        if let Some(g) = grpc_status(&decoded.fields) {
            response.grpc_status = Some(g);
        }
        if block.end_stream {
            self.end_of_stream(ctx, Direction::ToClient, id, ts);
        }
    }

    /// DATA payload bytes of `stream`.
    fn body(&mut self, ctx: &mut Ctx<'_>, dir: Direction, stream: u32, data: &[u8]) {
        if dir != Direction::ToServer || data.is_empty() {
            return;
        }
        let Some(s) = self.streams.get_mut(&stream) else {
            // A stream from before the join, or dropped.
            ctx.stats.resync_skipped_bytes += data.len() as u64;
            return;
        };
        match s.state {
            ReqState::Streaming => send(ctx, s, StreamPart::Data(Bytes::copy_from_slice(data))),
            ReqState::Open if s.body.len() + data.len() > ctx.cfg.max_body_bytes => {
                give_up(ctx.stats, s, |st| st.dropped_oversize_body += 1)
            }
            ReqState::Open if ctx.buffered + data.len() > ctx.cfg.max_buffered_bytes => {
                give_up(ctx.stats, s, |st| st.dropped_memory += 1)
            }
            ReqState::Open => s.body.extend_from_slice(data),
            ReqState::Done | ReqState::Dropped => {}
        }
    }

    fn end_of_stream(&mut self, ctx: &mut Ctx<'_>, dir: Direction, id: u32, ts: TimestampNs) {
        if dir == Direction::ToClient {
            if let Some(s) = self.streams.get_mut(&id) {
                s.response.done = true;
            } else if let Some((_, r)) = self.early.iter_mut().find(|(s, _)| *s == id) {
                r.done = true;
            }
            return self.report(ctx, id);
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.last_ts.is_none() {
            s.last_ts = Some(ts);
        }
        if s.state == ReqState::Streaming {
            send(ctx, s, StreamPart::End);
            s.tx.clear();
            if s.state == ReqState::Streaming {
                s.state = ReqState::Done;
            }
        }
        if s.state == ReqState::Open {
            s.state = ReqState::Done;
            let request = take_request(ctx, s, self.from_start, None, ts);
            ctx.stats.requests += 1;
            ctx.stats.request_bytes += request.size() as u64;
            ctx.events
                .push(HttpEvent::Request(super::Request::H2(request)));
        }
        self.report(ctx, id);
    }

    /// Reports a stream's response once both its request and response are whole, and forgets
    /// the stream.
    fn report(&mut self, ctx: &mut Ctx<'_>, id: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let request_over = s.state == ReqState::Dropped || s.last_ts.is_some();
        // Without response tracking, a stream is over with its request.
        let response_over = s.response.done || !ctx.cfg.track_responses;
        if !response_over || !request_over {
            return;
        }
        if !ctx.cfg.track_responses {
            self.streams.remove(&id);
            return;
        }
        let s = self.streams.remove(&id).expect("just looked up");
        if s.state == ReqState::Dropped {
            return;
        }
        let (Some(status), false) = (s.response.status, s.response.unknown) else {
            // Its status is unknown (lost, or referenced entries from before a join).
            ctx.stats.unpaired_requests += 1;
            return;
        };
        let last = s.last_ts.unwrap_or(s.first_ts);
        ctx.stats.responses += 1;
        ctx.events.push(HttpEvent::Response(ResponseMeta {
            conn: ctx.info.id,
            server: ctx.info.server,
            request_seq: s.seq,
            method: s.method.into(),
            target: s.path.into(),
            status,
            grpc_status: s.response.grpc_status,
            // A response that began before the request ended (streaming) is timed from the
            // request's start.
            request_last_ts: if s.response.first_ts < last {
                s.first_ts
            } else {
                last
            },
            response_first_ts: s.response.first_ts,
        }));
    }

    fn drop_request(&mut self, stats: &mut HttpStats, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            give_up(stats, s, |_| {});
        } else if id > self.highest_request && !id.is_multiple_of(2) {
            // Never opened: remember it so that its response is absorbed silently.
            self.highest_request = id;
        }
    }

    fn reset(&mut self, ctx: &mut Ctx<'_>, id: u32) {
        let Some(mut s) = self.streams.remove(&id) else {
            return;
        };
        if s.state == ReqState::Open || (s.state == ReqState::Done && !s.response.done) {
            ctx.stats.h2_reset_streams += 1;
        }
        give_up(ctx.stats, &mut s, |_| {});
    }

    /// The framing of `dir` is lost: frames are looked for again, what the table held is
    /// unknown, and requests that were still arriving may have lost bytes.
    fn lose_sync(&mut self, ctx: &mut Ctx<'_>, dir: Direction) {
        ctx.stats.h2_resyncs += 1;
        let side = self.side(dir);
        side.reader = Reader::Hunt { from: 0 };
        side.buf.clear();
        side.block = None;
        side.hpack.forget();
        self.lost(ctx, dir);
    }

    /// Bytes of `dir` were lost somewhere in open streams.
    fn lost(&mut self, ctx: &mut Ctx<'_>, dir: Direction) {
        if dir == Direction::ToServer {
            self.client_lost = true;
        }
        let open: Vec<u32> = self.streams.keys().copied().collect();
        for id in open {
            let s = self.streams.get_mut(&id).expect("listed");
            match dir {
                Direction::ToServer if matches!(s.state, ReqState::Open | ReqState::Streaming) => {
                    give_up(ctx.stats, s, |st| st.dropped_gap += 1);
                }
                Direction::ToClient if !s.response.done => {
                    // Its status or trailers may have been in the hole.
                    s.response.unknown = true;
                }
                _ => {}
            }
        }
    }

    /// `lost` bytes of `dir` will never arrive.
    pub fn gap(&mut self, ctx: &mut Ctx<'_>, dir: Direction, lost: u64) {
        let side = self.side(dir);
        match &mut side.reader {
            Reader::Data(d)
                if lost <= u64::from(d.left.saturating_sub(d.pad)) && !d.pad_length_next =>
            {
                // The framing survives: only this stream lost bytes.
                d.left -= lost as u32;
                let stream = d.stream;
                if dir == Direction::ToServer {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        if matches!(s.state, ReqState::Open | ReqState::Streaming) {
                            give_up(ctx.stats, s, |st| st.dropped_gap += 1);
                        }
                    }
                }
            }
            Reader::Skip {
                left,
                oversize_block: None,
            } if lost <= u64::from(*left) => *left -= lost as u32,
            _ => self.lose_sync(ctx, dir),
        }
    }

    /// The direction ended (FIN).
    pub fn end(&mut self, ctx: &mut Ctx<'_>, dir: Direction) {
        if dir == Direction::ToServer {
            for s in self.streams.values_mut() {
                if matches!(s.state, ReqState::Open | ReqState::Streaming) {
                    give_up(ctx.stats, s, |st| st.dropped_incomplete += 1);
                }
            }
        }
        let side = self.side(dir);
        side.buf = BytesMut::new();
        side.block = None;
        side.reader = Reader::Skip {
            left: u32::MAX,
            oversize_block: None,
        };
    }

    pub fn close(mut self, ctx: &mut Ctx<'_>) {
        self.end(ctx, Direction::ToServer);
        for s in self.streams.values() {
            if s.state == ReqState::Done {
                ctx.stats.unpaired_requests += 1;
            }
        }
        ctx.stats.unpaired_responses += self.early.len() as u64;
    }
}

/// The request a stream holds, handed on at `ts` (its end, or for a streaming request, when it
/// is handed on with `rest` to follow).
fn take_request(
    ctx: &Ctx<'_>,
    s: &mut Stream,
    from_start: bool,
    rest: Option<BodyStream>,
    ts: TimestampNs,
) -> Request {
    Request {
        conn: ctx.info.id,
        seq: s.seq,
        client: ctx.info.client,
        server: ctx.info.server,
        fields: std::mem::take(&mut s.fields),
        body: std::mem::take(&mut s.body).freeze(),
        trailers: std::mem::take(&mut s.trailers),
        from_start,
        rest,
        first_ts: s.first_ts,
        last_ts: ts,
    }
}

/// Gives up on a stream's request. One already handed on (streaming) is cut: its channel closes
/// without `End`, so that the mirror's stream is reset; one not handed on yet is counted as
/// `count` says.
fn give_up(stats: &mut HttpStats, s: &mut Stream, count: impl FnOnce(&mut HttpStats)) {
    match s.state {
        ReqState::Streaming => stats.h2_streams_cut += 1,
        ReqState::Open => count(stats),
        ReqState::Done | ReqState::Dropped => return,
    }
    s.tx.clear();
    s.state = ReqState::Dropped;
    s.body = BytesMut::new();
}

/// Passes a part of a streaming request on, to every copy. A mirror's replay stage that does
/// not keep up has its copy cut (its mirror's stream is reset), the others go on: a copy's bytes
/// not taken yet stay under `max_body_bytes`, and those of all streams (with what the extractor
/// buffers) under `max_buffered_bytes`. The stream is cut when no copy is left.
fn send(ctx: &mut Ctx<'_>, s: &mut Stream, part: StreamPart) {
    if s.tx.is_empty() {
        return;
    }
    let n = match &part {
        StreamPart::Data(b) => b.len(),
        _ => 0,
    };
    let mut cut = false;
    s.tx.retain(|(tx, in_flight)| {
        let stream = in_flight.stream.load(Ordering::Relaxed);
        let all = in_flight.all.load(Ordering::Relaxed);
        if stream + n > ctx.cfg.max_body_bytes
            || ctx.buffered + all + n > ctx.cfg.max_buffered_bytes
        {
            ctx.stats.h2_streams_cut += 1;
            cut = true;
            return false;
        }
        in_flight.add(n);
        if tx.send(part.clone()).is_err() {
            // That mirror let the request go (filtered, or not sendable): nothing to cut.
            in_flight.sub(n);
            return false;
        }
        true
    });
    if s.tx.is_empty() && cut {
        s.state = ReqState::Dropped;
        s.body = BytesMut::new();
    }
}

/// A new request is read (`Open`) unless its fields are unknown or too large, it is a
/// `CONNECT`, or it lacks a method or path: then it is counted and `Dropped`.
fn new_request_state(
    stats: &mut HttpStats,
    decoded: &hpack::HeaderBlock,
    method: Option<&str>,
    has_path: bool,
) -> ReqState {
    if decoded.unknown > 0 || decoded.too_large {
        count_unknown(stats, decoded);
        return ReqState::Dropped;
    }
    match method {
        Some("CONNECT") => stats.dropped_stopped += 1,
        Some(_) if has_path => return ReqState::Open,
        _ => stats.dropped_malformed += 1,
    }
    ReqState::Dropped
}

fn count_unknown(stats: &mut HttpStats, decoded: &hpack::HeaderBlock) {
    if decoded.unknown > 0 {
        stats.dropped_hpack_unknown_index += 1;
    } else {
        stats.dropped_oversize_head += 1;
    }
}

#[cfg(test)]
mod tests;
