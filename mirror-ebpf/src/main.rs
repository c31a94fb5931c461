//! TC classifier that hands the live service's TCP segments to the agent.
//!
//! The live packet is never changed, delayed or dropped: every path returns `TC_ACT_OK`.
//! Each packet is counted once in `Seen` and once in exactly one outcome (cloned, recorded,
//! clone error, ring full, or a skip reason), so userspace can account for every packet.
//!
//! Requests are mirrored whole: they are replayed byte for byte. By default
//! (`FLAG_PAYLOAD_RECORDS`) a request segment's payload is copied into a `RESPONSE_HEADS`
//! ring-buffer record, which costs a copy of the payload in the live path's softirq; a clone,
//! the alternative, costs an skb clone, a veth transmit, a second pass through the receive path
//! and a copy of the whole segment into the capture ring. Segments longer than
//! `PAYLOAD_RECORD_BYTES` (GSO super-packets of an upload) are cloned either way.
//!
//! Responses are only timed and their status read, so by default (`FLAG_RESPONSE_HEADS`) a
//! response segment is described in a record: flow, sequence and acknowledgement numbers,
//! payload length, flags and the first `HEAD_BYTES` of payload. The agent frames the response
//! stream from the records (a status line and `Content-Length` are in the head; the body is
//! skipped by length). Where that is not enough (chunked bodies, HTTP/2, heads longer than
//! `HEAD_BYTES`), the agent lists the connection in `FULL_RESPONSES`, and its response segments
//! are mirrored whole from then on.
//!
//! Records and clones reach the agent by two paths with their own delays. So that it sees them
//! in this program's order, SYN, FIN and RST without payload are records too, and every clone
//! made with records is followed by a small `CloneMark` record: the agent puts each clone back
//! at its mark. A full capture ring then loses request bytes, never a connection's lifecycle.
#![no_std]
#![no_main]

mod tls;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::bpf_skb_load_bytes,
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use mirror_common::{
    clone_result, flow_hash, is_request_start, AddrKey, CloneMark, CloneResult, Counter, Heartbeat,
    MirrorConfig, SegmentRecord, COUNTER_COUNT, FLAG_ADDR_FILTER, FLAG_ENABLED,
    FLAG_PAYLOAD_RECORDS, FLAG_RESPONSES, FLAG_RESPONSE_HEADS, FLAG_STICKY_SAMPLING, HEAD_BYTES,
    MAX_DECISIONS, MAX_FULL_RESPONSES, MAX_LIVE_ADDRS, MAX_LIVE_PORTS, PAYLOAD_RECORD_BYTES,
    REQUEST_START_LEN, SAMPLE_ALL,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

#[map]
static CONFIG: Array<MirrorConfig> = Array::with_max_entries(1, 0);

/// Live ports, host byte order. The value is unused.
#[map]
static LIVE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_LIVE_PORTS, 0);

/// Live service addresses; consulted only with `FLAG_ADDR_FILTER`.
#[map]
static LIVE_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_LIVE_ADDRS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Nanoseconds spent on the packets of mirrored connections, from the clock read after
/// matching to the end of their clone or record. This work runs in the live path (the sender's
/// context or its softirq), outside the agent's threads, so the agent adds it to its own CPU
/// time against `--cpu-budget`; shed connections cost only the match and the sampling lookup.
/// The clone's delivery to the agent's socket on the mirror veth runs later, in the same CPU's
/// softirq, and is not in it.
#[map]
static WORK_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// With `FLAG_STICKY_SAMPLING`: per connection (keyed by its symmetric flow hash), 1 if it is
/// mirrored. Decided at the connection's first packet against the rate of that moment, so that
/// when the agent lowers the rate to stay in its CPU budget, whole new connections are shed
/// before a single clone is made, and a connection being mirrored stays mirrored. Hash
/// collisions share a decision, which is harmless.
#[map]
static DECISIONS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(MAX_DECISIONS, 0);

/// The agent's last sign of life; see `Heartbeat`.
#[map]
static HEARTBEAT: Array<Heartbeat> = Array::with_max_entries(1, 0);

/// Segments described or copied instead of cloned (`FLAG_RESPONSE_HEADS`,
/// `FLAG_PAYLOAD_RECORDS`), and the marks of clones. The agent sizes it at load
/// (`RESPONSE_HEADS_RING_BYTES` or `PAYLOAD_RING_BYTES`).
#[map]
static RESPONSE_HEADS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Connections (by flow hash) whose responses the agent needs whole: cloned, not described.
#[map]
static FULL_RESPONSES: LruHashMap<u32, u8> = LruHashMap::with_max_entries(MAX_FULL_RESPONSES, 0);

