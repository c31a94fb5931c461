//! `cargo xtask bench-content`: what comparing contents (`--compare-bodies`) costs the agent,
//! per compared request, with 2 KiB and 64 KiB JSON bodies, against the same traffic with the
//! comparison off. Live and mirror serve the same documents, so every comparison walks the
//! whole document (the most a JSON comparison costs). Setups interleaved round by round, at a
//! fixed rate (oha); agent CPU from /proc.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use netlab::Pair;

use crate::bench::{curl_ok, oha, Nginx};
use crate::bench_full::{median, Agent};

const MIRROR: &str = "127.0.0.1:9080";
const METRICS: &str = "127.0.0.1:9465";

#[derive(clap::Args)]
pub struct ContentBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Offered rate, requests per second.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

/// (body KiB, compared, agent CPU µs per request, share of requests compared)
type Row = (usize, bool, f64, f64);

/// A JSON document of about `bytes`: a list of books, as an API answers.
fn document(bytes: usize) -> String {
    let mut items = Vec::new();
    let mut len = 20;
    let mut i = 0;
    while len < bytes {
        let item = format!(
            "{{\"id\":{i},\"title\":\"Book number {i}\",\"rating\":{}.{},\"price\":{}.99,\"tags\":[\"fiction\",\"classic\"],\"inStock\":true}}",
            3 + i % 2,
            i % 10,
            5 + i % 20
        );
        len += item.len() + 1;
        items.push(item);
        i += 1;
    }
    format!("{{\"total\":{i},\"items\":[{}]}}", items.join(","))
}

pub fn run(root: &Path, args: &ContentBenchArgs) -> Result<()> {
    let bin = root.join("target/release/mirror-agent");
    let pair = Pair::new("bct", 244);
    let docs = tempfile::tempdir()?;
    for kib in [2, 64] {
        std::fs::write(docs.path().join(format!("{kib}.json")), document(kib << 10))?;
    }
    let site = format!(
        "location / {{ root {}; default_type application/json; }}",
        docs.path().display()
    );
    let live = format!("{}:8080", pair.server_v4);
    let _live = Nginx::with_servers(
        &pair.server,
        &format!("server {{ listen {live} reuseport; {site} }}"),
    )?;
    let _mirror = Nginx::with_servers(
        &pair.server,
        &format!("server {{ listen {MIRROR} reuseport; {site} }}"),
    )?;
    let probe = format!("http://{live}/2.json");
    if !netlab::wait_until(Duration::from_secs(5), || curl_ok(&pair.client, &probe)) {
        bail!("nginx did not start");
    }

    let mut rows: Vec<Row> = Vec::new();
    for round in 1..=args.rounds {
        for kib in [2, 64] {
            for compare in [false, true] {
                let extra: &[&str] = if compare {
                    &["--compare-bodies", "--metrics", METRICS]
                } else {
                    &[]
                };
                let agent = Agent::start_on(&bin, &pair, "8080", MIRROR, 256, extra)?;
                let cpu0 = agent.proc.cpu_time();
                let url = format!("http://{live}/{kib}.json");
                let (_, _, served) = oha(
                    &pair.client,
                    &url,
                    args.rate,
                    args.connections,
                    args.seconds,
                )?;
                std::thread::sleep(Duration::from_millis(500));
                let cpu = (agent.proc.cpu_time() - cpu0).as_secs_f64() * 1e6 / served.max(1.0);
                let (compared, missed) = if compare {
                    compared(&pair.server)?
                } else {
                    (0.0, String::new())
                };
                agent.stop()?;
                eprintln!(
                    "round {round} {kib} KiB compare={compare}: {served:.0} served, {compared:.0} compared ({missed}), agent CPU {cpu:.1} µs/req"
                );
                rows.push((kib, compare, cpu, compared / served.max(1.0)));
            }
        }
    }
    println!(
        "\ncontent comparison: {} rounds, {} req/s for {} s each, {} connections, medians",
        args.rounds, args.rate, args.seconds, args.connections
    );
    println!("| JSON body | comparison | agent CPU µs per request | share compared |");
    println!("|---|---|---|---|");
    for kib in [2, 64] {
        for compare in [false, true] {
            let pick = |f: &dyn Fn(&Row) -> f64| {
                median(
                    rows.iter()
                        .filter(|r| r.0 == kib && r.1 == compare)
                        .map(f)
                        .collect(),
                )
            };
            println!(
                "| {kib} KiB | {} | {:.1} | {:.1} % |",
                if compare { "on" } else { "off" },
                pick(&|r| r.2),
                pick(&|r| r.3) * 100.0
            );
        }
    }
    Ok(())
}

/// Requests whose content the agent compared, and those it could not compare by reason,
/// from its /metrics.
fn compared(ns: &netlab::Netns) -> Result<(f64, String)> {
    let out = ns
        .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let compared = text
        .lines()
        .filter(|l| l.starts_with("mirror_content_compared_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let missed: Vec<&str> = text
        .lines()
        .filter(|l| {
            [
                "mirror_content_not_compared_total",
                "mirror_http_content_",
                "mirror_capture_ring_drops",
                "mirror_capture_truncated",
                "mirror_http_dropped_total",
                "mirror_reassembly_lost_bytes",
            ]
            .iter()
            .any(|p| l.starts_with(p))
                && !l.ends_with(" 0")
        })
        .collect();
    Ok((compared, missed.join(", ")))
}
