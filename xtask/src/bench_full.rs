//! `cargo xtask bench`: the full path (capture, reassembly, parsing, replay), against the
//! in-path alternative, nginx's `mirror` directive.
//!
//! Live and mirror services are nginx with one worker answering a small 200; the slow mirror is
//! the demo bookservice v3, which takes 1.2 s on the benchmark's path (`/api/books/1/reviews`).
//! Setups are interleaved round by round; figures are medians and ratios from one run.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Result};
use netlab::{CpuCgroup, Pair, Proc, PsiCgroup};

use crate::bench::{curl_ok, oha, wrk, wrk_latency, Nginx};

const PATH: &str = "/api/books/1/reviews";
const FAST_MIRROR: &str = "127.0.0.1:9080";
const SLOW_MIRROR: &str = "127.0.0.1:9081";

#[derive(clap::Args)]
pub struct FullBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Offered rate of the fidelity run (requests per second, 10 s).
    #[arg(long, default_value_t = 20_000)]
    pub fidelity_rate: u64,
    /// The agent's CPU budgets in the saturation runs, in cores; the first is also given as a
    /// cgroup's CPU limit.
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 0.2, 0.1])]
    pub cpu_budgets: Vec<f64>,
    /// Rounds of the saturation runs, interleaved.
    #[arg(long, default_value_t = 3)]
    pub saturation_rounds: usize,
    /// The CPU limit of the agent's cgroup in the DaemonSet-like saturation run, in cores (a
    /// small pod on a larger node).
    #[arg(long, default_value_t = 0.25)]
    pub daemonset_cores: f64,
    /// Only the saturation runs.
    #[arg(long)]
    pub saturation_only: bool,
}

/// The share of time some task of the live service waited for a CPU (its cgroup's PSI) over
/// a run: what mirroring must not raise.
struct LivePressure<'a> {
    cgroup: &'a PsiCgroup,
    stalled_us: u64,
    at: std::time::Instant,
    idle: (u64, u64),
}

impl<'a> LivePressure<'a> {
    fn start(cgroup: &'a PsiCgroup) -> LivePressure<'a> {
        LivePressure {
            cgroup,
            stalled_us: cgroup.stalled_us(),
            at: std::time::Instant::now(),
            idle: idle_jiffies(),
        }
    }

    fn share(&self) -> f64 {
        let stalled = self.cgroup.stalled_us().saturating_sub(self.stalled_us) as f64 / 1e6;
        stalled / self.at.elapsed().as_secs_f64()
    }

    /// The node's idle CPU share since the start.
    fn node_idle(&self) -> f64 {
        let (idle, total) = idle_jiffies();
        (idle - self.idle.0) as f64 / (total - self.idle.1).max(1) as f64
    }
}

/// Idle (idle and iowait) and total jiffies of the node, from `/proc/stat`.
fn idle_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (idle, f.iter().take(8).sum())
}

/// The peak resident memory of a process (`VmHWM`), in MiB.
fn peak_rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))?
                .trim()
                .trim_end_matches(" kB")
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

pub struct Agent {
    pub proc: Proc,
}

impl Agent {
    /// The agent on the server side of `pair`, mirroring `port` to `mirror`, with `extra`
    /// arguments; waits for it to be ready.
    pub fn start_on(
        bin: &Path,
        pair: &Pair,
        port: &str,
        mirror: &str,
        max_inflight: usize,
        extra: &[&str],
    ) -> Result<Agent> {
        Self::start_in(None, bin, pair, port, mirror, max_inflight, extra)
    }

