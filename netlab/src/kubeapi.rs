//! A local stand-in for the Kubernetes API, for tests and the lab: no kube-apiserver can run
//! here. It speaks the list-and-watch protocol with real JSON for two resources, Pods and
//! TrafficMirrors (`mirror-agent.dev/v1alpha1`): lists filtered by namespace, label selector and
//! node, each with a resource version, then chunked watch streams of ADDED / MODIFIED / DELETED
//! events after that version, one per watcher; bookmarks, a dropped connection, `410 Gone` and
//! `403 Forbidden` when told to. Status patches (server-side apply) are recorded with their field
//! manager, for the test to check.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::Netns;

const GROUP: &str = "mirror-agent.dev/v1alpha1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Pod,
    TrafficMirror,
}

impl Resource {
    /// The resource a request path names, and the namespace it is scoped to.
    fn of(path: &str) -> Option<(Resource, Option<String>)> {
        let (base, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
            (Resource::Pod, r)
        } else {
            (
                Resource::TrafficMirror,
                path.strip_prefix(&format!("/apis/{GROUP}/"))?,
            )
        };
        let plural = match base {
            Resource::Pod => "pods",
            Resource::TrafficMirror => "trafficmirrors",
        };
        if rest == plural {
            return Some((base, None));
        }
        let rest = rest.strip_prefix("namespaces/")?;
        let (ns, tail) = rest.split_once('/')?;
        (tail == plural).then(|| (base, Some(ns.to_string())))
    }
}

/// An entry of the event log that watches stream from.
enum Entry {
    Event {
        resource: Resource,
        rv: u64,
        kind: String,
        object: Value,
    },
    Bookmark(u64),
    /// `410 Gone`, to the first watcher of the resource that reaches it.
    Gone {
        resource: Resource,
        rv: u64,
        taken: bool,
    },
    /// Close the watch connections that reach it, as a load balancer or an API server restart.
    Drop(u64),
}

impl Entry {
    fn rv(&self) -> u64 {
        match self {
            Entry::Event { rv, .. } | Entry::Bookmark(rv) | Entry::Drop(rv) => *rv,
            Entry::Gone { rv, .. } => *rv,
        }
    }
}

#[derive(Default)]
struct ApiState {
    /// Labels every pod carries unless given its own.
    labels: Vec<(String, String)>,
    /// Container names of the pods streamed from now on (default: one, `app`).
    containers: Vec<String>,
    node: String,
    objects: Vec<(Resource, Value)>,
    resource_version: u64,
    log: Vec<Entry>,
    /// Lists answered 403 before the API lets the agent in.
    forbid_lists: usize,
    requests: Vec<String>,
    /// Status patches: the path, its field manager, its body.
    patches: Vec<(String, String, Value)>,
}

/// A local API server for pods and TrafficMirrors.
pub struct FakeApi {
    state: Arc<(Mutex<ApiState>, Condvar)>,
    stop: Arc<AtomicBool>,
    port: u16,
    lists: Arc<AtomicUsize>,
}

fn meta_of(v: &Value) -> (&str, &str) {
    let m = &v["metadata"];
    (
        m["namespace"].as_str().unwrap_or("default"),
        m["name"].as_str().unwrap_or(""),
    )
}

fn pod_json(
    s: &ApiState,
    name: &str,
    ip: Option<&str>,
    ready: bool,
    labels: &[(String, String)],
) -> Value {
    let names = if s.containers.is_empty() {
        vec!["app".to_string()]
    } else {
        s.containers.clone()
    };
    let containers: Vec<Value> = names
        .iter()
        .map(|c| json!({"name": c, "image": format!("{c}:1")}))
        .collect();
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut status =
        json!({"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "resourceVersion": s.resource_version.to_string(), "labels": labels},
        "spec": {"nodeName": s.node, "containers": containers},
        "status": status,
    })
}

/// A request's filters: label selector and field selector (`spec.nodeName` only).
struct Filter {
    namespace: Option<String>,
    labels: Vec<(String, String)>,
    node: Option<String>,
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .map(decode)
}

