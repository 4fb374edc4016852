//! Fan-out: one outbox, several destinations, delivery state per destination.
//!
//! Each destination gets an outbox table of its own in the same database (a
//! *lane*). A first relay moves every event from the main outbox into the
//! lanes whose [`TypePattern`] matches its type, through [`FanOut`], a
//! [`Publisher`] that writes to the lanes instead of a broker; then one relay
//! per lane delivers from that lane's table to its broker, with its own
//! leases, retries, dead letters and per-subject order. A destination that is
//! down only fills its own lane: the other lanes go on, and nothing already
//! delivered to them is sent again.
//!
//! Writing into a lane is idempotent ([`Stage::stage`] keeps one row per
//! event id), so a fan-out step that is retried after a crash does not stage
//! an event twice while it is still in the lane. Per-subject order carries
//! over: the fan-out relay moves the events of one subject one at a time, in
//! order, and each lane relay keeps that order.
//!
//! ```
//! use proclaim_core::fanout::TypePattern;
//!
//! let donors = TypePattern::parse("Donor*")?;
//! assert!(donors.matches("DonorSecured"));
//! assert!(!donors.matches("PledgeMade"));
//! assert!(TypePattern::parse("*")?.matches("anything"));
//! # Ok::<(), proclaim_core::ConfigError>(())
//! ```

use std::future::Future;

use crate::{ConfigError, Event, OutboxRecord, PublishError, Publisher, StoreError};

/// A pattern over event types: literal characters and `*`, which stands for
/// any run of characters (also none). `*` alone matches every event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypePattern {
    text: String,
}

