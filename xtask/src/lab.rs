//! `cargo xtask lab`: the traffic-mirroring lab on one machine, with the agent in place of
//! Envoy and Azure.
//!
//! A Kubernetes-node-like topology from network namespaces: a node, a live pod (bookservice
//! v1), a mirror pod (the candidate) and a client, each pod joined to the node by a veth pair as
//! a CNI does it, the node routing between them. One agent runs in the node's namespace for the
//! whole lab and serves a TrafficMirror from a local stand-in for the Kubernetes API, which also
//! announces the live pod; each step changes the TrafficMirror's candidate, as a platform team
//! would with `kubectl apply`, instead of restarting the agent. The poller browses the live
//! service from the client. Each step prints the lab's table, a verdict and the status the agent
//! wrote. Everything is removed on exit, even on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use netlab::kubeapi::FakeApi;
use netlab::{Netns, Proc};

#[derive(clap::Args)]
pub struct LabArgs {
    /// Which candidate(s) to mirror to, one lab step each.
    #[arg(long, value_enum, default_value_t = Candidate::All)]
    pub candidate: Candidate,
    /// Seconds the poller browses the live service in each step.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Halfway through the first step, replace the live pod with a new one on a new address, as
    /// a rollout does. The client goes through a Service address; the agent follows the live
    /// pods by the TrafficMirror's label selector.
    #[arg(long)]
    pub rollout: bool,
    /// The gRPC flavour: the bookservice serves `bookstore.Books` over h2c (tonic) and the
    /// poller calls it on one HTTP/2 connection; the table shows gRPC status codes.
    #[arg(long)]
    pub grpc: bool,
    /// After each step, render the agent's page (`/`) in headless Chromium (Debian's
    /// `chromium`), save a screenshot as DIR/<candidate>.png and print the rows it marks.
    #[arg(long, value_name = "DIR")]
    pub screenshots: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Candidate {
    V2,
    V3,
    V4,
    V5,
    All,
}

struct Step {
    version: &'static str,
    label: &'static str,
    title: &'static str,
    /// Compare contents, with a second mirror running the live version (V1) as the secondary:
    /// what differs between live and it is noise.
    secondary: bool,
}

/// The secondary's name, and its port in the mirror pod.
const SECONDARY: &str = "V1MIR-Secondary";
const SECONDARY_PORT: u16 = 8081;

const STEPS: [Step; 4] = [
    Step {
        version: "v2",
        label: "V2MIR-BookService",
        title: "Step 1: mirror to an identical candidate (V2)",
        secondary: false,
    },
    Step {
        version: "v3",
        label: "V3MIR-BookServiceDelay",
        title: "Step 2: a candidate that is slow on reviews (V3)",
        secondary: false,
    },
    Step {
        version: "v4",
        label: "V4MIR-BookServiceFault",
        title: "Step 3: a candidate that fails on books 2 and 4 (V4)",
        secondary: false,
    },
    Step {
        version: "v5",
        label: "V5MIR-BookServiceRounding",
        title: "Step 4: a candidate that answers 200 quickly with the wrong content (V5), beside a secondary V1",
        secondary: true,
    },
];

const INTERRUPTED: &str = "interrupted: the lab's namespaces, links and processes are removed";
const LIVE_IP: &str = "10.201.0.2";
/// The live pod after a rollout, and the Service address the client uses with `--rollout`.
const NEXT_LIVE_IP: &str = "10.204.0.2";
const SERVICE_IP: &str = "10.200.0.10";
const NODE_NAME: &str = "lab-node";
const LIVE_SELECTOR: &str = "app=bookservice,version=v1";
const MIRROR_IP: &str = "10.202.0.2";
const METRICS: &str = "127.0.0.1:9464";

pub fn run(root: &Path, args: &LabArgs) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    let bin = root.join("target/release");
    let agent = bin.join("mirror-agent");
    let bookservice = bin.join("bookservice");
    let poller = bin.join("poller");

