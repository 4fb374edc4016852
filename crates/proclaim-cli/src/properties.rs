//! Property tests of bad and arbitrary input to the command line and the
//! config file.
//!
//! The tests assume no `PROCLAIM_*` variable is set in their environment
//! (clap reads them as defaults of the flags).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use proclaim::destination::Destination;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::args::{Cli, Command, RelayArgs};
use crate::settings::{FileConfig, relay_settings};

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

// ------------------------------------------------------------- argv parsing

/// Flags of every subcommand.
const GLOBAL_FLAGS: &[&str] = &[
    "--config",
    "-c",
    "--database-url",
    "--schema",
    "--table",
    "--inbox-table",
    "--log-format",
    "--help",
    "-h",
    "--version",
    "-V",
];

/// Each subcommand with its own flags.
const SUBCOMMANDS: &[(&str, &[&str])] = &[
    ("migrate", &[]),
    (
        "relay",
        &[
            "--nats-url",
            "--stream",
            "--subject-prefix",
            "--subject-template",
            "--create-stream",
            "--batch-size",
            "--max-attempts",
            "--lease",
            "--publish-timeout",
            "--poll-interval",
            "--retention",
            "--metrics-addr",
        ],
    ),
    (
        "emit",
        &[
            "--type",
            "-t",
            "--subject",
            "-s",
            "--data",
            "-d",
            "--source",
            "--correlation-id",
            "--dataschema",
        ],
    ),
    (
        "status",
        &["--json", "--dead-letters", "--parked", "--consumer"],
    ),
    (
        "replay",
        &["--all", "--id", "--parked", "--parked-all", "--consumer"],
    ),
    ("demo", &["--donors", "--db"]),
    ("help", &["migrate", "relay", "emit"]),
];

/// Values of every kind the flags take, and some they do not.
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "256",
    "18446744073709551616",
    "30s",
    "1h 30m",
    "1.5s",
    "7days",
    "0s",
    "1x",
    "127.0.0.1:9464",
    "[::1]:9464",
    "localhost:80",
    "0190a5e4-0000-7000-8000-000000000000",
    "not-a-uuid",
    "{\"amount\":1}",
    "{",
    "json",
    "text",
    "true",
    "--",
    "-",
    "",
];

/// An argument vector: mostly a subcommand with its flags and values (alone,
/// joined with `=`, or missing), mixed with arbitrary words.
fn argv() -> impl Strategy<Value = Vec<String>> {
    (0..=SUBCOMMANDS.len()).prop_flat_map(|i| {
        let (subcommand, own) = SUBCOMMANDS.get(i).copied().unwrap_or(("", &[]));
        let flags: Vec<&str> = own.iter().chain(GLOBAL_FLAGS).copied().collect();
        let word = prop_oneof![
            4 => (prop::sample::select(flags.clone()), prop::sample::select(VALUES))
                .prop_map(|(f, v)| vec![f.to_owned(), v.to_owned()]),
            2 => (prop::sample::select(flags.clone()), prop::sample::select(VALUES))
                .prop_map(|(f, v)| vec![format!("{f}={v}")]),
            2 => prop::sample::select(flags).prop_map(|f| vec![f.to_owned()]),
            1 => prop::sample::select(VALUES).prop_map(|v| vec![v.to_owned()]),
            1 => any::<String>().prop_map(|s| vec![s]),
            1 => "-{1,2}[a-z\\-]{0,16}(=.{0,8})?".prop_map(|s| vec![s]),
        ];
        let head = if subcommand.is_empty() {
            any::<String>().boxed()
        } else {
            Just(subcommand.to_owned()).boxed()
        };
        (
            head,
            prop::collection::vec(word.clone(), 0..3),
            prop::collection::vec(word, 0..6),
        )
            .prop_map(|(head, before, after)| {
                let mut argv = vec!["proclaim".to_owned()];
                argv.extend(before.into_iter().flatten());
                argv.push(head);
                argv.extend(after.into_iter().flatten());
                argv
            })
    })
}

