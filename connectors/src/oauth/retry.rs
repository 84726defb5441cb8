//! Retrying token requests: exponential backoff with jitter, `Retry-After` honoured, bounded in attempts and time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

/// How throttling (429), server errors (5xx) and connection failures are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// HTTP requests at most, the first included (at least 1).
    pub max_attempts: u32,
    /// The first backoff; doubled for each further attempt.
    pub initial_backoff: Duration,
    /// No single wait is longer (a longer `Retry-After` ends the retries instead).
    pub max_backoff: Duration,
    /// No retry starts after this much time since the first request.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, backoff from 0.5 s doubling up to 30 s, within 60 s.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The wait before attempt `attempt + 1`, after `attempt` (1-based) failed: `initial · 2^(attempt-1)`, capped
    /// at `max_backoff`, with "equal jitter" (a random point in its upper half). A `Retry-After` is waited in
    /// full, plus up to 10 % jitter, unless the backoff is longer.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let mut rng = rand::rng();
        let backoff = exp / 2 + exp.mul_f64(rng.random::<f64>() / 2.0);
        match retry_after {
            Some(ra) => (ra + ra.mul_f64(rng.random::<f64>() / 10.0)).max(backoff),
            None => backoff,
        }
    }

    /// Whether to wait `delay` and try again, `attempts` requests and `elapsed` time into it, when the server
    /// asked to wait `retry_after` (longer than `max_backoff`: give up now rather than sleep on it).
    pub(crate) fn allows(
        &self,
        attempts: u32,
        elapsed: Duration,
        delay: Duration,
        retry_after: Option<Duration>,
    ) -> bool {
        attempts < self.max_attempts.max(1)
            && retry_after.is_none_or(|ra| ra <= self.max_backoff)
            && elapsed + delay <= self.max_elapsed
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500),
                "{d1:?}"
            );
            let d3 = p.delay(3, None);
            assert!(
                d3 >= Duration::from_secs(1) && d3 <= Duration::from_secs(2),
                "{d3:?}"
            );
            let d30 = p.delay(30, None);
            assert!(
                d30 >= Duration::from_secs(15) && d30 <= Duration::from_secs(30),
                "{d30:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let d = p.delay(1, Some(Duration::from_secs(2)));
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_millis(2200),
                "{d:?}"
            );
        }
        // A Retry-After longer than one wait may be ends the retries.
        let ra = |s| Some(Duration::from_secs(s));
        assert!(!p.allows(1, Duration::ZERO, Duration::from_secs(120), ra(120)));
        assert!(p.allows(1, Duration::ZERO, Duration::from_secs(2), ra(2)));
        assert!(p.allows(1, Duration::ZERO, Duration::from_secs(2), None));
        assert!(!p.allows(5, Duration::ZERO, Duration::from_secs(1), None));
        assert!(!p.allows(2, Duration::from_secs(59), Duration::from_secs(2), None));
        assert!(!RetryPolicy::none().allows(1, Duration::ZERO, Duration::ZERO, None));
    }

    #[test]
    fn parses_retry_after() {
        let now = DateTime::parse_from_rfc3339("2026-11-21T08:49:37Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sat, 21 Nov 2026 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sat, 21 Nov 2026 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
