//! Replay stage end to end: requests captured from live traffic reach the mirror intact, and
//! a down, slow or resetting mirror costs live users nothing (root only).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const MIRROR: &str = "127.0.0.1:9090";

/// These tests measure live latency: they run one at a time so they do not load each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_for(server: &TestServer, n: usize) {
    netlab::wait_until(Duration::from_secs(20), || server.requests() >= n);
}

#[test]
fn mirror_receives_every_request_intact_v4_and_v6() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("rf", 235);
    let v4: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let v6: SocketAddr = format!("[{}]:8080", pair.server_v6).parse().unwrap();
    let live = TestServer::start(&pair.server, &[v4, v6]);
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
            "--host",
            "keep",
            "--add-header",
            "X-Mirrored: 1",
            "--drop-header",
            "Authorization",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let big_arg = big_upload(dir.path());
    for host in [pair.server_v4.clone(), format!("[{}]", pair.server_v6)] {
        let base = format!("http://{host}:8080");
        // Keep-alive: three GETs on one connection.
        curl(
            &pair.client,
            &[
                &format!("{base}/api/books"),
                &format!("{base}/api/books/2"),
                &format!("{base}/api/books/2/reviews?x=1"),
            ],
        );
        curl(
            &pair.client,
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &big_arg,
                &format!("{base}/upload"),
            ],
        );
        curl(
            &pair.client,
            &[
                "-X",
                "PUT",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &big_arg,
                &format!("{base}/chunked"),
            ],
        );
        curl(&pair.client, &["-I", &format!("{base}/head")]);
        curl(
            &pair.client,
            &[
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                "review=great",
                &format!("{base}/api/books/3/reviews"),
            ],
        );
        curl(
            &pair.client,
            &[
                "-H",
                "Authorization: Bearer secret",
                &format!("{base}/private"),
            ],
        );
    }
    // Pipelined, ending with a chunked POST with a chunk extension and a trailer.
    let reqs = b"GET /p/1 HTTP/1.1\r\nHost: b\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: b\r\n\r\nDELETE /p/3 HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n\
                 POST /p/4 HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
                 5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n";
    let expect: usize = [
        ("GET", "/p/1", &b""[..]),
        ("GET", "/p/2", b""),
        ("DELETE", "/p/3", b""),
        ("POST", "/p/4", b"hello world"),
    ]
    .iter()
    .map(|(m, t, body)| expected_answer(m, t, body).len())
    .sum();
    pipelined(&pair.client, v4, reqs, expect);

    let sent = live.requests();
    assert_eq!(sent, 2 * 8 + 4);
    wait_for(&mirror, sent);
    let stderr = agent.terminate();
    assert_eq!(
        mirror.requests(),
        sent,
        "every live request was mirrored once\n{stderr}"
    );

    let mut want: Vec<Recorded> = live.log().iter().map(normalised).collect();
    for r in &mut want {
        r.headers.push(("x-mirrored".into(), "1".into()));
        r.headers.sort();
    }
    want.sort();
    let mut got: Vec<Recorded> = mirror.log().iter().map(normalised).collect();
    got.sort();
    assert_same_requests(&got, &want);
    assert!(
        want.iter().filter(|r| r.chunks.len() > 1).count() >= 3
            && want
                .iter()
                .any(|r| r.trailers == [("x-checksum".into(), "abc".into())]),
        "chunked uploads, one with a trailer, were part of the test"
    );
    assert!(
        mirror
            .log()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "credentials were dropped"
    );
    assert!(
        mirror.log().iter().any(|r| r.body.len() == 1 << 20),
        "the 1 MiB bodies arrived"
    );
}

