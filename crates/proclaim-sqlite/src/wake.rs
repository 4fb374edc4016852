//! In-process wake-ups: SQLite has no `NOTIFY`, so a writer's connection gets
//! a commit hook that signals the relays of this process when a transaction
//! that enqueued commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use proclaim_core::{StoreError, Wakeups};
use sqlx::SqliteConnection;
use tokio::sync::watch;

use crate::error::classify;

/// The signal shared by the clones of one outbox. A `watch` channel never
/// loses a signal sent while a relay is busy (it sees the change on its next
/// wait) and folds a burst of signals into one.
#[derive(Debug, Clone)]
pub(crate) struct Signal(Arc<watch::Sender<u64>>);

impl Signal {
    pub(crate) fn new() -> Self {
        Signal(Arc::new(watch::Sender::new(0)))
    }

    fn fire(sender: &watch::Sender<u64>) {
        sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A stream that yields once per signal (or burst of signals) after now.
    pub(crate) fn subscribe(&self) -> Wakeups {
        let rx = self.0.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
        .boxed()
    }

    /// Arms `conn` so that its current transaction signals when it commits,
    /// and does nothing when it rolls back.
    ///
    /// SQLite keeps one commit hook and one rollback hook per connection;
    /// this replaces whatever hooks the connection had. The hook runs while
    /// the commit is being made, before other connections can see it; a relay
    /// woken by it claims with `BEGIN IMMEDIATE`, which waits for the
    /// committing writer to release the lock, so it does see the new rows.
    pub(crate) async fn arm(&self, conn: &mut SqliteConnection) -> Result<(), StoreError> {
        let armed = Arc::new(AtomicBool::new(true));
        let on_commit = armed.clone();
        let sender = self.0.clone();
        let mut handle = conn.lock_handle().await.map_err(classify)?;
        handle.set_commit_hook(move || {
            if on_commit.swap(false, Ordering::AcqRel) {
                Signal::fire(&sender);
            }
            true // never veto the commit
        });
        handle.set_rollback_hook(move || armed.store(false, Ordering::Release));
        Ok(())
    }
}
