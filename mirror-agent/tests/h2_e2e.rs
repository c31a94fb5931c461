//! HTTP/2 and gRPC end to end with real implementations (root only): grpcio clients and
//! servers, curl with prior knowledge and h2load (nghttp2). The mirror must receive every call
//! with the method, path, metadata and message bytes the client sent, and the live side must
//! not notice a mirror that is down or slow.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use mirror_agent::compare::Side;

const MIRROR: &str = "127.0.0.1:9092";
const METRICS: &str = "127.0.0.1:9465";
fn agent(ns: &Netns) -> Agent {
    Agent::start(
        ns,
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
    )
}

/// The agent's counters from /metrics, by sample name and labels.
fn metrics(ns: &Netns) -> HashMap<String, f64> {
    let text = metrics_text(ns, METRICS).expect("/metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            Some((format!("{}{{{}}}", s.metric, labels.join(",")), v))
        })
        .collect()
}

fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[test]
fn grpc_calls_reach_the_mirror_intact_v4_and_v6() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2", 241);
    let v4 = format!("{}:8080", pair.server_v4);
    let v6 = format!("[{}]:8080", pair.server_v6);
    let _live = GrpcServer::start(&pair.server, &[v4.clone(), v6.clone()], &[]);
    let mirror = GrpcServer::start(&pair.server, &[MIRROR.to_string()], &[]);
    let agent = agent(&pair.server);
    let mut sent = Vec::new();
    for (seed, target) in [(1, &v4), (2, &v6)] {
        // Concurrent unary calls on one connection, metadata varying (dynamic table in use),
        // server-, client- and bidirectional streaming, and a 1 MiB message (flow control).
        let calls = grpc_client(&pair.client, target, seed, 40, &["unary", "streams", "big"]);
        assert!(calls.iter().all(|c| c.code == "OK"), "{calls:?}");
        sent.extend(calls);
    }
    assert_calls_mirrored(&sent, &mirror);
    let m = metrics(&pair.server);
    assert_eq!(
        metric(&m, "mirror_http_h2_connections_total{}"),
        2.0,
        "{m:#?}"
    );
    for reason in [
        "hpack_unknown_index",
        "malformed",
        "gap",
        "h2_streams_over_cap",
    ] {
        assert_eq!(
            metric(&m, &format!("mirror_http_dropped_total{{reason={reason}}}")),
            0.0,
            "{reason}"
        );
    }
    agent.terminate();
}

#[test]
fn streaming_calls_reach_the_mirror_message_by_message() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2s", 246);
    let live = format!("{}:8080", pair.server_v4);
    let _live = GrpcServer::start(&pair.server, std::slice::from_ref(&live), &[]);
    let mirror = GrpcServer::start(&pair.server, &[MIRROR.to_string()], &[]);
    let agent = agent(&pair.server);
    let sent = grpc_client(&pair.client, &live, 6, 1, &["slowstreams"]);
    assert!(sent.iter().all(|c| c.code == "OK"), "{sent:?}");
    assert_calls_mirrored(&sent, &mirror);
    if timing_applies("streamed messages reach the mirror spread out in time") {
        for call in mirror.calls() {
            // The client sent a message every 100 ms: the mirror got the first one long before
            // the last, not all of them at the end.
            let spread = call.arrivals.last().unwrap() - call.arrivals[0];
            assert!(
                spread > 0.3,
                "{}: messages reached the mirror within {spread:.3} s",
                call.method
            );
        }
    }
    let m = metrics(&pair.server);
    assert_eq!(
        metric(&m, "mirror_http_h2_streamed_requests_total{}"),
        2.0,
        "{m:#?}"
    );
    assert_eq!(metric(&m, "mirror_http_h2_streams_cut_total{}"), 0.0);
    agent.terminate();
}

