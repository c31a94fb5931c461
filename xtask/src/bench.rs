//! `cargo xtask bench-capture`: the cost of the capture path to the live service.
//!
//! The live service is Debian's nginx (one worker, a small 200) in a server namespace, loaded
//! from a client namespace. Three setups are interleaved round by round so that the machine's
//! drift hits all of them alike: no program, the program cloning with nobody reading the clones,
//! and the program with the agent reading. Figures are medians, and ratios against no program.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use netlab::{Pair, Proc};

#[derive(clap::Args)]
pub struct CaptureBenchArgs {
    /// Rounds; each runs every setup once, in turn.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per load run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent connections of the load generators.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    NoProgram,
    ProgramOnly,
    ProgramAndAgent,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::NoProgram, Setup::ProgramOnly, Setup::ProgramAndAgent];
    fn label(self) -> &'static str {
        match self {
            Setup::NoProgram => "no program",
            Setup::ProgramOnly => "program only (clones unread)",
            Setup::ProgramAndAgent => "program + agent reading",
        }
    }
}

#[derive(Default, Clone)]
struct Sample {
    p50_ms: f64,
    p99_ms: f64,
    saturated_rps: f64,
    ns_per_run: Option<f64>,
    agent_cpu_us_per_1k: Option<f64>,
    ring_drops: Option<u64>,
}

/// nginx with one worker in a namespace, with the given server blocks.
pub struct Nginx {
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// A small 200 on `listen` (the live service and the fast mirror of the benchmarks).
    pub fn start(ns: &netlab::Netns, listen: &str, extra_server: &str) -> Result<Nginx> {
        Self::with_servers(
            ns,
            &format!("server {{\n listen {listen} reuseport;\n location / {{ return 200 \"ok\\n\"; }}\n{extra_server}\n}}"),
        )
    }

    pub fn with_servers(ns: &netlab::Netns, servers: &str) -> Result<Nginx> {
        let dir = tempfile::Builder::new().prefix("mirror-nginx").tempdir()?;
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
             uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n{servers}\n}}\n",
            d = dir.path().display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let proc = Proc::spawn(
            ns.exec(&[
                "nginx",
                "-c",
                conf_path.to_str().unwrap(),
                "-p",
                dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        );
        Ok(Nginx { proc, _dir: dir })
    }

    /// Its master's and workers' pids.
    pub fn pids(&self) -> Vec<i32> {
        let master = self.proc.pid();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(
                children
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok()),
            )
            .collect()
    }

    /// CPU time of its master and worker processes so far.
    pub fn cpu_time(&self) -> Duration {
        self.pids().into_iter().map(netlab::cpu_time).sum()
    }
}

