//! [`RedisConfig`]: where and how events are appended.

use std::time::Duration;

use proclaim_core::{ConfigError, redact_url};
use serde::{Deserialize, Serialize};

use crate::StreamTemplate;

/// Redis's own default `proto-max-bulk-len`: the largest single argument
/// (here, the `data` field) a default server accepts.
const DEFAULT_MAX_ENTRY_BYTES: u64 = 512 * 1024 * 1024;

/// Settings of a [`RedisPublisher`](crate::RedisPublisher).
///
/// Every field has a default; change what you need with the `with_*` methods.
/// [`RedisConfig::validate`] runs when the publisher is built.
///
/// ```
/// use std::time::Duration;
/// use proclaim_redis::RedisConfig;
///
/// let config = RedisConfig::default()
///     .with_url("redis://relay:s3cret@redis.internal:6379/0")
///     .with_stream("campaign:{type}")
///     .with_max_len(Some(100_000))
///     .with_connect_timeout(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// assert_eq!(config.redacted_url(), "redis://***@redis.internal:6379/0");
/// assert!(RedisConfig::default().with_stream("campaign:{kind}").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Server URL (default `redis://127.0.0.1:6379`):
    /// `redis://[<user>][:<password>@]<host>[:<port>][/<db>][?protocol=resp3]`,
    /// or `redis+unix:///path/to/socket[?db=<n>&user=<u>&pass=<p>]`.
    /// Credentials are used, and hidden in every message. TLS (`rediss://`)
    /// is not supported by this crate yet.
    pub url: String,
    /// Template of the stream key each event is appended to (default
    /// `proclaim:events`); see [`StreamTemplate`] for the placeholders. The
    /// stream is created by the first `XADD`.
    pub stream: String,
    /// Trim each stream to about this many entries on every append
    /// (`XADD … MAXLEN ~ n`; default none, the stream grows until consumers
    /// or operators trim it). Trimming is approximate: Redis removes whole
    /// macro nodes only, so a stream may hold somewhat more than `n`
    /// entries. Entries are trimmed whether or not every consumer group has
    /// read them.
    pub max_len: Option<u64>,
    /// Largest entry the publisher sends, in bytes of field names and
    /// values (default 512 MiB, Redis's default `proto-max-bulk-len`). A
    /// larger event is refused as a permanent error without being sent.
    /// The publisher also reads the server's `proto-max-bulk-len` when it
    /// connects (if the user may run `CONFIG GET`) and refuses data larger
    /// than that the same way; where it cannot, set this to the server's
    /// limit, because a server that receives a larger argument closes the
    /// connection, which the client may only see as a (transient) reset.
    pub max_entry_bytes: u64,
    /// Upper bound of one connection attempt: TCP connect, authentication
    /// and the client's hand-shake (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// Upper bound of waiting for the answer to one command, e.g. an `XADD`
    /// (default 10 s). A publish fails, transiently, after at most
    /// `connect_timeout + response_timeout`.
    #[serde(with = "proclaim_core::duration::human")]
    pub response_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            stream: "proclaim:events".into(),
            max_len: None,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
        }
    }
}

impl RedisConfig {
    /// Sets [`RedisConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`RedisConfig::stream`].
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }
    /// Sets [`RedisConfig::max_len`].
    pub fn with_max_len(mut self, max_len: Option<u64>) -> Self {
        self.max_len = max_len;
        self
    }
    /// Sets [`RedisConfig::max_entry_bytes`].
    pub fn with_max_entry_bytes(mut self, bytes: u64) -> Self {
        self.max_entry_bytes = bytes;
        self
    }
    /// Sets [`RedisConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`RedisConfig::response_timeout`].
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Checks every setting: the URL is a Redis URL the client accepts, the
    /// stream template is valid, `max_len` and `max_entry_bytes` are not zero,
    /// and the timeouts are not zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client()?;
        self.template()?;
        if self.max_len == Some(0) {
            return Err(ConfigError(
                "max_len must be greater than zero (or unset, for no trimming)".into(),
            ));
        }
        if self.max_entry_bytes == 0 {
            return Err(ConfigError(
                "max_entry_bytes must be greater than zero".into(),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError(
                "connect_timeout must be greater than zero".into(),
            ));
        }
        if self.response_timeout.is_zero() {
            return Err(ConfigError(
                "response_timeout must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The parsed [`RedisConfig::stream`] template.
    pub fn template(&self) -> Result<StreamTemplate, ConfigError> {
        StreamTemplate::parse(&self.stream)
    }

    /// [`RedisConfig::url`] with any credentials replaced by `***`, for
    /// messages (see [`proclaim_core::redact_url`]).
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.trim())
    }

    /// The longest a single call may take: waiting for a connection, then
    /// for the answer.
    pub(crate) fn call_bound(&self) -> Duration {
        self.connect_timeout.saturating_add(self.response_timeout)
    }

    /// A client for [`RedisConfig::url`] (nothing is connected yet).
    pub(crate) fn client(&self) -> Result<redis::Client, ConfigError> {
        let url = self.url.trim();
        let fail = |reason: &str| {
            ConfigError(format!(
                "url {:?} is invalid: {reason}",
                self.redacted_url()
            ))
        };
        if url.is_empty() {
            return Err(fail("it is empty"));
        }
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "redis" | "valkey" | "redis+unix" | "valkey+unix" | "unix" => {}
            "rediss" | "valkeys" => {
                return Err(fail(
                    "TLS (rediss://) is not supported by proclaim-redis yet; \
                     use redis:// (e.g. through a TLS tunnel)",
                ));
            }
            _ if !url.contains("://") => {
                return Err(fail("it has no scheme (expected redis://host:port)"));
            }
            _ => {
                return Err(fail(&format!(
                    "the scheme {scheme:?} is not a Redis scheme (expected redis:// or redis+unix://)"
                )));
            }
        }
        // The client's messages name neither the URL nor its credentials.
        redis::Client::open(url).map_err(|e| {
            let reason = match e.detail() {
                Some(detail) => format!("{}: {}", e.category(), detail),
                None => e.to_string(),
            };
            fail(&scrub(&reason, &self.url))
        })
    }
}

