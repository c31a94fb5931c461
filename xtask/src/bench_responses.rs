//! `cargo xtask bench-responses`: what capturing the live service's responses costs the live
//! service, with large responses (16 KiB by default). Setups interleaved round by round:
//! no agent; the agent with `--no-responses`; responses described by their heads
//! (`--response-capture heads`, the default); responses cloned whole (`--response-capture
//! full`). Throughput at saturation
//! (wrk), agent CPU per request, and at a fixed rate the live responses the agent paired.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use netlab::Pair;

use crate::bench::{curl_ok, oha, wrk, Nginx};
use crate::bench_full::{median, Agent};

const MIRROR: &str = "127.0.0.1:9080";
const METRICS: &str = "127.0.0.1:9464";

#[derive(clap::Args)]
pub struct ResponsesBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Response body size in KiB.
    #[arg(long, default_value_t = 16)]
    pub body_kib: usize,
    /// Offered rate of the pairing run (requests per second, `--seconds` long).
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
}

/// (setup, live req/s, agent CPU µs per request served, its kernel program's µs per request
/// served in the live path)
type Row = (&'static str, f64, Option<f64>, Option<f64>);

const SETUPS: [(&str, Option<&[&str]>); 4] = [
    ("no agent", None),
    ("agent --no-responses", Some(&["--no-responses"])),
    (
        "agent, response heads",
        Some(&["--response-capture", "heads"]),
    ),
    (
        "agent, responses cloned whole",
        Some(&["--response-capture", "full"]),
    ),
];

pub fn run(root: &Path, args: &ResponsesBenchArgs) -> Result<()> {
    let bin = root.join("target/release/mirror-agent");
    let pair = Pair::new("br", 242);
    let docs = tempfile::tempdir()?;
    std::fs::write(docs.path().join("body"), vec![b'r'; args.body_kib << 10])?;
    let live = format!("{}:8080", pair.server_v4);
    let _live = Nginx::with_servers(
        &pair.server,
        &format!(
            "server {{ listen {live} reuseport; location / {{ root {}; try_files /body =404; }} }}",
            docs.path().display()
        ),
    )?;
    let _mirror = Nginx::start(&pair.server, MIRROR, "")?;
    let url = format!("http://{live}/api/books/1");
    if !netlab::wait_until(Duration::from_secs(5), || curl_ok(&pair.client, &url)) {
        bail!("nginx did not start");
    }

    let mut rows: Vec<Row> = Vec::new();
    for round in 1..=args.rounds {
        for (setup, extra) in SETUPS {
            let agent = extra
                .map(|e| Agent::start_on(&bin, &pair, "8080", MIRROR, 512, e))
                .transpose()?;
            let cpu0 = agent.as_ref().map(|a| a.proc.cpu_time());
            let rps = wrk(&pair.client, &url, args.connections, args.seconds)?;
            let cpu = agent.as_ref().map(|a| {
                (a.proc.cpu_time() - cpu0.unwrap()).as_secs_f64() * 1e6
                    / (rps * args.seconds as f64).max(1.0)
            });
            let live_path = match agent {
                Some(a) => {
                    Some(a.stop()?.live_path_seconds * 1e6 / (rps * args.seconds as f64).max(1.0))
                }
                None => None,
            };
            eprintln!("round {round} {setup:<30} {rps:.0} req/s, agent CPU {cpu:?} µs/req, live path {live_path:?} µs/req");
            rows.push((setup, rps, cpu, live_path));
        }
    }

    // Pairing: at a fixed rate, every live response timed and paired, in both modes.
    let mut pairing = Vec::new();
    for (setup, extra) in &SETUPS[2..] {
        let mut e = extra.unwrap().to_vec();
        e.extend(["--metrics", METRICS]);
        let agent = Agent::start_on(&bin, &pair, "8080", MIRROR, 512, &e)?;
        let (_, _, served) = oha(
            &pair.client,
            &url,
            args.rate,
            args.connections,
            args.seconds,
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        let text = pair
            .server
            .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
            .output()?
            .stdout;
        agent.stop()?;
        let text = String::from_utf8_lossy(&text);
        let metric = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        pairing.push((
            *setup,
            served,
            metric("mirror_http_responses_total "),
            metric("mirror_kernel_packets_total{outcome=\"head_recorded\"} "),
            metric("mirror_kernel_packets_total{outcome=\"cloned\"} "),
        ));
    }

    let of = |setup: &str, f: &dyn Fn(&Row) -> Option<f64>| {
        median(rows.iter().filter(|r| r.0 == setup).filter_map(f).collect())
    };
    let base = of("no agent", &|r| Some(r.1));
    println!(
        "\nresponse capture with {} KiB responses: {} rounds, wrk {} s, {} connections",
        args.body_kib, args.rounds, args.seconds, args.connections
    );
    println!("| setup | live req/s | ratio to no agent | agent CPU µs per request | kernel program in the live path, µs per request |");
    println!("|---|---|---|---|---|");
    let figure = |v: f64, decimals: usize| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.decimals$}")
        }
    };
    for (setup, _) in SETUPS {
        let rps = of(setup, &|r| Some(r.1));
        let cpu = figure(of(setup, &|r| r.2), 1);
        let live_path = figure(of(setup, &|r| r.3), 2);
        println!(
            "| {setup} | {rps:.0} | {:.2} | {cpu} | {live_path} |",
            rps / base
        );
    }
    println!("\nat {} req/s for {} s:", args.rate, args.seconds);
    println!("| setup | live served | live responses paired | head records | clones |");
    println!("|---|---|---|---|---|");
    for (setup, served, paired, heads, clones) in &pairing {
        println!(
            "| {setup} | {served:.0} | {paired:.0} ({:.2} %) | {heads:.0} | {clones:.0} |",
            100.0 * paired / served.max(1.0)
        );
    }
    Ok(())
}
