//! [`decode_request`]: a webhook request back into an [`Event`].

use http::HeaderMap;
use proclaim_core::binary::BinaryDecodeError;
use proclaim_core::{Event, EventError};

use crate::STRUCTURED_CONTENT_TYPE;
use crate::headers::{CE_PREFIX, decode_attributes};

/// Why a request is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A header cannot be read (not ASCII, bad percent-encoding).
    #[error("the request's {name} header is invalid: {reason}")]
    Header {
        /// The header's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A binary-mode request whose `ce-*` headers or body do not form an event.
    #[error(transparent)]
    Binary(#[from] BinaryDecodeError),
    /// A structured-mode request whose body is not a CloudEvent.
    #[error("the request body is not a valid CloudEvent: {0}")]
    Structured(#[from] EventError),
    /// A structured-mode body that is not UTF-8.
    #[error("the request body is not UTF-8 JSON")]
    NotUtf8,
    /// A batch of CloudEvents (`application/cloudevents-batch+json`).
    #[error("batched CloudEvents are not supported: one event per request")]
    Batch,
}

/// Reads a webhook request back into an [`Event`] **without checking its
/// signature**: for webhooks configured without a secret. Use
/// [`verify_and_decode`](crate::verify_and_decode) otherwise.
///
/// Structured mode is recognised by `Content-Type:
/// application/cloudevents+json` (parameters ignored); any other request is
/// read in binary mode: the attributes from the `ce-*` headers
/// (percent-decoded), the content type from `Content-Type` (JSON when
/// absent), the data from the body, byte for byte.
pub fn decode_request(headers: &HeaderMap, body: &[u8]) -> Result<Event, DecodeError> {
    let content_type = match headers.get(http::header::CONTENT_TYPE) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| DecodeError::Header {
            name: "content-type".into(),
            reason: "it is not visible ASCII".into(),
        })?),
    };
    let media_type = content_type
        .and_then(|t| t.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase());
    match media_type.as_deref() {
        Some(STRUCTURED_CONTENT_TYPE) => {
            let json = std::str::from_utf8(body).map_err(|_| DecodeError::NotUtf8)?;
            Ok(Event::from_cloudevent_json(json)?)
        }
        Some("application/cloudevents-batch+json") => Err(DecodeError::Batch),
        _ => {
            let pairs = decode_attributes(headers).map_err(|e| DecodeError::Header {
                name: e.name,
                reason: e.reason,
            })?;
            Ok(proclaim_core::binary::event_from_attributes(
                pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
                CE_PREFIX,
                content_type,
                body,
            )?)
        }
    }
}
