//! Shared test helpers for proclaim. Every test gets its own PostgreSQL
//! schema and its own JetStream stream, so tests run in parallel and leave
//! nothing behind (cleanup also runs when a test panics).
//!
//! The services default to this machine's loopback ports; override with
//! `PROCLAIM_TEST_DATABASE_URL` and `PROCLAIM_TEST_NATS_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod conformance;
pub mod consumer;
pub mod events;
pub mod inbox_conformance;
pub mod mysql;
pub mod nats;
pub mod net;
pub mod pg;
pub mod projector_conformance;
pub mod publisher;
pub mod publisher_conformance;
mod wait;

pub use proclaim_chaos::proxy;
pub use wait::{eventually, eventually_value};

/// Turns on `tracing` output for a test (once per process), filtered by
/// `RUST_LOG` (default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A short unique suffix for names of test resources.
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}
