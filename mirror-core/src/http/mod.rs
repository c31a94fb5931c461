//! The parse stage: HTTP/1.x and HTTP/2 exchanges from reassembled streams.
//!
//! Each connection starts as HTTP/1 (`h1`) and is handed to `h2` when it turns out to speak
//! HTTP/2: the h2c preface, an `Upgrade: h2c` the server accepted, or frames where a request
//! was expected (a connection joined mid-stream). Both protocols hand on the same `Request` and
//! `ResponseMeta` types, so that replay and compare do not care which protocol carried them.
//! Anything dropped is counted by reason in `HttpStats`.

pub mod framing;
pub mod h1;
pub mod h2;

use std::net::SocketAddr;

use bytes::Bytes;
use bytestring::ByteString;

use crate::reassembly::{CloseReason, ConnId, ConnInfo, Direction, StreamHandler};
use crate::segment::TimestampNs;

pub use crate::exchange::HEADER_SLOTS;

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub max_headers: usize,
    /// Largest request or response head (request line + headers, or an HTTP/2 header block),
    /// and largest chunk line.
    pub max_head_bytes: usize,
    /// Largest request body kept for replay; larger requests are framed, dropped and counted.
    pub max_body_bytes: usize,
    /// Most bytes buffered across all connections (heads, and request bodies being read).
    /// Exceeded by at most one segment, checked before each append.
    pub max_buffered_bytes: usize,
    /// Pair responses with requests (needs the capture's response mode).
    pub track_responses: bool,
    /// Most requests per connection still waiting for their response (HTTP/1), or open
    /// streams per connection (HTTP/2).
    pub max_pending: usize,
    /// Most bytes of each HTTP/2 connection's HPACK tables (one per direction).
    pub max_hpack_table: usize,
    /// The capture describes response segments by their heads (`--response-capture heads`):
    /// ask for a connection's responses whole where heads cannot frame them.
    pub response_heads: bool,
    /// Copies of each streaming HTTP/2 request body handed on: one per mirror.
    pub stream_copies: usize,
    /// Keep live HTTP/1 responses (status, chosen headers, body) for content comparison.
    pub content: Option<crate::exchange::content::ContentCapture>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_headers: 100,
            max_head_bytes: 64 << 10,
            max_body_bytes: 16 << 20,
            max_buffered_bytes: 256 << 20,
            track_responses: true,
            max_pending: 256,
            max_hpack_table: 64 << 10,
            response_heads: false,
            stream_copies: 1,
            content: None,
        }
    }
}

/// One request extracted from a live connection, as either protocol carried it.
#[derive(Clone, Debug)]
pub enum Request {
    H1(h1::Request),
    H2(h2::Request),
}

impl Request {
    pub fn conn(&self) -> ConnId {
        match self {
            Request::H1(r) => r.conn,
            Request::H2(r) => r.conn,
        }
    }
    /// Pairs the request with its response: the index on an HTTP/1 connection, the stream id
    /// on an HTTP/2 one.
    pub fn seq(&self) -> u64 {
        match self {
            Request::H1(r) => r.seq,
            Request::H2(r) => r.seq,
        }
    }
    pub fn method(&self) -> &str {
        match self {
            Request::H1(r) => r.method(),
            Request::H2(r) => r.method(),
        }
    }
    /// The request target: HTTP/1's as sent, HTTP/2's `:path`.
    pub fn target(&self) -> &str {
        match self {
            Request::H1(r) => r.target(),
            Request::H2(r) => r.path(),
        }
    }
    /// `method()` and `target()` as strings that share the request's bytes: no copy, for what
    /// outlives the request (a mirror's outcome).
    pub fn shared_method_and_target(&self) -> (ByteString, ByteString) {
        match self {
            Request::H1(r) => r.shared_method_and_target(),
            Request::H2(r) => (
                shared_field(&r.fields, ":method"),
                shared_field(&r.fields, ":path"),
            ),
        }
    }
    /// The first header field named `name` (any case), HTTP/1 or HTTP/2.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        match self {
            Request::H1(r) => r.header(name),
            Request::H2(r) => r
                .fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| &v[..]),
        }
    }
    /// The server's address: the live service's.
    pub fn server(&self) -> std::net::SocketAddr {
        match self {
            Request::H1(r) => r.server,
            Request::H2(r) => r.server,
        }
    }
    /// Bytes the request holds (head or header fields, and body).
    pub fn size(&self) -> usize {
        match self {
            Request::H1(r) => r.raw.len(),
            Request::H2(r) => r.size(),
        }
    }
}

