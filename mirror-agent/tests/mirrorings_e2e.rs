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

fn object(name: &str, port: u16, candidate: &str, url: &str) -> String {
    format!(
        "apiVersion: mirror-agent.dev/v1alpha1\nkind: TrafficMirror\nmetadata: {{name: {name}}}\n\
         spec:\n  ports: [{port}]\n  candidates:\n  - {{name: {candidate}, url: \"{url}\"}}\n"
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
    let books_obj = object("books", 8080, "next", &format!("http://{BOOKS_CAND}"));
    // A candidate URL the agent cannot use: refused alone, the others run.
    let broken = object("broken", 8080, "bad", "ftp://127.0.0.1:1");
    declare(&file, &[books_obj.clone(), broken.clone()]);
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
        ],
    );
    wait_runs(&pair.server, "default/books", true);
    let get = |addr: &str, path: &str| curl(&pair.client, &[&format!("http://{addr}{path}")]);
    for i in 0..10 {
        get(&books, &format!("/books/one/{i}"));
        get(&reviews, &format!("/reviews/one/{i}"));
    }

    // Reviews are declared: mirrored from then on, books unchanged.
    let reviews_to = |url: &str| object("reviews", 9090, "cand", url);
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

    let mut want_books = sent("/books/one", 10);
    want_books.extend(sent("/books/two", 10));
    want_books.extend(sent("/books/steady", steady_sent));
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
    // Reviews' rows carry its name; its comparison survived the URL change.
    let paired = exit.metric(
        "mirror_requests_total",
        &[("mirroring", "default/reviews"), ("version", "cand")],
    );
    assert_eq!(paired as usize, want_reviews.len(), "{}", exit.metrics);
    println!("the candidate URL switched {switch_time:?} after the file changed");
}
