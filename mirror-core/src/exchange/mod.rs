//! What crosses the stages: connection ids, result codes, response contents and the mirror's
//! outcomes. It owns no state and depends on no stage, so that each stage can depend on it:
//! segment ← exchange ← reassembly ← http ← {replay, compare, record} ← pipeline, agent.

use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;

pub mod content;

use content::Content;

/// Unique id of a connection for the life of the agent.
pub type ConnId = u64;

/// Most headers httparse is given room for in a head, by the parser and when a response's
/// content is read; `HttpConfig::max_headers` is capped to it.
pub const HEADER_SLOTS: usize = 128;

/// The gRPC status name when there is one (`OK`, `INTERNAL`, …), else the HTTP status.
pub fn result_code(status: u16, grpc_status: Option<u32>) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match grpc_status {
        Some(g) => NAMES
            .get(g as usize)
            .map_or_else(|| format!("grpc-{g}"), |n| n.to_string()),
        None => status.to_string(),
    }
}

/// How a mirrored request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MirrorResult {
    Status(u16),
    /// A gRPC answer: the HTTP status and `grpc-status`.
    Grpc(u16, u32),
    Timeout,
    Refused,
    Reset,
    Error,
}

impl MirrorResult {
    /// The code shown in reports: the status, or a pseudo-code for errors.
    pub fn code(&self) -> String {
        match self {
            MirrorResult::Status(s) => s.to_string(),
            MirrorResult::Grpc(s, g) => result_code(*s, Some(*g)),
            MirrorResult::Timeout => "timeout".into(),
            MirrorResult::Refused => "refused".into(),
            MirrorResult::Reset => "reset".into(),
            MirrorResult::Error => "error".into(),
        }
    }
}

/// Where mirror outcomes go: called on the replay worker that saw the answer, so that no
/// channel or task sits between the mirror and the comparison. The comparison implements it
/// (`compare::MirrorOutcomes`); so does any closure, for tests.
pub trait OutcomeSink: Send + Sync {
    fn outcome(&self, o: MirrorOutcome);
}

impl<F: Fn(MirrorOutcome) + Send + Sync> OutcomeSink for F {
    fn outcome(&self, o: MirrorOutcome) {
        self(o)
    }
}

/// One mirrored request's outcome, keyed like the live response (`conn`, `seq`).
#[derive(Clone, Debug)]
pub struct MirrorOutcome {
    pub conn: ConnId,
    pub seq: u64,
    pub method: ByteString,
    pub target: ByteString,
    pub result: MirrorResult,
    /// From sending the request to the response head (or the error); None for an HTTP/1
    /// answer pipelined behind another request, whose start is not known.
    pub duration: Option<Duration>,
    /// The answer's content, read whole, when contents are compared (`ReplayConfig::content`).
    pub content: Option<Arc<Content>>,
}
