//! Where the mirror is: its URL, the address it resolves to, the check that it is not the
//! live service itself, and how connections to it are opened and their failures named.

use super::*;

/// Why a mirror cannot be used. The binary adds which option to change.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{url:?} is not a URL")]
    NotAUrl {
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error(
        "{url:?}: scheme {scheme} is not supported; the mirror is spoken to over http or https"
    )]
    Scheme { url: String, scheme: String },
    #[error("{url:?} has no scheme")]
    NoScheme { url: String },
    #[error("{url:?} has no host")]
    NoHost { url: String },
    #[error("cannot resolve the mirror host {host:?}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the mirror host {host:?} resolves to no address")]
    NoAddress { host: String },
    #[error(
        "the mirror {mirror} is on live port {port} and is reached through {iface}, where the \
         agent watches outgoing packets: it would capture the requests it replays there and \
         mirror them again"
    )]
    FeedbackLoop {
        mirror: SocketAddr,
        port: u16,
        iface: String,
    },
}

/// Parses and checks a mirror URL: `http[s]://host[:port]` (a path prefix is kept).
pub fn parse_mirror_url(s: &str) -> Result<Uri, MirrorError> {
    let url = || s.to_string();
    let uri = Uri::from_str(s).map_err(|source| MirrorError::NotAUrl { url: url(), source })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(MirrorError::Scheme {
                url: url(),
                scheme: other.to_string(),
            })
        }
        None => return Err(MirrorError::NoScheme { url: url() }),
    }
    if uri.host().is_none() {
        return Err(MirrorError::NoHost { url: url() });
    }
    Ok(uri)
}

/// The mirror's host (IPv6 literals without brackets) and port, as a connect needs them.
pub(super) fn host_port(uri: &Uri) -> (&str, u16) {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']');
    let default = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    (host, uri.port_u16().unwrap_or(default))
}

/// Whether the mirror is spoken to over TLS.
pub fn is_https(uri: &Uri) -> bool {
    uri.scheme_str() == Some("https")
}

/// TLS for `uri` when it is an https mirror.
pub fn mirror_tls(uri: &Uri, opts: &TlsOptions) -> Result<Option<MirrorTls>, TlsError> {
    if !is_https(uri) {
        return Ok(None);
    }
    MirrorTls::new(host_port(uri).0, opts).map(Some)
}

/// Resolves the mirror and tries one connection (and a TLS handshake for an https mirror), so
/// that a wrong name fails at start with a clear error. A mirror that is down, or whose
/// certificate is refused, is only a warning: the agent mirrors when it comes up. Returns the
/// address connected to.
pub async fn check_mirror(uri: &Uri, tls: Option<&MirrorTls>) -> Result<SocketAddr, MirrorError> {
    let (host, port) = host_port(uri);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| MirrorError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let Some(addr) = addrs.first() else {
        return Err(MirrorError::NoAddress {
            host: host.to_string(),
        });
    };
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            if let Some(tls) = tls {
                let handshake = tls.connect(tcp, Alpn::Http1);
                match tokio::time::timeout(Duration::from_secs(2), handshake).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => log::warn!(
                        "mirror {uri}: the TLS handshake failed ({e}); every request will fail \
                         until it succeeds (--mirror-ca FILE trusts a private CA, \
                         --mirror-cert/--mirror-key give a client certificate)"
                    ),
                    Err(_) => log::warn!("mirror {uri}: no TLS handshake within 2 s"),
                }
            }
        }
        Ok(Err(e)) => log::warn!(
            "mirror {uri} is not reachable now ({e}); mirroring starts when it is, with backoff"
        ),
        Err(_) => log::warn!(
            "mirror {uri} did not accept a connection within 2 s; mirroring goes on with backoff"
        ),
    }
    Ok(*addr)
}

