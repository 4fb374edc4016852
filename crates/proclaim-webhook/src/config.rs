//! [`WebhookConfig`]: where and how events are posted; [`WebhookSecret`]: the
//! signing key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderName, HeaderValue};
use proclaim_core::{ConfigError, redact_url};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::UrlTemplate;

/// How an event is laid out in the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// CloudEvents binary content mode (the default): the attributes in
    /// `ce-*` headers (percent-encoded as the CloudEvents HTTP binding
    /// requires), the event's `datacontenttype` as `Content-Type`, and the
    /// event's data as the body, byte for byte.
    #[default]
    Binary,
    /// CloudEvents structured content mode: the whole event as JSON, with
    /// `Content-Type: application/cloudevents+json`. The signature then
    /// covers every attribute.
    Structured,
}

/// Settings of a [`WebhookPublisher`](crate::WebhookPublisher).
///
/// Every field but [`url`](WebhookConfig::url) has a default; change what you
/// need with the `with_*` methods. [`WebhookConfig::validate`] runs when the
/// publisher is built. `Debug` shows neither the secret nor the values of
/// [`headers`](WebhookConfig::headers).
///
/// ```
/// use std::time::Duration;
/// use proclaim_webhook::{ContentMode, WebhookConfig, WebhookSecret};
///
/// let config = WebhookConfig::new("https://hooks.example.com/events/{type}?key={subject}")
///     .with_mode(ContentMode::Structured)
///     .with_secret(WebhookSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?)
///     .with_header("Authorization", "Bearer s3cret")
///     .with_timeout(Duration::from_secs(3));
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert!(WebhookConfig::new("https://hooks.example.com/{kind}").validate().is_err());
/// # Ok::<(), proclaim_core::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// The endpoint every event is posted to (required; `http` or `https`).
    /// It may contain the placeholders `{type}` and `{subject}` in its path
    /// or query, filled with the event's attributes (percent-encoded); see
    /// [`UrlTemplate`]. Credentials in the URL (`https://user:pw@host/`) are
    /// sent, and hidden in messages.
    pub url: String,
    /// Binary (default) or structured CloudEvents content mode.
    pub mode: ContentMode,
    /// The Standard Webhooks signing secret (`whsec_<base64>`). Without one
    /// requests are not signed (a warning is logged when the publisher is
    /// built).
    pub secret: Option<WebhookSecret>,
    /// Extra headers sent with every request, e.g. `Authorization`. Their
    /// values are never logged or shown by `Debug`. They may not replace the
    /// headers the publisher sets itself (`Content-Type`, `ce-*`,
    /// `webhook-*`, `Host`, `Content-Length`, …).
    pub headers: BTreeMap<String, String>,
    /// Upper bound of one request, from connecting to the end of the answer
    /// (default 10 s). A server that never answers gives a transient error
    /// after this long.
    #[serde(with = "proclaim_core::duration::human")]
    pub timeout: Duration,
    /// Upper bound of establishing a connection, TLS included (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// How long an idle connection is kept for reuse (default 30 s). Keep it
    /// below the server's own keep-alive timeout; zero turns reuse off.
    #[serde(with = "proclaim_core::duration::human")]
    pub idle_timeout: Duration,
    /// Upper bound of a server's `Retry-After` (default 1 h): a longer one is
    /// cut to this, so that a misbehaving server cannot park an event for
    /// days.
    #[serde(with = "proclaim_core::duration::human")]
    pub max_retry_after: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            mode: ContentMode::Binary,
            secret: None,
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(3600),
        }
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hidden<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Hidden<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.keys().map(|k| (k, "***")))
                    .finish()
            }
        }
        f.debug_struct("WebhookConfig")
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("secret", &self.secret)
            .field("headers", &Hidden(&self.headers))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_retry_after", &self.max_retry_after)
            .finish()
    }
}

/// Headers the publisher sets itself; extra headers may not replace them.
const RESERVED_HEADERS: [&str; 9] = [
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "upgrade",
    crate::WEBHOOK_ID,
    crate::WEBHOOK_TIMESTAMP,
    crate::WEBHOOK_SIGNATURE,
];

