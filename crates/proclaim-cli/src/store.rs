//! Opening the store named by the database URL's scheme.

use std::time::Duration;

use anyhow::Context;
use proclaim::inbox::ParkedEvents;
use proclaim::mysql::{
    MySqlCheckpointOptions, MySqlCheckpoints, MySqlInbox, MySqlInboxOptions, MySqlOutbox,
    MySqlOutboxOptions,
};
use proclaim::postgres::{
    PgCheckpointOptions, PgCheckpoints, PgInbox, PgInboxOptions, PgOutbox, PgOutboxOptions,
};
use proclaim::projector::CheckpointStore;
use proclaim::redact_url;
use proclaim::sqlite::{
    SqliteCheckpointOptions, SqliteCheckpoints, SqliteInbox, SqliteInboxOptions, SqliteOutbox,
    SqliteOutboxOptions,
};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;

use crate::InputError;
use crate::settings::StoreSettings;

/// The outbox of one of the supported databases.
pub(crate) enum Outbox {
    Postgres(PgOutbox),
    Sqlite(SqliteOutbox),
    MySql(MySqlOutbox),
}

/// Runs `$body` with `$s` bound to the concrete store, whichever it is: the
/// store traits are generic (no trait objects), so each arm is its own code.
macro_rules! with_outbox {
    ($outbox:expr, $s:ident => $body:expr) => {
        match $outbox {
            $crate::store::Outbox::Postgres($s) => $body,
            $crate::store::Outbox::Sqlite($s) => $body,
            $crate::store::Outbox::MySql($s) => $body,
        }
    };
}
pub(crate) use with_outbox;

fn input(message: String) -> anyhow::Error {
    InputError(message).into()
}

/// Connects to the outbox's database. `pool_size` bounds its connections.
pub(crate) async fn open(settings: &StoreSettings, pool_size: u32) -> anyhow::Result<Outbox> {
    let url = &settings.database_url;
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    let cannot = || format!("cannot connect to the database at {}", redact_url(url));
    match scheme {
        "postgres" | "postgresql" => {
            let options = pg_options(settings);
            options.validate()?;
            let pool = PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .with_context(cannot)?;
            Ok(Outbox::Postgres(PgOutbox::with_options(pool, options)?))
        }
        "sqlite" => {
            no_schema(settings)?;
            let options = sqlite_options(settings);
            options.validate()?;
            let opened = SqliteOutbox::connect(url).await.with_context(cannot)?;
            Ok(Outbox::Sqlite(SqliteOutbox::with_options(
                opened.pool().clone(),
                options,
            )?))
        }
        "mysql" | "mariadb" => {
            no_schema(settings)?;
            let options = mysql_options(settings);
            options.validate()?;
            let url = url.replacen("mariadb://", "mysql://", 1);
            let pool = MySqlPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(5))
                .connect(&url)
                .await
                .with_context(cannot)?;
            Ok(Outbox::MySql(MySqlOutbox::with_options(pool, options)?))
        }
        _ => Err(input(format!(
            "unsupported database URL {:?}: expected postgres://…, sqlite:… or mysql://…",
            redact_url(url)
        ))),
    }
}

fn pg_options(settings: &StoreSettings) -> PgOutboxOptions {
    let mut options = PgOutboxOptions::default();
    if let Some(schema) = &settings.schema {
        options = options.with_schema(schema);
    }
    if let Some(table) = &settings.table {
        options = options.with_table(table);
    }
    options
}

fn sqlite_options(settings: &StoreSettings) -> SqliteOutboxOptions {
    let mut options = SqliteOutboxOptions::default();
    if let Some(table) = &settings.table {
        options = options.with_table(table);
    }
    options
}

fn mysql_options(settings: &StoreSettings) -> MySqlOutboxOptions {
    let mut options = MySqlOutboxOptions::default();
    if let Some(table) = &settings.table {
        options = options.with_table(table);
    }
    options
}

