//! Replay stage: extracted requests become real HTTP requests to the mirror, fire-and-forget.
//!
//! Nothing upstream ever waits on the mirror: `Replayer::offer` never blocks and drops (counted)
//! when the bounded queue is full. Requests run on a pooled hyper client under a concurrency cap,
//! a rate cap and a timeout; replies are read to the end (so connections stay reusable) and only
//! their status and timing are kept, as `MirrorOutcome`s for the comparison stage. While the
//! mirror refuses connections, sending backs off exponentially (connections are retried, never
//! requests), and what is dropped meanwhile is counted; a prober tries to connect every few tens
//! of milliseconds meanwhile, so that mirroring resumes as soon as the mirror is back. The queue
//! is bounded in bytes, so that a burst of small requests fits where a few large ones would not.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use regex::Regex;
use tokio::sync::{mpsc, Semaphore};

use crate::http::framing::{split_chunked, Chunks, Framing};
use crate::http::h2::{StreamPart, StreamReceiver};
use crate::http::{h1, h2, result_code, Request};
use crate::reassembly::ConnId;

/// What the mirror request's Host header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostMode {
    /// The original Host, as the client sent it.
    Keep,
    /// The mirror URL's authority (default: the mirror answers as itself).
    Mirror,
    /// The original Host with `-shadow` appended, as Envoy does.
    Shadow,
}

#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub mirror: Uri,
    pub host: HostMode,
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    pub drop_headers: Vec<HeaderName>,
    /// Only these methods (upper case); empty means all.
    pub methods: Vec<String>,
    pub path: Option<Regex>,
    /// Requests per second sent at most (token bucket); None: no cap.
    pub max_rps: Option<f64>,
    pub max_inflight: usize,
    pub timeout: Duration,
    /// Bytes of requests waiting to be sent at most (each counted with `QUEUE_ENTRY_OVERHEAD`).
    pub queue_bytes: usize,
}

/// What a queued request costs beyond its bytes (the request's own fields and header index).
pub const QUEUE_ENTRY_OVERHEAD: usize = 512;

impl ReplayConfig {
    pub fn new(mirror: Uri) -> Self {
        ReplayConfig {
            mirror,
            host: HostMode::Mirror,
            add_headers: Vec::new(),
            drop_headers: Vec::new(),
            methods: Vec::new(),
            path: None,
            max_rps: None,
            max_inflight: 256,
            timeout: Duration::from_secs(10),
            queue_bytes: 64 << 20,
        }
    }
}

/// Parses and checks a mirror URL: `http://host[:port]` (a path prefix is kept).
pub fn parse_mirror_url(s: &str) -> Result<Uri> {
    let uri = Uri::from_str(s).with_context(|| {
        format!("--mirror {s:?} is not a URL; give e.g. http://bookservicemirror:8080")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("--mirror {s:?}: scheme {other} is not supported; the mirror is spoken to over plain http://"),
        None => bail!("--mirror {s:?} has no scheme; give e.g. http://{s}"),
    }
    if uri.host().is_none() {
        bail!("--mirror {s:?} has no host");
    }
    Ok(uri)
}

/// The mirror's host (IPv6 literals without brackets) and port, as a connect needs them.
fn host_port(uri: &Uri) -> (&str, u16) {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']');
    (host, uri.port_u16().unwrap_or(80))
}

/// Resolves the mirror and tries one connection, so that a wrong name fails at start with a
/// clear error. A mirror that is down is only a warning: the agent mirrors when it comes up.
/// Returns the address connected to.
pub async fn check_mirror(uri: &Uri) -> Result<SocketAddr> {
    let (host, port) = host_port(uri);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| {
            format!("cannot resolve the mirror host {host:?}: check --mirror (and DNS)")
        })?
        .collect();
    let Some(addr) = addrs.first() else {
        bail!("the mirror host {host:?} resolves to no address: check --mirror");
    };
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::warn!(
            "mirror {uri} is not reachable now ({e}); mirroring starts when it is, with backoff"
        ),
        Err(_) => log::warn!(
            "mirror {uri} did not accept a connection within 2 s; mirroring goes on with backoff"
        ),
    }
    Ok(*addr)
}

