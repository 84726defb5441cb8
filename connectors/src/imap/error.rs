//! IMAP failures, sorted into classes the engine can act on (metrics, status, retry) and explained in plain words.
//! Tokens never appear here: the server's refusal text is kept, the credentials are not.

use std::fmt;

/// Why the TCP connection to the server could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The host name does not resolve.
    Dns,
    /// Nothing listens on that port (connection refused).
    Refused,
    /// No answer in time (connect, or the greeting after it).
    Timeout,
    /// No route to the network or host.
    Unreachable,
    /// The server closed the connection, or said `BYE`, before it was usable.
    Closed,
    /// Anything else (the detail says what).
    Other,
}

/// What was wrong with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// The certificate chain ends at a CA this client does not trust.
    UnknownIssuer,
    /// The certificate has expired or is not valid yet.
    Expired,
    /// The certificate is not issued for the configured host name / IP address.
    NameMismatch,
    /// Any other certificate problem (revoked, bad signature, wrong purpose…).
    Certificate,
    /// The server does not speak TLS on this port (e.g. a STARTTLS port configured as implicit TLS).
    NotTls,
    /// The server did not accept `STARTTLS`; plaintext is refused.
    StarttlsRefused,
    /// Any other handshake failure (alert from the server, protocol mismatch, connection dropped…).
    Handshake,
    /// The extra CA file (`ca_file`) cannot be read or holds no certificate.
    CaFile,
}

/// An IMAP failure. [`ImapError::class`] names its class for metrics and status; `Display` explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImapError {
    /// The server could not be reached (DNS, refused, unreachable, timeout, closed before the greeting).
    Connect {
        host: String,
        port: u16,
        failure: ConnectFailure,
        detail: String,
    },
    /// TLS could not be established (certificate problems, no TLS, STARTTLS refused, bad CA file).
    Tls {
        host: String,
        problem: TlsProblem,
        detail: String,
    },
    /// The server refused the XOAUTH2 login (`NO` to `AUTHENTICATE`).
    AuthFailed {
        /// The mailbox (login name) that was refused.
        mailbox: String,
        /// The server's text, e.g. `[AUTHENTICATIONFAILED] Authentication failed.` or `AUTHENTICATE failed.`
        server_text: String,
    },
    /// The folder does not exist (or is not accessible) in the mailbox.
    NoSuchFolder { folder: String, server_text: String },
    /// The server answered something this client cannot use (`BAD`, an unexpected `NO`, missing data).
    Protocol { during: String, detail: String },
    /// The connection broke, or the server stopped answering, during a command. The session is unusable.
    Io {
        during: String,
        detail: String,
        timed_out: bool,
    },
}

