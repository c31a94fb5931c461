//! HPACK (RFC 7541) decoding for a passive observer, which may have joined a connection after
//! its dynamic table was filled.
//!
//! Why not a complete HPACK crate's decoder: every one we tried (loona-hpack, httlib-hpack,
//! hpack) stops at an index it does not hold and leaves its table behind the peer's, so every
//! later block would decode to wrong headers. An observer that joins mid-stream must go on
//! decoding past such an index while keeping its table aligned with the peer's: entries older
//! than the join are unknown, entries inserted since are known (even when their name is an
//! unknown reference), and only the fields that reference unknown entries are lost. Huffman
//! strings are decoded by `httlib-huffman`; the crates above are the tests' oracles.

use std::collections::VecDeque;

use bytes::Bytes;

/// The static table (RFC 7541 Appendix A); index 1 is the first entry.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Table size an encoder starts with (SETTINGS_HEADER_TABLE_SIZE's default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Per-entry overhead in the table's size accounting (RFC 7541 4.1).
const ENTRY_OVERHEAD: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer out of range")]
    Overflow,
    #[error("invalid Huffman string")]
    Huffman,
    #[error("index {0} is in no table")]
    BadIndex(usize),
}

/// One decoded header block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    /// The fields whose name and value are known, in order.
    pub fields: Vec<(Bytes, Bytes)>,
    /// Fields that referenced entries older than what this decoder saw.
    pub unknown: usize,
    /// The fields' size (name + value + 32 each) went over the decoder's limit: `fields` stops
    /// there, but the table was kept in step.
    pub too_large: bool,
}

struct Entry {
    /// None: inserted with a name that referenced an unknown entry.
    name: Option<Bytes>,
    value: Bytes,
}

impl Entry {
    /// An unknown name counts as empty: the size is a lower bound, so this table never evicts an
    /// entry the peer's table still holds (keeping one it dropped is harmless: the peer never
    /// references it again).
    fn size(&self) -> usize {
        self.name.as_ref().map_or(0, Bytes::len) + self.value.len() + ENTRY_OVERHEAD
    }
}

/// One direction's decoding context.
pub struct Decoder {
    /// Newest first: dynamic index 62 is `table[0]`.
    table: VecDeque<Entry>,
    size: usize,
    /// The table's maximum size as the encoder last set it.
    max_size: usize,
    /// `max_size` is certain: the stream was seen from its start, or a size update was seen.
    max_size_known: bool,
    /// Most bytes of table kept, whatever the peer allows (memory bound).
    limit: usize,
    /// The peer's table may hold entries older than this one's.
    unknown_older: bool,
    /// Most bytes of fields returned per block (name + value + 32 each).
    max_list_size: usize,
}

impl Decoder {
    /// A decoder for a stream seen from its start.
    pub fn new(limit: usize, max_list_size: usize) -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
            max_size_known: true,
            limit,
            unknown_older: false,
            max_list_size,
        }
    }

    /// A decoder for a stream joined after its start.
    pub fn joined(limit: usize, max_list_size: usize) -> Self {
        let mut d = Decoder::new(limit, max_list_size);
        d.forget();
        d
    }

    /// Blocks were lost (a hole in the stream, a block too large to keep): what the table held
    /// before is unknown from now on.
    pub fn forget(&mut self) {
        self.table.clear();
        self.size = 0;
        self.max_size_known = false;
        self.unknown_older = true;
    }

    /// Whether every entry the peer may reference is known.
    pub fn complete(&self) -> bool {
        !self.unknown_older
    }

    /// Bytes held by the table.
    pub fn held(&self) -> usize {
        self.size
    }

    /// Decodes one whole header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs).
    /// On error the table may be out of step: the caller `forget`s it.
    pub fn decode(&mut self, mut buf: &[u8]) -> Result<HeaderBlock, HpackError> {
        let mut block = HeaderBlock::default();
        let mut list_size = 0usize;
        while let Some(&first) = buf.first() {
            let (name, value) = if first & 0x80 != 0 {
                let index = integer(&mut buf, 7)?;
                match self.lookup(index)? {
                    Some((n, v)) => (Some(n), Some(v)),
                    None => {
                        block.unknown += 1;
                        continue;
                    }
                }
            } else if first & 0xe0 == 0x20 {
                let size = integer(&mut buf, 5)?;
                self.resize(size);
                continue;
            } else {
                // Literals: with incremental indexing (01), without (0000) or never indexed
                // (0001).
                let indexing = first & 0xc0 == 0x40;
                let index = integer(&mut buf, if indexing { 6 } else { 4 })?;
                let name = match index {
                    0 => Some(string(&mut buf)?),
                    i => self.lookup(i)?.map(|(n, _)| n),
                };
                let value = string(&mut buf)?;
                if indexing {
                    self.insert(Entry {
                        name: name.clone(),
                        value: value.clone(),
                    });
                }
                (name, Some(value))
            };
            let (Some(name), Some(value)) = (name, value) else {
                block.unknown += 1;
                continue;
            };
            list_size += name.len() + value.len() + ENTRY_OVERHEAD;
            if list_size > self.max_list_size {
                block.too_large = true;
            }
            if !block.too_large {
                block.fields.push((name, value));
            }
        }
        Ok(block)
    }

    /// The name and value at `index`; None when the entry is older than what was seen, or was
    /// inserted with an unknown name.
    fn lookup(&self, index: usize) -> Result<Option<(Bytes, Bytes)>, HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok(Some((
                    Bytes::from_static(n.as_bytes()),
                    Bytes::from_static(v.as_bytes()),
                )))
            }
            _ => match self.table.get(index - 62) {
                Some(Entry {
                    name: Some(n),
                    value,
                }) => Ok(Some((n.clone(), value.clone()))),
                Some(Entry { name: None, .. }) => Ok(None),
                None if self.unknown_older => Ok(None),
                None => Err(HpackError::BadIndex(index)),
            },
        }
    }

    fn resize(&mut self, size: usize) {
        self.max_size = size;
        self.max_size_known = true;
        if size == 0 {
            // An empty table holds nothing from before.
            self.unknown_older = false;
        }
        self.evict_to(size.min(self.limit));
    }

    fn insert(&mut self, e: Entry) {
        let size = e.size();
        if self.max_size_known && self.size + size > self.max_size {
            // The peer evicts oldest first: whatever it held before this table's entries is
            // gone now.
            self.unknown_older = false;
        }
        let cap = self.max_size.min(self.limit);
        if size > cap {
            // Larger than the table: the table ends up empty (RFC 7541 4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(cap - size);
        self.size += size;
        self.table.push_front(e);
    }

    fn evict_to(&mut self, room: usize) {
        while self.size > room {
            match self.table.pop_back() {
                Some(old) => self.size -= old.size(),
                None => self.size = 0,
            }
        }
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1).
fn integer(buf: &mut &[u8], n: u8) -> Result<usize, HpackError> {
    let (&first, mut rest) = buf.split_first().ok_or(HpackError::Truncated)?;
    let mask = (1u16 << n) as usize - 1;
    let mut value = first as usize & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&b, tail) = rest.split_first().ok_or(HpackError::Truncated)?;
            rest = tail;
            if shift > 28 {
                return Err(HpackError::Overflow);
            }
            value += ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    *buf = rest;
    Ok(value)
}

