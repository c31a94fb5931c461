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

#[derive(Clone, Debug, Default)]
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

/// Where the pipeline's events go.
pub trait Sink {
    fn event(&mut self, event: HttpEvent);
    /// Called after the events of each batch of segments, so that they can be handed on
    /// together.
    fn flush(&mut self);
}

/// Runs until the capture side closes the channel. Returns the stream recorder, if asked for.
pub fn run(
    rx: Receiver<SegmentBatch>,
    cfg: PipelineConfig,
    stats: Arc<Mutex<PipelineStats>>,
    mut sink: impl Sink,
) -> Option<FlowRecorder> {
    let mut hand_on = |extract: &mut Reassembler<HttpExtractor>| {
        extract
            .handler_mut()
            .drain()
            .for_each(|event| sink.event(event));
        sink.flush();
    };
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
                hand_on(&mut extract);
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
            hand_on(&mut extract);
            publish(&extract);
            last_tick = Instant::now();
        }
    }
    let now = now_ns();
    extract.shutdown(now);
    hand_on(&mut extract);
    publish(&extract);
    recorder.map(|mut r| {
        r.shutdown(now);
        r.into_handler()
    })
}
