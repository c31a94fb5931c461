//! Recordings: every extracted request kept on disk with its live response, to replay later
//! (`mirror-agent replay`) or export (`mirror-agent export --har`).
//!
//! # Format (version 1)
//!
//! A recording is a directory of files named `rec-<unix ms>-<n>.mrec`, read in name order. Each
//! file is append-only and streams:
//!
//! ```text
//! file   = "MIRREC" version:u16 block*
//! block  = "MRBK" compressed_len:u32 raw_len:u32 crc32:u32 deflate(record*)
//! record = len:u32 kind:u8 payload[len - 1]
//! ```
//!
//! All integers are little-endian. `crc32` covers the compressed bytes. A block holds up to a
//! second (or 256 KiB) of records, so a crash loses at most that, and compression sees enough
//! text to pay (HTTP heads shrink about 5×). Record kinds:
//!
//! - `1`, a request: `origin version:u8 raw_len:u32 raw`, where `raw` is the HTTP/1 message as
//!   it crossed the wire (head and framed body) minus the `--drop-header` headers;
//! - `2`, the live response to request `(conn, seq)`: `conn:u64 seq:u64 status:u16
//!   grpc:u8 grpc_status:u32 request_last_ts:u64 response_first_ts:u64 method:str target:str`;
//! - `3`, an HTTP/2 request (gRPC calls among them; `seq` is its stream id): `origin
//!   fields:list body:str trailers:list`, where the fields are the decoded header block,
//!   pseudo-headers first, minus dropped headers;
//! - `4`, where a connection's requests were read: `conn:u64 read_at:u8` (0 the wire, 1 a
//!   pod's `lo`, 2 a TLS library), before the connection's first request in each block.
//!
//! with `origin = first_ts:u64 last_ts:u64 conn:u64 seq:u64 client:addr server:addr`,
//! `addr = family:u8 (4|6) ip:[u8; 16] port:u16`, `str = len:u32 bytes` and
//! `list = count:u32 (name:str value:str)*`.
//!
//! Why this shape: length-prefixed binary records need no escaping and skip unknown kinds (a
//! later version may add some); blocks with their own length and checksum let a reader find a
//! torn or damaged part, say where it is, and carry on at the next block instead of losing the
//! rest of the file; the version in each file's header lets a reader refuse what it does not
//! know. Requests are written when they are extracted and responses when they come, so nothing
//! waits in memory for its pair; a response carries its request's method and target, so that it
//! can be compared without finding its request, and `(conn, seq)` joins them where needed.

pub mod har;
pub mod playback;
mod private;
pub mod reader;
pub mod writer;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;

use crate::capture::read_at::ReadAt;
use crate::http::{ResponseMeta, WireOrigin};

pub use reader::{Issue, IssueKind, Reader};
pub use writer::{RecordConfig, RecordStats, Recorder};

pub const FILE_MAGIC: &[u8; 6] = b"MIRREC";
pub const VERSION: u16 = 1;
pub const BLOCK_MAGIC: &[u8; 4] = b"MRBK";
/// Block header: magic, compressed length, raw length, checksum.
pub const BLOCK_HEADER: usize = 16;
/// Largest block either way; a header claiming more is damage.
pub const MAX_BLOCK: usize = 64 << 20;
pub const FILE_SUFFIX: &str = ".mrec";

/// A recorded response's server: records keep it per connection, in its source record.
const UNRECORDED_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const KIND_H2_REQUEST: u8 = 3;
const KIND_SOURCE: u8 = 4;

/// A recorded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Its connection, position on it (0, 1, …) and capture times (ns since the Unix epoch).
    pub at: WireOrigin,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// The message as it crossed the wire, minus dropped headers.
    pub raw: Bytes,
}

/// A recorded HTTP/2 request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedH2Request {
    /// Its connection, stream id and capture times.
    pub at: WireOrigin,
    /// The header block, pseudo-headers first, as decoded.
    pub fields: Vec<(Bytes, Bytes)>,
    pub body: Bytes,
    pub trailers: Vec<(Bytes, Bytes)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Request(RecordedRequest),
    H2Request(RecordedH2Request),
    /// A live response, as the pipeline described it.
    Response(ResponseMeta),
    /// Where the requests of connection `conn` that follow were read.
    Source {
        conn: u64,
        read_at: ReadAt,
    },
}

