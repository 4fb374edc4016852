//! Proving proclaim's guarantees under faults.
//!
//! - [`proxy`]: a TCP proxy between a relay and PostgreSQL or NATS that
//!   delays, partitions (black hole), drops, resets and refuses connections.
//! - [`history`]: the checkers. One compares what writers committed and
//!   rolled back with what consumers received, and counts lost, phantom,
//!   duplicated and out-of-order events; the other compares what was
//!   committed with the effects a consumer applied, and counts effects
//!   duplicated, missing, phantom and parked.
//! - [`scenario`]: the run behind `proclaim chaos`: writers commit events on
//!   many keys (some roll back, some rows are malformed), three `proclaim
//!   relay` processes deliver them to JetStream while [`faults`] are injected
//!   (network faults on each relay's links, `SIGKILL` and `SIGSTOP` of relay
//!   processes), one consumer records the stream as the broker delivers it,
//!   and an *effect consumer* — proclaim's consumer runtime on a JetStream
//!   consumer group, with a PostgreSQL inbox — applies each event's effect
//!   while its own links are faulted and it is killed abruptly, sometimes
//!   between a commit and its ack. Then the checkers judge: every committed
//!   event delivered, in order per key, and its effect applied exactly once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), proclaim_chaos::ChaosError> {
//! use std::time::Duration;
//! use proclaim_chaos::scenario::{ChaosConfig, run};
//!
//! let mut config = ChaosConfig::new(
//!     "postgres://postgres@127.0.0.1:5432/test".into(),
//!     "nats://127.0.0.1:4222".into(),
//!     "target/debug/proclaim".into(),
//! );
//! config.duration = Duration::from_secs(60);
//! let report = run(config).await?;
//! assert!(report.passed, "{:?}", report.problems);
//! assert_eq!(report.effects.effects_duplicated, 0);
//! # Ok(())
//! # }
//! ```

mod consumer;
mod effects;
pub mod faults;
pub mod history;
pub mod proxy;
mod relays;
pub mod scenario;
mod writers;

/// Why a chaos run could not be carried out (as opposed to a run that found
/// a violation, which is a report with `passed: false`).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// A setting that cannot work.
    #[error("invalid chaos configuration: {0}")]
    Config(String),
    /// PostgreSQL could not be reached or refused a statement.
    #[error("database: {0}")]
    Database(String),
    /// NATS could not be reached or refused a request.
    #[error("broker: {0}")]
    Broker(String),
    /// A relay process or a proxy could not be started.
    #[error("relay: {0}")]
    Relay(String),
}
