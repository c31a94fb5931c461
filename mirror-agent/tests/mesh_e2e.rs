//! A service mesh's data path, rebuilt with real pieces (root only): a pod namespace behind a
//! veth on a node namespace, where a TLS-terminating nginx "sidecar" takes the pod's port by an
//! iptables REDIRECT, as Istio's init container sets it up, and forwards the plaintext to the
//! app at POD_IP:8080 from 127.0.0.6, over the pod's `lo`. HTTPS clients (curl, Python) reach
//! the pod from the node. The wire on the host veth carries only TLS; the agent, attached
//! inside the pod, must mirror every plaintext request the app received, once, and nothing of
//! the TLS leg.

mod common;

use std::time::Duration;

use common::*;
use netlab::kubeapi::FakeApi;

const MIRROR: &str = "127.0.0.1:9095";
const METRICS: &str = "127.0.0.1:9467";

/// The application behind the sidecar.
enum App {
    Http(TestServer),
    Grpc(GrpcServer),
}

/// A meshed pod: its namespace, the app on POD_IP:8080 and the TLS sidecar in front of it.
struct MeshedPod {
    ns: Netns,
    app: App,
    _sidecar: Nginx,
    certs: Certs,
    ip: String,
}

impl MeshedPod {
    fn http(&self) -> &TestServer {
        match &self.app {
            App::Http(s) => s,
            App::Grpc(_) => panic!("a gRPC pod"),
        }
    }

    fn grpc(&self) -> &GrpcServer {
        match &self.app {
            App::Grpc(s) => s,
            App::Http(_) => panic!("an HTTP/1.1 pod"),
        }
    }
}

/// The sidecar's server block: TLS in, plaintext to the app from 127.0.0.6 over `lo`, HTTP/1.1
/// or, for gRPC, HTTP/2 by ALPN in and h2c out.
fn sidecar_server(certs: &Certs, ip: &str, grpc: bool) -> String {
    let (listen, forward) = if grpc {
        (
            "listen 15006 ssl http2;\n  client_max_body_size 0;",
            format!("grpc_pass grpc://{ip}:8080;\n   grpc_bind 127.0.0.6;"),
        )
    } else {
        (
            "listen 15006 ssl;",
            format!(
                "proxy_pass http://{ip}:8080;\n   proxy_bind 127.0.0.6;\n   \
                 proxy_http_version 1.1;\n   proxy_request_buffering off;"
            ),
        )
    };
    format!(
        "server {{\n  {listen}\n  ssl_certificate {};\n  ssl_certificate_key {};\n\
         location / {{\n   {forward}\n  }}\n }}",
        certs.path("server.pem"),
        certs.path("server.key")
    )
}

