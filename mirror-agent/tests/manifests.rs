//! The Kubernetes manifests and the Dockerfile stay in step with the agent: every manifest
//! parses, the agent container's arguments are accepted by the agent's own clap parser (with
//! `$(VAR)` expanded as Kubernetes does), and the capabilities are the few the agent needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use mirror_agent::cli::{Cli, Command};
use serde::Deserialize;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    let mut files = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("lab")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let patch = p.to_string_lossy().ends_with(".patch.yaml");
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") && !patch {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 2, "manifests found: {files:?}");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let docs = serde_yaml::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
                .filter(|v| !v.is_null())
                .collect();
            (p, docs)
        })
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// Expands `$(NAME)` with the container's env and envFrom ConfigMaps, as the kubelet does.
fn expand(arg: &str, env: &HashMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unexpanded variable in {arg:?}");
    out
}

#[test]
fn every_manifest_parses_and_agent_args_are_accepted_by_the_cli() {
    let all = manifests();
    let configmaps: ConfigMaps = all
        .iter()
        .flat_map(|(_, docs)| docs.iter())
        .filter(|d| s(d, &["kind"]).and_then(Value::as_str) == Some("ConfigMap"))
        .map(|d| {
            let name = s(d, &["metadata", "name"])
                .unwrap()
                .as_str()
                .unwrap()
                .to_string();
            let data = serde_yaml::from_value(s(d, &["data"]).unwrap().clone()).unwrap();
            (name, data)
        })
        .collect();
    let mut agents = 0;
    for (path, docs) in &all {
        for d in docs {
            assert!(
                s(d, &["apiVersion"]).is_some() && s(d, &["kind"]).is_some(),
                "{}: a document without kind",
                path.display()
            );
            let Some(containers) =
                s(d, &["spec", "template", "spec", "containers"]).and_then(Value::as_sequence)
            else {
                continue;
            };
            for c in containers {
                let image = s(c, &["image"]).and_then(Value::as_str).unwrap_or("");
                assert!(
                    s(c, &["resources", "limits"]).is_some(),
                    "{}: container without resource limits",
                    path.display()
                );
                let runs_agent = image.starts_with("mirror-agent") && s(c, &["command"]).is_none();
                if !runs_agent {
                    continue;
                }
                agents += 1;
                check_agent(path, d, c, &all, &configmaps);
            }
        }
    }
    assert_eq!(agents, 1, "exactly one agent container (the DaemonSet)");
}

