//! [`NatsConfig`]: where and how events are published.

use std::time::Duration;

use async_nats::ServerAddr;
use proclaim_core::{ConfigError, redact_url};
use serde::{Deserialize, Serialize};

use crate::SubjectTemplate;
use crate::subject::check_tokens;

/// Settings of a [`NatsPublisher`](crate::NatsPublisher).
///
/// Every field has a default; change what you need with the `with_*` methods.
/// [`NatsConfig::validate`] runs when the publisher is built.
///
/// ```
/// use std::time::Duration;
/// use proclaim_nats::NatsConfig;
///
/// let config = NatsConfig::default()
///     .with_url("nats://nats.internal:4222")
///     .with_stream("CAMPAIGN")
///     .with_subject_prefix("campaign")
///     .with_subject_template("{prefix}.{source}.{type}")
///     .with_connect_timeout(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// assert!(NatsConfig::default().with_subject_template("{prefix}.{kind}").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL (default `nats://127.0.0.1:4222`). Several servers of one
    /// cluster may be given, separated by commas. Credentials in the URL
    /// (`nats://user:password@host`) are used, and hidden in error messages.
    pub url: String,
    /// JetStream stream that stores the events (default `PROCLAIM`).
    pub stream: String,
    /// First token(s) of every subject (default `proclaim`): the stream
    /// created by [`NatsConfig::create_stream`] captures `<prefix>.>`.
    pub subject_prefix: String,
    /// How an event's subject is built (default `{prefix}.{type}`); see
    /// [`SubjectTemplate`] for the placeholders.
    pub subject_template: String,
    /// Create the stream at start-up if it does not exist (default `false`:
    /// a missing stream is an error, as streams are usually provisioned by
    /// operators).
    pub create_stream: bool,
    /// Upper bound of the initial connection (default 5 s). The initial
    /// connection is not retried; later disconnections are, forever.
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// JetStream duplicate window of a stream created by this publisher
    /// (default 2 min): redeliveries of an event within it are dropped by the
    /// server, by `Nats-Msg-Id`.
    #[serde(with = "proclaim_core::duration::human")]
    pub duplicate_window: Duration,
    /// Upper bound of one JetStream request: a publish waiting for its ack,
    /// a stream look-up (default 60 s). The relay's own `publish_timeout`
    /// (default 10 s) normally cuts a publish first; this bounds a publisher
    /// used without a relay.
    #[serde(with = "proclaim_core::duration::human")]
    pub ack_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            stream: "PROCLAIM".into(),
            subject_prefix: "proclaim".into(),
            subject_template: "{prefix}.{type}".into(),
            create_stream: false,
            connect_timeout: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(60),
        }
    }
}

