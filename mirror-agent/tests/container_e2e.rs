//! The agent in a real container (podman with runc), under exactly the security context of
//! `deploy/daemonset.yaml`: capabilities, no new privileges, a read-only root filesystem, the
//! runtime's default seccomp profile and its read-only `/proc/sys`. The container joins a test
//! namespace in place of hostNetwork. Root only; `cargo xtask test` installs podman and runc.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde::Deserialize;
use serde_yaml::Value;

const MIRROR: &str = "127.0.0.1:9090";

/// The agent's container in `deploy/daemonset.yaml`.
fn agent_container() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let daemonset = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in deploy/daemonset.yaml");
    daemonset["spec"]["template"]["spec"]["containers"][0].clone()
}

/// The container's CPU limit in cores ("1", "1.5", "500m" in the manifest).
fn limit_cores() -> f64 {
    let quantity = agent_container()["resources"]["limits"]["cpu"]
        .as_str()
        .expect("a CPU limit in the DaemonSet")
        .to_string();
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
        None => quantity.parse().unwrap(),
    }
}

/// podman's flags for the agent container's securityContext and CPU limit in the DaemonSet.
fn security_flags() -> Vec<String> {
    let container = agent_container();
    let sc = &container["securityContext"];
    let caps = |key: &str| -> Vec<String> {
        sc["capabilities"][key]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|c| {
                let c = c.as_str().unwrap();
                if c == "ALL" {
                    c.to_string()
                } else {
                    format!("CAP_{c}")
                }
            })
            .collect()
    };
    assert_eq!(
        sc["privileged"].as_bool(),
        Some(false),
        "the DaemonSet must not be privileged"
    );
    let mut flags = Vec::new();
    for c in caps("drop") {
        flags.extend(["--cap-drop".to_string(), c]);
    }
    let add = caps("add");
    assert!(!add.is_empty());
    flags.extend(["--cap-add".to_string(), add.join(",")]);
    if sc["allowPrivilegeEscalation"].as_bool() == Some(false) {
        flags.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    if sc["readOnlyRootFilesystem"].as_bool() == Some(true) {
        flags.push("--read-only".into());
    }
    // The CPU limit, which the agent takes as its CPU budget when none is given.
    flags.extend(["--cpus".into(), limit_cores().to_string()]);
    flags
}

/// A root filesystem holding the agent binary and the libraries it links: no base image (no
/// registry is reachable here); the Dockerfile stays for users.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(AGENT, bin.join("mirror-agent")).unwrap();
    let ldd = Command::new("ldd").arg(AGENT).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap();
    }
    root
}

/// The container, removed on drop whatever happened.
struct Container {
    name: String,
    agent: Option<Agent>,
}

impl Drop for Container {
    fn drop(&mut self) {
        drop(self.agent.take());
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The agent's container as podman runs it: the DaemonSet's security flags (`flags`), the test
/// namespace for hostNetwork, the rootfs with the agent, mirroring srv0's port 8080.
fn podman_agent(name: &str, pair: &Pair, root: &Path, flags: Vec<String>) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "run", "--rm", "--name", name])
        .arg(format!("--network=ns:{}", pair.server.path()))
        .args(flags)
        // podman's own defaults exceed what this host allows (see shared notes).
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--env", "RUST_LOG=info"])
        .arg("--rootfs")
        .arg(format!("{}:O", root.display()))
        .args([
            "/usr/local/bin/mirror-agent",
            "attach",
            "--iface",
            "srv0",
            "--port",
            "8080",
            "--mirror",
            &format!("http://{MIRROR}"),
            "--metrics",
            "127.0.0.1:9464",
        ]);
    cmd
}

/// Whether this process's bounding set holds CAP_SYS_RESOURCE, so that podman can grant it.
fn may_grant_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapBnd in /proc/self/status");
    bounding & (1 << CAP_SYS_RESOURCE) != 0
}

/// Whether the running kernel charges BPF maps to the memlock limit (before 5.11).
fn kernel_charges_memlock() -> bool {
    use mirror_agent::capture::memlock;
    memlock::charges_memlock(memlock::kernel().expect("the kernel's version"))
}

