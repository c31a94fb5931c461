//! The CPU budget: the agent stays under `--cpu-budget` cores by lowering the share of new
//! connections the kernel mirrors, and raises it again when there is headroom.
//!
//! The lever is the kernel's per-connection decision (`FLAG_STICKY_SAMPLING`): a lower rate
//! sheds whole new connections before a single clone of theirs is made, and a connection being
//! mirrored stays mirrored. Once a second the controller looks at the agent's CPU use (its
//! threads, and the time its kernel program spent cloning and recording in the live path, which
//! no cgroup limit of the agent's covers) and its backlog (replay queue, capture ring): over
//! budget or behind, it cuts the rate in proportion; under 70 % of the budget with no backlog,
//! it raises it by a fifth, but not within five seconds of a cut, so that the lag of
//! connection-level shedding does not make it oscillate. `--sample` stays the upper limit.
//! Only when the agent stays over budget for `MUST_DROP_AFTER` seconds in a row, cuts
//! notwithstanding, while most of what it mirrors is of long-lived connections (which keep the
//! load that new ones no longer bring), does it drop admitted connections too: those the
//! current rate would not admit, each for the rest of its life, never to be resumed in its
//! middle.

use std::path::Path;
use std::time::{Duration, Instant};

/// The lowest share kept: one connection in a thousand, so that the comparison never starves.
pub const MIN_PPM: u32 = 1_000;
/// Under this share of the budget (and without backlog), the rate may rise.
const HEADROOM: f64 = 0.7;
/// Seconds after a cut during which the rate does not rise.
const HOLD_AFTER_CUT: u32 = 5;
/// Seconds over budget in a row after which admitted connections are dropped too.
pub const MUST_DROP_AFTER: u32 = 3;
/// Every connection (the kernel's `SAMPLE_ALL`).
const ALL: u32 = 1_000_000;

/// What the controller sees each second.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// The agent's CPU time so far (user and system).
    pub cpu: Duration,
    /// The kernel program's time so far, spent mirroring in the live path.
    pub live_path: Duration,
    pub at: Instant,
    /// How full the fullest stage is, 0 to 1 (1: it is dropping).
    pub backlog: f64,
    /// Segments mirrored so far, and of them those of long-lived connections
    /// (`ReassemblyStats::long_lived_segments`).
    pub segments: u64,
    pub long_lived_segments: u64,
}

#[derive(Debug)]
pub struct CpuBudget {
    cores: f64,
    max_ppm: u32,
    ppm: u32,
    last: Option<Load>,
    hold: u32,
    /// The last second's CPU use, in cores, the live path's included.
    used: f64,
    /// Of `used`, the kernel program's work in the live path.
    used_live_path: f64,
    /// Seconds over budget, or losing data, in a row.
    over: u32,
    /// Admitted connections kept: `ALL`, or the rate while the agent must drop.
    keep_admitted: u32,
}

/// The kernel's two rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rates {
    /// Share of new connections mirrored, in parts per million.
    pub new: u32,
    /// Share of admitted connections kept mirroring.
    pub keep_admitted: u32,
}

impl CpuBudget {
    pub fn new(cores: f64, max_ppm: u32) -> Self {
        CpuBudget {
            cores,
            max_ppm,
            ppm: max_ppm,
            last: None,
            hold: 0,
            used: 0.0,
            used_live_path: 0.0,
            over: 0,
            keep_admitted: ALL,
        }
    }

    /// Admitted connections kept, in parts per million (`1_000_000`: all).
    pub fn keep_admitted(&self) -> u32 {
        self.keep_admitted
    }

    pub fn cores(&self) -> f64 {
        self.cores
    }

    /// The share of new connections mirrored now, in parts per million.
    pub fn ppm(&self) -> u32 {
        self.ppm
    }

    /// CPU used over the last interval, in cores, the live path's included.
    pub fn used(&self) -> f64 {
        self.used
    }