impl NatsConfig {
    /// Sets [`NatsConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`NatsConfig::stream`].
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }
    /// Sets [`NatsConfig::subject_prefix`].
    pub fn with_subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }
    /// Sets [`NatsConfig::subject_template`].
    pub fn with_subject_template(mut self, template: impl Into<String>) -> Self {
        self.subject_template = template.into();
        self
    }
    /// Sets [`NatsConfig::create_stream`].
    pub fn with_create_stream(mut self, create: bool) -> Self {
        self.create_stream = create;
        self
    }
    /// Sets [`NatsConfig::ack_timeout`].
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
    /// Sets [`NatsConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`NatsConfig::duplicate_window`].
    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Checks every setting: the URL parses, the stream name is a valid
    /// JetStream name, the prefix is valid subject tokens without wildcards,
    /// the template is valid, and the durations are not zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server_addrs()?;
        check_stream_name(&self.stream)?;
        check_tokens(&self.subject_prefix).map_err(|reason| {
            ConfigError(format!(
                "subject_prefix {:?} is not a valid NATS subject prefix: it {reason}",
                self.subject_prefix
            ))
        })?;
        self.template()?;
        if self.connect_timeout.is_zero() {
            return Err(ConfigError(
                "connect_timeout must be greater than zero".into(),
            ));
        }
        if self.ack_timeout.is_zero() {
            return Err(ConfigError("ack_timeout must be greater than zero".into()));
        }
        if self.duplicate_window.is_zero() {
            return Err(ConfigError(
                "duplicate_window must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The parsed [`NatsConfig::subject_template`].
    pub fn template(&self) -> Result<SubjectTemplate, ConfigError> {
        SubjectTemplate::parse(&self.subject_template)
    }

    /// The subjects a stream created by this publisher captures: `<prefix>.>`.
    pub fn stream_subjects(&self) -> Vec<String> {
        vec![format!("{}.>", self.subject_prefix)]
    }

    /// The servers of [`NatsConfig::url`].
    pub(crate) fn server_addrs(&self) -> Result<Vec<ServerAddr>, ConfigError> {
        let mut addrs = Vec::new();
        for entry in self.url.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(ConfigError(format!(
                    "url {:?} names no server",
                    self.redacted_url()
                )));
            }
            let addr = entry
                .parse::<ServerAddr>()
                .map_err(|e| ConfigError(format!("url {:?} is invalid: {e}", redact_url(entry))))?;
            addrs.push(addr);
        }
        Ok(addrs)
    }

    /// [`NatsConfig::url`] with any credentials replaced by `***`, for messages
    /// (see [`proclaim_core::redact_url`]).
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(|entry| redact_url(entry.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn check_stream_name(name: &str) -> Result<(), ConfigError> {
    let fail = |reason: &str| ConfigError(format!("stream name {name:?} {reason}"));
    if name.is_empty() {
        return Err(fail("is empty"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("contains whitespace or a control character"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(fail(&format!(
            "contains {c:?} (not allowed in JetStream stream names)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = NatsConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.stream_subjects(), vec!["proclaim.>".to_owned()]);
    }

    #[test]
    fn deserializes_with_defaults_and_humantime() -> Result<(), serde_json::Error> {
        let config: NatsConfig = serde_json::from_str(
            r#"{"stream":"CAMPAIGN","create_stream":true,"connect_timeout":"250ms","duplicate_window":"10m"}"#,
        )?;
        assert_eq!(
            config,
            NatsConfig::default()
                .with_stream("CAMPAIGN")
                .with_create_stream(true)
                .with_connect_timeout(Duration::from_millis(250))
                .with_duplicate_window(Duration::from_secs(600))
        );
        let json = serde_json::to_value(NatsConfig::default())?;
        assert_eq!(json["connect_timeout"], "5s");
        assert_eq!(json["duplicate_window"], "2m");
        assert!(serde_json::from_str::<NatsConfig>(r#"{"stream_name":"X"}"#).is_err());
        Ok(())
    }

    #[test]
    fn rejects_bad_stream_names() {
        for bad in ["", "A B", "A.B", "A*", "A>", "A/B", "A\\B", "A\tB"] {
            let result = NatsConfig::default().with_stream(bad).validate();
            assert!(result.is_err(), "{bad:?} was accepted");
        }
        assert!(
            NatsConfig::default()
                .with_stream("Events_v2-x")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn rejects_bad_prefixes() {
        for bad in ["", "a b", "a..b", ".a", "a.", "*", "a.>", "a.*"] {
            let result = NatsConfig::default().with_subject_prefix(bad).validate();
            assert!(result.is_err(), "{bad:?} was accepted");
        }
        assert!(
            NatsConfig::default()
                .with_subject_prefix("acme.events")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn rejects_bad_templates_urls_and_durations() {
        let base = NatsConfig::default();
        assert!(
            base.clone()
                .with_subject_template("{prefix}.{kind}")
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_subject_template("{prefix}.{type")
                .validate()
                .is_err()
        );
        assert!(base.clone().with_url("").validate().is_err());
        assert!(
            base.clone()
                .with_url("http://127.0.0.1:4222")
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
                .with_duplicate_window(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            base.with_url("nats://a:4222, nats://b:4222")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn hides_credentials() {
        let config =
            NatsConfig::default().with_url("nats://user:s3cret@a:4222,tls://token@b/x,c:4222");
        assert_eq!(
            config.redacted_url(),
            "nats://***@a:4222,tls://***@b/x,c:4222"
        );
        let err = NatsConfig::default()
            .with_url("ftp://user:s3cret@a")
            .validate()
            .err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("ftp://***@a") && !msg.contains("s3cret"),
            "{msg}"
        );
    }
}
