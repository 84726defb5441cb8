//! Why sending failed: the SMTP reply (code, enhanced status, text) or the transport fault, a classification the
//! engine acts on (retry later, give up, refresh the token, …), and an explanation an operator can act on.

use std::{fmt, io, sync::Arc, time::Duration};

use tokio_rustls::rustls::{self, CertificateError};

use crate::oauth::{AccessToken, OAuthError};

use super::explain::{self, Explanation, ServerContext};

/// A negative SMTP reply, as lettre exposes it: the code, the enhanced status code when the text starts with one,
/// and the text (all lines joined, enhanced code included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// `535`.
    pub code: u16,
    /// `5.7.3`, when the text starts with an enhanced status code (RFC 3463).
    pub enhanced: Option<String>,
    /// `5.7.3 Authentication unsuccessful [SN4PR0501CA0123.outlook.office365.com]`.
    pub text: String,
}

impl SmtpReply {
    /// A reply from its code and text; the enhanced status code is read from the start of the text.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        let text = text.into();
        let enhanced = text
            .split_whitespace()
            .next()
            .filter(|w| is_enhanced_code(w))
            .map(str::to_owned);
        Self {
            code,
            enhanced,
            text,
        }
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// `class.subject.detail`: `2|4|5`, then 1–3 digits, then 1–3 digits.
fn is_enhanced_code(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// How the engine should treat a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmtpErrorKind {
    /// Try again later: 4xx replies, connection faults, timeouts, a TLS handshake cut short.
    Temporary,
    /// Do not retry as is: 5xx replies and configuration problems (certificates, ports, addresses).
    Permanent,
    /// `535 5.7.3` while the access token used was expired or had not been proven yet: fetch a new token and retry
    /// once. [`SmtpSender`](super::SmtpSender) does that retry itself; it returns this kind only when even the new
    /// token had expired when it was used.
    TokenRejected,
    /// No access token could be obtained.
    Token(OAuthError),
    /// The message is larger than `max_email_size_mb`; it was not sent.
    TooLarge { size: usize, limit: usize },
}

/// What exactly failed (the detail behind the [`SmtpErrorKind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SmtpFailure {
    /// The server answered with a negative reply.
    Reply(SmtpReply),
    /// `535` to a token that had expired by the time it was used.
    TokenExpired(SmtpReply),
    /// The token request failed.
    Token(OAuthError),
    /// Refused locally: larger than `max_email_size_mb`.
    TooLarge { size: usize, limit: usize },
    /// TCP connection failed (DNS, refused, unreachable).
    Connect { detail: String },
    /// TLS failed (handshake or certificate), or `ca_file` is unusable.
    Tls { problem: TlsProblem, detail: String },
    /// The connection broke (or the server closed it) in the middle of a session.
    Closed { detail: String },
    /// No answer in time.
    Timeout { after: Duration },
    /// The server does not offer `AUTH XOAUTH2` (after TLS).
    NoXoauth2,
    /// The server does not offer `STARTTLS` (`starttls: true`).
    NoStarttls,
    /// An answer that makes no sense for SMTP.
    Protocol { detail: String },
    /// The configuration or the message's addresses are unusable.
    Config { detail: String },
}

/// What went wrong with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// The certificate chains to a CA that is not trusted (webpki roots + `ca_file`).
    UnknownIssuer,
    /// Expired or not yet valid.
    Expired,
    /// Not valid for the configured host.
    NameMismatch,
    /// Any other certificate problem.
    Certificate,
    /// The server did not speak TLS (implicit TLS to a STARTTLS port).
    NotTls,
    /// No common protocol version or cipher suite, or the server refused the handshake.
    Incompatible,
    /// The connection closed or reset during the handshake (temporary).
    Interrupted,
    /// `ca_file` cannot be read or holds no certificate.
    CaFile,
}

/// A failed send or check. Display: `sending through <host:port> as <username> failed: 535 5.7.3 Authentication
/// unsuccessful […] — <cause>. Fix: <fix>.` Never contains a token or secret.
#[derive(Clone)]
pub struct SmtpError {
    inner: Box<Inner>,
}

