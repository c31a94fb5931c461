//! Builders of TCP conversations for tests, benchmarks and fuzzing: segments as the capture
//! stage would hand them over, without a kernel.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::http::{h1, h2, HttpConfig, HttpEvent, HttpExtractor, Request, ResponseMeta};
use crate::reassembly::{Reassembler, ReassemblyConfig};
use crate::segment::{FlowKey, Segment, TcpFlags, TimestampNs};

/// One TCP connection between a client and a server, producing segments in both directions.
pub struct Conversation {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub client_seq: u32,
    pub server_seq: u32,
    pub ts: TimestampNs,
}

impl Conversation {
    pub fn new(client: &str, server: &str, client_isn: u32, server_isn: u32) -> Self {
        Conversation {
            client: client.parse().unwrap(),
            server: server.parse().unwrap(),
            client_seq: client_isn,
            server_seq: server_isn,
            ts: 1_000_000_000,
        }
    }

    fn seg(&self, to_server: bool, seq: u32, flags: TcpFlags, data: &[u8]) -> Segment {
        let flow = if to_server {
            FlowKey {
                src: self.client,
                dst: self.server,
            }
        } else {
            FlowKey {
                src: self.server,
                dst: self.client,
            }
        };
        // Each side acknowledges everything the other has sent so far.
        let ack = if to_server {
            self.server_seq
        } else {
            self.client_seq
        };
        Segment {
            flow,
            seq,
            ack,
            flags,
            payload: Bytes::copy_from_slice(data),
            elided: 0,
            ts: self.ts,
        }
    }

    /// SYN, SYN-ACK, ACK.
    pub fn handshake(&mut self) -> Vec<Segment> {
        let syn = self.seg(true, self.client_seq, TcpFlags::SYN, b"");
        let synack = self.seg(
            false,
            self.server_seq,
            TcpFlags::SYN.union(TcpFlags::ACK),
            b"",
        );
        self.client_seq = self.client_seq.wrapping_add(1);
        self.server_seq = self.server_seq.wrapping_add(1);
        let ack = self.seg(true, self.client_seq, TcpFlags::ACK, b"");
        vec![syn, synack, ack]
    }

    /// Client data, cut into segments of at most `mss` bytes.
    pub fn client_data(&mut self, data: &[u8], mss: usize) -> Vec<Segment> {
        self.data(true, data, mss)
    }

    pub fn server_data(&mut self, data: &[u8], mss: usize) -> Vec<Segment> {
        self.data(false, data, mss)
    }

    fn data(&mut self, to_server: bool, data: &[u8], mss: usize) -> Vec<Segment> {
        data.chunks(mss.max(1))
            .map(|chunk| {
                let seq = if to_server {
                    &mut self.client_seq
                } else {
                    &mut self.server_seq
                };
                let at = *seq;
                *seq = seq.wrapping_add(chunk.len() as u32);
                self.seg(to_server, at, TcpFlags::ACK.union(TcpFlags::PSH), chunk)
            })
            .collect()
    }

    /// FIN from both sides.
    pub fn close(&mut self) -> Vec<Segment> {
        let a = self.seg(
            true,
            self.client_seq,
            TcpFlags::FIN.union(TcpFlags::ACK),
            b"",
        );
        let b = self.seg(
            false,
            self.server_seq,
            TcpFlags::FIN.union(TcpFlags::ACK),
            b"",
        );
        self.client_seq = self.client_seq.wrapping_add(1);
        self.server_seq = self.server_seq.wrapping_add(1);
        vec![a, b]
    }

    pub fn reset(&mut self) -> Segment {
        self.seg(true, self.client_seq, TcpFlags::RST, b"")
    }

    /// Server data as the kernel describes it with `--response-capture heads`: each
    /// segment's first `HEAD_BYTES` of payload, the rest elided.
    pub fn server_heads(&mut self, data: &[u8], mss: usize) -> Vec<Segment> {
        let segs = self.server_data(data, mss);
        segs.into_iter()
            .map(|mut s| {
                if s.flow.src == self.server && s.payload.len() > mirror_common::HEAD_BYTES {
                    s.elided = (s.payload.len() - mirror_common::HEAD_BYTES) as u32;
                    s.payload.truncate(mirror_common::HEAD_BYTES);
                }
                s
            })
            .collect()
    }

    pub fn advance(&mut self, ns: u64) {
        self.ts += ns;
    }
}

/// Reassembly plus parsing, for tests: the pipeline without capture and replay.
pub struct Extract {
    pub r: Reassembler<HttpExtractor>,
    /// HTTP/1 requests.
    pub requests: Vec<h1::Request>,
    pub h2_requests: Vec<h2::Request>,
    pub responses: Vec<ResponseMeta>,
    /// Connections whose responses the parse stage asked for whole.
    pub full_responses: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    pub contents: Vec<crate::http::LiveContent>,
}

impl Extract {
    pub fn new(server_ports: &[u16]) -> Self {
        Self::with(
            ReassemblyConfig {
                server_ports: server_ports.to_vec(),
                ..Default::default()
            },
            HttpConfig::default(),
        )
    }

    pub fn with(rc: ReassemblyConfig, hc: HttpConfig) -> Self {
        Extract {
            r: Reassembler::new(rc, HttpExtractor::new(hc)),
            requests: Vec::new(),
            h2_requests: Vec::new(),
            responses: Vec::new(),
            full_responses: Vec::new(),
            contents: Vec::new(),
        }
    }

    pub fn feed<'a>(&mut self, segs: impl IntoIterator<Item = &'a Segment>) {
        for s in segs {
            self.r.process(s);
            self.collect();
        }
    }

    /// Lets `hole_timeout` and `idle_timeout` pass, then closes everything.
    pub fn finish(&mut self, now: TimestampNs) {
        self.r.tick(now);
        self.r.shutdown(now);
        self.collect();
    }

    fn collect(&mut self) {
        for e in self.r.handler_mut().drain() {
            match e {
                HttpEvent::Request(Request::H1(r)) => self.requests.push(r),
                HttpEvent::Request(Request::H2(r)) => self.h2_requests.push(r),
                HttpEvent::Response(m) => self.responses.push(m),
                HttpEvent::FullResponses { client, server } => {
                    self.full_responses.push((client, server))
                }
                HttpEvent::ResponseContent(c) => self.contents.push(c),
            }
        }
    }
}
