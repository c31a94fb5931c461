//! Plaintext around a TLS library's calls, in the processes the agent lists in `TLS_PIDS`.
//!
//! An entry uprobe on `SSL_read`/`SSL_write` (and their `_ex` forms) keeps the call's buffer per
//! thread; the return probe, shared by the four, copies the bytes the call moved into the
//! `TLS_DATA` ring, cut into chunks, and advances the connection's offset in that direction.
//! The connection is the `SSL *` of the process. Its socket is the one a socket send or
//! receive inside one of its calls is made on (the `sock_send_length`/`sock_recv_length`
//! tracepoints, or `tcp_sendmsg`/`tcp_recvmsg` by kprobe or fentry), kept for the calls that
//! make none (data the library had already read), and its addresses are those the socket had
//! when it became established (the `sock/inet_sock_set_state` tracepoint, whose format has been
//! stable since 4.16): no kernel structure is read. `SSL_free` ends the connection.
//!
//! None of this changes what the process does: the probes only read its memory.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{fentry, kprobe, map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, ProbeContext, RetProbeContext, TracePointContext},
};
use mirror_common::tls::{
    BigChunk, ChunkHead, SmallChunk, SockTuple, TlsCounter, BIG_CHUNK, KIND_CLOSE, KIND_READ,
    KIND_TOO_LONG, KIND_WRITE, MAX_CHUNKS, MAX_SOCKETS, MAX_TLS_PIDS, MAX_TLS_STREAMS, SMALL_CHUNK,
    TLS_COUNTER_COUNT,
};

/// The processes whose calls are read (by tgid, as the host's pid namespace numbers them).
#[map]
static TLS_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_TLS_PIDS, 0);

/// Sized by the agent when it turns TLS capture on (`TLS_RING_BYTES`); a page otherwise.
#[map]
static TLS_DATA: RingBuf = RingBuf::with_byte_size(4096, 0);

#[map]
static TLS_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TLS_COUNTER_COUNT, 0);

/// A call in progress, by thread (`pid_tgid`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SslCall {
    ssl: u64,
    buf: u64,
    /// `_ex` forms: where the library writes the byte count; 0 for the plain forms.
    len_out: u64,
    /// The `struct sock *` of a TCP send or receive made inside the call, or 0.
    sk: u64,
    kind: u8,
    _pad: [u8; 7],
}

#[map]
static SSL_CALLS: HashMap<u64, SslCall> = HashMap::with_max_entries(MAX_TLS_PIDS * 4, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct StreamKey {
    ssl: u64,
    tgid: u32,
    _pad: u32,
}

/// A connection: its socket and how far each direction has gone.
#[repr(C)]
#[derive(Clone, Copy)]
struct Stream {
    read_off: u64,
    write_off: u64,
    /// `struct sock *`, or 0 before one is seen.
    sk: u64,
}

/// Established TCP sockets' addresses, by `struct sock *`.
#[map]
static SOCKETS: LruHashMap<u64, SockTuple> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static SSL_STREAMS: LruHashMap<StreamKey, Stream> =
    LruHashMap::with_max_entries(MAX_TLS_STREAMS, 0);

/// `bpf_ringbuf_submit` flag: never a wake-up, as for the TC program's records (the agent
/// reads this ring on the same timer).
const BPF_RB_NO_WAKEUP: u64 = 1;

#[inline(always)]
fn count(c: TlsCounter, n: u64) {
    if let Some(slot) = TLS_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot; the probes run with preemption off.
        unsafe { *slot += n };
    }
}

#[uprobe]
pub fn ssl_read_entry(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_READ, false)
}

#[uprobe]
pub fn ssl_read_ex_entry(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_READ, true)
}

#[uprobe]
pub fn ssl_write_entry(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_WRITE, false)
}

#[uprobe]
pub fn ssl_write_ex_entry(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_WRITE, true)
}

/// Keeps the call's arguments for its return: `(SSL *, buf, num[, size_t *out])`.
#[inline(always)]
fn enter(ctx: &ProbeContext, kind: u8, ex: bool) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a plain read of a u8 value.
    if unsafe { TLS_PIDS.get(&((id >> 32) as u32)) }.is_none() {
        return 0;
    }
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let len_out = if ex { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 };
    let call = SslCall {
        ssl,
        buf,
        len_out,
        sk: 0,
        kind,
        _pad: [0; 7],
    };
    let _ = SSL_CALLS.insert(&id, &call, 0);
    0
}

/// `tcp_sendmsg(struct sock *sk, ...)` and `tcp_recvmsg(struct sock *sk, ...)`: the socket of
/// an SSL call in progress on this thread. A kprobe where the kernel has them; the programs
/// below do the same from the `sock` tracepoints (6.5+) or from fentry (BTF trampolines).
#[kprobe]
pub fn ssl_tcp_sock(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        note_socket(sk);
    }
    0
}

