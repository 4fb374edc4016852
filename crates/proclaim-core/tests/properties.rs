//! Property tests of bad and arbitrary input: the [`Event`] envelope (builder,
//! CloudEvents JSON encoding and decoding), [`RelayConfig`] and [`Backoff`].
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use proclaim_core::{Backoff, Event, EventError, RelayConfig};
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;

/// Attribute names that are not extensions (CloudEvents 1.0 core attributes).
const RESERVED: [&str; 10] = [
    "id",
    "type",
    "source",
    "subject",
    "time",
    "specversion",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
];

/// The first and last second RFC 3339 can write (years 0000 and 9999).
const FIRST_RFC3339_SECOND: i64 = -62_167_219_200;
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

// ---------------------------------------------------------------- strategies

/// Text the builder accepts: 1..=`max_chars` characters, none of them a control
/// character (at most 4 bytes each, so keep `max_chars * 4` within the limit).
fn text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[^\\p{{Cc}}]{{1,{max_chars}}}")).unwrap()
}

/// A valid extension name: 1-20 of a-z and 0-9, not a core attribute.
fn extension_name() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,20}".prop_filter("a core attribute", |n| !RESERVED.contains(&n.as_str()))
}

/// A valid extension value (may be empty).
fn extension_value() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{0,40}"
}

/// Any JSON value, nested up to 4 levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Non-finite floats become `null`, as serde_json writes them.
        any::<f64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// How the payload is handed to the builder.
#[derive(Debug, Clone)]
enum Payload {
    /// `.data(&value)`: serialized by serde_json.
    Serialized(Value),
    /// `.json(text)`: verbatim text, here pretty-printed and padded with
    /// whitespace, which must survive the round trip byte for byte.
    Verbatim(String),
    /// No payload: `null`.
    Absent,
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        3 => json_value().prop_map(Payload::Serialized),
        2 => (json_value(), "[ \t\n]{0,3}", "[ \t\n]{0,3}").prop_map(|(v, pre, post)| {
            Payload::Verbatim(format!("{pre}{}{post}", serde_json::to_string_pretty(&v).unwrap()))
        }),
        // Unusual but valid number and string spellings.
        1 => prop::sample::select(vec![
            r#"{"b":1,"a":2}"#,
            "1E+2",
            "-0",
            "-0.0",
            "1e400",
            "123456789012345678901234567890",
            "0.30000000000000004",
            r#""\u00e9\ud83d\ude00\/""#,
            r#"[1 , 2,3 ]"#,
        ])
        .prop_map(|s| Payload::Verbatim(s.to_owned())),
        1 => Just(Payload::Absent),
    ]
}

/// Any time chrono can hold, mostly within the years RFC 3339 can write,
/// sometimes a leap second, sometimes far outside.
fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    let min = DateTime::<Utc>::MIN_UTC.timestamp();
    let max = DateTime::<Utc>::MAX_UTC.timestamp();
    prop_oneof![
        6 => (FIRST_RFC3339_SECOND..=LAST_RFC3339_SECOND, 0u32..1_000_000_000),
        // Leap seconds: chrono holds them as nanoseconds >= 1e9 of second 59.
        1 => ((FIRST_RFC3339_SECOND / 60)..(LAST_RFC3339_SECOND / 60), 1_000_000_000u32..2_000_000_000)
            .prop_map(|(minute, nanos)| (minute * 60 + 59, nanos)),
        1 => (min..=max, 0u32..1_000_000_000),
        1 => prop::sample::select(vec![
            FIRST_RFC3339_SECOND - 1,
            FIRST_RFC3339_SECOND,
            LAST_RFC3339_SECOND,
            LAST_RFC3339_SECOND + 1,
            min,
            max,
        ])
        .prop_map(|s| (s, 0)),
    ]
    .prop_filter_map("not a time", |(secs, nanos)| {
        DateTime::from_timestamp(secs, nanos)
    })
}

