//! The figures of a drain run, shared by `drain` and `broker`: the relay's
//! rate against its two baselines, (a) publishing alone and (b) bare
//! claim-and-delete, and their bound H = 1/(1/a + 1/b).

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::output::round;
use crate::stats::Spread;

/// One run's rates, in events per second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rates {
    pub(crate) relay: f64,
    pub(crate) publish: f64,
    pub(crate) claim_delete: f64,
    pub(crate) bound: f64,
    pub(crate) ratio: f64,
}

impl Rates {
    /// The rates of `n` events drained by the relay in `relay`, published
    /// alone in `publish` and claimed and deleted alone in `claim_delete`.
    pub(crate) fn of(n: usize, relay: Duration, publish: Duration, claim_delete: Duration) -> Self {
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let (relay, publish, claim_delete) = (rate(relay), rate(publish), rate(claim_delete));
        let bound = 1.0 / (1.0 / publish + 1.0 / claim_delete);
        Rates {
            relay,
            publish,
            claim_delete,
            bound,
            ratio: relay / bound,
        }
    }

    /// The table header; `publish` names baseline (a).
    pub(crate) fn header(publish: &str) -> String {
        format!(
            "{:<8} {:>12} {:>w$} {:>21} {:>12} {:>9}",
            "run",
            "relay ev/s",
            publish,
            "(b) claim+delete ev/s",
            "H ev/s",
            "relay/H",
            w = publish.len().max(16),
        )
    }

    /// A table row under [`Rates::header`] with the same `publish` label.
    pub(crate) fn row(&self, label: &str, publish: &str) -> String {
        format!(
            "{:<8} {:>12.0} {:>w$.0} {:>21.0} {:>12.0} {:>9.2}",
            label,
            self.relay,
            self.publish,
            self.claim_delete,
            self.bound,
            self.ratio,
            w = publish.len().max(16),
        )
    }

    /// The run's figures for the JSON line's `per_run`.
    pub(crate) fn json(&self) -> Map<String, Value> {
        let value = json!({
            "events_per_s": round(self.relay, 0),
            "baseline_publish_per_s": round(self.publish, 0),
            "baseline_claim_delete_per_s": round(self.claim_delete, 0),
            "bound_h_per_s": round(self.bound, 0),
            "ratio": round(self.ratio, 3),
        });
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

/// Median, minimum and maximum of each rate over the runs.
pub(crate) struct RatesSummary {
    pub(crate) median: Rates,
    pub(crate) min: Rates,
    pub(crate) max: Rates,
}

impl RatesSummary {
    pub(crate) fn of(runs: &[Rates]) -> Self {
        let pick = |which: fn(Spread) -> f64| {
            let s = |f: fn(&Rates) -> f64| which(Spread::by(runs, f));
            Rates {
                relay: s(|r| r.relay),
                publish: s(|r| r.publish),
                claim_delete: s(|r| r.claim_delete),
                bound: s(|r| r.bound),
                ratio: s(|r| r.ratio),
            }
        };
        RatesSummary {
            median: pick(|s| s.median),
            min: pick(|s| s.min),
            max: pick(|s| s.max),
        }
    }

    /// The median, min and max rows under [`Rates::header`].
    pub(crate) fn rows(&self, publish: &str) -> [String; 3] {
        [
            self.median.row("median", publish),
            self.min.row("min", publish),
            self.max.row("max", publish),
        ]
    }

    /// The summary's fields of the JSON line.
    pub(crate) fn json(&self) -> Map<String, Value> {
        let (median, min, max) = (&self.median, &self.min, &self.max);
        let value = json!({
            "events_per_s": round(median.relay, 0),
            "min": round(min.relay, 0),
            "max": round(max.relay, 0),
            "baseline_publish_per_s": round(median.publish, 0),
            "baseline_claim_delete_per_s": round(median.claim_delete, 0),
            "bound_h_per_s": round(median.bound, 0),
            // The baseline of the ratio, H, under the name every scenario uses.
            "baseline_events_per_s": round(median.bound, 0),
            "ratio": round(median.ratio, 3),
            "ratio_min": round(min.ratio, 3),
            "ratio_max": round(max.ratio, 3),
        });
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}
