//! [`decode_entry`]: reads an [`Event`] back from a stream entry.

use proclaim_core::binary::{BinaryDecodeError, event_from_attributes};
use proclaim_core::{Event, EventError};
use redis::Value;
use redis::streams::StreamId;

use crate::publisher::{CE_PREFIX, CONTENT_TYPE_FIELD};

/// The field holding the event's data.
pub const DATA_FIELD: &str = "data";

/// An entry a [`RedisPublisher`](crate::RedisPublisher) appended, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEntry {
    /// The entry's id in its stream (`<milliseconds>-<sequence>`).
    pub entry_id: String,
    /// The id to deduplicate by: the `ce-id` field, the event id. Redis
    /// does not deduplicate, so a redelivered event appears as a second
    /// entry with the same dedup id.
    pub dedup_id: String,
    /// The event.
    pub event: Event,
}

/// Why a stream entry is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required field is absent.
    #[error("stream entry {entry_id} lacks the {field} field")]
    MissingField {
        /// The entry's id.
        entry_id: String,
        /// The missing field, e.g. `ce-id` or `data`.
        field: String,
    },
    /// A field's value is not text (or, for `data`, not UTF-8 JSON), or
    /// cannot be parsed (an id that is not a UUID, a time that is not
    /// RFC 3339, an unsupported spec version).
    #[error("stream entry {entry_id} has an invalid {field} field: {reason}")]
    InvalidField {
        /// The entry's id.
        entry_id: String,
        /// The field, e.g. `ce-time`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The fields do not form a valid event (e.g. the data is not valid
    /// JSON, or an attribute fails the envelope's checks).
    #[error("stream entry {entry_id} is not a valid event: {source}")]
    Event {
        /// The entry's id.
        entry_id: String,
        /// Why the event is invalid.
        #[source]
        source: EventError,
    },
}

/// Reads the [`Event`] a [`RedisPublisher`](crate::RedisPublisher) appended,
/// from an entry as `XRANGE`, `XREAD` or `XREADGROUP` return it (parsed by
/// the `redis` crate into a [`StreamId`]): the CloudEvents attributes from
/// the `ce-*` fields, extensions from the other `ce-*` fields, the content
/// type from `content-type` (JSON when absent) and the data from `data`.
/// Field names are matched case-insensitively; fields without the `ce-`
/// prefix other than these are ignored.
pub fn decode_entry(entry: &StreamId) -> Result<DecodedEntry, DecodeError> {
    let mut fields = Vec::with_capacity(entry.map.len());
    for (name, value) in &entry.map {
        let bytes = value_bytes(value).ok_or_else(|| DecodeError::InvalidField {
            entry_id: entry.id.clone(),
            field: name.clone(),
            reason: format!("expected a string, got {}", value_kind(value)),
        })?;
        fields.push((name.as_str(), bytes));
    }
    decode_fields(&entry.id, fields)
}

/// Like [`decode_entry`], from an entry's id and its (field, value) pairs as
/// raw bytes, for entries read by other means.
pub fn decode_fields<'a>(
    entry_id: &str,
    fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<DecodedEntry, DecodeError> {
    let invalid = |field: &str, reason: String| DecodeError::InvalidField {
        entry_id: entry_id.to_owned(),
        field: field.to_owned(),
        reason,
    };
    let mut attributes: Vec<(&str, &str)> = Vec::new();
    let mut content_type = None;
    let mut data = None;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(DATA_FIELD) {
            data.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(CONTENT_TYPE_FIELD) {
            let text = std::str::from_utf8(value)
                .map_err(|e| invalid(name, format!("it is not UTF-8: {e}")))?;
            content_type.get_or_insert(text);
        } else if name
            .get(..CE_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(CE_PREFIX))
        {
            let text = std::str::from_utf8(value)
                .map_err(|e| invalid(name, format!("it is not UTF-8: {e}")))?;
            attributes.push((name, text));
        }
    }
    let Some(data) = data else {
        return Err(DecodeError::MissingField {
            entry_id: entry_id.to_owned(),
            field: DATA_FIELD.to_owned(),
        });
    };
    let event =
        event_from_attributes(attributes, CE_PREFIX, content_type, data).map_err(|e| match e {
            BinaryDecodeError::Missing(field) => DecodeError::MissingField {
                entry_id: entry_id.to_owned(),
                field,
            },
            BinaryDecodeError::Invalid {
                attribute,
                value,
                reason,
            } => invalid(&attribute, format!("{value:?}: {reason}")),
            BinaryDecodeError::NotUtf8(reason) => {
                invalid(DATA_FIELD, format!("it is not UTF-8 JSON: {reason}"))
            }
            BinaryDecodeError::Event(source) => DecodeError::Event {
                entry_id: entry_id.to_owned(),
                source,
            },
            other => invalid("?", other.to_string()),
        })?;
    Ok(DecodedEntry {
        entry_id: entry_id.to_owned(),
        dedup_id: event.id().to_string(),
        event,
    })
}

