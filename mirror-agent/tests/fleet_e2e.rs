//! The fleet's table in a real Prometheus, and the page in a real browser (root; Debian's
//! `prometheus` and `chromium`, which `cargo xtask test` installs).
//!
//! Three "nodes", each a namespace with its own replica of the live service and its own agent,
//! hang off a "cluster" namespace that runs the client, the one candidate (V3: slower on
//! reviews, failing on stock) and Prometheus, which scrapes the three agents every second and
//! loads `deploy/prometheus/rules.yaml`. One agent is restarted mid-run.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mirror_agent::compare::{Report, Side, BUCKETS_S};
use netlab::Netns;
use serde_json::Value;

const PROMETHEUS: &str = "127.0.0.1:9090";
const ROUNDS: usize = 6;

/// Live: books at once, reviews in 5 ms, search in 1.1 s, stock at once.
fn live_behaviour() -> Behaviour {
    Arc::new(|target: &str| {
        if target.starts_with("/api/search") {
            (200, Duration::from_millis(1100))
        } else if target.ends_with("/reviews") {
            (200, Duration::from_millis(5))
        } else {
            (200, Duration::ZERO)
        }
    })
}

/// V3: reviews 300 ms slower, stock fails.
fn candidate_behaviour() -> Behaviour {
    Arc::new(|target: &str| {
        if target.starts_with("/api/search") {
            (200, Duration::from_millis(1100))
        } else if target.ends_with("/reviews") {
            (200, Duration::from_millis(300))
        } else if target.starts_with("/api/stock") {
            (500, Duration::ZERO)
        } else {
            (200, Duration::ZERO)
        }
    })
}

/// The endpoint the agents name a target by.
fn endpoint(target: &str) -> &'static str {
    if target.starts_with("/api/search") {
        "GET /api/search"
    } else if target.ends_with("/reviews") {
        "GET /api/books/{id}/reviews"
    } else if target.starts_with("/api/stock") {
        "GET /api/stock"
    } else {
        "GET /api/books/{id}"
    }
}

/// One node: its namespace, its live replica and its agent, reachable from the cluster at
/// `10.<net>.0.2`.
struct Node {
    ns: Netns,
    _live: TestServer,
    agent: Option<Agent>,
    ip: String,
    net: u8,
}

impl Node {
    fn new(cluster: &Netns, net: u8) -> Node {
        let ns = Netns::new(&netlab::unique(&format!("fln{net}")));
        netlab::link(cluster, &format!("n{net}"), &ns, "eth0", net);
        let ip = format!("10.{net}.0.2");
        let live = TestServer::start_with(
            &ns,
            &[format!("{ip}:8080").parse().unwrap()],
            live_behaviour(),
        );
        let mut node = Node {
            ns,
            _live: live,
            agent: None,
            ip,
            net,
        };
        node.start_agent();
        node
    }

    fn metrics(&self) -> String {
        format!("{}:9464", self.ip)
    }

    fn start_agent(&mut self) {
        let mirror = format!("http://10.{}.0.1:9090", self.net);
        let metrics = self.metrics();
        let args = [
            "--iface",
            "eth0",
            "--port",
            "8080",
            "--mirror",
            &mirror,
            "--live-label",
            "V1",
            "--mirror-label",
            "V3",
            "--route",
            "/api/search",
            "--route",
            "/api/stock",
            "--metrics",
            &metrics,
            // Every request counts: no shedding when something else loads the machine.
            "--max-live-pressure",
            "off",
        ];
        self.agent = Some(Agent::start(&self.ns, &args));
    }

    fn report(&self) -> Option<Report> {
        common::report(&self.ns, &self.metrics())
    }

    /// Waits (bounded) until this agent counted `sent` live responses and mirror outcomes.
    fn settled(&self, sent: u64) -> Report {
        let mut last = None;
        let done = netlab::wait_until(Duration::from_secs(20), || {
            last = self.report();
            last.as_ref().is_some_and(|r| {
                [Side::Live, Side::Mirror]
                    .iter()
                    .all(|s| side(r, *s) == sent)
            })
        });
        let r = last.expect("the agent answers /report");
        assert!(done, "agent on {} saw only part of {sent}: {r:#?}", self.ip);
        r
    }
}

