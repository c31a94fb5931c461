//! Compare stage end to end: the lab's table from live traffic and a faulty, slow mirror, over
//! /report, the `report` command and /metrics (root only).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mirror_agent::compare::{Report, Side};

const MIRROR: &str = "127.0.0.1:9091";
const METRICS: &str = "127.0.0.1:9464";
const ROUNDS: usize = 8;

fn report(ns: &Netns) -> Option<Report> {
    common::report(ns, METRICS)
}

/// A live server on the pair's 8080 and a mirror at `MIRROR`, each answering by its own
/// behaviour, and an agent mirroring one to the other with /report on `METRICS`.
fn live_and_mirror(
    pair: &Pair,
    live: Behaviour,
    mirror: Behaviour,
    extra: &[&str],
) -> (TestServer, TestServer, Agent) {
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let live = TestServer::start_with(&pair.server, &[live_addr], live);
    let mirror = TestServer::start_with(&pair.server, &[MIRROR.parse().unwrap()], mirror);
    let mirror_url = format!("http://{MIRROR}");
    let mut args = vec![
        "--iface",
        "srv0",
        "--port",
        "8080",
        "--mirror",
        &mirror_url,
        "--metrics",
        METRICS,
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start(&pair.server, &args);
    (live, mirror, agent)
}

#[test]
fn report_shows_the_mirrors_faults_and_delay_while_live_is_fine() {
    if not_root() {
        return;
    }
    let pair = Pair::new("cmp", 238);
    let (_live, _mirror, agent) = live_and_mirror(
        &pair,
        Arc::new(|_| (200, Duration::from_millis(2))),
        Arc::new(|target| match target {
            "/api/books/2/reviews" => (500, Duration::ZERO),
            "/api/books/3/reviews" => (200, Duration::from_millis(300)),
            _ => (200, Duration::from_millis(2)),
        }),
        &[
            "--live-label",
            "V1MIR-LiveBookService",
            "--mirror-label",
            "V4MIR-BookServiceFault",
            // Literal routes keep books 2 and 3 apart (by default both are /api/books/{id}/reviews).
            "--route",
            "/api/books/2/reviews",
            "--route",
            "/api/books/3/reviews",
        ],
    );
    let base = format!("http://{}:8080/api/books", pair.server_v4);
    for _ in 0..ROUNDS {
        let urls: Vec<String> = ["1/reviews", "2/reviews", "3/reviews", "4"]
            .iter()
            .map(|p| format!("{base}/{p}"))
            .collect();
        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
        curl(&pair.client, &args);
    }

    // Bounded poll until every mirrored request has its outcome and every live response its
    // row (live responses may come after the mirror's: see `--response-capture`).
    let mut last = None;
    let done = netlab::wait_until(Duration::from_secs(20), || {
        last = report(&pair.server);
        last.as_ref().is_some_and(|r| {
            [Side::Mirror, Side::Live].iter().all(|side| {
                r.rows
                    .iter()
                    .filter(|x| x.side == *side)
                    .map(|x| x.count)
                    .sum::<u64>()
                    == 4 * ROUNDS as u64
            })
        })
    });
    let r = last.expect("the report command answered");
    assert!(done, "mirror outcomes incomplete: {r:#?}");

    let live: Vec<_> = r.rows.iter().filter(|x| x.side == Side::Live).collect();
    assert!(
        live.iter()
            .all(|x| x.code == "200" && x.version == "V1MIR-LiveBookService"),
        "{live:#?}"
    );
    assert_eq!(live.iter().map(|x| x.count).sum::<u64>(), 4 * ROUNDS as u64);
    let row = |name: &str, side: Side, code: &str| {
        r.rows
            .iter()
            .find(|x| x.name == name && x.side == side && x.code == code)
            .unwrap_or_else(|| panic!("no row {name} {side:?} {code}: {r:#?}"))
    };
    let fault = row("GET /api/books/2/reviews", Side::Mirror, "500");
    assert_eq!(
        (fault.count, fault.version.as_str()),
        (ROUNDS as u64, "V4MIR-BookServiceFault")
    );
    assert!(!r.rows.iter().any(|x| x.side == Side::Mirror
        && x.code == "500"
        && x.name != "GET /api/books/2/reviews"));
    let slow = row("GET /api/books/3/reviews", Side::Mirror, "200");
    let slow_live = row("GET /api/books/3/reviews", Side::Live, "200");
    assert!(
        slow.avg_ms >= 300.0,
        "mirror average on the delayed endpoint: {} ms",
        slow.avg_ms
    );
    assert!(
        slow_live.avg_ms < 100.0 && slow_live.avg_ms * 3.0 < slow.avg_ms,
        "live {} ms vs mirror {} ms",
        slow_live.avg_ms,
        slow.avg_ms
    );
    assert!(
        row("GET /api/books/{id}/reviews", Side::Live, "200").avg_ms >= 1.5,
        "live durations are the server's ~2 ms"
    );
    assert!(r
        .mismatches
        .iter()
        .any(|m| m.name == "GET /api/books/2/reviews"
            && m.live_code == "200"
            && m.mirror_code == "500"
            && m.count == ROUNDS as u64));

    // /metrics is valid Prometheus text, checked with a parser.
    let metrics = pair
        .server
        .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .output()
        .unwrap();
    assert!(metrics.status.success());
    let text = String::from_utf8(metrics.stdout).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mismatch = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "mirror_status_mismatch_total" && s.labels.get("mirror_code") == Some("500")
        })
        .expect("a mismatch series");
    // OpenMetrics names a counter's sample `<name>_total`; this parser (classic text format) then
    // reports it untyped. The value is what matters.
    assert!(
        matches!(mismatch.value, prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) if v == ROUNDS as f64),
        "{:?}",
        mismatch.value
    );
    let series = |metric: &str| scrape.samples.iter().filter(|s| s.metric == metric).count();
    for m in [
        "mirror_requests_total",
        "mirror_request_duration_seconds_count",
        "mirror_kernel_packets_total",
        "mirror_http_dropped_total",
        "mirror_replay_sent_total",
        "mirror_capture_frames_total",
    ] {
        assert!(series(m) > 0, "no {m} in /metrics:\n{text}");
    }

    let (stdout_table, _) = agent.terminate_with_output();
    assert!(
        stdout_table.contains("V4MIR-BookServiceFault") && stdout_table.contains("200 → 500"),
        "{stdout_table}"
    );
}