/// `bpf_ringbuf_submit` flag: never a wake-up. One costs more than a clone on a VM, and none
/// is waited for: the agent reads the ring every few milliseconds while records come. Forced
/// wake-ups past half full cost a quarter of a core in the live path when the agent was
/// throttled, the ring staying over half full, for nothing.
const BPF_RB_NO_WAKEUP: u64 = 1;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// TCP flags that matter to reassembly even without payload: FIN, SYN, RST.
const TCP_FIN_SYN_RST: u8 = 0x07;
/// IPv4 "more fragments" flag and fragment offset bits.
const IPV4_FRAG_MASK: u16 = 0x3fff;

#[classifier]
pub fn mirror_tc(ctx: TcContext) -> i32 {
    count(Counter::Seen);
    let outcome = mirror(&ctx);
    count(outcome);
    TC_ACT_OK
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and TC programs are not preempted on their CPU.
        unsafe { *slot += 1 };
    }
}

/// Service-side view of one TCP packet.
struct Tuple {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    /// No payload and no SYN, FIN or RST: reassembly has no use for it.
    pure_ack: bool,
    /// Offset of the TCP payload in the packet.
    payload_at: usize,
    /// TCP payload bytes.
    payload_len: usize,
    seq: u32,
    ack: u32,
    tcp_flags: u8,
    ip_version: u8,
}

/// Decides and, when it matches, clones. Returns the outcome counter.
#[inline(always)]
fn mirror(ctx: &TcContext) -> Counter {
    let Some(cfg) = CONFIG.get(0) else {
        return Counter::SkipDisabled;
    };
    if cfg.flags & FLAG_ENABLED == 0 {
        return Counter::SkipDisabled;
    }
    let tuple = match parse(ctx) {
        Ok(t) => t,
        Err(reason) => return reason,
    };

    // SAFETY: the hash maps are only read here; the agent writes them before enabling.
    let is_request = unsafe { LIVE_PORTS.get(&tuple.dport) }.is_some();
    let is_response = !is_request
        && cfg.flags & FLAG_RESPONSES != 0
        && unsafe { LIVE_PORTS.get(&tuple.sport) }.is_some();
    if !is_request && !is_response {
        return Counter::SkipOtherPort;
    }
    if cfg.flags & FLAG_ADDR_FILTER != 0 {
        let service = if is_request { tuple.dst } else { tuple.src };
        if unsafe { LIVE_ADDRS.get(&AddrKey::from_v6(service)) }.is_none() {
            return Counter::SkipOtherAddr;
        }
    }
    count(Counter::Matched);
    if is_response {
        count(Counter::MatchedResponses);
    }
    // Read on matched packets only, so that the rest of the node's traffic does not pay for it.
    // SAFETY: no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    if let Some(hb) = HEARTBEAT.get(0) {
        if hb.is_stale(now) {
            return Counter::SkipAgentGone;
        }
    }
    if !sampled_in(cfg, &tuple) {
        // Shed requests are counted as requests too, not only as packets.
        if is_request && starts_request(ctx, &tuple) {
            count(Counter::SampledOutRequestStarts);
        }
        return Counter::SkipSampledOut;
    }
    if tuple.pure_ack {
        return Counter::SkipNoPayload;
    }
    let outcome = deliver(ctx, cfg, &tuple, is_response, now);
    if let Some(slot) = WORK_NS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and TC programs are not preempted on their CPU.
        unsafe { *slot += aya_ebpf::helpers::bpf_ktime_get_ns().wrapping_sub(now) };
    }
    outcome
}

