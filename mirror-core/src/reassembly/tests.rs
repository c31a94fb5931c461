//! Connection lifecycle on one 4-tuple, as a passive observer that may miss any packet sees it.

use proptest::prelude::*;

use super::ReassemblyConfig;
use crate::http::HttpConfig;
use crate::segment::{Segment, TcpFlags};
use crate::testkit::{Conversation, Extract};

const LATER: u64 = 1_000_000_000_000_000_000;
const CLIENT: &str = "10.0.0.1:40000";
const SERVER: &str = "10.0.0.2:8080";

fn extract() -> Extract {
    Extract::new(&[8080])
}

fn request(n: usize) -> Vec<u8> {
    format!("GET /conn/{n} HTTP/1.1\r\nHost: svc\r\n\r\n").into_bytes()
}

fn response() -> &'static [u8] {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
}

/// One exchange on a new connection: handshake, request, response, FINs.
fn exchange(c: &mut Conversation, n: usize) -> Vec<Segment> {
    let mut segs = c.handshake();
    segs.extend(c.client_data(&request(n), 1400));
    segs.extend(c.server_data(response(), 1400));
    segs.extend(c.close());
    segs
}

fn targets(x: &Extract) -> Vec<&str> {
    x.requests.iter().map(|r| r.target()).collect()
}

/// The next connection on the same 4-tuple, with initial sequence numbers `ahead` past the
/// previous connection's, as Linux picks them for a reused 4-tuple (a clock, not a dice roll).
fn next_conn(prev: &Conversation, ahead: u32) -> Conversation {
    let mut c = Conversation::new(
        &prev.client.to_string(),
        &prev.server.to_string(),
        prev.client_seq.wrapping_add(ahead),
        prev.server_seq.wrapping_add(ahead),
    );
    c.ts = prev.ts + 1_000_000;
    c
}

fn without_fins(segs: Vec<Segment>) -> Vec<Segment> {
    segs.into_iter()
        .filter(|s| !s.flags.contains(TcpFlags::FIN))
        .collect()
}

fn without_syns(segs: Vec<Segment>) -> Vec<Segment> {
    segs.into_iter()
        .filter(|s| !s.flags.contains(TcpFlags::SYN))
        .collect()
}

#[test]
fn a_new_syn_on_a_tracked_4_tuple_starts_a_new_connection() {
    let mut x = extract();
    let mut a = Conversation::new(CLIENT, SERVER, 1000, 5000);
    x.feed(&without_fins(exchange(&mut a, 1)));
    // Close in sequence space: the new ISN lies just after the old connection's bytes.
    let mut b = next_conn(&a, 10);
    x.feed(&exchange(&mut b, 2));
    x.finish(LATER);
    assert_eq!(targets(&x), ["/conn/1", "/conn/2"]);
    assert_eq!(x.responses.len(), 2);
    let st = x.r.stats();
    assert_eq!(st.superseded_by_syn, 1);
    assert_eq!(st.connections, 2);
    assert_eq!(st.lost_bytes, 0);
}

#[test]
fn a_retransmitted_syn_is_the_same_connection() {
    let mut x = extract();
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 5000);
    let hs = c.handshake();
    x.feed(&hs);
    x.feed(&hs[..1]);
    x.feed(&c.client_data(&request(1), 1400));
    x.feed(&hs[1..2]);
    x.feed(&c.close());
    x.finish(LATER);
    assert_eq!(targets(&x), ["/conn/1"]);
    let st = x.r.stats();
    assert_eq!((st.connections, st.duplicate_syns), (1, 2));
}

#[test]
fn a_lost_fin_and_a_lost_syn_do_not_join_two_connections() {
    for ahead in [40, 3_000, 15_600_000, 3_000_000_000] {
        let mut x = extract();
        let mut a = Conversation::new(CLIENT, SERVER, 1000, 5000);
        x.feed(&without_fins(exchange(&mut a, 1)));
        let mut b = next_conn(&a, ahead);
        x.feed(&without_syns(exchange(&mut b, 2)));
        x.finish(LATER);
        assert_eq!(targets(&x), ["/conn/1", "/conn/2"], "ahead {ahead}");
        let st = x.r.stats();
        assert_eq!(st.lost_bytes, 0, "ahead {ahead}: {st:?}");
        assert_eq!(st.connections, 2, "ahead {ahead}");
        assert_eq!(st.superseded_without_syn, 1, "ahead {ahead}");
    }
}

