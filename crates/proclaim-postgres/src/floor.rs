//! The claim floor: a sequence below which no pending event can exist, now
//! or later, so claims start their index walks there.
//!
//! A drained outbox leaves one dead index entry per deleted row until VACUUM
//! removes it, and an index walk from the start of the pending index steps
//! over every one of them. Without vacuum (autovacuum off, or starved by a
//! long transaction) a claim's cost then grows with everything ever
//! delivered. With the floor, claims and their per-subject checks begin at
//! `sequence >= floor`: the dead entries below it are never visited, and the
//! relay's speed no longer depends on vacuum.
//!
//! # Why the floor is safe
//!
//! A row below the floor could still appear in two ways, and both are closed:
//!
//! - **A transaction that commits late.** Identity values are drawn at insert
//!   time, not commit time, so a row with a low sequence can become visible
//!   after higher ones were delivered. But every writer holds its subject's
//!   advisory lock (in the outbox's lock class) from before it draws a
//!   sequence value until it ends. A probe therefore works in two steps. Step
//!   one reads the sequence's last value `S`, then the set `W` of transactions
//!   holding a subject lock: every row with sequence `<= S` that is not yet
//!   committed belongs to one of them. A later probe that finds none of `W`
//!   still holding a lock knows they have all ended, so every row `<= S` is
//!   visible to its next statement or never will be, and the floor may rise
//!   to `min(S + 1, lowest visible pending sequence)`. A long transaction
//!   elsewhere in the database (the kind that starves vacuum) does not hold
//!   the floor back; only outbox writers do, for as long as they run.
//! - **A replayed dead letter.** Replay re-inserts the event with a new
//!   sequence (under a subject lock, like a writer) instead of reopening the
//!   old row.
//!
//! Rows written other than through `enqueue`/`enqueue_batch` must likewise
//! hold a subject lock before the insert
//! ([`PgOutbox::lock_subject`](crate::PgOutbox::lock_subject)). A retrying
//! event is still pending, so it holds the floor at its sequence until it is
//! delivered or dead-lettered; and the identity sequence must keep its
//! default `CACHE 1`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a claim refreshes the floor (three extra statements, one of
/// them a short index walk).
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// One probe's reading, taken in three statements in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observation {
    /// The identity sequence's last value (0 if it was never used).
    pub(crate) last_sequence: i64,
    /// The virtual transaction ids holding a subject lock, in any order.
    pub(crate) writers: Vec<String>,
    /// The lowest pending sequence at or above the floor the probe used.
    pub(crate) min_pending: Option<i64>,
}

/// A reading waiting for its writers to end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    last_sequence: i64,
    writers: Vec<String>,
}

#[derive(Debug)]
struct State {
    floor: i64,
    candidate: Option<Candidate>,
    next_probe: Option<Instant>,
}

/// The floor of one outbox table, shared by a `PgOutbox` and its clones.
#[derive(Debug)]
pub(crate) struct ClaimFloor {
    state: Mutex<State>,
}

