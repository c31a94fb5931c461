//! Pressure stall information: how long runnable tasks waited for a CPU, node-wide in
//! `/proc/pressure/cpu` and per cgroup (v2) in `cpu.pressure`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `some` line's `total=`: microseconds during which at least one task waited for a CPU.
pub fn some_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// One `cpu.pressure` file, read as the share of wall time stalled between two reads.
#[derive(Debug)]
pub struct PsiFile {
    path: PathBuf,
    last: Option<(u64, Instant)>,
}

impl PsiFile {
    pub fn new(path: PathBuf) -> PsiFile {
        PsiFile { path, last: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file now: the error says why (no such file, PSI off: `EOPNOTSUPP`).
    pub fn read_total(&self) -> std::io::Result<u64> {
        let text = std::fs::read_to_string(&self.path)?;
        some_total(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no `some … total=` line in {}", self.path.display()),
            )
        })
    }

    /// The share of time (0 to 1) some task waited since the last call; None at the first call,
    /// when the file cannot be read, or within 100 ms of the last.
    pub fn sample(&mut self, now: Instant) -> Option<f64> {
        let total = self.read_total().ok()?;
        let Some((prev, at)) = self.last else {
            self.last = Some((total, now));
            return None;
        };
        let wall = now.saturating_duration_since(at);
        if wall < Duration::from_millis(100) {
            return None;
        }
        self.last = Some((total, now));
        let stalled = Duration::from_micros(total.saturating_sub(prev));
        Some((stalled.as_secs_f64() / wall.as_secs_f64()).min(1.0))
    }
}

/// The node's idle CPU: the share of its CPU time spent idle between two reads of
/// `/proc/stat`.
#[derive(Debug, Default)]
pub struct NodeIdle {
    /// (idle, total) jiffies at the last read.
    last: Option<(u64, u64)>,
}

impl NodeIdle {
    /// The idle share (0 to 1) since the last call; None at the first, or when unreadable.
    pub fn sample(&mut self) -> Option<f64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let now = idle_and_total(&text)?;
        let (idle0, total0) = self.last.replace(now)?;
        let total = now.1.saturating_sub(total0);
        (total > 0).then(|| now.0.saturating_sub(idle0) as f64 / total as f64)
    }
}

/// From `/proc/stat`'s first line: idle (idle and iowait) and total jiffies, guests left out
/// (they are counted in user and nice already).
fn idle_and_total(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total = fields.iter().take(8).sum();
    Some((idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_and_total_leave_guests_out() {
        let stat = "cpu  100 5 50 800 20 3 7 0 40 0\ncpu0 50 2 25 400 10 1 3 0 20 0\n";
        assert_eq!(idle_and_total(stat), Some((820, 985)));
        assert_eq!(idle_and_total("intr 1 2 3\n"), None);
    }

    #[test]
    fn the_some_total_is_read_from_either_file() {
        let node = "some avg10=8.87 avg60=1.60 avg300=0.33 total=1503830\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=8174\n";
        assert_eq!(some_total(node), Some(1_503_830));
        assert_eq!(some_total("full avg10=0.00 total=5\n"), None);
        assert_eq!(some_total(""), None);
    }

    #[test]
    fn the_share_stalled_is_the_growth_of_total_over_wall_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpu.pressure");
        let write = |total: u64| {
            std::fs::write(
                &path,
                format!("some avg10=0 avg60=0 avg300=0 total={total}\n"),
            )
            .unwrap()
        };
        write(1_000_000);
        let mut f = PsiFile::new(path.clone());
        let t0 = Instant::now();
        assert_eq!(f.sample(t0), None);
        write(1_250_000);
        let share = f.sample(t0 + Duration::from_secs(1)).unwrap();
        assert!((share - 0.25).abs() < 1e-9, "{share}");
        // Too soon: nothing new.
        assert_eq!(f.sample(t0 + Duration::from_millis(1050)), None);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(f.sample(t0 + Duration::from_secs(2)), None);
    }
}
