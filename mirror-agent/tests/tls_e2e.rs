//! Services that terminate TLS themselves (root only): the wire carries only TLS records, and
//! the agent reads the plaintext from uprobes on the OpenSSL `libssl.so.3` the process maps.
//! Real servers (Debian's nginx, Python's `ssl` module, both on OpenSSL 3) in a pod namespace
//! behind a veth, real clients (curl, Python, grpcio) on the node; the agent runs on the node
//! and finds the processes by the pod's address (`--pod-ip`) or by pid (`--tls-pid`).

mod common;

use std::time::Duration;

use common::*;

const MIRROR: &str = "127.0.0.1:9096";

/// A pod namespace linked to `node`, with its address.
fn pod(node: &Netns, tag: &str, net: u8) -> (Netns, String) {
    let ns = Netns::new(&netlab::unique(tag));
    netlab::link(node, &format!("vt{net}"), &ns, "eth0", net);
    (ns, format!("10.{net}.0.2"))
}

/// nginx terminating TLS on `ip:8443` (HTTP/1.1, and HTTP/2 by ALPN) in front of `upstream`.
fn tls_nginx(ns: &Netns, certs: &Certs, ip: &str, location: &str) -> Nginx {
    let nginx = Nginx::start(
        ns,
        &format!(
            "server {{\n  listen {ip}:8443 ssl http2;\n  client_max_body_size 0;\n  \
             ssl_certificate {};\n  ssl_certificate_key {};\n  location / {{\n   {location}\n  }}\n }}",
            certs.path("server.pem"),
            certs.path("server.key")
        ),
    );
    let up = netlab::wait_until(Duration::from_secs(10), || {
        ns.exec(&[
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            &format!("https://{ip}:8443/"),
        ])
        .status()
        .is_ok_and(|s| s.success())
    });
    assert!(up, "nginx never answered HTTPS");
    nginx
}

