//! One token request over HTTP, with its retries: form in, [`AccessToken`] or [`OAuthError`] out.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use chrono::Utc;
use reqwest::{StatusCode, header};
use serde::Deserialize;
use tokio::time::Instant;

use super::{
    AccessToken, Credentials, Grant, MicrosoftError, OAuthError, OAuthErrorKind, RetryPolicy,
    SecretString, TokenRequest, error::excerpt, retry::parse_retry_after,
};

/// What a successful token request gives.
pub(crate) struct Fetched {
    pub token: AccessToken,
    /// Delegated grants only (`offline_access`); Entra may rotate it on every use.
    pub refresh_token: Option<SecretString>,
}

/// The success body: `{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"…"}`, plus
/// `scope` and `refresh_token` for delegated grants. `expires_in` is a string in some older answers.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<Seconds>,
    /// Microsoft's extended lifetime (for outages of the token service); not used: renewal follows `expires_in`.
    #[serde(default)]
    #[allow(dead_code)]
    ext_expires_in: Option<Seconds>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

impl Seconds {
    fn get(&self) -> Option<u64> {
        match self {
            Seconds::Number(n) => Some(*n),
            Seconds::Text(s) => s.trim().parse().ok(),
        }
    }
}

/// When `expires_in` is missing: Entra's usual lifetime.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3599);

/// Why one attempt did not give a token.
enum Failure {
    /// Retry may help (429, 5xx, connection, timeout).
    Transient {
        kind: OAuthErrorKind,
        retry_after: Option<Duration>,
    },
    /// Final (a refusal, TLS, an unreadable success).
    Final(OAuthErrorKind),
}

/// Requests a token with `grant`, retrying transient failures under `policy`. `requests` counts HTTP requests.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    policy: &RetryPolicy,
    request: &TokenRequest,
    grant: Grant,
    refresh_token: Option<&SecretString>,
    requests: &AtomicU64,
) -> Result<Fetched, OAuthError> {
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", grant.as_str()),
        ("client_id", request.client_id()),
        ("scope", request.scope()),
    ];
    let mut secrets = request.secrets();
    match (grant, request.credentials()) {
        (Grant::ClientCredentials, Credentials::ClientSecret { client_secret }) => {
            form.push(("client_secret", client_secret.expose()));
        }
        (
            Grant::Password,
            Credentials::Password {
                username,
                password,
                client_secret,
            },
        ) => {
            form.push(("username", username));
            form.push(("password", password.expose()));
            if let Some(secret) = client_secret {
                form.push(("client_secret", secret.expose()));
            }
        }
        (Grant::RefreshToken, Credentials::Password { client_secret, .. }) => {
            let token = refresh_token.map(SecretString::expose).unwrap_or_default();
            form.push(("refresh_token", token));
            secrets.push(token);
            if let Some(secret) = client_secret {
                form.push(("client_secret", secret.expose()));
            }
        }
        (grant, _) => unreachable!("grant {grant} does not go with these credentials"),
    }

    let host = request.endpoint().host();
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        requests.fetch_add(1, Ordering::Relaxed);
        let failure = match attempt(http, request, &form, &secrets).await {
            Ok(fetched) => {
                tracing::debug!(
                    grant = %grant,
                    attempts,
                    expires_in = fetched.token.lifetime().as_secs(),
                    refresh_token = fetched.refresh_token.is_some(),
                    "token issued"
                );
                return Ok(fetched);
            }
            Err(failure) => failure,
        };
        let (kind, retry_after) = match failure {
            Failure::Final(kind) => {
                return Err(OAuthError::new(
                    &host,
                    request.client_id(),
                    grant,
                    attempts,
                    kind,
                ));
            }
            Failure::Transient { kind, retry_after } => (kind, retry_after),
        };
        let delay = policy.delay(attempts, retry_after);
        if !policy.allows(attempts, started.elapsed(), delay, retry_after) {
            return Err(OAuthError::new(
                &host,
                request.client_id(),
                grant,
                attempts,
                kind,
            ));
        }
        tracing::warn!(
            grant = %grant,
            attempt = attempts,
            status = status_of(&kind),
            retry_after_s = retry_after.map(|d| d.as_secs()),
            delay_ms = delay.as_millis() as u64,
            "token request failed; retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

fn status_of(kind: &OAuthErrorKind) -> Option<u16> {
    match kind {
        OAuthErrorKind::Http { status, .. }
        | OAuthErrorKind::Unparsable { status, .. }
        | OAuthErrorKind::Throttled { status, .. } => Some(*status),
        _ => None,
    }
}

async fn attempt(
    http: &reqwest::Client,
    request: &TokenRequest,
    form: &[(&str, &str)],
    secrets: &[&str],
) -> Result<Fetched, Failure> {
    let sent = Instant::now();
    let sent_utc = Utc::now();
    // Entra echoes `client-request-id` as the correlation id: the request can be found in its sign-in logs even
    // when no answer arrives.
    let request_id = client_request_id();
    tracing::debug!(client_request_id = %request_id, "token request");
    let response = http
        .post(request.endpoint().url().clone())
        .header(header::ACCEPT, "application/json")
        .header("client-request-id", &request_id)
        .header("return-client-request-id", "true")
        .form(form)
        .send()
        .await
        .map_err(transport_failure)?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, Utc::now()));
    let body = response.bytes().await.map_err(transport_failure)?;

    if status == StatusCode::OK {
        return parse_success(&body, sent, sent_utc, request, secrets).map_err(|excerpt| {
            Failure::Final(OAuthErrorKind::Unparsable {
                status: status.as_u16(),
                excerpt,
            })
        });
    }
    let microsoft = MicrosoftError::parse(&body, secrets);
    let code = status.as_u16();
    let kind = match microsoft {
        _ if status == StatusCode::TOO_MANY_REQUESTS => OAuthErrorKind::Throttled {
            status: code,
            retry_after,
            body: microsoft,
        },
        Some(body) => OAuthErrorKind::Http { status: code, body },
        None => OAuthErrorKind::Unparsable {
            status: code,
            excerpt: excerpt(&body, secrets),
        },
    };
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        Err(Failure::Transient { kind, retry_after })
    } else {
        Err(Failure::Final(kind))
    }
}

