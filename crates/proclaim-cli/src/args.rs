//! Command-line arguments. Every flag can also be set in the environment
//! (`PROCLAIM_*`) and, for `relay`, in the config file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// proclaim — the transactional outbox for Rust: migrate the outbox table,
/// relay committed events to NATS JetStream, emit an event, show status.
#[derive(Debug, Parser)]
#[command(name = "proclaim", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Config file (TOML); flags and PROCLAIM_* variables override it.
    #[arg(long, short = 'c', env = "PROCLAIM_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Database URL; its scheme chooses the store (postgres://…).
    #[arg(long, env = "PROCLAIM_DATABASE_URL", global = true)]
    pub(crate) database_url: Option<String>,
    /// Schema of the outbox table (and of the consumers' inbox tables), PostgreSQL only [default: proclaim].
    #[arg(long, env = "PROCLAIM_SCHEMA", global = true)]
    pub(crate) schema: Option<String>,
    /// Name of the outbox table [default: outbox on PostgreSQL, proclaim_outbox elsewhere].
    #[arg(long, env = "PROCLAIM_TABLE", global = true)]
    pub(crate) table: Option<String>,
    /// Name of the consumers' inbox table; the events they parked are in `<name>_parked` next to it (same database, on PostgreSQL in --schema). Used by `status --parked` and `replay --parked…` [default: inbox on PostgreSQL, proclaim_inbox elsewhere].
    #[arg(long, env = "PROCLAIM_INBOX_TABLE", global = true)]
    pub(crate) inbox_table: Option<String>,
    /// Log format on stderr.
    #[arg(long, env = "PROCLAIM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create or update the outbox table and its indexes.
    Migrate,
    /// Deliver committed events until SIGINT/SIGTERM, then finish in-flight work and exit 0.
    Relay(RelayArgs),
    /// Write one event to the outbox in its own transaction; prints its id.
    Emit(EmitArgs),
    /// Show pending, in-flight and dead-lettered events, and optionally the events consumers parked.
    Status(StatusArgs),
    /// Put dead-lettered events (or events consumers parked) back in line for delivery.
    Replay(ReplayArgs),
    /// The CampaignFinance scenario on the embedded default (SQLite + in-process bus): no services needed.
    Demo(DemoArgs),
    /// Prove the guarantees under faults: writers, 3 relay processes, an effect consumer with an inbox, injected faults, then a history and an effect check; prints one JSON line, exits 1 on any loss, phantom or order violation, or any effect duplicated, missing or parked.
    Chaos(ChaosArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// How long writers write while faults are injected, e.g. 60s or 10m.
    #[arg(long, default_value = "60s", value_parser = proclaim::parse_duration)]
    pub(crate) duration: Duration,
    /// NATS server URL (JetStream) [default: nats://127.0.0.1:4222].
    #[arg(long, env = "PROCLAIM_NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// Relay processes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub(crate) relays: u16,
    /// Concurrent writers; each owns a share of the keys.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) writers: u16,
    /// Ordering keys (subjects) written to.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) keys: u32,
    /// Transactions per second over all writers (1–3 events each).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rate: u32,
    /// Share of transactions rolled back, in [0, 1).
    #[arg(long, default_value_t = 0.1)]
    pub(crate) abort_ratio: f64,
    /// Faults to inject, comma-separated, in order [default: all kinds].
    #[arg(long, value_delimiter = ',')]
    pub(crate) faults: Vec<proclaim_chaos::faults::FaultKind>,
    /// How long each fault lasts (a pause lasts 1.5 leases).
    #[arg(long, default_value = "2500ms", value_parser = proclaim::parse_duration)]
    pub(crate) fault_hold: Duration,
    /// The relays' lease.
    #[arg(long, default_value = "3s", value_parser = proclaim::parse_duration)]
    pub(crate) lease: Duration,
    /// Turn off JetStream's deduplication, so every re-publish reaches the consumer as a duplicate.
    #[arg(long)]
    pub(crate) no_broker_dedup: bool,
    /// Seed for the writers and the choice of victims [default: random].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Keep the schema, the stream and the relay logs afterwards.
    #[arg(long)]
    pub(crate) keep: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Donors to record, one transaction each.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) donors: u32,
    /// SQLite database file to use (kept afterwards) [default: a temporary file, removed].
    #[arg(long)]
    pub(crate) db: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Where to send events, as a URL whose scheme picks the broker: nats://, amqp://, redis://, mqtt://, http(s)://, kafka://; parameters set the publisher's settings, `name` and `types` (e.g. ?types=Donor*) route by event type. Repeat for fan-out. Replaces the NATS flags below and the config file's [nats] and [[destination]].
    #[arg(long = "destination", env = "PROCLAIM_DESTINATION", value_name = "URL")]
    pub(crate) destinations: Vec<String>,
    /// With several destinations: what to do with an event no destination's types match.
    #[arg(long, env = "PROCLAIM_UNROUTED", value_enum)]
    pub(crate) unrouted: Option<UnroutedArg>,
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long, env = "PROCLAIM_NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// JetStream stream [default: PROCLAIM].
    #[arg(long, env = "PROCLAIM_STREAM")]
    pub(crate) stream: Option<String>,
    /// Prefix of published subjects [default: proclaim].
    #[arg(long, env = "PROCLAIM_SUBJECT_PREFIX")]
    pub(crate) subject_prefix: Option<String>,
    /// Subject template; placeholders {prefix} {type} {subject} {source} [default: {prefix}.{type}].
    #[arg(long, env = "PROCLAIM_SUBJECT_TEMPLATE")]
    pub(crate) subject_template: Option<String>,
    /// Create the stream (subjects <prefix>.>) if it does not exist.
    #[arg(long, env = "PROCLAIM_CREATE_STREAM")]
    pub(crate) create_stream: bool,
    /// Events claimed per batch [default: 256].
    #[arg(long, env = "PROCLAIM_BATCH_SIZE")]
    pub(crate) batch_size: Option<usize>,
    /// Attempts before an event is dead-lettered [default: 10].
    #[arg(long, env = "PROCLAIM_MAX_ATTEMPTS")]
    pub(crate) max_attempts: Option<u32>,
    /// How long a claim holds its events, e.g. 30s [default: 30s].
    #[arg(long, env = "PROCLAIM_LEASE", value_parser = proclaim::parse_duration)]
    pub(crate) lease: Option<Duration>,
    /// Bound of one publish incl. the broker's ack [default: 10s].
    #[arg(long, env = "PROCLAIM_PUBLISH_TIMEOUT", value_parser = proclaim::parse_duration)]
    pub(crate) publish_timeout: Option<Duration>,
    /// Poll interval when no wake-up arrives [default: 1s].
    #[arg(long, env = "PROCLAIM_POLL_INTERVAL", value_parser = proclaim::parse_duration)]
    pub(crate) poll_interval: Option<Duration>,
    /// Keep published rows this long instead of deleting them, e.g. 7days.
    #[arg(long, env = "PROCLAIM_RETENTION", value_parser = proclaim::parse_duration)]
    pub(crate) retention: Option<Duration>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long, env = "PROCLAIM_METRICS_ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