/// HTTPS from the node: curl (one connection per call, HTTP/1.1; a 1 MiB upload) and Python's
/// `http.client` (one keep-alive connection, bodies up to 45 KB, more than one TLS record).
/// Returns how many requests.
fn https_clients(node: &Netns, base: &str, dir: &std::path::Path) -> usize {
    for i in 0..4 {
        curl(
            node,
            &["-k", "--http1.1", &format!("{base}/curl/get/{i}?q={i}")],
        );
        curl(
            node,
            &[
                "-k",
                "--http1.1",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &format!("{{\"order\":{i},\"items\":[\"a\",\"b\"]}}"),
                &format!("{base}/curl/post/{i}"),
            ],
        );
    }
    curl(
        node,
        &[
            "-k",
            "--http1.1",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &big_upload(dir),
            &format!("{base}/curl/upload"),
        ],
    );
    let script = format!(
        r#"
import http.client, ssl, urllib.parse
u = urllib.parse.urlparse("{base}")
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
c = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=5)
for i in range(8):
    body = bytes((i * 7 + j) % 251 for j in range(i * 6500))
    c.request("PUT" if i % 2 else "GET", "/python/%d" % i, body=body if i % 2 else None,
              headers={{"X-Client": "python", "X-Seq": str(i)}})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
"#
    );
    let out = node.exec(&["python3", "-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    9 + 8
}

#[test]
fn nginx_terminating_tls_is_mirrored_from_its_libssl() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let (ns, ip) = pod(&node, "tpod", 231);
    let app = TestServer::start(&ns, &["127.0.0.1:8080".parse().unwrap()]);
    let certs = Certs::make();
    let _nginx = tls_nginx(
        &ns,
        &certs,
        &ip,
        "proxy_pass http://127.0.0.1:8080;\n   proxy_http_version 1.1;\n   \
         proxy_set_header Host $http_host;\n   proxy_set_header Connection \"\";\n   \
         proxy_request_buffering off;",
    );
    let probes = app.requests();
    let agent = Agent::start(
        &node,
        &[
            "--pod-ip",
            &ip,
            "--tls-port",
            "8443",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--host",
            "keep",
        ],
    );
    assert!(
        agent
            .ready_line
            .contains("TLS plaintext on ports [8443] from 2 processes (1 libraries)"),
        "nginx's master and worker, one libssl: {}",
        agent.ready_line
    );
    let dir = tempfile::tempdir().unwrap();
    let sent = https_clients(&node, &format!("https://{ip}:8443"), dir.path());
    netlab::wait_until(Duration::from_secs(20), || mirror.requests() >= sent);
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    assert_eq!(app.requests(), probes + sent);
    let mut want: Vec<Recorded> = app.log()[probes..].iter().map(normalised).collect();
    want.sort();
    let mut got: Vec<Recorded> = mirror.log().iter().map(normalised).collect();
    got.sort();
    assert_eq!(
        got.len(),
        want.len(),
        "each request mirrored once\n{}",
        exit.stderr
    );
    assert_same_requests(&got, &want);
    // Live statuses come from the responses nginx wrote through SSL_write.
    assert_eq!(
        exit.metric(
            "mirror_requests_total",
            &[("version", "live"), ("code", "200")]
        ) as usize,
        sent,
        "{}",
        exit.metrics
    );
    let calls = exit.metric("mirror_tls_kernel_events_total", &[("outcome", "calls")]);
    assert!(
        calls >= 2 * sent as u64,
        "a read and a write per request at least: {calls}"
    );
    for lost in ["no_socket", "unknown_socket", "ring_full", "read_failed"] {
        assert_eq!(
            exit.metric("mirror_tls_kernel_events_total", &[("outcome", lost)]),
            0,
            "{lost}"
        );
    }
    assert_eq!(
        exit.metric("mirror_tls_connections_total", &[]),
        4 + 4 + 1 + 1
    );
    assert_eq!(
        exit.metric("mirror_requests_read_total", &[("read_at", "tls_library")]) as usize,
        sent
    );
    assert_eq!(
        exit.metric("mirror_requests_read_total", &[("read_at", "wire")]),
        0
    );
}

#[test]
fn grpc_over_tls_is_mirrored_from_nginx_http2() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = GrpcServer::start(&node, &[MIRROR.to_string()], &[]);
    let (ns, ip) = pod(&node, "tgrpc", 232);
    let app = GrpcServer::start(&ns, &["127.0.0.1:8080".to_string()], &[]);
    let certs = Certs::make();
    let _nginx = tls_nginx(&ns, &certs, &ip, "grpc_pass grpc://127.0.0.1:8080;");
    let agent = Agent::start(
        &node,
        &[
            "--pod-ip",
            &ip,
            "--tls-port",
            "8443",
            "--mirror",
            &format!("http://{MIRROR}"),
        ],
    );
    let target = format!("{ip}:8443");
    let ca = certs.path("ca.pem");
    let tls = ["--tls-ca", &ca, "--tls-name", "pod"];
    let mut sent = grpc_client_with(&node, &target, &tls, 1, 20, &["unary", "methods"]);
    sent.extend(grpc_client_with(
        &node,
        &target,
        &tls,
        2,
        4,
        &["streams", "big"],
    ));
    let failed: Vec<_> = sent.iter().filter(|c| c.code != "OK").collect();
    assert!(failed.is_empty(), "the live calls succeed: {failed:?}");
    assert_eq!(app.calls().len(), sent.len(), "calls at the app");
    assert_calls_mirrored(&sent, &mirror);
    let before = mirror.calls().len();

    // h2load over TLS (nghttp2 on OpenSSL, ALPN h2): 200 calls on 2 connections, 20 at once.
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut msg = vec![0u8];
    msg.extend((payload.len() as u32).to_be_bytes());
    msg.extend(&payload);
    let file = dir.path().join("msg.bin");
    std::fs::write(&file, &msg).unwrap();
    let h2load = node
        .exec(&[
            "h2load",
            "-n",
            "200",
            "-c",
            "2",
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
            &format!("https://{target}/test.Echo/UnaryLoad"),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&h2load.stdout);
    assert!(
        report.contains("200 succeeded") && report.contains("h2"),
        "h2load:\n{report}\n{}",
        String::from_utf8_lossy(&h2load.stderr)
    );
    netlab::wait_until(Duration::from_secs(20), || {
        mirror.calls().len() >= before + 200
    });
    let loads: Vec<Call> = mirror
        .calls()
        .into_iter()
        .filter(|c| c.method == "/test.Echo/UnaryLoad")
        .collect();
    assert_eq!(loads.len(), 200, "h2load's calls at the mirror");
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    for c in &loads {
        assert_eq!(c.messages, std::slice::from_ref(&hex));
        assert_eq!(c.id(), "h2load");
    }
    let exit = agent.stop();
    assert_eq!(
        exit.metric("mirror_http_requests_total", &[]) as usize,
        sent.len() + 200,
        "{}",
        exit.stderr
    );
    assert!(exit.metric("mirror_http_h2_connections_total", &[]) >= 3);
}

