//! Standard Webhooks signatures on the receiving side: [`Verifier`] and
//! [`verify_and_decode`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::Mac;
use http::HeaderMap;
use proclaim_core::Event;
use uuid::Uuid;

use crate::{
    DecodeError, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, WebhookSecret, decode_request,
};

/// How far a request's `webhook-timestamp` may be from the receiver's clock
/// by default: 5 minutes, either way.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A signature header is absent.
    #[error("the request has no {0} header: it is not signed")]
    Missing(&'static str),
    /// A signature header cannot be read.
    #[error("the request's {name} header is invalid: {reason}")]
    Header {
        /// The header's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The timestamp is too far from the receiver's clock: a replay of an old
    /// request, or clocks out of sync.
    #[error(
        "the request's timestamp {timestamp} is {skew}s away from the receiver's clock \
         ({now}), beyond the tolerance of {}s",
        tolerance.as_secs()
    )]
    Timestamp {
        /// The `webhook-timestamp`, Unix seconds.
        timestamp: i64,
        /// The receiver's clock, Unix seconds.
        now: i64,
        /// How far apart they are, in seconds.
        skew: u64,
        /// The tolerance.
        tolerance: Duration,
    },
    /// No `v1` signature of the request matches the secret: the request was
    /// altered, or signed with another secret.
    #[error("no signature of the request matches the secret")]
    Signature,
    /// The signed `webhook-id` is not the id of the event the request carries.
    #[error("the request's webhook-id {webhook_id} is not the id of its event ({event_id})")]
    IdMismatch {
        /// The `webhook-id` header.
        webhook_id: String,
        /// The event's id.
        event_id: Uuid,
    },
    /// The request is authentic but not a valid event.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Checks Standard Webhooks signatures of requests, with a chosen timestamp
/// tolerance.
///
/// ```
/// use std::time::Duration;
/// use proclaim_webhook::{Verifier, WebhookSecret};
///
/// let secret = WebhookSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
/// let verifier = Verifier::new(secret).with_tolerance(Duration::from_secs(60));
/// let headers = http::HeaderMap::new();
/// assert!(verifier.verify(&headers, b"{}").is_err()); // not signed
/// # Ok::<(), proclaim_core::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Verifier {
    secret: WebhookSecret,
    tolerance: Duration,
}

