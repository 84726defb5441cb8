//! The token cache: one token per (endpoint, client, scope, user), renewed ahead of expiry, fetched once for all
//! concurrent callers.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tracing::Instrument;

use super::{
    AccessToken, Credentials, Grant, OAuthConfigError, OAuthError, RetryPolicy, SecretString,
    TokenKey, TokenRequest,
    client::{Fetched, fetch},
};

/// Access tokens for every mailbox and the outgoing server, shared by all connections. Cheap to clone (an `Arc`
/// inside); clones share tokens.
///
/// * A token is reused until its refresh point (80 % of its lifetime or 5 minutes before expiry, whichever is
///   sooner: [`refresh_margin`](super::refresh_margin)); an expired token is never handed out.
/// * Concurrent callers of one key share one request (single flight); while a renewal runs, callers get the
///   current token if it still has some life left instead of waiting.
/// * Throttling, 5xx and connection failures are retried ([`RetryPolicy`]); if a renewal fails while the current
///   token is still good, that token is handed out and the failure logged.
/// * Delegated tokens (OAuth User) are renewed with the refresh token when one was issued, and with the password
///   again if the refresh is refused.
/// * [`invalidate`](Self::invalidate) drops a token a server rejected; [`with_token`](Self::with_token) wraps
///   "use, and on rejection retry once with a new token".
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    retry: RetryPolicy,
    slots: Mutex<HashMap<TokenKey, Arc<Slot>>>,
    requests: AtomicU64,
    hits: AtomicU64,
}

/// One key's token.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// Held while fetching: the single flight.
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    token: Option<AccessToken>,
    refresh_token: Option<SecretString>,
    /// Completed flights; a caller that waited for one that failed gets its error instead of starting another.
    flights: u64,
    last_error: Option<OAuthError>,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, now: Instant) -> Option<AccessToken> {
        self.state().token.clone().filter(|t| t.is_fresh(now))
    }

    fn usable(&self, now: Instant) -> Option<AccessToken> {
        self.state().token.clone().filter(|t| t.is_usable(now))
    }
}

/// Counters, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// HTTP requests sent to token endpoints (retries included).
    pub requests: u64,
    /// Calls of [`TokenCache::token`] answered from the cache.
    pub hits: u64,
}

/// Builds a [`TokenCache`]: HTTP timeouts, extra CA certificates, retry policy, or a ready HTTP client.
#[derive(Debug, Clone)]
pub struct TokenCacheBuilder {
    http: Option<reqwest::Client>,
    retry: RetryPolicy,
    connect_timeout: Duration,
    timeout: Duration,
    root_certificates: Vec<Vec<u8>>,
    no_proxy: bool,
}

impl Default for TokenCacheBuilder {
    fn default() -> Self {
        Self {
            http: None,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            root_certificates: Vec::new(),
            no_proxy: false,
        }
    }
}

impl TokenCacheBuilder {
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Time to connect (TCP + TLS); default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time for a whole request, answer included; default 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Trusts an extra CA certificate (PEM), e.g. a TLS-inspecting proxy's or the local sandbox's.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Ignores `HTTP(S)_PROXY` from the environment.
    pub fn no_proxy(mut self) -> Self {
        self.no_proxy = true;
        self
    }

