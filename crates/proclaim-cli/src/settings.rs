//! Settings: defaults, then the config file, then `PROCLAIM_*` variables and
//! flags (clap reads both), each overriding the one before.

use std::path::Path;

use anyhow::{Context, bail};
use proclaim::RelayConfig;
use proclaim::destination::{Destination, DestinationSection, NamedDestination};
use proclaim::fanout::{TypePattern, Unrouted};
use proclaim::nats::NatsConfig;
use serde::Deserialize;

use crate::InputError;
use crate::args::{GlobalArgs, RelayArgs, UnroutedArg};

/// The config file. Unknown keys are errors, so a typo never goes unnoticed.
///
/// ```toml
/// database_url = "postgres://app@127.0.0.1/app"
/// schema = "proclaim"
/// table = "outbox"
/// inbox_table = "inbox"  # the consumers' inbox, for `status --parked` and `replay --parked…`
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
///
/// Instead of `[nats]`, any number of destinations (fan-out), each with a
/// URL or one broker section:
///
/// ```toml
/// unrouted = "dead-letter"
///
/// [[destination]]
/// name = "bus"
/// url = "nats://127.0.0.1:4222?stream=PROCLAIM"
///
/// [[destination]]
/// name = "alerts"
/// types = "Donor*"
/// [destination.webhook]
/// url = "https://hooks.example.com/donors"
/// secret = "whsec_…"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) database_url: Option<String>,
    pub(crate) schema: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) inbox_table: Option<String>,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) relay: RelayConfig,
    pub(crate) nats: Option<NatsConfig>,
    pub(crate) destination: Vec<DestinationSection>,
    pub(crate) unrouted: Option<UnroutedArg>,
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

/// Where the outbox is, and the consumers' inbox next to it. Schema and
/// tables fall back to each store's default.
#[derive(Debug, Clone)]
pub(crate) struct StoreSettings {
    pub(crate) database_url: String,
    pub(crate) schema: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) inbox_table: Option<String>,
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
        inbox_table: global
            .inbox_table
            .clone()
            .or_else(|| file.inbox_table.clone()),
    })
}

