use std::io::Write;

use proclaim::{OutboxAdmin, OutboxStore};

use crate::args::StatusArgs;
use crate::settings::StoreSettings;
use crate::store::with_outbox;

pub(crate) async fn run(settings: &StoreSettings, args: StatusArgs) -> anyhow::Result<()> {
    let (table, stats, dead) = with_outbox!(crate::store::open(settings, 1).await?, outbox => {
        outbox.verify_schema().await?;
        let stats = outbox.stats().await?;
        let dead = if args.dead_letters > 0 {
            outbox.dead_letters(args.dead_letters).await?
        } else {
            Vec::new()
        };
        (outbox.describe(), stats, dead)
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut value = serde_json::to_value(stats)?;
        value["table"] = table.clone().into();
        if args.dead_letters > 0 {
            value["dead_letters"] = serde_json::to_value(&dead)?;
        }
        writeln!(out, "{value}")?;
        return Ok(());
    }
    writeln!(out, "outbox          {table}")?;
    writeln!(out, "pending         {}", stats.pending)?;
    writeln!(out, "in flight       {}", stats.in_flight)?;
    writeln!(out, "dead-lettered   {}", stats.dead_lettered)?;
    writeln!(out, "retained        {}", stats.published_retained)?;
    writeln!(
        out,
        "oldest pending  {}",
        humantime::format_duration(std::time::Duration::from_millis(
            stats.oldest_pending_age_ms
        ))
    )?;
    for d in dead {
        writeln!(
            out,
            "dead  #{} {} {} subject={} attempts={} error={}",
            d.sequence, d.id, d.event_type, d.subject, d.attempts, d.last_error
        )?;
    }
    Ok(())
}
