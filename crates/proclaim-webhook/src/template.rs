//! [`UrlTemplate`]: the endpoint URL, with an event's attributes filled in.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use proclaim_core::{ConfigError, Event};
use reqwest::Url;

/// The placeholders a URL template may use.
const PLACEHOLDERS: &str = "{type}, {subject}";

/// Everything but the RFC 3986 unreserved characters is percent-encoded in a
/// value, so that a value stays inside its path segment or query parameter.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Type,
    Subject,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "type" => Some(Placeholder::Type),
            "subject" => Some(Placeholder::Subject),
            _ => None,
        }
    }

    fn attribute(self) -> &'static str {
        match self {
            Placeholder::Type => "type",
            Placeholder::Subject => "subject",
        }
    }

    fn value(self, event: &Event) -> &str {
        match self {
            Placeholder::Type => event.event_type(),
            Placeholder::Subject => event.subject(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// A placeholder, and whether it lies in the path (not the query).
    Placeholder(Placeholder, bool),
}

/// A parsed endpoint URL such as `https://hooks.example.com/events/{type}`.
///
/// Placeholders: `{type}` and `{subject}`, the event's CloudEvents
/// attributes, percent-encoded (every character but letters, digits and
/// `-._~`), so a value never leaves its path segment or query parameter.
/// They may appear in the path and the query, not in the scheme or host.
/// A URL without placeholders posts every event to the same endpoint.
///
/// The template is checked when parsed: it must be an `http` or `https` URL
/// with a host, and use only known placeholders with balanced braces.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_webhook::UrlTemplate;
///
/// let template = UrlTemplate::parse("https://hooks.example.com/{type}?key={subject}")?;
/// let event = Event::builder("DonorSecured").subject("donor 42/7").build()?;
/// assert_eq!(
///     template.render(&event)?.as_str(),
///     "https://hooks.example.com/DonorSecured?key=donor%2042%2F7"
/// );
/// assert!(UrlTemplate::parse("https://{type}.example.com/").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    text: String,
    parts: Vec<Part>,
}

impl UrlTemplate {
    /// Parses and checks a template.
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let shown = redact_url(template);
        let fail = |reason: String| ConfigError(format!("url {shown:?} {reason}"));
        if template.trim().is_empty() {
            return Err(fail(
                "is empty: set the endpoint events are posted to".into(),
            ));
        }
        let Some(scheme_end) = template.find("://") else {
            return Err(fail("is not an absolute http:// or https:// URL".into()));
        };
        let scheme = &template[..scheme_end];
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(fail(format!(
                "has the scheme {scheme:?}: only http and https are supported"
            )));
        }
        let rest = &template[scheme_end + 3..];
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(fail("names no host".into()));
        }
        if authority.contains(['{', '}']) {
            return Err(fail(format!(
                "has a placeholder in its host: placeholders ({PLACEHOLDERS}) may only \
                 appear in the path or the query"
            )));
        }

        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut in_path = true;
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
                    parts.push(Part::Placeholder(placeholder, in_path));
                }
                '}' => return Err(fail("has a '}' without a matching '{'".into())),
                c => {
                    if c == '?' || c == '#' {
                        in_path = false;
                    }
                    literal.push(c);
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let parsed = UrlTemplate {
            text: template.to_owned(),
            parts,
        };
        // With every placeholder filled, the result must be a URL.
        let sample = parsed.render_with(|_| "x".into());
        let url = Url::parse(&sample).map_err(|e| {
            fail(format!(
                "is not a valid URL (e.g. {:?}): {e}",
                redact_url(&sample)
            ))
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(fail("names no host".into()));
        }
        Ok(parsed)
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template has placeholders (otherwise every event goes to
    /// the same URL).
    pub fn has_placeholders(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Placeholder(..)))
    }

    /// The URL for `event`. Fails when a value cannot stand in the URL: an
    /// empty value, or `.` / `..` in the path (a dot segment would move the
    /// request to another path). Such an event can never be posted.
    pub fn render(&self, event: &Event) -> Result<Url, InvalidUrlValue> {
        for part in &self.parts {
            if let Part::Placeholder(p, in_path) = part {
                let value = p.value(event);
                let reason = if value.is_empty() {
                    Some("is empty")
                } else if *in_path && (value == "." || value == "..") {
                    Some("is a dot segment, which would change the URL's path")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(InvalidUrlValue {
                        attribute: p.attribute(),
                        value: value.to_owned(),
                        reason: reason.to_owned(),
                    });
                }
            }
        }
        let text = self.render_with(|p| utf8_percent_encode(p.value(event), VALUE).to_string());
        Url::parse(&text).map_err(|e| InvalidUrlValue {
            attribute: "rendered URL",
            value: redact_url(&text),
            reason: e.to_string(),
        })
    }

    fn render_with(&self, mut value: impl FnMut(Placeholder) -> String) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p, _) => out.push_str(&value(*p)),
            }
        }
        out
    }
}

