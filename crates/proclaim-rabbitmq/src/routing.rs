//! [`RoutingKeyTemplate`]: how an event's AMQP routing key is derived from
//! its attributes.

use std::fmt;

use proclaim_core::template::{Part, Placeholder, Template};
use proclaim_core::{ConfigError, Event};

/// The longest routing key AMQP 0-9-1 can carry (a short string).
pub const MAX_ROUTING_KEY_LEN: usize = 255;

/// A parsed routing key template such as `{type}` or `events.{source}.{type}`.
///
/// Placeholders: `{type}`, `{subject}` and `{source}` (the event's
/// CloudEvents attributes); `{{` and `}}` stand for literal braces. Anything
/// else is copied literally; an empty template gives an empty routing key
/// (for fanout and headers exchanges). The template is checked when parsed:
/// an unknown placeholder, an unbalanced brace, a control character or
/// literal text longer than a routing key can be is a configuration error.
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
    template: Template,
}

impl RoutingKeyTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail =
            |reason: String| ConfigError(format!("routing_key_template {template:?} {reason}"));
        let template =
            Template::parse(template, Placeholder::EVENT).map_err(|e| fail(e.to_string()))?;
        let has_control = template.parts().iter().any(|part| match part {
            Part::Literal(text) => text.chars().any(char::is_control),
            Part::Placeholder(_) => false,
        });
        if has_control {
            return Err(fail("contains a control character".into()));
        }
        let literal_len = template.literal_len();
        if literal_len > MAX_ROUTING_KEY_LEN {
            return Err(fail(format!(
                "has {literal_len} bytes of literal text, more than a routing key can hold \
                 ({MAX_ROUTING_KEY_LEN} bytes)"
            )));
        }
        Ok(RoutingKeyTemplate { template })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        self.template.as_str()
    }

    /// Renders the routing key for `event`. Fails when the key would be
    /// longer than [`MAX_ROUTING_KEY_LEN`] bytes: such an event can never be
    /// published under this template.
    pub fn render(&self, event: &Event) -> Result<String, InvalidRoutingKey> {
        let out = self.template.render(event);
        if out.len() > MAX_ROUTING_KEY_LEN {
            return Err(InvalidRoutingKey { len: out.len() });
        }
        Ok(out)
    }
}

impl fmt::Display for RoutingKeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template.as_str())
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
    fn bad_templates_are_rejected() {
        // The placeholder syntax itself is tested in proclaim_core::template.
        for bad in ["{kind}", "{type", "a\nb", "{type}.a\u{7f}"] {
            assert!(
                RoutingKeyTemplate::parse(bad).is_err(),
                "{bad:?} was accepted"
            );
        }
        let msg = |t: &str| RoutingKeyTemplate::parse(t).err().map(|e| e.to_string());
        assert_eq!(
            msg("events.{kind}").as_deref(),
            Some(
                "invalid configuration: routing_key_template \"events.{kind}\" has an unknown \
                 placeholder {kind} (known: {type}, {subject}, {source})"
            )
        );
        assert_eq!(
            msg("a\nb").as_deref(),
            Some(
                "invalid configuration: routing_key_template \"a\\nb\" contains a control \
                 character"
            )
        );
        let long = "x".repeat(256);
        assert_eq!(
            msg(&long),
            Some(format!(
                "invalid configuration: routing_key_template {long:?} has 256 bytes of literal \
                 text, more than a routing key can hold (255 bytes)"
            ))
        );
        assert!(RoutingKeyTemplate::parse(&format!("{}{{type}}", "x".repeat(255))).is_ok());
    }

    #[test]
    fn doubled_braces_are_literal_braces() {
        let e = event("T", "k", "s");
        assert_eq!(parse("{{a}}.{type}").render(&e), Ok("{a}.T".into()));
        assert_eq!(parse("{{a}}.{type}").as_str(), "{{a}}.{type}");
        // An escaped brace counts once towards the literal length.
        let braces = "{{".repeat(255);
        assert_eq!(parse(&braces).render(&e), Ok("{".repeat(255)));
        assert!(RoutingKeyTemplate::parse(&format!("{braces}x")).is_err());
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