/// asyncio's TLS runs OpenSSL on memory BIOs: SSL_read and SSL_write make no socket call, so
/// no connection can be named. Nothing is mirrored, nothing is guessed, and each call is
/// counted as `no_socket`.
#[test]
fn a_memory_bio_server_is_counted_not_guessed() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let (ns, ip) = pod(&node, "tbio", 234);
    let certs = Certs::make();
    let server = format!(
        r#"
import asyncio, ssl
async def serve(r, w):
    while True:
        head = await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
        await w.drain()
async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain("{cert}", "{key}")
    s = await asyncio.start_server(serve, "{ip}", 8443, ssl=ctx)
    async with s:
        await s.serve_forever()
asyncio.run(main())
"#,
        cert = certs.path("server.pem"),
        key = certs.path("server.key"),
    );
    let app = Proc::spawn(&mut ns.exec(&["python3", "-u", "-c", &server]));
    let base = format!("https://{ip}:8443");
    assert!(
        netlab::wait_until(Duration::from_secs(10), || ns
            .exec(&["curl", "-sk", "-o", "/dev/null", &format!("{base}/")])
            .status()
            .is_ok_and(|s| s.success())),
        "the asyncio server never answered"
    );
    let pid = app.pid().to_string();
    let agent = Agent::start(
        &node,
        &[
            "--tls-pid",
            &pid,
            "--tls-port",
            "8443",
            "--mirror",
            &format!("http://{MIRROR}"),
        ],
    );
    for i in 0..5 {
        let (body, _) = curl(&node, &["-k", &format!("{base}/bio/{i}")]);
        assert_eq!(body, b"ok\n");
    }
    std::thread::sleep(Duration::from_millis(500));
    let exit = agent.stop();
    assert_eq!(mirror.requests(), 0, "nothing guessed");
    let no_socket = exit.metric(
        "mirror_tls_kernel_events_total",
        &[("outcome", "no_socket")],
    );
    assert!(
        no_socket >= 10,
        "each read and write counted: {no_socket}\n{}",
        exit.metrics
    );
    assert_eq!(exit.metric("mirror_tls_connections_total", &[]), 0);
}