/// Where a request came from: its connection, its position on it, and the capture times of its
/// first and last byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireOrigin {
    pub conn: ConnId,
    pub seq: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub first_ts: TimestampNs,
    pub last_ts: TimestampNs,
}

/// What is known of a live response: its status and how long the service took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseMeta {
    pub conn: ConnId,
    /// The live server's address (unspecified in a recording, which keeps it per connection).
    pub server: std::net::SocketAddr,
    pub request_seq: u64,
    pub method: ByteString,
    pub target: ByteString,
    pub status: u16,
    /// A gRPC response's `grpc-status` (from its trailers, or its headers when it has no body).
    pub grpc_status: Option<u32>,
    pub request_last_ts: TimestampNs,
    pub response_first_ts: TimestampNs,
}

impl ResponseMeta {
    /// Time from the request's last byte to the response's first byte.
    pub fn duration_ns(&self) -> u64 {
        self.response_first_ts.saturating_sub(self.request_last_ts)
    }

    /// The result code shown in reports: the gRPC status name, or the HTTP status.
    pub fn code(&self) -> String {
        crate::exchange::result_code(self.status, self.grpc_status)
    }
}

/// The value of the first field named `name` (lower case, as HTTP/2 sends names).
pub fn field<'a>(fields: &'a [(Bytes, Bytes)], name: &str) -> Option<&'a [u8]> {
    field_bytes(fields, name).map(|v| &v[..])
}

fn field_bytes<'a>(fields: &'a [(Bytes, Bytes)], name: &str) -> Option<&'a Bytes> {
    fields
        .iter()
        .find(|(n, _)| &n[..] == name.as_bytes())
        .map(|(_, v)| v)
}

/// The value of the first field named `name`, sharing its bytes; empty unless UTF-8.
fn shared_field(fields: &[(Bytes, Bytes)], name: &str) -> ByteString {
    field_bytes(fields, name)
        .and_then(|v| ByteString::try_from(v.clone()).ok())
        .unwrap_or_default()
}

/// The value of the first field named `name`, as text, if it is UTF-8.
pub fn field_str<'a>(fields: &'a [(Bytes, Bytes)], name: &str) -> Option<&'a str> {
    std::str::from_utf8(field(fields, name)?).ok()
}

/// The `grpc-status` among header fields, if any.
pub fn grpc_status(fields: &[(Bytes, Bytes)]) -> Option<u32> {
    field_str(fields, "grpc-status")?.trim().parse().ok()
}

#[derive(Clone, Debug)]
pub enum HttpEvent {
    Request(Request),
    Response(ResponseMeta),
    /// Response heads cannot frame this connection's responses (HTTP/2, chunked bodies,
    /// heads longer than a record, responses sharing a segment): capture them whole.
    FullResponses {
        client: std::net::SocketAddr,
        server: std::net::SocketAddr,
    },
    /// A live response read to its end, for content comparison (`HttpConfig::content`).
    ResponseContent(LiveContent),
}

/// A live response's content, keyed like its `ResponseMeta`.
#[derive(Clone, Debug)]
pub struct LiveContent {
    pub conn: ConnId,
    pub server: std::net::SocketAddr,
    pub request_seq: u64,
    pub method: ByteString,
    pub target: ByteString,
    pub content: std::sync::Arc<crate::exchange::content::Content>,
}

/// Why extraction stopped on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Upgrade,
    Connect,
    Tls,
}

