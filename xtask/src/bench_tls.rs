//! `cargo xtask bench-tls`: what reading TLS plaintext from uprobes costs a live nginx that
//! terminates TLS (OpenSSL 3), and the agent. Setups interleaved round by round: no agent; the
//! agent reading nginx's libssl (`--tls-pid`, `--tls-port`). Throughput at saturation (wrk over
//! HTTPS, keep-alive), latency at a fixed rate (oha), nginx's CPU per request, and the agent's
//! CPU per mirrored request (figures only).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netlab::{Pair, Proc};

use crate::bench::{oha_with, wrk, Nginx};
use crate::bench_full::median;

const MIRROR: &str = "127.0.0.1:9080";

#[derive(clap::Args)]
pub struct TlsBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Offered rate of the latency run (requests per second, `--seconds` long).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
}

struct Row {
    rps: f64,
    nginx_us: f64,
    agent_us: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
}

const SETUPS: [&str; 2] = ["no agent", "agent reading nginx's libssl"];

pub fn run(root: &Path, args: &TlsBenchArgs) -> Result<()> {
    let bin = root.join("target/release/mirror-agent");
    let pair = Pair::new("bt", 243);
    let certs = tempfile::tempdir()?;
    let (cert, key) = self_signed(certs.path())?;
    let live = format!("{}:8443", pair.server_v4);
    let nginx = Nginx::with_servers(
        &pair.server,
        &format!(
            "server {{ listen {live} ssl reuseport; ssl_certificate {}; ssl_certificate_key {};\n\
             location / {{ return 200 \"{{\\\"id\\\":1,\\\"title\\\":\\\"a book\\\"}}\\n\"; }} }}",
            cert.display(),
            key.display()
        ),
    )?;
    let _mirror = Nginx::start(&pair.server, MIRROR, "")?;
    let url = format!("https://{live}/api/books/1");
    let up = netlab::wait_until(Duration::from_secs(5), || {
        pair.client
            .exec(&["curl", "-skf", "--max-time", "1", "-o", "/dev/null", &url])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !up {
        bail!("nginx did not start");
    }
    let pids: Vec<String> = nginx.pids().iter().map(i32::to_string).collect();

    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        for setup in SETUPS {
            let with_agent = setup != "no agent";
            let row = measure(
                args,
                &pair,
                &nginx,
                &url,
                with_agent.then_some((&bin, &pids)),
            )?;
            eprintln!(
                "round {round} {setup:<30} {:.0} req/s, nginx {:.1} µs/req, agent {:?} µs/req, p50 {:.3} ms, p99 {:.3} ms",
                row.rps, row.nginx_us, row.agent_us, row.p50_ms, row.p99_ms
            );
            rows.push((setup, row));
        }
    }
    print_table(args, &rows);
    Ok(())
}

/// A certificate and key for the bench's nginx, in `dir`.
fn self_signed(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg("/CN=bench")
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .context("openssl")?;
    if !made.success() {
        bail!("openssl could not make a certificate");
    }
    Ok((cert, key))
}

/// One setup's figures: saturation with wrk (and the CPU it cost), then latency with oha;
/// `agent`: the binary and nginx's pids, when the agent reads its TLS.
fn measure(
    args: &TlsBenchArgs,
    pair: &Pair,
    nginx: &Nginx,
    url: &str,
    agent: Option<(&Path, &[String])>,
) -> Result<Row> {
    let agent = agent
        .map(|(bin, pids)| start_agent(bin, pair, &pids.join(",")))
        .transpose()?;
    let (agent_cpu0, nginx_cpu0) = (agent.as_ref().map(Proc::cpu_time), nginx.cpu_time());
    let rps = wrk(&pair.client, url, args.connections, args.seconds)?;
    let served = (rps * args.seconds as f64).max(1.0);
    let nginx_us = (nginx.cpu_time() - nginx_cpu0).as_secs_f64() * 1e6 / served;
    let agent_us = agent
        .as_ref()
        .map(|a| (a.cpu_time() - agent_cpu0.unwrap()).as_secs_f64() * 1e6 / served);
    let (p50_ms, p99_ms, _) = oha_with(
        &pair.client,
        url,
        args.rate,
        args.connections,
        args.seconds,
        &["--insecure"],
    )?;
    if let Some(mut a) = agent {
        a.signal(libc::SIGTERM);
        let (code, err) = a.wait_exit(Duration::from_secs(20));
        if code != Some(0) {
            bail!("agent exited with {code:?}: {err}");
        }
    }
    Ok(Row {
        rps,
        nginx_us,
        agent_us,
        p50_ms,
        p99_ms,
    })
}

fn print_table(args: &TlsBenchArgs, rows: &[(&str, Row)]) {
    let of = |setup: &str, f: &dyn Fn(&Row) -> Option<f64>| {
        median(
            rows.iter()
                .filter(|r| r.0 == setup)
                .filter_map(|r| f(&r.1))
                .collect(),
        )
    };
    let base = of(SETUPS[0], &|r| Some(r.rps));
    println!(
        "\nTLS capture: nginx with OpenSSL 3, {} rounds, wrk over HTTPS {} s, {} keep-alive connections; latency at {} req/s",
        args.rounds, args.seconds, args.connections, args.rate
    );
    println!("| setup | live req/s | ratio to no agent | nginx CPU µs/request | agent CPU µs per mirrored request | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|---|");
    for setup in SETUPS {
        let rps = of(setup, &|r| Some(r.rps));
        let agent = of(setup, &|r| r.agent_us);
        println!(
            "| {setup} | {rps:.0} | {:.2} | {:.1} | {} | {:.3} | {:.3} |",
            rps / base,
            of(setup, &|r| Some(r.nginx_us)),
            if agent.is_nan() {
                "-".to_string()
            } else {
                format!("{agent:.1}")
            },
            of(setup, &|r| Some(r.p50_ms)),
            of(setup, &|r| Some(r.p99_ms)),
        );
    }
}

fn start_agent(bin: &Path, pair: &Pair, pids: &str) -> Result<Proc> {
    use std::io::BufRead;
    let mut cmd = pair.server.exec(&[
        bin.to_str().unwrap(),
        "attach",
        "--tls-port",
        "8443",
        "--tls-pid",
        pids,
        "--mirror",
        &format!("http://{MIRROR}"),
        "--no-report",
        "--max-inflight",
        "512",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut proc = Proc::spawn(&mut cmd);
    let mut line = String::new();
    std::io::BufReader::new(proc.child.as_mut().unwrap().stdout.take().unwrap())
        .read_line(&mut line)?;
    if !line.starts_with("ready:") {
        let (_, err) = proc.wait_exit(Duration::from_secs(5));
        bail!("agent did not start: {err}");
    }
    Ok(proc)
}
