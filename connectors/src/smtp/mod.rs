//! SMTP submission to Microsoft 365 exactly like the Genesys custom SMTP integration: `smtp.office365.com:587`,
//! STARTTLS (or implicit TLS on 465), SASL XOAUTH2 with an access token for `https://outlook.office.com/.default`
//! (client credentials) and the configured `username` as the authenticating mailbox.
//!
//! ```no_run
//! # async fn demo(server: &mailqueue_config::model::OutgoingServer, raw: &[u8]) {
//! use mailqueue_config::model::EmailAddress;
//! use mailqueue_connectors::{oauth::TokenCache, smtp::{Envelope, SmtpSender}};
//! let sender = SmtpSender::new(server, TokenCache::new()).expect("config");
//! let envelope = Envelope::new(
//!     EmailAddress::parse("support@contoso.com").unwrap(),
//!     vec![EmailAddress::parse("customer@example.com").unwrap()],
//! );
//! match sender.send(&envelope, raw).await {
//!     Ok(accepted) => println!("{}", accepted.reply), // "250 2.6.0 <…> [InternalId=…] Queued mail for delivery"
//!     Err(e) if e.is_temporary() => { /* retry later */ }
//!     Err(e) => eprintln!("{e}"), // "sending through … as … failed: 535 5.7.3 … — cause. Fix: …."
//! }
//! # }
//! ```
//!
//! * One lettre transport with a connection pool is kept together with the access token it was built with; when the
//!   [`TokenCache`] hands out a different (renewed) token, a new transport is built and the old one (and its pooled
//!   connections) is dropped once no send uses it any more.
//! * A `535 5.7.3` is retried once with a newly fetched token ([`SmtpErrorKind::TokenRejected`]); a second refusal
//!   is a permission problem and is returned as [`SmtpErrorKind::Permanent`] with Microsoft's checklist.
//! * Messages are sent as they are (byte-exact): only bare LF line ends become CRLF, as SMTP requires.
//! * Access tokens never appear in errors or logs (lettre's own wire-level `tracing` is not enabled for that reason:
//!   it logs the `AUTH XOAUTH2` line).

mod error;
pub mod explain;

use std::{
    borrow::Cow,
    path::Path,
    str::FromStr as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use lettre::{
    AsyncTransport as _, Tokio1Executor,
    transport::smtp::{
        AsyncSmtpTransport, PoolConfig,
        authentication::{Credentials, Mechanism},
        client::{AsyncSmtpConnection, Certificate, CertificateStore, Tls, TlsParameters},
        extension::ClientId,
        response::Response,
    },
};
use mailqueue_config::model::{EmailAddress, OutgoingServer};
use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject as _};
use tracing::Instrument as _;

pub use crate::explain::Explanation;
use crate::oauth::{AccessToken, TokenCache, TokenRequest};
pub use error::{SmtpError, SmtpErrorKind, SmtpFailure, SmtpReply, TlsProblem};
pub use explain::ServerContext;

/// The envelope of a message: `MAIL FROM` and `RCPT TO` (the headers of the raw message are not looked at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from: EmailAddress,
    pub to: Vec<EmailAddress>,
}

impl Envelope {
    pub fn new(from: EmailAddress, to: Vec<EmailAddress>) -> Self {
        Self { from, to }
    }
}

/// A message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The server's final reply, e.g. `250 2.6.0 <id@host> [InternalId=…, Hostname=…] Queued mail for delivery`.
    pub reply: String,
    /// When the reply arrived.
    pub at: DateTime<Utc>,
}

impl Accepted {
    /// The id in angle brackets of Exchange's `250 2.6.0 <…>` reply (the message's Message-ID, or the one the server
    /// assigned), if there is one.
    pub fn queued_id(&self) -> Option<&str> {
        let start = self.reply.find('<')? + 1;
        let end = start + self.reply[start..].find('>')?;
        Some(&self.reply[start..end])
    }
}

