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

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::mpsc;

use bytes::{Bytes, BytesMut};

use self::frame::{FrameHeader, HEADER_LEN, PREFACE};
use super::h1::UpgradeRequest;
use super::{
    field, field_str, grpc_status, Ctx, HttpConfig, HttpEvent, HttpStats, ResponseMeta, Switch,
};
use crate::reassembly::{ConnId, Direction};
use crate::segment::TimestampNs;

/// One request taken from an HTTP/2 stream.
#[derive(Clone, Debug)]
pub struct Request {
    pub conn: ConnId,
    /// The stream id (or the upgrading HTTP/1.1 request's index, for stream 1 after h2c).
    pub seq: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Pseudo-headers first, then the other fields, in the order sent.
    pub fields: Vec<(Bytes, Bytes)>,
    pub body: Bytes,
    pub trailers: Vec<(Bytes, Bytes)>,
    /// Whether the connection was seen from its start (its HPACK tables complete).
    pub from_start: bool,
    /// The rest of a request handed on while it was still arriving (a streaming call): `body`
    /// is what had arrived then, the rest follows here.
    pub rest: Option<BodyStream>,
    pub first_ts: TimestampNs,
    /// For a streaming request: when it was handed on.
    pub last_ts: TimestampNs,
}

/// What follows of a request body handed on while still arriving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamPart {
    Data(Bytes),
    Trailers(Vec<(Bytes, Bytes)>),
    /// The client ended the stream. A channel that closes without it was cut short (a reset,
    /// a loss, the connection's end, a full channel): the mirror's stream must be reset too.
    End,
}

/// The receiving ends of a streaming request's body, one per mirror (`stream_copies`), each
/// taken once by a mirror's replay stage.
#[derive(Clone, Debug)]
pub struct BodyStream(Arc<Mutex<Vec<StreamReceiver>>>);

impl BodyStream {
    pub fn take(&self) -> Option<StreamReceiver> {
        self.0.lock().ok()?.pop()
    }
}

/// Body bytes handed on to the replay stage and not taken yet: of one stream, and of all.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    stream: Arc<AtomicUsize>,
    all: Arc<AtomicUsize>,
}