/// A duration in humantime syntax, and the duration it stands for.
fn humantime_duration() -> impl Strategy<Value = (String, Duration)> {
    // (unit spellings, seconds, nanoseconds) of one unit.
    const UNITS: &[(&[&str], u64, u64)] = &[
        (&["nanos", "nsec", "ns"], 0, 1),
        (&["usec", "us", "µs"], 0, 1_000),
        (&["millis", "msec", "ms"], 0, 1_000_000),
        (&["seconds", "second", "secs", "sec", "s"], 1, 0),
        (&["minutes", "minute", "min", "mins", "m"], 60, 0),
        (&["hours", "hour", "hr", "hrs", "h"], 3600, 0),
        (&["days", "day", "d"], 86_400, 0),
        (&["weeks", "week", "wk", "wks", "w"], 604_800, 0),
        (&["months", "month", "M"], 2_630_016, 0),
        (&["years", "year", "yr", "yrs", "y"], 31_557_600, 0),
    ];
    let span = (0..UNITS.len(), any::<prop::sample::Index>(), 0u64..100_000);
    prop_oneof![
        // As humantime writes durations, e.g. "1year 2months 3days 4h 5m 6s 7ms".
        (0u64..100_000_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| {
            let d = Duration::new(s, n);
            (humantime::format_duration(d).to_string(), d)
        }),
        // Spans of any unit, with or without spaces between them.
        (
            prop::collection::vec(span, 1..5),
            prop::sample::select(vec!["", " ", "  "])
        )
            .prop_map(|(spans, sep)| {
                let mut text = String::new();
                let mut total = Duration::ZERO;
                for (unit, spelling, n) in spans {
                    let (names, secs, nanos) = UNITS[unit];
                    text.push_str(&format!("{n}{}{sep}", spelling.get(names)));
                    total += Duration::from_secs(n * secs) + Duration::from_nanos(n * nanos);
                }
                (text.trim_end().to_owned(), total)
            }),
        // Decimal seconds: "1.5s", "0.000000001s".
        (0u64..1_000_000, "[0-9]{1,9}").prop_map(|(s, frac)| {
            let nanos: u32 = format!("{frac:0<9}").parse().unwrap();
            (format!("{s}.{frac}s"), Duration::new(s, nanos))
        }),
    ]
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// Values of every `relay` flag (all optional), and the flags that say so.
#[derive(Debug, Clone, Default)]
struct RelayFlags {
    nats_url: Option<String>,
    stream: Option<String>,
    create_stream: bool,
    batch_size: Option<usize>,
    max_attempts: Option<u32>,
    lease: Option<(String, Duration)>,
    publish_timeout: Option<(String, Duration)>,
    poll_interval: Option<(String, Duration)>,
    retention: Option<(String, Duration)>,
    metrics_addr: Option<SocketAddr>,
    /// `--flag=value` rather than `--flag value`.
    joined: bool,
}

fn relay_flags() -> impl Strategy<Value = RelayFlags> {
    let word = "[^\\p{Cc}]{0,20}";
    (
        (
            prop::option::of(word),
            prop::option::of(word),
            any::<bool>(),
            prop::option::of(any::<usize>()),
            prop::option::of(any::<u32>()),
        ),
        (
            prop::option::of(humantime_duration()),
            prop::option::of(humantime_duration()),
            prop::option::of(humantime_duration()),
            prop::option::of(humantime_duration()),
            prop::option::of(socket_addr()),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (nats_url, stream, create_stream, batch_size, max_attempts),
                (lease, publish_timeout, poll_interval, retention, metrics_addr, joined),
            )| RelayFlags {
                nats_url,
                stream,
                create_stream,
                batch_size,
                max_attempts,
                lease,
                publish_timeout,
                poll_interval,
                retention,
                metrics_addr,
                joined,
            },
        )
}

impl RelayFlags {
    fn argv(&self) -> Vec<String> {
        let mut argv = vec!["proclaim".to_owned(), "relay".to_owned()];
        let mut flag = |name: &str, value: String| {
            // A value that starts with '-' only parses joined to its flag.
            if self.joined || value.starts_with('-') {
                argv.push(format!("--{name}={value}"));
            } else {
                argv.push(format!("--{name}"));
                argv.push(value);
            }
        };
        if let Some(v) = &self.nats_url {
            flag("nats-url", v.clone());
        }
        if let Some(v) = &self.stream {
            flag("stream", v.clone());
        }
        if let Some(v) = self.batch_size {
            flag("batch-size", v.to_string());
        }
        if let Some(v) = self.max_attempts {
            flag("max-attempts", v.to_string());
        }
        for (name, value) in [
            ("lease", &self.lease),
            ("publish-timeout", &self.publish_timeout),
            ("poll-interval", &self.poll_interval),
            ("retention", &self.retention),
        ] {
            if let Some((text, _)) = value {
                flag(name, text.clone());
            }
        }
        if let Some(v) = self.metrics_addr {
            flag("metrics-addr", v.to_string());
        }
        if self.create_stream {
            argv.push("--create-stream".into());
        }
        argv
    }
}

fn relay_args(argv: &[String]) -> Result<RelayArgs, TestCaseError> {
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Relay(args),
            ..
        }) => Ok(args),
        Ok(other) => Err(TestCaseError::fail(format!("{argv:?} parsed as {other:?}"))),
        Err(e) => Err(TestCaseError::fail(format!("{argv:?}: {e}"))),
    }
}