#[test]
fn a_down_slow_or_resetting_mirror_costs_live_users_nothing() {
    if not_root() {
        return;
    }
    let _serial = serial();
    // A wake-up across vCPUs costs this VM about 25 µs, so a ~13 µs round trip measures either 13
    // or 40 µs depending on where the scheduler puts client and server. Everything this test
    // starts (servers, client, agent) inherits one CPU, so both runs take the same path and the
    // ratio shows what the agent costs.
    pin_to_one_cpu();
    let pair = Pair::new("ri", 236);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    const N: usize = 400;
    for case in ["down", "slow", "reset"] {
        let _slow;
        let _reset;
        match case {
            "slow" => {
                _slow = TestServer::start_with_delay(
                    &pair.server,
                    &[MIRROR.parse().unwrap()],
                    Duration::from_millis(1200),
                )
            }
            "reset" => _reset = ResettingMirror::start(&pair.server, MIRROR),
            _ => {}
        }
        // The pair is measured again (up to three times) when the ratio is off: this VM
        // sometimes adds ~5 µs to every round trip for seconds on end, with or without the
        // agent, which one pair cannot tell from a cost of the agent's. A real cost shows in
        // every pair.
        let mut pairs = Vec::new();
        let (with_agent, rss, exit) = loop {
            let baseline = best_median(&pair.client, live_addr, N);
            let agent = Agent::start(
                &pair.server,
                &[
                    "--iface",
                    "srv0",
                    "--port",
                    "8080",
                    "--mirror",
                    &format!("http://{MIRROR}"),
                    "--timeout",
                    "2",
                    "--max-inflight",
                    "64",
                    "--queue-bytes",
                    "128K",
                ],
            );
            let with_agent = best_median(&pair.client, live_addr, N);
            let rss = agent_rss_kb(&agent);
            let exit = agent.stop();
            let ratio = with_agent.as_secs_f64() / baseline.as_secs_f64();
            eprintln!("{case}: live median {baseline:?} without the agent, {with_agent:?} with it (ratio {ratio:.3}); agent RSS {rss} kB");
            pairs.push(ratio);
            if ratio < 1.5 || pairs.len() == 3 {
                break (with_agent, rss, exit);
            }
        };
        // Live requests complete (latencies() read every response in full). The slow mirror's
        // 1.2 s never reaches a live request: anything near it would show here.
        if timing_applies("live latency with and without the agent") {
            assert!(
                with_agent < Duration::from_millis(50),
                "{case}: live median {with_agent:?}"
            );
            // At ~13 µs round trips the two clones of an exchange cost about 2.5 µs (ratio
            // about 1.2, with the agent on the same CPU); waiting on the mirror in any way
            // would not fit.
            assert!(
                pairs.iter().any(|&r| r < 1.5),
                "{case}: live median ratios {pairs:.3?}"
            );
        }
        assert!(rss < 256 * 1024, "{case}: agent RSS {rss} kB");
        // The mirror's trouble is counted under its kind.
        let dropped = |reason| exit.metric("mirror_replay_dropped_total", &[("reason", reason)]);
        let errors = |kind| exit.metric("mirror_replay_errors_total", &[("kind", kind)]);
        let counted = match case {
            "down" => errors("refused") + dropped("backoff"),
            "slow" => dropped("queue_full") + errors("timeout"),
            _ => errors("reset") + errors("other"),
        };
        assert!(counted > 0, "{case}: {}", exit.metrics);
    }
}