impl WebhookConfig {
    /// The defaults, posting to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        WebhookConfig::default().with_url(url)
    }
    /// Sets [`WebhookConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`WebhookConfig::mode`].
    pub fn with_mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }
    /// Sets [`WebhookConfig::secret`].
    pub fn with_secret(mut self, secret: WebhookSecret) -> Self {
        self.secret = Some(secret);
        self
    }
    /// Clears [`WebhookConfig::secret`]: requests are not signed.
    pub fn without_secret(mut self) -> Self {
        self.secret = None;
        self
    }
    /// Adds (or replaces) one of [`WebhookConfig::headers`].
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    /// Sets [`WebhookConfig::timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Sets [`WebhookConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`WebhookConfig::idle_timeout`].
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }
    /// Sets [`WebhookConfig::max_retry_after`].
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Checks every setting: the URL is an `http`/`https` URL whose
    /// placeholders are known and lie in its path or query, each extra header
    /// is a valid, non-reserved name with a valid value, and the timeouts are
    /// not zero. Messages name headers but never show their values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.template()?;
        self.header_map()?;
        if self.timeout.is_zero() {
            return Err(ConfigError("timeout must be greater than zero".into()));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError(
                "connect_timeout must be greater than zero".into(),
            ));
        }
        if self.max_retry_after.is_zero() {
            return Err(ConfigError(
                "max_retry_after must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The parsed [`WebhookConfig::url`].
    pub fn template(&self) -> Result<UrlTemplate, ConfigError> {
        UrlTemplate::parse(&self.url)
    }

    /// [`WebhookConfig::url`] with any credentials replaced by `***`, for
    /// messages (see [`proclaim_core::redact_url`]).
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// [`WebhookConfig::headers`] as header values marked sensitive (so that
    /// the HTTP stack does not show them either).
    pub(crate) fn header_map(&self) -> Result<http::HeaderMap, ConfigError> {
        let mut map = http::HeaderMap::new();
        for (name, value) in &self.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError(format!("headers: {name:?} is not a valid HTTP header name"))
            })?;
            if RESERVED_HEADERS.contains(&header.as_str()) || header.as_str().starts_with("ce-") {
                return Err(ConfigError(format!(
                    "headers: {name} is set by the publisher itself and cannot be configured"
                )));
            }
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                ConfigError(format!(
                    "headers: the value of {name} is not a valid HTTP header value \
                     (visible ASCII only)"
                ))
            })?;
            value.set_sensitive(true);
            map.insert(header, value);
        }
        Ok(map)
    }
}

/// A Standard Webhooks signing secret: `whsec_` followed by the base64 key
/// (the prefix is optional), at least 16 bytes once decoded (24 to 64 are
/// recommended).
///
/// It is checked when created (also when read from a configuration file) and
/// never shown: `Debug` prints `***`, and no error message contains it.
/// Serializing writes the text it was created from.
///
/// ```
/// use proclaim_webhook::WebhookSecret;
///
/// let secret = WebhookSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
/// assert_eq!(format!("{secret:?}"), "WebhookSecret(***)");
/// assert!(WebhookSecret::new("whsec_not base64!").is_err());
/// # Ok::<(), proclaim_core::ConfigError>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookSecret {
    text: String,
    key: Vec<u8>,
    /// HMAC-SHA256 keyed with `key`, cloned for each message.
    keyed: Hmac<Sha256>,
}

impl PartialEq for WebhookSecret {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for WebhookSecret {}

/// The Standard Webhooks prefix of a secret.
const SECRET_PREFIX: &str = "whsec_";
/// The shortest key accepted, in bytes.
const MIN_KEY_LEN: usize = 16;

/// Standard base64, with or without padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl WebhookSecret {
    /// Reads a secret: `whsec_<base64>` or the bare base64 key.
    pub fn new(text: impl Into<String>) -> Result<Self, ConfigError> {
        let text = text.into();
        let encoded = text.trim();
        let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
        // The decoder's own message would quote a character of the secret.
        let key = BASE64.decode(encoded).map_err(|_| {
            ConfigError(
                "secret is not valid base64 (expected whsec_ followed by the base64 key)".into(),
            )
        })?;
        if key.len() < MIN_KEY_LEN {
            return Err(ConfigError(format!(
                "secret is too short: {} bytes, at least {MIN_KEY_LEN} are needed \
                 (24 to 64 are recommended)",
                key.len()
            )));
        }
        // HMAC takes keys of any length; this error cannot happen.
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
            .map_err(|_| ConfigError("secret cannot key HMAC-SHA256".into()))?;
        Ok(WebhookSecret { text, key, keyed })
    }

    /// Makes a secret from raw key bytes (at least 16).
    pub fn from_key(key: &[u8]) -> Result<Self, ConfigError> {
        WebhookSecret::new(format!("{SECRET_PREFIX}{}", BASE64.encode(key)))
    }

