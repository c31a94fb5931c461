//! TC classifier that clones the live service's TCP segments onto the mirror interface.
//!
//! The live packet is never changed, delayed or dropped: every path returns `TC_ACT_OK`.
//! Each packet is counted once in `Seen` and once in exactly one outcome (cloned, clone error,
//! or a skip reason), so userspace can account for every packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use mirror_common::{
    flow_hash, is_request_start, AddrKey, Counter, MirrorConfig, COUNTER_COUNT, FLAG_ADDR_FILTER,
    FLAG_ENABLED, FLAG_RESPONSES, FLAG_STICKY_SAMPLING, MAX_DECISIONS, MAX_LIVE_ADDRS,
    MAX_LIVE_PORTS, REQUEST_START_LEN, SAMPLE_ALL,
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

/// With `FLAG_STICKY_SAMPLING`: per connection (keyed by its symmetric flow hash), 1 if it is
/// mirrored. Decided at the connection's first packet against the rate of that moment, so that
/// when the agent lowers the rate to stay in its CPU budget, whole new connections are shed
/// before a single clone is made, and a connection being mirrored stays mirrored. Hash
/// collisions share a decision, which is harmless.
#[map]
static DECISIONS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(MAX_DECISIONS, 0);

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
    if !sampled_in(cfg, &tuple) {
        return Counter::SkipSampledOut;
    }
    if tuple.pure_ack {
        return Counter::SkipNoPayload;
    }
    // Flags 0: the clone leaves through the mirror interface's egress, so its veth peer
    // receives it, where the agent's AF_PACKET socket reads it.
    match ctx.clone_redirect(cfg.mirror_ifindex, 0) {
        Ok(()) => {
            // Lets the agent count the requests that a full capture ring (or anything else on
            // the way) lost: it applies the same test to the segments it receives.
            if is_request {
                if let Ok(head) = ctx.load::<[u8; REQUEST_START_LEN]>(tuple.payload_at) {
                    if is_request_start(&head) {
                        count(Counter::ClonedRequestStarts);
                    }
                }
            }
            Counter::Cloned
        }
        Err(err) => {
            debug!(
                ctx,
                "clone_redirect to ifindex {} failed: {}", cfg.mirror_ifindex, err
            );
            Counter::CloneErrors
        }
    }
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
            let _ = DECISIONS.insert(&hash, &0, 0);
            return false;
        }
        return true;
    }
    // A full map evicts its least recently used entry; a failed insert decides this packet only.
    let _ = DECISIONS.insert(&hash, &(by_rate as u8), 0);
    by_rate
}

/// Reads the addresses and ports of an Ethernet + IPv4/IPv6 + TCP packet with
/// `bpf_skb_load_bytes`, which also works on non-linear (GSO/GRO) skbs.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Tuple, Counter> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Counter::SkipUnreadable)?;
    // `ip_len` counts the IP payload (TCP header and data); 0 when the IP header does not say
    // (BIG TCP super-packets), which is then taken as data.
    let (src, dst, l4, ip_len) = match u16::from_be(eth.ether_type) {
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
            )
        }
        _ => return Err(Counter::SkipNotIp),
    };
    // Ports, sequence and acknowledgement numbers, data offset and flags.
    let tcp: [u8; 14] = ctx.load(l4).map_err(|_| Counter::SkipUnreadable)?;
    let tcp_len = ((tcp[12] >> 4) as usize) * 4;
    Ok(Tuple {
        src,
        dst,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        pure_ack: ip_len != 0 && ip_len <= tcp_len && tcp[13] & TCP_FIN_SYN_RST == 0,
        payload_at: l4 + tcp_len,
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
