//! What a recording keeps of a request: `--drop-header`'s headers left out and, with
//! redaction rules, the target, header values and body redacted (`crate::redact`) before
//! anything reaches the disk.

use bytes::Bytes;

use crate::http::framing::{BodyDecoder, Framing};
use crate::http::{h1, h2};
use crate::redact::Redactor;

use super::without_headers;

/// The body as the client meant it: chunked framing removed.
pub fn decoded_body(req: &h1::Request) -> Vec<u8> {
    let mut out = Vec::with_capacity(req.body.len());
    match req.framing {
        Framing::Chunked => {
            if let Some(mut d) = BodyDecoder::new(Framing::Chunked) {
                let _ = d.feed_with(&req.body, 64 << 10, &mut |b| out.extend_from_slice(b));
            }
        }
        _ => out.extend_from_slice(&req.body),
    }
    out
}

fn dropped(drop: &[String], name: &[u8]) -> bool {
    drop.iter().any(|d| d.as_bytes().eq_ignore_ascii_case(name))
}

/// An HTTP/1 request as kept. Redacted, its body is written with a Content-Length (a chunked
/// body is decoded first, and its trailers, which may hold anything, are left out), so that the
/// recording still replays as a well-framed request.
pub fn kept_h1(req: &h1::Request, drop: &[String], redactor: Option<&Redactor>) -> Bytes {
    let Some(r) = redactor else {
        return if drop.is_empty() {
            req.raw.clone()
        } else {
            without_headers(&req.raw, req.head().len(), drop).into()
        };
    };
    let chunked = matches!(req.framing, Framing::Chunked);
    let plain = decoded_body(req);
    let redacted = r.body(&plain);
    let reframed = chunked || redacted.is_some();
    let body = redacted.unwrap_or(plain);
    let version = if req.version == 0 { "1.0" } else { "1.1" };
    let mut out = format!(
        "{} {} HTTP/{version}\r\n",
        req.method(),
        r.target(req.target())
    )
    .into_bytes();
    for (name, value) in req.headers() {
        let framing = name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("trailer");
        if dropped(drop, name.as_bytes()) || (reframed && framing) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&redacted_value(r, name, value));
        out.extend_from_slice(b"\r\n");
    }
    if reframed {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out.into()
}

/// A header value redacted; one that is not UTF-8 is masked whole, as patterns cannot be
/// looked for in it.
fn redacted_value(r: &Redactor, name: &str, value: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(value) {
        Ok(v) => r.header(name, v).into_owned().into_bytes(),
        Err(_) => r.mask(value).into_bytes(),
    }
}

/// An HTTP/2 request's fields (or trailers) as kept: dropped ones left out, `:path` and values
/// redacted.
pub fn kept_h2_fields(
    fields: &[(Bytes, Bytes)],
    drop: &[String],
    redactor: Option<&Redactor>,
) -> Vec<(Bytes, Bytes)> {
    fields
        .iter()
        .filter(|(n, _)| !dropped(drop, n))
        .map(|(n, v)| {
            let Some(r) = redactor else {
                return (n.clone(), v.clone());
            };
            let value = match (n.as_ref(), std::str::from_utf8(v)) {
                (b":path", Ok(path)) => r.target(path).into_owned().into_bytes(),
                (name, _) if name.starts_with(b":") => v.to_vec(),
                (name, _) => redacted_value(r, &String::from_utf8_lossy(name), v),
            };
            (n.clone(), Bytes::from(value))
        })
        .collect()
}

