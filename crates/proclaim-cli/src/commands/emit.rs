use std::io::Write;

use proclaim::Event;

use crate::InputError;
use crate::args::EmitArgs;
use crate::settings::StoreSettings;

pub(crate) async fn run(settings: &StoreSettings, args: EmitArgs) -> anyhow::Result<()> {
    // Check the input before touching the database.
    let mut builder = Event::builder(args.event_type)
        .subject(args.subject)
        .json(args.data);
    if let Some(source) = args.source {
        builder = builder.source(source);
    }
    if let Some(id) = args.correlation_id {
        builder = builder.correlation_id(id);
    }
    if let Some(schema) = args.dataschema {
        builder = builder.dataschema(schema);
    }
    let event = builder.build().map_err(|e| InputError(e.to_string()))?;

    let outbox = crate::store::open(settings, 1).await?;
    outbox.verify_schema().await?;
    let mut tx = outbox.pool().begin().await?;
    outbox.enqueue(&mut tx, &event).await?;
    tx.commit().await?;
    writeln!(std::io::stdout(), "{}", event.id())?;
    Ok(())
}