/// Timeouts and pool sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderOptions {
    /// Time for one whole send or check (connect, TLS, AUTH, the message, the reply). Default 2 minutes.
    pub timeout: Duration,
    /// Time to establish the TCP connection. Default 30 s.
    pub connect_timeout: Duration,
    /// Idle connections kept for reuse. Default 4.
    pub pool_max_idle: u32,
    /// An idle connection is closed after this. Default 60 s.
    pub pool_idle_timeout: Duration,
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(30),
            pool_max_idle: 4,
            pool_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Sends messages through the outgoing server. Cheap to clone; clones share the transport, its connection pool
/// and the token cache. Drop it inside a Tokio runtime (lettre's pool spawns its clean-up).
#[derive(Clone)]
pub struct SmtpSender {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<ServerContext>,
    request: TokenRequest,
    cache: TokenCache,
    tls: TlsParameters,
    options: SenderOptions,
    max_bytes: usize,
    current: Mutex<Option<Current>>,
    builds: AtomicU64,
}

/// The transport in use and the token it authenticates with.
#[derive(Clone)]
struct Current {
    token: AccessToken,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    generation: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // lettre's pool spawns a task when dropped; outside a runtime that would panic, so leak it instead (the
        // process or runtime is going away anyway).
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if tokio::runtime::Handle::try_current().is_err() {
            std::mem::forget(current);
        }
    }
}

impl std::fmt::Debug for SmtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSender")
            .field("server", &self.inner.ctx.address())
            .field("username", &self.inner.ctx.username)
            .field("transports_built", &self.transports_built())
            .finish_non_exhaustive()
    }
}

impl SmtpSender {
    /// A sender for `server` with default [`SenderOptions`], taking tokens from `cache`. Fails on configuration
    /// errors (missing client secret or password, unreadable `ca_file`); it does not connect.
    pub fn new(server: &OutgoingServer, cache: TokenCache) -> Result<Self, SmtpError> {
        Self::with_options(server, cache, SenderOptions::default())
    }