/// `text` without the password of `url`, should a message ever contain it.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut out = text.to_owned();
    for secret in secrets(url) {
        if !secret.is_empty() {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The password of `url` (user information or `pass=`), raw and decoded.
fn secrets(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some(at) = authority.rfind('@')
        && let Some((_, password)) = authority[..at].split_once(':')
    {
        found.push(password.to_owned());
    }
    if let Some((_, query)) = rest.split_once('?') {
        for pair in query.split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && name.eq_ignore_ascii_case("pass")
            {
                found.push(value.to_owned());
            }
        }
    }
    let decoded: Vec<String> = found.iter().map(|s| percent_decode(s)).collect();
    found.extend(decoded);
    // Longest first, so that a secret containing another is replaced whole.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes.get(i), bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(b'%'), Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or_default() * 16 + hex(l).unwrap_or_default();
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 3;
            }
            (Some(&b), _, _) => {
                out.push(b);
                i += 1;
            }
            (None, _, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = RedisConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.url, "redis://127.0.0.1:6379");
        assert_eq!(config.stream, "proclaim:events");
        assert_eq!(config.max_len, None);
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.response_timeout, Duration::from_secs(10));
        assert_eq!(config.call_bound(), Duration::from_secs(15));
    }

    #[test]
    fn deserializes_with_defaults_and_humantime() -> Result<(), serde_json::Error> {
        let config: RedisConfig = serde_json::from_str(
            r#"{"stream":"campaign:{type}","max_len":1000,"connect_timeout":"250ms","response_timeout":"1m"}"#,
        )?;
        assert_eq!(
            config,
            RedisConfig::default()
                .with_stream("campaign:{type}")
                .with_max_len(Some(1000))
                .with_connect_timeout(Duration::from_millis(250))
                .with_response_timeout(Duration::from_secs(60))
        );
        let json = serde_json::to_value(RedisConfig::default())?;
        assert_eq!(json["connect_timeout"], "5s");
        assert_eq!(json["response_timeout"], "10s");
        assert_eq!(json["max_len"], serde_json::Value::Null);
        assert!(serde_json::from_str::<RedisConfig>(r#"{"stream_name":"x"}"#).is_err());
        assert!(serde_json::from_str::<RedisConfig>(r#"{"connect_timeout":"soon"}"#).is_err());
        Ok(())
    }

    #[test]
    fn round_trips_through_serde() -> Result<(), serde_json::Error> {
        let config = RedisConfig::default()
            .with_url("redis://user:pw@h:6380/2")
            .with_stream("{{app}}:{source}:{type}")
            .with_max_len(Some(5))
            .with_max_entry_bytes(1 << 20)
            .with_connect_timeout(Duration::from_millis(1500))
            .with_response_timeout(Duration::from_secs(90));
        let text = serde_json::to_string(&config)?;
        assert_eq!(serde_json::from_str::<RedisConfig>(&text)?, config);
        Ok(())
    }

    #[test]
    fn rejects_bad_settings() {
        let base = RedisConfig::default();
        let bad = [
            base.clone().with_url(""),
            base.clone().with_url("127.0.0.1:6379"),
            base.clone().with_url("http://127.0.0.1:6379"),
            base.clone().with_url("rediss://127.0.0.1:6379"),
            base.clone().with_url("redis://127.0.0.1:6379/notadb"),
            base.clone().with_url("redis://0.0.0.0:6379"),
            base.clone().with_stream(""),
            base.clone().with_stream("p:{kind}"),
            base.clone().with_stream("p:{type"),
            base.clone().with_max_len(Some(0)),
            base.clone().with_max_entry_bytes(0),
            base.clone().with_connect_timeout(Duration::ZERO),
            base.clone().with_response_timeout(Duration::ZERO),
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} was accepted");
        }
        for good in [
            "redis://localhost",
            "redis://:pw@127.0.0.1:6379/3",
            "redis://127.0.0.1:6379/?protocol=resp3",
            "valkey://127.0.0.1",
            "redis+unix:///run/redis.sock?db=1",
        ] {
            let config = base.clone().with_url(good);
            assert_eq!(config.validate(), Ok(()), "{good}");
        }
        let msg = base
            .with_url("rediss://u:s3cret@h:6380")
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("TLS") && msg.contains("rediss://***@h:6380"),
            "{msg}"
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn hides_credentials() {
        assert_eq!(
            scrub("said s3cret and p@ss", "redis://u:p%40ss@h?x=1&pass=s3cret"),
            "said *** and ***"
        );
        let msg = RedisConfig::default()
            .with_url("redis://u:s3cret@h:6379/notadb")
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("redis://***@h:6379/notadb") && !msg.contains("s3cret"),
            "{msg}"
        );
    }
}
