use std::io::Write;

use proclaim::{Event, OutboxAdmin};

use crate::InputError;
use crate::args::EmitArgs;
use crate::settings::StoreSettings;
use crate::store::with_outbox;

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

    with_outbox!(crate::store::open(settings, 1).await?, outbox => {
        outbox.verify_schema().await?;
        outbox.enqueue_standalone(std::slice::from_ref(&event)).await?;
    });
    writeln!(std::io::stdout(), "{}", event.id())?;
    Ok(())
}