    /// `start_on`, in `cgroup` when there is one.
    pub fn start_in(
        cgroup: Option<&CpuCgroup>,
        bin: &Path,
        pair: &Pair,
        port: &str,
        mirror: &str,
        max_inflight: usize,
        extra: &[&str],
    ) -> Result<Agent> {
        use std::io::BufRead;
        let agent = [
            bin.to_str().unwrap(),
            "attach",
            "--iface",
            "srv0",
            "--port",
            port,
            "--mirror",
            &format!("http://{mirror}"),
            "--no-report",
            "--max-inflight",
            &max_inflight.to_string(),
        ];
        let mut cmd = match cgroup {
            // `ip netns exec` mounts a fresh /sys, without the cgroup filesystems the agent
            // reads its limit from; nsenter joins the network namespace alone.
            Some(cgroup) => {
                let mut cmd = std::process::Command::new("nsenter");
                cmd.arg(format!("--net={}", pair.server.path()))
                    .arg("--")
                    .args(agent);
                cgroup.contain(&mut cmd);
                cmd
            }
            None => pair.server.exec(&agent),
        };
        cmd.args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(&mut cmd);
        let mut line = String::new();
        std::io::BufReader::new(proc.child.as_mut().unwrap().stdout.take().unwrap())
            .read_line(&mut line)?;
        if !line.starts_with("ready:") {
            let (_, err) = proc.wait_exit(Duration::from_secs(5));
            bail!("agent did not start: {err}");
        }
        Ok(Agent { proc })
    }

    /// Stops the agent; returns the requests it recorded (`--record`), when it recorded.
    pub fn stop_with_record(self) -> Result<Option<u64>> {
        let err = self.stop_stderr()?;
        Ok(err
            .lines()
            .find_map(|l| l.strip_prefix("record: "))
            .and_then(|l| l.split(' ').find_map(|w| w.strip_prefix("requests=")))
            .and_then(|v| v.parse().ok()))
    }

    /// Stops the agent; returns what its exit summary says.
    pub fn stop(self) -> Result<Stopped> {
        let err = self.stop_stderr()?;
        let line = |prefix: &str| err.lines().find_map(|l| l.strip_prefix(prefix));
        Ok(Stopped {
            replay: line("replay:").unwrap_or("").trim().to_string(),
            live_path_seconds: line("kernel work in the live path:")
                .and_then(|v| v.trim().trim_end_matches(" s").parse().ok())
                .unwrap_or(0.0),
            budget: err
                .lines()
                .rfind(|l| l.contains("of new connections"))
                .unwrap_or("")
                .to_string(),
        })
    }

    fn stop_stderr(mut self) -> Result<String> {
        self.proc.signal(libc::SIGTERM);
        let (code, err) = self.proc.wait_exit(Duration::from_secs(20));
        if code != Some(0) {
            bail!("agent exited with {code:?}: {err}");
        }
        Ok(err)
    }
}

/// What a stopped agent's exit summary says.
pub struct Stopped {
    /// The replay counters.
    pub replay: String,
    /// The time its kernel program spent mirroring in the live path (clones, records).
    pub live_path_seconds: f64,
    /// Its last log line about shedding (the limits and the share they allow), if any.
    pub budget: String,
}

