//! Writers: business rows and their events in one transaction, some rolled
//! back, now and then a malformed outbox row.

use std::time::{Duration, Instant};

use proclaim_core::Event;
use proclaim_postgres::PgOutbox;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ChaosError;
use crate::history::Written;
use crate::scenario::ChaosConfig;

/// What a writer did besides committing.
#[derive(Debug, Default)]
pub(crate) struct WriterLog {
    pub(crate) aborted: Vec<Written>,
    pub(crate) poison: Vec<Uuid>,
    pub(crate) errors: u64,
}

impl WriterLog {
    pub(crate) fn merge(&mut self, other: WriterLog) {
        self.aborted.extend(other.aborted);
        self.poison.extend(other.poison);
        self.errors += other.errors;
    }
}

/// One writer: owns keys `w, w + writers, …`, so within a key its sequence
/// numbers follow commit order.
pub(crate) async fn write(
    config: ChaosConfig,
    w: usize,
    outbox: PgOutbox,
    schema: String,
    stop: CancellationToken,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut rng = fastrand::Rng::with_seed(config.seed.wrapping_add(w as u64));
    let keys: Vec<String> = (w..config.keys)
        .step_by(config.writers)
        .map(|k| format!("k{k:04}"))
        .collect();
    let mut next_seq = vec![1u64; keys.len()];
    let period = Duration::from_secs_f64(config.writers as f64 / f64::from(config.rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_poison = config.poison_every.map(|p| Instant::now() + p);
    let ledger = format!(r#"INSERT INTO "{schema}".ledger (id, key, seq) VALUES ($1, $2, $3)"#);
    let poison_sql = format!(
        r#"INSERT INTO "{schema}".outbox (id, event_type, source, subject, event_time, datacontenttype, data, metadata)
           VALUES ($1, 'ChaosStep', 'proclaim-chaos', $2, now(), 'application/json', '{{}}', '{{"Not A Valid Name!": "x"}}')"#
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return log,
        }
        let k = rng.usize(..keys.len());
        let key = &keys[k];
        if w == 0 && next_poison.is_some_and(|t| Instant::now() >= t) {
            next_poison = config.poison_every.map(|p| Instant::now() + p);
            let id = Uuid::now_v7();
            match poison(&outbox, &poison_sql, id, key).await {
                Ok(_) => log.poison.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write a poison row");
                    log.errors += 1;
                }
            }
        }
        let n = rng.u64(1..=3);
        let events: Vec<Written> = (0..n)
            .map(|i| Written::new(Uuid::now_v7(), key.clone(), next_seq[k] + i))
            .collect();
        next_seq[k] += n;
        let abort = rng.f64() < config.abort_ratio;
        match transaction(&outbox, &ledger, &events, abort).await {
            Ok(()) if abort => log.aborted.extend(events),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "writer transaction failed");
                log.errors += 1;
            }
        }
    }
}

/// A malformed row, written by hand as a buggy writer might, under the
/// subject lock a hand-written row must take.
async fn poison(outbox: &PgOutbox, sql: &str, id: Uuid, key: &str) -> Result<(), ChaosError> {
    let err = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    let mut tx = outbox.pool().begin().await.map_err(|e| err(&e))?;
    outbox
        .lock_subject(&mut tx, key)
        .await
        .map_err(|e| err(&e))?;
    sqlx::query(AssertSqlSafe(sql.to_owned()))
        .bind(id)
        .bind(key)
        .execute(&mut *tx)
        .await
        .map_err(|e| err(&e))?;
    tx.commit().await.map_err(|e| err(&e))
}

/// The business write and its events in one transaction.
async fn transaction(
    outbox: &PgOutbox,
    ledger: &str,
    events: &[Written],
    abort: bool,
) -> Result<(), ChaosError> {
    let err = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    let mut tx = outbox.pool().begin().await.map_err(|e| err(&e))?;
    for w in events {
        sqlx::query(AssertSqlSafe(ledger.to_owned()))
            .bind(w.id)
            .bind(&w.key)
            .bind(i64::try_from(w.seq).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(|e| err(&e))?;
        let event = Event::builder("ChaosStep")
            .id(w.id)
            .source("proclaim-chaos")
            .subject(&w.key)
            .data(&serde_json::json!({ "key": w.key, "seq": w.seq }))
            .build()
            .map_err(|e| err(&e))?;
        outbox.enqueue(&mut tx, &event).await.map_err(|e| err(&e))?;
    }
    if abort {
        tx.rollback().await.map_err(|e| err(&e))
    } else {
        tx.commit().await.map_err(|e| err(&e))
    }
}

pub(crate) async fn read_ledger(pool: &PgPool, schema: &str) -> Result<Vec<Written>, sqlx::Error> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        r#"SELECT id, key, seq FROM "{schema}".ledger ORDER BY key, seq"#
    )))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let seq: i64 = r.try_get(2)?;
            Ok(Written::new(
                r.try_get(0)?,
                r.try_get::<String, _>(1)?,
                seq.max(0) as u64,
            ))
        })
        .collect()
}