fn meshed_pod(node: &Netns, tag: &str, net: u8, grpc: bool) -> MeshedPod {
    let ns = Netns::new(&netlab::unique(tag));
    netlab::link(node, &format!("vm{net}"), &ns, "eth0", net);
    let ip = format!("10.{net}.0.2");
    let app = if grpc {
        App::Grpc(GrpcServer::start(&ns, &[format!("{ip}:8080")], &[]))
    } else {
        App::Http(TestServer::start(
            &ns,
            &[format!("{ip}:8080").parse().unwrap()],
        ))
    };
    let certs = Certs::make();
    let sidecar = Nginx::start(&ns, &sidecar_server(&certs, &ip, grpc));
    // Istio's capture: inbound traffic to the app's port goes to the proxy's inbound listener.
    netlab::sh(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
    let pod = MeshedPod {
        ns,
        app,
        _sidecar: sidecar,
        certs,
        ip,
    };
    assert!(
        netlab::wait_until(Duration::from_secs(10), || grpc
            || https_get(node, &pod, "/ping")),
        "the sidecar never answered HTTPS"
    );
    pod
}

fn https_get(node: &Netns, pod: &MeshedPod, path: &str) -> bool {
    node.exec(&[
        "curl",
        "-sSk",
        "--max-time",
        "3",
        "-o",
        "/dev/null",
        &format!("https://{}:8080{path}", pod.ip),
    ])
    .status()
    .is_ok_and(|s| s.success())
}

/// HTTPS from the node: curl (its own BIO; one connection per call) and Python's `ssl` (many
/// requests on one keep-alive connection), GETs and POSTs with bodies. Returns how many.
fn https_clients(node: &Netns, pod: &MeshedPod, tag: &str) -> usize {
    let base = format!("https://{}:8080", pod.ip);
    for i in 0..5 {
        curl(node, &["-k", &format!("{base}/{tag}/curl/get/{i}")]);
        curl(
            node,
            &[
                "-k",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &format!("{{\"order\":{i},\"items\":[\"a\",\"b\"]}}"),
                &format!("{base}/{tag}/curl/post/{i}"),
            ],
        );
    }
    let script = format!(
        r#"
import http.client, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
c = http.client.HTTPSConnection("{ip}", 8080, context=ctx, timeout=5)
for i in range(6):
    body = ("x" * (i * 3000)).encode()
    c.request("POST" if i % 2 else "GET", "/{tag}/python/%d" % i, body=body if i % 2 else None,
              headers={{"X-Client": "python"}})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
"#,
        ip = pod.ip
    );
    let out = node.exec(&["python3", "-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    10 + 6
}

/// Compares what the mirror received with what the app received after its first `probes`
/// requests (made before the agent attached).
fn assert_mirrored(
    app: &TestServer,
    probes: usize,
    mirror: &TestServer,
    sent: usize,
    stderr: &str,
) {
    assert_eq!(
        app.requests(),
        probes + sent,
        "the app received every request"
    );
    let mut want: Vec<Recorded> = app.log()[probes..].iter().map(normalised).collect();
    want.sort();
    let mut got: Vec<Recorded> = mirror.log().iter().map(normalised).collect();
    got.sort();
    assert_eq!(
        got.len(),
        want.len(),
        "the mirror got each plaintext request once\n{stderr}"
    );
    assert_same_requests(&got, &want);
}

#[test]
fn a_sidecar_pods_plaintext_is_mirrored_from_inside_the_pod() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("mnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let pod = meshed_pod(&node, "mpod", 241, false);
    let probes = pod.http().requests();
    let agent = Agent::start(
        &node,
        &[
            "--pod-ip",
            &pod.ip,
            "--in-pod",
            "--port",
            "8080",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--host",
            "keep",
        ],
    );
    assert!(
        agent.ready_line.contains("lo ingress"),
        "attached inside the pod: {}",
        agent.ready_line
    );
    let sent = https_clients(&node, &pod, "tls");
    netlab::wait_until(Duration::from_secs(20), || mirror.requests() >= sent);
    // Nothing more comes: no request twice, and no TLS record taken for one.
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop();
    assert_mirrored(pod.http(), probes, &mirror, sent, &exit.stderr);
    assert_eq!(
        exit.metric("mirror_requests_read_total", &[("read_at", "in_pod")]) as usize,
        sent
    );
    // The pod's mirror veth went with the agent; the app's namespace is as it was.
    let links = pod.ns.ip(&["-o", "link"]);
    assert!(!links.contains("mirr"), "left in the pod: {links}");
}

#[test]
fn grpc_over_tls_is_mirrored_from_the_sidecars_h2c_leg() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("mnode"));
    let mirror = GrpcServer::start(&node, &[MIRROR.to_string()], &[]);
    let pod = meshed_pod(&node, "mgrpc", 243, true);
    let agent = Agent::start(
        &node,
        &[
            "--pod-ip",
            &pod.ip,
            "--in-pod",
            "--port",
            "8080",
            "--mirror",
            &format!("http://{MIRROR}"),
        ],
    );
    let target = format!("{}:8080", pod.ip);
    let ca = pod.certs.path("ca.pem");
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
    assert_eq!(pod.grpc().calls().len(), sent.len(), "calls at the app");
    assert_calls_mirrored(&sent, &mirror);
    let exit = agent.stop();
    // Each call once: from the h2c leg on lo, none from the TLS leg on the host veth.
    assert_eq!(
        exit.metric("mirror_http_requests_total", &[]) as usize,
        sent.len(),
        "{}",
        exit.stderr
    );
    assert!(exit.metric("mirror_http_h2_connections_total", &[]) >= 1);
}

#[test]
fn meshed_pods_are_found_by_their_sidecar_and_attached_inside() {
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("mnode"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let api = FakeApi::start(&node, &[("app", "pay")], "node1");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let mut cmd = node.exec(&[
        AGENT,
        "attach",
        "--selector",
        "app=pay",
        "--node-name",
        "node1",
        "--port",
        "8080",
        "--mirror",
        &format!("http://{MIRROR}"),
        "--host",
        "keep",
        "--metrics",
        METRICS,
    ]);
    cmd.env("KUBECONFIG", &kubeconfig);
    let agent = Agent::spawn_command(cmd);

    let pod = meshed_pod(&node, "mpod", 242, false);
    let probes = pod.http().requests();
    api.containers(&["app", "istio-proxy"]);
    api.event("ADDED", "pay-v1", Some(&pod.ip), true);
    let mirrored = netlab::wait_until(Duration::from_secs(20), || {
        metric(&node, METRICS, "mirror_pods_mirrored", &[]) == Some(1.0)
    });
    if !mirrored {
        panic!("the meshed pod was never mirrored:\n{}", agent.terminate());
    }
    assert_eq!(
        metric(
            &node,
            METRICS,
            "mirror_pod",
            &[("read_at", "in_pod"), ("mesh", "istio_sidecar")]
        ),
        Some(1.0)
    );
    // A meshed pod whose namespace is nowhere on this node: counted, and the other stays.
    api.event("ADDED", "pay-astray", Some("10.242.0.77"), true);
    assert!(
        netlab::wait_until(Duration::from_secs(20), || metric(
            &node,
            METRICS,
            "mirror_pod_attach_failures_total",
            &[("reason", "netns_not_found")]
        ) == Some(1.0)),
        "the missing namespace was never counted"
    );
    let sent = https_clients(&node, &pod, "sel");
    netlab::wait_until(Duration::from_secs(20), || mirror.requests() >= sent);
    std::thread::sleep(Duration::from_millis(300));

    // The pod goes: its attachment and mirror veth go with it, while the agent runs.
    api.event("DELETED", "pay-v1", Some(&pod.ip), true);
    assert!(
        netlab::wait_until(Duration::from_secs(20), || !pod
            .ns
            .ip(&["-o", "link"])
            .contains("mirr")),
        "the pod's mirror veth outlived its pod"
    );
    let stderr = agent.terminate();
    assert!(
        stderr.contains("is in the Istio (sidecar) mesh"),
        "the log names the mesh:\n{stderr}"
    );
    assert!(
        stderr.contains("cannot mirror pod default/pay-astray (10.242.0.77): no network namespace"),
        "the log says why:\n{stderr}"
    );
    assert_mirrored(pod.http(), probes, &mirror, sent, &stderr);
}
