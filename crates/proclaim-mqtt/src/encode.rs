//! The CloudEvents MQTT binding, writing side: an event as a payload and
//! MQTT 5 publish properties.

use bytes::Bytes;
use proclaim_core::Event;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use crate::ContentMode;

/// Content type of a structured-mode message.
pub(crate) const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// Payload format indicator: the payload is UTF-8 text.
const UTF8_PAYLOAD: u8 = 1;

/// The payload and properties of `event` in `mode`.
pub(crate) fn encode(event: &Event, mode: ContentMode) -> (Bytes, PublishProperties) {
    match mode {
        ContentMode::Binary => {
            let properties = PublishProperties {
                payload_format_indicator: Some(UTF8_PAYLOAD),
                content_type: Some(event.datacontenttype().to_owned()),
                // The MQTT binding names the attributes without a prefix.
                user_properties: proclaim_core::binary::attributes(event, ""),
                ..PublishProperties::default()
            };
            let payload = Bytes::copy_from_slice(event.data().get().as_bytes());
            (payload, properties)
        }
        ContentMode::Structured => {
            let properties = PublishProperties {
                payload_format_indicator: Some(UTF8_PAYLOAD),
                content_type: Some(STRUCTURED_CONTENT_TYPE.to_owned()),
                ..PublishProperties::default()
            };
            (Bytes::from(event.to_cloudevent_json()), properties)
        }
    }
}
