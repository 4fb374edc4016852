//! `proclaim replay`: dead letters get fresh attempts in the outbox; parked
//! events are enqueued into the outbox again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;

use anyhow::{Context, bail};
use proclaim::inbox::{ParkedEvent, ParkedEvents};
use proclaim::{Event, OutboxAdmin, StoreError};
use uuid::Uuid;

use crate::args::ReplayArgs;
use crate::settings::StoreSettings;
use crate::store::{InboxStore, ParkedTable, with_outbox};

/// Parked events read, enqueued and taken per round.
const BATCH: u32 = 500;

pub(crate) async fn run(settings: &StoreSettings, args: ReplayArgs) -> anyhow::Result<()> {
    let which = args.which;
    let target = if which.parked_all {
        Target::All {
            consumer: args.consumer,
        }
    } else if !which.parked.is_empty() {
        Target::Ids(which.parked.into_iter().collect())
    } else {
        let ids = (!which.all).then_some(which.ids.as_slice());
        let n = with_outbox!(crate::store::open(settings, 1).await?, outbox => {
            outbox.verify_schema().await?;
            outbox.replay_dead_letters(ids).await?
        });
        writeln!(std::io::stdout(), "replayed {n}")?;
        return Ok(());
    };
    let report = with_outbox!(crate::store::open(settings, 2).await?, outbox => {
        let inbox = outbox.inbox(settings)?;
        outbox.verify_schema().await?;
        inbox.verify_parked_table().await?;
        let mut report = Report::new(outbox.describe());
        let result = replay_parked(&outbox, &inbox, target, &mut report).await;
        // What was replayed before a failure is said either way.
        writeln!(std::io::stdout(), "replayed {}", report.replayed)?;
        result?;
        report
    });
    let left = report.left();
    if report.replayed == 0 && !left.is_empty() {
        bail!("nothing replayed: {}", left.join("; "));
    }
    let mut err = std::io::stderr().lock();
    for line in left {
        writeln!(err, "warning: {line}")?;
    }
    Ok(())
}

/// Which parked events to replay.
enum Target {
    /// These ids (of the parked table).
    Ids(BTreeSet<i64>),
    /// Every one, of one consumer or of all.
    All { consumer: Option<String> },
}

/// What a replay of parked events did, and what it left parked and why.
#[derive(Debug, Default)]
struct Report {
    /// The outbox, for messages.
    outbox: String,
    /// Parked events replayed (enqueued, then taken).
    replayed: u64,
    /// Parked ids without an event: (id, size of the bytes kept).
    undecodable: Vec<(i64, usize)>,
    /// Parked ids whose event id the outbox still holds.
    in_outbox: Vec<(i64, Uuid)>,
    /// Ids asked for that are not parked.
    not_found: Vec<i64>,
    /// Events enqueued by this run: a parked entry of one of them that
    /// shows up later was parked again (it failed again) and stays.
    enqueued: HashSet<Uuid>,
    /// Parked ids already looked at by this run.
    seen: HashSet<i64>,
}

impl Report {
    fn new(outbox: String) -> Self {
        Report {
            outbox,
            ..Report::default()
        }
    }

