//! gRPC peers (tests/grpc_peer.py, grpcio) for the HTTP/2 tests: a server that logs every call
//! it gets, and a client that says what it sent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use super::*;

pub const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_peer.py");
/// Debian's interpreter, which python3-grpcio is installed for.
pub const PYTHON: &str = "/usr/bin/python3";

/// Metadata that transports add, which the mirror may see with other values.
pub const TRANSPORT_METADATA: &[&str] = &["user-agent", "grpc-accept-encoding", "grpc-timeout"];

/// One call as the client sent it or the mirror logged it.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Call {
    pub method: String,
    pub metadata: Vec<(String, String)>,
    pub messages: Vec<String>,
    #[serde(default)]
    pub code: String,
    /// When the mirror got each message (seconds since the epoch).
    #[serde(default)]
    pub arrivals: Vec<f64>,
}

impl Call {
    pub fn id(&self) -> String {
        self.metadata
            .iter()
            .find(|(k, _)| k == "x-request-id" || k == "x-call-id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
    /// Metadata the application set.
    pub fn app_metadata(&self) -> Vec<(String, String)> {
        self.metadata
            .iter()
            .filter(|(k, _)| !TRANSPORT_METADATA.contains(&k.as_str()))
            .cloned()
            .collect()
    }
}

/// A grpcio server in `ns`, logging calls to a file.
pub struct GrpcServer {
    _proc: Proc,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GrpcServer {
    pub fn start(ns: &Netns, bind: &[String], args: &[&str]) -> GrpcServer {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.jsonl");
        let mut cmd = ns.exec(&[PYTHON, PEER, "serve", "--log", log.to_str().unwrap()]);
        for b in bind {
            cmd.args(["--bind", b]);
        }
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut proc = Proc::spawn(&mut cmd);
        let out = proc.child.as_mut().unwrap().stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "serving", "the gRPC server did not start");
        GrpcServer {
            _proc: proc,
            log,
            _dir: dir,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Runs the grpcio client's scenarios against `target` from `ns`; returns the calls it made.
pub fn grpc_client(
    ns: &Netns,
    target: &str,
    seed: u32,
    calls: u32,
    scenarios: &[&str],
) -> Vec<Call> {
    grpc_client_with(ns, target, &[], seed, calls, scenarios)
}

/// As `grpc_client`, with more client options (`--tls-ca FILE`).
pub fn grpc_client_with(
    ns: &Netns,
    target: &str,
    options: &[&str],
    seed: u32,
    calls: u32,
    scenarios: &[&str],
) -> Vec<Call> {
    let mut cmd = ns.exec(&[PYTHON, PEER, "client", "--target", target]);
    cmd.args(options)
        .args(["--seed", &seed.to_string(), "--calls", &calls.to_string()])
        .args(scenarios);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_calls(&out.stdout)
}

pub fn parse_calls(out: &[u8]) -> Vec<Call> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn by_id(calls: &[Call]) -> HashMap<String, Call> {
    calls.iter().map(|c| (c.id(), c.clone())).collect()
}

/// Every call the client made reached the mirror once, with the same method, application
/// metadata and messages.
pub fn assert_calls_mirrored(sent: &[Call], mirror: &GrpcServer) {
    netlab::wait_until(Duration::from_secs(20), || {
        mirror.calls().len() >= sent.len()
    });
    let got = mirror.calls();
    assert_eq!(got.len(), sent.len(), "calls at the mirror");
    let got = by_id(&got);
    for s in sent {
        let g = got
            .get(&s.id())
            .unwrap_or_else(|| panic!("{} {} never reached the mirror", s.method, s.id()));
        assert_eq!(g.method, s.method);
        assert_eq!(g.app_metadata(), s.app_metadata(), "{}", s.id());
        assert!(
            g.messages == s.messages,
            "{} {}: {} messages ({} bytes) at the mirror, {} ({} bytes) sent",
            s.method,
            s.id(),
            g.messages.len(),
            g.messages.iter().map(|m| m.len() / 2).sum::<usize>(),
            s.messages.len(),
            s.messages.iter().map(|m| m.len() / 2).sum::<usize>()
        );
    }
}