    pub fn with_options(
        server: &OutgoingServer,
        cache: TokenCache,
        options: SenderOptions,
    ) -> Result<Self, SmtpError> {
        let ctx = Arc::new(ServerContext::from_config(server));
        let request = TokenRequest::for_outgoing(server)
            .map_err(|e| SmtpError::config(ctx.clone(), e.to_string()))?;
        let host = tls_host(&ctx.host);
        if host.is_empty() {
            return Err(SmtpError::config(
                ctx,
                "the outgoing server's `host` is empty",
            ));
        }
        let tls = tls_parameters(host, server.ca_file.as_deref(), &ctx)?;
        let max_bytes = usize::try_from(server.max_email_size_mb)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024 * 1024);
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                request,
                cache,
                tls,
                options,
                max_bytes,
                current: Mutex::new(None),
                builds: AtomicU64::new(0),
            }),
        })
    }

    /// What errors and explanations name about the server.
    pub fn context(&self) -> &ServerContext {
        &self.inner.ctx
    }

    /// The largest message [`send`](Self::send) accepts, in bytes (`max_email_size_mb` MiB).
    pub fn max_bytes(&self) -> usize {
        self.inner.max_bytes
    }

    /// How many lettre transports were built so far (one per access token in use; also after a timeout).
    pub fn transports_built(&self) -> u64 {
        self.inner.builds.load(Ordering::Relaxed)
    }

    /// Sends `raw` (a complete RFC 5322 message, CRLF line ends) to `envelope.to` with `envelope.from` as the
    /// envelope sender. A message larger than `max_email_size_mb` is refused before connecting
    /// ([`SmtpErrorKind::TooLarge`]).
    pub async fn send(&self, envelope: &Envelope, raw: &[u8]) -> Result<Accepted, SmtpError> {
        let span = tracing::info_span!(
            "smtp_send",
            host = %self.inner.ctx.address(),
            username = %self.inner.ctx.username,
            size = raw.len(),
        );
        let result = self
            .send_inner(envelope, raw)
            .instrument(span.clone())
            .await;
        span.in_scope(|| match &result {
            Ok(accepted) => {
                tracing::info!(reply = %accepted.reply, rcpts = envelope.to.len(), "message accepted")
            }
            Err(e) => tracing::warn!(error = %e, "sending failed"),
        });
        result
    }

    async fn send_inner(&self, envelope: &Envelope, raw: &[u8]) -> Result<Accepted, SmtpError> {
        let inner = &*self.inner;
        let from = Some(envelope.from.as_str().to_owned());
        let fail = |kind, failure| {
            SmtpError::new(
                kind,
                failure,
                inner.ctx.clone(),
                from.clone(),
                Some(raw.len()),
            )
        };
        if raw.len() > inner.max_bytes {
            return Err(fail(
                SmtpErrorKind::TooLarge {
                    size: raw.len(),
                    limit: inner.max_bytes,
                },
                SmtpFailure::TooLarge {
                    size: raw.len(),
                    limit: inner.max_bytes,
                },
            ));
        }
        let lettre_envelope = lettre_envelope(envelope)
            .map_err(|detail| fail(SmtpErrorKind::Permanent, SmtpFailure::Config { detail }))?;
        let data = smtp_data(raw);
        let (data, lettre_envelope, fail, from) = (&data, &lettre_envelope, &fail, &from);
        self.with_token(from.clone(), |current, first| async move {
            let sent = tokio::time::timeout(
                inner.options.timeout,
                current.transport.send_raw(lettre_envelope, data),
            )
            .await;
            match sent {
                Ok(Ok(response)) => Ok(Accepted {
                    reply: reply_text(&response),
                    at: Utc::now(),
                }),
                Ok(Err(e)) => {
                    let (kind, failure) = error::from_lettre(&e, &current.token, first);
                    Err(fail(kind, failure))
                }
                Err(_) => {
                    self.discard(&current);
                    Err(SmtpError::timeout(
                        inner.ctx.clone(),
                        inner.options.timeout,
                        from.clone(),
                    ))
                }
            }
        })
        .await
    }

    /// Connects, secures the connection (STARTTLS or implicit TLS), authenticates with XOAUTH2 and says QUIT, on a
    /// connection of its own (not the pool's). For `mailqueue doctor`.
    pub async fn check(&self) -> Result<(), SmtpError> {
        let span = tracing::info_span!(
            "smtp_check",
            host = %self.inner.ctx.address(),
            username = %self.inner.ctx.username,
        );
        let result = self
            .with_token(None, |current, first| async move {
                let inner = &*self.inner;
                match tokio::time::timeout(inner.options.timeout, self.check_once(&current.token))
                    .await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        let (kind, failure) = error::from_lettre(&e, &current.token, first);
                        Err(SmtpError::new(kind, failure, inner.ctx.clone(), None, None))
                    }
                    Err(_) => Err(SmtpError::timeout(
                        inner.ctx.clone(),
                        inner.options.timeout,
                        None,
                    )),
                }
            })
            .instrument(span.clone())
            .await;
        span.in_scope(|| match &result {
            Ok(()) => tracing::info!("SMTP check passed"),
            Err(e) => tracing::warn!(error = %e, "SMTP check failed"),
        });
        result
    }

    async fn check_once(&self, token: &AccessToken) -> Result<(), lettre::transport::smtp::Error> {
        let inner = &*self.inner;
        let hello = ClientId::default();
        let wrapper = (!inner.ctx.starttls).then(|| inner.tls.clone());
        let mut conn = AsyncSmtpConnection::connect_tokio1(
            (tls_host(&inner.ctx.host), inner.ctx.port),
            Some(inner.options.connect_timeout),
            &hello,
            wrapper,
            None,
        )
        .await?;
        if inner.ctx.starttls {
            conn.starttls(inner.tls.clone(), &hello).await?;
        }
        let credentials = Credentials::new(inner.ctx.username.clone(), token.secret().to_owned());
        if let Err(e) = conn.auth(&[Mechanism::Xoauth2], &credentials).await {
            conn.abort().await;
            return Err(e);
        }
        conn.quit().await?;
        Ok(())
    }

    /// Runs `op` with the transport for the current token; on [`SmtpErrorKind::TokenRejected`] from the first try,
    /// drops the token from the cache and runs `op` once more with a new one (and a new transport).
    async fn with_token<T, F, Fut>(&self, from: Option<String>, mut op: F) -> Result<T, SmtpError>
    where
        F: FnMut(Current, bool) -> Fut,
        Fut: Future<Output = Result<T, SmtpError>>,
    {
        let inner = &*self.inner;
        let mut first = true;
        loop {
            let token = inner
                .cache
                .token(&inner.request)
                .await
                .map_err(|e| SmtpError::token(inner.ctx.clone(), e, from.clone()))?;
            let current = self.transport_for(&token);
            // The transport may carry a newer token than the one just handed out: that is the one refused.
            let used = current.token.clone();
            match op(current, first).await {
                Err(e) if first && *e.kind() == SmtpErrorKind::TokenRejected => {
                    tracing::info!(
                        reply = e.reply().map(|r| r.to_string()).unwrap_or_default(),
                        "the server refused the access token; retrying once with a new one"
                    );
                    inner.cache.invalidate(&inner.request, &used);
                    first = false;
                }
                result => return result,
            }
        }
    }

    /// The transport for `token`: the current one if it was built with this token (or with a newer one), else a
    /// new one that replaces it.
    fn transport_for(&self, token: &AccessToken) -> Current {
        let inner = &*self.inner;
        let mut current = inner.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = current.as_ref()
            && (c.token.same_as(token) || c.token.expires_at() > token.expires_at())
        {
            return c.clone();
        }
        let generation = inner.builds.fetch_add(1, Ordering::Relaxed) + 1;
        let transport = self.build_transport(token);
        tracing::debug!(
            generation,
            token_expires_at = %token.expires_at(),
            "SMTP transport built for a new access token"
        );
        let built = Current {
            token: token.clone(),
            transport,
            generation,
        };
        // The old transport's pool closes its connections once the last send using it ends.
        *current = Some(built.clone());
        built
    }

    /// Forgets `used` (after a timeout its pooled connection may be mid-command); the next send builds a new
    /// transport.
    fn discard(&self, used: &Current) {
        let mut current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current
            .as_ref()
            .is_some_and(|c| c.generation == used.generation)
        {
            *current = None;
        }
    }

    fn build_transport(&self, token: &AccessToken) -> AsyncSmtpTransport<Tokio1Executor> {
        let inner = &*self.inner;
        let tls = if inner.ctx.starttls {
            Tls::Required(inner.tls.clone())
        } else {
            Tls::Wrapper(inner.tls.clone())
        };
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(tls_host(&inner.ctx.host))
            .port(inner.ctx.port)
            .tls(tls)
            .credentials(Credentials::new(
                inner.ctx.username.clone(),
                token.secret().to_owned(),
            ))
            .authentication(vec![Mechanism::Xoauth2])
            .timeout(Some(inner.options.connect_timeout))
            .pool_config(
                PoolConfig::new()
                    .max_size(inner.options.pool_max_idle)
                    .idle_timeout(inner.options.pool_idle_timeout),
            )
            .build()
    }
}

