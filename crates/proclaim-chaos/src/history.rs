//! The history checker: what writers committed and aborted against what
//! consumers received ([`History`]), and against the effects a consumer
//! applied ([`Effects`]).
//!
//! The truth about commits comes from the database (the business rows
//! written in the same transaction as the events), not from the writers'
//! view, so a commit whose acknowledgement was lost is still judged right.
//! Each ordering key is written by one writer at a time, so within a key the
//! writer's sequence number is the commit order.
//!
//! ```
//! use proclaim_chaos::history::{History, Written};
//! use uuid::Uuid;
//!
//! let a = Written::new(Uuid::now_v7(), "donor-1", 1);
//! let b = Written::new(Uuid::now_v7(), "donor-1", 2);
//! let history = History {
//!     committed: vec![a.clone(), b.clone()],
//!     aborted: vec![],
//!     received: vec![b.id, a.id, b.id], // out of order, and b twice
//! };
//! let verdict = history.check();
//! assert_eq!(verdict.order_violations, 1);
//! assert_eq!(verdict.duplicates, 1);
//! assert_eq!(verdict.lost, 0);
//! assert!(!verdict.passed());
//! ```

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use uuid::Uuid;

/// How many example ids a [`Verdict`] lists per kind of anomaly.
const EXAMPLES: usize = 5;

/// One event a writer wrote: its id, its ordering key (the CloudEvents
/// subject) and its position among the key's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The event id.
    pub id: Uuid,
    /// The ordering key.
    pub key: String,
    /// Position within the key, increasing in commit order.
    pub seq: u64,
}

impl Written {
    /// A written event.
    pub fn new(id: Uuid, key: impl Into<String>, seq: u64) -> Self {
        Written {
            id,
            key: key.into(),
            seq,
        }
    }
}

/// Everything that happened in a run.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Events whose transaction committed (read back from the database).
    pub committed: Vec<Written>,
    /// Events whose transaction the writer rolled back.
    pub aborted: Vec<Written>,
    /// Ids of the events consumers received, in the order they arrived.
    pub received: Vec<Uuid>,
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Events committed.
    pub committed: u64,
    /// Events rolled back.
    pub aborted: u64,
    /// Committed events received at least once.
    pub delivered_unique: u64,
    /// Committed events never received.
    pub lost: u64,
    /// Distinct received events that were never committed (rolled back or
    /// unknown).
    pub phantom: u64,
    /// First deliveries that arrived after a later event of the same key.
    pub order_violations: u64,
    /// Deliveries beyond the first of an event.
    pub duplicates: u64,
    /// A few ids of each anomaly, for the investigation.
    #[serde(skip)]
    pub examples: Vec<String>,
}

impl Verdict {
    /// No loss, no phantom, no order violation. Duplicates are allowed:
    /// delivery is at least once.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.phantom == 0 && self.order_violations == 0
    }
}

impl History {
    /// Compares what was committed with what was received.
    pub fn check(&self) -> Verdict {
        let committed: HashMap<Uuid, &Written> = self.committed.iter().map(|w| (w.id, w)).collect();
        let mut seen: HashSet<Uuid> = HashSet::with_capacity(self.received.len());
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        let mut phantoms: HashSet<Uuid> = HashSet::new();
        let mut verdict = Verdict {
            committed: committed.len() as u64,
            aborted: self.aborted.len() as u64,
            ..Verdict::default()
        };
        let note = |examples: &mut Vec<String>, what: String| {
            if examples.len() < 4 * EXAMPLES {
                examples.push(what);
            }
        };
        for id in &self.received {
            if !seen.insert(*id) {
                verdict.duplicates += 1;
                continue;
            }
            let Some(written) = committed.get(id) else {
                phantoms.insert(*id);
                note(&mut verdict.examples, format!("phantom {id}"));
                continue;
            };
            verdict.delivered_unique += 1;
            let last = last_seq.entry(written.key.as_str()).or_insert(0);
            if written.seq < *last {
                verdict.order_violations += 1;
                note(
                    &mut verdict.examples,
                    format!(
                        "order: {} seq {} after seq {} ({id})",
                        written.key, written.seq, last
                    ),
                );
            } else {
                *last = written.seq;
            }
        }
        verdict.phantom = phantoms.len() as u64;
        for w in &self.committed {
            if !seen.contains(&w.id) {
                verdict.lost += 1;
                if verdict.lost as usize <= EXAMPLES {
                    note(
                        &mut verdict.examples,
                        format!("lost {} (key {} seq {})", w.id, w.key, w.seq),
                    );
                }
            }
        }
        verdict
    }
}

