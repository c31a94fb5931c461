//! Pairs an HTTP/1 connection's responses with its requests, in order. The request side
//! announces each request as its head parses (`expect`) and completes it at its end; the
//! response side takes the oldest unanswered one. A response can arrive before its request:
//! on a pod's veth the two directions cross two hooks that may run on two CPUs, and their
//! clones can reach the ring out of order. Such a response is held (`hold_early`) until the
//! request it answers has been read.

use std::collections::VecDeque;

use bytestring::ByteString;

use super::super::HttpStats;
use crate::segment::TimestampNs;

/// Most responses held per connection while their requests are on their way.
const MAX_EARLY: usize = 8;

/// A request waiting for its response.
pub(super) struct Pending {
    pub seq: u64,
    /// Shared with the request's bytes once it is complete (empty until then, but for an
    /// `Upgrade: h2c` request, which HTTP/2 may take over before its body ends).
    pub method: ByteString,
    pub target: ByteString,
    pub head: bool,
    /// None until the request's last byte is seen.
    pub last_ts: Option<TimestampNs>,
    pub expect_continue: bool,
    /// The request was dropped: its response is framed but not reported.
    pub dropped: bool,
    /// Its response, when that was seen before the request.
    pub early: Option<EarlyResponse>,
}

/// A response seen before the request it answers.
#[derive(Clone, Copy, Debug)]
pub(super) struct EarlyResponse {
    pub status: u16,
    pub first_ts: TimestampNs,
    /// How far the request stream was acknowledged when the response started.
    pub ack: u64,
}

#[derive(Default)]
pub(super) struct Pairing {
    /// Requests whose responses have not been seen, oldest first.
    pending: VecDeque<Pending>,
    /// Responses seen before their request, oldest first.
    early: VecDeque<EarlyResponse>,
}

impl Pairing {
    /// A request's head parsed; its response is expected. The oldest waiting request makes
    /// room when `max` are waiting.
    pub fn expect(&mut self, request: Pending, max: usize, stats: &mut HttpStats) {
        if self.pending.len() >= max {
            self.pending.pop_front();
            stats.pending_overflow += 1;
        }
        self.pending.push_back(request);
    }

    /// The earliest response held for a request that starts at `start` or later (a lower
    /// bound of its stream offset): held responses acknowledging no more than that answered
    /// requests that were never read, and are counted unpaired.
    pub fn take_early(&mut self, start: u64, stats: &mut HttpStats) -> Option<EarlyResponse> {
        while let Some(e) = self.early.pop_front() {
            if e.ack > start {
                return Some(e);
            }
            stats.unpaired_responses += 1;
        }
        None
    }

    /// Holds a response whose request has not been read (the server acknowledged request
    /// bytes up to `ack`), or counts it unpaired when too many are held.
    pub fn hold_early(&mut self, early: EarlyResponse, stats: &mut HttpStats) {
        if self.early.len() < MAX_EARLY {
            self.early.push_back(early);
        } else {
            stats.unpaired_responses += 1;
        }
    }

    pub fn find(&mut self, seq: u64) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.seq == seq)
    }

    /// Removes request `seq` from the waiting ones.
    pub fn take(&mut self, seq: u64) -> Option<Pending> {
        let i = self.pending.iter().position(|p| p.seq == seq)?;
        self.pending.remove(i)
    }

    /// The oldest request not answered yet: the one the next response answers.
    pub fn next_unanswered(&mut self) -> Option<Pending> {
        let i = self.pending.iter().position(|p| p.early.is_none())?;
        self.pending.remove(i)
    }

    /// Request `seq`, complete now, with the response held for it, if one was.
    pub fn answered_early(&mut self, seq: u64) -> Option<(Pending, EarlyResponse)> {
        let i = self
            .pending
            .iter()
            .position(|p| p.seq == seq && p.early.is_some())?;
        let p = self.pending.remove(i)?;
        let early = p.early?;
        Some((p, early))
    }

    /// Bytes were lost in the response stream: whole responses may have been in the hole, so
    /// which request the next response answers is unknown, and pairing by order could pair it
    /// with the wrong one. The waiting requests are counted unpaired.
    pub fn forget(&mut self, stats: &mut HttpStats) {
        stats.unpaired_requests += self.pending.len() as u64;
        self.pending.clear();
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// The connection closed: held responses never met their requests.
    pub fn close(self, stats: &mut HttpStats) {
        stats.unpaired_responses += self.early.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(seq: u64) -> Pending {
        Pending {
            seq,
            method: ByteString::from_static("GET"),
            target: ByteString::from_static("/"),
            head: false,
            last_ts: None,
            expect_continue: false,
            dropped: false,
            early: None,
        }
    }

    #[test]
    fn responses_take_requests_in_order_and_skip_those_answered_early() {
        let mut p = Pairing::default();
        let mut stats = HttpStats::default();
        p.expect(pending(0), 8, &mut stats);
        let mut second = pending(1);
        second.early = Some(EarlyResponse {
            status: 204,
            first_ts: 5,
            ack: 10,
        });
        p.expect(second, 8, &mut stats);
        p.expect(pending(2), 8, &mut stats);
        assert_eq!(p.next_unanswered().map(|r| r.seq), Some(0));
        assert_eq!(p.next_unanswered().map(|r| r.seq), Some(2));
        let (req, early) = p.answered_early(1).unwrap();
        assert_eq!((req.seq, early.status), (1, 204));
        assert!(p.next_unanswered().is_none());
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let mut p = Pairing::default();
        let mut stats = HttpStats::default();
        for seq in 0..3 {
            p.expect(pending(seq), 2, &mut stats);
        }
        assert_eq!(stats.pending_overflow, 1);
        assert_eq!(p.next_unanswered().map(|r| r.seq), Some(1));
        p.forget(&mut stats);
        assert_eq!(stats.unpaired_requests, 1);
    }

    #[test]
    fn held_responses_for_requests_never_read_are_counted_unpaired() {
        let mut p = Pairing::default();
        let mut stats = HttpStats::default();
        for ack in [10, 20, 30] {
            let e = EarlyResponse {
                status: 200,
                first_ts: 0,
                ack,
            };
            p.hold_early(e, &mut stats);
        }
        // A request starting at offset 20: the responses acknowledging 10 and 20 answered
        // requests before it.
        assert_eq!(p.take_early(20, &mut stats).map(|e| e.ack), Some(30));
        assert_eq!(stats.unpaired_responses, 2);
        for ack in 0..=MAX_EARLY as u64 {
            let e = EarlyResponse {
                status: 200,
                first_ts: 0,
                ack,
            };
            p.hold_early(e, &mut stats);
        }
        assert_eq!(stats.unpaired_responses, 3);
        p.close(&mut stats);
        assert_eq!(stats.unpaired_responses, 3 + MAX_EARLY as u64);
    }
}