impl TypePattern {
    /// Parses a pattern; an empty one is an error.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text.is_empty() {
            return Err(ConfigError(
                "an event type pattern must not be empty (use * for every type)".into(),
            ));
        }
        if text.chars().any(char::is_whitespace) {
            return Err(ConfigError(format!(
                "event type pattern {text:?} contains whitespace"
            )));
        }
        Ok(TypePattern {
            text: text.to_owned(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `event_type` matches.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut parts = self.text.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = event_type.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            // No `*`: the whole type must equal the pattern.
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// A lane's outbox, as the fan-out writes to it: implemented by each store
/// for an outbox table of its own.
pub trait Stage: Send + Sync + 'static {
    /// Stores `event` in this lane in a transaction of its own, unless an
    /// event with the same id is already there. `Ok` means it is committed.
    fn stage(&self, event: &Event) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What [`FanOut`] does with an event that matches no lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unrouted {
    /// Dead-letter it in the main outbox, with the reason (the default: a
    /// routing mistake is visible in `proclaim status` and can be replayed
    /// once the routes are fixed).
    #[default]
    DeadLetter,
    /// Drop it (counted as published).
    Drop,
}

/// One destination of a [`FanOut`]: a name, the event types it takes, and
/// its lane.
#[derive(Debug)]
pub struct Lane<S> {
    /// The destination's name, for logs and errors.
    pub name: String,
    /// The event types it takes.
    pub pattern: TypePattern,
    /// Its outbox.
    pub stage: S,
}

/// The [`Publisher`] of the fan-out relay: stages each event into every lane
/// whose pattern matches its type (see the [module docs](self)).
#[derive(Debug)]
pub struct FanOut<S> {
    lanes: Vec<Lane<S>>,
    unrouted: Unrouted,
}

impl<S: Stage> FanOut<S> {
    /// A fan-out over `lanes`; at least one is needed, with distinct names.
    pub fn new(lanes: Vec<Lane<S>>, unrouted: Unrouted) -> Result<Self, ConfigError> {
        if lanes.is_empty() {
            return Err(ConfigError(
                "a fan-out needs at least one destination".into(),
            ));
        }
        for (i, lane) in lanes.iter().enumerate() {
            if lanes[..i].iter().any(|other| other.name == lane.name) {
                return Err(ConfigError(format!(
                    "destination name {:?} is used twice",
                    lane.name
                )));
            }
        }
        Ok(FanOut { lanes, unrouted })
    }

    /// The lanes.
    pub fn lanes(&self) -> &[Lane<S>] {
        &self.lanes
    }
}

impl<S: Stage> Publisher for FanOut<S> {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let event = &record.event;
        let mut routed = false;
        // One lane after another: a retry re-stages the lanes that already
        // have the event, which `stage` ignores.
        for lane in self
            .lanes
            .iter()
            .filter(|l| l.pattern.matches(event.event_type()))
        {
            routed = true;
            lane.stage.stage(event).await.map_err(|e| {
                let message = format!("staging for destination {:?} failed", lane.name);
                let error = if e.is_transient() {
                    PublishError::transient(message)
                } else {
                    PublishError::permanent(message)
                };
                error.with_source(e)
            })?;
        }
        match (routed, self.unrouted) {
            (true, _) | (false, Unrouted::Drop) => Ok(()),
            (false, Unrouted::DeadLetter) => Err(PublishError::permanent(format!(
                "no destination takes event type {:?}",
                event.event_type()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn patterns_match_like_globs() {
        let cases = [
            ("*", "DonorSecured", true),
            ("DonorSecured", "DonorSecured", true),
            ("DonorSecured", "DonorSecuredX", false),
            ("Donor*", "DonorSecured", true),
            ("Donor*", "Donor", true),
            ("Donor*", "PledgeMade", false),
            ("*Made", "PledgeMade", true),
            ("*Made", "PledgeMadeX", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-c", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
            ("campaign.*.v1", "campaign.donor.v1", true),
        ];
        for (pattern, event_type, expected) in cases {
            let p = TypePattern::parse(pattern).unwrap();
            assert_eq!(p.matches(event_type), expected, "{pattern} ~ {event_type}");
        }
        assert!(TypePattern::parse("").is_err());
        assert!(TypePattern::parse("a b").is_err());
    }

    #[derive(Default)]
    struct Recorder {
        staged: Mutex<Vec<String>>,
        fail: bool,
    }

    impl Stage for std::sync::Arc<Recorder> {
        async fn stage(&self, event: &Event) -> Result<(), StoreError> {
            if self.fail {
                return Err(StoreError::Unavailable("down".into()));
            }
            self.staged
                .lock()
                .unwrap()
                .push(event.event_type().to_owned());
            Ok(())
        }
    }

    fn record(event_type: &str) -> OutboxRecord {
        OutboxRecord {
            sequence: 1,
            event: Event::builder(event_type).subject("k").build().unwrap(),
            attempts: 1,
            created_at: chrono::Utc::now(),
        }
    }

    fn lane(
        name: &str,
        pattern: &str,
        stage: &std::sync::Arc<Recorder>,
    ) -> Lane<std::sync::Arc<Recorder>> {
        Lane {
            name: name.into(),
            pattern: TypePattern::parse(pattern).unwrap(),
            stage: stage.clone(),
        }
    }

    #[tokio::test]
    async fn events_go_to_every_matching_lane_and_unrouted_ones_are_dead_lettered() {
        let (all, donors) = (std::sync::Arc::default(), std::sync::Arc::default());
        let fan = FanOut::new(
            vec![lane("audit", "*", &all), lane("crm", "Donor*", &donors)],
            Unrouted::DeadLetter,
        )
        .unwrap();
        fan.publish(&record("DonorSecured")).await.unwrap();
        fan.publish(&record("PledgeMade")).await.unwrap();
        assert_eq!(*all.staged.lock().unwrap(), ["DonorSecured", "PledgeMade"]);
        assert_eq!(*donors.staged.lock().unwrap(), ["DonorSecured"]);

        let only_donors =
            FanOut::new(vec![lane("crm", "Donor*", &donors)], Unrouted::DeadLetter).unwrap();
        let err = only_donors
            .publish(&record("PledgeMade"))
            .await
            .unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("PledgeMade"), "{err}");
        let dropping = FanOut::new(vec![lane("crm", "Donor*", &donors)], Unrouted::Drop).unwrap();
        dropping.publish(&record("PledgeMade")).await.unwrap();
    }

    #[tokio::test]
    async fn a_lane_that_cannot_be_written_is_a_transient_error_naming_it() {
        let down = std::sync::Arc::new(Recorder {
            fail: true,
            ..Default::default()
        });
        let fan = FanOut::new(vec![lane("webhook", "*", &down)], Unrouted::DeadLetter).unwrap();
        let err = fan.publish(&record("DonorSecured")).await.unwrap_err();
        assert!(err.is_transient());
        assert!(
            err.full_message().contains("\"webhook\""),
            "{}",
            err.full_message()
        );
    }

    #[test]
    fn lanes_need_distinct_names() {
        let r = std::sync::Arc::default();
        assert!(FanOut::new(vec![lane("a", "*", &r), lane("a", "*", &r)], Unrouted::Drop).is_err());
        assert!(FanOut::<std::sync::Arc<Recorder>>::new(vec![], Unrouted::Drop).is_err());
    }
}