/// Every request goes to every mirror; a slow or down third one holds up neither the other
/// two nor live users, and each mirror is counted apart.
#[test]
fn a_slow_or_down_third_mirror_costs_the_other_two_and_live_users_nothing() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("mm", 238);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    const METRICS: &str = "127.0.0.1:9472";
    const N: usize = 300;
    for case in ["slow", "down"] {
        let a = TestServer::start(&pair.server, &["127.0.0.1:9101".parse().unwrap()]);
        let b = TestServer::start(&pair.server, &["127.0.0.1:9102".parse().unwrap()]);
        let _c = (case == "slow").then(|| {
            TestServer::start_with_delay(
                &pair.server,
                &["127.0.0.1:9103".parse().unwrap()],
                Duration::from_millis(1200),
            )
        });
        let baseline = best_median(&pair.client, live_addr, 100);
        let agent = Agent::start(
            &pair.server,
            &[
                "--iface",
                "srv0",
                "--port",
                "8080",
                "--mirror",
                "a=http://127.0.0.1:9101",
                "--mirror",
                "b=http://127.0.0.1:9102",
                "--mirror",
                "c=http://127.0.0.1:9103",
                "--timeout",
                "2",
                "--max-inflight",
                "32",
                "--metrics",
                METRICS,
            ],
        );
        let targets: Vec<String> = (0..N).map(|i| format!("/mm/{case}/{i}")).collect();
        let live = latencies_of(&pair.client, live_addr, targets.clone());
        let sent_at = Instant::now();
        // c's backlog alone would take N / 32 × 1.2 s ≈ 11 s to clear: a and b must not wait.
        for m in [&a, &b] {
            netlab::wait_until(patience(Duration::from_secs(3)), || m.requests() >= N);
        }
        let caught_up = sent_at.elapsed();
        let with_agent = median(live);
        eprintln!(
            "{case}: live median {baseline:?} without the agent, {with_agent:?} with it; a and b had every request {caught_up:?} after the client's last"
        );
        if timing_applies("live latency with a slow or down third mirror") {
            assert!(
                with_agent < baseline * 2 + Duration::from_millis(5),
                "{case}: live median {with_agent:?} vs {baseline:?}"
            );
        }
        for (name, m) in [("a", &a), ("b", &b)] {
            let mut got: Vec<String> = m.log().into_iter().map(|r| r.target).collect();
            got.sort();
            let mut want = targets.clone();
            want.sort();
            assert_eq!(got, want, "mirror {name} got each request once");
            let sent = metric(
                &pair.server,
                METRICS,
                "mirror_replay_sent_total",
                &[("mirror", name)],
            );
            assert_eq!(sent, Some(N as f64), "mirror {name}");
        }
        let counted = |name: &str, label: &str, values: &[&str]| {
            values
                .iter()
                .filter_map(|v| metric(&pair.server, METRICS, name, &[("mirror", "c"), (label, v)]))
                .sum::<f64>()
        };
        let c_failed = counted(
            "mirror_replay_errors_total",
            "kind",
            &["timeout", "refused"],
        ) + counted(
            "mirror_replay_dropped_total",
            "reason",
            &["queue_full", "backoff"],
        );
        let answered_in = |report: &mirror_agent::compare::Report, name: &str| {
            report
                .rows
                .iter()
                .filter(|r| r.version == name && r.code == "200")
                .map(|r| r.count)
                .sum::<u64>()
        };
        // The servers log a request before they answer it: the last outcomes follow shortly.
        netlab::wait_until(Duration::from_secs(3), || {
            report(&pair.server, METRICS).is_some_and(|r| {
                answered_in(&r, "a") >= N as u64 && answered_in(&r, "b") >= N as u64
            })
        });
        let report = report(&pair.server, METRICS).expect("a report");
        let stderr = agent.terminate();
        assert_eq!(report.mirrors, ["a", "b", "c"]);
        let answered = |name: &str| answered_in(&report, name);
        assert_eq!((answered("a"), answered("b")), (N as u64, N as u64));
        if case == "down" {
            assert!(c_failed >= 1.0, "c's failures are counted: {stderr}");
            assert_eq!(answered("c"), 0);
        } else if timing_applies("the slow mirror cannot have caught up by the stop") {
            // Still waiting on c when the agent stopped, or dropped by its full queue: in
            // any case not all answered in time. (Under emulation the test's own steps take
            // longer than c's backlog.)
            assert!(answered("c") < N as u64, "{stderr}");
        }
    }
}

#[test]
fn sampling_mirrors_whole_connections_and_method_filter_holds() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("rs", 237);
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
            "--sample",
            "50",
            "--methods",
            "GET",
        ],
    );
    const CONNS: usize = 200;
    for i in 0..CONNS {
        // Two GETs and a POST on one connection.
        let base = format!("http://{}:8080/c/{i}", pair.server_v4);
        let ok = pair
            .client
            .exec(&[
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("{base}/a"),
                &format!("{base}/b"),
            ])
            .args(["--next", "--data-binary", "x", &format!("{base}/post")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "curl connection {i}");
    }
    assert_eq!(live.requests(), 3 * CONNS);
    std::thread::sleep(Duration::from_millis(500));
    let stderr = agent.terminate();
    let log = mirror.log();
    assert!(
        log.iter().all(|r| r.method == "GET"),
        "--methods GET let another method through"
    );
    let mut whole = 0;
    for i in 0..CONNS {
        let n = log
            .iter()
            .filter(|r| r.target.starts_with(&format!("/c/{i}/")))
            .count();
        assert!(
            n == 0 || n == 2,
            "connection {i}: {n} of its 2 GETs mirrored: sampling split a connection"
        );
        whole += (n == 2) as usize;
    }
    // Binomial(200, 0.5): 100 ± 3.5 sigma.
    assert!(
        (65..=135).contains(&whole),
        "{whole} of {CONNS} connections mirrored at --sample 50\n{stderr}"
    );
    eprintln!("--sample 50 mirrored {whole} of {CONNS} connections");
}