/// How an HTTP/1 connection turned out to speak HTTP/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// The client's h2c preface where a request was expected.
    Preface,
    /// The server accepted `Upgrade: h2c` (101) for the request with this sequence number.
    Upgraded { seq: u64 },
    /// Frames where a request was expected, on a connection joined after its start.
    Frames,
}

crate::stage_counters! {
    /// Counters. A request head that parsed ends as exactly one of: `requests`, or a `dropped_*`.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct HttpStats {
        /// Gauge: request bytes buffered now.
        pub buffered_bytes: u64 => Gauge "mirror_http_buffered_bytes"
            "Request bytes buffered now",
        /// Live responses whose content could not be kept: bytes not captured or lost, or the
        /// connection ended inside the body.
        pub content_incomplete: u64 => Counter "mirror_http_content_incomplete"
            "Live responses whose content could not be kept whole for comparison",
        /// Live responses read whole for content comparison.
        pub content_responses: u64 => Counter "mirror_http_content_responses"
            "Live responses read whole for content comparison",
        pub dropped_expect_rejected: u64 => Counter "mirror_http_dropped" [reason = "expect_rejected"]
            "Requests the parse stage dropped, by reason",
        pub dropped_gap: u64 => Counter "mirror_http_dropped" [reason = "gap"],
        /// HTTP/2 requests dropped because their connection had `max_pending` streams open.
        pub dropped_h2_streams_over_cap: u64 => Counter "mirror_http_dropped" [reason = "h2_streams_over_cap"],
        /// HTTP/2 requests dropped because a header referenced a table entry from before the join
        /// (or from before a loss): never guessed.
        pub dropped_hpack_unknown_index: u64 => Counter "mirror_http_dropped" [reason = "hpack_unknown_index"],
        pub dropped_incomplete: u64 => Counter "mirror_http_dropped" [reason = "incomplete"],
        pub dropped_malformed: u64 => Counter "mirror_http_dropped" [reason = "malformed"],
        pub dropped_memory: u64 => Counter "mirror_http_dropped" [reason = "memory"],
        pub dropped_oversize_body: u64 => Counter "mirror_http_dropped" [reason = "oversize_body"],
        pub dropped_oversize_head: u64 => Counter "mirror_http_dropped" [reason = "oversize_head"],
        pub dropped_stopped: u64 => Counter "mirror_http_dropped" [reason = "stopped"],
        /// Responses captured before their request (the two directions' clones reached the agent
        /// out of order) and paired once the request arrived.
        pub early_responses: u64 => Counter "mirror_http_early_responses"
            "Responses captured before their request and paired once it arrived",
        /// Connections whose responses were asked for whole (see `HttpEvent::FullResponses`).
        pub full_response_connections: u64 => Counter "mirror_http_full_response_connections"
            "Connections whose responses were asked of the kernel whole",
        /// HTTP/2 connections seen from their start (prior knowledge, or upgraded from HTTP/1.1).
        pub h2_connections: u64 => Counter "mirror_http_h2_connections"
            "HTTP/2 connections seen from their start",
        /// HTTP/2 connections joined after their start, recognised from their frames.
        pub h2_joined_connections: u64 => Counter "mirror_http_h2_joined_connections"
            "HTTP/2 connections joined after their start",
        /// Gauge: HTTP/2 streams tracked now, across connections.
        pub h2_open_streams: u64 => Gauge "mirror_http_h2_open_streams"
            "HTTP/2 streams tracked now",
        /// Server pushes (PUSH_PROMISE): decoded to keep the table in step, not replayed.
        pub h2_pushes: u64 => Counter "mirror_http_h2_pushes"
            "Server pushes decoded (not replayed)",
        /// HTTP/2 requests above the last stream id of the server's GOAWAY: the server did not
        /// process them (the client may retry them on another connection).
        pub h2_refused_streams: u64 => Counter "mirror_http_h2_refused_streams"
            "HTTP/2 requests above the last stream id of the server's GOAWAY",
        /// HTTP/2 streams reset (RST_STREAM) before their request or response was whole.
        pub h2_reset_streams: u64 => Counter "mirror_http_h2_reset_streams"
            "HTTP/2 streams reset before their request or response was whole",
        /// Times an HTTP/2 stream's framing was lost (a hole) and frames were looked for again.
        pub h2_resyncs: u64 => Counter "mirror_http_h2_resyncs"
            "Times an HTTP/2 connection's framing was lost and looked for again",
        /// HTTP/2 requests handed on while still arriving (client streaming, bidi, large bodies),
        /// their body streamed after them.
        pub h2_streamed_requests: u64 => Counter "mirror_http_h2_streamed_requests"
            "HTTP/2 requests handed on while their body was still arriving",
        /// Gauge: bytes of streaming request bodies handed on and not yet sent by the replay stage.
        pub h2_streaming_bytes: u64 => Gauge "mirror_http_h2_streaming_bytes"
            "Streaming request body bytes handed on and not yet sent",
        /// Of those, cut short (reset, loss, the connection's end, or a replay stage that could not
        /// keep up): the mirror's stream is reset, never ended as if whole.
        pub h2_streams_cut: u64 => Counter "mirror_http_h2_streams_cut"
            "Streamed HTTP/2 requests cut short (the mirror's stream is reset)",
        /// Of those, upgraded from HTTP/1.1 (`Upgrade: h2c`).
        pub h2_upgrades: u64 => Counter "mirror_http_h2_upgrades"
            "HTTP/2 connections upgraded from HTTP/1.1",
        /// Header blocks that did not decode (their table is forgotten, as after a join).
        pub hpack_errors: u64 => Counter "mirror_http_hpack_errors"
            "HTTP/2 header blocks that did not decode",
        pub malformed_responses: u64 => Counter "mirror_http_malformed_responses"
            "Responses that did not parse",
        pub pending_overflow: u64 => Counter "mirror_http_pending_overflow"
            "Requests no longer awaiting their response: the connection had too many waiting",
        pub request_bytes: u64 => Counter "mirror_http_request_bytes"
            "Bytes of requests extracted",
        pub requests: u64 => Counter "mirror_http_requests"
            "Requests extracted",
        pub responses: u64 => Counter "mirror_http_responses"
            "Responses paired",
        /// Times response heads could not frame a response stream: bytes not captured fell where
        /// framing needed them. Responses resync at the next status line, and requests waiting
        /// for an answer then are counted in `unpaired_requests`.
        pub responses_unframed_heads: u64 => Counter "mirror_http_responses_unframed_heads"
            "Times response heads could not frame a response stream",
        /// Bytes skipped while looking for a message start (mid-stream joins, after losses).
        pub resync_skipped_bytes: u64 => Counter "mirror_http_resync_skipped_bytes"
            "Bytes skipped while looking for a message start",
        pub stopped_connect: u64 => Counter "mirror_http_stopped" [reason = "connect"]
            "Connections no longer parsed, by reason",
        pub stopped_tls: u64 => Counter "mirror_http_stopped" [reason = "tls"],
        pub stopped_upgrade: u64 => Counter "mirror_http_stopped" [reason = "upgrade"],
        /// Requests whose response could not be told apart after a loss in the response stream.
        pub unpaired_requests: u64 => Counter "mirror_http_unpaired_requests"
            "Requests whose response could not be told apart after a loss",
        pub unpaired_responses: u64 => Counter "mirror_http_unpaired_responses"
            "Responses without a request to pair with",
}
}