/// Fails when the requests replayed to the mirror would be captured and mirrored again without
/// end: the mirror matches the live filter (a live port, and an address the filter takes) and
/// the route to it leaves through an interface whose outgoing packets are hooked
/// (`egress_watched`). Otherwise says which check passed.
pub fn check_no_loop(
    mirror: SocketAddr,
    ports: &[u16],
    addrs: &[IpAddr],
    route_iface: &str,
    egress_watched: &[String],
) -> Result<String> {
    let ip = mirror.ip().to_canonical();
    if !ports.contains(&mirror.port()) {
        return Ok(format!(
            "no feedback loop: the mirror's port {} is not a live port",
            mirror.port()
        ));
    }
    if !addrs.is_empty() && !addrs.contains(&ip) {
        return Ok(format!(
            "no feedback loop: the mirror's address {ip} is not a live address (--addr)"
        ));
    }
    if !egress_watched.iter().any(|i| i == route_iface) {
        return Ok(format!(
            "no feedback loop: requests to the mirror {mirror} leave through {route_iface}, \
             where no hook sees outgoing packets"
        ));
    }
    bail!(
        "the mirror {mirror} is on live port {} and is reached through {route_iface}, where the \
         agent watches outgoing packets: it would capture the requests it replays there and \
         mirror them again. Give --addr with the live service's address so that only it is \
         matched, or move the mirror to another port",
        mirror.port()
    )
}

/// How a mirrored request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MirrorResult {
    Status(u16),
    /// A gRPC answer: the HTTP status and `grpc-status`.
    Grpc(u16, u32),
    Timeout,
    Refused,
    Reset,
    Error,
}

impl MirrorResult {
    /// The code shown in reports: the status, or a pseudo-code for errors.
    pub fn code(&self) -> String {
        match self {
            MirrorResult::Status(s) => s.to_string(),
            MirrorResult::Grpc(s, g) => result_code(*s, Some(*g)),
            MirrorResult::Timeout => "timeout".into(),
            MirrorResult::Refused => "refused".into(),
            MirrorResult::Reset => "reset".into(),
            MirrorResult::Error => "error".into(),
        }
    }
}

/// One mirrored request's outcome, keyed like the live response (`conn`, `seq`).
#[derive(Clone, Debug)]
pub struct MirrorOutcome {
    pub conn: ConnId,
    pub seq: u64,
    pub method: String,
    pub target: String,
    pub result: MirrorResult,
    /// From sending the request to the response head (or the error).
    pub duration: Duration,
}

/// Counters; every request offered ends in exactly one of them (plus `sent` for those sent).
#[derive(Debug, Default, serde::Serialize)]
pub struct ReplayStats {
    pub offered: AtomicU64,
    pub filtered_method: AtomicU64,
    pub filtered_path: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_rate_limit: AtomicU64,
    pub dropped_backoff: AtomicU64,
    pub dropped_unsendable: AtomicU64,
    pub sent: AtomicU64,
    pub responses: AtomicU64,
    pub errors_timeout: AtomicU64,
    pub errors_refused: AtomicU64,
    pub errors_reset: AtomicU64,
    pub errors_other: AtomicU64,
    /// Outcomes the comparison stage could not take (its queue was full).
    pub outcomes_dropped: AtomicU64,
    /// Times the mirror was found back by the prober while sending was backing off.
    pub probe_recoveries: AtomicU64,
    pub inflight: AtomicU64,
    /// Gauge: bytes of requests waiting in the queue.
    pub queued_bytes: AtomicUsize,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The producer side, used by the pipeline thread.
#[derive(Clone)]
pub struct Replayer {
    cfg: Arc<ReplayConfig>,
    tx: mpsc::UnboundedSender<Request>,
    stats: Arc<ReplayStats>,
}

fn queue_cost(req: &Request) -> usize {
    req.size() + QUEUE_ENTRY_OVERHEAD
}

impl Replayer {
    /// Starts the sender on the given runtime. Outcomes go to `outcomes` (never waited on).
    pub fn start(
        cfg: ReplayConfig,
        rt: &tokio::runtime::Handle,
        outcomes: mpsc::Sender<MirrorOutcome>,
    ) -> (Replayer, tokio::task::JoinHandle<()>) {
        let cfg = Arc::new(cfg);
        let stats = Arc::new(ReplayStats::default());
        // Unbounded as a channel, bounded in bytes by `offer`.
        let (tx, rx) = mpsc::unbounded_channel();
        let task = rt.spawn(dispatch(Arc::clone(&cfg), rx, Arc::clone(&stats), outcomes));
        (Replayer { cfg, tx, stats }, task)
    }

