//! Shedding end to end (root only), as behaviour tests, not timing ones: with a tiny CPU
//! budget, load makes the kernel shed new connections (its counters show sampled-out packets)
//! and every connection is mirrored whole or not at all; under sustained overload from
//! long-lived connections, admitted ones are dropped for good, never resumed in their middle;
//! a CPU hog in the live service's cgroup sheds mirroring by its CPU pressure, and the share
//! comes back when the hog stops.

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

/// `conns` long-lived connections from `ns`, each sending requests `/l/{conn}/{i}` back to back
/// until `until` (at most 20,000 each). Returns how many each sent.
fn long_lived(ns: &Netns, to: SocketAddr, conns: usize, until: Instant) -> Vec<usize> {
    let handles: Vec<_> = (0..conns)
        .map(|conn| {
            let path = ns.path();
            std::thread::spawn(move || {
                netlab::enter_netns(&path);
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut i = 0;
                while Instant::now() < until && i < 20_000 {
                    write!(w, "GET /l/{conn}/{i} HTTP/1.1\r\nHost: svc\r\n\r\n").unwrap();
                    read_response(&mut r);
                    i += 1;
                }
                i
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
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

/// A live and a mirror server, and an agent with a budget far below what the load needs.
struct Rig {
    // Dropped in reverse order: the agent before the servers and namespaces.
    _live: TestServer,
    mirror: TestServer,
    live_addr: SocketAddr,
    pair: Pair,
}

impl Rig {
    fn start(tag: &str, net: u8) -> (Rig, Agent) {
        let pair = Pair::new(tag, net);
        let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
        let live = TestServer::start(&pair.server, &[live_addr]);
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
        (
            Rig {
                _live: live,
                mirror,
                live_addr,
                pair,
            },
            agent,
        )
    }
}

/// Waits (bounded) until the mirror stops receiving requests.
fn wait_settled(mirror: &TestServer) {
    let mut last = 0;
    netlab::wait_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let n = mirror.requests();
        let settled = n == last;
        last = n;
        settled
    });
}

#[test]
fn a_tiny_budget_sheds_whole_connections_in_the_kernel() {
    if not_root() {
        return;
    }
    let (rig, agent) = Rig::start("cpub", 248);
    let (pair, live_addr, mirror) = (&rig.pair, rig.live_addr, &rig.mirror);
    let made = load(
        &pair.client,
        live_addr,
        4,
        Instant::now() + Duration::from_secs(8),
    );
    let sent = made * PER_CONN;
    // Mirrored requests settle.
    wait_settled(mirror);
    let per_conn = mirrored_connections(mirror);
    let text = metrics_text(&pair.server, METRICS).expect("/metrics");
    let partial: Vec<_> = per_conn
        .iter()
        .filter(|(_, got)| got.len() != PER_CONN)
        .collect();
    if !partial.is_empty() {
        let counters = stage_counters(&text);
        let (_, log) = agent.terminate_with_output();
        panic!("connections mirrored in part: {partial:?}; counters:\n{counters}\nagent:\n{log}");
    }
    let mirrored = per_conn.len();
    assert!(mirrored > 0, "nothing mirrored");
    assert!(
        mirrored < made,
        "the budget shed no connection ({mirrored} of {made} mirrored)"
    );
    let r = report(&pair.server, METRICS).expect("report");
    let sampling = r.sampling.expect("the report shows the sampling");
    assert!(sampling.share < 1.0, "{sampling:?}");
    let sampled_out = text
        .lines()
        .find(|l| l.starts_with("mirror_kernel_packets_total{outcome=\"skip_sampled_out\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(sampled_out > 0.0, "the kernel shed nothing:\n{text}");
    assert!(text.contains("mirror_sampled_connections_share"));
    // The kernel program's own work on what it mirrored is measured, so that the budget can
    // count it: something for every clone and record, and no more than an emulated CPU takes.
    let kernel = |name: &str, labels: &[(&str, &str)]| {
        metric(&pair.server, METRICS, name, labels).unwrap_or(0.0)
    };
    let work = kernel("mirror_kernel_work_seconds_total", &[]);
    let handled = kernel("mirror_kernel_packets_total", &[("outcome", "cloned")])
        + kernel(
            "mirror_kernel_packets_total",
            &[("outcome", "head_recorded")],
        );
    let per_packet_ns = work * 1e9 / handled.max(1.0);
    assert!(
        handled > 0.0 && (20.0..1e6).contains(&per_packet_ns),
        "kernel work {work} s for {handled} packets mirrored"
    );
    let (table, _) = agent.terminate_with_output();
    assert!(
        table.contains("of new connections: CPU budget 0.00 cores"),
        "{table}"
    );
    eprintln!(
        "CPU budget: {mirrored} of {made} connections mirrored whole ({} of {sent} requests), \
         none in part; {sampled_out} packets sampled out in the kernel; its work on the others \
         {per_packet_ns:.0} ns per packet",
        mirrored * PER_CONN
    );
}

/// Long-lived connections keep the load that shedding new ones cannot remove: after a few
/// seconds over budget with new connections shed as far as they go, the agent drops admitted
/// connections too, each for good: the mirror gets a prefix of each, never a resumed middle.
#[test]
fn sustained_overload_drops_admitted_connections_for_good() {
    if not_root() {
        return;
    }
    let (rig, agent) = Rig::start("cpul", 249);
    let (pair, live_addr, mirror) = (&rig.pair, rig.live_addr, &rig.mirror);
    let sent = long_lived(
        &pair.client,
        live_addr,
        4,
        Instant::now() + Duration::from_secs(9),
    );
    wait_settled(mirror);
    let mut got: HashMap<usize, Vec<usize>> = HashMap::new();
    for r in mirror.log() {
        let mut parts = r.target.split('/').skip(2);
        let conn = parts.next().unwrap().parse().unwrap();
        let i = parts.next().unwrap().parse().unwrap();
        got.entry(conn).or_default().push(i);
    }
    let mut cut = 0;
    let mut mirrored = Vec::new();
    for (conn, n) in sent.iter().enumerate() {
        let mut seen = got.remove(&conn).unwrap_or_default();
        seen.sort();
        // A prefix: 0, 1, 2, … with nothing after a gap.
        assert!(
            seen.iter().enumerate().all(|(k, i)| k == *i),
            "connection {conn} was resumed after it was dropped: {} requests, first missing at {:?}",
            seen.len(),
            seen.iter().enumerate().find(|(k, i)| k != *i)
        );
        if seen.len() < *n {
            cut += 1;
        }
        mirrored.push(seen.len());
    }
    assert!(cut > 0, "no admitted connection was dropped: {sent:?}");
    agent.terminate();
    eprintln!(
        "long-lived: sent {sent:?}, mirrored the first {mirrored:?}; {cut} of 4 connections \
         dropped for good"
    );
}

/// The live service: HTTP/1.1 keep-alive, "ok" to every GET.
const LIVE_PY: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// Connections mirrored, by the `conn` of their `/c/{conn}/{i}` requests, and the requests of
/// each.
fn mirrored_connections(mirror: &TestServer) -> HashMap<String, Vec<String>> {
    let mut per_conn: HashMap<String, Vec<String>> = HashMap::new();
    for r in mirror.log() {
        let mut parts = r.target.split('/').skip(2);
        let conn = parts.next().unwrap_or("").to_string();
        let i = parts.next().unwrap_or("").to_string();
        per_conn.entry(conn).or_default().push(i);
    }
    per_conn
}

/// Mirroring uses spare CPU only: a CPU hog in the live service's cgroup (a process of its own
/// that listens on the mirrored port, found by the agent through /proc) raises the cgroup's CPU
/// pressure, and the kernel sheds new connections, each whole; when the hog stops, the share
/// comes back to every connection.
#[test]
fn the_live_services_cpu_pressure_sheds_whole_connections_until_it_falls() {
    if not_root() {
        return;
    }
    // Kernels built without PSI, or booted with it off (psi=0), have no pressure to shed by:
    // the agent logs that the limit is off. cgroup v1-only hosts have no cgroup of the live
    // service's own to read.
    if let Err(e) = std::fs::read_to_string("/proc/pressure/cpu") {
        eprintln!("skipped: no CPU pressure on this kernel ({e})");
        return;
    }
    let cgroup = match netlab::PsiCgroup::new("mirror-live") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: no cgroup v2 for the live service ({e})");
            return;
        }
    };
    let pair = Pair::new("psi", 228);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let ip = pair.server_v4.to_string();
    let mut cmd = pair.server.exec(&["python3", "-c", LIVE_PY, &ip, "8080"]);
    cgroup.contain(&mut cmd);
    let _live = netlab::Proc::spawn(&mut cmd);
    let client_ns = pair.client.path();
    assert!(
        netlab::wait_until(Duration::from_secs(10), || {
            let ns = client_ns.clone();
            std::thread::spawn(move || {
                netlab::enter_netns(&ns);
                TcpStream::connect_timeout(&live_addr, Duration::from_millis(200)).is_ok()
            })
            .join()
            .unwrap()
        }),
        "the live service did not start"
    );
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
        ],
    );
    let gauge = |name: &str| metric(&pair.server, METRICS, name, &[]).unwrap_or(f64::NAN);
    if !netlab::wait_until(Duration::from_secs(15), || {
        gauge("mirror_live_cpu_pressure_cgroups") == 1.0
    }) {
        let (_, log) = agent.terminate_with_output();
        panic!("the agent did not find the live service's cgroup:\n{log}");
    }

    // Three busy loops in the live cgroup, on two CPUs: its tasks wait for a CPU.
    let hogs: Vec<netlab::Proc> = (0..3)
        .map(|_| {
            let mut c = std::process::Command::new("timeout");
            c.args(["60", "sh", "-c", "while :; do :; done"]);
            cgroup.contain(&mut c);
            netlab::Proc::spawn(&mut c)
        })
        .collect();
    let made = load(
        &pair.client,
        live_addr,
        2,
        Instant::now() + Duration::from_secs(10),
    );
    let (pressure, share) = (
        gauge("mirror_live_cpu_pressure"),
        gauge("mirror_sampled_connections_share"),
    );
    drop(hogs);
    wait_settled(&mirror);
    let text = metrics_text(&pair.server, METRICS).expect("/metrics");
    let per_conn = mirrored_connections(&mirror);
    let partial: Vec<_> = per_conn
        .iter()
        .filter(|(_, got)| got.len() != PER_CONN)
        .collect();
    assert!(
        partial.is_empty(),
        "connections mirrored in part: {partial:?}\n{}",
        stage_counters(&text)
    );
    let sampled_out = metric(
        &pair.server,
        METRICS,
        "mirror_kernel_packets_total",
        &[("outcome", "skip_sampled_out")],
    )
    .unwrap_or(0.0);
    // Each request of the connections shed is counted once, as a request: all but those whose
    // first segment was too short to tell (the client's formatted write may go out in pieces).
    let shed_requests = metric(
        &pair.server,
        METRICS,
        "mirror_kernel_packets_total",
        &[("outcome", "sampled_out_request_starts")],
    )
    .unwrap_or(0.0) as usize;
    let shed = (made - per_conn.len()) * PER_CONN;
    assert!(
        shed_requests <= shed && shed_requests * 100 >= shed * 97,
        "{shed_requests} requests counted as shed, of {shed} ({made} connections, {} mirrored)",
        per_conn.len()
    );
    assert!(
        pressure > 0.1 && share < 0.5 && sampled_out > 0.0 && per_conn.len() < made,
        "under the hog: pressure {pressure}, share {share}, {sampled_out} packets sampled out, \
         {} of {made} connections mirrored",
        per_conn.len()
    );

    // The hog stopped: the share comes back, and every new connection is mirrored again.
    assert!(
        netlab::wait_until(Duration::from_secs(60), || gauge(
            "mirror_sampled_connections_share"
        ) == 1.0),
        "the share did not come back: {}",
        gauge("mirror_sampled_connections_share")
    );
    let (before, requests_before) = (per_conn.len(), mirror.requests());
    let after = load(
        &pair.client,
        live_addr,
        2,
        Instant::now() + Duration::from_secs(3),
    );
    wait_settled(&mirror);
    assert_eq!(
        mirror.requests() - requests_before,
        after * PER_CONN,
        "after the hog, every request of the {after} new connections is mirrored"
    );
    let (table, _) = agent.terminate_with_output();
    assert!(
        table.contains("live CPU pressure") && table.contains("1 live cgroup"),
        "{table}"
    );
    eprintln!(
        "live CPU pressure under the hog {:.0} %: share {:.3}, {} of {made} connections mirrored, \
         each whole; after it, all {after} mirrored",
        pressure * 100.0,
        share,
        before
    );
}