impl HttpStats {
    fn stopped(&mut self, r: StopReason) {
        match r {
            StopReason::Upgrade => self.stopped_upgrade += 1,
            StopReason::Connect => self.stopped_connect += 1,
            StopReason::Tls => self.stopped_tls += 1,
        }
    }
}

/// What a connection's parser needs of the extractor while it runs: the configuration, the
/// counters, where events go, and the totals across connections when the call began.
pub struct Ctx<'a> {
    pub cfg: &'a HttpConfig,
    pub stats: &'a mut HttpStats,
    pub events: &'a mut Vec<HttpEvent>,
    pub info: &'a ConnInfo,
    /// Bytes buffered across all connections when this call began.
    pub buffered: usize,
    /// Bytes of streaming bodies handed on and not yet taken by the replay stage.
    pub streaming: &'a std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Ctx<'_> {
    /// Asks the capture for the connection's responses whole, once.
    fn ask_full_responses(&mut self, asked: &mut bool) {
        if !self.cfg.response_heads || *asked {
            return;
        }
        *asked = true;
        self.stats.full_response_connections += 1;
        self.events.push(HttpEvent::FullResponses {
            client: self.info.client,
            server: self.info.server,
        });
    }
}

/// The parse stage: a `StreamHandler` that turns streams into `HttpEvent`s.
pub struct HttpExtractor {
    cfg: HttpConfig,
    stats: HttpStats,
    buffered: usize,
    /// HTTP/2 streams tracked across connections.
    streams: usize,
    /// Bytes of streaming request bodies handed on and not yet taken by the replay stage.
    streaming: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    events: Vec<HttpEvent>,
}

