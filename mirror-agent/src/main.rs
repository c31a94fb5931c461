use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mirror_agent::capture::netdev;
use mirror_agent::capture::ring::RingConfig;
use mirror_agent::capture::{
    named_counters, AttachMode, Capture, CaptureConfig, CaptureStats, Hook, MatchConfig, Target,
};
use mirror_agent::compare::{format_table, Comparator, CompareConfig, Report, RouteTemplate};
use mirror_agent::http::{HttpConfig, HttpEvent};
use mirror_agent::metrics::{self, Sources};
use mirror_agent::pipeline::{self, PipelineConfig, PipelineStats};
use mirror_agent::reassembly::ReassemblyConfig;
use mirror_agent::replay::{self, HostMode, MirrorOutcome, ReplayConfig, Replayer};
use mirror_agent::segment::FrameError;
use regex::Regex;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Parser, Debug)]
#[command(
    name = "mirror-agent",
    version,
    about = "Kernel-level HTTP traffic mirroring"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to a live service's interface and mirror its traffic.
    Attach(Box<AttachArgs>),
    /// Print the comparison table of a running agent (started with --metrics).
    Report(ReportArgs),
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The agent's --metrics address.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub agent: SocketAddr,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Interface(s) that the live service's traffic crosses (comma-separated).
    #[arg(long, value_delimiter = ',', required_unless_present = "pod_ip")]
    pub iface: Vec<String>,

    /// Live pod address(es) (comma-separated): the agent finds the host-side veth that routes to
    /// each, attaches to its egress (traffic towards the pod), and mirrors only that pod.
    #[arg(long, value_delimiter = ',')]
    pub pod_ip: Vec<IpAddr>,

    /// Live service port(s) (comma-separated).
    #[arg(long, value_delimiter = ',', required = true, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// Hook that requests to the service cross: `ingress` on the service's own interface,
    /// `egress` on the host side of a pod's veth. Responses are read on the other hook.
    #[arg(long, value_enum, default_value_t = Hook::Ingress)]
    pub direction: Hook,

    /// Only mirror traffic to these service addresses (comma-separated; default: any).
    #[arg(long = "addr", value_delimiter = ',')]
    pub addrs: Vec<IpAddr>,

    /// Do not capture the live service's responses (no live timings or status codes).
    #[arg(long)]
    pub no_responses: bool,

    /// Percentage of TCP connections to mirror, decided per connection in the kernel.
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent)]
    pub sample: f64,

    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach_mode: AttachMode,

    /// Capture ring size in MiB (1 MiB blocks).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub ring_mb: u32,

    /// Write the captured streams, per flow, to this file on exit.
    #[arg(long)]
    pub dump: Option<PathBuf>,

    /// Most payload bytes that --dump holds; the rest is counted as dropped.
    #[arg(long, default_value_t = 512 << 20)]
    pub dump_max_bytes: usize,

    /// Forward the kernel program's debug log (aya-log) to this process's log.
    #[arg(long)]
    pub ebpf_log: bool,

    /// Mirror service to replay requests to, e.g. http://bookservicemirror:8080. Without it the
    /// agent only captures and extracts (see --dump).
    #[arg(long)]
    pub mirror: Option<String>,

    /// Host header sent to the mirror: `mirror` (its own authority), `keep` (the original), or
    /// `shadow` (the original with -shadow appended, as Envoy does).
    #[arg(long, value_enum, default_value_t = HostMode::Mirror)]
    pub host: HostMode,

    /// Header added to every mirrored request (NAME:VALUE; repeatable).
    #[arg(long = "add-header", value_parser = replay::parse_header)]
    pub add_headers: Vec<(HeaderName, HeaderValue)>,

    /// Header removed from mirrored requests, e.g. Authorization or Cookie (repeatable).
    #[arg(long = "drop-header")]
    pub drop_headers: Vec<HeaderName>,

    /// Only mirror these methods (comma-separated, e.g. GET,HEAD).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,

    /// Only mirror requests whose path (without the query) matches this regex.
    #[arg(long)]
    pub path: Option<Regex>,

    /// Most mirrored requests per second (token bucket); the rest are dropped and counted.
    #[arg(long)]
    pub max_rps: Option<f64>,

    /// Most mirrored requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,

    /// Seconds a mirrored request may take before it counts as a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,

    /// Requests waiting to be mirrored at most; when full, new ones are dropped and counted.
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,

    /// Version tag of the live service's rows, e.g. V1MIR-LiveBookService.
    #[arg(long, default_value = "live")]
    pub live_label: String,

    /// Version tag of the mirror's rows, e.g. V4MIR-BookServiceFault.
    #[arg(long, default_value = "mirror")]
    pub mirror_label: String,

    /// Endpoint template naming matching paths, e.g. /api/{tenant}/books (repeatable).
    #[arg(long = "route")]
    pub routes: Vec<RouteTemplate>,

    /// Distinct endpoints tracked at most; the rest are reported as `other`.
    #[arg(long, default_value_t = 500)]
    pub max_endpoints: usize,

    /// Serve Prometheus metrics on /metrics and the comparison on /report at this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,

    /// Do not print the comparison table on exit.
    #[arg(long)]
    pub no_report: bool,

    /// Clone but never read the clones: measures the kernel side alone (benchmarks).
    #[arg(long, hide = true)]
    pub no_reader: bool,

    /// Log capture counters every N seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    pub stats_interval: u64,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err("a percentage from 0 to 100".into())
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Attach(args) => attach(*args),
        Command::Report(args) => report(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn attach(args: AttachArgs) -> Result<()> {
    let mut targets: Vec<Target> = args
        .iface
        .iter()
        .map(|iface| Target {
            iface: iface.clone(),
            hook: args.direction,
        })
        .collect();
    for ip in &args.pod_ip {
        let iface = netdev::iface_for_pod(*ip)?;
        log::info!("pod {ip} is behind {iface}: attaching to its egress");
        let target = Target {
            iface,
            hook: Hook::Egress,
        };
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let mut addrs = args.addrs.clone();
    addrs.extend(&args.pod_ip);
    let cfg = CaptureConfig {
        targets,
        matching: MatchConfig {
            ports: args.port.clone(),
            addrs,
            responses: !args.no_responses,
            sample_ppm: (args.sample * 10_000.0).round() as u32,
        },
        attach_mode: args.attach_mode,
        ring: RingConfig {
            block_count: args.ring_mb as usize,
            ..RingConfig::default()
        },
        ebpf_log: args.ebpf_log,
        read_clones: !args.no_reader,
        ..CaptureConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let replay_cfg = match &args.mirror {
        Some(url) => {
            let uri = replay::parse_mirror_url(url)?;
            rt.block_on(replay::check_mirror(&uri))?;
            Some(ReplayConfig {
                host: args.host,
                add_headers: args.add_headers.clone(),
                drop_headers: args.drop_headers.clone(),
                methods: args
                    .methods
                    .iter()
                    .map(|m| m.to_ascii_uppercase())
                    .collect(),
                path: args.path.clone(),
                max_rps: args.max_rps,
                max_inflight: args.max_inflight,
                timeout: Duration::from_secs_f64(args.timeout),
                queue: args.queue,
                ..ReplayConfig::new(uri)
            })
        }
        None => None,
    };
    let (outcome_tx, mut outcome_rx) = tokio::sync::mpsc::channel::<MirrorOutcome>(65_536);
    let replayer = replay_cfg.map(|c| Replayer::start(c, rt.handle(), outcome_tx));
    let comparator = Arc::new(Mutex::new(Comparator::new(CompareConfig {
        live_label: args.live_label.clone(),
        mirror_label: args.mirror_label.clone(),
        routes: args.routes.clone(),
        max_endpoints: args.max_endpoints,
        ..CompareConfig::default()
    })));
    let compare_mirror = Arc::clone(&comparator);
    let outcomes = rt.spawn(async move {
        let mut n = 0u64;
        while let Some(o) = outcome_rx.recv().await {
            compare_mirror.lock().unwrap().mirror(&o);
            log::debug!(
                "mirror {} {} -> {} in {:?}",
                o.method,
                o.target,
                o.result.code(),
                o.duration
            );
            n += 1;
        }
        n
    });
    let (capture, segments) = Capture::start(&cfg)?;
    let attached: Vec<String> = capture
        .attachments()
        .iter()
        .map(|(t, hook, mode)| format!("{} {} ({mode:?})", t.iface, hook.name()))
        .collect();
    println!(
        "ready: mirroring ports {:?} on {}; mirror interface {}; program id {}",
        args.port,
        attached.join(", "),
        capture.mirror_interface(),
        capture.program_id()
    );
    std::io::stdout().flush()?;

    let pipeline_cfg = PipelineConfig {
        reassembly: ReassemblyConfig {
            server_ports: args.port.clone(),
            ..ReassemblyConfig::default()
        },
        http: HttpConfig {
            track_responses: !args.no_responses,
            ..HttpConfig::default()
        },
        record_streams: args.dump.is_some().then_some(args.dump_max_bytes),
        tick: Duration::from_millis(100),
    };
    let pipeline_stats = Arc::new(Mutex::new(PipelineStats::default()));
    let shared = Arc::clone(&pipeline_stats);
    let sender = replayer.as_ref().map(|(r, _)| r.clone());
    let compare_live = Arc::clone(&comparator);
    let kernel = Arc::new(Mutex::new(Vec::new()));
    if let Some(addr) = args.metrics {
        let sources = Sources {
            comparator: Arc::clone(&comparator),
            capture: Some(Arc::clone(capture.stats())),
            kernel: Arc::clone(&kernel),
            pipeline: Arc::clone(&pipeline_stats),
            replay: replayer.as_ref().map(|(r, _)| Arc::clone(r.stats())),
        };
        let bound = rt.block_on(metrics::serve(addr, sources))?;
        log::info!("metrics on http://{bound}/metrics, comparison on http://{bound}/report");
    }
    let consumer = std::thread::Builder::new()
        .name("mirror-pipeline".into())
        .spawn(move || {
            pipeline::run(segments, pipeline_cfg, shared, |event| match event {
                HttpEvent::Request(r) => {
                    log::debug!(
                        "request {} {} conn {} #{}",
                        r.method(),
                        r.target(),
                        r.conn,
                        r.seq
                    );
                    if let Some(replayer) = &sender {
                        replayer.offer(r);
                    }
                }
                HttpEvent::Response(m) => {
                    log::debug!(
                        "response {} to conn {} #{}",
                        m.status,
                        m.conn,
                        m.request_seq
                    );
                    compare_live.lock().unwrap().live(&m);
                }
            })
        })?;

    let stats = std::sync::Arc::clone(capture.stats());
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut seconds = 0u64;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    if let Ok(c) = capture.kernel_counters() {
                        *kernel.lock().unwrap() = named_counters(&c);
                    }
                    seconds += 1;
                    if args.stats_interval > 0 && seconds.is_multiple_of(args.stats_interval) {
                        log::info!("kernel {:?}", kernel.lock().unwrap());
                        log::info!("capture {}", format_stats(&stats));
                        log::info!("pipeline {:?}", pipeline_stats.lock().unwrap());
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;

    let counters = capture.stop()?;
    let recorder = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))?;
    eprintln!("kernel counters: {:?}", named_counters(&counters));
    eprintln!("capture: {}", format_stats(&stats));
    let p = pipeline_stats.lock().unwrap().clone();
    eprintln!("reassembly: {:?}", p.reassembly);
    eprintln!("http: {:?}", p.http);
    if let Some((replayer, task)) = replayer {
        let stats = Arc::clone(replayer.stats());
        drop(replayer);
        // Let queued and in-flight requests finish, bounded by the mirror timeout.
        let grace = Duration::from_secs_f64(args.timeout).min(Duration::from_secs(5));
        rt.block_on(async {
            let _ = tokio::time::timeout(grace, task).await;
            let deadline = tokio::time::Instant::now() + grace;
            while stats.inflight.load(Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        eprintln!("replay: {stats:?}");
    }
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_millis(200), outcomes).await;
    });
    if !args.no_report {
        println!("{}", format_table(&comparator.lock().unwrap().report()));
    }
    if let (Some(path), Some(dump)) = (args.dump, recorder) {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        dump.write_to(&mut f)?;
        f.flush()?;
    }
    if stats.ring_drops.load(Ordering::Relaxed) > 0 {
        bail!("the capture ring dropped frames: raise --ring-mb");
    }
    Ok(())
}

fn report(args: ReportArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(async {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let uri: hyper::Uri = format!("http://{}/report", args.agent).parse()?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .map_err(|_| anyhow::anyhow!("the agent at {} did not answer within 5 s", args.agent))?
            .with_context(|| {
                format!(
                    "no agent answers at {} (start it with --metrics {})",
                    args.agent, args.agent
                )
            })?;
        anyhow::Ok(resp.into_body().collect().await?.to_bytes())
    })?;
    let report: Report =
        serde_json::from_slice(&body).context("the agent's /report is not a report")?;
    match args.format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        ReportFormat::Table => print!("{}", format_table(&report)),
    }
    Ok(())
}

fn format_stats(s: &CaptureStats) -> String {
    let errors: Vec<String> = FrameError::ALL
        .iter()
        .zip(&s.frame_errors)
        .map(|(e, n)| format!("{}={}", e.name(), n.load(Ordering::Relaxed)))
        .collect();
    format!(
        "frames={} bytes={} segments={} truncated={} {} channel_full_waits={} ring_packets={} ring_drops={} ring_freezes={}",
        s.frames.load(Ordering::Relaxed),
        s.bytes.load(Ordering::Relaxed),
        s.segments.load(Ordering::Relaxed),
        s.truncated.load(Ordering::Relaxed),
        errors.join(" "),
        s.channel_full_waits.load(Ordering::Relaxed),
        s.ring_packets.load(Ordering::Relaxed),
        s.ring_drops.load(Ordering::Relaxed),
        s.ring_freezes.load(Ordering::Relaxed),
    )
}
