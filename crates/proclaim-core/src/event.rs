//! The [`Event`] envelope: CloudEvents 1.0 attributes around a JSON payload.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

/// The CloudEvents spec version every proclaim event carries.
pub const SPEC_VERSION: &str = "1.0";

/// The content type used when none is given.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Source used when the builder is not given one.
pub const DEFAULT_SOURCE: &str = "proclaim";

/// Metadata key of the correlation id (a CloudEvents extension attribute).
pub const CORRELATION_ID: &str = "correlationid";
/// Metadata key of the causation id (a CloudEvents extension attribute).
pub const CAUSATION_ID: &str = "causationid";
/// Metadata key of the W3C trace context (the CloudEvents distributed tracing extension).
pub const TRACEPARENT: &str = "traceparent";

const MAX_TYPE_LEN: usize = 255;
const MAX_SUBJECT_LEN: usize = 1024;
const MAX_SOURCE_LEN: usize = 1024;
const MAX_EXTENSION_VALUE_LEN: usize = 4096;
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

/// Why an event could not be built or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// A required attribute was not given.
    #[error("event attribute `{0}` is required")]
    Missing(&'static str),
    /// An attribute has a value that is not allowed.
    #[error("event attribute `{attribute}` is invalid: {reason}")]
    Invalid {
        /// The attribute's name.
        attribute: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The payload could not be serialized to, or parsed as, JSON.
    #[error("event data is not valid JSON: {0}")]
    Data(String),
}

fn invalid(attribute: impl Into<String>, reason: impl Into<String>) -> EventError {
    EventError::Invalid {
        attribute: attribute.into(),
        reason: reason.into(),
    }
}

/// One event: what happened (`type`), to which aggregate (`subject`, also the
/// ordering key), where (`source`), when (`time`), and the JSON `data`.
///
/// The attributes follow CloudEvents 1.0; `metadata` holds extension
/// attributes such as [`CORRELATION_ID`], [`CAUSATION_ID`] and
/// [`TRACEPARENT`]. An `Event` is immutable once built, and always valid:
/// every constructor checks it.
///
/// ```
/// use proclaim_core::Event;
///
/// let event = Event::builder("DonorSecured")
///     .subject("donor-42")
///     .source("campaign-finance")
///     .data(&serde_json::json!({ "donor_id": 42, "amount_cents": 250_000 }))
///     .correlation_id("pledge-drive-7")
///     .build()?;
/// assert_eq!(event.event_type(), "DonorSecured");
/// assert_eq!(event.subject(), "donor-42");
/// assert_eq!(event.correlation_id(), Some("pledge-drive-7"));
/// # Ok::<(), proclaim_core::EventError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Event {
    id: Uuid,
    event_type: String,
    source: String,
    subject: String,
    time: DateTime<Utc>,
    datacontenttype: String,
    dataschema: Option<String>,
    data: Box<RawValue>,
    metadata: BTreeMap<String, String>,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.event_type == other.event_type
            && self.source == other.source
            && self.subject == other.subject
            && self.time == other.time
            && self.datacontenttype == other.datacontenttype
            && self.dataschema == other.dataschema
            && self.data.get() == other.data.get()
            && self.metadata == other.metadata
    }
}
impl Eq for Event {}

/// The parts of an [`Event`], as a store keeps them. [`Event::from_parts`]
/// checks them again, so a row edited by hand cannot smuggle in an invalid event.
#[derive(Debug, Clone)]
pub struct EventParts {
    /// Event id.
    pub id: Uuid,
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `subject`: the aggregate id and ordering key.
    pub subject: String,
    /// CloudEvents `time`.
    pub time: DateTime<Utc>,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: String,
    /// CloudEvents `dataschema`.
    pub dataschema: Option<String>,
    /// The payload as JSON text.
    pub data: String,
    /// Extension attributes.
    pub metadata: BTreeMap<String, String>,
}

impl Event {
    /// Starts building an event of the given `type`.
    pub fn builder(event_type: impl Into<String>) -> EventBuilder {
        EventBuilder::new(event_type)
    }

