//! mirror-agent: kernel-level HTTP traffic mirroring.
//!
//! The pipeline is capture → reassemble → parse → replay → compare; each stage is a module with
//! one owner of its state. Only `capture` needs root and a kernel.

pub mod agent;
pub mod capture;
#[cfg(feature = "cli")]
pub mod cli;
pub mod compare;
pub mod cpu_budget;
pub mod dump;
pub mod memory_budget;
pub mod metrics;
pub mod pipeline;
pub mod pods;
pub mod record;
pub mod replay;

// The pure stages live in mirror-core; they keep their paths here.
pub use mirror_core::{exchange, http, reassembly, segment, testkit};
pub(crate) use mirror_core::{FastHash, FastMap, FastSet};