    /// One line per reason something stayed parked or was not found.
    fn left(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.undecodable.is_empty() {
            let ids: Vec<String> = self
                .undecodable
                .iter()
                .map(|(id, bytes)| format!("#{id} ({bytes} bytes)"))
                .collect();
            lines.push(format!(
                "{} undecodable parked event{} cannot be replayed (there is no event to enqueue) \
                 and stay{} parked: {}",
                ids.len(),
                plural(ids.len()),
                if ids.len() == 1 { "s" } else { "" },
                ids.join(", ")
            ));
        }
        for (id, event_id) in &self.in_outbox {
            lines.push(format!(
                "parked #{id} stays parked: the outbox {} still holds its event {event_id} \
                 (a published row the relay keeps for its retention, or one not delivered yet), \
                 so it cannot be enqueued again; replay it once that row is gone",
                self.outbox
            ));
        }
        if !self.not_found.is_empty() {
            let ids: Vec<String> = self.not_found.iter().map(|id| format!("#{id}")).collect();
            lines.push(format!(
                "not parked (replayed already, or no such id): {}",
                ids.join(", ")
            ));
        }
        lines
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Replays the parked events of `target`, in rounds of at most [`BATCH`].
async fn replay_parked<O, I>(
    outbox: &O,
    inbox: &I,
    target: Target,
    report: &mut Report,
) -> anyhow::Result<()>
where
    O: OutboxAdmin,
    I: ParkedEvents + ParkedTable,
{
    match target {
        Target::Ids(wanted) => {
            let found = find(inbox, &wanted).await?;
            report.not_found = wanted
                .iter()
                .filter(|id| !found.iter().any(|p| p.id == **id))
                .copied()
                .collect();
            let mut found = found.into_iter().peekable();
            while found.peek().is_some() {
                let round: Vec<ParkedEvent> = found.by_ref().take(BATCH as usize).collect();
                replay_round(outbox, inbox, round, report).await?;
            }
        }
        Target::All { consumer } => loop {
            // Entries left parked stay at the head of the listing: read past
            // them. Entries parked while this runs are replayed too.
            let kept = (report.seen.len() as u64).saturating_sub(report.replayed);
            let limit = u32::try_from(kept)
                .unwrap_or(u32::MAX)
                .saturating_add(BATCH);
            let listed = inbox
                .parked(consumer.as_deref(), limit)
                .await
                .with_context(|| {
                    format!("cannot list the parked events in {}", inbox.parked_table())
                })?;
            let round: Vec<ParkedEvent> = listed
                .into_iter()
                .filter(|p| !report.seen.contains(&p.id))
                .take(BATCH as usize)
                .collect();
            if round.is_empty() {
                break;
            }
            replay_round(outbox, inbox, round, report).await?;
        },
    }
    Ok(())
}

/// The parked events with these ids (oldest first). The store lists parked
/// events from the oldest, so this reads until it is past the highest id.
async fn find<I>(inbox: &I, wanted: &BTreeSet<i64>) -> anyhow::Result<Vec<ParkedEvent>>
where
    I: ParkedEvents + ParkedTable,
{
    let Some(&highest) = wanted.last() else {
        return Ok(Vec::new());
    };
    let mut limit = u32::try_from(wanted.len()).unwrap_or(u32::MAX).max(BATCH);
    loop {
        let listed = inbox.parked(None, limit).await.with_context(|| {
            format!("cannot list the parked events in {}", inbox.parked_table())
        })?;
        let exhausted = u32::try_from(listed.len()).unwrap_or(u32::MAX) < limit
            || limit == u32::MAX
            || listed.last().is_some_and(|p| p.id >= highest);
        if exhausted {
            return Ok(listed
                .into_iter()
                .filter(|p| wanted.contains(&p.id))
                .collect());
        }
        limit = limit.saturating_mul(2);
    }
}

/// Enqueues the decodable events of `round` into the outbox (one
/// transaction), then takes their entries out of the parked table. An event
/// parked by several consumers is enqueued once.
async fn replay_round<O, I>(
    outbox: &O,
    inbox: &I,
    round: Vec<ParkedEvent>,
    report: &mut Report,
) -> anyhow::Result<()>
where
    O: OutboxAdmin,
    I: ParkedEvents + ParkedTable,
{
    let mut events: Vec<Event> = Vec::new();
    let mut entries: HashMap<Uuid, Vec<i64>> = HashMap::new();
    for parked in round {
        report.seen.insert(parked.id);
        match parked.event {
            None => report.undecodable.push((parked.id, parked.raw.len())),
            Some(event) if report.enqueued.contains(&event.id()) => {
                tracing::warn!(
                    parked = parked.id,
                    event = %event.id(),
                    "parked again after this replay enqueued it; it stays parked"
                );
            }
            Some(event) => {
                let ids = entries.entry(event.id()).or_default();
                if ids.is_empty() {
                    events.push(event);
                }
                ids.push(parked.id);
            }
        }
    }
    if events.is_empty() {
        return Ok(());
    }

    let mut failure = None;
    let enqueued: Vec<&Event> = match outbox.enqueue_standalone(&events).await {
        Ok(()) => events.iter().collect(),
        Err(e) if is_unique_violation(&e) => {
            // Which ones does the outbox still hold? One at a time.
            let mut enqueued = Vec::new();
            for event in &events {
                match outbox.enqueue_standalone(std::slice::from_ref(event)).await {
                    Ok(()) => enqueued.push(event),
                    Err(e) if is_unique_violation(&e) => {
                        for id in entries.get(&event.id()).into_iter().flatten() {
                            report.in_outbox.push((*id, event.id()));
                        }
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            enqueued
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot enqueue the parked events into the outbox {}; they stay parked",
                report.outbox
            )));
        }
    };

    let ids: Vec<i64> = enqueued
        .iter()
        .flat_map(|e| entries.get(&e.id()).into_iter().flatten().copied())
        .collect();
    report.enqueued.extend(enqueued.iter().map(|e| e.id()));
    if !ids.is_empty() {
        if let Err(e) = inbox.take(&ids).await {
            return Err(anyhow::Error::new(e).context(format!(
                "{} parked events were enqueued into the outbox again, but removing them from \
                 {} failed, so they are still listed there too (ids {}); do not replay them \
                 again: consumers would get them twice (those with an inbox skip the second)",
                ids.len(),
                inbox.parked_table(),
                ids.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        report.replayed += ids.len() as u64;
    }
    match failure {
        Some(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot enqueue parked events into the outbox {}; the rest stay parked",
            report.outbox
        ))),
        None => Ok(()),
    }
}

/// True when the store refused an insert because of a unique key: here, an
/// event id the outbox still holds.
fn is_unique_violation(e: &StoreError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(sqlx::Error::Database(db)) = c.downcast_ref::<sqlx::Error>() {
            return db.is_unique_violation();
        }
        cause = c.source();
    }
    false
}
