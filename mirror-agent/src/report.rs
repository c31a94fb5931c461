//! `mirror-agent report`: one agent's comparison from its `/report`, or the fleet's from
//! Prometheus (`--prometheus`), as the table or JSON, gated by `--fail-on`.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mirror_agent::cli::{GateArgs, ReportArgs, ReportFormat};
use mirror_agent::compare::{self, format_table, Report};
use mirror_agent::fleet::{self, FleetQuery, Prometheus};

use crate::emit;

pub fn run(args: ReportArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = match &args.prometheus {
        Some(url) => rt.block_on(fleet_report(url, &args))?,
        None => rt.block_on(agent_report(&args))?,
    };
    match args.format {
        ReportFormat::Json => emit(&format!("{}\n", serde_json::to_string_pretty(&report)?)),
        ReportFormat::Table => emit(&format_table(&report)),
    }
    gate(&report, &args.gate, "report")
}

/// One agent's `/report`.
async fn agent_report(args: &ReportArgs) -> Result<Report> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let query = args
        .mirroring
        .as_deref()
        .map(|m| format!("?mirroring={}", m.replace('/', "%2F")))
        .unwrap_or_default();
    let uri: hyper::Uri = format!("http://{}/report{query}", args.agent).parse()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .map_err(|_| anyhow::anyhow!("the agent at {} did not answer within 5 s", args.agent))?
        .with_context(|| {
            format!(
                "no agent answers at {} (start it with --metrics {})",
                args.agent, args.agent
            )
        })?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "the agent answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).context("the agent's /report is not a report")
}

/// The fleet's comparison from Prometheus; says where it comes from on standard error, and
/// writes the page with `--html`.
async fn fleet_report(url: &str, args: &ReportArgs) -> Result<Report> {
    let prom = Prometheus::new(url)?;
    let query = FleetQuery {
        selector: args.selector.clone(),
        mirroring: args.mirroring.clone(),
        window: args.window,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let fleet = fleet::gather(&prom, &query, now).await?;
    let versions: std::collections::BTreeSet<&str> =
        fleet.agents.values().map(String::as_str).collect();
    let about = format!(
        "{} agents ({}), {}, over the last {}, from Prometheus at {}; agent versions: {}",
        fleet.agents.len(),
        fleet.agents.keys().cloned().collect::<Vec<_>>().join(", "),
        if fleet.mirroring.is_empty() {
            "their own --mirror flags".to_string()
        } else {
            format!("mirroring {}", fleet.mirroring)
        },
        fleet.window,
        prom.url(),
        versions.into_iter().collect::<Vec<_>>().join(", ")
    );
    eprintln!("fleet: {about}");
    if let Some(path) = &args.html {
        let html = compare::page::html(&compare::page::Page {
            title: "mirror-agent: the fleet",
            about: vec![about],
            report: &fleet.report,
            hists: &fleet.hists,
            links: Vec::new(),
            refresh_s: None,
        });
        std::fs::write(path, html).with_context(|| format!("--html {}", path.display()))?;
        eprintln!("fleet: the page is in {}", path.display());
    }
    Ok(fleet.report)
}

/// `--junit` and `--fail-on`: writes the JUnit file, then exits with status 3 (errors exit
/// with 1, bad arguments with 2) when the report fails the conditions, saying why.
pub fn gate(report: &Report, args: &GateArgs, run: &str) -> Result<()> {
    let outcome = compare::gate::judge(report, &args.fail_on);
    if let Some(path) = &args.junit {
        std::fs::write(path, outcome.junit(run))
            .with_context(|| format!("--junit {}", path.display()))?;
    }
    if args.fail_on.is_empty() || outcome.passed() {
        return Ok(());
    }
    eprintln!("gate failed (--fail-on {}):", fmt_conditions(&args.fail_on));
    for line in outcome.failures() {
        eprintln!("  {line}");
    }
    std::process::exit(GATE_FAILED);
}

/// The exit status of a report or replay that fails its `--fail-on` conditions.
const GATE_FAILED: i32 = 3;

fn fmt_conditions(conditions: &[compare::gate::Condition]) -> String {
    let words: Vec<String> = conditions.iter().map(ToString::to_string).collect();
    words.join(",")
}