    pub fn stats(&self) -> &Arc<ReplayStats> {
        &self.stats
    }

    /// How full the queue is, 0 to 1.
    pub fn queue_fill(&self) -> f64 {
        self.stats.queued_bytes.load(Ordering::Relaxed) as f64 / self.cfg.queue_bytes.max(1) as f64
    }

    /// Hands a request over without waiting. Returns whether it was queued.
    pub fn offer(&self, req: Request) -> bool {
        inc(&self.stats.offered);
        if !self.cfg.methods.is_empty() && !self.cfg.methods.iter().any(|m| m == req.method()) {
            inc(&self.stats.filtered_method);
            return false;
        }
        if let Some(re) = &self.cfg.path {
            let path = req.target().split('?').next().unwrap_or("");
            if !re.is_match(path) {
                inc(&self.stats.filtered_path);
                return false;
            }
        }
        let cost = queue_cost(&req);
        let queued = &self.stats.queued_bytes;
        let admitted = queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + cost <= self.cfg.queue_bytes).then_some(q + cost)
            })
            .is_ok();
        if !admitted {
            inc(&self.stats.dropped_queue_full);
            return false;
        }
        if self.tx.send(req).is_err() {
            queued.fetch_sub(cost, Ordering::AcqRel);
            inc(&self.stats.dropped_queue_full);
            return false;
        }
        true
    }
}

struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        // A burst of at most one second's worth.
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Connection failures in a row, and until when sending pauses.
#[derive(Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    fn blocked(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }
    /// Returns whether sending now pauses.
    fn failed(&mut self) -> bool {
        self.failures += 1;
        if self.failures >= 3 {
            let ms = (50u64 << (self.failures - 3).min(7)).min(5_000);
            self.until = Some(Instant::now() + Duration::from_millis(ms));
            return true;
        }
        false
    }
    fn succeeded(&mut self) {
        self.failures = 0;
        self.until = None;
    }
}

/// Every `PROBE_EVERY` (± half, so that agents on many nodes do not probe in step), tries to
/// connect to the mirror while sending backs off; the first connection accepted ends the
/// backoff. One prober at a time.
const PROBE_EVERY: Duration = Duration::from_millis(30);

async fn probe_until_back(
    mirror: Uri,
    backoff: Arc<Mutex<Backoff>>,
    probing: Arc<AtomicBool>,
    stats: Arc<ReplayStats>,
) {
    let (host, port) = host_port(&mirror);
    let mut jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() as u64 | 1);
    while backoff.lock().unwrap().blocked() {
        // xorshift: a cheap spread of the probe times.
        jitter ^= jitter << 13;
        jitter ^= jitter >> 7;
        jitter ^= jitter << 17;
        let half = PROBE_EVERY.as_millis() as u64 / 2;
        tokio::time::sleep(Duration::from_millis(half + jitter % (2 * half + 1))).await;
        let connect = tokio::net::TcpStream::connect((host, port));
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_EVERY, connect).await {
            backoff.lock().unwrap().succeeded();
            inc(&stats.probe_recoveries);
            break;
        }
    }
    probing.store(false, Ordering::Release);
}

type MirrorClient = Client<HttpConnector, ReplayBody>;

/// The mirror, spoken to in the protocol each request came in: pooled HTTP/1.1 connections, and
/// one HTTP/2 connection (h2c prior knowledge) whose streams carry all HTTP/2 requests.
struct Mirror {
    h1: MirrorClient,
    h2: H2Mirror,
}

