use proclaim::OutboxAdmin;

use crate::settings::StoreSettings;
use crate::store::with_outbox;

pub(crate) async fn run(settings: &StoreSettings) -> anyhow::Result<()> {
    with_outbox!(crate::store::open(settings, 2).await?, outbox => {
        outbox.migrate().await?;
        tracing::info!(table = outbox.describe(), "outbox schema is up to date");
    });
    Ok(())
}
