//! [`Template`]: a destination name (subject, topic, routing key, stream,
//! URL) with an event's attributes filled in.
//!
//! Every publisher names its destination from the event the same way:
//! `{type}`, `{subject}` and `{source}` stand for the event's CloudEvents
//! attributes, `{{` and `}}` for literal braces, and anything else is copied.
//! This module parses and renders that syntax once; each publisher wraps a
//! [`Template`] and checks the rendered value against its broker's rules
//! (NATS tokens, MQTT levels, the length of an AMQP routing key, …).
//!
//! ```
//! use proclaim_core::Event;
//! use proclaim_core::template::{Placeholder, Template};
//!
//! let template = Template::parse("campaign.{type}.{subject}", Placeholder::EVENT)?;
//! let event = Event::builder("DonorSecured").subject("donor-42").build()?;
//! assert_eq!(template.render(&event), "campaign.DonorSecured.donor-42");
//!
//! let err = Template::parse("campaign.{kind}", Placeholder::EVENT).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "has an unknown placeholder {kind} (known: {type}, {subject}, {source})"
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use crate::Event;

/// A value a template can stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{type}`: the event's type.
    Type,
    /// `{subject}`: the event's subject (its ordering key).
    Subject,
    /// `{source}`: the event's source.
    Source,
    /// `{prefix}`: a value the publisher supplies (NATS: its subject prefix).
    Prefix,
}

impl Placeholder {
    /// The three event attributes: `{type}`, `{subject}`, `{source}`.
    pub const EVENT: &'static [Placeholder] =
        &[Placeholder::Type, Placeholder::Subject, Placeholder::Source];

    /// The name written between braces (`type`, `subject`, …).
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::Type => "type",
            Placeholder::Subject => "subject",
            Placeholder::Source => "source",
            Placeholder::Prefix => "prefix",
        }
    }

    /// The attribute a value comes from, for error messages (`type`,
    /// `subject`, `source`, or `prefix`).
    pub fn attribute(self) -> &'static str {
        self.name()
    }

    /// The event's value for this placeholder; `None` for
    /// [`Placeholder::Prefix`], which is not an event attribute.
    pub fn of(self, event: &Event) -> Option<&str> {
        match self {
            Placeholder::Type => Some(event.event_type()),
            Placeholder::Subject => Some(event.subject()),
            Placeholder::Source => Some(event.source()),
            Placeholder::Prefix => None,
        }
    }

    fn parse(name: &str, allowed: &[Placeholder]) -> Option<Self> {
        allowed.iter().copied().find(|p| p.name() == name)
    }
}

/// One piece of a parsed [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as is (`{{` and `}}` already turned into single braces).
    Literal(String),
    /// A value filled in when rendering.
    Placeholder(Placeholder),
}

/// Why a template text was rejected. Its message reads as the end of a
/// sentence about the template ("has an unknown placeholder {kind} …"), so a
/// publisher can prefix it with the setting's name and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

