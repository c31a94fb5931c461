//! Pods by label across a rollout (root only). No kube-apiserver can run here, so a local server
//! speaks the API's list-and-watch protocol with real Pod JSON: a list, then a watch stream of
//! ADDED / MODIFIED / DELETED events, a bookmark, a dropped watch connection that must be
//! resumed, a `410 Gone` that forces a relist, and `403 Forbidden` at first. The pods are real
//! network namespaces behind veths on a node namespace, as a CNI sets them up.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;

const MIRROR: &str = "127.0.0.1:9093";
const METRICS: &str = "127.0.0.1:9465";

/// What the fake API server streams on a watch.
enum WatchItem {
    Event(String),
    /// Close the watch connection, as a load balancer or an API server restart does.
    Drop,
}

#[derive(Default)]
struct ApiState {
    /// Pods as JSON, returned by a list.
    pods: Vec<String>,
    resource_version: u64,
    watch_queue: Vec<WatchItem>,
    /// Lists answered 403 before the API lets the agent in.
    forbid_lists: usize,
    requests: Vec<String>,
}

/// A local API server for pods: list and watch, nothing else.
struct FakeApi {
    state: Arc<(Mutex<ApiState>, Condvar)>,
    stop: Arc<AtomicBool>,
    port: u16,
    lists: Arc<AtomicUsize>,
}

fn pod_json(name: &str, ip: Option<&str>, ready: bool, rv: u64) -> String {
    let ip = ip.map(|i| format!(r#""podIP":"{i}","#)).unwrap_or_default();
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"default","resourceVersion":"{rv}","labels":{{"app":"books"}}}},"spec":{{"nodeName":"node1","containers":[{{"name":"books","image":"books:1"}}]}},"status":{{{ip}"conditions":[{{"type":"Ready","status":"{}"}}]}}}}"#,
        if ready { "True" } else { "False" }
    )
}