#[derive(Clone)]
struct Inner {
    kind: SmtpErrorKind,
    failure: SmtpFailure,
    ctx: Arc<ServerContext>,
    /// The envelope sender of the message, when sending.
    from: Option<String>,
    /// The message size, when sending.
    size: Option<usize>,
}

impl SmtpError {
    pub(crate) fn new(
        kind: SmtpErrorKind,
        failure: SmtpFailure,
        ctx: Arc<ServerContext>,
        from: Option<String>,
        size: Option<usize>,
    ) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                failure,
                ctx,
                from,
                size,
            }),
        }
    }

    pub(crate) fn config(ctx: Arc<ServerContext>, detail: impl Into<String>) -> Self {
        Self::new(
            SmtpErrorKind::Permanent,
            SmtpFailure::Config {
                detail: detail.into(),
            },
            ctx,
            None,
            None,
        )
    }

    pub(crate) fn ca_file(ctx: Arc<ServerContext>, detail: impl Into<String>) -> Self {
        Self::new(
            SmtpErrorKind::Permanent,
            SmtpFailure::Tls {
                problem: TlsProblem::CaFile,
                detail: detail.into(),
            },
            ctx,
            None,
            None,
        )
    }

    pub(crate) fn token(ctx: Arc<ServerContext>, e: OAuthError, from: Option<String>) -> Self {
        Self::new(
            SmtpErrorKind::Token(e.clone()),
            SmtpFailure::Token(e),
            ctx,
            from,
            None,
        )
    }

    pub(crate) fn timeout(ctx: Arc<ServerContext>, after: Duration, from: Option<String>) -> Self {
        Self::new(
            SmtpErrorKind::Temporary,
            SmtpFailure::Timeout { after },
            ctx,
            from,
            None,
        )
    }

    /// How to treat it.
    pub fn kind(&self) -> &SmtpErrorKind {
        &self.inner.kind
    }

    /// What exactly failed.
    pub fn failure(&self) -> &SmtpFailure {
        &self.inner.failure
    }

    /// The server's negative reply, if there was one.
    pub fn reply(&self) -> Option<&SmtpReply> {
        match &self.inner.failure {
            SmtpFailure::Reply(r) | SmtpFailure::TokenExpired(r) => Some(r),
            _ => None,
        }
    }

    /// The SMTP reply code, e.g. 535.
    pub fn code(&self) -> Option<u16> {
        self.reply().map(|r| r.code)
    }

    /// The enhanced status code, e.g. `5.7.3`.
    pub fn enhanced_status(&self) -> Option<&str> {
        self.reply()?.enhanced.as_deref()
    }

    /// The server's reply text, e.g. `5.7.3 Authentication unsuccessful [HOST]`.
    pub fn server_text(&self) -> Option<&str> {
        self.reply().map(|r| r.text.as_str())
    }

    /// The token error, for [`SmtpErrorKind::Token`].
    pub fn oauth(&self) -> Option<&OAuthError> {
        match &self.inner.kind {
            SmtpErrorKind::Token(e) => Some(e),
            _ => None,
        }
    }

    /// `host:port` of the outgoing server.
    pub fn server(&self) -> String {
        self.inner.ctx.address()
    }

    /// The mailbox that authenticates.
    pub fn username(&self) -> &str {
        &self.inner.ctx.username
    }

    /// Worth trying again later as is: [`Temporary`](SmtpErrorKind::Temporary),
    /// [`TokenRejected`](SmtpErrorKind::TokenRejected), and token errors that are transient (network, throttling,
    /// 5xx of the token endpoint).
    pub fn is_temporary(&self) -> bool {
        match &self.inner.kind {
            SmtpErrorKind::Temporary | SmtpErrorKind::TokenRejected => true,
            SmtpErrorKind::Token(e) => e.is_transient(),
            SmtpErrorKind::Permanent | SmtpErrorKind::TooLarge { .. } => false,
        }
    }

    /// The cause in plain words and what to change.
    pub fn explain(&self) -> Explanation {
        explain::failure(
            &self.inner.failure,
            &self.inner.ctx,
            self.inner.from.as_deref(),
            self.inner.size,
        )
    }

    /// The short label after "failed: ".
    fn label(&self) -> String {
        match &self.inner.failure {
            SmtpFailure::Reply(r) | SmtpFailure::TokenExpired(r) => r.to_string(),
            SmtpFailure::Token(_) => "no access token".into(),
            SmtpFailure::TooLarge { .. } => "message too large".into(),
            SmtpFailure::Connect { .. } => "cannot connect".into(),
            SmtpFailure::Tls {
                problem: TlsProblem::CaFile,
                ..
            } => "unusable ca_file".into(),
            SmtpFailure::Tls { .. } => "TLS failure".into(),
            SmtpFailure::Closed { .. } => "connection lost".into(),
            SmtpFailure::Timeout { .. } => "timeout".into(),
            SmtpFailure::NoXoauth2 => "no AUTH XOAUTH2".into(),
            SmtpFailure::NoStarttls => "no STARTTLS".into(),
            SmtpFailure::Protocol { .. } => "protocol error".into(),
            SmtpFailure::Config { .. } => "configuration error".into(),
        }
    }
}