#[test]
fn curl_and_h2load_requests_are_mirrored_byte_for_byte() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2c", 242);
    let live = format!("{}:8080", pair.server_v4);
    let _live = GrpcServer::start(&pair.server, std::slice::from_ref(&live), &[]);
    let mirror = GrpcServer::start(&pair.server, &[MIRROR.to_string()], &[]);
    let agent = agent(&pair.server);
    let dir = tempfile::tempdir().unwrap();
    // A gRPC message: uncompressed, 4-byte length, payload.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut msg = vec![0u8];
    msg.extend((payload.len() as u32).to_be_bytes());
    msg.extend(&payload);
    let file = dir.path().join("msg.bin");
    std::fs::write(&file, &msg).unwrap();
    let url = format!("http://{live}/test.Echo/UnaryCurl");
    for i in 0..3 {
        let out = pair
            .client
            .exec(&[
                "curl",
                "-sS",
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-H",
                &format!("x-request-id: curl-{i}"),
                "--data-binary",
                &format!("@{}", file.display()),
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &url,
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    }
    let h2load = pair
        .client
        .exec(&[
            "h2load",
            "-n",
            "200",
            "-c",
            "1",
            "-m",
            "20",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            "x-request-id: h2load",
            "-d",
            file.to_str().unwrap(),
            &format!("http://{live}/test.Echo/UnaryLoad"),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&h2load.stdout);
    assert!(
        report.contains("200 succeeded"),
        "h2load:\n{report}\n{}",
        String::from_utf8_lossy(&h2load.stderr)
    );
    netlab::wait_until(Duration::from_secs(20), || mirror.calls().len() >= 203);
    let calls = mirror.calls();
    if calls.len() != 203 {
        // Where the missing calls went.
        let text = metrics_text(&pair.server, METRICS).unwrap_or_default();
        panic!(
            "the mirror got {} of 203 calls; agent:\n{}",
            calls.len(),
            stage_counters(&text)
        );
    }
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    for c in &calls {
        assert_eq!(c.messages, std::slice::from_ref(&hex), "{}", c.method);
    }
    let curl_ids: Vec<String> = calls
        .iter()
        .filter(|c| c.method == "/test.Echo/UnaryCurl")
        .map(Call::id)
        .collect();
    assert_eq!(curl_ids.len(), 3);
    for i in 0..3 {
        assert!(curl_ids.contains(&format!("curl-{i}")));
    }
    agent.terminate();
}

#[test]
fn a_connection_joined_mid_stream_never_yields_a_guessed_header() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2j", 243);
    let live = format!("{}:8080", pair.server_v4);
    let _live = GrpcServer::start(&pair.server, std::slice::from_ref(&live), &[]);
    let mirror = GrpcServer::start(&pair.server, &[MIRROR.to_string()], &[]);
    // The client fills its HPACK table before the agent starts, then goes on on the same
    // connection.
    let mut client = pair
        .client
        .exec(&[PYTHON, PEER, "h2client", "--target", &live, "--calls", "30"])
        .args(["--seed", "7", "calls", "pause", "calls", "churn", "calls"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "paused");
    let agent = agent(&pair.server);
    client.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut out, &mut rest).unwrap();
    assert!(client.wait().unwrap().success());
    let sent = parse_calls(&rest);
    let after_join = sent.len() - 30;
    let m = netlab::wait_until(Duration::from_secs(20), || {
        let m = metrics(&pair.server);
        metric(&m, "mirror_http_requests_total{}")
            + metric(&m, "mirror_http_dropped_total{reason=hpack_unknown_index}")
            >= after_join as f64
    });
    let m_now = metrics(&pair.server);
    assert!(m, "{m_now:#?}");
    assert_eq!(
        metric(&m_now, "mirror_http_h2_joined_connections_total{}"),
        1.0
    );
    let mirrored = metric(&m_now, "mirror_http_requests_total{}") as usize;
    let unknown = metric(
        &m_now,
        "mirror_http_dropped_total{reason=hpack_unknown_index}",
    );
    assert_eq!(mirrored + unknown as usize, after_join, "{m_now:#?}");
    // Once the churn turned the encoder's table over, every field resolves again: the last 30
    // calls at least come through.
    assert!(mirrored >= 30, "{mirrored} of {after_join} mirrored");
    netlab::wait_until(Duration::from_secs(10), || mirror.calls().len() >= mirrored);
    // Whatever was mirrored is exactly what was sent after the join.
    let sent = by_id(&sent[30..]);
    let got = mirror.calls();
    assert_eq!(got.len(), mirrored);
    for g in &got {
        let s = sent
            .get(&g.id())
            .expect("mirrored a call that was sent after the join");
        assert_eq!(
            (&g.method, g.app_metadata(), &g.messages),
            (&s.method, s.app_metadata(), &s.messages)
        );
    }
    eprintln!("joined mid-stream: {mirrored} of {after_join} calls mirrored, {unknown} dropped");
    agent.terminate();
}

#[test]
fn the_table_shows_grpc_statuses_and_a_slow_method() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2cmp", 244);
    let live = format!("{}:8080", pair.server_v4);
    let _live = GrpcServer::start(&pair.server, std::slice::from_ref(&live), &[]);
    let _mirror = GrpcServer::start(
        &pair.server,
        &[MIRROR.to_string()],
        &["--fail", "UnaryB", "--delay", "UnaryC=0.3"],
    );
    let agent = agent(&pair.server);
    const ROUNDS: u32 = 6;
    let sent = grpc_client(&pair.client, &live, 3, ROUNDS, &["methods"]);
    assert_eq!(sent.len(), 3 * ROUNDS as usize);
    let mut last = None;
    let done = netlab::wait_until(patience(Duration::from_secs(20)), || {
        last = report(&pair.server, METRICS);
        last.as_ref().is_some_and(|r| {
            r.rows
                .iter()
                .filter(|x| x.side == Side::Mirror)
                .map(|x| x.count)
                .sum::<u64>()
                >= sent.len() as u64
        })
    });
    let r = last.expect("report");
    assert!(done, "{r:#?}");
    let row = |name: &str, side: Side, code: &str| {
        r.rows
            .iter()
            .find(|x| x.name == name && x.side == side && x.code == code)
            .unwrap_or_else(|| panic!("no row {name} {side:?} {code}: {r:#?}"))
            .clone()
    };
    let n = sent.len() as u64 / 3;
    assert_eq!(row("POST /test.Echo/UnaryA", Side::Live, "OK").count, n);
    assert_eq!(row("POST /test.Echo/UnaryB", Side::Live, "OK").count, n);
    assert_eq!(
        row("POST /test.Echo/UnaryB", Side::Mirror, "INTERNAL").count,
        n
    );
    let slow = row("POST /test.Echo/UnaryC", Side::Mirror, "OK");
    let slow_live = row("POST /test.Echo/UnaryC", Side::Live, "OK");
    assert!(slow.avg_ms >= 300.0, "{slow:?}");
    assert!(
        slow_live.avg_ms * 3.0 < slow.avg_ms,
        "{slow_live:?} vs {slow:?}"
    );
    assert!(r
        .mismatches
        .iter()
        .any(|m| m.name == "POST /test.Echo/UnaryB"
            && m.live_code == "OK"
            && m.mirror_code == "INTERNAL"
            && m.count == n));
    let m = metrics(&pair.server);
    assert_eq!(
        metric(
            &m,
            "mirror_requests_total{code=INTERNAL,endpoint=POST /test.Echo/UnaryB,version=mirror}"
        ),
        n as f64,
        "{m:#?}"
    );
    agent.terminate();
}