/// Everything the builder takes, all of it valid except perhaps the time.
#[derive(Debug, Clone)]
struct Spec {
    id: Uuid,
    event_type: String,
    subject: String,
    source: Option<String>,
    time: DateTime<Utc>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    payload: Payload,
    extensions: BTreeMap<String, String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    traceparent: Option<String>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (
            any::<u128>().prop_map(Uuid::from_u128),
            text(60),
            text(200),
            prop::option::of(text(200)),
            any_time(),
            prop::option::of(prop::sample::select(vec![
                "application/json",
                "Application/JSON; charset=utf-8",
                "application/cloudevents+json",
                "text/vnd.campaign+json",
            ])),
            prop::option::of(text(200)),
        ),
        (
            payload(),
            prop::collection::btree_map(extension_name(), extension_value(), 0..5),
            prop::option::of(extension_value()),
            prop::option::of(extension_value()),
            prop::option::of(extension_value()),
        ),
    )
        .prop_map(
            |(
                (id, event_type, subject, source, time, datacontenttype, dataschema),
                (payload, extensions, correlation_id, causation_id, traceparent),
            )| Spec {
                id,
                event_type,
                subject,
                source,
                time,
                datacontenttype: datacontenttype.map(str::to_owned),
                dataschema,
                payload,
                extensions,
                correlation_id,
                causation_id,
                traceparent,
            },
        )
}

fn build(spec: &Spec) -> Result<Event, EventError> {
    let mut b = Event::builder(spec.event_type.clone())
        .id(spec.id)
        .subject(spec.subject.clone())
        .time(spec.time);
    if let Some(s) = &spec.source {
        b = b.source(s.clone());
    }
    if let Some(s) = &spec.datacontenttype {
        b = b.datacontenttype(s.clone());
    }
    if let Some(s) = &spec.dataschema {
        b = b.dataschema(s.clone());
    }
    b = match &spec.payload {
        Payload::Serialized(v) => b.data(v),
        Payload::Verbatim(text) => b.json(text.clone()),
        Payload::Absent => b,
    };
    for (name, value) in &spec.extensions {
        b = b.extension(name.clone(), value.clone());
    }
    if let Some(v) = &spec.correlation_id {
        b = b.correlation_id(v);
    }
    if let Some(v) = &spec.causation_id {
        b = b.causation_id(v);
    }
    if let Some(v) = &spec.traceparent {
        b = b.traceparent(v.clone());
    }
    b.build()
}

/// Whether RFC 3339 (four-digit years) can write `time`.
fn rfc3339_can_write(time: DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

/// Encodes `event`, decodes it, and checks that nothing changed.
fn assert_round_trips(event: &Event) -> Result<(), TestCaseError> {
    let json = event.to_cloudevent_json();
    let back = Event::from_cloudevent_json(&json)
        .map_err(|e| TestCaseError::fail(format!("{e} decoding {json}")))?;
    prop_assert_eq!(back.data().get(), event.data().get());
    prop_assert_eq!(&back, event);
    prop_assert_eq!(back.to_cloudevent_json(), json);
    Ok(())
}

/// The error names an attribute and says what is wrong.
fn assert_clear(err: &EventError) -> Result<(), TestCaseError> {
    let message = err.to_string();
    match err {
        EventError::Missing(attribute) => {
            prop_assert!(!attribute.is_empty());
            prop_assert!(message.contains(&format!("`{attribute}`")), "{}", message);
        }
        EventError::Invalid { attribute, reason } => {
            prop_assert!(!reason.is_empty(), "{}", message);
            prop_assert!(message.contains(&format!("`{attribute}`")), "{}", message);
        }
        EventError::Data(reason) => prop_assert!(!reason.is_empty(), "{}", message),
        _ => prop_assert!(!message.is_empty()),
    }
    Ok(())
}

fn check_decode(json: &str) -> Result<(), TestCaseError> {
    match Event::from_cloudevent_json(json) {
        Ok(event) => assert_round_trips(&event),
        Err(e) => assert_clear(&e),
    }
}

/// A valid envelope as a JSON object, to mutate.
fn envelope() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    spec()
        .prop_filter_map("not buildable", |spec| build(&spec).ok())
        // A payload serde_json::Value cannot hold (such as 1e400) cannot be mutated here.
        .prop_filter_map(
            "data out of Value's range",
            |event| match serde_json::from_str(&event.to_cloudevent_json()) {
                Ok(Value::Object(map)) => Some(map),
                _ => None,
            },
        )
}