/// Python's `ssl` module reads with `SSL_read_ex` and writes with `SSL_write_ex`; the app is
/// the HTTPS server itself, found by pid.
#[test]
fn a_python_https_server_is_mirrored_by_pid() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let (ns, ip) = pod(&node, "tpy", 233);
    let certs = Certs::make();
    let app = python_https_server(&ns, &ip, &certs, None);
    let base = format!("https://{ip}:8443");
    let pid = app.pid().to_string();
    let rec = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &node,
        &[
            "--tls-pid",
            &pid,
            "--tls-port",
            "8443",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--host",
            "keep",
            "--record",
            rec.path().to_str().unwrap(),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let sent = https_clients(&node, &base, dir.path());
    netlab::wait_until(Duration::from_secs(20), || mirror.requests() >= sent);
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    let log = mirror.log();
    assert_eq!(
        log.len(),
        sent,
        "each request mirrored once\n{}",
        exit.stderr
    );
    // What the clients sent, as the mirror received it.
    let mut want: Vec<(String, String, usize)> = (0..4)
        .flat_map(|i| {
            let post = format!("{{\"order\":{i},\"items\":[\"a\",\"b\"]}}");
            [
                ("GET".into(), format!("/curl/get/{i}?q={i}"), 0),
                ("POST".into(), format!("/curl/post/{i}"), post.len()),
            ]
        })
        .chain([("POST".into(), "/curl/upload".into(), 1 << 20)])
        .chain((0..8).map(|i| {
            let m = if i % 2 == 1 { "PUT" } else { "GET" };
            (
                m.into(),
                format!("/python/{i}"),
                if i % 2 == 1 { i * 6500 } else { 0 },
            )
        }))
        .collect();
    want.sort();
    let mut got: Vec<(String, String, usize)> = log
        .iter()
        .map(|r| (r.method.clone(), r.target.clone(), r.body.len()))
        .collect();
    got.sort();
    assert_eq!(got, want);
    let python: Vec<_> = log
        .iter()
        .filter(|r| r.target.starts_with("/python/"))
        .collect();
    for r in &python {
        let i: usize = r.target.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(r.header("x-seq"), Some(i.to_string().as_str()));
        let body: Vec<u8> = (0..r.body.len())
            .map(|j| ((i * 7 + j) % 251) as u8)
            .collect();
        assert!(r.body == body, "/python/{i}: the body's bytes");
    }
    let upload = log.iter().find(|r| r.target == "/curl/upload").unwrap();
    assert_eq!(
        fnv(&upload.body),
        fnv(&(0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>()),
        "the 1 MiB upload"
    );
    assert!(
        exit.metric(
            "mirror_requests_total",
            &[("version", "live"), ("code", "200")]
        ) as usize
            >= sent
    );
    // The recording says where each request was read; its HAR, that it was sent over HTTPS.
    let har_path = rec.path().join("out.har");
    let out = std::process::Command::new(AGENT)
        .args(["export", rec.path().to_str().unwrap(), "--har"])
        .arg(&har_path)
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
    assert_eq!(entries.len(), sent);
    for e in entries {
        assert_eq!(e["_readAt"], "tls_library", "{e}");
        let url = e["request"]["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("https://{ip}:8443/")), "{url}");
    }
}

/// `--selector` with `--tls-port`: the pods the watch finds have their processes' TLS read, and
/// a pod that goes stops being read.
#[test]
fn selected_pods_have_their_tls_read_while_they_live() {
    if not_root() {
        return;
    }
    const METRICS: &str = "127.0.0.1:9469";
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let api = netlab::kubeapi::FakeApi::start(&node, &[("app", "pay")], "node1");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let (ns, ip) = pod(&node, "tsel", 235);
    let app = TestServer::start(&ns, &["127.0.0.1:8080".parse().unwrap()]);
    let certs = Certs::make();
    let _nginx = tls_nginx(
        &ns,
        &certs,
        &ip,
        "proxy_pass http://127.0.0.1:8080;\n   proxy_http_version 1.1;\n   \
         proxy_set_header Host $http_host;\n   proxy_set_header Connection \"\";",
    );
    let probes = app.requests();
    let mut cmd = node.exec(&[
        AGENT,
        "attach",
        "--selector",
        "app=pay",
        "--node-name",
        "node1",
        "--tls-port",
        "8443",
        "--mirror",
        &format!("http://{MIRROR}"),
        "--host",
        "keep",
        "--metrics",
        METRICS,
    ]);
    cmd.env("KUBECONFIG", &kubeconfig);
    let agent = Agent::spawn_command(cmd);
    api.event("ADDED", "pay-v1", Some(&ip), true);
    let reading = netlab::wait_until(Duration::from_secs(20), || {
        metric(&node, METRICS, "mirror_tls_processes", &[]) == Some(2.0)
    });
    if !reading {
        panic!("the pod's nginx was never read:\n{}", agent.terminate());
    }
    let sent = https_clients(&node, &format!("https://{ip}:8443"), dir.path());
    netlab::wait_until(Duration::from_secs(20), || mirror.requests() >= sent);
    std::thread::sleep(Duration::from_millis(300));
    let mut want: Vec<Recorded> = app.log()[probes..].iter().map(normalised).collect();
    want.sort();
    let mut got: Vec<Recorded> = mirror.log().iter().map(normalised).collect();
    got.sort();
    assert_eq!(got.len(), sent, "each request mirrored once");
    assert_same_requests(&got, &want);

    let report = report(&node, METRICS).expect("/report");
    assert_eq!(
        report.requests_read_at.get("tls_library"),
        Some(&(sent as u64))
    );
    api.event("DELETED", "pay-v1", Some(&ip), true);
    let forgotten = netlab::wait_until(Duration::from_secs(20), || {
        metric(&node, METRICS, "mirror_tls_processes", &[]) == Some(0.0)
    });
    let stderr = agent.terminate();
    assert!(
        forgotten,
        "the gone pod's processes are still read:\n{stderr}"
    );
}

/// Python's `http.server` over `ssl` on `ip:8443` in `ns`, answering each request with its
/// method, target and body length; `libs`: a directory searched first for the libraries
/// (`LD_LIBRARY_PATH`). Returns once it answers HTTPS.
fn python_https_server(ns: &Netns, ip: &str, certs: &Certs, libs: Option<&str>) -> Proc {
    let server = format!(
        r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_one(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        out = b"%s %s %d\n" % (self.command.encode(), self.path.encode(), len(body))
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = handle_one
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("{ip}", 8443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{cert}", "{key}")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#,
        cert = certs.path("server.pem"),
        key = certs.path("server.key"),
    );
    let mut cmd = ns.exec(&["python3", "-u", "-c", &server]);
    if let Some(dir) = libs {
        cmd.env("LD_LIBRARY_PATH", dir);
    }
    let app = Proc::spawn(&mut cmd);
    assert!(
        netlab::wait_until(Duration::from_secs(10), || ns
            .exec(&[
                "curl",
                "-sk",
                "-o",
                "/dev/null",
                &format!("https://{ip}:8443/")
            ])
            .status()
            .is_ok_and(|s| s.success())),
        "the Python server never answered"
    );
    app
}

/// Bad libraries: a server whose libssl was replaced on disk while it ran (a package upgrade)
/// is still read, through the inode it maps; a process mapping a "libssl" without the TLS
/// functions is refused, logged and counted, and the other stays mirrored.
#[test]
fn an_upgraded_libssl_is_read_and_a_bogus_one_refused() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let (ns, ip) = pod(&node, "tupg", 236);
    let certs = Certs::make();
    let libs = tempfile::tempdir().unwrap();
    let lib = libs.path().join("libssl.so.3");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &lib).unwrap();
    let app = python_https_server(&ns, &ip, &certs, libs.path().to_str());
    // The upgrade: a new file renamed over the one the server runs.
    let next = libs.path().join("libssl.so.3.new");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &next).unwrap();
    std::fs::rename(&next, &lib).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", app.pid())).unwrap();
    assert!(maps.contains("libssl.so.3 (deleted)"), "{maps}");
    // A file named like libssl that is not OpenSSL (zlib), loaded by another process.
    let bogus = libs.path().join("libssl.so.9");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libz.so.1", &bogus).unwrap();
    let mut cmd = ns.exec(&[
        "python3",
        "-c",
        &format!(
            "import ctypes, time; ctypes.CDLL({:?}); time.sleep(60)",
            bogus.display().to_string()
        ),
    ]);
    let other = Proc::spawn(&mut cmd);
    assert!(netlab::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{}/maps", other.pid()))
            .is_ok_and(|m| m.contains("libssl.so.9"))
    }));
    let pids = format!("{},{}", app.pid(), other.pid());
    let agent = Agent::start(
        &node,
        &[
            "--tls-pid",
            &pids,
            "--tls-port",
            "8443",
            "--mirror",
            &format!("http://{MIRROR}"),
        ],
    );
    for i in 0..4 {
        curl(&node, &["-k", &format!("https://{ip}:8443/upgraded/{i}")]);
    }
    netlab::wait_until(Duration::from_secs(10), || mirror.requests() >= 4);
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    let mut got: Vec<String> = mirror.log().into_iter().map(|r| r.target).collect();
    got.sort();
    assert_eq!(
        got,
        (0..4).map(|i| format!("/upgraded/{i}")).collect::<Vec<_>>(),
        "{}",
        exit.stderr
    );
    assert_eq!(exit.metric("mirror_tls_libraries", &[]), 1);
    assert_eq!(exit.metric("mirror_tls_libraries_refused", &[]), 1);
    assert!(
        exit.stderr.contains("libssl.so.9")
            && exit.stderr.contains("that process's TLS is not mirrored"),
        "the log names the refused file:\n{}",
        exit.stderr
    );
}

