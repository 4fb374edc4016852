//! [`TopicTemplate`]: the MQTT topic of an event.

use std::fmt;

use proclaim_core::template::{Part, Placeholder, Template};
use proclaim_core::{ConfigError, Event};

/// Longest topic MQTT can carry (a UTF-8 string with a 16-bit length).
const MAX_TOPIC_LEN: usize = 65_535;

/// The event's value for a placeholder.
fn value_of(placeholder: Placeholder, event: &Event) -> &str {
    placeholder.of(event).unwrap_or_default()
}

/// A parsed topic template such as `proclaim/{type}`.
///
/// Placeholders: `{type}`, `{subject}` and `{source}` (the event's
/// CloudEvents attributes); `{{` and `}}` stand for literal braces, anything
/// else is copied literally, and a value may span several topic levels (a
/// subject `orders/42` gives two). The template is checked when parsed: an
/// unknown placeholder, an unbalanced brace, a wildcard (`+`, `#`), an empty level or a leading `$` (topics the
/// broker reserves) is a configuration error. An event whose values cannot
/// form a topic (a wildcard character, an empty level, a leading `$`) is
/// reported by [`TopicTemplate::render`]; the publisher turns that into a
/// permanent error.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_mqtt::TopicTemplate;
///
/// let template = TopicTemplate::parse("campaign/{type}/{subject}")?;
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// assert_eq!(template.render(&event)?, "campaign/DonorSecured/donor-42");
///
/// let wild = Event::builder("DonorSecured").subject("donor/+").build()?;
/// assert!(template.render(&wild).is_err());
/// assert!(TopicTemplate::parse("campaign/{kind}").is_err());
/// assert!(TopicTemplate::parse("campaign/#").is_err());
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
        let template =
            Template::parse(template, Placeholder::EVENT).map_err(|e| fail(e.to_string()))?;
        let parsed = TopicTemplate { template };
        // With every placeholder replaced by one plain level, the result must
        // be a valid topic; otherwise no event could ever be published.
        let sample = parsed.template.render_with(|_| "x");
        if let Err(reason) = check_topic(&sample) {
            return Err(fail(format!(
                "cannot produce a valid MQTT topic (e.g. {sample:?}): it {reason}"
            )));
        }
        Ok(parsed)
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        self.template.as_str()
    }

    /// The filter that matches every topic this template renders, for a
    /// subscriber: each level holding a placeholder becomes `#` from there on
    /// (a value may span levels), e.g. `campaign/{type}` gives `campaign/#`.
    ///
    /// ```
    /// use proclaim_mqtt::TopicTemplate;
    /// assert_eq!(TopicTemplate::parse("campaign/{type}")?.filter(), "campaign/#");
    /// assert_eq!(TopicTemplate::parse("a/b")?.filter(), "a/b");
    /// assert_eq!(TopicTemplate::parse("{type}")?.filter(), "#");
    /// # Ok::<(), proclaim_core::ConfigError>(())
    /// ```
    pub fn filter(&self) -> String {
        let mut out = String::new();
        for part in self.template.parts() {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(_) => {
                    // Cut back to the start of the current level, then match
                    // everything below it.
                    let level_start = out.rfind('/').map_or(0, |i| i + 1);
                    out.truncate(level_start);
                    out.push('#');
                    return out;
                }
            }
        }
        out
    }

    /// Renders the topic for `event`. Fails when a value contains a wildcard
    /// character (`+`, `#`), makes an empty level (a leading, trailing or
    /// doubled `/`), starts the topic with `$`, or makes it longer than MQTT
    /// allows: such an event can never be published under this template.
    pub fn render(&self, event: &Event) -> Result<String, InvalidTopic> {
        for p in self.template.placeholders() {
            let value = value_of(p, event);
            if value.contains(['+', '#']) {
                return Err(InvalidTopic {
                    attribute: p.attribute(),
                    value: value.to_owned(),
                    reason: "contains an MQTT wildcard character ('+' or '#')",
                });
            }
        }
        let topic = self.template.render_with(|p| value_of(p, event));
        if let Err(reason) = check_topic(&topic) {
            // Blame the value that made the topic invalid: the literals alone
            // form a valid topic (checked when parsed).
            let parts = self.template.parts();
            let culprit = parts.iter().enumerate().find_map(|(i, part)| match part {
                Part::Placeholder(p) => {
                    let value = value_of(*p, event);
                    let at_start = i == 0;
                    let bad = value.starts_with('/')
                        || value.ends_with('/')
                        || value.contains("//")
                        || (at_start && value.starts_with('$'));
                    bad.then_some(*p)
                }
                Part::Literal(_) => None,
            });
            return Err(match culprit {
                Some(p) => InvalidTopic {
                    attribute: p.attribute(),
                    value: value_of(p, event).to_owned(),
                    reason,
                },
                None => InvalidTopic {
                    attribute: "topic",
                    value: topic,
                    reason,
                },
            });
        }
        Ok(topic)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template.as_str())
    }
}

