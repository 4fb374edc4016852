//! Handlers whose effect happens once: the inbox transaction is opened,
//! duplicates are skipped and the commit is done around the handler.

use std::future::Future;
use std::sync::Arc;

use super::handler::{Context, Handler, HandlerError};
use super::runtime::Counters;
use crate::inbox::{Inbox, InboxTx};

/// A handler run inside an [`Inbox`] transaction: begins it (skipping an
/// event this consumer already handled), hands it to `handler` to write the
/// effect into, and commits what the handler returns. Built by
/// [`Consumer::on_once`](super::Consumer::on_once).
pub(crate) struct Once<I, F> {
    inbox: I,
    handler: F,
    counters: Arc<Counters>,
}

impl<I, F> Once<I, F> {
    pub(crate) fn new(inbox: I, handler: F, counters: Arc<Counters>) -> Self {
        Once {
            inbox,
            handler,
            counters,
        }
    }
}

impl<T, I, F, Fut> Handler<T> for Once<I, F>
where
    T: Send + 'static,
    I: Inbox,
    F: Fn(Context<T>, I::Tx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<I::Tx, HandlerError>> + Send,
{
    async fn handle(&self, cx: Context<T>) -> Result<(), HandlerError> {
        let Some(tx) = self.inbox.begin(cx.consumer(), &cx.event).await? else {
            tracing::debug!(
                consumer = cx.consumer(),
                event = %cx.event.id(),
                "already handled: skipped by the inbox"
            );
            self.counters.duplicate();
            metrics::counter!("proclaim_consumer_duplicates_total", "consumer" => cx.consumer().to_owned())
                .increment(1);
            return Ok(());
        };
        // An error drops `tx`: the effect rolls back with the inbox row.
        let tx = (self.handler)(cx, tx).await?;
        tx.commit().await?;
        Ok(())
    }
}
