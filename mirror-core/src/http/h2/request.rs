//! What the HTTP/2 parser hands on: a request taken from a stream, and for a request handed on
//! while still arriving, the rest of its body, one copy per consumer, with the bytes not taken
//! yet counted so that a slow consumer is cut rather than buffered without bound.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::exchange::ConnId;
use crate::http::{field_str, WireOrigin};
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
pub struct BodyStream(pub(super) Arc<Mutex<Vec<StreamReceiver>>>);

impl BodyStream {
    pub fn take(&self) -> Option<StreamReceiver> {
        self.0.lock().ok()?.pop()
    }
}

/// Body bytes handed on to the replay stage and not taken yet: of one stream, and of all.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    pub(super) stream: Arc<AtomicUsize>,
    pub(super) all: Arc<AtomicUsize>,
}

impl InFlight {
    pub(super) fn add(&self, n: usize) {
        self.stream.fetch_add(n, Ordering::Relaxed);
        self.all.fetch_add(n, Ordering::Relaxed);
    }
    pub(super) fn sub(&self, n: usize) {
        self.stream.fetch_sub(n, Ordering::Relaxed);
        self.all.fetch_sub(n, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct StreamReceiver {
    pub(super) rx: mpsc::UnboundedReceiver<StreamPart>,
    pub(super) in_flight: InFlight,
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
pub(super) const STREAM_AFTER: Duration = Duration::from_millis(20);
/// A request body that grows to this size before its end is handed on and streamed.
pub(super) const STREAM_AFTER_BYTES: usize = 64 << 10;

impl Request {
    fn pseudo(&self, name: &str) -> &str {
        field_str(&self.fields, name).unwrap_or("")
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
