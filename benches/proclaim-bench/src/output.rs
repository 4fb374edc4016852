//! Where results go: a table for people, JSON lines for machines.

use std::io::Write as _;

/// With `--json`, JSON lines go to stdout and the table to stderr;
/// otherwise the table goes to stdout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    json: bool,
}

impl Output {
    pub(crate) fn new(json: bool) -> Self {
        Output { json }
    }

    /// Writes one line of the human-readable table.
    pub(crate) fn line(&self, text: impl AsRef<str>) -> anyhow::Result<()> {
        let text = text.as_ref();
        if self.json {
            let mut err = std::io::stderr().lock();
            writeln!(err, "{text}")?;
            err.flush()?;
        } else {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
            out.flush()?;
        }
        Ok(())
    }

    /// Writes one JSON object on a line of stdout, with `--json` only.
    pub(crate) fn json(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        if self.json {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string(value)?)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// Rounds `x` to `digits` decimals, for JSON figures.
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Adds `fields` to the JSON object `line` (keys already there are kept).
pub(crate) fn merge(
    line: &mut serde_json::Value,
    fields: serde_json::Map<String, serde_json::Value>,
) {
    if let serde_json::Value::Object(map) = line {
        for (key, value) in fields {
            map.entry(key).or_insert(value);
        }
    }
}
