//! Token endpoint failures: Microsoft's diagnostics kept whole, explained in plain words, secrets never shown.

use std::{fmt, time::Duration};

use serde::Deserialize;

use crate::explain::{self, Explanation, Transport};

use super::Grant;

/// A configuration that cannot make a token request (no endpoint, no secret, bad URL…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfigError {
    message: String,
}

impl OAuthConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// Prefixes what the message is about: "incoming server `m365` needs …".
    pub(crate) fn context(self, what: impl fmt::Display) -> Self {
        Self::new(format!("{what} {}", self.message))
    }
}

impl fmt::Display for OAuthConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OAuthConfigError {}

/// The JSON error body of the Microsoft identity platform, every field kept.
///
/// `{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. …\r\nTrace ID: …",
/// "error_codes":[7000215],"timestamp":"…","trace_id":"…","correlation_id":"…","error_uri":"…"}`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MicrosoftError {
    /// OAuth 2.0 error code, e.g. `invalid_client`, `invalid_grant`.
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub error_codes: Vec<u32>,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub error_uri: Option<String>,
    /// e.g. `basic_action` (MFA), `consent_required`.
    #[serde(default)]
    pub suberror: Option<String>,
}

impl MicrosoftError {
    /// Parses an error body; `None` if it is not Microsoft's (or any OAuth 2.0) JSON error. Known secrets found in
    /// it are replaced by `***`.
    pub fn parse(body: &[u8], secrets: &[&str]) -> Option<Self> {
        let mut e: MicrosoftError = serde_json::from_slice(body).ok()?;
        if e.error.trim().is_empty() {
            return None;
        }
        for field in [
            Some(&mut e.error),
            e.error_description.as_mut(),
            e.timestamp.as_mut(),
            e.trace_id.as_mut(),
            e.correlation_id.as_mut(),
            e.error_uri.as_mut(),
            e.suberror.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *field = scrub(field, secrets);
        }
        Some(e)
    }

    /// The AADSTS number: the first of `error_codes`, else the one `error_description` starts with.
    pub fn aadsts(&self) -> Option<u32> {
        self.error_codes.first().copied().or_else(|| {
            let d = self.error_description.as_deref()?.trim_start();
            let digits: String = d
                .strip_prefix("AADSTS")?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
    }

    /// Microsoft's message without the `AADSTS…: ` prefix and the trailing `Trace ID … Correlation ID …` lines.
    pub fn message(&self) -> Option<String> {
        let d = self.error_description.as_deref()?;
        let first = d.lines().next().unwrap_or_default().trim();
        let first = match first.split_once(": ") {
            Some((code, rest)) if code.starts_with("AADSTS") => rest,
            _ => first,
        };
        let first = first.trim().trim_end_matches('.');
        (!first.is_empty()).then(|| first.to_owned())
    }
}

/// What went wrong with a token request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OAuthErrorKind {
    /// No connection (DNS, refused, reset, proxy) after the retries.
    Unreachable { detail: String },
    /// TLS handshake or certificate failure.
    Tls { detail: String },
    /// No answer in time, after the retries.
    Timeout,
    /// An HTTP error with Microsoft's JSON body (a refusal, or a server error that outlasted the retries).
    Http { status: u16, body: MicrosoftError },
    /// An answer that is neither a token nor Microsoft's error JSON: a short excerpt, secrets removed.
    Unparsable { status: u16, excerpt: String },
    /// Still throttled (HTTP 429) after the retries, or asked to wait longer than the retry budget.
    Throttled {
        status: u16,
        retry_after: Option<Duration>,
        body: Option<MicrosoftError>,
    },
}

/// A failed token request. Display: `token request to <host> failed: AADSTS7000215 invalid_client — <cause>.
/// Fix: <fix>. (trace_id …, correlation_id …)`. Never contains a secret, password or token.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthError {
    inner: Box<Inner>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inner {
    host: String,
    client_id: String,
    grant: Grant,
    attempts: u32,
    kind: OAuthErrorKind,
}

impl OAuthError {
    pub fn new(
        host: impl Into<String>,
        client_id: impl Into<String>,
        grant: Grant,
        attempts: u32,
        kind: OAuthErrorKind,
    ) -> Self {
        Self {
            inner: Box::new(Inner {
                host: host.into(),
                client_id: client_id.into(),
                grant,
                attempts,
                kind,
            }),
        }
    }