/// An HTTP/2 request's body as kept. A gRPC body is a sequence of length-prefixed protobuf
/// messages: patterns are not looked for in it (its bytes are not text), named fields cannot
/// be found in it without the schema, so it is kept as it is.
pub fn kept_h2_body(req: &h2::Request, redactor: Option<&Redactor>) -> Bytes {
    let grpc = req
        .fields
        .iter()
        .any(|(n, v)| n.as_ref() == b"content-type" && v.starts_with(b"application/grpc"));
    match redactor {
        Some(r) if !grpc => r
            .body(&req.body)
            .map_or_else(|| req.body.clone(), Bytes::from),
        _ => req.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::WireOrigin;
    use crate::redact::{Pattern, RedactRules};

    fn at() -> WireOrigin {
        WireOrigin {
            first_ts: 1,
            last_ts: 2,
            conn: 3,
            seq: 4,
            client: "10.0.0.1:40000".parse().unwrap(),
            server: "10.0.0.2:8080".parse().unwrap(),
        }
    }

    fn redactor() -> Redactor {
        Redactor::new(
            vec![9; 32],
            RedactRules {
                headers: vec!["x-api-key".into()],
                query: vec!["token".into()],
                json_paths: vec!["$.card".into()],
                patterns: vec![Pattern::Email],
            },
        )
    }

    #[test]
    fn a_redacted_request_stays_well_framed_and_keeps_no_secret() {
        let r = redactor();
        let chunk = |c: &str| format!("{:x}\r\n{c}\r\n", c.len());
        let raw = format!(
            "POST /pay?token=t0k3n&x=1 HTTP/1.1\r\nHost: a\r\nX-Api-Key: k-secret\r\n\
             Authorization: Bearer prod\r\nTransfer-Encoding: chunked\r\n\r\n{}{}0\r\n\r\n",
            chunk(r#"{"card":"4111","#),
            chunk(r#""to":"al@ex.com"}"#)
        );
        let req = h1::Request::from_wire(Bytes::from(raw.clone()), at()).unwrap();
        let kept = kept_h1(&req, &["authorization".into()], Some(&r));
        let text = String::from_utf8(kept.to_vec()).unwrap();
        for secret in ["t0k3n", "k-secret", "prod", "4111", "al@ex.com", "chunked"] {
            assert!(!text.contains(secret), "{secret} kept: {text}");
        }
        // It parses back as one request with its whole body.
        let back = h1::Request::from_wire(kept.clone(), at()).unwrap();
        assert_eq!(
            back.target(),
            format!("/pay?token={}&x=1", r.mask(b"t0k3n"))
        );
        let body: serde_json::Value = serde_json::from_slice(&decoded_body(&back)).unwrap();
        assert_eq!(body["card"], r.mask(br#""4111""#));
        assert_eq!(body["to"], r.mask(b"al@ex.com"));
        // Without rules, only dropped headers go, and the bytes are otherwise the client's.
        let plain = kept_h1(&req, &["authorization".into()], None);
        assert_eq!(
            plain.len(),
            raw.len() - "Authorization: Bearer prod\r\n".len()
        );
    }

    #[test]
    fn h2_fields_are_redacted_and_grpc_bodies_kept() {
        let r = redactor();
        let f = |n: &str, v: &str| (Bytes::from(n.to_owned()), Bytes::from(v.to_owned()));
        let fields = vec![
            f(":method", "POST"),
            f(":path", "/pkg.S/Get?token=abc"),
            f("x-api-key", "k"),
            f("authorization", "Bearer prod"),
            f("content-type", "application/grpc"),
        ];
        let kept = kept_h2_fields(&fields, &["authorization".into()], Some(&r));
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[1].1, format!("/pkg.S/Get?token={}", r.mask(b"abc")));
        assert_eq!(kept[2].1, r.mask(b"k"));
        let req = h2::Request {
            conn: 1,
            seq: 1,
            client: "10.0.0.1:1".parse().unwrap(),
            server: "10.0.0.2:2".parse().unwrap(),
            fields,
            body: Bytes::from_static(b"\0\0\0\0\x05al@ex"),
            trailers: Vec::new(),
            from_start: true,
            rest: None,
            first_ts: 0,
            last_ts: 0,
        };
        assert_eq!(kept_h2_body(&req, Some(&r)), req.body);
    }
}