    /// Rebuilds an event from stored parts, validating every attribute.
    pub fn from_parts(parts: EventParts) -> Result<Self, EventError> {
        let data =
            RawValue::from_string(parts.data).map_err(|e| EventError::Data(e.to_string()))?;
        let event = Event {
            id: parts.id,
            event_type: parts.event_type,
            source: parts.source,
            subject: parts.subject,
            time: parts.time,
            datacontenttype: parts.datacontenttype,
            dataschema: parts.dataschema,
            data,
            metadata: parts.metadata,
        };
        event.validate()?;
        Ok(event)
    }

    /// Event id (UUIDv7 unless set explicitly): unique, and the broker-side
    /// deduplication id.
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// CloudEvents `type`, e.g. `DonorSecured`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// CloudEvents `source`: the service that proclaims the event.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// CloudEvents `subject`: the aggregate id, and the ordering key — events
    /// with the same subject are published in the order they were written.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// CloudEvents `time`: when the event happened.
    pub fn time(&self) -> DateTime<Utc> {
        self.time
    }
    /// CloudEvents `datacontenttype` (a JSON media type).
    pub fn datacontenttype(&self) -> &str {
        &self.datacontenttype
    }
    /// CloudEvents `dataschema`: a URI naming the payload's schema and version.
    pub fn dataschema(&self) -> Option<&str> {
        self.dataschema.as_deref()
    }
    /// The payload, as the exact JSON text that was written.
    pub fn data(&self) -> &RawValue {
        &self.data
    }
    /// Deserializes the payload into `T`.
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, EventError> {
        serde_json::from_str(self.data.get()).map_err(|e| EventError::Data(e.to_string()))
    }
    /// Extension attributes (correlation id, causation id, traceparent, …).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// The correlation id, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.metadata.get(CORRELATION_ID).map(String::as_str)
    }
    /// The causation id (id of the message that caused this one), if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.metadata.get(CAUSATION_ID).map(String::as_str)
    }
    /// The W3C `traceparent`, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.metadata.get(TRACEPARENT).map(String::as_str)
    }
    /// `time` as an RFC 3339 string, as CloudEvents writes it.
    pub fn time_rfc3339(&self) -> String {
        self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    /// The event in CloudEvents structured JSON form.
    pub fn to_cloudevent_json(&self) -> String {
        #[derive(Serialize)]
        struct Structured<'a> {
            specversion: &'static str,
            id: Uuid,
            #[serde(rename = "type")]
            event_type: &'a str,
            source: &'a str,
            subject: &'a str,
            time: String,
            datacontenttype: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            dataschema: Option<&'a str>,
            #[serde(flatten)]
            metadata: &'a BTreeMap<String, String>,
            data: &'a RawValue,
        }
        let s = Structured {
            specversion: SPEC_VERSION,
            id: self.id,
            event_type: &self.event_type,
            source: &self.source,
            subject: &self.subject,
            time: self.time_rfc3339(),
            datacontenttype: &self.datacontenttype,
            dataschema: self.dataschema.as_deref(),
            metadata: &self.metadata,
            data: &self.data,
        };
        // Serializing borrowed strings, a map of strings and a RawValue cannot fail.
        serde_json::to_string(&s).unwrap_or_default()
    }

    /// Parses an event from CloudEvents structured JSON.
    pub fn from_cloudevent_json(json: &str) -> Result<Self, EventError> {
        // Attributes are read as raw JSON, so that `data` keeps the exact text
        // it was written with (whitespace, key order, number spelling), as
        // `Event::data` promises; a round trip through `serde_json::Value`
        // would rewrite it.
        let mut map: BTreeMap<String, &RawValue> = serde_json::from_str(json).map_err(|_| {
            match serde_json::from_str::<&RawValue>(json) {
                Ok(_) => EventError::Data("a CloudEvent must be a JSON object".into()),
                Err(e) => EventError::Data(e.to_string()),
            }
        })?;
        let mut take = |name: &'static str| -> Result<Option<String>, EventError> {
            match map.remove(name) {
                None => Ok(None),
                Some(raw) => serde_json::from_str::<Option<String>>(raw.get()).map_err(|e| {
                    if raw.get().starts_with('"') {
                        invalid(name, e.to_string())
                    } else {
                        invalid(name, "must be a string")
                    }
                }),
            }
        };
        let spec = take("specversion")?.ok_or(EventError::Missing("specversion"))?;
        if spec != SPEC_VERSION {
            return Err(invalid(
                "specversion",
                format!("unsupported version {spec:?}"),
            ));
        }
        let id = take("id")?.ok_or(EventError::Missing("id"))?;
        let id = Uuid::parse_str(&id).map_err(|e| invalid("id", e.to_string()))?;
        let event_type = take("type")?.ok_or(EventError::Missing("type"))?;
        let source = take("source")?.ok_or(EventError::Missing("source"))?;
        let subject = take("subject")?.ok_or(EventError::Missing("subject"))?;
        let time = take("time")?.ok_or(EventError::Missing("time"))?;
        let time = DateTime::parse_from_rfc3339(&time)
            .map_err(|e| invalid("time", e.to_string()))?
            .with_timezone(&Utc);
        let datacontenttype = take("datacontenttype")?.unwrap_or_else(|| JSON_CONTENT_TYPE.into());
        let dataschema = take("dataschema")?;
        let data = map
            .remove("data")
            .map_or_else(|| "null".to_owned(), |raw| raw.get().to_owned());
        let mut metadata = BTreeMap::new();
        for (k, raw) in map {
            // Extension values that are not strings are kept as compact JSON text.
            let value = match serde_json::from_str(raw.get()) {
                Ok(serde_json::Value::String(s)) => s,
                Ok(other) => other.to_string(),
                Err(e) => return Err(invalid(k, e.to_string())),
            };
            metadata.insert(k, value);
        }
        Event::from_parts(EventParts {
            id,
            event_type,
            source,
            subject,
            time,
            datacontenttype,
            dataschema,
            data,
            metadata,
        })
    }

    /// Splits the event into its parts (the inverse of [`Event::from_parts`]).
    pub fn into_parts(self) -> EventParts {
        EventParts {
            id: self.id,
            event_type: self.event_type,
            source: self.source,
            subject: self.subject,
            time: self.time,
            datacontenttype: self.datacontenttype,
            dataschema: self.dataschema,
            data: self.data.get().to_owned(),
            metadata: self.metadata,
        }
    }

    fn validate(&self) -> Result<(), EventError> {
        check_text("type", &self.event_type, MAX_TYPE_LEN)?;
        check_text("source", &self.source, MAX_SOURCE_LEN)?;
        check_text("subject", &self.subject, MAX_SUBJECT_LEN)?;
        // RFC 3339 writes four-digit years: a time outside them would encode
        // to CloudEvents JSON that no decoder (this one included) accepts.
        if !(0..=9999).contains(&self.time.year()) {
            return Err(invalid(
                "time",
                format!(
                    "{} is outside the years 0000-9999 that RFC 3339 can write",
                    self.time
                ),
            ));
        }
        check_text("datacontenttype", &self.datacontenttype, 255)?;
        if !is_json_media_type(&self.datacontenttype) {
            return Err(invalid(
                "datacontenttype",
                format!(
                    "{:?} is not a JSON media type (application/json or */*+json)",
                    self.datacontenttype
                ),
            ));
        }
        if let Some(schema) = &self.dataschema {
            check_text("dataschema", schema, MAX_SOURCE_LEN)?;
        }
        for (name, value) in &self.metadata {
            check_extension_name(name)?;
            if value.len() > MAX_EXTENSION_VALUE_LEN {
                return Err(invalid(
                    name,
                    format!("longer than {MAX_EXTENSION_VALUE_LEN} bytes"),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(invalid(name, "contains a control character"));
            }
        }
        Ok(())
    }
}

fn check_text(attribute: &'static str, value: &str, max: usize) -> Result<(), EventError> {
    if value.is_empty() {
        return Err(EventError::Missing(attribute));
    }
    if value.len() > max {
        return Err(invalid(attribute, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(attribute, "contains a control character"));
    }
    Ok(())
}

fn check_extension_name(name: &str) -> Result<(), EventError> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        return Err(invalid(
            name,
            "extension names are 1-20 characters of a-z and 0-9 (CloudEvents 1.0)",
        ));
    }
    if RESERVED.contains(&name) {
        return Err(invalid(name, "is a reserved CloudEvents attribute"));
    }
    Ok(())
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// Builds an [`Event`]; see [`Event::builder`]. Errors (bad JSON, a missing
/// subject, an invalid extension name) are reported by [`EventBuilder::build`].
#[derive(Debug, Clone)]
#[must_use = "an event builder does nothing until `build` is called"]
pub struct EventBuilder {
    id: Option<Uuid>,
    event_type: String,
    source: Option<String>,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    data: Result<Option<Box<RawValue>>, EventError>,
    metadata: BTreeMap<String, String>,
}

impl EventBuilder {
    fn new(event_type: impl Into<String>) -> Self {
        EventBuilder {
            id: None,
            event_type: event_type.into(),
            source: None,
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: Ok(None),
            metadata: BTreeMap::new(),
        }
    }

    /// The aggregate id and ordering key (required).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
    /// The proclaiming service (default [`DEFAULT_SOURCE`]).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }
    /// Sets the id explicitly (default: a new UUIDv7).
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }
    /// Sets the event time (default: now).
    pub fn time(mut self, time: DateTime<Utc>) -> Self {
        self.time = Some(time);
        self
    }
    /// Sets a JSON media type other than `application/json`.
    pub fn datacontenttype(mut self, content_type: impl Into<String>) -> Self {
        self.datacontenttype = Some(content_type.into());
        self
    }
    /// Names the payload's schema, including its version
    /// (e.g. `urn:campaign:donor-secured:v2`).
    pub fn dataschema(mut self, schema: impl Into<String>) -> Self {
        self.dataschema = Some(schema.into());
        self
    }
    /// Serializes `data` to JSON as the payload (default: `null`).
    pub fn data<T: Serialize + ?Sized>(mut self, data: &T) -> Self {
        self.data = serde_json::value::to_raw_value(data)
            .map(Some)
            .map_err(|e| EventError::Data(e.to_string()));
        self
    }
    /// Uses `json` verbatim as the payload; it must be valid JSON.
    pub fn json(mut self, json: impl Into<String>) -> Self {
        self.data = RawValue::from_string(json.into())
            .map(Some)
            .map_err(|e| EventError::Data(e.to_string()));
        self
    }
    /// Sets the correlation id that ties a conversation or saga together.
    pub fn correlation_id(self, id: impl fmt::Display) -> Self {
        self.extension(CORRELATION_ID, id.to_string())
    }
    /// Sets the causation id: the id of the message that caused this event.
    pub fn causation_id(self, id: impl fmt::Display) -> Self {
        self.extension(CAUSATION_ID, id.to_string())
    }
    /// Sets the W3C `traceparent` of the writing span.
    pub fn traceparent(self, traceparent: impl Into<String>) -> Self {
        self.extension(TRACEPARENT, traceparent.into())
    }
    /// Marks this event as caused by `cause`: causation id = its id,
    /// correlation id = its correlation id, or its id if it has none.
    pub fn caused_by(self, cause: &Event) -> Self {
        let correlation = cause
            .correlation_id()
            .map(str::to_owned)
            .unwrap_or_else(|| cause.id().to_string());
        self.causation_id(cause.id()).correlation_id(correlation)
    }
    /// Sets any CloudEvents extension attribute (names: 1-20 of a-z, 0-9).
    pub fn extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(name.into(), value.into());
        self
    }

    /// Checks every attribute and returns the event.
    pub fn build(self) -> Result<Event, EventError> {
        let data = match self.data? {
            Some(data) => data,
            None => {
                RawValue::from_string("null".into()).map_err(|e| EventError::Data(e.to_string()))?
            }
        };
        let event = Event {
            id: self.id.unwrap_or_else(Uuid::now_v7),
            event_type: self.event_type,
            source: self.source.unwrap_or_else(|| DEFAULT_SOURCE.into()),
            subject: self.subject.ok_or(EventError::Missing("subject"))?,
            time: self.time.unwrap_or_else(Utc::now),
            datacontenttype: self
                .datacontenttype
                .unwrap_or_else(|| JSON_CONTENT_TYPE.into()),
            dataschema: self.dataschema,
            data,
            metadata: self.metadata,
        };
        event.validate()?;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn donor() -> EventBuilder {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .data(&serde_json::json!({"amount_cents": 250000}))
    }

    #[test]
    fn builds_with_defaults() -> Result<(), EventError> {
        let e = donor().build()?;
        assert_eq!(e.source(), DEFAULT_SOURCE);
        assert_eq!(e.datacontenttype(), JSON_CONTENT_TYPE);
        assert_eq!(e.id().get_version_num(), 7);
        assert_eq!(e.data().get(), r#"{"amount_cents":250000}"#);
        Ok(())
    }

    #[test]
    fn missing_subject_is_an_error() {
        let err = Event::builder("DonorSecured").build().err();
        assert_eq!(err, Some(EventError::Missing("subject")));
    }

    #[test]
    fn empty_type_is_an_error() {
        let err = Event::builder("").subject("k").build().err();
        assert_eq!(err, Some(EventError::Missing("type")));
    }

    #[test]
    fn bad_json_is_an_error() {
        let err = Event::builder("T")
            .subject("k")
            .json("{not json")
            .build()
            .err();
        assert!(matches!(err, Some(EventError::Data(_))), "{err:?}");
    }

    #[test]
    fn control_characters_are_rejected() {
        let err = Event::builder("T").subject("a\r\nb").build().err();
        assert!(matches!(err, Some(EventError::Invalid { .. })), "{err:?}");
    }

    #[test]
    fn extension_names_follow_cloudevents() {
        for bad in [
            "Correlation",
            "correlation_id",
            "",
            "id",
            "data",
            "abcdefghijklmnopqrstu",
        ] {
            let err = donor().extension(bad, "v").build().err();
            assert!(
                matches!(err, Some(EventError::Invalid { .. })),
                "{bad}: {err:?}"
            );
        }
        assert!(donor().extension("tenant7", "v").build().is_ok());
    }

    #[test]
    fn non_json_content_type_is_rejected() {
        let err = donor().datacontenttype("text/plain").build().err();
        assert!(matches!(err, Some(EventError::Invalid { .. })), "{err:?}");
        assert!(
            donor()
                .datacontenttype("application/cloudevents+json; charset=utf-8")
                .build()
                .is_ok()
        );
    }

    #[test]
    fn caused_by_links_correlation_and_causation() -> Result<(), EventError> {
        let first = donor().build()?;
        let second = Event::builder("ThankYouSent")
            .subject("donor-42")
            .caused_by(&first)
            .build()?;
        assert_eq!(second.causation_id(), Some(first.id().to_string().as_str()));
        assert_eq!(
            second.correlation_id(),
            Some(first.id().to_string().as_str())
        );
        let third = Event::builder("Logged")
            .subject("donor-42")
            .caused_by(&second)
            .build()?;
        assert_eq!(third.correlation_id(), second.correlation_id());
        Ok(())
    }

    #[test]
    fn structured_json_round_trips() -> Result<(), EventError> {
        let e = donor()
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .correlation_id("c-1")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .build()?;
        let json = e.to_cloudevent_json();
        let back = Event::from_cloudevent_json(&json)?;
        assert_eq!(back, e);
        Ok(())
    }

    #[test]
    fn structured_json_rejects_garbage() {
        assert!(Event::from_cloudevent_json("[]").is_err());
        assert!(Event::from_cloudevent_json("{}").is_err());
        assert!(Event::from_cloudevent_json(r#"{"specversion":"0.3"}"#).is_err());
    }
}
