use std::io::Write;

use crate::args::ReplayArgs;
use crate::settings::StoreSettings;
use crate::store::with_outbox;

pub(crate) async fn run(settings: &StoreSettings, args: ReplayArgs) -> anyhow::Result<()> {
    let ids = (!args.all).then_some(args.ids.as_slice());
    let n = with_outbox!(crate::store::open(settings, 1).await?, outbox => {
        outbox.verify_schema().await?;
        outbox.replay_dead_letters(ids).await?
    });
    writeln!(std::io::stdout(), "replayed {n}")?;
    Ok(())
}