/// The bytes of a string value, in either protocol version.
fn value_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::Array(_) | Value::Set(_) => "an array",
        Value::Map(_) => "a map",
        Value::Double(_) => "a double",
        Value::Boolean(_) => "a boolean",
        _ => "a non-string value",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proclaim_core::binary::attributes;

    use super::*;

    fn donor() -> Result<Event, EventError> {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .datacontenttype("application/cloudevents+json; charset=utf-8")
            .correlation_id("pledge-drive-7")
            .extension("tenant", "acme")
            .json(r#"{"donor_id":42,  "amount_cents":250000}"#)
            .build()
    }

    /// The fields the publisher writes for `event`.
    fn fields(event: &Event) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = attributes(event, CE_PREFIX)
            .into_iter()
            .map(|(n, v)| (n, v.into_bytes()))
            .collect();
        out.push((
            CONTENT_TYPE_FIELD.into(),
            event.datacontenttype().as_bytes().to_vec(),
        ));
        out.push((DATA_FIELD.into(), event.data().get().as_bytes().to_vec()));
        out
    }

    fn entry(fields: &[(String, Vec<u8>)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(n, v)| (n.clone(), Value::BulkString(v.clone())))
                .collect::<HashMap<_, _>>(),
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        }
    }

    #[test]
    fn round_trips_through_the_fields() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let decoded = decode_entry(&entry(&fields(&event)))?;
        assert_eq!(decoded.event, event);
        assert_eq!(decoded.dedup_id, event.id().to_string());
        assert_eq!(decoded.entry_id, "1-0");
        let plain = Event::builder("T").subject("k").build()?;
        assert_eq!(decode_entry(&entry(&fields(&plain)))?.event, plain);
        Ok(())
    }

    #[test]
    fn names_the_missing_field() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        for missing in ["ce-id", "ce-type", "ce-time", "ce-specversion", "data"] {
            let without: Vec<_> = fields(&event)
                .into_iter()
                .filter(|(n, _)| n != missing)
                .collect();
            let err = decode_entry(&entry(&without)).err();
            assert_eq!(
                err,
                Some(DecodeError::MissingField {
                    entry_id: "1-0".into(),
                    field: missing.into()
                }),
                "{missing}"
            );
        }
        let without_id: Vec<_> = fields(&event)
            .into_iter()
            .filter(|(n, _)| n != "ce-id")
            .collect();
        let text = decode_entry(&entry(&without_id))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            text.as_deref(),
            Some("stream entry 1-0 lacks the ce-id field")
        );
        // Without content-type the data is JSON.
        let without_ct: Vec<_> = fields(&event)
            .into_iter()
            .filter(|(n, _)| n != CONTENT_TYPE_FIELD)
            .collect();
        let decoded = decode_entry(&entry(&without_ct))?;
        assert_eq!(decoded.event.datacontenttype(), "application/json");
        Ok(())
    }

    #[test]
    fn names_the_invalid_field() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let replace = |name: &str, value: &[u8]| {
            fields(&event)
                .into_iter()
                .map(|(n, v)| {
                    if n == name {
                        (n, value.to_vec())
                    } else {
                        (n, v)
                    }
                })
                .collect::<Vec<_>>()
        };
        for (field, value) in [
            ("ce-id", &b"not-a-uuid"[..]),
            ("ce-time", b"yesterday"),
            ("ce-specversion", b"0.3"),
            ("ce-type", &[0xff, 0xfe]),
            ("data", &[0xff, 0xfe]),
        ] {
            let err = decode_entry(&entry(&replace(field, value))).err();
            assert!(
                matches!(&err, Some(DecodeError::InvalidField { field: f, .. }) if f == field),
                "{field}: {err:?}"
            );
        }
        let err = decode_entry(&entry(&replace("data", b"{not json"))).err();
        assert!(
            matches!(
                err,
                Some(DecodeError::Event {
                    source: EventError::Data(_),
                    ..
                })
            ),
            "{err:?}"
        );
        // A field that is not a string.
        let mut odd = entry(&fields(&event));
        odd.map.insert("ce-subject".into(), Value::Int(7));
        let err = decode_entry(&odd).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "stream entry 1-0 has an invalid ce-subject field: expected a string, got an integer"
            )
        );
        Ok(())
    }

    #[test]
    fn matches_names_case_insensitively_and_ignores_foreign_fields()
    -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let mut upper: Vec<(String, Vec<u8>)> = fields(&event)
            .into_iter()
            .map(|(n, v)| (n.to_ascii_uppercase(), v))
            .collect();
        upper.push(("x-other".into(), b"ignored".to_vec()));
        upper.push(("blob".into(), vec![0xff]));
        let pairs: Vec<(&str, &[u8])> = upper
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        assert_eq!(decode_fields("9-1", pairs)?.event, event);
        Ok(())
    }
}