impl HttpExtractor {
    pub fn new(mut cfg: HttpConfig) -> Self {
        cfg.max_headers = cfg.max_headers.clamp(1, HEADER_SLOTS);
        HttpExtractor {
            cfg,
            stats: HttpStats::default(),
            buffered: 0,
            streams: 0,
            streaming: Default::default(),
            events: Vec::new(),
        }
    }

    pub fn stats(&self) -> HttpStats {
        let mut s = self.stats.clone();
        s.buffered_bytes = self.buffered as u64;
        s.h2_open_streams = self.streams as u64;
        s.h2_streaming_bytes = self.streaming.load(std::sync::atomic::Ordering::Relaxed) as u64;
        s
    }

    /// Takes the events produced so far.
    pub fn drain(&mut self) -> std::vec::Drain<'_, HttpEvent> {
        self.events.drain(..)
    }

    /// Keeps the global counts of buffered bytes and streams after a connection changed.
    fn account(&mut self, before: Held, after: Held) {
        self.buffered = (self.buffered + after.bytes).saturating_sub(before.bytes);
        self.streams = (self.streams + after.streams).saturating_sub(before.streams);
    }

    /// Hands an HTTP/1 connection that turned out to speak HTTP/2 over to `h2`, with the bytes
    /// its parsers held.
    fn switch(&mut self, c: &mut HttpConn, info: &ConnInfo, ts: TimestampNs) {
        let Proto::H1(h1) = &mut c.0 else {
            return;
        };
        let Some(how) = h1.switch.take() else {
            return;
        };
        let before = Held {
            bytes: h1.held(),
            streams: 0,
        };
        let handover = h1.hand_over();
        self.ctx(info)
            .ask_full_responses(&mut h1.full_responses_asked);
        self.account(before, Held::default());
        match how {
            Switch::Frames => self.stats.h2_joined_connections += 1,
            Switch::Upgraded { .. } => {
                self.stats.h2_connections += 1;
                self.stats.h2_upgrades += 1;
            }
            Switch::Preface => self.stats.h2_connections += 1,
        }
        let mut h2 = Box::new(h2::H2Conn::new(&self.cfg, how, handover.upgrade));
        let mut ctx = self.ctx(info);
        h2.feed(&mut ctx, Direction::ToServer, &handover.to_server, ts);
        if self.cfg.track_responses {
            let mut ctx = self.ctx(info);
            h2.feed(&mut ctx, Direction::ToClient, &handover.to_client, ts);
        }
        c.0 = Proto::H2(h2);
        self.account(Held::default(), c.held());
    }

    fn ctx<'a>(&'a mut self, info: &'a ConnInfo) -> Ctx<'a> {
        Ctx {
            cfg: &self.cfg,
            stats: &mut self.stats,
            events: &mut self.events,
            info,
            buffered: self.buffered,
            streaming: &self.streaming,
        }
    }
}