impl FakeApi {
    fn start(ns: &Netns) -> FakeApi {
        let state = Arc::new((Mutex::new(ApiState::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let lists = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let (st, sp, ls) = (Arc::clone(&state), Arc::clone(&stop), Arc::clone(&lists));
        std::thread::spawn(move || {
            netlab::enter_netns(&path);
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            while !sp.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (st, sp, ls) = (Arc::clone(&st), Arc::clone(&sp), Arc::clone(&ls));
                        std::thread::spawn(move || serve_api(s, &st, &sp, &ls));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        FakeApi {
            state,
            stop,
            port,
            lists,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ApiState) -> T) -> T {
        let (m, cv) = &*self.state;
        let out = f(&mut m.lock().unwrap());
        cv.notify_all();
        out
    }

    /// Sets a pod in the list and streams its change to watchers.
    fn event(&self, kind: &str, name: &str, ip: Option<&str>, ready: bool) {
        self.with(|s| {
            s.resource_version += 1;
            let json = pod_json(name, ip, ready, s.resource_version);
            let at = s
                .pods
                .iter()
                .position(|p| p.contains(&format!(r#""name":"{name}""#)));
            match (kind, at) {
                ("DELETED", Some(i)) => {
                    s.pods.remove(i);
                }
                (_, Some(i)) => s.pods[i] = json.clone(),
                (_, None) => s.pods.push(json.clone()),
            }
            s.watch_queue.push(WatchItem::Event(format!(
                r#"{{"type":"{kind}","object":{json}}}"#
            )));
        });
    }

    fn bookmark(&self) {
        self.with(|s| {
            s.resource_version += 1;
            let rv = s.resource_version;
            s.watch_queue.push(WatchItem::Event(format!(
                r#"{{"type":"BOOKMARK","object":{{"apiVersion":"v1","kind":"Pod","metadata":{{"resourceVersion":"{rv}"}}}}}}"#
            )));
        });
    }

    fn gone(&self) {
        self.with(|s| {
            s.watch_queue.push(WatchItem::Event(
                r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#.into(),
            ))
        });
    }

    fn drop_watch(&self) {
        self.with(|s| s.watch_queue.push(WatchItem::Drop));
    }

    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: agent\n  user:\n    token: test\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n",
                self.port
            ),
        )
        .unwrap();
        path
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
    }
}

fn serve_api(
    stream: TcpStream,
    state: &(Mutex<ApiState>, Condvar),
    stop: &AtomicBool,
    lists: &AtomicUsize,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let (m, cv) = state;
        m.lock().unwrap().requests.push(target.clone());
        if !target.starts_with("/api/v1/pods") {
            let _ = w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        if !target.contains("watch=true") {
            let mut s = m.lock().unwrap();
            if s.forbid_lists > 0 {
                s.forbid_lists -= 1;
                let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden: User \"system:serviceaccount:default:mirror-agent\" cannot list resource \"pods\"","reason":"Forbidden","code":403}"#;
                let _ = write!(
                    w,
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                continue;
            }
            lists.fetch_add(1, Ordering::Relaxed);
            // A list is a fresh start: what the queue held is in it already.
            s.watch_queue.clear();
            let body = format!(
                r#"{{"apiVersion":"v1","kind":"PodList","metadata":{{"resourceVersion":"{}"}},"items":[{}]}}"#,
                s.resource_version,
                s.pods.join(",")
            );
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        // A watch: stream events, one JSON object a line, until told to drop.
        if w
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            .is_err()
        {
            return;
        }
        loop {
            let item = {
                let mut s = m.lock().unwrap();
                while s.watch_queue.is_empty() && !stop.load(Ordering::Relaxed) {
                    s = cv.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                s.watch_queue.remove(0)
            };
            match item {
                WatchItem::Event(json) => {
                    let line = format!("{json}\n");
                    if write!(w, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                        return;
                    }
                }
                WatchItem::Drop => return,
            }
        }
    }
}

/// A pod: its own namespace behind a veth on the node, running a live server on 8080.
struct PodNs {
    _ns: Netns,
    _server: TestServer,
    ip: String,
}

fn pod(node: &Netns, tag: &str, net: u8) -> PodNs {
    let ns = Netns::new(&netlab::unique(tag));
    netlab::link(node, &format!("vp{net}"), &ns, "eth0", net);
    let ip = format!("10.{net}.0.2");
    let server = TestServer::start(&ns, &[format!("{ip}:8080").parse().unwrap()]);
    PodNs {
        _ns: ns,
        _server: server,
        ip,
    }
}

fn get(node: &Netns, ip: &str, path: &str) {
    curl(node, &[&format!("http://{ip}:8080{path}")]);
}

fn metric(node: &Netns, name: &str) -> Option<u64> {
    let out = node
        .exec(&[
            "curl",
            "-sS",
            "--max-time",
            "2",
            &format!("http://{METRICS}/metrics"),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_pods(node: &Netns, n: u64) {
    assert!(
        netlab::wait_until(Duration::from_secs(20), || metric(
            node,
            "mirror_pods_mirrored"
        ) == Some(n)),
        "mirrored pods never became {n} (now {:?})",
        metric(node, "mirror_pods_mirrored")
    );
}

#[test]
fn a_rollout_is_followed_by_label_without_a_restart() {
    require_root();
    let node = Netns::new(&netlab::unique("node"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let api = FakeApi::start(&node);
    // The agent starts before its RBAC is in place, and with no pod matching yet.
    api.with(|s| s.forbid_lists = 2);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let mut cmd = node.exec(&[
        AGENT,
        "attach",
        "--selector",
        "app=books",
        "--node-name",
        "node1",
        "--port",
        "8080",
        "--mirror",
        &format!("http://{MIRROR}"),
        "--metrics",
        METRICS,
    ]);
    cmd.env("KUBECONFIG", &kubeconfig);
    let agent = Agent::spawn_command(cmd);
    wait_pods(&node, 0);
    assert!(
        netlab::wait_until(Duration::from_secs(20), || api
            .lists
            .load(Ordering::Relaxed)
            >= 1),
        "the agent never listed pods after the API let it in"
    );

    // v1 becomes Ready.
    let v1 = pod(&node, "pv1", 246);
    api.event("ADDED", "books-v1", None, false);
    api.event("MODIFIED", "books-v1", Some(&v1.ip), true);
    wait_pods(&node, 1);
    for i in 0..10 {
        get(&node, &v1.ip, &format!("/v1/before/{i}"));
    }

    // The rollout: v2 starts on a new address while v1 still serves.
    let v2 = pod(&node, "pv2", 247);
    api.event("ADDED", "books-v2", Some(&v2.ip), false);
    api.bookmark();
    api.event("MODIFIED", "books-v2", Some(&v2.ip), true);
    // A pod the API places on this node but whose address has no local route: skipped.
    api.event("ADDED", "books-astray", Some("198.51.100.7"), true);
    wait_pods(&node, 2);
    for i in 0..10 {
        get(&node, &v1.ip, &format!("/v1/during/{i}"));
        get(&node, &v2.ip, &format!("/v2/during/{i}"));
    }

    // v1 terminates, then is deleted; its namespace still answers, but it is no longer ours.
    api.event("MODIFIED", "books-v1", Some(&v1.ip), false);
    api.event("DELETED", "books-v1", Some(&v1.ip), false);
    wait_pods(&node, 1);
    for i in 0..10 {
        get(&node, &v1.ip, &format!("/v1/after/{i}"));
        get(&node, &v2.ip, &format!("/v2/after/{i}"));
    }

    // The watch connection drops, and then the API says the agent's version is too old: the
    // watcher resumes, relists, and v2 stays mirrored throughout.
    let lists_before = api.lists.load(Ordering::Relaxed);
    api.drop_watch();
    api.gone();
    assert!(
        netlab::wait_until(Duration::from_secs(20), || api
            .lists
            .load(Ordering::Relaxed)
            > lists_before),
        "no relist after 410 Gone"
    );
    wait_pods(&node, 1);
    for i in 0..10 {
        get(&node, &v2.ip, &format!("/v2/relisted/{i}"));
    }

    let want = 10 + 20 + 10 + 10;
    netlab::wait_until(Duration::from_secs(10), || mirror.requests() >= want);
    std::thread::sleep(Duration::from_millis(300));
    let stderr = agent.terminate();
    let mut got: Vec<String> = mirror.log().into_iter().map(|r| r.target).collect();
    got.sort();
    let mut expected: Vec<String> = (0..10)
        .flat_map(|i| {
            [
                format!("/v1/before/{i}"),
                format!("/v1/during/{i}"),
                format!("/v2/during/{i}"),
                format!("/v2/after/{i}"),
                format!("/v2/relisted/{i}"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(got, expected, "agent:\n{stderr}");
    assert!(
        stderr.contains("ClusterRole"),
        "the 403 names the missing RBAC rule:\n{stderr}"
    );
    assert!(
        stderr.contains("cannot mirror pod default/books-astray")
            && stderr.contains("no route to pod IP 198.51.100.7"),
        "{stderr}"
    );
    let requests = api.with(|s| s.requests.clone());
    assert!(
        requests
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode1")
                && r.contains("labelSelector=app%3Dbooks")),
        "{requests:?}"
    );
}
