//! The HTTP/2 frame reader: each direction's bytes into frames, whatever the segments'
//! boundaries. A connection joined mid-stream, or a hole, starts a hunt for the next frame
//! boundary (`frame::find_frames`). Whole frames other than DATA go to `H2Conn::frame`; DATA
//! payloads go on as they arrive, without being kept.

use bytes::BytesMut;

use super::frame::{self, FrameHeader, HEADER_LEN, PREFACE};
use super::hpack;
use super::{give_up, H2Conn};
use crate::http::Ctx;
use crate::reassembly::Direction;
use crate::segment::TimestampNs;

/// Most bytes kept while looking for frames, and most bytes of a frame that is neither a header
/// block nor DATA (SETTINGS, GOAWAY, …): larger ones are skipped.
const HUNT_KEEP: usize = 64 << 10;

/// How a direction's bytes are being read.
#[derive(Clone, Copy, Debug)]
pub(super) enum Reader {
    /// The client's preface: `buf` holds what matched so far.
    Preface,
    /// Looking for frames (after a join or a loss); offsets before `from` were ruled out.
    Hunt { from: usize },
    /// A frame header: `buf` holds what arrived of it.
    Header,
    /// A frame kept whole: `buf` holds what arrived of its payload.
    Payload(FrameHeader),
    /// A DATA frame's payload, passed on as it arrives.
    Data(DataFrame),
    /// A frame's payload not kept; `oversize` header blocks make the table unknown.
    Skip {
        left: u32,
        oversize_block: Option<u32>,
    },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct DataFrame {
    pub stream: u32,
    pub end_stream: bool,
    /// The pad length byte is still to come.
    pub pad_length_next: bool,
    /// Payload bytes left, padding included.
    pub left: u32,
    /// Padding at the end of the payload.
    pub pad: u32,
}

/// One direction: client to server (requests) or server to client (responses).
pub(super) struct Side {
    pub reader: Reader,
    pub buf: BytesMut,
    pub hpack: hpack::Decoder,
    /// The largest frame this side may send (the other side's SETTINGS_MAX_FRAME_SIZE).
    pub max_frame: u32,
    /// A header block waiting for its CONTINUATIONs.
    pub block: Option<Block>,
}

pub(super) struct Block {
    pub stream: u32,
    pub push: bool,
    pub end_stream: bool,
    pub buf: BytesMut,
    /// Over `max_head_bytes`: not kept.
    pub oversize: bool,
}

impl H2Conn {
    pub(super) fn read(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        mut data: &[u8],
        ts: TimestampNs,
    ) {
        loop {
            let more = match self.side(dir).reader {
                Reader::Preface => self.read_preface(ctx, dir, &mut data),
                Reader::Hunt { from } => return self.hunt(ctx, dir, from, data, ts),
                Reader::Header => self.read_header(ctx, dir, &mut data, ts),
                Reader::Payload(h) => self.read_payload(ctx, dir, h, &mut data, ts),
                Reader::Data(d) => self.read_data(ctx, dir, d, &mut data, ts),
                Reader::Skip {
                    left,
                    oversize_block,
                } => self.skip(ctx, dir, left, oversize_block, &mut data),
            };
            if !more {
                return;
            }
        }
    }

    /// The client's preface. Returns whether reading goes on.
    fn read_preface(&mut self, ctx: &mut Ctx<'_>, dir: Direction, data: &mut &[u8]) -> bool {
        let side = self.side(dir);
        if data.is_empty() {
            return false;
        }
        let take = (PREFACE.len() - side.buf.len()).min(data.len());
        side.buf.extend_from_slice(&data[..take]);
        *data = &data[take..];
        if !PREFACE.starts_with(&side.buf) {
            // Not the preface after all: find frames in what came.
            ctx.stats.h2_resyncs += 1;
            side.hpack.forget();
            side.reader = Reader::Hunt { from: 0 };
        } else if side.buf.len() == PREFACE.len() {
            side.buf.clear();
            side.reader = Reader::Header;
        }
        true
    }

