//! Exponential backoff with full jitter, for reconnects and retries.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff: each failure doubles the ceiling, up to `max`; the delay is drawn
/// uniformly from `[ceiling/2, ceiling]` so that a fleet does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = rand::rng()
            .random_range(0..=ceiling.as_millis().saturating_sub(half.as_millis()) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// Resets after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_secs(1), "{late:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
