//! Emulator of the Microsoft identity platform v2.0 token endpoint (Entra ID) for one sandbox world.
//!
//! Endpoints (see [`Idp::router`]):
//! - `POST /{tenant}/oauth2/v2.0/token`: `client_credentials`, `password` (ROPC) and `refresh_token`, with
//!   Microsoft's success and AADSTS error shapes; tenant by id, initial domain name or mail domain.
//! - `GET /{tenant}/v2.0/.well-known/openid-configuration`: a minimal discovery document.
//! - `POST /introspect`: RFC 7662 (form `token=…`; also `GET ?token=` or `Authorization: Bearer`).
//! - `POST /dovecot/grant`: Dovecot's oauth2 passdb with `use_grant_password = yes` (token + mailbox → allow/deny
//!   by Exchange's IMAP rule).
//! - `/_sandbox/…`: test hooks (mint, revoke, token lifetime, faults, world summary).
//!
//! Secrets, passwords and tokens are never logged.

mod error;
mod grant;
mod http;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError, RwLock, RwLockReadGuard,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use grant::{EXCHANGE_APP_ID, GRAPH_APP_ID};

use crate::{
    tokens::{TokenInfo, TokenKind, TokenStore},
    world::World,
};

/// Default lifetime of issued access tokens, as Entra's `expires_in` (seconds).
pub const DEFAULT_LIFETIME_SECS: i64 = 3599;

/// The identity provider: world, issued tokens and test settings. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Idp {
    world: Arc<RwLock<World>>,
    tokens: TokenStore,
    lifetime_secs: Arc<AtomicI64>,
    faults: Arc<Mutex<VecDeque<(Fault, u32)>>>,
}

/// A fault the token endpoint answers instead of (or before) handling a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `429 Too Many Requests` with `Retry-After` and an AADSTS50196 body (`temporarily_unavailable`).
    Throttle { retry_after_seconds: u64 },
    /// `503 Service Unavailable` with an AADSTS90033 body (`temporarily_unavailable`), `Retry-After` if given.
    Unavailable { retry_after_seconds: Option<u64> },
    /// The request is answered normally after this delay.
    Delay(Duration),
}

/// Who a test token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MintKind {
    App,
    User,
}

/// A token minted directly (test hook `POST /_sandbox/token`), bypassing every check of the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    /// Tenant id, name or mail domain; an unknown value is used literally as the token's `tid`.
    pub tenant: String,
    pub kind: MintKind,
    pub client_id: String,
    /// Required for `user` tokens.
    #[serde(default)]
    pub upn: Option<String>,
    /// `aud`; defaults to `https://outlook.office365.com`.
    #[serde(default = "imap_audience")]
    pub audience: String,
    /// App roles; default: the app's roles in the world (none for an unknown app).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Delegated scopes (without resource prefix); default: the app's delegated scopes minus `offline_access`.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Lifetime in seconds, negative for an already expired token; default: the current default lifetime.
    #[serde(default)]
    pub lifetime_seconds: Option<i64>,
}

fn imap_audience() -> String {
    "https://outlook.office365.com".to_owned()
}

impl MintRequest {
    /// An app token with explicit roles.
    pub fn app(tenant: &str, client_id: &str, audience: &str, roles: &[&str]) -> Self {
        Self {
            tenant: tenant.to_owned(),
            kind: MintKind::App,
            client_id: client_id.to_owned(),
            upn: None,
            audience: audience.to_owned(),
            roles: Some(roles.iter().map(|r| (*r).to_owned()).collect()),
            scopes: None,
            lifetime_seconds: None,
        }
    }

    /// A delegated token for `upn` with explicit scopes.
    pub fn user(tenant: &str, client_id: &str, upn: &str, audience: &str, scopes: &[&str]) -> Self {
        Self {
            tenant: tenant.to_owned(),
            kind: MintKind::User,
            client_id: client_id.to_owned(),
            upn: Some(upn.to_owned()),
            audience: audience.to_owned(),
            roles: None,
            scopes: Some(scopes.iter().map(|s| (*s).to_owned()).collect()),
            lifetime_seconds: None,
        }
    }

