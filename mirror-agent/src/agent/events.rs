//! Where the pipeline's events go, on the capture thread: requests to every mirror's replay
//! stage and to the declared mirrorings' lanes, live responses to the comparisons, the record.

use super::{AgentConfig, AgentError, Mirror, Result};
use crate::capture::error::chain;
use crate::capture::heads::FullResponses;
use crate::capture::read_at::Provenance;
use crate::capture::Capture;
use crate::compare::Comparison;
use crate::http::{HttpEvent, Request};
use crate::mirrorings::lanes::{LaneChange, LaneTable};
use crate::pipeline;
use crate::record::Recorder;
use crate::replay::Replayer;

/// Where the pipeline's events go: requests to every mirror's replayer, a batch at a time;
/// live responses to the comparison; connections to capture whole to the kernel.
pub(super) struct PipelineEvents {
    /// Tells and counts where each request was read.
    pub(super) read_at: Provenance,
    /// The recording stage; dropped (its last block written) when the pipeline ends.
    pub(super) recording: Option<Recorder>,
    replayers: Vec<Replayer>,
    requests: Vec<Request>,
    live: Comparison,
    full_responses: Option<FullResponses>,
    /// The declared mirrorings' lanes.
    lanes: LaneTable,
}

impl PipelineEvents {
    pub(super) fn new(
        cfg: &AgentConfig,
        mirrors: &[Mirror],
        comparison: &Comparison,
        capture: &mut Capture,
        lanes: std::sync::mpsc::Receiver<LaneChange>,
    ) -> Result<PipelineEvents> {
        let recording = cfg
            .record
            .clone()
            .map(Recorder::start)
            .transpose()
            .map_err(AgentError::Record)?;
        let tls_ports = cfg.capture.tls.as_ref().map(|t| t.ports.clone());
        Ok(PipelineEvents {
            read_at: Provenance::new(tls_ports.unwrap_or_default()),
            recording,
            replayers: mirrors.iter().map(|m| m.replayer.clone()).collect(),
            requests: Vec::new(),
            live: comparison.clone(),
            full_responses: capture.take_full_responses(),
            lanes: LaneTable::new(lanes),
        })
    }
}

impl pipeline::Sink for PipelineEvents {
    fn event(&mut self, event: HttpEvent) {
        // A mirroring declared a moment ago covers the very next request.
        self.lanes.apply_changes();
        match event {
            HttpEvent::Request(r) => {
                let at = self.read_at.count(r.server());
                if let Some(rec) = self.recording.as_mut() {
                    rec.request(&r, at);
                }
                self.lanes.request(&r, at);
                if !self.replayers.is_empty() {
                    self.requests.push(r);
                }
            }
            HttpEvent::Response(m) => {
                self.live.live(&m);
                self.lanes.live(&m);
                if let Some(rec) = self.recording.as_mut() {
                    rec.response(m);
                }
            }
            HttpEvent::ResponseContent(c) => {
                self.live.live_content(&c);
                self.lanes.live_content(&c);
            }
            HttpEvent::FullResponses { client, server } => {
                if let Some(full) = self.full_responses.as_mut() {
                    if let Err(e) = full.insert(client, server) {
                        log::debug!("asking {client} <-> {server} whole: {}", chain(&e));
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        if let Some(rec) = self.recording.as_mut() {
            rec.flush();
        }
        self.lanes.apply_changes();
        self.lanes.flush();
        let Some((last, others)) = self.replayers.split_last() else {
            return;
        };
        if self.requests.is_empty() {
            return;
        }
        // Requests share their bytes: a copy for each other mirror is a reference count.
        for replayer in others {
            replayer.offer(self.requests.iter().cloned());
        }
        last.offer(self.requests.drain(..));
    }
}