impl fmt::Display for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.text))
    }
}

/// Why an event's attributes cannot form its URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its {attribute} {value:?} cannot be used in the webhook URL: it {reason}")]
pub struct InvalidUrlValue {
    attribute: &'static str,
    value: String,
    reason: String,
}

impl InvalidUrlValue {
    /// Which attribute was rejected (`type` or `subject`).
    pub fn attribute(&self) -> &str {
        self.attribute
    }
    /// The rejected value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// `url` with the user-info part (`user:password@`) replaced by `***@`.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    match authority.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, subject: &str) -> Event {
        match Event::builder(event_type).subject(subject).build() {
            Ok(e) => e,
            Err(e) => panic!("test event is invalid: {e}"),
        }
    }

    fn parse(t: &str) -> UrlTemplate {
        match UrlTemplate::parse(t) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn render(t: &str, e: &Event) -> String {
        match parse(t).render(e) {
            Ok(url) => url.to_string(),
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn fills_and_encodes_placeholders() {
        let e = event("DonorSecured", "donor-42");
        assert_eq!(
            render("http://127.0.0.1:8080/hooks/{type}/{subject}", &e),
            "http://127.0.0.1:8080/hooks/DonorSecured/donor-42"
        );
        assert_eq!(
            render("https://h.example/x?t={type}&s={subject}", &e),
            "https://h.example/x?t=DonorSecured&s=donor-42"
        );
        assert_eq!(
            render("https://h.example/fixed", &e),
            "https://h.example/fixed"
        );
        assert!(!parse("https://h.example/fixed").has_placeholders());
        let odd = event("com.example/order placed", "ünï?#&=");
        assert_eq!(
            render("https://h.example/{type}?k={subject}", &odd),
            "https://h.example/com.example%2Forder%20placed?k=%C3%BCn%C3%AF%3F%23%26%3D"
        );
    }

    #[test]
    fn dot_segments_and_empty_values_are_refused() {
        let t = parse("https://h.example/a/{subject}");
        for bad in [".", ".."] {
            let err = t.render(&event("T", bad)).err();
            assert_eq!(
                err.as_ref().map(InvalidUrlValue::attribute),
                Some("subject")
            );
        }
        // In the query a dot is harmless.
        assert!(
            parse("https://h.example/a?s={subject}")
                .render(&event("T", ".."))
                .is_ok()
        );
        assert!(t.render(&event("T", "...")).is_ok());
    }

    #[test]
    fn bad_templates_are_rejected() {
        for bad in [
            "",
            "h.example/{type}",
            "ftp://h.example/{type}",
            "http:///{type}",
            "http://{type}.example/",
            "http://h.example/{kind}",
            "http://h.example/{type",
            "http://h.example/type}",
            "http://h.example/{ty{pe}}",
            "http://h.example:99999/",
        ] {
            assert!(UrlTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let msg = UrlTemplate::parse("http://u:s3cret@h.example/{kind}")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            msg,
            "invalid configuration: url \"http://***@h.example/{kind}\" has an unknown \
             placeholder {kind} (known: {type}, {subject})"
        );
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact_url("https://u:p@h.example/x"),
            "https://***@h.example/x"
        );
        assert_eq!(redact_url("https://h.example/x@y"), "https://h.example/x@y");
        assert_eq!(redact_url("http://h.example"), "http://h.example");
    }
}
