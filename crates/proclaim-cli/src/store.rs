//! Opening the store named by the database URL's scheme.

use std::time::Duration;

use anyhow::Context;
use proclaim::mysql::{MySqlOutbox, MySqlOutboxOptions};
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use proclaim::sqlite::{SqliteOutbox, SqliteOutboxOptions};
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

/// The URL with any password replaced, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                if userinfo.contains(':') {
                    format!("{scheme}://{user}:***@{host}")
                } else {
                    format!("{scheme}://{userinfo}@{host}")
                }
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn input(message: String) -> anyhow::Error {
    InputError(message).into()
}

/// Connects to the outbox's database. `pool_size` bounds its connections.
pub(crate) async fn open(settings: &StoreSettings, pool_size: u32) -> anyhow::Result<Outbox> {
    let url = &settings.database_url;
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    let cannot = || format!("cannot connect to the database at {}", redact(url));
    match scheme {
        "postgres" | "postgresql" => {
            let mut options = PgOutboxOptions::default();
            if let Some(schema) = &settings.schema {
                options = options.with_schema(schema);
            }
            if let Some(table) = &settings.table {
                options = options.with_table(table);
            }
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
            let mut options = SqliteOutboxOptions::default();
            if let Some(table) = &settings.table {
                options = options.with_table(table);
            }
            options.validate()?;
            let opened = SqliteOutbox::connect(url).await.with_context(cannot)?;
            Ok(Outbox::Sqlite(SqliteOutbox::with_options(
                opened.pool().clone(),
                options,
            )?))
        }
        "mysql" | "mariadb" => {
            no_schema(settings)?;
            let mut options = MySqlOutboxOptions::default();
            if let Some(table) = &settings.table {
                options = options.with_table(table);
            }
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
            redact(url)
        ))),
    }
}

fn no_schema(settings: &StoreSettings) -> anyhow::Result<()> {
    match &settings.schema {
        Some(schema) => Err(input(format!(
            "--schema ({schema}) applies to PostgreSQL only; this database keeps the outbox in the database of the URL"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("mysql://root@127.0.0.1:3306/test"),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            redact("sqlite://outbox.db?mode=rwc"),
            "sqlite://outbox.db?mode=rwc"
        );
    }
}
