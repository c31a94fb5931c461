//! `mirror-agent export DIR --har FILE`: a recording as HAR 1.2 (the HTTP Archive format that
//! browsers' developer tools, proxies and load-testing tools read). The format is plain JSON:
//! serde types here, for the fields a recording has.
//!
//! A recording keeps each request whole and its live response's status and timing, not the
//! response's headers or body: entries have the response's status, and its content is empty
//! (`size` 0, `comment` saying so).

use crate::capture::read_at::ReadAt;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::private::decoded_body;
use super::reader::{Issue, Reader};
use super::Record;
use crate::http::{h1, ResponseMeta, WireOrigin};

#[derive(Serialize)]
struct Har {
    log: Log,
}

#[derive(Serialize)]
struct Log {
    version: &'static str,
    creator: Creator,
    entries: Vec<Entry>,
}

#[derive(Serialize)]
struct Creator {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    started_date_time: String,
    time: f64,
    request: HarRequest,
    response: HarResponse,
    cache: Empty,
    timings: Timings,
    #[serde(rename = "serverIPAddress")]
    server_ip_address: String,
    connection: String,
    /// Where the request was read (`wire`, `in_pod`, `tls_library`): a custom field, as HAR
    /// allows with a leading underscore; absent in recordings that do not say.
    #[serde(rename = "_readAt", skip_serializing_if = "Option::is_none")]
    read_at: Option<&'static str>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HarRequest {
    method: String,
    url: String,
    http_version: String,
    cookies: Vec<NameValue>,
    headers: Vec<NameValue>,
    query_string: Vec<NameValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    post_data: Option<PostData>,
    headers_size: i64,
    body_size: i64,
}

#[derive(Serialize)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostData {
    mime_type: String,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HarResponse {
    status: u16,
    status_text: String,
    http_version: String,
    cookies: Vec<NameValue>,
    headers: Vec<NameValue>,
    content: Content,
    #[serde(rename = "redirectURL")]
    redirect_url: String,
    headers_size: i64,
    body_size: i64,
    comment: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Content {
    size: i64,
    mime_type: String,
}

#[derive(Serialize)]
struct Timings {
    send: f64,
    wait: f64,
    receive: f64,
}

fn rfc3339(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What an entry is made of, from either protocol's request.
struct Asked {
    method: String,
    target: String,
    host: String,
    version: &'static str,
    headers: Vec<NameValue>,
    content_type: String,
    body: Vec<u8>,
    headers_size: i64,
    at: WireOrigin,
}

fn asked_h1(req: &h1::Request) -> Asked {
    Asked {
        method: req.method().to_string(),
        target: req.target().to_string(),
        host: req
            .header("host")
            .map(text)
            .unwrap_or_else(|| req.server.to_string()),
        version: if req.version == 0 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        },
        headers: req
            .headers()
            .map(|(n, v)| NameValue {
                name: n.to_string(),
                value: text(v),
            })
            .collect(),
        content_type: req.header("content-type").map(text).unwrap_or_default(),
        body: decoded_body(req),
        headers_size: req.head().len() as i64,
        at: req.origin(),
    }
}

fn asked_h2(r: &super::RecordedH2Request) -> Asked {
    let field = |name: &[u8]| {
        r.fields
            .iter()
            .find(|(n, _)| n.as_ref() == name)
            .map(|(_, v)| text(v))
    };
    Asked {
        method: field(b":method").unwrap_or_default(),
        target: field(b":path").unwrap_or_default(),
        host: field(b":authority")
            .or_else(|| field(b"host"))
            .unwrap_or_else(|| r.at.server.to_string()),
        version: "HTTP/2",
        headers: r
            .fields
            .iter()
            .map(|(n, v)| NameValue {
                name: text(n),
                value: text(v),
            })
            .collect(),
        content_type: field(b"content-type").unwrap_or_default(),
        body: r.body.to_vec(),
        headers_size: -1,
        at: r.at,
    }
}

/// The query's parameters, undecoded, as HAR lists them.
fn query_of(target: &str) -> Vec<NameValue> {
    let Some((_, q)) = target.split_once('?') else {
        return Vec::new();
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            NameValue {
                name: n.to_string(),
                value: v.to_string(),
            }
        })
        .collect()
}

