//! CloudEvents binary content mode over NATS headers: the attribute → header
//! mapping shared by the publisher and [`decode_message`](crate::decode_message).

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use proclaim_core::Event;
use proclaim_core::binary;

/// Prefix of every CloudEvents attribute header.
pub(crate) const CE_PREFIX: &str = "ce-";
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
/// deduplication), the CloudEvents attributes and the content type.
pub(crate) fn encode(event: &Event) -> Result<HeaderMap, HeaderError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        NATS_MESSAGE_ID,
        value("Nats-Msg-Id", &event.id().to_string())?,
    );
    let content_type = (CONTENT_TYPE.to_owned(), event.datacontenttype().to_owned());
    for (name, text) in binary::attributes(event, CE_PREFIX)
        .into_iter()
        .chain([content_type])
    {
        let header = HeaderName::from_str(&name).map_err(|e| HeaderError {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        headers.insert(header, value(&name, &text)?);
    }
    Ok(headers)
}

fn value(name: &str, text: &str) -> Result<HeaderValue, HeaderError> {
    HeaderValue::from_str(text).map_err(|e| HeaderError {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}
