//! Access tokens the emulator issues: JWT-shaped like Entra's (header.payload.signature, 1.5–3 KB), signed with a
//! per-sandbox HMAC key, and remembered so that servers can check them (introspection) and tests can revoke them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use rand::RngCore;
use ring::hmac;
use serde_json::json;

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// Client credentials: the app itself, with its application roles.
    App {
        client_id: String,
        roles: Vec<String>,
    },
    /// Delegated (ROPC / refresh): a user through an app, with delegated scopes.
    User {
        client_id: String,
        upn: String,
        scopes: Vec<String>,
    },
}

/// What the emulator knows about a token it issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub tenant_id: String,
    /// `aud`, e.g. `https://outlook.office365.com` (IMAP) or `https://outlook.office.com` (SMTP).
    pub audience: String,
    pub kind: TokenKind,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}

impl TokenInfo {
    /// The login name this token stands for: the UPN of a delegated token, `None` for an app token.
    pub fn upn(&self) -> Option<&str> {
        match &self.kind {
            TokenKind::User { upn, .. } => Some(upn),
            TokenKind::App { .. } => None,
        }
    }
}

/// Why a presented token is not good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown or tampered token")]
    Unknown,
    #[error("token expired")]
    Expired,
    #[error("token revoked")]
    Revoked,
}

/// Issued tokens and refresh tokens. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct TokenStore {
    key: Arc<hmac::Key>,
    access: Arc<Mutex<HashMap<String, TokenInfo>>>,
    /// refresh token → (tenant id, client id, upn, scopes)
    refresh: Arc<Mutex<HashMap<String, RefreshGrant>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshGrant {
    pub tenant_id: String,
    pub client_id: String,
    pub upn: String,
    pub scope: String,
}

impl Default for TokenStore {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            key: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &secret)),
            access: Arc::default(),
            refresh: Arc::default(),
        }
    }
}

impl TokenStore {
    /// Issues an access token valid for `lifetime` (negative: already expired).
    pub fn mint(
        &self,
        tenant_id: &str,
        audience: &str,
        kind: TokenKind,
        lifetime: Duration,
    ) -> (String, TokenInfo) {
        let now = Utc::now();
        let info = TokenInfo {
            tenant_id: tenant_id.to_owned(),
            audience: audience.to_owned(),
            kind,
            issued_at: now,
            expires_at: now + lifetime,
            revoked: false,
        };
        let token = self.encode(&info);
        self.access
            .lock()
            .expect("token store")
            .insert(token.clone(), info.clone());
        (token, info)
    }

    /// Checks a presented token: issued here, unchanged, not expired, not revoked.
    pub fn validate(&self, token: &str) -> Result<TokenInfo, TokenError> {
        let info = self
            .access
            .lock()
            .expect("token store")
            .get(token.trim())
            .cloned()
            .ok_or(TokenError::Unknown)?;
        if info.revoked {
            return Err(TokenError::Revoked);
        }
        if info.expires_at <= Utc::now() {
            return Err(TokenError::Expired);
        }
        Ok(info)
    }

    /// Revokes a token; returns whether it was known.
    pub fn revoke(&self, token: &str) -> bool {
        match self
            .access
            .lock()
            .expect("token store")
            .get_mut(token.trim())
        {
            Some(info) => {
                info.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Issues a refresh token for a delegated grant.
    pub fn mint_refresh(&self, grant: RefreshGrant) -> String {
        let mut raw = [0u8; 96];
        rand::rng().fill_bytes(&mut raw);
        let token = format!("1.AQ{}", URL_SAFE_NO_PAD.encode(raw));
        self.refresh
            .lock()
            .expect("token store")
            .insert(token.clone(), grant);
        token
    }

    /// Redeems a refresh token (Entra rotates them: the old one stays valid here, as it does there for a while).
    pub fn refresh_grant(&self, token: &str) -> Option<RefreshGrant> {
        self.refresh
            .lock()
            .expect("token store")
            .get(token.trim())
            .cloned()
    }

    /// A JWT with Entra-like claims, padded to a realistic size so line-length limits show up in tests.
    fn encode(&self, info: &TokenInfo) -> String {
        let header = json!({ "typ": "JWT", "alg": "HS256", "x5t": "sandbox", "kid": "sandbox" });
        let mut claims = json!({
            "aud": info.audience,
            "iss": format!("https://sts.windows.net/{}/", info.tenant_id),
            "iat": info.issued_at.timestamp(),
            "nbf": info.issued_at.timestamp(),
            "exp": info.expires_at.timestamp(),
            "tid": info.tenant_id,
            "ver": "1.0",
            "uti": uuid::Uuid::new_v4().simple().to_string(),
            "oid": uuid::Uuid::new_v4().to_string(),
        });
        match &info.kind {
            TokenKind::App { client_id, roles } => {
                claims["appid"] = json!(client_id);
                claims["roles"] = json!(roles);
                claims["idtyp"] = json!("app");
            }
            TokenKind::User {
                client_id,
                upn,
                scopes,
            } => {
                claims["appid"] = json!(client_id);
                claims["upn"] = json!(upn);
                claims["unique_name"] = json!(upn);
                claims["scp"] = json!(scopes.join(" "));
                claims["idtyp"] = json!("user");
            }
        }
        // Real tokens carry ~1.5–3 KB of claims (xms_*, wids, acrs…); pad with opaque data to that size.
        let mut pad = [0u8; 900];
        rand::rng().fill_bytes(&mut pad);
        claims["xms_sandbox_pad"] = json!(URL_SAFE_NO_PAD.encode(pad));
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = hmac::sign(&self.key, signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_realistic_size_and_validate_until_revoked_or_expired() {
        let store = TokenStore::default();
        let kind = TokenKind::App {
            client_id: "app".into(),
            roles: vec!["IMAP.AccessAsApp".into()],
        };
        let (token, _) = store.mint(
            "tid",
            "https://outlook.office365.com",
            kind.clone(),
            Duration::hours(1),
        );
        assert!((1500..=3072).contains(&token.len()), "{}", token.len());
        assert_eq!(token.matches('.').count(), 2);
        assert!(store.validate(&token).is_ok());
        let mut tampered = token.clone();
        tampered.replace_range(100..101, if &token[100..101] == "A" { "B" } else { "A" });
        assert_eq!(store.validate(&tampered), Err(TokenError::Unknown));
        assert!(store.revoke(&token));
        assert_eq!(store.validate(&token), Err(TokenError::Revoked));
        let (old, _) = store.mint("tid", "aud", kind, Duration::seconds(-5));
        assert_eq!(store.validate(&old), Err(TokenError::Expired));
    }
}
