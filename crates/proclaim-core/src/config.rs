//! [`RelayConfig`]: every relay setting, its default, and its validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Backoff;

/// A setting that cannot work, found before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// How a [`Relay`](crate::Relay) claims, publishes and acknowledges.
///
/// Every field has a production default; change what you need with the
/// `with_*` methods. [`RelayConfig::validate`] runs when the relay is built.
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::RelayConfig;
///
/// let config = RelayConfig::default()
///     .with_batch_size(500)
///     .with_max_attempts(5)
///     .with_retention(Some(Duration::from_secs(3600)));
/// assert!(config.validate().is_ok());
/// assert!(RelayConfig::default().with_batch_size(0).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Events claimed per batch (default 256).
    pub batch_size: usize,
    /// Publishes in flight at once within a batch (default 256). Events of the
    /// same subject are always published one after another.
    pub max_concurrent_publishes: usize,
    /// Batches being published at once (default 2): the next batch is claimed
    /// while the previous one is still being published and acknowledged.
    pub max_batches_in_flight: usize,
    /// How often an idle relay looks for events when no wake-up hint arrives
    /// (default 1 s). Wake-ups (PostgreSQL `NOTIFY`) make idle latency far lower.
    #[serde(with = "crate::duration::human")]
    pub poll_interval: Duration,
    /// After a wake-up, claim once more this much later (default 10 ms; 0
    /// turns it off). Writers that debounce their `NOTIFY` (see the
    /// PostgreSQL store's `notify_debounce`) rely on it: their commits right
    /// after a notifying one are picked up then instead of at the next poll.
    /// After a claim that was not full the relay also claims again this much
    /// later, doubling the delay with each claim that finds nothing (six at
    /// most): events held back behind another relay's in-flight events of
    /// their subject are taken as soon as those are acked.
    #[serde(with = "crate::duration::human")]
    pub wakeup_followup: Duration,
    /// How long a claim holds its events (default 30 s). A relay that dies
    /// holds them at most this long; then another relay takes them over.
    #[serde(with = "crate::duration::human")]
    pub lease: Duration,
    /// Upper bound of one publish, including the broker's ack (default 10 s).
    #[serde(with = "crate::duration::human")]
    pub publish_timeout: Duration,
    /// Attempts before an event that keeps failing is dead-lettered (default 10).
    pub max_attempts: u32,
    /// Delay between attempts of one event.
    pub backoff: Backoff,
    /// Delay between tries while the database or the broker is unavailable.
    pub outage_backoff: Backoff,
    /// `None` (default): delete each row once published. `Some(d)`: keep it
    /// marked published for `d`, then purge it.
    #[serde(with = "crate::duration::human::option")]
    pub retention: Option<Duration>,
    /// How often retained rows are purged (default 60 s).
    #[serde(with = "crate::duration::human")]
    pub purge_interval: Duration,
    /// How long a graceful shutdown waits for in-flight batches (default 30 s).
    #[serde(with = "crate::duration::human")]
    pub shutdown_timeout: Duration,
    /// How often the relay reads the outbox counts into the
    /// `proclaim_outbox_*` gauges (default 15 s).
    #[serde(with = "crate::duration::human")]
    pub stats_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 256,
            max_concurrent_publishes: 256,
            max_batches_in_flight: 2,
            poll_interval: Duration::from_secs(1),
            wakeup_followup: Duration::from_millis(10),
            lease: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            max_attempts: 10,
            backoff: Backoff::default(),
            outage_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            retention: None,
            purge_interval: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(15),
        }
    }
}

