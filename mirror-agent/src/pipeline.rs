//! The agent's middle: capture batches in, reassembly and HTTP extraction on one thread, events
//! out. Stats snapshots are published for logs and metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::capture::SegmentBatch;
use crate::dump::FlowRecorder;
use crate::http::{HttpConfig, HttpEvent, HttpExtractor, HttpStats};
use crate::reassembly::{Reassembler, ReassemblyConfig, ReassemblyStats};
use crate::segment::TimestampNs;

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub reassembly: ReassemblyConfig,
    pub http: HttpConfig,
    /// Also record the reassembled streams for `--dump`, holding at most this many bytes.
    pub record_streams: Option<usize>,
    pub tick: Duration,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PipelineStats {
    pub reassembly: ReassemblyStats,
    pub http: HttpStats,
    pub flows: usize,
}

pub fn now_ns() -> TimestampNs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs until the capture side closes the channel. Returns the stream recorder, if asked for.
pub fn run(
    rx: Receiver<SegmentBatch>,
    cfg: PipelineConfig,
    stats: Arc<Mutex<PipelineStats>>,
    mut sink: impl FnMut(HttpEvent),
) -> Option<FlowRecorder> {
    let mut extract =
        Reassembler::new(cfg.reassembly.clone(), HttpExtractor::new(cfg.http.clone()));
    let mut recorder = cfg
        .record_streams
        .map(|max| Reassembler::new(cfg.reassembly.clone(), FlowRecorder::new(max)));
    let publish = |extract: &Reassembler<HttpExtractor>| {
        *stats.lock().unwrap() = PipelineStats {
            reassembly: extract.stats(),
            http: extract.handler().stats(),
            flows: extract.flow_count(),
        };
    };
    let mut last_tick = Instant::now();
    loop {
        match rx.recv_timeout(cfg.tick) {
            Ok(batch) => {
                for seg in &batch {
                    extract.process(seg);
                    if let Some(r) = recorder.as_mut() {
                        r.process(seg);
                    }
                }
                drop(batch);
                extract.handler_mut().drain().for_each(&mut sink);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if last_tick.elapsed() >= cfg.tick {
            let now = now_ns();
            extract.tick(now);
            if let Some(r) = recorder.as_mut() {
                r.tick(now);
            }
            extract.handler_mut().drain().for_each(&mut sink);
            publish(&extract);
            last_tick = Instant::now();
        }
    }
    let now = now_ns();
    extract.shutdown(now);
    extract.handler_mut().drain().for_each(&mut sink);
    publish(&extract);
    recorder.map(|mut r| {
        r.shutdown(now);
        r.into_handler()
    })
}