impl Mirror {
    fn new(cfg: &ReplayConfig) -> Mirror {
        let connect_timeout = cfg.timeout.min(Duration::from_secs(3));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let h1 = Client::builder(TokioExecutor::new())
            // Idle connections are recycled, so DNS is resolved again at least this often.
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(cfg.max_inflight)
            .build(connector);
        let (host, port) = host_port(&cfg.mirror);
        Mirror {
            h1,
            h2: H2Mirror {
                host: host.to_string(),
                port,
                connect_timeout,
                sender: tokio::sync::Mutex::new(None),
            },
        }
    }

    async fn request(
        &self,
        req: hyper::Request<ReplayBody>,
        h2: bool,
    ) -> Result<hyper::Response<hyper::body::Incoming>, MirrorResult> {
        if h2 {
            self.h2.request(req).await
        } else {
            self.h1.request(req).await.map_err(|e| classify(&e))
        }
    }
}

/// One HTTP/2 connection to the mirror, made again when it closes. Its own connection (rather
/// than a pooled client's) so that `:authority` can be what `--host` says while the connection
/// goes to the mirror.
struct H2Mirror {
    host: String,
    port: u16,
    connect_timeout: Duration,
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<ReplayBody>>>,
}

impl H2Mirror {
    async fn request(
        &self,
        req: hyper::Request<ReplayBody>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, MirrorResult> {
        let mut sender = {
            let mut current = self.sender.lock().await;
            match current.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect().await?;
                    *current = Some(s.clone());
                    s
                }
            }
        };
        sender.ready().await.map_err(|e| classify(&e))?;
        sender.send_request(req).await.map_err(|e| classify(&e))
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http2::SendRequest<ReplayBody>, MirrorResult> {
        let connect = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| MirrorResult::Timeout)?
            .map_err(|e| classify(&e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("HTTP/2 connection to the mirror ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A mirrored request's body: the content of a Content-Length body, or a chunked body's chunks
/// and trailers, which hyper writes out chunk for chunk as they came; for a streaming HTTP/2
/// request, then what follows as it arrives.
pub struct ReplayBody {
    frames: VecDeque<Frame<Bytes>>,
    /// The exact length of a Content-Length body; None sends chunked.
    len: Option<u64>,
    rest: Option<StreamReceiver>,
}

/// The live stream was cut short: the mirror's stream is reset rather than ended.
#[derive(Debug, thiserror::Error)]
#[error("the live request was cut short")]
pub struct StreamCut;

fn header_map(fields: &[(Bytes, Bytes)]) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(
            HeaderName::from_bytes(name)?,
            HeaderValue::from_maybe_shared(value.clone())?,
        );
    }
    Ok(map)
}

impl ReplayBody {
    fn full(data: Bytes) -> ReplayBody {
        let len = Some(data.len() as u64);
        let frames = (!data.is_empty())
            .then(|| Frame::data(data))
            .into_iter()
            .collect();
        ReplayBody {
            frames,
            len,
            rest: None,
        }
    }

    fn chunked(chunks: Chunks) -> Result<ReplayBody> {
        let mut frames: VecDeque<_> = chunks.data.into_iter().map(Frame::data).collect();
        if !chunks.trailers.is_empty() {
            frames.push_back(Frame::trailers(header_map(&chunks.trailers)?));
        }
        Ok(ReplayBody {
            frames,
            len: None,
            rest: None,
        })
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = StreamCut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamCut>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let part = match rest.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(p) => p,
        };
        Poll::Ready(match part {
            Some(StreamPart::Data(b)) => Some(Ok(Frame::data(b))),
            Some(StreamPart::Trailers(t)) => {
                self.rest = None;
                header_map(&t).ok().map(|m| Ok(Frame::trailers(m)))
            }
            Some(StreamPart::End) => {
                self.rest = None;
                None
            }
            None => {
                self.rest = None;
                Some(Err(StreamCut))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.len.map(SizeHint::with_exact).unwrap_or_default()
    }
}

async fn dispatch(
    cfg: Arc<ReplayConfig>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    stats: Arc<ReplayStats>,
    outcomes: mpsc::Sender<MirrorOutcome>,
) {
    let client = Arc::new(Mirror::new(&cfg));
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight.max(1)));
    let backoff = Arc::new(Mutex::new(Backoff::default()));
    let probing = Arc::new(AtomicBool::new(false));
    let mut bucket = cfg.max_rps.map(|rate| TokenBucket {
        rate,
        tokens: rate.max(1.0),
        last: Instant::now(),
    });
    while let Some(req) = rx.recv().await {
        stats
            .queued_bytes
            .fetch_sub(queue_cost(&req), Ordering::AcqRel);
        if let Some(b) = bucket.as_mut() {
            if !b.take() {
                inc(&stats.dropped_rate_limit);
                continue;
            }
        }
        if backoff.lock().unwrap().blocked() {
            inc(&stats.dropped_backoff);
            continue;
        }
        let Ok(permit) = Arc::clone(&inflight).acquire_owned().await else {
            break;
        };
        let h2 = matches!(req, Request::H2(_));
        let outgoing = match build_request(&cfg, &req) {
            Ok(r) => r,
            Err(e) => {
                log::debug!(
                    "request {} {} cannot be replayed: {e:#}",
                    req.method(),
                    req.target()
                );
                inc(&stats.dropped_unsendable);
                continue;
            }
        };
        let (client, stats, outcomes, backoff, timeout) = (
            Arc::clone(&client),
            Arc::clone(&stats),
            outcomes.clone(),
            Arc::clone(&backoff),
            cfg.timeout,
        );
        let (mirror, probing) = (cfg.mirror.clone(), Arc::clone(&probing));
        inc(&stats.sent);
        stats.inflight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let started = Instant::now();
            let result = send(&client, outgoing, h2, timeout).await;
            let duration = started.elapsed();
            match result {
                MirrorResult::Status(_) | MirrorResult::Grpc(..) => {
                    inc(&stats.responses);
                    backoff.lock().unwrap().succeeded();
                }
                MirrorResult::Timeout => inc(&stats.errors_timeout),
                MirrorResult::Refused => {
                    inc(&stats.errors_refused);
                    let paused = backoff.lock().unwrap().failed();
                    if paused && !probing.swap(true, Ordering::AcqRel) {
                        tokio::spawn(probe_until_back(
                            mirror,
                            Arc::clone(&backoff),
                            probing,
                            Arc::clone(&stats),
                        ));
                    }
                }
                MirrorResult::Reset => inc(&stats.errors_reset),
                MirrorResult::Error => inc(&stats.errors_other),
            }
            stats.inflight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            let outcome = MirrorOutcome {
                conn: req.conn(),
                seq: req.seq(),
                method: req.method().to_string(),
                target: req.target().to_string(),
                result,
                duration,
            };
            if outcomes.try_send(outcome).is_err() {
                inc(&stats.outcomes_dropped);
            }
        });
    }
}

