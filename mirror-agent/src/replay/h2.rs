//! The HTTP/2 side of the mirror client: one connection to the mirror (made again when it
//! closes), requests built from captured streams, and their answers read.

use super::*;

/// One HTTP/2 request to the mirror on `conn` (opened or reopened as needed), answered or
/// failed within the timeout: for `mirror-agent replay`, which keeps a connection per lane.
pub(crate) async fn send_h2_once(
    cfg: &ReplayConfig,
    conn: &H2Mirror,
    req: &http2::Request,
) -> (MirrorResult, Option<Duration>) {
    match build_h2(cfg, req) {
        Ok(outgoing) => {
            let (result, took) = conn.exchange(cfg, outgoing).await;
            (result, Some(took))
        }
        Err(_) => (MirrorResult::Error, None),
    }
}

/// One HTTP/2 connection to the mirror, made again when it closes. Its own connection (rather
/// than a pooled client's) so that `:authority` can be what `--host` says while the connection
/// goes to the mirror.
pub(crate) struct H2Mirror {
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<ReplayBody>>>,
}

impl H2Mirror {
    pub(crate) fn new() -> H2Mirror {
        H2Mirror {
            sender: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `outgoing` and reads the answer to its end within the timeout: the result, and
    /// the time to the answer's head (or to the failure).
    pub(super) async fn exchange(
        &self,
        cfg: &ReplayConfig,
        outgoing: hyper::Request<ReplayBody>,
    ) -> (MirrorResult, Duration) {
        let started = Instant::now();
        let exchange = async {
            let resp = self.request(cfg, outgoing).await?;
            read_answer(resp, started).await
        };
        match tokio::time::timeout(cfg.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => (e, started.elapsed()),
            Err(_) => (MirrorResult::Timeout, started.elapsed()),
        }
    }

    pub(super) async fn request(
        &self,
        cfg: &ReplayConfig,
        req: hyper::Request<ReplayBody>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, MirrorResult> {
        let mut sender = {
            let mut current = self.sender.lock().await;
            match current.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = Self::connect(cfg).await?;
                    *current = Some(s.clone());
                    s
                }
            }
        };
        sender.ready().await.map_err(|e| classify(&e))?;
        sender.send_request(req).await.map_err(|e| classify(&e))
    }

    pub(super) async fn connect(
        cfg: &ReplayConfig,
    ) -> Result<hyper::client::conn::http2::SendRequest<ReplayBody>, MirrorResult> {
        let stream = connect_mirror(cfg, Alpn::H2).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("HTTP/2 connection to the mirror ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A mirrored HTTP/2 request's body: the data and trailers received so far, then, for a
/// streaming request, what follows as it arrives. (HTTP/1 requests go out as bytes: `h1`.)
pub struct ReplayBody {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<StreamReceiver>,
}

/// Why a captured request cannot be replayed as it is (counted `dropped_unsendable`).
#[derive(Debug, thiserror::Error)]
pub enum Unsendable {
    #[error("the mirror URL has no authority")]
    NoAuthority,
    #[error("a header name or value HTTP/2 does not allow: {0}")]
    Header(String),
    #[error("not a valid request: {0}")]
    Request(#[from] hyper::http::Error),
}

impl From<hyper::header::InvalidHeaderName> for Unsendable {
    fn from(e: hyper::header::InvalidHeaderName) -> Self {
        Unsendable::Header(e.to_string())
    }
}

impl From<hyper::header::InvalidHeaderValue> for Unsendable {
    fn from(e: hyper::header::InvalidHeaderValue) -> Self {
        Unsendable::Header(e.to_string())
    }
}

/// The live stream was cut short: the mirror's stream is reset rather than ended.
#[derive(Debug, thiserror::Error)]
#[error("the live request was cut short")]
pub struct StreamCut;

pub(super) fn header_map(fields: &[(Bytes, Bytes)]) -> Result<HeaderMap, Unsendable> {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(
            HeaderName::from_bytes(name)?,
            HeaderValue::from_maybe_shared(value.clone())?,
        );
    }
    Ok(map)
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = StreamCut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamCut>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let part = match rest.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(p) => p,
        };
        Poll::Ready(match part {
            Some(StreamPart::Data(b)) => Some(Ok(Frame::data(b))),
            Some(StreamPart::Trailers(t)) => {
                self.rest = None;
                header_map(&t).ok().map(|m| Ok(Frame::trailers(m)))
            }
            Some(StreamPart::End) => {
                self.rest = None;
                None
            }
            None => {
                self.rest = None;
                Some(Err(StreamCut))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_none()
    }
}

/// Reads a reply to its end (so that its connection can carry the next request). The status,
/// a gRPC status (from the trailers or a trailers-only head) and the time from `started` to the
/// head are what is kept.
pub(super) async fn read_answer(
    resp: hyper::Response<hyper::body::Incoming>,
    started: Instant,
) -> Result<(MirrorResult, Duration), MirrorResult> {
    let head = started.elapsed();
    let status = resp.status().as_u16();
    let mut grpc = grpc_status_of(resp.headers());
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify(&e))?;
        if let Some(t) = frame.trailers_ref() {
            grpc = grpc_status_of(t).or(grpc);
        }
    }
    let result = match grpc {
        Some(g) => MirrorResult::Grpc(status, g),
        None => MirrorResult::Status(status),
    };
    Ok((result, head))
}

pub(super) fn grpc_status_of(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
}

/// Fields HTTP/2 forbids (RFC 9113 8.2.2); `te` may only say `trailers`, which gRPC needs.
pub(super) const H2_FORBIDDEN: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The mirror request for an HTTP/2 request: same method, `:path`, metadata (headers), body and
/// trailers; `:authority` as `--host` says.
pub(super) fn build_h2(
    cfg: &ReplayConfig,
    req: &http2::Request,
) -> Result<hyper::Request<ReplayBody>, Unsendable> {
    let original = match req.authority() {
        "" => req.headers().find(|(n, _)| *n == b"host").map(|(_, v)| v),
        a => Some(a.as_bytes()),
    };
    let authority = mirror_authority(cfg, original)?;
    let uri = Uri::builder()
        .scheme("http")
        .authority(&*authority)
        .path_and_query(&*mirror_path(cfg, req.path()))
        .build()?;
    let mut b = hyper::Request::builder()
        .method(req.method())
        .uri(uri)
        .version(hyper::Version::HTTP_2);
    let mut baggage = None;
    for (name, value) in req.headers() {
        let name = HeaderName::from_bytes(name)?;
        if cfg.mark.as_ref().is_some_and(|m| m.owns(name.as_str())) {
            baggage = baggage.or((name == "baggage").then_some(value));
            continue;
        }
        if H2_FORBIDDEN.contains(&name.as_str())
            || (name == hyper::header::TE && value != b"trailers")
            || cfg.drop_headers.contains(&name)
            || cfg.secret_headers.iter().any(|h| *h.name() == name)
        {
            continue;
        }
        b = b.header(name, HeaderValue::from_bytes(value)?);
    }
    for (k, v) in &cfg.add_headers {
        b = b.header(k, v);
    }
    for secret in &cfg.secret_headers {
        b = b.header(secret.name(), secret.value());
    }
    if let Some(mark) = &cfg.mark {
        b = b.header(&mark.header, &mark.mirror);
        b = b.header("baggage", HeaderValue::from_bytes(&mark.baggage(baggage))?);
    }
    let mut frames = VecDeque::new();
    if !req.body.is_empty() {
        frames.push_back(Frame::data(req.body.clone()));
    }
    if !req.trailers.is_empty() {
        frames.push_back(Frame::trailers(header_map(&req.trailers)?));
    }
    // No exact size: hyper would add a content-length the client did not send.
    Ok(b.body(ReplayBody {
        frames,
        rest: req.rest.as_ref().and_then(|r| r.take()),
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::secrets::SecretHeader;
    use crate::replay::{parse_mirror_url, Mark};

    #[test]
    fn secrets_and_the_mark_replace_the_clients_copies() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "staging\n").unwrap();
        let mut cfg = ReplayConfig::new(parse_mirror_url("http://mirror:9").unwrap());
        let spec = format!("Authorization: Bearer @{}", token.display());
        cfg.secret_headers = vec![SecretHeader::load(spec.parse().unwrap()).unwrap()];
        cfg.mark = Some(Mark::new(HeaderName::from_static("x-mirrored"), "cand"));
        let field = |n: &str, v: &str| (Bytes::from(n.to_owned()), Bytes::from(v.to_owned()));
        let req = http2::Request {
            conn: 1,
            seq: 1,
            client: "10.0.0.1:40000".parse().unwrap(),
            server: "10.0.0.2:8080".parse().unwrap(),
            fields: vec![
                field(":method", "POST"),
                field(":scheme", "http"),
                field(":authority", "books"),
                field(":path", "/pkg.Books/GetBook"),
                field("authorization", "Bearer prod"),
                field("baggage", "tenant=7"),
                field("x-mirrored", "spoofed"),
                field("grpc-timeout", "1S"),
            ],
            body: Bytes::new(),
            trailers: Vec::new(),
            from_start: true,
            rest: None,
            first_ts: 0,
            last_ts: 0,
        };
        let out = build_h2(&cfg, &req).unwrap();
        let all = |name: &str| -> Vec<&str> {
            out.headers()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("authorization"), ["Bearer staging"]);
        assert_eq!(all("x-mirrored"), ["cand"]);
        assert_eq!(all("baggage"), ["tenant=7,mirror-shadow=cand"]);
        assert_eq!(all("grpc-timeout"), ["1S"]);
    }
}