#[test]
fn bytes_past_a_fin_belong_to_the_next_connection() {
    let mut x = extract();
    let mut a = Conversation::new(CLIENT, SERVER, 1000, 5000);
    // Only the client's FIN is seen: the flow stays open, half closed.
    let segs: Vec<_> = exchange(&mut a, 1)
        .into_iter()
        .filter(|s| !(s.flags.contains(TcpFlags::FIN) && s.flow.src == a.server))
        .collect();
    x.feed(&segs);
    let mut b = next_conn(&a, 5);
    x.feed(&without_syns(exchange(&mut b, 2)));
    x.finish(LATER);
    assert_eq!(targets(&x), ["/conn/1", "/conn/2"]);
    assert_eq!(x.r.stats().lost_bytes, 0);
}

#[test]
fn after_a_close_late_copies_are_ignored_and_a_new_connection_is_not() {
    let mut x = extract();
    let mut a = Conversation::new(CLIENT, SERVER, 1000, 5000);
    let first = exchange(&mut a, 1);
    x.feed(&first);
    // A late retransmission of the request.
    x.feed(&first[3..4]);
    let mut b = next_conn(&a, 100);
    x.feed(&without_syns(exchange(&mut b, 2)));
    x.finish(LATER);
    assert_eq!(targets(&x), ["/conn/1", "/conn/2"]);
    let st = x.r.stats();
    assert_eq!(st.after_close_segments, 1);
    assert_eq!(st.discarded_bytes, first[3].payload.len() as u64);
    assert_eq!(st.superseded_without_syn, 1);
}

#[test]
fn equal_ports_on_both_ends_are_oriented_by_the_syn() {
    let mut x = extract();
    let mut c = Conversation::new("10.0.0.1:8080", SERVER, 1000, 5000);
    for n in 0..10 {
        x.feed(&exchange(&mut c, n));
        c = next_conn(&c, 64_000 + n as u32);
    }
    x.finish(LATER);
    assert_eq!(x.requests.len(), 10);
    assert!(x.requests.iter().all(|r| r.client == c.client));
    assert_eq!(x.responses.len(), 10);
    let st = x.r.stats();
    assert_eq!((st.lost_bytes, st.connections, st.closed_fin), (0, 10, 10));
}

#[test]
fn equal_ports_joined_mid_stream_are_oriented_by_what_is_sent() {
    let mut x = extract();
    let mut c = Conversation::new("10.0.0.1:8080", SERVER, 1000, 5000);
    c.handshake();
    // The first segment seen is the server's response; then the client's next request.
    x.feed(&c.server_data(response(), 1400));
    x.feed(&c.client_data(&request(7), 1400));
    x.feed(&c.server_data(response(), 1400));
    x.finish(LATER);
    assert_eq!(targets(&x), ["/conn/7"]);
    assert_eq!(x.requests[0].client, c.client);
    assert_eq!(x.responses.len(), 1);
}

#[test]
fn holes_in_one_connection_still_count_as_lost_and_what_follows_is_delivered() {
    let mut x = extract();
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 5000);
    let mut segs = c.handshake();
    let reqs: Vec<u8> = (0..3).flat_map(request).collect();
    let data = c.client_data(&reqs, 20);
    let lost = data[1].payload.len() as u64;
    segs.extend(
        data.iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, s)| s.clone()),
    );
    // An RST closes the connection before the hole times out: what follows is still handed over.
    segs.push(c.reset());
    x.feed(&segs);
    x.finish(LATER);
    let st = x.r.stats();
    assert_eq!(st.lost_bytes, lost);
    assert_eq!(st.ooo_bytes_held, 0);
    assert_eq!(st.payload_bytes, st.delivered_bytes);
    assert_eq!(targets(&x), ["/conn/2"]);
}

/// Segments of `reqs` sent on one connection, in order.
fn connection(c: &mut Conversation, reqs: &[Vec<u8>], mss: usize) -> Vec<Segment> {
    let mut segs = c.handshake();
    for r in reqs {
        segs.extend(c.client_data(r, mss));
        segs.extend(c.server_data(response(), mss));
    }
    segs.extend(c.close());
    segs
}