macro_rules! with {
    ($($(#[$doc:meta])* $name:ident => $field:ident: $ty:ty;)*) => {
        impl RelayConfig {
            $($(#[$doc])* pub fn $name(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            })*
        }
    };
}

with! {
    /// Sets [`RelayConfig::batch_size`].
    with_batch_size => batch_size: usize;
    /// Sets [`RelayConfig::max_concurrent_publishes`].
    with_max_concurrent_publishes => max_concurrent_publishes: usize;
    /// Sets [`RelayConfig::max_batches_in_flight`].
    with_max_batches_in_flight => max_batches_in_flight: usize;
    /// Sets [`RelayConfig::poll_interval`].
    with_poll_interval => poll_interval: Duration;
    /// Sets [`RelayConfig::wakeup_followup`].
    with_wakeup_followup => wakeup_followup: Duration;
    /// Sets [`RelayConfig::lease`].
    with_lease => lease: Duration;
    /// Sets [`RelayConfig::publish_timeout`].
    with_publish_timeout => publish_timeout: Duration;
    /// Sets [`RelayConfig::max_attempts`].
    with_max_attempts => max_attempts: u32;
    /// Sets [`RelayConfig::backoff`].
    with_backoff => backoff: Backoff;
    /// Sets [`RelayConfig::outage_backoff`].
    with_outage_backoff => outage_backoff: Backoff;
    /// Sets [`RelayConfig::retention`].
    with_retention => retention: Option<Duration>;
    /// Sets [`RelayConfig::purge_interval`].
    with_purge_interval => purge_interval: Duration;
    /// Sets [`RelayConfig::shutdown_timeout`].
    with_shutdown_timeout => shutdown_timeout: Duration;
    /// Sets [`RelayConfig::stats_interval`].
    with_stats_interval => stats_interval: Duration;
}

impl RelayConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if !(1..=10_000).contains(&self.batch_size) {
            return err(format!(
                "batch_size must be 1..=10000, not {}",
                self.batch_size
            ));
        }
        if self.max_concurrent_publishes == 0 {
            return err("max_concurrent_publishes must be at least 1".into());
        }
        if !(1..=64).contains(&self.max_batches_in_flight) {
            return err(format!(
                "max_batches_in_flight must be 1..=64, not {}",
                self.max_batches_in_flight
            ));
        }
        if self.poll_interval.is_zero() {
            return err("poll_interval must be greater than zero".into());
        }
        if self.publish_timeout.is_zero() {
            return err("publish_timeout must be greater than zero".into());
        }
        if self
            .publish_timeout
            .checked_mul(2)
            .is_none_or(|twice| self.lease < twice)
        {
            return err(format!(
                "lease ({:?}) must be at least twice publish_timeout ({:?}), or a slow publish could outlive its lease",
                self.lease, self.publish_timeout
            ));
        }
        if self.max_attempts == 0 {
            return err("max_attempts must be at least 1".into());
        }
        for (name, b) in [
            ("backoff", &self.backoff),
            ("outage_backoff", &self.outage_backoff),
        ] {
            if b.initial.is_zero()
                || b.max < b.initial
                || !(b.multiplier >= 1.0 && b.multiplier.is_finite())
            {
                return err(format!(
                    "{name} needs 0 < initial <= max and a finite multiplier >= 1"
                ));
            }
        }
        if self.stats_interval.is_zero() {
            return err("stats_interval must be greater than zero".into());
        }
        if self.retention.is_some() && self.purge_interval.is_zero() {
            return err("purge_interval must be greater than zero when retention is set".into());
        }
        Ok(())
    }

    pub(crate) fn ack_mode(&self) -> crate::AckMode {
        match self.retention {
            Some(_) => crate::AckMode::Retain,
            None => crate::AckMode::Delete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RelayConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_settings_that_cannot_work() {
        let bad = [
            RelayConfig::default().with_batch_size(0),
            RelayConfig::default().with_batch_size(10_001),
            RelayConfig::default().with_max_concurrent_publishes(0),
            RelayConfig::default().with_max_batches_in_flight(0),
            RelayConfig::default().with_poll_interval(Duration::ZERO),
            RelayConfig::default().with_lease(Duration::from_secs(5)),
            RelayConfig::default().with_max_attempts(0),
            RelayConfig::default()
                .with_backoff(Backoff::new(Duration::from_secs(2), Duration::from_secs(1))),
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    #[test]
    fn parses_human_durations_and_rejects_unknown_keys() -> Result<(), serde_json::Error> {
        let c: RelayConfig = serde_json::from_str(
            r#"{"lease":"45s","retention":"7days","backoff":{"initial":"1s","max":"1m","multiplier":3.0}}"#,
        )?;
        assert_eq!(c.lease, Duration::from_secs(45));
        assert_eq!(c.retention, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.backoff.multiplier, 3.0);
        assert_eq!(c.batch_size, 256);
        assert!(serde_json::from_str::<RelayConfig>(r#"{"leese":"45s"}"#).is_err());
        Ok(())
    }
}
