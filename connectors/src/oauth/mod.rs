//! OAuth2 access tokens from the Microsoft identity platform (Entra ID) for IMAP and SMTP XOAUTH2.
//!
//! ```no_run
//! # async fn demo(server: &mailqueue_config::IncomingServer, address: &mailqueue_config::Address) {
//! use mailqueue_connectors::oauth::{TokenCache, TokenRequest};
//! let cache = TokenCache::new();
//! let request = TokenRequest::for_mailbox(server, address).expect("config");
//! match cache.token(&request).await {
//!     Ok(token) => { /* XOAUTH2 with token.secret() */ }
//!     Err(e) => eprintln!("{e}"), // "token request to … failed: AADSTS7000215 invalid_client — …. Fix: …."
//! }
//! # }
//! ```

mod cache;
mod client;
mod endpoint;
mod error;
mod request;
mod retry;
mod token;

pub use crate::explain::Explanation;
pub use cache::{Attempt, CacheStats, TokenCache, TokenCacheBuilder, WithTokenError};
pub use endpoint::{TOKEN_PATH, TokenEndpoint};
pub use error::{MicrosoftError, OAuthConfigError, OAuthError, OAuthErrorKind, excerpt};
pub use request::{
    Credentials, Grant, IMAP_SERVICE_SCOPE, IMAP_USER_SCOPE, SMTP_SERVICE_SCOPE, SMTP_USER_SCOPE,
    SecretString, TokenKey, TokenRequest,
};
pub use retry::RetryPolicy;
pub use token::{AccessToken, refresh_margin};
