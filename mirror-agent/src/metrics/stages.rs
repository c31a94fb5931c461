//! The stages' counters as Prometheus families, each named here explicitly: a stats field
//! renamed in its stage fails to compile here instead of renaming a metric that dashboards and
//! alerts use. `deploy/metrics.txt` lists the result.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::capture::CaptureStats;
use crate::http::HttpStats;
use crate::reassembly::ReassemblyStats;
use crate::replay::ReplayStats;
use crate::segment::FrameError;

type Labels = Vec<(&'static str, String)>;

struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, u64)>,
}

/// Families in the order first named, each with its samples; several instances of a stage
/// (the mirrors) add to the same families under their own label.
#[derive(Default)]
pub struct Families {
    list: Vec<Family>,
    /// Labels every sample added now carries (the instance).
    base: Labels,
}

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        label: Option<(&'static str, &'static str)>,
        value: u64,
    ) {
        let mut labels = self.base.clone();
        labels.extend(label.map(|(k, v)| (k, v.to_string())));
        let at = match self.list.iter().position(|f| f.name == name) {
            Some(at) => at,
            None => {
                self.list.push(Family {
                    name,
                    help,
                    kind,
                    samples: Vec::new(),
                });
                self.list.len() - 1
            }
        };
        self.list[at].samples.push((labels, value));
    }

    fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.add(name, help, MetricType::Counter, None, value);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.add(name, help, MetricType::Gauge, None, value);
    }

    /// One counter family with a label telling its parts apart (`reason`, `kind`).
    fn by(
        &mut self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        parts: &[(&'static str, u64)],
    ) {
        for (part, value) in parts {
            self.add(name, help, MetricType::Counter, Some((label, part)), *value);
        }
    }

    pub fn encode(self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        for f in self.list {
            let mut m = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            let gauge = matches!(f.kind, MetricType::Gauge);
            for (labels, n) in &f.samples {
                if labels.is_empty() {
                    // A sample without labels: the descriptor's encoder takes it directly.
                    if gauge {
                        ConstGauge::new(*n as i64).encode(m)?;
                    } else {
                        ConstCounter::new(*n).encode(m)?;
                    }
                    break;
                }
                if gauge {
                    ConstGauge::new(*n as i64).encode(m.encode_family(labels)?)?;
                } else {
                    ConstCounter::new(*n).encode(m.encode_family(labels)?)?;
                }
            }
        }
        Ok(())
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub fn capture(out: &mut Families, s: &CaptureStats) {
    let errors: Vec<(&'static str, u64)> = FrameError::ALL
        .iter()
        .zip(&s.frame_errors)
        .map(|(e, n)| (e.name(), get(n)))
        .collect();
    out.by(
        "mirror_capture_frame_errors",
        "Captured frames that did not parse, by reason",
        "reason",
        &errors,
    );
    out.counter(
        "mirror_capture_bytes",
        "Bytes of frames read from the capture ring",
        get(&s.bytes),
    );
    out.counter(
        "mirror_capture_frames",
        "Frames read from the capture ring",
        get(&s.frames),
    );
    out.counter(
        "mirror_capture_head_records",
        "Records read from the response-head ring (heads and clone marks)",
        get(&s.head_records),
    );
    out.counter(
        "mirror_capture_marks_unmatched",
        "Clone marks whose clone never came (the capture ring was full)",
        get(&s.marks_unmatched),
    );
    out.counter(
        "mirror_capture_request_starts",
        "Segments towards the service that start like a request",
        get(&s.request_starts),
    );
    out.counter(
        "mirror_capture_requests_lost",
        "Requests whose first segment the kernel cloned but the agent never received",
        get(&s.requests_lost),
    );
    out.counter(
        "mirror_capture_ring_drops",
        "Frames the kernel could not put in the capture ring (it was full)",
        get(&s.ring_drops),
    );
    out.counter(
        "mirror_capture_ring_freezes",
        "Times the kernel froze the capture ring's queue because every block was full",
        get(&s.ring_freezes),
    );
    out.counter(
        "mirror_capture_ring_packets",
        "Packets the kernel delivered to the capture socket",
        get(&s.ring_packets),
    );
    out.counter(
        "mirror_capture_segments",
        "TCP segments handed to reassembly",
        get(&s.segments),
    );
    out.counter(
        "mirror_capture_truncated",
        "Frames cut short by the ring's frame size",
        get(&s.truncated),
    );
}

pub fn reassembly(out: &mut Families, s: &ReassemblyStats) {
    for (name, help, value) in [
        (
            "mirror_reassembly_after_close_segments",
            "Segments of a connection already closed (late retransmissions), ignored",
            s.after_close_segments,
        ),
        (
            "mirror_reassembly_closed_fin",
            "Connections closed by FIN",
            s.closed_fin,
        ),
        (
            "mirror_reassembly_closed_rst",
            "Connections closed by RST",
            s.closed_rst,
        ),
        (
            "mirror_reassembly_connections",
            "Connections tracked since the start",
            s.connections,
        ),
        (
            "mirror_reassembly_delivered_bytes",
            "Payload bytes delivered in order to the parse stage",
            s.delivered_bytes,
        ),
        (
            "mirror_reassembly_discarded_bytes",
            "Payload bytes of segments after their connection closed",
            s.discarded_bytes,
        ),
        (
            "mirror_reassembly_duplicate_bytes",
            "Bytes that arrived again (retransmissions, overlaps); the first copy kept",
            s.duplicate_bytes,
        ),
        (
            "mirror_reassembly_duplicate_syns",
            "Retransmitted SYNs (same initial sequence number)",
            s.duplicate_syns,
        ),
        (
            "mirror_reassembly_elided_bytes",
            "Payload bytes described but not captured (response bodies)",
            s.elided_bytes,
        ),
        (
            "mirror_reassembly_evicted_full",
            "Connections evicted because the flow table was full",
            s.evicted_full,
        ),
        (
            "mirror_reassembly_evicted_idle",
            "Connections evicted after going idle",
            s.evicted_idle,
        ),
        (
            "mirror_reassembly_holes_overflow",
            "Holes given up on because out-of-order memory ran out",
            s.holes_overflow,
        ),
        (
            "mirror_reassembly_holes_timeout",
            "Holes given up on after waiting for the missing bytes",
            s.holes_timeout,
        ),
        (
            "mirror_reassembly_late_syns",
            "SYNs that arrived after their connection's first bytes",
            s.late_syns,
        ),
        (
            "mirror_reassembly_long_lived_segments",
            "Segments of connections seen for 2 s or more, which shedding new connections does not remove",
            s.long_lived_segments,
        ),
        (
            "mirror_reassembly_lost_bytes",
            "Sequence space never seen inside a connection",
            s.lost_bytes,
        ),
        (
            "mirror_reassembly_midstream_joins",
            "Connections joined after their start",
            s.midstream_joins,
        ),
    ] {
        out.counter(name, help, value);
    }
    out.gauge(
        "mirror_reassembly_ooo_bytes_held",
        "Out-of-order bytes held now",
        s.ooo_bytes_held,
    );
    for (name, help, value) in [
        (
            "mirror_reassembly_out_of_order_segments",
            "Segments that arrived ahead of a hole",
            s.out_of_order_segments,
        ),
        (
            "mirror_reassembly_overlap_conflicts",
            "Overlapping copies whose bytes differed from the first copy",
            s.overlap_conflicts,
        ),
        (
            "mirror_reassembly_payload_bytes",
            "Payload bytes handed in (captured or elided)",
            s.payload_bytes,
        ),
        (
            "mirror_reassembly_segments",
            "Segments handed in",
            s.segments,
        ),
        (
            "mirror_reassembly_superseded_by_syn",
            "Connections ended because a SYN reused their 4-tuple",
            s.superseded_by_syn,
        ),
        (
            "mirror_reassembly_superseded_without_syn",
            "Connections ended because bytes beyond their FIN or a sequence jump reused their 4-tuple",
            s.superseded_without_syn,
        ),
    ] {
        out.counter(name, help, value);
    }
}

pub fn http(out: &mut Families, s: &HttpStats) {
    out.gauge(
        "mirror_http_buffered_bytes",
        "Request bytes buffered now",
        s.buffered_bytes,
    );
    out.counter(
        "mirror_http_content_incomplete",
        "Live responses whose content could not be kept whole for comparison",
        s.content_incomplete,
    );
    out.counter(
        "mirror_http_content_responses",
        "Live responses read whole for content comparison",
        s.content_responses,
    );
    out.by(
        "mirror_http_dropped",
        "Requests the parse stage dropped, by reason",
        "reason",
        &[
            ("expect_rejected", s.dropped_expect_rejected),
            ("gap", s.dropped_gap),
            ("h2_streams_over_cap", s.dropped_h2_streams_over_cap),
            ("hpack_unknown_index", s.dropped_hpack_unknown_index),
            ("incomplete", s.dropped_incomplete),
            ("malformed", s.dropped_malformed),
            ("memory", s.dropped_memory),
            ("oversize_body", s.dropped_oversize_body),
            ("oversize_head", s.dropped_oversize_head),
            ("stopped", s.dropped_stopped),
        ],
    );
    for (name, help, value) in [
        (
            "mirror_http_early_responses",
            "Responses captured before their request and paired once it arrived",
            s.early_responses,
        ),
        (
            "mirror_http_full_response_connections",
            "Connections whose responses were asked of the kernel whole",
            s.full_response_connections,
        ),
        (
            "mirror_http_h2_connections",
            "HTTP/2 connections seen from their start",
            s.h2_connections,
        ),
        (
            "mirror_http_h2_joined_connections",
            "HTTP/2 connections joined after their start",
            s.h2_joined_connections,
        ),
    ] {
        out.counter(name, help, value);
    }
    out.gauge(
        "mirror_http_h2_open_streams",
        "HTTP/2 streams tracked now",
        s.h2_open_streams,
    );
    for (name, help, value) in [
        (
            "mirror_http_h2_pushes",
            "Server pushes decoded (not replayed)",
            s.h2_pushes,
        ),
        (
            "mirror_http_h2_refused_streams",
            "HTTP/2 requests above the last stream id of the server's GOAWAY",
            s.h2_refused_streams,
        ),
        (
            "mirror_http_h2_reset_streams",
            "HTTP/2 streams reset before their request or response was whole",
            s.h2_reset_streams,
        ),
        (
            "mirror_http_h2_resyncs",
            "Times an HTTP/2 connection's framing was lost and looked for again",
            s.h2_resyncs,
        ),
        (
            "mirror_http_h2_streamed_requests",
            "HTTP/2 requests handed on while their body was still arriving",
            s.h2_streamed_requests,
        ),
    ] {
        out.counter(name, help, value);
    }
    out.gauge(
        "mirror_http_h2_streaming_bytes",
        "Streaming request body bytes handed on and not yet sent",
        s.h2_streaming_bytes,
    );
    for (name, help, value) in [
        (
            "mirror_http_h2_streams_cut",
            "Streamed HTTP/2 requests cut short (the mirror's stream is reset)",
            s.h2_streams_cut,
        ),
        (
            "mirror_http_h2_upgrades",
            "HTTP/2 connections upgraded from HTTP/1.1",
            s.h2_upgrades,
        ),
        (
            "mirror_http_hpack_errors",
            "HTTP/2 header blocks that did not decode",
            s.hpack_errors,
        ),
        (
            "mirror_http_malformed_responses",
            "Responses that did not parse",
            s.malformed_responses,
        ),
        (
            "mirror_http_pending_overflow",
            "Requests no longer awaiting their response: the connection had too many waiting",
            s.pending_overflow,
        ),
        (
            "mirror_http_request_bytes",
            "Bytes of requests extracted",
            s.request_bytes,
        ),
        ("mirror_http_requests", "Requests extracted", s.requests),
        ("mirror_http_responses", "Responses paired", s.responses),
        (
            "mirror_http_responses_unframed_heads",
            "Times response heads could not frame a response stream",
            s.responses_unframed_heads,
        ),
        (
            "mirror_http_resync_skipped_bytes",
            "Bytes skipped while looking for a message start",
            s.resync_skipped_bytes,
        ),
    ] {
        out.counter(name, help, value);
    }
    out.by(
        "mirror_http_stopped",
        "Connections no longer parsed, by reason",
        "reason",
        &[
            ("connect", s.stopped_connect),
            ("tls", s.stopped_tls),
            ("upgrade", s.stopped_upgrade),
        ],
    );
    out.counter(
        "mirror_http_unpaired_requests",
        "Requests whose response could not be told apart after a loss",
        s.unpaired_requests,
    );
    out.counter(
        "mirror_http_unpaired_responses",
        "Responses without a request to pair with",
        s.unpaired_responses,
    );
}

/// One mirror's replay counters, labelled with its name.
pub fn replay(out: &mut Families, mirror: &str, s: &ReplayStats) {
    out.base = vec![("mirror", mirror.to_string())];
    out.counter(
        "mirror_replay_batches",
        "HTTP/1 batches written to the mirror",
        get(&s.batches),
    );
    out.by(
        "mirror_replay_dropped",
        "Requests not sent to the mirror, by reason",
        "reason",
        &[
            ("backoff", get(&s.dropped_backoff)),
            ("queue_full", get(&s.dropped_queue_full)),
            ("rate_limit", get(&s.dropped_rate_limit)),
            ("stopped", get(&s.dropped_at_stop)),
            ("unsendable", get(&s.dropped_unsendable)),
        ],
    );
    out.by(
        "mirror_replay_errors",
        "Requests sent that got no answer, by kind",
        "kind",
        &[
            ("other", get(&s.errors_other)),
            ("refused", get(&s.errors_refused)),
            ("reset", get(&s.errors_reset)),
            ("stopped", get(&s.errors_stopped)),
            ("timeout", get(&s.errors_timeout)),
        ],
    );
    out.counter(
        "mirror_replay_filtered_method",
        "Requests left out by --methods",
        get(&s.filtered_method),
    );
    out.counter(
        "mirror_replay_filtered_path",
        "Requests left out by --path",
        get(&s.filtered_path),
    );
    out.gauge(
        "mirror_replay_inflight",
        "Requests sent and not yet answered",
        get(&s.inflight),
    );
    out.counter(
        "mirror_replay_offered",
        "Requests offered to the replay stage",
        get(&s.offered),
    );
    out.counter(
        "mirror_replay_probe_recoveries",
        "Times the mirror was found back while sending was backing off",
        get(&s.probe_recoveries),
    );
    out.gauge(
        "mirror_replay_queued_bytes",
        "Bytes of requests waiting in the queue",
        get_usize(&s.queued_bytes),
    );
    out.counter(
        "mirror_replay_resent",
        "Requests sent again on a new connection after the mirror closed",
        get(&s.resent),
    );
    out.counter(
        "mirror_replay_responses",
        "Answers from the mirror",
        get(&s.responses),
    );
    out.counter(
        "mirror_replay_sent",
        "Requests sent to the mirror",
        get(&s.sent),
    );
    out.gauge(
        "mirror_replay_workers",
        "Replay workers alive, each with at most one connection to the mirror",
        get_usize(&s.workers),
    );
    out.base.clear();
}

/// The recording stage's counters (`--record`).
pub fn record(out: &mut Families, s: &crate::record::RecordStats) {
    out.counter(
        "mirror_record_blocks",
        "Compressed blocks written to the recording",
        get(&s.blocks),
    );
    out.counter(
        "mirror_record_bytes",
        "Bytes written to the recording (compressed)",
        get(&s.bytes),
    );
    out.by(
        "mirror_record_dropped",
        "Requests and responses not recorded, by reason",
        "reason",
        &[
            ("cut", get(&s.dropped_cut)),
            ("queue_full", get(&s.dropped_queue_full)),
            ("too_large", get(&s.dropped_too_large)),
            ("unsupported", get(&s.dropped_unsupported)),
            ("write_error", get(&s.dropped_write_error)),
        ],
    );
    out.counter(
        "mirror_record_files",
        "Recording files started",
        get(&s.files),
    );
    out.counter(
        "mirror_record_files_removed",
        "Oldest recording files removed to stay under --record-max-size",
        get(&s.files_removed),
    );
    out.by(
        "mirror_record_records",
        "Records written, by kind",
        "kind",
        &[
            ("request", get(&s.requests)),
            ("response", get(&s.responses)),
        ],
    );
}

fn get_usize(c: &AtomicUsize) -> u64 {
    c.load(Ordering::Relaxed) as u64
}
