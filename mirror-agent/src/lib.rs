//! mirror-agent: kernel-level HTTP traffic mirroring.
//!
//! The pipeline is capture → reassemble → parse → replay → compare; each stage is a module with
//! one owner of its state. Only `capture` needs root and a kernel.

pub mod agent;
pub mod budget;
pub mod capture;
pub mod cli;
pub mod compare;
pub mod cpu_budget;
pub mod dump;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod pods;
pub mod reassembly;
pub mod record;
pub mod replay;
pub mod segment;
#[doc(hidden)]
pub mod testkit;
