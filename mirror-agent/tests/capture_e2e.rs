//! Capture stage, end to end, in network namespaces created by each test (root only).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn program_id(ready: &str) -> u32 {
    ready
        .rsplit("program id ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn wait_unloaded(id: u32) {
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while loaded_program_ids(mirror_common::PROGRAM_NAME).contains(&id) {
        assert!(
            Instant::now() < deadline,
            "program {id} still loaded: something still holds it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn no_mirror_links(ns: &Netns) {
    let links = ns.ip(&["-o", "link"]);
    assert!(!links.contains("mirr"), "mirror veth left behind:\n{links}");
}

fn tc_filters(ns: &Netns, hook: &str) -> String {
    sh(&["tc", "-n", &ns.name, "filter", "show", "dev", "srv0", hook])
}

/// The requests the client makes, with the bodies it expects back.
struct Exchange {
    args: Vec<String>,
    expected: Vec<u8>,
}

fn exchanges(host: &str, upload: &std::path::Path, upload_bytes: &[u8]) -> Vec<Exchange> {
    let base = format!("http://{host}:8080");
    vec![
        Exchange {
            args: vec![format!("{base}/books?size=100")],
            expected: expected_body("GET", "/books?size=100", b""),
        },
        Exchange {
            args: vec![format!("{base}/big?size=300000")],
            expected: expected_body("GET", "/big?size=300000", b""),
        },
        Exchange {
            args: vec![
                "-H".into(),
                "Content-Type: application/octet-stream".into(),
                "--data-binary".into(),
                format!("@{}", upload.display()),
                format!("{base}/upload"),
            ],
            expected: expected_body("POST", "/upload", upload_bytes),
        },
    ]
}

#[test]
fn captured_bytes_equal_what_client_sent_v4_and_v6() {
    if not_root() {
        return;
    }
    let pair = Pair::new("cap", 231);
    let server = TestServer::start(
        &pair.server,
        &[
            format!("{}:8080", pair.server_v4).parse().unwrap(),
            format!("[{}]:8080", pair.server_v6).parse().unwrap(),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("upload.bin");
    // 3 MiB of non-repeating bytes, so any misordering or duplication shows.
    let mut x = 0x1234_5678u32;
    let data: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(&upload, &data).unwrap();
    let hosts = [pair.server_v4.clone(), format!("[{}]", pair.server_v6)];

    // Baseline without the agent.
    let mut baseline = Vec::new();
    for host in &hosts {
        for ex in exchanges(host, &upload, &data) {
            let args: Vec<&str> = ex.args.iter().map(String::as_str).collect();
            baseline.push(curl(&pair.client, &args).0);
        }
    }

    let dump = dir.path().join("capture.dump");
    let agent = Agent::start(
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
    let mut clients: Vec<SocketAddr> = Vec::new();
    let mut with_agent = Vec::new();
    for host in &hosts {
        for ex in exchanges(host, &upload, &data) {
            let args: Vec<&str> = ex.args.iter().map(String::as_str).collect();
            let (body, local) = curl(&pair.client, &args);
            assert_eq!(body, ex.expected, "live response changed for {args:?}");
            with_agent.push(body);
            clients.extend(local);
        }
    }
    assert_eq!(
        with_agent, baseline,
        "live responses differ with the agent attached"
    );
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    let stderr = &exit.stderr;

    let flows = parse_dump(&std::fs::read(&dump).unwrap());
    assert_eq!(clients.len(), 6);
    for client in &clients {
        let rec = server.record(client).expect("server saw the connection");
        let up = flows
            .iter()
            .find(|f| f.src == *client)
            .unwrap_or_else(|| panic!("no captured flow from {client}; stderr:\n{stderr}"));
        assert_eq!(up.gaps, 0, "{client}: holes in the captured request stream");
        assert_eq!(
            up.bytes.len(),
            rec.received.len(),
            "{client}: request byte count"
        );
        assert!(
            up.bytes == rec.received,
            "{client}: captured request bytes differ"
        );
        let down = flows
            .iter()
            .find(|f| f.dst == *client)
            .expect("response flow captured");
        assert!(
            down.bytes == rec.sent,
            "{client}: captured response bytes differ"
        );
    }
    assert!(
        rec_total(&flows) >= 2 * (3 << 20),
        "the 3 MiB uploads were captured"
    );
    let kernel = |outcome| exit.metric("mirror_kernel_packets_total", &[("outcome", outcome)]);
    assert_eq!(
        exit.metric("mirror_capture_ring_drops_total", &[]),
        0,
        "{}",
        exit.metrics
    );
    // The bytes above are exact although pure ACKs (handshakes, teardowns, the acks of the
    // uploads) were never cloned.
    assert!(kernel("skip_no_payload") > 0, "{}", exit.metrics);
    assert_eq!(kernel("clone_errors"), 0, "{}", exit.metrics);
}

fn rec_total(flows: &[DumpedFlow]) -> usize {
    flows.iter().map(|f| f.bytes.len()).sum()
}

#[test]
fn nothing_left_after_sigterm_or_sigkill() {
    use mirror_agent::capture::heartbeat::STALE_AFTER;
    use mirror_common::Counter;
    if not_root() {
        return;
    }
    let pair = Pair::new("cln", 232);
    let _server = TestServer::start(&pair.server, &["10.232.0.2:8080".parse().unwrap()]);
    // `auto` takes tcx where the kernel has it (found by trying); where it has none (before
    // 6.6, without a backport) it falls back to a clsact filter, which outlives a killed
    // process, as `netlink` does everywhere.
    for (mode, signal) in [
        ("auto", libc::SIGTERM),
        ("auto", libc::SIGKILL),
        ("netlink", libc::SIGKILL),
    ] {
        let args = ["--iface", "srv0", "--port", "8080", "--attach-mode", mode];
        let mut agent = Agent::start(&pair.server, &args);
        let tcx = agent.ready_line.contains("(Tcx)");
        if !tcx {
            assert!(
                agent.ready_line.contains("(Netlink)"),
                "{}",
                agent.ready_line
            );
            if mode == "auto" {
                eprintln!(
                    "no tcx on this kernel: checking that a killed agent's clsact filter goes \
                     inert instead of checking that it is gone"
                );
            }
        }
        let id = program_id(&agent.ready_line);
        assert!(loaded_program_ids(mirror_common::PROGRAM_NAME).contains(&id));
        curl(&pair.client, &["http://10.232.0.2:8080/x"]);
        agent.proc.signal(signal);
        let (code, err) = agent.proc.wait_exit(patience(Duration::from_secs(15)));
        if signal == libc::SIGTERM {
            assert_eq!(code, Some(0), "{err}");
        }
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        while pair.server.ip(&["-o", "link"]).contains("mirr") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        no_mirror_links(&pair.server);
        if tcx || signal == libc::SIGTERM {
            // A loaded program is one still attached somewhere: gone means nothing clones.
            wait_unloaded(id);
            assert!(!tc_filters(&pair.server, "ingress").contains("mirror_tc"));
        } else {
            // The filter stays until the next start, but passes over every packet: its agent's
            // heartbeat is stale.
            assert!(tc_filters(&pair.server, "ingress").contains("mirror_tc"));
            std::thread::sleep(STALE_AFTER + Duration::from_millis(500));
            let before = program_counters(id);
            curl(&pair.client, &["http://10.232.0.2:8080/inert"]);
            let after = program_counters(id);
            let delta = |c: Counter| after[c as usize] - before[c as usize];
            assert!(delta(Counter::SkipAgentGone) >= 1, "{after:?}");
            let mirrored: u64 = MIRRORED.iter().map(|c| delta(*c)).sum();
            assert_eq!(mirrored, 0, "{after:?}");
        }
        let (body, _) = curl(&pair.client, &["http://10.232.0.2:8080/after"]);
        assert_eq!(body, expected_body("GET", "/after", b""));
        // The killed agent's lock file stays, but the kernel released its lock: a new agent
        // takes the interface (removing a stale filter), and removes the file when it stops.
        let next = Agent::start(&pair.server, &args);
        next.terminate();
        assert!(!tc_filters(&pair.server, "ingress").contains("mirror_tc"));
        wait_unloaded(id);
    }
}

#[test]
fn netlink_fallback_removes_stale_filters_after_a_crash() {
    if not_root() {
        return;
    }
    let pair = Pair::new("nl", 233);
    let args = [
        "--iface",
        "srv0",
        "--port",
        "8080",
        "--attach-mode",
        "netlink",
    ];
    let mut crashed = Agent::start(&pair.server, &args);
    assert!(
        crashed.ready_line.contains("(Netlink)"),
        "{}",
        crashed.ready_line
    );
    crashed.proc.signal(libc::SIGKILL);
    crashed.proc.wait_exit(Duration::from_secs(10));
    // A classic filter outlives its process: this is what the next start must clean.
    assert!(tc_filters(&pair.server, "ingress").contains("mirror_tc"));

    let agent = Agent::start(&pair.server, &args);
    for hook in ["ingress", "egress"] {
        let n = tc_filters(&pair.server, hook)
            .lines()
            .filter(|l| l.contains("mirror_tc"))
            .count();
        assert_eq!(n, 1, "{hook}: exactly the new agent's filter");
    }
    let id = program_id(&agent.ready_line);
    agent.terminate();
    for hook in ["ingress", "egress"] {
        assert!(
            !tc_filters(&pair.server, hook).contains("mirror_tc"),
            "{hook} filter left"
        );
    }
    wait_unloaded(id);
}

/// The kernel counters of a loaded program, read through its map (it may have no agent left).
fn program_counters(id: u32) -> [u64; mirror_common::COUNTER_COUNT as usize] {
    use aya::maps::{Map, MapData, PerCpuArray};
    let prog = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .expect("program loaded");
    for map_id in prog.map_ids().unwrap().unwrap_or_default() {
        let data = MapData::from_id(map_id).unwrap();
        if data.info().unwrap().name_as_str() != Some(mirror_common::MAP_COUNTERS) {
            continue;
        }
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
        let mut out = [0; mirror_common::COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = counters.get(&(i as u32), 0).unwrap().iter().sum();
        }
        return out;
    }
    panic!("program {id} has no {} map", mirror_common::MAP_COUNTERS);
}

/// Before tcx (6.6), a killed agent's clsact filter stays attached; it must not go on cloning
/// towards the mirror interface that died with the agent. A frozen agent is passed over too,
/// and mirrored again once it runs.
#[test]
fn a_killed_or_frozen_agents_program_goes_inert() {
    use mirror_agent::capture::heartbeat::STALE_AFTER;
    use mirror_common::Counter;
    if not_root() {
        return;
    }
    let pair = Pair::new("hb", 234);
    let _server = TestServer::start(&pair.server, &["10.234.0.2:8080".parse().unwrap()]);
    let get = |path: &str| {
        let (body, _) = curl(&pair.client, &[&format!("http://10.234.0.2:8080{path}")]);
        assert_eq!(body, expected_body("GET", path, b""), "live answers {path}");
    };

    let args = [
        "--iface",
        "srv0",
        "--port",
        "8080",
        "--attach-mode",
        "netlink",
    ];
    let mut killed = Agent::start(&pair.server, &args);
    let id = program_id(&killed.ready_line);
    get("/before");
    killed.proc.signal(libc::SIGKILL);
    killed.proc.wait_exit(Duration::from_secs(10));
    assert!(tc_filters(&pair.server, "ingress").contains("mirror_tc"));
    std::thread::sleep(STALE_AFTER + Duration::from_millis(500));
    let before = program_counters(id);
    for i in 0..5 {
        get(&format!("/after-kill/{i}"));
    }
    let after = program_counters(id);
    let delta = |c: Counter| after[c as usize] - before[c as usize];
    assert!(delta(Counter::Matched) >= 5, "{after:?}");
    assert_eq!(delta(Counter::SkipAgentGone), delta(Counter::Matched));
    for c in MIRRORED {
        assert_eq!(
            delta(c),
            0,
            "{c:?}: a clone or record was attempted after the agent died"
        );
    }
    // The next agent removes the leftover filter.
    let agent = Agent::start(&pair.server, &args);
    agent.terminate();
    wait_unloaded(id);

    let agent = Agent::start(&pair.server, &["--iface", "srv0", "--port", "8080"]);
    get("/running");
    agent.proc.signal(libc::SIGSTOP);
    std::thread::sleep(STALE_AFTER + Duration::from_millis(500));
    get("/frozen");
    agent.proc.signal(libc::SIGCONT);
    // The beat is refreshed within a quarter of a second of the thaw.
    std::thread::sleep(Duration::from_millis(600));
    get("/thawed");
    let exit = agent.stop();
    let kernel = |outcome| exit.metric("mirror_kernel_packets_total", &[("outcome", outcome)]);
    assert!(
        kernel("skip_agent_gone") >= 1,
        "the frozen agent's packets were passed over: {}",
        exit.metrics
    );
    for (path, mirrored) in [("/running", true), ("/frozen", false), ("/thawed", true)] {
        assert_eq!(
            exit.metrics.contains(&format!("endpoint=\"GET {path}\"")),
            mirrored,
            "/running and /thawed mirrored, /frozen not: {}",
            exit.metrics
        );
    }
}

/// Records copy a segment's payload with two overlapping loads per power-of-two size class
/// (the kernel program's `load_prefix`): one request written in segments of every class's
/// edges, 1 to 4096 bytes, must reach the mirror byte for byte, each segment as one record.
#[test]
fn segments_of_every_record_size_are_captured_whole() {
    if not_root() {
        return;
    }
    let pair = Pair::new("recsz", 236);
    let addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let server = TestServer::start(&pair.server, &[addr]);
    let mirror = TestServer::start(&pair.server, &["127.0.0.1:9090".parse().unwrap()]);
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            "http://127.0.0.1:9090",
        ],
    );
    let mut sizes: Vec<usize> = (0..=12)
        .flat_map(|k| [(1usize << k) - 1, 1 << k, (1 << k) + 1])
        .filter(|n| (1..=4096).contains(n))
        .collect();
    sizes.dedup();
    let body_len: usize = sizes.iter().sum();
    let head = format!("POST /sizes HTTP/1.1\r\nHost: t\r\nContent-Length: {body_len}\r\n\r\n");
    let mut x = 0x9e37_79b9u32;
    let mut byte = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    };
    let pieces: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| byte()).collect())
        .collect();
    let body = pieces.concat();
    let segments: Vec<Vec<u8>> = std::iter::once(head.into_bytes()).chain(pieces).collect();
    let path = pair.client.path();
    let client = std::thread::spawn(move || {
        netlab::enter_netns(&path);
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_nodelay(true).unwrap();
        for segment in &segments {
            std::io::Write::write_all(&mut conn, segment).unwrap();
            // Acknowledged before the next write, so that each write leaves as one segment.
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut reply = [0u8; 512];
        let n = std::io::Read::read(&mut conn, &mut reply).unwrap();
        assert!(reply[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &reply[..n]);
    });
    client.join().unwrap();
    assert!(
        netlab::wait_until(patience(Duration::from_secs(10)), || mirror.requests() == 1),
        "the mirror got no request"
    );
    let exit = agent.stop();
    let kernel = |outcome| exit.metric("mirror_kernel_packets_total", &[("outcome", outcome)]);
    assert!(
        server.log()[0].body == body,
        "the live server's body differs"
    );
    let got = &mirror.log()[0];
    assert_eq!(
        (got.method.as_str(), got.target.as_str()),
        ("POST", "/sizes")
    );
    assert!(
        got.body == body,
        "the mirror's body differs from what the client sent"
    );
    assert!(
        kernel("payload_recorded") > sizes.len() as u64 && kernel("cloned") == 0,
        "every segment recorded, none cloned: {}",
        exit.metrics
    );
}

/// The outcomes of a packet the program mirrored, or tried to: clones and records.
const MIRRORED: [mirror_common::Counter; 7] = {
    use mirror_common::Counter::*;
    [
        Cloned,
        CloneErrors,
        CloneDropped,
        HeadRecorded,
        HeadRingFull,
        PayloadRecorded,
        PayloadRingFull,
    ]
};

#[test]
fn clear_errors_for_bad_input() {
    if not_root() {
        return;
    }
    let pair = Pair::new("err", 234);
    let run = |args: &[&str]| -> (bool, String) {
        let out = pair
            .server
            .exec(&[AGENT, "attach"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--iface", "nope0", "--port", "80"]);
    // Each refusal says what went wrong and names the fix.
    assert!(
        !ok && err.contains("does not exist") && err.contains("Fix: list the interfaces"),
        "{err}"
    );
    let (ok, err) = run(&["--iface", "srv0", "--port", "http"]);
    assert!(!ok && err.contains("invalid value 'http'"), "{err}");
    // A TUN device carries bare IP packets: no Ethernet header for the program to parse.
    pair.server
        .ip(&["tuntap", "add", "mode", "tun", "name", "tun0"]);
    let (ok, err) = run(&["--iface", "tun0", "--port", "80"]);
    assert!(
        !ok && err.contains("not Ethernet") && err.contains("Fix: attach to an Ethernet"),
        "{err}"
    );
    let (ok, err) = run(&["--pod-ip", "198.51.100.7", "--port", "80"]);
    assert!(
        !ok && err.contains("no route to pod IP 198.51.100.7")
            && err.contains("Fix: run the agent in the node's network namespace"),
        "{err}"
    );
    let (ok, err) = run(&["--pod-ip", "127.0.0.1", "--port", "80"]);
    assert!(
        !ok && err.contains("an address of this host") && err.contains("Fix: attach with --iface"),
        "{err}"
    );
    // The mirror on a live port is refused only where its requests would be hooked: through lo
    // with lo hooked, not through lo with only srv0 hooked.
    let (ok, err) = run(&[
        "--iface",
        "lo",
        "--port",
        "8080",
        "--mirror",
        "http://127.0.0.1:8080",
    ]);
    assert!(
        !ok && err.contains("mirror them again") && err.contains("--addr"),
        "{err}"
    );
    let elsewhere = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            "http://127.0.0.1:8080",
        ],
    );
    let err = elsewhere.terminate();
    assert!(
        err.contains("no feedback loop") && err.contains("through lo"),
        "{err}"
    );

    let out = pair
        .server
        .exec(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            AGENT,
            "attach",
            "--iface",
            "srv0",
            "--port",
            "80",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("missing capabilities CAP_NET_ADMIN")
            && err.contains("Fix:")
            && err.contains("run it as root"),
        "{err}"
    );

    let first = Agent::start(&pair.server, &["--iface", "srv0", "--port", "8080"]);
    let (ok, err) = run(&["--iface", "srv0", "--port", "9090"]);
    assert!(
        !ok && err.contains("already mirrored by another mirror-agent")
            && err.contains("Fix: stop the other agent"),
        "{err}"
    );
    first.terminate();
}