    let base = netlab::unique("lab");
    let node = Netns::new(&format!("{base}node"));
    let live = Netns::new(&format!("{base}live"));
    let mirror = Netns::new(&format!("{base}mirr"));
    let client = Netns::new(&format!("{base}cli"));
    // Pod-side interfaces are eth0, host-side ones veth*, as a CNI names them.
    netlab::link(&node, "vethlive", &live, "eth0", 201);
    netlab::link(&node, "vethmirror", &mirror, "eth0", 202);
    netlab::link(&node, "vethclient", &client, "eth0", 203);
    for (ns, net) in [(&live, 201), (&mirror, 202), (&client, 203)] {
        ns.ip(&["route", "add", "default", "via", &format!("10.{net}.0.1")]);
    }
    netlab::sh(&[
        "ip",
        "netns",
        "exec",
        &node.name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);

    let flavour: &[&str] = if args.grpc { &["--grpc"] } else { &[] };
    let live_pod = Proc::spawn(
        live.exec(&[
            bookservice.to_str().unwrap(),
            "--listen",
            &format!("{LIVE_IP}:8080"),
            "--version",
            "v1",
        ])
        .args(flavour)
        .stderr(Stdio::null()),
    );
    wait_service(&client, &poller, &format!("{LIVE_IP}:8080"), args.grpc)?;
    // The live pod is announced by the API; the agent finds it by the TrafficMirror's labels.
    let kube_dir = tempfile::tempdir()?;
    let api = FakeApi::start(
        &node,
        &[("app", "bookservice"), ("version", "v1")],
        NODE_NAME,
    );
    api.event("ADDED", "bookservice-v1-a", Some(LIVE_IP), true);
    let mut rollout = if args.rollout {
        route_service(&node, LIVE_IP)?;
        println!("Live bookservice V1 at {LIVE_IP}:8080, behind Service {SERVICE_IP}:8080.");
        Some(Rollout {
            old: Some((live, live_pod)),
            new: None,
        })
    } else {
        println!("Live bookservice V1 at {LIVE_IP}:8080 (pod behind vethlive on the node).");
        None
    };
    println!("The agent serves TrafficMirror default/{MIRRORING} and follows the pods it selects ({LIVE_SELECTOR}).\n");
    let mut agent_proc = start_agent(&node, &agent, &api.kubeconfig(kube_dir.path()), args.grpc)?;
    let target_ip = if rollout.is_some() {
        SERVICE_IP
    } else {
        LIVE_IP
    };

    for step in STEPS
        .iter()
        .filter(|s| args.candidate == Candidate::All || s.version == candidate_name(args.candidate))
    {
        if interrupted.load(Ordering::Relaxed) {
            bail!(INTERRUPTED);
        }
        if step.secondary && args.grpc {
            println!("(Step 4 compares HTTP/1 contents; the gRPC flavour skips it.)\n");
            continue;
        }
        println!("=== {} ===", step.title);
        let _candidate = Proc::spawn(
            mirror
                .exec(&[
                    bookservice.to_str().unwrap(),
                    "--listen",
                    &format!("{MIRROR_IP}:8080"),
                    "--version",
                    step.version,
                ])
                .args(flavour)
                .stderr(Stdio::null()),
        );
        wait_service(&node, &poller, &format!("{MIRROR_IP}:8080"), args.grpc)?;
        let _secondary = if step.secondary {
            let listen = format!("{MIRROR_IP}:{SECONDARY_PORT}");
            let pod = Proc::spawn(
                mirror
                    .exec(&[
                        bookservice.to_str().unwrap(),
                        "--listen",
                        &listen,
                        "--version",
                        "v1",
                    ])
                    .stderr(Stdio::null()),
            );
            wait_service(&node, &poller, &listen, false)?;
            Some(pod)
        } else {
            None
        };
        api.traffic_mirror("default", MIRRORING, Some(step.spec()));
        wait_mirroring(&node, &agent, step.label)?;
        wait_mirrored(&node, 1)?;
        println!(
            "poller browsing http://{target_ip}:8080 for {} s ...",
            args.duration
        );
        let mut poll = Proc::spawn(
            client
                .exec(&[
                    poller.to_str().unwrap(),
                    "--target",
                    &format!("http://{target_ip}:8080"),
                    "--seconds",
                    &args.duration.to_string(),
                ])
                .args(flavour)
                .stdout(Stdio::piped()),
        );
        // Ctrl-C reaches the poller and the agent too: the poller may end first.
        let halfway = std::time::Instant::now() + Duration::from_secs(args.duration / 2);
        while poll.child.as_mut().unwrap().try_wait()?.is_none()
            && !interrupted.load(Ordering::Relaxed)
        {
            if let Some(r) = rollout.as_mut() {
                if r.new.is_none() && std::time::Instant::now() >= halfway {
                    r.replace_live_pod(&api, &node, &bin, &base, args.grpc)?;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if interrupted.load(Ordering::Relaxed) {
            bail!(INTERRUPTED);
        }
        let mut summary = String::new();
        BufReader::new(poll.child.as_mut().unwrap().stdout.take().unwrap())
            .read_line(&mut summary)
            .ok();
        println!("{}", summary.trim());
        // Mirrored requests still in flight (V3 takes 1.2 s) finish before the table is read.
        std::thread::sleep(Duration::from_millis(1800));
        let mirroring = format!("default/{MIRRORING}");
        let table = node
            .exec(&[agent.to_str().unwrap(), "report", "--agent", METRICS])
            .args(["--mirroring", &mirroring])
            .output()?;
        if !table.status.success() {
            bail!("report: {}", String::from_utf8_lossy(&table.stderr));
        }
        println!("\n{}", String::from_utf8_lossy(&table.stdout));
        print_status(&api, step.label);
        if let Some(dir) = &args.screenshots {
            screenshot(&node, dir, step.label)?;
        }
    }
    agent_proc.signal(libc::SIGTERM);
    let (code, err) = agent_proc.wait_exit(Duration::from_secs(15));
    if code != Some(0) {
        bail!("the agent exited with {code:?}: {err}");
    }
    println!("Users of the live service saw none of this: every live request was answered by V1.");
    Ok(())
}

/// The agent's page for the lab's TrafficMirror, as headless Chromium renders it: a screenshot
/// in `dir`, and the rows the page marks with a verdict, printed.
fn screenshot(node: &Netns, dir: &Path, candidate: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let profile = tempfile::tempdir()?;
    let url = format!("http://{METRICS}/?mirroring=default%2F{MIRRORING}");
    let shot = dir.join(format!("{candidate}.png"));
    let chromium = |extra: &[String]| -> Result<String> {
        let out = node
            .exec(&["chromium", "--headless", "--no-sandbox", "--disable-gpu"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .env("HOME", profile.path())
            .output()
            .context("chromium (apt-get install chromium)")?;
        if !out.status.success() {
            bail!("chromium: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let dom = chromium(&["--dump-dom".into()])?;
    chromium(&[
        "--window-size=1280,1100".into(),
        "--hide-scrollbars".into(),
        format!("--screenshot={}", shot.display()),
    ])?;
    let mut marked: Vec<String> = ["fails", "differs", "content", "slower"]
        .iter()
        .flat_map(|kind| {
            let pattern = format!("class=\"mirror {kind}\" data-endpoint=\"");
            dom.match_indices(&pattern)
                .filter_map(|(at, _)| {
                    let rest = &dom[at + pattern.len()..];
                    rest.split('"').next().map(|e| format!("{e} {kind}"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    // A candidate row per code: an endpoint with several is named once.
    marked.dedup();
    // Chromium's burst of CPU raises the node's CPU pressure, and the agent sheds new
    // connections while it lasts: the next step waits until it mirrors every one again.
    let calm = netlab::wait_until(Duration::from_secs(30), || {
        metrics(node).is_some_and(|text| {
            text.lines()
                .filter(|l| l.starts_with("mirror_sampled_connections_share"))
                .all(|l| l.ends_with(" 1") || l.ends_with(" 1.0"))
        })
    });
    if !calm {
        println!("(the agent still sheds connections after rendering the page: the next step may mirror fewer)");
    }
    println!(
        "page: {} ({} rows, {} charts; marked: {})\n",
        shot.display(),
        dom.matches("<tr class=").count(),
        dom.matches("<figure class=\"chart\"").count(),
        if marked.is_empty() {
            "none".to_string()
        } else {
            marked.join(", ")
        }
    );
    Ok(())
}

/// The TrafficMirror the lab's steps change.
const MIRRORING: &str = "bookservice";

impl Step {
    /// The TrafficMirror's spec for this step: the candidate (and the secondary, comparing
    /// contents), rows tagged as the seed's table tags them.
    fn spec(&self) -> serde_json::Value {
        let mut candidates = vec![serde_json::json!({
            "name": self.label,
            "url": format!("http://{MIRROR_IP}:8080"),
        })];
        if self.secondary {
            candidates.push(serde_json::json!({
                "name": SECONDARY,
                "url": format!("http://{MIRROR_IP}:{SECONDARY_PORT}"),
                "secondary": true,
            }));
        }
        serde_json::json!({
            "selector": {"matchLabels": {"app": "bookservice", "version": "v1"}},
            "ports": [8080],
            "candidates": candidates,
            "compare": {"liveLabel": "V1MIR-LiveBookService", "bodies": self.secondary},
        })
    }
}

/// Starts the agent for the whole lab: it serves the TrafficMirrors of the API at `kubeconfig`
/// on this node, and compares contents where a TrafficMirror asks.
fn start_agent(node: &Netns, agent: &Path, kubeconfig: &Path, grpc: bool) -> Result<Proc> {
    let mut cmd = node.exec(&[agent.to_str().unwrap(), "attach", "--traffic-mirrors"]);
    cmd.env("KUBECONFIG", kubeconfig)
        .args(["--node-name", NODE_NAME, "--port", "8080"])
        .args(["--metrics", METRICS, "--no-report"]);
    if !grpc {
        cmd.arg("--compare-bodies");
    }
    let mut proc = Proc::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let stdout = proc.child.as_mut().unwrap().stdout.take().unwrap();
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready)?;
    if !ready.starts_with("ready:") {
        let (_, err) = proc.wait_exit(Duration::from_secs(5));
        bail!("the agent did not start: {err}");
    }
    println!("agent {}", ready.trim());
    Ok(proc)
}

/// Waits (at most 10 s) until the agent runs the TrafficMirror with `candidate`.
fn wait_mirroring(node: &Netns, agent: &Path, candidate: &str) -> Result<()> {
    let mirroring = format!("default/{MIRRORING}");
    let runs = netlab::wait_until(Duration::from_secs(10), || {
        node.exec(&[agent.to_str().unwrap(), "report", "--agent", METRICS])
            .args(["--mirroring", &mirroring, "--format", "json"])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains(candidate)
            })
    });
    if !runs {
        bail!("the agent did not start mirroring to {candidate} within 10 s of the TrafficMirror's change");
    }
    println!("TrafficMirror default/{MIRRORING} now mirrors to {candidate}");
    Ok(())
}

/// The status the agent wrote for this node, as `kubectl get trafficmirrors` would show it,
/// once it names this step's candidate.
fn print_status(api: &FakeApi, candidate: &str) {
    let entry = || {
        api.status_patches()
            .into_iter()
            .rev()
            .map(|(_, _, body)| body["status"]["nodes"][0].clone())
            .find(|n| n["verdict"].as_str().is_some_and(|v| v.contains(candidate)))
    };
    netlab::wait_until(Duration::from_secs(5), || entry().is_some());
    match entry() {
        Some(n) => println!(
            "status on {}: pods {}, mirrored {}, verdict \"{}\"\n",
            n["node"].as_str().unwrap_or("?"),
            n["pods"],
            n["mirrored"],
            n["verdict"].as_str().unwrap_or("")
        ),
        None => println!("(the agent wrote no status naming {candidate} within 5 s)\n"),
    }
}

/// The live pods of a rollout.
struct Rollout {
    /// The pod being replaced, until it is gone.
    old: Option<(Netns, Proc)>,
    new: Option<(Netns, Proc)>,
}

impl Rollout {
    /// What a Deployment rollout does: the new pod starts and becomes Ready, the Service sends
    /// new connections to it, the old pod stops being Ready, is deleted and exits.
    fn replace_live_pod(
        &mut self,
        api: &FakeApi,
        node: &Netns,
        bin: &Path,
        base: &str,
        grpc: bool,
    ) -> Result<()> {
        let flavour: &[&str] = if grpc { &["--grpc"] } else { &[] };
        let pod = Netns::new(&format!("{base}live2"));
        netlab::link(node, "vethlive2", &pod, "eth0", 204);
        pod.ip(&["route", "add", "default", "via", "10.204.0.1"]);
        let proc = Proc::spawn(
            pod.exec(&[
                bin.join("bookservice").to_str().unwrap(),
                "--listen",
                &format!("{NEXT_LIVE_IP}:8080"),
                "--version",
                "v1",
            ])
            .args(flavour)
            .stderr(Stdio::null()),
        );
        wait_service(
            node,
            &bin.join("poller"),
            &format!("{NEXT_LIVE_IP}:8080"),
            grpc,
        )?;
        api.event("ADDED", "bookservice-v1-b", Some(NEXT_LIVE_IP), true);
        // Endpoints reach kube-proxy some time after a pod is Ready; the agent's watch is
        // usually first. Here the Service switches once the agent mirrors both pods.
        wait_mirrored(node, 2)?;
        route_service(node, NEXT_LIVE_IP)?;
        // The old pod terminates: no longer Ready, it answers its open connections (still
        // mirrored) until it exits; then it is deleted.
        api.event("MODIFIED", "bookservice-v1-a", Some(LIVE_IP), false);
        std::thread::sleep(Duration::from_millis(300));
        if let Some((ns, proc)) = self.old.take() {
            drop(proc);
            api.event("DELETED", "bookservice-v1-a", Some(LIVE_IP), false);
            wait_mirrored(node, 1)?;
            drop(ns);
        }
        self.new = Some((pod, proc));
        println!(
            "rollout: live pod {LIVE_IP} replaced by {NEXT_LIVE_IP}; the agent follows it by label"
        );
        Ok(())
    }
}

/// The agent's `/metrics` text, if it answers within a second.
fn metrics(node: &Netns) -> Option<String> {
    let url = format!("http://{METRICS}/metrics");
    let out = node
        .exec(&["curl", "-sf", "--max-time", "1", &url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits (at most 5 s) until the agent mirrors `pods` pods.
fn wait_mirrored(node: &Netns, pods: usize) -> Result<()> {
    let line = format!("mirror_pods_mirrored {pods}");
    let ok = netlab::wait_until(Duration::from_secs(5), || {
        metrics(node).is_some_and(|text| text.lines().any(|l| l == line))
    });
    if !ok {
        bail!("the agent did not mirror {pods} pods within 5 s");
    }
    Ok(())
}

/// Points the Service address at `pod_ip` for new connections, as kube-proxy does.
fn route_service(node: &Netns, pod_ip: &str) -> Result<()> {
    let ipt = |args: &[&str]| -> Result<()> {
        let status = node
            .exec(&["iptables", "-t", "nat"])
            .args(args)
            .status()
            .context("running iptables (apt-get install iptables)")?;
        if !status.success() {
            bail!("iptables {args:?} failed");
        }
        Ok(())
    };
    let rule = [
        "PREROUTING",
        "-d",
        SERVICE_IP,
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "DNAT",
        "--to-destination",
    ];
    let to = format!("{pod_ip}:8080");
    ipt(&["-F", "PREROUTING"])?;
    let mut add: Vec<&str> = vec!["-A"];
    add.extend(rule);
    add.push(&to);
    ipt(&add)
}

fn candidate_name(c: Candidate) -> &'static str {
    match c {
        Candidate::V2 => "v2",
        Candidate::V3 => "v3",
        Candidate::V4 => "v4",
        Candidate::V5 => "v5",
        Candidate::All => "all",
    }
}

/// Waits until the bookservice at `addr` answers from inside `ns`, at most 10 s: its JSON
/// list over curl, or one gRPC round of the poller.
fn wait_service(ns: &Netns, poller: &Path, addr: &str, grpc: bool) -> Result<()> {
    let url = format!("http://{addr}");
    let ok = netlab::wait_until(Duration::from_secs(10), || {
        let mut probe = if grpc {
            let mut p = ns.exec(&[poller.to_str().unwrap(), "--grpc", "--target", &url]);
            p.args(["--seconds", "1", "--max-requests", "1"]);
            p
        } else {
            ns.exec(&[
                "curl",
                "-sf",
                "--max-time",
                "1",
                "-o",
                "/dev/null",
                &format!("{url}/api/books"),
            ])
        };
        probe
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("{url} did not answer within 10 s"))
    }
}
