//! [`WebhookPublisher`]: posts outbox events to an HTTP endpoint.

use std::error::Error as _;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use proclaim_core::{Event, OutboxRecord, PublishError, Publisher, redact_url};
use reqwest::Client;
use rustls_platform_verifier::BuilderVerifierExt as _;

use crate::{
    ContentMode, STRUCTURED_CONTENT_TYPE, UrlTemplate, WEBHOOK_ID, WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP, WebhookConfig, WebhookError, headers,
};

/// How much of an error answer's body goes into the error message.
const SNIPPET_LEN: usize = 200;
/// How much of a successful answer's body is read, so that the connection
/// can be reused; a longer body is dropped with its connection.
const DRAIN_LEN: usize = 64 * 1024;

/// Posts outbox events to an HTTP endpoint, one request per event.
///
/// Each event is posted to the URL rendered from [`WebhookConfig::url`], as
/// a CloudEvent in the configured [`ContentMode`], with the extra
/// [`WebhookConfig::headers`] and, with a [`WebhookConfig::secret`], the
/// Standard Webhooks headers `webhook-id` (the event id), `webhook-timestamp`
/// and `webhook-signature` (computed anew for every attempt).
/// [`Publisher::publish`] returns `Ok` only on a `2xx` answer.
///
/// Failures are classified for the relay:
///
/// | outcome | error |
/// |---|---|
/// | `2xx` | none: delivered |
/// | `408`, `429`, `5xx`; no connection, reset, no answer within [`WebhookConfig::timeout`] | transient, with the answer's `Retry-After` (seconds or an HTTP date, at most [`WebhookConfig::max_retry_after`]) |
/// | `3xx` | permanent, naming the `Location` (redirects are not followed) |
/// | other `4xx` | permanent, with the status and the start of the answer's body |
/// | an event whose URL or headers cannot be formed | permanent |
///
/// Receivers deduplicate by the event id (`webhook-id`, also `ce-id` or the
/// body's `id`): an event is posted again after a failure between the
/// server's processing and its answer. Every request is bounded by
/// [`WebhookConfig::timeout`]; connections are kept alive and reused.
/// Proxies set in the `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` environment
/// variables are used.
///
/// The publisher is cheap to clone; clones share one connection pool.
#[derive(Clone)]
pub struct WebhookPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: WebhookConfig,
    template: UrlTemplate,
}

impl fmt::Debug for WebhookPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookPublisher")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl WebhookPublisher {
    /// Checks the configuration and sets up the HTTP client. Nothing is sent
    /// yet: an unreachable endpoint shows up as transient publish errors.
    ///
    /// TLS uses rustls with the operating system's certificate roots, and the
    /// process's default rustls crypto provider if one is installed, else
    /// *ring*. Logs a warning when no secret is configured.
    pub fn new(config: WebhookConfig) -> Result<Self, WebhookError> {
        config.validate()?;
        let template = config.template()?;
        let mut defaults = HeaderMap::new();
        defaults.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("proclaim-webhook/", env!("CARGO_PKG_VERSION"))),
        );
        // Configured headers (already marked sensitive) may replace the
        // user agent.
        defaults.extend(config.header_map()?);

        let mut builder = Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .default_headers(defaults)
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .referer(false);
        builder = if config.idle_timeout.is_zero() {
            builder.pool_max_idle_per_host(0)
        } else {
            builder.pool_idle_timeout(config.idle_timeout)
        };
        let client = builder.build().map_err(|e| WebhookError::Client {
            reason: describe(&e),
            source: Some(e.without_url().into()),
        })?;
        if config.secret.is_none() {
            tracing::warn!(
                url = %config.redacted_url(),
                "webhook requests will not be signed: set a secret so that receivers can \
                 reject forged or altered events"
            );
        }
        tracing::debug!(url = %config.redacted_url(), mode = ?config.mode, "webhook publisher ready");
        Ok(WebhookPublisher {
            inner: Arc::new(Inner {
                client,
                config,
                template,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WebhookConfig {
        &self.inner.config
    }

    /// The request body and the headers that describe the event.
    fn encode(&self, event: &Event) -> Result<(HeaderMap, Bytes), String> {
        let mut headers = HeaderMap::new();
        let body = match self.inner.config.mode {
            ContentMode::Binary => {
                headers::encode_binary(event, &mut headers).map_err(|e| e.to_string())?;
                Bytes::copy_from_slice(event.data().get().as_bytes())
            }
            ContentMode::Structured => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
                );
                Bytes::from(event.to_cloudevent_json())
            }
        };
        if let Some(secret) = &self.inner.config.secret {
            let id = event.id().to_string();
            let timestamp = chrono::Utc::now().timestamp();
            let signature = secret.sign(&id, timestamp, &body);
            for (name, value) in [
                (WEBHOOK_ID, id),
                (WEBHOOK_TIMESTAMP, timestamp.to_string()),
                (WEBHOOK_SIGNATURE, signature),
            ] {
                // A UUID, a number and base64: always valid header values.
                let value = HeaderValue::from_str(&value)
                    .map_err(|e| format!("header {name} cannot be written: {e}"))?;
                headers.insert(name, value);
            }
        }
        Ok((headers, body))
    }

    /// Turns a non-2xx answer into a classified error.
    async fn refused(&self, response: reqwest::Response, what: &str) -> PublishError {
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(header::LOCATION)
                .map(|l| redact_url(&String::from_utf8_lossy(l.as_bytes())))
                .unwrap_or_else(|| "nowhere (no Location header)".into());
            return PublishError::permanent(format!(
                "{what}: the server answered {} redirecting to {location}; redirects are not \
                 followed: configure the final URL",
                show(status)
            ));
        }
        let retry_after = retry_after(response.headers(), SystemTime::now())
            .map(|d| d.min(self.inner.config.max_retry_after));
        let snippet = snippet(response).await;
        let message = format!("{what}: the server answered {}{snippet}", show(status));
        if is_transient(status) {
            let error = PublishError::transient(message);
            match retry_after {
                Some(delay) => error.with_retry_after(delay),
                None => error,
            }
        } else {
            PublishError::permanent(message)
        }
    }

    /// Classifies a request that got no answer.
    fn failed(&self, err: reqwest::Error, what: &str) -> PublishError {
        let config = &self.inner.config;
        let reason = if err.is_timeout() && err.is_connect() {
            format!(
                "could not connect within the connect timeout of {:?}",
                config.connect_timeout
            )
        } else if err.is_timeout() {
            format!("no answer within the timeout of {:?}", config.timeout)
        } else if err.is_connect() {
            format!("cannot connect: {}", describe(&err))
        } else {
            describe(&err)
        };
        let message = format!("{what}: {reason}");
        let error = if err.is_builder() {
            PublishError::permanent(message)
        } else {
            PublishError::transient(message)
        };
        error.with_source(err.without_url())
    }
}

