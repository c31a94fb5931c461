//! Shedding: the share of connections the kernel mirrors, set once a second by three limits,
//! the lowest of which applies.
//!
//! - **The live service's CPU pressure** (on by default, `--max-live-pressure`): mirroring uses
//!   spare CPU only. PSI's `some` figure for CPU is the share of time at least one runnable task
//!   of a cgroup waited for a CPU. It is zero while every task of the live service runs when it
//!   wants, however busy the node, and it rises as soon as anything (the agent, the kernel's
//!   clone path, a mirror on the same node, or any other neighbour) takes a CPU the service
//!   wanted. So shedding on it keeps mirroring off the live service's CPU, which a CPU budget on
//!   the agent cannot: the budget caps the agent, not what mirroring costs the node. The
//!   pressure is read from the cgroups of the processes that listen on a mirrored port, or from
//!   the node's `/proc/pressure/cpu` where no such cgroup can be read (cgroup v1, processes in
//!   the root cgroup). Pressure counts while the node's CPU is contended (`spare_gated`): with
//!   half the node idle, waits are wake-up latency or the service's own CPU limit, which
//!   shedding mirroring would not relieve.
//! - **The CPU budget** (`--cpu-budget`, or the cgroup's limit): the agent's own CPU.
//! - **The backlog**: a replay queue or capture ring filling up means the agent (starved of CPU)
//!   or a mirror (slow) does not keep up; shedding whole connections in the kernel then beats
//!   queueing them, which would only grow memory and lose pieces later.
//!
//! Each limit lowers the share of new connections and, as a last resort while long-lived
//! connections carry the load, drops admitted ones; none ever cuts a connection in its middle
//! and resumes it.

pub mod limit;
pub mod live;
pub mod psi;

use std::path::PathBuf;
use std::time::Instant;

use crate::compare::{PressureSeen, Sampling};
use crate::cpu_budget::{CpuBudget, Load, Rates};
use limit::Limit;
pub use live::{Found, LiveService};
use psi::{NodeIdle, PsiFile};

/// The node's CPU pressure, standing in where the live service's cgroups cannot be read.
const NODE_PSI: &str = "/proc/pressure/cpu";
/// Seconds between looks for the live service's processes.
const RESCAN_EVERY: u32 = 10;
/// The backlog (0 to 1: how full the fullest queue is) above which new connections are shed.
pub const MAX_BACKLOG: f64 = 0.25;
/// With at least this share of the node's CPU idle, mirroring takes spare CPU: the live
/// service's pressure is not shed for, and the share may rise. Idle CPU alone does not mean
/// no contention: on this 2-vCPU machine at saturation, with the agent, the node was 18 – 25 %
/// idle while the live service waited for a CPU 17 – 31 % of the time (wake-ups placed on a
/// busy CPU), and at 20k req/s it was over half idle.
const SPARE: f64 = 0.5;
/// Under this idle share the node's CPU is contended: the live service's pressure counts
/// whole. Between the two the share holds.
const NO_SPARE: f64 = 0.35;

/// The pressure the limit acts on, given the node's idle share: all of it while the node's CPU
/// is contended; with some idle CPU, none that would make it cut (at most three quarters of the
/// threshold, where the share holds); with ample idle CPU, none that would keep it from rising
/// (at most 0.4 of it).
pub fn spare_gated(pressure: f64, idle: Option<f64>, threshold: f64) -> f64 {
    match idle {
        Some(i) if i >= SPARE => pressure.min(0.4 * threshold),
        Some(i) if i >= NO_SPARE => pressure.min(0.75 * threshold),
        _ => pressure,
    }
}

#[derive(Clone, Debug)]
pub struct SheddingConfig {
    /// The `--sample` share, in parts per million: the ceiling of every limit.
    pub max_ppm: u32,
    /// Keep the agent under this many cores.
    pub cpu_budget: Option<f64>,
    /// Shed while the live service's CPU pressure is above this share of time (0 to 1).
    pub max_live_pressure: Option<f64>,
    pub live: LiveService,
}

#[derive(Debug)]
pub struct Shedding {
    budget: Option<CpuBudget>,
    pressure: Option<LivePressure>,
    backlog: Limit,
    applied: Rates,
    /// Segments mirrored, and of long-lived connections, at the last look.
    segments: Option<(u64, u64)>,
}

