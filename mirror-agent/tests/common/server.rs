//! The test HTTP server: it records the exact bytes of every connection, and parses them back
//! into requests (`Recorded`) to compare with what the client sent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;

/// Bytes of one connection as the server saw them.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    pub received: Vec<u8>,
    pub sent: Vec<u8>,
}

/// A request as the test server parsed it; chunked bodies are decoded, and their framing kept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The size of each chunk of a chunked body, in order.
    pub chunks: Vec<usize>,
    /// The trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Status and delay for a request target.
pub type Behaviour = Arc<dyn Fn(&str) -> (u16, Duration) + Send + Sync>;

#[derive(Default)]
struct ServerState {
    behaviour: Option<Behaviour>,
    stop: AtomicBool,
    conns: Mutex<HashMap<SocketAddr, ConnRecord>>,
    log: Mutex<Vec<Recorded>>,
    requests: AtomicUsize,
    delay: Duration,
}

/// An HTTP/1.1 server inside a namespace. Answers every request with a body derived from the
/// request (so responses can be checked), after `delay`; honours keep-alive, pipelining,
/// chunked bodies and `Expect: 100-continue`; records each connection's bytes by peer address
/// and every request it parsed.
pub struct TestServer {
    state: Arc<ServerState>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(ns: &Netns, bind: &[SocketAddr]) -> TestServer {
        Self::start_with_delay(ns, bind, Duration::ZERO)
    }

    pub fn start_with_delay(ns: &Netns, bind: &[SocketAddr], delay: Duration) -> TestServer {
        Self::start_state(
            ns,
            bind,
            ServerState {
                delay,
                ..Default::default()
            },
        )
    }

    /// A server whose status and delay depend on the request target.
    pub fn start_with(ns: &Netns, bind: &[SocketAddr], behaviour: Behaviour) -> TestServer {
        Self::start_state(
            ns,
            bind,
            ServerState {
                behaviour: Some(behaviour),
                ..Default::default()
            },
        )
    }

