//! The recording stage (`--record DIR`): its own thread writes what the pipeline hands it, so
//! that a slow or full disk never holds the pipeline up. Handing over never waits: when the
//! thread is behind (its queue is full) or a write fails, records are dropped and counted.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use super::private::{kept_h1, kept_h2_body, kept_h2_fields};
use super::{
    Record, RecordedH2Request, RecordedRequest, BLOCK_MAGIC, FILE_MAGIC, FILE_SUFFIX, VERSION,
};
use crate::capture::read_at::ReadAt;
use crate::http::{h1, h2, Request, ResponseMeta};

/// A block is written once it holds this much, or is `RecordConfig::block_age` old.
const BLOCK_BYTES: usize = 256 << 10;
/// The default block age: a crash loses a second at most.
pub const BLOCK_AGE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct RecordConfig {
    pub dir: PathBuf,
    /// A file is closed and a new one started past this size or age.
    pub file_bytes: u64,
    pub file_age: Duration,
    /// The oldest files are removed to keep the recording under this.
    pub max_bytes: u64,
    /// Headers never written (`--drop-header`), so that credentials do not reach the disk.
    pub drop_headers: Vec<String>,
    /// Redacts what is written (`--redact-*`).
    pub redactor: Option<crate::redact::Redactor>,
    /// Events waiting for the writer, at most.
    pub queue: usize,
    /// A block is written at the latest this long after its first record.
    pub block_age: Duration,
}

mirror_core::stage_counters! {
    #[derive(Debug, Default)]
    pub struct RecordStats {
        pub blocks: AtomicU64 => Counter "mirror_record_blocks"
            "Compressed blocks written to the recording",
        /// Compressed bytes written.
        pub bytes: AtomicU64 => Counter "mirror_record_bytes"
            "Bytes written to the recording (compressed)",
        /// Streamed requests cut before their end (a reset or loss, or the copy left behind), or
        /// whose body exceeded 16 MiB.
        pub dropped_cut: AtomicU64 => Counter "mirror_record_dropped" [reason = "cut"]
            "Requests and responses not recorded, by reason",
        pub dropped_queue_full: AtomicU64 => Counter "mirror_record_dropped" [reason = "queue_full"],
        pub dropped_too_large: AtomicU64 => Counter "mirror_record_dropped" [reason = "too_large"],
        /// Streamed HTTP/2 requests whose copy of the body was not available to the recorder.
        pub dropped_unsupported: AtomicU64 => Counter "mirror_record_dropped" [reason = "unsupported"],
        pub dropped_write_error: AtomicU64 => Counter "mirror_record_dropped" [reason = "write_error"],
        pub files: AtomicU64 => Counter "mirror_record_files"
            "Recording files started",
        pub files_removed: AtomicU64 => Counter "mirror_record_files_removed"
            "Oldest recording files removed to stay under --record-max-size",
        pub requests: AtomicU64 => Counter "mirror_record_records" [kind = "request"]
            "Records written, by kind",
        pub responses: AtomicU64 => Counter "mirror_record_records" [kind = "response"],
}
}

impl RecordStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

enum Event {
    Request(h1::Request, ReadAt),
    H2Request(h2::Request, ReadAt),
    /// An HTTP/2 request handed on while its body was still arriving, with the recorder's own
    /// copy of the rest: written once the client ends the stream.
    H2Streaming(h2::Request, h2::StreamReceiver, ReadAt),
    Response(ResponseMeta),
}

/// Most body bytes kept for one streamed request; a longer one is dropped, counted.
const MAX_STREAMED_BODY: usize = 16 << 20;

/// A streamed request being collected.
struct Streaming {
    req: h2::Request,
    at: ReadAt,
    rx: h2::StreamReceiver,
    body: Vec<u8>,
    too_large: bool,
}

/// The pipeline's handle on the recording stage. Events are handed over a batch at a time
/// (`flush`, after each batch of segments): one channel operation and one wake-up per batch,
/// not per request.
pub struct Recorder {
    tx: Option<Sender<Vec<Event>>>,
    batch: Vec<Event>,
    /// Events handed over and not yet written; bounded by `RecordConfig::queue`.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    stats: Arc<RecordStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot create the recording directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the recording thread: {0}")]
    Thread(std::io::Error),
}

