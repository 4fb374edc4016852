//! The faults a chaos run injects, and the order it injects them in.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// Which link of a relay a network fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// Relay ↔ PostgreSQL.
    Db,
    /// Relay ↔ NATS.
    Broker,
}

/// One kind of fault. Network faults act on one relay's proxy to the
/// database or the broker, and on the effect consumer's proxy on the same
/// link; process faults act on one relay process, or on the effect consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// Every chunk held 200 ms each way.
    DbDelay,
    /// A partition: nothing flows, connections stay open, bytes are held.
    DbBlackhole,
    /// Live connections closed cleanly (EOF).
    DbDrop,
    /// Live connections reset (RST).
    DbReset,
    /// The server is down: connections reset and refused.
    DbRefuse,
    /// As [`FaultKind::DbDelay`], on the broker link.
    BrokerDelay,
    /// As [`FaultKind::DbBlackhole`], on the broker link.
    BrokerBlackhole,
    /// As [`FaultKind::DbDrop`], on the broker link.
    BrokerDrop,
    /// As [`FaultKind::DbReset`], on the broker link.
    BrokerReset,
    /// As [`FaultKind::DbRefuse`], on the broker link.
    BrokerRefuse,
    /// `SIGKILL`, then a restart.
    RelayKill,
    /// `SIGSTOP` for longer than the lease, then `SIGCONT`: the relay wakes
    /// up holding claims another relay has taken over (a long GC pause or a
    /// frozen VM).
    RelayPause,
    /// The effect consumer's task is aborted (no graceful shutdown: in-flight
    /// handlings are dropped, nothing is acked or handed back), then started
    /// again. Every other kill strikes right after a handler committed its
    /// effect and before the consumer acked the message, so the broker
    /// delivers an event whose effect is already stored.
    ConsumerKill,
}

impl FaultKind {
    /// Every kind, in the order a run injects them first.
    pub const ALL: [FaultKind; 13] = [
        FaultKind::DbBlackhole,
        FaultKind::RelayKill,
        FaultKind::BrokerReset,
        FaultKind::ConsumerKill,
        FaultKind::DbDelay,
        FaultKind::BrokerBlackhole,
        FaultKind::RelayPause,
        FaultKind::DbReset,
        FaultKind::BrokerDrop,
        FaultKind::DbRefuse,
        FaultKind::BrokerDelay,
        FaultKind::DbDrop,
        FaultKind::BrokerRefuse,
    ];

    /// The snake-case name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::DbDelay => "db_delay",
            FaultKind::DbBlackhole => "db_blackhole",
            FaultKind::DbDrop => "db_drop",
            FaultKind::DbReset => "db_reset",
            FaultKind::DbRefuse => "db_refuse",
            FaultKind::BrokerDelay => "broker_delay",
            FaultKind::BrokerBlackhole => "broker_blackhole",
            FaultKind::BrokerDrop => "broker_drop",
            FaultKind::BrokerReset => "broker_reset",
            FaultKind::BrokerRefuse => "broker_refuse",
            FaultKind::RelayKill => "relay_kill",
            FaultKind::RelayPause => "relay_pause",
            FaultKind::ConsumerKill => "consumer_kill",
        }
    }

    /// The link a network fault acts on; `None` for process faults.
    pub fn link(self) -> Option<Link> {
        use FaultKind::*;
        match self {
            DbDelay | DbBlackhole | DbDrop | DbReset | DbRefuse => Some(Link::Db),
            BrokerDelay | BrokerBlackhole | BrokerDrop | BrokerReset | BrokerRefuse => {
                Some(Link::Broker)
            }
            RelayKill | RelayPause | ConsumerKill => None,
        }
    }

    /// How long the fault lasts before it is healed, given the relays' lease.
    /// A pause outlasts the lease, so another relay takes the claims over.
    pub fn hold(self, base: Duration, lease: Duration) -> Duration {
        match self {
            FaultKind::RelayPause => lease + lease / 2,
            _ => base,
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault name that is not one of [`FaultKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault {0:?}; known: {known}", known = known_names())]
pub struct UnknownFault(pub String);

fn known_names() -> String {
    FaultKind::ALL.map(FaultKind::name).join(", ")
}

impl FromStr for FaultKind {
    type Err = UnknownFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownFault(s.to_owned()))
    }
}

/// The faults of a run in order: every selected kind once (so a run long
/// enough for one round injects each), then round after round again.
#[derive(Debug, Clone)]
pub struct Schedule {
    kinds: Vec<FaultKind>,
    next: usize,
}

impl Schedule {
    /// Cycles through `kinds` in the given order.
    pub fn new(kinds: Vec<FaultKind>) -> Self {
        Schedule { kinds, next: 0 }
    }

    /// The next fault, `None` only when no kind was selected.
    pub fn next_fault(&mut self) -> Option<FaultKind> {
        let kind = *self.kinds.get(self.next % self.kinds.len().max(1))?;
        self.next += 1;
        Some(kind)
    }

    /// The time one round takes with these holds and gaps.
    pub fn round(&self, base: Duration, lease: Duration, gap: Duration) -> Duration {
        self.kinds.iter().map(|k| k.hold(base, lease) + gap).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_explained() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>(), Ok(kind));
        }
        let err = "db_explode".parse::<FaultKind>().unwrap_err().to_string();
        assert!(
            err.contains("db_explode") && err.contains("relay_pause"),
            "{err}"
        );
    }

    #[test]
    fn every_kind_is_listed_once() {
        let mut all = FaultKind::ALL.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), FaultKind::ALL.len());
    }

    #[test]
    fn the_schedule_injects_each_kind_in_the_first_round() {
        let mut s = Schedule::new(FaultKind::ALL.to_vec());
        let first: Vec<_> = (0..FaultKind::ALL.len())
            .map(|_| s.next_fault().unwrap())
            .collect();
        assert_eq!(first, FaultKind::ALL.to_vec());
        assert_eq!(s.next_fault(), Some(FaultKind::ALL[0]));
        assert_eq!(Schedule::new(vec![]).next_fault(), None);
    }

    #[test]
    fn a_pause_outlasts_the_lease() {
        let lease = Duration::from_secs(3);
        assert!(FaultKind::RelayPause.hold(Duration::from_secs(1), lease) > lease);
        assert_eq!(
            FaultKind::DbDrop.hold(Duration::from_secs(1), lease),
            Duration::from_secs(1)
        );
    }
}
