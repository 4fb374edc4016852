//! [`StreamTemplate`]: how an event's stream key is derived from its
//! attributes.

use std::fmt;

use proclaim_core::template::{Placeholder, Template};
use proclaim_core::{ConfigError, Event};

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
    template: Template,
}

impl StreamTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail = |reason: String| ConfigError(format!("stream {template:?} {reason}"));
        if template.is_empty() {
            return Err(fail("is empty".into()));
        }
        let template =
            Template::parse(template, Placeholder::EVENT).map_err(|e| fail(e.to_string()))?;
        Ok(StreamTemplate { template })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        self.template.as_str()
    }

    /// True when the template has no placeholder: every event goes to one
    /// stream.
    pub fn is_fixed(&self) -> bool {
        self.template.is_fixed()
    }

    /// The stream key for `event`.
    pub fn render(&self, event: &Event) -> String {
        self.template.render(event)
    }
}

impl fmt::Display for StreamTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template.as_str())
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
        // The placeholder syntax itself is tested in proclaim_core::template.
        for bad in ["", "p:{kind}", "p:{prefix}", "p:{type", "p:type}"] {
            assert!(StreamTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let msg = |t: &str| StreamTemplate::parse(t).err().map(|e| e.to_string());
        assert_eq!(
            msg("p:{kind}").as_deref(),
            Some(
                "invalid configuration: stream \"p:{kind}\" has an unknown placeholder {kind} \
                 (known: {type}, {subject}, {source})"
            )
        );
        assert_eq!(
            msg("p:{type").as_deref(),
            Some(
                "invalid configuration: stream \"p:{type\" has a '{' without a matching '}' \
                 (write '{{' for a literal brace)"
            )
        );
        assert_eq!(
            msg("").as_deref(),
            Some("invalid configuration: stream \"\" is empty")
        );
    }
}