#[test]
fn a_closed_stdout_costs_the_exit_report_only() {
    if not_root() {
        return;
    }
    let pair = Pair::new("cso", 242);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("flows.txt");
    let agent = Agent::start_closing_stdout(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--dump",
            dump.to_str().unwrap(),
        ],
    );
    curl(
        &pair.client,
        &[&format!("http://{}:8080/api/books/1", pair.server_v4)],
    );
    let stderr = agent.terminate();
    assert!(
        stderr.contains("could not write to standard output"),
        "{stderr}"
    );
    let flows = std::fs::read_to_string(&dump).expect("the dump is written after the report");
    assert!(flows.contains("GET /api/books/1 HTTP/1.1"), "{flows}");
}

/// `--response-capture heads`: large responses are timed and paired from their heads, their
/// bodies never cloned, and nothing is counted lost.
#[test]
fn response_heads_pair_large_responses_without_cloning_their_bodies() {
    if not_root() {
        return;
    }
    let pair = Pair::new("hds", 237);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start_with(
        &pair.server,
        &[live_addr],
        Arc::new(|target| {
            if target.starts_with("/fail") {
                (503, Duration::ZERO)
            } else {
                (200, Duration::from_millis(20))
            }
        }),
    );
    let _mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
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
            "--response-capture",
            "heads",
        ],
    );
    const N: u64 = 4;
    let base = format!("http://{}:8080", pair.server_v4);
    for _ in 0..N {
        // One keep-alive connection each: two large bodies and a small one.
        let urls = [
            format!("{base}/big?size=200000"),
            format!("{base}/fail?size=30000"),
            format!("{base}/small?size=10"),
        ];
        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
        curl(&pair.client, &args);
    }
    let mut last = None;
    let done = netlab::wait_until(Duration::from_secs(20), || {
        last = report(&pair.server);
        last.as_ref().is_some_and(|r| {
            r.rows
                .iter()
                .filter(|x| x.side == Side::Live)
                .map(|x| x.count)
                .sum::<u64>()
                == 3 * N
        })
    });
    let r = last.expect("report");
    assert!(done, "live responses incomplete: {r:#?}");
    let live = |name: &str, code: &str| {
        r.rows
            .iter()
            .find(|x| x.side == Side::Live && x.name == name && x.code == code)
            .unwrap_or_else(|| panic!("no live row {name} {code}: {r:#?}"))
            .clone()
    };
    assert_eq!(live("GET /fail", "503").count, N);
    assert_eq!(live("GET /small", "200").count, N);
    let big = live("GET /big", "200");
    assert_eq!(big.count, N);
    // Timed from the request to the response's first byte: the server's 20 ms, not the body.
    assert!((19.0..200.0).contains(&big.p50_ms), "{big:?}");
    let scrape = || {
        let out = pair
            .server
            .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    const HEADS: &str = "mirror_kernel_packets_total{outcome=\"head_recorded\"} ";
    // Kernel counters are read once a second.
    let mut text = String::new();
    netlab::wait_until(Duration::from_secs(5), || {
        text = scrape();
        value(&text, HEADS).is_some_and(|n| n >= (3 * N) as f64)
    });
    let metric = |name: &str| value(&text, name).unwrap_or_else(|| panic!("{name}:\n{text}"));
    assert!(metric(HEADS) >= (3 * N) as f64, "{text}");
    // The bodies were described, not captured: nearly all of 4 × 230 kB.
    assert!(metric("mirror_reassembly_elided_bytes_total ") > 0.9 * (N * 230_000) as f64);
    assert_eq!(metric("mirror_reassembly_lost_bytes_total "), 0.0, "{text}");
    assert_eq!(
        metric("mirror_http_unpaired_requests_total "),
        0.0,
        "{text}"
    );
    agent.terminate();
}