/// Sends and reads the reply to its end; the status (and a gRPC status, from the trailers or
/// a trailers-only head) and head time are what is kept.
async fn send(
    client: &Mirror,
    req: hyper::Request<ReplayBody>,
    h2: bool,
    timeout: Duration,
) -> MirrorResult {
    let exchange = async {
        let resp = client.request(req, h2).await?;
        let status = resp.status().as_u16();
        let mut grpc = grpc_status_of(resp.headers());
        // Drain the body so that the connection goes back to the pool.
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| classify(&e))?;
            if let Some(t) = frame.trailers_ref() {
                grpc = grpc_status_of(t).or(grpc);
            }
        }
        Ok::<_, MirrorResult>(match grpc {
            Some(g) => MirrorResult::Grpc(status, g),
            None => MirrorResult::Status(status),
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e,
        Err(_) => MirrorResult::Timeout,
    }
}

fn grpc_status_of(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
}

fn classify(err: &(dyn std::error::Error + 'static)) -> MirrorResult {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => MirrorResult::Refused,
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => MirrorResult::Reset,
                std::io::ErrorKind::TimedOut => MirrorResult::Timeout,
                _ => MirrorResult::Error,
            };
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return MirrorResult::Reset;
            }
        }
        cur = e.source();
    }
    MirrorResult::Error
}