#[test]
fn attach_by_pod_ip_finds_the_veth_and_mirrors_only_that_pod() {
    if not_root() {
        return;
    }
    let _serial = serial();
    // The client namespace sees the server as a node sees a pod: a direct route over a veth.
    let pair = Pair::new("rp", 239);
    let pod: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let other: SocketAddr = format!("[{}]:8080", pair.server_v6).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[pod, other]);
    let mirror = TestServer::start(&pair.client, &["127.0.0.1:9092".parse().unwrap()]);
    let agent = Agent::start(
        &pair.client,
        &[
            "--pod-ip",
            &pair.server_v4,
            "--port",
            "8080",
            "--mirror",
            "http://127.0.0.1:9092",
        ],
    );
    assert!(
        agent.ready_line.contains("cli0 egress"),
        "{}",
        agent.ready_line
    );
    for i in 0..5 {
        curl(
            &pair.client,
            &[&format!("http://{}:8080/pod/{i}", pair.server_v4)],
        );
    }
    // The same port on another address (the IPv6 side) is not this pod: not mirrored.
    curl(
        &pair.client,
        &[&format!("http://[{}]:8080/other", pair.server_v6)],
    );
    wait_for(&mirror, 5);
    std::thread::sleep(Duration::from_millis(300));
    agent.terminate();
    let targets: Vec<String> = mirror.log().into_iter().map(|r| r.target).collect();
    assert_eq!(targets.len(), 5, "{targets:?}");
    assert!(
        targets.iter().all(|t| t.starts_with("/pod/")),
        "{targets:?}"
    );

    let out = pair
        .client
        .exec(&[AGENT, "attach", "--pod-ip", "198.51.100.7", "--port", "80"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no route to pod IP 198.51.100.7"),
        "{err}"
    );
}

/// Live service and mirror on one machine, over lo: every packet crosses lo twice (egress, then
/// ingress), yet each request is mirrored once and each response timed once.
#[test]
fn a_service_on_loopback_is_mirrored_once_per_request() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("lo", 243);
    let live = TestServer::start(&pair.server, &["127.0.0.1:8080".parse().unwrap()]);
    let mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "lo",
            "--port",
            "8080",
            "--mirror",
            &format!("http://{MIRROR}"),
        ],
    );
    assert!(
        agent.ready_line.contains("lo ingress") && !agent.ready_line.contains("egress"),
        "one hook on lo: {}",
        agent.ready_line
    );
    let base = "http://127.0.0.1:8080/api/books";
    curl(
        &pair.server,
        &[
            &format!("{base}/1"),
            &format!("{base}/2"),
            &format!("{base}/3"),
        ],
    );
    curl(
        &pair.server,
        &["--data-binary", "review=good", &format!("{base}/1/reviews")],
    );
    let sent = live.requests();
    assert_eq!(sent, 4);
    wait_for(&mirror, sent);
    let exit = agent.stop();
    let (table, stderr) = (&exit.stdout, &exit.stderr);
    assert_eq!(
        mirror.requests(),
        sent,
        "each request mirrored once\n{stderr}"
    );
    let mut want: Vec<_> = live.log().iter().map(normalised).collect();
    let mut got: Vec<_> = mirror.log().iter().map(normalised).collect();
    want.sort();
    got.sort();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (&g.method, &g.target, &g.body),
            (&w.method, &w.target, &w.body)
        );
    }
    assert_eq!(
        exit.metric("mirror_reassembly_duplicate_bytes_total", &[]),
        0,
        "each packet cloned once:\n{}",
        exit.metrics
    );
    // name (two words), tag, code, average, count, p50, p99
    let live_gets = table.lines().find_map(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        (f.get(..4) == Some(&["GET", "/api/books/{id}", "live", "200"][..])).then(|| f[5])
    });
    assert_eq!(live_gets, Some("3"), "live responses timed once:\n{table}");
}

/// Python's http.server, a mirror the agent was not written against: it logs each request's
/// method, path and body length as it answers.
/// The agent's metrics in the Python mirror's test.
const PY_METRICS: &str = "127.0.0.1:9465";

/// The Python mirror (`pipelined_mirror.py`), its log file given as its argument.
const PY_MIRROR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pipelined_mirror.py");

