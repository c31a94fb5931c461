//! The stages' counters as Prometheus families, made from each stage's one declaration
//! (`mirror_core::stage_counters!`): its metric names, labels and help live beside its fields.
//! `deploy/metrics.txt` lists the result, and a test keeps the two equal, so that a metric that
//! dashboards and alerts use is renamed only on purpose.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use mirror_core::counters::{Counters, Kind, Read};

use crate::capture::CaptureStats;
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

    /// Every counter a stage declares, as it declares them.
    pub fn stage<S: Counters>(&mut self, stats: &S) {
        for (d, value) in S::DECLARED.iter().zip(stats.values()) {
            let kind = match d.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            self.add(d.metric, d.help, kind, d.label, value);
        }
    }

    /// One mirror's stage: its samples carry the mirror's name, and that of the declared
    /// mirroring it is a candidate of.
    pub fn stage_of<S: Counters>(&mut self, mirroring: Option<&str>, mirror: &str, stats: &S) {
        let labels = mirroring
            .map(|m| ("mirroring", m.to_string()))
            .into_iter()
            .chain([("mirror", mirror.to_string())])
            .collect();
        self.stage_with(labels, stats);
    }

    /// A stage's counters, each sample carrying `labels` first.
    pub fn stage_with<S: Counters>(&mut self, labels: Labels, stats: &S) {
        self.base = labels;
        self.stage(stats);
        self.base.clear();
    }

    pub fn encode(self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        for f in self.list {
            let mut m = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            let gauge = matches!(f.kind, MetricType::Gauge);
            for (labels, n) in &f.samples {
                // A family of one sample without labels: the descriptor's encoder takes it
                // directly (an empty label set beside labelled samples is encoded as one).
                if labels.is_empty() && f.samples.len() == 1 {
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

/// The capture's counters, after its frame errors (one family, by the errors' own enum).
pub fn capture(out: &mut Families, s: &CaptureStats) {
    for (e, n) in FrameError::ALL.iter().zip(&s.frame_errors) {
        out.add(
            "mirror_capture_frame_errors",
            "Captured frames that did not parse, by reason",
            MetricType::Counter,
            Some(("reason", e.name())),
            n.read(),
        );
    }
    out.stage(s);
}