fn side(r: &Report, s: Side) -> u64 {
    r.rows.iter().filter(|x| x.side == s).map(|x| x.count).sum()
}

/// Prometheus in the cluster namespace, with its data in a directory removed on drop.
struct Prometheus {
    _proc: Proc,
    dir: PathBuf,
}

impl Prometheus {
    fn start(cluster: &Netns, nodes: &[Node]) -> Prometheus {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(netlab::unique("prom"));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/prometheus/rules.yaml"
        );
        let targets: Vec<String> = nodes.iter().map(|n| format!("'{}'", n.metrics())).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{rules}']\n\
             scrape_configs:\n  - job_name: mirror-agent\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let proc = Proc::spawn(
            cluster
                .exec(&["prometheus", "--log.level=warn"])
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={PROMETHEUS}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let prom = Prometheus { _proc: proc, dir };
        let ready = netlab::wait_until(Duration::from_secs(20), || {
            cluster
                .exec(&["curl", "-sf", &format!("http://{PROMETHEUS}/-/ready")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        assert!(ready, "Prometheus did not become ready");
        prom
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An instant query's result (`data.result`).
fn query(cluster: &Netns, promql: &str) -> Vec<Value> {
    let out = cluster
        .exec(&["curl", "-sfG", "--max-time", "10"])
        .arg("--data-urlencode")
        .arg(format!("query={promql}"))
        .arg(format!("http://{PROMETHEUS}/api/v1/query"))
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{promql}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["status"], "success", "{promql}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// Waits (bounded) until Prometheus's last scrape of every agent shows `total` requests.
fn scraped(cluster: &Netns, total: u64) {
    let mut seen = 0.0;
    let done = netlab::wait_until(Duration::from_secs(20), || {
        seen = query(cluster, "sum(mirror_requests_total)")
            .first()
            .map_or(0.0, value);
        seen as u64 == total
    });
    assert!(done, "Prometheus shows {seen} requests, the agents {total}");
}

/// `mirror-agent report --prometheus …` in the cluster: the fleet's report, its stderr.
fn fleet_report(cluster: &Netns, extra: &[&str]) -> (Option<Report>, String, Option<i32>) {
    let url = format!("http://{PROMETHEUS}");
    let out = cluster
        .exec(&[AGENT, "report", "--prometheus", &url, "--format", "json"])
        .args(extra)
        .output()
        .unwrap();
    (
        serde_json::from_slice(&out.stdout).ok(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

/// Sends ROUNDS rounds of books, reviews and stock to each node, and one search per round
/// beside them; returns what each node was sent, per target.
fn traffic(cluster: &Netns, nodes: &[&Node]) -> Vec<BTreeMap<String, u64>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|n| {
                s.spawn(move || {
                    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
                    let base = format!("http://{}:8080", n.ip);
                    for round in 0..ROUNDS {
                        let targets = [
                            format!("/api/books/{}", round % 3 + 1),
                            format!("/api/books/{}/reviews", round % 3 + 1),
                            "/api/stock".to_string(),
                        ];
                        let urls: Vec<String> =
                            targets.iter().map(|t| format!("{base}{t}")).collect();
                        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
                        curl(cluster, &args);
                        for t in targets {
                            *sent.entry(t).or_default() += 1;
                        }
                        // Spread over scrapes, as live traffic is: rates see the counters grow.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    sent
                })
            })
            .collect();
        // The second-scale endpoint: one search per node at a time, beside the rest.
        for _ in 0..2 {
            std::thread::scope(|s2| {
                for n in nodes {
                    s2.spawn(move || {
                        curl(cluster, &[&format!("http://{}:8080/api/search?q=x", n.ip)])
                    });
                }
            });
        }
        handles
            .into_iter()
            .map(|h| {
                let mut sent = h.join().unwrap();
                *sent.entry("/api/search?q=x".into()).or_default() += 2;
                sent
            })
            .collect()
    })
}

/// (endpoint, version, code) → (count, timed, summed ms), over reports.
type Rows = BTreeMap<(String, String, String), (u64, u64, f64)>;

fn rows(reports: &[&Report]) -> Rows {
    let mut out = Rows::new();
    for r in reports {
        for x in &r.rows {
            let e = out
                .entry((x.name.clone(), x.version.clone(), x.code.clone()))
                .or_default();
            e.0 += x.count;
            e.1 += x.timed;
            e.2 += x.avg_ms * x.timed as f64;
        }
    }
    out
}

fn total(r: &Report) -> u64 {
    r.rows.iter().map(|x| x.count).sum()
}

/// The bounds of the bucket that holds `seconds`.
fn bucket_of(seconds: f64) -> (f64, f64) {
    let mut lo = 0.0;
    for hi in BUCKETS_S {
        if seconds <= hi {
            return (lo, hi);
        }
        lo = hi;
    }
    (lo, f64::INFINITY)
}

/// The fleet's quantile lies between the agents' own, give or take the width of the bucket
/// each extreme falls in: a merged distribution's quantile lies between its parts', and
/// interpolating inside a bucket errs by less than the bucket.
fn assert_quantile_within_a_bucket(what: &str, fleet_ms: f64, agents_ms: &[f64]) {
    let lo = agents_ms.iter().copied().fold(f64::INFINITY, f64::min) / 1e3;
    let hi = agents_ms.iter().copied().fold(0.0, f64::max) / 1e3;
    let (lo_a, lo_b) = bucket_of(lo);
    let (hi_a, hi_b) = bucket_of(hi);
    let fleet = fleet_ms / 1e3;
    assert!(
        fleet >= lo - (lo_b - lo_a) && fleet <= hi + (hi_b - hi_a),
        "{what}: the fleet's {fleet_ms:.3} ms is not within a bucket of the agents' {agents_ms:?}"
    );
}

#[test]
fn prometheus_sums_every_agent_into_the_fleets_table_across_a_restart() {
    if not_root() {
        return;
    }
    let cluster = Netns::new(&netlab::unique("flc"));
    let mut nodes: Vec<Node> = [151u8, 152, 153]
        .into_iter()
        .map(|net| Node::new(&cluster, net))
        .collect();
    let binds: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| format!("10.{}.0.1:9090", n.net).parse().unwrap())
        .collect();
    let candidate = TestServer::start_with(&cluster, &binds, candidate_behaviour());
    let _prom = Prometheus::start(&cluster, &nodes);

    let all: Vec<&Node> = nodes.iter().collect();
    let sent_a = traffic(&cluster, &all);
    let per_node: u64 = sent_a[0].values().sum();
    let reports_a: Vec<Report> = nodes.iter().map(|n| n.settled(per_node)).collect();
    scraped(&cluster, 2 * 3 * per_node);
    let (before, err, _) = fleet_report(&cluster, &[]);
    let before = before.unwrap_or_else(|| panic!("the fleet report failed: {err}"));
    assert_eq!(total(&before), 2 * 3 * per_node, "{err}");

    // A restart: the third agent's counters begin again at zero.
    nodes[2].agent.take().unwrap().stop();
    nodes[2].start_agent();
    std::thread::sleep(Duration::from_secs(3));
    let (after_restart, err, _) = fleet_report(&cluster, &[]);
    assert_eq!(
        after_restart.map(|r| total(&r)),
        Some(total(&before)),
        "a restart made the fleet's total move: {err}"
    );

    let sent_b = traffic(&cluster, &[&nodes[2]]);
    let report_b = nodes[2].settled(sent_b[0].values().sum());
    scraped(
        &cluster,
        2 * (2 * per_node + sent_b[0].values().sum::<u64>()),
    );
    let page = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-page.html");
    let (fleet, err, code) = fleet_report(&cluster, &["--html", page.to_str().unwrap()]);
    let fleet = fleet.unwrap_or_else(|| panic!("the fleet report failed ({code:?}): {err}"));
    assert!(err.contains("3 agents"), "{err}");
    let table = cluster
        .exec(&[
            AGENT,
            "report",
            "--prometheus",
            &format!("http://{PROMETHEUS}"),
        ])
        .output()
        .unwrap();
    eprintln!(
        "$ mirror-agent report --prometheus http://{PROMETHEUS}\n{}{}",
        String::from_utf8_lossy(&table.stderr),
        String::from_utf8_lossy(&table.stdout)
    );

    check_table(&fleet, &reports_a, &report_b, &sent_a, &sent_b, &candidate);
    check_quantiles(&cluster, &fleet, &reports_a, &report_b);
    check_restart_in_prometheus(&cluster, &fleet, &nodes[2]);
    check_rules_and_dashboard(&cluster);
    check_bad_input(&cluster);
    check_pages_in_chromium(&cluster, &nodes[0], &page);
}

/// The fleet's rows are the sum of the agents' rows, the candidate's log and what was sent.
fn check_table(
    fleet: &Report,
    reports_a: &[Report],
    report_b: &Report,
    sent_a: &[BTreeMap<String, u64>],
    sent_b: &[BTreeMap<String, u64>],
    candidate: &TestServer,
) {
    let mut agents: Vec<&Report> = reports_a.iter().collect();
    agents.push(report_b);
    let expected = rows(&agents);
    let got = rows(&[fleet]);
    assert_eq!(
        got.iter()
            .map(|(k, v)| (k.clone(), (v.0, v.1)))
            .collect::<BTreeMap<_, _>>(),
        expected
            .iter()
            .map(|(k, v)| (k.clone(), (v.0, v.1)))
            .collect::<BTreeMap<_, _>>(),
        "the fleet's counts are not the agents' sums"
    );
    for (k, (_, timed, ms)) in &expected {
        let (_, _, fleet_ms) = got[k];
        let (mean, fleet_mean) = (ms / *timed as f64, fleet_ms / *timed as f64);
        assert!(
            (mean - fleet_mean).abs() <= 0.001 * mean + 0.001,
            "{k:?}: mean {fleet_mean} ms, the agents' {mean} ms"
        );
    }
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    for (target, n) in sent_a.iter().chain(sent_b).flatten() {
        *sent.entry(endpoint(target)).or_default() += n;
    }
    let mut mirrored: BTreeMap<&str, u64> = BTreeMap::new();
    for r in candidate.log() {
        *mirrored.entry(endpoint(&r.target)).or_default() += 1;
    }
    assert_eq!(mirrored, sent, "the candidate's log");
    for (side, version) in [(Side::Live, "V1"), (Side::Mirror, "V3")] {
        let mut by_endpoint: BTreeMap<&str, u64> = BTreeMap::new();
        for x in fleet.rows.iter().filter(|x| x.side == side) {
            assert_eq!(x.version, version);
            *by_endpoint.entry(endpoint_of(&x.name)).or_default() += x.count;
        }
        assert_eq!(by_endpoint, sent, "{version} rows against what was sent");
    }
    let verdict = |name: &str| {
        fleet
            .verdicts
            .iter()
            .find(|v| v.name == name && v.mirror == "V3")
            .map(|v| v.verdict)
    };
    use mirror_agent::compare::VerdictKind;
    assert_eq!(
        verdict("GET /api/books/{id}/reviews"),
        Some(VerdictKind::Slower)
    );
    assert_eq!(verdict("GET /api/stock"), Some(VerdictKind::Fails));
    assert_eq!(verdict("GET /api/books/{id}"), Some(VerdictKind::Match));
}

/// The same endpoint name, as `endpoint()` returns it.
fn endpoint_of(name: &str) -> &'static str {
    [
        "GET /api/search",
        "GET /api/books/{id}/reviews",
        "GET /api/stock",
        "GET /api/books/{id}",
    ]
    .into_iter()
    .find(|e| *e == name)
    .unwrap_or_else(|| panic!("an endpoint nobody sent: {name}"))
}

/// p50 and p99 per row, from the report (the window's buckets summed over the agents) and from
/// Prometheus's `histogram_quantile` over the agents' buckets summed, each within a bucket of
/// the agents' own figures.
fn check_quantiles(cluster: &Netns, fleet: &Report, reports_a: &[Report], report_b: &Report) {
    let agents: Vec<&Report> = reports_a.iter().chain([report_b]).collect();
    for q in [0.5, 0.99] {
        let promql = format!(
            "histogram_quantile({q}, sum by (le, endpoint, version, code) (mirror_request_duration_seconds_bucket))"
        );
        let prom: Vec<Value> = query(cluster, &promql);
        for row in &fleet.rows {
            let fleet_ms = if q == 0.5 { row.p50_ms } else { row.p99_ms };
            let own: Vec<f64> = agents
                .iter()
                .flat_map(|r| &r.rows)
                .filter(|x| x.name == row.name && x.version == row.version && x.code == row.code)
                .map(|x| if q == 0.5 { x.p50_ms } else { x.p99_ms })
                .collect();
            let what = format!("{} {} {} p{}", row.name, row.version, row.code, q * 100.0);
            assert_quantile_within_a_bucket(&format!("report: {what}"), fleet_ms, &own);
            let theirs = prom
                .iter()
                .find(|s| {
                    s["metric"]["endpoint"] == row.name.as_str()
                        && s["metric"]["version"] == row.version.as_str()
                        && s["metric"]["code"] == row.code.as_str()
                })
                .map(value)
                .unwrap_or_else(|| panic!("{what}: no histogram_quantile series"));
            assert_quantile_within_a_bucket(&format!("Prometheus: {what}"), theirs * 1e3, &own);
            eprintln!(
                "{what}: report {fleet_ms:.3} ms, Prometheus {:.3} ms, agents {own:?}",
                theirs * 1e3
            );
        }
    }
    // The buckets make both ends meaningful: sub-millisecond books on the candidate,
    // second-scale search.
    let row = |name: &str, side: Side| {
        fleet
            .rows
            .iter()
            .find(|x| x.name == name && x.side == side)
            .unwrap()
    };
    let books = row("GET /api/books/{id}", Side::Mirror).p50_ms;
    assert!(books < 1.0, "books p50 on the candidate {books} ms");
    let search = row("GET /api/search", Side::Live).p50_ms;
    assert!((1000.0..2500.0).contains(&search), "search p50 {search} ms");
}

/// Prometheus saw the restart as the table tells it, by the agent's start time; its own
/// `increase()` over the window is printed beside the table's exact count.
fn check_restart_in_prometheus(cluster: &Netns, fleet: &Report, restarted: &Node) {
    let instance = format!("{}:9464", restarted.ip);
    let starts = query(
        cluster,
        &format!("changes(process_start_time_seconds{{instance=\"{instance}\"}}[10m])"),
    );
    assert_eq!(
        starts.first().map(value),
        Some(1.0),
        "one restart: {starts:?}"
    );
    let increase = query(cluster, "sum(increase(mirror_requests_total[10m]))")
        .first()
        .map_or(0.0, value);
    eprintln!(
        "requests over 10m: the table's exact count {}, Prometheus's increase() {increase:.1}",
        total(fleet)
    );
}

/// The shipped rules evaluate on real series (the table's recording rules have series, the
/// failing candidate's alert is pending or firing), and every Grafana panel returns series.
fn check_rules_and_dashboard(cluster: &Netns) {
    for rule in [
        "mirror:requests:rate5m",
        "mirror:request_duration_seconds:mean5m",
        "mirror:request_duration_seconds:p99_5m",
    ] {
        let ok = netlab::wait_until(Duration::from_secs(10), || !query(cluster, rule).is_empty());
        assert!(ok, "the recording rule {rule} has no series");
    }
    let alert =
        "ALERTS{alertname=\"MirrorCandidateFailsWhereLiveSucceeds\",endpoint=\"GET /api/stock\"}";
    let ok = netlab::wait_until(Duration::from_secs(10), || {
        !query(cluster, alert).is_empty()
    });
    assert!(
        ok,
        "the alert for the failing candidate is neither pending nor firing"
    );

    let dashboard: Value =
        serde_json::from_str(include_str!("../../deploy/grafana-dashboard.json")).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let promql = expr
                .replace("$__range", "10m")
                .replace("$__rate_interval", "1m");
            let series = query(cluster, &promql);
            assert!(
                !series.is_empty(),
                "the panel {:?} shows nothing: {promql}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} panel queries");
}

/// What a user gets wrong: each is said plainly, with a non-zero exit.
fn check_bad_input(cluster: &Netns) {
    let (r, err, code) = fleet_report(cluster, &["--selector", "job=\"nope\""]);
    assert!(r.is_none() && code == Some(1), "{err}");
    assert!(err.contains("matches none of the"), "{err}");
    let (_, err, code) = fleet_report(cluster, &["--mirroring", "shop/nothing"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no series of mirroring shop/nothing"), "{err}");
    let (_, err, code) = fleet_report(cluster, &["--selector", "job=~\"(\""]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Prometheus refused"), "{err}");
    let out = cluster
        .exec(&[AGENT, "report", "--prometheus", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not answer"), "{err}");
}

/// Headless Chromium in `ns`: its standard output for `url`.
fn chromium(ns: &Netns, args: &[&str], url: &str) -> String {
    let profile = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(netlab::unique("chromium"));
    let out = ns
        .exec(&[
            "timeout",
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .env("HOME", &profile)
        .output()
        .expect("chromium (cargo xtask test installs Debian's chromium)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rendered page has the table's rows, a chart per endpoint, and the slower candidate's
/// reviews row marked.
fn assert_page(dom: &str, what: &str) {
    assert!(
        dom.contains("<table id=\"table\">"),
        "{what}: no table:\n{dom}"
    );
    let slower =
        "class=\"mirror slower\" data-endpoint=\"GET /api/books/{id}/reviews\" data-version=\"V3\"";
    assert!(
        dom.contains(slower),
        "{what}: the V3 reviews row is not marked slower:\n{dom}"
    );
    let fails = "class=\"mirror fails\" data-endpoint=\"GET /api/stock\"";
    assert!(
        dom.contains(fails),
        "{what}: the V3 stock row is not marked failing"
    );
    assert_eq!(
        dom.matches("class=\"live\" data-endpoint=").count(),
        4,
        "{what}: live rows"
    );
    assert_eq!(
        dom.matches("<figure class=\"chart\"").count(),
        4,
        "{what}: one chart per endpoint"
    );
    assert!(
        dom.contains("<rect class=\"bar\" data-version=\"V3\""),
        "{what}: no candidate bars"
    );
}

/// The agent's page, refreshed in place, and the fleet's page, each rendered by Chromium; a
/// screenshot of the fleet's page for the README.
fn check_pages_in_chromium(cluster: &Netns, node: &Node, fleet_page: &std::path::Path) {
    let url = format!("http://{}/", node.metrics());
    // Five seconds of the page's own time: the two-second refresh runs twice.
    let dom = chromium(cluster, &["--virtual-time-budget=5000", "--dump-dom"], &url);
    assert_page(&dom, "the agent's page");
    assert!(
        dom.contains("data-refreshed=\""),
        "the page did not refresh itself:\n{dom}"
    );
    assert!(!dom.contains("id=\"stale\""), "the refresh failed:\n{dom}");

    let file = format!("file://{}", fleet_page.display());
    let dom = chromium(cluster, &["--dump-dom"], &file);
    assert_page(&dom, "the fleet's page");
    assert!(
        dom.contains("3 agents"),
        "the fleet's page says where it comes from"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-page.png");
    let _ = std::fs::remove_file(&shot);
    let started = Instant::now();
    chromium(
        cluster,
        &[
            "--window-size=1280,1500",
            "--hide-scrollbars",
            &format!("--screenshot={}", shot.display()),
        ],
        &file,
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert_eq!(&png[1..4], b"PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1280);
    eprintln!(
        "the fleet's page: {} (screenshot {} in {:?})",
        fleet_page.display(),
        shot.display(),
        started.elapsed()
    );
}
