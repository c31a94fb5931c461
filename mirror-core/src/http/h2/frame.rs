//! HTTP/2 frames (RFC 9113 4, 6): headers, and finding where frames start in a stream that was
//! joined mid-way.

/// What an h2c client sends first (RFC 9113 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS_MAX_FRAME_SIZE's default: what a peer sends until told otherwise.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest frame the protocol allows.
pub const MAX_FRAME: u32 = (1 << 24) - 1;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8]) -> FrameHeader {
        FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
        }
    }

    /// Whether a conforming peer could have sent this frame: a known type, on the kind of stream
    /// and with the length its type requires. Used to tell frames from payload bytes.
    pub fn plausible(&self, max_len: u32) -> bool {
        let on_stream = self.stream != 0 && self.stream & 0x8000_0000 == 0;
        if self.len > max_len {
            return false;
        }
        match self.kind {
            DATA => on_stream && self.flags & !(END_STREAM | PADDED) == 0,
            HEADERS => {
                on_stream && self.flags & !(END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG) == 0
            }
            PRIORITY => on_stream && self.len == 5 && self.flags == 0,
            RST_STREAM => on_stream && self.len == 4 && self.flags == 0,
            SETTINGS => {
                self.stream == 0
                    && self.flags & !ACK == 0
                    && self.len.is_multiple_of(6)
                    && (self.flags == 0 || self.len == 0)
            }
            PUSH_PROMISE => on_stream && self.flags & !(END_HEADERS | PADDED) == 0,
            PING => self.stream == 0 && self.len == 8 && self.flags & !ACK == 0,
            GOAWAY => self.stream == 0 && self.len >= 8 && self.flags == 0,
            WINDOW_UPDATE => self.stream & 0x8000_0000 == 0 && self.len == 4 && self.flags == 0,
            CONTINUATION => on_stream && self.flags & !END_HEADERS == 0,
            _ => false,
        }
    }
}

/// The offset in `buf` (bytes of a stream joined mid-way), from `from` on, where whole frames
/// start: the first offset where plausible frames follow each other to the end of `buf` (at
/// least two of them), or for at least `MIN_CHAIN` frames. Otherwise `Err` with the first
/// offset that more bytes could still prove a start: a later call goes on from there.
pub fn find_frames(buf: &[u8], from: usize, max_len: u32) -> Result<usize, usize> {
    const MIN_CHAIN: usize = 3;
    let mut undecided = None;
    for start in from..buf.len() {
        let mut at = start;
        let mut frames = 0;
        let verdict = loop {
            if at + HEADER_LEN > buf.len() {
                break if frames >= 2 && at == buf.len() {
                    Some(true)
                } else {
                    None
                };
            }
            let h = FrameHeader::parse(&buf[at..]);
            if !h.plausible(max_len) {
                break Some(false);
            }
            frames += 1;
            at += HEADER_LEN + h.len as usize;
            if frames >= MIN_CHAIN {
                break Some(true);
            }
        };
        match verdict {
            Some(true) => return Ok(start),
            Some(false) => {}
            None => {
                undecided.get_or_insert(start);
            }
        }
    }
    Err(undecided.unwrap_or(buf.len()))
}

/// The fields of a SETTINGS frame's payload.
pub fn settings(payload: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    payload.chunks_exact(6).map(|s| {
        (
            u16::from_be_bytes([s[0], s[1]]),
            u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
        )
    })
}

/// The header block fragment of a HEADERS or PUSH_PROMISE payload, without padding, priority
/// or promised stream id. None when the payload is shorter than its own fields say.
pub fn header_fragment<'a>(h: &FrameHeader, payload: &'a [u8]) -> Option<&'a [u8]> {
    let mut p = payload;
    let mut pad = 0;
    if h.flags & PADDED != 0 && h.kind != CONTINUATION {
        let (&n, rest) = p.split_first()?;
        pad = n as usize;
        p = rest;
    }
    let skip = match h.kind {
        HEADERS if h.flags & PRIORITY_FLAG != 0 => 5,
        PUSH_PROMISE => 4,
        _ => 0,
    };
    if p.len() < skip + pad {
        return None;
    }
    Some(&p[skip..p.len() - pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn frames_are_found_after_a_partial_one() {
        let mut wire = frame(DATA, 0, 1, &[7; 40]);
        wire.extend(frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0x84]));
        wire.extend(frame(DATA, END_STREAM, 3, b"hello"));
        for cut in 0..wire.len() {
            let found = find_frames(&wire[cut..], 0, DEFAULT_MAX_FRAME).map(|at| at + cut);
            if cut == 0 {
                assert_eq!(found, Ok(0));
            } else if cut <= 49 {
                assert_eq!(found, Ok(49), "cut at {cut}");
            }
        }
    }

    #[test]
    fn text_is_never_frames() {
        let text = b"GET /api/books HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\n\r\n";
        assert!(find_frames(text, 0, MAX_FRAME).is_err());
        assert!(find_frames(PREFACE, 0, MAX_FRAME).is_err());
    }

    #[test]
    fn a_search_goes_on_where_it_stopped() {
        let mut wire = vec![0xff; 20];
        wire.extend(frame(HEADERS, END_HEADERS, 1, &[0x82]));
        wire.extend(frame(DATA, 0, 1, &[1; 10]));
        let part = &wire[..35];
        let next = find_frames(part, 0, DEFAULT_MAX_FRAME).unwrap_err();
        assert!(next <= 20, "{next}");
        assert_eq!(find_frames(&wire, next, DEFAULT_MAX_FRAME), Ok(20));
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        let h = FrameHeader {
            len: 0,
            kind: HEADERS,
            flags: PADDED | PRIORITY_FLAG | END_HEADERS,
            stream: 1,
        };
        let payload = [2, 0, 0, 0, 0, 9, 0x82, 0x84, 0, 0];
        assert_eq!(header_fragment(&h, &payload), Some(&[0x82, 0x84][..]));
        assert_eq!(header_fragment(&h, &payload[..5]), None);
    }
}
