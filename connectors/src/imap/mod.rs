//! IMAP to Microsoft 365 (and any IMAP server with SASL XOAUTH2): connect with implicit TLS or STARTTLS, log in
//! with an OAuth2 access token, and drive one mailbox folder with a thin, typed layer (select, fetch by UID, mark
//! seen, move, delete, IDLE).
//!
//! ```no_run
//! # async fn demo(endpoint: &mailqueue_config::model::ImapEndpoint, token: &str) -> Result<(), mailqueue_connectors::imap::ImapError> {
//! use mailqueue_connectors::imap::{self, ImapTls};
//! let tls = ImapTls::new(None)?;
//! let client = imap::connect(endpoint, &tls).await?;
//! let mut session = imap::authenticate_xoauth2(client, "support@contoso.com", token).await?;
//! let folder = session.select("INBOX").await?;
//! let new = session.fetch_sizes(0).await?;
//! let uids: Vec<u32> = new.iter().map(|(uid, _)| *uid).collect();
//! for mail in session.fetch_bodies(&uids).await? { /* store mail.raw */ }
//! session.mark_seen(&uids).await?;
//! session.logout().await?;
//! # let _ = folder; Ok(()) }
//! ```
//!
//! Errors are [`ImapError`]s with a [class](ImapError::class); access tokens never appear in errors or logs.

mod connect;
mod error;
mod session;
mod wire;

use std::time::Instant;

use tokio::time::timeout;
use tracing::Instrument as _;

pub use connect::{Client, ImapTls, connect};
pub use error::{ConnectFailure, ImapError, TlsProblem};
pub use session::{FetchedHeader, FetchedMail, FolderState, IdleOutcome, MailboxSession};
pub use wire::{encode_folder, uid_set};

/// SASL XOAUTH2: `user=<mailbox>^Aauth=Bearer <token>^A^A` first; an empty response to any further challenge
/// (Dovecot and Gmail send their JSON error as a challenge and wait for it before the tagged `NO`).
struct XOAuth2<'a> {
    user: &'a str,
    token: &'a str,
    sent: bool,
}

impl async_imap::Authenticator for XOAuth2<'_> {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        if self.sent {
            return Vec::new();
        }
        self.sent = true;
        format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token).into_bytes()
    }
}

/// Logs in to `user`'s mailbox with an OAuth2 access token (SASL XOAUTH2), then reads the capabilities.
///
/// A refusal, whether answered at once (`NO AUTHENTICATE failed.`, Exchange) or after an error challenge
/// (`+ <base64 JSON>`, answered with an empty line, then `NO [AUTHENTICATIONFAILED]`, Dovecot), is
/// [`ImapError::AuthFailed`]. The whole exchange has the client's handshake timeout. The token is never logged
/// nor put in an error.
pub async fn authenticate_xoauth2(
    client: Client,
    user: &str,
    token: &str,
) -> Result<MailboxSession, ImapError> {
    let span = tracing::info_span!(
        "imap",
        mailbox = %user,
        host = %client.host,
        folder = tracing::field::Empty
    );
    login(client, user, token, span.clone())
        .instrument(span)
        .await
}

async fn login(
    client: Client,
    user: &str,
    token: &str,
    span: tracing::Span,
) -> Result<MailboxSession, ImapError> {
    let during = "AUTHENTICATE XOAUTH2";
    if user.is_empty() || user.contains(|c: char| c.is_control()) {
        return Err(ImapError::protocol(
            during,
            "the mailbox login name is empty or contains control characters",
        ));
    }
    if token.is_empty() || token.contains(|c: char| c.is_control() || c == ' ') {
        return Err(ImapError::protocol(
            during,
            "the access token is empty or not a bearer token (contains spaces or control characters)",
        ));
    }
    let Client {
        inner,
        host,
        handshake_timeout: limit,
        ..
    } = client;
    let started = Instant::now();
    let auth = XOAuth2 {
        user,
        token,
        sent: false,
    };
    let session = match timeout(limit, inner.authenticate("XOAUTH2", auth)).await {
        Err(_) => return Err(ImapError::timeout(during, limit)),
        Ok(Ok(session)) => session,
        Ok(Err((e, _client))) => {
            use async_imap::error::Error;
            let text = wire::async_imap_text(&e);
            let error = match e {
                Error::No(_) => ImapError::AuthFailed {
                    mailbox: user.to_owned(),
                    server_text: text,
                },
                Error::Bad(_) | Error::Parse(_) | Error::Validate(_) => {
                    ImapError::protocol(during, text)
                }
                _ => ImapError::io(during, text),
            };
            tracing::warn!(class = error.class(), server_text = %wire::clip(&error.to_string()), "IMAP login failed");
            return Err(error);
        }
    };
    let mut session = MailboxSession::new(session, user, &host, span);
    session.refresh_capabilities().await?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        idle = session.supports_idle(),
        r#move = session.supports_move(),
        uidplus = session.supports_uidplus(),
        "IMAP login"
    );
    Ok(session)
}
