//! Durations in human syntax (`"30s"`, `"1m 30s"`, `"7days"`), for config
//! files and flags, with a bound that keeps the parser from overflowing.
//!
//! `humantime` 2.4 panics instead of failing on some inputs near
//! `u64::MAX` seconds (e.g. `"18446744073709551615s 500ms 500ms"`), so
//! every duration proclaim reads goes through [`parse_duration`], which
//! rejects anything above [`MAX_DURATION_SECS`] before parsing.
//!
//! ```
//! use std::time::Duration;
//! use proclaim_core::parse_duration;
//!
//! assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
//! assert!(parse_duration("soon").is_err());
//! assert!(parse_duration("18446744073709551615s 500ms 500ms").is_err());
//! ```

use std::time::Duration;

/// The longest duration accepted: 2⁶² seconds (about 146 billion years).
pub const MAX_DURATION_SECS: u64 = 1 << 62;

/// Parses a duration in humantime syntax, rejecting values above
/// [`MAX_DURATION_SECS`] with an error instead of overflowing.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if upper_bound_secs(text) > u128::from(MAX_DURATION_SECS) {
        return Err(format!(
            "duration {text:?} is too long (at most {MAX_DURATION_SECS}s)"
        ));
    }
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// An upper bound of the seconds `text` stands for: each number times its
/// unit, sub-second units counted as whole seconds and unknown units as years.
fn upper_bound_secs(text: &str) -> u128 {
    let mut total: u128 = 0;
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u128 = rest[..end].parse().unwrap_or(u128::MAX);
        rest = rest[end..].trim_start();
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        total = total.saturating_add(n.saturating_mul(unit_secs(&rest[..unit_end])));
        rest = &rest[unit_end..];
    }
    total
}

/// Seconds per unit, rounded up; humantime's largest (a year) when unknown.
fn unit_secs(unit: &str) -> u128 {
    match unit {
        "nsec" | "ns" | "usec" | "us" | "\u{b5}s" | "msec" | "ms" | "seconds" | "second"
        | "sec" | "s" => 1,
        "minutes" | "minute" | "min" | "m" => 60,
        "hours" | "hour" | "hr" | "h" => 3_600,
        "days" | "day" | "d" => 86_400,
        "weeks" | "week" | "w" => 604_800,
        _ => 31_557_600,
    }
}

/// `serde(with = "proclaim_core::duration::human")`: a [`Duration`] written
/// and read in humantime syntax, read through [`parse_duration`].
pub mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `"1m 30s"`.
    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*value))
    }

    /// Reads humantime syntax.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>` (absent or null = `None`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `"1m 30s"` or null.
        pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match value {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads humantime syntax or null.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<std::borrow::Cow<'de, str>>::deserialize(d)?
                .map(|text| {
                    crate::duration::parse_duration(&text).map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7days"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(
            parse_duration("100years").map(|d| d.as_secs()),
            Ok(3_155_760_000)
        );
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        for text in [
            "18446744073709551615s 500ms 500ms",
            "18446744073709551615s",
            "99999999999999999999999999999999999999999years",
            "300000000000years",
            &"9223372036854775807s ".repeat(10),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("too long") || err.contains("invalid"), "{err}");
        }
        assert_eq!(
            parse_duration(&format!("{MAX_DURATION_SECS}s")),
            Ok(Duration::from_secs(MAX_DURATION_SECS))
        );
    }
}