/// Headers that describe one hop's connection, never forwarded (RFC 9110 7.6.1), besides those
/// named in Connection. Content-Length is set from the body. Transfer-Encoding stands only on
/// chunked requests, which are forwarded chunked, so it is kept.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "content-length",
];

/// The mirror request for a live request, in the protocol it came in.
pub fn build_request(cfg: &ReplayConfig, req: &Request) -> Result<hyper::Request<ReplayBody>> {
    match req {
        Request::H1(r) => build_h1(cfg, r),
        Request::H2(r) => build_h2(cfg, r),
    }
}

/// The mirror's URI for a request's path (absolute-form targets keep only their path and
/// query), under the mirror URL's path prefix, with the given authority.
fn mirror_uri(cfg: &ReplayConfig, target: &str, authority: &str) -> Result<Uri> {
    let path = match Uri::from_str(target) {
        Ok(u) if u.scheme().is_some() => u
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        _ => target.to_string(),
    };
    let prefix = cfg.mirror.path().trim_end_matches('/');
    Ok(Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(format!("{prefix}{path}"))
        .build()?)
}

/// The authority the mirror is told (Host, or `:authority`), from the original one.
fn mirror_authority(cfg: &ReplayConfig, original: Option<&[u8]>) -> Result<String> {
    let mirror = cfg
        .mirror
        .authority()
        .ok_or_else(|| anyhow!("mirror URL has no authority"))?
        .as_str();
    let original = || String::from_utf8_lossy(original.unwrap_or(mirror.as_bytes())).into_owned();
    Ok(match cfg.host {
        HostMode::Mirror => mirror.to_string(),
        HostMode::Keep => original(),
        HostMode::Shadow => {
            let h = original();
            // Envoy appends the suffix to the host name, before any port.
            match h.rsplit_once(':') {
                Some((name, port))
                    if !h.ends_with(']') && port.bytes().all(|c| c.is_ascii_digit()) =>
                {
                    format!("{name}-shadow:{port}")
                }
                _ => format!("{h}-shadow"),
            }
        }
    })
}

/// The mirror request for an HTTP/1 request: same method, target, headers (but hop-by-hop ones
/// and the documented rewrites) and body: a chunked body keeps its chunks and trailers.
fn build_h1(cfg: &ReplayConfig, req: &h1::Request) -> Result<hyper::Request<ReplayBody>> {
    let mirror = cfg
        .mirror
        .authority()
        .ok_or_else(|| anyhow!("mirror URL has no authority"))?;
    let uri = mirror_uri(cfg, req.target(), mirror.as_str())?;
    let connection_tokens: Vec<String> = req
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut b = hyper::Request::builder().method(req.method()).uri(uri);
    let mut original_host = None;
    let mut declares_trailers = false;
    for (name, value) in req.headers() {
        let lower = name.to_ascii_lowercase();
        if lower == "host" {
            original_host = Some(value);
            continue;
        }
        declares_trailers |= lower == "trailer";
        if HOP_BY_HOP.contains(&lower.as_str())
            || connection_tokens.contains(&lower)
            || cfg.drop_headers.iter().any(|d| d.as_str() == lower)
        {
            continue;
        }
        b = b.header(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_bytes(value)?,
        );
    }
    let host = mirror_authority(cfg, original_host)?;
    b = b.header(hyper::header::HOST, HeaderValue::from_str(&host)?);
    for (k, v) in &cfg.add_headers {
        b = b.header(k, v);
    }
    let body = match req.framing {
        Framing::Chunked => {
            let chunks = split_chunked(&req.body).ok_or_else(|| anyhow!("bad chunked body"))?;
            // hyper sends only the trailer fields that a Trailer header announces.
            if !declares_trailers && !chunks.trailers.is_empty() {
                let names: Vec<_> = chunks
                    .trailers
                    .iter()
                    .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                    .collect();
                b = b.header(hyper::header::TRAILER, names.join(", "));
            }
            ReplayBody::chunked(chunks)?
        }
        _ => ReplayBody::full(req.body.clone()),
    };
    Ok(b.body(body)?)
}