/// Reads one response with a Content-Length body.
fn read_response(s: &mut TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
}

#[test]
fn pipelined_batches_to_a_python_mirror_arrive_whole_and_once() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("py", 251);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mirror.log");
    let _mirror =
        netlab::Proc::spawn(
            &mut pair
                .server
                .exec(&["python3", PY_MIRROR, log.to_str().unwrap()]),
        );
    let listening = || {
        pair.server
            .exec(&[
                "python3",
                "-c",
                "import socket; socket.create_connection(('127.0.0.1', 9091), 1)",
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        netlab::wait_until(Duration::from_secs(10), listening),
        "the python mirror did not start"
    );
    let lines = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // The Python mirror answers slowly under emulation: every answer is awaited.
    let timeout = patience(Duration::from_secs(5)).as_secs().to_string();
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            "http://127.0.0.1:9091",
            "--pipeline-depth",
            "16",
            "--timeout",
            &timeout,
            "--metrics",
            PY_METRICS,
        ],
    );
    // Eight keep-alive clients, every tenth request a POST with a body (which the agent never
    // pipelines behind another request).
    const CLIENTS: usize = 8;
    const EACH: usize = 400;
    let path = pair.client.path();
    let mut sent: Vec<String> = std::thread::spawn(move || {
        netlab::enter_netns(&path);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect_timeout(&live_addr, Duration::from_secs(5)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut sent = Vec::new();
                    // Ten requests at a time, pipelined by the client, so that the agent has
                    // bursts to batch.
                    for group in (0..EACH).collect::<Vec<_>>().chunks(10) {
                        let mut wire = String::new();
                        for &i in group {
                            let (req, line) = if i % 10 == 9 {
                                let body = format!("review={c}-{i}");
                                (
                                    format!("POST /py/{c}/{i} HTTP/1.1\r\nHost: svc\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
                                    format!("POST /py/{c}/{i} {}", body.len()),
                                )
                            } else {
                                (
                                    format!("GET /py/{c}/{i} HTTP/1.1\r\nHost: svc\r\n\r\n"),
                                    format!("GET /py/{c}/{i} 0"),
                                )
                            };
                            wire.push_str(&req);
                            sent.push(line);
                        }
                        s.write_all(wire.as_bytes()).unwrap();
                        for _ in group {
                            read_response(&mut s);
                        }
                    }
                    sent
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    })
    .join()
    .unwrap();
    netlab::wait_until(patience(Duration::from_secs(20)), || {
        lines(&log).len() >= sent.len()
    });
    // The mirror logs a request before it answers: the stop waits until the agent has read
    // every answer (slow under emulation), so that none is left to the stop's grace.
    let answered = || {
        metric(
            &pair.server,
            PY_METRICS,
            "mirror_replay_responses_total",
            &[],
        )
        .unwrap_or(0.0) as usize
    };
    netlab::wait_until(patience(Duration::from_secs(10)), || {
        answered() >= sent.len()
    });
    let exit = agent.stop();
    let mut got = lines(&log);
    got.sort();
    sent.sort();
    if got.len() != sent.len() {
        // Where the missing requests went: the mirror's listen queue, or the agent's errors.
        let nstat = pair
            .server
            .exec(&[
                "nstat",
                "-az",
                "TcpExtListenOverflows",
                "TcpExtListenDrops",
                "TcpExtTCPTimeouts",
                "TcpExtTCPAbortOnTimeout",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let errors: Vec<String> = ["timeout", "reset", "refused", "other"]
            .iter()
            .map(|k| {
                format!(
                    "{k}={}",
                    exit.metric("mirror_replay_errors_total", &[("kind", k)])
                )
            })
            .collect();
        panic!(
            "the mirror logged {} of {} requests; replay errors {errors:?}; resent {}; batches {}\n{nstat}\n{}",
            got.len(),
            sent.len(),
            exit.metric("mirror_replay_resent_total", &[]),
            exit.metric("mirror_replay_batches_total", &[]),
            exit.stderr
        );
    }
    assert_eq!(got, sent, "each request arrived whole and once");
    let stat = |name: &str| exit.metric(&format!("mirror_replay_{name}_total"), &[]);
    eprintln!(
        "{} requests mirrored in {} batches",
        stat("sent"),
        stat("batches")
    );
    // Every request sent is accounted for: answered, or unanswered when the stop came.
    let stopped = exit.metric("mirror_replay_errors_total", &[("kind", "stopped")]);
    assert_eq!(
        (stat("responses"), stopped),
        (sent.len() as u64, 0),
        "{}",
        exit.metrics
    );
    // Pipelining deepens only while answers come within 5 ms, which the Python mirror's do
    // not under emulation.
    if timing_applies("requests are pipelined to a mirror answering within 5 ms") {
        assert!(
            stat("batches") < stat("sent"),
            "requests were pipelined: {}",
            exit.metrics
        );
    }
}

/// Safe replay: the candidate gets its own token, read from a file and read again when the file
/// changes, and never production's; writes go where the policy says (those skipped are
/// counted, and live still gets them); every request sent carries the mark, in a header and in
/// the client's baggage.
#[test]
fn a_candidate_gets_its_own_token_and_only_the_writes_the_policy_allows() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("safe", 240);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let live = TestServer::start(&pair.server, &[live_addr]);
    let mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "staging-1\n").unwrap();
    let secret = format!("Authorization: Bearer @{}", token.display());
    let rec = dir.path().join("rec");
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("cand=http://{MIRROR}"),
            "--secret-header",
            &secret,
            "--writes-route",
            "^/payments=skip",
            "--mark",
            "X-Mirrored",
            "--record",
            rec.to_str().unwrap(),
        ],
    );
    let base = format!("http://{live_addr}");
    let prod = ["-H", "Authorization: Bearer prod-secret"];
    let send = |extra: &[&str], path: &str| {
        let url = format!("{base}{path}");
        let mut args = prod.to_vec();
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&pair.client, &args);
    };
    send(&["-H", "baggage: tenant=7"], "/books/1");
    send(&["-d", "order"], "/orders");
    send(&["-d", "card"], "/payments");
    wait_for(&mirror, 2);
    std::fs::write(&token, "staging-2\n").unwrap();
    let rotated = netlab::wait_until(patience(Duration::from_secs(10)), || {
        send(&[], "/books/2");
        std::thread::sleep(Duration::from_millis(200));
        mirror
            .log()
            .iter()
            .any(|r| r.header("authorization") == Some("Bearer staging-2"))
    });
    let exit = agent.stop();
    assert!(rotated, "the rotated token never reached the mirror");

    let got = mirror.log();
    for r in &got {
        let auth = r.header("authorization").unwrap_or("none");
        assert!(
            auth == "Bearer staging-1" || auth == "Bearer staging-2",
            "{} {}: authorization {auth}",
            r.method,
            r.target
        );
        assert_eq!(r.header("x-mirrored"), Some("cand"), "{}", r.target);
        let n = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .count();
        assert_eq!(n, 1, "{}: one Authorization, the candidate's", r.target);
    }
    let first = got
        .iter()
        .find(|r| r.target == "/books/1")
        .expect("GET mirrored");
    assert_eq!(first.header("authorization"), Some("Bearer staging-1"));
    assert_eq!(first.header("baggage"), Some("tenant=7,mirror-shadow=cand"));
    let order = got
        .iter()
        .find(|r| r.target == "/orders")
        .expect("POST /orders mirrored");
    assert_eq!(order.body, b"order");
    assert_eq!(order.header("baggage"), Some("mirror-shadow=cand"));
    assert!(
        !got.iter().any(|r| r.target == "/payments"),
        "a write the policy skips reached the mirror"
    );
    assert!(live
        .log()
        .iter()
        .any(|r| r.target == "/payments" && r.body == b"card"));
    assert_eq!(
        exit.metric("mirror_replay_filtered_write_policy_total", &[]),
        1,
        "{}",
        exit.metrics
    );
    // The client's copy of a secret header is not recorded either.
    let har = pair
        .server
        .exec(&[AGENT, "export", rec.to_str().unwrap(), "--har", "-"])
        .output()
        .unwrap();
    let har = String::from_utf8_lossy(&har.stdout);
    assert!(har.contains("/orders") && har.contains("tenant=7"), "{har}");
    assert!(
        !har.contains("prod-secret"),
        "production's token recorded: {har}"
    );
    assert!(
        exit.stderr.contains("on paths matching ^/payments skipped"),
        "the policy is logged at start: {}",
        exit.stderr
    );
}