impl fmt::Display for SmtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctx = &self.inner.ctx;
        write!(
            f,
            "sending through {} as {} failed: ",
            ctx.address(),
            ctx.username
        )?;
        if let SmtpFailure::Token(e) = &self.inner.failure {
            // "token request to … failed: AADSTS… — cause. Fix: fix."
            return write!(f, "no access token: {e}");
        }
        let Explanation { cause, fix } = self.explain();
        write!(f, "{} — {cause}. Fix: {fix}.", self.label())
    }
}

impl fmt::Debug for SmtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpError")
            .field("server", &self.inner.ctx.address())
            .field("username", &self.inner.ctx.username)
            .field("kind", &self.inner.kind)
            .field("failure", &self.inner.failure)
            .finish()
    }
}

impl std::error::Error for SmtpError {}

/// Classifies a lettre error. `token` is the access token the attempt used; `first_attempt` is whether that token
/// had not been through a rejection-and-retry in this call (a `535 5.7.3` to such a token is worth one retry).
pub(crate) fn from_lettre(
    e: &lettre::transport::smtp::Error,
    token: &AccessToken,
    first_attempt: bool,
) -> (SmtpErrorKind, SmtpFailure) {
    use SmtpErrorKind::{Permanent, Temporary, TokenRejected};

    let detail = source_text(e);
    if let Some(code) = e.status() {
        let reply = SmtpReply::new(u16::from(code), detail);
        let token_refused = reply.code == 535 && reply.enhanced.as_deref() != Some("5.7.139");
        if token_refused && token.is_expired() {
            return (TokenRejected, SmtpFailure::TokenExpired(reply));
        }
        if token_refused && first_attempt {
            return (TokenRejected, SmtpFailure::Reply(reply));
        }
        let kind = if reply.code < 500 {
            Temporary
        } else {
            Permanent
        };
        return (kind, SmtpFailure::Reply(reply));
    }
    if e.is_timeout() {
        return (
            Temporary,
            SmtpFailure::Closed {
                detail: format!("timed out: {detail}"),
            },
        );
    }
    if e.is_client() {
        let lower = detail.to_ascii_lowercase();
        if lower.contains("does not expect a challenge") {
            // The server answered XOAUTH2 with a `334 <error JSON>` challenge (Gmail style): a refused token.
            let reply = SmtpReply::new(
                535,
                "the server refused the XOAUTH2 token with an error challenge",
            );
            let kind = if first_attempt || token.is_expired() {
                TokenRejected
            } else {
                Permanent
            };
            return (kind, SmtpFailure::Reply(reply));
        }
        if lower.contains("no compatible authentication mechanism") {
            return (Permanent, SmtpFailure::NoXoauth2);
        }
        if lower.contains("starttls is not supported") {
            return (Permanent, SmtpFailure::NoStarttls);
        }
        return (Permanent, SmtpFailure::Protocol { detail });
    }
    if e.is_transport_shutdown() {
        return (
            Temporary,
            SmtpFailure::Closed {
                detail: "the connection pool was shut down".into(),
            },
        );
    }
    if e.is_response() {
        // "incomplete response": the server closed the connection instead of answering.
        return if detail.contains("incomplete response") {
            (
                Temporary,
                SmtpFailure::Closed {
                    detail: "the server closed the connection without answering".into(),
                },
            )
        } else {
            (Temporary, SmtpFailure::Protocol { detail })
        };
    }
    if e.is_tls() {
        return (
            Permanent,
            SmtpFailure::Tls {
                problem: TlsProblem::Certificate,
                detail,
            },
        );
    }
    // Connection (connect, implicit TLS, STARTTLS upgrade) or network (read/write mid-session).
    let during_connect = e.to_string().starts_with("Connection error");
    let io = io_error(e);
    if let Some(io) = io {
        if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return tls_failure(tls);
        }
        let failure = match io.kind() {
            // lettre reports TLS handshakes (implicit TLS and the STARTTLS upgrade) as connection errors; the
            // greeting and later replies are network errors.
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset if during_connect => {
                SmtpFailure::Tls {
                    problem: TlsProblem::Interrupted,
                    detail: io.to_string(),
                }
            }
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable => SmtpFailure::Connect {
                detail: io.to_string(),
            },
            io::ErrorKind::TimedOut => SmtpFailure::Connect {
                detail: io.to_string(),
            },
            _ if during_connect => SmtpFailure::Connect {
                detail: io.to_string(),
            },
            _ => SmtpFailure::Closed {
                detail: io.to_string(),
            },
        };
        return (Temporary, failure);
    }
    let failure = if during_connect {
        SmtpFailure::Connect { detail }
    } else {
        SmtpFailure::Closed { detail }
    };
    (Temporary, failure)
}