/// A server killed in the middle of a request: its half request is never mirrored, the agent
/// lets the process go, and another server read by the same agent stays mirrored.
#[test]
fn a_server_killed_mid_request_leaves_nothing_half_mirrored() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("tnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let (ns, ip) = pod(&node, "tkill", 237);
    let certs = Certs::make();
    let mut doomed = python_https_server(&ns, &ip, &certs, None);
    let app = TestServer::start(&ns, &["127.0.0.1:8080".parse().unwrap()]);
    let _nginx = Nginx::start(
        &ns,
        &format!(
            "server {{\n listen {ip}:9443 ssl;\n ssl_certificate {};\n ssl_certificate_key {};\n \
             location / {{ proxy_pass http://127.0.0.1:8080; proxy_http_version 1.1;\n \
             proxy_set_header Host $http_host; proxy_set_header Connection \"\"; }}\n}}",
            certs.path("server.pem"),
            certs.path("server.key")
        ),
    );
    let agent = Agent::start(
        &node,
        &[
            "--pod-ip",
            &ip,
            "--tls-port",
            "8443,9443",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--host",
            "keep",
        ],
    );
    // Half a request: the head and 1,000 of the 100,000 bytes it announces, then the kill.
    let script = format!(
        r#"
import socket, ssl, time
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("{ip}", 8443)), server_hostname="pod")
s.sendall(b"POST /half HTTP/1.1\r\nHost: pod\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
time.sleep(3)
"#
    );
    let mut client = Proc::spawn(&mut node.exec(&["python3", "-c", &script]));
    std::thread::sleep(Duration::from_millis(800));
    doomed.signal(libc::SIGKILL);
    let _ = doomed.wait_exit(Duration::from_secs(5));
    let _ = client.wait_exit(Duration::from_secs(5));
    // The other server, after the kill and after the agent's next look for processes.
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        curl(&node, &["-k", &format!("https://{ip}:9443/after/{i}")]);
    }
    netlab::wait_until(Duration::from_secs(10), || mirror.requests() >= 3);
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    let mut got: Vec<String> = mirror.log().into_iter().map(|r| r.target).collect();
    got.sort();
    assert_eq!(got, ["/after/0", "/after/1", "/after/2"], "{}", exit.stderr);
    assert_eq!(app.requests(), 3);
    // nginx's master and worker are still read; the killed server is not.
    assert_eq!(
        exit.metric("mirror_tls_processes", &[]),
        2,
        "{}",
        exit.stderr
    );
}
