//! [`StreamTemplate`]: how an event's stream key is derived from its
//! attributes.

use std::fmt;

use proclaim_core::{ConfigError, Event};

/// The placeholders a stream template may use.
const PLACEHOLDERS: &str = "{type}, {subject}, {source}";

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

/// A parsed stream key template such as `proclaim:events` or
/// `orders:{type}`.
///
/// Placeholders: `{type}`, `{subject}` and `{source}`, the event's
/// CloudEvents attributes. `{{` and `}}` stand for literal braces (e.g. for a
/// Redis Cluster hash tag: `{{orders}}:{type}` gives `{orders}:OrderPlaced`).
/// Anything else is copied literally; Redis keys are binary-safe, so every
/// attribute value forms a valid key. The template is checked when parsed:
/// an empty template, an unknown placeholder or an unbalanced brace is a
/// configuration error.
///
/// A template without placeholders sends every event to one stream, which
/// keeps the order of each subject's events for a consumer of that stream.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_redis::StreamTemplate;
///
/// let template = StreamTemplate::parse("campaign:{type}")?;
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// assert_eq!(template.render(&event), "campaign:DonorSecured");
/// assert_eq!(StreamTemplate::parse("{{tag}}:{subject}")?.render(&event), "{tag}:donor-42");
/// assert!(StreamTemplate::parse("campaign:{kind}").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTemplate {
    text: String,
    parts: Vec<Part>,
}

impl StreamTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail = |reason: String| ConfigError(format!("stream {template:?} {reason}"));
        if template.is_empty() {
            return Err(fail("is empty".into()));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
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
                        return Err(fail(
                            "has a '{' without a matching '}' (write '{{' for a literal brace)"
                                .into(),
                        ));
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
                '}' => {
                    return Err(fail(
                        "has a '}' without a matching '{' (write '}}' for a literal brace)".into(),
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(StreamTemplate {
            text: template.to_owned(),
            parts,
        })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the template has no placeholder: every event goes to one
    /// stream.
    pub fn is_fixed(&self) -> bool {
        !self.parts.iter().any(|p| matches!(p, Part::Placeholder(_)))
    }

    /// The stream key for `event`.
    pub fn render(&self, event: &Event) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p) => out.push_str(p.value(event)),
            }
        }
        out
    }
}

impl fmt::Display for StreamTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        match Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .build()
        {
            Ok(e) => e,
            Err(e) => panic!("test event is invalid: {e}"),
        }
    }

    fn parse(t: &str) -> StreamTemplate {
        match StreamTemplate::parse(t) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn renders_every_placeholder_and_escaped_braces() {
        let e = event();
        assert_eq!(parse("proclaim:events").render(&e), "proclaim:events");
        assert!(parse("proclaim:events").is_fixed());
        assert_eq!(
            parse("{source}:{type}:{subject}").render(&e),
            "campaign-finance:DonorSecured:donor-42"
        );
        assert!(!parse("x:{type}").is_fixed());
        assert_eq!(parse("{{x}}:{type}").render(&e), "{x}:DonorSecured");
        assert_eq!(parse("a}}b{{c").render(&e), "a}b{c");
        assert_eq!(parse("{type}{subject}").render(&e), "DonorSecureddonor-42");
        // Values are copied as they are: Redis keys are binary-safe.
        let spaced = Event::builder("T")
            .subject("has space")
            .build()
            .map_err(|e| e.to_string());
        assert_eq!(
            spaced.map(|e| parse("s:{subject}").render(&e)),
            Ok("s:has space".to_owned())
        );
    }

    #[test]
    fn rejects_unknown_placeholders_and_unbalanced_braces() {
        for bad in [
            "",
            "p:{kind}",
            "p:{prefix}",
            "p:{Type}",
            "p:{}",
            "p:{type",
            "p:type}",
            "p:{ty{pe}}",
        ] {
            assert!(StreamTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let msg = StreamTemplate::parse("p:{kind}")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: stream \"p:{kind}\" has an unknown placeholder {kind} \
                 (known: {type}, {subject}, {source})"
            )
        );
    }
}
