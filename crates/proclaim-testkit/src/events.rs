//! The events and outbox records the publisher tests share: the publisher
//! crates' integration tests and the publisher conformance suite
//! ([`crate::publisher_conformance`]) build their events here, so that every
//! broker is tested with the same attributes and the same data bytes.

use proclaim_core::{Event, OutboxRecord};

/// `event` as the relay hands it to a publisher: sequence 1, first attempt,
/// created now.
pub fn record(event: Event) -> OutboxRecord {
    record_at(1, event)
}

/// `event` as the relay hands it to a publisher, at outbox position
/// `sequence`: first attempt, created now.
pub fn record_at(sequence: i64, event: Event) -> OutboxRecord {
    OutboxRecord {
        sequence,
        event,
        attempts: 1,
        created_at: chrono::Utc::now(),
    }
}

/// An event with every optional attribute set: type `DonorSecured`, subject
/// `donor-42`, source `campaign-finance`, dataschema
/// `urn:campaign:donor-secured:v2`, correlation id `pledge-drive-7`, a W3C
/// `traceparent`, the extension `tenant=acme`.
///
/// Its data is JSON deliberately not in serde_json's canonical form (odd
/// spacing, characters outside ASCII): a publisher must carry these exact
/// bytes, never a re-serialization, so tests compare the body, payload or
/// field with `event.data().get().as_bytes()`.
pub fn donor_secured() -> Event {
    Event::builder("DonorSecured")
        .subject("donor-42")
        .source("campaign-finance")
        .dataschema("urn:campaign:donor-secured:v2")
        .correlation_id("pledge-drive-7")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .extension("tenant", "acme")
        .json(r#"{"donor_id": 42, "amount_cents":250000, "note":"ünïcode"}"#)
        .build()
        .unwrap()
}

/// An event of type `DonorSecured` on `subject` (the ordering key: partition
/// key, routing key, …) whose data is `{"n": n}`; read `n` back with
/// [`n_of`]. Its source is the default one.
pub fn keyed(subject: &str, n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

/// The `n` of an event made by [`keyed`]; panics for any other event.
pub fn n_of(event: &Event) -> u64 {
    event.data_as::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// An event of `event_type` on subject `k` with no data (`null`): for a
/// type the destination routes nowhere, since routing keys, topics and
/// paths are commonly made from the type.
pub fn of_type(event_type: &str) -> Event {
    Event::builder(event_type).subject("k").build().unwrap()
}
