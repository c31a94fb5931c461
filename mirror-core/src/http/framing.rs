//! Incremental HTTP/1.x body framing, and resynchronisation on a message start.
//!
//! The decoders only find where a body ends; they never copy, so the same code frames bodies
//! that are kept (requests) and bodies that are skipped (responses, dropped requests).

use memchr::memmem;

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body runs to the end of the connection.
    UntilClose,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    BadChunkSize,
    LineTooLong,
}

/// The end of a body, found incrementally.
#[derive(Clone, Debug)]
pub enum BodyDecoder {
    Length { remaining: u64 },
    Chunked(ChunkDecoder),
    UntilClose,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Option<BodyDecoder> {
        match framing {
            Framing::None | Framing::Length(0) => None,
            Framing::Length(n) => Some(BodyDecoder::Length { remaining: n }),
            Framing::Chunked => Some(BodyDecoder::Chunked(ChunkDecoder::default())),
            Framing::UntilClose => Some(BodyDecoder::UntilClose),
        }
    }

    /// Consumes body bytes from `data`. Returns how many belong to the body and whether the body
    /// ended there.
    pub fn feed(&mut self, data: &[u8], max_line: usize) -> Result<(usize, bool), BodyError> {
        self.feed_with(data, max_line, &mut |_| {})
    }

