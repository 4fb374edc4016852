//! [`decode_publish`]: reads an [`Event`] back from an MQTT 5 message.

use proclaim_core::binary::{BinaryDecodeError, event_from_attributes};
use proclaim_core::{Event, EventError};
use rumqttc::v5::mqttbytes::v5::Publish;

/// Why an MQTT message is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A message in binary content mode (CloudEvents attributes in user
    /// properties) lacks an attribute, has an invalid one, or a body that is
    /// not the event's JSON data.
    #[error("MQTT message on {topic} is not a proclaim event: {source}")]
    Binary {
        /// The message's topic.
        topic: String,
        /// What is wrong.
        #[source]
        source: BinaryDecodeError,
    },
    /// A message in structured content mode is not a valid CloudEvents JSON
    /// document.
    #[error("MQTT message on {topic} is not a CloudEvent in structured mode: {source}")]
    Structured {
        /// The message's topic.
        topic: String,
        /// What is wrong.
        #[source]
        source: EventError,
    },
}

impl DecodeError {
    /// The topic of the message.
    pub fn topic(&self) -> &str {
        match self {
            DecodeError::Binary { topic, .. } | DecodeError::Structured { topic, .. } => topic,
        }
    }

    /// The CloudEvents attribute the message lacks, if that is what is wrong
    /// (`id`, `type`, …).
    pub fn missing_attribute(&self) -> Option<&str> {
        match self {
            DecodeError::Binary {
                source: BinaryDecodeError::Missing(name),
                ..
            } => Some(name),
            DecodeError::Structured {
                source: EventError::Missing(name),
                ..
            } => Some(name),
            _ => None,
        }
    }
}

/// Whether a message is in structured content mode: a CloudEvents JSON
/// content type and no `specversion` user property. A message without
/// properties at all (e.g. from an MQTT 3.1.1 client) is read as structured
/// too, as that is the only mode MQTT 3.1.1 can carry.
fn is_structured(publish: &Publish) -> bool {
    let Some(properties) = &publish.properties else {
        return true;
    };
    let has_specversion = properties
        .user_properties
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("specversion"));
    if has_specversion {
        return false;
    }
    match &properties.content_type {
        Some(ct) => ct
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("application/cloudevents+json"),
        None => properties.user_properties.is_empty(),
    }
}

/// Whether a user property can be a CloudEvents attribute: 1-20 characters
/// of `a-z` and `0-9`. Others (set by a bridge, say) are not the event's.
fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Reads the [`Event`] an [`MqttPublisher`](crate::MqttPublisher) published,
/// in either content mode:
///
/// - binary: the attributes from the user properties (names without prefix,
///   as the CloudEvents MQTT binding has them; user properties that cannot be
///   attribute names are ignored), `datacontenttype` from the content type
///   property (JSON when absent), the data from the payload, byte for byte;
/// - structured (content type `application/cloudevents+json`, or a message
///   without properties): the payload as a CloudEvents JSON document.
///
/// An MQTT 3.1.1 consumer has the payload only: structured mode and
/// [`Event::from_cloudevent_json`] read it.
pub fn decode_publish(publish: &Publish) -> Result<Event, DecodeError> {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    if is_structured(publish) {
        let json = std::str::from_utf8(&publish.payload).map_err(|e| DecodeError::Structured {
            topic: topic.clone(),
            source: EventError::Data(format!("the payload is not UTF-8: {e}")),
        })?;
        return Event::from_cloudevent_json(json)
            .map_err(|source| DecodeError::Structured { topic, source });
    }
    let (pairs, content_type) = match &publish.properties {
        Some(p) => (p.user_properties.as_slice(), p.content_type.as_deref()),
        None => (&[][..], None),
    };
    event_from_attributes(
        pairs
            .iter()
            .filter(|(name, _)| is_attribute_name(name))
            .map(|(n, v)| (n.as_str(), v.as_str())),
        "",
        content_type,
        &publish.payload,
    )
    .map_err(|source| DecodeError::Binary { topic, source })
}