/// Fields HTTP/2 forbids (RFC 9113 8.2.2); `te` may only say `trailers`, which gRPC needs.
const H2_FORBIDDEN: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The mirror request for an HTTP/2 request: same method, `:path`, metadata (headers), body and
/// trailers; `:authority` as `--host` says.
fn build_h2(cfg: &ReplayConfig, req: &h2::Request) -> Result<hyper::Request<ReplayBody>> {
    let original = match req.authority() {
        "" => req.headers().find(|(n, _)| *n == b"host").map(|(_, v)| v),
        a => Some(a.as_bytes()),
    };
    let authority = mirror_authority(cfg, original)?;
    let uri = mirror_uri(cfg, req.path(), &authority)?;
    let mut b = hyper::Request::builder()
        .method(req.method())
        .uri(uri)
        .version(hyper::Version::HTTP_2);
    for (name, value) in req.headers() {
        let name = HeaderName::from_bytes(name)?;
        if H2_FORBIDDEN.contains(&name.as_str())
            || (name == hyper::header::TE && value != b"trailers")
            || cfg.drop_headers.contains(&name)
        {
            continue;
        }
        b = b.header(name, HeaderValue::from_bytes(value)?);
    }
    for (k, v) in &cfg.add_headers {
        b = b.header(k, v);
    }
    let mut frames = VecDeque::new();
    if !req.body.is_empty() {
        frames.push_back(Frame::data(req.body.clone()));
    }
    if !req.trailers.is_empty() {
        frames.push_back(Frame::trailers(header_map(&req.trailers)?));
    }
    // No exact size: hyper would add a content-length the client did not send.
    Ok(b.body(ReplayBody {
        frames,
        len: None,
        rest: req.rest.as_ref().and_then(|r| r.take()),
    })?)
}

