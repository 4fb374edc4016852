//! Medians, spreads and percentiles.

use std::time::Duration;

/// Median, minimum and maximum of a few per-run figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    /// The spread of `values` (all zero when there are none).
    pub(crate) fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Spread {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        }
    }

    /// The spread of one field of each run.
    pub(crate) fn by<T>(runs: &[T], field: impl Fn(&T) -> f64) -> Self {
        Spread::of(&runs.iter().map(field).collect::<Vec<_>>())
    }
}

/// Percentiles of a set of durations.
pub(crate) struct Percentiles {
    sorted: Vec<Duration>,
}

impl Percentiles {
    /// Sorts `samples`.
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Percentiles { sorted: samples }
    }

    /// Number of samples.
    pub(crate) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The `q`-quantile (0 < q ≤ 1) by the nearest-rank method, in milliseconds.
    pub(crate) fn ms(&self, q: f64) -> f64 {
        let n = self.sorted.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = (q * n as f64).ceil() as usize;
        ms(self.sorted[rank.clamp(1, n) - 1])
    }

    /// The largest sample, in milliseconds.
    pub(crate) fn max_ms(&self) -> f64 {
        self.ms(1.0)
    }
}

/// `d` in milliseconds.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::new((1..=1000).rev().map(Duration::from_millis).collect());
        assert_eq!(p.ms(0.5), 500.0);
        assert_eq!(p.ms(0.99), 990.0);
        assert_eq!(p.ms(0.999), 999.0);
        assert_eq!(p.max_ms(), 1000.0);
        assert!(Percentiles::new(Vec::new()).ms(0.5).is_nan());
    }
}