    /// Of `used`, the kernel program's work in the live path.
    pub fn used_live_path(&self) -> f64 {
        self.used_live_path
    }

    /// Takes one observation; returns the new rates when they change.
    pub fn observe(&mut self, now: Load) -> Option<Rates> {
        let prev = self.last.replace(now)?;
        let wall = now.at.saturating_duration_since(prev.at).as_secs_f64();
        if wall < 0.1 {
            self.last = Some(prev);
            return None;
        }
        self.used_live_path = now.live_path.saturating_sub(prev.live_path).as_secs_f64() / wall;
        self.used = now.cpu.saturating_sub(prev.cpu).as_secs_f64() / wall + self.used_live_path;
        self.hold = self.hold.saturating_sub(1);
        let next = if self.used > self.cores || now.backlog >= 0.5 {
            // In proportion to the excess (at least a tenth less), never below the floor.
            let factor = if self.used > self.cores {
                (0.9 * self.cores / self.used).min(0.9)
            } else {
                0.7
            };
            self.hold = HOLD_AFTER_CUT;
            ((f64::from(self.ppm) * factor) as u32).max(MIN_PPM.min(self.max_ppm))
        } else if self.used < HEADROOM * self.cores && now.backlog < 0.1 && self.hold == 0 {
            let up = (f64::from(self.ppm) * 1.2).max(f64::from(self.ppm) + 10_000.0);
            (up as u32).min(self.max_ppm)
        } else {
            self.ppm
        };
        // Losing data (a full ring or queue) counts as over: shedding whole connections beats
        // losing pieces of many. But dropping admitted connections helps only when they carry
        // the load, that is when most of the interval's segments are of long-lived connections:
        // short ones end by themselves as the cuts take effect, and an agent over budget with
        // next to nothing mirrored (its own fixed cost above a tiny budget) has nothing to drop.
        let segments = now.segments.saturating_sub(prev.segments);
        let long_lived = now
            .long_lived_segments
            .saturating_sub(prev.long_lived_segments);
        let admitted_carry_load = segments > 0 && long_lived * 2 >= segments;
        self.over = if self.used > self.cores || now.backlog >= 1.0 {
            self.over + 1
        } else {
            0
        };
        // Dropping admitted connections is the last resort: only after `MUST_DROP_AFTER`
        // seconds over budget (or losing data) in a row, which cutting the new-connection rate
        // every second did not end, and while long-lived connections carry the load. The streak
        // counts from the first second over, not from when the connections came of age, so that
        // connections opened with the overload are dropped as soon as they have lasted
        // `MUST_DROP_AFTER` seconds. Those the current rate would not admit go: the admitted set
        // becomes what that rate admits.
        let keep = keep_admitted(self.over, admitted_carry_load, next, self.keep_admitted);
        let changed = next != self.ppm || keep != self.keep_admitted;
        self.ppm = next;
        self.keep_admitted = keep;
        changed.then_some(Rates {
            new: next,
            keep_admitted: keep,
        })
    }
}

/// The admitted connections kept after `over` seconds over a limit in a row, with `rate` the
/// share new connections get now and `kept` the admitted share kept so far: all while under the
/// limit; from `MUST_DROP_AFTER` seconds on, while long-lived connections carry the load, only
/// those `rate` admits; otherwise what was kept.
pub fn keep_admitted(over: u32, admitted_carry_load: bool, rate: u32, kept: u32) -> u32 {
    match over {
        0 => ALL,
        n if n >= MUST_DROP_AFTER && admitted_carry_load => rate,
        _ => kept,
    }
}