    /// As `feed`, and hands the body's bytes (without chunk framing) to `body` as they pass.
    pub fn feed_with(
        &mut self,
        data: &[u8],
        max_line: usize,
        body: &mut dyn FnMut(&[u8]),
    ) -> Result<(usize, bool), BodyError> {
        match self {
            BodyDecoder::Length { remaining } => {
                let n = (*remaining).min(data.len() as u64) as usize;
                *remaining -= n as u64;
                body(&data[..n]);
                Ok((n, *remaining == 0))
            }
            BodyDecoder::Chunked(c) => c.feed(data, max_line, body),
            BodyDecoder::UntilClose => {
                body(data);
                Ok((data.len(), false))
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ChunkDecoder {
    state: ChunkState,
    /// Bytes of the current size or trailer line seen so far.
    line: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

impl ChunkDecoder {
    fn feed(
        &mut self,
        data: &[u8],
        max_line: usize,
        body: &mut dyn FnMut(&[u8]),
    ) -> Result<(usize, bool), BodyError> {
        let mut at = 0;
        while at < data.len() {
            match self.state {
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let rest = &data[at..];
                    let (take, complete) = match memchr::memchr(b'\n', rest) {
                        Some(i) => (i + 1, true),
                        None => (rest.len(), false),
                    };
                    if self.line.len() + take > max_line {
                        return Err(BodyError::LineTooLong);
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    at += take;
                    if !complete {
                        return Ok((at, false));
                    }
                    let line = std::mem::take(&mut self.line);
                    match self.state {
                        ChunkState::Size => {
                            let size = match httparse::parse_chunk_size(&line) {
                                Ok(httparse::Status::Complete((_, size))) => size,
                                _ => return Err(BodyError::BadChunkSize),
                            };
                            self.state = if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            };
                        }
                        ChunkState::DataEnd => {
                            if line != b"\r\n" && line != b"\n" {
                                return Err(BodyError::BadChunkSize);
                            }
                            self.state = ChunkState::Size;
                        }
                        _ => {
                            // Trailer fields until an empty line.
                            if line == b"\r\n" || line == b"\n" {
                                return Ok((at, true));
                            }
                        }
                    }
                }
                ChunkState::Data(remaining) => {
                    let n = remaining.min((data.len() - at) as u64);
                    body(&data[at..at + n as usize]);
                    at += n as usize;
                    self.state = if remaining == n {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(remaining - n)
                    };
                }
            }
        }
        Ok((at, false))
    }
}

/// Methods that a resynchronising search accepts (RFC 9110 and WebDAV).
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
    b"SEARCH",
    b"PURGE",
];

/// Where a plausible request line (`METHOD SP target SP HTTP/1.x CRLF`) starts in `buf`.
pub fn find_request_start(buf: &[u8]) -> Option<usize> {
    for p in memmem::find_iter(buf, b" HTTP/1.") {
        let tail = &buf[p + 8..];
        if tail.len() < 2 || !tail[0].is_ascii_digit() || !(tail[1] == b'\r' || tail[1] == b'\n') {
            continue;
        }
        // Back over the target (no spaces or line breaks) to the space before it.
        let Some(sp) = buf[..p]
            .iter()
            .rposition(|b| matches!(b, b' ' | b'\r' | b'\n'))
        else {
            continue;
        };
        if buf[sp] != b' ' || sp + 1 == p {
            continue;
        }
        let target_first = buf[sp + 1];
        if !(target_first == b'/' || target_first == b'*' || target_first.is_ascii_alphabetic()) {
            continue;
        }
        // A known method just before that space (the longest, so PROPPATCH beats PATCH).
        let method = METHODS
            .iter()
            .filter(|m| buf[..sp].ends_with(m))
            .max_by_key(|m| m.len());
        if let Some(m) = method {
            return Some(sp - m.len());
        }
    }
    None
}

/// Where a plausible status line (`HTTP/1.x SP 3DIGIT`) starts in `buf`.
pub fn find_response_start(buf: &[u8]) -> Option<usize> {
    memmem::find_iter(buf, b"HTTP/1.").find(|&p| {
        let t = &buf[p + 7..];
        t.len() >= 6
            && t[0].is_ascii_digit()
            && t[1] == b' '
            && t[2..5].iter().all(u8::is_ascii_digit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_collecting(
        d: &mut BodyDecoder,
        data: &[u8],
        step: usize,
        decoded: &mut Vec<u8>,
    ) -> Result<Option<usize>, BodyError> {
        let mut at = 0;
        while at < data.len() {
            let end = (at + step).min(data.len());
            let (n, done) =
                d.feed_with(&data[at..end], 4096, &mut |b| decoded.extend_from_slice(b))?;
            at += n;
            if done {
                return Ok(Some(at));
            }
            assert_eq!(
                n,
                end - (at - n),
                "decoder must consume everything until done"
            );
        }
        Ok(None)
    }

    #[test]
    fn chunked_with_extensions_and_trailers_any_split() {
        let body = b"4;name=value\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\nX-T: 1\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n";
        let mut all = body.to_vec();
        all.extend_from_slice(next);
        for step in [1, 2, 3, 7, 100] {
            let mut d = BodyDecoder::new(Framing::Chunked).unwrap();
            let mut decoded = Vec::new();
            assert_eq!(
                feed_collecting(&mut d, &all, step, &mut decoded).unwrap(),
                Some(body.len()),
                "step {step}"
            );
            assert_eq!(decoded, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
        }
    }

    #[test]
    fn chunked_rejects_garbage_size() {
        let mut d = BodyDecoder::new(Framing::Chunked).unwrap();
        assert_eq!(d.feed(b"zz\r\n", 4096), Err(BodyError::BadChunkSize));
        let mut d = BodyDecoder::new(Framing::Chunked).unwrap();
        assert_eq!(d.feed(&[b'1'; 100], 50), Err(BodyError::LineTooLong));
    }

    #[test]
    fn length_body_stops_at_length() {
        let mut d = BodyDecoder::new(Framing::Length(5)).unwrap();
        assert_eq!(d.feed(b"abc", 10).unwrap(), (3, false));
        assert_eq!(d.feed(b"deGET", 10).unwrap(), (2, true));
        assert!(BodyDecoder::new(Framing::Length(0)).is_none());
    }

    #[test]
    fn finds_request_lines_in_noise() {
        assert_eq!(find_request_start(b"GET / HTTP/1.1\r\n"), Some(0));
        assert_eq!(
            find_request_start(b"\x00\x01body-tailPOST /api/x?y=1 HTTP/1.0\r\nHost: a\r\n"),
            Some(11)
        );
        assert_eq!(find_request_start(b"xxDELETE /a HTTP/1.1\r\n"), Some(2));
        assert_eq!(
            find_request_start(b"GET / HTTP/1.1"),
            None,
            "line not complete yet"
        );
        assert_eq!(find_request_start(b"text HTTP/1.1 in a body\r\n"), None);
        assert_eq!(find_request_start(b"get / HTTP/1.1\r\n"), None);
        assert_eq!(
            find_request_start(b"ET / HTTP/1.1\r\n"),
            None,
            "a cut method is no method"
        );
        assert_eq!(find_request_start(b"PROPPATCH /d HTTP/1.1\r\n"), Some(0));
        assert_eq!(find_response_start(b"garbageHTTP/1.1 200 OK\r\n"), Some(7));
        assert_eq!(find_response_start(b"HTTP/1.1 20"), None);
    }
}
