//! Reading a recording back, whatever state its files are in.
//!
//! What the reader does with damage (each case reported as an `Issue` with its file and byte
//! offset, never a panic):
//! - a file that does not start with the magic, or has a version this build does not know: the
//!   file is skipped;
//! - a block cut short at the end of a file (the agent was killed, or the disk filled up while
//!   writing it): the file ends there;
//! - a block whose checksum, lengths or compressed data are wrong: that block is skipped, and
//!   reading resumes at the next block's magic;
//! - a record that does not decode inside a good block: the rest of that block is skipped.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Record, BLOCK_HEADER, BLOCK_MAGIC, FILE_MAGIC, FILE_SUFFIX, MAX_BLOCK, VERSION};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueKind {
    NotARecording,
    UnknownVersion(u16),
    TornBlock,
    BadChecksum,
    BadBlock,
    BadRecord,
    Unreadable(String),
}

impl std::fmt::Display for IssueKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IssueKind::NotARecording => write!(f, "not a recording (no MIRREC header): file skipped"),
            IssueKind::UnknownVersion(v) => write!(
                f,
                "format version {v}, this build reads version {VERSION}: file skipped (use a newer mirror-agent)"
            ),
            IssueKind::TornBlock => write!(f, "last block cut short (the writer stopped mid-block): the file ends here"),
            IssueKind::BadChecksum => write!(f, "block checksum mismatch: block skipped"),
            IssueKind::BadBlock => write!(f, "damaged block: block skipped"),
            IssueKind::BadRecord => write!(f, "damaged record: the rest of its block skipped"),
            IssueKind::Unreadable(e) => write!(f, "cannot read: {e}"),
        }
    }
}

/// Something wrong found in a recording, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub file: String,
    pub offset: usize,
    pub kind: IssueKind,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}: {}", self.file, self.offset, self.kind)
    }
}

/// The recording files of `dir`, oldest first.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("rec-") && n.ends_with(FILE_SUFFIX))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// One file's bytes, read a block at a time.
pub struct FileBlocks {
    name: String,
    data: Vec<u8>,
    pos: usize,
}

impl FileBlocks {
    /// Checks the header; an unusable file gives its issue.
    pub fn new(name: String, data: Vec<u8>) -> Result<FileBlocks, Issue> {
        let issue = |kind| Issue {
            file: name.clone(),
            offset: 0,
            kind,
        };
        if data.len() < FILE_MAGIC.len() + 2 || &data[..FILE_MAGIC.len()] != FILE_MAGIC {
            return Err(issue(IssueKind::NotARecording));
        }
        let version = u16::from_le_bytes([data[6], data[7]]);
        if version != VERSION {
            return Err(issue(IssueKind::UnknownVersion(version)));
        }
        Ok(FileBlocks {
            name,
            data,
            pos: FILE_MAGIC.len() + 2,
        })
    }

    fn issue(&self, offset: usize, kind: IssueKind) -> Issue {
        Issue {
            file: self.name.clone(),
            offset,
            kind,
        }
    }