#[test]
fn the_command_line_definition_is_consistent() {
    <Cli as clap::CommandFactory>::command().debug_assert();
}

proptest! {
    #![proptest_config(config())]

    /// Any argument vector parses or is a clap error (which renders); none panics.
    #[test]
    fn arbitrary_argv_never_panics(argv in argv()) {
        match Cli::try_parse_from(&argv) {
            Ok(_) => {}
            Err(e) => {
                let _ = e.kind();
                let _ = e.render().to_string();
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    /// Valid `relay` flags parse to exactly the values given, durations in
    /// any humantime spelling included.
    #[test]
    fn relay_flags_parse_to_their_values(flags in relay_flags()) {
        let argv = flags.argv();
        let args = relay_args(&argv)?;
        prop_assert_eq!(&args.nats_url, &flags.nats_url);
        prop_assert_eq!(&args.stream, &flags.stream);
        prop_assert_eq!(args.create_stream, flags.create_stream);
        prop_assert_eq!(args.batch_size, flags.batch_size);
        prop_assert_eq!(args.max_attempts, flags.max_attempts);
        prop_assert_eq!(args.lease, flags.lease.as_ref().map(|(_, d)| *d), "{:?}", argv);
        prop_assert_eq!(args.publish_timeout, flags.publish_timeout.as_ref().map(|(_, d)| *d));
        prop_assert_eq!(args.poll_interval, flags.poll_interval.as_ref().map(|(_, d)| *d));
        prop_assert_eq!(args.retention, flags.retention.as_ref().map(|(_, d)| *d));
        prop_assert_eq!(args.metrics_addr, flags.metrics_addr);
    }

    /// The flags override the config file's relay settings: the result is
    /// the flags' values when they make a valid config, and an error
    /// (never a panic) otherwise.
    #[test]
    fn relay_flags_override_the_file(flags in relay_flags()) {
        let args = relay_args(&flags.argv())?;
        match relay_settings(&args, FileConfig::default()) {
            Ok(settings) => {
                let (relay, metrics_addr) = (&settings.relay, settings.metrics_addr);
                prop_assert!(settings.is_direct());
                let [only] = settings.destinations.as_slice() else {
                    return Err(TestCaseError::fail("one destination expected"));
                };
                let Destination::Nats(nats) = &only.destination else {
                    return Err(TestCaseError::fail("the default destination is NATS"));
                };
                if let Some(v) = flags.batch_size { prop_assert_eq!(relay.batch_size, v); }
                if let Some(v) = flags.max_attempts { prop_assert_eq!(relay.max_attempts, v); }
                if let Some((_, d)) = flags.lease { prop_assert_eq!(relay.lease, d); }
                if let Some((_, d)) = flags.publish_timeout { prop_assert_eq!(relay.publish_timeout, d); }
                if let Some((_, d)) = flags.poll_interval { prop_assert_eq!(relay.poll_interval, d); }
                prop_assert_eq!(relay.retention, flags.retention.map(|(_, d)| d));
                if let Some(v) = flags.stream { prop_assert_eq!(&nats.stream, &v); }
                prop_assert_eq!(nats.create_stream, flags.create_stream);
                prop_assert_eq!(metrics_addr, flags.metrics_addr);
                prop_assert_eq!(relay.validate(), Ok(()));
            }
            Err(e) => {
                let message = format!("{e:#}");
                prop_assert!(!message.is_empty());
            }
        }
    }
}

// -------------------------------------------------------------- config file

/// A config file under the temp directory, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "proclaim-cli-properties-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    fn load(text: &str) -> anyhow::Result<FileConfig> {
        let file = TempConfig::new(text);
        FileConfig::load(Some(&file.0))
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const TOP_KEYS: &[&str] = &[
    "database_url",
    "schema",
    "table",
    "inbox_table",
    "metrics_addr",
];
const RELAY_KEYS: &[&str] = &[
    "batch_size",
    "max_concurrent_publishes",
    "max_batches_in_flight",
    "poll_interval",
    "lease",
    "publish_timeout",
    "max_attempts",
    "retention",
    "purge_interval",
    "shutdown_timeout",
    "stats_interval",
];
const BACKOFF_KEYS: &[&str] = &["initial", "max", "multiplier"];
const NATS_KEYS: &[&str] = &[
    "url",
    "stream",
    "subject_prefix",
    "subject_template",
    "create_stream",
    "connect_timeout",
    "duplicate_window",
];
const SECTIONS: &[&str] = &[
    "relay",
    "nats",
    "relay.backoff",
    "relay.outage_backoff",
    "elsewhere",
];

fn is_known(key: &str) -> bool {
    [TOP_KEYS, RELAY_KEYS, BACKOFF_KEYS, NATS_KEYS, SECTIONS]
        .iter()
        .any(|keys| keys.contains(&key))
        || ["backoff", "outage_backoff"].contains(&key)
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML value of any type, in TOML syntax, often a plausible one.
fn toml_value() -> impl Strategy<Value = String> {
    let string = any::<String>().prop_map(|s| toml_string(&s));
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..100_000).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        Just("inf".to_owned()),
        Just("nan".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        humantime_duration().prop_map(|(text, _)| format!("{text:?}")),
        string,
        Just("\"127.0.0.1:9464\"".to_owned()),
        Just("\"postgres://app@127.0.0.1/app\"".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
        Just("[1, \"2\", 3.0]".to_owned()),
        Just("{ initial = \"1s\", max = \"1m\" }".to_owned()),
        Just("\"\"\"\nmulti\nline\"\"\"".to_owned()),
        "[^\\n]{0,12}",
    ]
}

/// A bare TOML key, known or not.
fn toml_key() -> impl Strategy<Value = String> {
    let known: Vec<&str> = [TOP_KEYS, RELAY_KEYS, BACKOFF_KEYS, NATS_KEYS]
        .concat()
        .into_iter()
        .chain(["backoff", "outage_backoff"])
        .collect();
    prop_oneof![
        4 => prop::sample::select(known).prop_map(str::to_owned),
        1 => "[A-Za-z0-9_-]{1,16}",
        1 => "\"[^\"\\\\\\p{Cc}]{0,8}\"",
    ]
}

/// Text that is mostly TOML: sections, `key = value` lines and some garbage.
fn tomlish() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        6 => (toml_key(), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => prop::sample::select(SECTIONS).prop_map(|s| format!("[{s}]")),
        1 => Just("[[relay]]".to_owned()),
        1 => Just("# a comment".to_owned()),
        1 => any::<String>(),
    ];
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

/// A valid config file, as `(section, key = value)` lines, all known keys.
fn valid_lines() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let duration = (1u64..100_000).prop_map(|n| format!("\"{n}ms\""));
    let lines = prop_oneof![
        Just((
            "",
            "database_url = \"postgres://app@127.0.0.1/app\"".to_owned()
        )),
        Just(("", "schema = \"proclaim\"".to_owned())),
        Just(("", "inbox_table = \"inbox\"".to_owned())),
        Just(("", "metrics_addr = \"127.0.0.1:9464\"".to_owned())),
        (1u32..=10_000).prop_map(|n| ("relay", format!("batch_size = {n}"))),
        duration
            .clone()
            .prop_map(|d| ("relay", format!("retention = {d}"))),
        duration
            .clone()
            .prop_map(|d| ("relay.backoff", format!("max = {d}"))),
        (1u32..100).prop_map(|n| ("relay.outage_backoff", format!("multiplier = {n}.5"))),
        duration.prop_map(|d| ("nats", format!("connect_timeout = {d}"))),
        Just(("nats", "create_stream = true".to_owned())),
    ];
    prop::collection::vec(lines, 0..6)
}

/// Renders lines grouped by section (each section opened once, in order).
fn render(lines: &[(&str, String)]) -> String {
    let mut out = String::new();
    for section in ["", "relay", "relay.backoff", "relay.outage_backoff", "nats"] {
        let mut keys = std::collections::HashSet::new();
        let body: Vec<&String> = lines
            .iter()
            .filter(|(s, line)| *s == section && keys.insert(line.split(' ').next()))
            .map(|(_, line)| line)
            .collect();
        if !section.is_empty() {
            out.push_str(&format!("[{section}]\n"));
        }
        for line in body {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    /// Loading arbitrary, mostly-TOML text never panics: a config or an error
    /// that names the file.
    #[test]
    fn loading_tomlish_text_never_panics(text in tomlish()) {
        let file = TempConfig::new(&text);
        match FileConfig::load(Some(&file.0)) {
            Ok(config) => {
                // Whatever loads can be handed to the relay settings safely.
                let args = relay_args(&["proclaim".into(), "relay".into()])?;
                let _ = relay_settings(&args, config);
            }
            Err(e) => {
                let message = format!("{e:#}");
                prop_assert!(message.contains(&file.0.display().to_string()), "{}", message);
            }
        }
    }

    /// A valid config file loads.
    #[test]
    fn valid_config_files_load(lines in valid_lines()) {
        let text = render(&lines);
        let loaded = TempConfig::load(&text);
        prop_assert!(loaded.is_ok(), "{:?} for\n{}", loaded.err(), text);
    }

    /// An unknown key, at the top or in any section, is an error naming it.
    #[test]
    fn unknown_keys_are_rejected_by_name(
        lines in valid_lines(),
        section in prop::sample::select(vec!["", "relay", "relay.backoff", "relay.outage_backoff", "nats"]),
        key in "[A-Za-z][A-Za-z0-9_-]{0,15}".prop_filter("a known key", |k| !is_known(k)),
        value in prop_oneof![Just("1".to_owned()), Just("\"30s\"".to_owned()), Just("true".to_owned())],
    ) {
        let mut lines = lines;
        lines.push((section, format!("{key} = {value}")));
        let text = render(&lines);
        match TempConfig::load(&text) {
            Ok(config) => prop_assert!(false, "accepted unknown key {} in\n{}\n{:?}", key, text, config),
            Err(e) => {
                let message = format!("{e:#}");
                prop_assert!(message.contains(&format!("`{key}`")), "{} for\n{}", message, text);
            }
        }
    }
}

// ------------------------------------------- inputs that used to crash

/// humantime 2.4 panics ("overflow in Duration::new") instead of returning an
/// error when the nanoseconds add up to exactly one second on top of
/// `u64::MAX` seconds (upstream: chronotope/humantime#66); every duration
/// flag and config file key now goes through `proclaim::parse_duration`,
/// which bounds the value first.
#[test]
fn huge_duration_flag_is_an_error_not_a_panic() {
    let argv = [
        "proclaim",
        "relay",
        "--lease",
        "18446744073709551615s 500ms 500ms",
    ];
    assert!(Cli::try_parse_from(argv).is_err());
    assert!(TempConfig::load("[relay]\nlease = \"18446744073709551615s 500ms 500ms\"\n").is_err());
}

/// `RelayConfig::validate` computed `publish_timeout * 2`, which panicked
/// when the publish timeout was longer than `Duration::MAX / 2`: the flag is
/// now refused as too long, and `validate` checks the multiplication.
#[test]
fn huge_publish_timeout_is_an_error_not_a_panic() {
    let parsed = relay_args(&[
        "proclaim".into(),
        "relay".into(),
        "--publish-timeout".into(),
        "300000000000years".into(),
    ]);
    assert!(parsed.is_err(), "a duration beyond the bound is refused");
    let config = proclaim::RelayConfig::default().with_publish_timeout(std::time::Duration::MAX);
    assert!(config.validate().is_err());
}
