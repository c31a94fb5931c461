use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mirror_agent::budget;
use mirror_agent::capture::netdev;
use mirror_agent::capture::ring::RingConfig;
use mirror_agent::capture::{
    named_counters, Capture, CaptureConfig, CaptureStats, Hook, MatchConfig, Target,
};
use mirror_agent::cli::{AttachArgs, Cli, Command, ReportArgs, ReportFormat};
use mirror_agent::compare::{self, format_table, Comparator, CompareConfig, Report};
use mirror_agent::http::{HttpConfig, HttpEvent};
use mirror_agent::metrics::{self, Sources};
use mirror_agent::pipeline::{self, PipelineConfig, PipelineStats};
use mirror_agent::reassembly::ReassemblyConfig;
use mirror_agent::replay::{self, MirrorOutcome, ReplayConfig, Replayer};
use mirror_agent::segment::FrameError;
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};

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
            block_size: args
                .ring_block_kb
                .map_or(RingConfig::default().block_size, |kb| kb as usize * 1024),
            ..RingConfig::default()
        },
        ebpf_log: args.ebpf_log,
        read_clones: !args.no_reader,
        ..CaptureConfig::default()
    };
    let (budget, budget_source) = match args.memory_budget {
        Some(b) => (b, "--memory-budget".to_string()),
        None => budget::default_budget(),
    };
    let ring_bytes = (cfg.ring.block_count * cfg.ring.block_size) as u64;
    let plan = budget::Plan::new(budget, ring_bytes, compare::series_bytes())?;
    log::info!("memory budget {budget} bytes ({budget_source}): {plan:?}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut mirror_addr = None;
    let replay_cfg = match &args.mirror {
        Some(url) => {
            let uri = replay::parse_mirror_url(url)?;
            mirror_addr = Some(rt.block_on(replay::check_mirror(&uri))?);
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
                queue_bytes: args
                    .queue_bytes
                    .map_or(plan.replay_queue_bytes, |q| q as usize),
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
        max_series: plan.max_series,
        max_pending: plan.max_pending_pairs,
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
    // Handlers before anything is attached or announced: a supervisor may signal as soon as it
    // reads the ready line, and the default action would skip the clean shutdown.
    let (mut term, mut interrupt) = {
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let (capture, segments) = Capture::start(&cfg)?;
    if let Some(mirror) = mirror_addr {
        // Nothing is replayed yet: refusing here drops the capture before any loop can start.
        let egress_watched: Vec<String> = capture
            .attachments()
            .iter()
            .filter(|(t, hook, _)| *hook == Hook::Egress || t.iface == "lo")
            .map(|(t, _, _)| t.iface.clone())
            .collect();
        let via = netdev::route_iface(mirror.ip())?;
        let passed = replay::check_no_loop(
            mirror,
            &cfg.matching.ports,
            &cfg.matching.addrs,
            &via,
            &egress_watched,
        )?;
        log::info!("{passed}");
    }
    let attached: Vec<String> = capture
        .attachments()
        .iter()
        .map(|(t, hook, mode)| format!("{} {} ({mode:?})", t.iface, hook.name()))
        .collect();
    emit(&format!(
        "ready: mirroring ports {:?} on {}; mirror interface {}; program id {}\n",
        args.port,
        attached.join(", "),
        capture.mirror_interface(),
        capture.program_id()
    ));

    let pipeline_cfg = PipelineConfig {
        reassembly: ReassemblyConfig {
            server_ports: args.port.clone(),
            server_addrs: cfg.matching.addrs.clone(),
            max_flows: plan.max_flows,
            max_ooo_bytes_total: plan.ooo_bytes,
            ..ReassemblyConfig::default()
        },
        http: HttpConfig {
            track_responses: !args.no_responses,
            max_buffered_bytes: plan.http_buffered_bytes,
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
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut seconds = 0u64;
        loop {
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    if let Ok(c) = capture.kernel_counters() {
                        capture.account_lost_requests(&c);
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
        emit(&format!(
            "{}\n",
            format_table(&comparator.lock().unwrap().report())
        ));
    }
    if let (Some(path), Some(dump)) = (args.dump, recorder) {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        dump.write_to(&mut f)?;
        f.flush()?;
    }
    // Losses are the traffic's, not a failure of the agent: they are in the metrics and the
    // summary above, and a clean stop exits 0 whatever they were.
    let ring_drops = stats.ring_drops.load(Ordering::Relaxed);
    if ring_drops > 0 {
        log::warn!(
            "the capture ring dropped {ring_drops} frames ({} requests lost): raise --ring-mb",
            stats.requests_lost.load(Ordering::Relaxed)
        );
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
        ReportFormat::Json => emit(&format!("{}\n", serde_json::to_string_pretty(&report)?)),
        ReportFormat::Table => emit(&format_table(&report)),
    }
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

fn format_stats(s: &CaptureStats) -> String {
    let errors: Vec<String> = FrameError::ALL
        .iter()
        .zip(&s.frame_errors)
        .map(|(e, n)| format!("{}={}", e.name(), n.load(Ordering::Relaxed)))
        .collect();
    format!(
        "frames={} bytes={} segments={} truncated={} {} channel_full_waits={} ring_packets={} ring_drops={} ring_freezes={} request_starts={} requests_lost={} dropped_at_stop={}",
        s.frames.load(Ordering::Relaxed),
        s.bytes.load(Ordering::Relaxed),
        s.segments.load(Ordering::Relaxed),
        s.truncated.load(Ordering::Relaxed),
        errors.join(" "),
        s.channel_full_waits.load(Ordering::Relaxed),
        s.ring_packets.load(Ordering::Relaxed),
        s.ring_drops.load(Ordering::Relaxed),
        s.ring_freezes.load(Ordering::Relaxed),
        s.request_starts.load(Ordering::Relaxed),
        s.requests_lost.load(Ordering::Relaxed),
        s.dropped_at_stop.load(Ordering::Relaxed),
    )
}
