//! Exponential backoff with jitter.

use std::time::Duration;

/// Exponential backoff with "equal jitter": the n-th retry waits a random
/// time between half and all of `min(max, initial * multiplier^(n-1))`, so
/// retries of many events spread out instead of arriving together.
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
/// let third = backoff.delay(3); // between 200 ms and 400 ms
/// assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the first retry.
    #[serde(with = "crate::duration::human")]
    pub initial: Duration,
    /// Upper bound of any delay.
    #[serde(with = "crate::duration::human")]
    pub max: Duration,
    /// Growth per attempt (≥ 1).
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(300),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// Backoff doubling from `initial` up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            multiplier: 2.0,
        }
    }

    /// The cap without jitter for the `attempt`-th failure (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// A jittered delay for the `attempt`-th failure (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_between_half_and_ceiling() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = b.delay(3);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(
            seen.len() > 100,
            "delays are not jittered: {} distinct",
            seen.len()
        );
    }
}
