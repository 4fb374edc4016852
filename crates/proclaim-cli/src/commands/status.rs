use std::io::Write;

use anyhow::Context;
use proclaim::inbox::{ParkedEvent, ParkedEvents};
use proclaim::projector::{Checkpoint, CheckpointStore};
use proclaim::{OutboxAdmin, OutboxStore};

use crate::args::StatusArgs;
use crate::settings::StoreSettings;
use crate::store::{CheckpointTable, InboxStore, ParkedTable, with_outbox};

/// The events consumers parked, as `--parked` lists them.
struct Parked {
    table: String,
    events: Vec<ParkedEvent>,
}

pub(crate) async fn run(settings: &StoreSettings, args: StatusArgs) -> anyhow::Result<()> {
    let (table, stats, dead, parked, projections) = with_outbox!(crate::store::open(settings, 1).await?, outbox => {
        // Built (and its names checked) before anything is queried; only
        // with --parked / --projections, so status works where no consumer
        // or projector runs.
        let inbox = args.parked.map(|_| outbox.inbox(settings)).transpose()?;
        let checkpoints = args
            .projections
            .then(|| outbox.checkpoints(settings, args.checkpoint_table.as_deref()))
            .transpose()?;
        outbox.verify_schema().await?;
        let stats = outbox.stats().await?;
        let dead = if args.dead_letters > 0 {
            outbox.dead_letters(args.dead_letters).await?
        } else {
            Vec::new()
        };
        let parked = match (&inbox, args.parked) {
            (Some(inbox), Some(limit)) => {
                Some(list_parked(inbox, args.consumer.as_deref(), limit).await?)
            }
            _ => None,
        };
        let projections = match &checkpoints {
            Some((store, table)) => Some(list_checkpoints(store, table).await?),
            None => None,
        };
        (outbox.describe(), stats, dead, parked, projections)
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut value = serde_json::to_value(stats)?;
        value["table"] = table.clone().into();
        if args.dead_letters > 0 {
            value["dead_letters"] = serde_json::to_value(&dead)?;
        }
        if let Some(parked) = &parked {
            value["parked_table"] = parked.table.clone().into();
            value["parked"] = parked
                .events
                .iter()
                .map(parked_json)
                .collect::<Result<Vec<_>, _>>()?
                .into();
        }
        if let Some(projections) = &projections {
            value["checkpoint_table"] = projections.table.clone().into();
            value["projections"] = projections
                .checkpoints
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "projection": c.projection,
                        "position": c.position,
                        "updated_at": c.updated_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                    })
                })
                .collect::<Vec<_>>()
                .into();
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
    if let Some(parked) = parked {
        writeln!(
            out,
            "parked in       {} ({} listed)",
            parked.table,
            parked.events.len()
        )?;
        for p in &parked.events {
            writeln!(out, "{}", parked_line(p))?;
        }
    }
    if let Some(projections) = projections {
        writeln!(
            out,
            "checkpoints in  {} ({} projections)",
            projections.table,
            projections.checkpoints.len()
        )?;
        for c in &projections.checkpoints {
            writeln!(
                out,
                "projection {} position={} updated_at={}",
                c.projection,
                c.position,
                c.updated_at.format("%Y-%m-%dT%H:%M:%S%.3fZ")
            )?;
        }
    }
    Ok(())
}

/// The projectors' checkpoints, as `--projections` lists them.
struct Projections {
    table: String,
    checkpoints: Vec<Checkpoint>,
}

/// Every projection's checkpoint in `table`.
async fn list_checkpoints<C: CheckpointStore>(
    store: &C,
    table: &str,
) -> anyhow::Result<Projections> {
    let checkpoints = store.checkpoints().await.with_context(|| {
        format!(
            "cannot list the projectors' checkpoints in {table} (a projector creates it with its \
             checkpoint store's migrate; check --schema and --checkpoint-table)"
        )
    })?;
    Ok(Projections {
        table: table.to_owned(),
        checkpoints,
    })
}

/// Up to `limit` parked events (of `consumer`), oldest first, after checking
/// that the table of parked events exists.
async fn list_parked<I>(inbox: &I, consumer: Option<&str>, limit: u32) -> anyhow::Result<Parked>
where
    I: ParkedEvents + ParkedTable,
{
    inbox.verify_parked_table().await?;
    let events = inbox
        .parked(consumer, limit)
        .await
        .with_context(|| format!("cannot list the parked events in {}", inbox.parked_table()))?;
    Ok(Parked {
        table: inbox.parked_table().to_owned(),
        events,
    })
}

/// One parked event on one line: `parked #<id> consumer=<name> <event id>
/// <type> subject=<subject> attempts=<n> parked_at=<time> reason=<reason>`,
/// or `undecodable, <n> bytes` in place of the event.
fn parked_line(p: &ParkedEvent) -> String {
    let event = match &p.event {
        Some(e) => format!("{} {} subject={}", e.id(), e.event_type(), e.subject()),
        None => format!("undecodable, {} bytes", p.raw.len()),
    };
    format!(
        "parked #{} consumer={} {event} attempts={} parked_at={} reason={}",
        p.id,
        p.consumer,
        p.attempts,
        p.parked_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        one_line(&p.reason)
    )
}

/// A parked event in `--json`: the event's id, type and subject (null when
/// it did not decode), the size of its undecodable bytes, and the rest.
fn parked_json(p: &ParkedEvent) -> serde_json::Result<serde_json::Value> {
    let event = p.event.as_ref();
    Ok(serde_json::json!({
        "id": p.id,
        "consumer": p.consumer,
        "decodable": event.is_some(),
        "event_id": event.map(|e| e.id().to_string()),
        "event_type": event.map(|e| e.event_type().to_owned()),
        "subject": event.map(|e| e.subject().to_owned()),
        "raw_bytes": p.raw.len(),
        "attempts": p.attempts,
        "parked_at": serde_json::to_value(p.parked_at)?,
        "reason": p.reason,
    }))
}

/// Line breaks in a reason (an error chain, a panic message) as spaces, so
/// each parked event stays on its line.
fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proclaim::Event;

    fn parked(event: Option<Event>, raw: &[u8]) -> ParkedEvent {
        ParkedEvent {
            id: 7,
            consumer: "thank-you".into(),
            event,
            raw: raw.to_vec(),
            reason: "boom\nline two".into(),
            attempts: 3,
            parked_at: Default::default(),
        }
    }

    #[test]
    fn parked_events_print_on_one_line_each() {
        let event = Event::builder("DonorSecured")
            .subject("donor-1")
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let line = parked_line(&parked(Some(event.clone()), b""));
        assert_eq!(
            line,
            format!(
                "parked #7 consumer=thank-you {} DonorSecured subject=donor-1 attempts=3 \
                 parked_at=1970-01-01T00:00:00.000Z reason=boom line two",
                event.id()
            )
        );
        let line = parked_line(&parked(None, b"\x00\x01\x02"));
        assert!(
            line.contains("consumer=thank-you undecodable, 3 bytes attempts=3"),
            "{line}"
        );
    }

    #[test]
    fn parked_events_in_json_say_whether_they_decode() {
        let value = parked_json(&parked(None, b"abcd")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value["decodable"], false);
        assert_eq!(value["raw_bytes"], 4);
        assert!(value["event_id"].is_null());
        assert_eq!(value["parked_at"], "1970-01-01T00:00:00Z");
        assert_eq!(value["reason"], "boom\nline two");
    }
}
