use std::io::Write;

use crate::args::ReplayArgs;
use crate::settings::StoreSettings;

pub(crate) async fn run(settings: &StoreSettings, args: ReplayArgs) -> anyhow::Result<()> {
    let outbox = crate::store::open(settings, 1).await?;
    outbox.verify_schema().await?;
    let ids = (!args.all).then_some(args.ids.as_slice());
    let n = outbox.replay_dead_letters(ids).await?;
    writeln!(std::io::stdout(), "replayed {n}")?;
    Ok(())
}