    fn start_state(ns: &Netns, bind: &[SocketAddr], state: ServerState) -> TestServer {
        let state = Arc::new(state);
        let (ready_tx, ready_rx) = mpsc::channel();
        let nspath = ns.path();
        let bind = bind.to_vec();
        let st = Arc::clone(&state);
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
            while !st.stop.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in &listeners {
                    if let Ok((stream, peer)) = l.accept() {
                        idle = false;
                        stream.set_nonblocking(false).unwrap();
                        let st = Arc::clone(&st);
                        workers.push(std::thread::spawn(move || serve(stream, peer, &st)));
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
            state,
            thread: Some(thread),
        }
    }

    pub fn record(&self, peer: &SocketAddr) -> Option<ConnRecord> {
        self.state.conns.lock().unwrap().get(peer).cloned()
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
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

/// The whole answer the server sends to a request it answers with 200 (not HEAD).
pub fn expected_answer(method: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let body = expected_body(method, target, body);
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Test: 1\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Writes a 1 MiB body of varied bytes to `dir` and returns curl's `@file` argument for it.
pub fn big_upload(dir: &std::path::Path) -> String {
    let big = dir.join("big.bin");
    std::fs::write(
        &big,
        (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    format!("@{}", big.display())
}

/// `got` and `want`, sorted alike, are the same requests: method, target, headers, body, and
/// for chunked bodies the same chunks and trailers.
pub fn assert_same_requests(got: &[Recorded], want: &[Recorded]) {
    assert_eq!(got.len(), want.len(), "requests");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((&g.method, &g.target), (&w.method, &w.target));
        assert_eq!(g.headers, w.headers, "{} {}", g.method, g.target);
        assert!(
            g.body == w.body,
            "{} {}: body differs ({} vs {} bytes)",
            g.method,
            g.target,
            g.body.len(),
            w.body.len()
        );
        assert_eq!(
            (&g.chunks, &g.trailers),
            (&w.chunks, &w.trailers),
            "{} {}: chunked framing differs",
            g.method,
            g.target
        );
    }
}

pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn serve(stream: TcpStream, peer: SocketAddr, st: &ServerState) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let send = |w: &mut TcpStream, bytes: &[u8]| {
        let _ = w.write_all(bytes);
        st.conns
            .lock()
            .unwrap()
            .entry(peer)
            .or_default()
            .sent
            .extend_from_slice(bytes);
    };
    let recv = |bytes: &[u8]| {
        st.conns
            .lock()
            .unwrap()
            .entry(peer)
            .or_default()
            .received
            .extend_from_slice(bytes);
    };
    // One line, waiting out read timeouts; None at EOF, error or stop.
    let read_line = |reader: &mut BufReader<TcpStream>| -> Option<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return None,
                Ok(_) if line.ends_with(b"\n") => {
                    recv(&line);
                    return Some(line);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if st.stop.load(Ordering::Relaxed) {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
    };
    // Header or trailer fields up to the blank line.
    let read_fields = |reader: &mut BufReader<TcpStream>| -> Option<Vec<(String, String)>> {
        let mut fields = Vec::new();
        loop {
            let line = read_line(reader)?;
            if line == b"\r\n" {
                return Some(fields);
            }
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if let Some((k, v)) = line.split_once(':') {
                fields.push((k.to_string(), v.trim().to_string()));
            }
        }
    };
    let read_exact = |reader: &mut BufReader<TcpStream>, n: usize| -> Option<Vec<u8>> {
        let mut body = vec![0u8; n];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < n {
            if Instant::now() > deadline || st.stop.load(Ordering::Relaxed) {
                return None;
            }
            match reader.read(&mut body[got..]) {
                Ok(0) => return None,
                Ok(k) => {
                    recv(&body[got..got + k]);
                    got += k;
                }
                Err(_) => continue,
            }
        }
        Some(body)
    };
    loop {
        let Some(request_line) = read_line(&mut reader) else {
            return;
        };
        let text = String::from_utf8_lossy(&request_line).into_owned();
        let mut first = text.trim_end().split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("").to_string();
        let Some(headers) = read_fields(&mut reader) else {
            return;
        };
        let has = |name: &str, needle: &str| {
            headers.iter().any(|(k, v)| {
                k.eq_ignore_ascii_case(name) && v.to_ascii_lowercase().contains(needle)
            })
        };
        let chunked = has("transfer-encoding", "chunked");
        let close = has("connection", "close");
        if has("expect", "100-continue") {
            send(&mut writer, b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut chunks = Vec::new();
        let mut trailers = Vec::new();
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let Some(size_line) = read_line(&mut reader) else {
                    return;
                };
                let size_text = String::from_utf8_lossy(&size_line);
                let hex = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16).unwrap_or(0);
                if size == 0 {
                    let Some(fields) = read_fields(&mut reader) else {
                        return;
                    };
                    trailers = fields;
                    break body;
                }
                let Some(chunk) = read_exact(&mut reader, size) else {
                    return;
                };
                body.extend_from_slice(&chunk);
                chunks.push(size);
                let Some(_crlf) = read_line(&mut reader) else {
                    return;
                };
            }
        } else {
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0usize);
            let Some(body) = read_exact(&mut reader, len) else {
                return;
            };
            body
        };
        st.log.lock().unwrap().push(Recorded {
            method: method.clone(),
            target: target.clone(),
            headers,
            body: body.clone(),
            chunks,
            trailers,
        });
        // Counted on receipt: a client that has read the response sees the count.
        st.requests.fetch_add(1, Ordering::Relaxed);
        let (status, delay) = st
            .behaviour
            .as_ref()
            .map(|b| b(&target))
            .unwrap_or((200, st.delay));
        if !delay.is_zero() {
            std::thread::sleep(delay);
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
            format!("HTTP/1.1 {status} OK\r\nContent-Length: {clen}\r\nX-Test: 1\r\n\r\n")
                .into_bytes();
        resp.extend_from_slice(&resp_body);
        send(&mut writer, &resp);
        // A stopping server closes busy connections too, after the answer in progress.
        if close || st.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// A request as it should reach the mirror: no hop-by-hop headers, names compared without case,
/// the agent's documented rewrites applied. Content-Length is the sender's to set, but chunked
/// bodies must arrive in the same chunks, with the same trailers.
pub fn normalised(r: &Recorded) -> Recorded {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "connection" | "content-length" | "expect" | "authorization"
            )
        })
        .collect();
    headers.sort();
    let trailers = r
        .trailers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    Recorded {
        headers,
        trailers,
        ..r.clone()
    }
}
