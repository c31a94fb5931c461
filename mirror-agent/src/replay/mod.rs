//! Replay stage: extracted requests become real HTTP requests to the mirror, fire-and-forget.
//!
//! Nothing upstream ever waits on the mirror: `Replayer::offer` never blocks and drops (counted)
//! when the bounded queue is full. Workers take requests from the queue; each owns one HTTP/1
//! connection to the mirror and drives it itself (hyper's connection-level client), so a request
//! costs no task spawn, pool checkout or hand-off between tasks. The workers' number is the
//! in-flight cap: one more starts when requests have waited a millisecond with none idle (see
//! `Shared::wake_one`), and one idle for 30 s exits. A rate
//! cap and a timeout apply; replies are read to the end (so connections stay reusable) and only
//! their status and head time are kept, as `MirrorOutcome`s handed straight to the comparison. While the
//! mirror refuses connections, sending backs off exponentially (connections are retried, never
//! requests), and what is dropped meanwhile is counted; a prober tries to connect every few tens
//! of milliseconds meanwhile, so that mirroring resumes as soon as the mirror is back. The queue
//! is bounded in bytes, so that a burst of small requests fits where a few large ones would not.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regex::Regex;

use crate::exchange::content::{Content, ContentCapture};
use crate::exchange::{MirrorOutcome, MirrorResult};
use crate::http::h2::{StreamPart, StreamReceiver};
use crate::http::{h2, Request};

pub(crate) mod h1;

/// What the mirror request's Host header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
    /// HTTP/1 requests written at once on one connection at most (1: no pipelining).
    pub pipeline_depth: usize,
    /// Read answers whole and keep their content for comparison (`--compare-bodies`; HTTP/1).
    pub content: Option<ContentCapture>,
    pub timeout: Duration,
    /// Bytes of requests waiting to be sent at most (each counted with `QUEUE_ENTRY_OVERHEAD`).
    pub queue_bytes: usize,
}

/// What a queued request costs beyond its bytes (the request's own fields and header index).
pub const QUEUE_ENTRY_OVERHEAD: usize = 512;

/// Most HTTP/1 requests written at once on a mirror connection unless `--pipeline-depth` says.
pub const DEFAULT_PIPELINE_DEPTH: u16 = 64;

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
            pipeline_depth: DEFAULT_PIPELINE_DEPTH.into(),
            content: None,
            timeout: Duration::from_secs(10),
            queue_bytes: 64 << 20,
        }
    }
}

/// Why a mirror cannot be used. The binary adds which option to change.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{url:?} is not a URL")]
    NotAUrl {
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("{url:?}: scheme {scheme} is not supported; the mirror is spoken to over plain http")]
    Scheme { url: String, scheme: String },
    #[error("{url:?} has no scheme")]
    NoScheme { url: String },
    #[error("{url:?} has no host")]
    NoHost { url: String },
    #[error("cannot resolve the mirror host {host:?}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the mirror host {host:?} resolves to no address")]
    NoAddress { host: String },
    #[error(
        "the mirror {mirror} is on live port {port} and is reached through {iface}, where the \
         agent watches outgoing packets: it would capture the requests it replays there and \
         mirror them again"
    )]
    FeedbackLoop {
        mirror: SocketAddr,
        port: u16,
        iface: String,
    },
}