    /// Looks for the next frame boundary; reads on from there when found.
    fn hunt(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        from: usize,
        data: &[u8],
        ts: TimestampNs,
    ) {
        let side = self.side(dir);
        side.buf.extend_from_slice(data);
        match frame::find_frames(&side.buf, from, side.max_frame) {
            Ok(at) => {
                ctx.stats.resync_skipped_bytes += at as u64;
                let rest = side.buf.split_off(at).freeze();
                side.buf.clear();
                side.reader = Reader::Header;
                self.read(ctx, dir, &rest, ts)
            }
            Err(next) => {
                let drop = side.buf.len().saturating_sub(HUNT_KEEP);
                ctx.stats.resync_skipped_bytes += drop as u64;
                let _ = side.buf.split_to(drop);
                side.reader = Reader::Hunt {
                    from: next.saturating_sub(drop),
                };
            }
        }
    }

    /// A frame header. Returns whether reading goes on.
    fn read_header(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        data: &mut &[u8],
        ts: TimestampNs,
    ) -> bool {
        let side = self.side(dir);
        if data.is_empty() {
            return false;
        }
        let take = (HEADER_LEN - side.buf.len()).min(data.len());
        side.buf.extend_from_slice(&data[..take]);
        *data = &data[take..];
        if side.buf.len() == HEADER_LEN {
            let h = FrameHeader::parse(&side.buf);
            side.buf.clear();
            self.begin_frame(ctx, dir, h, ts);
        }
        true
    }

    /// A frame kept whole. Returns whether reading goes on.
    fn read_payload(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        h: FrameHeader,
        data: &mut &[u8],
        ts: TimestampNs,
    ) -> bool {
        let side = self.side(dir);
        let take = (h.len as usize - side.buf.len()).min(data.len());
        side.buf.extend_from_slice(&data[..take]);
        *data = &data[take..];
        if side.buf.len() < h.len as usize {
            return false;
        }
        let payload = side.buf.split().freeze();
        side.reader = Reader::Header;
        self.frame(ctx, dir, h, &payload, ts);
        true
    }

    /// A DATA frame's payload, passed on as it arrives. Returns whether reading goes on.
    fn read_data(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        mut d: DataFrame,
        data: &mut &[u8],
        ts: TimestampNs,
    ) -> bool {
        if d.left > 0 && data.is_empty() {
            return false;
        }
        if d.pad_length_next && d.left > 0 {
            d.pad = data[0] as u32;
            d.pad_length_next = false;
            d.left -= 1;
            *data = &data[1..];
            if d.pad > d.left {
                self.lose_sync(ctx, dir);
                return true;
            }
        }
        // Padding may be partly skipped already: `left` can be below `pad`.
        let useful = d.left.saturating_sub(d.pad) as usize;
        let take = useful.min(data.len());
        self.body(ctx, dir, d.stream, &data[..take]);
        d.left -= take as u32;
        *data = &data[take..];
        if d.left <= d.pad {
            let skip = (d.left as usize).min(data.len());
            d.left -= skip as u32;
            *data = &data[skip..];
        }
        let side = self.side(dir);
        if d.left == 0 {
            side.reader = Reader::Header;
            if d.end_stream {
                self.end_of_stream(ctx, dir, d.stream, ts);
            }
        } else {
            side.reader = Reader::Data(d);
        }
        true
    }

    /// A payload not kept. Returns whether reading goes on.
    fn skip(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        left: u32,
        oversize_block: Option<u32>,
        data: &mut &[u8],
    ) -> bool {
        let side = self.side(dir);
        let take = (left as usize).min(data.len());
        *data = &data[take..];
        let left = left - take as u32;
        if left > 0 {
            side.reader = Reader::Skip {
                left,
                oversize_block,
            };
            return false;
        }
        side.reader = Reader::Header;
        if let Some(stream) = oversize_block {
            self.oversize_block(ctx, dir, stream);
        }
        true
    }