pub fn capture(root: &Path, args: &CaptureBenchArgs) -> Result<()> {
    let agent_bin = root.join("target/release/mirror-agent");
    let pair = Pair::new("bc", 240);
    let url = format!("http://{}:8080/", pair.server_v4);
    let _nginx = Nginx::start(&pair.server, &format!("{}:8080", pair.server_v4), "")?;
    if !netlab::wait_until(Duration::from_secs(5), || curl_ok(&pair.client, &url)) {
        bail!("nginx did not start in the server namespace");
    }
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling bpf_stats")?;

    // Calibrate: half the no-program maximum is the fixed offered rate.
    let max = wrk(&pair.client, &url, args.connections, args.seconds)?;
    let rate = (max / 2.0).round() as u64;
    eprintln!("calibration: no-program saturation {max:.0} req/s; fixed rate {rate} req/s");

    let mut samples: Vec<(Setup, Sample)> = Vec::new();
    for round in 1..=args.rounds {
        for setup in Setup::ALL {
            let s = run_setup(setup, &agent_bin, &pair, &url, rate, args)?;
            eprintln!(
                "round {round} {:<30} p50 {:.3} ms  p99 {:.3} ms  sat {:.0} req/s  ns/run {:?}  agent µs/1k {:?}  drops {:?}",
                setup.label(), s.p50_ms, s.p99_ms, s.saturated_rps, s.ns_per_run.map(|v| v.round()),
                s.agent_cpu_us_per_1k.map(|v| v.round()), s.ring_drops
            );
            samples.push((setup, s));
        }
    }

    let base = median_of(&samples, Setup::NoProgram, |s| Some(s.p50_ms));
    let base99 = median_of(&samples, Setup::NoProgram, |s| Some(s.p99_ms));
    let base_sat = median_of(&samples, Setup::NoProgram, |s| Some(s.saturated_rps));
    println!("\ncapture benchmark: {} rounds, {} s per run, {} connections, fixed rate {rate} req/s (half of {max:.0})", args.rounds, args.seconds, args.connections);
    println!("| setup | p50 ms | p50 ratio | p99 ms | p99 ratio | saturation req/s | ratio | ns per program run | agent CPU µs per 1k req | ring drops |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for setup in Setup::ALL {
        let p50 = median_of(&samples, setup, |s| Some(s.p50_ms));
        let p99 = median_of(&samples, setup, |s| Some(s.p99_ms));
        let sat = median_of(&samples, setup, |s| Some(s.saturated_rps));
        let nsr = median_of(&samples, setup, |s| s.ns_per_run);
        let cpu = median_of(&samples, setup, |s| s.agent_cpu_us_per_1k);
        let drops: Option<u64> = samples
            .iter()
            .filter(|(k, _)| *k == setup)
            .filter_map(|(_, s)| s.ring_drops)
            .reduce(|a, b| a + b);
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.3} | {} | {} | {} |",
            setup.label(),
            p50,
            p50 / base,
            p99,
            p99 / base99,
            sat,
            sat / base_sat,
            fmt_opt(nsr, 0),
            fmt_opt(cpu, 0),
            drops.map(|d| d.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

fn fmt_opt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn median_of(samples: &[(Setup, Sample)], setup: Setup, f: impl Fn(&Sample) -> Option<f64>) -> f64 {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|(k, _)| *k == setup)
        .filter_map(|(_, s)| f(s))
        .collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run_setup(
    setup: Setup,
    agent_bin: &Path,
    pair: &Pair,
    url: &str,
    rate: u64,
    args: &CaptureBenchArgs,
) -> Result<Sample> {
    let mut agent = match setup {
        Setup::NoProgram => None,
        Setup::ProgramOnly => Some(start_agent(agent_bin, pair, &["--no-reader"])?),
        Setup::ProgramAndAgent => Some(start_agent(agent_bin, pair, &[])?),
    };
    let prog_before = agent
        .as_ref()
        .map(|(_, id)| program_stats(*id))
        .transpose()?;
    let cpu_before = agent.as_ref().map(|(p, _)| p.cpu_time());
    let (p50_ms, p99_ms, fixed_requests) =
        oha(&pair.client, url, rate, args.connections, args.seconds)?;
    let saturated_rps = wrk(&pair.client, url, args.connections, args.seconds)?;
    let requests = fixed_requests + saturated_rps * args.seconds as f64;
    let mut sample = Sample {
        p50_ms,
        p99_ms,
        saturated_rps,
        ..Sample::default()
    };
    if let Some((proc, id)) = agent.as_mut() {
        let (t1, c1) = program_stats(*id)?;
        let (t0, c0) = prog_before.unwrap();
        sample.ns_per_run = Some((t1 - t0) as f64 / (c1 - c0).max(1) as f64);
        if setup == Setup::ProgramAndAgent {
            let cpu = proc.cpu_time() - cpu_before.unwrap();
            sample.agent_cpu_us_per_1k = Some(cpu.as_secs_f64() * 1e6 / (requests / 1000.0));
        }
        proc.signal(libc::SIGTERM);
        let (code, err) = proc.wait_exit(Duration::from_secs(15));
        if code != Some(0) && setup == Setup::ProgramAndAgent {
            bail!("agent exited with {code:?}: {err}");
        }
        if setup == Setup::ProgramAndAgent {
            sample.ring_drops = err
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ring_drops="))
                .and_then(|v| v.parse().ok());
        }
    }
    Ok(sample)
}

fn start_agent(bin: &Path, pair: &Pair, extra: &[&str]) -> Result<(Proc, u32)> {
    let mut cmd = pair.server.exec(&[
        bin.to_str().unwrap(),
        "attach",
        "--iface",
        "srv0",
        "--port",
        "8080",
    ]);
    cmd.args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = Proc::spawn(&mut cmd);
    let stdout = proc.child.as_mut().unwrap().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let id: u32 = line
        .rsplit("program id ")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("agent did not start: {line:?}"))?;
    Ok((proc, id))
}

/// (run time ns, run count) of a loaded program, from bpf_stats.
fn program_stats(id: u32) -> Result<(u64, u64)> {
    let info = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .ok_or_else(|| anyhow!("program {id} not loaded"))?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

/// Whether `url` answers with a success from inside `ns`, within a second.
pub fn curl_ok(ns: &netlab::Netns, url: &str) -> bool {
    ns.exec(&["curl", "-sf", "--max-time", "1", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Saturation throughput (req/s) from wrk.
pub fn wrk(ns: &netlab::Netns, url: &str, connections: usize, seconds: u64) -> Result<f64> {
    wrk_latency(ns, url, connections, seconds).map(|(rate, _)| rate)
}

/// Saturation throughput (req/s) and p99 latency (ms) from wrk.
pub fn wrk_latency(
    ns: &netlab::Netns,
    url: &str,
    connections: usize,
    seconds: u64,
) -> Result<(f64, f64)> {
    let out = ns
        .exec(&[
            "wrk",
            "-t1",
            "--latency",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            url,
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| wrk_ms(v.trim()))
        .ok_or_else(|| anyhow!("no 99% latency in wrk output:\n{text}"))?;
    Ok((rate, p99))
}

/// A wrk duration ("812.00us", "1.44ms", "2.01s") in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}

/// Fixed-rate load with oha: (p50 ms, p99 ms, requests completed).
pub fn oha(
    ns: &netlab::Netns,
    url: &str,
    rate: u64,
    connections: usize,
    seconds: u64,
) -> Result<(f64, f64, f64)> {
    oha_with(ns, url, rate, connections, seconds, &[])
}

/// `oha` with extra arguments (`--insecure` for a test certificate, say).
pub fn oha_with(
    ns: &netlab::Netns,
    url: &str,
    rate: u64,
    connections: usize,
    seconds: u64,
    extra: &[&str],
) -> Result<(f64, f64, f64)> {
    let out = ns
        .exec(&[
            "oha",
            "--no-tui",
            "--output-format",
            "json",
            "-z",
            &format!("{seconds}s"),
            "-q",
            &rate.to_string(),
            "-c",
            &connections.to_string(),
        ])
        .args(extra)
        .arg(url)
        .output()
        .context("running oha (cargo install oha)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().map(|s| s * 1000.0);
    let total = v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0);
    Ok((
        pct("p50").ok_or_else(|| anyhow!("no p50 in oha output"))?,
        pct("p99").ok_or_else(|| anyhow!("no p99 in oha output"))?,
        total,
    ))
}