/// What the fan-out does with an event that matches no destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum UnroutedArg {
    /// Dead-letter it (visible in `proclaim status`, replayable).
    DeadLetter,
    /// Drop it.
    Drop,
}

#[derive(Debug, Args)]
pub(crate) struct EmitArgs {
    /// Event type, e.g. DonorSecured.
    #[arg(long = "type", short = 't')]
    pub(crate) event_type: String,
    /// Subject: the aggregate id and ordering key, e.g. donor-42.
    #[arg(long, short = 's')]
    pub(crate) subject: String,
    /// Payload as JSON.
    #[arg(long, short = 'd', default_value = "null")]
    pub(crate) data: String,
    /// Source (the proclaiming service) [default: proclaim].
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// Correlation id.
    #[arg(long)]
    pub(crate) correlation_id: Option<String>,
    /// Schema URI of the payload, including its version.
    #[arg(long)]
    pub(crate) dataschema: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also list up to this many dead-lettered events.
    #[arg(long, default_value_t = 0)]
    pub(crate) dead_letters: u32,
    /// Also list up to this many events consumers parked (oldest first), from the inbox's `<inbox table>_parked` table (see --inbox-table); in --json as a `parked` array.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) parked: Option<u32>,
    /// With --parked: only the events this consumer parked.
    #[arg(long, value_name = "NAME", requires = "parked")]
    pub(crate) consumer: Option<String>,
    /// Also list the projectors' checkpoints (projection, position, when last written) from their checkpoint table; in --json as a `projections` array.
    #[arg(long)]
    pub(crate) projections: bool,
    /// With --projections: the checkpoint table [default: projector_checkpoints on PostgreSQL (in --schema), proclaim_projector_checkpoints elsewhere].
    #[arg(long, value_name = "NAME", requires = "projections")]
    pub(crate) checkpoint_table: Option<String>,
}

