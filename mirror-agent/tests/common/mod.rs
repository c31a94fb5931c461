//! End-to-end test support: network namespaces, processes and an HTTP server that records the
//! exact bytes of every connection. Everything is torn down by Drop, also when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use netlab::{sh, Netns, Pair, Proc};

mod grpc;
mod latency;
mod server;
mod tls;
#[allow(unused_imports)]
pub use grpc::*;
#[allow(unused_imports)]
pub use latency::*;
#[allow(unused_imports)]
pub use server::*;
#[allow(unused_imports)]
pub use tls::*;

pub const AGENT: &str = env!("CARGO_BIN_EXE_mirror-agent");

/// Restricts the calling thread, and the threads and processes it starts afterwards, to CPU 0.
pub fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call reads it only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// True inside `cargo xtask vm-test`'s guests: qemu without KVM runs everything tens of times
/// slower, so waits are stretched and timing assertions are skipped, saying so.
pub fn emulated() -> bool {
    std::env::var_os("MIRROR_TEST_EMULATED").is_some()
}

/// `d`, stretched under emulation.
pub fn patience(d: Duration) -> Duration {
    if emulated() {
        d * 20
    } else {
        d
    }
}

/// Whether a timing assertion holds here; under emulation it is skipped, and the skip printed.
pub fn timing_applies(what: &str) -> bool {
    if emulated() {
        eprintln!("skipped under emulation (qemu TCG): {what}");
        return false;
    }
    true
}

/// True when the calling test must be skipped for want of root, saying so. Under `cargo xtask
/// test`, which runs as root and sets `MIRROR_TEST_REQUIRE_ROOT`, a missing root fails instead.
pub fn not_root() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    assert!(
        std::env::var_os("MIRROR_TEST_REQUIRE_ROOT").is_none(),
        "end-to-end tests need root (network namespaces, BPF): run `cargo xtask test` as root"
    );
    eprintln!("skipped: needs root (network namespaces, BPF); `cargo xtask test` runs it as root");
    true
}

/// A running agent and what it printed when ready.
pub struct Agent {
    pub proc: Proc,
    pub ready_line: String,
    /// Standard output after the ready line, complete once the agent has exited.
    stdout: Option<JoinHandle<String>>,
    /// Where the agent writes its final counters (`--metrics-file`).
    metrics_file: Option<TempFile>,
}

/// A file removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(what: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        TempFile(std::env::temp_dir().join(format!(
            "mirror-test-{}-{}.{what}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What an agent left when it stopped: its output and its final counters.
pub struct Exit {
    pub stdout: String,
    pub stderr: String,
    /// The final `/metrics` text (`--metrics-file`).
    pub metrics: String,
}

impl Exit {
    /// The sum of the samples of `family` (named as /metrics serves it, with `_total` for
    /// counters) that carry every label in `labels`. Panics when the family is not exported.
    pub fn metric(&self, family: &str, labels: &[(&str, &str)]) -> u64 {
        let mut found = false;
        let mut sum = 0.0;
        for line in self.metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, label_text) = series.split_once('{').unwrap_or((series, ""));
            if name != family {
                continue;
            }
            found = true;
            if labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            {
                sum += value.parse::<f64>().unwrap();
            }
        }
        assert!(found, "no {family} in the final metrics:\n{}", self.metrics);
        sum as u64
    }
}

impl Agent {
    /// Starts `mirror-agent attach <args>` in `ns` and waits (bounded) for its ready line.
    pub fn start(ns: &Netns, args: &[&str]) -> Agent {
        Self::spawn(ns, args, true)
    }

    /// As `start`, but closes the agent's standard output after the ready line.
    pub fn start_closing_stdout(ns: &Netns, args: &[&str]) -> Agent {
        Self::spawn(ns, args, false)
    }

    fn spawn(ns: &Netns, args: &[&str], keep_reading: bool) -> Agent {
        let metrics_file = TempFile::new("prom");
        let mut cmd = ns.exec(&[AGENT, "attach"]);
        cmd.args(args).arg("--metrics-file").arg(&metrics_file.0);
        let mut agent = Self::spawn_with(cmd, keep_reading).unwrap_or_else(|e| panic!("{e}"));
        agent.metrics_file = Some(metrics_file);
        agent
    }

    /// Starts an agent with a command of the caller's (a container runtime's, say) and waits
    /// (bounded) for its ready line.
    pub fn spawn_command(cmd: std::process::Command) -> Agent {
        Self::spawn_with(cmd, true).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As `spawn_command`, but an agent that exits before it is ready is an answer, not a
    /// failure: its stderr.
    pub fn try_spawn_command(cmd: std::process::Command) -> Result<Agent, String> {
        Self::spawn_with(cmd, true)
    }

    fn spawn_with(mut cmd: std::process::Command, keep_reading: bool) -> Result<Agent, String> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            if !keep_reading {
                return String::new();
            }
            lines.map_while(Result::ok).collect::<Vec<_>>().join("\n")
        });
        let mut proc = Proc { child: Some(child) };
        match rx.recv_timeout(patience(Duration::from_secs(20))) {
            Ok(line) if line.starts_with("ready:") => Ok(Agent {
                proc,
                ready_line: line,
                stdout: Some(reader),
                metrics_file: None,
            }),
            other => {
                let (_, err) = proc.wait_exit(Duration::from_secs(5));
                Err(format!(
                    "agent did not become ready: {other:?}\nstderr:\n{err}"
                ))
            }
        }
    }

    /// SIGTERM, then wait for a clean exit; returns stderr.
    pub fn terminate(self) -> String {
        self.terminate_with_output().1
    }

    /// SIGTERM, then wait for a clean exit; returns its output and final counters.
    pub fn stop(mut self) -> Exit {
        let file = self
            .metrics_file
            .take()
            .expect("an agent started with `start`");
        let (stdout, stderr) = self.terminate_with_output();
        let metrics = std::fs::read_to_string(&file.0)
            .unwrap_or_else(|e| panic!("--metrics-file {}: {e}\n{stderr}", file.0.display()));
        Exit {
            stdout,
            stderr,
            metrics,
        }
    }

    /// SIGTERM, then wait for a clean exit; returns (stdout after the ready line, stderr).
    pub fn terminate_with_output(mut self) -> (String, String) {
        self.proc.signal(libc::SIGTERM);
        let (code, err) = self.proc.wait_exit(patience(Duration::from_secs(15)));
        assert_eq!(code, Some(0), "agent exit code; stderr:\n{err}");
        let out = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (out, err)
    }
}