/// Clones a sampled segment, or describes or copies it in a record; `now` is the packet's time.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    cfg: &MirrorConfig,
    tuple: &Tuple,
    is_response: bool,
    now: u64,
) -> Counter {
    let is_request = !is_response;
    // With records, SYN, FIN and RST without payload (both directions) and response heads are
    // records; what is still cloned gets a `CloneMark` in the same ring, so that the agent can
    // put the clones back in this program's order among the records. A full capture ring
    // then drops request bytes only, never a connection's lifecycle.
    let heads = cfg.flags & FLAG_RESPONSE_HEADS != 0;
    let payloads = cfg.flags & FLAG_PAYLOAD_RECORDS != 0;
    let records = heads || payloads;
    if records
        && (tuple.payload_len == 0
            || (heads && is_response && !whole_by_rate(cfg, tuple) && !full_responses(tuple)))
    {
        return match record::<HEAD_BYTES>(ctx, tuple, now) {
            Some(true) => Counter::HeadRecorded,
            Some(false) => Counter::HeadRingFull,
            None => Counter::SkipUnreadable,
        };
    }
    if payloads && tuple.payload_len <= PAYLOAD_RECORD_BYTES {
        return copy_whole(ctx, tuple, is_request, now);
    }
    // Flags 0: the clone leaves through the mirror interface's egress, so its veth peer
    // receives it, where the agent's AF_PACKET socket reads it.
    let ret = match ctx.clone_redirect(cfg.mirror_ifindex, 0) {
        Ok(()) => 0,
        Err(e) => e,
    };
    let result = clone_result(ret);
    if result == CloneResult::Failed {
        debug!(
            ctx,
            "clone_redirect to ifindex {} failed: {}", cfg.mirror_ifindex, ret
        );
        return Counter::CloneErrors;
    }
    let sent = result != CloneResult::Dropped;
    if sent && records && !mark_clone(tuple, now) {
        count(Counter::MarksRingFull);
    }
    // Lets the agent count the requests lost after this point (dropped by the mirror device,
    // or by a full capture ring): it applies the same test to the segments it receives.
    if is_request && note_request(ctx, tuple, sent && records) {
        count(Counter::ClonedRequestStarts);
    }
    match result {
        CloneResult::SentCongested => {
            count(Counter::CloneCongested);
            Counter::Cloned
        }
        CloneResult::Dropped => Counter::CloneDropped,
        _ => Counter::Cloned,
    }
}

/// Copies a segment mirrored whole into a record of the smallest size that holds it.
#[inline(always)]
fn copy_whole(ctx: &TcContext, tuple: &Tuple, is_request: bool, now: u64) -> Counter {
    let recorded = if tuple.payload_len <= HEAD_BYTES {
        record::<HEAD_BYTES>(ctx, tuple, now)
    } else {
        record::<PAYLOAD_RECORD_BYTES>(ctx, tuple, now)
    };
    let Some(recorded) = recorded else {
        return Counter::SkipUnreadable;
    };
    if is_request && note_request(ctx, tuple, recorded) && !recorded {
        count(Counter::PayloadRingFullRequestStarts);
    }
    if recorded {
        Counter::PayloadRecorded
    } else {
        Counter::PayloadRingFull
    }
}

/// Whether a request segment starts a request. When it starts HTTP/2 instead and reaches the
/// agent (`delivered`) in records mode, that connection's responses are mirrored whole from the
/// start, before the agent could ask: heads cannot follow HPACK and interleaved frames.
#[inline(always)]
fn note_request(ctx: &TcContext, t: &Tuple, delivered: bool) -> bool {
    let Ok(head) = ctx.load::<[u8; REQUEST_START_LEN]>(t.payload_at) else {
        return false;
    };
    if delivered && &head == b"PRI " {
        let hash = flow_hash(&t.src, &t.dst, t.sport, t.dport);
        let _ = FULL_RESPONSES.insert(&hash, &1, 0);
    }
    is_request_start(&head)
}

/// Whether a segment's payload starts like a request (`is_request_start`).
#[inline(always)]
fn starts_request(ctx: &TcContext, t: &Tuple) -> bool {
    ctx.load::<[u8; REQUEST_START_LEN]>(t.payload_at)
        .is_ok_and(|head| is_request_start(&head))
}

/// Whether this connection's responses are compared (`whole_responses_ppm`): then they are
/// cloned whole from the first, which the agent could not ask for in time.
#[inline(always)]
fn whole_by_rate(cfg: &MirrorConfig, t: &Tuple) -> bool {
    cfg.whole_responses_ppm != 0
        && flow_hash(&t.src, &t.dst, t.sport, t.dport) % SAMPLE_ALL < cfg.whole_responses_ppm
}

/// Whether the agent asked for this connection's responses whole.
#[inline(always)]
fn full_responses(t: &Tuple) -> bool {
    let hash = flow_hash(&t.src, &t.dst, t.sport, t.dport);
    // SAFETY: a plain read of a u8 value.
    unsafe { FULL_RESPONSES.get(&hash) }.is_some()
}

