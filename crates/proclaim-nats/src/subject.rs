//! [`SubjectTemplate`]: how an event's NATS subject is derived from its
//! attributes.

use std::fmt;

use proclaim_core::template::{Part, Placeholder, Template};
use proclaim_core::{ConfigError, Event};

/// The placeholders a subject template may use, in the order error messages
/// list them.
const PLACEHOLDERS: &[Placeholder] = &[
    Placeholder::Prefix,
    Placeholder::Type,
    Placeholder::Subject,
    Placeholder::Source,
];

/// The attribute a value comes from, for error messages.
fn attribute(placeholder: Placeholder) -> &'static str {
    match placeholder {
        Placeholder::Prefix => "subject prefix",
        p => p.attribute(),
    }
}

/// A parsed subject template such as `{prefix}.{type}`.
///
/// Placeholders: `{prefix}` (the configured subject prefix), `{type}`,
/// `{subject}` and `{source}` (the event's CloudEvents attributes); `{{` and
/// `}}` stand for literal braces. Anything else is copied literally. The
/// template is checked when parsed: an unknown placeholder, an unbalanced
/// brace or a result that could never be a valid NATS subject (empty tokens,
/// wildcards, whitespace) is a configuration error.
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
    template: Template,
}

impl SubjectTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail = |reason: String| ConfigError(format!("subject_template {template:?} {reason}"));
        if template.is_empty() {
            return Err(fail("is empty".into()));
        }
        let template = Template::parse(template, PLACEHOLDERS).map_err(|e| fail(e.to_string()))?;
        let parsed = SubjectTemplate { template };
        // With every placeholder replaced by one valid token, the result must
        // be a valid subject; otherwise no event could ever be published.
        let sample = parsed.template.render_with(|_| "x");
        if let Err(reason) = check_tokens(&sample) {
            return Err(fail(format!(
                "cannot produce a valid NATS subject (e.g. {sample:?}): it {reason}"
            )));
        }
        Ok(parsed)
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        self.template.as_str()
    }

    /// True when the template starts with `{prefix}.`, so every subject it
    /// renders lies under `<prefix>.>`.
    pub fn is_under_prefix(&self) -> bool {
        matches!(
            self.template.parts(),
            [Part::Placeholder(Placeholder::Prefix), Part::Literal(dot), ..] if dot.starts_with('.')
        )
    }

    /// Renders the subject for `event`. Fails when a value does not form valid
    /// NATS subject tokens (whitespace, a `*` or `>` token, an empty token):
    /// such an event can never be published under this template.
    pub fn render(&self, prefix: &str, event: &Event) -> Result<String, InvalidSubject> {
        for p in self.template.placeholders() {
            let value = value_of(p, prefix, event);
            check_tokens(value).map_err(|reason| InvalidSubject {
                attribute: attribute(p),
                value: value.to_owned(),
                reason,
            })?;
        }
        let subject = self.template.render_with(|p| value_of(p, prefix, event));
        // Values and literals are each valid, so this holds; checked anyway so
        // that an invalid subject can never reach the broker.
        check_tokens(&subject).map_err(|reason| InvalidSubject {
            attribute: "rendered subject",
            value: subject.clone(),
            reason,
        })?;
        Ok(subject)
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template.as_str())
    }
}

fn value_of<'a>(placeholder: Placeholder, prefix: &'a str, event: &'a Event) -> &'a str {
    match placeholder {
        Placeholder::Prefix => prefix,
        p => p.of(event).unwrap_or_default(),
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

/// Checks a NATS subject filter: tokens separated by `.`, none empty, each
/// either literal or a whole wildcard (`*`, or `>` as the last token), no
/// whitespace or control character.
pub(crate) fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("is empty");
    }
    if filter.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or a control character");
    }
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err("has an empty token (a leading, trailing or doubled '.')");
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err("has '>' before its last token");
        }
        if token.len() > 1 && token.contains(['*', '>']) {
            return Err("has a wildcard inside a token (wildcards stand for whole tokens)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_take_whole_token_wildcards_only() {
        for ok in ["proclaim.>", "campaign.*.DonorSecured", "a", "a.b.c"] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("a b", "contains whitespace or a control character"),
            (
                "a..b",
                "has an empty token (a leading, trailing or doubled '.')",
            ),
            ("a.>.b", "has '>' before its last token"),
            (
                "campaign.Donor*",
                "has a wildcard inside a token (wildcards stand for whole tokens)",
            ),
        ] {
            assert_eq!(check_filter(bad), Err(why), "{bad}");
        }
    }

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
    fn template_errors_name_the_setting() {
        // The syntax itself is tested in proclaim_core::template.
        let msg = |t: &str| SubjectTemplate::parse(t).err().map(|e| e.to_string());
        assert_eq!(
            msg("{prefix}.{kind}").as_deref(),
            Some(
                "invalid configuration: subject_template \"{prefix}.{kind}\" has an unknown \
                 placeholder {kind} (known: {prefix}, {type}, {subject}, {source})"
            )
        );
        assert_eq!(
            msg("{prefix}.{type").as_deref(),
            Some(
                "invalid configuration: subject_template \"{prefix}.{type\" has a '{' without \
                 a matching '}' (write '{{' for a literal brace)"
            )
        );
        assert_eq!(
            msg("").as_deref(),
            Some("invalid configuration: subject_template \"\" is empty")
        );
    }

    #[test]
    fn doubled_braces_are_literal_braces_in_a_token() {
        let t = parse("{prefix}.{{orders}}.{type}");
        assert_eq!(t.as_str(), "{prefix}.{{orders}}.{type}");
        assert!(t.is_under_prefix());
        assert_eq!(
            t.render("p", &event("T", "k", "s")),
            Ok("p.{orders}.T".into())
        );
        assert!(SubjectTemplate::parse("{prefix}.{{ x }}").is_err());
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
