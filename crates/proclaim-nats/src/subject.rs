//! [`SubjectTemplate`]: how an event's NATS subject is derived from its
//! attributes.

use std::fmt;

use proclaim_core::{ConfigError, Event};

/// The placeholders a subject template may use.
const PLACEHOLDERS: &str = "{prefix}, {type}, {subject}, {source}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Prefix,
    Type,
    Subject,
    Source,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "prefix" => Some(Placeholder::Prefix),
            "type" => Some(Placeholder::Type),
            "subject" => Some(Placeholder::Subject),
            "source" => Some(Placeholder::Source),
            _ => None,
        }
    }

    /// The attribute a value comes from, for error messages.
    fn attribute(self) -> &'static str {
        match self {
            Placeholder::Prefix => "subject prefix",
            Placeholder::Type => "type",
            Placeholder::Subject => "subject",
            Placeholder::Source => "source",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(Placeholder),
}

/// A parsed subject template such as `{prefix}.{type}`.
///
/// Placeholders: `{prefix}` (the configured subject prefix), `{type}`,
/// `{subject}` and `{source}` (the event's CloudEvents attributes). Anything
/// else is copied literally. The template is checked when parsed: an unknown
/// placeholder, an unbalanced brace or a result that could never be a valid
/// NATS subject (empty tokens, wildcards, whitespace) is a configuration error.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_nats::SubjectTemplate;
///
/// let template = SubjectTemplate::parse("{prefix}.{type}.{subject}")?;
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// assert_eq!(template.render("campaign", &event)?, "campaign.DonorSecured.donor-42");
/// assert!(SubjectTemplate::parse("{prefix}.{kind}").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    parts: Vec<Part>,
}

impl SubjectTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail = |reason: String| ConfigError(format!("subject_template {template:?} {reason}"));
        if template.is_empty() {
            return Err(fail("is empty".into()));
        }
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
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let parsed = SubjectTemplate {
            text: template.to_owned(),
            parts,
        };
        // With every placeholder replaced by one valid token, the result must
        // be a valid subject; otherwise no event could ever be published.
        let sample = parsed.render_with(|_| "x");
        if let Err(reason) = check_tokens(&sample) {
            return Err(fail(format!(
                "cannot produce a valid NATS subject (e.g. {sample:?}): it {reason}"
            )));
        }
        Ok(parsed)
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the template starts with `{prefix}.`, so every subject it
    /// renders lies under `<prefix>.>`.
    pub fn is_under_prefix(&self) -> bool {
        matches!(
            self.parts.as_slice(),
            [Part::Placeholder(Placeholder::Prefix), Part::Literal(dot), ..] if dot.starts_with('.')
        )
    }

    /// Renders the subject for `event`. Fails when a value does not form valid
    /// NATS subject tokens (whitespace, a `*` or `>` token, an empty token):
    /// such an event can never be published under this template.
    pub fn render(&self, prefix: &str, event: &Event) -> Result<String, InvalidSubject> {
        for part in &self.parts {
            if let Part::Placeholder(p) = part {
                let value = value_of(*p, prefix, event);
                check_tokens(value).map_err(|reason| InvalidSubject {
                    attribute: p.attribute(),
                    value: value.to_owned(),
                    reason,
                })?;
            }
        }
        let subject = self.render_with(|p| value_of(p, prefix, event));
        // Values and literals are each valid, so this holds; checked anyway so
        // that an invalid subject can never reach the broker.
        check_tokens(&subject).map_err(|reason| InvalidSubject {
            attribute: "rendered subject",
            value: subject.clone(),
            reason,
        })?;
        Ok(subject)
    }

    fn render_with<'a>(&self, mut value: impl FnMut(Placeholder) -> &'a str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p) => out.push_str(value(*p)),
            }
        }
        out
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn value_of<'a>(placeholder: Placeholder, prefix: &'a str, event: &'a Event) -> &'a str {
    match placeholder {
        Placeholder::Prefix => prefix,
        Placeholder::Type => event.event_type(),
        Placeholder::Subject => event.subject(),
        Placeholder::Source => event.source(),
    }
}

/// Why an event's attributes cannot form its NATS subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its {attribute} {value:?} cannot be used in a NATS subject: it {reason}")]
pub struct InvalidSubject {
    attribute: &'static str,
    value: String,
    reason: &'static str,
}

