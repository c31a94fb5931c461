//! mirror-agent: kernel-level HTTP traffic mirroring.
//!
//! The pipeline is capture → reassemble → parse → replay → compare; each stage is a module with
//! one owner of its state. Reassembly and parsing live in `mirror-core` (no kernel, no root),
//! re-exported here under their paths; this crate adds the capture (the only stage that needs
//! root and a kernel), replay, comparison, recording, and the agent that wires them in order.

pub mod agent;
pub mod capture;
#[cfg(feature = "cli")]
pub mod cli;
pub mod compare;
pub mod cpu_budget;
pub mod dump;
pub mod fleet;
pub mod memory_budget;
pub mod metrics;
pub mod mirrorings;
pub mod pipeline;
pub mod pods;
pub mod record;
pub mod redact;
pub mod replay;
pub mod shedding;

// The pure stages live in mirror-core; they keep their paths here.
pub use mirror_core::{exchange, http, reassembly, segment, testkit};
pub(crate) use mirror_core::{FastHash, FastMap, FastSet};