impl Recorder {
    pub fn start(cfg: RecordConfig) -> Result<Recorder, RecordError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| RecordError::Dir {
            dir: cfg.dir.clone(),
            source,
        })?;
        let stats = Arc::new(RecordStats::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let max_queued = cfg.queue.max(1);
        // The event bound is what limits memory; batches are only counted here.
        let (tx, rx) = bounded(4096);
        let mut writer = Writer::new(cfg, Arc::clone(&stats), Arc::clone(&queued));
        let thread = std::thread::Builder::new()
            .name("mirror-record".into())
            .spawn(move || writer.run(rx))
            .map_err(RecordError::Thread)?;
        Ok(Recorder {
            tx: Some(tx),
            batch: Vec::new(),
            queued,
            max_queued,
            stats,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> &Arc<RecordStats> {
        &self.stats
    }

    /// Records a request, read at `at`.
    pub fn request(&mut self, r: &Request, at: ReadAt) {
        match r {
            Request::H1(r) => self.batch.push(Event::Request(r.clone(), at)),
            Request::H2(r) if r.rest.is_none() => self.batch.push(Event::H2Request(r.clone(), at)),
            Request::H2(r) if let Some(rx) = r.rest.as_ref().and_then(|s| s.take()) => {
                let mut head = r.clone();
                head.rest = None;
                self.batch.push(Event::H2Streaming(head, rx, at));
            }
            Request::H2(_) => {
                self.stats
                    .dropped_unsupported
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn response(&mut self, m: ResponseMeta) {
        self.batch.push(Event::Response(m));
    }

    /// Hands the events since the last flush to the writer, or counts them as dropped when it
    /// is that far behind.
    pub fn flush(&mut self) {
        let n = self.batch.len();
        let Some(tx) = &self.tx else { return };
        if n == 0 {
            return;
        }
        let fits = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= self.max_queued).then_some(q + n)
            })
            .is_ok();
        let batch = std::mem::take(&mut self.batch);
        if !fits {
            self.stats
                .dropped_queue_full
                .fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(batch) {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.stats
                .dropped_queue_full
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Writes what is queued and closes the current file, as dropping the recorder does (the
    /// agent drops it with the pipeline); the tests want the counters after.
    #[cfg(test)]
    pub fn finish(self) -> Arc<RecordStats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Open {
    file: File,
    path: PathBuf,
    size: u64,
    since: Instant,
}

struct Writer {
    cfg: RecordConfig,
    queued: Arc<AtomicUsize>,
    stats: Arc<RecordStats>,
    block: Vec<u8>,
    block_requests: u64,
    block_responses: u64,
    block_since: Option<Instant>,
    open: Option<Open>,
    next_file: u64,
    streams: Vec<Streaming>,
    /// Connections whose source the current block has said: each block says it again, so
    /// that it stands alone (a file whose predecessors were removed still tells it).
    block_sources: std::collections::HashSet<u64>,
}

impl Writer {
    fn new(cfg: RecordConfig, stats: Arc<RecordStats>, queued: Arc<AtomicUsize>) -> Writer {
        Writer {
            queued,
            cfg,
            stats,
            block: Vec::with_capacity(BLOCK_BYTES + (64 << 10)),
            block_requests: 0,
            block_responses: 0,
            block_since: None,
            open: None,
            next_file: 0,
            streams: Vec::new(),
            block_sources: std::collections::HashSet::new(),
        }
    }

    fn run(&mut self, rx: Receiver<Vec<Event>>) {
        loop {
            // Streams in progress are looked at often: their parts wait in memory meanwhile.
            let wait = if self.streams.is_empty() {
                self.cfg.block_age / 4
            } else {
                Duration::from_millis(2)
            };
            let received = rx.recv_timeout(wait);
            self.poll_streams();
            match received {
                Ok(batch) => {
                    self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
                    for e in batch {
                        self.add(e);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let old = self
                .block_since
                .is_some_and(|t| t.elapsed() >= self.cfg.block_age);
            if self.block.len() >= BLOCK_BYTES || old {
                self.flush();
            }
        }
        self.poll_streams();
        let cut = self.streams.len() as u64;
        self.stats.dropped_cut.fetch_add(cut, Ordering::Relaxed);
        self.streams.clear();
        self.flush();
        self.open = None;
    }

    /// Takes what arrived of the streams in progress; a stream that ended is recorded.
    fn poll_streams(&mut self) {
        use h2::StreamPart;
        use tokio::sync::mpsc::error::TryRecvError;
        let mut i = 0;
        while i < self.streams.len() {
            let s = &mut self.streams[i];
            let ended = loop {
                match s.rx.try_recv() {
                    Ok(StreamPart::Data(b)) => {
                        if s.body.len() + b.len() > MAX_STREAMED_BODY {
                            s.too_large = true;
                        } else if !s.too_large {
                            s.body.extend_from_slice(&b);
                        }
                    }
                    Ok(StreamPart::Trailers(t)) => s.req.trailers = t,
                    Ok(StreamPart::End) => break Some(true),
                    Err(TryRecvError::Empty) => break None,
                    Err(TryRecvError::Disconnected) => break Some(false),
                }
            };
            match ended {
                None => i += 1,
                Some(complete) => {
                    let mut s = self.streams.swap_remove(i);
                    if !complete {
                        self.stats.dropped_cut.fetch_add(1, Ordering::Relaxed);
                    } else if s.too_large {
                        self.stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let mut body = std::mem::take(&mut s.req.body).to_vec();
                        body.extend_from_slice(&s.body);
                        s.req.body = body.into();
                        self.add(Event::H2Request(s.req, s.at));
                    }
                }
            }
        }
    }

    fn add(&mut self, e: Event) {
        let record = match e {
            Event::Request(r, at) => {
                self.say_source(r.conn, at);
                self.block_requests += 1;
                let raw = kept_h1(&r, &self.cfg.drop_headers, self.cfg.redactor.as_ref());
                Record::Request(RecordedRequest {
                    at: r.origin(),
                    version: r.version,
                    raw,
                })
            }
            Event::H2Request(r, at) => {
                self.say_source(r.conn, at);
                self.block_requests += 1;
                let (drop, redactor) = (&self.cfg.drop_headers, self.cfg.redactor.as_ref());
                Record::H2Request(RecordedH2Request {
                    at: r.origin(),
                    fields: kept_h2_fields(&r.fields, drop, redactor),
                    body: kept_h2_body(&r, redactor),
                    trailers: kept_h2_fields(&r.trailers, drop, redactor),
                })
            }
            Event::H2Streaming(req, rx, at) => {
                self.streams.push(Streaming {
                    req,
                    at,
                    rx,
                    body: Vec::new(),
                    too_large: false,
                });
                return;
            }
            Event::Response(r) => {
                self.block_responses += 1;
                Record::Response(r)
            }
        };
        record.encode(&mut self.block);
        self.block_since.get_or_insert_with(Instant::now);
    }

    /// Compresses and writes the block; on failure its records are counted as dropped and the
    /// file is closed (a new one is started for the next block).
    fn flush(&mut self) {
        if self.block.is_empty() {
            return;
        }
        let (requests, responses) = (self.block_requests, self.block_responses);
        let written = self.write_block();
        let s = &self.stats;
        match written {
            Ok(n) => {
                s.requests.fetch_add(requests, Ordering::Relaxed);
                s.responses.fetch_add(responses, Ordering::Relaxed);
                s.blocks.fetch_add(1, Ordering::Relaxed);
                s.bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                log::debug!("recording: a block of {requests} requests was not written: {e}");
                s.dropped_write_error
                    .fetch_add(requests + responses, Ordering::Relaxed);
                self.open = None;
            }
        }
        self.block.clear();
        self.block_sources.clear();
        self.block_requests = 0;
        self.block_responses = 0;
        self.block_since = None;
    }

    /// A connection's source, before its first request in the block.
    fn say_source(&mut self, conn: u64, at: ReadAt) {
        if self.block_sources.insert(conn) {
            Record::Source { conn, read_at: at }.encode(&mut self.block);
        }
    }

    fn write_block(&mut self) -> std::io::Result<u64> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&self.block)?;
        let compressed = enc.finish()?;
        let mut out = Vec::with_capacity(compressed.len() + 16);
        out.extend_from_slice(BLOCK_MAGIC);
        out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.block.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&compressed).to_le_bytes());
        out.extend_from_slice(&compressed);
        let rotate = self.open.as_ref().is_some_and(|o| {
            o.size >= self.cfg.file_bytes || o.since.elapsed() >= self.cfg.file_age
        });
        if rotate {
            self.open = None;
        }
        if self.open.is_none() {
            self.open = Some(self.new_file()?);
            self.enforce_cap();
        }
        let open = self.open.as_mut().expect("opened above");
        open.file.write_all(&out)?;
        open.size += out.len() as u64;
        Ok(out.len() as u64)
    }

    fn new_file(&mut self) -> std::io::Result<Open> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let path = self
            .cfg
            .dir
            .join(format!("rec-{ms:013}-{:06}{FILE_SUFFIX}", self.next_file));
        self.next_file += 1;
        let mut file = File::create(&path)?;
        let mut header = FILE_MAGIC.to_vec();
        header.extend_from_slice(&VERSION.to_le_bytes());
        if let Err(e) = file.write_all(&header) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        Ok(Open {
            file,
            path,
            size: header.len() as u64,
            since: Instant::now(),
        })
    }

    /// Removes the oldest files while the recording is over its cap (the open file stays).
    fn enforce_cap(&self) {
        let Ok(files) = super::reader::files(&self.cfg.dir) else {
            return;
        };
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut total: u64 = files.iter().map(|p| size(p)).sum();
        let current = self.open.as_ref().map(|o| o.path.as_path());
        for f in &files {
            if total <= self.cfg.max_bytes {
                break;
            }
            if Some(f.as_path()) == current {
                continue;
            }
            let n = size(f);
            if std::fs::remove_file(f).is_ok() {
                total = total.saturating_sub(n);
                self.stats.files_removed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::reader::{read_bytes, IssueKind, Reader};
    use crate::testkit::{Conversation, Extract};

    fn without_sources(records: Vec<Record>) -> Vec<Record> {
        records
            .into_iter()
            .filter(|r| !matches!(r, Record::Source { .. }))
            .collect()
    }

    /// `read_bytes`, less the source records (one per block here).
    fn requests_of(name: &str, data: Vec<u8>) -> (Vec<Record>, Vec<super::super::Issue>) {
        let (records, issues) = read_bytes(name, data);
        (without_sources(records), issues)
    }

    fn requests(n: usize) -> Vec<h1::Request> {
        let mut c = Conversation::new("10.0.0.1:40000", "10.0.0.2:8080", 7, 9);
        let mut x = Extract::new(&[8080]);
        x.feed(&c.handshake());
        for i in 0..n {
            let wire =
                format!("GET /r/{i} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer secret\r\n\r\n");
            x.feed(&c.client_data(wire.as_bytes(), 1400));
        }
        std::mem::take(&mut x.requests)
    }

    fn config(dir: &Path) -> RecordConfig {
        RecordConfig {
            dir: dir.to_path_buf(),
            file_bytes: 64 << 20,
            file_age: Duration::from_secs(600),
            max_bytes: 1 << 30,
            drop_headers: vec!["authorization".into()],
            redactor: None,
            queue: 1024,
            block_age: Duration::from_millis(50),
        }
    }

    fn record(cfg: RecordConfig, reqs: &[h1::Request]) -> Arc<RecordStats> {
        let mut rec = Recorder::start(cfg).unwrap();
        for r in reqs {
            rec.request(&Request::H1(r.clone()), ReadAt::TlsLibrary);
        }
        rec.finish()
    }

    #[test]
    fn what_is_written_reads_back_without_dropped_headers() {
        let dir = tempfile::tempdir().unwrap();
        let reqs = requests(50);
        let stats = record(config(dir.path()), &reqs);
        assert_eq!(RecordStats::get(&stats.requests), 50);
        let mut reader = Reader::open(dir.path()).unwrap();
        let all: Vec<Record> = reader.by_ref().collect();
        assert!(reader.take_issues().is_empty());
        // Each block says first where its connection was read.
        assert_eq!(
            all[0],
            Record::Source {
                conn: reqs[0].conn,
                read_at: ReadAt::TlsLibrary
            }
        );
        let back = without_sources(all);
        assert_eq!(back.len(), 50);
        for (r, b) in reqs.iter().zip(&back) {
            let Record::Request(b) = b else {
                panic!("not a request")
            };
            assert_eq!((b.at.conn, b.at.seq), (r.conn, r.seq));
            let text = String::from_utf8_lossy(&b.raw);
            assert!(
                !text.to_ascii_lowercase().contains("authorization"),
                "{text}"
            );
            assert!(text.starts_with(&format!("GET {} HTTP/1.1\r\nHost: a\r\n", r.target())));
        }
    }

    #[test]
    fn files_rotate_and_the_oldest_go_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.file_bytes = 1;
        cfg.max_bytes = 1024;
        let mut rec = Recorder::start(cfg).unwrap();
        for r in requests(20) {
            rec.request(&Request::H1(r), ReadAt::TlsLibrary);
            rec.flush();
            // One block per request: each older than a block's age by the next.
            std::thread::sleep(Duration::from_millis(150));
        }
        let stats = rec.finish();
        let files = super::super::reader::files(dir.path()).unwrap();
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!(RecordStats::get(&stats.files) >= 5);
        assert!(RecordStats::get(&stats.files_removed) > 0);
        assert!(total <= 1024 + 512, "{total} bytes left");
        // What is left is the newest, readable and whole.
        let back = without_sources(Reader::open(dir.path()).unwrap().collect());
        let Some(Record::Request(last)) = back.last() else {
            panic!("nothing left")
        };
        assert_eq!(last.at.seq, 19);
    }

    #[test]
    fn torn_and_damaged_files_say_where_and_keep_the_good_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let reqs = requests(3);
        let mut rec = Recorder::start(config(dir.path())).unwrap();
        for r in &reqs {
            rec.request(&Request::H1(r.clone()), ReadAt::TlsLibrary);
            rec.flush();
            std::thread::sleep(Duration::from_millis(150));
        }
        rec.finish();
        let file = &super::super::reader::files(dir.path()).unwrap()[0];
        let data = std::fs::read(file).unwrap();
        let (whole, issues) = requests_of("f", data.clone());
        assert_eq!((whole.len(), issues.len()), (3, 0));
        let starts: Vec<usize> = memchr::memmem::find_iter(&data, BLOCK_MAGIC).collect();
        assert_eq!(starts.len(), 3);

        // Cut in the last block: two records, and where the cut is.
        let (recs, issues) = requests_of("f", data[..data.len() - 3].to_vec());
        assert_eq!(recs.len(), 2);
        assert_eq!(issues[0].kind, IssueKind::TornBlock);
        assert_eq!(issues[0].offset, starts[2]);

        // A flipped byte in the middle block: that block skipped, the third read.
        let mut flipped = data.clone();
        flipped[starts[1] + 20] ^= 0x40;
        let (recs, issues) = requests_of("f", flipped);
        assert_eq!(recs.len(), 2);
        assert_eq!(issues[0].kind, IssueKind::BadChecksum);
        assert_eq!(issues[0].offset, starts[1]);

        // A damaged length in the first block: resynchronised at the second.
        let mut bad_len = data.clone();
        bad_len[starts[0] + 4] ^= 0x10;
        let (recs, issues) = requests_of("f", bad_len);
        assert_eq!(recs.len(), 2);
        assert!(!issues.is_empty());

        // An unknown version: the file is refused, saying why.
        let mut v2 = data.clone();
        v2[6] = 2;
        let (recs, issues) = requests_of("f", v2);
        assert!(recs.is_empty());
        assert_eq!(issues[0].kind, IssueKind::UnknownVersion(2));
        assert!(issues[0].to_string().contains("use a newer mirror-agent"));

        // Not a recording at all.
        let (_, issues) = requests_of("f", b"hello".to_vec());
        assert_eq!(issues[0].kind, IssueKind::NotARecording);
    }
}
