//! Record and replay end to end (root only): live traffic recorded with `attach --record`, then
//! sent again with `mirror-agent replay` at recorded pace and at full speed, and exported as HAR.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mirror_agent::redact::{RedactRules, Redactor};

const MIRROR: &str = "127.0.0.1:9090";
/// The pause between the keep-alive requests of the timed connections.
const GAP: Duration = Duration::from_millis(400);

/// GETs of `targets` on one keep-alive connection from the namespace at `path`, `GAP` apart,
/// each answer read whole.
fn paced(path: String, to: SocketAddr, targets: Vec<String>) {
    std::thread::spawn(move || {
        netlab::enter_netns(&path);
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for (i, target) in targets.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(GAP);
            }
            s.write_all(format!("GET {target} HTTP/1.1\r\nHost: books\r\n\r\n").as_bytes())
                .unwrap();
            let mut buf = vec![0u8; expected_answer("GET", target, b"").len()];
            s.read_exact(&mut buf).unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Targets in the order they reached a mirror, and when.
type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

/// A mirror that notes when each target arrived.
fn timed_mirror(ns: &Netns) -> (TestServer, Arrivals) {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let a = Arc::clone(&arrivals);
    let server = TestServer::start_with(
        ns,
        &[MIRROR.parse().unwrap()],
        Arc::new(move |target: &str| {
            a.lock().unwrap().push((target.to_string(), Instant::now()));
            (200, Duration::ZERO)
        }),
    );
    (server, arrivals)
}

fn replay(ns: &Netns, dir: &std::path::Path, extra: &[&str]) -> (String, String) {
    let mut cmd = ns.exec(&[
        AGENT,
        "replay",
        dir.to_str().unwrap(),
        "--mirror",
        &format!("http://{MIRROR}"),
        "--host",
        "keep",
    ]);
    cmd.args(extra);
    let out = cmd.output().expect("mirror-agent replay");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "replay failed:\n{stderr}");
    (stdout, stderr)
}

/// Targets of one tagged connection (`/k/<tag>/<i>`) in the order the mirror got them.
fn order_of(log: &[Recorded], tag: &str) -> Vec<usize> {
    let prefix = format!("/k/{tag}/");
    log.iter()
        .filter_map(|r| r.target.strip_prefix(&prefix))
        .map(|i| i.split('?').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_recorded_session_replays_intact_in_order_and_on_time() {
    if not_root() {
        return;
    }
    let pair = Pair::new("rr", 243);
    let v4: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let v6: SocketAddr = format!("[{}]:8080", pair.server_v6).parse().unwrap();
    let live = TestServer::start(&pair.server, &[v4, v6]);
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
            "--drop-header",
            "Authorization",
        ],
    );
    let recorded_at = Instant::now();
    // Two keep-alive connections with pauses, over v4 and v6, at the same time.
    let client = pair.client.path();
    let t_a = std::thread::spawn(move || {
        paced(client, v4, (0..3).map(|i| format!("/k/a/{i}")).collect())
    });
    paced(
        pair.client.path(),
        v6,
        (0..3).map(|i| format!("/k/b/{i}")).collect(),
    );
    t_a.join().unwrap();
    let span = recorded_at.elapsed();
    // Pipelined, with a chunked POST (extension and trailer) at the end.
    let reqs = b"GET /k/p/0 HTTP/1.1\r\nHost: b\r\n\r\nGET /k/p/1 HTTP/1.1\r\nHost: b\r\n\r\n\
                 POST /k/p/2 HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
                 5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n";
    let expect: usize = [
        ("GET", "/k/p/0", &b""[..]),
        ("GET", "/k/p/1", b""),
        ("POST", "/k/p/2", b"hello world"),
    ]
    .iter()
    .map(|(m, t, body)| expected_answer(m, t, body).len())
    .sum();
    pipelined(&pair.client, v4, reqs, expect);
    // A 1 MiB upload with credentials, and a chunked one over v6.
    let dir = tempfile::tempdir().unwrap();
    let big_arg = big_upload(dir.path());
    curl(
        &pair.client,
        &[
            "-H",
            "Authorization: Bearer secret",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &big_arg,
            &format!("http://{v4}/k/u/0"),
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
            &format!("http://{v6}/k/c/0"),
        ],
    );
    let sent = live.requests();
    assert_eq!(sent, 3 + 3 + 3 + 2);
    // The live responses are recorded as they come: give the last ones a moment.
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    let recorded = exit.metric("mirror_record_records_total", &[("kind", "request")]);
    assert_eq!(
        recorded as usize, sent,
        "every request recorded\n{}",
        exit.stderr
    );
    assert_eq!(
        exit.metric("mirror_record_records_total", &[("kind", "response")]) as usize,
        sent,
        "every live response recorded"
    );
    assert_eq!(exit.metric("mirror_record_dropped_total", &[]), 0);
    let on_disk: Vec<u8> = std::fs::read_dir(rec.path())
        .unwrap()
        .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        memchr::memmem::find(&on_disk, b"Bearer secret").is_none(),
        "credentials never reach the disk"
    );

    // At recorded pace: intact, in order per connection, with the recorded gaps.
    let (mirror, arrivals) = timed_mirror(&pair.server);
    let started = Instant::now();
    let (table, stderr) = replay(&pair.server, rec.path(), &["--speed", "1"]);
    let paced_run = started.elapsed();
    assert_eq!(
        mirror.requests(),
        sent,
        "every recorded request replayed\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{sent} sent, {sent} answered, 0 errors")),
        "{stderr}"
    );
    assert!(
        table.contains("GET /k/a/{id}") && table.contains("mirror"),
        "{table}"
    );
    let mut want: Vec<Recorded> = live.log().iter().map(normalised).collect();
    want.sort();
    let mut got: Vec<Recorded> = mirror.log().iter().map(normalised).collect();
    got.sort();
    assert_same_requests(&got, &want);
    assert!(mirror
        .log()
        .iter()
        .all(|r| r.header("authorization").is_none()));
    assert!(mirror.log().iter().any(|r| r.body.len() == 1 << 20));
    for tag in ["a", "b", "p"] {
        assert_eq!(
            order_of(&mirror.log(), tag),
            vec![0, 1, 2],
            "order on connection {tag}"
        );
    }
    if timing_applies("replayed gaps match the recorded ones within 100 ms") {
        let arrivals = arrivals.lock().unwrap().clone();
        let at = |t: &str| arrivals.iter().find(|(x, _)| x == t).unwrap().1;
        for tag in ["a", "b"] {
            for i in 1..3 {
                let gap = at(&format!("/k/{tag}/{i}")) - at(&format!("/k/{tag}/{}", i - 1));
                assert!(
                    gap.abs_diff(GAP) < Duration::from_millis(100),
                    "/k/{tag}/{i} came {gap:?} after the one before; recorded about {GAP:?}"
                );
            }
        }
    }
    drop(mirror);

    // As fast as it goes: the same requests, in less time than they took live.
    let (fast, _) = timed_mirror(&pair.server);
    let started = Instant::now();
    replay(
        &pair.server,
        rec.path(),
        &["--speed", "max", "--connections", "2", "--loop", "2"],
    );
    let max_run = started.elapsed();
    assert_eq!(fast.requests(), 2 * sent);
    for tag in ["a", "b", "p"] {
        assert_eq!(
            order_of(&fast.log(), tag),
            vec![0, 1, 2, 0, 1, 2],
            "order on {tag}"
        );
    }
    if timing_applies("--speed max runs faster than the recording") {
        assert!(
            max_run < span && max_run < paced_run,
            "two loops at max speed took {max_run:?}; the recorded span was {span:?}, one paced run {paced_run:?}"
        );
    }
    drop(fast);

    // HAR: every request, its status and timing, no credentials.
    let har_path = dir.path().join("out.har");
    let out = pair
        .server
        .exec(&[
            AGENT,
            "export",
            rec.path().to_str().unwrap(),
            "--har",
            har_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let har: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&har_path).unwrap()).unwrap();
    let entries = har["log"]["entries"].as_array().unwrap();
    assert_eq!(har["log"]["version"], "1.2");
    assert_eq!(entries.len(), sent);
    let first = entries
        .iter()
        .find(|e| e["request"]["url"].as_str().unwrap().ends_with("/k/a/0"))
        .expect("an entry for /k/a/0");
    assert_eq!(first["request"]["method"], "GET");
    assert_eq!(first["response"]["status"], 200);
    assert!(first["timings"]["wait"].as_f64().unwrap() >= 0.0);
    let chunked = entries
        .iter()
        .find(|e| e["request"]["url"].as_str().unwrap().ends_with("/k/p/2"))
        .unwrap();
    assert_eq!(chunked["request"]["postData"]["text"], "hello world");
    assert!(!String::from_utf8_lossy(&std::fs::read(&har_path).unwrap()).contains("Bearer"));
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            dir.path().to_str().unwrap(),
        ]);
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_drops_records_counted_and_mirroring_goes_on() {
    if not_root() {
        return;
    }
    let pair = Pair::new("rd", 244);
    let v4: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let live = TestServer::start(&pair.server, &[v4]);
    let mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let disk = Tmpfs::new("256k");
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--record",
            disk.0.path().to_str().unwrap(),
        ],
    );
    // Incompressible 32 KiB bodies: 40 of them are five times what the disk holds.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..40u32 {
        let body = dir.path().join(format!("b{i}"));
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(i);
        let noise: Vec<u8> = (0..32 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(&body, noise).unwrap();
        curl(
            &pair.client,
            &[
                "--data-binary",
                &format!("@{}", body.display()),
                &format!("http://{v4}/up/{i}"),
            ],
        );
        // Blocks of a second: spread the uploads over a few.
        std::thread::sleep(Duration::from_millis(100));
    }
    netlab::wait_until(patience(Duration::from_secs(10)), || {
        mirror.requests() >= 40
    });
    let exit = agent.stop();
    assert_eq!(live.requests(), 40);
    assert_eq!(
        mirror.requests(),
        40,
        "mirroring went on with the disk full\n{}",
        exit.stderr
    );
    let written = exit.metric("mirror_record_records_total", &[("kind", "request")]);
    let responses = exit.metric("mirror_record_records_total", &[("kind", "response")]);
    let dropped = exit.metric("mirror_record_dropped_total", &[("reason", "write_error")]);
    assert!(
        dropped > 0,
        "the full disk made writes fail\n{}",
        exit.metrics
    );
    assert_eq!(
        written + responses + dropped,
        80,
        "every request and response either written or counted as dropped"
    );
}

