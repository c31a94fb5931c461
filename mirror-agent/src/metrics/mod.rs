//! `--metrics <ADDR>`: Prometheus text on `/metrics`, the comparison as JSON on `/report`.
//!
//! Everything is rendered at scrape time from the stages' own state (prometheus-client
//! `Collector`), so no number is kept twice: the comparison's series, and every capture,
//! reassembly, parse and replay counter, with drop reasons and error kinds as labels.

mod serve;
mod stages;

pub use serve::serve;

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use self::stages::Families;
use crate::capture::CaptureStats;
use crate::compare::{Comparison, Report, Sampling, SeriesHistogram};
use crate::pipeline::PipelineStats;
use crate::replay::ReplayStats;

/// What the agent exports; each part is owned by its stage and only read here.
#[derive(Clone)]
pub struct Sources {
    /// Pods mirrored now (`--selector`).
    pub pods: crate::pods::MirroredPods,
    pub comparison: Comparison,
    pub capture: Option<Arc<CaptureStats>>,
    /// What the kernel program reports, refreshed by the agent's main loop.
    pub kernel: Arc<Mutex<crate::capture::KernelReport>>,
    pub pipeline: Arc<Mutex<PipelineStats>>,
    /// Each mirror's name and replay counters.
    pub replay: Vec<(String, Arc<ReplayStats>)>,
    /// The recording stage's counters (`--record`).
    pub record: Option<Arc<crate::record::RecordStats>>,
    /// The TLS probes (`--tls-port`): what became of their records, and their kernel side.
    pub tls: Option<TlsSources>,
    /// Requests by where they were read.
    pub read_at: crate::capture::read_at::Provenance,
    /// The declared mirrorings (`--config`), each with its own comparison and candidates.
    pub lanes: crate::mirrorings::LaneViews,
}

/// A comparison's state at a scrape; a declared mirroring's carries its key as a label.
struct Table {
    mirroring: Option<String>,
    report: Report,
    hists: Vec<SeriesHistogram>,
}

impl Table {
    /// `labels`, after the mirroring's.
    fn labels<'a>(&'a self, labels: &[(&'static str, &'a str)]) -> Vec<(&'static str, &'a str)> {
        let mut out: Vec<_> = self
            .mirroring
            .iter()
            .map(|m| ("mirroring", m.as_str()))
            .collect();
        out.extend_from_slice(labels);
        out
    }
}

/// What `/metrics` reads of the TLS probes.
#[derive(Clone, Debug, Default)]
pub struct TlsSources {
    pub stats: Arc<crate::capture::tls::streams::TlsStats>,
    /// Refreshed by the agent's main loop.
    pub report: Arc<Mutex<crate::capture::TlsReport>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let (report, hists) = self.comparison.snapshot();
        let lanes = self.lanes.lock().unwrap().clone();
        let mut tables = vec![Table {
            mirroring: None,
            report,
            hists,
        }];
        for lane in lanes {
            let (report, hists) = lane.comparison.snapshot();
            tables.push(Table {
                mirroring: Some(lane.key),
                report,
                hists,
            });
        }
        encode_info(&mut encoder)?;
        encode_series(&mut encoder, &tables)?;
        encode_content(&mut encoder, &tables)?;
        encode_compare_state(&mut encoder, &tables[0].report)?;
        self.encode_kernel_and_pods(&mut encoder)?;
        self.encode_stages(&mut encoder)
    }
}

