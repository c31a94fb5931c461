//! How fast requests go out: the token bucket of `--rate`, and the backoff while the mirror
//! refuses connections.

use super::*;

pub(super) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` requests a second, a second's worth ready at once.
    pub(super) fn new(rate: f64) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.max(1.0),
            last: Instant::now(),
        }
    }

    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        // A burst of at most one second's worth.
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Connection failures in a row, and until when sending pauses.
#[derive(Default)]
pub(super) struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    pub(super) fn blocked(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }
    /// Returns whether sending now pauses.
    pub(super) fn failed(&mut self) -> bool {
        self.failures += 1;
        if self.failures >= 3 {
            let ms = (50u64 << (self.failures - 3).min(7)).min(5_000);
            self.until = Some(Instant::now() + Duration::from_millis(ms));
            return true;
        }
        false
    }
    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.until = None;
    }
}
