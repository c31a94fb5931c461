//! Declared mirrorings at run time (root only): one agent, a `--config` file of TrafficMirror
//! objects for two live services, changed while traffic flows. A mirroring added to the file
//! starts, an edited candidate URL switches within seconds without losing a request of the other
//! mirroring, a removed one stops, and a broken object leaves the others running.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const BOOKS_CAND: &str = "127.0.0.1:9201";
const REVIEWS_FIRST: &str = "127.0.0.1:9202";
const REVIEWS_SECOND: &str = "127.0.0.1:9203";
const METRICS: &str = "127.0.0.1:9466";

/// The tests count every request: they run one at a time, and without shedding for the live
/// service's CPU pressure (which the other's load would raise), so that nothing is sampled out.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TrafficMirror of one candidate; `extra`: more of the candidate's fields.
fn object(name: &str, port: u16, candidate: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: mirror-agent.dev/v1alpha1\nkind: TrafficMirror\nmetadata: {{name: {name}}}\n\
         spec:\n  ports: [{port}]\n  candidates:\n  - {{name: {candidate}, url: \"{url}\"{extra}}}\n"
    )
}

fn declare(file: &std::path::Path, objects: &[String]) {
    // Written aside and renamed: the agent never reads half a file.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, objects.join("---\n")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Whether the agent runs the mirroring `key` (its report is served).
fn runs(ns: &Netns, key: &str) -> bool {
    let out = ns
        .exec(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{METRICS}/report?mirroring={key}"),
        ])
        .output()
        .unwrap();
    out.stdout == b"200"
}

fn wait_runs(ns: &Netns, key: &str, want: bool) {
    assert!(
        netlab::wait_until(Duration::from_secs(15), || runs(ns, key) == want),
        "mirroring {key} never {}",
        if want { "started" } else { "stopped" }
    );
}

fn targets(server: &TestServer) -> Vec<String> {
    let mut t: Vec<String> = server.log().into_iter().map(|r| r.target).collect();
    t.sort();
    t
}

fn sent(prefix: &str, n: usize) -> Vec<String> {
    let mut t: Vec<String> = (0..n).map(|i| format!("{prefix}/{i}")).collect();
    t.sort();
    t
}

#[test]
fn mirrorings_are_added_switched_and_removed_while_traffic_flows() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let pair = Pair::new("decl", 241);
    let books = format!("{}:8080", pair.server_v4);
    let reviews = format!("{}:9090", pair.server_v4);
    let _live = TestServer::start(
        &pair.server,
        &[books.parse().unwrap(), reviews.parse().unwrap()],
    );
    let books_cand = TestServer::start(&pair.server, &[BOOKS_CAND.parse().unwrap()]);
    let first = TestServer::start(&pair.server, &[REVIEWS_FIRST.parse().unwrap()]);
    let second = TestServer::start(&pair.server, &[REVIEWS_SECOND.parse().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    // Books' candidate serves its routes under /v2 and gets a flag in the query.
    let books_obj = object(
        "books",
        8080,
        "next",
        &format!("http://{BOOKS_CAND}"),
        r#", rewrite: {path: {regex: "^/books/", replacement: "/v2/books/"}, setQuery: {shadow: "1"}}"#,
    );
    // A candidate URL the agent cannot use: refused alone, the others run.
    let broken = object("broken", 8080, "bad", "ftp://127.0.0.1:1", "");
    declare(&file, &[books_obj.clone(), broken.clone()]);
    let recordings = dir.path().join("rec");
    let key = dir.path().join("key");
    std::fs::write(&key, "a key of thirty-two bytes, test!").unwrap();
    let agent = Agent::start(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "8080,9090",
            "--config",
            file.to_str().unwrap(),
            "--metrics",
            METRICS,
            "--max-live-pressure",
            "off",
            "--record-mirrorings",
            recordings.to_str().unwrap(),
            "--redact-key",
            key.to_str().unwrap(),
        ],
    );
    wait_runs(&pair.server, "default/books", true);
    // Every request carries a secret that reviews' recording must mask.
    let get = |addr: &str, path: &str| {
        let url = format!("http://{addr}{path}");
        curl(&pair.client, &["-H", "X-Secret: planted-4242", &url])
    };
    for i in 0..10 {
        get(&books, &format!("/books/one/{i}"));
        get(&reviews, &format!("/reviews/one/{i}"));
    }

    // Reviews are declared: mirrored from then on, books unchanged.
    // The pipeline has handed on what it read (a request read before a declaration but handed
    // on after it would be the new mirroring's).
    std::thread::sleep(Duration::from_millis(300));
    // Reviews is recorded, its secret header redacted; its recording goes on across the switch.
    let reviews_to = |url: &str| {
        object("reviews", 9090, "cand", url, "") + "  record: {redact: {headers: [x-secret]}}\n"
    };
    declare(
        &file,
        &[
            books_obj.clone(),
            broken.clone(),
            reviews_to(&format!("http://{REVIEWS_FIRST}")),
        ],
    );
    wait_runs(&pair.server, "default/reviews", true);
    for i in 0..10 {
        get(&books, &format!("/books/two/{i}"));
        get(&reviews, &format!("/reviews/two/{i}"));
    }

    // The reviews candidate moves while books traffic flows without a pause.
    let stop = AtomicBool::new(false);
    let (steady_sent, during, switched, switch_time) = std::thread::scope(|s| {
        let steady = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 400 {
                get(&books, &format!("/books/steady/{n}"));
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(300));
        declare(
            &file,
            &[
                books_obj.clone(),
                broken.clone(),
                reviews_to(&format!("http://{REVIEWS_SECOND}")),
            ],
        );
        let edited = Instant::now();
        let mut during = 0;
        let switched = netlab::wait_until(Duration::from_secs(15), || {
            get(&reviews, &format!("/reviews/switch/{during}"));
            during += 1;
            second.requests() > 0
        });
        let switch_time = edited.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (steady.join().unwrap(), during, switched, switch_time)
    });
    assert!(switched, "the new candidate URL never got a request");
    assert!(
        switch_time < Duration::from_secs(5),
        "the switch took {switch_time:?}"
    );

    // Books is removed: its candidate gets nothing more; reviews goes on.
    declare(&file, &[reviews_to(&format!("http://{REVIEWS_SECOND}"))]);
    wait_runs(&pair.server, "default/books", false);
    for i in 0..10 {
        get(&books, &format!("/books/gone/{i}"));
        get(&reviews, &format!("/reviews/three/{i}"));
    }
    let want_second = during + 10;
    netlab::wait_until(Duration::from_secs(10), || {
        second.requests() + first.requests() >= 10 + want_second
    });
    std::thread::sleep(Duration::from_millis(500));
    let exit = agent.stop();
    let har = dir.path().join("reviews.har");
    let export = std::process::Command::new(AGENT)
        .args([
            "export",
            recordings.join("default/reviews").to_str().unwrap(),
        ])
        .args(["--har", har.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let har = std::fs::read_to_string(&har).unwrap();

    let mut want_books = sent("/books/one", 10);
    want_books.extend(sent("/books/two", 10));
    want_books.extend(sent("/books/steady", steady_sent));
    let mut want_books: Vec<String> = want_books
        .iter()
        .map(|t| format!("/v2{t}?shadow=1"))
        .collect();
    want_books.sort();
    assert_eq!(
        targets(&books_cand),
        want_books,
        "books' candidate: every request while declared, none after\n{}",
        exit.stderr
    );
    // Each reviews request after the declaration reached the first or the second URL, once.
    let mut reviews_got = targets(&first);
    reviews_got.extend(targets(&second));
    reviews_got.sort();
    let mut want_reviews = sent("/reviews/two", 10);
    want_reviews.extend(sent("/reviews/switch", during));
    want_reviews.extend(sent("/reviews/three", 10));
    want_reviews.sort();
    assert_eq!(reviews_got, want_reviews, "{}", exit.stderr);
    assert!(
        targets(&second)
            .iter()
            .all(|t| !t.starts_with("/reviews/two")),
        "the second URL got requests from before the switch"
    );
    assert!(
        exit.stderr.contains("mirroring default/broken not started")
            && exit.stderr.contains("spec.candidates[0].url"),
        "the broken object is refused, naming its field:\n{}",
        exit.stderr
    );
    // Reviews' recording holds every request it covered, across the switch, and no secret.
    for t in ["/reviews/two/0", "/reviews/switch/0", "/reviews/three/9"] {
        assert!(har.contains(t), "{t} not recorded");
    }
    assert!(
        !har.contains("/reviews/one/"),
        "recorded before it was declared"
    );
    assert!(
        !har.contains("planted-4242"),
        "the secret reached the recording"
    );
    assert!(
        har.contains("REDACTED-"),
        "the secret header is masked, not dropped"
    );
    assert!(
        !recordings.join("default/books").exists(),
        "books asked for no recording"
    );
    // Reviews' rows carry its name; its comparison survived the URL change.
    let paired = exit.metric(
        "mirror_requests_total",
        &[("mirroring", "default/reviews"), ("version", "cand")],
    );
    assert_eq!(paired as usize, want_reviews.len(), "{}", exit.metrics);
    println!("the candidate URL switched {switch_time:?} after the file changed");
}

fn spec(app: &str, candidate: &str, url: &str) -> serde_json::Value {
    serde_json::json!({
        "selector": {"matchLabels": {"app": app}},
        "ports": [8080],
        "candidates": [{"name": candidate, "url": url}],
    })
}

/// The last status entry written for `name`, by this node's field manager.
fn last_status(api: &netlab::kubeapi::FakeApi, name: &str) -> Option<serde_json::Value> {
    api.status_patches()
        .into_iter()
        .rev()
        .find(|(path, manager, _)| {
            path.ends_with(&format!("/trafficmirrors/{name}/status"))
                && manager == "mirror-agent/node1"
        })
        .map(|(_, _, body)| body["status"]["nodes"][0].clone())
}

fn wait_status(
    api: &netlab::kubeapi::FakeApi,
    name: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    let found = netlab::wait_until(Duration::from_secs(20), || {
        last = last_status(api, name);
        last.as_ref().is_some_and(&ok)
    });
    assert!(
        found,
        "TrafficMirror {name}: no status with {what}; last: {last:?}"
    );
    last.unwrap()
}

#[test]
fn traffic_mirrors_in_the_api_select_their_pods_and_report_per_node() {
    if not_root() {
        return;
    }
    let _serial = serial();
    let node = Netns::new(&netlab::unique("tmnode"));
    let books_cand = TestServer::start(&node, &["127.0.0.1:9211".parse().unwrap()]);
    let reviews_first = TestServer::start(&node, &["127.0.0.1:9212".parse().unwrap()]);
    let reviews_second = TestServer::start(&node, &["127.0.0.1:9213".parse().unwrap()]);
    let books = pod(&node, "tmb", 243);
    let reviews = pod(&node, "tmr", 244);
    let api = netlab::kubeapi::FakeApi::start(&node, &[], "node1");
    api.labeled_event(
        "ADDED",
        "books-1",
        Some(&books.ip),
        true,
        &[("app", "books")],
    );
    api.labeled_event(
        "ADDED",
        "reviews-1",
        Some(&reviews.ip),
        true,
        &[("app", "reviews")],
    );
    // Two objects on the same port, told apart by their pods; one that selects nothing; one
    // whose spec the schema lets through but the agent cannot run.
    api.traffic_mirror(
        "default",
        "books",
        Some(spec("books", "next", "http://127.0.0.1:9211")),
    );
    api.traffic_mirror(
        "default",
        "reviews",
        Some(spec("reviews", "cand", "http://127.0.0.1:9212")),
    );
    api.traffic_mirror(
        "default",
        "nothing",
        Some(spec("nobody", "cand", "http://127.0.0.1:9212")),
    );
    let mut bad = spec("reviews", "cand", "http://127.0.0.1:9212");
    bad["requests"] = serde_json::json!({"path": "(unclosed"});
    api.traffic_mirror("default", "bad", Some(bad));
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = node.exec(&[
        AGENT,
        "attach",
        "--traffic-mirrors",
        "--node-name",
        "node1",
        "--port",
        "8080",
        "--metrics",
        METRICS,
        "--max-live-pressure",
        "off",
    ]);
    cmd.env("KUBECONFIG", api.kubeconfig(dir.path()));
    let agent = Agent::spawn_command(cmd);
    let pods_mirrored = || metric(&node, METRICS, "mirror_pods_mirrored", &[]);
    assert!(
        netlab::wait_until(Duration::from_secs(20), || pods_mirrored() == Some(2.0)),
        "the two selected pods were never both attached ({:?})",
        pods_mirrored()
    );
    let get = |ip: &str, path: &str| curl(&node, &[&format!("http://{ip}:8080{path}")]);
    for i in 0..10 {
        get(&books.ip, &format!("/books/{i}"));
        get(&reviews.ip, &format!("/reviews/one/{i}"));
    }
    netlab::wait_until(Duration::from_secs(10), || {
        books_cand.requests() >= 10 && reviews_first.requests() >= 10
    });

    // The reviews candidate moves; books is deleted: its pod is let go.
    api.traffic_mirror(
        "default",
        "reviews",
        Some(spec("reviews", "cand", "http://127.0.0.1:9213")),
    );
    api.traffic_mirror("default", "books", None);
    if !netlab::wait_until(Duration::from_secs(20), || pods_mirrored() == Some(1.0)) {
        panic!(
            "the deleted mirroring's pod stayed attached ({:?}):\n{}",
            pods_mirrored(),
            agent.terminate()
        );
    }
    let switched = netlab::wait_until(Duration::from_secs(15), || {
        get(&reviews.ip, "/reviews/probe");
        reviews_second.requests() > 0
    });
    assert!(switched, "the edited candidate URL never got a request");
    // The TrafficMirror watch is told its version is too old: it lists again, and what runs
    // keeps running.
    let tm_lists = || {
        api.requests()
            .iter()
            .filter(|r| r.contains("/trafficmirrors?") && !r.contains("watch=true"))
            .count()
    };
    let listed = tm_lists();
    api.traffic_mirrors_gone();
    assert!(
        netlab::wait_until(Duration::from_secs(20), || tm_lists() > listed),
        "no TrafficMirror relist after 410 Gone"
    );
    for i in 0..10 {
        get(&books.ip, &format!("/books/after/{i}"));
        get(&reviews.ip, &format!("/reviews/two/{i}"));
    }
    netlab::wait_until(Duration::from_secs(10), || reviews_second.requests() >= 11);

    let reviews_status = wait_status(&api, "reviews", "its pod and requests", |s| {
        s["pods"] == 1 && s["mirrored"].as_u64().unwrap_or(0) >= 10 && s["observedGeneration"] == 2
    });
    let nothing = wait_status(&api, "nothing", "NoPodMatches", |s| {
        s["conditions"].to_string().contains("NoPodMatches")
    });
    let bad = wait_status(&api, "bad", "a refusal", |s| {
        s["conditions"][0]["status"] == "False"
    });
    let stderr = agent.terminate();

    let targets = |s: &TestServer| {
        let mut t: Vec<String> = s.log().into_iter().map(|r| r.target).collect();
        t.sort();
        t
    };
    assert_eq!(targets(&books_cand), sent("/books", 10), "{stderr}");
    assert!(
        targets(&reviews_first)
            .iter()
            .all(|t| t.starts_with("/reviews/one/") || t == "/reviews/probe"),
        "the first reviews candidate got another pod's requests: {:?}",
        targets(&reviews_first)
    );
    let mut reviews_got = targets(&reviews_first);
    reviews_got.extend(targets(&reviews_second));
    reviews_got.retain(|t| t != "/reviews/probe");
    reviews_got.sort();
    let mut want = sent("/reviews/one", 10);
    want.extend(sent("/reviews/two", 10));
    want.sort();
    assert_eq!(reviews_got, want, "{stderr}");
    assert!(
        reviews_status["verdict"]
            .as_str()
            .unwrap_or("")
            .starts_with("cand: "),
        "{reviews_status}"
    );
    assert_eq!(reviews_status["conditions"][0]["type"], "Ready");
    assert_eq!(reviews_status["conditions"][0]["status"], "True");
    assert_eq!(nothing["pods"], 0, "{nothing}");
    assert_eq!(bad["conditions"][0]["reason"], "InvalidSpec", "{bad}");
    assert!(
        bad["conditions"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("spec.requests.path"),
        "{bad}"
    );
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("namespaces/default/pods")
                && r.contains("labelSelector=app%3Dreviews")
                && r.contains("fieldSelector=spec.nodeName%3Dnode1")),
        "{requests:?}"
    );
}