#[test]
fn live_grpc_calls_do_not_notice_a_mirror_that_is_down_or_slow() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2d", 245);
    let live = format!("{}:8080", pair.server_v4);
    let _live = GrpcServer::start(&pair.server, std::slice::from_ref(&live), &[]);
    let agent = agent(&pair.server);
    // Down: nothing listens on the mirror's port.
    let started = std::time::Instant::now();
    let down = grpc_client(&pair.client, &live, 4, 20, &["unary", "streams"]);
    let took_down = started.elapsed();
    assert!(down.iter().all(|c| c.code == "OK"), "{down:?}");
    // Slow: every call takes the mirror 2 s.
    let _mirror = GrpcServer::start(
        &pair.server,
        &[MIRROR.to_string()],
        &[
            "--delay",
            "Unary=2",
            "--delay",
            "ServerStream=2",
            "--delay",
            "ClientStream=2",
        ],
    );
    let started = std::time::Instant::now();
    let slow = grpc_client(&pair.client, &live, 5, 20, &["unary", "streams"]);
    let took = started.elapsed();
    assert!(slow.iter().all(|c| c.code == "OK"), "{slow:?}");
    // A single live call held up by the mirror would add 2 s.
    assert!(
        took < took_down + Duration::from_millis(1500),
        "live calls took {took:?} with a slow mirror, {took_down:?} with none"
    );
    agent.terminate();
}

#[test]
fn grpc_calls_recorded_then_replayed_reach_the_mirror_intact() {
    if not_root() {
        return;
    }
    let pair = Pair::new("h2", 249);
    let v4 = format!("{}:8080", pair.server_v4);
    let v6 = format!("[{}]:8080", pair.server_v6);
    let _live = GrpcServer::start(&pair.server, &[v4.clone(), v6.clone()], &[]);
    let rec = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--record",
            rec.path().to_str().unwrap(),
        ],
    );
    let mut sent = Vec::new();
    for (seed, target) in [(3, &v4), (4, &v6)] {
        // Unary calls with varying metadata, streaming calls, and a 1 MiB message: the last
        // two are handed on while their body still arrives, and recorded once it ends.
        let calls = grpc_client(&pair.client, target, seed, 20, &["unary", "streams", "big"]);
        assert!(calls.iter().all(|c| c.code == "OK"), "{calls:?}");
        sent.extend(calls);
    }
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    assert!(
        exit.metric("mirror_http_h2_streamed_requests_total", &[]) >= 2,
        "the 1 MiB calls at least were streamed"
    );
    assert_eq!(
        exit.metric("mirror_record_records_total", &[("kind", "request")]) as usize,
        sent.len(),
        "every call recorded, streamed ones too\n{}",
        exit.metrics
    );
    assert_eq!(exit.metric("mirror_record_dropped_total", &[]), 0);

    let mirror = GrpcServer::start(&pair.server, &[MIRROR.to_string()], &[]);
    let out = pair
        .server
        .exec(&[
            AGENT,
            "replay",
            rec.path().to_str().unwrap(),
            "--mirror",
            &format!("http://{MIRROR}"),
            "--speed",
            "max",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let n = sent.len();
    assert!(
        stderr.contains(&format!("{n} sent, {n} answered, 0 errors")),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "the table shows gRPC statuses"
    );
    assert_calls_mirrored(&sent, &mirror);
}
