//! Access tokens and when to renew them.

use std::{fmt, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// Refresh at 80 % of the lifetime or 5 minutes before expiry, whichever is sooner; the 5-minute rule only
/// reaches back as far as the first 5 minutes of the lifetime, so short tokens (tests, sandbox) renew at 80 %.
///
/// | lifetime | renewed this long before expiry |
/// |---|---|
/// | 60 min | 12 min (80 %) |
/// | 10 min | 5 min |
/// | 5 s | 1 s (80 %) |
pub fn refresh_margin(lifetime: Duration) -> Duration {
    const FIVE_MINUTES: Duration = Duration::from_secs(300);
    (lifetime / 5).max(FIVE_MINUTES.min(lifetime.saturating_sub(FIVE_MINUTES)))
}

/// While a renewal is running (or failed), a token is still handed out if it has at least this much left.
pub(crate) fn usable_margin(lifetime: Duration) -> Duration {
    (refresh_margin(lifetime) / 2).min(Duration::from_secs(30))
}

/// A bearer token for XOAUTH2. Cheap to clone. Debug shows when it expires, never the token.
#[derive(Clone)]
pub struct AccessToken {
    inner: Arc<Inner>,
}

struct Inner {
    secret: String,
    scopes: Vec<String>,
    expires_at: DateTime<Utc>,
    lifetime: Duration,
    /// Monotonic: when to renew and when it is dead.
    refresh_at: Instant,
    expires: Instant,
}

impl AccessToken {
    /// A token valid for `lifetime` from now (the time the request was sent, for fetched tokens).
    pub fn new(secret: impl Into<String>, lifetime: Duration, scopes: Vec<String>) -> Self {
        Self::issued_at(secret.into(), Instant::now(), Utc::now(), lifetime, scopes)
    }

    pub(crate) fn issued_at(
        secret: String,
        issued: Instant,
        issued_utc: DateTime<Utc>,
        lifetime: Duration,
        scopes: Vec<String>,
    ) -> Self {
        let expires = issued + lifetime;
        let expires_at =
            issued_utc + chrono::Duration::from_std(lifetime).unwrap_or(chrono::Duration::MAX);
        Self {
            inner: Arc::new(Inner {
                secret,
                scopes,
                expires_at,
                lifetime,
                refresh_at: expires - refresh_margin(lifetime),
                expires,
            }),
        }
    }

    /// The token itself, for the SASL layer (`XOAUTH2`). Do not log it.
    pub fn secret(&self) -> &str {
        &self.inner.secret
    }

    /// When the token expires (as announced by `expires_in`, counted from when the request was sent).
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.inner.expires_at
    }

    /// The scopes granted (the response's `scope`, else the ones requested).
    pub fn scopes(&self) -> &[String] {
        &self.inner.scopes
    }

    /// The lifetime announced by the token endpoint.
    pub fn lifetime(&self) -> Duration {
        self.inner.lifetime
    }

    /// How long it is still valid (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.inner.expires.saturating_duration_since(Instant::now())
    }

    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.inner.expires
    }

    /// When the cache renews it ([`refresh_margin`] before [`expires_at`](Self::expires_at)).
    pub fn renews_at(&self) -> DateTime<Utc> {
        self.inner.expires_at
            - chrono::Duration::from_std(refresh_margin(self.inner.lifetime))
                .unwrap_or(chrono::Duration::MAX)
    }

    /// Before the refresh point: handed out without asking the endpoint.
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now < self.inner.refresh_at
    }

    /// Still good enough to hand out while a renewal runs or after it failed.
    pub(crate) fn is_usable(&self, now: Instant) -> bool {
        now + usable_margin(self.inner.lifetime) < self.inner.expires
    }

    /// The same token (same value).
    pub fn same_as(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.secret == other.inner.secret
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_at", &self.inner.expires_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_ahead_timing() {
        assert_eq!(refresh_margin(Duration::from_secs(3600)), 12 * MIN);
        assert_eq!(
            refresh_margin(Duration::from_secs(3599)),
            Duration::from_millis(719_800)
        );
        assert_eq!(refresh_margin(10 * MIN), 5 * MIN);
        assert_eq!(refresh_margin(20 * MIN), 5 * MIN);
        assert_eq!(refresh_margin(30 * MIN), 6 * MIN);
        assert_eq!(
            refresh_margin(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(12)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
        // Never the whole lifetime, and monotonic.
        let mut last = Duration::ZERO;
        for s in (1..7200).step_by(7) {
            let l = Duration::from_secs(s);
            let m = refresh_margin(l);
            assert!(m < l && m >= last, "{s}");
            assert!(usable_margin(l) < m || m.is_zero());
            last = m;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_usable_expired() {
        let t = AccessToken::new("tok", Duration::from_secs(5), vec![]);
        let start = Instant::now();
        assert!(t.is_fresh(start) && t.is_usable(start) && !t.is_expired());
        assert_eq!(t.inner.refresh_at, start + Duration::from_secs(4));
        assert_eq!(t.expires_at() - t.renews_at(), chrono::Duration::seconds(1));
        tokio::time::advance(Duration::from_millis(4200)).await;
        let now = Instant::now();
        assert!(!t.is_fresh(now) && t.is_usable(now) && !t.is_expired());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(!t.is_usable(Instant::now()) && !t.is_expired());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(t.is_expired());
        assert_eq!(t.remaining(), Duration::ZERO);
    }

    #[test]
    fn debug_hides_the_token() {
        let t = AccessToken::new(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.secret",
            MIN,
            vec!["s".into()],
        );
        let debug = format!("{t:?}");
        assert!(
            debug.contains("expires_at") && !debug.contains("eyJ"),
            "{debug}"
        );
        assert_eq!(t.secret(), "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.secret");
        assert!(t.same_as(&t.clone()));
        assert!(!t.same_as(&AccessToken::new("other", MIN, vec![])));
    }
}