impl InvalidSubject {
    /// Which attribute was rejected (`type`, `subject`, `source`, …).
    pub fn attribute(&self) -> &str {
        self.attribute
    }
    /// The rejected value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// Checks that `value` is one or more valid NATS subject tokens separated by
/// `.`: no empty token, no `*` or `>` wildcard token, no whitespace or
/// control character. Returns the reason it is not.
pub(crate) fn check_tokens(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("is empty");
    }
    if value.chars().any(char::is_whitespace) {
        return Err("contains whitespace");
    }
    if value.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    for token in value.split('.') {
        if token.is_empty() {
            return Err("has an empty token (a leading, trailing or doubled '.')");
        }
        if token == "*" || token == ">" {
            return Err("has a wildcard token ('*' or '>')");
        }
    }
    Ok(())
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

    fn parse(t: &str) -> SubjectTemplate {
        match SubjectTemplate::parse(t) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn renders_every_placeholder() {
        let e = event("DonorSecured", "donor-42", "campaign-finance");
        assert_eq!(
            parse("{prefix}.{type}").render("proclaim", &e),
            Ok("proclaim.DonorSecured".into())
        );
        assert_eq!(
            parse("{prefix}.{source}.{type}.{subject}").render("acme.events", &e),
            Ok("acme.events.campaign-finance.DonorSecured.donor-42".into())
        );
        assert_eq!(
            parse("fixed.subject").render("p", &e),
            Ok("fixed.subject".into())
        );
        assert_eq!(
            parse("{prefix}.t-{type}").render("p", &e),
            Ok("p.t-DonorSecured".into())
        );
    }

    #[test]
    fn values_may_span_several_tokens() {
        let e = event("com.example.order.placed", "order-1", "proclaim");
        assert_eq!(
            parse("{prefix}.{type}").render("p", &e),
            Ok("p.com.example.order.placed".into())
        );
    }

    #[test]
    fn unknown_placeholders_and_unbalanced_braces_are_rejected() {
        for bad in [
            "{prefix}.{kind}",
            "{prefix}.{Type}",
            "{prefix}.{}",
            "{prefix}.{type",
            "{prefix}.type}",
            "{prefix}.{ty{pe}}",
            "",
        ] {
            let err = SubjectTemplate::parse(bad).err();
            assert!(err.is_some(), "{bad:?} was accepted");
        }
        let msg = SubjectTemplate::parse("{prefix}.{kind}")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: subject_template \"{prefix}.{kind}\" has an unknown \
                 placeholder {kind} (known: {prefix}, {type}, {subject}, {source})"
            )
        );
    }

    #[test]
    fn templates_that_cannot_form_a_subject_are_rejected() {
        for bad in [
            "{prefix}..{type}",
            ".{type}",
            "{type}.",
            "{prefix}.*",
            "{prefix}.>",
            "a b.{type}",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        // Adjacent placeholders and wildcard characters inside a token are fine.
        assert!(SubjectTemplate::parse("{prefix}{type}").is_ok());
        assert!(SubjectTemplate::parse("{prefix}.a*b").is_ok());
    }

    #[test]
    fn invalid_values_are_reported_with_their_attribute() {
        let t = parse("{prefix}.{subject}");
        let cases = [
            ("has space", "contains whitespace"),
            ("non\u{a0}breaking", "contains whitespace"),
            (
                "a..b",
                "has an empty token (a leading, trailing or doubled '.')",
            ),
            (
                ".a",
                "has an empty token (a leading, trailing or doubled '.')",
            ),
            (
                "a.",
                "has an empty token (a leading, trailing or doubled '.')",
            ),
            ("*", "has a wildcard token ('*' or '>')"),
            ("a.>", "has a wildcard token ('*' or '>')"),
        ];
        for (subject, reason) in cases {
            let err = t.render("p", &event("T", subject, "s")).err();
            assert_eq!(
                err.as_ref().map(|e| (e.attribute(), e.value(), e.reason)),
                Some(("subject", subject, reason)),
                "{subject:?}"
            );
        }
        // A wildcard character inside a token is a literal, as in NATS itself.
        assert_eq!(t.render("p", &event("T", "a*b", "s")), Ok("p.a*b".into()));
        // Values not used by the template are not checked.
        assert!(t.render("p", &event("T", "ok", "has space")).is_ok());
        assert!(
            parse("{prefix}.{source}")
                .render("p", &event("T", "ok", "has space"))
                .is_err()
        );
        let msg = t
            .render("p", &event("T", "has space", "s"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "its subject \"has space\" cannot be used in a NATS subject: it contains whitespace"
            )
        );
    }

    #[test]
    fn knows_whether_subjects_lie_under_the_prefix() {
        assert!(parse("{prefix}.{type}").is_under_prefix());
        assert!(parse("{prefix}.x.{subject}").is_under_prefix());
        assert!(!parse("{prefix}{type}").is_under_prefix());
        assert!(!parse("events.{type}").is_under_prefix());
        assert!(!parse("{type}.{prefix}").is_under_prefix());
    }
}
