//! The mirror-agent binary: a launcher. It maps the command line to the library's configuration
//! (`AgentConfig`, `PlaybackConfig`), runs `Agent::start` and `Agent::run` until a signal, and
//! turns library errors into messages that name the fix. The stages live in the library.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use mirror_agent::agent::{Agent, AgentConfig, AgentError, MirrorTarget};
use mirror_agent::capture::netdev;
use mirror_agent::capture::ring::RingConfig;
use mirror_agent::capture::tls::TlsConfig;
use mirror_agent::capture::{CaptureConfig, CaptureError, Hook, MatchConfig, Target};
use mirror_agent::cli::{
    mirror_names, AttachArgs, Cli, Command, Delivery, ExportArgs, ReplayArgs, ReportFormat,
    ResponseCapture,
};
use mirror_agent::compare::content::ContentConfig;
use mirror_agent::compare::diffs::DiffConfig;
use mirror_agent::compare::{self, format_table, CompareConfig};
use mirror_agent::exchange::content::ContentCapture;
use mirror_agent::http::HttpConfig;
use mirror_agent::memory_budget;
use mirror_agent::mirrorings::{self, Declarations, LaneTemplate, MirroringsConfig};
use mirror_agent::pipeline::PipelineConfig;
use mirror_agent::pods::PodSelector;
use mirror_agent::reassembly::ReassemblyConfig;
use mirror_agent::record::{self, playback::PlaybackConfig, RecordConfig};
use mirror_agent::redact::Redactor;
use mirror_agent::replay::secrets::{self, SecretHeader, SecretWatch};
use mirror_agent::replay::{self, MirrorError, ReplayConfig};
use mirror_agent::shedding::{LiveService, SheddingConfig};
use tokio::signal::unix::{signal, SignalKind};