#[fentry(function = "tcp_sendmsg")]
pub fn ssl_tcp_send(ctx: FEntryContext) -> u32 {
    // tcp_sendmsg's first argument is its `struct sock *`.
    note_socket(ctx.arg::<u64>(0));
    0
}

#[fentry(function = "tcp_recvmsg")]
pub fn ssl_tcp_recv(ctx: FEntryContext) -> u32 {
    // tcp_recvmsg's first argument is its `struct sock *`.
    note_socket(ctx.arg::<u64>(0));
    0
}

/// `sock/sock_send_length` and `sock/sock_recv_length`: fired in the caller's context after
/// each socket send or receive, with its `struct sock *`. Offsets from the tracepoints' format.
#[tracepoint]
pub fn ssl_sock_io(ctx: TracePointContext) -> u32 {
    const IPPROTO_TCP: u16 = 6;
    // SAFETY: reads within the tracepoint's record, at its format's offsets.
    if let (Ok(sk), Ok(IPPROTO_TCP)) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<u16>(18)) } {
        note_socket(sk);
    }
    0
}

#[inline(always)]
fn note_socket(sk: u64) {
    let id = bpf_get_current_pid_tgid();
    if let Some(call) = SSL_CALLS.get_ptr_mut(&id) {
        // SAFETY: the entry of this thread, written only by this thread.
        unsafe { (*call).sk = sk };
    }
}

/// `sock/inet_sock_set_state`: a TCP socket's addresses when it becomes established, dropped
/// when it closes. Offsets from the tracepoint's format.
#[tracepoint]
pub fn ssl_sock_state(ctx: TracePointContext) -> u32 {
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_CLOSE: i32 = 7;
    const AF_INET: u16 = 2;
    const IPPROTO_TCP: u16 = 6;
    // SAFETY: reads within the tracepoint's record, at its format's offsets.
    unsafe {
        let (Ok(sk), Ok(state), Ok(protocol)) = (
            ctx.read_at::<u64>(8),
            ctx.read_at::<i32>(20),
            ctx.read_at::<u16>(30),
        ) else {
            return 0;
        };
        if protocol != IPPROTO_TCP {
            return 0;
        }
        if state == TCP_CLOSE {
            let _ = SOCKETS.remove(&sk);
            return 0;
        }
        if state != TCP_ESTABLISHED {
            return 0;
        }
        let (Ok(sport), Ok(dport), Ok(family)) = (
            ctx.read_at::<u16>(24),
            ctx.read_at::<u16>(26),
            ctx.read_at::<u16>(28),
        ) else {
            return 0;
        };
        let mut t = SockTuple {
            local_port: sport,
            peer_port: dport,
            ip_version: 6,
            ..SockTuple::default()
        };
        if family == AF_INET {
            let (Ok(s4), Ok(d4)) = (ctx.read_at::<[u8; 4]>(32), ctx.read_at::<[u8; 4]>(36)) else {
                return 0;
            };
            t.ip_version = 4;
            t.local = v4_mapped(s4);
            t.peer = v4_mapped(d4);
        } else {
            let (Ok(s6), Ok(d6)) = (ctx.read_at::<[u8; 16]>(40), ctx.read_at::<[u8; 16]>(56))
            else {
                return 0;
            };
            t.local = s6;
            t.peer = d6;
        }
        let _ = SOCKETS.insert(&sk, &t, 0);
    }
    0
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a copy of this thread's entry.
    let Some(call) = (unsafe { SSL_CALLS.get(&id) }).copied() else {
        return 0;
    };
    let _ = SSL_CALLS.remove(&id);
    let ret = ctx.ret::<i64>() as i32;
    let n = if call.len_out != 0 {
        if ret != 1 {
            return 0;
        }
        // SAFETY: a read of the process's memory that can fail, and is checked.
        match unsafe { bpf_probe_read_user(call.len_out as *const u64) } {
            Ok(n) => n,
            Err(_) => {
                count(TlsCounter::ReadFailed, 1);
                return 0;
            }
        }
    } else if ret > 0 {
        ret as u64
    } else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    count(TlsCounter::Calls, 1);
    let tgid = (id >> 32) as u32;
    let key = StreamKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    let Some(stream) = stream_of(&key) else {
        return 0;
    };
    // SAFETY: the connection's entry; its calls are made one at a time (OpenSSL does not allow
    // concurrent calls on one SSL).
    let (sk, offset) = unsafe {
        if call.sk != 0 {
            (*stream).sk = call.sk;
        }
        let at = if call.kind == KIND_READ {
            &mut (*stream).read_off
        } else {
            &mut (*stream).write_off
        };
        let offset = *at;
        *at += n;
        ((*stream).sk, offset)
    };
    if sk == 0 {
        count(TlsCounter::NoSocket, 1);
        return 0;
    }
    // SAFETY: a copy of the socket's addresses.
    let Some(conn) = (unsafe { SOCKETS.get(&sk) }).copied() else {
        count(TlsCounter::UnknownSocket, 1);
        return 0;
    };
    let head = ChunkHead {
        ssl: call.ssl,
        offset,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn,
        tgid,
        len: 0,
        kind: call.kind,
        _pad: [0; 7],
    };
    emit(head, call.buf, n);
    0
}

