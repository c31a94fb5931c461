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
//!
//! This file owns the configuration and the counters; `target.rs` where the mirror is and how
//! to connect, `pool.rs` the queue and its workers, `h1.rs` and `h2.rs` the two protocols,
//! `pacing.rs` the rate cap and the backoff.

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
use crate::http::{h2 as http2, Request};

pub(crate) mod h1;
mod h2;
mod pacing;
mod pool;
pub mod rewrite;
pub mod secrets;
mod target;
mod tls;
pub mod writes;

use self::h2::*;
pub(crate) use self::h2::{send_h2_once, H2Mirror};
pub use self::h2::{ReplayBody, StreamCut, Unsendable};
use self::pacing::*;
pub use self::pool::Replayer;
use self::target::*;
pub use self::target::{
    check_mirror, check_no_loop, is_https, mirror_tls, parse_mirror_url, MirrorError,
};
use self::tls::{Alpn, MirrorStream};
pub use self::tls::{MirrorTls, TlsError, TlsOptions};
use self::writes::MirrorWrites;

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
    /// The target as the mirror gets it (path by regex, query parameters).
    pub rewrite: rewrite::TargetRewrite,
    /// Only requests whose header fields match these (each: the first field of that name; a
    /// request without it does not match).
    pub headers: Vec<(HeaderName, Regex)>,
    /// Whether writes go to this mirror (`--writes`, `--writes-route`).
    pub writes: MirrorWrites,
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
    /// TLS to an https mirror.
    pub tls: Option<MirrorTls>,
    /// Marks every request sent as mirrored (`--mark`).
    pub mark: Option<Mark>,
    /// Headers set from files (`--secret-header`), replacing the client's.
    pub secret_headers: Vec<Arc<secrets::SecretHeader>>,
}

/// `--mark`: a header naming the mirror on every request sent to it, and the same as an entry
/// of W3C `baggage`, which tracing libraries carry on to the services the candidate calls.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    pub header: HeaderName,
    /// The mirror's name, the header's value.
    pub mirror: HeaderValue,
}

/// The key of the mark's entry in `baggage`.
pub const BAGGAGE_KEY: &str = "mirror-shadow";

impl Mark {
    /// The mark of the mirror named `mirror`: the name percent-encoded beyond letters, digits
    /// and `-_.~`, as baggage values are.
    pub fn new(header: HeaderName, mirror: &str) -> Mark {
        let mut value = String::new();
        for b in mirror.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                value.push(b as char);
            } else {
                value.push_str(&format!("%{b:02X}"));
            }
        }
        Mark {
            header,
            mirror: HeaderValue::from_str(&value).expect("percent-encoded ASCII is a header value"),
        }
    }

    /// The `baggage` value sent: the client's own entries, if any, then the mark's.
    pub fn baggage(&self, client: Option<&[u8]>) -> Vec<u8> {
        let mut value = Vec::new();
        if let Some(own) = client.filter(|v| !v.iter().all(u8::is_ascii_whitespace)) {
            value.extend_from_slice(own);
            value.push(b',');
        }
        value.extend_from_slice(BAGGAGE_KEY.as_bytes());
        value.push(b'=');
        value.extend_from_slice(self.mirror.as_bytes());
        value
    }

    /// Whether `name` is a header the mark writes itself (the client's copy is left out).
    pub fn owns(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case(self.header.as_str()) || name.eq_ignore_ascii_case("baggage")
    }
}

/// What a queued request costs beyond its bytes (the request's own fields and header index).
pub const QUEUE_ENTRY_OVERHEAD: usize = 512;

/// Most HTTP/1 requests written at once on a mirror connection unless `--pipeline-depth` says.
pub const DEFAULT_PIPELINE_DEPTH: u16 = 64;

/// Why a request is left out by the filters (`--methods`, `--path`, the write policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtered {
    Method,
    Path,
    WritePolicy,
}

