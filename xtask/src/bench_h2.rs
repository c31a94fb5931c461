//! `cargo xtask bench-h2`: HTTP/2 mirroring at a fixed rate next to HTTP/1.1 in the same run.
//!
//! h2load offers the same rate over h2c (prior knowledge) and over HTTP/1.1 (`--h1`) to a live
//! nginx; the agent mirrors each to an nginx mirror that logs what it receives. Reported: the
//! share of live requests the mirror received (fidelity) and the agent's CPU per mirrored
//! request, per protocol. Figures, not pass/fail.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use netlab::Pair;

use crate::bench::Nginx;
use crate::bench_full::Agent;

const MIRROR_H1: &str = "127.0.0.1:9080";
const MIRROR_H2: &str = "127.0.0.1:9081";

#[derive(clap::Args)]
pub struct H2BenchArgs {
    /// Requests per second offered, per protocol.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Client connections (HTTP/2 multiplexes up to 100 streams on each).
    #[arg(long, default_value_t = 16)]
    pub connections: u64,
}

struct Run {
    served: u64,
    received: usize,
    cpu_us_per_request: f64,
    replay: String,
}

pub fn run(root: &Path, args: &H2BenchArgs) -> Result<()> {
    let bin = root.join("target/release/mirror-agent");
    let pair = Pair::new("bh2", 247);
    let logs = tempfile::tempdir()?;
    let (log_h1, log_h2) = (logs.path().join("h1.log"), logs.path().join("h2.log"));
    let live = format!("{}:8080", pair.server_v4);
    let live_h1 = format!("{}:8081", pair.server_v4);
    let ok = "location / { return 200 \"ok\\n\"; }";
    let _nginx = Nginx::with_servers(
        &pair.server,
        &format!(
            "server {{ listen {live} http2; {ok} }}\n\
             server {{ listen {live_h1}; {ok} }}\n\
             server {{ listen {MIRROR_H1}; access_log {} combined buffer=256k flush=1s; {ok} }}\n\
             server {{ listen {MIRROR_H2} http2; access_log {} combined buffer=256k flush=1s; {ok} }}",
            log_h1.display(),
            log_h2.display()
        ),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let h2 = measure(&bin, &pair, "8080", MIRROR_H2, &log_h2, &live, false, args)?;
    let h1 = measure(
        &bin, &pair, "8081", MIRROR_H1, &log_h1, &live_h1, true, args,
    )?;
    println!(
        "\nHTTP/2 vs HTTP/1.1 mirroring: h2load at {} req/s for {} s, {} connections, each protocol",
        args.rate, args.seconds, args.connections
    );
    println!("| protocol | live served | mirror received | fidelity | agent CPU µs per mirrored request |");
    println!("|---|---|---|---|---|");
    for (name, r) in [("HTTP/2 (h2c)", &h2), ("HTTP/1.1", &h1)] {
        println!(
            "| {name} | {} | {} | {:.2} % | {:.1} |",
            r.served,
            r.received,
            100.0 * r.received as f64 / r.served.max(1) as f64,
            r.cpu_us_per_request
        );
    }
    println!(
        "\nHTTP/2 costs {:.2}× HTTP/1.1's agent CPU per mirrored request",
        h2.cpu_us_per_request / h1.cpu_us_per_request
    );
    println!(
        "replay, HTTP/2: {}\nreplay, HTTP/1.1: {}",
        h2.replay, h1.replay
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure(
    bin: &Path,
    pair: &Pair,
    port: &str,
    mirror: &str,
    log: &Path,
    live: &str,
    h1: bool,
    args: &H2BenchArgs,
) -> Result<Run> {
    let agent = Agent::start_on(bin, pair, port, mirror, 1024, &[])?;
    let before = lines(log);
    let cpu0 = agent.proc.cpu_time();
    let per_client = (args.rate / args.connections).max(1);
    let mut cmd = pair.client.exec(&[
        "h2load",
        "-c",
        &args.connections.to_string(),
        "-m",
        "10",
        "--rps",
        &per_client.to_string(),
        "-D",
        &args.seconds.to_string(),
    ]);
    if h1 {
        cmd.arg("--h1");
    }
    let out = cmd
        .arg(format!("http://{live}/api/books/1/reviews"))
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "requests: 200000 total, 200000 started, 200000 done, 200000 succeeded, ..."
    let served = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" succeeded")))
        .and_then(|p| p.trim_end_matches(" succeeded").trim().parse().ok())
        .with_context(|| format!("h2load output:\n{text}"))?;
    let cpu = agent.proc.cpu_time() - cpu0;
    let replay = agent.stop()?.replay;
    std::thread::sleep(Duration::from_millis(1500));
    let received = lines(log) - before;
    Ok(Run {
        served,
        received,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / received.max(1) as f64,
        replay,
    })
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}