/// Why an event's attributes cannot form its MQTT topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its {attribute} {value:?} cannot be used in an MQTT topic: it {reason}")]
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

/// Checks that `topic` is a topic name one can publish to: not empty, no
/// wildcard, no empty level, no leading `$`, no control character, at most
/// 65,535 bytes. Returns the reason it is not.
pub(crate) fn check_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("is empty");
    }
    if topic.contains(['+', '#']) {
        return Err("contains an MQTT wildcard character ('+' or '#')");
    }
    if topic.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if topic.split('/').any(str::is_empty) {
        return Err("makes an empty topic level (a leading, trailing or doubled '/')");
    }
    if topic.starts_with('$') {
        return Err("starts the topic with '$' (reserved for the broker)");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err("makes the topic longer than 65535 bytes");
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
            parse("proclaim/{type}").render(&e),
            Ok("proclaim/DonorSecured".into())
        );
        assert_eq!(
            parse("acme/{source}/{type}/{subject}").render(&e),
            Ok("acme/campaign-finance/DonorSecured/donor-42".into())
        );
        assert_eq!(parse("fixed/topic").render(&e), Ok("fixed/topic".into()));
        assert_eq!(
            parse("p/t-{type}").render(&e),
            Ok("p/t-DonorSecured".into())
        );
        // Values may span levels; dots are plain characters in MQTT.
        let e = event("com.example.placed", "orders/42", "s");
        assert_eq!(
            parse("p/{type}/{subject}").render(&e),
            Ok("p/com.example.placed/orders/42".into())
        );
    }

    #[test]
    fn bad_templates_are_rejected() {
        // The placeholder syntax itself is tested in proclaim_core::template.
        for bad in [
            "",
            "p/{kind}",
            "p/{type",
            "p/#",
            "p/+/{type}",
            "p/a+b/{type}",
            "p//{type}",
            "/{type}",
            "{type}/",
            "$SYS/{type}",
            "p/\u{0}/{type}",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let msg = |t: &str| TopicTemplate::parse(t).err().map(|e| e.to_string());
        assert_eq!(
            msg("p/{kind}").as_deref(),
            Some(
                "invalid configuration: topic_template \"p/{kind}\" has an unknown placeholder \
                 {kind} (known: {type}, {subject}, {source})"
            )
        );
        assert_eq!(
            msg("p/type}").as_deref(),
            Some(
                "invalid configuration: topic_template \"p/type}\" has a '}' without a \
                 matching '{' (write '}}' for a literal brace)"
            )
        );
        assert!(TopicTemplate::parse("{type}{subject}").is_ok());
        assert!(TopicTemplate::parse("{type}").is_ok());
    }

    #[test]
    fn doubled_braces_are_literal_braces_in_a_level() {
        let t = parse("{{acme}}/{type}");
        assert_eq!(t.as_str(), "{{acme}}/{type}");
        assert_eq!(t.to_string(), "{{acme}}/{type}");
        assert_eq!(t.render(&event("T", "k", "s")), Ok("{acme}/T".into()));
        assert_eq!(t.filter(), "{acme}/#");
        assert_eq!(parse("a/{{b}}").filter(), "a/{b}");
    }

    #[test]
    fn invalid_values_are_reported_with_their_attribute() {
        let t = parse("p/{subject}");
        let wildcard = "contains an MQTT wildcard character ('+' or '#')";
        let empty = "makes an empty topic level (a leading, trailing or doubled '/')";
        for (subject, reason) in [
            ("a/+/b", wildcard),
            ("#", wildcard),
            ("a+b", wildcard),
            ("a//b", empty),
            ("/a", empty),
            ("a/", empty),
        ] {
            let err = t.render(&event("T", subject, "s")).err();
            assert_eq!(
                err.as_ref().map(|e| (e.attribute(), e.value(), e.reason())),
                Some(("subject", subject, reason)),
                "{subject:?}"
            );
        }
        let dollar = parse("{source}/x").render(&event("T", "k", "$SYS"));
        assert_eq!(dollar.err().map(|e| e.attribute), Some("source"));
        // Values the template does not use are not checked.
        assert!(t.render(&event("T#", "ok", "s")).is_ok());
        let msg = t
            .render(&event("T", "a/+", "s"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "its subject \"a/+\" cannot be used in an MQTT topic: it contains an MQTT \
                 wildcard character ('+' or '#')"
            )
        );
    }

    #[test]
    fn filters_cover_rendered_topics() {
        assert_eq!(parse("proclaim/{type}").filter(), "proclaim/#");
        assert_eq!(parse("a/b/{type}/{subject}").filter(), "a/b/#");
        assert_eq!(parse("a/t-{type}").filter(), "a/#");
        assert_eq!(parse("{source}/x").filter(), "#");
        assert_eq!(parse("fixed").filter(), "fixed");
    }
}
