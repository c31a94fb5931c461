//! The CPU budget end to end (root only), as a behaviour test, not a timing one: with a tiny
//! budget, load makes the kernel shed new connections (its counters show sampled-out packets),
//! and every connection is mirrored whole or not at all.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const MIRROR: &str = "127.0.0.1:9093";
const METRICS: &str = "127.0.0.1:9466";
const PER_CONN: usize = 5;

/// Reads one HTTP/1.1 response (Content-Length framed).
fn read_response(r: &mut BufReader<TcpStream>) {
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
}

/// Connections one after another from `threads` threads in `ns`, each sending `PER_CONN`
/// requests `/c/{conn}/{i}` 20 ms apart, until `until`. Returns how many connections were made.
fn load(ns: &Netns, to: SocketAddr, threads: usize, until: Instant) -> usize {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let path = ns.path();
            std::thread::spawn(move || {
                netlab::enter_netns(&path);
                let mut made = 0;
                // Bounded in time and in count.
                while Instant::now() < until && made < 2_000 {
                    let conn = t * 10_000 + made;
                    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    for i in 0..PER_CONN {
                        write!(w, "GET /c/{conn}/{i} HTTP/1.1\r\nHost: svc\r\n\r\n").unwrap();
                        read_response(&mut r);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    made += 1;
                }
                made
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

#[test]
fn a_tiny_budget_sheds_whole_connections_in_the_kernel() {
    require_root();
    let pair = Pair::new("cpub", 248);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    let mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--metrics",
            METRICS,
            "--cpu-budget",
            "0.002",
        ],
    );
    let made = load(
        &pair.client,
        live_addr,
        4,
        Instant::now() + Duration::from_secs(8),
    );
    let sent = made * PER_CONN;
    // Mirrored requests settle.
    let mut last = 0;
    netlab::wait_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let n = mirror.requests();
        let settled = n == last;
        last = n;
        settled
    });
    let mut per_conn: HashMap<String, usize> = HashMap::new();
    for r in mirror.log() {
        let conn = r.target.split('/').nth(2).unwrap_or("").to_string();
        *per_conn.entry(conn).or_default() += 1;
    }
    let partial: Vec<_> = per_conn.iter().filter(|(_, n)| **n != PER_CONN).collect();
    assert!(
        partial.is_empty(),
        "connections mirrored in part: {partial:?}"
    );
    let mirrored = per_conn.len();
    assert!(mirrored > 0, "nothing mirrored");
    assert!(
        mirrored < made,
        "the budget shed no connection ({mirrored} of {made} mirrored)"
    );
    let r = report(&pair.server, METRICS).expect("report");
    let sampling = r.sampling.expect("the report shows the sampling");
    assert!(sampling.share < 1.0, "{sampling:?}");
    let metrics = pair
        .server
        .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    let sampled_out = text
        .lines()
        .find(|l| l.starts_with("mirror_kernel_packets_total{outcome=\"skip_sampled_out\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(sampled_out > 0.0, "the kernel shed nothing:\n{text}");
    assert!(text.contains("mirror_sampled_connections_share"));
    let (table, _) = agent.terminate_with_output();
    assert!(
        table.contains("of new connections: CPU budget 0.00 cores"),
        "{table}"
    );
    eprintln!(
        "CPU budget: {mirrored} of {made} connections mirrored whole ({} of {sent} requests), \
         none in part; {sampled_out} packets sampled out in the kernel",
        mirrored * PER_CONN
    );
}
