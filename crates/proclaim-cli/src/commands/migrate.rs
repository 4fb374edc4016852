use crate::settings::StoreSettings;

pub(crate) async fn run(settings: &StoreSettings) -> anyhow::Result<()> {
    let outbox = crate::store::open(settings, 2).await?;
    outbox.migrate().await?;
    tracing::info!(table = outbox.table_name(), "outbox schema is up to date");
    Ok(())
}