    /// Uses this HTTP client as it is (timeouts, certificates and proxy settings above are then not applied).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    pub fn build(self) -> Result<TokenCache, OAuthConfigError> {
        let http = match self.http {
            Some(http) => http,
            None => {
                let mut b = reqwest::Client::builder()
                    .connect_timeout(self.connect_timeout)
                    .timeout(self.timeout)
                    // A token endpoint does not redirect; a redirect means a wrong URL or a portal.
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("mailqueue/", env!("CARGO_PKG_VERSION")));
                if self.no_proxy {
                    b = b.no_proxy();
                }
                for pem in &self.root_certificates {
                    let cert = reqwest::Certificate::from_pem(pem).map_err(|e| {
                        OAuthConfigError::new(format!("a CA certificate is not valid PEM: {e}"))
                    })?;
                    b = b.add_root_certificate(cert);
                }
                b.build().map_err(|e| {
                    OAuthConfigError::new(format!("the HTTP client cannot be set up: {e}"))
                })?
            }
        };
        Ok(TokenCache {
            inner: Arc::new(Inner {
                http,
                retry: self.retry,
                slots: Mutex::default(),
                requests: AtomicU64::new(0),
                hits: AtomicU64::new(0),
            }),
        })
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("keys", &self.slots().len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// How an operation that used a token failed (see [`TokenCache::with_token`]).
#[derive(Debug)]
pub enum Attempt<E> {
    /// The server refused the token (IMAP `NO AUTHENTICATE failed`, SMTP `535 5.7.3`): worth one retry with a
    /// new token.
    Rejected(E),
    /// Anything else: not retried here.
    Failed(E),
}

/// Why [`TokenCache::with_token`] gave up.
#[derive(Debug)]
pub enum WithTokenError<E> {
    /// No token could be obtained.
    Token(OAuthError),
    /// The server rejected a token, and then the freshly fetched one as well: a permission or account problem,
    /// not an expired token.
    Rejected(E),
    /// The operation failed otherwise.
    Failed(E),
}

impl<E: fmt::Display> fmt::Display for WithTokenError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WithTokenError::Token(e) => e.fmt(f),
            WithTokenError::Rejected(e) => {
                write!(f, "the server rejected a freshly issued access token: {e}")
            }
            WithTokenError::Failed(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for WithTokenError<E> {}

impl TokenCache {
    /// A cache with the default HTTP client (10 s connect, 30 s total, webpki roots, no redirects) and retries.
    ///
    /// # Panics
    /// If the TLS stack cannot be initialised (never with the bundled roots).
    pub fn new() -> Self {
        Self::builder().build().expect("default HTTP client")
    }

    pub fn builder() -> TokenCacheBuilder {
        TokenCacheBuilder::default()
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            hits: self.inner.hits.load(Ordering::Relaxed),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, Arc<Slot>>> {
        self.inner.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: TokenKey) -> Arc<Slot> {
        self.slots().entry(key).or_default().clone()
    }

    /// A valid access token for `request`: the cached one until its refresh point, else a new one.
    pub async fn token(&self, request: &TokenRequest) -> Result<AccessToken, OAuthError> {
        let slot = self.slot(request.key());
        if let Some(token) = slot.fresh(Instant::now()) {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(token);
        }
        let flights_seen = slot.state().flights;
        let _flight = match slot.fetch.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Someone is renewing: keep using the current token if it still has some life left.
                if let Some(token) = slot.usable(Instant::now()) {
                    self.inner.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(token);
                }
                slot.fetch.lock().await
            }
        };
        // The flight we waited for may have brought a fresh token, or failed: share its outcome.
        if let Some(token) = slot.fresh(Instant::now()) {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(token);
        }
        {
            let state = slot.state();
            if state.flights != flights_seen
                && let Some(e) = &state.last_error
            {
                return Err(e.clone());
            }
        }
        let span = tracing::info_span!(
            "oauth_token",
            endpoint = %request.endpoint().host(),
            client_id = %request.client_id(),
            scope = %request.scope(),
            user = request.user().unwrap_or("-"),
        );
        let result = self.renew(request, &slot).instrument(span.clone()).await;
        {
            let mut state = slot.state();
            state.flights += 1;
            state.last_error = result.as_ref().err().cloned();
        }
        match result {
            Ok(token) => Ok(token),
            Err(e) => match slot.usable(Instant::now()) {
                Some(token) => {
                    span.in_scope(|| {
                        tracing::warn!(
                            error = %e,
                            remaining_s = token.remaining().as_secs(),
                            "token renewal failed; using the current token until it expires"
                        );
                    });
                    Ok(token)
                }
                None => {
                    span.in_scope(|| tracing::warn!(error = %e, "token request failed"));
                    Err(e)
                }
            },
        }
    }

    /// Fetches a new token for the slot (the caller holds its flight lock) and stores it.
    async fn renew(&self, request: &TokenRequest, slot: &Slot) -> Result<AccessToken, OAuthError> {
        let fetched = match request.credentials() {
            Credentials::ClientSecret { .. } => {
                self.fetch(request, Grant::ClientCredentials, None).await?
            }
            Credentials::Password { .. } => {
                let refresh_token = slot.state().refresh_token.clone();
                match refresh_token {
                    Some(rt) => match self.fetch(request, Grant::RefreshToken, Some(&rt)).await {
                        Ok(fetched) => fetched,
                        Err(e) if e.is_refusal() => {
                            tracing::info!(error = %e, "refresh token refused; signing in with the password");
                            slot.state().refresh_token = None;
                            self.fetch(request, Grant::Password, None).await?
                        }
                        Err(e) => return Err(e),
                    },
                    None => self.fetch(request, Grant::Password, None).await?,
                }
            }
        };
        tracing::info!(
            expires_at = %fetched.token.expires_at(),
            lifetime_s = fetched.token.lifetime().as_secs(),
            "access token obtained"
        );
        let mut state = slot.state();
        state.token = Some(fetched.token.clone());
        if fetched.refresh_token.is_some() {
            state.refresh_token = fetched.refresh_token;
        }
        Ok(fetched.token)
    }

    async fn fetch(
        &self,
        request: &TokenRequest,
        grant: Grant,
        refresh_token: Option<&SecretString>,
    ) -> Result<Fetched, OAuthError> {
        fetch(
            &self.inner.http,
            &self.inner.retry,
            request,
            grant,
            refresh_token,
            &self.inner.requests,
        )
        .await
    }

    /// Marks `token` as rejected by a server, so that the next [`token`](Self::token) fetches a new one. A token
    /// that was already replaced is left alone (the newer one stays).
    pub fn invalidate(&self, request: &TokenRequest, token: &AccessToken) {
        let slot = self.slot(request.key());
        let mut state = slot.state();
        if state.token.as_ref().is_some_and(|t| t.same_as(token)) {
            state.token = None;
            tracing::info!(
                endpoint = %request.endpoint().host(),
                client_id = %request.client_id(),
                user = request.user().unwrap_or("-"),
                "access token rejected by the server; dropped from the cache"
            );
        }
    }

    /// Runs `op` with a token; if the server rejects it ([`Attempt::Rejected`]), invalidates it and runs `op` once
    /// more with a new token. A second rejection is reported as [`WithTokenError::Rejected`] (the new token is
    /// kept: fetching yet another would not help and would hammer the token endpoint).
    pub async fn with_token<T, E, F, Fut>(
        &self,
        request: &TokenRequest,
        mut op: F,
    ) -> Result<T, WithTokenError<E>>
    where
        F: FnMut(AccessToken) -> Fut,
        Fut: Future<Output = Result<T, Attempt<E>>>,
    {
        let token = self.token(request).await.map_err(WithTokenError::Token)?;
        match op(token.clone()).await {
            Ok(value) => return Ok(value),
            Err(Attempt::Failed(e)) => return Err(WithTokenError::Failed(e)),
            Err(Attempt::Rejected(_)) => self.invalidate(request, &token),
        }
        let token = self.token(request).await.map_err(WithTokenError::Token)?;
        match op(token).await {
            Ok(value) => Ok(value),
            Err(Attempt::Failed(e)) => Err(WithTokenError::Failed(e)),
            Err(Attempt::Rejected(e)) => Err(WithTokenError::Rejected(e)),
        }
    }
}