impl Shedding {
    /// The limits configured; the log says why the pressure limit is off when PSI cannot be
    /// read on this kernel.
    pub fn new(cfg: &SheddingConfig) -> Shedding {
        let pressure = cfg.max_live_pressure.and_then(|threshold| {
            match PsiFile::new(NODE_PSI.into()).read_total() {
                Ok(_) => Some(LivePressure::new(cfg.live.clone(), threshold, cfg.max_ppm)),
                Err(e) => {
                    log::warn!(
                        "no CPU pressure on this kernel ({NODE_PSI}: {e}): mirroring is not shed \
                         by the live service's pressure; boot with psi=1 (CONFIG_PSI) to have it"
                    );
                    None
                }
            }
        });
        Shedding {
            budget: cfg.cpu_budget.map(|c| CpuBudget::new(c, cfg.max_ppm)),
            pressure,
            backlog: Limit::new(MAX_BACKLOG, cfg.max_ppm),
            applied: Rates {
                new: cfg.max_ppm,
                keep_admitted: 1_000_000,
            },
            segments: None,
        }
    }

    /// A selected pod is mirrored: its address and UID identify the live service too.
    pub fn follow_pod(&mut self, ip: std::net::IpAddr, uid: Option<String>) {
        if let Some(p) = self.pressure.as_mut() {
            p.live.addrs.push(ip);
            p.live.pod_uids.extend(uid.map(|u| (ip, u)));
            p.rescan_in = 0;
        }
    }

    /// A selected pod is gone.
    pub fn forget_pod(&mut self, ip: std::net::IpAddr) {
        if let Some(p) = self.pressure.as_mut() {
            p.live.addrs.retain(|a| *a != ip);
            p.live.pod_uids.retain(|(a, _)| *a != ip);
            p.rescan_in = 0;
        }
    }

    /// One second's look: returns the kernel's new rates when they change.
    pub fn tick(&mut self, load: Load) -> Option<Rates> {
        let now = (load.segments, load.long_lived_segments);
        let (segments, long_lived) = self.segments.replace(now).map_or((0, 0), |prev| {
            (now.0.saturating_sub(prev.0), now.1.saturating_sub(prev.1))
        });
        let admitted_carry_load = segments > 0 && long_lived * 2 >= segments;
        let mut rates = vec![self.backlog.observe(load.backlog, admitted_carry_load)];
        if let Some(b) = self.budget.as_mut() {
            b.observe(load);
            rates.push(Rates {
                new: b.ppm(),
                keep_admitted: b.keep_admitted(),
            });
        }
        if let Some(p) = self.pressure.as_mut() {
            rates.push(p.tick(load.at, admitted_carry_load));
        }
        let lowest = Rates {
            new: rates.iter().map(|r| r.new).min()?,
            keep_admitted: rates.iter().map(|r| r.keep_admitted).min()?,
        };
        (lowest != self.applied).then(|| {
            self.applied = lowest;
            lowest
        })
    }

    /// What the report and metrics show.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            share: f64::from(self.applied.new) / 1e6,
            cpu_budget: self.budget.as_ref().map(CpuBudget::cores),
            cpu_used: self.budget.as_ref().map_or(0.0, CpuBudget::used),
            live_path_used: self.budget.as_ref().map_or(0.0, CpuBudget::used_live_path),
            pressure: self.pressure.as_ref().map(LivePressure::seen),
            backlog_share: f64::from(self.backlog.rates().new) / 1e6,
        }
    }

    /// For the log: each limit and the share it allows.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(b) = &self.budget {
            parts.push(format!(
                "CPU budget {:.2} cores (used {:.2}, {:.2} of it in the live path) allows {:.1} %",
                b.cores(),
                b.used(),
                b.used_live_path(),
                f64::from(b.ppm()) / 1e4
            ));
        }
        if let Some(p) = &self.pressure {
            let seen = p.seen();
            parts.push(format!(
                "live CPU pressure {:.1} % ({}; limit {:.0} %; node {}) allows {:.1} %",
                seen.pressure * 100.0,
                seen.source(),
                seen.threshold * 100.0,
                seen.idle_words(),
                f64::from(p.limit.rates().new) / 1e4
            ));
        }
        parts.push(format!(
            "backlog allows {:.1} %",
            f64::from(self.backlog.rates().new) / 1e4
        ));
        parts.join("; ")
    }
}