/// Fails when the requests replayed to the mirror would be captured and mirrored again without
/// end: the mirror matches the live filter (a live port, and an address the filter takes) and
/// the route to it leaves through an interface whose outgoing packets are hooked
/// (`egress_watched`). Otherwise says which check passed.
pub fn check_no_loop(
    mirror: SocketAddr,
    ports: &[u16],
    addrs: &[IpAddr],
    route_iface: &str,
    egress_watched: &[String],
) -> Result<String, MirrorError> {
    let ip = mirror.ip().to_canonical();
    if !ports.contains(&mirror.port()) {
        return Ok(format!(
            "no feedback loop: the mirror's port {} is not a live port",
            mirror.port()
        ));
    }
    if !addrs.is_empty() && !addrs.contains(&ip) {
        return Ok(format!(
            "no feedback loop: the mirror's address {ip} is not a live address"
        ));
    }
    if !egress_watched.iter().any(|i| i == route_iface) {
        return Ok(format!(
            "no feedback loop: requests to the mirror {mirror} leave through {route_iface}, \
             where no hook sees outgoing packets"
        ));
    }
    Err(MirrorError::FeedbackLoop {
        mirror,
        port: mirror.port(),
        iface: route_iface.to_string(),
    })
}

/// How long a connection to the mirror may take to open.
pub(super) fn connect_timeout(cfg: &ReplayConfig) -> Duration {
    cfg.timeout.min(Duration::from_secs(3))
}

/// Opens a connection to the mirror within the connect timeout, and over TLS (its handshake
/// within the same timeout) for an https mirror, offering `alpn`.
pub(super) async fn connect_mirror(
    cfg: &ReplayConfig,
    alpn: Alpn,
) -> Result<MirrorStream, MirrorResult> {
    let (host, port) = host_port(&cfg.mirror);
    let open = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        let _ = stream.set_nodelay(true);
        match &cfg.tls {
            Some(tls) => tls.connect(stream, alpn).await,
            None => Ok(MirrorStream::Plain(stream)),
        }
    };
    tokio::time::timeout(connect_timeout(cfg), open)
        .await
        .map_err(|_| MirrorResult::Timeout)?
        .map_err(|e| classify(&e))
}

pub(super) fn classify(err: &(dyn std::error::Error + 'static)) -> MirrorResult {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => MirrorResult::Refused,
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => MirrorResult::Reset,
                std::io::ErrorKind::TimedOut => MirrorResult::Timeout,
                _ => MirrorResult::Error,
            };
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return MirrorResult::Reset;
            }
        }
        cur = e.source();
    }
    MirrorResult::Error
}

/// The path and query the mirror is asked for: the request's (absolute-form targets keep only
/// their path and query) under the mirror URL's path prefix.
pub(super) fn mirror_path<'a>(cfg: &ReplayConfig, target: &'a str) -> Cow<'a, str> {
    // The origin form (`/path?query`), nearly every request's, is kept as it is.
    let path: Cow<'a, str> = if target.starts_with('/') {
        Cow::Borrowed(target)
    } else {
        match Uri::from_str(target) {
            Ok(u) if u.scheme().is_some() => Cow::Owned(
                u.path_and_query()
                    .map_or_else(|| "/".into(), |p| p.as_str().to_string()),
            ),
            _ => Cow::Borrowed(target),
        }
    };
    let rewritten = match cfg.rewrite.apply(&path) {
        Cow::Owned(rewritten) => Some(rewritten),
        Cow::Borrowed(_) => None,
    };
    let path = rewritten.map_or(path, Cow::Owned);
    match cfg.mirror.path().trim_end_matches('/') {
        "" => path,
        prefix => Cow::Owned(format!("{prefix}{path}")),
    }
}

/// The authority the mirror is told (Host, or `:authority`), from the original one.
pub(super) fn mirror_authority<'a>(
    cfg: &'a ReplayConfig,
    original: Option<&'a [u8]>,
) -> Result<Cow<'a, str>, Unsendable> {
    let mirror = cfg
        .mirror
        .authority()
        .ok_or(Unsendable::NoAuthority)?
        .as_str();
    let original = || String::from_utf8_lossy(original.unwrap_or(mirror.as_bytes()));
    Ok(match cfg.host {
        HostMode::Mirror => Cow::Borrowed(mirror),
        HostMode::Keep => original(),
        HostMode::Shadow => {
            let h = original();
            // Envoy appends the suffix to the host name, before any port.
            Cow::Owned(match h.rsplit_once(':') {
                Some((name, port))
                    if !h.ends_with(']') && port.bytes().all(|c| c.is_ascii_digit()) =>
                {
                    format!("{name}-shadow:{port}")
                }
                _ => format!("{h}-shadow"),
            })
        }
    })
}