#[derive(Debug, Clone)]
enum Mutation {
    Drop(String),
    Replace(String, Value),
    AddUnknown(String, Value),
    SpecVersion(String),
    Time(String),
}

const ATTRIBUTES: [&str; 10] = [
    "specversion",
    "id",
    "type",
    "source",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "correlationid",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let attribute = prop::sample::select(ATTRIBUTES.to_vec()).prop_map(str::to_owned);
    prop_oneof![
        attribute.clone().prop_map(Mutation::Drop),
        (attribute, json_value()).prop_map(|(a, v)| Mutation::Replace(a, v)),
        (
            prop_oneof![
                extension_name(),
                "[a-zA-Z0-9_\\-]{0,24}",
                any::<String>(),
                Just("data_base64".to_owned()),
            ],
            prop_oneof![
                extension_value().prop_map(Value::String),
                json_value()
            ],
        )
            .prop_map(|(k, v)| Mutation::AddUnknown(k, v)),
        prop_oneof![
            Just("1.0".to_owned()),
            Just("0.3".to_owned()),
            Just("1.0 ".to_owned()),
            Just("1".to_owned()),
            any::<String>(),
        ]
        .prop_map(Mutation::SpecVersion),
        prop_oneof![
            Just("2024-02-30T00:00:00Z".to_owned()),
            Just("2024-01-01 00:00:00".to_owned()),
            Just("2024-01-01T00:00:00".to_owned()),
            Just("0000-01-01T00:00:00+01:00".to_owned()),
            Just("9999-12-31T23:59:59-01:00".to_owned()),
            Just("2016-12-31T23:59:60Z".to_owned()),
            Just("2016-12-31T23:59:60.5+05:30".to_owned()),
            Just("2024-01-01T00:00:00.1234567891234Z".to_owned()),
            Just("+10000-01-01T00:00:00Z".to_owned()),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?([Zz]|[+-][0-9]{2}:[0-9]{2})",
            any::<String>(),
        ]
        .prop_map(Mutation::Time),
    ]
}

fn apply(map: &mut serde_json::Map<String, Value>, mutation: &Mutation) {
    match mutation {
        Mutation::Drop(name) => {
            map.remove(name);
        }
        Mutation::Replace(name, value) | Mutation::AddUnknown(name, value) => {
            map.insert(name.clone(), value.clone());
        }
        Mutation::SpecVersion(v) => {
            map.insert("specversion".into(), Value::String(v.clone()));
        }
        Mutation::Time(t) => {
            map.insert("time".into(), Value::String(t.clone()));
        }
    }
}

// ------------------------------------------------------------ event properties

