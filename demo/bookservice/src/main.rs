//! The lab's bookservice. `v1` and `v2` behave alike; `v3` takes about 1.2 s to load reviews;
//! `v4` answers 500 for the reviews of books 2 and 4; `v5` answers quickly and with 200 but
//! rounds each book's `rating` and renames its `price` to `cost`. Every version stamps its
//! answers with `servedAt` and a random `requestId`, which differ on every answer: the noise a
//! content comparison must see through. With `--grpc` it speaks gRPC (h2c) instead of JSON
//! over HTTP/1.1, with the same behaviours (v4 answers INTERNAL).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use bookservice::grpc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Version {
    V1,
    V2,
    V3,
    V4,
    V5,
}

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value_t = Version::V1)]
    version: Version,
    /// Serve `bookstore.Books` over gRPC instead of the JSON API.
    #[arg(long)]
    grpc: bool,
}

const BOOKS: [(&str, &str); 5] = [
    ("The Comedy of Errors", "William Shakespeare"),
    ("Sense and Sensibility", "Jane Austen"),
    ("Moby-Dick", "Herman Melville"),
    ("War and Peace", "Leo Tolstoy"),
    ("Dubliners", "James Joyce"),
];

/// Ratings and prices, by book.
const RATINGS: [f64; 5] = [4.5, 3.8, 4.2, 4.7, 3.9];
const PRICES: [f64; 5] = [12.99, 9.5, 15.0, 18.25, 8.75];

struct State {
    version: Version,
    reviews: Mutex<Vec<Vec<String>>>,
}

impl grpc::Catalogue for State {
    fn books(&self) -> Vec<grpc::Book> {
        BOOKS
            .iter()
            .enumerate()
            .map(|(i, (t, a))| grpc::Book {
                id: i as u32 + 1,
                title: t.to_string(),
                author: a.to_string(),
            })
            .collect()
    }
    fn reviews(&self, id: u32) -> Option<Vec<String>> {
        let i = (id as usize).checked_sub(1)?;
        self.reviews.lock().unwrap().get(i).cloned()
    }
    fn reviews_delay(&self) -> Duration {
        match self.version {
            Version::V3 => Duration::from_millis(1200),
            _ => Duration::ZERO,
        }
    }
    fn reviews_fail(&self, id: u32) -> bool {
        self.version == Version::V4 && (id == 2 || id == 4)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = Arc::new(State {
        version: args.version,
        reviews: Mutex::new(
            BOOKS
                .iter()
                .map(|_| vec!["An excellent read.".to_string()])
                .collect(),
        ),
    });
    if args.grpc {
        eprintln!(
            "bookservice {:?} serving gRPC on {}",
            args.version, args.listen
        );
        tonic::transport::Server::builder()
            .add_service(grpc::Books(state))
            .serve(args.listen)
            .await?;
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "bookservice {:?} listening on {}",
        args.version,
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `"rating":…,"price":…` of book `i` (0-based) as this version writes them.
fn book_facts(version: Version, i: usize) -> String {
    if version == Version::V5 {
        format!("\"rating\":{:?},\"cost\":{}", RATINGS[i].round(), PRICES[i])
    } else {
        format!("\"rating\":{},\"price\":{}", RATINGS[i], PRICES[i])
    }
}

/// `"servedAt":…,"requestId":"…"`: when, and a random id; different on every answer.
fn stamp() -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now.as_nanos());
    format!(
        "\"servedAt\":{},\"requestId\":\"{:016x}\"",
        now.as_millis(),
        h.finish()
    )
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-version-tag", "bookservice")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

async fn handle(
    state: Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let book = |s: &str| {
        s.parse::<usize>()
            .ok()
            .filter(|id| (1..=BOOKS.len()).contains(id))
    };
    Ok(match (method, parts.as_slice()) {
        (Method::GET, ["api", "books"]) => {
            let list: Vec<String> = BOOKS
                .iter()
                .enumerate()
                .map(|(i, (t, a))| {
                    format!(
                        "{{\"id\":{},\"title\":\"{t}\",\"author\":\"{a}\",{}}}",
                        i + 1,
                        book_facts(state.version, i)
                    )
                })
                .collect();
            json(StatusCode::OK, format!("[{}]", list.join(",")))
        }
        (Method::GET, ["api", "books", id]) => match book(id) {
            Some(id) => {
                let (t, a) = BOOKS[id - 1];
                json(
                    StatusCode::OK,
                    format!(
                        "{{\"id\":{id},\"title\":\"{t}\",\"author\":\"{a}\",{},{}}}",
                        book_facts(state.version, id - 1),
                        stamp()
                    ),
                )
            }
            None => json(StatusCode::NOT_FOUND, "{\"error\":\"no such book\"}".into()),
        },
        (Method::GET, ["api", "books", id, "reviews"]) => match book(id) {
            Some(id) => {
                if state.version == Version::V3 {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                }
                if state.version == Version::V4 && (id == 2 || id == 4) {
                    json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "{\"error\":\"reviews unavailable\"}".into(),
                    )
                } else {
                    let reviews = state.reviews.lock().unwrap()[id - 1].clone();
                    let items: Vec<String> = reviews.iter().map(|r| format!("\"{r}\"")).collect();
                    json(
                        StatusCode::OK,
                        format!(
                            "{{\"id\":{id},\"reviews\":[{}],{}}}",
                            items.join(","),
                            stamp()
                        ),
                    )
                }
            }
            None => json(StatusCode::NOT_FOUND, "{\"error\":\"no such book\"}".into()),
        },
        (Method::POST, ["api", "books", id, "reviews"]) => match book(id) {
            Some(id) => {
                let body = req.into_body().collect().await?.to_bytes();
                let text: String = String::from_utf8_lossy(&body)
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == ' ')
                    .take(200)
                    .collect();
                let mut reviews = state.reviews.lock().unwrap();
                if reviews[id - 1].len() < 50 {
                    reviews[id - 1].push(text);
                }
                json(
                    StatusCode::CREATED,
                    format!("{{\"id\":{id},\"reviews\":{}}}", reviews[id - 1].len()),
                )
            }
            None => json(StatusCode::NOT_FOUND, "{\"error\":\"no such book\"}".into()),
        },
        _ => json(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}".into()),
    })
}
