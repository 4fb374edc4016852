//! A small JSON document store whose writes and the events about them commit
//! in one transaction: a document store that is also an event outbox.
//!
//! Documents are JSON bodies in collections, keyed by a string id, each with
//! an optimistic `version` (1 when created, one more on every write). They
//! live in a table `<prefix>documents` next to a proclaim outbox — in the
//! outbox's schema on PostgreSQL ([`PgDocStore`]), in the same database file
//! on SQLite ([`SqliteDocStore`]) — and a [transaction](PgDocTransaction)
//! writes documents and enqueues events together: both are stored, or
//! neither. The outbox's relay then delivers the events at least once.
//!
//! A write states what it expects to find ([`Expect`]): anything, no
//! document, or the version it read. When that does not hold the write is a
//! [`DocStoreError::Conflict`] and the transaction is poisoned — `commit`
//! rolls back and returns the conflict — so an event is never published for
//! a change that was not made.
//!
//! When an agent spawns, its `AgentNode` document and the `AgentSpawned`
//! event are written atomically:
//!
//! ```no_run
//! use proclaim_core::Event;
//! use proclaim_docstore::{DocStoreError, Expect, SqliteDocStore};
//! use proclaim_sqlite::SqliteOutbox;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct AgentNode {
//!     name: String,
//!     parent: Option<String>,
//!     status: String,
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let docs = SqliteDocStore::new(SqliteOutbox::connect("sqlite://tavern.db?mode=rwc").await?);
//! docs.migrate().await?;
//!
//! let agent = AgentNode { name: "scout".into(), parent: Some("agent-0".into()), status: "spawned".into() };
//! let spawned = Event::builder("AgentSpawned").subject("agent-1").data(&agent).build()?;
//!
//! let mut tx = docs.begin().await?;
//! tx.put("agents", "agent-1", &agent, Expect::Absent).await?; // create only
//! tx.emit(&spawned).await?;
//! tx.commit().await?; // the AgentNode and AgentSpawned, or neither
//!
//! // Later: change the status only if nobody else changed the agent since.
//! let mut node = docs.get_as::<AgentNode>("agents", "agent-1").await?.ok_or("gone")?;
//! node.body.status = "working".into();
//! let changed = Event::builder("AgentStatusChanged").subject("agent-1").data(&node.body).build()?;
//! match docs
//!     .put_with_events("agents", "agent-1", &node.body, Expect::Version(node.version), &[changed])
//!     .await
//! {
//!     Ok(version) => assert_eq!(version, node.version + 1),
//!     // "agents/agent-1: expected version 1, found 2": neither written.
//!     Err(e @ DocStoreError::Conflict { .. }) => eprintln!("{e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```
//!
//! The same code runs on PostgreSQL with `PgDocStore::new(PgOutbox::new(pool))`.

#[macro_use]
mod macros;

mod document;
mod error;
mod pg;
mod sql;
mod sqlite;

pub use document::{Document, Expect};
pub use error::{DocStoreError, MAX_NAME_LEN};
pub use pg::{PgDocStore, PgDocTransaction};
pub use sqlite::{SqliteDocStore, SqliteDocTransaction};