/// Parses and checks a mirror URL: `http://host[:port]` (a path prefix is kept).
pub fn parse_mirror_url(s: &str) -> Result<Uri, MirrorError> {
    let url = || s.to_string();
    let uri = Uri::from_str(s).map_err(|source| MirrorError::NotAUrl { url: url(), source })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(MirrorError::Scheme {
                url: url(),
                scheme: other.to_string(),
            })
        }
        None => return Err(MirrorError::NoScheme { url: url() }),
    }
    if uri.host().is_none() {
        return Err(MirrorError::NoHost { url: url() });
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
pub async fn check_mirror(uri: &Uri) -> Result<SocketAddr, MirrorError> {
    let (host, port) = host_port(uri);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| MirrorError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let Some(addr) = addrs.first() else {
        return Err(MirrorError::NoAddress {
            host: host.to_string(),
        });
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
) -> Result<String, MirrorError> {
    let ip = mirror.ip().to_canonical();
    if !ports.contains(&mirror.port()) {
        return Ok(format!(
            "no feedback loop: the mirror's port {} is not a live port",
            mirror.port()
        ));
    }
    if !addrs.is_empty() && !addrs.contains(&ip) {
        return Ok(format!(
            "no feedback loop: the mirror's address {ip} is not a live address"
        ));
    }
    if !egress_watched.iter().any(|i| i == route_iface) {
        return Ok(format!(
            "no feedback loop: requests to the mirror {mirror} leave through {route_iface}, \
             where no hook sees outgoing packets"
        ));
    }
    Err(MirrorError::FeedbackLoop {
        mirror,
        port: mirror.port(),
        iface: route_iface.to_string(),
    })
}

/// Counters; every request offered ends in exactly one of them (plus `sent` for those sent).
#[derive(Debug, Default)]
pub struct ReplayStats {
    pub offered: AtomicU64,
    pub filtered_method: AtomicU64,
    pub filtered_path: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_rate_limit: AtomicU64,
    pub dropped_backoff: AtomicU64,
    pub dropped_unsendable: AtomicU64,
    /// Requests still queued when the stop's grace ended.
    pub dropped_at_stop: AtomicU64,
    pub sent: AtomicU64,
    pub responses: AtomicU64,
    pub errors_timeout: AtomicU64,
    pub errors_refused: AtomicU64,
    pub errors_reset: AtomicU64,
    pub errors_other: AtomicU64,
    /// Requests sent whose answer had not come when the stop's grace ended.
    pub errors_stopped: AtomicU64,
    /// HTTP/1 batches written to the mirror (`sent` over this is the mean pipelining depth).
    pub batches: AtomicU64,
    /// Requests sent again on a new connection: the mirror closed before answering them.
    pub resent: AtomicU64,
    /// Times the mirror was found back by the prober while sending was backing off.
    pub probe_recoveries: AtomicU64,
    pub inflight: AtomicU64,
    /// Gauge: workers alive, each with at most one connection to the mirror.
    pub workers: AtomicUsize,
    /// Gauge: bytes of requests waiting in the queue.
    pub queued_bytes: AtomicUsize,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Where mirror outcomes go: called on the replay worker that saw the answer, so that no
/// channel or task sits between the mirror and the comparison.
pub type OutcomeSink = Box<dyn Fn(MirrorOutcome) + Send + Sync>;

/// The producer side, used by the pipeline (on the capture thread); `drain` closes it.
#[derive(Clone)]
pub struct Replayer {
    shared: Arc<Shared>,
}

/// What the workers share. Each worker owns one HTTP/1 connection to the mirror and sends one
/// batch at a time on it, so the worker count bounds the connections; HTTP/2 requests share one
/// multiplexed connection.
struct Shared {
    cfg: ReplayConfig,
    stats: Arc<ReplayStats>,
    queue: Mutex<Queue>,
    /// Rung when requests are queued (or the queue closes): wakes one waiting worker.
    bell: tokio::sync::Notify,
    h2: H2Mirror,
    backoff: Mutex<Backoff>,
    probing: AtomicBool,
    bucket: Option<Mutex<TokenBucket>>,
    /// Workers waiting for the bell (those alive are `ReplayStats::workers`).
    idle: AtomicUsize,
    /// A look at whether requests wait too long for a worker is due (`Shared::grow_later`).
    grow_due: AtomicBool,
    on_outcome: OutcomeSink,
    rt: tokio::runtime::Handle,
}

#[derive(Default)]
struct Queue {
    /// Each with when it was queued.
    requests: VecDeque<(Instant, Request)>,
    closed: bool,
}

fn queue_cost(req: &Request) -> usize {
    req.size() + QUEUE_ENTRY_OVERHEAD
}

/// A worker with no request for this long exits (and closes its connection), so the pool
/// shrinks after a burst and DNS is resolved again at least this often.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(30);

/// A request that waited this long with no worker idle starts one more worker. Busy workers on
/// a fast mirror come back for the queue sooner; on a slow one, the pool grows by one worker a
/// millisecond at most.
const GROW_AFTER: Duration = Duration::from_millis(1);

impl Replayer {
    /// Starts the replay stage on `rt`. Outcomes go to `on_outcome`, called from the workers.
    pub fn start(
        cfg: ReplayConfig,
        rt: &tokio::runtime::Handle,
        on_outcome: OutcomeSink,
    ) -> Replayer {
        let bucket = cfg.max_rps.map(|rate| {
            Mutex::new(TokenBucket {
                rate,
                tokens: rate.max(1.0),
                last: Instant::now(),
            })
        });
        let shared = Arc::new(Shared {
            h2: H2Mirror::new(),
            cfg,
            stats: Arc::new(ReplayStats::default()),
            queue: Mutex::default(),
            bell: tokio::sync::Notify::new(),
            backoff: Mutex::new(Backoff::default()),
            probing: AtomicBool::new(false),
            bucket,
            idle: AtomicUsize::new(0),
            grow_due: AtomicBool::new(false),
            on_outcome,
            rt: rt.clone(),
        });
        Replayer { shared }
    }

    pub fn stats(&self) -> &Arc<ReplayStats> {
        &self.shared.stats
    }

    /// How full the queue is, 0 to 1.
    pub fn queue_fill(&self) -> f64 {
        self.shared.stats.queued_bytes.load(Ordering::Relaxed) as f64
            / self.shared.cfg.queue_bytes.max(1) as f64
    }

    /// Hands requests over without waiting, all at once, so that a burst wakes one worker rather
    /// than one per request. Returns how many were queued; the others are counted by reason.
    pub fn offer(&self, requests: impl IntoIterator<Item = Request>) -> usize {
        let admitted: Vec<Request> = requests.into_iter().filter(|r| self.admit(r)).collect();
        let n = admitted.len();
        if n == 0 {
            return 0;
        }
        {
            let mut queue = self.shared.queue.lock().unwrap();
            if queue.closed {
                drop(queue);
                let cost: usize = admitted.iter().map(queue_cost).sum();
                self.shared
                    .stats
                    .queued_bytes
                    .fetch_sub(cost, Ordering::AcqRel);
                self.shared
                    .stats
                    .dropped_queue_full
                    .fetch_add(n as u64, Ordering::Relaxed);
                return 0;
            }
            let now = Instant::now();
            queue
                .requests
                .extend(admitted.into_iter().map(|r| (now, r)));
        }
        self.shared.wake_one();
        n
    }

    /// Whether a request passes the filters and fits the queue's bytes (then counted in them).
    fn admit(&self, req: &Request) -> bool {
        let (cfg, stats) = (&self.shared.cfg, &self.shared.stats);
        inc(&stats.offered);
        if !cfg.methods.is_empty() && !cfg.methods.iter().any(|m| m == req.method()) {
            inc(&stats.filtered_method);
            return false;
        }
        if let Some(re) = &cfg.path {
            let path = req.target().split('?').next().unwrap_or("");
            if !re.is_match(path) {
                inc(&stats.filtered_path);
                return false;
            }
        }
        let cost = queue_cost(req);
        let admitted = stats
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + cost <= cfg.queue_bytes).then_some(q + cost)
            })
            .is_ok();
        if !admitted {
            inc(&stats.dropped_queue_full);
        }
        admitted
    }

    /// Closes the queue and waits, at most `grace`, for the workers to send what was queued and
    /// read the answers. What the grace leaves is counted: requests still queued as
    /// `dropped_at_stop`, requests sent and not answered yet as `errors_stopped`. Returns the
    /// final counters.
    pub async fn drain(self, grace: Duration) -> Arc<ReplayStats> {
        let shared = self.shared;
        shared.queue.lock().unwrap().closed = true;
        shared.bell.notify_waiters();
        let deadline = tokio::time::Instant::now() + grace;
        while shared.stats.workers.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stats = &shared.stats;
        let queued = std::mem::take(&mut shared.queue.lock().unwrap().requests);
        stats
            .dropped_at_stop
            .fetch_add(queued.len() as u64, Ordering::Relaxed);
        let cost: usize = queued.iter().map(|(_, r)| queue_cost(r)).sum();
        stats.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
        // Each request in flight is claimed once: here, or by its outcome (`finish_with`).
        let unanswered = stats.inflight.swap(0, Ordering::AcqRel);
        stats
            .errors_stopped
            .fetch_add(unanswered, Ordering::Relaxed);
        Arc::clone(stats)
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

async fn probe_until_back(shared: Arc<Shared>) {
    let (host, port) = host_port(&shared.cfg.mirror);
    let mut jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() as u64 | 1);
    while shared.backoff.lock().unwrap().blocked() {
        // xorshift: a cheap spread of the probe times.
        jitter ^= jitter << 13;
        jitter ^= jitter >> 7;
        jitter ^= jitter << 17;
        let half = PROBE_EVERY.as_millis() as u64 / 2;
        tokio::time::sleep(Duration::from_millis(half + jitter % (2 * half + 1))).await;
        let connect = tokio::net::TcpStream::connect((host, port));
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_EVERY, connect).await {
            shared.backoff.lock().unwrap().succeeded();
            inc(&shared.stats.probe_recoveries);
            break;
        }
    }
    shared.probing.store(false, Ordering::Release);
}