/// Describes a segment in a `RESPONSE_HEADS` record with its first `N` payload bytes at most:
/// true when recorded, false when the ring was full, None when the packet was too short.
#[inline(always)]
fn record<const N: usize>(ctx: &TcContext, t: &Tuple, now: u64) -> Option<bool> {
    let Some(mut entry) = RESPONSE_HEADS.reserve::<SegmentRecord<N>>(0) else {
        return Some(false);
    };
    let rec = entry.as_mut_ptr();
    let n = if (t.payload_len as u64) < N as u64 {
        t.payload_len as u64
    } else {
        N as u64
    };
    // SAFETY: `rec` points at a reserved, writable record; fields are written one by one (the
    // payload by `load_prefix`, at most `N` bytes).
    unsafe {
        let head: *mut u8 = core::ptr::addr_of_mut!((*rec).head).cast();
        if !load_prefix::<N>(ctx, t.payload_at, head, n) {
            entry.discard(0);
            return None;
        }
        (*rec).src = t.src;
        (*rec).dst = t.dst;
        (*rec).sport = t.sport;
        (*rec).dport = t.dport;
        (*rec).tcp_flags = t.tcp_flags;
        (*rec).ip_version = t.ip_version;
        (*rec).head_len = n as u16;
        (*rec).seq = t.seq;
        (*rec).ack = t.ack;
        (*rec).payload_len = t.payload_len as u32;
        (*rec)._pad = 0;
        (*rec).ts_ns = now;
    }
    entry.submit(BPF_RB_NO_WAKEUP);
    Some(true)
}

/// Copies `n` (at most `N`) payload bytes at `from` to `to`, with two loads of one constant
/// size: `n` lies in [s, 2s) for a power of two s, and the loads copy [0, s) and [n - s, n),
/// which overlap. Variable sizes must be tracked precisely by the verifier back to where they
/// came from; kernels before 6.3 cannot do that and give up pruning instead (6.1 took over ten
/// minutes under qemu). A variable offset into the record needs no such tracking, and one branch
/// per size class keeps the paths few (a load per bit of `n` made 2^8 of them, and every path
/// was verified to the program's end). False when the packet is shorter.
#[inline(always)]
unsafe fn load_prefix<const N: usize>(ctx: &TcContext, from: usize, to: *mut u8, n: u64) -> bool {
    let skb = ctx.as_ptr();
    let load = |off: u64, size: u32| {
        let at = (from as u64 + off) as u32;
        bpf_skb_load_bytes(skb, at, to.add(off as usize).cast(), size) == 0
    };
    if n == N as u64 {
        return load(0, N as u32);
    }
    macro_rules! halves {
        ($size:literal) => {
            if $size < N && n >= $size {
                // n - size < size already. The mask says so to the verifier on the register
                // that is added to the pointer (kernels before 6.8 lose a bound learned by a
                // comparison once the value was spilled); black_box keeps LLVM from dropping it.
                let last = core::hint::black_box(n - $size) & ($size - 1);
                return load(0, $size) && load(last, $size);
            }
        };
    }
    // A record larger than a head only takes what a head cannot hold: without this bound the
    // smaller size classes stay in the program, and kernels before 6.8 follow them with
    // contradictory bounds (they cannot tell such a branch is never taken) and reject it.
    if n > N as u64 || (N > HEAD_BYTES && n <= HEAD_BYTES as u64) {
        return false;
    }
    halves!(2048);
    halves!(1024);
    halves!(512);
    halves!(256);
    halves!(128);
    halves!(64);
    halves!(32);
    halves!(16);
    halves!(8);
    halves!(4);
    halves!(2);
    n == 0 || load(0, 1)
}

/// Writes the `CloneMark` of a clone just made of a packet seen at `now`. False when the ring
/// is full.
#[inline(always)]
fn mark_clone(t: &Tuple, now: u64) -> bool {
    let Some(mut entry) = RESPONSE_HEADS.reserve::<CloneMark>(0) else {
        return false;
    };
    entry.write(CloneMark {
        src: t.src,
        dst: t.dst,
        sport: t.sport,
        dport: t.dport,
        tcp_flags: t.tcp_flags,
        ip_version: t.ip_version,
        head_len: 0,
        seq: t.seq,
        ack: t.ack,
        payload_len: t.payload_len as u32,
        // SAFETY: no preconditions.
        cpu: unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() },
        ts_ns: now,
    });
    entry.submit(BPF_RB_NO_WAKEUP);
    true
}

