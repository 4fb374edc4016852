//! CloudEvents binary content mode, independent of the broker: the event's
//! attributes as (name, value) pairs next to the JSON data as the message
//! body, and back.
//!
//! Each protocol binding names the attributes with its own prefix: `ce-` for
//! HTTP and NATS headers, `ce_` for Kafka headers, `cloudEvents:` for AMQP
//! application properties, none for MQTT 5 user properties. The content type
//! travels in the protocol's own content-type field, so it is not among the
//! pairs.
//!
//! ```
//! use proclaim_core::Event;
//! use proclaim_core::binary::{attributes, event_from_attributes};
//!
//! let event = Event::builder("DonorSecured")
//!     .subject("donor-42")
//!     .correlation_id("pledge-drive-7")
//!     .data(&serde_json::json!({ "donor_id": 42 }))
//!     .build()?;
//! let pairs = attributes(&event, "ce-");
//! assert!(pairs.contains(&("ce-subject".to_owned(), "donor-42".to_owned())));
//! assert!(pairs.contains(&("ce-correlationid".to_owned(), "pledge-drive-7".to_owned())));
//!
//! let back = event_from_attributes(
//!     pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
//!     "ce-",
//!     Some(event.datacontenttype()),
//!     event.data().get().as_bytes(),
//! )?;
//! assert_eq!(back, event);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Event, EventError, EventParts, JSON_CONTENT_TYPE, SPEC_VERSION};