/// The effects a consumer applied: one row per handling that committed.
///
/// The consumer under test applies each event's effect in the same
/// transaction as its inbox pair, so however often a message is delivered
/// (redeliveries after a crash between commit and ack, lost acks, relays
/// publishing again), every committed event has exactly one effect.
///
/// ```
/// use proclaim_chaos::history::{Effects, Written};
/// use uuid::Uuid;
///
/// let a = Written::new(Uuid::now_v7(), "donor-1", 1);
/// let b = Written::new(Uuid::now_v7(), "donor-1", 2);
/// let effects = Effects {
///     committed: vec![a.clone(), b.clone()],
///     applied: vec![a.id, a.id], // a twice, b never
///     parked: 0,
/// };
/// let verdict = effects.check();
/// assert_eq!((verdict.effects_duplicated, verdict.effects_missing), (1, 1));
/// assert!(!verdict.passed());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Effects {
    /// Events whose transaction committed (read back from the database).
    pub committed: Vec<Written>,
    /// The event id of every effect row.
    pub applied: Vec<Uuid>,
    /// Events the consumer parked (gave up on).
    pub parked: u64,
}

/// What the effect check found. Exactly once: no duplicate, nothing missing,
/// nothing applied that was never committed, nothing parked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EffectsVerdict {
    /// Effect rows (handlings that committed).
    pub effects_applied: u64,
    /// Effect rows beyond the first of an event.
    pub effects_duplicated: u64,
    /// Committed events without an effect.
    pub effects_missing: u64,
    /// Distinct events with an effect that were never committed.
    pub effects_phantom: u64,
    /// Events the consumer parked instead of applying them.
    pub effects_parked: u64,
    /// A few ids of each anomaly, for the investigation.
    #[serde(skip)]
    pub examples: Vec<String>,
}

impl EffectsVerdict {
    /// Every committed event's effect applied exactly once, nothing else
    /// applied, nothing parked.
    pub fn passed(&self) -> bool {
        self.effects_duplicated == 0
            && self.effects_missing == 0
            && self.effects_phantom == 0
            && self.effects_parked == 0
    }
}