impl Verifier {
    /// A verifier for `secret` with the [`DEFAULT_TOLERANCE`].
    pub fn new(secret: WebhookSecret) -> Self {
        Verifier {
            secret,
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// Sets how far a request's timestamp may be from the clock, either way.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Checks the signature headers of a request against its body, now.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        self.verify_at(headers, body, Utc::now())
    }

    /// Checks the signature headers of a request against its body, as if the
    /// clock read `now`: `webhook-id` and `webhook-timestamp` are present, the
    /// timestamp is within the tolerance of `now`, and one of the `v1`
    /// signatures in `webhook-signature` is the HMAC-SHA256 of
    /// `"{id}.{timestamp}.{body}"` (compared in constant time).
    pub fn verify_at(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), VerifyError> {
        let id = header(headers, WEBHOOK_ID)?;
        let timestamp: i64 =
            header(headers, WEBHOOK_TIMESTAMP)?
                .parse()
                .map_err(|_| VerifyError::Header {
                    name: WEBHOOK_TIMESTAMP,
                    reason: "it is not a number of Unix seconds".into(),
                })?;
        let now = now.timestamp();
        let skew = now.abs_diff(timestamp);
        if skew > self.tolerance.as_secs() {
            return Err(VerifyError::Timestamp {
                timestamp,
                now,
                skew,
                tolerance: self.tolerance,
            });
        }
        let signatures = header(headers, WEBHOOK_SIGNATURE)?;
        let mac = self.secret.mac(id, timestamp, body);
        let matched = signatures
            .split(' ')
            .filter_map(|entry| entry.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .filter_map(|(_, encoded)| WebhookSecret::decode_signature(encoded))
            .any(|signature| mac.clone().verify_slice(&signature).is_ok());
        if matched {
            Ok(())
        } else {
            Err(VerifyError::Signature)
        }
    }

    /// Checks a request as [`Verifier::verify`] does, then reads its event
    /// back as [`decode_request`] does, and checks that the event's id is the
    /// signed `webhook-id`.
    pub fn verify_and_decode(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Event, VerifyError> {
        self.verify(headers, body)?;
        let event = decode_request(headers, body)?;
        let webhook_id = header(headers, WEBHOOK_ID)?;
        if Uuid::parse_str(webhook_id).ok() != Some(event.id()) {
            return Err(VerifyError::IdMismatch {
                webhook_id: webhook_id.to_owned(),
                event_id: event.id(),
            });
        }
        Ok(event)
    }
}

/// Checks a webhook request signed with `secret` (within the
/// [`DEFAULT_TOLERANCE`] of the clock) and reads its event back: the
/// receiving side of a [`WebhookPublisher`](crate::WebhookPublisher).
///
/// `headers` and `body` are the request's, as received. A request that is
/// not signed, is signed with another secret, was altered, is older (or
/// newer) than the tolerance, or does not carry a valid event is rejected.
/// See [`Verifier`] for another tolerance.
pub fn verify_and_decode(
    secret: &WebhookSecret,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Event, VerifyError> {
    Verifier::new(secret.clone()).verify_and_decode(headers, body)
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    let value = headers.get(name).ok_or(VerifyError::Missing(name))?;
    value.to_str().map_err(|_| VerifyError::Header {
        name,
        reason: "it is not visible ASCII".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn secret(text: &str) -> WebhookSecret {
        match WebhookSecret::new(text) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn signed(secret: &WebhookSecret, id: &str, timestamp: i64, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        put(WEBHOOK_ID, id.to_owned());
        put(WEBHOOK_TIMESTAMP, timestamp.to_string());
        put(WEBHOOK_SIGNATURE, secret.sign(id, timestamp, body));
        headers
    }

    #[test]
    fn accepts_a_signed_request_and_rejects_alterations() {
        let key = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let other = secret("whsec_MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0");
        let verifier = Verifier::new(key.clone());
        let now = Utc::now();
        let ts = now.timestamp();
        let body = br#"{"n":1}"#;
        let headers = signed(&key, "msg-1", ts, body);
        assert_eq!(verifier.verify_at(&headers, body, now), Ok(()));

        assert_eq!(
            verifier.verify_at(&headers, br#"{"n":2}"#, now),
            Err(VerifyError::Signature)
        );
        let mut renamed = headers.clone();
        renamed.insert(WEBHOOK_ID, HeaderValue::from_static("msg-2"));
        assert_eq!(
            verifier.verify_at(&renamed, body, now),
            Err(VerifyError::Signature)
        );
        let foreign = signed(&other, "msg-1", ts, body);
        assert_eq!(
            verifier.verify_at(&foreign, body, now),
            Err(VerifyError::Signature)
        );

        // Several signatures (a key rotation): one match is enough.
        let mut rotated = headers.clone();
        let both = format!(
            "v1,bm9wZQ== {} v2,xyz {}",
            other.sign("msg-1", ts, body),
            key.sign("msg-1", ts, body)
        );
        if let Ok(v) = HeaderValue::from_str(&both) {
            rotated.insert(WEBHOOK_SIGNATURE, v);
        }
        assert_eq!(verifier.verify_at(&rotated, body, now), Ok(()));

        let mut unsigned = headers.clone();
        unsigned.remove(WEBHOOK_SIGNATURE);
        assert_eq!(
            verifier.verify_at(&unsigned, body, now),
            Err(VerifyError::Missing(WEBHOOK_SIGNATURE))
        );
    }

    #[test]
    fn rejects_timestamps_outside_the_tolerance() {
        let key = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let now = Utc::now();
        let body = b"{}";
        let verifier = Verifier::new(key.clone());
        for (offset, ok) in [(-300, true), (300, true), (-301, false), (301, false)] {
            let headers = signed(&key, "m", now.timestamp() + offset, body);
            let result = verifier.verify_at(&headers, body, now);
            assert_eq!(result.is_ok(), ok, "{offset}: {result:?}");
        }
        let stale = signed(&key, "m", now.timestamp() - 3600, body);
        let err = verifier.verify_at(&stale, body, now).err();
        assert!(
            matches!(err, Some(VerifyError::Timestamp { skew: 3600, .. })),
            "{err:?}"
        );
        let lenient = verifier.with_tolerance(Duration::from_secs(7200));
        assert_eq!(lenient.verify_at(&stale, body, now), Ok(()));
    }
}