/// `proclaim replay`: what to replay.
#[derive(Debug, Args)]
#[command(after_help = "\
Dead letters (--all, --id) are outbox rows the relay gave up on: they get fresh attempts.

Parked events (--parked, --parked-all) are events a consumer gave up on, kept in the \
inbox's parked table (see --inbox-table). Each is enqueued into the outbox again, with the \
same event id, in one transaction, and only then removed from the parked table: consumers \
that handled it already skip it through their inbox, the one that parked it handles it \
again. Undecodable parked events, and events whose id the outbox still holds (a published \
row the relay keeps for --retention, or one not delivered yet), cannot be replayed: they \
stay parked and are reported on stderr. Exit code 0 when at least one was replayed (or \
nothing was parked), 1 when there were events to replay and none could be.")]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    pub(crate) which: ReplayWhich,
    /// With --parked-all: only the events this consumer parked.
    // `requires = "parked_all"` would not do: a flag's default (false)
    // counts as present. One of the four is required, so this means
    // --parked-all.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["all", "ids", "parked"])]
    pub(crate) consumer: Option<String>,
}

/// Exactly one of the ways to choose what `proclaim replay` replays.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ReplayWhich {
    /// Replay every dead-lettered event.
    #[arg(long)]
    pub(crate) all: bool,
    /// Replay these dead-lettered event ids (repeatable).
    #[arg(long = "id", value_name = "EVENT_ID")]
    pub(crate) ids: Vec<uuid::Uuid>,
    /// Replay these parked events, by the id `status --parked` shows (#N): `--parked 3 4` or `--parked 3,4`.
    #[arg(
        long,
        value_name = "ID",
        num_args = 1..,
        value_delimiter = ',',
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    pub(crate) parked: Vec<i64>,
    /// Replay every parked event (of --consumer, or of every consumer).
    #[arg(long)]
    pub(crate) parked_all: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(argv: &[&str]) -> Result<Command, String> {
        Cli::try_parse_from(["proclaim"].iter().chain(argv))
            .map(|cli| cli.command)
            .map_err(|e| e.to_string())
    }

    fn replay(argv: &[&str]) -> ReplayArgs {
        match parse(&[&["replay"], argv].concat()) {
            Ok(Command::Replay(args)) => args,
            other => panic!("{other:?}"),
        }
    }

    fn status(argv: &[&str]) -> StatusArgs {
        match parse(&[&["status"], argv].concat()) {
            Ok(Command::Status(args)) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replay_takes_parked_ids_as_a_list_or_repeated() {
        assert_eq!(replay(&["--parked", "3", "4"]).which.parked, [3, 4]);
        assert_eq!(replay(&["--parked", "3,4"]).which.parked, [3, 4]);
        assert_eq!(
            replay(&["--parked", "3", "--parked", "5"]).which.parked,
            [3, 5]
        );
        let all = replay(&["--parked-all", "--consumer", "thank-you"]);
        assert!(all.which.parked_all);
        assert_eq!(all.consumer.as_deref(), Some("thank-you"));
        assert!(replay(&["--all"]).which.all);
    }

    #[test]
    fn replay_takes_exactly_one_choice() {
        for bad in [
            &[][..],
            &["--all", "--parked-all"],
            &["--parked", "1", "--parked-all"],
            &[
                "--id",
                "0190a5e4-0000-7000-8000-000000000000",
                "--parked",
                "1",
            ],
            &["--parked"],
            &["--parked", "0"],
            &["--parked", "x"],
            &["--consumer", "thank-you"],
            &["--all", "--consumer", "thank-you"],
            &["--parked", "1", "--consumer", "thank-you"],
        ] {
            let argv = [&["replay"], bad].concat();
            assert!(parse(&argv).is_err(), "accepted {argv:?}");
        }
    }

    #[test]
    fn status_lists_parked_events_only_when_asked() {
        let plain = status(&[]);
        assert_eq!((plain.parked, plain.consumer), (None, None));
        let some = status(&["--parked", "20", "--consumer", "c"]);
        assert_eq!(some.parked, Some(20));
        assert_eq!(some.consumer.as_deref(), Some("c"));
        assert!(parse(&["status", "--consumer", "c"]).is_err());
        assert!(parse(&["status", "--parked", "0"]).is_err());
        assert!(parse(&["status", "--parked"]).is_err());
    }

    #[test]
    fn the_inbox_table_is_a_global_option() {
        let cli = Cli::try_parse_from(["proclaim", "status", "--inbox-table", "billing_inbox"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.global.inbox_table.as_deref(), Some("billing_inbox"));
    }
}