/// How long a connection to the mirror may take to open.
fn connect_timeout(cfg: &ReplayConfig) -> Duration {
    cfg.timeout.min(Duration::from_secs(3))
}

/// Opens a TCP connection to the mirror, within the connect timeout.
async fn connect_mirror(cfg: &ReplayConfig) -> Result<tokio::net::TcpStream, MirrorResult> {
    let (host, port) = host_port(&cfg.mirror);
    let connect = tokio::net::TcpStream::connect((host, port));
    let stream = tokio::time::timeout(connect_timeout(cfg), connect)
        .await
        .map_err(|_| MirrorResult::Timeout)?
        .map_err(|e| classify(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One HTTP/2 request to the mirror on `conn` (opened or reopened as needed), answered or
/// failed within the timeout: for `mirror-agent replay`, which keeps a connection per lane.
pub(crate) async fn send_h2_once(
    cfg: &ReplayConfig,
    conn: &H2Mirror,
    req: &h2::Request,
) -> (MirrorResult, Option<Duration>) {
    match build_h2(cfg, req) {
        Ok(outgoing) => {
            let (result, took) = conn.exchange(cfg, outgoing).await;
            (result, Some(took))
        }
        Err(_) => (MirrorResult::Error, None),
    }
}

/// One HTTP/2 connection to the mirror, made again when it closes. Its own connection (rather
/// than a pooled client's) so that `:authority` can be what `--host` says while the connection
/// goes to the mirror.
pub(crate) struct H2Mirror {
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<ReplayBody>>>,
}

impl H2Mirror {
    pub(crate) fn new() -> H2Mirror {
        H2Mirror {
            sender: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `outgoing` and reads the answer to its end within the timeout: the result, and
    /// the time to the answer's head (or to the failure).
    async fn exchange(
        &self,
        cfg: &ReplayConfig,
        outgoing: hyper::Request<ReplayBody>,
    ) -> (MirrorResult, Duration) {
        let started = Instant::now();
        let exchange = async {
            let resp = self.request(cfg, outgoing).await?;
            read_answer(resp, started).await
        };
        match tokio::time::timeout(cfg.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => (e, started.elapsed()),
            Err(_) => (MirrorResult::Timeout, started.elapsed()),
        }
    }

    async fn request(
        &self,
        cfg: &ReplayConfig,
        req: hyper::Request<ReplayBody>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, MirrorResult> {
        let mut sender = {
            let mut current = self.sender.lock().await;
            match current.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = Self::connect(cfg).await?;
                    *current = Some(s.clone());
                    s
                }
            }
        };
        sender.ready().await.map_err(|e| classify(&e))?;
        sender.send_request(req).await.map_err(|e| classify(&e))
    }

    async fn connect(
        cfg: &ReplayConfig,
    ) -> Result<hyper::client::conn::http2::SendRequest<ReplayBody>, MirrorResult> {
        let stream = connect_mirror(cfg).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
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

/// A mirrored HTTP/2 request's body: the data and trailers received so far, then, for a
/// streaming request, what follows as it arrives. (HTTP/1 requests go out as bytes: `h1`.)
pub struct ReplayBody {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<StreamReceiver>,
}

/// Why a captured request cannot be replayed as it is (counted `dropped_unsendable`).
#[derive(Debug, thiserror::Error)]
pub enum Unsendable {
    #[error("the mirror URL has no authority")]
    NoAuthority,
    #[error("a header name or value HTTP/2 does not allow: {0}")]
    Header(String),
    #[error("not a valid request: {0}")]
    Request(#[from] hyper::http::Error),
}

impl From<hyper::header::InvalidHeaderName> for Unsendable {
    fn from(e: hyper::header::InvalidHeaderName) -> Self {
        Unsendable::Header(e.to_string())
    }
}

impl From<hyper::header::InvalidHeaderValue> for Unsendable {
    fn from(e: hyper::header::InvalidHeaderValue) -> Self {
        Unsendable::Header(e.to_string())
    }
}

/// The live stream was cut short: the mirror's stream is reset rather than ended.
#[derive(Debug, thiserror::Error)]
#[error("the live request was cut short")]
pub struct StreamCut;

fn header_map(fields: &[(Bytes, Bytes)]) -> Result<HeaderMap, Unsendable> {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(
            HeaderName::from_bytes(name)?,
            HeaderValue::from_maybe_shared(value.clone())?,
        );
    }
    Ok(map)
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
}

/// What a waiting worker does next.
enum Turn {
    Rung,
    ConnectionEnded,
    IdleTooLong,
}

/// What goes to the mirror for a request, in the protocol it came in. (Moved once: boxing the
/// larger variant would cost an allocation per request.)
#[allow(clippy::large_enum_variant)]
enum Outgoing {
    H1(h1::Outgoing),
    H2(hyper::Request<ReplayBody>),
}

/// What a worker found in the queue.
enum Taken {
    Batch(Vec<Request>),
    Nothing,
    Closed,
}

impl Shared {
    /// Gets a worker to look at the queue: a waiting one, else the first one; else busy ones
    /// will come back for it, and one more starts if requests wait `GROW_AFTER` for them. (A
    /// new connection's pipeline is one deep: when each request left behind started a worker,
    /// each new one took one request and started the next, and a steady load that a dozen
    /// connections carry opened hundreds.)
    fn wake_one(self: &Arc<Self>) {
        if self.idle.load(Ordering::SeqCst) > 0 {
            self.bell.notify_one();
            return;
        }
        let workers = self.stats.workers.load(Ordering::SeqCst);
        if workers == 0 {
            self.start_worker();
            return;
        }
        // A worker about to wait finds the bell rung (it listens before it looks).
        self.bell.notify_one();
        if workers < self.max_workers() {
            self.grow_later();
        }
    }

    /// As many workers as requests may be in flight, each sending at least one.
    fn max_workers(&self) -> usize {
        self.cfg.max_inflight.max(1)
    }

    /// Starts a worker unless there are as many as requests may be in flight (then the first
    /// to finish its batch takes what is queued). Returns whether it did.
    fn start_worker(self: &Arc<Self>) -> bool {
        let max = self.max_workers();
        let added = self
            .stats
            .workers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < max).then_some(w + 1)
            })
            .is_ok();
        if added {
            self.rt.spawn(Arc::clone(self).worker());
        }
        added
    }

    /// Watches the queue's oldest request until the queue is empty or the pool full: when one
    /// has waited `GROW_AFTER`, an idle worker is rung, else one more is started.
    fn grow_later(self: &Arc<Self>) {
        if self.grow_due.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = Arc::clone(self);
        self.rt.spawn(async move {
            let mut due = Instant::now() + GROW_AFTER;
            let emptied = loop {
                tokio::time::sleep_until(due.into()).await;
                let Some(queued) = shared.queue.lock().unwrap().requests.front().map(|r| r.0)
                else {
                    break true;
                };
                if queued.elapsed() >= GROW_AFTER {
                    if shared.idle.load(Ordering::SeqCst) > 0 {
                        shared.bell.notify_one();
                    } else if !shared.start_worker() {
                        break false;
                    }
                    due = Instant::now() + GROW_AFTER;
                } else {
                    due = queued + GROW_AFTER;
                }
            };
            shared.grow_due.store(false, Ordering::SeqCst);
            // Requests queued after the last look found the watch still on.
            if emptied && !shared.queue.lock().unwrap().requests.is_empty() {
                shared.grow_later();
            }
        });
    }

    /// Takes the next request and those behind it that may be pipelined after it: HTTP/1
    /// requests with idempotent methods, up to `depth` and the in-flight cap. Calls on another
    /// worker (`wake_one`) when requests are left.
    fn take(self: &Arc<Self>, depth: usize) -> Taken {
        let mut queue = self.queue.lock().unwrap();
        let Some((_, first)) = queue.requests.pop_front() else {
            return if queue.closed {
                Taken::Closed
            } else {
                Taken::Nothing
            };
        };
        let inflight = self.stats.inflight.load(Ordering::Relaxed) as usize;
        let depth = depth
            .min(self.cfg.max_inflight.saturating_sub(inflight))
            .max(1);
        let pipelinable = |r: &Request| matches!(r, Request::H1(h) if h1::idempotent(h.method()));
        let mut batch = Vec::with_capacity(depth);
        let more = pipelinable(&first);
        batch.push(first);
        while more
            && batch.len() < depth
            && queue.requests.front().is_some_and(|(_, r)| pipelinable(r))
        {
            batch.extend(queue.requests.pop_front().map(|(_, r)| r));
        }
        let left = !queue.requests.is_empty();
        drop(queue);
        let cost: usize = batch.iter().map(queue_cost).sum();
        self.stats.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
        if left {
            self.wake_one();
        }
        Taken::Batch(batch)
    }

    /// Sends what the queue holds, a batch at a time: HTTP/1 batches on the worker's own
    /// connection, HTTP/2 requests on the shared one. Runs until the queue is closed and empty,
    /// or nothing came for `WORKER_IDLE_EXIT`.
    async fn worker(self: Arc<Self>) {
        let mut conn: Option<h1::Conn> = None;
        loop {
            let bell = self.bell.notified();
            tokio::pin!(bell);
            // Listening before looking, so that a ring between the two is not missed.
            bell.as_mut().enable();
            match self.take(conn.as_ref().map_or(1, h1::Conn::depth)) {
                Taken::Batch(batch) => {
                    self.send(&mut conn, batch).await;
                    continue;
                }
                Taken::Closed => break,
                Taken::Nothing => {}
            }
            self.idle.fetch_add(1, Ordering::SeqCst);
            let turn = tokio::select! {
                () = &mut bell => Turn::Rung,
                () = unusable(&mut conn) => Turn::ConnectionEnded,
                () = tokio::time::sleep(WORKER_IDLE_EXIT) => Turn::IdleTooLong,
            };
            self.idle.fetch_sub(1, Ordering::SeqCst);
            match turn {
                Turn::Rung => {}
                Turn::ConnectionEnded => conn = None,
                Turn::IdleTooLong => {
                    self.stats.workers.fetch_sub(1, Ordering::SeqCst);
                    // Requests queued while this worker was leaving found it idle and started
                    // no worker: stay for them (see `Replayer::offer`).
                    if self.queue.lock().unwrap().requests.is_empty() {
                        return;
                    }
                    self.stats.workers.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        self.stats.workers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sends a batch from `take`: pipelined HTTP/1 requests, or one HTTP/2 request.
    async fn send(self: &Arc<Self>, conn: &mut Option<h1::Conn>, batch: Vec<Request>) {
        let mut h1_batch = Vec::with_capacity(batch.len());
        for req in batch {
            match self.ready(req) {
                Some((req, Outgoing::H1(out))) => h1_batch.push((req, out)),
                Some((req, Outgoing::H2(out))) => self.send_h2(req, out).await,
                None => {}
            }
        }
        if !h1_batch.is_empty() {
            self.send_h1(conn, h1_batch).await;
        }
    }

    /// Applies the rate cap and the backoff, and builds what goes to the mirror; None when the
    /// request is dropped (counted).
    fn ready(&self, req: Request) -> Option<(Request, Outgoing)> {
        let stats = &self.stats;
        if let Some(bucket) = &self.bucket {
            if !bucket.lock().unwrap().take() {
                inc(&stats.dropped_rate_limit);
                return None;
            }
        }
        if self.backoff.lock().unwrap().blocked() {
            inc(&stats.dropped_backoff);
            return None;
        }
        let built = match &req {
            Request::H1(r) => h1::serialize(&self.cfg, r).map(Outgoing::H1),
            Request::H2(r) => build_h2(&self.cfg, r).map(Outgoing::H2),
        };
        match built {
            Ok(out) => {
                inc(&stats.sent);
                stats.inflight.fetch_add(1, Ordering::Relaxed);
                Some((req, out))
            }
            Err(e) => {
                log::debug!(
                    "request {} {} cannot be replayed: {e:#}",
                    req.method(),
                    req.target()
                );
                inc(&stats.dropped_unsendable);
                None
            }
        }
    }

    /// Sends a batch on the worker's connection (opened first if there is none). Requests the
    /// mirror left unanswered by closing cleanly go out again on a new connection, once, if
    /// their method is idempotent.
    async fn send_h1(
        self: &Arc<Self>,
        conn: &mut Option<h1::Conn>,
        batch: Vec<(Request, h1::Outgoing)>,
    ) {
        let mut batch: Vec<_> = batch.into_iter().map(|(r, o)| (r, o, false)).collect();
        while !batch.is_empty() {
            let started = Instant::now();
            let c = match conn {
                Some(c) => c,
                None => match h1::Conn::open(&self.cfg).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        self.connect_failed(e);
                        for (req, _, _) in batch {
                            self.finish(req, e, Some(started.elapsed()));
                        }
                        return;
                    }
                },
            };
            let outs: Vec<&h1::Outgoing> = batch.iter().map(|(_, o, _)| o).collect();
            inc(&self.stats.batches);
            let (fates, reusable) = c
                .exchange(
                    &outs,
                    self.cfg.timeout,
                    self.cfg.pipeline_depth,
                    self.cfg.content.as_ref(),
                )
                .await;
            if !reusable {
                *conn = None;
            }
            let mut again = Vec::new();
            for ((req, out, retried), fate) in batch.into_iter().zip(fates) {
                match fate {
                    Some(a) => self.finish_with(req, a.result, a.took, a.content),
                    None if out.idempotent && !retried => {
                        inc(&self.stats.resent);
                        again.push((req, out, true));
                    }
                    None => self.finish(req, MirrorResult::Reset, Some(started.elapsed())),
                }
            }
            batch = again;
        }
    }

    async fn send_h2(self: &Arc<Self>, req: Request, outgoing: hyper::Request<ReplayBody>) {
        let (result, took) = self.h2.exchange(&self.cfg, outgoing).await;
        if result == MirrorResult::Refused {
            self.connect_failed(result);
        }
        self.finish(req, result, Some(took));
    }

    /// A connection to the mirror could not be opened: refusals pause sending (backoff), and
    /// a prober looks for the mirror's return.
    fn connect_failed(self: &Arc<Self>, result: MirrorResult) {
        if result != MirrorResult::Refused {
            return;
        }
        let paused = self.backoff.lock().unwrap().failed();
        if paused && !self.probing.swap(true, Ordering::AcqRel) {
            tokio::spawn(probe_until_back(Arc::clone(self)));
        }
    }

    /// Counts a sent request's end and hands its outcome to the sink.
    fn finish(&self, req: Request, result: MirrorResult, duration: Option<Duration>) {
        self.finish_with(req, result, duration, None);
    }

    fn finish_with(
        &self,
        req: Request,
        result: MirrorResult,
        duration: Option<Duration>,
        content: Option<Arc<Content>>,
    ) {
        let stats = &self.stats;
        // Claims the request from the in-flight count; a stop (`drain`) that already counted it
        // as unanswered keeps it so, and its outcome goes nowhere.
        let claimed = stats
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !claimed {
            return;
        }
        match result {
            MirrorResult::Status(_) | MirrorResult::Grpc(..) => {
                inc(&stats.responses);
                self.backoff.lock().unwrap().succeeded();
            }
            MirrorResult::Timeout => inc(&stats.errors_timeout),
            MirrorResult::Refused => inc(&stats.errors_refused),
            MirrorResult::Reset => inc(&stats.errors_reset),
            MirrorResult::Error => inc(&stats.errors_other),
        }
        let (method, target) = req.shared_method_and_target();
        (self.on_outcome)(MirrorOutcome {
            conn: req.conn(),
            seq: req.seq(),
            method,
            target,
            result,
            duration,
            content,
        });
    }
}

/// Resolves when the worker's idle connection cannot carry a request any more; never when it
/// has none.
async fn unusable(conn: &mut Option<h1::Conn>) {
    match conn {
        Some(c) => c.unusable().await,
        None => std::future::pending().await,
    }
}

/// Reads a reply to its end (so that its connection can carry the next request). The status,
/// a gRPC status (from the trailers or a trailers-only head) and the time from `started` to the
/// head are what is kept.
async fn read_answer(
    resp: hyper::Response<hyper::body::Incoming>,
    started: Instant,
) -> Result<(MirrorResult, Duration), MirrorResult> {
    let head = started.elapsed();
    let status = resp.status().as_u16();
    let mut grpc = grpc_status_of(resp.headers());
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify(&e))?;
        if let Some(t) = frame.trailers_ref() {
            grpc = grpc_status_of(t).or(grpc);
        }
    }
    let result = match grpc {
        Some(g) => MirrorResult::Grpc(status, g),
        None => MirrorResult::Status(status),
    };
    Ok((result, head))
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

/// The path and query the mirror is asked for: the request's (absolute-form targets keep only
/// their path and query) under the mirror URL's path prefix.
fn mirror_path<'a>(cfg: &ReplayConfig, target: &'a str) -> Cow<'a, str> {
    // The origin form (`/path?query`), nearly every request's, is kept as it is.
    let path: Cow<'a, str> = if target.starts_with('/') {
        Cow::Borrowed(target)
    } else {
        match Uri::from_str(target) {
            Ok(u) if u.scheme().is_some() => Cow::Owned(
                u.path_and_query()
                    .map_or_else(|| "/".into(), |p| p.as_str().to_string()),
            ),
            _ => Cow::Borrowed(target),
        }
    };
    match cfg.mirror.path().trim_end_matches('/') {
        "" => path,
        prefix => Cow::Owned(format!("{prefix}{path}")),
    }
}

/// The authority the mirror is told (Host, or `:authority`), from the original one.
fn mirror_authority<'a>(
    cfg: &'a ReplayConfig,
    original: Option<&'a [u8]>,
) -> Result<Cow<'a, str>, Unsendable> {
    let mirror = cfg
        .mirror
        .authority()
        .ok_or(Unsendable::NoAuthority)?
        .as_str();
    let original = || String::from_utf8_lossy(original.unwrap_or(mirror.as_bytes()));
    Ok(match cfg.host {
        HostMode::Mirror => Cow::Borrowed(mirror),
        HostMode::Keep => original(),
        HostMode::Shadow => {
            let h = original();
            // Envoy appends the suffix to the host name, before any port.
            Cow::Owned(match h.rsplit_once(':') {
                Some((name, port))
                    if !h.ends_with(']') && port.bytes().all(|c| c.is_ascii_digit()) =>
                {
                    format!("{name}-shadow:{port}")
                }
                _ => format!("{h}-shadow"),
            })
        }
    })
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
fn build_h2(
    cfg: &ReplayConfig,
    req: &h2::Request,
) -> Result<hyper::Request<ReplayBody>, Unsendable> {
    let original = match req.authority() {
        "" => req.headers().find(|(n, _)| *n == b"host").map(|(_, v)| v),
        a => Some(a.as_bytes()),
    };
    let authority = mirror_authority(cfg, original)?;
    let uri = Uri::builder()
        .scheme("http")
        .authority(&*authority)
        .path_and_query(&*mirror_path(cfg, req.path()))
        .build()?;
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

    #[test]
    fn a_loop_is_refused_only_where_replayed_requests_are_hooked() {
        let mirror: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let watched = ["veth1".to_string()];
        let ok = |m, addrs: &[IpAddr], via| check_no_loop(m, &[8080], addrs, via, &watched);
        assert!(matches!(
            ok(mirror, &[], "veth1"),
            Err(MirrorError::FeedbackLoop { port: 8080, .. })
        ));
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
}

#[cfg(test)]
mod worker_tests {
    use super::*;
    use crate::testkit::{Conversation, Extract};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A test mirror's address and what it saw.
    struct TestMirror {
        url: String,
        /// The paths answered, in order.
        log: Arc<Mutex<Vec<String>>>,
        connections: Arc<AtomicUsize>,
    }

    /// A mirror that answers 200 to each request `delay` after reading it, and closes after
    /// every `per_conn`-th answer (saying so), leaving what was pipelined behind it unanswered.
    async fn test_mirror(per_conn: usize, delay: Duration) -> TestMirror {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (answered, accepted) = (Arc::clone(&log), Arc::clone(&connections));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
                // As servers do: else Nagle holds each pipelined answer for the agent's ACK.
                s.set_nodelay(true).unwrap();
                let log = Arc::clone(&answered);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    for n in 1..=per_conn {
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                        buf.drain(..head_end);
                        log.lock()
                            .unwrap()
                            .push(head.split(' ').nth(1).unwrap().to_string());
                        let close = if n == per_conn {
                            "Connection: close\r\n"
                        } else {
                            ""
                        };
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let answer =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{close}\r\nok");
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TestMirror {
            url,
            log,
            connections,
        }
    }

    /// A replayer whose outcomes are collected.
    fn collecting(cfg: ReplayConfig) -> (Replayer, Arc<Mutex<Vec<MirrorOutcome>>>) {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&outcomes);
        let replayer = Replayer::start(
            cfg,
            &tokio::runtime::Handle::current(),
            Box::new(move |o: MirrorOutcome| sink.lock().unwrap().push(o)),
        );
        (replayer, outcomes)
    }

    fn requests(n: usize) -> Vec<Request> {
        let mut c = Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", 7, 9);
        let mut x = Extract::new(&[8080]);
        x.feed(&c.handshake());
        let wire: Vec<u8> = (0..n)
            .flat_map(|i| format!("GET /r/{i} HTTP/1.1\r\nHost: live\r\n\r\n").into_bytes())
            .collect();
        x.feed(&c.client_data(&wire, 1400));
        x.requests.into_iter().map(Request::H1).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_left_unanswered_by_a_closing_mirror_are_sent_again_once() {
        let mirror = test_mirror(5, Duration::ZERO).await;
        let mut cfg = ReplayConfig::new(parse_mirror_url(&mirror.url).unwrap());
        cfg.max_inflight = 4;
        cfg.pipeline_depth = 16;
        let (replayer, outcomes) = collecting(cfg);
        // Several rounds, so that connections are fast and deep by the later ones.
        for round in requests(300).chunks(60) {
            assert_eq!(replayer.offer(round.to_vec()), 60);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = replayer.drain(Duration::from_secs(10)).await;
        let outcomes = outcomes.lock().unwrap();
        assert_eq!(outcomes.len(), 300);
        assert!(
            outcomes
                .iter()
                .all(|o| o.result == MirrorResult::Status(200)),
            "every request answered: {stats:?}"
        );
        let mut answered = mirror.log.lock().unwrap().clone();
        answered.sort();
        let mut sent: Vec<String> = (0..300).map(|i| format!("/r/{i}")).collect();
        sent.sort();
        assert_eq!(answered, sent, "each request processed exactly once");
        assert_eq!(stats.sent.load(Ordering::Relaxed), 300);
        assert_eq!(stats.responses.load(Ordering::Relaxed), 300);
        assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 0);
        assert!(
            stats.resent.load(Ordering::Relaxed) > 0,
            "batches outran the mirror's closes"
        );
    }

    /// Requests offered at `per_ms` a millisecond for `ms` milliseconds, like the pipeline
    /// hands them on under a steady load.
    async fn offer_steadily(replayer: &Replayer, per_ms: usize, ms: usize) {
        let all = requests(per_ms * ms);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for chunk in all.chunks(per_ms) {
            tick.tick().await;
            assert_eq!(replayer.offer(chunk.to_vec()), chunk.len());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_steady_load_on_a_fast_mirror_is_carried_by_a_few_connections() {
        let mirror = test_mirror(usize::MAX, Duration::ZERO).await;
        let mut cfg = ReplayConfig::new(parse_mirror_url(&mirror.url).unwrap());
        cfg.max_inflight = 512;
        let (replayer, outcomes) = collecting(cfg);
        offer_steadily(&replayer, 20, 300).await;
        let stats = replayer.drain(Duration::from_secs(10)).await;
        assert_eq!(outcomes.lock().unwrap().len(), 6000, "{stats:?}");
        assert_eq!(stats.responses.load(Ordering::Relaxed), 6000);
        // 20k requests a second to a mirror answering at once: a handful of pipelined
        // connections carry it.
        let connections = mirror.connections.load(Ordering::SeqCst);
        assert!(connections <= 8, "{connections} connections: {stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_to_a_slow_mirror_fans_out_over_connections() {
        let mirror = test_mirror(usize::MAX, Duration::from_millis(400)).await;
        let mut cfg = ReplayConfig::new(parse_mirror_url(&mirror.url).unwrap());
        cfg.max_inflight = 64;
        cfg.timeout = Duration::from_secs(5);
        let (replayer, outcomes) = collecting(cfg);
        let started = Instant::now();
        // One burst, then nothing: no later offer starts workers for what waits.
        assert_eq!(replayer.offer(requests(32)), 32);
        while outcomes.lock().unwrap().len() < 32 && started.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        let stats = replayer.drain(Duration::from_secs(1)).await;
        let outcomes = outcomes.lock().unwrap();
        assert_eq!(outcomes.len(), 32, "{stats:?}");
        assert!(outcomes
            .iter()
            .all(|o| o.result == MirrorResult::Status(200)));
        // One at a time the 32 would take 12.8 s; side by side, one round of 0.4 s and the
        // millisecond per new worker.
        assert!(
            took < Duration::from_secs(2),
            "answered in {took:?}: {stats:?}"
        );
        assert!(mirror.connections.load(Ordering::SeqCst) >= 16);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_stop_leaves_is_counted_once_and_late_answers_are_not() {
        // Answers take 2 s; the stop's grace is 200 ms.
        let mirror = test_mirror(usize::MAX, Duration::from_secs(2)).await;
        let mut cfg = ReplayConfig::new(parse_mirror_url(&mirror.url).unwrap());
        cfg.max_inflight = 4;
        cfg.timeout = Duration::from_secs(10);
        let (replayer, outcomes) = collecting(cfg);
        assert_eq!(replayer.offer(requests(10)), 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stats = replayer.drain(Duration::from_millis(200)).await;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (sent, stopped, queued) = (
            get(&stats.sent),
            get(&stats.errors_stopped),
            get(&stats.dropped_at_stop),
        );
        assert!((1..=4).contains(&sent), "{stats:?}");
        assert_eq!((stopped, queued), (sent, 10 - sent), "{stats:?}");
        assert_eq!(get(&stats.inflight), 0);
        assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 0);
        // The answers that come after the stop change nothing.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(get(&stats.responses), 0, "{stats:?}");
        assert_eq!(get(&stats.errors_stopped), sent);
        assert!(outcomes.lock().unwrap().is_empty());
    }
}