impl Publisher for WebhookPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let event = &record.event;
        let id = event.id();
        let url =
            self.inner.template.render(event).map_err(|e| {
                PublishError::permanent(format!("event {id} cannot be posted: {e}"))
            })?;
        let shown = redact_url(url.as_str());
        let what = format!("cannot deliver event {id} to {shown}");
        let (headers, body) = self
            .encode(event)
            .map_err(|e| PublishError::permanent(format!("{what}: {e}")))?;
        let result = self
            .inner
            .client
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let error = match result {
            Ok(response) if response.status().is_success() => {
                let status = response.status();
                drain(response).await;
                tracing::debug!(
                    event_id = %id,
                    sequence = record.sequence,
                    url = %shown,
                    status = status.as_u16(),
                    "event delivered"
                );
                return Ok(());
            }
            Ok(response) => self.refused(response, &what).await,
            Err(e) => self.failed(e, &what),
        };
        tracing::debug!(
            event_id = %id,
            transient = error.is_transient(),
            retry_after = ?error.retry_after(),
            error = %error.full_message(),
            "webhook delivery failed"
        );
        Err(error)
    }
}

/// The rustls client configuration: the process's default crypto provider
/// (else *ring*), the platform's certificate verifier, HTTP/1.1 by ALPN.
fn tls_config() -> Result<rustls::ClientConfig, WebhookError> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let tls_error = |e: rustls::Error| WebhookError::Client {
        reason: format!("TLS: {e}"),
        source: Some(e.into()),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_platform_verifier()
        .map_err(tls_error)?
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// 408 (request timeout), 429 (too many requests) and server errors may
/// succeed later; every other refusal is about the request itself.
fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || !status.is_client_error()
}

/// `503 Service Unavailable`.
fn show(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The `Retry-After` of an answer: delay-seconds or an HTTP date (a date in
/// the past is no delay).
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `: "<the first 200 bytes of the body>…"`, or nothing for an empty body.
async fn snippet(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() <= SNIPPET_LEN {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    if body.is_empty() {
        return String::new();
    }
    let cut = body.len() > SNIPPET_LEN;
    body.truncate(SNIPPET_LEN);
    let text = String::from_utf8_lossy(&body);
    // A cut inside a UTF-8 sequence shows as a replacement character.
    let text = text.trim_end_matches('\u{fffd}');
    format!(": {text:?}{}", if cut { "…" } else { "" })
}

/// Reads a successful answer's body (up to [`DRAIN_LEN`]) so that its
/// connection can be reused.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while read <= DRAIN_LEN {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => return,
        }
    }
}

/// A one-line reason for a failed request: the innermost cause, and for OS
/// errors their kind ("connection refused").
fn describe(err: &reqwest::Error) -> String {
    let mut innermost: &(dyn std::error::Error + 'static) = err;
    let mut next = err.source();
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error().is_some()
        {
            return io.kind().to_string();
        }
        innermost = e;
        next = e.source();
    }
    innermost.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        for transient in [408, 429, 500, 502, 503, 504, 599] {
            let status = StatusCode::from_u16(transient).ok();
            assert_eq!(status.map(is_transient), Some(true), "{transient}");
        }
        for permanent in [400, 401, 403, 404, 409, 410, 413, 422] {
            let status = StatusCode::from_u16(permanent).ok();
            assert_eq!(status.map(is_transient), Some(false), "{permanent}");
        }
    }

    #[test]
    fn reads_retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(value));
            retry_after(&headers, now)
        };
        assert_eq!(with("3"), Some(Duration::from_secs(3)));
        assert_eq!(with(" 120 "), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&later) {
            headers.insert(header::RETRY_AFTER, v);
        }
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(90)));
        assert_eq!(
            with("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a past date"
        );
        assert_eq!(with("soon"), None);
        assert_eq!(with("-1"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