proptest! {
    #![proptest_config(config())]

    /// Whatever the builder accepts encodes to CloudEvents JSON and decodes to
    /// an equal event, the payload byte for byte. The only input of `spec()`
    /// the builder may reject is a time RFC 3339 cannot write.
    #[test]
    fn built_events_round_trip(spec in spec()) {
        match build(&spec) {
            Ok(event) => {
                prop_assert!(rfc3339_can_write(event.time()), "{:?}", event.time());
                if let Payload::Verbatim(text) = &spec.payload {
                    prop_assert_eq!(event.data().get(), text.trim_matches([' ', '\t', '\n']));
                }
                assert_round_trips(&event)?;
                // The store's view of an event round-trips too.
                let back = Event::from_parts(event.clone().into_parts());
                prop_assert_eq!(back.as_ref(), Ok(&event));
            }
            Err(e) => {
                prop_assert!(!rfc3339_can_write(spec.time), "{} for {:?}", e, spec);
                prop_assert!(
                    matches!(&e, EventError::Invalid { attribute, .. } if attribute == "time"),
                    "{:?}", e
                );
            }
        }
    }

    /// Decoding arbitrary text never panics: it is an event that round-trips,
    /// or a clear error.
    #[test]
    fn decoding_arbitrary_text_never_panics(
        json in prop_oneof![
            any::<String>(),
            "[{}\\[\\]\":,0-9a-z\\\\ .eE+-]{0,200}",
            // Objects with the right keys and arbitrary values.
            prop::collection::btree_map(
                prop::sample::select(ATTRIBUTES.to_vec()),
                "\"[^\"\\\\]{0,20}\"|null|[0-9]{1,3}|\\{\\}|\\[\\]|true",
                0..10,
            ).prop_map(|m| format!(
                "{{{}}}",
                m.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
            )),
        ]
    ) {
        check_decode(&json)?;
    }

    /// Mutating a valid envelope (dropping a field, changing its type, adding
    /// an unknown field, a bad spec version or time) never panics, and the
    /// error, if any, is the one the mutation calls for.
    #[test]
    fn decoding_mutated_envelopes(
        mut map in envelope(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        for m in &mutations {
            apply(&mut map, m);
        }
        let json = serde_json::to_string(&Value::Object(map.clone())).unwrap();
        check_decode(&json)?;
        // With a single mutation the outcome is known in advance.
        if let [m] = mutations.as_slice() {
            let result = Event::from_cloudevent_json(&json);
            let required = ["specversion", "id", "type", "source", "subject", "time"];
            match m {
                Mutation::Drop(name) | Mutation::Replace(name, Value::Null)
                    if required.contains(&name.as_str()) =>
                {
                    prop_assert_eq!(result.err(), Some(EventError::Missing(
                        required.into_iter().find(|r| *r == name.as_str()).unwrap()
                    )));
                }
                Mutation::Drop(_) => prop_assert!(result.is_ok(), "{:?}", result),
                Mutation::Replace(name, value)
                    if !value.is_string() && name != "data" && name != "correlationid" =>
                {
                    let ok_null = value.is_null() && (name == "datacontenttype" || name == "dataschema");
                    if ok_null {
                        prop_assert!(result.is_ok(), "{:?}", result);
                    } else {
                        prop_assert!(
                            matches!(&result, Err(EventError::Invalid { attribute, .. }) if attribute == name),
                            "{:?}", result
                        );
                    }
                }
                Mutation::Replace(name, value) if name == "data" => {
                    let event = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(event.data().get(), serde_json::to_string(value).unwrap());
                }
                Mutation::Replace(name, value) if name == "correlationid" => {
                    // Extension values that are not strings are kept as compact
                    // JSON text, as serde_json reads it (a float may move by one
                    // ULP, as serde_json's parser is best effort).
                    let expected = match value {
                        Value::String(s) => s.clone(),
                        other => serde_json::from_str::<Value>(&other.to_string())
                            .map_or_else(|_| other.to_string(), |v| v.to_string()),
                    };
                    if expected.len() <= 4096 && !expected.chars().any(char::is_control) {
                        let event = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(event.correlation_id(), Some(expected.as_str()));
                    } else {
                        prop_assert!(
                            matches!(&result, Err(EventError::Invalid { attribute, .. }) if attribute == "correlationid"),
                            "{:?}", result
                        );
                    }
                }
                Mutation::AddUnknown(name, value) if !ATTRIBUTES.contains(&name.as_str()) => {
                    let valid_name = !name.is_empty()
                        && name.len() <= 20
                        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                        && !RESERVED.contains(&name.as_str());
                    if valid_name {
                        if let (Ok(event), Value::String(s)) = (&result, value) {
                            prop_assert_eq!(event.metadata().get(name), Some(s));
                        }
                    } else {
                        prop_assert!(
                            matches!(&result, Err(EventError::Invalid { attribute, .. }) if attribute == name),
                            "{:?}", result
                        );
                    }
                }
                Mutation::SpecVersion(v) if v != "1.0" => {
                    prop_assert!(
                        matches!(&result, Err(EventError::Invalid { attribute, .. }) if attribute == "specversion"),
                        "{:?}", result
                    );
                }
                Mutation::Time(t) => {
                    let parsed = DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&Utc));
                    match parsed {
                        Some(time) if rfc3339_can_write(time) => {
                            let event = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
                            prop_assert_eq!(event.time(), time);
                        }
                        _ => prop_assert!(
                            matches!(&result, Err(EventError::Invalid { attribute, .. }) if attribute == "time"),
                            "{:?}", result
                        ),
                    }
                }
                _ => {}
            }
        }
    }

    /// The builder turns every invalid attribute into an error, never a panic,
    /// and accepts exactly what the CloudEvents rules allow.
    #[test]
    fn builder_rejects_bad_input_with_errors(
        event_type in prop_oneof![any::<String>(), text(60), Just(String::new()), "x{256}"],
        subject in prop::option::of(prop_oneof![any::<String>(), text(60), Just(String::new())]),
        source in prop::option::of(prop_oneof![any::<String>(), text(60), "s{1025}"]),
        content_type in prop::option::of(prop_oneof![
            any::<String>(),
            Just("text/plain".to_owned()),
            Just("application/json".to_owned()),
            Just("application/x+json;charset=utf-8".to_owned()),
        ]),
        extension in prop::option::of((
            prop_oneof![
                extension_name(),
                any::<String>(),
                "[a-zA-Z0-9_]{0,22}",
                prop::sample::select(RESERVED.to_vec()).prop_map(str::to_owned),
            ],
            prop_oneof![extension_value(), any::<String>(), "v{4097}"],
        )),
        json in prop::option::of(prop_oneof![any::<String>(), "[\\[\\]{}\"0-9a-z:,]{0,12}"]),
    ) {
        let mut b = Event::builder(event_type.clone());
        if let Some(s) = &subject { b = b.subject(s.clone()); }
        if let Some(s) = &source { b = b.source(s.clone()); }
        if let Some(s) = &content_type { b = b.datacontenttype(s.clone()); }
        if let Some((name, value)) = &extension { b = b.extension(name.clone(), value.clone()); }
        if let Some(j) = &json { b = b.json(j.clone()); }
        let result = b.build();

        let text_ok = |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control);
        let json_media = |s: &str| {
            let essence = s.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json")
        };
        let expected_ok = text_ok(&event_type, 255)
            && subject.as_deref().is_some_and(|s| text_ok(s, 1024))
            && source.as_deref().is_none_or(|s| text_ok(s, 1024))
            && content_type.as_deref().is_none_or(|s| text_ok(s, 255) && json_media(s))
            && extension.as_ref().is_none_or(|(name, value)| {
                !name.is_empty()
                    && name.len() <= 20
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                    && !RESERVED.contains(&name.as_str())
                    && value.len() <= 4096
                    && !value.chars().any(char::is_control)
            })
            && json.as_deref().is_none_or(|j| serde_json::from_str::<&serde_json::value::RawValue>(j).is_ok());
        match &result {
            Ok(event) => {
                prop_assert!(expected_ok, "accepted {:?}", event);
                assert_round_trips(event)?;
            }
            Err(e) => {
                prop_assert!(!expected_ok, "rejected valid input: {}", e);
                assert_clear(e)?;
            }
        }
    }
}

