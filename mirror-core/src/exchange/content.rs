//! What a response says, as kept for comparison: its result code, chosen headers and body
//! (whole up to a cap, else length and digest). The parser fills it for live responses and the
//! replay stage for the mirror's answers; the comparison reads it.

use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A response body as kept for comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// The whole body (decoded from its transfer framing).
    Whole(Bytes),
    /// A body over the cap: only its length and SHA-256.
    Digest { len: u64, sha256: [u8; 32] },
}

impl Body {
    /// Keeps `bytes` whole up to `cap`, else their digest.
    pub fn new(bytes: Bytes, cap: usize) -> Body {
        if bytes.len() <= cap {
            Body::Whole(bytes)
        } else {
            Body::Digest {
                len: bytes.len() as u64,
                sha256: Sha256::digest(&bytes).into(),
            }
        }
    }

    /// The body's length, also when only its digest was kept.
    pub fn len(&self) -> u64 {
        match self {
            Body::Whole(b) => b.len() as u64,
            Body::Digest { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sha256(&self) -> [u8; 32] {
        match self {
            Body::Whole(b) => Sha256::digest(b).into(),
            Body::Digest { sha256, .. } => *sha256,
        }
    }

    /// Bytes this body holds in memory.
    pub fn held(&self) -> usize {
        match self {
            Body::Whole(b) => b.len(),
            Body::Digest { .. } => 32,
        }
    }
}

/// Builds a body as it arrives, keeping it whole up to the cap and digesting beyond.
#[derive(Debug)]
pub struct BodyCollector {
    cap: usize,
    kept: Vec<u8>,
    digest: Option<Sha256>,
    len: u64,
}

impl BodyCollector {
    pub fn new(cap: usize) -> Self {
        BodyCollector {
            cap,
            kept: Vec::new(),
            digest: None,
            len: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        if let Some(d) = &mut self.digest {
            d.update(data);
        } else if self.kept.len() + data.len() <= self.cap {
            self.kept.extend_from_slice(data);
        } else {
            let mut d = Sha256::new();
            d.update(&self.kept);
            d.update(data);
            self.kept = Vec::new();
            self.digest = Some(d);
        }
    }

    pub fn finish(self) -> Body {
        match self.digest {
            Some(d) => Body::Digest {
                len: self.len,
                sha256: d.finalize().into(),
            },
            None => Body::Whole(Bytes::from(self.kept)),
        }
    }
}

/// What of each response is kept for comparison.
#[derive(Clone, Debug)]
pub struct ContentCapture {
    /// Bodies up to this size are kept whole, larger ones by digest.
    pub max_body: usize,
    /// Headers kept (lower case).
    pub headers: Vec<String>,
    /// Connections compared, in parts per million: the share whose responses the kernel
    /// clones whole (`MirrorConfig::whole_responses_ppm`), chosen by the same flow hash.
    pub share_ppm: u32,
}

impl ContentCapture {
    /// Whether this connection's responses are compared: the kernel's own test, so that only
    /// connections whose bodies it clones are read for content.
    pub fn compares(&self, client: std::net::SocketAddr, server: std::net::SocketAddr) -> bool {
        use mirror_common::AddrKey;
        if self.share_ppm >= mirror_common::SAMPLE_ALL {
            return true;
        }
        let (c, s) = (AddrKey::from_ip(client.ip()), AddrKey::from_ip(server.ip()));
        mirror_common::flow_hash(&c.addr, &s.addr, client.port(), server.port())
            % mirror_common::SAMPLE_ALL
            < self.share_ppm
    }
}

/// A response's content, gathered as it is read.
#[derive(Debug)]
pub struct ContentBuilder {
    code: String,
    headers: Vec<(String, String)>,
    body: BodyCollector,
}

impl ContentBuilder {
    /// Starts with a response's head (status line and headers, as received): the result
    /// code, and the headers `cfg` names. The head was parsed once already, for its framing;
    /// only compared responses pay for reading their headers again.
    pub fn from_head(cfg: &ContentCapture, status: u16, head: &[u8]) -> Self {
        let mut slots = [httparse::EMPTY_HEADER; super::HEADER_SLOTS];
        let mut resp = httparse::Response::new(&mut slots);
        let mut kept = Vec::new();
        if resp.parse(head).is_ok() {
            for h in resp.headers.iter() {
                let name = h.name.to_ascii_lowercase();
                if cfg.headers.contains(&name) {
                    kept.push((name, String::from_utf8_lossy(h.value).into_owned()));
                }
            }
        }
        ContentBuilder {
            code: status.to_string(),
            headers: kept,
            body: BodyCollector::new(cfg.max_body),
        }
    }

    pub fn push(&mut self, body: &[u8]) {
        self.body.push(body);
    }

    pub fn finish(self) -> Content {
        Content::new(self.code, self.headers, self.body.finish())
    }
}

/// One response as compared: its result code, the compared headers (names in lower case) and
/// its body.
#[derive(Clone, Debug)]
pub struct Content {
    pub code: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// The body parsed as JSON, once: a live response is compared with every mirror's and
    /// with the next live answer to the same request.
    parsed: OnceLock<Option<Value>>,
}

impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        (&self.code, &self.headers, &self.body) == (&other.code, &other.headers, &other.body)
    }
}

impl Eq for Content {}

impl Content {
    pub fn new(code: String, headers: Vec<(String, String)>, body: Body) -> Content {
        Content {
            code,
            headers,
            body,
            parsed: OnceLock::new(),
        }
    }

    /// The body as a JSON document (an object or an array: a bare scalar is taken as text).
    pub fn json(&self) -> Option<&Value> {
        self.parsed
            .get_or_init(|| {
                let Body::Whole(b) = &self.body else {
                    return None;
                };
                let first = b.iter().find(|c| !c.is_ascii_whitespace())?;
                if !matches!(first, b'{' | b'[') {
                    return None;
                }
                serde_json::from_slice(b).ok()
            })
            .as_ref()
    }

    /// Bytes this content holds in memory.
    pub fn held(&self) -> usize {
        self.body.held()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + self.code.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_compared_are_those_the_kernel_clones_whole() {
        let cfg = |share_ppm| ContentCapture {
            max_body: 1,
            headers: Vec::new(),
            share_ppm,
        };
        let server: std::net::SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let clients: Vec<std::net::SocketAddr> = (0..2000)
            .map(|p| format!("10.0.0.1:{}", 30000 + p).parse().unwrap())
            .collect();
        let half = clients
            .iter()
            .filter(|c| cfg(500_000).compares(**c, server))
            .count();
        assert!((800..1200).contains(&half), "{half} of 2000");
        for c in &clients {
            // The kernel hashes the response's tuple (server first): the hash is symmetric.
            let (a, b) = (
                mirror_common::AddrKey::from_ip(server.ip()),
                mirror_common::AddrKey::from_ip(c.ip()),
            );
            let kernel = mirror_common::flow_hash(&a.addr, &b.addr, server.port(), c.port())
                % mirror_common::SAMPLE_ALL
                < 500_000;
            assert_eq!(cfg(500_000).compares(*c, server), kernel);
        }
        assert!(clients.iter().all(|c| cfg(1_000_000).compares(*c, server)));
    }
}