/// Everything `proclaim relay` runs with.
#[derive(Debug)]
pub(crate) struct RelaySettings {
    pub(crate) relay: RelayConfig,
    /// At least one; names are distinct.
    pub(crate) destinations: Vec<NamedDestination>,
    pub(crate) unrouted: Unrouted,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

impl RelaySettings {
    /// True when events go straight to one destination that takes every
    /// type; otherwise they go through the fan-out and one lane each.
    pub(crate) fn is_direct(&self) -> bool {
        matches!(self.destinations.as_slice(), [only] if only.types.as_str() == "*")
    }
}

/// Relay settings and destinations with flags applied over the file's.
pub(crate) fn relay_settings(args: &RelayArgs, file: FileConfig) -> anyhow::Result<RelaySettings> {
    let mut relay = file.relay;
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

    let nats_flags = args.nats_url.is_some()
        || args.stream.is_some()
        || args.subject_prefix.is_some()
        || args.subject_template.is_some()
        || args.create_stream;
    let destinations = if !args.destinations.is_empty() {
        if nats_flags {
            return Err(InputError(
                "--nats-url, --stream, --subject-prefix, --subject-template and --create-stream \
                 set up the default NATS destination; with --destination, put NATS settings in \
                 its URL (nats://host:port?stream=…&create_stream=true)"
                    .into(),
            )
            .into());
        }
        args.destinations
            .iter()
            .map(|url| NamedDestination::parse(url))
            .collect::<Result<Vec<_>, _>>()?
    } else if !file.destination.is_empty() {
        if file.nats.is_some() || nats_flags {
            return Err(InputError(
                "the config file has [[destination]] sections: put the NATS settings in one of \
                 them (a url or a [destination.nats] section) instead of [nats] or the NATS flags"
                    .into(),
            )
            .into());
        }
        file.destination
            .into_iter()
            .map(DestinationSection::resolve)
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![default_nats(args, file.nats.unwrap_or_default())?]
    };
    for (i, d) in destinations.iter().enumerate() {
        if destinations[..i].iter().any(|other| other.name == d.name) {
            return Err(InputError(format!(
                "two destinations are named {:?}: give each its own name (?name=… in a URL, \
                 name = … in a [[destination]] section)",
                d.name
            ))
            .into());
        }
    }
    let unrouted = match args.unrouted.or(file.unrouted) {
        Some(UnroutedArg::Drop) => Unrouted::Drop,
        Some(UnroutedArg::DeadLetter) | None => Unrouted::DeadLetter,
    };
    Ok(RelaySettings {
        relay,
        destinations,
        unrouted,
        metrics_addr: args.metrics_addr.or(file.metrics_addr),
    })
}

/// The NATS destination of the file's `[nats]` and the NATS flags.
fn default_nats(args: &RelayArgs, mut nats: NatsConfig) -> anyhow::Result<NamedDestination> {
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
    nats.validate().context("invalid NATS settings")?;
    Ok(NamedDestination {
        name: "nats".into(),
        types: TypePattern::parse("*")?,
        destination: Destination::Nats(nats),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn relay_args(extra: &[&str]) -> RelayArgs {
        let argv = ["proclaim", "relay"].iter().chain(extra).copied();
        match crate::args::Cli::try_parse_from(argv).map(|cli| cli.command) {
            Ok(crate::args::Command::Relay(args)) => args,
            other => panic!("{other:?}"),
        }
    }

    fn file(text: &str) -> FileConfig {
        let path = std::env::temp_dir().join(format!(
            "proclaim-settings-{}-{}.toml",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let loaded = FileConfig::load(Some(&path));
        let _ = std::fs::remove_file(&path);
        loaded.unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn error(args: &[&str], text: &str) -> String {
        match relay_settings(&relay_args(args), file(text)) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn config_file_destinations_take_a_url_or_a_broker_section() {
        let settings = relay_settings(
            &relay_args(&[]),
            file(
                r#"
unrouted = "drop"

[[destination]]
name = "bus"
url = "nats://127.0.0.1:4222?stream=ORDERS"

[[destination]]
name = "alerts"
types = "Donor*"
[destination.redis]
url = "redis://127.0.0.1:6379"
stream = "alerts:{type}"
max_len = 1000
"#,
            ),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(settings.unrouted, Unrouted::Drop);
        assert!(!settings.is_direct());
        let names: Vec<_> = settings
            .destinations
            .iter()
            .map(|d| (d.name.as_str(), d.types.as_str(), d.destination.kind()))
            .collect();
        assert_eq!(names, [("bus", "*", "nats"), ("alerts", "Donor*", "redis")]);
    }

    #[test]
    fn one_destination_that_takes_everything_is_direct() {
        let settings = relay_settings(
            &relay_args(&["--destination", "mqtt://127.0.0.1:1883?topic=t/{type}"]),
            FileConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(settings.is_direct());
        let settings = relay_settings(
            &relay_args(&["--destination", "mqtt://127.0.0.1:1883?types=Donor*"]),
            FileConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!settings.is_direct(), "a type filter needs the fan-out");
        assert_eq!(settings.unrouted, Unrouted::DeadLetter);
    }

    #[test]
    fn conflicting_or_incomplete_destinations_are_errors() {
        let two = [
            "--destination",
            "nats://127.0.0.1:4222",
            "--destination",
            "nats://127.0.0.1:4223",
        ];
        assert!(error(&two, "").contains("two destinations are named \"nats\""));
        let mixed = ["--destination", "nats://127.0.0.1:4222", "--stream", "X"];
        assert!(error(&mixed, "").contains("with --destination, put NATS settings in its URL"));
        let both = "[nats]\nstream = \"X\"\n\n[[destination]]\nurl = \"nats://127.0.0.1:4222\"\n";
        assert!(error(&[], both).contains("instead of [nats]"));
        let nowhere = "[[destination]]\nname = \"lost\"\n";
        assert!(error(&[], nowhere).contains("[[destination]] lost: says nowhere to send"));
        let two_brokers = "[[destination]]\nurl = \"nats://127.0.0.1:4222\"\n[destination.redis]\n";
        assert!(error(&[], two_brokers).contains("names more than one broker"));
        let typo = "[[destination]]\n[destination.redis]\nstrem = \"x\"\n";
        let loaded = {
            let path =
                std::env::temp_dir().join(format!("proclaim-typo-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, typo).unwrap_or_else(|e| panic!("{e}"));
            let r = FileConfig::load(Some(&path))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"));
            let _ = std::fs::remove_file(&path);
            r
        };
        assert!(loaded.is_err_and(|e| e.contains("strem")));
    }

    /// The README's `[[destination]]` example loads and resolves.
    #[test]
    fn the_readme_destination_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let example = readme
            .split("```toml")
            .filter_map(|block| block.split("```").next())
            .find(|block| block.contains("[[destination]]"))
            .unwrap_or_else(|| panic!("no [[destination]] example in the README"));
        let settings =
            relay_settings(&relay_args(&[]), file(example)).unwrap_or_else(|e| panic!("{e:#}"));
        let names: Vec<_> = settings
            .destinations
            .iter()
            .map(|d| (d.name.as_str(), d.destination.kind()))
            .collect();
        assert_eq!(
            names,
            [("bus", "nats"), ("crm", "webhook"), ("audit", "rabbitmq")]
        );
    }
}