/// Parses `K:V` for `--add-header`.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME:VALUE"))?;
    Ok((
        HeaderName::from_str(k.trim()).map_err(|e| format!("header name {k:?}: {e}"))?,
        HeaderValue::from_str(v.trim()).map_err(|e| format!("header value {v:?}: {e}"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Conversation, Extract};

    /// The requests that the agent extracts from `wire`, sent by a client to port 8080.
    fn extract(wire: &[u8]) -> Vec<Request> {
        let mut c = Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", 7, 9);
        let mut x = Extract::new(&[8080]);
        x.feed(&c.handshake());
        x.feed(&c.client_data(wire, 1400));
        x.requests.into_iter().map(Request::H1).collect()
    }

    fn build(cfg: &ReplayConfig, wire: &[u8]) -> hyper::Request<ReplayBody> {
        let reqs = extract(wire);
        assert_eq!(reqs.len(), 1);
        build_request(cfg, &reqs[0]).unwrap()
    }

    /// The body's content, without framing.
    fn content(body: &ReplayBody) -> Vec<u8> {
        body.frames
            .iter()
            .filter_map(Frame::data_ref)
            .flat_map(|d| d.iter().copied())
            .collect()
    }

    fn trailers(body: &ReplayBody) -> Option<&HeaderMap> {
        body.frames.back().and_then(Frame::trailers_ref)
    }

    fn config(mirror: &str) -> ReplayConfig {
        ReplayConfig::new(parse_mirror_url(mirror).unwrap())
    }

    fn header<'a>(r: &'a hyper::Request<ReplayBody>, name: &str) -> Vec<&'a str> {
        r.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn chunked_bodies_keep_their_chunks_and_trailers() {
        let wire = b"POST /up HTTP/1.1\r\nHost: live\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                     5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Sig: 9\r\n\r\n";
        let r = build(&config("http://mirror:9090"), wire);
        assert_eq!(header(&r, "transfer-encoding"), ["gzip, chunked"]);
        assert_eq!(
            header(&r, "trailer"),
            ["X-Checksum, X-Sig"],
            "announced for hyper"
        );
        assert!(r.headers().get("content-length").is_none());
        let body = r.body();
        assert_eq!(body.size_hint().exact(), None, "sent chunked");
        let chunks: Vec<_> = body.frames.iter().filter_map(Frame::data_ref).collect();
        assert_eq!(chunks, [&Bytes::from("hello"), &Bytes::from(" world")]);
        let trailers = trailers(body).unwrap();
        assert_eq!(trailers["x-checksum"], "abc");
        assert_eq!(trailers["x-sig"], "9");

        let declared =
            b"PUT /t HTTP/1.1\r\nHost: h\r\nTrailer: X-A\r\nTransfer-Encoding: chunked\r\n\r\n\
                         3\r\nabc\r\n0\r\nX-A: 1\r\n\r\n";
        let r = build(&config("http://mirror:9090"), declared);
        assert_eq!(
            header(&r, "trailer"),
            ["X-A"],
            "the client's own announcement, once"
        );
        assert_eq!(content(r.body()), b"abc");
    }

    #[test]
    fn length_bodies_are_sent_with_their_length() {
        let r = build(
            &config("http://mirror:9090"),
            b"POST /r HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert_eq!(r.body().size_hint().exact(), Some(5));
        assert_eq!(content(r.body()), b"hello");
        assert!(trailers(r.body()).is_none());
        let r = build(
            &config("http://mirror:9090"),
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        );
        assert!(r.body().is_end_stream());
    }

    #[test]
    fn hop_by_hop_and_dropped_headers_stay_behind() {
        let mut cfg = config("http://mirror:9090/shadow/");
        cfg.drop_headers = vec![HeaderName::from_static("authorization")];
        cfg.add_headers = vec![(
            HeaderName::from_static("x-mirrored"),
            HeaderValue::from_static("1"),
        )];
        let r = build(
            &cfg,
            b"GET http://live.example/api/x?y=1 HTTP/1.1\r\nHost: live.example\r\n\
              Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
              Upgrade: h2c\r\nAuthorization: Bearer s\r\nX-Keep: a\r\nX-Keep: b\r\n\r\n",
        );
        assert_eq!(r.uri(), "http://mirror:9090/shadow/api/x?y=1");
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "te",
            "upgrade",
            "authorization",
        ] {
            assert!(r.headers().get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(header(&r, "x-keep"), ["a", "b"]);
        assert_eq!(header(&r, "x-mirrored"), ["1"]);
        assert_eq!(header(&r, "host"), ["mirror:9090"]);
    }

    #[test]
    fn a_loop_is_refused_only_where_replayed_requests_are_hooked() {
        let mirror: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let watched = ["veth1".to_string()];
        let ok = |m, addrs: &[IpAddr], via| check_no_loop(m, &[8080], addrs, via, &watched);
        assert!(ok(mirror, &[], "veth1")
            .unwrap_err()
            .to_string()
            .contains("--addr"));
        let other_port: SocketAddr = "10.0.0.9:9090".parse().unwrap();
        assert!(ok(other_port, &[], "veth1")
            .unwrap()
            .contains("not a live port"));
        let live: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(ok(mirror, &[live], "veth1")
            .unwrap()
            .contains("not a live address"));
        assert!(ok(mirror, &[], "eth0")
            .unwrap()
            .contains("leave through eth0"));
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        let as_v6 = SocketAddr::new(mapped, 8080);
        assert!(ok(as_v6, &["10.0.0.9".parse().unwrap()], "veth1").is_err());
    }

    #[test]
    fn host_modes() {
        let wire = b"GET / HTTP/1.1\r\nHost: books:8080\r\n\r\n";
        let mut cfg = config("http://[::1]:9090");
        let cases = [
            (HostMode::Mirror, "[::1]:9090"),
            (HostMode::Keep, "books:8080"),
            (HostMode::Shadow, "books-shadow:8080"),
        ];
        for (mode, want) in cases {
            cfg.host = mode;
            assert_eq!(header(&build(&cfg, wire), "host"), [want], "{mode:?}");
        }
        cfg.host = HostMode::Shadow;
        let r = build(&cfg, b"GET / HTTP/1.1\r\nHost: books\r\n\r\n");
        assert_eq!(header(&r, "host"), ["books-shadow"]);
    }
}