/// The default budget: the cgroup's CPU limit (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
/// `cpu.cfs_period_us`), read below `root` (`/` in production). None when unlimited.
///
/// The cgroup is found at its path from `/proc/self/cgroup` under the controller's mount, or,
/// when that path is not there, at the mount itself: a container that shares the host's cgroup
/// namespace (the default with cgroup v1) sees its host path but has its own cgroup mounted.
pub fn cgroup_cpu_limit(root: &Path) -> Option<f64> {
    let cgroups = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let fs = root.join("sys/fs/cgroup");
    let own = |mount: &Path, path: &str, file: &str| {
        [mount.join(path), mount.to_path_buf()]
            .into_iter()
            .find(|d| d.join(file).exists())
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            let max = own(&fs, path, "cpu.max")
                .and_then(|d| std::fs::read_to_string(d.join("cpu.max")).ok());
            if let Some(limit) = max.as_deref().and_then(parse_cpu_max) {
                return Some(limit);
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            let dir = ["cpu,cpuacct", "cpu"]
                .iter()
                .find_map(|d| own(&fs.join(d), path, "cpu.cfs_quota_us"))?;
            let read = |f: &str| -> Option<i64> {
                std::fs::read_to_string(dir.join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            let (quota, period) = (read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?);
            if quota > 0 && period > 0 {
                return Some(quota as f64 / period as f64);
            }
        }
    }
    None
}

/// `cpu.max`: "QUOTA PERIOD", or "max PERIOD" when unlimited.
fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let quota: f64 = it.next()?.parse().ok()?;
    let period: f64 = it.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// This process's CPU time so far (user and system, all threads).
pub fn process_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the agent: CPU proportional to the connections admitted, which change
    /// only as old connections end (a tenth of them each second).
    fn simulate(budget: f64, demand_at_full: f64, seconds: usize) -> Vec<(u32, f64)> {
        let mut b = CpuBudget::new(budget, 1_000_000);
        let start = Instant::now();
        let mut cpu = Duration::ZERO;
        let mut admitted = 1.0f64;
        let mut out = Vec::new();
        for s in 0..seconds {
            let target = f64::from(b.ppm()) / 1e6;
            admitted += (target - admitted) * 0.1;
            cpu += Duration::from_secs_f64(demand_at_full * admitted);
            b.observe(Load {
                cpu,
                live_path: Duration::ZERO,
                at: start + Duration::from_secs(s as u64 + 1),
                backlog: 0.0,
                segments: 0,
                long_lived_segments: 0,
            });
            out.push((b.ppm(), demand_at_full * admitted));
        }
        out
    }

    /// Feeds `load` at second 0, then at each of the next `seconds`; returns the share of
    /// admitted connections kept after each.
    fn keeps_over(b: &mut CpuBudget, load: impl Fn(u64) -> Load, seconds: u64) -> Vec<u32> {
        b.observe(load(0));
        (1..=seconds)
            .map(|s| {
                b.observe(load(s));
                b.keep_admitted()
            })
            .collect()
    }

    #[test]
    fn settles_under_the_budget_without_oscillating() {
        // Demand of 2 cores against a budget of 0.5.
        let run = simulate(0.5, 2.0, 300);
        let tail = &run[200..];
        assert!(
            tail.iter().all(|(_, used)| *used <= 0.5 * 1.05),
            "{:?}",
            &tail[..5]
        );
        assert!(
            tail.iter().all(|(_, used)| *used >= 0.5 * 0.5),
            "{:?}",
            &tail[..5]
        );
        // The rate changes rarely once settled: no oscillation.
        let changes = tail.windows(2).filter(|w| w[0].0 != w[1].0).count();
        assert!(changes <= 20, "{changes} changes in 100 s");
    }

    #[test]
    fn admitted_connections_are_dropped_only_after_sustained_overload() {
        let mut b = CpuBudget::new(0.5, 1_000_000);
        let t = Instant::now();
        let mut cpu = Duration::ZERO;
        b.observe(Load {
            cpu,
            live_path: Duration::ZERO,
            at: t,
            backlog: 0.0,
            segments: 0,
            long_lived_segments: 0,
        });
        // Long-lived connections: the load stays at 50 cores whatever the new-connection rate,
        // which reaches its floor within the first seconds.
        let mut keeps = Vec::new();
        for s in 1..=6u64 {
            let used = if s <= 4 { 50.0 } else { 0.1 };
            cpu += Duration::from_secs_f64(used);
            b.observe(Load {
                cpu,
                live_path: Duration::ZERO,
                at: t + Duration::from_secs(s),
                backlog: 0.0,
                segments: s * 1000,
                long_lived_segments: s * 1000,
            });
            keeps.push(b.keep_admitted());
        }
        assert_eq!(
            &keeps[..2],
            &[ALL, ALL],
            "not before {MUST_DROP_AFTER} s over"
        );
        assert!(keeps[2] < ALL && keeps[3] < ALL, "{keeps:?}");
        assert_eq!(keeps[4], ALL, "back to keeping all once under budget");
    }

    /// Long-lived connections a little over budget: cutting the new-connection rate changes
    /// nothing, and admitted connections are dropped after `MUST_DROP_AFTER` seconds, not once
    /// the rate has crept down to its floor (which would take many more seconds).
    #[test]
    fn a_moderate_overload_on_admitted_connections_is_shed_in_seconds() {
        let mut b = CpuBudget::new(0.5, 1_000_000);
        let t = Instant::now();
        let mut cpu = Duration::ZERO;
        let at = |s: u64| t + Duration::from_secs(s);
        let idle = |cpu, s| Load {
            cpu,
            live_path: Duration::ZERO,
            at: at(s),
            backlog: 0.0,
            segments: s * 1000,
            long_lived_segments: s * 1000,
        };
        b.observe(idle(cpu, 0));
        let mut keeps = Vec::new();
        for s in 1..=3u64 {
            cpu += Duration::from_millis(800);
            b.observe(idle(cpu, s));
            keeps.push(b.keep_admitted());
        }
        assert!(b.ppm() > 10 * MIN_PPM, "the rate is far from its floor");
        assert_eq!(
            &keeps[..2],
            &[ALL, ALL],
            "not before {MUST_DROP_AFTER} s over"
        );
        assert_eq!(
            keeps[2],
            b.ppm(),
            "admitted connections kept as the rate admits"
        );
    }

    /// An agent starved of CPU (under its budget, but losing data) sheds admitted connections
    /// too after `MUST_DROP_AFTER` seconds, rather than lose pieces of all of them.
    #[test]
    fn losing_data_for_seconds_sheds_admitted_connections() {
        let mut b = CpuBudget::new(1.0, 1_000_000);
        let t = Instant::now();
        let losing = |s: u64| Load {
            cpu: Duration::from_millis(100 * s),
            live_path: Duration::ZERO,
            at: t + Duration::from_secs(s),
            backlog: 1.0,
            segments: s * 1000,
            long_lived_segments: s * 900,
        };
        let keeps = keeps_over(&mut b, losing, 3);
        assert_eq!(&keeps[..2], &[ALL, ALL]);
        assert_eq!(keeps[2], b.ppm());
        assert!(keeps[2] < ALL);
    }

    /// Far over budget for many seconds, but on short connections (or on next to nothing: the
    /// agent's own fixed cost above a tiny budget): cutting the new-connection rate is the only
    /// lever, and no admitted connection is cut in its middle.
    #[test]
    fn short_connections_are_never_dropped_once_admitted() {
        let mut b = CpuBudget::new(0.002, 1_000_000);
        let t = Instant::now();
        let over = |s: u64, segments: u64| Load {
            cpu: Duration::from_millis(10 * s),
            live_path: Duration::ZERO,
            at: t + Duration::from_secs(s),
            backlog: 0.0,
            segments,
            long_lived_segments: segments / 10,
        };
        b.observe(over(0, 0));
        for s in 1..=10 {
            b.observe(over(s, if s <= 5 { s * 400 } else { 2000 }));
            assert_eq!(b.keep_admitted(), ALL, "second {s}");
        }
        assert_eq!(b.ppm(), MIN_PPM, "new connections shed as far as they go");
    }

    /// Connections opened with the overload (a load generator's keep-alive connections): they
    /// become long-lived after two seconds, and are dropped at the end of the third second
    /// over, not three seconds after they came of age.
    #[test]
    fn connections_opened_with_the_overload_are_dropped_after_it_lasted() {
        let mut b = CpuBudget::new(0.1, 1_000_000);
        let t = Instant::now();
        let over = |s: u64| Load {
            cpu: Duration::from_millis(800 * s),
            live_path: Duration::ZERO,
            at: t + Duration::from_secs(s),
            backlog: 0.0,
            segments: s * 1000,
            long_lived_segments: s.saturating_sub(2) * 1000,
        };
        let keeps = keeps_over(&mut b, over, 3);
        assert_eq!(&keeps[..2], &[ALL, ALL], "young connections are kept");
        assert_eq!(
            keeps[2],
            b.ppm(),
            "dropped once over for {MUST_DROP_AFTER} s"
        );
    }

    #[test]
    fn comes_back_to_the_limit_when_demand_fits() {
        let run = simulate(1.0, 0.3, 60);
        assert!(run.iter().all(|(ppm, _)| *ppm == 1_000_000));
    }

    #[test]
    fn backlog_cuts_even_under_the_cpu_budget() {
        let mut b = CpuBudget::new(4.0, 1_000_000);
        let t = Instant::now();
        b.observe(Load {
            cpu: Duration::ZERO,
            live_path: Duration::ZERO,
            at: t,
            backlog: 0.0,
            segments: 0,
            long_lived_segments: 0,
        });
        let next = b.observe(Load {
            cpu: Duration::from_millis(100),
            live_path: Duration::ZERO,
            at: t + Duration::from_secs(1),
            backlog: 1.0,
            segments: 1000,
            long_lived_segments: 0,
        });
        assert_eq!(
            next,
            Some(Rates {
                new: 700_000,
                keep_admitted: ALL
            })
        );
    }

    #[test]
    fn the_live_paths_work_counts_against_the_budget() {
        let mut b = CpuBudget::new(0.5, 1_000_000);
        let t = Instant::now();
        let load = |cpu_ms, live_ms, s| Load {
            cpu: Duration::from_millis(cpu_ms),
            live_path: Duration::from_millis(live_ms),
            at: t + Duration::from_secs(s),
            backlog: 0.0,
            segments: 0,
            long_lived_segments: 0,
        };
        b.observe(load(0, 0, 0));
        // The agent's threads alone (0.3 cores) fit; with the kernel's 0.4 they do not.
        let next = b.observe(load(300, 400, 1));
        assert!((b.used() - 0.7).abs() < 1e-9 && (b.used_live_path() - 0.4).abs() < 1e-9);
        let new = next.expect("a cut").new;
        assert!(new < 1_000_000 * 5 / 7 + 1, "cut in proportion: {new}");
    }

    #[test]
    fn reads_cgroup_v2_and_v1_limits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::create_dir_all(root.join("sys/fs/cgroup/pod")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "0::/pod\n").unwrap();
        std::fs::write(root.join("sys/fs/cgroup/pod/cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit(root), Some(1.5));
        std::fs::write(root.join("sys/fs/cgroup/pod/cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit(root), None);
        std::fs::write(root.join("proc/self/cgroup"), "4:cpu,cpuacct:/pod\n").unwrap();
        let v1 = root.join("sys/fs/cgroup/cpu,cpuacct/pod");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "50000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit(root), Some(0.5));
        // A container sharing the host's cgroup namespace: its host path, its own cgroup at
        // the mount.
        std::fs::write(
            root.join("proc/self/cgroup"),
            "4:cpu,cpuacct:/machine.slice/libpod-1.scope\n",
        )
        .unwrap();
        let mount = root.join("sys/fs/cgroup/cpu,cpuacct");
        std::fs::write(mount.join("cpu.cfs_quota_us"), "100000\n").unwrap();
        std::fs::write(mount.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit(root), Some(1.0));
    }
}