mod report;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Attach(args) => attach(*args),
        Command::Report(args) => report::run(args),
        Command::Replay(args) => playback(*args),
        Command::Export(args) => export(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn attach(args: AttachArgs) -> Result<()> {
    // Before any thread: it raises the memlock limit where the kernel needs it, then gives up
    // CAP_SYS_RESOURCE for every thread to come.
    mirror_agent::capture::memlock::prepare();
    // One runtime thread per mirror, up to the CPUs: with two for one mirror, the second mostly
    // woke to take a task the first was about to run (measured at 20k req/s: 28 % more context
    // switches and 12 % more CPU per mirrored request than with one).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.mirror.len().clamp(1, cpus))
        .enable_all()
        .build()?;
    // Handlers before anything is attached or announced: a supervisor may signal as soon as it
    // reads the ready line, and the default action would skip the clean shutdown.
    let (mut term, mut interrupt) = {
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let secrets = args.requests.secret_headers().context("--secret-header")?;
    let _rereads = SecretWatch::start(secrets.clone(), secrets::REREAD_EVERY)?;
    let cfg = agent_config(&args, &secrets, &rt)?;
    let agent = Agent::start(cfg, rt.handle()).map_err(with_hint)?;
    emit(&format!("{}\n", agent.ready_line()));
    let summary = rt.block_on(agent.run(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    }))?;
    for line in summary.lines() {
        eprintln!("{line}");
    }
    if !args.no_report {
        emit(&format!("{}\n", format_table(&summary.report)));
    }
    if let Some(path) = &args.metrics_file {
        std::fs::write(path, &summary.metrics)
            .with_context(|| format!("--metrics-file: writing {}", path.display()))?;
    }
    if let (Some(path), Some(dump)) = (args.dump, summary.dump) {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        dump.write_to(&mut f)?;
        f.flush()?;
    }
    // Losses are the traffic's, not a failure of the agent: they are in the metrics and the
    // summary above, and a clean stop exits 0 whatever they were.
    let ring_drops = summary.capture.ring_drops.load(Ordering::Relaxed);
    if ring_drops > 0 {
        log::warn!(
            "the capture ring dropped {ring_drops} frames ({} requests lost): raise --ring-mb",
            summary.capture.requests_lost.load(Ordering::Relaxed)
        );
    }
    Ok(())
}

/// The agent's configuration from the command line: targets (pod IPs found by route), the
/// memory plan, and the mirror, resolved.
fn agent_config(
    args: &AttachArgs,
    secrets: &[Arc<SecretHeader>],
    rt: &tokio::runtime::Runtime,
) -> Result<AgentConfig> {
    if let Some(p) = args.tls_port.iter().find(|p| args.port.contains(p)) {
        anyhow::bail!(
            "port {p} is both a --port and a --tls-port: its bytes on the wire are TLS, read it \
             with --tls-port only"
        );
    }
    // A dump shows the streams as they crossed the wire, response bodies included.
    let response_heads = args.response_capture == ResponseCapture::Heads && args.dump.is_none();
    let capture = capture_config(args, targets(args)?, response_heads);
    let (budget, budget_source) = match args.memory_budget {
        Some(b) => (b, "--memory-budget".to_string()),
        None => memory_budget::default_budget(),
    };
    let ring_bytes = (capture.ring.block_count * capture.ring.block_size) as u64
        + u64::from(capture.records_ring_bytes);
    let plan = memory_budget::Plan::new(budget, ring_bytes, compare::series_bytes())?;
    log::info!("memory budget {budget} bytes ({budget_source}): {plan:?}");
    let names = mirror_names(
        &args.mirror,
        &args.series.mirror_label,
        &args.series.live_label,
    )
    .map_err(anyhow::Error::msg)?;
    let content = content_capture(args)?;
    let split = plan.split(args.mirror.len(), args.compare_bodies);
    let mirrors = mirror_targets(
        args,
        &names,
        split.queue_bytes_per_mirror,
        &content,
        secrets,
        rt,
    )?;
    let pipeline = pipeline_config(
        args,
        &capture,
        &plan,
        response_heads,
        mirrors.len(),
        &content,
    );
    let (record, diffs) = kept_and_compared(args, &names, content.clone(), &split)?;
    let compare = CompareConfig {
        live_label: args.series.live_label.clone(),
        mirror_labels: names,
        routes: args.series.routes.clone(),
        max_endpoints: args.max_endpoints,
        max_series: plan.max_series,
        max_pending: split.max_pending,
        diffs,
    };
    Ok(AgentConfig {
        record,
        pipeline,
        mirrors,
        mirrorings: mirrorings_config(args, &compare, &content, &split)?,
        compare,
        pods: args.selector.as_ref().map(|labels| PodSelector {
            labels: labels.clone(),
            namespace: args.namespace.clone(),
            node: args.node_name.clone(),
            in_pod: args.in_pod,
        }),
        in_pod: if args.in_pod {
            args.pod_ip.clone()
        } else {
            Vec::new()
        },
        metrics: args.metrics,
        stats_interval: args.stats_interval,
        shedding: shedding_config(args, &capture),
        capture,
    })
}

/// `--config` (the file, checked once now so that a broken one fails the start) or
/// `--traffic-mirrors`, and what each
/// declared mirroring's stages start from: the command line's caps and comparison settings.
fn mirrorings_config(
    args: &AttachArgs,
    compare: &CompareConfig,
    content: &Option<ContentCapture>,
    split: &memory_budget::Split,
) -> Result<Option<MirroringsConfig>> {
    let declarations = match (&args.config, args.traffic_mirrors) {
        (Some(file), _) => {
            let declared = mirrorings::source::read(file).context("--config")?;
            log::info!("--config {}: {} mirrorings", file.display(), declared.len());
            Declarations::File(file.clone())
        }
        (None, true) => Declarations::Cluster {
            namespace: args.namespace.clone(),
        },
        (None, false) => return Ok(None),
    };
    let replay = ReplayConfig {
        max_rps: args.max_rps,
        max_inflight: args.max_inflight,
        pipeline_depth: args.pipeline_depth.into(),
        queue_bytes: args
            .queue_bytes
            .map_or(split.queue_bytes_per_mirror, |q| q as usize),
        content: content.clone(),
        timeout: Duration::from_secs_f64(args.requests.timeout),
        // Each candidate sets its own URL.
        ..ReplayConfig::new(hyper::Uri::from_static("http://candidate.invalid"))
    };
    Ok(Some(MirroringsConfig {
        declarations,
        node: args.node_name.clone(),
        in_pod: args.in_pod,
        template: LaneTemplate {
            replay,
            tls: args.requests.tls_options(),
            mark: args.requests.mark.clone(),
            compare: compare.clone(),
            captured_ports: args.port.iter().chain(&args.tls_port).copied().collect(),
            grace: Duration::from_secs_f64(args.requests.timeout.min(5.0)),
            record: args
                .record_mirrorings
                .as_ref()
                .map(|dir| record_config(args, dir, None)),
            redact_key: args
                .redact
                .redact_key
                .as_deref()
                .map(mirror_agent::redact::read_key)
                .transpose()?,
        },
    }))
}

/// The limits on the share mirrored: `--sample`, the CPU budget and the live CPU pressure of
/// the service the capture matches.
fn shedding_config(args: &AttachArgs, capture: &CaptureConfig) -> SheddingConfig {
    SheddingConfig {
        max_ppm: capture.matching.sample_ppm,
        cpu_budget: cpu_budget(args),
        max_live_pressure: args.max_live_pressure.0,
        live: LiveService {
            ports: capture.matching.ports.clone(),
            addrs: capture.matching.addrs.clone(),
            pod_uids: Vec::new(),
        },
    }
}

/// Reassembly and HTTP extraction, sized by the memory plan.
fn pipeline_config(
    args: &AttachArgs,
    capture: &CaptureConfig,
    plan: &memory_budget::Plan,
    response_heads: bool,
    mirrors: usize,
    content: &Option<ContentCapture>,
) -> PipelineConfig {
    PipelineConfig {
        reassembly: ReassemblyConfig {
            // TLS connections are the probed processes' own: their local port is the server's.
            server_ports: args.port.iter().chain(&args.tls_port).copied().collect(),
            server_addrs: capture.matching.addrs.clone(),
            max_flows: plan.max_flows,
            max_ooo_bytes_total: plan.ooo_bytes,
            // With heads, a clone placed out of order (its mark lost) may follow a RST.
            reset_linger_ns: if response_heads { 50_000_000 } else { 0 },
            ..ReassemblyConfig::default()
        },
        http: HttpConfig {
            track_responses: !args.no_responses,
            response_heads,
            max_buffered_bytes: plan.http_buffered_bytes,
            // One copy of a streamed body per mirror, and one for the recording.
            // Declared mirrorings' candidates too: eight, a TrafficMirror's most.
            stream_copies: (mirrors
                + usize::from(args.record.is_some())
                + if args.config.is_some() || args.traffic_mirrors {
                    8
                } else {
                    0
                })
            .max(1),
            content: content.clone(),
            ..HttpConfig::default()
        },
        dump_streams: args.dump.is_some().then_some(args.dump_max_bytes),
        tick: Duration::from_millis(100),
    }
}

/// The interfaces to attach to: those named, and those behind the pods named (by route).
fn targets(args: &AttachArgs) -> Result<Vec<Target>> {
    let mut targets: Vec<Target> = args
        .iface
        .iter()
        .map(|iface| Target::here(iface.clone(), args.direction))
        .collect();
    // Pods attached inside their namespace are attached once the capture runs; pods read only
    // by their TLS library (no --port) are not attached on the wire, whose bytes are TLS.
    let on_host_veth = if args.in_pod || args.port.is_empty() {
        &[][..]
    } else {
        &args.pod_ip[..]
    };
    for ip in on_host_veth {
        let iface = netdev::iface_for_pod(*ip).map_err(with_hint)?;
        log::info!("pod {ip} is behind {iface}: attaching to its egress");
        let target = Target::here(iface, Hook::Egress);
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    Ok(targets)
}

/// `--cpu-budget`, or the cgroup's CPU limit; the log says which, or why there is none.
fn cpu_budget(args: &AttachArgs) -> Option<f64> {
    if let Some(cores) = args.cpu_budget {
        return Some(cores);
    }
    let limit = mirror_agent::cpu_budget::cgroup_cpu_limit(std::path::Path::new("/"));
    match limit {
        Some(cores) => log::info!("CPU budget {cores:.2} cores: the cgroup's CPU limit"),
        None if std::fs::read_dir("/sys/fs/cgroup").is_ok_and(|mut d| d.next().is_some()) => {
            log::info!("no CPU budget: no cgroup CPU limit and no --cpu-budget")
        }
        None => log::info!(
            "no CPU budget: no cgroup filesystem at /sys/fs/cgroup to read a limit from \
             (`ip netns exec` mounts a fresh /sys); --cpu-budget sets one"
        ),
    }
    limit
}

fn capture_config(args: &AttachArgs, targets: Vec<Target>, response_heads: bool) -> CaptureConfig {
    let mut addrs = args.addrs.clone();
    addrs.extend(&args.pod_ip);
    let ppm = |share: f64| (share * 10_000.0).round() as u32;
    CaptureConfig {
        targets,
        matching: MatchConfig {
            ports: args.port.clone(),
            // Selected pods come and go: none selected must not mean every address.
            addr_filter: !addrs.is_empty() || args.selector.is_some() || args.traffic_mirrors,
            addrs,
            responses: !args.no_responses,
            response_heads,
            // A dump shows the streams as they crossed the wire: whole clones.
            payload_records: args.delivery == Delivery::Records && args.dump.is_none(),
            sample_ppm: ppm(args.sample),
            // Every limit may change the rates at run time (the backlog's always can): each
            // connection is decided once, so that shedding takes whole connections only.
            sticky_sampling: true,
            whole_responses_ppm: if args.compare_bodies {
                ppm(args.compare_sample)
            } else {
                0
            },
        },
        attach_mode: args.attach_mode,
        records_ring_bytes: match args.records_ring_kb {
            Some(kb) => kb * 1024,
            None if args.delivery == Delivery::Records => mirror_common::PAYLOAD_RING_BYTES,
            None => mirror_common::RESPONSE_HEADS_RING_BYTES,
        },
        ring: RingConfig {
            block_count: args.ring_mb as usize,
            block_size: args
                .ring_block_kb
                .map_or(RingConfig::default().block_size, |kb| kb as usize * 1024),
            ..RingConfig::default()
        },
        ebpf_log: args.ebpf_log,
        read_clones: !args.no_reader,
        tls: (!args.tls_port.is_empty()).then(|| TlsConfig {
            ports: args.tls_port.clone(),
            pids: args.tls_pid.clone(),
            pods: args.pod_ip.clone(),
        }),
        ..CaptureConfig::default()
    }
}

/// What of live responses is kept for `--compare-bodies`.
fn content_capture(args: &AttachArgs) -> Result<Option<ContentCapture>> {
    if !args.compare_bodies {
        return Ok(None);
    }
    if args.mirror.is_empty() && args.config.is_none() && !args.traffic_mirrors {
        anyhow::bail!(
            "--compare-bodies compares mirrors' answers: give --mirror, --config or --traffic-mirrors"
        );
    }
    Ok(Some(ContentCapture {
        max_body: args.compare_max_body as usize,
        share_ppm: (args.compare_sample * 10_000.0).round() as u32,
        headers: if args.compare_headers.is_empty() {
            vec!["content-type".to_string()]
        } else {
            args.compare_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect()
        },
    }))
}

/// Each `--mirror`, its URL parsed and its address resolved and checked.
fn mirror_targets(
    args: &AttachArgs,
    names: &[String],
    queue_bytes: usize,
    content: &Option<ContentCapture>,
    secrets: &[Arc<SecretHeader>],
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<MirrorTarget>> {
    let writes = args.requests.write_policy();
    writes.check(names).context("--writes")?;
    if !names.is_empty() {
        log::info!("{}", writes.describe());
    }
    let mut mirrors = Vec::new();
    for (m, name) in args.mirror.iter().zip(names) {
        let named =
            |e: MirrorError| with_hint(anyhow::Error::new(e).context(format!("--mirror {name}")));
        let uri = replay::parse_mirror_url(&m.url).map_err(named)?;
        let tls = replay::mirror_tls(&uri, &args.requests.tls_options())
            .with_context(|| format!("--mirror {name}"))?;
        let addr = rt
            .block_on(replay::check_mirror(&uri, tls.as_ref()))
            .map_err(named)?;
        let replay = ReplayConfig {
            tls,
            max_rps: args.max_rps,
            max_inflight: args.max_inflight,
            pipeline_depth: args.pipeline_depth.into(),
            queue_bytes: args.queue_bytes.map_or(queue_bytes, |q| q as usize),
            content: content.clone(),
            secret_headers: secrets.to_vec(),
            ..args.requests.replay_config(uri, name)
        };
        mirrors.push(MirrorTarget {
            name: name.clone(),
            replay,
            addr,
        });
    }
    Ok(mirrors)
}

/// What is recorded (`--record`) and how contents are compared (`--compare-bodies`), both
/// redacted by the same rules.
fn kept_and_compared(
    args: &AttachArgs,
    names: &[String],
    content: Option<ContentCapture>,
    split: &memory_budget::Split,
) -> Result<(Option<RecordConfig>, Option<DiffConfig>)> {
    let redactor = args.redact.redactor()?;
    if let Some(r) = &redactor {
        log::info!("{}", r.describe());
    }
    let diffs = match content {
        Some(c) => Some(diff_config(args, names, c, split, redactor.clone())?),
        None => None,
    };
    let record = args
        .record
        .as_ref()
        .map(|dir| record_config(args, dir, redactor));
    Ok((record, diffs))
}

/// How contents are compared (`--compare-bodies`), and which mirror cancels noise.
fn diff_config(
    args: &AttachArgs,
    names: &[String],
    content: ContentCapture,
    split: &memory_budget::Split,
    redactor: Option<Redactor>,
) -> Result<DiffConfig> {
    let secondary = match &args.secondary {
        Some(s) => Some(names.iter().position(|n| n == s).with_context(|| {
            format!(
                "--secondary {s}: no mirror has that name (mirrors: {})",
                names.join(", ")
            )
        })?),
        None => None,
    };
    Ok(DiffConfig {
        content: ContentConfig {
            headers: content.headers,
            redacted: redacted_headers(&args.requests.kept_private()),
            array_keys: args.array_keys.clone(),
            redactor,
        },
        ignore: args.ignore.clone(),
        secondary,
        max_pending: split.max_pending,
        max_bytes: split.content_bytes,
    })
}

/// How a recording in `dir` is written: sizes and ages from the command line, private headers
/// left out, values redacted by `redactor`.
fn record_config(
    args: &AttachArgs,
    dir: &std::path::Path,
    redactor: Option<Redactor>,
) -> RecordConfig {
    RecordConfig {
        dir: dir.to_path_buf(),
        file_bytes: args.record_file_size,
        file_age: Duration::from_secs(args.record_file_seconds.max(1)),
        max_bytes: args.record_max_size,
        drop_headers: args
            .requests
            .kept_private()
            .iter()
            .map(|h| h.to_string())
            .collect(),
        redactor,
        queue: 64 << 10,
        block_age: record::writer::BLOCK_AGE,
    }
}

/// Adds to `e` what the user can do about it, named by the first typed error in its chain.
fn with_hint(e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = e.into();
    match e.chain().find_map(hint) {
        Some(h) => anyhow::anyhow!("{e:#}. Fix: {h}"),
        None => e,
    }
}

fn hint(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(m) = e.downcast_ref::<MirrorError>() {
        return Some(mirror_hint(m).to_string());
    }
    if let Some(a) = e.downcast_ref::<AgentError>() {
        return match a {
            AgentError::Kubernetes(_) => Some(
                "run the agent in a pod with a ServiceAccount allowed to list and watch pods \
                 (deploy/), or set KUBECONFIG"
                    .into(),
            ),
            AgentError::Metrics { .. } => Some(
                "give --metrics a free port on an address of this host, such as 0.0.0.0:9090"
                    .into(),
            ),
            AgentError::Capture(c) => capture_hint(c),
            AgentError::MirrorRoute { source, .. } => capture_hint(source),
            AgentError::Mirror { source, .. } => Some(mirror_hint(source).to_string()),
            AgentError::Record(_) => Some(
                "give --record a directory the agent may create and write (in a pod, a mounted \
                 volume)"
                    .into(),
            ),
            AgentError::PipelinePanicked | AgentError::Thread(_) => None,
        };
    }
    e.downcast_ref::<CaptureError>().and_then(capture_hint)
}

fn mirror_hint(m: &MirrorError) -> &'static str {
    match m {
        MirrorError::NotAUrl { .. }
        | MirrorError::Scheme { .. }
        | MirrorError::NoScheme { .. }
        | MirrorError::NoHost { .. } => "give --mirror a URL such as http://bookservicemirror:8080",
        MirrorError::Resolve { .. } | MirrorError::NoAddress { .. } => {
            "check the host in --mirror (and DNS)"
        }
        MirrorError::FeedbackLoop { .. } => {
            "give --addr with the live service's address so that only it is matched, or move \
             the mirror to another port"
        }
    }
}

fn capture_hint(c: &CaptureError) -> Option<String> {
    const PRIVILEGES: &str = "run it as root (sudo), or grant CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW \
         and CAP_SYS_ADMIN (in Kubernetes: the securityContext in deploy/daemonset.yaml)";
    if c.permission_denied() {
        return Some(format!("mirror-agent lacks a privilege: {PRIVILEGES}"));
    }
    let hint = match c {
        CaptureError::MissingCapabilities { .. } => format!(
            "mirror-agent needs them to load the TC program and read its mirror interface: \
             {PRIVILEGES}"
        ),
        CaptureError::NothingToAttach => "give --iface, --pod-ip or --selector".into(),
        CaptureError::NoSuchInterface { .. } => "list the interfaces with `ip link`; for a pod, \
             give --pod-ip or run the agent in the node's network namespace"
            .into(),
        CaptureError::NotEthernet { .. } => "attach to an Ethernet interface, such as a pod's \
             veth or eth0, or to lo"
            .into(),
        CaptureError::InterfaceBusy { .. } => "stop the other agent first, or give one agent \
             all the ports (--port 80,8080)"
            .into(),
        CaptureError::Lock { path, .. } => format!(
            "make {} writable by the agent (a hostPath volume in Kubernetes)",
            path.parent().unwrap_or(path).display()
        ),
        CaptureError::NoRouteToPod { .. } => "run the agent in the node's network namespace \
             (hostNetwork: true)"
            .into(),
        CaptureError::HostAddress { .. } => "attach with --iface instead of --pod-ip".into(),
        CaptureError::PodNotLocal { .. } => "run the agent on the pod's node".into(),
        CaptureError::Load(_) => "mirror-agent needs a kernel with BPF (CONFIG_BPF_SYSCALL), \
             and CAP_BPF and CAP_NET_ADMIN (or root)"
            .into(),
        CaptureError::Memlock { .. } => "kernels before 5.11 charge BPF maps to the memlock \
             limit, and raising it takes CAP_SYS_RESOURCE: add SYS_RESOURCE to the container's \
             securityContext.capabilities.add (deploy/daemonset.yaml does; the agent uses it \
             only there, and drops it at start), or raise the node's container runtime memlock \
             limit (LimitMEMLOCK=infinity in the containerd or docker systemd unit, or \
             `--ulimit memlock=-1`)"
            .into(),
        CaptureError::Rejected(_) => "use a kernel built with BTF (CONFIG_DEBUG_INFO_BTF=y); \
             the README lists the kernels tested"
            .into(),
        CaptureError::Tcx { .. } => "this kernel has no tcx (6.6+, or a backport): use \
             --attach-mode auto or netlink"
            .into(),
        CaptureError::Ports { .. } => "give --port between one and the listed number of \
             ports"
            .into(),
        CaptureError::TooManyAddrs { .. } => "give fewer --addr / --pod-ip addresses, or \
             none (every address)"
            .into(),
        CaptureError::NoObject => "build it with `cargo xtask build` (the kernel side first, \
             then the agent)"
            .into(),
        CaptureError::ObjectIncomplete(_) => "rebuild with `cargo xtask build` so that the \
             eBPF object matches the agent"
            .into(),
        _ => return None,
    };
    Some(hint)
}

/// Headers whose values are never shown in examples: credentials, and those the user drops.
fn redacted_headers(dropped: &[hyper::header::HeaderName]) -> Vec<String> {
    let mut out: Vec<String> = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
    ]
    .map(String::from)
    .to_vec();
    out.extend(dropped.iter().map(|h| h.as_str().to_string()));
    out
}

/// `mirror-agent replay DIR`: the recording sent again, and the comparison printed.
fn playback(args: ReplayArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let uri = replay::parse_mirror_url(&args.mirror)
        .map_err(|e| with_hint(anyhow::Error::new(e).context("--mirror")))?;
    args.requests
        .write_policy()
        .check(std::slice::from_ref(&args.series.mirror_label))
        .context("--writes")?;
    let tls = replay::mirror_tls(&uri, &args.requests.tls_options()).context("--mirror")?;
    rt.block_on(replay::check_mirror(&uri, tls.as_ref()))
        .map_err(|e| with_hint(anyhow::Error::new(e).context("--mirror")))?;
    let secret_headers = args.requests.secret_headers().context("--secret-header")?;
    let _rereads = SecretWatch::start(secret_headers.clone(), secrets::REREAD_EVERY)?;
    let cfg = PlaybackConfig {
        replay: ReplayConfig {
            tls,
            secret_headers,
            pipeline_depth: 1,
            ..args.requests.replay_config(uri, &args.series.mirror_label)
        },
        speed: args.speed,
        loops: args.loops,
        max_rps: args.max_rps,
        lanes: args.connections,
        compare: CompareConfig {
            live_label: args.series.live_label,
            mirror_labels: vec![args.series.mirror_label],
            routes: args.series.routes,
            ..CompareConfig::default()
        },
        progress: Some(Duration::from_secs(2)),
    };
    let summary = rt
        .block_on(record::playback::run(&args.dir, cfg))
        .map_err(|e| anyhow::Error::new(e).context("replay"))?;
    for issue in &summary.issues {
        eprintln!("warning: {issue}");
    }
    eprintln!("{}", summary.line());
    match args.format {
        ReportFormat::Json => emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&summary.report)?
        )),
        ReportFormat::Table => emit(&format!("{}\n", format_table(&summary.report))),
    }
    report::gate(&summary.report, &args.gate, "replay")
}

/// `mirror-agent export DIR --har FILE`.
fn export(args: ExportArgs) -> Result<()> {
    let to_stdout = args.har.as_os_str() == "-";
    let mut out: Box<dyn std::io::Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&args.har)
                .with_context(|| format!("--har {}", args.har.display()))?,
        ))
    };
    let (entries, issues) = record::har::export(&args.dir, &mut out)
        .with_context(|| format!("exporting the recording in {}", args.dir.display()))?;
    out.flush()?;
    for issue in &issues {
        eprintln!("warning: {issue}");
    }
    eprintln!("export: {entries} requests written as HAR");
    Ok(())
}

/// Writes to standard output. A reader that went away (`| head`, a supervisor that only reads
/// the ready line) loses the text, but the agent still shuts down cleanly and writes its dump.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        log::warn!("could not write to standard output: {e}");
    }
}