impl Effects {
    /// Compares what was committed with the effects applied.
    pub fn check(&self) -> EffectsVerdict {
        let committed: HashSet<Uuid> = self.committed.iter().map(|w| w.id).collect();
        let mut count: HashMap<Uuid, u64> = HashMap::with_capacity(self.applied.len());
        for id in &self.applied {
            *count.entry(*id).or_default() += 1;
        }
        let mut verdict = EffectsVerdict {
            effects_applied: self.applied.len() as u64,
            effects_duplicated: (self.applied.len() - count.len()) as u64,
            effects_parked: self.parked,
            ..EffectsVerdict::default()
        };
        let mut twice: Vec<(&Uuid, &u64)> = count.iter().filter(|(_, n)| **n > 1).collect();
        twice.sort();
        for (id, n) in twice.into_iter().take(EXAMPLES) {
            verdict
                .examples
                .push(format!("effect applied {n} times: {id}"));
        }
        let mut phantoms: Vec<&Uuid> = count.keys().filter(|id| !committed.contains(id)).collect();
        verdict.effects_phantom = phantoms.len() as u64;
        phantoms.sort();
        for id in phantoms.into_iter().take(EXAMPLES) {
            verdict
                .examples
                .push(format!("effect of an event never committed: {id}"));
        }
        for w in &self.committed {
            if !count.contains_key(&w.id) {
                verdict.effects_missing += 1;
                if verdict.effects_missing as usize <= EXAMPLES {
                    verdict.examples.push(format!(
                        "effect missing: {} (key {} seq {})",
                        w.id, w.key, w.seq
                    ));
                }
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn written(n: usize, keys: usize) -> Vec<Written> {
        let mut seq = vec![0u64; keys];
        (0..n)
            .map(|i| {
                let k = i % keys;
                seq[k] += 1;
                Written::new(Uuid::now_v7(), format!("k{k}"), seq[k])
            })
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let committed = written(20, 3);
        let received = committed.iter().map(|w| w.id).collect();
        let verdict = History {
            committed,
            aborted: written(2, 1),
            received,
        }
        .check();
        assert_eq!(verdict.committed, 20);
        assert_eq!(verdict.aborted, 2);
        assert_eq!(verdict.delivered_unique, 20);
        assert!(verdict.passed(), "{verdict:?}");
        assert!(verdict.examples.is_empty());
    }

    #[test]
    fn every_anomaly_is_counted() {
        let committed = written(6, 2); // k0: 0,2,4  k1: 1,3,5
        let aborted = written(1, 1);
        let c = |i: usize| committed[i].id;
        // k0 arrives 2 before 0 (one violation), 5 is lost, 1 arrives twice,
        // the aborted event arrives (phantom), and so does an unknown one.
        let received = vec![
            c(2),
            c(0),
            c(4),
            c(1),
            c(1),
            c(3),
            aborted[0].id,
            Uuid::now_v7(),
        ];
        let verdict = History {
            committed,
            aborted,
            received,
        }
        .check();
        assert_eq!(verdict.delivered_unique, 5);
        assert_eq!(verdict.lost, 1);
        assert_eq!(verdict.phantom, 2);
        assert_eq!(verdict.order_violations, 1);
        assert_eq!(verdict.duplicates, 1);
        assert!(!verdict.passed());
        assert!(verdict.examples.iter().any(|e| e.starts_with("lost")));
        assert!(verdict.examples.iter().any(|e| e.starts_with("order")));
    }

    #[test]
    fn a_late_duplicate_of_an_old_event_is_not_an_order_violation() {
        let committed = written(3, 1);
        let c = |i: usize| committed[i].id;
        let received = vec![c(0), c(1), c(2), c(0)];
        let verdict = History {
            committed,
            aborted: vec![],
            received,
        }
        .check();
        assert_eq!(verdict.duplicates, 1);
        assert_eq!(verdict.order_violations, 0);
        assert!(verdict.passed());
    }

    #[test]
    fn effects_applied_once_each_pass() {
        let committed = written(10, 3);
        let applied = committed.iter().rev().map(|w| w.id).collect();
        let verdict = Effects {
            committed,
            applied,
            parked: 0,
        }
        .check();
        assert_eq!(verdict.effects_applied, 10);
        assert!(verdict.passed(), "{verdict:?}");
        assert!(verdict.examples.is_empty());
    }

    #[test]
    fn every_effect_anomaly_is_counted() {
        let committed = written(5, 2);
        let c = |i: usize| committed[i].id;
        let stranger = Uuid::now_v7();
        // 0 applied three times, 1 twice, 4 never, an unknown event twice.
        let applied = vec![c(0), c(1), c(0), c(2), c(3), c(1), c(0), stranger, stranger];
        let verdict = Effects {
            committed: committed.clone(),
            applied,
            parked: 0,
        }
        .check();
        assert_eq!(verdict.effects_applied, 9);
        assert_eq!(verdict.effects_duplicated, 4);
        assert_eq!(verdict.effects_missing, 1);
        assert_eq!(verdict.effects_phantom, 1);
        assert!(!verdict.passed());
        let examples = verdict.examples.join("\n");
        assert!(
            examples.contains(&format!("applied 3 times: {}", c(0))),
            "{examples}"
        );
        assert!(
            examples.contains(&format!("missing: {}", c(4))),
            "{examples}"
        );
        assert!(examples.contains(&stranger.to_string()), "{examples}");

        let parked = Effects {
            applied: committed.iter().map(|w| w.id).collect(),
            committed,
            parked: 1,
        }
        .check();
        assert_eq!(parked.effects_parked, 1);
        assert!(!parked.passed(), "a parked event fails the check");
    }

    proptest! {
        /// Any delivery that keeps each key's first deliveries in order and
        /// drops nothing passes, however keys interleave and whatever is
        /// delivered again; the counts add up.
        #[test]
        fn in_order_deliveries_with_duplicates_pass(
            n in 0usize..200,
            keys in 1usize..8,
            picks in proptest::collection::vec(any::<u16>(), 0..400),
            dups in proptest::collection::vec(any::<u16>(), 0..50),
        ) {
            let committed = written(n, keys);
            // Interleave keys by a random pick of which key goes next.
            let mut queues: Vec<std::collections::VecDeque<Uuid>> = vec![Default::default(); keys];
            for w in &committed {
                let k: usize = w.key[1..].parse().unwrap();
                queues[k].push_back(w.id);
            }
            let mut received = Vec::new();
            let mut picks = picks.into_iter();
            while queues.iter().any(|q| !q.is_empty()) {
                let start = picks.next().map_or(0, usize::from) % keys;
                let k = (0..keys).map(|d| (start + d) % keys).find(|&k| !queues[k].is_empty()).unwrap();
                received.push(queues[k].pop_front().unwrap());
            }
            if !received.is_empty() {
                for d in &dups {
                    let again = received[usize::from(*d) % received.len()];
                    received.push(again);
                }
            }
            let verdict = History { committed, aborted: vec![], received: received.clone() }.check();
            prop_assert!(verdict.passed(), "{:?}", verdict);
            prop_assert_eq!(verdict.delivered_unique, n as u64);
            prop_assert_eq!(verdict.duplicates as usize, received.len() - n);
        }

        /// Applying some events again and leaving others out is counted
        /// exactly: duplicates as extra rows, missing as committed events
        /// without a row.
        #[test]
        fn effect_counts_add_up(
            n in 1usize..100,
            again in proptest::collection::vec(any::<u16>(), 0..30),
            skip in proptest::collection::vec(any::<u16>(), 0..10),
        ) {
            let committed = written(n, 4);
            let skipped: HashSet<usize> = skip.iter().map(|s| usize::from(*s) % n).collect();
            let mut applied: Vec<Uuid> = committed
                .iter()
                .enumerate()
                .filter(|(i, _)| !skipped.contains(i))
                .map(|(_, w)| w.id)
                .collect();
            let kept = applied.len();
            if kept > 0 {
                for a in &again {
                    applied.push(applied[usize::from(*a) % kept]);
                }
            }
            let verdict = Effects { committed, applied: applied.clone(), parked: 0 }.check();
            prop_assert_eq!(verdict.effects_missing as usize, skipped.len());
            prop_assert_eq!(verdict.effects_duplicated as usize, applied.len() - kept);
            prop_assert_eq!(verdict.effects_phantom, 0);
            prop_assert_eq!(verdict.passed(), skipped.is_empty() && applied.len() == kept);
        }

        /// Swapping two events of the same key is always caught, and so is
        /// dropping one.
        #[test]
        fn a_swap_or_a_drop_is_caught(n in 2usize..100, i in any::<usize>(), drop_one in any::<bool>()) {
            let committed = written(n, 1);
            let mut received: Vec<Uuid> = committed.iter().map(|w| w.id).collect();
            let i = i % (n - 1);
            if drop_one {
                received.remove(i);
            } else {
                received.swap(i, i + 1);
            }
            let verdict = History { committed, aborted: vec![], received }.check();
            prop_assert!(!verdict.passed());
            if drop_one {
                prop_assert_eq!(verdict.lost, 1);
            } else {
                prop_assert_eq!(verdict.order_violations, 1);
            }
        }
    }
}