pub fn run(root: &Path, args: &FullBenchArgs) -> Result<()> {
    let bin = root.join("target/release");
    let pair = Pair::new("bf", 241);
    let log_dir = tempfile::tempdir()?;
    let mirror_log = log_dir.path().join("mirror.log");
    let live_url = format!("http://{}:8080{PATH}", pair.server_v4);
    let live = Nginx::start(&pair.server, &format!("{}:8080", pair.server_v4), "")?;
    // The live service in a cgroup of its own, as a pod is: its CPU pressure is read there.
    let live_cgroup = PsiCgroup::new("mirror-bench-live")?;
    for pid in live.pids() {
        live_cgroup.adopt(pid)?;
    }
    std::fs::write(log_dir.path().join("big"), "x".repeat(16 << 10))?;
    let _big = Nginx::with_servers(
        &pair.server,
        &format!(
            "server {{ listen {}:8083; location / {{ root {}; try_files /big =404; }} }}",
            pair.server_v4,
            log_dir.path().display()
        ),
    )?;
    let fast = Nginx::with_servers(
        &pair.server,
        &format!(
            "server {{ listen {FAST_MIRROR}; access_log {} combined buffer=256k flush=1s; location / {{ return 200 \"ok\\n\"; }} }}",
            mirror_log.display()
        ),
    )?;
    let _slow = Proc::spawn(
        pair.server
            .exec(&[
                bin.join("bookservice").to_str().unwrap(),
                "--listen",
                SLOW_MIRROR,
                "--version",
                "v3",
            ])
            .stderr(Stdio::null()),
    );
    // nginx's own mirroring, in the request path: a proxy in front of a live backend.
    let _proxies = Nginx::with_servers(
        &pair.server,
        &format!(
            "upstream live {{ server 127.0.0.1:8090; keepalive 64; }}\n\
             upstream fast {{ server {FAST_MIRROR}; keepalive 64; }}\n\
             upstream slow {{ server {SLOW_MIRROR}; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:8090; location / {{ return 200 \"ok\\n\"; }} }}\n\
             server {{ listen {v4}:8081; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
               location / {{ mirror /m; proxy_pass http://live; }}\n\
               location = /m {{ internal; proxy_pass http://fast$request_uri; }} }}\n\
             server {{ listen {v4}:8082; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
               location / {{ mirror /m; proxy_pass http://live; }}\n\
               location = /m {{ internal; proxy_pass http://slow$request_uri; }} }}",
            v4 = pair.server_v4
        ),
    )?;
    if !netlab::wait_until(Duration::from_secs(5), || curl_ok(&pair.client, &live_url)) {
        bail!("nginx did not start");
    }
    if args.saturation_only {
        let saturated = saturation(
            &bin,
            &pair,
            (&fast, &live_cgroup),
            &live_url,
            &mirror_log,
            args,
        )?;
        print_saturation(&saturated, args);
        return Ok(());
    }

    let max = wrk(&pair.client, &live_url, args.connections, args.seconds)?;
    let rate = (max / 2.0).round() as u64;
    eprintln!("calibration: live saturation {max:.0} req/s; fixed rate {rate} req/s");

    // The smallest budget tried at saturation, here with the fast mirror.
    let least = args
        .cpu_budgets
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let least = if least.is_finite() { least } else { 0.1 };
    let (least_flag, budgeted) = (
        least.to_string(),
        format!("agent, fast mirror, --cpu-budget {least}"),
    );
    let half_setups = [
        "no agent",
        "agent, fast mirror",
        budgeted.as_str(),
        "agent, 1.2 s mirror",
    ];
    let mut rows: Vec<HalfRow> = Vec::new();
    for round in 1..=args.rounds {
        for setup in half_setups {
            let start = |mirror, extra: &[&str]| {
                Agent::start_on(&bin.join("mirror-agent"), &pair, "8080", mirror, 512, extra)
            };
            let agent = match setup {
                "no agent" => None,
                "agent, fast mirror" => Some(start(FAST_MIRROR, &[])?),
                "agent, 1.2 s mirror" => Some(start(SLOW_MIRROR, &[])?),
                _ => Some(start(FAST_MIRROR, &["--cpu-budget", &least_flag])?),
            };
            let cpu0 = agent.as_ref().map(|a| a.proc.cpu_time());
            let mirrored0 = lines(&mirror_log);
            let pressure = LivePressure::start(&live_cgroup);
            let (p50, p99, served) = oha(
                &pair.client,
                &live_url,
                rate,
                args.connections,
                args.seconds,
            )?;
            let node_idle = pressure.node_idle();
            let pressure = pressure.share();
            let (mut cpu_per, mut share) = (None, None);
            if let Some(a) = agent {
                let cpu = a.proc.cpu_time() - cpu0.unwrap();
                let summary = a.stop()?.replay;
                if setup.starts_with("agent, fast mirror") {
                    std::thread::sleep(Duration::from_millis(1500));
                    let mirrored = (lines(&mirror_log) - mirrored0).max(1);
                    cpu_per = Some(cpu.as_secs_f64() * 1e6 / mirrored as f64);
                    share = Some(mirrored as f64 / served.max(1.0));
                }
                eprintln!("  {summary}");
            }
            eprintln!(
                "round {round} {setup:<22} p50 {p50:.3} ms p99 {p99:.3} ms cpu/req {cpu_per:?} µs, live pressure {:.1} %, node idle {:.1} %",
                pressure * 100.0,
                node_idle * 100.0
            );
            rows.push((setup, p50, p99, cpu_per, pressure, share));
        }
    }

    // Fidelity and CPU per request at a sustained rate, by delivery and response size, and
    // what tcpdump alone costs to capture the same traffic.
    let big_url = format!("http://{}:8083{PATH}", pair.server_v4);
    let costs = fixed_rate_costs(
        &bin,
        &pair,
        (&fast, &mirror_log),
        (&live_url, &big_url),
        (args.fidelity_rate, args.connections),
    )?;

    // nginx `mirror`, in path: throughput and latency against the same live service direct.
    let direct = wrk(&pair.client, &live_url, args.connections, args.seconds)?;
    let via_fast = wrk(
        &pair.client,
        &format!("http://{}:8081{PATH}", pair.server_v4),
        args.connections,
        args.seconds,
    )?;
    let via_slow = wrk(
        &pair.client,
        &format!("http://{}:8082{PATH}", pair.server_v4),
        args.connections,
        args.seconds,
    )?;
    let (slow_p50, _, _) = oha(
        &pair.client,
        &format!("http://{}:8082{PATH}", pair.server_v4),
        20,
        4,
        args.seconds.max(5),
    )?;

    let saturation = saturation(
        &bin,
        &pair,
        (&fast, &live_cgroup),
        &live_url,
        &mirror_log,
        args,
    )?;

    let base50 = median(
        rows.iter()
            .filter(|r| r.0 == "no agent")
            .map(|r| r.1)
            .collect(),
    );
    let base99 = median(
        rows.iter()
            .filter(|r| r.0 == "no agent")
            .map(|r| r.2)
            .collect(),
    );
    println!("\nfull-path benchmark: {} rounds, {} s runs, {} connections, fixed rate {rate} req/s (half of {max:.0})", args.rounds, args.seconds, args.connections);
    println!(
        "| setup | live p50 ms | ratio | live p99 ms | ratio | agent CPU µs per mirrored request | live CPU pressure | requests mirrored |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for setup in half_setups {
        let p50 = median(rows.iter().filter(|r| r.0 == setup).map(|r| r.1).collect());
        let p99 = median(rows.iter().filter(|r| r.0 == setup).map(|r| r.2).collect());
        let cpu = median(
            rows.iter()
                .filter(|r| r.0 == setup)
                .filter_map(|r| r.3)
                .collect(),
        );
        let cpu = if cpu.is_nan() {
            "-".to_string()
        } else {
            format!("{cpu:.1}")
        };
        let pressure = median(rows.iter().filter(|r| r.0 == setup).map(|r| r.4).collect());
        let share = median(
            rows.iter()
                .filter(|r| r.0 == setup)
                .filter_map(|r| r.5)
                .collect(),
        );
        let share = if share.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2} %", share * 100.0)
        };
        println!(
            "| {setup} | {p50:.3} | {:.3} | {p99:.3} | {:.3} | {cpu} | {:.1} % | {share} |",
            p50 / base50,
            p99 / base99,
            pressure * 100.0
        );
    }
    print_costs(&costs, (args.fidelity_rate, args.connections));
    println!(
        "\nnginx `mirror` in the path (wrk, {} connections): direct {direct:.0} req/s; via nginx mirror (fast) {via_fast:.0} req/s ({:.1} % of direct); \
         via nginx mirror (1.2 s mirror) {via_slow:.0} req/s ({:.1} %); live p50 through nginx with the slow mirror at 20 req/s: {slow_p50:.0} ms",
        args.connections,
        100.0 * via_fast / direct,
        100.0 * via_slow / direct
    );
    print_saturation(&saturation, args);
    Ok(())
}

/// The saturation table: each setup's medians, and ratios to no agent's.
fn print_saturation(saturation: &[Saturated], args: &FullBenchArgs) {
    println!(
        "\nat saturation (wrk, {} connections, {} s each, {} rounds interleaved, medians):",
        args.connections,
        saturation_seconds(args),
        args.saturation_rounds
    );
    println!("| setup | live req/s | ratio | live p99 ms | ratio | requests mirrored | live CPU pressure | node idle | agent's threads, cores | its kernel program in the live path, cores | the mirror (nginx on the same cores), cores | agent peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let of = |setup: &str, f: fn(&Saturated) -> f64| {
        median(
            saturation
                .iter()
                .filter(|r| r.setup == setup)
                .map(f)
                .collect(),
        )
    };
    let (base, base99) = (of("no agent", |r| r.throughput), of("no agent", |r| r.p99));
    let mut setups: Vec<&str> = Vec::new();
    for r in saturation {
        if !setups.contains(&r.setup.as_str()) {
            setups.push(&r.setup);
        }
    }
    for setup in setups {
        let (throughput, p99) = (of(setup, |r| r.throughput), of(setup, |r| r.p99));
        println!(
            "| {setup} | {throughput:.0} | {:.2} | {p99:.2} | {:.2} | {:.1} % | {:.1} % | {:.1} % | {:.2} | {:.2} | {:.2} | {:.0} |",
            throughput / base,
            p99 / base99,
            of(setup, |r| r.mirrored_share) * 100.0,
            of(setup, |r| r.live_pressure) * 100.0,
            of(setup, |r| r.node_idle) * 100.0,
            of(setup, |r| r.agent_cores),
            of(setup, |r| r.live_path_cores),
            of(setup, |r| r.mirror_cores),
            of(setup, |r| r.agent_rss_mib),
        );
    }
}

/// One run at half of saturation: (setup, p50, p99, agent CPU µs per mirrored request, live CPU
/// pressure, share mirrored).
type HalfRow<'a> = (&'a str, f64, f64, Option<f64>, f64, Option<f64>);

/// One saturation run.
struct Saturated {
    setup: String,
    throughput: f64,
    p99: f64,
    mirrored_share: f64,
    live_pressure: f64,
    node_idle: f64,
    agent_cores: f64,
    live_path_cores: f64,
    mirror_cores: f64,
    agent_rss_mib: f64,
}

/// Long enough for the budget to reach its last resort on wrk's long-lived connections.
fn saturation_seconds(args: &FullBenchArgs) -> u64 {
    args.seconds.max(15)
}

/// (label, the agent's extra flags (None: no agent), the cgroup CPU limit it runs under)
type Setup = (String, Option<Vec<String>>, Option<f64>);

/// The saturation setups: no agent; the agent with its defaults (shedding by the live
/// service's CPU pressure, requests delivered by records), without that limit (as before it),
/// each with clones too; with each of `--cpu-budgets`; and with its defaults in a small cgroup,
/// as a DaemonSet pod on a larger node.
fn saturation_setups(args: &FullBenchArgs) -> Vec<Setup> {
    let flags = |f: &[&str]| Some(f.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let mut setups: Vec<Setup> = vec![
        ("no agent".into(), None, None),
        ("agent, defaults".into(), flags(&[]), None),
        (
            "agent, --delivery clones".into(),
            flags(&["--delivery", "clones"]),
            None,
        ),
        (
            "agent, --max-live-pressure off".into(),
            flags(&["--max-live-pressure", "off"]),
            None,
        ),
        (
            "agent, --max-live-pressure off --delivery clones".into(),
            flags(&["--max-live-pressure", "off", "--delivery", "clones"]),
            None,
        ),
    ];
    for b in &args.cpu_budgets {
        setups.push((
            format!("agent, --cpu-budget {b}"),
            flags(&["--cpu-budget", &b.to_string()]),
            None,
        ));
    }
    setups.push((
        format!(
            "agent in a {}-core cgroup (DaemonSet-like), defaults",
            args.daemonset_cores
        ),
        flags(&[]),
        Some(args.daemonset_cores),
    ));
    setups
}

/// At saturation, rounds interleaved: what the agent costs the live service in each of
/// `saturation_setups`.
fn saturation(
    bin: &Path,
    pair: &Pair,
    (mirror, live_cgroup): (&Nginx, &PsiCgroup),
    live_url: &str,
    mirror_log: &Path,
    args: &FullBenchArgs,
) -> Result<Vec<Saturated>> {
    let setups = saturation_setups(args);
    let seconds = saturation_seconds(args);
    let mut runs = Vec::new();
    for round in 1..=args.saturation_rounds {
        for (setup, extra, limit) in &setups {
            let cgroup = limit
                .map(|cores| CpuCgroup::new("mirror-bench", cores))
                .transpose()?;
            let agent = match extra {
                Some(extra) => {
                    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                    Some(Agent::start_in(
                        cgroup.as_ref(),
                        &bin.join("mirror-agent"),
                        pair,
                        "8080",
                        FAST_MIRROR,
                        512,
                        &extra,
                    )?)
                }
                None => None,
            };
            let before = lines(mirror_log);
            let cpu0 = agent.as_ref().map(|a| a.proc.cpu_time());
            let mirror_cpu0 = mirror.cpu_time();
            let pressure = LivePressure::start(live_cgroup);
            let (throughput, p99) = wrk_latency(&pair.client, live_url, args.connections, seconds)?;
            let per_second = |d: Duration| d.as_secs_f64() / seconds as f64;
            let mut run = Saturated {
                setup: setup.to_string(),
                throughput,
                p99,
                mirrored_share: 0.0,
                live_pressure: pressure.share(),
                node_idle: pressure.node_idle(),
                agent_cores: 0.0,
                live_path_cores: 0.0,
                mirror_cores: per_second(mirror.cpu_time() - mirror_cpu0),
                agent_rss_mib: f64::NAN,
            };
            if let (Some(a), Some(cpu0)) = (agent, cpu0) {
                run.agent_cores = per_second(a.proc.cpu_time() - cpu0);
                run.agent_rss_mib = peak_rss_mib(a.proc.pid());
                let stopped = a.stop()?;
                eprintln!(
                    "round {round} {setup}: {}\n  {}",
                    stopped.replay, stopped.budget
                );
                run.live_path_cores = stopped.live_path_seconds / seconds as f64;
            }
            drop(cgroup);
            std::thread::sleep(Duration::from_millis(1500));
            let mirrored = lines(mirror_log) - before;
            run.mirrored_share = mirrored as f64 / (throughput * seconds as f64).max(1.0);
            eprintln!(
                "round {round} {setup}: {throughput:.0} req/s, p99 {p99:.2} ms, {:.1} % mirrored, live pressure {:.1} %, node idle {:.1} %, agent peak RSS {:.0} MiB",
                run.mirrored_share * 100.0,
                run.live_pressure * 100.0,
                run.node_idle * 100.0,
                run.agent_rss_mib
            );
            runs.push(run);
        }
    }
    Ok(runs)
}

const FIDELITY_SECONDS: u64 = 10;

/// CPU per request at a fixed rate, all in µs per request served.
struct Fidelity {
    label: &'static str,
    served: f64,
    /// Requests the mirror logged; None for the runs without an agent.
    received: Option<usize>,
    /// The agent's threads, or tcpdump's process.
    process_us: f64,
    /// The kernel program's own work in the live path (`WORK_NS`).
    program_us: Option<f64>,
    mirror_us: f64,
}

/// Runs at a fixed `(rate, connections)` against the `ok` and the 16 KiB live services
/// (`urls`): with the agent delivering by records and by clones, and with tcpdump capturing
/// instead. (The node's whole CPU per request was tried too: on this shared 2-core machine its
/// baseline moved more between runs than mirroring adds.)
fn fixed_rate_costs(
    bin: &Path,
    pair: &Pair,
    mirror: (&Nginx, &Path),
    (ok_url, big_url): (&str, &str),
    load: (u64, usize),
) -> Result<Vec<Fidelity>> {
    let start = |port, extra: &[&str]| {
        Agent::start_on(
            &bin.join("mirror-agent"),
            pair,
            port,
            FAST_MIRROR,
            512,
            extra,
        )
    };
    let mut runs = vec![
        fixed_rate(
            pair,
            ok_url,
            mirror,
            load,
            "agent, records (default), `ok`",
            Some(start("8080", &[])?),
            None,
        )?,
        fixed_rate(
            pair,
            ok_url,
            mirror,
            load,
            "agent, clones, `ok`",
            Some(start("8080", &["--delivery", "clones"])?),
            None,
        )?,
        fixed_rate(
            pair,
            big_url,
            mirror,
            load,
            "agent, records (default), 16 KiB",
            Some(start("8083", &[])?),
            None,
        )?,
    ];
    let tcpdump = Proc::spawn(
        pair.server
            .exec(&[
                "tcpdump",
                "-i",
                "srv0",
                "-s",
                "0",
                "-w",
                "/dev/null",
                "tcp port 8080",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // tcpdump has no ready signal; it opens its capture well within this.
    std::thread::sleep(Duration::from_millis(1000));
    let label = "tcpdump capturing the `ok` traffic (whole packets, to /dev/null)";
    runs.push(fixed_rate(
        pair,
        ok_url,
        mirror,
        load,
        label,
        None,
        Some(&tcpdump),
    )?);
    for r in &runs {
        if let Some(received) = r.received {
            let lost = r.served - received as f64;
            eprintln!(
                "{}: mirror received {received} of {:.0} ({lost:.0} missing)",
                r.label, r.served
            );
        }
    }
    Ok(runs)
}

/// One fixed-rate run, with an agent, tcpdump (`capturer`) or neither.
fn fixed_rate(
    pair: &Pair,
    url: &str,
    (mirror, mirror_log): (&Nginx, &Path),
    (rate, connections): (u64, usize),
    label: &'static str,
    agent: Option<Agent>,
    capturer: Option<&Proc>,
) -> Result<Fidelity> {
    let process0 = agent
        .as_ref()
        .map(|a| &a.proc)
        .or(capturer)
        .map(Proc::cpu_time);
    let mirror0 = mirror.cpu_time();
    let mirrored0 = lines(mirror_log);
    let (_, _, served) = oha(&pair.client, url, rate, connections, FIDELITY_SECONDS)?;
    let process = agent
        .as_ref()
        .map(|a| &a.proc)
        .or(capturer)
        .map(Proc::cpu_time);
    let process = process.zip(process0).map_or(Duration::ZERO, |(b, a)| b - a);
    if served < 1.0 {
        bail!("the fixed-rate run {label:?} served nothing");
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / served;
    let mut run = Fidelity {
        label,
        served,
        received: None,
        process_us: per(process),
        program_us: None,
        mirror_us: per(mirror.cpu_time() - mirror0),
    };
    if let Some(agent) = agent {
        let stopped = agent.stop()?;
        eprintln!("{label}: {}", stopped.replay);
        std::thread::sleep(Duration::from_millis(1500));
        run.received = Some(lines(mirror_log) - mirrored0);
        run.program_us = Some(per(Duration::from_secs_f64(stopped.live_path_seconds)));
    }
    Ok(run)
}

fn print_costs(costs: &[Fidelity], (rate, connections): (u64, usize)) {
    println!("\nat {rate} req/s for {FIDELITY_SECONDS} s (oha, {connections} connections), CPU in µs per request served:");
    println!("| setup | live served | mirror received | fidelity | agent (or tcpdump) | kernel program in the live path | the mirror |");
    println!("|---|---|---|---|---|---|---|");
    for r in costs {
        let (received, fidelity) = match r.received {
            Some(n) => (
                n.to_string(),
                format!("{:.2} %", 100.0 * n as f64 / r.served),
            ),
            None => ("-".into(), "-".into()),
        };
        let program = r.program_us.map_or("-".into(), |us| format!("{us:.2}"));
        println!(
            "| {} | {:.0} | {received} | {fidelity} | {:.2} | {program} | {:.2} |",
            r.label, r.served, r.process_us, r.mirror_us
        );
    }
}