impl ReplayConfig {
    /// Whether the request's header fields match `headers`.
    pub fn headers_match(&self, req: &crate::http::Request) -> bool {
        self.headers.iter().all(|(name, re)| {
            req.header(name.as_str())
                .and_then(|v| std::str::from_utf8(v).ok())
                .is_some_and(|v| re.is_match(v))
        })
    }

    /// The one request filter, of live mirroring and of playback: the method among `methods`
    /// (all when empty), the path (before any query) matching `path`, and the write policy.
    pub fn filter(&self, method: &str, target: &str) -> Result<(), Filtered> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return Err(Filtered::Method);
        }
        let path = target.split('?').next().unwrap_or("");
        match &self.path {
            Some(re) if !re.is_match(path) => Err(Filtered::Path),
            _ if !self.writes.allows(method, path) => Err(Filtered::WritePolicy),
            _ => Ok(()),
        }
    }

    pub fn new(mirror: Uri) -> Self {
        ReplayConfig {
            mirror,
            host: HostMode::Mirror,
            add_headers: Vec::new(),
            drop_headers: Vec::new(),
            methods: Vec::new(),
            path: None,
            headers: Vec::new(),
            rewrite: rewrite::TargetRewrite::default(),
            writes: MirrorWrites::default(),
            max_rps: None,
            max_inflight: 256,
            pipeline_depth: DEFAULT_PIPELINE_DEPTH.into(),
            content: None,
            timeout: Duration::from_secs(10),
            queue_bytes: 64 << 20,
            tls: None,
            mark: None,
            secret_headers: Vec::new(),
        }
    }
}

