//! [`TopicTemplate`]: how an event's Kafka topic is derived from its
//! attributes.

use std::fmt;

use proclaim_core::template::{Placeholder, Template};
use proclaim_core::{ConfigError, Event};

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// A parsed topic template such as `proclaim.events` or `campaign.{type}`.
///
/// Placeholders: `{type}`, `{subject}` and `{source}` (the event's
/// CloudEvents attributes); `{{` and `}}` stand for literal braces, which
/// no topic may contain. Anything else is copied literally.
///
/// Kafka topic names are 1 to 249 characters of `[a-zA-Z0-9._-]`, and not
/// `.` or `..`. The template is checked when parsed (with every placeholder
/// standing for `x`, the result must be a valid topic); each rendered topic
/// is checked again by [`TopicTemplate::render`], which names the attribute
/// whose value does not fit. The publisher turns that into a permanent
/// error: such an event can never be published under this template.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_kafka::TopicTemplate;
///
/// let template = TopicTemplate::parse("campaign.{type}")?;
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// assert_eq!(template.render(&event)?, "campaign.DonorSecured");
///
/// let spaced = Event::builder("Donor Secured").subject("donor-42").build()?;
/// assert!(template.render(&spaced).is_err());
/// assert!(TopicTemplate::parse("campaign.{kind}").is_err());
/// assert!(TopicTemplate::parse("campaign/{type}").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    template: Template,
}

impl TopicTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let fail = |reason: String| ConfigError(format!("topic_template {template:?} {reason}"));
        if template.is_empty() {
            return Err(fail("is empty".into()));
        }
        let parsed =
            Template::parse(template, Placeholder::EVENT).map_err(|e| fail(e.to_string()))?;
        // With every placeholder standing for one valid character, the result
        // must be a valid topic; otherwise no event could ever be published.
        let sample = parsed.render_with(|_| "x");
        if let Err(reason) = check_topic(&sample) {
            return Err(fail(format!(
                "cannot produce a valid Kafka topic (e.g. {sample:?}): it {reason}"
            )));
        }
        Ok(TopicTemplate { template: parsed })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        self.template.as_str()
    }

    /// The topic every event goes to, when the template has no placeholder.
    ///
    /// ```
    /// use proclaim_kafka::TopicTemplate;
    /// assert_eq!(TopicTemplate::parse("proclaim.events")?.fixed(), Some("proclaim.events"));
    /// assert_eq!(TopicTemplate::parse("proclaim.{type}")?.fixed(), None);
    /// # Ok::<(), proclaim_core::ConfigError>(())
    /// ```
    pub fn fixed(&self) -> Option<&str> {
        match self.template.parts() {
            [proclaim_core::template::Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// Renders the topic for `event`. Fails when a value holds a character
    /// Kafka does not allow in topic names, or the topic would be longer than
    /// [`MAX_TOPIC_LEN`] characters, `.` or `..`.
    pub fn render(&self, event: &Event) -> Result<String, InvalidTopic> {
        for p in self.template.placeholders() {
            let value = p.of(event).unwrap_or_default();
            if let Err(reason) = check_chars(value) {
                return Err(InvalidTopic {
                    attribute: p.attribute(),
                    value: value.to_owned(),
                    reason,
                });
            }
        }
        let topic = self.template.render(event);
        check_topic(&topic).map_err(|reason| InvalidTopic {
            attribute: "topic",
            value: topic.clone(),
            reason,
        })?;
        Ok(topic)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template.as_str())
    }
}

/// Why an event's attributes cannot form its Kafka topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its {attribute} {value:?} cannot be used in a Kafka topic name: it {reason}")]
pub struct InvalidTopic {
    attribute: &'static str,
    value: String,
    reason: &'static str,
}

impl InvalidTopic {
    /// Which attribute was rejected (`type`, `subject`, `source`, or `topic`
    /// for the rendered topic as a whole).
    pub fn attribute(&self) -> &str {
        self.attribute
    }
    /// The rejected value.
    pub fn value(&self) -> &str {
        &self.value
    }
    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

/// Checks that every character of `value` may appear in a topic name.
fn check_chars(value: &str) -> Result<(), &'static str> {
    if value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Ok(())
    } else {
        Err("contains a character other than ASCII letters, digits, '.', '_' and '-'")
    }
}

/// Checks that `topic` is a valid Kafka topic name; returns the reason it
/// is not.
pub(crate) fn check_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("is empty");
    }
    check_chars(topic)?;
    if topic.len() > MAX_TOPIC_LEN {
        return Err("is longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return Err("is '.' or '..', which Kafka reserves");
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

    fn parse(t: &str) -> TopicTemplate {
        match TopicTemplate::parse(t) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn renders_every_placeholder() {
        let e = event("DonorSecured", "donor-42", "campaign-finance");
        assert_eq!(
            parse("proclaim.events").render(&e),
            Ok("proclaim.events".into())
        );
        assert_eq!(
            parse("{source}.{type}_{subject}").render(&e),
            Ok("campaign-finance.DonorSecured_donor-42".into())
        );
        assert_eq!(parse("{type}").as_str(), "{type}");
        assert_eq!(parse("{type}").to_string(), "{type}");
        assert_eq!(parse("a.{type}").fixed(), None);
    }

    #[test]
    fn templates_that_cannot_give_a_valid_topic_are_rejected() {
        for bad in [
            "",
            "{kind}",
            "{type",
            "type}",
            "a/{type}",
            "a {type}",
            "{{x}}.{type}",
            ".",
            "..",
            "ü.{type}",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(TopicTemplate::parse(&"x".repeat(250)).is_err());
        assert!(TopicTemplate::parse(&"x".repeat(249)).is_ok());
        assert!(TopicTemplate::parse("{type}{type}").is_ok());
        let msg = TopicTemplate::parse("events/{type}")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: topic_template \"events/{type}\" cannot produce a valid \
                 Kafka topic (e.g. \"events/x\"): it contains a character other than ASCII \
                 letters, digits, '.', '_' and '-'"
            )
        );
        let msg = TopicTemplate::parse("events.{kind}")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: topic_template \"events.{kind}\" has an unknown \
                 placeholder {kind} (known: {type}, {subject}, {source})"
            )
        );
    }

    #[test]
    fn values_that_do_not_fit_are_named() {
        let t = parse("campaign.{subject}");
        let err = t.render(&event("T", "donor/42", "src")).err();
        assert_eq!(err.as_ref().map(InvalidTopic::attribute), Some("subject"));
        assert_eq!(err.as_ref().map(InvalidTopic::value), Some("donor/42"));
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some(
                "its subject \"donor/42\" cannot be used in a Kafka topic name: it contains a \
                 character other than ASCII letters, digits, '.', '_' and '-'"
            )
        );
        let long = t.render(&event("T", &"s".repeat(241), "src")).err();
        assert_eq!(long.as_ref().map(InvalidTopic::attribute), Some("topic"));
        assert_eq!(
            long.as_ref().map(InvalidTopic::reason),
            Some("is longer than 249 characters")
        );
        let dots = parse("{subject}").render(&event("T", "..", "src")).err();
        assert_eq!(
            dots.as_ref().map(InvalidTopic::reason),
            Some("is '.' or '..', which Kafka reserves")
        );
        assert!(t.render(&event("T", &"s".repeat(249 - 9), "src")).is_ok());
    }
}
