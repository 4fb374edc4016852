//! # proclaim — the transactional outbox for Rust
//!
//! A service that changes its state and must tell others about it faces the
//! dual-write problem: the database commit succeeds, the broker publish
//! fails, and the rest of the system never hears the truth. proclaim writes
//! the state change and the event in **one local transaction** (the outbox),
//! and a [`Relay`] delivers every committed event to the broker **at least
//! once**, in per-subject order, with retries, backoff and dead letters.
//!
//! ```no_run
//! use proclaim::{Event, Relay, RelayConfig};
//! use proclaim::nats::{NatsConfig, NatsPublisher};
//! use proclaim::postgres::PgOutbox;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
//! let outbox = PgOutbox::new(pool.clone());
//! outbox.migrate().await?;
//!
//! // In your service: the state change and the event commit together.
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO campaign_donors (id, name) VALUES (42, 'Ada')")
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Event::builder("DonorSecured")
//!     .subject("donor-42")
//!     .data(&serde_json::json!({ "donor_id": 42, "amount_cents": 250_000 }))
//!     .build()?;
//! outbox.enqueue(&mut tx, &event).await?;
//! tx.commit().await?;
//!
//! // In the relay (or run `proclaim relay`): deliver every committed event.
//! let publisher = NatsPublisher::connect(NatsConfig::default().with_create_stream(true)).await?;
//! let relay = Relay::new(outbox, publisher, RelayConfig::default())?.spawn();
//! // … on shutdown:
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Features: `postgres` (the PostgreSQL store), `sqlite` (the SQLite store),
//! `mysql` (the MariaDB / MySQL store), `docstore` (DocStore, seed 004);
//! the publishers `nats` (NATS JetStream), `rabbitmq`, `redis` (Redis
//! Streams), `mqtt` (MQTT 5), `webhook` (HTTP) and `kafka`, or `all-brokers`;
//! `postgres` and `nats` are on by default. With any publisher,
//! [`destination`] picks one at run time from a URL or a config section. Without any broker,
//! [`local::InProcessBus`] delivers to subscribers in the same process and
//! [`local::JsonLinesPublisher`] writes events as JSON lines.

pub use proclaim_core::*;

/// The PostgreSQL store (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use proclaim_postgres::*;
}

/// The SQLite store, the embedded default (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use proclaim_sqlite::*;
}

/// The MariaDB / MySQL store (feature `mysql`).
#[cfg(feature = "mysql")]
pub mod mysql {
    pub use proclaim_mysql::*;
}

/// DocStore: JSON documents whose writes and events commit together
/// (feature `docstore`).
#[cfg(feature = "docstore")]
pub mod docstore {
    pub use proclaim_docstore::*;
}

/// The NATS JetStream publisher (feature `nats`).
#[cfg(feature = "nats")]
pub mod nats {
    pub use proclaim_nats::*;
}

/// The RabbitMQ publisher (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use proclaim_rabbitmq::*;
}

/// The Redis Streams publisher (feature `redis`).
#[cfg(feature = "redis")]
pub mod redis {
    pub use proclaim_redis::*;
}

/// The MQTT 5 publisher (feature `mqtt`).
#[cfg(feature = "mqtt")]
pub mod mqtt {
    pub use proclaim_mqtt::*;
}

/// The HTTP webhook publisher (feature `webhook`).
#[cfg(feature = "webhook")]
pub mod webhook {
    pub use proclaim_webhook::*;
}

/// The Kafka publisher (feature `kafka`).
#[cfg(feature = "kafka")]
pub mod kafka {
    pub use proclaim_kafka::*;
}

#[cfg(any(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis",
    feature = "mqtt",
    feature = "webhook"
))]
pub mod destination;