/// CI gates: `report --fail-on` on a live agent, and `replay --fail-on` of what it recorded
/// against a candidate that answers like live and one that answers 404 where live answered
/// 200: exit statuses 0 and 3, the reasons, and the JUnit files.
#[test]
fn gates_pass_a_faithful_candidate_and_fail_one_that_answers_404() {
    if not_root() {
        return;
    }
    let pair = Pair::new("gate", 244);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    let missing = |target: &str| {
        let status = if target.starts_with("/missing") {
            404
        } else {
            200
        };
        (status, Duration::ZERO)
    };
    let faulty =
        TestServer::start_with(&pair.server, &[MIRROR.parse().unwrap()], Arc::new(missing));
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
            "--mirror",
            &format!("cand=http://{MIRROR}"),
            "--metrics",
            "127.0.0.1:9465",
        ],
    );
    let base = format!("http://{live_addr}");
    for target in ["/ok", "/missing"] {
        let urls: Vec<String> = (0..5).map(|_| format!("{base}{target}")).collect();
        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
        curl(&pair.client, &args);
    }
    let out = tempfile::tempdir().unwrap();
    let junit = |name: &str| out.path().join(name);
    let run = |args: &[&str]| {
        let mut cmd = pair.server.exec(&[AGENT]);
        let o = cmd.args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let gate = ["--fail-on", "mismatch,regression", "--junit"];
    let report = |file: &str| {
        let path = junit(file);
        let mut args = vec!["report", "--agent", "127.0.0.1:9465"];
        args.extend(gate);
        args.push(path.to_str().unwrap());
        run(&args)
    };
    assert!(
        netlab::wait_until(patience(Duration::from_secs(10)), || report("live.xml").0
            == Some(3)),
        "report --fail-on never failed the 404s: {:?}",
        report("live.xml")
    );
    let (_, stderr) = report("live.xml");
    assert!(
        stderr.contains("GET /missing on cand: mismatch: 404 where live answered 200"),
        "{stderr}"
    );
    agent.stop();
    drop(faulty);

    let replay_to = |file: &str| {
        let path = junit(file);
        let mut args = vec!["replay", rec.path().to_str().unwrap(), "--mirror"];
        let mirror = format!("http://{MIRROR}");
        args.extend([mirror.as_str(), "--speed", "max"]);
        args.extend(gate);
        args.push(path.to_str().unwrap());
        let (code, stderr) = run(&args);
        (code, stderr, std::fs::read_to_string(path).unwrap())
    };
    let faithful = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let (code, stderr, xml) = replay_to("pass.xml");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(faithful.requests(), 10);
    assert!(xml.contains(r#"tests="2" failures="0""#), "{xml}");
    assert!(
        xml.contains(r#"<testcase name="GET /missing" classname="mirror""#),
        "{xml}"
    );
    drop(faithful);

    let _faulty =
        TestServer::start_with(&pair.server, &[MIRROR.parse().unwrap()], Arc::new(missing));
    let (code, stderr, xml) = replay_to("fail.xml");
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("GET /missing on mirror: mismatch: 404 where live answered 200 ×5 of 5"),
        "{stderr}"
    );
    assert!(!stderr.contains("GET /ok on"), "{stderr}");
    assert!(xml.contains(r#"tests="2" failures="1""#), "{xml}");
    assert!(
        xml.contains("<failure message=\"mismatch: 404 where live answered 200"),
        "{xml}"
    );
}

/// Redaction before anything is kept: secrets planted in a query, headers, a JSON body, a
/// chunked text body and a bearer token are absent from the recording's HAR export (searched
/// byte for byte), an equal value masks equally, and the redacted recording still replays as
/// well-framed requests.
#[test]
fn a_redacted_recording_keeps_no_planted_secret_and_still_replays() {
    if not_root() {
        return;
    }
    let pair = Pair::new("redact", 245);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    let dir = tempfile::tempdir().unwrap();
    let (rec, key) = (dir.path().join("rec"), dir.path().join("key"));
    std::fs::write(&key, [7u8; 32]).unwrap();
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--record",
            rec.to_str().unwrap(),
            "--redact-key",
            key.to_str().unwrap(),
            "--redact-header",
            "X-Api-Key",
            "--redact-query",
            "token",
            "--redact-json",
            "$.card",
            "--redact-pattern",
            "email",
            "--redact-pattern",
            "card",
            "--redact-pattern",
            "token",
        ],
    );
    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N";
    let base = format!("http://{live_addr}");
    let json = r#"{"card":{"number":"4111111111111111"},"email":"alice@example.com","note":"card 5500 0000 0000 0004"}"#;
    let pay = format!("{base}/pay?token=QSECRET123&x=1");
    let auth = format!("Authorization: Bearer {JWT}");
    curl(
        &pair.client,
        &[
            "-H",
            "X-Api-Key: HSECRET456",
            "-H",
            "Content-Type: application/json",
            "-d",
            json,
            &pay,
        ],
    );
    let put = format!("{base}/notes");
    curl(
        &pair.client,
        &[
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "-d",
            "to=bob@example.com",
            &put,
        ],
    );
    curl(
        &pair.client,
        &["-H", &auth, &format!("{base}/u?mail=alice@example.com")],
    );
    agent.stop();

    let har = pair
        .server
        .exec(&[AGENT, "export", rec.to_str().unwrap(), "--har", "-"])
        .output()
        .unwrap();
    let har = String::from_utf8_lossy(&har.stdout).into_owned();
    assert!(
        har.contains("/pay") && har.contains("/notes") && har.contains("/u?mail="),
        "{har}"
    );
    for secret in [
        "QSECRET123",
        "HSECRET456",
        "4111111111111111",
        "alice@example.com",
        "5500 0000 0000 0004",
        "bob@example.com",
        JWT,
    ] {
        assert!(!har.contains(secret), "{secret} in the HAR: {har}");
    }
    // Alice's address masks the same in the body of /pay and the query of /u.
    let alice = Redactor::new(vec![7u8; 32], RedactRules::default()).mask(b"alice@example.com");
    let entries: Vec<&str> = har.split("\"request\"").skip(1).collect();
    let with_alice = entries.iter().filter(|e| e.contains(&alice)).count();
    assert_eq!(with_alice, 2, "{alice} in /pay and /u: {har}");

    let mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let (_, stderr) = replay(&pair.server, &rec, &["--speed", "max"]);
    let got = mirror.log();
    assert_eq!(got.len(), 3, "{stderr}");
    let pay = got.iter().find(|r| r.target.starts_with("/pay")).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&pay.body).expect("JSON body");
    assert!(body["card"].as_str().unwrap().starts_with("REDACTED-"));
    assert_eq!(body["note"].as_str().unwrap().len(), "card ".len() + 21);
    let notes = got.iter().find(|r| r.target == "/notes").unwrap();
    assert!(notes.body.starts_with(b"to=REDACTED-") && notes.body.len() == 24);
}
