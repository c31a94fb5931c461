//! One memory budget for the agent, split among the structures that grow with traffic, so that
//! the agent fits the memory limit it runs under (a pod's, typically) whatever the traffic.
//!
//! The budget defaults to three quarters of the cgroup's memory limit, or 1 GiB without one.
//! From it come: the flow table, out-of-order bytes, buffered request bytes, the replay queue (in
//! bytes), the comparison's series and its pairing table. What exceeds a cap is dropped or folded
//! into `other`, and counted, by the stage that owns it.

use std::path::Path;

/// What the agent needs whatever the traffic: code, runtimes, metrics, connections to the mirror.
pub const BASELINE_BYTES: u64 = 48 << 20;
/// The least the traffic-dependent structures get.
pub const MIN_TRAFFIC_BYTES: u64 = 16 << 20;
/// A tracked connection: flow state, HTTP parser state and table entries.
pub const FLOW_BYTES: u64 = 2 << 10;
/// A live or mirror result waiting for its other half.
pub const PENDING_PAIR_BYTES: u64 = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "--memory-budget {budget} bytes leaves too little for traffic once the capture ring \
         ({ring} bytes, --ring-mb) and the agent's own {baseline} bytes are taken: give at least \
         {need} bytes, or a smaller --ring-mb"
    )]
    TooSmall {
        budget: u64,
        ring: u64,
        baseline: u64,
        need: u64,
    },
}

/// How much each structure may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub budget: u64,
    pub max_flows: usize,
    pub ooo_bytes: usize,
    pub http_buffered_bytes: usize,
    pub replay_queue_bytes: usize,
    pub max_series: usize,
    pub max_pending_pairs: usize,
}

impl Plan {
    /// Splits `budget` once the capture ring (`ring_bytes`) is taken. `series_bytes` is what one
    /// comparison series costs.
    pub fn new(budget: u64, ring_bytes: u64, series_bytes: u64) -> Result<Plan, BudgetError> {
        let fixed = ring_bytes + BASELINE_BYTES;
        let Some(rest) = budget
            .checked_sub(fixed)
            .filter(|r| *r >= MIN_TRAFFIC_BYTES)
        else {
            return Err(BudgetError::TooSmall {
                budget,
                ring: ring_bytes,
                baseline: BASELINE_BYTES,
                need: fixed + MIN_TRAFFIC_BYTES,
            });
        };
        let share = |pct: u64| rest / 100 * pct;
        let count = |bytes: u64, each: u64, most: u64| (bytes / each).clamp(1, most) as usize;
        // The remaining 10 % is slack for what no cap sees (allocator, in-flight replies).
        Ok(Plan {
            budget,
            max_flows: count(share(10), FLOW_BYTES, 1 << 20),
            ooo_bytes: share(20) as usize,
            http_buffered_bytes: share(25) as usize,
            replay_queue_bytes: share(20) as usize,
            max_series: count(share(10), series_bytes, 1 << 20),
            max_pending_pairs: count(share(5), PENDING_PAIR_BYTES, 1 << 22),
        })
    }

    /// How the parts the mirrors share divide among `mirrors` (one at least): the replay queue
    /// per mirror, half of it given to contents waiting when contents are compared, and the
    /// requests that may wait for their pairing (each holds the live response and up to one
    /// outcome per mirror).
    pub fn split(&self, mirrors: usize, compare_contents: bool) -> Split {
        let mirrors = mirrors.max(1);
        let (queue, content_bytes) = if compare_contents {
            (self.replay_queue_bytes / 2, self.replay_queue_bytes / 2)
        } else {
            (self.replay_queue_bytes, 0)
        };
        Split {
            queue_bytes_per_mirror: queue / mirrors,
            content_bytes,
            max_pending: self.max_pending_pairs * 2 / (mirrors + 1),
        }
    }
}

/// The shared parts of a `Plan`, divided (`Plan::split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub queue_bytes_per_mirror: usize,
    /// Contents waiting for their partner (`--compare-bodies`), all mirrors together.
    pub content_bytes: usize,
    /// Requests waiting for their live response or mirror outcomes.
    pub max_pending: usize,
}

