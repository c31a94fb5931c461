//! A local stand-in for the Kubernetes API's pods endpoint, for tests and the lab: no
//! kube-apiserver can run here. It speaks the list-and-watch protocol with real Pod JSON: a list
//! with a resource version, then a chunked watch stream of ADDED / MODIFIED / DELETED events,
//! bookmarks, a dropped connection, `410 Gone`, and `403 Forbidden` when told to.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::Netns;

/// What the fake API server streams on a watch.
enum WatchItem {
    Event(String),
    /// Close the watch connection, as a load balancer or an API server restart does.
    Drop,
}

#[derive(Default)]
struct ApiState {
    /// Labels every pod carries, as a JSON object's members.
    labels: String,
    /// Container names of the pods streamed from now on (default: one, `app`).
    containers: Vec<String>,
    node: String,
    /// Pods as JSON, returned by a list.
    pods: Vec<String>,
    resource_version: u64,
    watch_queue: Vec<WatchItem>,
    /// Lists answered 403 before the API lets the agent in.
    forbid_lists: usize,
    requests: Vec<String>,
}

/// A local API server for pods: list and watch, nothing else.
pub struct FakeApi {
    state: Arc<(Mutex<ApiState>, Condvar)>,
    stop: Arc<AtomicBool>,
    port: u16,
    lists: Arc<AtomicUsize>,
}

fn pod_json(s: &ApiState, name: &str, ip: Option<&str>, ready: bool) -> String {
    let ip = ip.map(|i| format!(r#""podIP":"{i}","#)).unwrap_or_default();
    let names = if s.containers.is_empty() {
        vec!["app".to_string()]
    } else {
        s.containers.clone()
    };
    let containers = names
        .iter()
        .map(|c| format!(r#"{{"name":"{c}","image":"{c}:1"}}"#))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"default","resourceVersion":"{rv}","labels":{{{labels}}}}},"spec":{{"nodeName":"{node}","containers":[{containers}]}},"status":{{{ip}"conditions":[{{"type":"Ready","status":"{ready}"}}]}}}}"#,
        rv = s.resource_version,
        labels = s.labels,
        node = s.node,
        ready = if ready { "True" } else { "False" }
    )
}

impl FakeApi {
    /// Serves pods on `node` carrying `labels`, from a thread inside `ns` (127.0.0.1, a free
    /// port).
    pub fn start(ns: &Netns, labels: &[(&str, &str)], node: &str) -> FakeApi {
        let state = ApiState {
            labels: labels
                .iter()
                .map(|(k, v)| format!(r#""{k}":"{v}""#))
                .collect::<Vec<_>>()
                .join(","),
            node: node.to_string(),
            ..ApiState::default()
        };
        let state = Arc::new((Mutex::new(state), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let lists = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let (st, sp, ls) = (Arc::clone(&state), Arc::clone(&stop), Arc::clone(&lists));
        std::thread::spawn(move || {
            crate::enter_netns(&path);
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

    /// Sets a pod in the list and streams its change (`ADDED`, `MODIFIED`, `DELETED`) to
    /// watchers.
    pub fn event(&self, kind: &str, name: &str, ip: Option<&str>, ready: bool) {
        self.with(|s| {
            s.resource_version += 1;
            let json = pod_json(s, name, ip, ready);
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

    /// The containers of the pods streamed from now on, e.g. an app and a mesh's sidecar.
    pub fn containers(&self, names: &[&str]) {
        self.with(|s| s.containers = names.iter().map(|n| n.to_string()).collect());
    }

    /// Streams a bookmark: a newer resource version and no change.
    pub fn bookmark(&self) {
        self.with(|s| {
            s.resource_version += 1;
            let rv = s.resource_version;
            s.watch_queue.push(WatchItem::Event(format!(
                r#"{{"type":"BOOKMARK","object":{{"apiVersion":"v1","kind":"Pod","metadata":{{"resourceVersion":"{rv}"}}}}}}"#
            )));
        });
    }

    /// Streams `410 Gone`: the watcher's version is too old, it must list again.
    pub fn gone(&self) {
        self.with(|s| {
            s.watch_queue.push(WatchItem::Event(
                r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#.into(),
            ))
        });
    }

    /// Closes the watch connection after what is queued.
    pub fn drop_watch(&self) {
        self.with(|s| s.watch_queue.push(WatchItem::Drop));
    }

    /// Answers the next `n` lists with `403 Forbidden`, as before RBAC is in place.
    pub fn forbid_lists(&self, n: usize) {
        self.with(|s| s.forbid_lists = n);
    }

    /// Lists answered so far.
    pub fn lists(&self) -> usize {
        self.lists.load(Ordering::Relaxed)
    }

    /// Every request target received, in order.
    pub fn requests(&self) -> Vec<String> {
        self.with(|s| s.requests.clone())
    }

    /// A kubeconfig for this server, written into `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
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
