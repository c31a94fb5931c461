//! The content comparison's own thread. Comparing two JSON documents costs from microseconds
//! to milliseconds; done where contents arrive, it would hold up the capture thread (and the
//! capture ring behind it would drop live packets) or a replay worker. Contents are handed over
//! a bounded channel instead, bounded in bytes too: when the thread does not keep up, new ones
//! are passed over and counted (`busy`), never queued without bound.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::diffs::{ContentDiffs, ContentRow, DiffConfig, NotCompared};
use super::PairKey;
use crate::exchange::content::Content;

/// Events waiting for the thread, at most.
const QUEUE: usize = 4096;

enum Event {
    Live {
        key: PairKey,
        endpoint: String,
        method: String,
        target: String,
        content: Arc<Content>,
    },
    Mirror {
        key: PairKey,
        endpoint: String,
        mirror: usize,
        answered: bool,
        content: Option<Arc<Content>>,
    },
    /// Answered once every event before it is done.
    Settle(crossbeam_channel::Sender<()>),
}

impl Event {
    fn bytes(&self) -> usize {
        match self {
            Event::Live { content, .. } => content.held(),
            Event::Mirror { content, .. } => content.as_ref().map_or(0, |c| c.held()),
            Event::Settle(_) => 0,
        }
    }
}

/// Longest a stop waits for the contents handed over to be compared.
const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The handle the other stages use; the thread owns the comparison's state between events.
pub struct ContentWorker {
    tx: crossbeam_channel::Sender<Event>,
    state: Arc<Mutex<ContentDiffs>>,
    /// Bytes of contents queued for the thread.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    /// Contents passed over because the thread was behind.
    busy: AtomicU64,
    labels: Vec<String>,
}

impl ContentWorker {
    /// Starts the thread; `labels` names the mirrors, in order.
    pub fn start(cfg: DiffConfig, labels: Vec<String>) -> std::io::Result<ContentWorker> {
        let (tx, rx) = crossbeam_channel::bounded::<Event>(QUEUE);
        // Contents queued take at most as much as contents waiting for their pair.
        let max_queued = cfg.max_bytes;
        let state = Arc::new(Mutex::new(ContentDiffs::new(cfg, labels.len())));
        let queued = Arc::new(AtomicUsize::new(0));
        let (shared, counted) = (Arc::clone(&state), Arc::clone(&queued));
        std::thread::Builder::new()
            .name("mirror-compare".into())
            .spawn(move || {
                // Ends when the last handle is dropped.
                for ev in rx {
                    let bytes = ev.bytes();
                    let mut d = lock(&shared);
                    match ev {
                        Event::Live {
                            key,
                            endpoint,
                            method,
                            target,
                            content,
                        } => d.live(key, &endpoint, &method, &target, content),
                        Event::Mirror {
                            key,
                            endpoint,
                            mirror,
                            answered,
                            content,
                        } => d.mirror(key, &endpoint, mirror, answered, content),
                        Event::Settle(done) => {
                            // The waiter may have given up: nothing to tell then.
                            let _ = done.send(());
                        }
                    }
                    drop(d);
                    counted.fetch_sub(bytes, Ordering::Relaxed);
                }
            })?;
        Ok(ContentWorker {
            tx,
            state,
            queued,
            max_queued,
            busy: AtomicU64::new(0),
            labels,
        })
    }

    pub fn live(
        &self,
        key: PairKey,
        endpoint: String,
        method: &str,
        target: &str,
        content: Arc<Content>,
    ) {
        self.send(Event::Live {
            key,
            endpoint,
            method: method.to_string(),
            target: target.to_string(),
            content,
        });
    }

    pub fn mirror(
        &self,
        key: PairKey,
        endpoint: String,
        mirror: usize,
        answered: bool,
        content: Option<Arc<Content>>,
    ) {
        self.send(Event::Mirror {
            key,
            endpoint,
            mirror,
            answered,
            content,
        });
    }

    fn send(&self, ev: Event) {
        let bytes = ev.bytes();
        if self.queued.load(Ordering::Relaxed) + bytes > self.max_queued {
            self.busy.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        if self.tx.try_send(ev).is_err() {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.busy.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The rows and what was not compared, for the report.
    pub fn report(&self) -> (Vec<ContentRow>, NotCompared) {
        let d = lock(&self.state);
        let rows = d.rows(|m| {
            self.labels
                .get(m)
                .cloned()
                .unwrap_or_else(|| "mirror".into())
        });
        let mut not = d.not_compared();
        not.busy = self.busy.load(Ordering::Relaxed);
        (rows, not)
    }

    /// Waits (at most 5 s) until every content handed over has been compared: at stop, so
    /// that the final report holds them, and in tests. The thread answers a marker queued
    /// behind them, so nothing polls.
    pub fn settle(&self) {
        let (done, answered) = crossbeam_channel::bounded(1);
        let deadline = std::time::Instant::now() + SETTLE_WITHIN;
        if self.tx.send_deadline(Event::Settle(done), deadline).is_ok() {
            let _ = answered.recv_deadline(deadline);
        }
    }

    /// Requests waiting for their other halves now, and the bytes they hold.
    pub fn waiting(&self) -> (usize, usize) {
        lock(&self.state).waiting()
    }
}

fn lock(m: &Mutex<ContentDiffs>) -> MutexGuard<'_, ContentDiffs> {
    // A panic while comparing leaves counts that are still worth reporting.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