mirror_core::stage_counters! {
    /// Counters; every request offered ends in exactly one of them (plus `sent` for those sent).
    #[derive(Debug, Default)]
    pub struct ReplayStats {
        /// HTTP/1 batches written to the mirror (`sent` over this is the mean pipelining depth).
        pub batches: AtomicU64 => Counter "mirror_replay_batches"
            "HTTP/1 batches written to the mirror",
        pub dropped_backoff: AtomicU64 => Counter "mirror_replay_dropped" [reason = "backoff"]
            "Requests not sent to the mirror, by reason",
        pub dropped_queue_full: AtomicU64 => Counter "mirror_replay_dropped" [reason = "queue_full"],
        pub dropped_rate_limit: AtomicU64 => Counter "mirror_replay_dropped" [reason = "rate_limit"],
        /// Requests still queued when the stop's grace ended.
        pub dropped_at_stop: AtomicU64 => Counter "mirror_replay_dropped" [reason = "stopped"],
        pub dropped_unsendable: AtomicU64 => Counter "mirror_replay_dropped" [reason = "unsendable"],
        pub errors_other: AtomicU64 => Counter "mirror_replay_errors" [kind = "other"]
            "Requests sent that got no answer, by kind",
        pub errors_refused: AtomicU64 => Counter "mirror_replay_errors" [kind = "refused"],
        pub errors_reset: AtomicU64 => Counter "mirror_replay_errors" [kind = "reset"],
        /// Requests sent whose answer had not come when the stop's grace ended.
        pub errors_stopped: AtomicU64 => Counter "mirror_replay_errors" [kind = "stopped"],
        pub errors_timeout: AtomicU64 => Counter "mirror_replay_errors" [kind = "timeout"],
        pub filtered_method: AtomicU64 => Counter "mirror_replay_filtered_method"
            "Requests left out by --methods",
        pub filtered_path: AtomicU64 => Counter "mirror_replay_filtered_path"
            "Requests left out by --path",
        pub filtered_header: AtomicU64 => Counter "mirror_replay_filtered_header"
            "Requests left out by a TrafficMirror's header matches",
        pub filtered_write_policy: AtomicU64 => Counter "mirror_replay_filtered_write_policy"
            "Writes (POST, PUT, PATCH, DELETE, ...) left out by --writes and --writes-route",
        pub inflight: AtomicU64 => Gauge "mirror_replay_inflight"
            "Requests sent and not yet answered",
        pub offered: AtomicU64 => Counter "mirror_replay_offered"
            "Requests offered to the replay stage",
        /// Times the mirror was found back by the prober while sending was backing off.
        pub probe_recoveries: AtomicU64 => Counter "mirror_replay_probe_recoveries"
            "Times the mirror was found back while sending was backing off",
        /// Gauge: bytes of requests waiting in the queue.
        pub queued_bytes: AtomicUsize => Gauge "mirror_replay_queued_bytes"
            "Bytes of requests waiting in the queue",
        /// Requests sent again on a new connection: the mirror closed before answering them.
        pub resent: AtomicU64 => Counter "mirror_replay_resent"
            "Requests sent again on a new connection after the mirror closed",
        pub responses: AtomicU64 => Counter "mirror_replay_responses"
            "Answers from the mirror",
        pub sent: AtomicU64 => Counter "mirror_replay_sent"
            "Requests sent to the mirror",
        /// Gauge: workers alive, each with at most one connection to the mirror.
        pub workers: AtomicUsize => Gauge "mirror_replay_workers"
            "Replay workers alive, each with at most one connection to the mirror",
}
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Where a replay stage's outcomes go (see `exchange::OutcomeSink`).
pub type OutcomeSink = Box<dyn crate::exchange::OutcomeSink>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_filter_by_method_and_path_before_the_query() {
        let mut cfg = ReplayConfig::new(parse_mirror_url("http://127.0.0.1:9").unwrap());
        assert_eq!(cfg.filter("DELETE", "/anything"), Ok(()), "no filter: all");
        cfg.methods = vec!["GET".into(), "HEAD".into()];
        cfg.path = Some(Regex::new("^/api/").unwrap());
        assert_eq!(cfg.filter("GET", "/api/books?x=/other"), Ok(()));
        assert_eq!(cfg.filter("POST", "/api/books"), Err(Filtered::Method));
        assert_eq!(cfg.filter("HEAD", "/health?/api/"), Err(Filtered::Path));
        cfg.methods.clear();
        cfg.writes = writes::WritePolicy {
            default: writes::WriteAction::Skip,
            routes: vec!["^/api/carts=mirror".parse().unwrap()],
        }
        .for_mirror("m");
        assert_eq!(cfg.filter("POST", "/api/books"), Err(Filtered::WritePolicy));
        assert_eq!(cfg.filter("POST", "/api/carts?a=1"), Ok(()));
        assert_eq!(cfg.filter("GET", "/api/books"), Ok(()));
    }

    #[test]
    fn header_matches_need_the_field_and_every_pattern() {
        let at = crate::http::WireOrigin {
            conn: 1,
            seq: 0,
            client: "10.0.0.1:4000".parse().unwrap(),
            server: "10.0.0.2:80".parse().unwrap(),
            first_ts: 0,
            last_ts: 0,
        };
        let req = |head: &'static str| {
            crate::http::Request::H1(
                crate::http::h1::Request::from_wire(bytes::Bytes::from_static(head.as_bytes()), at)
                    .unwrap(),
            )
        };
        let mut cfg = ReplayConfig::new(parse_mirror_url("http://127.0.0.1:9").unwrap());
        let tenant7 = req("GET / HTTP/1.1\r\nHost: a\r\nX-Tenant: 7\r\n\r\n");
        let tenant8 = req("GET / HTTP/1.1\r\nHost: a\r\nx-tenant: 8\r\n\r\n");
        let none = req("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(cfg.headers_match(&none), "no matches: all");
        cfg.headers = vec![(
            HeaderName::from_static("x-tenant"),
            Regex::new("^7$").unwrap(),
        )];
        assert!(cfg.headers_match(&tenant7), "names match in any case");
        assert!(!cfg.headers_match(&tenant8));
        assert!(!cfg.headers_match(&none), "a missing field does not match");
    }

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
