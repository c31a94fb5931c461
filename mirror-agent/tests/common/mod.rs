//! End-to-end test support: network namespaces, processes and an HTTP server that records the
//! exact bytes of every connection. Everything is torn down by Drop, also when a test fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use netlab::{sh, Netns, Pair, Proc};

pub const AGENT: &str = env!("CARGO_BIN_EXE_mirror-agent");

/// Fails loudly unless root: these tests are part of `cargo xtask test`, which runs as root.
pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (network namespaces, BPF): run `cargo xtask test` as root"
    );
}

/// A running agent and what it printed when ready.
pub struct Agent {
    pub proc: Proc,
    pub ready_line: String,
}

impl Agent {
    /// Starts `mirror-agent attach <args>` in `ns` and waits (bounded) for its ready line.
    pub fn start(ns: &Netns, args: &[&str]) -> Agent {
        let mut cmd = ns.exec(&[AGENT, "attach"]);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let mut proc = Proc { child: Some(child) };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("ready:") => Agent {
                proc,
                ready_line: line,
            },
            other => {
                let (_, err) = proc.wait_exit(Duration::from_secs(5));
                panic!("agent did not become ready: {other:?}\nstderr:\n{err}");
            }
        }
    }

    /// SIGTERM, then wait for a clean exit; returns stderr.
    pub fn terminate(mut self) -> String {
        self.proc.signal(libc::SIGTERM);
        let (code, err) = self.proc.wait_exit(Duration::from_secs(15));
        assert_eq!(code, Some(0), "agent exit code; stderr:\n{err}");
        err
    }
}

/// Bytes of one connection as the server saw them.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    pub received: Vec<u8>,
    pub sent: Vec<u8>,
}

/// An HTTP/1.1 server inside a namespace. Answers every request with a body derived from the
/// request (so responses can be checked), honours keep-alive and `Expect: 100-continue`, and
/// records each connection's bytes by peer address.
pub struct TestServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub conns: Arc<Mutex<HashMap<SocketAddr, ConnRecord>>>,
    pub requests: Arc<AtomicUsize>,
}

