//! Live latency as a client in a namespace sees it, and mirrors that misbehave: what the
//! replay tests measure a misbehaving mirror's cost with.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Best of seven medians, 100 ms apart: contention on this shared machine only ever adds
/// latency, and so does a vCPU that idles between request and answer (about 5 µs more per
/// round trip here, with or without the agent, for a while at a time).
pub fn best_median(ns: &Netns, to: SocketAddr, n: usize) -> Duration {
    (0..7)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            median(latencies(ns, to, n))
        })
        .min()
        .unwrap()
}

/// Times `n` sequential GETs on one keep-alive connection from inside `ns`.
pub fn latencies(ns: &Netns, to: SocketAddr, n: usize) -> Vec<Duration> {
    latencies_of(ns, to, vec!["/api/books/1".to_string(); n])
}

/// Times a GET of each target, in order, on one keep-alive connection from inside `ns`; each
/// response is read whole and checked.
pub fn latencies_of(ns: &Netns, to: SocketAddr, targets: Vec<String>) -> Vec<Duration> {
    let path = ns.path();
    std::thread::spawn(move || {
        netlab::enter_netns(&path);
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut out = Vec::with_capacity(targets.len());
        for target in &targets {
            let body = expected_body("GET", target, b"");
            let answer = expected_answer("GET", target, b"");
            let mut buf = vec![0u8; answer.len()];
            let t = Instant::now();
            s.write_all(format!("GET {target} HTTP/1.1\r\nHost: books\r\n\r\n").as_bytes())
                .unwrap();
            s.read_exact(&mut buf).unwrap();
            out.push(t.elapsed());
            assert_eq!(
                buf[answer.len() - body.len()..],
                body[..],
                "live answered {target}"
            );
        }
        out
    })
    .join()
    .unwrap()
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A mirror that accepts and resets every connection.
pub struct ResettingMirror {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ResettingMirror {
    pub fn start(ns: &Netns, addr: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, addr, s) = (ns.path(), addr.to_string(), Arc::clone(&stop));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netlab::enter_netns(&path);
            let l = TcpListener::bind(&addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        // SO_LINGER 0: close sends RST.
                        let lg = libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        };
                        unsafe {
                            libc::setsockopt(
                                std::os::fd::AsRawFd::as_raw_fd(&c),
                                libc::SOL_SOCKET,
                                libc::SO_LINGER,
                                (&lg as *const libc::linger).cast(),
                                std::mem::size_of::<libc::linger>() as u32,
                            )
                        };
                        std::thread::sleep(Duration::from_millis(5));
                        drop(c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        ResettingMirror {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ResettingMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn agent_rss_kb(agent: &Agent) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", agent.proc.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