impl Sources {
    fn encode_kernel_and_pods(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let kernel = self.kernel.lock().unwrap().clone();
        let mut m = encoder.encode_descriptor(
            "mirror_requests_read",
            "Requests extracted, by where they were read: wire, in_pod (a pod's lo), tls_library",
            None,
            MetricType::Counter,
        )?;
        for (at, n) in self.read_at.requests() {
            ConstCounter::new(n).encode(m.encode_family(&[("read_at", at.label())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "mirror_kernel_packets",
            "Packets seen by the TC program, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (name, n) in kernel.packets {
            ConstCounter::new(n).encode(m.encode_family(&[("outcome", name)])?)?;
        }
        let m = encoder.encode_descriptor(
            "mirror_kernel_work_seconds",
            "Time the TC program spent mirroring in the live path (clones, records), all CPUs",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(kernel.work.as_secs_f64()).encode(m)?;
        if let Some(t) = &self.tls {
            encode_tls(encoder, &t.report.lock().unwrap())?;
        }
        let pods = self.pods.lock().unwrap().clone();
        let m = encoder.encode_descriptor(
            "mirror_pods_mirrored",
            "Pods mirrored now (--selector)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(pods.mirrored.len() as i64).encode(m)?;
        let mut m = encoder.encode_descriptor(
            "mirror_pod",
            "A pod mirrored now: its address, where it is read (wire: its host veth; in_pod: \
             its lo, inside its namespace) and its mesh",
            None,
            MetricType::Gauge,
        )?;
        for p in &pods.mirrored {
            let ip = p.ip.to_string();
            let labels = [
                ("pod", p.pod.as_str()),
                ("ip", ip.as_str()),
                ("interface", p.iface.as_str()),
                ("read_at", if p.in_pod { "in_pod" } else { "wire" }),
                ("mesh", p.mesh.map_or("none", crate::pods::Mesh::label)),
            ];
            ConstGauge::new(1).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "mirror_pod_attach_failures",
            "Pods that could not be attached, by reason (netns_not_found, no_local_route, \
             permission, interface_busy, netns_unenterable, other)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &pods.attach_failures {
            ConstCounter::new(*n).encode(m.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }

    /// Every stage's declared counters.
    fn encode_stages(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let p = self.pipeline.lock().unwrap().clone();
        let mut stages = Families::default();
        if let Some(c) = &self.capture {
            stages::capture(&mut stages, c);
        }
        if let Some(t) = &self.tls {
            stages.stage(t.stats.as_ref());
        }
        stages.stage(&p.reassembly);
        stages.stage(&p.http);
        stages.encode(encoder)?;
        {
            let m = encoder.encode_descriptor(
                "mirror_reassembly_flows",
                "Connections tracked now",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(p.flows as i64).encode(m)?;
        }
        let mut replay = Families::default();
        for (name, r) in &self.replay {
            replay.stage_of(None, name, r.as_ref());
        }
        for lane in self.lanes.lock().unwrap().iter() {
            for (name, r) in &lane.replay {
                replay.stage_of(Some(&lane.key), name, r.as_ref());
            }
        }
        replay.encode(encoder)?;
        let mut record = Families::default();
        if let Some(r) = &self.record {
            record.stage(r.as_ref());
        }
        for lane in self.lanes.lock().unwrap().iter() {
            if let Some(r) = &lane.record {
                record.stage_with(vec![("mirroring", lane.key.clone())], r.as_ref());
            }
        }
        record.encode(encoder)?;
        Ok(())
    }
}

/// The TLS probes' kernel side: calls by outcome, and what they are attached to.
fn encode_tls(encoder: &mut DescriptorEncoder, r: &crate::capture::TlsReport) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(
        "mirror_tls_kernel_events",
        "What the TLS probes saw in the kernel, by outcome (calls, bytes, no_socket: a memory \
         BIO, ring_full, too_long, read_failed)",
        None,
        MetricType::Counter,
    )?;
    for (name, n) in &r.kernel {
        ConstCounter::new(*n).encode(m.encode_family(&[("outcome", *name)])?)?;
    }
    let m = encoder.encode_descriptor(
        "mirror_tls_processes",
        "Processes whose TLS calls are read now",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(r.processes as i64).encode(m)?;
    let m = encoder.encode_descriptor(
        "mirror_tls_libraries",
        "TLS library files the probes are attached to",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(r.libraries as i64).encode(m)?;
    let m = encoder.encode_descriptor(
        "mirror_tls_libraries_refused",
        "TLS library files found but not attached (no SSL_read/SSL_write symbols, or the \
         kernel refused the probe): their processes' TLS is not read",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(r.refused as i64).encode(m)?;
    Ok(())
}

/// When the agent started (Unix seconds): set when it starts serving metrics.
static STARTED: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

fn started() -> f64 {
    *STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    })
}

/// The agent's version, so that a fleet report can tell agents apart that export different
/// series, and its start time, so that it can tell a restart from counters that only grew.
fn encode_info(encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let m = encoder.encode_descriptor(
        "process_start_time_seconds",
        "When the agent started, in Unix seconds",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(started()).encode(m)?;
    let mut m = encoder.encode_descriptor(
        "mirror_agent_info",
        "1, labelled with the agent's version",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(1).encode(m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)
}

/// The comparison's series: requests and durations by endpoint, version and code, status
/// mismatches and latency ratios by mirror.
fn encode_series(encoder: &mut DescriptorEncoder, tables: &[Table]) -> std::fmt::Result {
    {
        let mut m = encoder.encode_descriptor(
            "mirror_requests",
            "Requests by endpoint, version tag and result code",
            None,
            MetricType::Counter,
        )?;
        for t in tables {
            for r in &t.report.rows {
                let labels = t.labels(&[
                    ("endpoint", r.name.as_str()),
                    ("version", r.version.as_str()),
                    ("code", r.code.as_str()),
                ]);
                ConstCounter::new(r.count).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "mirror_request_duration_seconds",
            "Live: last request byte to first response byte; mirror: request sent to response head",
            None,
            MetricType::Histogram,
        )?;
        for t in tables {
            for h in &t.hists {
                let labels = t.labels(&[
                    ("endpoint", h.name.as_str()),
                    ("version", h.version.as_str()),
                    ("code", h.code.as_str()),
                ]);
                m.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        h.sum_seconds,
                        h.count,
                        &h.buckets,
                        None,
                    )?;
            }
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "mirror_status_mismatch",
            "Mirrored requests whose status differed from the live response",
            None,
            MetricType::Counter,
        )?;
        for t in tables {
            for x in &t.report.mismatches {
                let labels = t.labels(&[
                    ("endpoint", x.name.as_str()),
                    ("mirror", x.mirror.as_str()),
                    ("live_code", x.live_code.as_str()),
                    ("mirror_code", x.mirror_code.as_str()),
                ]);
                ConstCounter::new(x.count).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    encode_paired(encoder, tables)?;
    {
        let mut m = encoder.encode_descriptor(
            "mirror_latency_ratio",
            "Mean mirror/live duration over paired requests",
            None,
            MetricType::Gauge,
        )?;
        for t in tables {
            for x in &t.report.latency_ratios {
                let labels =
                    t.labels(&[("endpoint", x.name.as_str()), ("mirror", x.mirror.as_str())]);
                ConstGauge::new(x.mean_ratio).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

/// Requests paired with their live response, per endpoint and mirror: with the mismatches,
/// what the fleet's verdicts need ("×N of M paired", summed over agents).
fn encode_paired(encoder: &mut DescriptorEncoder, tables: &[Table]) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(
        "mirror_paired",
        "Mirrored requests paired with their live response, by endpoint and mirror",
        None,
        MetricType::Counter,
    )?;
    for t in tables {
        for p in &t.report.paired {
            let labels = t.labels(&[("endpoint", p.name.as_str()), ("mirror", p.mirror.as_str())]);
            ConstCounter::new(p.count).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// What content comparison found (`--compare-bodies`).
fn encode_content(encoder: &mut DescriptorEncoder, tables: &[Table]) -> std::fmt::Result {
    if tables.iter().any(|t| !t.report.content.is_empty()) {
        let mut m = encoder.encode_descriptor(
            "mirror_content_compared",
            "Mirror answers whose content was compared with live's, by result",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in contents(tables) {
            for (result, n) in [("identical", c.identical), ("differing", c.differing)] {
                let labels = t.labels(&[
                    ("endpoint", c.name.as_str()),
                    ("mirror", c.mirror.as_str()),
                    ("result", result),
                ]);
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        // Paths are capped per endpoint and mirror (the rest as `other`), endpoints by
        // --max-endpoints: the cardinality is bounded.
        let mut m = encoder.encode_descriptor(
            "mirror_content_field_differences",
            "Compared answers where a field differed from live's",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in contents(tables) {
            for f in &c.fields {
                let labels = t.labels(&[
                    ("endpoint", c.name.as_str()),
                    ("mirror", c.mirror.as_str()),
                    ("path", f.path.as_str()),
                ]);
                ConstCounter::new(f.differing).encode(m.encode_family(&labels)?)?;
            }
        }
        encode_field_rates(encoder, tables)?;
    }
    let not_compared: Vec<_> = tables
        .iter()
        .filter_map(|t| t.report.content_not_compared.as_ref().map(|n| (t, n)))
        .collect();
    if !not_compared.is_empty() {
        let mut m = encoder.encode_descriptor(
            "mirror_content_not_compared",
            "Answers whose content could not be compared, by reason",
            None,
            MetricType::Counter,
        )?;
        for (t, n) in not_compared {
            for (reason, v) in [
                ("mirror_failed", n.mirror_failed),
                ("unsupported", n.unsupported),
                ("no_live", n.no_live),
                ("memory", n.memory),
                ("busy", n.busy),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&t.labels(&[("reason", reason)]))?)?;
            }
        }
    }
    Ok(())
}

/// Each compared field's noise rate, and whether it differs beyond its noise.
/// Each table's content rows, with their table.
fn contents(
    tables: &[Table],
) -> impl Iterator<Item = (&Table, &crate::compare::diffs::ContentRow)> {
    tables
        .iter()
        .flat_map(|t| t.report.content.iter().map(move |c| (t, c)))
}

fn encode_field_rates(encoder: &mut DescriptorEncoder, tables: &[Table]) -> std::fmt::Result {
    for (name, help, value) in [
        (
            "mirror_content_field_noise_ratio",
            "A field's noise rate: how often it differs where nothing changed",
            (|f: &crate::compare::diffs::FieldRow| f.noise_rate)
                as fn(&crate::compare::diffs::FieldRow) -> f64,
        ),
        (
            "mirror_content_field_regression",
            "1 where a field's difference rate exceeds its noise (a candidate regression)",
            |f| f64::from(u8::from(f.regression)),
        ),
    ] {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (t, c) in contents(tables) {
            for f in &c.fields {
                let labels = t.labels(&[
                    ("endpoint", c.name.as_str()),
                    ("mirror", c.mirror.as_str()),
                    ("path", f.path.as_str()),
                ]);
                ConstGauge::new(value(f)).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

/// The share of connections mirrored and each limit's view: the CPU budget, the live service's
/// CPU pressure, the backlog. A limit that is off has no series.
fn encode_sampling(encoder: &mut DescriptorEncoder, s: &Sampling) -> std::fmt::Result {
    let mut gauges = vec![
        (
            "mirror_sampled_connections_share",
            "Share of new connections mirrored, the lowest that the limits allow (0 to 1)",
            s.share,
        ),
        (
            "mirror_backlog_limit_share",
            "Share of new connections the backlog limit allows (a replay queue or the capture ring filling up)",
            s.backlog_share,
        ),
    ];
    if let Some(cores) = s.cpu_budget {
        gauges.extend([
            (
                "mirror_cpu_budget_cores",
                "The agent's CPU budget (--cpu-budget)",
                cores,
            ),
            (
                "mirror_agent_cpu_cores",
                "The agent's CPU use over the last second, in cores, its kernel program's work in the live path included",
                s.cpu_used,
            ),
            (
                "mirror_agent_live_path_cpu_cores",
                "Of mirror_agent_cpu_cores, the kernel program's work in the live path (clones, records)",
                s.live_path_used,
            ),
        ]);
    }
    if let Some(p) = &s.pressure {
        gauges.extend([
            (
                "mirror_live_cpu_pressure",
                "Share of time some task of the live service waited for a CPU (PSI some, smoothed over about 2 s)",
                p.pressure,
            ),
            (
                "mirror_live_cpu_pressure_threshold",
                "Above this live CPU pressure new connections are shed (--max-live-pressure)",
                p.threshold,
            ),
            (
                "mirror_live_cpu_pressure_cgroups",
                "Live cgroups whose pressure is read; 0: the node's pressure stands for them",
                p.cgroups as f64,
            ),
            (
                "mirror_live_cpu_pressure_limit_share",
                "Share of new connections the live CPU pressure limit allows",
                p.share,
            ),
            (
                "mirror_node_cpu_idle",
                "The node's idle CPU share over the last second: with spare CPU, the live CPU pressure is not shed for",
                // NaN (valid in the exposition format) until a second has been measured.
                p.node_idle.unwrap_or(f64::NAN),
            ),
        ]);
    }
    for (name, help, value) in gauges {
        let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(m)?;
    }
    Ok(())
}

/// The comparison's own state: sampling under the limits, and what its caps folded.
fn encode_compare_state(encoder: &mut DescriptorEncoder, report: &Report) -> std::fmt::Result {
    if let Some(sampling) = &report.sampling {
        encode_sampling(encoder, sampling)?;
    }
    let m = encoder.encode_descriptor(
        "mirror_compare_other_endpoint",
        "Results folded into `other` by the endpoint cap",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(report.other_endpoint_results).encode(m)?;
    let m = encoder.encode_descriptor(
        "mirror_compare_other_series",
        "Results folded into `other` series by the series cap (--memory-budget)",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(report.other_series_results).encode(m)?;
    let m = encoder.encode_descriptor(
        "mirror_compare_unpaired_evicted",
        "Live or mirror results evicted before pairing",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(report.unpaired_evicted).encode(m)?;
    Ok(())
}

/// Prometheus text for the current state.
pub fn render(sources: &Sources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources.clone()));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests;
