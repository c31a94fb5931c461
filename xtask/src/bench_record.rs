//! `cargo xtask bench-record`: what `--record` costs on top of mirroring, and how fast
//! `mirror-agent replay --speed max` sends a recording. Setups interleaved round by round:
//! the agent mirroring alone, and mirroring while recording; agent CPU per request served at a
//! fixed rate (20k req/s by default), live served against mirror received and requests recorded.
//! Then the last recording replayed flat out on one core (taskset), requests per second.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netlab::Pair;

use crate::bench::{curl_ok, oha, Nginx};
use crate::bench_full::{median, Agent};

const MIRROR: &str = "127.0.0.1:9080";

#[derive(clap::Args)]
pub struct RecordBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 8)]
    pub seconds: u64,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
}

pub fn run(root: &Path, args: &RecordBenchArgs) -> Result<()> {
    let bin = root.join("target/release/mirror-agent");
    let pair = Pair::new("bk", 245);
    let live = format!("{}:8080", pair.server_v4);
    let _live = Nginx::start(&pair.server, &live, "")?;
    let _mirror = Nginx::start(&pair.server, MIRROR, "")?;
    let url = format!("http://{live}/api/books/1?page=2");
    if !netlab::wait_until(Duration::from_secs(5), || curl_ok(&pair.client, &url)) {
        bail!("nginx did not start");
    }
    let rec = tempfile::tempdir()?;
    // (setup, CPU µs per request, requests recorded per request served)
    let mut rows: Vec<(&str, f64, Option<f64>)> = Vec::new();
    for round in 1..=args.rounds {
        for setup in ["mirroring", "mirroring + --record"] {
            let dir = rec.path().join(format!("r{round}"));
            let dir_arg = dir.to_str().unwrap().to_string();
            let extra: Vec<&str> = if setup == "mirroring" {
                vec![]
            } else {
                vec!["--record", &dir_arg]
            };
            let agent = Agent::start_on(&bin, &pair, "8080", MIRROR, 512, &extra)?;
            let cpu0 = agent.proc.cpu_time();
            let (_, _, served) = oha(
                &pair.client,
                &url,
                args.rate,
                args.connections,
                args.seconds,
            )?;
            let cpu = agent.proc.cpu_time() - cpu0;
            let summary = agent.stop_with_record()?;
            let per = cpu.as_secs_f64() * 1e6 / served.max(1.0);
            let recorded = summary.map(|n| n as f64 / served.max(1.0));
            eprintln!("round {round} {setup:<22} {per:.1} µs/request, recorded {recorded:?}");
            rows.push((setup, per, recorded));
        }
    }
    let last = rec.path().join(format!("r{}", args.rounds));
    let size: u64 = std::fs::read_dir(&last)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();

    // The last recording, flat out, on CPU 0 only.
    let started = Instant::now();
    let out = pair
        .server
        .exec(&[
            "taskset",
            "-c",
            "0",
            bin.to_str().unwrap(),
            "replay",
            last.to_str().unwrap(),
            "--mirror",
            &format!("http://{MIRROR}"),
            "--speed",
            "max",
            "--connections",
            "16",
        ])
        .stdout(Stdio::null())
        .output()
        .context("running mirror-agent replay")?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stderr
        .lines()
        .rfind(|l| l.starts_with("replay:") && l.contains("recorded"))
        .unwrap_or("")
        .to_string();
    if !out.status.success() {
        bail!("replay failed: {stderr}");
    }

    println!(
        "\nrecording: {} rounds, oha at {} req/s for {} s, {} connections",
        args.rounds, args.rate, args.seconds, args.connections
    );
    println!("| setup | agent CPU µs per request served | requests recorded per request served |");
    println!("|---|---|---|");
    for setup in ["mirroring", "mirroring + --record"] {
        let cpu = median(rows.iter().filter(|r| r.0 == setup).map(|r| r.1).collect());
        let rec = median(
            rows.iter()
                .filter(|r| r.0 == setup)
                .filter_map(|r| r.2)
                .collect(),
        );
        let rec = if rec.is_nan() {
            "-".into()
        } else {
            format!("{rec:.4}")
        };
        println!("| {setup} | {cpu:.1} | {rec} |");
    }
    println!(
        "\nlast recording: {:.1} MiB on disk; replayed at --speed max on one core in {:.1} s: {summary}",
        size as f64 / (1 << 20) as f64,
        took.as_secs_f64()
    );
    Ok(())
}