fn entry(a: Asked, resp: Option<&ResponseMeta>, read_at: Option<ReadAt>) -> Entry {
    // Plaintext read from a TLS library was sent over HTTPS.
    let scheme = match read_at {
        Some(ReadAt::TlsLibrary) => "https",
        _ => "http",
    };
    let url = if a.target.starts_with("http://") || a.target.starts_with("https://") {
        a.target.clone()
    } else {
        format!("{scheme}://{}{}", a.host, a.target)
    };
    let query_string = query_of(&a.target);
    let post_data = (!a.body.is_empty()).then(|| match std::str::from_utf8(&a.body) {
        Ok(t) => PostData {
            mime_type: a.content_type.clone(),
            text: t.to_string(),
            encoding: None,
        },
        Err(_) => PostData {
            mime_type: a.content_type.clone(),
            text: base64(&a.body),
            encoding: Some("base64"),
        },
    });
    let wait_ms = resp.map_or(-1.0, |r| {
        r.response_first_ts.saturating_sub(r.request_last_ts) as f64 / 1e6
    });
    Entry {
        started_date_time: rfc3339(a.at.first_ts),
        time: wait_ms.max(0.0),
        request: HarRequest {
            method: a.method,
            url,
            http_version: a.version.into(),
            cookies: Vec::new(),
            headers: a.headers,
            query_string,
            post_data,
            headers_size: a.headers_size,
            body_size: a.body.len() as i64,
        },
        response: HarResponse {
            // HAR has no "unknown": 0 is what browsers write for a response that never came.
            status: resp.map_or(0, |r| r.status),
            status_text: String::new(),
            http_version: a.version.into(),
            cookies: Vec::new(),
            headers: Vec::new(),
            content: Content {
                size: 0,
                mime_type: String::new(),
            },
            redirect_url: String::new(),
            headers_size: -1,
            body_size: -1,
            comment: "recorded: status and timing only",
        },
        cache: Empty {},
        timings: Timings {
            send: 0.0,
            wait: wait_ms,
            receive: 0.0,
        },
        server_ip_address: a.at.server.ip().to_string(),
        connection: a.at.conn.to_string(),
        read_at: read_at.map(ReadAt::label),
    }
}

fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Writes the recording in `dir` to `out` as HAR. Returns the entries written and the issues
/// met reading.
pub fn export(dir: &Path, out: &mut impl Write) -> std::io::Result<(usize, Vec<Issue>)> {
    let mut reader = Reader::open(dir)?;
    let mut requests: Vec<Asked> = Vec::new();
    let mut responses: HashMap<(u64, u64), ResponseMeta> = HashMap::new();
    let mut sources: HashMap<u64, ReadAt> = HashMap::new();
    for record in reader.by_ref() {
        match record {
            Record::Request(r) => {
                if let Some(req) = h1::Request::from_wire(r.raw, r.at) {
                    requests.push(asked_h1(&req));
                }
            }
            Record::H2Request(r) => requests.push(asked_h2(&r)),
            Record::Response(r) => {
                responses.insert((r.conn, r.request_seq), r);
            }
            Record::Source { conn, read_at } => {
                sources.insert(conn, read_at);
            }
        }
    }
    let entries: Vec<Entry> = requests
        .into_iter()
        .map(|a| {
            let resp = responses.get(&(a.at.conn, a.at.seq));
            let read_at = sources.get(&a.at.conn).copied();
            entry(a, resp, read_at)
        })
        .collect();
    let n = entries.len();
    let har = Har {
        log: Log {
            version: "1.2",
            creator: Creator {
                name: "mirror-agent",
                version: env!("CARGO_PKG_VERSION"),
            },
            entries,
        },
    };
    serde_json::to_writer_pretty(&mut *out, &har)?;
    out.write_all(b"\n")?;
    Ok((n, reader.take_issues()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(1_764_000_000_123_000_000),
            "2025-11-24T16:00:00.123Z"
        );
    }
}
