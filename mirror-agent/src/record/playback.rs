//! `mirror-agent replay DIR`: a recording sent to a mirror again, with its original relative
//! timing (scaled by `--speed`) or as fast as it goes, and compared as live mirroring is, with
//! the recorded live responses as the live side.
//!
//! Each recorded connection's requests go out in their recorded order on one connection to the
//! mirror (a *lane*), one at a time: with `--connections same` a lane per recorded connection
//! (opened when its first request is due, closed when it has been idle a while), with
//! `--connections N` N lanes, a recorded connection always on the same one. A request is sent at
//! its due time or, when its lane is still busy with the one before, as soon as that one is
//! answered: order is kept over timing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::reader::{Issue, Reader};
use super::{Record, RecordedH2Request};
use crate::compare::{CompareConfig, Comparison, Report};
use crate::exchange::{MirrorOutcome, MirrorResult};
use crate::http::{h1, h2, WireOrigin};
use crate::replay::h1::{serialize, Conn};
use crate::replay::{send_h2_once, H2Mirror, ReplayConfig};

/// How requests are spread over connections to the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lanes {
    /// One per recorded connection.
    Same,
    Fixed(usize),
}

impl std::str::FromStr for Lanes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "same" {
            return Ok(Lanes::Same);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => Ok(Lanes::Fixed(n)),
            _ => Err(format!(
                "{s:?} is neither `same` nor a number of connections from 1 to 10000"
            )),
        }
    }
}

