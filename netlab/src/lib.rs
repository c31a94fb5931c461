//! Hosts in network namespaces, for end-to-end tests, benchmarks and the lab.
//!
//! Every namespace and process made here is removed on drop, so a failing test or a Ctrl-C'd
//! benchmark leaves nothing behind. Traffic only ever goes to addresses inside these namespaces.

pub mod kubeapi;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Runs a command, panicking with its stderr if it fails. Returns stdout.
pub fn sh(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A short prefix unique to this process and call, for namespace names.
pub fn unique(tag: &str) -> String {
    format!(
        "mt{}{}{}",
        tag,
        std::process::id() % 100_000,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        sh(&["ip", "netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// A command that runs inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

/// Moves the calling thread into the namespace at `path` (sockets it then opens live there).
pub fn enter_netns(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: valid fd; setns affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair and gives both ends IPv4 and IPv6 addresses
/// (`10.<net>.0.1/24`, `fd00:<net>::1/64` on `a`; `.2`/`::2` on `b`).
pub fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str, net: u8) {
    sh(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, host) in [(a, a_if, 1), (b, b_if, 2)] {
        ns.ip(&[
            "addr",
            "add",
            &format!("10.{net}.0.{host}/24"),
            "dev",
            ifname,
        ]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd00:{net}::{host}/64"),
            "dev",
            ifname,
            "nodad",
        ]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// Client and server namespaces joined by a veth pair (`cli0` — `srv0`).
pub struct Pair {
    pub client: Netns,
    pub server: Netns,
    pub server_v4: String,
    pub server_v6: String,
}

impl Pair {
    pub fn new(tag: &str, net: u8) -> Pair {
        let base = unique(tag);
        let client = Netns::new(&format!("{base}c"));
        let server = Netns::new(&format!("{base}s"));
        link(&client, "cli0", &server, "srv0", net);
        Pair {
            client,
            server,
            server_v4: format!("10.{net}.0.2"),
            server_v6: format!("fd00:{net}::2"),
        }
    }
}

/// A child process, stopped and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc {
            child: Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("process already reaped").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit, at most `timeout` (then kills and panics). Returns the exit code and the
    /// stderr it had not yet read, if stderr was piped.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("process already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User + system CPU time of the process (all threads), from /proc.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that a server stops its own children (nginx's workers outlive a
    /// SIGKILLed master) and the agent shuts down cleanly; SIGKILL after 2 s.
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// User + system CPU time of a process, all threads included.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Waits until `f` is true, at most `timeout`. Returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A cgroup with a CPU limit, as a container runtime makes for a container with one (cgroup v2
/// `cpu.max`, or v1's `cpu` controller). Removed on drop, once the processes in it have exited.
pub struct CpuCgroup {
    dir: std::path::PathBuf,
}

impl CpuCgroup {
    pub fn new(tag: &str, cores: f64) -> std::io::Result<CpuCgroup> {
        use std::path::Path;
        const PERIOD_US: u64 = 100_000;
        let quota = (cores * PERIOD_US as f64).round() as u64;
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            // Children of the root get the cpu controller only when the root hands it down.
            let control = root.join("cgroup.subtree_control");
            if !std::fs::read_to_string(&control)?
                .split_whitespace()
                .any(|c| c == "cpu")
            {
                std::fs::write(&control, "+cpu")?;
            }
            let dir = root.join(unique(tag));
            std::fs::create_dir(&dir)?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
            return Ok(CpuCgroup { dir });
        }
        let mount = ["cpu,cpuacct", "cpu"]
            .iter()
            .map(|m| root.join(m))
            .find(|m| m.join("cpu.cfs_quota_us").exists())
            .ok_or_else(|| std::io::Error::other("no cgroup v2 and no v1 cpu controller"))?;
        let dir = mount.join(unique(tag));
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        Ok(CpuCgroup { dir })
    }

    /// Makes `cmd` join this cgroup before it runs.
    pub fn contain(&self, cmd: &mut Command) {
        join_on_exec(&self.dir, cmd);
    }
}

/// Makes `cmd` join the cgroup at `dir` between fork and exec.
fn join_on_exec(dir: &std::path::Path, cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let procs = std::ffi::CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("a cgroup path without NUL");
    // SAFETY: between fork and exec the closure only calls open, write and close, which are
    // async-signal-safe; "0" names the writing process itself.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
}

/// A cgroup in the v2 hierarchy (on a hybrid host too, under `/sys/fs/cgroup/unified`), as a
/// pod has: its `cpu.pressure` tells how long its tasks waited for a CPU. Its processes are
/// killed and it is removed on drop.
pub struct PsiCgroup {
    dir: std::path::PathBuf,
}

impl PsiCgroup {
    pub fn new(tag: &str) -> std::io::Result<PsiCgroup> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mount = info
            .lines()
            .find_map(|l| {
                let (m, fs) = l.split_once(" - ")?;
                (fs.split_whitespace().next()? == "cgroup2").then(|| m.split_whitespace().nth(4))?
            })
            .ok_or_else(|| std::io::Error::other("no cgroup v2 hierarchy is mounted"))?;
        let dir = std::path::Path::new(mount).join(unique(tag));
        std::fs::create_dir(&dir)?;
        Ok(PsiCgroup { dir })
    }

    /// Makes `cmd` join this cgroup before it runs.
    pub fn contain(&self, cmd: &mut Command) {
        join_on_exec(&self.dir, cmd);
    }

    /// Moves a running process (all its threads) into this cgroup.
    pub fn adopt(&self, pid: i32) -> std::io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// Microseconds some task of this cgroup waited for a CPU (`cpu.pressure`'s `some total`).
    pub fn stalled_us(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("cpu.pressure"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("some "))?
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("total="))?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }
}

impl Drop for PsiCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        wait_until(Duration::from_secs(2), || {
            std::fs::remove_dir(&self.dir).is_ok()
        });
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // A process that just exited may still be listed for a moment.
        wait_until(Duration::from_secs(2), || {
            std::fs::remove_dir(&self.dir).is_ok()
        });
    }
}
