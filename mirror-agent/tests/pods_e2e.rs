//! Pods by label across a rollout (root only). No kube-apiserver can run here, so a local server
//! speaks the API's list-and-watch protocol with real Pod JSON: a list, then a watch stream of
//! ADDED / MODIFIED / DELETED events, a bookmark, a dropped watch connection that must be
//! resumed, a `410 Gone` that forces a relist, and `403 Forbidden` at first. The pods are real
//! network namespaces behind veths on a node namespace, as a CNI sets them up.

mod common;

use std::time::Duration;

use common::*;
use netlab::kubeapi::FakeApi;

const MIRROR: &str = "127.0.0.1:9093";
const METRICS: &str = "127.0.0.1:9465";

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
    if not_root() {
        return;
    }
    let node = Netns::new(&netlab::unique("node"));
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let api = FakeApi::start(&node, &[("app", "books")], "node1");
    // The agent starts before its RBAC is in place, and with no pod matching yet.
    api.forbid_lists(2);
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
        netlab::wait_until(Duration::from_secs(20), || api.lists() >= 1),
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
    let lists_before = api.lists();
    api.drop_watch();
    api.gone();
    assert!(
        netlab::wait_until(Duration::from_secs(20), || api.lists() > lists_before),
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
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode1")
                && r.contains("labelSelector=app%3Dbooks")),
        "{requests:?}"
    );
}