/// `--speed`: a factor on the recorded pace, or as fast as the lanes go.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Speed {
    Factor(f64),
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f.is_finite() => Ok(Speed::Factor(f)),
            _ => Err(format!(
                "{s:?} is neither `max` nor a positive factor such as 2.0"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlaybackConfig {
    /// Where and how to send (mirror, Host mode, headers added and dropped, filters, timeout).
    pub replay: ReplayConfig,
    pub speed: Speed,
    pub loops: u32,
    pub max_rps: Option<f64>,
    pub lanes: Lanes,
    pub compare: CompareConfig,
    /// Print progress to stderr every this often (None: never).
    pub progress: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct PlaybackStats {
    /// Requests in the recording (one pass), and those the filters leave.
    pub recorded: AtomicU64,
    pub filtered: AtomicU64,
    /// Recorded requests whose head no longer parses (damage the checksums did not catch).
    pub unparsable: AtomicU64,
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub errors: AtomicU64,
    /// Requests sent later than due by more than 10 ms (their lane was busy, or the rate cap).
    pub late: AtomicU64,
}

pub struct PlaybackSummary {
    pub report: Report,
    pub stats: Arc<PlaybackStats>,
    pub issues: Vec<Issue>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaybackError {
    #[error("cannot read the recording {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
    #[error("{dir} holds no recording files (rec-*.mrec)")]
    Empty { dir: String },
    #[error("starting the content comparison's thread: {0}")]
    Thread(std::io::Error),
}

/// A recorded request, ready to send again.
enum Replayable {
    H1(h1::Request),
    H2(h2::Request),
}

impl Replayable {
    fn method(&self) -> &str {
        match self {
            Replayable::H1(r) => r.method(),
            Replayable::H2(r) => r.method(),
        }
    }
    fn target(&self) -> &str {
        match self {
            Replayable::H1(r) => r.target(),
            Replayable::H2(r) => r.path(),
        }
    }
}

/// A request record's origin as recorded, and the request with its connection id moved by
/// `pass_key` (each pass is paired apart); None for the request when it no longer parses.
fn replayable(record: &Record, pass_key: u64) -> Option<(WireOrigin, Option<Replayable>)> {
    let moved = |at: &WireOrigin| WireOrigin {
        conn: at.conn.wrapping_add(pass_key),
        ..*at
    };
    match record {
        Record::Request(r) => Some((
            r.at,
            h1::Request::from_wire(r.raw.clone(), moved(&r.at)).map(Replayable::H1),
        )),
        Record::H2Request(r) => Some((r.at, Some(Replayable::H2(h2_request(r, moved(&r.at)))))),
        Record::Response(_) | Record::Source { .. } => None,
    }
}

fn h2_request(r: &RecordedH2Request, at: WireOrigin) -> h2::Request {
    h2::Request {
        conn: at.conn,
        seq: at.seq,
        client: at.client,
        server: at.server,
        fields: r.fields.clone(),
        body: r.body.clone(),
        trailers: r.trailers.clone(),
        from_start: true,
        rest: None,
        first_ts: at.first_ts,
        last_ts: at.last_ts,
    }
}

struct Job {
    req: Replayable,
    key: (u64, u64),
    due: Instant,
}

struct Lane {
    tx: mpsc::Sender<Job>,
    /// Requests handed over and not yet finished.
    pending: Arc<AtomicUsize>,
    last_used: Instant,
}

/// A lane idle this long closes (`same`); its connection's next request opens a new one.
const LANE_IDLE: Duration = Duration::from_secs(2);
const LATE: Duration = Duration::from_millis(10);

/// One pass over the recording's requests: how many, and the first one's capture time.
fn survey(
    dir: &Path,
    cfg: &ReplayConfig,
) -> Result<(u64, u64, Option<u64>, Vec<Issue>), PlaybackError> {
    let mut reader = Reader::open(dir).map_err(|source| PlaybackError::Dir {
        dir: dir.display().to_string(),
        source,
    })?;
    if reader.is_empty_dir() {
        return Err(PlaybackError::Empty {
            dir: dir.display().to_string(),
        });
    }
    let (mut total, mut kept, mut t0) = (0, 0, None::<u64>);
    for record in reader.by_ref() {
        if let Some((at, req)) = replayable(&record, 0) {
            total += 1;
            if req.is_some_and(|req| passes(cfg, &req)) {
                kept += 1;
                t0 = Some(t0.map_or(at.first_ts, |t| t.min(at.first_ts)));
            }
        }
    }
    Ok((total, kept, t0, reader.take_issues()))
}

fn passes(cfg: &ReplayConfig, req: &Replayable) -> bool {
    cfg.filter(req.method(), req.target()).is_ok()
}

/// Plays the recording in `dir` back. Never fails on damage inside the recording: what could
/// not be read is in the summary's issues.
pub async fn run(dir: &Path, cfg: PlaybackConfig) -> Result<PlaybackSummary, PlaybackError> {
    let (total, kept, t0, issues) = survey(dir, &cfg.replay)?;
    let stats = Arc::new(PlaybackStats {
        recorded: total.into(),
        filtered: (total - kept).into(),
        ..Default::default()
    });
    let comparison = Comparison::new(cfg.compare.clone()).map_err(PlaybackError::Thread)?;
    let started = Instant::now();
    let planned = kept * u64::from(cfg.loops);
    let progress = cfg
        .progress
        .map(|every| tokio::spawn(report_progress(Arc::clone(&stats), planned, every)));
    let cfg = Arc::new(cfg);
    let t0 = t0.unwrap_or(0);
    for pass in 0..cfg.loops {
        if !play_pass(dir, &cfg, &comparison, &stats, pass, t0).await {
            break;
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    Ok(PlaybackSummary {
        report: comparison.report(),
        stats,
        issues,
        elapsed: started.elapsed(),
    })
}

/// One pass over the recording: each request at its time on its lane, the recorded live
/// answers to the comparison. Returns once every request is answered; false when the
/// recording can no longer be opened.
async fn play_pass(
    dir: &Path,
    cfg: &Arc<PlaybackConfig>,
    comparison: &Comparison,
    stats: &Arc<PlaybackStats>,
    pass: u32,
    t0: u64,
) -> bool {
    let mut handles = Vec::new();
    let pass_start = Instant::now();
    let mut lanes: HashMap<u64, Lane> = HashMap::new();
    let mut next_slot = Instant::now();
    let mut last_sweep = Instant::now();
    let Ok(reader) = Reader::open(dir) else {
        return false;
    };
    let pass_key = u64::from(pass) << 48;
    for record in reader {
        // The recorded live side; the comparison pairs it with the mirror's answer, in
        // whichever order they come.
        if let Record::Response(mut live) = record {
            live.conn = live.conn.wrapping_add(pass_key);
            comparison.live(&live);
            continue;
        }
        if let Some((at, req)) = replayable(&record, pass_key) {
            let Some(req) = req else {
                if pass == 0 {
                    stats.unparsable.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            if !passes(&cfg.replay, &req) {
                continue;
            }
            let due = due_time(
                cfg,
                at.first_ts.saturating_sub(t0),
                pass_start,
                &mut next_slot,
            );
            // A timer, even one already due, waits for the timer wheel's next tick
            // (a millisecond): only sleep for a time still ahead.
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let key = (at.conn.wrapping_add(pass_key), at.seq);
            let lane = lanes.entry(cfg.lanes.of(at.conn)).or_insert_with(|| {
                let (lane, handle) = open_lane(cfg, comparison, stats);
                handles.push(handle);
                lane
            });
            lane.pending.fetch_add(1, Ordering::AcqRel);
            lane.last_used = Instant::now();
            // Waits when the lane is far behind: memory stays bounded.
            let _ = lane.tx.send(Job { req, key, due }).await;
        }
        if cfg.lanes == Lanes::Same && last_sweep.elapsed() >= LANE_IDLE {
            forget_idle_lanes(&mut lanes);
            last_sweep = Instant::now();
        }
    }
    // The next pass starts once this one is answered: passes follow each other.
    drop(lanes);
    for h in handles.drain(..) {
        let _ = h.await;
    }
    true
}

/// When a request recorded `since` nanoseconds after the recording began is due: at the
/// recorded pace scaled by `--speed`, or at once, and no sooner than `--max-rps` allows
/// (`next_slot` moves on).
fn due_time(
    cfg: &PlaybackConfig,
    since: u64,
    pass_start: Instant,
    next_slot: &mut Instant,
) -> Instant {
    let mut due = match cfg.speed {
        Speed::Max => Instant::now(),
        Speed::Factor(f) => pass_start + Duration::from_secs_f64(since as f64 / 1e9 / f),
    };
    if let Some(rps) = cfg.max_rps {
        due = due.max(*next_slot);
        *next_slot = due + Duration::from_secs_f64(1.0 / rps);
    }
    due
}

/// Lanes of connections that ended: nothing pending, and idle for `LANE_IDLE`.
fn forget_idle_lanes(lanes: &mut HashMap<u64, Lane>) {
    lanes.retain(|_, l| l.pending.load(Ordering::Acquire) > 0 || l.last_used.elapsed() < LANE_IDLE);
}

impl Lanes {
    /// The lane a recorded connection's requests are played on.
    fn of(self, conn: u64) -> u64 {
        match self {
            Lanes::Same => conn,
            Lanes::Fixed(n) => conn % n as u64,
        }
    }
}

fn open_lane(
    cfg: &Arc<PlaybackConfig>,
    comparison: &Comparison,
    stats: &Arc<PlaybackStats>,
) -> (Lane, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let pending = Arc::new(AtomicUsize::new(0));
    let handle = tokio::spawn(lane(
        Arc::clone(cfg),
        comparison.clone(),
        Arc::clone(stats),
        Arc::clone(&pending),
        rx,
    ));
    let lane = Lane {
        tx,
        pending,
        last_used: Instant::now(),
    };
    (lane, handle)
}

/// Sends a lane's requests one at a time, in order, on one connection (reopened when the
/// mirror closes it or it sat idle).
async fn lane(
    cfg: Arc<PlaybackConfig>,
    comparison: Comparison,
    stats: Arc<PlaybackStats>,
    pending: Arc<AtomicUsize>,
    mut rx: mpsc::Receiver<Job>,
) {
    let mut conn: Option<Conn> = None;
    let mut h2_conn = H2Mirror::new();
    let mut idle_since = Instant::now();
    while let Some(job) = rx.recv().await {
        if idle_since.elapsed() >= LANE_IDLE {
            conn = None;
            h2_conn = H2Mirror::new();
        }
        let paced = cfg.speed != Speed::Max || cfg.max_rps.is_some();
        if paced && Instant::now().duration_since(job.due) > LATE {
            stats.late.fetch_add(1, Ordering::Relaxed);
        }
        let (result, took) = match &job.req {
            Replayable::H1(r) => send_one(&cfg.replay, &mut conn, r).await,
            Replayable::H2(r) => send_h2_once(&cfg.replay, &h2_conn, r).await,
        };
        stats.sent.fetch_add(1, Ordering::Relaxed);
        match result {
            MirrorResult::Status(_) | MirrorResult::Grpc(..) => &stats.answered,
            _ => &stats.errors,
        }
        .fetch_add(1, Ordering::Relaxed);
        comparison.mirror(
            0,
            &MirrorOutcome {
                conn: job.key.0,
                seq: job.key.1,
                method: job.req.method().into(),
                target: job.req.target().into(),
                result,
                duration: took,
                content: None,
            },
        );
        pending.fetch_sub(1, Ordering::AcqRel);
        idle_since = Instant::now();
    }
}

/// One request and its answer; an idempotent request left unanswered by a mirror that closed
/// the connection goes out once more on a new one.
async fn send_one(
    cfg: &ReplayConfig,
    conn: &mut Option<Conn>,
    req: &h1::Request,
) -> (MirrorResult, Option<Duration>) {
    let out = match serialize(cfg, req) {
        Ok(out) => out,
        Err(_) => return (MirrorResult::Error, None),
    };
    for attempt in 0..2 {
        let started = std::time::Instant::now();
        let c = match conn {
            Some(c) => c,
            None => match Conn::open(cfg).await {
                Ok(c) => conn.insert(c),
                Err(e) => return (e, Some(started.elapsed())),
            },
        };
        let (fates, reusable) = c.exchange(&[&out], cfg.timeout, 1, None).await;
        if !reusable {
            *conn = None;
        }
        match fates.into_iter().next().flatten() {
            Some(a) => return (a.result, a.took),
            None if out.idempotent && attempt == 0 => continue,
            None => return (MirrorResult::Reset, Some(started.elapsed())),
        }
    }
    (MirrorResult::Reset, None)
}

async fn report_progress(stats: Arc<PlaybackStats>, planned: u64, every: Duration) {
    let start = Instant::now();
    let mut tick = tokio::time::interval_at(start + every, every);
    loop {
        tick.tick().await;
        let sent = stats.sent.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "replay: {sent} / {planned} requests sent, {:.0} req/s, {} errors",
            sent as f64 / secs,
            stats.errors.load(Ordering::Relaxed)
        );
    }
}

impl PlaybackSummary {
    pub fn line(&self) -> String {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "replay: {} requests recorded, {} left out by filters, {} unparsable; {} sent, {} answered, {} errors, {} late by over 10 ms; {:.1} s, {:.0} req/s",
            g(&s.recorded),
            g(&s.filtered),
            g(&s.unparsable),
            g(&s.sent),
            g(&s.answered),
            g(&s.errors),
            g(&s.late),
            self.elapsed.as_secs_f64(),
            g(&s.sent) as f64 / self.elapsed.as_secs_f64().max(1e-3)
        )
    }
}