/// Why a message in binary content mode is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BinaryDecodeError {
    /// A required attribute is absent.
    #[error("the message lacks the {0} attribute")]
    Missing(String),
    /// An attribute's value cannot be parsed (an id that is not a UUID, a
    /// time that is not RFC 3339, an unsupported spec version).
    #[error("the message's {attribute} attribute {value:?} is invalid: {reason}")]
    Invalid {
        /// The attribute as the message names it, e.g. `ce-time`.
        attribute: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The body is not UTF-8, so not JSON.
    #[error("the message body is not UTF-8 JSON: {0}")]
    NotUtf8(String),
    /// The attributes or the body do not form a valid event (e.g. the body is
    /// not valid JSON, or an attribute fails the envelope's checks).
    #[error("the message is not a valid event: {0}")]
    Event(#[from] EventError),
}

/// The attributes of `event` in binary content mode, each name with
/// `prefix`: `specversion`, `id`, `type`, `source`, `subject`, `time`,
/// `dataschema` (when set) and every extension. The content type is not
/// included ([`Event::datacontenttype`] goes in the protocol's own field).
pub fn attributes(event: &Event, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(7 + event.metadata().len());
    let mut put = |name: &str, value: String| out.push((format!("{prefix}{name}"), value));
    put("specversion", SPEC_VERSION.to_owned());
    put("id", event.id().to_string());
    put("type", event.event_type().to_owned());
    put("source", event.source().to_owned());
    put("subject", event.subject().to_owned());
    put("time", event.time_rfc3339());
    if let Some(schema) = event.dataschema() {
        put("dataschema", schema.to_owned());
    }
    for (name, value) in event.metadata() {
        put(name, value.clone());
    }
    out
}

/// Reads an event back from binary content mode: `pairs` are the message's
/// attributes (names matched case-insensitively; the first of repeated names
/// wins; names without `prefix` are ignored), `content_type` the protocol's
/// content type (JSON when absent) and `body` the data.
pub fn event_from_attributes<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    prefix: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Event, BinaryDecodeError> {
    let prefix_lower = prefix.to_ascii_lowercase();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in pairs {
        let name = name.to_ascii_lowercase();
        if let Some(attribute) = name.strip_prefix(&prefix_lower) {
            values
                .entry(attribute.to_owned())
                .or_insert_with(|| value.to_owned());
        }
    }
    let named = |attribute: &str| format!("{prefix}{attribute}");
    let mut require = |attribute: &str| {
        values
            .remove(attribute)
            .ok_or_else(|| BinaryDecodeError::Missing(named(attribute)))
    };
    let spec = require("specversion")?;
    let id = require("id")?;
    let event_type = require("type")?;
    let source = require("source")?;
    let subject = require("subject")?;
    let time = require("time")?;
    let invalid = |attribute: &str, value: String, reason: String| BinaryDecodeError::Invalid {
        attribute: named(attribute),
        value,
        reason,
    };
    if spec != SPEC_VERSION {
        return Err(invalid(
            "specversion",
            spec,
            format!("only CloudEvents {SPEC_VERSION} is supported"),
        ));
    }
    let id = Uuid::parse_str(&id).map_err(|e| invalid("id", id.clone(), e.to_string()))?;
    let time = DateTime::parse_from_rfc3339(&time)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| invalid("time", time.clone(), e.to_string()))?;
    let dataschema = values.remove("dataschema");
    // Binary mode carries the content type outside the attributes; a
    // prefixed copy, if any, is not an extension.
    values.remove("datacontenttype");
    let data = std::str::from_utf8(body)
        .map_err(|e| BinaryDecodeError::NotUtf8(e.to_string()))?
        .to_owned();
    Ok(Event::from_parts(EventParts {
        id,
        event_type,
        source,
        subject,
        time,
        datacontenttype: content_type.unwrap_or(JSON_CONTENT_TYPE).to_owned(),
        dataschema,
        data,
        metadata: values,
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn donor() -> Event {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .datacontenttype("application/cloudevents+json; charset=utf-8")
            .correlation_id("pledge-drive-7")
            .json(r#"{"donor_id":42,  "amount_cents":250000}"#)
            .build()
            .unwrap()
    }

    fn back(
        pairs: &[(String, String)],
        prefix: &str,
        event: &Event,
    ) -> Result<Event, BinaryDecodeError> {
        event_from_attributes(
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            prefix,
            Some(event.datacontenttype()),
            event.data().get().as_bytes(),
        )
    }

    #[test]
    fn round_trips_with_every_binding_prefix() {
        let event = donor();
        for prefix in ["ce-", "ce_", "cloudEvents:", ""] {
            let pairs = attributes(&event, prefix);
            assert_eq!(back(&pairs, prefix, &event), Ok(event.clone()), "{prefix}");
        }
    }

    #[test]
    fn names_are_matched_case_insensitively_and_foreign_ones_ignored() {
        let event = donor();
        let mut pairs: Vec<(String, String)> = attributes(&event, "ce-")
            .into_iter()
            .map(|(n, v)| (n.to_ascii_uppercase(), v))
            .collect();
        pairs.push(("x-other".into(), "ignored".into()));
        pairs.push(("ce-datacontenttype".into(), "text/plain".into()));
        assert_eq!(back(&pairs, "ce-", &event), Ok(event));
    }

    #[test]
    fn a_missing_or_invalid_attribute_is_named() {
        let event = donor();
        let without_id: Vec<_> = attributes(&event, "ce_")
            .into_iter()
            .filter(|(n, _)| n != "ce_id")
            .collect();
        assert_eq!(
            back(&without_id, "ce_", &event),
            Err(BinaryDecodeError::Missing("ce_id".into()))
        );
        let bad_time: Vec<_> = attributes(&event, "ce_")
            .into_iter()
            .map(|(n, v)| {
                if n == "ce_time" {
                    (n, "yesterday".into())
                } else {
                    (n, v)
                }
            })
            .collect();
        let err = back(&bad_time, "ce_", &event).unwrap_err();
        assert!(err.to_string().contains("ce_time"), "{err}");
        let spec: Vec<_> = attributes(&event, "")
            .into_iter()
            .map(|(n, v)| {
                if n == "specversion" {
                    (n, "0.3".into())
                } else {
                    (n, v)
                }
            })
            .collect();
        assert!(matches!(
            back(&spec, "", &event),
            Err(BinaryDecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn a_body_that_is_not_json_is_an_error() {
        let event = donor();
        let pairs = attributes(&event, "ce-");
        let decoded = event_from_attributes(
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            "ce-",
            None,
            &[0xff, 0xfe],
        );
        assert!(matches!(decoded, Err(BinaryDecodeError::NotUtf8(_))));
        let decoded = event_from_attributes(
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            "ce-",
            None,
            b"{not json",
        );
        assert!(matches!(decoded, Err(BinaryDecodeError::Event(_))));
    }
}