proptest! {
    /// Connections one after another on a 4-tuple, with any packets lost: bytes never counted
    /// lost beyond what was sent and the sequence space between connections (a connection whose
    /// SYN and whose peer's packets were all lost, starting a little ahead of the last one, is
    /// a hole as far as anyone can tell), every request extracted was sent (and only once),
    /// and a connection that arrives whole after the losses is extracted whole.
    #[test]
    fn random_loss_never_overcounts_and_never_loses_the_next_connection(
        conns in prop::collection::vec((1usize..4, 0u32..40_000_000), 1..6),
        mss in 8usize..200,
        losses in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        isn in any::<u32>(),
        random_isn in any::<bool>(),
        rand_isns in prop::collection::vec(any::<u32>(), 6),
    ) {
        let mut x = Extract::with(
            ReassemblyConfig { server_ports: vec![8080], ..Default::default() },
            HttpConfig::default(),
        );
        let mut c = Conversation::new(CLIENT, SERVER, isn, isn ^ 0x5555_5555);
        let mut sent_bytes = 0u64;
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let mut lossy: Vec<Segment> = Vec::new();
        let mut n = 0;
        for (i, &(count, ahead)) in conns.iter().enumerate() {
            let reqs: Vec<Vec<u8>> = (n..n + count).map(request).collect();
            n += count;
            lossy.extend(connection(&mut c, &reqs, mss));
            sent.extend(reqs);
            c = if random_isn {
                let mut next = Conversation::new(CLIENT, SERVER, rand_isns[i], !rand_isns[i]);
                next.ts = c.ts + 1_000_000;
                next
            } else {
                next_conn(&c, ahead.max(1))
            };
        }
        sent_bytes += lossy.iter().map(|s| s.payload.len() as u64).sum::<u64>();
        for l in &losses {
            if !lossy.is_empty() {
                lossy.remove(l.index(lossy.len()));
            }
        }
        let last: Vec<Vec<u8>> = (n..n + 2).map(request).collect();
        let whole = connection(&mut c, &last, mss);
        sent_bytes += whole.iter().map(|s| s.payload.len() as u64).sum::<u64>();
        x.feed(&lossy);
        x.feed(&whole);
        x.finish(LATER);

        let st = x.r.stats();
        let between: u64 = if random_isn { 0 } else { conns.iter().map(|&(_, a)| u64::from(a.max(1))).sum() };
        prop_assert!(st.lost_bytes <= sent_bytes + between, "{st:?}");
        let got: Vec<&[u8]> = x.requests.iter().map(|r| &r.raw[..]).collect();
        let mut seen = std::collections::HashSet::new();
        for g in &got {
            prop_assert!(sent.iter().chain(&last).any(|s| s[..] == g[..]), "invented {:?}", String::from_utf8_lossy(g));
            prop_assert!(seen.insert(g.to_vec()), "twice {:?}", String::from_utf8_lossy(g));
        }
        prop_assert_eq!(&got[got.len().saturating_sub(2)..], &[&last[0][..], &last[1][..]][..], "{:?} {:?}", got.iter().map(|g| String::from_utf8_lossy(g).into_owned()).collect::<Vec<_>>(), x.r.handler().stats());
    }
}

#[test]
fn a_handshake_overtaken_by_the_servers_first_bytes_is_the_same_connection() {
    // Responses described by records and requests cloned reach the agent by two paths: the
    // server's greeting (an HTTP/2 SETTINGS frame, sent at accept) can arrive before the SYN.
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 90_000);
    let mut hs = c.handshake();
    let greeting = c.server_data(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", 1400);
    let rest = exchange_on(&mut c, 1);
    let mut segs = greeting;
    segs.append(&mut hs);
    segs.extend(rest);
    let mut x = extract();
    x.feed(&segs);
    x.finish(LATER);
    let s = x.r.stats();
    assert_eq!(
        (s.connections, s.late_syns, s.superseded_by_syn),
        (1, 2, 0),
        "{s:?}"
    );
    assert_eq!(targets(&x), ["/conn/1"]);
    assert_eq!(x.responses.len(), 1);
    // A SYN that the first bytes did not acknowledge is another connection.
    let mut other = Conversation::new(CLIENT, SERVER, 5000, 90_000);
    let mut segs = other.server_data(b"late", 1400);
    let mut stranger = Conversation::new(CLIENT, SERVER, 7000, 30_000);
    segs.extend(stranger.handshake());
    let mut x = extract();
    x.feed(&segs);
    assert_eq!(x.r.stats().superseded_by_syn, 1);
}

