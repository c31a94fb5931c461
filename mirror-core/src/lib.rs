//! mirror-core: the stages of HTTP traffic mirroring that need no kernel, no root and no
//! build script. Captured segments (`segment`) are reassembled into streams (`reassembly`)
//! and parsed into requests and responses (`http`); the types that cross the later stages
//! live in `exchange`. The dependency order has no cycle:
//! segment ← exchange ← reassembly ← http. `cargo test -p mirror-core` runs on stable.

pub mod counters;
pub mod exchange;
pub mod http;
pub mod reassembly;
pub mod segment;
#[doc(hidden)]
pub mod testkit;

/// The hasher of the per-request tables (flows, pending pairs, names): seeded per table, and
/// several times cheaper than SipHash, which took a twentieth of the agent's instructions.
pub type FastHash = foldhash::fast::RandomState;
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;
pub type FastSet<K> = std::collections::HashSet<K, FastHash>;