/// The host without IPv6 brackets.
fn tls_host(host: &str) -> &str {
    let host = host.trim();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// webpki roots plus every certificate of `ca_file`.
fn tls_parameters(
    host: &str,
    ca_file: Option<&Path>,
    ctx: &Arc<ServerContext>,
) -> Result<TlsParameters, SmtpError> {
    let mut builder =
        TlsParameters::builder(host.to_owned()).certificate_store(CertificateStore::WebpkiRoots);
    if let Some(path) = ca_file {
        let ca_error = |detail: String| SmtpError::ca_file(ctx.clone(), detail);
        let pem = std::fs::read(path).map_err(|e| ca_error(format!("{}: {e}", path.display())))?;
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ca_error(format!("{}: {e}", path.display())))?;
            let cert = Certificate::from_der(cert.to_vec())
                .map_err(|e| ca_error(format!("{}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
            count += 1;
        }
        if count == 0 {
            return Err(ca_error(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
    }
    builder.build().map_err(|e| {
        SmtpError::ca_file(
            ctx.clone(),
            format!("the TLS settings cannot be built: {e}"),
        )
    })
}

fn lettre_envelope(envelope: &Envelope) -> Result<lettre::address::Envelope, String> {
    let address = |a: &EmailAddress| {
        lettre::Address::from_str(a.as_str())
            .map_err(|e| format!("`{a}` cannot be used as an SMTP address ({e})"))
    };
    let from = address(&envelope.from)?;
    let to = envelope
        .to
        .iter()
        .map(address)
        .collect::<Result<Vec<_>, _>>()?;
    if to.is_empty() {
        return Err("the message has no recipients".into());
    }
    lettre::address::Envelope::new(Some(from), to).map_err(|e| format!("invalid envelope: {e}"))
}

/// The bytes to hand to lettre so that the server stores exactly `raw`: bare LF becomes CRLF (SMTP needs CRLF, and a
/// bare LF before a `.` could end the data early on lenient servers), and one final CRLF is removed because lettre
/// always ends the data with `CRLF . CRLF` (the server keeps that CRLF as the message's last line end).
fn smtp_data(raw: &[u8]) -> Cow<'_, [u8]> {
    let bare_lf = raw
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || raw[i - 1] != b'\r'));
    let mut data = if bare_lf {
        let mut out = Vec::with_capacity(raw.len() + raw.len() / 32);
        for (i, b) in raw.iter().enumerate() {
            if *b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(*b);
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(raw)
    };
    if data.ends_with(b"\r\n") {
        match &mut data {
            Cow::Borrowed(b) => *b = &b[..b.len() - 2],
            Cow::Owned(v) => v.truncate(v.len() - 2),
        }
    }
    data
}

/// `250 2.6.0 <…> Queued mail for delivery`.
fn reply_text(response: &Response) -> String {
    let code = u16::from(response.code());
    let text: Vec<&str> = response.message().collect();
    if text.is_empty() {
        code.to_string()
    } else {
        format!("{code} {}", text.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_prepared_for_lettre() {
        assert_eq!(&*smtp_data(b"a\r\nb\r\n"), b"a\r\nb");
        assert!(matches!(smtp_data(b"a\r\nb\r\n"), Cow::Borrowed(_)));
        assert_eq!(&*smtp_data(b"a\r\nb"), b"a\r\nb");
        assert_eq!(&*smtp_data(b"a\nb\n"), b"a\r\nb");
        assert_eq!(&*smtp_data(b"\n.\n"), b"\r\n.");
        assert_eq!(&*smtp_data(b""), b"");
        assert_eq!(&*smtp_data(b"\r\n"), b"");
    }

    #[test]
    fn queued_id() {
        let a = Accepted {
            reply: "250 2.6.0 <abc@host> [InternalId=1, Hostname=h] Queued mail for delivery"
                .into(),
            at: Utc::now(),
        };
        assert_eq!(a.queued_id(), Some("abc@host"));
        let b = Accepted {
            reply: "250 OK".into(),
            at: Utc::now(),
        };
        assert_eq!(b.queued_id(), None);
    }

    #[test]
    fn hosts() {
        assert_eq!(tls_host(" [::1] "), "::1");
        assert_eq!(tls_host("smtp.office365.com"), "smtp.office365.com");
    }
}
