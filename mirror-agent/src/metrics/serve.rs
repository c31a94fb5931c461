//! The metrics port's HTTP server: `/metrics`, `/report` and the page on `/`.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{render, started, Sources};
use crate::compare::Comparison;

/// The `?mirroring=NAMESPACE/NAME` of a request, if any.
fn mirroring_asked(query: Option<&str>) -> Option<String> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("mirroring="))
        .map(|v| v.replace("%2F", "/").replace("%2f", "/"))
}

type Answer = (StatusCode, &'static str, String);

/// The comparison asked for: the agent's own mirrors', or a declared mirroring's; a name that
/// does not run here is a 404 that lists those that do.
fn comparison_asked(sources: &Sources, wanted: Option<&str>) -> Result<Comparison, Answer> {
    let Some(key) = wanted else {
        return Ok(sources.comparison.clone());
    };
    let lanes = sources.lanes.lock().unwrap();
    match lanes.iter().find(|l| l.key == key) {
        Some(l) => Ok(l.comparison.clone()),
        None => {
            let running: Vec<&str> = lanes.iter().map(|l| l.key.as_str()).collect();
            Err((
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("no mirroring {key} runs here; running: {running:?}\n"),
            ))
        }
    }
}

/// `/report`: the comparison of the agent's own mirrors, or with `?mirroring=NAMESPACE/NAME`, of
/// that declared mirroring.
fn report(sources: &Sources, query: Option<&str>) -> Answer {
    let comparison = match comparison_asked(sources, mirroring_asked(query).as_deref()) {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    let mut report = comparison.report();
    report.set_read_at(&sources.read_at);
    (
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
}

/// `/`: the same comparison as a page that refreshes itself, with links to each declared
/// mirroring's.
fn page(sources: &Sources, query: Option<&str>) -> Answer {
    let wanted = mirroring_asked(query);
    let comparison = match comparison_asked(sources, wanted.as_deref()) {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    let (report, hists) = comparison.snapshot();
    let mut links: Vec<(String, String)> = sources
        .lanes
        .lock()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l.key.clone(),
                format!("/?mirroring={}", l.key.replace('/', "%2F")),
            )
        })
        .collect();
    if !links.is_empty() {
        links.insert(0, ("--mirror flags".into(), "/".into()));
    }
    let title = match &wanted {
        Some(key) => format!("mirror-agent: {key}"),
        None => "mirror-agent".to_string(),
    };
    let html = crate::compare::page::html(&crate::compare::page::Page {
        title: &title,
        about: vec![format!(
            "This agent's share of the traffic (mirror-agent {}), since it started; refreshed every 2 s. \
             The whole fleet: mirror-agent report --prometheus URL --html FILE.",
            env!("CARGO_PKG_VERSION")
        )],
        report: &report,
        hists: &hists,
        links,
        refresh_s: Some(2),
    });
    (StatusCode::OK, "text/html; charset=utf-8", html)
}

/// Serves `/`, `/metrics` and `/report` until the runtime stops.
pub async fn serve(addr: SocketAddr, sources: Sources) -> std::io::Result<SocketAddr> {
    started();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin on the error.
                    log::warn!("metrics: accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let sources = sources.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let sources = sources.clone();
                    async move {
                        let (status, ctype, body) = match req.uri().path() {
                            "/metrics" => (
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                render(&sources),
                            ),
                            "/report" => report(&sources, req.uri().query()),
                            "/" => page(&sources, req.uri().query()),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "text/plain",
                                "try /, /metrics or /report\n".to_string(),
                            ),
                        };
                        Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}