#[test]
fn builder_rejections_name_the_attribute() {
    let ok = || Event::builder("T").subject("k");
    let invalid = |r: Result<Event, EventError>, name: &str| match r {
        Err(EventError::Invalid { attribute, .. }) => assert_eq!(attribute, name),
        other => panic!("expected `{name}` to be invalid, got {other:?}"),
    };
    assert_eq!(
        Event::builder("").subject("k").build().err(),
        Some(EventError::Missing("type"))
    );
    assert_eq!(
        Event::builder("T").build().err(),
        Some(EventError::Missing("subject"))
    );
    assert_eq!(
        ok().source("").build().err(),
        Some(EventError::Missing("source"))
    );
    invalid(Event::builder("T".repeat(256)).subject("k").build(), "type");
    invalid(ok().subject("a\u{7f}b").build(), "subject");
    invalid(ok().source("s".repeat(1025)).build(), "source");
    invalid(
        ok().datacontenttype("text/plain").build(),
        "datacontenttype",
    );
    invalid(ok().dataschema("a\nb").build(), "dataschema");
    for name in [
        "",
        "Upper",
        "under_score",
        "data",
        "specversion",
        "abcdefghijklmnopqrstu",
    ] {
        invalid(ok().extension(name, "v").build(), name);
    }
    invalid(ok().extension("tenant", "v".repeat(4097)).build(), "tenant");
    invalid(ok().correlation_id("a\tb").build(), "correlationid");
    assert!(matches!(ok().json("{").build(), Err(EventError::Data(_))));
    for time in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
        invalid(ok().time(time).build(), "time");
    }
}