#[test]
fn the_daemonset_security_context_starts_mirrors_and_stops_clean() {
    if not_root() {
        return;
    }
    let pair = Pair::new("ct", 242);
    let live_addr: SocketAddr = format!("{}:8080", pair.server_v4).parse().unwrap();
    let _live = TestServer::start(&pair.server, &[live_addr]);
    let mirror = TestServer::start(&pair.server, &[MIRROR.parse().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let name = netlab::unique("mirror-agent-ct");
    let cmd = podman_agent(&name, &pair, &root, security_flags());
    let mut container = Container {
        name,
        agent: Some(Agent::spawn_command(cmd)),
    };
    let ready = container.agent.as_ref().unwrap().ready_line.clone();
    let id = program_id(&ready);

    let base = format!("http://{live_addr}");
    curl(
        &pair.client,
        &[&format!("{base}/api/books"), &format!("{base}/api/books/2")],
    );
    curl(
        &pair.client,
        &[
            "--data-binary",
            "review=great",
            &format!("{base}/api/books/2/reviews"),
        ],
    );
    assert!(
        netlab::wait_until(Duration::from_secs(10), || mirror.requests() >= 3),
        "the mirror got {} of 3 requests",
        mirror.requests()
    );
    // Replays run concurrently: the mirror's order is not the client's.
    let mut got: Vec<(String, String, Vec<u8>)> = mirror
        .log()
        .into_iter()
        .map(|r| (r.method, r.target, r.body))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("GET".into(), "/api/books".into(), vec![]),
            ("GET".into(), "/api/books/2".into(), vec![]),
            (
                "POST".into(),
                "/api/books/2/reviews".into(),
                b"review=great".to_vec()
            ),
        ]
    );
    // The metrics endpoint answers from inside the container (stats are published every 100 ms).
    let scrape = || {
        let out = pair
            .server
            .exec(&[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:9464/metrics",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut metrics = String::new();
    let counted = netlab::wait_until(Duration::from_secs(5), || {
        metrics = scrape();
        metrics.contains("mirror_http_requests_total 3")
    });
    assert!(counted, "{metrics}");
    // No --cpu-budget: the container's CPU limit is the budget.
    assert!(
        metrics.contains(&format!("mirror_cpu_budget_cores {}", limit_cores())),
        "{metrics}"
    );

    // SIGTERM (podman forwards it) detaches and leaves nothing behind.
    let stderr = container.agent.take().unwrap().terminate();
    assert!(stderr.contains("kernel counters"), "{stderr}");
    // SYS_RESOURCE served only to raise the memlock limit, on kernels that charge it (a
    // sandbox whose bounding set lacks it cannot grant it to the container).
    assert_eq!(
        stderr.contains("CAP_SYS_RESOURCE dropped"),
        may_grant_sys_resource(),
        "{stderr}"
    );
    assert_eq!(
        stderr.contains("charges BPF maps to the memlock limit: raised it from"),
        kernel_charges_memlock(),
        "{stderr}"
    );
    let links = pair.server.ip(&["-o", "link"]);
    assert!(!links.contains("mirr"), "mirror veth left behind:\n{links}");
    assert!(
        netlab::wait_until(Duration::from_secs(5), || !loaded_program_ids(
            mirror_common::PROGRAM_NAME
        )
        .contains(&id)),
        "program {id} still loaded"
    );
}

fn program_id(ready: &str) -> u32 {
    ready
        .rsplit("program id ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no program id in {ready:?}"))
}

/// The DaemonSet's context less SYS_RESOURCE: kernels from 5.11 need nothing more; on older
/// ones the agent cannot load its maps under the runtime's memlock limit, and says which
/// capability, or which node setting, fixes it.
#[test]
fn without_sys_resource_only_kernels_before_5_11_fail_and_name_the_fix() {
    if not_root() {
        return;
    }
    let pair = Pair::new("ctm", 250);
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let mut flags = security_flags();
    let add = flags
        .iter_mut()
        .skip_while(|f| *f != "--cap-add")
        .nth(1)
        .expect("--cap-add");
    assert!(add.contains("CAP_SYS_RESOURCE"), "{add}");
    *add = add
        .split(',')
        .filter(|c| *c != "CAP_SYS_RESOURCE")
        .collect::<Vec<_>>()
        .join(",");
    let name = netlab::unique("mirror-agent-ctm");
    let started = Agent::try_spawn_command(podman_agent(&name, &pair, &root, flags));
    let mut container = Container { name, agent: None };
    match started {
        Ok(agent) => {
            assert!(
                !kernel_charges_memlock(),
                "started without SYS_RESOURCE on a kernel that charges memlock"
            );
            container.agent = Some(agent);
        }
        Err(stderr) => {
            assert!(kernel_charges_memlock(), "{stderr}");
            for fix in [
                "memlock limit of 64 KiB",
                "SYS_RESOURCE",
                "LimitMEMLOCK=infinity",
            ] {
                assert!(stderr.contains(fix), "the error names {fix:?}:\n{stderr}");
            }
        }
    }
}