/// The live service's CPU pressure, and the limit on it.
#[derive(Debug)]
struct LivePressure {
    live: LiveService,
    limit: Limit,
    found: Found,
    files: Vec<PsiFile>,
    rescan_in: u32,
    /// The pressure seen, smoothed over about two seconds (a one-second PSI reading is noisy).
    smoothed: f64,
    idle: NodeIdle,
    /// The node's idle CPU share over the last second.
    idle_share: Option<f64>,
}

impl LivePressure {
    fn new(live: LiveService, threshold: f64, max_ppm: u32) -> LivePressure {
        LivePressure {
            live,
            limit: Limit::new(threshold, max_ppm),
            found: Found::Node("not looked for yet"),
            files: Vec::new(),
            rescan_in: 0,
            smoothed: 0.0,
            idle: NodeIdle::default(),
            idle_share: None,
        }
    }

    fn tick(&mut self, now: Instant, admitted_carry_load: bool) -> Rates {
        if self.rescan_in == 0 {
            self.rescan();
        }
        self.rescan_in = self.rescan_in.saturating_sub(1);
        // Two ticks within one jiffy measure nothing: the last share stands (reported as not
        // measured only before the first).
        self.idle_share = self.idle.sample().or(self.idle_share);
        let samples: Vec<f64> = self
            .files
            .iter_mut()
            .filter_map(|f| f.sample(now))
            .collect();
        if samples.is_empty() {
            // A first read, or the cgroups went away: look again next second.
            if self.files.iter().all(|f| f.read_total().is_err()) {
                self.rescan_in = 0;
            }
            return self.limit.rates();
        }
        let worst = samples.into_iter().fold(0.0, f64::max);
        self.smoothed = 0.5 * self.smoothed + 0.5 * worst;
        let gated = spare_gated(self.smoothed, self.idle_share, self.limit.threshold());
        self.limit.observe(gated, admitted_carry_load)
    }

    /// Finds the live service's cgroups again, keeping the readings of those still there.
    fn rescan(&mut self) {
        self.rescan_in = RESCAN_EVERY;
        let found = self.live.find();
        if found == self.found {
            return;
        }
        let paths: Vec<PathBuf> = match &found {
            Found::Cgroups(files) => files.clone(),
            Found::Node(_) => vec![PathBuf::from(NODE_PSI)],
        };
        match &found {
            Found::Cgroups(files) => log::info!(
                "live CPU pressure: read from {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Found::Node(why) => log::info!("live CPU pressure: the node's ({why})"),
        }
        let mut old: Vec<PsiFile> = std::mem::take(&mut self.files);
        self.files = paths
            .into_iter()
            .map(|p| match old.iter().position(|f| f.path() == p) {
                Some(i) => old.swap_remove(i),
                None => PsiFile::new(p),
            })
            .collect();
        self.found = found;
    }

    fn seen(&self) -> PressureSeen {
        PressureSeen {
            pressure: self.smoothed,
            threshold: self.limit.threshold(),
            cgroups: match &self.found {
                Found::Cgroups(f) => f.len(),
                Found::Node(_) => 0,
            },
            node_idle: self.idle_share,
            share: f64::from(self.limit.rates().new) / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_counts_only_while_the_node_has_no_spare_cpu() {
        let t = 0.1;
        // Contended (or unknown): all of it, even with a fifth of the node idle.
        assert_eq!(spare_gated(0.3, Some(0.01), t), 0.3);
        assert_eq!(spare_gated(0.3, Some(0.2), t), 0.3);
        assert_eq!(spare_gated(0.3, None, t), 0.3);
        // Some idle CPU: never a cut, the share holds.
        let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(near(spare_gated(0.3, Some(0.4), t), 0.075));
        // Over half the node idle: the share may rise; low pressure stays what it is.
        assert!(near(spare_gated(0.3, Some(0.6), t), 0.04));
        assert_eq!(spare_gated(0.01, Some(0.6), t), 0.01);
    }
}
