//! Opening the store named by the database URL's scheme.

use std::time::Duration;

use anyhow::Context;
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use sqlx::postgres::PgPoolOptions;

use crate::InputError;
use crate::settings::StoreSettings;

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

/// Connects to the outbox's database. `pool_size` bounds its connections.
pub(crate) async fn open(settings: &StoreSettings, pool_size: u32) -> anyhow::Result<PgOutbox> {
    let url = &settings.database_url;
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "postgres" | "postgresql" => {}
        "sqlite" | "mysql" | "mariadb" => {
            return Err(InputError(format!(
                "the {scheme} store is not available in this build yet; use a postgres:// URL"
            ))
            .into());
        }
        _ => {
            return Err(InputError(format!(
                "unsupported database URL {:?}: expected postgres://…",
                redact(url)
            ))
            .into());
        }
    }
    let options = PgOutboxOptions::default()
        .with_schema(&settings.schema)
        .with_table(&settings.table);
    options.validate()?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to the database at {}", redact(url)))?;
    Ok(PgOutbox::with_options(pool, options)?)
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
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact("nonsense"), "nonsense");
    }
}