impl InFlight {
    fn add(&self, n: usize) {
        self.stream.fetch_add(n, Ordering::Relaxed);
        self.all.fetch_add(n, Ordering::Relaxed);
    }
    fn sub(&self, n: usize) {
        self.stream.fetch_sub(n, Ordering::Relaxed);
        self.all.fetch_sub(n, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct StreamReceiver {
    rx: mpsc::UnboundedReceiver<StreamPart>,
    in_flight: InFlight,
}

impl StreamReceiver {
    fn taken(&self, p: &StreamPart) {
        if let StreamPart::Data(b) = p {
            self.in_flight.sub(b.len());
        }
    }

    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<StreamPart>> {
        let p = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(p) = &p {
            self.taken(p);
        }
        Poll::Ready(p)
    }

    pub fn try_recv(&mut self) -> Result<StreamPart, mpsc::error::TryRecvError> {
        let p = self.rx.try_recv()?;
        self.taken(&p);
        Ok(p)
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(p) = self.rx.try_recv() {
            self.taken(&p);
        }
    }
}

/// A request still arriving this long after its HEADERS is handed on and streamed.
const STREAM_AFTER: Duration = Duration::from_millis(20);
/// A request body that grows to this size before its end is handed on and streamed.
const STREAM_AFTER_BYTES: usize = 64 << 10;

impl Request {
    fn pseudo(&self, name: &str) -> &str {
        field_str(&self.fields, name).unwrap_or("")
    }
    pub fn origin(&self) -> super::WireOrigin {
        super::WireOrigin {
            conn: self.conn,
            seq: self.seq,
            client: self.client,
            server: self.server,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
        }
    }
    pub fn method(&self) -> &str {
        self.pseudo(":method")
    }
    pub fn path(&self) -> &str {
        self.pseudo(":path")
    }
    pub fn authority(&self) -> &str {
        self.pseudo(":authority")
    }
    /// The regular header fields (no pseudo-headers), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .filter(|(n, _)| !n.starts_with(b":"))
            .map(|(n, v)| (&n[..], &v[..]))
    }
    pub fn size(&self) -> usize {
        let fields = |f: &[(Bytes, Bytes)]| f.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
        fields(&self.fields) + self.body.len() + fields(&self.trailers)
    }
}

/// Most bytes kept while looking for frames, and most bytes of a frame that is neither a header
/// block nor DATA (SETTINGS, GOAWAY, …): larger ones are skipped.
const HUNT_KEEP: usize = 64 << 10;
/// Most responses held per connection for streams whose request was not read yet.
const MAX_EARLY: usize = 8;

/// How a direction's bytes are being read.
#[derive(Clone, Copy, Debug)]
enum Reader {
    /// The client's preface: `buf` holds what matched so far.
    Preface,
    /// Looking for frames (after a join or a loss); offsets before `from` were ruled out.
    Hunt { from: usize },
    /// A frame header: `buf` holds what arrived of it.
    Header,
    /// A frame kept whole: `buf` holds what arrived of its payload.
    Payload(FrameHeader),
    /// A DATA frame's payload, passed on as it arrives.
    Data(DataFrame),
    /// A frame's payload not kept; `oversize` header blocks make the table unknown.
    Skip {
        left: u32,
        oversize_block: Option<u32>,
    },
}

#[derive(Clone, Copy, Debug)]
struct DataFrame {
    stream: u32,
    end_stream: bool,
    /// The pad length byte is still to come.
    pad_length_next: bool,
    /// Payload bytes left, padding included.
    left: u32,
    /// Padding at the end of the payload.
    pad: u32,
}

/// One direction: client to server (requests) or server to client (responses).
struct Side {
    reader: Reader,
    buf: BytesMut,
    hpack: hpack::Decoder,
    /// The largest frame this side may send (the other side's SETTINGS_MAX_FRAME_SIZE).
    max_frame: u32,
    /// A header block waiting for its CONTINUATIONs.
    block: Option<Block>,
}

struct Block {
    stream: u32,
    push: bool,
    end_stream: bool,
    buf: BytesMut,
    /// Over `max_head_bytes`: not kept.
    oversize: bool,
}

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

    fn read(&mut self, ctx: &mut Ctx<'_>, dir: Direction, mut data: &[u8], ts: TimestampNs) {
        loop {
            let side = self.side(dir);
            match side.reader {
                Reader::Preface => {
                    if data.is_empty() {
                        return;
                    }
                    let take = (PREFACE.len() - side.buf.len()).min(data.len());
                    side.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if !PREFACE.starts_with(&side.buf) {
                        // Not the preface after all: find frames in what came.
                        ctx.stats.h2_resyncs += 1;
                        side.hpack.forget();
                        side.reader = Reader::Hunt { from: 0 };
                    } else if side.buf.len() == PREFACE.len() {
                        side.buf.clear();
                        side.reader = Reader::Header;
                    }
                }
                Reader::Hunt { from } => {
                    side.buf.extend_from_slice(data);
                    match frame::find_frames(&side.buf, from, side.max_frame) {
                        Ok(at) => {
                            ctx.stats.resync_skipped_bytes += at as u64;
                            let rest = side.buf.split_off(at).freeze();
                            side.buf.clear();
                            side.reader = Reader::Header;
                            return self.read(ctx, dir, &rest, ts);
                        }
                        Err(next) => {
                            let drop = side.buf.len().saturating_sub(HUNT_KEEP);
                            ctx.stats.resync_skipped_bytes += drop as u64;
                            let _ = side.buf.split_to(drop);
                            side.reader = Reader::Hunt {
                                from: next.saturating_sub(drop),
                            };
                            return;
                        }
                    }
                }
                Reader::Header => {
                    if data.is_empty() {
                        return;
                    }
                    let take = (HEADER_LEN - side.buf.len()).min(data.len());
                    side.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if side.buf.len() == HEADER_LEN {
                        let h = FrameHeader::parse(&side.buf);
                        side.buf.clear();
                        self.begin_frame(ctx, dir, h, ts);
                    }
                }
                Reader::Payload(h) => {
                    let take = (h.len as usize - side.buf.len()).min(data.len());
                    side.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if side.buf.len() < h.len as usize {
                        return;
                    }
                    let payload = side.buf.split().freeze();
                    side.reader = Reader::Header;
                    self.frame(ctx, dir, h, &payload, ts);
                }
                Reader::Data(mut d) => {
                    if d.left > 0 && data.is_empty() {
                        return;
                    }
                    if d.pad_length_next && d.left > 0 {
                        d.pad = data[0] as u32;
                        d.pad_length_next = false;
                        d.left -= 1;
                        data = &data[1..];
                        if d.pad > d.left {
                            self.lose_sync(ctx, dir);
                            continue;
                        }
                    }
                    // Padding may be partly skipped already: `left` can be below `pad`.
                    let useful = d.left.saturating_sub(d.pad) as usize;
                    let take = useful.min(data.len());
                    self.body(ctx, dir, d.stream, &data[..take]);
                    d.left -= take as u32;
                    data = &data[take..];
                    if d.left <= d.pad {
                        let skip = (d.left as usize).min(data.len());
                        d.left -= skip as u32;
                        data = &data[skip..];
                    }
                    let side = self.side(dir);
                    if d.left == 0 {
                        side.reader = Reader::Header;
                        if d.end_stream {
                            self.end_of_stream(ctx, dir, d.stream, ts);
                        }
                    } else {
                        side.reader = Reader::Data(d);
                    }
                }
                Reader::Skip {
                    left,
                    oversize_block,
                } => {
                    let take = (left as usize).min(data.len());
                    data = &data[take..];
                    let left = left - take as u32;
                    if left > 0 {
                        side.reader = Reader::Skip {
                            left,
                            oversize_block,
                        };
                        return;
                    }
                    side.reader = Reader::Header;
                    if let Some(stream) = oversize_block {
                        self.oversize_block(ctx, dir, stream);
                    }
                }
            }
        }
    }

    fn begin_frame(&mut self, ctx: &mut Ctx<'_>, dir: Direction, h: FrameHeader, ts: TimestampNs) {
        let side = self.side(dir);
        let known = h.kind <= frame::CONTINUATION;
        if h.len > side.max_frame || (known && !h.plausible(side.max_frame)) {
            return self.lose_sync(ctx, dir);
        }
        let header_block = matches!(
            h.kind,
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION
        );
        side.reader = match h.kind {
            frame::DATA => Reader::Data(DataFrame {
                stream: h.stream,
                end_stream: h.flags & frame::END_STREAM != 0,
                pad_length_next: h.flags & frame::PADDED != 0,
                left: h.len,
                pad: 0,
            }),
            _ if header_block && h.len as usize > ctx.cfg.max_head_bytes => Reader::Skip {
                left: h.len,
                oversize_block: Some(h.stream),
            },
            _ if !known || h.len as usize > HUNT_KEEP => Reader::Skip {
                left: h.len,
                oversize_block: None,
            },
            _ => Reader::Payload(h),
        };
        // Frames without payload complete now.
        match side.reader {
            Reader::Payload(h) if h.len == 0 => {
                side.reader = Reader::Header;
                self.frame(ctx, dir, h, &[], ts);
            }
            Reader::Data(d) if d.left == 0 => {
                side.reader = Reader::Header;
                if d.end_stream {
                    self.end_of_stream(ctx, dir, d.stream, ts);
                }
            }
            Reader::Skip { left: 0, .. } => side.reader = Reader::Header,
            _ => {}
        }
    }

    /// A whole frame other than DATA.
    fn frame(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        h: FrameHeader,
        payload: &[u8],
        ts: TimestampNs,
    ) {
        let side = self.side(dir);
        if side.block.is_some() && h.kind != frame::CONTINUATION {
            // A header block must be continued before anything else (RFC 9113 6.10).
            return self.lose_sync(ctx, dir);
        }
        match h.kind {
            frame::HEADERS | frame::PUSH_PROMISE => {
                let Some(fragment) = frame::header_fragment(&h, payload) else {
                    return self.lose_sync(ctx, dir);
                };
                side.block = Some(Block {
                    stream: h.stream,
                    push: h.kind == frame::PUSH_PROMISE,
                    end_stream: h.kind == frame::HEADERS && h.flags & frame::END_STREAM != 0,
                    buf: BytesMut::from(fragment),
                    oversize: false,
                });
            }
            frame::CONTINUATION => {
                let max = ctx.cfg.max_head_bytes;
                match side.block.as_mut() {
                    Some(b) if b.stream == h.stream => {
                        if b.buf.len() + payload.len() > max {
                            b.oversize = true;
                            b.buf = BytesMut::new();
                        } else if !b.oversize {
                            b.buf.extend_from_slice(payload);
                        }
                    }
                    _ => return self.lose_sync(ctx, dir),
                }
            }
            frame::SETTINGS if h.flags & frame::ACK == 0 => {
                for (id, value) in frame::settings(payload) {
                    if id == frame::SETTINGS_MAX_FRAME_SIZE {
                        // What this side accepts bounds what the other side sends.
                        let other = self.side(dir.reverse());
                        other.max_frame = value.clamp(frame::DEFAULT_MAX_FRAME, frame::MAX_FRAME);
                    }
                }
            }
            frame::RST_STREAM => self.reset(ctx, h.stream),
            frame::GOAWAY if dir == Direction::ToClient && payload.len() >= 4 => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let refused: Vec<u32> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|&id| id > last)
                    .collect();
                for id in refused {
                    ctx.stats.h2_refused_streams += 1;
                    if let Some(mut s) = self.streams.remove(&id) {
                        give_up(ctx.stats, &mut s, |_| {});
                    }
                }
            }
            _ => {}
        }
        if h.flags & frame::END_HEADERS != 0
            && matches!(
                h.kind,
                frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION
            )
        {
            if let Some(block) = self.side(dir).block.take() {
                self.header_block(ctx, dir, block, ts);
            }
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
        if let Some(s) = self.streams.get_mut(&id) {
            // Trailers.
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
            return;
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
        let mut state = ReqState::Open;
        if decoded.unknown > 0 || decoded.too_large {
            count_unknown(ctx.stats, &decoded);
            state = ReqState::Dropped;
        }
        let text = |name: &str| {
            field(&decoded.fields, name).map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (method, path) = (text(":method"), text(":path"));
        if state == ReqState::Open {
            match method.as_deref() {
                Some("CONNECT") => {
                    ctx.stats.dropped_stopped += 1;
                    state = ReqState::Dropped;
                }
                Some(_) if path.is_some() => {}
                _ => {
                    ctx.stats.dropped_malformed += 1;
                    state = ReqState::Dropped;
                }
            }
        }
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

fn count_unknown(stats: &mut HttpStats, decoded: &hpack::HeaderBlock) {
    if decoded.unknown > 0 {
        stats.dropped_hpack_unknown_index += 1;
    } else {
        stats.dropped_oversize_head += 1;
    }
}

#[cfg(test)]
mod tests;
