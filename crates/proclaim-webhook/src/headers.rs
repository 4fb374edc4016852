//! CloudEvents HTTP binding, binary content mode: the attributes as `ce-*`
//! headers, percent-encoded as the binding requires (space, `"`, `%` and
//! everything outside printable ASCII).

use http::{HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use proclaim_core::Event;

/// The prefix of CloudEvents attribute headers.
pub(crate) const CE_PREFIX: &str = "ce-";

/// What the CloudEvents HTTP binding percent-encodes in a header value
/// (non-ASCII bytes are always encoded).
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// A header that cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {name} cannot be written: {reason}")]
pub(crate) struct HeaderError {
    pub(crate) name: String,
    pub(crate) reason: String,
}

/// Adds the `ce-*` headers of `event` and its `Content-Type`.
pub(crate) fn encode_binary(event: &Event, headers: &mut HeaderMap) -> Result<(), HeaderError> {
    for (name, value) in proclaim_core::binary::attributes(event, CE_PREFIX) {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| HeaderError {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        let encoded = utf8_percent_encode(&value, HEADER_VALUE).to_string();
        let value = HeaderValue::from_str(&encoded).map_err(|e| HeaderError {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        headers.append(header, value);
    }
    let datacontenttype = event.datacontenttype();
    // `HeaderValue` would take bytes outside ASCII, which no receiver reads
    // back as text.
    let content_type = datacontenttype
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        .then(|| HeaderValue::from_str(datacontenttype).ok())
        .flatten()
        .ok_or_else(|| HeaderError {
            name: "content-type".into(),
            reason: format!(
                "the datacontenttype {datacontenttype:?} is not a valid HTTP header value \
                 (visible ASCII only)"
            ),
        })?;
    headers.insert(http::header::CONTENT_TYPE, content_type);
    Ok(())
}

/// The `ce-*` headers of a request, names lower-cased and values
/// percent-decoded.
pub(crate) fn decode_attributes(headers: &HeaderMap) -> Result<Vec<(String, String)>, HeaderError> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        if !name.starts_with(CE_PREFIX) {
            continue;
        }
        let text = value.to_str().map_err(|_| HeaderError {
            name: name.to_owned(),
            reason: "it is not visible ASCII (the binding percent-encodes other characters)".into(),
        })?;
        let decoded = percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| HeaderError {
                name: name.to_owned(),
                reason: "its percent-encoding is not UTF-8".into(),
            })?;
        out.push((name.to_owned(), decoded.into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_printable_ascii_are_percent_encoded_and_decoded() -> Result<(), String> {
        let event = Event::builder("DonorSecured")
            .subject("donor 42 \"ünï\" 100%")
            .source("campaign-finance")
            .extension("tenant", "acme")
            .build()
            .map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        encode_binary(&event, &mut headers).map_err(|e| e.to_string())?;
        assert_eq!(
            headers.get("ce-subject").and_then(|v| v.to_str().ok()),
            Some("donor%2042%20%22%C3%BCn%C3%AF%22%20100%25")
        );
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let pairs = decode_attributes(&headers).map_err(|e| e.to_string())?;
        let back = proclaim_core::binary::event_from_attributes(
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            CE_PREFIX,
            Some(event.datacontenttype()),
            event.data().get().as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        assert_eq!(back, event);
        Ok(())
    }
}
