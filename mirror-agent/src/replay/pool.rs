//! The workers that send to the mirror and the queue they take from: admission (a queue
//! bounded in bytes), growth by one worker when a request has waited, batches for pipelining,
//! and the stop's drain; the prober that finds the mirror back after refusals.

use super::*;

/// The producer side, used by the pipeline (on the capture thread); `drain` closes it.
#[derive(Clone)]
pub struct Replayer {
    shared: Arc<Shared>,
}

/// What the workers share. Each worker owns one HTTP/1 connection to the mirror and sends one
/// batch at a time on it, so the worker count bounds the connections; HTTP/2 requests share one
/// multiplexed connection.
pub(super) struct Shared {
    cfg: ReplayConfig,
    stats: Arc<ReplayStats>,
    queue: Mutex<Queue>,
    /// Rung when requests are queued (or the queue closes): wakes one waiting worker.
    bell: tokio::sync::Notify,
    /// Rung when a worker leaves: the stop waits on it for the last one.
    left: tokio::sync::Notify,
    h2: H2Mirror,
    backoff: Mutex<Backoff>,
    probing: AtomicBool,
    bucket: Option<Mutex<TokenBucket>>,
    /// Workers waiting for the bell (those alive are `ReplayStats::workers`).
    idle: AtomicUsize,
    /// A look at whether requests wait too long for a worker is due (`Shared::grow_later`).
    grow_due: AtomicBool,
    /// The busy workers' room for pipelining: over the workers, the depth of their next batch
    /// beyond one request. Requests that fit in it are taken at the workers' next turn, so
    /// they start no worker (see `grow_later`).
    pipeline_room: AtomicUsize,
    on_outcome: OutcomeSink,
    rt: tokio::runtime::Handle,
}

#[derive(Default)]
pub(super) struct Queue {
    /// Each with when it was queued.
    requests: VecDeque<(Instant, Request)>,
    closed: bool,
}

/// A worker's part of `Shared::pipeline_room`, kept in the sum while the worker lives.
struct PipelineRoom<'a> {
    sum: &'a AtomicUsize,
    mine: usize,
}

impl<'a> PipelineRoom<'a> {
    fn new(sum: &'a AtomicUsize) -> Self {
        PipelineRoom { sum, mine: 0 }
    }

    /// The worker's next batch may be `depth` deep.
    fn set(&mut self, depth: usize) {
        let room = depth.saturating_sub(1);
        if room > self.mine {
            self.sum.fetch_add(room - self.mine, Ordering::SeqCst);
        } else {
            self.sum.fetch_sub(self.mine - room, Ordering::SeqCst);
        }
        self.mine = room;
    }
}

impl Drop for PipelineRoom<'_> {
    fn drop(&mut self) {
        self.sum.fetch_sub(self.mine, Ordering::SeqCst);
    }
}

pub(super) fn queue_cost(req: &Request) -> usize {
    req.size() + QUEUE_ENTRY_OVERHEAD
}

/// A worker with no request for this long exits (and closes its connection), so the pool
/// shrinks after a burst and DNS is resolved again at least this often.
pub(super) const WORKER_IDLE_EXIT: Duration = Duration::from_secs(30);

/// A request that waited this long with no worker idle starts one more worker. Busy workers on
/// a fast mirror come back for the queue sooner; on a slow one, the pool grows by one worker a
/// millisecond at most.
pub(super) const GROW_AFTER: Duration = Duration::from_millis(1);

impl Replayer {
    /// Starts the replay stage on `rt`. Outcomes go to `on_outcome`, called from the workers.
    pub fn start(
        cfg: ReplayConfig,
        rt: &tokio::runtime::Handle,
        on_outcome: OutcomeSink,
    ) -> Replayer {
        let bucket = cfg.max_rps.map(|rate| Mutex::new(TokenBucket::new(rate)));
        let shared = Arc::new(Shared {
            h2: H2Mirror::new(),
            cfg,
            stats: Arc::new(ReplayStats::default()),
            queue: Mutex::default(),
            bell: tokio::sync::Notify::new(),
            left: tokio::sync::Notify::new(),
            backoff: Mutex::new(Backoff::default()),
            probing: AtomicBool::new(false),
            bucket,
            idle: AtomicUsize::new(0),
            grow_due: AtomicBool::new(false),
            pipeline_room: AtomicUsize::new(0),
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
        match cfg.filter(req.method(), req.target()) {
            Ok(()) => {}
            Err(Filtered::Method) => {
                inc(&stats.filtered_method);
                return false;
            }
            Err(Filtered::Path) => {
                inc(&stats.filtered_path);
                return false;
            }
            Err(Filtered::WritePolicy) => {
                inc(&stats.filtered_write_policy);
                return false;
            }
        }
        if !cfg.headers_match(req) {
            inc(&stats.filtered_header);
            return false;
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
        loop {
            let left = shared.left.notified();
            tokio::pin!(left);
            // Listening before looking, so that the last worker's leaving is not missed.
            left.as_mut().enable();
            if shared.stats.workers.load(Ordering::SeqCst) == 0
                || tokio::time::timeout_at(deadline, left).await.is_err()
            {
                break;
            }
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

/// Every `PROBE_EVERY` (± half, so that agents on many nodes do not probe in step), tries to
/// connect to the mirror while sending backs off; the first connection accepted ends the
/// backoff. One prober at a time.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(30);

pub(super) async fn probe_until_back(shared: Arc<Shared>) {
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

/// What a waiting worker does next.
pub(super) enum Turn {
    Rung,
    ConnectionEnded,
    IdleTooLong,
}

/// What goes to the mirror for a request, in the protocol it came in. (Moved once: boxing the
/// larger variant would cost an allocation per request.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Outgoing {
    H1(h1::Outgoing),
    H2(hyper::Request<ReplayBody>),
}

/// What a worker found in the queue.
pub(super) enum Taken {
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
                    let waiting = shared.queue.lock().unwrap().requests.len();
                    if shared.idle.load(Ordering::SeqCst) > 0 {
                        shared.bell.notify_one();
                    } else if waiting <= shared.pipeline_room.load(Ordering::SeqCst) {
                        // The busy workers pipeline them at their next turn: a new worker
                        // would only thin the batches (on a saturated node, where every
                        // answer comes late, the pool grew to hundreds of connections of a
                        // request or two each).
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
        let mut room = PipelineRoom::new(&self.pipeline_room);
        loop {
            let bell = self.bell.notified();
            tokio::pin!(bell);
            // Listening before looking, so that a ring between the two is not missed.
            bell.as_mut().enable();
            match self.take(conn.as_ref().map_or(1, h1::Conn::depth)) {
                Taken::Batch(batch) => {
                    self.send(&mut conn, batch).await;
                    room.set(conn.as_ref().map_or(1, h1::Conn::depth));
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
                Turn::ConnectionEnded => {
                    conn = None;
                    room.set(1);
                }
                Turn::IdleTooLong => {
                    self.stats.workers.fetch_sub(1, Ordering::SeqCst);
                    // Requests queued while this worker was leaving found it idle and started
                    // no worker: stay for them (see `Replayer::offer`).
                    if self.queue.lock().unwrap().requests.is_empty() {
                        self.left.notify_waiters();
                        return;
                    }
                    self.stats.workers.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        self.stats.workers.fetch_sub(1, Ordering::SeqCst);
        self.left.notify_waiters();
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
        self.on_outcome.outcome(MirrorOutcome {
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
pub(super) async fn unusable(conn: &mut Option<h1::Conn>) {
    match conn {
        Some(c) => c.unusable().await,
        None => std::future::pending().await,
    }
}