    fn begin_frame(&mut self, ctx: &mut Ctx<'_>, dir: Direction, h: FrameHeader, ts: TimestampNs) {
        let side = self.side(dir);
        let known = h.kind <= frame::CONTINUATION;
        if h.len > side.max_frame || (known && !h.plausible(side.max_frame)) {
            return self.lose_sync(ctx, dir);
        }
        let header_block = matches!(
            h.kind,
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION
        );
        side.reader = match h.kind {
            frame::DATA => Reader::Data(DataFrame {
                stream: h.stream,
                end_stream: h.flags & frame::END_STREAM != 0,
                pad_length_next: h.flags & frame::PADDED != 0,
                left: h.len,
                pad: 0,
            }),
            _ if header_block && h.len as usize > ctx.cfg.max_head_bytes => Reader::Skip {
                left: h.len,
                oversize_block: Some(h.stream),
            },
            _ if !known || h.len as usize > HUNT_KEEP => Reader::Skip {
                left: h.len,
                oversize_block: None,
            },
            _ => Reader::Payload(h),
        };
        // Frames without payload complete now.
        match side.reader {
            Reader::Payload(h) if h.len == 0 => {
                side.reader = Reader::Header;
                self.frame(ctx, dir, h, &[], ts);
            }
            Reader::Data(d) if d.left == 0 => {
                side.reader = Reader::Header;
                if d.end_stream {
                    self.end_of_stream(ctx, dir, d.stream, ts);
                }
            }
            Reader::Skip { left: 0, .. } => side.reader = Reader::Header,
            _ => {}
        }
    }

    /// A whole frame other than DATA.
    fn frame(
        &mut self,
        ctx: &mut Ctx<'_>,
        dir: Direction,
        h: FrameHeader,
        payload: &[u8],
        ts: TimestampNs,
    ) {
        let side = self.side(dir);
        if side.block.is_some() && h.kind != frame::CONTINUATION {
            // A header block must be continued before anything else (RFC 9113 6.10).
            return self.lose_sync(ctx, dir);
        }
        match h.kind {
            frame::HEADERS | frame::PUSH_PROMISE => {
                let Some(fragment) = frame::header_fragment(&h, payload) else {
                    return self.lose_sync(ctx, dir);
                };
                side.block = Some(Block {
                    stream: h.stream,
                    push: h.kind == frame::PUSH_PROMISE,
                    end_stream: h.kind == frame::HEADERS && h.flags & frame::END_STREAM != 0,
                    buf: BytesMut::from(fragment),
                    oversize: false,
                });
            }
            frame::CONTINUATION => {
                let max = ctx.cfg.max_head_bytes;
                match side.block.as_mut() {
                    Some(b) if b.stream == h.stream => {
                        if b.buf.len() + payload.len() > max {
                            b.oversize = true;
                            b.buf = BytesMut::new();
                        } else if !b.oversize {
                            b.buf.extend_from_slice(payload);
                        }
                    }
                    _ => return self.lose_sync(ctx, dir),
                }
            }
            frame::SETTINGS if h.flags & frame::ACK == 0 => {
                for (id, value) in frame::settings(payload) {
                    if id == frame::SETTINGS_MAX_FRAME_SIZE {
                        // What this side accepts bounds what the other side sends.
                        let other = self.side(dir.reverse());
                        other.max_frame = value.clamp(frame::DEFAULT_MAX_FRAME, frame::MAX_FRAME);
                    }
                }
            }
            frame::RST_STREAM => self.reset(ctx, h.stream),
            frame::GOAWAY if dir == Direction::ToClient && payload.len() >= 4 => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let refused: Vec<u32> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|&id| id > last)
                    .collect();
                for id in refused {
                    ctx.stats.h2_refused_streams += 1;
                    if let Some(mut s) = self.streams.remove(&id) {
                        give_up(ctx.stats, &mut s, |_| {});
                    }
                }
            }
            _ => {}
        }
        if h.flags & frame::END_HEADERS != 0
            && matches!(
                h.kind,
                frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION
            )
        {
            if let Some(block) = self.side(dir).block.take() {
                self.header_block(ctx, dir, block, ts);
            }
        }
    }
}
