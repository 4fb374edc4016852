//! CloudEvents binary content mode over NATS headers: the attribute → header
//! mapping shared by the publisher and [`decode_message`](crate::decode_message).

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use proclaim_core::{Event, SPEC_VERSION};

/// Prefix of every CloudEvents attribute header.
pub(crate) const CE_PREFIX: &str = "ce-";
/// CloudEvents `specversion`.
pub(crate) const SPECVERSION: &str = "ce-specversion";
/// CloudEvents `id`.
pub(crate) const ID: &str = "ce-id";
/// CloudEvents `type`.
pub(crate) const TYPE: &str = "ce-type";
/// CloudEvents `source`.
pub(crate) const SOURCE: &str = "ce-source";
/// CloudEvents `subject`.
pub(crate) const SUBJECT: &str = "ce-subject";
/// CloudEvents `time`.
pub(crate) const TIME: &str = "ce-time";
/// CloudEvents `dataschema`.
pub(crate) const DATASCHEMA: &str = "ce-dataschema";
/// CloudEvents `datacontenttype`, which binary mode carries as the content type.
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// A header that cannot be written (a name or value NATS does not accept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {name} cannot be written: {reason}")]
pub(crate) struct HeaderError {
    name: String,
    reason: String,
}

/// The headers of `event`: `Nats-Msg-Id` (the event id, for JetStream
/// deduplication) and the CloudEvents attributes.
pub(crate) fn encode(event: &Event) -> Result<HeaderMap, HeaderError> {
    let mut headers = HeaderMap::new();
    let id = event.id().to_string();
    headers.insert(NATS_MESSAGE_ID, value("Nats-Msg-Id", &id)?);
    let mut put = |name: &str, text: &str| -> Result<(), HeaderError> {
        let header = HeaderName::from_str(name).map_err(|e| HeaderError {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        headers.insert(header, value(name, text)?);
        Ok(())
    };
    put(SPECVERSION, SPEC_VERSION)?;
    put(ID, &id)?;
    put(TYPE, event.event_type())?;
    put(SOURCE, event.source())?;
    put(SUBJECT, event.subject())?;
    put(TIME, &event.time_rfc3339())?;
    if let Some(schema) = event.dataschema() {
        put(DATASCHEMA, schema)?;
    }
    put(CONTENT_TYPE, event.datacontenttype())?;
    for (name, text) in event.metadata() {
        put(&format!("{CE_PREFIX}{name}"), text)?;
    }
    Ok(headers)
}

fn value(name: &str, text: &str) -> Result<HeaderValue, HeaderError> {
    HeaderValue::from_str(text).map_err(|e| HeaderError {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}
