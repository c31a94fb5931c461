//! The agent's sign of life to the kernel program (`mirror_common::Heartbeat`).
//!
//! Before tcx links (6.6), a clsact filter outlives a killed agent and would keep cloning
//! every matched packet towards a mirror interface nobody reads, until the next start. A thread
//! of its own refreshes the beat, so that a busy pipeline or replay never makes the agent look
//! gone; a frozen or killed process stops it, and the program goes inert within `STALE_AFTER`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::{CaptureError, Result};
use aya::maps::{Array, MapData};
use mirror_common::Heartbeat;

/// How often the beat is refreshed.
pub const BEAT_EVERY: Duration = Duration::from_millis(250);
/// How old a beat may grow before the program passes over packets: eight missed beats, far
/// beyond a scheduling delay or a cgroup's CPU throttling period (100 ms).
pub const STALE_AFTER: Duration = Duration::from_secs(2);

/// The running heartbeat; stops (and leaves the beat to go stale) when dropped.
pub struct HeartbeatThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HeartbeatThread {
    /// Writes a first beat, so that the program finds a fresh one as soon as it is enabled,
    /// then refreshes it every `BEAT_EVERY`.
    pub fn start(map: Array<MapData, Heartbeat>) -> Result<HeartbeatThread> {
        let mut beat = Beat { map };
        beat.write()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::park_timeout(BEAT_EVERY);
                    if let Err(e) = beat.write() {
                        log::warn!("refreshing the heartbeat: {}", super::error::chain(&e));
                    }
                }
            })
            .map_err(CaptureError::io("starting the heartbeat thread"))?;
        Ok(HeartbeatThread {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HeartbeatThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

struct Beat {
    map: Array<MapData, Heartbeat>,
}

impl Beat {
    fn write(&mut self) -> Result<()> {
        let hb = Heartbeat {
            // CLOCK_MONOTONIC is the clock of `bpf_ktime_get_ns`.
            at_ns: super::heads::clock_ns(libc::CLOCK_MONOTONIC) as u64,
            stale_after_ns: STALE_AFTER.as_nanos() as u64,
        };
        self.map
            .set(0, hb, 0)
            .map_err(CaptureError::map(mirror_common::MAP_HEARTBEAT))
    }
}
