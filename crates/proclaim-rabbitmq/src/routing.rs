//! [`RoutingKeyTemplate`]: how an event's AMQP routing key is derived from
//! its attributes.

use std::fmt;

use proclaim_core::{ConfigError, Event};

/// The placeholders a routing key template may use.
const PLACEHOLDERS: &str = "{type}, {subject}, {source}";

/// The longest routing key AMQP 0-9-1 can carry (a short string).
pub const MAX_ROUTING_KEY_LEN: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Type,
    Subject,
    Source,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "type" => Some(Placeholder::Type),
            "subject" => Some(Placeholder::Subject),
            "source" => Some(Placeholder::Source),
            _ => None,
        }
    }

    fn value(self, event: &Event) -> &str {
        match self {
            Placeholder::Type => event.event_type(),
            Placeholder::Subject => event.subject(),
            Placeholder::Source => event.source(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(Placeholder),
}

/// A parsed routing key template such as `{type}` or `events.{source}.{type}`.
///
/// Placeholders: `{type}`, `{subject}` and `{source}` (the event's
/// CloudEvents attributes). Anything else is copied literally; an empty
/// template gives an empty routing key (for fanout and headers exchanges).
/// The template is checked when parsed: an unknown placeholder, an
/// unbalanced brace, a control character or literal text longer than a
/// routing key can be is a configuration error.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_rabbitmq::RoutingKeyTemplate;
///
/// let template = RoutingKeyTemplate::parse("campaign.{type}.{subject}")?;
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// assert_eq!(template.render(&event)?, "campaign.DonorSecured.donor-42");
/// assert!(RoutingKeyTemplate::parse("{kind}").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKeyTemplate {
    text: String,
    parts: Vec<Part>,
}

impl RoutingKeyTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail =
            |reason: String| ConfigError(format!("routing_key_template {template:?} {reason}"));
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => return Err(fail("has a '{' inside a placeholder".into())),
                            c => name.push(c),
                        }
                    }
                    if !closed {
                        return Err(fail("has a '{' without a matching '}'".into()));
                    }
                    let Some(placeholder) = Placeholder::parse(&name) else {
                        return Err(fail(format!(
                            "has an unknown placeholder {{{name}}} (known: {PLACEHOLDERS})"
                        )));
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(placeholder));
                }
                '}' => return Err(fail("has a '}' without a matching '{'".into())),
                c if c.is_control() => {
                    return Err(fail("contains a control character".into()));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let literal_len: usize = parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => text.len(),
                Part::Placeholder(_) => 0,
            })
            .sum();
        if literal_len > MAX_ROUTING_KEY_LEN {
            return Err(fail(format!(
                "has {literal_len} bytes of literal text, more than a routing key can hold \
                 ({MAX_ROUTING_KEY_LEN} bytes)"
            )));
        }
        Ok(RoutingKeyTemplate {
            text: template.to_owned(),
            parts,
        })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Renders the routing key for `event`. Fails when the key would be
    /// longer than [`MAX_ROUTING_KEY_LEN`] bytes: such an event can never be
    /// published under this template.
    pub fn render(&self, event: &Event) -> Result<String, InvalidRoutingKey> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p) => out.push_str(p.value(event)),
            }
        }
        if out.len() > MAX_ROUTING_KEY_LEN {
            return Err(InvalidRoutingKey { len: out.len() });
        }
        Ok(out)
    }
}

impl fmt::Display for RoutingKeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why an event's attributes cannot form its routing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "its routing key would be {len} bytes long, more than AMQP allows ({MAX_ROUTING_KEY_LEN} bytes)"
)]
pub struct InvalidRoutingKey {
    len: usize,
}

impl InvalidRoutingKey {
    /// The length in bytes the routing key would have had.
    pub fn bytes(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, subject: &str, source: &str) -> Event {
        match Event::builder(event_type)
            .subject(subject)
            .source(source)
            .build()
        {
            Ok(e) => e,
            Err(e) => panic!("test event is invalid: {e}"),
        }
    }

    fn parse(t: &str) -> RoutingKeyTemplate {
        match RoutingKeyTemplate::parse(t) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn renders_every_placeholder() {
        let e = event("DonorSecured", "donor-42", "campaign-finance");
        assert_eq!(parse("{type}").render(&e), Ok("DonorSecured".into()));
        assert_eq!(
            parse("{source}.{type}.{subject}").render(&e),
            Ok("campaign-finance.DonorSecured.donor-42".into())
        );
        assert_eq!(parse("fixed").render(&e), Ok("fixed".into()));
        assert_eq!(parse("").render(&e), Ok(String::new()));
        assert_eq!(
            parse("t-{type}{subject}").render(&e),
            Ok("t-DonorSecureddonor-42".into())
        );
        assert_eq!(parse("{type}").as_str(), "{type}");
    }

    #[test]
    fn unknown_placeholders_and_unbalanced_braces_are_rejected() {
        for bad in [
            "{kind}", "{Type}", "{}", "{type", "type}", "{ty{pe}}", "a\nb",
        ] {
            assert!(
                RoutingKeyTemplate::parse(bad).is_err(),
                "{bad:?} was accepted"
            );
        }
        let msg = RoutingKeyTemplate::parse("events.{kind}")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: routing_key_template \"events.{kind}\" has an unknown \
                 placeholder {kind} (known: {type}, {subject}, {source})"
            )
        );
        let long = "x".repeat(256);
        assert!(RoutingKeyTemplate::parse(&long).is_err());
        assert!(RoutingKeyTemplate::parse(&format!("{}{{type}}", "x".repeat(255))).is_ok());
    }

    #[test]
    fn a_key_too_long_is_reported() {
        let t = parse("{subject}");
        let subject = "s".repeat(256);
        let err = t.render(&event("T", &subject, "src")).err();
        assert_eq!(err.as_ref().map(InvalidRoutingKey::bytes), Some(256));
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("its routing key would be 256 bytes long, more than AMQP allows (255 bytes)")
        );
        assert!(t.render(&event("T", &"s".repeat(255), "src")).is_ok());
    }
}
