//! [`decode_message`]: reads an [`Event`] back from a NATS message.

use proclaim_core::binary::{self, BinaryDecodeError};
use proclaim_core::{Event, EventError};

use crate::headers;

/// Why a NATS message is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no headers, so no CloudEvents attributes.
    #[error("message on {subject} has no headers: it is not a CloudEvent in binary content mode")]
    NoHeaders {
        /// The message's NATS subject.
        subject: String,
    },
    /// A required attribute header is absent.
    #[error("message on {subject} lacks the {header} header")]
    MissingHeader {
        /// The message's NATS subject.
        subject: String,
        /// The missing header, e.g. `ce-id`.
        header: String,
    },
    /// A header has a value that cannot be parsed (an id that is not a UUID,
    /// a time that is not RFC 3339, an unsupported spec version).
    #[error("message on {subject} has an invalid {header} header {value:?}: {reason}")]
    InvalidHeader {
        /// The message's NATS subject.
        subject: String,
        /// The header, e.g. `ce-time`.
        header: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The body is not UTF-8, so not JSON.
    #[error("message on {subject} has a body that is not UTF-8 JSON: {reason}")]
    NotUtf8 {
        /// The message's NATS subject.
        subject: String,
        /// Where decoding failed.
        reason: String,
    },
    /// The attributes or the body do not form a valid event (e.g. the body is
    /// not valid JSON, or an attribute fails the envelope's checks).
    #[error("message on {subject} is not a valid event: {source}")]
    Event {
        /// The message's NATS subject.
        subject: String,
        /// Why the event is invalid.
        #[source]
        source: EventError,
    },
}

/// Reads the [`Event`] a [`NatsPublisher`](crate::NatsPublisher) published:
/// the CloudEvents attributes from the `ce-*` headers (binary content mode),
/// the content type from `content-type`, extension attributes from the other
/// `ce-*` headers, and the JSON data from the body. Header names are matched
/// case-insensitively.
///
/// A JetStream message derefs to an [`async_nats::Message`], so
/// `decode_message(&jetstream_message)` works as well.
///
/// Note that NATS trims leading and trailing whitespace from header values,
/// so an attribute value with such whitespace does not survive the trip.
pub fn decode_message(message: &async_nats::Message) -> Result<Event, DecodeError> {
    let subject = message.subject.to_string();
    let Some(map) = message.headers.as_ref() else {
        return Err(DecodeError::NoHeaders { subject });
    };
    // First value of every header; the content type is binary mode's
    // `datacontenttype`.
    let pairs: Vec<(String, &str)> = map
        .iter()
        .filter_map(|(name, list)| Some((name.to_string(), list.first()?.as_str())))
        .collect();
    let content_type = pairs
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(headers::CONTENT_TYPE))
        .map(|(_, value)| *value);
    binary::event_from_attributes(
        pairs.iter().map(|(name, value)| (name.as_str(), *value)),
        headers::CE_PREFIX,
        content_type,
        &message.payload,
    )
    .map_err(|e| match e {
        BinaryDecodeError::Missing(header) => DecodeError::MissingHeader { subject, header },
        BinaryDecodeError::Invalid {
            attribute,
            value,
            reason,
        } => DecodeError::InvalidHeader {
            subject,
            header: attribute,
            value,
            reason,
        },
        BinaryDecodeError::NotUtf8(reason) => DecodeError::NotUtf8 { subject, reason },
        BinaryDecodeError::Event(source) => DecodeError::Event { subject, source },
        // `BinaryDecodeError` is non-exhaustive: anything new is an invalid event.
        other => DecodeError::InvalidHeader {
            subject,
            header: String::new(),
            value: String::new(),
            reason: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use async_nats::HeaderMap;
    use bytes::Bytes;

    use super::*;

    fn message(headers: Option<HeaderMap>, body: &str) -> async_nats::Message {
        async_nats::Message {
            subject: "proclaim.DonorSecured".into(),
            reply: None,
            payload: Bytes::copy_from_slice(body.as_bytes()),
            headers,
            status: None,
            description: None,
            length: 0,
        }
    }

    fn donor() -> Result<Event, EventError> {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .datacontenttype("application/cloudevents+json; charset=utf-8")
            .correlation_id("pledge-drive-7")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .json(r#"{"donor_id":42,  "amount_cents":250000}"#)
            .build()
    }

    #[test]
    fn round_trips_through_the_headers() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let headers = headers::encode(&event)?;
        let back = decode_message(&message(Some(headers), event.data().get()))?;
        assert_eq!(back, event);
        Ok(())
    }

    #[test]
    fn round_trips_without_optional_attributes() -> Result<(), Box<dyn std::error::Error>> {
        let event = Event::builder("T").subject("k").build()?;
        let back = decode_message(&message(Some(headers::encode(&event)?), event.data().get()))?;
        assert_eq!(back, event);
        Ok(())
    }

    #[test]
    fn header_names_match_case_insensitively() -> Result<(), Box<dyn std::error::Error>> {
        let event = Event::builder("T")
            .subject("k")
            .correlation_id("c")
            .build()?;
        let mut headers = HeaderMap::new();
        headers.insert("Ce-Specversion", "1.0");
        headers.insert("Ce-Id", event.id().to_string().as_str());
        headers.insert("Ce-Type", "T");
        headers.insert("Ce-Source", event.source());
        headers.insert("Ce-Subject", "k");
        headers.insert("Ce-Time", event.time_rfc3339().as_str());
        headers.insert("Content-Type", "application/json");
        headers.insert("Ce-Correlationid", "c");
        assert_eq!(decode_message(&message(Some(headers), "null"))?, event);
        Ok(())
    }

    #[test]
    fn reports_what_is_missing_or_wrong() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let subject = "proclaim.DonorSecured".to_owned();

        assert_eq!(
            decode_message(&message(None, "{}")),
            Err(DecodeError::NoHeaders {
                subject: subject.clone()
            })
        );

        let full = headers::encode(&event)?;
        let mut without_id = HeaderMap::new();
        for (name, values) in full.iter() {
            if name.to_string() != "ce-id" {
                for v in values {
                    without_id.append(name.clone(), v.clone());
                }
            }
        }
        assert_eq!(
            decode_message(&message(Some(without_id), "{}")),
            Err(DecodeError::MissingHeader {
                subject: subject.clone(),
                header: "ce-id".into()
            })
        );

        let mut bad_id = headers::encode(&event)?;
        bad_id.insert("ce-id", "not-a-uuid");
        let err = decode_message(&message(Some(bad_id), "{}")).err();
        assert!(
            matches!(
                err,
                Some(DecodeError::InvalidHeader { ref header, .. }) if header == "ce-id"
            ),
            "{err:?}"
        );

        let mut bad_time = headers::encode(&event)?;
        bad_time.insert("ce-time", "yesterday");
        let err = decode_message(&message(Some(bad_time), "{}")).err();
        assert!(
            matches!(
                err,
                Some(DecodeError::InvalidHeader { ref header, .. }) if header == "ce-time"
            ),
            "{err:?}"
        );

        let mut old_spec = headers::encode(&event)?;
        old_spec.insert("ce-specversion", "0.3");
        let err = decode_message(&message(Some(old_spec), "{}")).err();
        assert!(
            matches!(
                err,
                Some(DecodeError::InvalidHeader { ref header, .. }) if header == "ce-specversion"
            ),
            "{err:?}"
        );

        let err = decode_message(&message(Some(headers::encode(&event)?), "{not json")).err();
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
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with("message on proclaim.DonorSecured is not a valid event: event data is not valid JSON"),
            "{text}"
        );
        Ok(())
    }
}