impl ImapError {
    /// The class: `connect`, `tls`, `auth`, `no_such_folder`, `protocol` or `io`.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::AuthFailed { .. } => "auth",
            Self::NoSuchFolder { .. } => "no_such_folder",
            Self::Protocol { .. } => "protocol",
            Self::Io { .. } => "io",
        }
    }

    /// Whether trying again later (with a fresh connection) may help without anyone changing anything: network
    /// trouble, timeouts, and the server's "temporary authentication failure" (`[UNAVAILABLE]`).
    pub fn is_temporary(&self) -> bool {
        match self {
            Self::Connect { failure, .. } => *failure != ConnectFailure::Dns,
            Self::Io { .. } => true,
            Self::AuthFailed { server_text, .. } => server_text.contains("[UNAVAILABLE]"),
            Self::Tls { .. } | Self::NoSuchFolder { .. } | Self::Protocol { .. } => false,
        }
    }

    pub(crate) fn protocol(during: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Protocol {
            during: during.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(during: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Io {
            during: during.into(),
            detail: detail.into(),
            timed_out: false,
        }
    }

    pub(crate) fn timeout(during: impl Into<String>, after: std::time::Duration) -> Self {
        Self::Io {
            during: during.into(),
            detail: format!("no answer within {}", secs(after)),
            timed_out: true,
        }
    }
}

pub(crate) fn secs(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl fmt::Display for ImapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect {
                host,
                port,
                failure,
                detail,
            } => {
                write!(f, "cannot connect to the IMAP server {host}:{port}: ")?;
                match failure {
                    ConnectFailure::Dns => write!(
                        f,
                        "the host name does not resolve ({detail}); check `imap.host` and DNS"
                    ),
                    ConnectFailure::Refused => write!(
                        f,
                        "the connection was refused ({detail}); check `imap.port` and that the server is running"
                    ),
                    ConnectFailure::Timeout => write!(
                        f,
                        "no answer ({detail}); check the network path and firewalls to it"
                    ),
                    ConnectFailure::Unreachable => write!(
                        f,
                        "the network or host is unreachable ({detail}); check routing and firewalls"
                    ),
                    ConnectFailure::Closed => write!(
                        f,
                        "the server closed the connection before it was usable ({detail})"
                    ),
                    ConnectFailure::Other => f.write_str(detail),
                }
            }
            Self::Tls {
                host,
                problem,
                detail,
            } => match problem {
                TlsProblem::UnknownIssuer => write!(
                    f,
                    "TLS to {host} failed: the server's certificate was issued by a CA this client does not trust \
                     (unknown issuer: {detail}); if the server uses a private CA (like the local sandbox), add the \
                     server's CA via `ca_file`"
                ),
                TlsProblem::Expired => write!(
                    f,
                    "TLS to {host} failed: the server's certificate has expired or is not valid yet ({detail}); \
                     renew it on the server, or check this machine's clock"
                ),
                TlsProblem::NameMismatch => write!(
                    f,
                    "TLS to {host} failed: the server's certificate is not valid for `{host}` ({detail}); set \
                     `imap.host` to a name the certificate was issued for"
                ),
                TlsProblem::Certificate => write!(
                    f,
                    "TLS to {host} failed: the server's certificate was rejected ({detail})"
                ),
                TlsProblem::NotTls => write!(
                    f,
                    "TLS to {host} failed: the server did not answer with TLS ({detail}); if this is a STARTTLS \
                     port (usually 143), set `imap.tls: starttls`, or use the implicit-TLS port (993)"
                ),
                TlsProblem::StarttlsRefused => write!(
                    f,
                    "the IMAP server {host} did not accept STARTTLS ({detail}); refusing to continue in \
                     plaintext; use its implicit-TLS port (993, `imap.tls: implicit`) if it has one"
                ),
                TlsProblem::Handshake => {
                    write!(f, "TLS to {host} failed: the handshake failed ({detail})")
                }
                TlsProblem::CaFile => write!(f, "cannot use the CA file (`ca_file`): {detail}"),
            },
            Self::AuthFailed {
                mailbox,
                server_text,
            } => {
                write!(
                    f,
                    "the IMAP server refused the XOAUTH2 login for {mailbox}: \"{server_text}\"; "
                )?;
                if server_text.contains("[UNAVAILABLE]") {
                    f.write_str(
                        "the server could not check the token just now (temporary); it will be retried",
                    )
                } else {
                    f.write_str(
                        "the access token is expired, revoked, or for another tenant or audience \
                         (https://outlook.office365.com), or it does not grant this mailbox: an app needs the \
                         IMAP.AccessAsApp role and FullAccess on the mailbox (Add-MailboxPermission) through its \
                         Exchange service principal; a user token needs IMAP.AccessAsUser.All and must be for this \
                         mailbox's own user",
                    )
                }
            }
            Self::NoSuchFolder {
                folder,
                server_text,
            } => write!(
                f,
                "the folder \"{folder}\" does not exist in this mailbox or cannot be opened (\"{server_text}\"); \
                 check the folder name in the configuration (folder names are case-sensitive, sub-folders use \
                 the server's separator, e.g. `Inbox/Orders`)"
            ),
            Self::Protocol { during, detail } => {
                write!(
                    f,
                    "IMAP {during}: unexpected answer from the server: {detail}"
                )
            }
            Self::Io {
                during,
                detail,
                timed_out,
            } => {
                if *timed_out {
                    write!(
                        f,
                        "IMAP {during}: the server stopped answering ({detail}); the connection is dropped and \
                         will be re-opened"
                    )
                } else {
                    write!(
                        f,
                        "IMAP {during}: the connection broke ({detail}); it will be re-opened"
                    )
                }
            }
        }
    }
}

impl std::error::Error for ImapError {}
