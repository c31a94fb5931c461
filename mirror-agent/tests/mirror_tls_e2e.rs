//! Mirrors that speak TLS (root only): `--mirror https://…` to real TLS servers. nginx
//! (OpenSSL 3) that asks for a client certificate (mTLS) and forwards to a recording server, for
//! HTTP/1.1; a grpcio server over TLS, for gRPC by ALPN h2. Certificates come from a test CA.

mod common;

use std::time::Duration;

use common::*;

const MIRROR_TLS: &str = "127.0.0.1:9443";
const MIRROR_BEHIND: &str = "127.0.0.1:9097";

#[test]
fn http1_requests_reach_an_mtls_mirror_intact() {
    if not_root() {
        return;
    }
    let pair = Pair::new("mt", 238);
    let v4 = format!("{}:8080", pair.server_v4);
    let live = TestServer::start(&pair.server, &[v4.parse().unwrap()]);
    let behind = TestServer::start(&pair.server, &[MIRROR_BEHIND.parse().unwrap()]);
    let certs = Certs::make();
    let _mirror = Nginx::start(
        &pair.server,
        &format!(
            "server {{\n listen {MIRROR_TLS} ssl;\n ssl_certificate {};\n ssl_certificate_key {};\n\
             ssl_client_certificate {};\n ssl_verify_client on;\n\
             location / {{\n  proxy_pass http://{MIRROR_BEHIND};\n  proxy_set_header Host $http_host;\n\
             proxy_http_version 1.1;\n }}\n}}",
            certs.path("server.pem"),
            certs.path("server.key"),
            certs.path("ca.pem"),
        ),
    );
    let ca = certs.path("ca.pem");
    let (cert, key) = (certs.path("client.pem"), certs.path("client.key"));
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("https://{MIRROR_TLS}"),
            "--mirror-ca",
            &ca,
            "--mirror-cert",
            &cert,
            "--mirror-key",
            &key,
            "--host",
            "keep",
        ],
    );
    let base = format!("http://{v4}");
    for i in 0..8 {
        curl(&pair.client, &[&format!("{base}/books/{i}")]);
        curl(
            &pair.client,
            &[
                "--data-binary",
                &format!("{{\"review\":{i},\"text\":\"{}\"}}", "x".repeat(i * 5000)),
                &format!("{base}/books/{i}/reviews"),
            ],
        );
    }
    let sent = live.requests();
    assert_eq!(sent, 16);
    netlab::wait_until(Duration::from_secs(20), || behind.requests() >= sent);
    let exit = agent.stop();
    let mut want: Vec<Recorded> = live.log().iter().map(normalised).collect();
    want.sort();
    let mut got: Vec<Recorded> = behind.log().iter().map(normalised).collect();
    got.sort();
    assert_eq!(got.len(), sent, "at the mirror\n{}", exit.stderr);
    assert_same_requests(&got, &want);
    assert_eq!(
        exit.metric("mirror_replay_responses_total", &[]),
        sent as u64,
        "every request answered over TLS"
    );
}

#[test]
fn grpc_calls_reach_a_tls_mirror_by_alpn_h2_and_a_bad_certificate_is_named() {
    if not_root() {
        return;
    }
    let pair = Pair::new("mg", 239);
    let v4 = format!("{}:8080", pair.server_v4);
    let certs = Certs::make();
    let _live = GrpcServer::start(&pair.server, std::slice::from_ref(&v4), &[]);
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let mirror = GrpcServer::start(
        &pair.server,
        &[MIRROR_TLS.to_string()],
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    let ca = certs.path("ca.pem");
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("https://{MIRROR_TLS}"),
            "--mirror-ca",
            &ca,
        ],
    );
    let mut sent = grpc_client(&pair.client, &v4, 3, 20, &["unary"]);
    sent.extend(grpc_client(&pair.client, &v4, 4, 2, &["streams"]));
    assert_calls_mirrored(&sent, &mirror);
    drop(agent);

    // Without the CA, the mirror's certificate is refused: said at start, and counted.
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("https://{MIRROR_TLS}"),
        ],
    );
    let refused = grpc_client(&pair.client, &v4, 5, 3, &["unary"]);
    assert!(
        refused.iter().all(|c| c.code == "OK"),
        "live is not touched"
    );
    std::thread::sleep(Duration::from_millis(500));
    let exit = agent.stop();
    assert!(
        exit.stderr.contains("the TLS handshake failed") && exit.stderr.contains("--mirror-ca"),
        "{}",
        exit.stderr
    );
    assert_eq!(mirror.calls().len(), sent.len(), "nothing more reached it");
    // Each refused call failed at the handshake, or was held back while the mirror was failing.
    let errors = exit.metric("mirror_replay_errors_total", &[]);
    let held = exit.metric("mirror_replay_dropped_total", &[("reason", "backoff")]);
    assert!(errors >= 1, "{}", exit.stderr);
    assert_eq!(errors + held, refused.len() as u64, "{}", exit.stderr);
}