/// Request and response on a connection whose handshake is done.
fn exchange_on(c: &mut Conversation, n: usize) -> Vec<Segment> {
    let mut segs = c.client_data(&request(n), 1400);
    segs.extend(c.server_data(response(), 1400));
    segs.extend(c.close());
    segs
}

#[test]
fn a_reset_lingers_for_the_bytes_sent_before_it() {
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 90_000);
    let mut segs = c.handshake();
    segs.extend(c.client_data(&request(1), 1400));
    let answer = c.server_data(response(), 1400);
    // The client's RST (cloned) overtakes the answer (a head record).
    segs.push(c.reset());
    segs.extend(answer);
    for linger in [0, 50_000_000] {
        let mut x = Extract::with(
            ReassemblyConfig {
                server_ports: vec![8080],
                reset_linger_ns: linger,
                ..Default::default()
            },
            HttpConfig::default(),
        );
        x.feed(&segs);
        x.finish(LATER);
        let s = x.r.stats();
        assert_eq!(s.closed_rst, 1);
        assert_eq!(
            x.responses.len(),
            usize::from(linger > 0),
            "linger {linger}: {s:?}"
        );
    }
}

#[test]
fn a_response_that_overtakes_its_request_is_never_paired_with_another() {
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 90_000);
    let hs = c.handshake();
    let req = c.client_data(&request(1), 1400);
    let resp = c.server_data(response(), 1400);
    let mut segs = resp;
    segs.extend(hs);
    segs.extend(req);
    segs.extend(exchange_on(&mut c, 2));
    let mut x = extract();
    x.feed(&segs);
    x.finish(LATER);
    // The first answer acknowledges more than the SYN: not provably this connection's, so it
    // stays apart, and the hole it leaves restarts pairing: both answers go unpaired (counted),
    // neither is given to the wrong request; both requests are extracted once.
    assert_eq!(targets(&x), ["/conn/1", "/conn/2"]);
    assert!(x.responses.is_empty(), "{:?}", x.responses);
    let h = x.r.handler().stats();
    assert_eq!((h.unpaired_responses, h.unpaired_requests), (2, 2), "{h:?}");
}

#[test]
fn a_fin_beyond_a_hole_that_acknowledges_the_peers_fin_is_the_same_connection() {
    // The server's answer (head records, held back) arrives after both FINs (clones).
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 90_000);
    let mut segs = c.handshake();
    segs.extend(c.client_data(&request(1), 1400));
    let answer = c.server_data(response(), 1400);
    let mut fins = c.close();
    // The server's FIN acknowledges the client's.
    fins[1].ack = fins[1].ack.wrapping_add(1);
    segs.extend(fins);
    segs.extend(answer);
    let mut x = extract();
    x.feed(&segs);
    x.finish(LATER);
    let s = x.r.stats();
    assert_eq!(
        (s.connections, s.superseded_without_syn, s.lost_bytes),
        (1, 0, 0),
        "{s:?}"
    );
    assert_eq!(x.responses.len(), 1);
}

#[test]
fn segments_of_connections_older_than_two_seconds_count_as_long_lived() {
    let mut x = extract();
    let mut c = Conversation::new(CLIENT, SERVER, 1000, 5000);
    let mut segs = c.handshake();
    segs.extend(c.client_data(&request(1), 1400));
    segs.extend(c.server_data(response(), 1400));
    c.advance(super::LONG_LIVED_NS);
    let mut later = c.client_data(&request(2), 1400);
    later.extend(c.server_data(response(), 1400));
    x.feed(&segs);
    assert_eq!(x.r.stats().long_lived_segments, 0);
    x.feed(&later);
    let st = x.r.stats();
    assert_eq!(st.long_lived_segments, later.len() as u64);
    assert_eq!(st.segments, (segs.len() + later.len()) as u64);
}