    /// The next good block's records, with the issues met on the way; `None` at the end.
    pub fn next_block(&mut self, issues: &mut Vec<Issue>) -> Option<Vec<Record>> {
        loop {
            let at = self.pos;
            let rest = &self.data[at..];
            if rest.is_empty() {
                return None;
            }
            if rest.len() < BLOCK_HEADER {
                issues.push(self.issue(at, IssueKind::TornBlock));
                self.pos = self.data.len();
                return None;
            }
            let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap()) as usize;
            let (compressed, raw, crc) = (word(4), word(8), word(12) as u32);
            if &rest[..4] != BLOCK_MAGIC || compressed > MAX_BLOCK || raw > MAX_BLOCK {
                issues.push(self.issue(at, IssueKind::BadBlock));
                self.resync(at + 1);
                continue;
            }
            if rest.len() < BLOCK_HEADER + compressed {
                // Either the last block, cut short, or a damaged length: a later block's magic
                // tells them apart.
                if self.find_magic(at + 1).is_some() {
                    issues.push(self.issue(at, IssueKind::BadBlock));
                    self.resync(at + 1);
                    continue;
                }
                issues.push(self.issue(at, IssueKind::TornBlock));
                self.pos = self.data.len();
                return None;
            }
            let body = &rest[BLOCK_HEADER..BLOCK_HEADER + compressed];
            if crc32fast::hash(body) != crc {
                issues.push(self.issue(at, IssueKind::BadChecksum));
                self.resync(at + 1);
                continue;
            }
            // Deflate expands at most about 1032 times: a header claiming more is not trusted
            // with memory up front.
            let mut plain = Vec::with_capacity(raw.min(compressed.saturating_mul(1032)));
            let inflated = flate2::read::DeflateDecoder::new(body)
                .take(raw as u64 + 1)
                .read_to_end(&mut plain);
            self.pos = at + BLOCK_HEADER + compressed;
            if inflated.is_err() || plain.len() != raw {
                issues.push(self.issue(at, IssueKind::BadBlock));
                continue;
            }
            return Some(self.records(at, &plain, issues));
        }
    }

    fn records(&self, at: usize, mut plain: &[u8], issues: &mut Vec<Issue>) -> Vec<Record> {
        let mut out = Vec::new();
        while !plain.is_empty() {
            let len = match plain.get(..4) {
                Some(l) => u32::from_le_bytes(l.try_into().unwrap()) as usize,
                None => 0,
            };
            let Some(payload) = plain.get(4..4 + len).filter(|_| len > 0) else {
                issues.push(self.issue(at, IssueKind::BadRecord));
                break;
            };
            match Record::decode(payload) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(_) => {
                    issues.push(self.issue(at, IssueKind::BadRecord));
                    break;
                }
            }
            plain = &plain[4 + len..];
        }
        out
    }

    fn find_magic(&self, from: usize) -> Option<usize> {
        let from = from.min(self.data.len());
        memchr::memmem::find(&self.data[from..], BLOCK_MAGIC).map(|i| from + i)
    }

    fn resync(&mut self, from: usize) {
        self.pos = self.find_magic(from).unwrap_or(self.data.len());
    }
}

/// Every record in one file's bytes, with the issues found (for tests and the fuzz target).
pub fn read_bytes(name: &str, data: Vec<u8>) -> (Vec<Record>, Vec<Issue>) {
    let mut issues = Vec::new();
    let mut records = Vec::new();
    match FileBlocks::new(name.to_string(), data) {
        Ok(mut f) => {
            while let Some(block) = f.next_block(&mut issues) {
                records.extend(block);
            }
        }
        Err(issue) => issues.push(issue),
    }
    (records, issues)
}

/// The records of a recording directory, in order, file after file. Issues pile up in
/// `issues()` as they are met.
pub struct Reader {
    files: VecDeque<PathBuf>,
    current: Option<FileBlocks>,
    ready: VecDeque<Record>,
    issues: Vec<Issue>,
}

impl Reader {
    pub fn open(dir: &Path) -> std::io::Result<Reader> {
        Ok(Reader {
            files: files(dir)?.into(),
            current: None,
            ready: VecDeque::new(),
            issues: Vec::new(),
        })
    }

    /// Whether no recording file is left to read (before reading: the directory has none).
    pub fn is_empty_dir(&self) -> bool {
        self.files.is_empty() && self.current.is_none()
    }

    /// Issues met so far, taken.
    pub fn take_issues(&mut self) -> Vec<Issue> {
        std::mem::take(&mut self.issues)
    }

    fn open_next(&mut self) -> bool {
        while let Some(path) = self.files.pop_front() {
            let name = path.display().to_string();
            match std::fs::read(&path) {
                Ok(data) => match FileBlocks::new(name, data) {
                    Ok(f) => {
                        self.current = Some(f);
                        return true;
                    }
                    Err(issue) => self.issues.push(issue),
                },
                Err(e) => self.issues.push(Issue {
                    file: name,
                    offset: 0,
                    kind: IssueKind::Unreadable(e.to_string()),
                }),
            }
        }
        false
    }
}

impl Iterator for Reader {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            if self.current.is_none() && !self.open_next() {
                return None;
            }
            let f = self.current.as_mut()?;
            match f.next_block(&mut self.issues) {
                Some(records) => self.ready.extend(records),
                None => self.current = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_seed_a_python_writer_made_reads_back() {
        // Written from the format's description alone (zlib's raw deflate and crc32): the
        // documentation is enough to write a recording.
        let data = include_bytes!("../../../fuzz/seeds/recording/two-blocks.mrec").to_vec();
        let (records, issues) = read_bytes("seed", data);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(records.len(), 4);
        let Record::Request(r) = &records[2] else {
            panic!("a request")
        };
        let req = crate::http::h1::Request::from_wire(r.raw.clone(), r.at).unwrap();
        assert_eq!((req.method(), req.target()), ("POST", "/p"));
        let Record::Response(live) = &records[3] else {
            panic!("a response")
        };
        assert_eq!(
            (&*live.method, &*live.target, live.status),
            ("POST", "/p", 201)
        );
    }
}