/// The account is bound to a ClusterRole that can only read pods and TrafficMirrors and patch
/// TrafficMirror status.
fn assert_read_only_pod_rbac(all: &[(PathBuf, Vec<Value>)], account: &str) {
    let docs: Vec<&Value> = all.iter().flat_map(|(_, d)| d.iter()).collect();
    let kind = |d: &&Value, k: &str| s(d, &["kind"]).and_then(Value::as_str) == Some(k);
    assert!(docs.iter().any(|d| kind(d, "ServiceAccount")
        && s(d, &["metadata", "name"]).and_then(Value::as_str) == Some(account)));
    let binding = docs
        .iter()
        .find(|d| {
            kind(d, "ClusterRoleBinding")
                && s(d, &["subjects"])
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .any(|x| s(x, &["name"]).and_then(Value::as_str) == Some(account))
        })
        .expect("a ClusterRoleBinding for the agent's account");
    let role_name = s(binding, &["roleRef", "name"])
        .and_then(Value::as_str)
        .unwrap();
    let role = docs
        .iter()
        .find(|d| {
            kind(d, "ClusterRole")
                && s(d, &["metadata", "name"]).and_then(Value::as_str) == Some(role_name)
        })
        .expect("the bound ClusterRole");
    let rules = s(role, &["rules"]).and_then(Value::as_sequence).unwrap();
    let list = |rule: &Value, k: &str| -> Vec<String> {
        s(rule, &[k])
            .and_then(Value::as_sequence)
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let granted: Vec<(Vec<String>, Vec<String>, Vec<String>)> = rules
        .iter()
        .map(|r| (list(r, "apiGroups"), list(r, "resources"), list(r, "verbs")))
        .collect();
    let rule = |g: &str, r: &str, v: &[&str]| {
        (
            vec![g.to_string()],
            vec![r.to_string()],
            v.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        granted,
        [
            rule("", "pods", &["get", "list", "watch"]),
            rule(
                "mirror-agent.dev",
                "trafficmirrors",
                &["get", "list", "watch"]
            ),
            rule("mirror-agent.dev", "trafficmirrors/status", &["patch"]),
        ],
        "read pods and TrafficMirrors, patch only their status"
    );
}

#[test]
fn lab_manifests_have_live_and_mirror_services() {
    let names: Vec<String> = manifests()
        .iter()
        .flat_map(|(_, d)| d.clone())
        .filter(|d| s(d, &["kind"]).and_then(Value::as_str) == Some("Service"))
        .filter_map(|d| {
            s(&d, &["metadata", "name"])
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    for n in ["bookservice", "bookservicemirror", "mirror-agent-metrics"] {
        assert!(
            names.iter().any(|x| x == n),
            "Service {n} missing: {names:?}"
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_and_ships_the_agent() {
    let text = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).unwrap();
    assert!(
        text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    assert!(text.contains("cargo xtask build-ebpf") && text.contains("mirror-agent"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/mirror-agent\"]"));
}

type ConfigMaps = HashMap<String, HashMap<String, String>>;

/// The agent container `c` of DaemonSet `d`: its arguments are the agent's, it follows its
/// node's pods with read-only RBAC, exports metrics where the scrape looks, and asks for no
/// capability it does not use. Returns its parsed arguments.
fn check_agent(
    path: &Path,
    d: &Value,
    c: &Value,
    all: &[(PathBuf, Vec<Value>)],
    configmaps: &ConfigMaps,
) -> Box<mirror_agent::cli::AttachArgs> {
    let mut env = HashMap::new();
    for from in s(c, &["envFrom"])
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = s(from, &["configMapRef", "name"])
            .and_then(Value::as_str)
            .unwrap();
        env.extend(
            configmaps
                .get(name)
                .unwrap_or_else(|| panic!("ConfigMap {name} not defined"))
                .clone(),
        );
    }
    for e in s(c, &["env"])
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        if let (Some(k), Some(v)) = (
            s(e, &["name"]).and_then(Value::as_str),
            s(e, &["value"]).and_then(Value::as_str),
        ) {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let args: Vec<String> = s(c, &["args"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .map(|a| expand(a.as_str().unwrap(), &env))
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("mirror-agent".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{}: the agent rejects {args:?}:\n{e}", path.display()));
    let Command::Attach(a) = cli.command else {
        panic!("the DaemonSet must run `attach`")
    };
    assert!(
        a.traffic_mirrors,
        "the DaemonSet serves the TrafficMirrors (--traffic-mirrors)"
    );
    let node_name = s(c, &["env"])
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|e| s(e, &["name"]).and_then(Value::as_str) == Some("NODE_NAME"));
    assert_eq!(
        node_name
            .and_then(|e| s(e, &["valueFrom", "fieldRef", "fieldPath"]))
            .and_then(Value::as_str),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API, so that each agent watches its node's pods"
    );
    let account = s(d, &["spec", "template", "spec", "serviceAccountName"])
        .and_then(Value::as_str)
        .expect("a ServiceAccount for the pod watch");
    assert_read_only_pod_rbac(all, account);
    assert!(
        a.metrics.is_some(),
        "metrics must be exported for the scrape annotations"
    );

    let caps: Vec<&str> = s(c, &["securityContext", "capabilities", "add"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // TLS capture reads other users' processes' /proc/PID/maps and root: SYS_PTRACE,
    // with hostPID, and only then.
    let tls = !a.tls_port.is_empty();
    for cap in &caps {
        assert!(
            [
                "BPF",
                "PERFMON",
                "NET_ADMIN",
                "NET_RAW",
                "SYS_ADMIN",
                "SYS_RESOURCE"
            ]
            .contains(cap)
                || (tls && *cap == "SYS_PTRACE"),
            "capability {cap} is not needed"
        );
    }
    let host_pid = s(d, &["spec", "template", "spec", "hostPID"]).and_then(Value::as_bool);
    assert_eq!(
        host_pid == Some(true),
        tls,
        "hostPID with TLS capture (to see the pods' processes), and only then"
    );
    if tls {
        assert!(caps.contains(&"SYS_PTRACE"), "TLS capture needs SYS_PTRACE");
        assert!(caps.contains(&"PERFMON"), "uprobes need PERFMON");
    }
    for needed in ["BPF", "NET_ADMIN", "NET_RAW"] {
        assert!(caps.contains(&needed), "capability {needed} missing");
    }
    assert_ne!(
        s(c, &["securityContext", "privileged"]).and_then(Value::as_bool),
        Some(true),
        "privileged: true is not needed"
    );
    let pod = s(d, &["spec", "template", "spec"]).unwrap();
    assert_eq!(
        s(pod, &["hostNetwork"]).and_then(Value::as_bool),
        Some(true),
        "the agent runs in the node's namespace"
    );
    let ann = s(d, &["spec", "template", "metadata", "annotations"]).unwrap();
    assert_eq!(
        s(ann, &["prometheus.io/scrape"]).and_then(Value::as_str),
        Some("true")
    );
    let port: u16 = s(ann, &["prometheus.io/port"])
        .and_then(Value::as_str)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        Some(port),
        a.metrics.map(|m| m.port()),
        "scrape port = --metrics port"
    );
    a
}

/// `deploy/tls-capture.patch.yaml`, applied as `kubectl patch --type json` does, turns TLS
/// capture on: the patched DaemonSet still passes every check, reads TLS on the patch's port,
/// and gains hostPID and SYS_PTRACE (which the plain one must not have).
#[test]
fn the_tls_capture_patch_applies_and_adds_only_what_tls_needs() {
    let all = manifests();
    let configmaps: ConfigMaps = all
        .iter()
        .flat_map(|(_, docs)| docs.iter())
        .filter(|d| s(d, &["kind"]).and_then(Value::as_str) == Some("ConfigMap"))
        .map(|d| {
            let name = s(d, &["metadata", "name"])
                .unwrap()
                .as_str()
                .unwrap()
                .to_string();
            (
                name,
                serde_yaml::from_value(s(d, &["data"]).unwrap().clone()).unwrap(),
            )
        })
        .collect();
    let path = deploy_dir().join("daemonset.yaml");
    let daemonset = all
        .iter()
        .find(|(p, _)| *p == path)
        .and_then(|(_, docs)| {
            docs.iter()
                .find(|d| s(d, &["kind"]).and_then(Value::as_str) == Some("DaemonSet"))
        })
        .expect("the DaemonSet")
        .clone();
    let patch_path = deploy_dir().join("tls-capture.patch.yaml");
    let patch: json_patch::Patch =
        serde_yaml::from_str(&std::fs::read_to_string(&patch_path).unwrap())
            .expect("a JSON patch, in YAML");
    let mut doc: serde_json::Value = serde_json::to_value(&daemonset).unwrap();
    json_patch::patch(&mut doc, &patch).expect("the patch applies to the DaemonSet");
    let patched: Value = serde_json::from_value(doc).unwrap();
    let c = s(&patched, &["spec", "template", "spec", "containers"])
        .and_then(Value::as_sequence)
        .unwrap()[0]
        .clone();
    let plain = s(&daemonset, &["spec", "template", "spec", "containers"])
        .and_then(Value::as_sequence)
        .unwrap()[0]
        .clone();
    assert!(check_agent(&path, &daemonset, &plain, &all, &configmaps)
        .tls_port
        .is_empty());
    let a = check_agent(&patch_path, &patched, &c, &all, &configmaps);
    assert_eq!(a.tls_port, [8443]);
    let mounts = s(&c, &["volumeMounts"])
        .and_then(Value::as_sequence)
        .unwrap();
    assert!(mounts.iter().any(|m| {
        s(m, &["mountPath"]).and_then(Value::as_str) == Some("/sys/kernel/tracing")
            && s(m, &["readOnly"]).and_then(Value::as_bool) == Some(true)
    }));
}

/// The DaemonSet gives the agent the node's cgroup tree, read-only, where it reads the selected
/// pods' CPU pressure by UID (`shedding::live::HOST_CGROUP`).
#[test]
fn the_daemonset_mounts_the_nodes_cgroup_tree_read_only() {
    let path = deploy_dir().join("daemonset.yaml");
    let docs: Vec<Value> = manifests()
        .into_iter()
        .find(|(p, _)| *p == path)
        .map(|(_, d)| d)
        .expect("daemonset.yaml");
    let ds = docs
        .iter()
        .find(|d| s(d, &["kind"]).and_then(Value::as_str) == Some("DaemonSet"))
        .expect("the DaemonSet");
    let pod = s(ds, &["spec", "template", "spec"]).unwrap();
    let container = &s(pod, &["containers"])
        .and_then(Value::as_sequence)
        .unwrap()[0];
    let mount = s(container, &["volumeMounts"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .find(|m| {
            s(m, &["mountPath"]).and_then(Value::as_str)
                == Some(mirror_agent::shedding::live::HOST_CGROUP)
        })
        .expect("a mount at HOST_CGROUP");
    assert_eq!(s(mount, &["readOnly"]).and_then(Value::as_bool), Some(true));
    let name = s(mount, &["name"]).and_then(Value::as_str).unwrap();
    let volume = s(pod, &["volumes"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .find(|v| s(v, &["name"]).and_then(Value::as_str) == Some(name))
        .expect("its volume");
    assert_eq!(
        s(volume, &["hostPath", "path"]).and_then(Value::as_str),
        Some("/sys/fs/cgroup")
    );
}

/// `deploy/prometheus/rules.yaml` is valid, and its unit tests (`tests.yaml`: synthetic series
/// from two agents, one restarted) pass, with Debian's promtool, which `cargo xtask test`
/// installs.
#[test]
fn prometheus_rules_check_and_pass_their_unit_tests() {
    let dir = deploy_dir().join("prometheus");
    let promtool = |args: &[&str]| {
        std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
    };
    let Ok(version) = promtool(&["--version"]) else {
        assert!(
            std::env::var_os("MIRROR_TEST_REQUIRE_ROOT").is_none(),
            "promtool is missing: `cargo xtask test` installs it (Debian's prometheus)"
        );
        eprintln!("skipped: no promtool (apt-get install prometheus)");
        return;
    };
    assert!(version.status.success());
    // Debian's Prometheus is built without Kubernetes discovery: the job is checked with the
    // discovery swapped for a static target, its relabelling and the rest as shipped.
    let shipped = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    assert!(shipped.contains("kubernetes_sd_configs:\n      - role: pod\n"));
    let checked = std::env::temp_dir().join(format!("mirror-scrape-{}.yml", std::process::id()));
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &checked,
        shipped
            .replace(
                "kubernetes_sd_configs:\n      - role: pod\n",
                "static_configs:\n      - targets: ['node1:9464']\n",
            )
            .replace("  - rules.yaml", &format!("  - {}", rules.display())),
    )
    .unwrap();
    let checked_arg = checked.to_string_lossy().into_owned();
    for args in [
        &["check", "rules", "rules.yaml"][..],
        &["test", "rules", "tests.yaml"],
        &["check", "config", &checked_arg],
    ] {
        let out = promtool(args).unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_file(&checked);
}

/// The PrometheusRule carries exactly rules.yaml's groups, and the scrape job and PodMonitor
/// find the DaemonSet's pods on the port it serves /metrics on.
#[test]
fn the_prometheusrule_carries_the_rules_file_and_the_scrape_jobs_find_the_agents() {
    let dir = deploy_dir().join("prometheus");
    let yaml = |name: &str| -> Value {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let first = serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{name}: {e}")))
            .find(|v| !v.is_null());
        first.unwrap_or_else(|| panic!("{name} is empty"))
    };
    let rules = yaml("rules.yaml");
    let operator = yaml("prometheusrule.yaml");
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], rules["groups"]);

    let all = manifests();
    let daemonset = all
        .iter()
        .flat_map(|(_, docs)| docs)
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let pod = &daemonset["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["app"], "mirror-agent");
    let port = &pod["spec"]["containers"][0]["ports"][0];
    assert_eq!(
        (port["name"].as_str(), port["containerPort"].as_u64()),
        (Some("metrics"), Some(9464))
    );
    let monitor = yaml("podmonitor.yaml");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app"],
        "mirror-agent"
    );
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    let job = &yaml("prometheus.yml")["scrape_configs"][0];
    let keeps: Vec<(&str, &str)> = job["relabel_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| {
            (
                r["source_labels"][0].as_str().unwrap(),
                r["regex"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keeps,
        [
            ("__meta_kubernetes_pod_label_app", "mirror-agent"),
            ("__meta_kubernetes_pod_container_port_number", "9464")
        ]
    );
}