const JSON_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/json_peer.py");

/// Starts `json_peer.py` for `version` at `addr` inside `ns`, and waits until it answers.
fn json_peer(ns: &Netns, version: &str, addr: SocketAddr) -> netlab::Proc {
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let proc = netlab::Proc::spawn(&mut ns.exec(&["python3", JSON_PEER, version, &host, &port]));
    let up = netlab::wait_until(Duration::from_secs(10), || {
        ns.exec(&[
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            &format!("http://{addr}/api/books/1"),
        ])
        .status()
        .is_ok_and(|s| s.success())
    });
    assert!(up, "json_peer {version} at {addr} did not start");
    proc
}

/// A candidate that answers 200 quickly with the wrong content, beside a secondary running the
/// live version: the report names the two real regressions, and the fields that differ on
/// every answer (a time and a random id) only as noise.
#[test]
fn content_regressions_stand_out_and_noise_does_not() {
    if not_root() {
        return;
    }
    let pair = Pair::new("cnt", 239);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = json_peer(&pair.server, "v1", live_addr);
    let _cand = json_peer(&pair.server, "v5", "127.0.0.1:9201".parse().unwrap());
    let _second = json_peer(&pair.server, "v1", "127.0.0.1:9202".parse().unwrap());
    const METRICS: &str = "127.0.0.1:9473";
    // The rating is redacted where examples are shown: it must still count as changed, and the
    // author's name, redacted too, as equal.
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), [42u8; 32]).unwrap();
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            "cand=http://127.0.0.1:9201",
            "--mirror",
            "second=http://127.0.0.1:9202",
            "--secondary",
            "second",
            "--compare-bodies",
            "--metrics",
            METRICS,
            "--redact-key",
            key.path().to_str().unwrap(),
            "--redact-json",
            "$.rating",
            "--redact-json",
            "$.name",
        ],
    );
    const N: usize = 40;
    let mut urls: Vec<String> = Vec::new();
    for i in 0..N {
        urls.push(format!("http://{live_addr}/api/books/{}", i % 5 + 1));
        urls.push(format!("http://{live_addr}/api/authors/{i}"));
    }
    // A few keep-alive connections, as clients do.
    for chunk in urls.chunks(20) {
        let args: Vec<&str> = chunk.iter().map(String::as_str).collect();
        curl(&pair.client, &args);
    }
    let compared = |r: &Report, name: &str, mirror: &str| {
        r.content
            .iter()
            .find(|c| c.name == name && c.mirror == mirror)
            .map_or(0, |c| c.compared)
    };
    let done = netlab::wait_until(Duration::from_secs(10), || {
        common::report(&pair.server, METRICS).is_some_and(|r| {
            ["cand", "second"].iter().all(|m| {
                compared(&r, "GET /api/books/{id}", m) == N as u64
                    && compared(&r, "GET /api/authors/{id}", m) == N as u64
            })
        })
    });
    let r = common::report(&pair.server, METRICS).expect("a report");
    assert!(done, "every answer compared: {:?}", r.content);
    let books = r
        .content
        .iter()
        .find(|c| c.name == "GET /api/books/{id}" && c.mirror == "cand")
        .unwrap();
    let mut regressions: Vec<&str> = books
        .fields
        .iter()
        .filter(|f| f.regression)
        .map(|f| f.path.as_str())
        .collect();
    regressions.sort();
    assert_eq!(regressions, ["$.cost", "$.price", "$.rating"], "{books:?}");
    for noise in ["$.servedAt", "$.requestId"] {
        let f = books.fields.iter().find(|f| f.path == noise).unwrap();
        assert!(f.noise_rate > 0.9 && !f.regression, "{f:?}");
    }
    let rating = books.fields.iter().find(|f| f.path == "$.rating").unwrap();
    // No book's rating is a whole number: every rounded one differs.
    assert_eq!(rating.rate, 1.0, "{rating:?}");
    for example in [&rating.live_example, &rating.mirror_example] {
        let shown = example.as_deref().unwrap_or("");
        assert!(
            shown.starts_with("REDACTED-") && shown.len() == 21,
            "{rating:?}"
        );
    }
    assert_ne!(rating.live_example, rating.mirror_example);
    let shown = serde_json::to_string(&r.content).unwrap();
    for raw in ["4.5", "3.8", "4.2", "4.7", "3.9", "4.0", "5.0"] {
        let example = format!("\"{raw}\"");
        assert!(
            !shown.contains(&example),
            "a redacted rating shown: {shown}"
        );
    }
    let verdicts = mirror_agent::compare::verdicts(&r);
    let cand: Vec<&String> = verdicts
        .iter()
        .filter(|v| v.contains("cand differs"))
        .collect();
    assert_eq!(cand.len(), 1, "one endpoint regressed: {verdicts:?}");
    assert!(
        cand[0].contains("$.rating") && cand[0].contains("$.price missing"),
        "{verdicts:?}"
    );
    assert!(
        !cand[0].contains("servedAt") && !cand[0].contains("requestId"),
        "{verdicts:?}"
    );
    assert!(
        !verdicts.iter().any(|v| v.contains("authors")),
        "only noise differs on authors: {verdicts:?}"
    );
    // (prometheus_parse misreads the braces of `{id}` in label values: the line is checked.)
    let lines = [
        r#"mirror_content_field_regression{endpoint="GET /api/books/{id}",mirror="cand",path="$.rating"} 1"#,
        r#"mirror_content_field_regression{endpoint="GET /api/books/{id}",mirror="cand",path="$.servedAt"} 0"#,
        r#"mirror_content_compared_total{endpoint="GET /api/books/{id}",mirror="cand",result="differing"} 40"#,
        // Every live response read whole, books and authors (the pipeline's counters are
        // published a tick after the comparison saw them).
        "mirror_http_content_responses_total 80",
    ];
    let scrape = || {
        let out = pair
            .server
            .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    netlab::wait_until(Duration::from_secs(3), || {
        let text = scrape();
        lines.iter().all(|l| text.contains(l))
    });
    let text = scrape();
    for line in lines {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    agent.terminate();
}

/// Two real servers that disagree on routes: live answers 404 where the candidate answers 200,
/// and the candidate lost a route live serves. The verdict names both, in /report's JSON, the
/// `report` command's table and the exit summary, and never says "matches".
#[test]
fn servers_that_disagree_on_a_route_get_a_differs_verdict() {
    use mirror_agent::compare::VerdictKind;
    if not_root() {
        return;
    }
    let pair = Pair::new("dis", 247);
    let (_live, _candidate, agent) = live_and_mirror(
        &pair,
        Arc::new(|target| match target {
            t if t.starts_with("/missing/") => (404, Duration::ZERO),
            _ => (200, Duration::ZERO),
        }),
        Arc::new(|target| match target {
            "/api/lost" => (404, Duration::ZERO),
            _ => (200, Duration::ZERO),
        }),
        &[],
    );
    const MISSING: u64 = 6;
    let base = format!("http://{}:8080", pair.server_v4);
    let mut urls: Vec<String> = (1..=MISSING)
        .map(|i| format!("{base}/missing/{i}"))
        .collect();
    urls.extend([format!("{base}/api/lost"), format!("{base}/api/ok")]);
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    curl(&pair.client, &args);

    let total = MISSING + 2;
    let mut last = None;
    let paired = netlab::wait_until(Duration::from_secs(20), || {
        last = report(&pair.server);
        last.as_ref()
            .is_some_and(|r| r.paired.iter().map(|p| p.count).sum::<u64>() == total)
    });
    let r = last.expect("the report command answered");
    assert!(
        paired,
        "every request paired with its live response: {r:#?}"
    );
    let verdict = |name: &str| {
        r.verdicts
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no verdict on {name}: {:#?}", r.verdicts))
    };
    let missing = verdict("GET /missing/{id}");
    assert_eq!(
        (missing.verdict, missing.paired, missing.mismatched),
        (VerdictKind::Differs, MISSING, MISSING)
    );
    assert_eq!(
        missing.findings[0].detail,
        format!("200 where live answered 404 ×{MISSING} of {MISSING} paired")
    );
    let lost = verdict("GET /api/lost");
    assert_eq!((lost.verdict, lost.mismatched), (VerdictKind::Differs, 1));
    assert!(lost.findings[0]
        .detail
        .starts_with("404 where live answered 200"));
    assert_eq!(verdict("GET /api/ok").verdict, VerdictKind::Match);

    let table = pair
        .server
        .exec(&[AGENT, "report", "--agent", METRICS])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let (exit_summary, _) = agent.terminate_with_output();
    for out in [table.as_ref(), exit_summary.as_str()] {
        assert!(
            out.contains(&format!(
                "verdict: mirror differs on GET /missing/{{id}}: 200 where live answered 404 ×{MISSING} of {MISSING} paired"
            )) && out.contains("verdict: mirror differs on GET /api/lost: 404 where live answered 200 ×1 of 1 paired"),
            "{out}"
        );
        assert!(!out.contains("matches live"), "{out}");
    }
}
