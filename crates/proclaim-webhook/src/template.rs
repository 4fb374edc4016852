//! [`UrlTemplate`]: the endpoint URL, with an event's attributes filled in.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use proclaim_core::template::{Part, Placeholder, Template};
use proclaim_core::{ConfigError, Event, redact_url};
use reqwest::Url;

/// The placeholders a URL template may use.
const PLACEHOLDERS: &[Placeholder] = &[Placeholder::Type, Placeholder::Subject];

/// [`PLACEHOLDERS`] as written, for error messages.
const PLACEHOLDER_NAMES: &str = "{type}, {subject}";

/// Everything but the RFC 3986 unreserved characters is percent-encoded in a
/// value, so that a value stays inside its path segment or query parameter.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The event's value for a placeholder.
fn value_of(placeholder: Placeholder, event: &Event) -> &str {
    placeholder.of(event).unwrap_or_default()
}

/// A parsed endpoint URL such as `https://hooks.example.com/events/{type}`.
///
/// Placeholders: `{type}` and `{subject}`, the event's CloudEvents
/// attributes, percent-encoded (every character but letters, digits and
/// `-._~`), so a value never leaves its path segment or query parameter.
/// They may appear in the path and the query, not in the scheme or host.
/// `{{` and `}}` stand for literal braces, which the URL parser
/// percent-encodes in the path (`%7B`, `%7D`) and keeps as they are in the
/// query. A URL without placeholders posts every event to the same endpoint.
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
    template: Template,
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
                "has a placeholder in its host: placeholders ({PLACEHOLDER_NAMES}) may only \
                 appear in the path or the query"
            )));
        }

        let template = Template::parse(template, PLACEHOLDERS).map_err(|e| fail(e.to_string()))?;
        // With every placeholder filled, the result must be a URL.
        let sample = template.render_with(|_| "x");
        let url = Url::parse(&sample).map_err(|e| {
            fail(format!(
                "is not a valid URL (e.g. {:?}): {e}",
                redact_url(&sample)
            ))
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(fail("names no host".into()));
        }
        Ok(UrlTemplate { template })
    }

    /// The template text, as given.
    pub fn as_str(&self) -> &str {
        self.template.as_str()
    }

    /// Whether the template has placeholders (otherwise every event goes to
    /// the same URL).
    pub fn has_placeholders(&self) -> bool {
        !self.template.is_fixed()
    }

    /// The URL for `event`. Fails when a value cannot stand in the URL: an
    /// empty value, or `.` / `..` in the path (a dot segment would move the
    /// request to another path). Such an event can never be posted.
    pub fn render(&self, event: &Event) -> Result<Url, InvalidUrlValue> {
        for (p, in_path) in self.placeholders() {
            let value = value_of(p, event);
            let reason = if value.is_empty() {
                Some("is empty")
            } else if in_path && (value == "." || value == "..") {
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
        let text = self
            .template
            .render_with(|p| utf8_percent_encode(value_of(p, event), VALUE).to_string());
        Url::parse(&text).map_err(|e| InvalidUrlValue {
            attribute: "rendered URL",
            value: redact_url(&text),
            reason: e.to_string(),
        })
    }

    /// Each placeholder, and whether it lies in the path: it lies in the
    /// query (or fragment) once a literal before it has a `?` or `#`.
    fn placeholders(&self) -> impl Iterator<Item = (Placeholder, bool)> + '_ {
        let mut in_path = true;
        self.template
            .parts()
            .iter()
            .filter_map(move |part| match part {
                Part::Literal(text) => {
                    if text.contains(['?', '#']) {
                        in_path = false;
                    }
                    None
                }
                Part::Placeholder(p) => Some((*p, in_path)),
            })
    }
}

impl fmt::Display for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.template.as_str()))
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
        // The placeholder syntax itself is tested in proclaim_core::template.
        for bad in [
            "",
            "h.example/{type}",
            "ftp://h.example/{type}",
            "http:///{type}",
            "http://{type}.example/",
            "http://{{h}}.example/",
            "http://h.example/{kind}",
            "http://h.example/{source}",
            "http://h.example/{type",
            "http://h.example:99999/",
        ] {
            assert!(UrlTemplate::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let msg = |t: &str| {
            UrlTemplate::parse(t)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            msg("http://u:s3cret@h.example/{kind}"),
            "invalid configuration: url \"http://***@h.example/{kind}\" has an unknown \
             placeholder {kind} (known: {type}, {subject})"
        );
        assert_eq!(
            msg("http://u:s3cret@h.example/type}"),
            "invalid configuration: url \"http://***@h.example/type}\" has a '}' without a \
             matching '{' (write '}}' for a literal brace)"
        );
    }

    #[test]
    fn doubled_braces_are_literal_braces() {
        let e = event("T", "k");
        // In the path the URL parser percent-encodes a brace ...
        assert_eq!(
            render("https://h.example/{{a}}/{type}", &e),
            "https://h.example/%7Ba%7D/T"
        );
        // ... in the query it keeps it as it is.
        assert_eq!(
            render("https://h.example/x?f={{a}}&t={type}", &e),
            "https://h.example/x?f={a}&t=T"
        );
        let t = parse("https://h.example/{{a}}");
        assert_eq!(t.as_str(), "https://h.example/{{a}}");
        assert!(!t.has_placeholders());
        // A `?` after an escaped brace still starts the query.
        let t = parse("https://h.example/{{a}}?s={subject}");
        assert!(t.render(&event("T", "..")).is_ok());
        // A placeholder in the path after an escaped brace is still checked.
        let t = parse("https://h.example/{{a}}/{subject}");
        assert!(t.render(&event("T", "..")).is_err());
    }

    #[test]
    fn display_hides_credentials() {
        let t = parse("https://u:p@h.example/{type}?key=k3y&t={subject}");
        assert_eq!(
            t.to_string(),
            "https://***@h.example/{type}?key=***&t={subject}"
        );
    }
}