    pub fn kind(&self) -> &OAuthErrorKind {
        &self.inner.kind
    }

    /// The token endpoint's host (and port when given).
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The grant of the failed request.
    pub fn grant(&self) -> Grant {
        self.inner.grant
    }

    /// How many HTTP requests were made (1 when not retried).
    pub fn attempts(&self) -> u32 {
        self.inner.attempts
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match &self.inner.kind {
            OAuthErrorKind::Http { status, .. }
            | OAuthErrorKind::Unparsable { status, .. }
            | OAuthErrorKind::Throttled { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Microsoft's error body, when there was one.
    pub fn microsoft(&self) -> Option<&MicrosoftError> {
        match &self.inner.kind {
            OAuthErrorKind::Http { body, .. } => Some(body),
            OAuthErrorKind::Throttled { body, .. } => body.as_ref(),
            _ => None,
        }
    }

    /// The AADSTS code, e.g. 7000215.
    pub fn aadsts(&self) -> Option<u32> {
        self.microsoft().and_then(MicrosoftError::aadsts)
    }

    /// The OAuth 2.0 `error`, e.g. `invalid_client`.
    pub fn error_code(&self) -> Option<&str> {
        self.microsoft().map(|m| m.error.as_str())
    }

    pub fn error_description(&self) -> Option<&str> {
        self.microsoft()?.error_description.as_deref()
    }

    pub fn trace_id(&self) -> Option<&str> {
        self.microsoft()?.trace_id.as_deref()
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.microsoft()?.correlation_id.as_deref()
    }

    pub fn timestamp(&self) -> Option<&str> {
        self.microsoft()?.timestamp.as_deref()
    }

    /// Worth trying again later on its own (network, timeout, throttling, 5xx); a refusal or a TLS failure is not.
    pub fn is_transient(&self) -> bool {
        match &self.inner.kind {
            OAuthErrorKind::Unreachable { .. }
            | OAuthErrorKind::Timeout
            | OAuthErrorKind::Throttled { .. } => true,
            OAuthErrorKind::Http { status, .. } | OAuthErrorKind::Unparsable { status, .. } => {
                *status >= 500
            }
            OAuthErrorKind::Tls { .. } => false,
        }
    }

    /// The endpoint refused the grant itself (HTTP 400/401 with Microsoft's body): for a refresh token, the cue to
    /// sign in again with the password.
    pub fn is_refusal(&self) -> bool {
        matches!(&self.inner.kind, OAuthErrorKind::Http { status, .. } if (400..500).contains(status) && *status != 429)
    }

    /// The cause in plain words and what to change.
    pub fn explain(&self) -> Explanation {
        let host = &self.inner.host;
        match &self.inner.kind {
            OAuthErrorKind::Unreachable { detail } => {
                explain::transport(Transport::Unreachable, host, non_empty(detail))
            }
            OAuthErrorKind::Tls { detail } => {
                explain::transport(Transport::Tls, host, non_empty(detail))
            }
            OAuthErrorKind::Timeout => explain::transport(Transport::Timeout, host, None),
            OAuthErrorKind::Throttled { retry_after, .. } => explain::throttled(host, *retry_after),
            OAuthErrorKind::Unparsable { status, .. } => explain::unparsable(host, *status),
            OAuthErrorKind::Http { status, body } => match body.aadsts() {
                Some(code) => explain::aadsts(code)
                    .unwrap_or_else(|| explain::unknown_aadsts(code, body.message().as_deref())),
                None if *status >= 500 => explain::server_error(host, *status),
                None => Explanation::new(
                    body.message().unwrap_or_else(|| {
                        format!("the token endpoint refused the request ({})", body.error)
                    }),
                    "check client_id, the secret or password, the scopes and login_address",
                ),
            },
        }
    }

    /// The short label after "failed: ": `AADSTS7000215 invalid_client`, `HTTP 502`, `unreachable`…
    fn label(&self) -> String {
        match &self.inner.kind {
            OAuthErrorKind::Unreachable { .. } => "endpoint unreachable".into(),
            OAuthErrorKind::Tls { .. } => "TLS failure".into(),
            OAuthErrorKind::Timeout => "timeout".into(),
            OAuthErrorKind::Unparsable { status, .. } => {
                format!("HTTP {status}, unreadable answer")
            }
            OAuthErrorKind::Throttled { status, body, .. } => {
                match body.as_ref().and_then(MicrosoftError::aadsts) {
                    Some(code) => format!("throttled (HTTP {status}, AADSTS{code})"),
                    None => format!("throttled (HTTP {status})"),
                }
            }
            OAuthErrorKind::Http { status, body } => match body.aadsts() {
                Some(code) => format!("AADSTS{code} {}", body.error),
                None => format!("HTTP {status} {}", body.error),
            },
        }
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Explanation { cause, fix } = self.explain();
        write!(
            f,
            "token request to {} failed: {} — {cause}. Fix: {fix}.",
            self.inner.host,
            self.label()
        )?;
        if self.inner.attempts > 1 {
            write!(f, " ({} attempts)", self.inner.attempts)?;
        }
        let ids: Vec<String> = [
            ("trace_id", self.trace_id()),
            ("correlation_id", self.correlation_id()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
        .collect();
        if !ids.is_empty() {
            write!(f, " ({})", ids.join(", "))?;
        }
        Ok(())
    }
}

impl fmt::Debug for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("OAuthError")
            .field("host", &i.host)
            .field("client_id", &i.client_id)
            .field("grant", &i.grant)
            .field("attempts", &i.attempts)
            .field("kind", &i.kind)
            .finish()
    }
}

impl std::error::Error for OAuthError {}

/// Replaces every known secret in `text` with `***`.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= 3) {
        if out.contains(secret) {
            out = out.replace(secret, "***");
        }
    }
    out
}

const EXCERPT_CHARS: usize = 200;
/// Runs of token characters at least this long are cut out of excerpts: JWTs, refresh tokens, secrets.
const TOKEN_LIKE: usize = 32;

/// A short, single-line, secret-free excerpt of an answer body: known secrets become `***`, anything that looks
/// like a token (a long run of base64/JWT characters) becomes `[redacted]`, and it is cut to 200 characters.
pub fn excerpt(body: &[u8], secrets: &[&str]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = scrub(&text, secrets);
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= TOKEN_LIKE {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || "-_.~+/=".contains(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            if c.is_whitespace() || c.is_control() {
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            } else {
                out.push(c);
            }
        }
    }
    flush(&mut run, &mut out);
    let out = out.trim();
    if out.chars().count() > EXCERPT_CHARS {
        let cut: String = out.chars().take(EXCERPT_CHARS).collect();
        format!("{cut}…")
    } else {
        out.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD_SECRET: &str = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5'.\r\nTrace ID: 0a1b2c3d-0000-4000-8000-111122223333\r\nCorrelation ID: 99999999-8888-4777-8666-555544443333\r\nTimestamp: 2026-11-21 08:49:12Z","error_codes":[7000215],"timestamp":"2026-11-21 08:49:12Z","trace_id":"0a1b2c3d-0000-4000-8000-111122223333","correlation_id":"99999999-8888-4777-8666-555544443333","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#;

    fn http(status: u16, body: &str) -> OAuthError {
        OAuthError::new(
            "login.microsoftonline.com",
            "6e1f0c2d",
            Grant::ClientCredentials,
            1,
            OAuthErrorKind::Http {
                status,
                body: MicrosoftError::parse(body.as_bytes(), &[]).unwrap(),
            },
        )
    }

    #[test]
    fn parses_microsoft_error_bodies() {
        let m = MicrosoftError::parse(BAD_SECRET.as_bytes(), &[]).unwrap();
        assert_eq!(m.error, "invalid_client");
        assert_eq!(m.aadsts(), Some(7000215));
        assert_eq!(
            m.trace_id.as_deref(),
            Some("0a1b2c3d-0000-4000-8000-111122223333")
        );
        assert_eq!(
            m.correlation_id.as_deref(),
            Some("99999999-8888-4777-8666-555544443333")
        );
        assert_eq!(m.timestamp.as_deref(), Some("2026-11-21 08:49:12Z"));
        assert!(
            m.message()
                .unwrap()
                .starts_with("Invalid client secret provided")
        );
        assert!(!m.message().unwrap().contains("Trace ID"));
        // No error_codes: the code is read from the description; unknown fields are ignored.
        let m = MicrosoftError::parse(
            br#"{"error":"invalid_grant","error_description":"AADSTS50126: Error validating credentials.","claims":"{}"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(m.aadsts(), Some(50126));
        // Not Microsoft's: HTML, empty, JSON without `error`.
        assert_eq!(
            MicrosoftError::parse(b"<html>502 Bad Gateway</html>", &[]),
            None
        );
        assert_eq!(MicrosoftError::parse(b"", &[]), None);
        assert_eq!(MicrosoftError::parse(br#"{"message":"x"}"#, &[]), None);
    }

    #[test]
    fn display_has_code_cause_fix_and_ids() {
        let e = http(401, BAD_SECRET);
        assert_eq!(e.aadsts(), Some(7000215));
        assert_eq!(e.status(), Some(401));
        assert_eq!(e.error_code(), Some("invalid_client"));
        assert!(!e.is_transient() && e.is_refusal());
        let shown = e.to_string();
        assert!(
            shown.starts_with(
                "token request to login.microsoftonline.com failed: AADSTS7000215 invalid_client — the client secret is wrong. Fix: copy the secret's *Value*"
            ),
            "{shown}"
        );
        assert!(
            shown.ends_with(
                "(trace_id 0a1b2c3d-0000-4000-8000-111122223333, correlation_id 99999999-8888-4777-8666-555544443333)"
            ),
            "{shown}"
        );
    }

    #[test]
    fn unknown_codes_use_microsofts_words() {
        let e = http(
            400,
            r#"{"error":"invalid_request","error_description":"AADSTS123456: Something odd happened.\r\nTrace ID: t","error_codes":[123456],"trace_id":"t"}"#,
        );
        let x = e.explain();
        assert_eq!(x.cause, "Something odd happened");
        assert!(x.fix.contains("code=123456"));
    }

    #[test]
    fn transport_and_throttling() {
        let e = OAuthError::new(
            "127.0.0.1:9",
            "c",
            Grant::Password,
            4,
            OAuthErrorKind::Unreachable {
                detail: "Connection refused (os error 111)".into(),
            },
        );
        assert!(e.is_transient() && !e.is_refusal());
        let shown = e.to_string();
        assert!(
            shown.contains("endpoint unreachable") && shown.contains("Connection refused"),
            "{shown}"
        );
        assert!(shown.contains("(4 attempts)"), "{shown}");
        let t = OAuthError::new(
            "h",
            "c",
            Grant::ClientCredentials,
            5,
            OAuthErrorKind::Throttled {
                status: 429,
                retry_after: Some(Duration::from_secs(30)),
                body: None,
            },
        );
        assert!(t.to_string().contains("throttled (HTTP 429)"), "{t}");
        assert_eq!(t.status(), Some(429));
    }

    #[test]
    fn excerpts_are_short_and_secret_free() {
        let jwt = format!("eyJ{}", "A".repeat(1600));
        let body = format!(
            "<html>\n<body>Proxy error\tfor client_secret=hunter22 and token {jwt} and {}</body></html>",
            "x".repeat(500)
        );
        let e = excerpt(body.as_bytes(), &["hunter22"]);
        assert!(!e.contains("hunter22") && !e.contains("eyJ"), "{e}");
        assert!(e.contains("[redacted]") && e.contains("***"), "{e}");
        assert!(!e.contains('\n') && !e.contains('\t'));
        assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        assert_eq!(excerpt(b"  short  body ", &[]), "short body");
        assert_eq!(excerpt(&[0xff, b'o', b'k'], &[]), "\u{fffd}ok");
    }

    #[test]
    fn secrets_are_scrubbed_from_microsoft_bodies() {
        let m = MicrosoftError::parse(
            br#"{"error":"invalid_request","error_description":"bad value 'p4ssw0rd!' for password"}"#,
            &["p4ssw0rd!"],
        )
        .unwrap();
        assert_eq!(
            m.error_description.as_deref(),
            Some("bad value '***' for password")
        );
    }
}