/// A store whose fan-out lanes are outbox tables of its own kind, in the
/// same database, sharing its connection pool.
pub(crate) trait LaneStore: Sized {
    /// The lane of destination `name`: table `<table>_<name>`.
    fn lane(&self, settings: &StoreSettings, name: &str) -> anyhow::Result<Self>;
    /// Creates or updates the lane's table.
    fn migrate_lane(&self) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
    /// The lane's table, for messages.
    fn table(&self) -> String;
}

/// `LaneStore` for an outbox type whose options come from `$options`: the
/// same three lines for each store.
macro_rules! lane_store {
    ($outbox:ident, $options:ident) => {
        impl LaneStore for $outbox {
            fn lane(&self, settings: &StoreSettings, name: &str) -> anyhow::Result<Self> {
                let mut options = $options(settings);
                options.table = format!("{}_{name}", options.table);
                Ok($outbox::with_options(self.pool().clone(), options)?)
            }
            async fn migrate_lane(&self) -> anyhow::Result<()> {
                Ok(self.migrate().await?)
            }
            fn table(&self) -> String {
                self.table_name().to_owned()
            }
        }
    };
}

lane_store!(PgOutbox, pg_options);
lane_store!(SqliteOutbox, sqlite_options);
lane_store!(MySqlOutbox, mysql_options);

/// A store whose consumers' inbox (and the events they parked) lives next
/// to its outbox: same database, sharing its connection pool.
pub(crate) trait InboxStore {
    /// The store's inbox.
    type Inbox: ParkedEvents + ParkedTable;
    /// The inbox of `--inbox-table` (else the store's default), in
    /// `--schema` on PostgreSQL. Only builds it: nothing is queried.
    fn inbox(&self, settings: &StoreSettings) -> anyhow::Result<Self::Inbox>;
}

/// The table where a store's inbox keeps parked events.
pub(crate) trait ParkedTable {
    /// Its quoted name, for messages.
    fn parked_table(&self) -> &str;
    /// Fails with a one-line hint when it does not exist (no consumer has
    /// created its inbox tables here).
    fn verify_parked_table(&self) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// The error for a missing table of parked events (exit code 1, like a
/// missing outbox table).
fn no_parked_table(table: &str, migrate: &str, flags: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the table of parked events {table} does not exist: no consumer has parked anything \
         here (a consumer creates its inbox tables with {migrate}; check {flags})"
    )
}

impl InboxStore for PgOutbox {
    type Inbox = PgInbox;
    fn inbox(&self, settings: &StoreSettings) -> anyhow::Result<PgInbox> {
        let mut options = PgInboxOptions::default();
        if let Some(schema) = &settings.schema {
            options = options.with_schema(schema);
        }
        if let Some(table) = &settings.inbox_table {
            options = options.with_table(table);
        }
        Ok(PgInbox::with_options(self.pool().clone(), options)?)
    }
}

impl ParkedTable for PgInbox {
    fn parked_table(&self) -> &str {
        self.parked_table_name()
    }
    async fn verify_parked_table(&self) -> anyhow::Result<()> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1::text) IS NOT NULL")
            .bind(self.parked_table_name())
            .fetch_one(self.pool())
            .await
            .context("cannot look for the table of parked events")?;
        if exists {
            Ok(())
        } else {
            Err(no_parked_table(
                self.parked_table_name(),
                "PgInbox::migrate",
                "--schema and --inbox-table",
            ))
        }
    }
}

impl InboxStore for SqliteOutbox {
    type Inbox = SqliteInbox;
    fn inbox(&self, settings: &StoreSettings) -> anyhow::Result<SqliteInbox> {
        let mut options = SqliteInboxOptions::default();
        if let Some(table) = &settings.inbox_table {
            options = options.with_table(table);
        }
        Ok(SqliteInbox::with_options(self.pool().clone(), options)?)
    }
}