fn put_origin(out: &mut Vec<u8>, at: &WireOrigin) {
    for v in [at.first_ts, at.last_ts, at.conn, at.seq] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    put_addr(out, &at.client);
    put_addr(out, &at.server);
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let (family, octets) = match a.ip() {
        IpAddr::V4(v4) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v4.octets());
            (4u8, o)
        }
        IpAddr::V6(v6) => (6u8, v6.octets()),
    };
    out.push(family);
    out.extend_from_slice(&octets);
    out.extend_from_slice(&a.port().to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_list(out: &mut Vec<u8>, list: &[(Bytes, Bytes)]) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for (n, v) in list {
        put_bytes(out, n);
        put_bytes(out, v);
    }
}

impl Record {
    /// Appends the record (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Record::Request(r) => {
                out.push(KIND_REQUEST);
                put_origin(out, &r.at);
                out.push(r.version);
                put_bytes(out, &r.raw);
            }
            Record::H2Request(r) => {
                out.push(KIND_H2_REQUEST);
                put_origin(out, &r.at);
                put_list(out, &r.fields);
                put_bytes(out, &r.body);
                put_list(out, &r.trailers);
            }
            Record::Source { conn, read_at } => {
                out.push(KIND_SOURCE);
                out.extend_from_slice(&conn.to_le_bytes());
                out.push(read_at.code());
            }
            Record::Response(r) => {
                out.push(KIND_RESPONSE);
                out.extend_from_slice(&r.conn.to_le_bytes());
                out.extend_from_slice(&r.request_seq.to_le_bytes());
                out.extend_from_slice(&r.status.to_le_bytes());
                out.push(u8::from(r.grpc_status.is_some()));
                out.extend_from_slice(&r.grpc_status.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&r.request_last_ts.to_le_bytes());
                out.extend_from_slice(&r.response_first_ts.to_le_bytes());
                put_bytes(out, r.method.as_bytes());
                put_bytes(out, r.target.as_bytes());
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes one record's payload (after the length prefix). `Ok(None)`: a kind this version
    /// does not know, skipped.
    pub fn decode(payload: &[u8]) -> Result<Option<Record>, DecodeError> {
        let mut c = Cursor(payload);
        let kind = c.u8()?;
        let record = match kind {
            KIND_REQUEST => Record::Request(RecordedRequest {
                at: c.origin()?,
                version: c.u8()?,
                raw: c.bytes()?,
            }),
            KIND_H2_REQUEST => Record::H2Request(RecordedH2Request {
                at: c.origin()?,
                fields: c.list()?,
                body: c.bytes()?,
                trailers: c.list()?,
            }),
            KIND_RESPONSE => {
                let (conn, request_seq, status) = (c.u64()?, c.u64()?, c.u16()?);
                let has_grpc = c.u8()? != 0;
                let grpc = c.u32()?;
                Record::Response(ResponseMeta {
                    conn,
                    server: UNRECORDED_SERVER,
                    request_seq,
                    status,
                    grpc_status: has_grpc.then_some(grpc),
                    request_last_ts: c.u64()?,
                    response_first_ts: c.u64()?,
                    method: c.text()?.into(),
                    target: c.text()?.into(),
                })
            }
            KIND_SOURCE => {
                let conn = c.u64()?;
                // A source this version does not know: the requests are kept, their source not.
                let Some(read_at) = ReadAt::from_code(c.u8()?) else {
                    return Ok(None);
                };
                Record::Source { conn, read_at }
            }
            _ => return Ok(None),
        };
        Ok(Some(record))
    }
}

