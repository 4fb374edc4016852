//! Settings: defaults, then the config file, then `PROCLAIM_*` variables and
//! flags (clap reads both), each overriding the one before.

use std::path::Path;

use anyhow::{Context, bail};
use proclaim::RelayConfig;
use proclaim::nats::NatsConfig;
use serde::Deserialize;

use crate::args::{GlobalArgs, RelayArgs};

/// The config file. Unknown keys are errors, so a typo never goes unnoticed.
///
/// ```toml
/// database_url = "postgres://app@127.0.0.1/app"
/// schema = "proclaim"
/// table = "outbox"
///
/// [relay]
/// batch_size = 256
/// lease = "30s"
/// max_attempts = 10
/// retention = "7days"
///
/// [nats]
/// url = "nats://127.0.0.1:4222"
/// stream = "PROCLAIM"
/// subject_prefix = "proclaim"
/// create_stream = true
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) database_url: Option<String>,
    pub(crate) schema: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) relay: RelayConfig,
    pub(crate) nats: NatsConfig,
}

impl FileConfig {
    pub(crate) fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        if !path.is_file() {
            bail!("config file {} does not exist", path.display());
        }
        let source = config::File::from(path).format(config::FileFormat::Toml);
        config::Config::builder()
            .add_source(source)
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Where the outbox is. Schema and table fall back to each store's default.
#[derive(Debug, Clone)]
pub(crate) struct StoreSettings {
    pub(crate) database_url: String,
    pub(crate) schema: Option<String>,
    pub(crate) table: Option<String>,
}

pub(crate) fn store_settings(
    global: &GlobalArgs,
    file: &FileConfig,
) -> anyhow::Result<StoreSettings> {
    let database_url = global
        .database_url
        .clone()
        .or_else(|| file.database_url.clone())
        .context("no database URL: pass --database-url, set PROCLAIM_DATABASE_URL, or set database_url in the config file")?;
    Ok(StoreSettings {
        database_url,
        schema: global.schema.clone().or_else(|| file.schema.clone()),
        table: global.table.clone().or_else(|| file.table.clone()),
    })
}

/// Relay and NATS settings with flags applied over the file's.
pub(crate) fn relay_settings(
    args: &RelayArgs,
    file: FileConfig,
) -> anyhow::Result<(RelayConfig, NatsConfig, Option<std::net::SocketAddr>)> {
    let mut relay = file.relay;
    let mut nats = file.nats;
    if let Some(v) = &args.nats_url {
        nats.url = v.clone();
    }
    if let Some(v) = &args.stream {
        nats.stream = v.clone();
    }
    if let Some(v) = &args.subject_prefix {
        nats.subject_prefix = v.clone();
    }
    if let Some(v) = &args.subject_template {
        nats.subject_template = v.clone();
    }
    if args.create_stream {
        nats.create_stream = true;
    }
    if let Some(v) = args.batch_size {
        relay.batch_size = v;
    }
    if let Some(v) = args.max_attempts {
        relay.max_attempts = v;
    }
    if let Some(v) = args.lease {
        relay.lease = v;
    }
    if let Some(v) = args.publish_timeout {
        relay.publish_timeout = v;
    }
    if let Some(v) = args.poll_interval {
        relay.poll_interval = v;
    }
    if let Some(v) = args.retention {
        relay.retention = Some(v);
    }
    relay.validate()?;
    nats.validate().context("invalid NATS settings")?;
    Ok((relay, nats, args.metrics_addr.or(file.metrics_addr)))
}
