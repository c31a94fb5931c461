//! Browses the bookservice the way a user would (the lab's poller.ps1): the list, then each
//! book and its reviews, sometimes posting a review. Bounded in time and in requests.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Parser)]
struct Args {
    /// The live service, e.g. http://10.201.1.2:8080
    #[arg(long)]
    target: String,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Stop after this many requests whatever the time.
    #[arg(long, default_value_t = 100_000)]
    max_requests: u64,
    /// Pause between page views, in milliseconds.
    #[arg(long, default_value_t = 20)]
    think_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut round = 0u64;
    'outer: while Instant::now() < deadline {
        round += 1;
        let mut pages = vec![("GET", "/api/books".to_string())];
        for id in 1..=5 {
            pages.push(("GET", format!("/api/books/{id}")));
            pages.push(("GET", format!("/api/books/{id}/reviews")));
        }
        if round.is_multiple_of(3) {
            pages.push(("POST", format!("/api/books/{}/reviews", round % 5 + 1)));
        }
        for (method, path) in pages {
            if Instant::now() >= deadline || sent >= args.max_requests {
                break 'outer;
            }
            let body = if method == "POST" {
                Bytes::from(format!("review number {round}"))
            } else {
                Bytes::new()
            };
            let req = hyper::Request::builder()
                .method(method)
                .uri(format!("{}{path}", args.target))
                .header("user-agent", "bookinfo-poller/1.0")
                .body(Full::new(body))?;
            sent += 1;
            match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                Ok(Ok(resp)) => {
                    if !resp.status().is_success() {
                        failed += 1;
                    }
                    resp.into_body().collect().await?;
                }
                _ => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
        }
    }
    println!("poller: {sent} requests, {failed} not successful");
    Ok(())
}
