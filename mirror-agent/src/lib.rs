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
pub mod exchange;
pub mod http;
pub mod memory_budget;
pub mod metrics;
pub mod pipeline;
pub mod pods;
pub mod reassembly;
pub mod record;
pub mod replay;
pub mod segment;
#[doc(hidden)]
pub mod testkit;

/// The hasher of the per-request tables (flows, pending pairs, names): seeded per table, and
/// several times cheaper than SipHash, which took a twentieth of the agent's instructions.
pub(crate) type FastHash = foldhash::fast::RandomState;
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, FastHash>;