/// Per-connection state, kept in the reassembler's flow table.
pub struct HttpConn(Proto);

// HTTP/1 is most connections: kept inline, HTTP/2's larger state boxed.
#[allow(clippy::large_enum_variant)]
enum Proto {
    H1(h1::H1Conn),
    H2(Box<h2::H2Conn>),
}

/// What a connection holds, for the extractor's totals.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    bytes: usize,
    streams: usize,
}

impl HttpConn {
    fn held(&self) -> Held {
        match &self.0 {
            Proto::H1(c) => Held {
                bytes: c.held(),
                streams: 0,
            },
            Proto::H2(c) => Held {
                bytes: c.held(),
                streams: c.streams(),
            },
        }
    }
}

impl StreamHandler for HttpExtractor {
    type Conn = HttpConn;

    fn open(&mut self, _info: &ConnInfo) -> HttpConn {
        HttpConn(Proto::H1(h1::H1Conn::open()))
    }

    fn start(&mut self, c: &mut HttpConn, _info: &ConnInfo, dir: Direction, from_syn: bool) {
        if let Proto::H1(h1) = &mut c.0 {
            h1.start(dir, from_syn);
        }
    }

    fn data(
        &mut self,
        c: &mut HttpConn,
        info: &ConnInfo,
        dir: Direction,
        data: &[u8],
        ts: TimestampNs,
        ack: Option<u64>,
    ) {
        if dir == Direction::ToClient && !self.cfg.track_responses {
            return;
        }
        let before = c.held();
        match &mut c.0 {
            Proto::H1(h1) => {
                h1.data(&mut self.ctx(info), dir, data, ts, ack);
                if h1.switch.is_some() {
                    self.account(before, c.held());
                    self.switch(c, info, ts);
                    return;
                }
            }
            Proto::H2(h2) => h2.feed(&mut self.ctx(info), dir, data, ts),
        }
        self.account(before, c.held());
    }

    fn elided(
        &mut self,
        c: &mut HttpConn,
        info: &ConnInfo,
        dir: Direction,
        len: u64,
        ts: TimestampNs,
    ) {
        if dir == Direction::ToClient && !self.cfg.track_responses {
            return;
        }
        let before = c.held();
        match &mut c.0 {
            Proto::H1(h1) => h1.elided(&mut self.ctx(info), dir, len, ts),
            Proto::H2(h2) => {
                // Asked whole at the switch; these were described before the kernel knew.
                self.stats.responses_unframed_heads += 1;
                h2.gap(&mut self.ctx(info), dir, len)
            }
        }
        self.account(before, c.held());
    }

    fn gap(
        &mut self,
        c: &mut HttpConn,
        info: &ConnInfo,
        dir: Direction,
        lost: u64,
        ts: TimestampNs,
    ) {
        let before = c.held();
        match &mut c.0 {
            Proto::H1(h1) => h1.gap(&mut self.ctx(info), dir, lost, ts),
            Proto::H2(h2) => h2.gap(&mut self.ctx(info), dir, lost),
        }
        self.account(before, c.held());
    }

    fn end(&mut self, c: &mut HttpConn, info: &ConnInfo, dir: Direction, _ts: TimestampNs) {
        let before = c.held();
        match &mut c.0 {
            Proto::H1(h1) => h1.end(&mut self.ctx(info), dir),
            Proto::H2(h2) => h2.end(&mut self.ctx(info), dir),
        }
        self.account(before, c.held());
    }

    fn close(&mut self, c: HttpConn, info: &ConnInfo, _reason: CloseReason, _ts: TimestampNs) {
        let before = c.held();
        match c.0 {
            Proto::H1(h1) => h1.close(&mut self.ctx(info)),
            Proto::H2(h2) => h2.close(&mut self.ctx(info)),
        }
        self.account(before, Held::default());
    }
}

#[cfg(test)]
mod tests;