/// A parsed template: literal text and placeholders.
///
/// Parsing checks the syntax only (known placeholders, balanced braces);
/// which values are valid is for the publisher to check, on the sample
/// [`Template::render_with`] gives and on each rendered value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`, accepting only the placeholders in `allowed`.
    pub fn parse(text: &str, allowed: &[Placeholder]) -> Result<Self, TemplateError> {
        let known = || {
            allowed
                .iter()
                .map(|p| format!("{{{}}}", p.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
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
                            '{' => {
                                return Err(TemplateError("has a '{' inside a placeholder".into()));
                            }
                            c => name.push(c),
                        }
                    }
                    if !closed {
                        return Err(TemplateError(
                            "has a '{' without a matching '}' (write '{{' for a literal brace)"
                                .into(),
                        ));
                    }
                    let Some(placeholder) = Placeholder::parse(&name, allowed) else {
                        return Err(TemplateError(format!(
                            "has an unknown placeholder {{{name}}} (known: {})",
                            known()
                        )));
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(placeholder));
                }
                '}' => {
                    return Err(TemplateError(
                        "has a '}' without a matching '{' (write '}}' for a literal brace)".into(),
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            text: text.to_owned(),
            parts,
        })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal pieces and placeholders, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The placeholders used, in order (with repeats).
    pub fn placeholders(&self) -> impl Iterator<Item = Placeholder> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(p) => Some(*p),
            Part::Literal(_) => None,
        })
    }

    /// True when the template has no placeholder: every event renders the
    /// same value.
    pub fn is_fixed(&self) -> bool {
        self.placeholders().next().is_none()
    }

    /// The total length in bytes of the literal text.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => text.len(),
                Part::Placeholder(_) => 0,
            })
            .sum()
    }

    /// Renders with the event's attributes; `{prefix}` (if allowed when
    /// parsing) renders empty — use [`Template::render_with`] to supply it.
    pub fn render(&self, event: &Event) -> String {
        self.render_with(|p| p.of(event).unwrap_or_default())
    }

    /// Renders with each placeholder's value given by `value`, e.g. a sample
    /// (`|_| "x"`) to check what a template can produce, or percent-encoded
    /// values for a URL.
    pub fn render_with<S: AsRef<str>>(&self, mut value: impl FnMut(Placeholder) -> S) -> String {
        let mut out = String::with_capacity(self.text.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p) => out.push_str(value(*p).as_ref()),
            }
        }
        out
    }
}

impl fmt::Display for Template {
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
            Err(e) => panic!("{e}"),
        }
    }

    fn parse(text: &str) -> Template {
        match Template::parse(text, Placeholder::EVENT) {
            Ok(t) => t,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    #[test]
    fn renders_every_placeholder_and_copies_the_rest() {
        let e = event();
        assert_eq!(
            parse("{source}/{type}/{subject}").render(&e),
            "campaign-finance/DonorSecured/donor-42"
        );
        assert_eq!(
            parse("t-{type}{subject}").render(&e),
            "t-DonorSecureddonor-42"
        );
        assert_eq!(parse("fixed").render(&e), "fixed");
        assert_eq!(parse("").render(&e), "");
        assert!(parse("fixed").is_fixed());
        assert!(!parse("a.{type}").is_fixed());
    }

    #[test]
    fn doubled_braces_are_literal_braces() {
        let t = parse("{{orders}}:{type}");
        assert_eq!(t.render(&event()), "{orders}:DonorSecured");
        assert_eq!(t.literal_len(), "{orders}:".len());
        assert_eq!(t.as_str(), "{{orders}}:{type}");
    }

    #[test]
    fn only_allowed_placeholders_parse() {
        let err = Template::parse("{prefix}.{type}", Placeholder::EVENT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "has an unknown placeholder {prefix} (known: {type}, {subject}, {source})"
        );
        let with_prefix = [Placeholder::Prefix, Placeholder::Type];
        let t = match Template::parse("{prefix}.{type}", &with_prefix) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            t.placeholders().collect::<Vec<_>>(),
            [Placeholder::Prefix, Placeholder::Type]
        );
        assert_eq!(t.render(&event()), ".DonorSecured");
        let e = event();
        assert_eq!(
            t.render_with(|p| p.of(&e).unwrap_or("acme")),
            "acme.DonorSecured"
        );
    }

    #[test]
    fn unbalanced_braces_are_rejected_with_a_reason() {
        for (bad, reason) in [
            ("{Type}", "has an unknown placeholder {Type}"),
            ("a.{}", "has an unknown placeholder {}"),
            ("a.{type", "has a '{' without a matching '}'"),
            ("a.type}", "has a '}' without a matching '{'"),
            ("a.{ty{pe}}", "has a '{' inside a placeholder"),
        ] {
            let err = Template::parse(bad, Placeholder::EVENT).unwrap_err();
            assert!(err.to_string().starts_with(reason), "{bad:?}: {err}");
        }
    }
}