/// Whether the packet's connection is mirrored at the configured rate.
#[inline(always)]
fn sampled_in(cfg: &MirrorConfig, t: &Tuple) -> bool {
    let sticky = cfg.flags & FLAG_STICKY_SAMPLING != 0;
    if cfg.sample_ppm >= SAMPLE_ALL && !sticky {
        return true;
    }
    let hash = flow_hash(&t.src, &t.dst, t.sport, t.dport);
    let by_rate = hash % SAMPLE_ALL < cfg.sample_ppm;
    if !sticky {
        return by_rate;
    }
    // SAFETY: a plain read of a u8 value; a concurrent update only replaces it.
    if let Some(decided) = unsafe { DECISIONS.get(&hash) } {
        if *decided == 0 {
            return false;
        }
        // The agent must shed load it admitted: this connection is dropped for good, not
        // resumed in the middle later.
        let keep = cfg.keep_admitted_ppm;
        if keep != 0 && keep < SAMPLE_ALL && hash % SAMPLE_ALL >= keep {
            store_decision(hash, 0);
            return false;
        }
        return true;
    }
    store_decision(hash, by_rate as u8);
    by_rate
}

/// Remembers a connection's sampling decision. A full map evicts its least recently used
/// entry; an insert can also fail when the bucket's lock gives up under contention (kernels
/// from 6.15 on), and a lost decision would let the connection's next packets be decided again
/// at another rate, mirroring it in part. So a failure is counted and tried once more.
#[inline(always)]
fn store_decision(hash: u32, decision: u8) {
    for _ in 0..2 {
        if DECISIONS.insert(&hash, &decision, 0).is_ok() {
            return;
        }
        count(Counter::DecisionStoreFailed);
    }
}

/// Reads the addresses and ports of an Ethernet + IPv4/IPv6 + TCP packet with
/// `bpf_skb_load_bytes`, which also works on non-linear (GSO/GRO) skbs.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Tuple, Counter> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Counter::SkipUnreadable)?;
    // `ip_len` counts the IP payload (TCP header and data); 0 when the IP header does not say
    // (BIG TCP super-packets), which is then taken as data.
    let (src, dst, l4, ip_len, ip_version) = match u16::from_be(eth.ether_type) {
        ETH_P_IP => {
            let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).map_err(|_| Counter::SkipUnreadable)?;
            if u16::from_be_bytes(ip.frags) & IPV4_FRAG_MASK != 0 {
                return Err(Counter::SkipIpv4Fragments);
            }
            if ip.proto != IPPROTO_TCP {
                return Err(Counter::SkipNotTcp);
            }
            let ihl = ((ip.vihl & 0x0f) as usize) * 4;
            if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
                return Err(Counter::SkipUnreadable);
            }
            (
                AddrKey::from_v4(ip.src_addr).addr,
                AddrKey::from_v4(ip.dst_addr).addr,
                EthHdr::LEN + ihl,
                (u16::from_be_bytes(ip.tot_len) as usize).saturating_sub(ihl),
                4,
            )
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = ctx.load(EthHdr::LEN).map_err(|_| Counter::SkipUnreadable)?;
            if ip.next_hdr != IPPROTO_TCP {
                return Err(if is_ipv6_ext_header(ip.next_hdr) {
                    Counter::SkipIpv6ExtHeaders
                } else {
                    Counter::SkipNotTcp
                });
            }
            (
                ip.src_addr,
                ip.dst_addr,
                EthHdr::LEN + Ipv6Hdr::LEN,
                u16::from_be_bytes(ip.payload_len) as usize,
                6,
            )
        }
        _ => return Err(Counter::SkipNotIp),
    };
    // Ports, sequence and acknowledgement numbers, data offset and flags.
    let tcp: [u8; 14] = ctx.load(l4).map_err(|_| Counter::SkipUnreadable)?;
    let tcp_len = ((tcp[12] >> 4) as usize) * 4;
    // The IP length, not the skb's: at ingress the skb may still hold Ethernet padding.
    let payload_len = if ip_len != 0 {
        ip_len.saturating_sub(tcp_len)
    } else {
        (ctx.len() as usize).saturating_sub(l4 + tcp_len)
    };
    Ok(Tuple {
        src,
        dst,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        pure_ack: ip_len != 0 && ip_len <= tcp_len && tcp[13] & TCP_FIN_SYN_RST == 0,
        payload_at: l4 + tcp_len,
        payload_len,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        tcp_flags: tcp[13],
        ip_version,
    })
}

/// IPv6 extension headers (RFC 8200 and IANA's list) that may stand before the TCP header.
#[inline(always)]
fn is_ipv6_ext_header(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