/// The id a consumer deduplicates by, as the message carries it: the `id`
/// user property (binary mode) or the `id` member of the JSON document
/// (structured mode). It is the event id, the same for every redelivery.
pub fn dedup_id(publish: &Publish) -> Option<String> {
    if is_structured(publish) {
        #[derive(serde::Deserialize)]
        struct Id {
            id: String,
        }
        return serde_json::from_slice::<Id>(&publish.payload)
            .ok()
            .map(|i| i.id);
    }
    publish
        .properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(name, _)| name == "id")
        .map(|(_, value)| value.clone())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rumqttc::v5::mqttbytes::QoS;

    use super::*;
    use crate::ContentMode;
    use crate::encode::{STRUCTURED_CONTENT_TYPE, encode};

    fn donor() -> Result<Event, EventError> {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .datacontenttype("application/vnd.campaign+json; charset=utf-8")
            .correlation_id("pledge-drive-7")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .extension("tenant", "acme")
            .json(r#"{"donor_id":42,  "amount_cents":250000, "note":"ünïcode"}"#)
            .build()
    }

    fn message(event: &Event, mode: ContentMode) -> Publish {
        let (payload, properties) = encode(event, mode);
        Publish::new(
            "proclaim/DonorSecured",
            QoS::AtLeastOnce,
            payload,
            Some(properties),
        )
    }

    #[test]
    fn round_trips_in_both_modes() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let publish = message(&event, mode);
            assert_eq!(decode_publish(&publish)?, event, "{mode:?}");
            assert_eq!(dedup_id(&publish), Some(event.id().to_string()), "{mode:?}");
        }
        let minimal = Event::builder("T").subject("k").build()?;
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            assert_eq!(decode_publish(&message(&minimal, mode))?, minimal);
        }
        Ok(())
    }

    #[test]
    fn binary_mode_is_the_cloudevents_mqtt_binding() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let publish = message(&event, ContentMode::Binary);
        assert_eq!(&publish.payload[..], event.data().get().as_bytes());
        let properties = publish.properties.as_ref().ok_or("no properties")?;
        assert_eq!(
            properties.content_type.as_deref(),
            Some("application/vnd.campaign+json; charset=utf-8")
        );
        assert_eq!(properties.payload_format_indicator, Some(1));
        let get = |name: &str| {
            properties
                .user_properties
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("specversion"), Some("1.0"));
        assert_eq!(get("id"), Some(event.id().to_string().as_str()));
        assert_eq!(get("type"), Some("DonorSecured"));
        assert_eq!(get("source"), Some("campaign-finance"));
        assert_eq!(get("subject"), Some("donor-42"));
        assert_eq!(get("time"), Some(event.time_rfc3339().as_str()));
        assert_eq!(get("dataschema"), Some("urn:donor-secured:v2"));
        assert_eq!(get("correlationid"), Some("pledge-drive-7"));
        assert_eq!(get("tenant"), Some("acme"));
        assert_eq!(get("datacontenttype"), None);
        Ok(())
    }

    #[test]
    fn structured_mode_is_one_json_document() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let publish = message(&event, ContentMode::Structured);
        let properties = publish.properties.as_ref().ok_or("no properties")?;
        assert_eq!(
            properties.content_type.as_deref(),
            Some(STRUCTURED_CONTENT_TYPE)
        );
        assert!(properties.user_properties.is_empty());
        let json = std::str::from_utf8(&publish.payload)?;
        assert_eq!(Event::from_cloudevent_json(json)?, event);
        // An MQTT 3.1.1 message has no properties: read as structured.
        let bare = Publish::new("t", QoS::AtLeastOnce, publish.payload.clone(), None);
        assert_eq!(decode_publish(&bare)?, event);
        assert_eq!(dedup_id(&bare), Some(event.id().to_string()));
        Ok(())
    }

    #[test]
    fn foreign_user_properties_are_ignored() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let mut publish = message(&event, ContentMode::Binary);
        if let Some(p) = publish.properties.as_mut() {
            p.user_properties.push(("x-bridge".into(), "edge-1".into()));
            p.user_properties.push(("Hop-Count".into(), "2".into()));
        }
        assert_eq!(decode_publish(&publish)?, event);
        Ok(())
    }

    #[test]
    fn a_missing_attribute_is_named() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        for missing in ["id", "type", "subject", "time", "source", "specversion"] {
            let mut publish = message(&event, ContentMode::Binary);
            if let Some(p) = publish.properties.as_mut() {
                p.user_properties.retain(|(n, _)| n != missing);
            }
            let err = decode_publish(&publish).err().ok_or("decoded")?;
            if missing == "specversion" {
                // Without specversion the attributes are not CloudEvents:
                // still binary (the content type is not structured), still named.
                assert_eq!(err.missing_attribute(), Some("specversion"), "{err}");
            } else {
                assert_eq!(err.missing_attribute(), Some(missing), "{err}");
            }
            assert_eq!(err.topic(), "proclaim/DonorSecured");
            assert!(
                err.to_string()
                    .ends_with(&format!("lacks the {missing} attribute")),
                "{err}"
            );
        }
        let mut publish = message(&event, ContentMode::Binary);
        if let Some(p) = publish.properties.as_mut() {
            p.user_properties.retain(|(n, _)| n != "id");
        }
        assert_eq!(
            decode_publish(&publish)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some(
                "MQTT message on proclaim/DonorSecured is not a proclaim event: the message lacks the id attribute"
            )
        );

        // Structured mode names what the JSON lacks.
        let json = event.to_cloudevent_json().replace("\"type\"", "\"kind\"");
        let mut publish = message(&event, ContentMode::Structured);
        publish.payload = Bytes::from(json);
        let err = decode_publish(&publish).err().ok_or("decoded")?;
        assert_eq!(err.missing_attribute(), Some("type"), "{err}");
        Ok(())
    }

    #[test]
    fn invalid_attributes_and_bodies_are_errors() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let mut publish = message(&event, ContentMode::Binary);
        if let Some(p) = publish.properties.as_mut() {
            for (n, v) in &mut p.user_properties {
                if n == "time" {
                    *v = "yesterday".into();
                }
            }
        }
        let err = decode_publish(&publish).err().ok_or("decoded")?;
        assert!(err.to_string().contains("time"), "{err}");
        assert_eq!(err.missing_attribute(), None);

        let mut publish = message(&event, ContentMode::Binary);
        publish.payload = Bytes::from_static(b"{not json");
        assert!(matches!(
            decode_publish(&publish),
            Err(DecodeError::Binary {
                source: BinaryDecodeError::Event(_),
                ..
            })
        ));
        let mut publish = message(&event, ContentMode::Structured);
        publish.payload = Bytes::from_static(&[0xff, 0xfe]);
        assert!(matches!(
            decode_publish(&publish),
            Err(DecodeError::Structured { .. })
        ));
        assert_eq!(dedup_id(&publish), None);
        Ok(())
    }
}