/// One record of an agent `--dump` file.
#[derive(Debug, Clone)]
pub struct DumpedFlow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes: Vec<u8>,
    pub gaps: usize,
}

pub fn parse_dump(data: &[u8]) -> Vec<DumpedFlow> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let nl = at
            + data[at..]
                .iter()
                .position(|b| *b == b'\n')
                .expect("header line");
        let header = std::str::from_utf8(&data[at..nl]).unwrap();
        at = nl + 1;
        if header.starts_with("=== dropped") {
            assert_eq!(header, "=== dropped bytes=0", "the dump dropped data");
            break;
        }
        let words: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(&words[..2], &["===", "flow"], "bad header {header}");
        let field = |k: &str| -> usize {
            words
                .iter()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        let len = field("bytes=");
        out.push(DumpedFlow {
            src: words[2].parse().unwrap(),
            dst: words[4].parse().unwrap(),
            bytes: data[at..at + len].to_vec(),
            gaps: field("gaps="),
        });
        at += len + 1;
    }
    out
}

/// Runs curl in the client namespace; returns (body, local address) of the connection.
pub fn curl(ns: &Netns, args: &[&str]) -> (Vec<u8>, Vec<SocketAddr>) {
    let mut cmd = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{local_ip} %{local_port}",
    ]);
    cmd.args(args);
    let out = cmd.output().expect("curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = out.stdout;
    let split = stdout.iter().rposition(|b| *b == b'\n').unwrap();
    let tail = String::from_utf8_lossy(&stdout[split + 1..]).into_owned();
    let mut parts = tail.split_whitespace();
    let ip: std::net::IpAddr = parts.next().unwrap().parse().unwrap();
    let port: u16 = parts.next().unwrap().parse().unwrap();
    (stdout[..split].to_vec(), vec![SocketAddr::new(ip, port)])
}

/// Ids of loaded BPF programs with this name (system-wide).
pub fn loaded_program_ids(name: &str) -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| p.name_as_str() == Some(name))
        .map(|p| p.id())
        .collect()
}

/// The agent's comparison report (`report --format json`) from inside `ns`, if it answers.
pub fn report(ns: &Netns, metrics: &str) -> Option<mirror_agent::compare::Report> {
    let out = ns
        .exec(&[AGENT, "report", "--agent", metrics, "--format", "json"])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// One sample of the agent's `/metrics` (served at `addr` inside `ns`), by name and labels;
/// None when the agent does not answer or has no such sample.
pub fn metric(ns: &Netns, addr: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = metrics_text(ns, addr)?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()?;
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(v),
        _ => None,
    }
}

/// The agent's `/metrics` text (served at `addr` inside `ns`), if it answers.
pub fn metrics_text(ns: &Netns, addr: &str) -> Option<String> {
    let out = ns
        .exec(&["curl", "-sf", &format!("http://{addr}/metrics")])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()
}

/// The non-zero series of every pipeline stage's counters in a `/metrics` text, the kernel
/// program's first, a line each: what a failing test prints to say where requests went.
pub fn stage_counters(metrics: &str) -> String {
    let stages = ["kernel_", "capture_", "reassembly_", "http_", "replay_"];
    metrics
        .lines()
        .filter(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_default();
            stages
                .iter()
                .any(|s| name.starts_with(&format!("mirror_{s}")))
                && value.parse::<f64>().is_ok_and(|v| v != 0.0)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends `requests` on one connection in one write (pipelined) from inside `ns`, and reads
/// until `expect_bytes` response bytes arrived. Returns the response bytes.
pub fn pipelined(ns: &Netns, to: SocketAddr, requests: &[u8], expect_bytes: usize) -> Vec<u8> {
    let path = ns.path();
    let requests = requests.to_vec();
    std::thread::spawn(move || {
        netlab::enter_netns(&path);
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&requests).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while out.len() < expect_bytes {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "server closed early");
            out.extend_from_slice(&buf[..n]);
        }
        out
    })
    .join()
    .unwrap()
}

/// A pod: its own namespace behind a veth on the node, running a live server on 8080.
pub struct PodNs {
    _ns: Netns,
    _server: TestServer,
    pub ip: String,
}

pub fn pod(node: &Netns, tag: &str, net: u8) -> PodNs {
    let ns = Netns::new(&netlab::unique(tag));
    netlab::link(node, &format!("vp{net}"), &ns, "eth0", net);
    let ip = format!("10.{net}.0.2");
    let server = TestServer::start(&ns, &[format!("{ip}:8080").parse().unwrap()]);
    PodNs {
        _ns: ns,
        _server: server,
        ip,
    }
}