fn tls_failure(e: &rustls::Error) -> (SmtpErrorKind, SmtpFailure) {
    let detail = e.to_string();
    let problem = match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => TlsProblem::UnknownIssuer,
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsProblem::Expired,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsProblem::NameMismatch
            }
            _ => TlsProblem::Certificate,
        },
        rustls::Error::InvalidMessage(_) => TlsProblem::NotTls,
        rustls::Error::PeerIncompatible(_) | rustls::Error::AlertReceived(_) => {
            TlsProblem::Incompatible
        }
        _ => TlsProblem::Interrupted,
    };
    let kind = if problem == TlsProblem::Interrupted {
        SmtpErrorKind::Temporary
    } else {
        SmtpErrorKind::Permanent
    };
    (kind, SmtpFailure::Tls { problem, detail })
}

/// The text lettre keeps behind an error (the server's reply text for 4xx/5xx).
fn source_text(e: &lettre::transport::smtp::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}

/// The I/O error somewhere behind a lettre error (connection and network faults).
fn io_error(e: &lettre::transport::smtp::Error) -> Option<&io::Error> {
    use std::error::Error as _;
    std::iter::successors(e.source(), |&s| s.source()).find_map(|s| s.downcast_ref::<io::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes() {
        let r = SmtpReply::new(535, "5.7.3 Authentication unsuccessful [HOST]");
        assert_eq!(r.enhanced.as_deref(), Some("5.7.3"));
        assert_eq!(
            r.to_string(),
            "535 5.7.3 Authentication unsuccessful [HOST]"
        );
        assert_eq!(
            SmtpReply::new(554, "5.2.252 SendAsDenied; x")
                .enhanced
                .as_deref(),
            Some("5.2.252")
        );
        assert_eq!(SmtpReply::new(421, "Service not available").enhanced, None);
        assert_eq!(
            SmtpReply::new(250, "2.6.0 <id> Queued").enhanced.as_deref(),
            Some("2.6.0")
        );
        assert!(!is_enhanced_code("5.7"));
        assert!(!is_enhanced_code("3.1.1"));
        assert!(!is_enhanced_code("5.7.1234"));
    }
}