// ------------------------------------------------------- config and backoff

fn duration_up_to(max_secs: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0..=max_secs, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0..=max_secs).prop_map(Duration::from_secs),
        (0u64..10_000).prop_map(Duration::from_millis),
    ]
}

fn positive_duration(max_secs: u64) -> impl Strategy<Value = Duration> {
    duration_up_to(max_secs).prop_map(|d| d.max(Duration::from_nanos(1)))
}

/// Durations up to ~30 000 years.
const LONG: u64 = 1_000_000_000_000;

fn valid_backoff() -> impl Strategy<Value = Backoff> {
    (
        positive_duration(LONG),
        duration_up_to(LONG),
        prop_oneof![
            Just(1.0),
            Just(2.0),
            // Short decimals, as written in config files: 1.5, 2.25, 10.125…
            (1u64..=10_000_000, 0i32..=6).prop_map(|(m, k)| (m as f64 / 10f64.powi(k)).max(1.0)),
            1.0f64..1e6,
            1.0f64..f64::MAX,
        ],
    )
        .prop_map(|(initial, extra, multiplier)| Backoff {
            initial,
            max: initial.saturating_add(extra),
            multiplier,
        })
}

fn valid_config() -> impl Strategy<Value = RelayConfig> {
    (
        (
            1usize..=10_000,
            prop_oneof![1usize..=1024, 1usize..=usize::MAX],
            1usize..=64,
            positive_duration(LONG),
            positive_duration(LONG),
            duration_up_to(LONG),
            1u32..=u32::MAX,
        ),
        (
            valid_backoff(),
            valid_backoff(),
            prop::option::of(duration_up_to(LONG)),
            positive_duration(LONG),
            duration_up_to(LONG),
            positive_duration(LONG),
        ),
    )
        .prop_map(
            |(
                (batch, concurrent, batches, poll, publish_timeout, extra_lease, attempts),
                (backoff, outage, retention, purge, shutdown, stats),
            )| {
                RelayConfig::default()
                    .with_batch_size(batch)
                    .with_max_concurrent_publishes(concurrent)
                    .with_max_batches_in_flight(batches)
                    .with_poll_interval(poll)
                    .with_publish_timeout(publish_timeout)
                    .with_lease(publish_timeout * 2 + extra_lease)
                    .with_max_attempts(attempts)
                    .with_backoff(backoff)
                    .with_outage_backoff(outage)
                    .with_retention(retention)
                    .with_purge_interval(purge)
                    .with_shutdown_timeout(shutdown)
                    .with_stats_interval(stats)
            },
        )
}