impl ClaimFloor {
    pub(crate) fn new() -> Self {
        ClaimFloor {
            state: Mutex::new(State {
                floor: 0,
                candidate: None,
                next_probe: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every field is written whole, so the state is valid after any panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current floor: claims look only at sequences `>=` this.
    pub(crate) fn current(&self) -> i64 {
        self.lock().floor
    }

    /// Whether a claim starting now should probe first.
    pub(crate) fn probe_due(&self, now: Instant) -> bool {
        self.lock().next_probe.is_none_or(|at| now >= at)
    }

    /// Takes a probe's reading: raises the floor if the previous candidate's
    /// transactions have all ended, and keeps a new candidate.
    pub(crate) fn record(&self, seen: Observation, now: Instant) {
        // Sorted here, not by the query: `ORDER BY` follows the database's
        // collation, which need not agree with Rust's byte order.
        let mut writers = seen.writers;
        writers.sort_unstable();
        let mut state = self.lock();
        state.next_probe = Some(now + PROBE_INTERVAL);
        let fresh = Candidate {
            last_sequence: seen.last_sequence,
            writers,
        };
        if seen.last_sequence.saturating_add(1) < state.floor {
            // The sequence went back (the table was truncated with RESTART
            // IDENTITY, or dropped and created again): start over.
            tracing::info!(
                floor = state.floor,
                last_sequence = seen.last_sequence,
                "outbox sequence restarted; claim floor reset"
            );
            state.floor = 0;
            state.candidate = Some(fresh);
            return;
        }
        let settled = state.candidate.as_ref().map(|c| {
            let running = c
                .writers
                .iter()
                .any(|w| fresh.writers.binary_search(w).is_ok());
            (c.last_sequence, !running)
        });
        match settled {
            Some((last_sequence, true)) => {
                // Every row up to c.last_sequence is visible to this probe or
                // never will be; the probe saw the lowest pending one of them.
                let bound = last_sequence.saturating_add(1);
                let floor = seen.min_pending.map_or(bound, |m| m.min(bound));
                state.floor = state.floor.max(floor);
                state.candidate = Some(fresh);
            }
            Some((_, false)) => {} // a writer of the candidate still runs
            None => state.candidate = Some(fresh),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(last_sequence: i64, writers: &[&str], min_pending: Option<i64>) -> Observation {
        Observation {
            last_sequence,
            writers: writers.iter().map(|w| w.to_string()).collect(),
            min_pending,
        }
    }

    #[test]
    fn the_first_probe_only_sets_a_candidate() {
        let f = ClaimFloor::new();
        let t = Instant::now();
        assert!(f.probe_due(t));
        f.record(seen(100, &["3/7"], Some(80)), t);
        assert_eq!(f.current(), 0);
        assert!(!f.probe_due(t));
        assert!(f.probe_due(t + PROBE_INTERVAL));
    }

    #[test]
    fn the_floor_rises_once_the_candidates_transactions_ended() {
        let f = ClaimFloor::new();
        let t = Instant::now();
        f.record(seen(100, &["3/7", "4/9"], None), t);
        // 4/9 may still hold a sequence <= 100: no change.
        f.record(seen(200, &["4/9", "5/2"], Some(90)), t);
        assert_eq!(f.current(), 0);
        // Both ended; the lowest pending row is 90.
        f.record(seen(300, &["5/2"], Some(90)), t);
        assert_eq!(f.current(), 90);
    }

    #[test]
    fn a_running_writer_is_found_whatever_order_the_writers_come_in() {
        let f = ClaimFloor::new();
        let t = Instant::now();
        // The order an en_US collation gives ("/" ignored at first level).
        f.record(seen(100, &["12/3", "1/24", "1/3"], None), t);
        f.record(seen(200, &["9/1", "8/1", "1/3"], Some(50)), t);
        assert_eq!(f.current(), 0, "1/3 still runs");
    }

    #[test]
    fn the_floor_never_passes_the_settled_sequence() {
        let f = ClaimFloor::new();
        let t = Instant::now();
        f.record(seen(100, &[], None), t);
        // Rows above 100 may belong to running writers.
        f.record(seen(500, &["3/8"], Some(400)), t);
        assert_eq!(f.current(), 101);
        f.record(seen(600, &[], None), t);
        assert_eq!(f.current(), 501);
    }

    #[test]
    fn the_floor_never_falls() {
        let f = ClaimFloor::new();
        let t = Instant::now();
        f.record(seen(100, &[], None), t);
        f.record(seen(200, &[], None), t);
        assert_eq!(f.current(), 101);
        // A reading from an older scan cannot lower it.
        f.record(seen(200, &[], Some(5)), t);
        assert_eq!(f.current(), 101);
    }

    #[test]
    fn a_restarted_sequence_resets_the_floor() {
        let f = ClaimFloor::new();
        let t = Instant::now();
        f.record(seen(100, &[], None), t);
        f.record(seen(200, &[], None), t);
        assert_eq!(f.current(), 101);
        // TRUNCATE ... RESTART IDENTITY: new rows start at 1 again.
        f.record(seen(3, &[], Some(1)), t);
        assert_eq!(f.current(), 0);
        f.record(seen(9, &[], Some(2)), t);
        assert_eq!(f.current(), 2);
    }
}