impl Filter {
    fn new(namespace: Option<String>, query: &str) -> Filter {
        let labels = query_param(query, "labelSelector")
            .map(|sel| {
                sel.split(',')
                    .filter(|t| !t.is_empty())
                    .filter_map(|t| t.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.trim_start_matches('=').to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let node = query_param(query, "fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName=").map(str::to_string));
        Filter {
            namespace,
            labels,
            node,
        }
    }

    fn matches(&self, v: &Value) -> bool {
        let (ns, _) = meta_of(v);
        let labels = &v["metadata"]["labels"];
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self
                .labels
                .iter()
                .all(|(k, want)| labels[k].as_str() == Some(want))
            && self
                .node
                .as_deref()
                .is_none_or(|n| v["spec"]["nodeName"].as_str() == Some(n))
    }
}

impl FakeApi {
    /// Serves pods on `node` carrying `labels`, from a thread inside `ns` (127.0.0.1, a free
    /// port).
    pub fn start(ns: &Netns, labels: &[(&str, &str)], node: &str) -> FakeApi {
        let state = ApiState {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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

    /// Sets a pod (carrying the server's labels) in the list and streams its change (`ADDED`,
    /// `MODIFIED`, `DELETED`) to watchers.
    pub fn event(&self, kind: &str, name: &str, ip: Option<&str>, ready: bool) {
        let labels = self.with(|s| s.labels.clone());
        self.pod(kind, name, ip, ready, &labels);
    }

    /// The same, for a pod with labels of its own.
    pub fn labeled_event(
        &self,
        kind: &str,
        name: &str,
        ip: Option<&str>,
        ready: bool,
        labels: &[(&str, &str)],
    ) {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.pod(kind, name, ip, ready, &labels);
    }

    fn pod(
        &self,
        kind: &str,
        name: &str,
        ip: Option<&str>,
        ready: bool,
        labels: &[(String, String)],
    ) {
        self.with(|s| {
            s.resource_version += 1;
            let object = pod_json(s, name, ip, ready, labels);
            s.set(Resource::Pod, kind, object);
        });
    }

    /// Creates or replaces the TrafficMirror `namespace/name` with `spec` (its generation goes
    /// up by one), or deletes it (`spec` None), and streams the change.
    pub fn traffic_mirror(&self, namespace: &str, name: &str, spec: Option<Value>) {
        self.with(|s| {
            s.resource_version += 1;
            let found = s.find(Resource::TrafficMirror, namespace, name);
            let generation = found.map_or(0, |i| {
                s.objects[i].1["metadata"]["generation"]
                    .as_i64()
                    .unwrap_or(0)
            });
            // A deletion streams the object's last state, as the API server does.
            let last_spec = found.map(|i| s.objects[i].1["spec"].clone());
            let object = json!({
                "apiVersion": GROUP,
                "kind": "TrafficMirror",
                "metadata": {"name": name, "namespace": namespace, "generation": generation + 1,
                             "uid": format!("uid-{namespace}-{name}"),
                             "resourceVersion": s.resource_version.to_string()},
                "spec": spec.clone().or(last_spec).unwrap_or(Value::Null),
            });
            let kind = match (spec.is_some(), found.is_some()) {
                (false, _) => "DELETED",
                (true, true) => "MODIFIED",
                (true, false) => "ADDED",
            };
            s.set(Resource::TrafficMirror, kind, object);
        });
    }

    /// The status patches received so far: path, field manager, body.
    pub fn status_patches(&self) -> Vec<(String, String, Value)> {
        self.with(|s| s.patches.clone())
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
            s.log.push(Entry::Bookmark(rv));
        });
    }

    /// Streams `410 Gone` to the pod watcher: its version is too old, it must list again.
    pub fn gone(&self) {
        self.gone_for(Resource::Pod);
    }

    /// The same, to the TrafficMirror watcher.
    pub fn traffic_mirrors_gone(&self) {
        self.gone_for(Resource::TrafficMirror);
    }

    fn gone_for(&self, resource: Resource) {
        self.with(|s| {
            let rv = s.resource_version + 1;
            s.log.push(Entry::Gone {
                resource,
                rv,
                taken: false,
            })
        });
    }

    /// Closes the watch connections after what is queued.
    pub fn drop_watch(&self) {
        self.with(|s| {
            let rv = s.resource_version;
            s.log.push(Entry::Drop(rv))
        });
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

impl ApiState {
    fn find(&self, resource: Resource, namespace: &str, name: &str) -> Option<usize> {
        self.objects
            .iter()
            .position(|(r, v)| *r == resource && meta_of(v) == (namespace, name))
    }

    /// Stores (or deletes) an object and logs the event.
    fn set(&mut self, resource: Resource, kind: &str, object: Value) {
        let (ns, name) = meta_of(&object);
        let at = self.find(resource, ns, name);
        match (kind, at) {
            ("DELETED", Some(i)) => {
                self.objects.remove(i);
            }
            ("DELETED", None) => {}
            (_, Some(i)) => self.objects[i].1 = object.clone(),
            (_, None) => self.objects.push((resource, object.clone())),
        }
        let rv = self.resource_version;
        self.log.push(Entry::Event {
            resource,
            rv,
            kind: kind.to_string(),
            object,
        });
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
    }
}

fn respond(w: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A request: its method, target and body.
struct ApiRequest {
    method: String,
    target: String,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<ApiRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(ApiRequest {
        method,
        target,
        body,
    })
}

fn serve_api(
    stream: TcpStream,
    state: &(Mutex<ApiState>, Condvar),
    stop: &AtomicBool,
    lists: &AtomicUsize,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    while let Some(ApiRequest {
        method,
        target,
        body,
    }) = read_request(&mut reader)
    {
        let (m, cv) = state;
        m.lock()
            .unwrap()
            .requests
            .push(format!("{method} {target}").replacen("GET ", "", 1));
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if method == "PATCH" {
            let ok = patch_status(m, path, query, &body);
            let _ = match ok {
                Some(obj) => respond(&mut w, "200 OK", &obj),
                None => respond(
                    &mut w,
                    "404 Not Found",
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#,
                ),
            };
            cv.notify_all();
            continue;
        }
        let Some((resource, namespace)) = Resource::of(path) else {
            let _ = respond(
                &mut w,
                "404 Not Found",
                r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#,
            );
            continue;
        };
        let filter = Filter::new(namespace, query);
        if query_param(query, "watch").as_deref() != Some("true") {
            list(&mut w, m, lists, resource, &filter);
            continue;
        }
        let from: u64 = query_param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        watch(&mut w, state, stop, resource, &filter, from);
        return;
    }
}

fn list(
    w: &mut TcpStream,
    m: &Mutex<ApiState>,
    lists: &AtomicUsize,
    resource: Resource,
    filter: &Filter,
) {
    let mut s = m.lock().unwrap();
    if resource == Resource::Pod && s.forbid_lists > 0 {
        s.forbid_lists -= 1;
        let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden: User \"system:serviceaccount:default:mirror-agent\" cannot list resource \"pods\"","reason":"Forbidden","code":403}"#;
        let _ = respond(w, "403 Forbidden", body);
        return;
    }
    if resource == Resource::Pod {
        lists.fetch_add(1, Ordering::Relaxed);
    }
    let items: Vec<&Value> = s
        .objects
        .iter()
        .filter(|(r, v)| *r == resource && filter.matches(v))
        .map(|(_, v)| v)
        .collect();
    let (api_version, kind) = match resource {
        Resource::Pod => ("v1", "PodList"),
        Resource::TrafficMirror => (GROUP, "TrafficMirrorList"),
    };
    let body = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": s.resource_version.to_string()},
        "items": items,
    });
    let _ = respond(w, "200 OK", &body.to_string());
}

/// Streams the log's entries after resource version `from` that this watch sees, one JSON
/// object a line, until told to drop or the server stops.
fn watch(
    w: &mut TcpStream,
    (m, cv): &(Mutex<ApiState>, Condvar),
    stop: &AtomicBool,
    resource: Resource,
    filter: &Filter,
    from: u64,
) {
    if w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .is_err()
    {
        return;
    }
    let mut next = {
        let s = m.lock().unwrap();
        s.log
            .iter()
            .position(|e| e.rv() > from)
            .unwrap_or(s.log.len())
    };
    loop {
        let line = {
            let mut s = m.lock().unwrap();
            while next >= s.log.len() && !stop.load(Ordering::Relaxed) {
                s = cv.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let at = next;
            next += 1;
            match &mut s.log[at] {
                Entry::Event { resource: r, kind, object, .. } if *r == resource && filter.matches(object) => {
                    json!({"type": kind, "object": object}).to_string()
                }
                Entry::Event { .. } => continue,
                Entry::Bookmark(rv) if resource == Resource::Pod => json!({
                    "type": "BOOKMARK",
                    "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"resourceVersion": rv.to_string()}},
                })
                .to_string(),
                Entry::Bookmark(_) => continue,
                Entry::Gone {
                    resource: r,
                    taken,
                    ..
                } if *r == resource && !*taken => {
                    *taken = true;
                    r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#.to_string()
                }
                Entry::Gone { .. } => continue,
                Entry::Drop(_) => return,
            }
        };
        let line = format!("{line}\n");
        if write!(w, "{:x}\r\n{line}\r\n", line.len()).is_err() {
            return;
        }
    }
}

/// Records a status patch of a TrafficMirror and answers with the object.
fn patch_status(m: &Mutex<ApiState>, path: &str, query: &str, body: &[u8]) -> Option<String> {
    let rest = path.strip_prefix(&format!("/apis/{GROUP}/namespaces/"))?;
    let mut parts = rest.split('/');
    let (ns, plural, name, sub) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if plural != "trafficmirrors" || sub != "status" {
        return None;
    }
    let mut s = m.lock().unwrap();
    let at = s.find(Resource::TrafficMirror, ns, name)?;
    let manager = query_param(query, "fieldManager").unwrap_or_default();
    let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    s.patches.push((path.to_string(), manager, patch));
    Some(s.objects[at].1.to_string())
}