/// A random UUID (version 4 layout).
fn client_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A 200 body into a token, or a secret-free excerpt of what came instead.
fn parse_success(
    body: &[u8],
    sent: Instant,
    sent_utc: chrono::DateTime<Utc>,
    request: &TokenRequest,
    secrets: &[&str],
) -> Result<Fetched, String> {
    let response: TokenResponse =
        serde_json::from_slice(body).map_err(|_| excerpt(body, secrets))?;
    if response.access_token.trim().is_empty() {
        return Err("a token response with an empty access_token".into());
    }
    if let Some(kind) = response.token_type.as_deref()
        && !kind.eq_ignore_ascii_case("bearer")
    {
        tracing::warn!(
            token_type = kind,
            "unexpected token_type; using the token as a bearer token"
        );
    }
    let lifetime = response
        .expires_in
        .as_ref()
        .and_then(Seconds::get)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME);
    let scopes: Vec<String> = response
        .scope
        .as_deref()
        .unwrap_or(request.scope())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    Ok(Fetched {
        token: AccessToken::issued_at(response.access_token, sent, sent_utc, lifetime, scopes),
        refresh_token: response
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
    })
}

/// A failed send or body read: timeout, TLS or unreachable. Only the innermost causes are kept (no URL, which
/// anyway carries no secret: the form is in the body).
fn transport_failure(e: reqwest::Error) -> Failure {
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let detail = chain.last().cloned().unwrap_or_else(|| {
        if e.is_connect() {
            "connection failed".into()
        } else {
            "request failed".into()
        }
    });
    let text = chain.join(" ").to_ascii_lowercase();
    let tls = [
        "certificate",
        "tls",
        "handshake",
        "ssl",
        "x509",
        "unknownissuer",
    ]
    .iter()
    .any(|w| text.contains(w));
    if e.is_timeout() {
        Failure::Transient {
            kind: OAuthErrorKind::Timeout,
            retry_after: None,
        }
    } else if tls {
        Failure::Final(OAuthErrorKind::Tls { detail })
    } else {
        Failure::Transient {
            kind: OAuthErrorKind::Unreachable { detail },
            retry_after: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::TokenEndpoint;

    fn request() -> TokenRequest {
        TokenRequest::client_credentials(
            TokenEndpoint::from_url("https://login.example/t/oauth2/v2.0/token").unwrap(),
            "c",
            "s3cr3t-value",
            "https://outlook.office365.com/.default",
        )
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = client_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, client_request_id());
    }

    #[test]
    fn parses_microsoft_success_shapes() {
        let r = request();
        let body = br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ.x.y"}"#;
        let f = parse_success(body, Instant::now(), Utc::now(), &r, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.token.secret(), "eyJ.x.y");
        assert_eq!(f.token.lifetime(), Duration::from_secs(3599));
        assert_eq!(f.token.scopes(), ["https://outlook.office365.com/.default"]);
        assert!(f.refresh_token.is_none());
        // Delegated, with string lifetimes, scope and a refresh token.
        let body = br#"{"token_type":"Bearer","scope":"https://outlook.office365.com/IMAP.AccessAsUser.All","expires_in":"3600","ext_expires_in":"3600","access_token":"a","refresh_token":"1.AQ-rt"}"#;
        let f = parse_success(body, Instant::now(), Utc::now(), &r, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.token.lifetime(), Duration::from_secs(3600));
        assert_eq!(
            f.token.scopes(),
            ["https://outlook.office365.com/IMAP.AccessAsUser.All"]
        );
        assert_eq!(f.refresh_token.unwrap().expose(), "1.AQ-rt");
    }

    #[test]
    fn unreadable_success_gives_a_scrubbed_excerpt() {
        let r = request();
        let e = parse_success(
            b"<html>Sign in to the proxy, s3cr3t-value</html>",
            Instant::now(),
            Utc::now(),
            &r,
            &r.secrets(),
        )
        .err()
        .unwrap();
        assert_eq!(e, "<html>Sign in to the proxy, ***</html>");
        let e = parse_success(
            br#"{"access_token":""}"#,
            Instant::now(),
            Utc::now(),
            &r,
            &[],
        )
        .err()
        .unwrap();
        assert!(e.contains("empty access_token"));
    }
}