    /// The Standard Webhooks signature of a message: `v1,<base64 of
    /// HMAC-SHA256("{id}.{timestamp}.{body}")>`, as the `webhook-signature`
    /// header carries it.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", BASE64.encode(tag))
    }

    /// The HMAC state after the signed content.
    pub(crate) fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// Decodes the base64 of one signature.
    pub(crate) fn decode_signature(encoded: &str) -> Option<Vec<u8>> {
        BASE64.decode(encoded).ok()
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

impl TryFrom<String> for WebhookSecret {
    type Error = ConfigError;
    fn try_from(text: String) -> Result<Self, ConfigError> {
        WebhookSecret::new(text)
    }
}

impl From<WebhookSecret> for String {
    fn from(secret: WebhookSecret) -> String {
        secret.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn secret() -> WebhookSecret {
        match WebhookSecret::new(SECRET) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_need_only_a_url() {
        assert!(WebhookConfig::default().validate().is_err());
        let config = WebhookConfig::new("http://127.0.0.1:8080/events");
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.mode, ContentMode::Binary);
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert!(config.secret.is_none());
    }

    #[test]
    fn round_trips_through_serde_with_humantime() -> Result<(), serde_json::Error> {
        let config: WebhookConfig = serde_json::from_str(&format!(
            r#"{{"url":"https://h.example/{{type}}","mode":"structured","secret":"{SECRET}",
                "headers":{{"Authorization":"Bearer t0ken"}},"timeout":"2s","connect_timeout":"250ms"}}"#
        ))?;
        let expected = WebhookConfig::new("https://h.example/{type}")
            .with_mode(ContentMode::Structured)
            .with_secret(secret())
            .with_header("Authorization", "Bearer t0ken")
            .with_timeout(Duration::from_secs(2))
            .with_connect_timeout(Duration::from_millis(250));
        assert_eq!(config, expected);
        assert_eq!(config.validate(), Ok(()));

        let json = serde_json::to_value(&config)?;
        assert_eq!(json["timeout"], "2s");
        assert_eq!(json["connect_timeout"], "250ms");
        assert_eq!(json["idle_timeout"], "30s");
        assert_eq!(json["max_retry_after"], "1h");
        assert_eq!(json["mode"], "structured");
        assert_eq!(json["secret"], SECRET);
        let back: WebhookConfig = serde_json::from_value(json)?;
        assert_eq!(back, config);

        assert!(serde_json::from_str::<WebhookConfig>(r#"{"uri":"http://h/"}"#).is_err());
        assert!(serde_json::from_str::<WebhookConfig>(r#"{"mode":"batch"}"#).is_err());
        Ok(())
    }

    #[test]
    fn an_invalid_secret_is_rejected_without_showing_it() {
        for bad in [
            "whsec_",
            "whsec_c2hvcnQ=",
            "whsec_!!notbase64!!",
            "n0t base64 at all",
        ] {
            let err = WebhookSecret::new(bad).err().map(|e| e.to_string());
            let msg = err.unwrap_or_else(|| panic!("{bad:?} was accepted"));
            let body = bad.trim_start_matches("whsec_");
            assert!(body.is_empty() || !msg.contains(body), "{msg}");
        }
        let json = r#"{"url":"http://h/","secret":"whsec_!!hidden-value!!"}"#;
        let msg = serde_json::from_str::<WebhookConfig>(json)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("not valid base64"), "{msg}");
        assert!(!msg.contains("hidden-value"), "{msg}");
        // With or without the prefix and padding.
        let bare = SECRET.trim_start_matches("whsec_");
        assert_eq!(
            WebhookSecret::new(bare).ok().map(|s| s.key),
            Some(secret().key)
        );
        assert!(WebhookSecret::new("whsec_MTIzNDU2Nzg5MDEyMzQ1Ng").is_ok());
        assert!(WebhookSecret::from_key(&[7; 32]).is_ok());
        assert!(WebhookSecret::from_key(&[7; 8]).is_err());
    }

    #[test]
    fn secrets_and_header_values_never_appear_in_debug() {
        let config = WebhookConfig::new("https://user:pa55word@h.example/x")
            .with_secret(secret())
            .with_header("Authorization", "Bearer t0ken");
        let shown = format!("{config:?} {:?}", config.secret);
        for hidden in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "t0ken", "pa55word"] {
            assert!(!shown.contains(hidden), "{shown}");
        }
        assert!(shown.contains("Authorization"), "{shown}");
        assert!(shown.contains("https://***@h.example/x"), "{shown}");
    }

    #[test]
    fn rejects_bad_headers_without_showing_values() {
        let base = WebhookConfig::new("http://h.example/");
        for name in [
            "Content-Type",
            "ce-id",
            "CE-Type",
            "webhook-signature",
            "Host",
            "bad name",
            "",
        ] {
            let result = base.clone().with_header(name, "v").validate();
            assert!(result.is_err(), "{name:?} was accepted");
        }
        let err = base
            .clone()
            .with_header("X-Token", "line\nbreak-s3cret")
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("X-Token") && !err.contains("s3cret"), "{err}");
        assert!(
            base.with_header("X-Api-Key", "k")
                .with_header("User-Agent", "acme/1")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn rejects_zero_durations_and_bad_urls() {
        let base = WebhookConfig::new("http://h.example/");
        assert!(
            base.clone()
                .with_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_connect_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_max_retry_after(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_idle_timeout(Duration::ZERO)
                .validate()
                .is_ok()
        );
        for bad in [
            "",
            "h.example/x",
            "ftp://h.example/",
            "http:///x",
            "http://h/{kind}",
        ] {
            assert!(base.clone().with_url(bad).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signs_as_standard_webhooks_does() {
        // The example of the Standard Webhooks specification's test vectors.
        let secret = secret();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