/// Whether `x` is at most 1e6 and written with at most 15 significant digits:
/// then it parses exactly even without serde_json's `float_roundtrip`.
fn is_short_decimal(x: f64) -> bool {
    let shortest = format!("{x:e}");
    let mantissa = shortest.split('e').next().unwrap_or_default();
    x.abs() <= 1e6 && mantissa.chars().filter(char::is_ascii_digit).count() <= 15
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        prop::sample::select(vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            -1.0,
            0.5,
            1.0,
            2.0,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            f64::MAX,
            f64::MIN,
        ]),
        0.0f64..10.0,
    ]
}

fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        prop::sample::select(vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_secs(1),
            Duration::MAX,
            Duration::MAX - Duration::from_nanos(1),
            Duration::from_secs(u64::MAX / 2),
        ]),
        duration_up_to(1_000_000),
    ]
}

fn any_attempt() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 2, 63, 64, 65, 1075, u32::MAX - 1, u32::MAX]),
        0u32..100,
        any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every config `validate()` accepts survives serde_json unchanged
    /// (durations are written in humantime syntax).
    #[test]
    fn valid_configs_round_trip_through_json(config in valid_config()) {
        prop_assert_eq!(config.validate(), Ok(()));
        let json = serde_json::to_string(&config).unwrap();
        let mut back: RelayConfig = serde_json::from_str(&json)
            .map_err(|e| TestCaseError::fail(format!("{e} reading {json}")))?;
        // serde_json parses floats "best effort" unless its `float_roundtrip`
        // feature is on: a multiplier of up to 15 significant digits (all a
        // config file would hold) comes back exactly, any other f64 within a
        // few ULPs.
        for (sent, got) in [
            (config.backoff.multiplier, &mut back.backoff.multiplier),
            (config.outage_backoff.multiplier, &mut back.outage_backoff.multiplier),
        ] {
            if is_short_decimal(sent) {
                prop_assert_eq!(*got, sent, "{}", json);
            } else {
                prop_assert!((sent - *got).abs() <= sent * 4.0 * f64::EPSILON, "{} vs {}", sent, got);
                *got = sent;
            }
        }
        prop_assert_eq!(back, config);
    }

    /// The jittered delay lies between half the ceiling and the ceiling, the
    /// ceiling never exceeds `max`, and nothing panics, whatever the settings.
    #[test]
    fn backoff_delay_is_bounded(
        initial in any_duration(),
        max in any_duration(),
        multiplier in any_f64(),
        attempt in any_attempt(),
    ) {
        let backoff = Backoff { initial, max, multiplier };
        let ceiling = backoff.ceiling(attempt);
        prop_assert!(ceiling <= max, "ceiling {:?} > max {:?}", ceiling, max);
        for _ in 0..8 {
            let delay = backoff.delay(attempt);
            prop_assert!(delay <= ceiling, "delay {:?} > ceiling {:?}", delay, ceiling);
            prop_assert!(delay >= ceiling / 2, "delay {:?} < half of {:?}", delay, ceiling);
        }
    }

    /// With a config `validate()` accepts, the ceiling grows with the attempt
    /// number and starts at `initial`.
    #[test]
    fn valid_backoff_grows_monotonically(backoff in valid_backoff(), attempt in any_attempt()) {
        // Computed in f64: exact up to rounding (~1e-16 relative, plus a nanosecond).
        let slack = backoff.initial / 1_000_000_000 + Duration::from_nanos(1);
        for first in [backoff.ceiling(0), backoff.ceiling(1)] {
            prop_assert!(first.abs_diff(backoff.initial) <= slack, "{:?} vs {:?}", first, backoff.initial);
        }
        prop_assert!(backoff.ceiling(attempt) <= backoff.ceiling(attempt.saturating_add(1)));
    }
}
