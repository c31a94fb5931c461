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
    /// Browse the gRPC flavour (`bookstore.Books`) on one h2c connection.
    #[arg(long)]
    grpc: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.grpc {
        return browse_grpc(&args).await;
    }
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

/// The same pages as gRPC calls: the list, then each book and its reviews.
async fn browse_grpc(args: &Args) -> anyhow::Result<()> {
    let mut client = bookservice::grpc::Client::connect(args.target.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (mut sent, mut failed) = (0u64, 0u64);
    'outer: while Instant::now() < deadline {
        for page in 0..11u32 {
            if Instant::now() >= deadline || sent >= args.max_requests {
                break 'outer;
            }
            let id = page.div_ceil(2);
            let ok = match page {
                0 => client.list_books().await.is_ok(),
                p if p % 2 == 1 => client.get_book(id).await.is_ok(),
                _ => client.get_reviews(id).await.is_ok(),
            };
            sent += 1;
            failed += u64::from(!ok);
            tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
        }
    }
    println!("poller: {sent} gRPC calls, {failed} not OK");
    Ok(())
}