impl ParkedTable for SqliteInbox {
    fn parked_table(&self) -> &str {
        self.parked_table_name()
    }
    async fn verify_parked_table(&self) -> anyhow::Result<()> {
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        )
        .bind(self.parked_table_name().trim_matches('"'))
        .fetch_one(self.pool())
        .await
        .context("cannot look for the table of parked events")?;
        if found > 0 {
            Ok(())
        } else {
            Err(no_parked_table(
                self.parked_table_name(),
                "SqliteInbox::migrate",
                "--database-url and --inbox-table",
            ))
        }
    }
}

impl InboxStore for MySqlOutbox {
    type Inbox = MySqlInbox;
    fn inbox(&self, settings: &StoreSettings) -> anyhow::Result<MySqlInbox> {
        let mut options = MySqlInboxOptions::default();
        if let Some(table) = &settings.inbox_table {
            options = options.with_table(table);
        }
        Ok(MySqlInbox::with_options(self.pool().clone(), options)?)
    }
}

impl ParkedTable for MySqlInbox {
    fn parked_table(&self) -> &str {
        self.parked_table_name()
    }
    async fn verify_parked_table(&self) -> anyhow::Result<()> {
        let found: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(self.parked_table_name().trim_matches('`'))
        .fetch_one(self.pool())
        .await
        .context("cannot look for the table of parked events")?;
        if found > 0 {
            Ok(())
        } else {
            Err(no_parked_table(
                self.parked_table_name(),
                "MySqlInbox::migrate",
                "--database-url and --inbox-table",
            ))
        }
    }
}

/// A store whose projectors keep their checkpoints next to its outbox: same
/// database, sharing its connection pool.
pub(crate) trait CheckpointTable {
    /// The store's checkpoint store.
    type Checkpoints: CheckpointStore;
    /// The checkpoints in `table` (else the store's default), in `--schema`
    /// on PostgreSQL, and the table's name for messages. Only builds it.
    fn checkpoints(
        &self,
        settings: &StoreSettings,
        table: Option<&str>,
    ) -> anyhow::Result<(Self::Checkpoints, String)>;
}

impl CheckpointTable for PgOutbox {
    type Checkpoints = PgCheckpoints;
    fn checkpoints(
        &self,
        settings: &StoreSettings,
        table: Option<&str>,
    ) -> anyhow::Result<(PgCheckpoints, String)> {
        let mut options = PgCheckpointOptions::default();
        if let Some(schema) = &settings.schema {
            options = options.with_schema(schema);
        }
        if let Some(table) = table {
            options = options.with_table(table);
        }
        let store = PgCheckpoints::with_options(self.pool().clone(), options)?;
        let name = store.table_name().to_owned();
        Ok((store, name))
    }
}

/// `CheckpointTable` for a store without schemas: the same body for SQLite
/// and MySQL.
macro_rules! checkpoint_table {
    ($outbox:ident, $store:ident, $options:ident) => {
        impl CheckpointTable for $outbox {
            type Checkpoints = $store;
            fn checkpoints(
                &self,
                _: &StoreSettings,
                table: Option<&str>,
            ) -> anyhow::Result<($store, String)> {
                let mut options = $options::default();
                if let Some(table) = table {
                    options = options.with_table(table);
                }
                let store = $store::with_options(self.pool().clone(), options)?;
                let name = store.table_name().to_owned();
                Ok((store, name))
            }
        }
    };
}

checkpoint_table!(SqliteOutbox, SqliteCheckpoints, SqliteCheckpointOptions);
checkpoint_table!(MySqlOutbox, MySqlCheckpoints, MySqlCheckpointOptions);

fn no_schema(settings: &StoreSettings) -> anyhow::Result<()> {
    match &settings.schema {
        Some(schema) => Err(input(format!(
            "--schema ({schema}) applies to PostgreSQL only; this database keeps the outbox in the database of the URL"
        ))),
        None => Ok(()),
    }
}