impl TestServer {
    pub fn start(ns: &Netns, bind: &[SocketAddr]) -> TestServer {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<SocketAddr, ConnRecord>>> = Default::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let nspath = ns.path();
        let bind = bind.to_vec();
        let (s, c, r) = (Arc::clone(&stop), Arc::clone(&conns), Arc::clone(&requests));
        let thread = std::thread::spawn(move || {
            netlab::enter_netns(&nspath);
            let listeners: Vec<TcpListener> = bind
                .iter()
                .map(|a| {
                    let l = TcpListener::bind(a).expect("bind test server");
                    l.set_nonblocking(true).unwrap();
                    l
                })
                .collect();
            ready_tx.send(()).unwrap();
            let mut workers = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in &listeners {
                    if let Ok((stream, peer)) = l.accept() {
                        idle = false;
                        stream.set_nonblocking(false).unwrap();
                        let (c, r, s) = (Arc::clone(&c), Arc::clone(&r), Arc::clone(&s));
                        workers.push(std::thread::spawn(move || serve(stream, peer, c, r, s)));
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("test server ready");
        TestServer {
            stop,
            thread: Some(thread),
            conns,
            requests,
        }
    }

    pub fn record(&self, peer: &SocketAddr) -> Option<ConnRecord> {
        self.conns.lock().unwrap().get(peer).cloned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The body the server sends for a request: deterministic, sized by `?size=N` for GETs.
pub fn expected_body(method: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let size = target
        .split_once("size=")
        .and_then(|(_, v)| v.split('&').next())
        .and_then(|v| v.parse::<usize>().ok());
    let mut out = format!("{method} {target} len={} sum={}\n", body.len(), fnv(body)).into_bytes();
    if let Some(n) = size {
        out.extend((0..n).map(|i| b'a' + (i % 26) as u8));
    }
    out
}

pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    conns: Arc<Mutex<HashMap<SocketAddr, ConnRecord>>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let send = |w: &mut TcpStream, bytes: &[u8]| {
        let _ = w.write_all(bytes);
        conns
            .lock()
            .unwrap()
            .entry(peer)
            .or_default()
            .sent
            .extend_from_slice(bytes);
    };
    let recv = |bytes: &[u8]| {
        conns
            .lock()
            .unwrap()
            .entry(peer)
            .or_default()
            .received
            .extend_from_slice(bytes);
    };
    loop {
        // Request head.
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    recv(&line);
                    head.extend_from_slice(&line);
                    if line == b"\r\n" {
                        break;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if !line.is_empty() {
                        recv(&line);
                        head.extend_from_slice(&line);
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("").to_string();
        let mut len = 0usize;
        let mut expect = false;
        let mut close = false;
        for h in lines {
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            expect |= lower.starts_with("expect:") && lower.contains("100-continue");
            close |= lower.starts_with("connection:") && lower.contains("close");
        }
        if expect {
            send(&mut writer, b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut body = vec![0u8; len];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < len && Instant::now() < deadline {
            match reader.read(&mut body[got..]) {
                Ok(0) => return,
                Ok(n) => {
                    recv(&body[got..got + n]);
                    got += n;
                }
                Err(_) => continue,
            }
        }
        let resp_body = if method == "HEAD" {
            Vec::new()
        } else {
            expected_body(&method, &target, &body)
        };
        let clen = if method == "HEAD" {
            expected_body("GET", &target, b"").len()
        } else {
            resp_body.len()
        };
        let mut resp =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {clen}\r\nX-Test: 1\r\n\r\n").into_bytes();
        resp.extend_from_slice(&resp_body);
        send(&mut writer, &resp);
        requests.fetch_add(1, Ordering::Relaxed);
        if close {
            return;
        }
    }
}

/// One record of an agent `--dump` file.
#[derive(Debug, Clone)]
pub struct DumpedFlow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes: Vec<u8>,
    pub gaps: usize,
}

pub fn parse_dump(data: &[u8]) -> Vec<DumpedFlow> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let nl = at
            + data[at..]
                .iter()
                .position(|b| *b == b'\n')
                .expect("header line");
        let header = std::str::from_utf8(&data[at..nl]).unwrap();
        at = nl + 1;
        if header.starts_with("=== dropped") {
            assert_eq!(header, "=== dropped bytes=0", "the dump dropped data");
            break;
        }
        let words: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(&words[..2], &["===", "flow"], "bad header {header}");
        let field = |k: &str| -> usize {
            words
                .iter()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        let len = field("bytes=");
        out.push(DumpedFlow {
            src: words[2].parse().unwrap(),
            dst: words[4].parse().unwrap(),
            bytes: data[at..at + len].to_vec(),
            gaps: field("gaps="),
        });
        at += len + 1;
    }
    out
}

/// Runs curl in the client namespace; returns (body, local address) of the connection.
pub fn curl(ns: &Netns, args: &[&str]) -> (Vec<u8>, Vec<SocketAddr>) {
    let mut cmd = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{local_ip} %{local_port}",
    ]);
    cmd.args(args);
    let out = cmd.output().expect("curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = out.stdout;
    let split = stdout.iter().rposition(|b| *b == b'\n').unwrap();
    let tail = String::from_utf8_lossy(&stdout[split + 1..]).into_owned();
    let mut parts = tail.split_whitespace();
    let ip: std::net::IpAddr = parts.next().unwrap().parse().unwrap();
    let port: u16 = parts.next().unwrap().parse().unwrap();
    (stdout[..split].to_vec(), vec![SocketAddr::new(ip, port)])
}

/// Ids of loaded BPF programs with this name (system-wide).
pub fn loaded_program_ids(name: &str) -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| p.name_as_str() == Some(name))
        .map(|p| p.id())
        .collect()
}