/// The connection's entry, made at its first call.
#[inline(always)]
fn stream_of(key: &StreamKey) -> Option<*mut Stream> {
    if let Some(s) = SSL_STREAMS.get_ptr_mut(key) {
        return Some(s);
    }
    let fresh = Stream {
        read_off: 0,
        write_off: 0,
        sk: 0,
    };
    SSL_STREAMS.insert(key, &fresh, 0).ok()?;
    SSL_STREAMS.get_ptr_mut(key)
}

#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: a plain read of a u8 value.
    if unsafe { TLS_PIDS.get(&tgid) }.is_none() {
        return 0;
    }
    let Some(ssl) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let key = StreamKey { ssl, tgid, _pad: 0 };
    // SAFETY: a copy of the entry.
    let Some(stream) = (unsafe { SSL_STREAMS.get(&key) }).copied() else {
        return 0;
    };
    let _ = SSL_STREAMS.remove(&key);
    // SAFETY: a copy of the socket's addresses.
    if let Some(conn) = unsafe { SOCKETS.get(&stream.sk) }.copied() {
        let head = ChunkHead {
            ssl,
            offset: stream.read_off,
            // SAFETY: no preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            conn,
            tgid,
            len: 0,
            kind: KIND_CLOSE,
            _pad: [0; 7],
        };
        small_record(head, 0, 0);
    }
    0
}

/// Copies `n` bytes at `buf` into records: full big chunks, then the rest in a small or a big
/// one. Constant-size copies in the loop and one bounded variable copy at the end keep the
/// verifier's work small on every kernel.
#[inline(always)]
fn emit(mut head: ChunkHead, buf: u64, n: u64) {
    let base = head.offset;
    let mut done = 0u64;
    for _ in 0..MAX_CHUNKS {
        if n - done <= BIG_CHUNK as u64 {
            break;
        }
        head.offset = base + done;
        // A record lost here leaves a gap in the offsets: the agent ends the connection there.
        if !big_record(head, buf + done, BIG_CHUNK as u64) {
            return;
        }
        done += BIG_CHUNK as u64;
    }
    head.offset = base + done;
    let rest = n - done;
    if rest > BIG_CHUNK as u64 {
        count(TlsCounter::TooLong, 1);
        head.kind = KIND_TOO_LONG;
        small_record(head, 0, 0);
        return;
    }
    if rest <= SMALL_CHUNK as u64 {
        small_record(head, buf + done, rest);
    } else {
        big_record(head, buf + done, rest);
    }
}

/// A record of at most `SMALL_CHUNK` bytes (none for a close). False when it could not be made.
#[inline(always)]
fn small_record(mut head: ChunkHead, from: u64, len: u64) -> bool {
    if len > SMALL_CHUNK as u64 {
        return false;
    }
    let Some(mut entry) = TLS_DATA.reserve::<SmallChunk>(0) else {
        count(TlsCounter::RingFull, 1);
        return false;
    };
    let rec = entry.as_mut_ptr();
    head.len = len as u32;
    // SAFETY: `rec` is a reserved record; at most `SMALL_CHUNK` bytes are written into its data.
    unsafe {
        (*rec).head = head;
        if len > 0 {
            let to = core::ptr::addr_of_mut!((*rec).data).cast();
            let size = core::hint::black_box(len as u32) & (2 * SMALL_CHUNK as u32 - 1);
            if size > SMALL_CHUNK as u32
                || generated::bpf_probe_read_user(to, size, from as *const _) != 0
            {
                entry.discard(0);
                count(TlsCounter::ReadFailed, 1);
                return false;
            }
        }
    }
    entry.submit(BPF_RB_NO_WAKEUP);
    count(TlsCounter::Bytes, len);
    true
}

/// A record of at most `BIG_CHUNK` bytes.
#[inline(always)]
fn big_record(mut head: ChunkHead, from: u64, len: u64) -> bool {
    if len == 0 || len > BIG_CHUNK as u64 {
        return false;
    }
    let Some(mut entry) = TLS_DATA.reserve::<BigChunk>(0) else {
        count(TlsCounter::RingFull, 1);
        return false;
    };
    let rec = entry.as_mut_ptr();
    head.len = len as u32;
    // SAFETY: `rec` is a reserved record; at most `BIG_CHUNK` bytes are written into its data.
    unsafe {
        (*rec).head = head;
        let to = core::ptr::addr_of_mut!((*rec).data).cast();
        let size = core::hint::black_box(len as u32) & (2 * BIG_CHUNK as u32 - 1);
        if size > BIG_CHUNK as u32
            || generated::bpf_probe_read_user(to, size, from as *const _) != 0
        {
            entry.discard(0);
            count(TlsCounter::ReadFailed, 1);
            return false;
        }
    }
    entry.submit(BPF_RB_NO_WAKEUP);
    count(TlsCounter::Bytes, len);
    true
}
