//! The history checker: what writers committed and aborted against what
//! consumers received.
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