/// The default budget and where it came from.
pub fn default_budget() -> (u64, String) {
    match cgroup_memory_limit(Path::new("/")) {
        Some(limit) => (
            limit / 4 * 3,
            format!("three quarters of the cgroup memory limit ({limit} bytes)"),
        ),
        None => (1 << 30, "no cgroup memory limit: 1 GiB".into()),
    }
}

/// This process's cgroup memory limit (v2 `memory.max`, or v1 `memory.limit_in_bytes`), read
/// under `root` (`/` but in tests); None when unlimited or unknown.
pub fn cgroup_memory_limit(root: &Path) -> Option<u64> {
    let cgroups = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let fs = root.join("sys/fs/cgroup");
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            candidates.push(fs.join(path).join("memory.max"));
            candidates.push(fs.join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            let v1 = fs.join("memory");
            candidates.push(v1.join(path).join("memory.limit_in_bytes"));
            candidates.push(v1.join("memory.limit_in_bytes"));
        }
    }
    candidates.iter().find_map(|p| {
        let v = std::fs::read_to_string(p).ok()?;
        // "max" (v2) or a page-rounded i64::MAX (v1) mean no limit.
        v.trim().parse::<u64>().ok().filter(|n| *n < 1 << 60)
    })
}

/// Parses a size: bytes, or with a K, M or G suffix (powers of 1024; `Mi`, `MiB` alike).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512M or 2G"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" | "kb" => 10,
        "m" | "mi" | "mib" | "mb" => 20,
        "g" | "gi" | "gib" | "gb" => 30,
        _ => return Err(format!("{s:?}: unknown unit; use K, M or G")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn the_plan_fits_the_budget_and_a_too_small_one_says_what_to_give() {
        let budget = 384 << 20;
        let p = Plan::new(budget, 32 << 20, 16 << 10).unwrap();
        let used = (32 << 20)
            + BASELINE_BYTES
            + p.max_flows as u64 * FLOW_BYTES
            + p.ooo_bytes as u64
            + p.http_buffered_bytes as u64
            + p.replay_queue_bytes as u64
            + p.max_series as u64 * (16 << 10)
            + p.max_pending_pairs as u64 * PENDING_PAIR_BYTES;
        assert!(used <= budget, "{used} > {budget}");
        assert!(p.max_series >= 500, "{p:?}");
        let err = Plan::new(64 << 20, 32 << 20, 16 << 10).unwrap_err();
        assert!(
            err.to_string().contains("at least 100663296 bytes"),
            "{err}"
        );
    }

    #[test]
    fn cgroup_limits_v1_and_v2() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::create_dir_all(root.join("sys/fs/cgroup/pod/x")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "0::/pod/x\n").unwrap();
        std::fs::write(root.join("sys/fs/cgroup/pod/x/memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_memory_limit(root), Some(512 << 20));
        std::fs::write(root.join("sys/fs/cgroup/pod/x/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_limit(root), None);

        std::fs::create_dir_all(root.join("sys/fs/cgroup/memory")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "4:memory:/elsewhere\n").unwrap();
        std::fs::write(
            root.join("sys/fs/cgroup/memory/memory.limit_in_bytes"),
            "268435456\n",
        )
        .unwrap();
        assert_eq!(cgroup_memory_limit(root), Some(256 << 20));
        std::fs::write(
            root.join("sys/fs/cgroup/memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(cgroup_memory_limit(root), None);
    }

    #[test]
    fn the_shared_parts_divide_among_mirrors_and_contents() {
        let plan = Plan::new(1 << 30, 64 << 20, 13 << 10).unwrap();
        let one = plan.split(1, false);
        assert_eq!(one.queue_bytes_per_mirror, plan.replay_queue_bytes);
        assert_eq!(
            (one.content_bytes, one.max_pending),
            (0, plan.max_pending_pairs)
        );
        let three = plan.split(3, true);
        assert_eq!(
            three.queue_bytes_per_mirror,
            plan.replay_queue_bytes / 2 / 3
        );
        assert_eq!(three.content_bytes, plan.replay_queue_bytes / 2);
        assert_eq!(three.max_pending, plan.max_pending_pairs / 2);
        assert_eq!(plan.split(0, false), one, "no mirror divides as one");
    }
}
