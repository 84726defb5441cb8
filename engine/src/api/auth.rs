//! Bearer-token authentication and the role and queue rules.
//!
//! The configured secrets are hashed (SHA-256) when the router is built and again on each reload; a request's token
//! is hashed and looked up in that map, so no comparison ever runs over a secret itself and the lookup time does not
//! depend on how much of a secret matches. Only token *names* reach logs, events and responses.
//!
//! Roles:
//! * `agent`: sees and works only contacts of its `queues` whose language is one of its `languages` (empty = any);
//!   lists only its queues and reads only their events; may claim, heartbeat, release, transfer (while holding the
//!   claim), close (while holding the claim), re-open and reply. May not assign.
//! * `router`: reads everything, claims (under its own name), assigns, releases and transfers any open contact
//!   (routing decisions). May not close, re-open or reply: that is agents' work.
//! * `admin`: everything, on any contact.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};
use mailqueue_config::{Config, Role};
use sha2::{Digest, Sha256};

use super::{AppState, error::ApiError};
use crate::contacts::{Actor, Contact};

/// Who a request acts as: one configured API token, without its secret.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// Agent tokens: the queues served. Ignored for router and admin (they see every queue).
    pub queues: Vec<String>,
    /// Agent tokens: the languages handled; empty means any.
    pub languages: Vec<String>,
}

impl Principal {
    pub fn is_agent(&self) -> bool {
        self.role == Role::Agent
    }

    /// Whether the caller may see queue `name` (its contacts, figures and events).
    pub fn sees_queue(&self, name: &str) -> bool {
        !self.is_agent() || self.queues.iter().any(|q| q == name)
    }

    /// Whether the caller handles `language` (agents with a language list only).
    pub fn handles_language(&self, language: &str) -> bool {
        !self.is_agent()
            || self.languages.is_empty()
            || self
                .languages
                .iter()
                .any(|l| l.eq_ignore_ascii_case(language))
    }

    /// 403 unless the caller may see and work on `contact`.
    pub fn check_contact(&self, contact: &Contact) -> Result<(), ApiError> {
        if !self.sees_queue(&contact.queue) {
            return Err(ApiError::forbidden(format!(
                "contact {} is not in a queue you serve",
                contact.id
            )));
        }
        if !self.handles_language(&contact.language) {
            return Err(ApiError::forbidden(format!(
                "contact {} is not in a language you handle",
                contact.id
            )));
        }
        Ok(())
    }

    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "a token with role {} may not {what}",
                role_name(self.role)
            )))
        }
    }

    /// How the engine sees the caller: agents act as the claim holder, router and admin as supervisors.
    pub fn actor(&self) -> Actor<'_> {
        match self.role {
            Role::Agent => Actor::Agent(&self.name),
            Role::Router | Role::Admin => Actor::Supervisor(&self.name),
        }
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Agent => "agent",
        Role::Router => "router",
        Role::Admin => "admin",
    }
}

/// The configured tokens. Reload swaps the whole table at once ([`Tokens::replace`]): a request sees either the old
/// tokens or the new ones, never a mix.
#[derive(Debug, Default)]
pub struct Tokens {
    table: std::sync::RwLock<Arc<TokenTable>>,
}

/// Tokens by the SHA-256 of their secret, and agent tokens by name.
#[derive(Debug, Default)]
struct TokenTable {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
    agents: HashMap<String, Arc<Principal>>,
}

impl TokenTable {
    fn from_config(config: &Config) -> Self {
        let mut table = Self::default();
        for t in &config.api.tokens {
            let principal = Arc::new(Principal {
                name: t.name.clone(),
                role: t.role,
                queues: t.queues.clone(),
                languages: t.languages.iter().map(|l| l.as_str().to_owned()).collect(),
            });
            if t.role == Role::Agent {
                table.agents.insert(t.name.clone(), principal.clone());
            }
            let secret = t.secret.expose();
            // An unresolved or empty secret must never let an empty bearer token in.
            if secret.is_empty() {
                tracing::warn!(token = %t.name, "API token has no secret value; it is disabled");
                continue;
            }
            table.by_hash.insert(digest(secret), principal);
        }
        table
    }
}

impl Tokens {
    pub fn from_config(config: &Config) -> Self {
        Self {
            table: std::sync::RwLock::new(Arc::new(TokenTable::from_config(config))),
        }
    }

    /// Replaces every token with those of `config` (configuration reload).
    pub fn replace(&self, config: &Config) {
        let table = Arc::new(TokenTable::from_config(config));
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table;
    }

    fn current(&self) -> Arc<TokenTable> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The token whose secret is `secret`.
    pub fn lookup(&self, secret: &str) -> Option<Arc<Principal>> {
        if secret.is_empty() {
            return None;
        }
        self.current().by_hash.get(&digest(secret)).cloned()
    }

    /// The agent token named `name`.
    pub fn agent(&self, name: &str) -> Option<Arc<Principal>> {
        self.current().agents.get(name).cloned()
    }

    /// How many tokens can authenticate (those with a secret value).
    pub fn len(&self) -> usize {
        self.current().by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Middleware for every `/v1` route: resolves the bearer token to a [`Principal`] (request extension) and records
/// its name in the request span; 401 with `WWW-Authenticate: Bearer` when it is missing or unknown.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    })?;
    let secret = header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::unauthorized("malformed Authorization header: expected `Bearer <token>`")
        })?;
    let principal = state
        .tokens
        .lookup(secret)
        .ok_or_else(|| ApiError::unauthorized("unknown bearer token"))?;
    tracing::Span::current().record("token", principal.name.as_str());
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// The authenticated caller of a `/v1` route (set by [`require_token`]).
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Arc<Principal>>()
            .cloned()
            .map(Self)
            .ok_or_else(|| {
                ApiError::unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
            })
    }
}

impl std::ops::Deref for Caller {
    type Target = Principal;
    fn deref(&self) -> &Principal {
        &self.0
    }
}