/// A record shorter than its kind's fields, or with an address family that does not exist.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record cut short")]
    Short,
    #[error("unknown address family {0}")]
    Family(u8),
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Short);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        Ok(String::from_utf8_lossy(&self.bytes()?).into_owned())
    }
    fn origin(&mut self) -> Result<WireOrigin, DecodeError> {
        Ok(WireOrigin {
            first_ts: self.u64()?,
            last_ts: self.u64()?,
            conn: self.u64()?,
            seq: self.u64()?,
            client: self.addr()?,
            server: self.addr()?,
        })
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
    fn list(&mut self) -> Result<Vec<(Bytes, Bytes)>, DecodeError> {
        let n = self.u32()? as usize;
        // Each entry takes at least 8 bytes: a count beyond what is left is damage.
        if n > self.0.len() / 8 {
            return Err(DecodeError::Short);
        }
        (0..n).map(|_| Ok((self.bytes()?, self.bytes()?))).collect()
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let family = self.u8()?;
        let o: [u8; 16] = self.take(16)?.try_into().unwrap();
        let port = self.u16()?;
        let ip = match family {
            4 => IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3])),
            6 => IpAddr::V6(Ipv6Addr::from(o)),
            f => return Err(DecodeError::Family(f)),
        };
        Ok(SocketAddr::new(ip, port))
    }
}

/// The message `raw` without the headers named in `drop` (case-insensitively): the request line
/// and every other header line kept byte for byte. `head_len` is where the body starts.
pub fn without_headers(raw: &[u8], head_len: usize, drop: &[impl AsRef<str>]) -> Vec<u8> {
    let (head, body) = raw.split_at(head_len.min(raw.len()));
    let mut out = Vec::with_capacity(raw.len());
    let mut lines = head.split_inclusive(|b| *b == b'\n');
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
    }
    for line in lines {
        let name = line.split(|b| *b == b':').next().unwrap_or(b"");
        let named = |d: &_| {
            let d: &str = AsRef::as_ref(d);
            std::str::from_utf8(name).is_ok_and(|n| n.trim().eq_ignore_ascii_case(d))
        };
        if line.contains(&b':') && drop.iter().any(named) {
            continue;
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Record {
        Record::Request(RecordedRequest {
            at: WireOrigin {
                first_ts: 1,
                last_ts: 2,
                conn: 3,
                seq: 4,
                client: "10.0.0.1:40000".parse().unwrap(),
                server: "[fd00::2]:8080".parse().unwrap(),
            },
            version: 1,
            raw: Bytes::from_static(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        })
    }

    #[test]
    fn records_survive_encoding_and_unknown_kinds_are_skipped() {
        let response = Record::Response(ResponseMeta {
            conn: 3,
            server: UNRECORDED_SERVER,
            request_seq: 4,
            method: "GET".into(),
            target: "/".into(),
            status: 200,
            grpc_status: Some(14),
            request_last_ts: 2,
            response_first_ts: 9,
        });
        let h2 = Record::H2Request(RecordedH2Request {
            at: WireOrigin {
                first_ts: 5,
                last_ts: 6,
                conn: 7,
                seq: 3,
                client: "10.0.0.1:40000".parse().unwrap(),
                server: "10.0.0.2:50051".parse().unwrap(),
            },
            fields: vec![
                (Bytes::from_static(b":method"), Bytes::from_static(b"POST")),
                (
                    Bytes::from_static(b":path"),
                    Bytes::from_static(b"/pkg.Svc/Call"),
                ),
            ],
            body: Bytes::from_static(b"\0\0\0\0\x02hi"),
            trailers: vec![(Bytes::from_static(b"x-t"), Bytes::from_static(b"1"))],
        });
        for r in [request(), response, h2] {
            let mut out = Vec::new();
            r.encode(&mut out);
            let len = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
            assert_eq!(len, out.len() - 4);
            assert_eq!(Record::decode(&out[4..]), Ok(Some(r)));
            for cut in 1..out.len() - 4 {
                assert!(Record::decode(&out[4..4 + cut]).is_err(), "cut at {cut}");
            }
        }
        assert_eq!(Record::decode(&[99, 1, 2, 3]), Ok(None));
    }

    #[test]
    fn dropped_headers_leave_the_rest_byte_for_byte() {
        let raw = b"POST /a HTTP/1.1\r\nHost: x\r\nauthorization: Bearer s\r\nCookie: c=1\r\nX-Keep:  v \r\n\r\nbody: yes";
        let head = raw.len() - "body: yes".len();
        let out = without_headers(raw, head, &["Authorization", "cookie"]);
        assert_eq!(
            out,
            b"POST /a HTTP/1.1\r\nHost: x\r\nX-Keep:  v \r\n\r\nbody: yes".to_vec()
        );
    }
}