/// A string literal, Huffman-coded or not (RFC 7541 5.2).
fn string(buf: &mut &[u8]) -> Result<Bytes, HpackError> {
    let huffman = buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(buf, 7)?;
    if len > buf.len() {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = buf.split_at(len);
    *buf = rest;
    if !huffman {
        return Ok(Bytes::copy_from_slice(raw));
    }
    let mut out = Vec::with_capacity(len * 8 / 5);
    httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FourBits)
        .map_err(|_| HpackError::Huffman)?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(b: &HeaderBlock) -> Vec<(String, String)> {
        b.fields
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    /// Encodes with httlib-hpack: Huffman strings, incremental indexing, best representation.
    pub(crate) struct Enc(httlib_hpack::Encoder<'static>);

    impl Enc {
        pub(crate) fn new(table: u32) -> Self {
            Enc(httlib_hpack::Encoder::with_dynamic_size(table))
        }
        pub(crate) fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
            let mut dst = Vec::new();
            for (n, v) in headers {
                let flags = 0x1 | 0x2 | 0x4 | 0x10;
                self.0
                    .encode(
                        (n.as_bytes().to_vec(), v.as_bytes().to_vec(), flags),
                        &mut dst,
                    )
                    .unwrap();
            }
            dst
        }
        fn resize(&mut self, size: u32) -> Vec<u8> {
            let mut dst = Vec::new();
            self.0.update_max_dynamic_size(size, &mut dst).unwrap();
            dst
        }
    }

    fn owned(h: &[(&str, &str)]) -> Vec<(String, String)> {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 7541 C.4: requests with Huffman coding, sharing one table.
    #[test]
    fn rfc_examples_with_huffman() {
        let mut d = Decoder::new(4096, 1 << 16);
        let c41 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
        let c42 = hex("828684be5886a8eb10649cbf");
        let c43 = hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf");
        assert_eq!(
            fields(&d.decode(&c41).unwrap()),
            owned(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(
            fields(&d.decode(&c42).unwrap())[4],
            ("cache-control".into(), "no-cache".into())
        );
        let third = fields(&d.decode(&c43).unwrap());
        assert_eq!(third[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(third[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.held(), 164);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn evictions_and_size_updates_follow_the_encoder() {
        let mut e = Enc::new(4096);
        let mut d = Decoder::new(1 << 16, 1 << 16);
        let mut oracle = loona_hpack::Decoder::new();
        for i in 0..200 {
            let value = format!("value-{i}-{}", "x".repeat(i % 90));
            let mut block = Vec::new();
            if i == 50 {
                block = e.resize(256);
            } else if i == 120 {
                block = e.resize(0);
            } else if i == 121 {
                block = e.resize(1024);
            }
            block.extend(e.block(&[(":method", "POST"), ("x-id", &value), ("x-same", "1")]));
            let ours = fields(&d.decode(&block).unwrap());
            let theirs: Vec<(String, String)> = oracle
                .decode(&block)
                .unwrap()
                .into_iter()
                .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                .collect();
            assert_eq!(ours, theirs, "block {i}");
            assert_eq!(ours[1].1, value);
        }
    }

    #[test]
    fn a_join_resolves_entries_inserted_after_it_and_drops_the_rest() {
        let mut e = Enc::new(4096);
        let before = e.block(&[(":path", "/old"), ("x-tenant", "acme")]);
        let mut whole = Decoder::new(4096, 1 << 16);
        whole.decode(&before).unwrap();
        // Joined here: the next block references "/old" (unknown) and inserts "x-trace".
        let mut joined = Decoder::joined(4096, 1 << 16);
        let b1 = e.block(&[(":path", "/old"), ("x-trace", "t1")]);
        let got = joined.decode(&b1).unwrap();
        assert_eq!(got.unknown, 1);
        assert_eq!(fields(&got), owned(&[("x-trace", "t1")]));
        // Now only entries known since the join are referenced: both agree exactly.
        let b2 = e.block(&[("x-trace", "t1"), (":path", "/new")]);
        let full = whole.decode(&b1).and_then(|_| whole.decode(&b2)).unwrap();
        let j = joined.decode(&b2).unwrap();
        assert_eq!((j.unknown, fields(&j)), (0, fields(&full)));
        assert!(!joined.complete());
    }

    #[test]
    fn an_unknown_name_keeps_the_table_aligned() {
        let mut e = Enc::new(4096);
        e.block(&[("x-name", "a")]);
        let mut joined = Decoder::joined(4096, 1 << 16);
        // Indexed name from before the join, new value: inserted with an unknown name.
        let b1 = e.block(&[("x-name", "b"), ("x-after", "c")]);
        let got = joined.decode(&b1).unwrap();
        assert_eq!((got.unknown, fields(&got)), (1, owned(&[("x-after", "c")])));
        let b2 = e.block(&[("x-after", "c"), ("x-name", "b")]);
        let got = joined.decode(&b2).unwrap();
        assert_eq!((got.unknown, fields(&got)), (1, owned(&[("x-after", "c")])));
    }

    #[test]
    fn a_join_becomes_complete_when_the_table_turns_over() {
        let mut e = Enc::new(4096);
        let mut joined = Decoder::joined(4096, 1 << 16);
        joined.decode(&e.resize(512)).unwrap();
        for i in 0..20 {
            joined
                .decode(&e.block(&[("x-k", &format!("{i:>40}"))]))
                .unwrap();
        }
        assert!(joined.complete());
    }

    #[test]
    fn field_list_size_is_capped_but_the_table_kept_in_step() {
        let mut e = Enc::new(4096);
        let mut d = Decoder::new(4096, 100);
        let big = "v".repeat(80);
        let got = d
            .decode(&e.block(&[("a", "1"), ("b", &big), ("c", "3")]))
            .unwrap();
        assert!(got.too_large);
        assert_eq!(fields(&got), owned(&[("a", "1")]));
        let got = d.decode(&e.block(&[("c", "3")])).unwrap();
        assert_eq!(fields(&got), owned(&[("c", "3")]));
    }

    #[test]
    fn broken_blocks_are_errors() {
        let mut d = Decoder::new(4096, 1 << 16);
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(d.decode(&[0x40, 0x05, b'a']), Err(HpackError::Truncated));
        assert_eq!(
            d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::Overflow)
        );
    }

    proptest! {
        /// Whatever the encoder does, a decoder that saw everything agrees with loona-hpack,
        /// and one that joined late never returns a field that differs from it.
        #[test]
        fn joined_decoders_never_guess(
            blocks in prop::collection::vec(
                prop::collection::vec((0u8..6, 0u8..8), 1..6), 1..40),
            join in 0usize..40,
            table in prop::sample::select(vec![0u32, 64, 256, 4096]),
        ) {
            let mut e = Enc::new(4096);
            let mut whole = Decoder::new(4096, 1 << 16);
            let mut late = Decoder::joined(4096, 1 << 16);
            let mut oracle = loona_hpack::Decoder::new();
            for (i, b) in blocks.iter().enumerate() {
                let headers: Vec<(String, String)> = b
                    .iter()
                    .map(|(n, v)| (format!("x-h{n}"), format!("v{v}-{}", "z".repeat(*v as usize * 9))))
                    .collect();
                let refs: Vec<(&str, &str)> =
                    headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                let mut block = if i == 3 { e.resize(table) } else { Vec::new() };
                block.extend(e.block(&refs));
                let w = whole.decode(&block).unwrap();
                let o: Vec<(String, String)> = oracle.decode(&block).unwrap().into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                prop_assert_eq!(fields(&w), o.clone());
                if i >= join {
                    let l = late.decode(&block).unwrap();
                    if l.unknown == 0 {
                        prop_assert_eq!(fields(&l), o);
                    } else {
                        for f in fields(&l) {
                            prop_assert!(o.contains(&f));
                        }
                    }
                }
            }
        }
    }
}