    /// Sets the lifetime (negative: already expired).
    pub fn lifetime(mut self, seconds: i64) -> Self {
        self.lifetime_seconds = Some(seconds);
        self
    }
}

/// Why a mint request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("a user token needs `upn`")]
    MissingUpn,
}

impl Idp {
    pub fn new(world: World) -> Self {
        Self {
            world: Arc::new(RwLock::new(world)),
            tokens: TokenStore::default(),
            lifetime_secs: Arc::new(AtomicI64::new(DEFAULT_LIFETIME_SECS)),
            faults: Arc::default(),
        }
    }

    /// Read access to the world. Do not hold the guard across an `.await`.
    pub fn world(&self) -> RwLockReadGuard<'_, World> {
        self.world.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the world at runtime (e.g. a test adds a mailbox or a FullAccess grant).
    pub fn update_world<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut self.world.write().unwrap_or_else(PoisonError::into_inner))
    }

    /// The issued tokens (validate, revoke; shared with every clone of this `Idp`).
    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// Default lifetime of newly issued access tokens, in seconds.
    pub fn lifetime(&self) -> i64 {
        self.lifetime_secs.load(Ordering::Relaxed)
    }

    /// Sets the default lifetime of newly issued access tokens (token endpoint and mint default).
    pub fn set_lifetime(&self, seconds: i64) {
        self.lifetime_secs.store(seconds, Ordering::Relaxed);
    }

    /// Makes the next `count` token requests answer `fault` (queued after faults already injected).
    pub fn inject_fault(&self, fault: Fault, count: u32) {
        if count > 0 {
            self.faults
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back((fault, count));
        }
    }

    /// Drops all pending faults.
    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The fault for the current token request, if any (consumes one occurrence).
    fn take_fault(&self) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let (fault, left) = faults.front_mut()?;
        let fault = fault.clone();
        *left -= 1;
        if *left == 0 {
            faults.pop_front();
        }
        Some(fault)
    }

    /// Mints a token without any check (tests: expired tokens, foreign tenants, missing roles…).
    pub fn mint(&self, req: &MintRequest) -> Result<(String, TokenInfo), MintError> {
        let (tenant_id, kind) = {
            let world = self.world();
            let tenant_id = grant::find_tenant(&world, &req.tenant)
                .map_or_else(|| req.tenant.clone(), |t| t.id.clone());
            let app = world.app(&req.client_id);
            let kind = match req.kind {
                MintKind::App => TokenKind::App {
                    client_id: req.client_id.clone(),
                    roles: req
                        .roles
                        .clone()
                        .unwrap_or_else(|| app.map(|a| a.roles.clone()).unwrap_or_default()),
                },
                MintKind::User => TokenKind::User {
                    client_id: req.client_id.clone(),
                    upn: req.upn.clone().ok_or(MintError::MissingUpn)?,
                    scopes: req.scopes.clone().unwrap_or_else(|| {
                        app.map(|a| {
                            a.delegated_scopes
                                .iter()
                                .filter(|s| *s != "offline_access")
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default()
                    }),
                },
            };
            (tenant_id, kind)
        };
        let lifetime = req.lifetime_seconds.unwrap_or_else(|| self.lifetime());
        Ok(self.tokens.mint(
            &tenant_id,
            &req.audience,
            kind,
            chrono::Duration::seconds(lifetime),
        ))
    }

    /// Revokes an issued access token; returns whether it was known.
    pub fn revoke(&self, token: &str) -> bool {
        self.tokens.revoke(token)
    }

    /// All endpoints, with this `Idp` as state.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Serves [`Idp::router`] on `listener` until `stop` is cancelled (then finishes in-flight requests).
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let addr = listener.local_addr().ok();
        let app = self.router();
        tracing::debug!(?addr, "identity provider listening");
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(?addr, error = %e, "identity provider stopped");
        }
    }
}
