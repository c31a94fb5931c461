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

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// The DaemonSet in `deploy/daemonset.yaml`.
fn daemonset() -> Value {
    let text = std::fs::read_to_string(deploy("daemonset.yaml")).unwrap();
    let found = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet");
    found.expect("a DaemonSet in deploy/daemonset.yaml")
}

/// The DaemonSet with `deploy/tls-capture.patch.yaml` applied, as `kubectl patch` does.
fn tls_daemonset() -> Value {
    let patch: json_patch::Patch =
        serde_yaml::from_str(&std::fs::read_to_string(deploy("tls-capture.patch.yaml")).unwrap())
            .unwrap();
    let mut doc = serde_json::to_value(daemonset()).unwrap();
    json_patch::patch(&mut doc, &patch).unwrap();
    serde_json::from_value(doc).unwrap()
}

/// The agent's container in `deploy/daemonset.yaml`.
fn agent_container() -> Value {
    daemonset()["spec"]["template"]["spec"]["containers"][0].clone()
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
    security_flags_of(&agent_container())
}

fn security_flags_of(container: &Value) -> Vec<String> {
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
    let args = [
        "--iface",
        "srv0",
        "--port",
        "8080",
        "--mirror",
        &format!("http://{MIRROR}"),
        "--metrics",
        "127.0.0.1:9464",
    ];
    podman_agent_in(name, &pair.server, root, flags, &args)
}

/// `mirror-agent attach <args>` in a container in network namespace `ns`.
fn podman_agent_in(
    name: &str,
    ns: &Netns,
    root: &Path,
    flags: Vec<String>,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "run", "--rm", "--name", name])
        .arg(format!("--network=ns:{}", ns.path()))
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
        .args(["/usr/local/bin/mirror-agent", "attach"])
        .args(args);
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

/// tracefs at /sys/kernel/tracing on the host, as the TLS patch's hostPath expects it: mounted
/// for the test where the host has none, and unmounted after.
struct Tracefs {
    mounted: bool,
}

impl Tracefs {
    fn ensure() -> Tracefs {
        const AT: &str = "/sys/kernel/tracing";
        if Path::new(AT).join("events").exists() {
            return Tracefs { mounted: false };
        }
        sh(&["mount", "-t", "tracefs", "tracefs", AT]);
        Tracefs { mounted: true }
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("/sys/kernel/tracing").status();
        }
    }
}

/// podman's flags for the pod spec's hostPID and the container's hostPath volumes.
fn host_flags(daemonset: &Value) -> Vec<String> {
    let spec = &daemonset["spec"]["template"]["spec"];
    let mut flags = Vec::new();
    if spec["hostPID"].as_bool() == Some(true) {
        flags.push("--pid=host".to_string());
    }
    let volumes = spec["volumes"].as_sequence().cloned().unwrap_or_default();
    for m in spec["containers"][0]["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("a volume for each mount");
        let host = v["hostPath"]["path"].as_str().expect("hostPath volumes");
        std::fs::create_dir_all(host).unwrap();
        let ro = if m["readOnly"].as_bool() == Some(true) {
            ":ro"
        } else {
            ""
        };
        flags.extend([
            "-v".to_string(),
            format!("{host}:{}{ro}", m["mountPath"].as_str().unwrap()),
        ]);
    }
    flags
}

/// The DaemonSet with the TLS capture patch, as a container: it finds a pod's nginx by the
/// pod's address among the host's processes, attaches to the libssl in the pod's filesystem,
/// and mirrors what HTTPS clients sent, though the wire carries only TLS.
#[test]
fn the_tls_capture_patch_reads_a_pods_nginx_from_the_container() {
    if not_root() {
        return;
    }
    let _tracefs = Tracefs::ensure();
    let node = Netns::new(&netlab::unique("ctlsn"));
    let pod = Netns::new(&netlab::unique("ctlsp"));
    netlab::link(&node, "vc251", &pod, "eth0", 251);
    let ip = "10.251.0.2";
    let mirror = TestServer::start(&node, &[MIRROR.parse().unwrap()]);
    let certs = Certs::make();
    let _nginx = Nginx::start(
        &pod,
        &format!(
            "server {{\n listen {ip}:8443 ssl;\n ssl_certificate {};\n ssl_certificate_key {};\n \
             location / {{ return 200 \"ok\\n\"; }}\n}}",
            certs.path("server.pem"),
            certs.path("server.key")
        ),
    );
    let base = format!("https://{ip}:8443");
    assert!(
        netlab::wait_until(Duration::from_secs(10), || node
            .exec(&["curl", "-sk", "-o", "/dev/null", &format!("{base}/")])
            .status()
            .is_ok_and(|s| s.success())),
        "nginx never answered HTTPS"
    );
    let daemonset = tls_daemonset();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let mut flags = security_flags_of(container);
    flags.extend(host_flags(&daemonset));
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let name = netlab::unique("mirror-agent-ctls");
    let mirror_url = format!("http://{MIRROR}");
    let cmd = podman_agent_in(
        &name,
        &node,
        &root,
        flags,
        &[
            "--pod-ip",
            ip,
            "--tls-port",
            "8443",
            "--mirror",
            &mirror_url,
            "--host",
            "keep",
        ],
    );
    let mut container = Container {
        name,
        agent: Some(Agent::spawn_command(cmd)),
    };
    let ready = container.agent.as_ref().unwrap().ready_line.clone();
    assert!(
        ready.contains("TLS plaintext on ports [8443] from 2 processes (1 libraries)"),
        "{ready}"
    );
    for i in 0..3 {
        curl(&node, &["-k", &format!("{base}/get/{i}")]);
        curl(
            &node,
            &[
                "-k",
                "--data-binary",
                &format!("order={i}"),
                &format!("{base}/post/{i}"),
            ],
        );
    }
    netlab::wait_until(Duration::from_secs(10), || mirror.requests() >= 6);
    std::thread::sleep(Duration::from_millis(300));
    let stderr = container.agent.take().unwrap().terminate();
    let mut got: Vec<(String, String, Vec<u8>)> = mirror
        .log()
        .into_iter()
        .map(|r| (r.method, r.target, r.body))
        .collect();
    got.sort();
    let mut want: Vec<(String, String, Vec<u8>)> = (0..3)
        .flat_map(|i| {
            [
                ("GET".to_string(), format!("/get/{i}"), vec![]),
                (
                    "POST".to_string(),
                    format!("/post/{i}"),
                    format!("order={i}").into_bytes(),
                ),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(got, want, "{stderr}");
}
