//! The token cache against the sandbox's Entra ID emulator, run in-process on 127.0.0.1 (plain http).
//!
//! A middleware in front of the emulator counts token requests and records their grant types, and can refuse
//! refresh tokens (the emulator never does on its own).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{Request, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use mailqueue_connectors::oauth::{
    Attempt, IMAP_SERVICE_SCOPE, IMAP_USER_SCOPE, OAuthErrorKind, RetryPolicy, SMTP_SERVICE_SCOPE,
    TokenCache, TokenEndpoint, TokenRequest, WithTokenError,
};
use mailqueue_sandbox::{
    idp::{Fault, Idp},
    tokens::TokenKind,
    world::World,
};

const TENANT: &str = "contoso.onmicrosoft.com";
const SERVICE_APP: &str = "6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5";
const SERVICE_SECRET: &str = "svc~Secret.Value-1234567890abcdefGHIJ";
const SERVICE_SECRET_ID: &str = "0b7c9a1e-1111-4222-8333-444455556666";
const EXPIRED_SECRET: &str = "svc~Expired.Value-0987654321zyxwvuTSRQ";
const USER_APP: &str = "2c4e6a8b-1d3f-4a5b-8c7d-9e0f1a2b3c4d";
const NO_CONSENT_APP: &str = "7a7a7a7a-0000-4000-8000-000000000065";
const NO_CONSENT_SECRET: &str = "noconsent~Secret-abcdefghijklmnop";
const ANNA: &str = "anna@contoso.com";
const ANNA_PASSWORD: &str = "Anna-Passw0rd!";
const BEN: &str = "ben@contoso.com";
const BEN_PASSWORD: &str = "Ben-Passw0rd!";

/// The emulator on a loopback port, with request accounting.
struct Sandbox {
    idp: Idp,
    base: String,
    /// Grant types of the token requests that reached the emulator, in order.
    grants: Arc<Mutex<Vec<String>>>,
    requests: Arc<AtomicUsize>,
    refuse_refresh: Arc<AtomicBool>,
}

impl Sandbox {
    async fn start() -> Self {
        let idp = Idp::new(World::default());
        let grants = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let refuse_refresh = Arc::new(AtomicBool::new(false));
        let (g, r, f) = (grants.clone(), requests.clone(), refuse_refresh.clone());
        let app = idp.router().layer(middleware::from_fn(
            move |req: Request<Body>, next: Next| {
                let (g, r, f) = (g.clone(), r.clone(), f.clone());
                async move {
                    if !req.uri().path().ends_with("/oauth2/v2.0/token") {
                        return next.run(req).await;
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let (parts, body) = req.into_parts();
                    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                    let grant = String::from_utf8_lossy(&bytes)
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("grant_type=").map(str::to_owned))
                        .unwrap_or_default();
                    g.lock().unwrap().push(grant.clone());
                    if grant == "refresh_token" && f.load(Ordering::SeqCst) {
                        return refused_refresh();
                    }
                    next.run(Request::from_parts(parts, Body::from(bytes)))
                        .await
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            idp,
            base,
            grants,
            requests,
            refuse_refresh,
        }
    }

    fn endpoint(&self, tenant: &str) -> TokenEndpoint {
        TokenEndpoint::from_login_address(&format!("{}/{tenant}/", self.base)).unwrap()
    }

    fn service(&self, scope: &str) -> TokenRequest {
        TokenRequest::client_credentials(self.endpoint(TENANT), SERVICE_APP, SERVICE_SECRET, scope)
    }

    fn anna(&self) -> TokenRequest {
        TokenRequest::password(
            self.endpoint(TENANT),
            USER_APP,
            ANNA,
            ANNA_PASSWORD,
            IMAP_USER_SCOPE,
        )
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn grants(&self) -> Vec<String> {
        self.grants.lock().unwrap().clone()
    }
}

/// What Entra answers for a refresh token it no longer accepts.
fn refused_refresh() -> Response {
    let body = r#"{"error":"invalid_grant","error_description":"AADSTS70000: Provided grant is invalid or malformed.\r\nTrace ID: 11111111-2222-4333-8444-555555555555","error_codes":[70000],"timestamp":"2026-11-21 09:00:00Z","trace_id":"11111111-2222-4333-8444-555555555555","correlation_id":"66666666-7777-4888-8999-000000000000"}"#;
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/json")],
        body,
    )
        .into_response()
}

/// Fast retries for tests.
fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(3),
        max_elapsed: Duration::from_secs(10),
    }
}

fn cache() -> TokenCache {
    TokenCache::builder()
        .no_proxy()
        .retry(quick_retry())
        .build()
        .unwrap()
}

#[tokio::test]
async fn client_credentials_for_imap_and_smtp() {
    let sb = Sandbox::start().await;
    let cache = cache();
    for (scope, audience, role) in [
        (
            IMAP_SERVICE_SCOPE,
            "https://outlook.office365.com",
            "IMAP.AccessAsApp",
        ),
        (
            SMTP_SERVICE_SCOPE,
            "https://outlook.office.com",
            "SMTP.SendAsApp",
        ),
    ] {
        let token = cache.token(&sb.service(scope)).await.unwrap();
        assert!(token.secret().len() > 1500, "Entra-sized token");
        assert_eq!(token.scopes(), [scope]);
        assert_eq!(token.lifetime(), Duration::from_secs(3599));
        let in_an_hour = chrono::Utc::now() + chrono::Duration::seconds(3599);
        assert!((token.expires_at() - in_an_hour).num_seconds().abs() <= 2);
        let info = sb.idp.tokens().validate(token.secret()).unwrap();
        assert_eq!(info.audience, audience);
        match info.kind {
            TokenKind::App { client_id, roles } => {
                assert_eq!(client_id, SERVICE_APP);
                assert!(roles.iter().any(|r| r == role), "{roles:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sb.grants(), ["client_credentials", "client_credentials"]);
    assert_eq!(cache.stats().requests, 2);
}

#[tokio::test]
async fn ropc_for_anna_then_renewal_with_the_refresh_token() {
    let sb = Sandbox::start().await;
    sb.idp.set_lifetime(2);
    let cache = cache();
    let req = sb.anna();
    let first = cache.token(&req).await.unwrap();
    let info = sb.idp.tokens().validate(first.secret()).unwrap();
    assert_eq!(info.upn(), Some(ANNA));
    assert_eq!(info.audience, "https://outlook.office365.com");
    assert_eq!(
        first.scopes(),
        ["https://outlook.office365.com/IMAP.AccessAsUser.All"]
    );
    assert_eq!(sb.grants(), ["password"]);

    // Past the refresh point (80 % of 2 s): renewed with the refresh token, not the password.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let second = cache.token(&req).await.unwrap();
    assert!(!second.same_as(&first));
    assert_eq!(sb.grants(), ["password", "refresh_token"]);
    assert_eq!(
        sb.idp.tokens().validate(second.secret()).unwrap().upn(),
        Some(ANNA)
    );

    // Invalidation renews with the (rotated) refresh token too.
    cache.invalidate(&req, &second);
    let third = cache.token(&req).await.unwrap();
    assert!(!third.same_as(&second));
    assert_eq!(sb.grants(), ["password", "refresh_token", "refresh_token"]);
}

#[tokio::test]
async fn refused_refresh_token_falls_back_to_the_password() {
    let sb = Sandbox::start().await;
    let cache = cache();
    let req = sb.anna();
    let first = cache.token(&req).await.unwrap();
    sb.refuse_refresh.store(true, Ordering::SeqCst);
    cache.invalidate(&req, &first);
    let second = cache.token(&req).await.unwrap();
    assert!(!second.same_as(&first));
    assert!(sb.idp.tokens().validate(second.secret()).is_ok());
    assert_eq!(sb.grants(), ["password", "refresh_token", "password"]);
}

/// One AADSTS case: the request, and what the error must say.
struct Case {
    name: &'static str,
    request: TokenRequest,
    code: u32,
    error: &'static str,
    cause: &'static str,
    fix: &'static str,
    /// Must not show up anywhere.
    secret: &'static str,
}

#[tokio::test]
async fn aadsts_errors_carry_code_trace_id_and_explanation() {
    let sb = Sandbox::start().await;
    let cache = cache();
    let cases = [
        Case {
            name: "secret ID instead of value",
            request: TokenRequest::client_credentials(
                sb.endpoint(TENANT),
                SERVICE_APP,
                SERVICE_SECRET_ID,
                IMAP_SERVICE_SCOPE,
            ),
            code: 7000215,
            error: "invalid_client",
            cause: "the client secret is wrong",
            fix: "copy the secret's *Value*, not its *Secret ID*, from Certificates & secrets",
            secret: SERVICE_SECRET_ID,
        },
        Case {
            name: "expired secret",
            request: TokenRequest::client_credentials(
                sb.endpoint(TENANT),
                SERVICE_APP,
                EXPIRED_SECRET,
                IMAP_SERVICE_SCOPE,
            ),
            code: 7000222,
            error: "invalid_client",
            cause: "the client secret has expired",
            fix: "create a new one in Certificates & secrets",
            secret: EXPIRED_SECRET,
        },
        Case {
            name: "unknown application",
            request: TokenRequest::client_credentials(
                sb.endpoint(TENANT),
                "00000000-0000-4000-8000-000000000bad",
                SERVICE_SECRET,
                IMAP_SERVICE_SCOPE,
            ),
            code: 700016,
            error: "unauthorized_client",
            cause: "application (client_id) is unknown",
            fix: "another tenant",
            secret: SERVICE_SECRET,
        },
        Case {
            name: "unknown tenant",
            request: TokenRequest::client_credentials(
                sb.endpoint("nosuchtenant.onmicrosoft.com"),
                SERVICE_APP,
                SERVICE_SECRET,
                IMAP_SERVICE_SCOPE,
            ),
            code: 90002,
            error: "invalid_request",
            cause: "tenant",
            fix: "login_address",
            secret: SERVICE_SECRET,
        },
        Case {
            name: "wrong password",
            request: TokenRequest::password(
                sb.endpoint(TENANT),
                USER_APP,
                ANNA,
                "Wrong-Passw0rd!",
                IMAP_USER_SCOPE,
            ),
            code: 50126,
            error: "invalid_grant",
            cause: "wrong user name or password",
            fix: "password",
            secret: "Wrong-Passw0rd!",
        },
        Case {
            name: "MFA",
            request: TokenRequest::password(
                sb.endpoint(TENANT),
                USER_APP,
                BEN,
                BEN_PASSWORD,
                IMAP_USER_SCOPE,
            ),
            code: 50076,
            error: "invalid_grant",
            cause: "MFA is required for this user; ROPC",
            fix: "Conditional Access",
            secret: BEN_PASSWORD,
        },
        Case {
            name: "no admin consent",
            request: TokenRequest::client_credentials(
                sb.endpoint(TENANT),
                NO_CONSENT_APP,
                NO_CONSENT_SECRET,
                IMAP_SERVICE_SCOPE,
            ),
            code: 65001,
            error: "invalid_grant",
            cause: "admin consent",
            fix: "Enterprise applications",
            secret: NO_CONSENT_SECRET,
        },
        Case {
            name: "two .default scopes",
            request: sb.service(&format!("{IMAP_SERVICE_SCOPE} {SMTP_SERVICE_SCOPE}")),
            code: 70011,
            error: "invalid_scope",
            cause: "scope is invalid",
            fix: "<resource>/.default",
            secret: SERVICE_SECRET,
        },
        Case {
            name: "delegated scope with client credentials",
            request: sb.service(IMAP_USER_SCOPE),
            code: 1002012,
            error: "invalid_scope",
            cause: "scope is invalid",
            fix: "<resource>/.default",
            secret: SERVICE_SECRET,
        },
    ];
    let n = cases.len();
    for case in cases {
        let name = case.name;
        let e = cache.token(&case.request).await.unwrap_err();
        assert_eq!(e.aadsts(), Some(case.code), "{name}: {e}");
        assert_eq!(e.error_code(), Some(case.error), "{name}");
        assert_eq!(e.attempts(), 1, "{name}: refusals are not retried");
        assert!(!e.is_transient(), "{name}");
        assert!(
            matches!(e.status(), Some(400 | 401)),
            "{name}: {:?}",
            e.status()
        );
        let trace_id = e
            .trace_id()
            .unwrap_or_else(|| panic!("{name}: no trace_id"));
        assert_eq!(trace_id.len(), 36, "{name}");
        let correlation_id = e
            .correlation_id()
            .unwrap_or_else(|| panic!("{name}: no correlation_id"));
        assert!(e.timestamp().is_some(), "{name}");
        let x = e.explain();
        assert!(x.cause.contains(case.cause), "{name}: {}", x.cause);
        assert!(x.fix.contains(case.fix), "{name}: {}", x.fix);

        let shown = e.to_string();
        let host = sb.base.trim_start_matches("http://");
        assert!(
            shown.starts_with(&format!(
                "token request to {host} failed: AADSTS{} {} — {}. Fix: {}.",
                case.code, case.error, x.cause, x.fix
            )),
            "{name}: {shown}"
        );
        assert!(
            shown.ends_with(&format!(
                "(trace_id {trace_id}, correlation_id {correlation_id})"
            )),
            "{name}: {shown}"
        );
        let debug = format!("{e:?} {:?}", case.request);
        for text in [&shown, &debug] {
            assert!(
                !text.contains(case.secret),
                "{name}: secret shown in {text}"
            );
        }
    }
    assert_eq!(sb.requests(), n);
}

#[tokio::test]
async fn a_cached_token_is_reused() {
    let sb = Sandbox::start().await;
    let cache = cache();
    let a = cache.token(&sb.service(IMAP_SERVICE_SCOPE)).await.unwrap();
    let b = cache
        .clone()
        .token(&sb.service(IMAP_SERVICE_SCOPE))
        .await
        .unwrap();
    assert!(a.same_as(&b));
    assert_eq!(sb.requests(), 1);
    assert_eq!(cache.stats().requests, 1);
    assert_eq!(cache.stats().hits, 1);
    // Another scope is another token.
    cache.token(&sb.service(SMTP_SERVICE_SCOPE)).await.unwrap();
    assert_eq!(sb.requests(), 2);
}

#[tokio::test]
async fn concurrent_callers_share_one_request() {
    let sb = Sandbox::start().await;
    sb.idp
        .inject_fault(Fault::Delay(Duration::from_millis(300)), 1);
    let cache = cache();
    let req = sb.service(IMAP_SERVICE_SCOPE);
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (cache, req, barrier) = (cache.clone(), req.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                cache.token(&req).await.unwrap()
            })
        })
        .collect();
    let tokens: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(tokens.iter().all(|t| t.same_as(&tokens[0])));
    assert_eq!(sb.requests(), 1);
    assert_eq!(cache.stats().requests, 1);
}

#[tokio::test]
async fn concurrent_callers_share_one_failure_too() {
    let sb = Sandbox::start().await;
    sb.idp.inject_fault(
        Fault::Unavailable {
            retry_after_seconds: None,
        },
        100,
    );
    let cache = cache();
    let req = sb.service(IMAP_SERVICE_SCOPE);
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (cache, req, barrier) = (cache.clone(), req.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                cache.token(&req).await.unwrap_err()
            })
        })
        .collect();
    for e in futures::future::join_all(tasks).await {
        let e = e.unwrap();
        assert_eq!(e.status(), Some(503));
        assert_eq!(e.attempts(), 4);
    }
    // One flight with its retries, not one per caller.
    assert_eq!(sb.requests(), 4);
    // A later caller tries again.
    sb.idp.clear_faults();
    assert!(cache.token(&req).await.is_ok());
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_ahead_and_never_handed_out_expired() {
    let sb = Sandbox::start().await;
    sb.idp.set_lifetime(5);
    let cache = cache();
    let req = sb.service(IMAP_SERVICE_SCOPE);
    let start = Instant::now();
    let mut seen: Vec<(Duration, String)> = Vec::new();
    let mut calls = 0;
    while start.elapsed() < Duration::from_secs(11) {
        let token = cache.token(&req).await.unwrap();
        calls += 1;
        assert!(!token.is_expired());
        assert!(
            token.remaining() >= Duration::from_millis(500),
            "{:?}",
            token.remaining()
        );
        sb.idp
            .tokens()
            .validate(token.secret())
            .unwrap_or_else(|e| panic!("handed out a token the server refuses: {e}"));
        if seen.last().is_none_or(|(_, s)| s != token.secret()) {
            seen.push((start.elapsed(), token.secret().to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Renewed at ~4 s, ~8 s: three tokens, each used for about 4 s, one request each.
    assert_eq!(
        seen.len(),
        3,
        "{:?}",
        seen.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    for w in seen.windows(2) {
        let used = w[1].0 - w[0].0;
        assert!(
            used >= Duration::from_millis(3500) && used < Duration::from_secs(5),
            "{used:?}"
        );
    }
    assert_eq!(sb.requests(), 3);
    assert!(calls > 100);
}

#[tokio::test]
async fn throttling_is_retried_after_retry_after() {
    let sb = Sandbox::start().await;
    sb.idp.inject_fault(
        Fault::Throttle {
            retry_after_seconds: 1,
        },
        1,
    );
    let cache = cache();
    let start = Instant::now();
    let token = cache.token(&sb.service(IMAP_SERVICE_SCOPE)).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert!(sb.idp.tokens().validate(token.secret()).is_ok());
    assert_eq!(sb.requests(), 2);
}

#[tokio::test]
async fn throttling_that_outlasts_the_retries_is_reported() {
    let sb = Sandbox::start().await;
    sb.idp.inject_fault(
        Fault::Throttle {
            retry_after_seconds: 0,
        },
        10,
    );
    let cache = cache();
    let e = cache
        .token(&sb.service(IMAP_SERVICE_SCOPE))
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind(), OAuthErrorKind::Throttled { status: 429, .. }),
        "{e:?}"
    );
    assert_eq!(e.attempts(), 4);
    assert_eq!(e.aadsts(), Some(50196));
    assert!(e.is_transient());
    assert!(
        e.to_string().contains("throttled (HTTP 429, AADSTS50196)"),
        "{e}"
    );
    assert_eq!(sb.requests(), 4);

    // A Retry-After longer than any wait we would make: reported at once.
    sb.idp.clear_faults();
    sb.idp.inject_fault(
        Fault::Throttle {
            retry_after_seconds: 3600,
        },
        1,
    );
    let e = cache
        .token(&sb.service(SMTP_SERVICE_SCOPE))
        .await
        .unwrap_err();
    assert_eq!(e.attempts(), 1);
    match e.kind() {
        OAuthErrorKind::Throttled { retry_after, .. } => {
            assert_eq!(*retry_after, Some(Duration::from_secs(3600)))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.explain().cause.contains("3600 s"),
        "{}",
        e.explain().cause
    );
}

#[tokio::test]
async fn service_unavailable_is_retried() {
    let sb = Sandbox::start().await;
    sb.idp.inject_fault(
        Fault::Unavailable {
            retry_after_seconds: None,
        },
        2,
    );
    let cache = cache();
    let token = cache.token(&sb.service(IMAP_SERVICE_SCOPE)).await.unwrap();
    assert!(sb.idp.tokens().validate(token.secret()).is_ok());
    assert_eq!(sb.requests(), 3);
}

#[tokio::test]
async fn a_failed_renewal_keeps_the_current_token_while_it_lasts() {
    let sb = Sandbox::start().await;
    sb.idp.set_lifetime(6);
    let cache = TokenCache::builder()
        .no_proxy()
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(20),
            ..quick_retry()
        })
        .build()
        .unwrap();
    let req = sb.service(IMAP_SERVICE_SCOPE);
    let first = cache.token(&req).await.unwrap();
    // Past the refresh point (4.8 s) but still usable (until 5.4 s), the endpoint down.
    sb.idp.inject_fault(
        Fault::Unavailable {
            retry_after_seconds: None,
        },
        100,
    );
    tokio::time::sleep(Duration::from_millis(4850)).await;
    let again = cache.token(&req).await.unwrap();
    assert!(again.same_as(&first));
    assert_eq!(sb.requests(), 3);
    // Once it is (nearly) expired, the failure is reported.
    tokio::time::sleep(Duration::from_millis(650)).await;
    let e = cache.token(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert_eq!(e.aadsts(), Some(90033));
    // And the endpoint back: a new token.
    sb.idp.clear_faults();
    let fresh = cache.token(&req).await.unwrap();
    assert!(!fresh.same_as(&first));
}

#[tokio::test]
async fn invalidate_gives_a_new_token_once() {
    let sb = Sandbox::start().await;
    let cache = cache();
    let req = sb.service(IMAP_SERVICE_SCOPE);
    let a = cache.token(&req).await.unwrap();
    cache.invalidate(&req, &a);
    let b = cache.token(&req).await.unwrap();
    assert!(!b.same_as(&a));
    assert_eq!(sb.requests(), 2);
    // A late report about the old token leaves the new one alone.
    cache.invalidate(&req, &a);
    let c = cache.token(&req).await.unwrap();
    assert!(c.same_as(&b));
    assert_eq!(sb.requests(), 2);
}

#[tokio::test]
async fn with_token_retries_once_with_a_new_token() {
    let sb = Sandbox::start().await;
    let cache = cache();
    let req = sb.service(IMAP_SERVICE_SCOPE);
    // The "server" has revoked the cached token; the retry gets a new one.
    let first = cache.token(&req).await.unwrap();
    sb.idp.revoke(first.secret());
    let mut used = Vec::new();
    let result = cache
        .with_token(&req, |token| {
            used.push(token.clone());
            let idp = sb.idp.clone();
            async move {
                match idp.tokens().validate(token.secret()) {
                    Ok(_) => Ok("logged in"),
                    Err(e) => Err(Attempt::Rejected(e.to_string())),
                }
            }
        })
        .await;
    assert_eq!(result.unwrap(), "logged in");
    assert_eq!(used.len(), 2);
    assert!(used[0].same_as(&first) && !used[1].same_as(&first));
    assert_eq!(sb.requests(), 2);

    // Rejected twice: reported, no third token.
    let result: Result<(), _> = cache
        .with_token(&req, |_| async {
            Err(Attempt::Rejected("NO AUTHENTICATE failed."))
        })
        .await;
    match result {
        Err(e @ WithTokenError::Rejected(_)) => {
            assert!(e.to_string().contains("NO AUTHENTICATE failed."), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sb.requests(), 3);
    // Other failures are not retried.
    let result: Result<(), _> = cache
        .with_token(&req, |_| async { Err(Attempt::Failed("connection reset")) })
        .await;
    assert!(matches!(
        result,
        Err(WithTokenError::Failed("connection reset"))
    ));
    assert_eq!(sb.requests(), 3);
}

#[tokio::test]
async fn unreachable_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let cache = cache();
    let endpoint = TokenEndpoint::from_login_address(&format!("http://{addr}/{TENANT}")).unwrap();
    let req =
        TokenRequest::client_credentials(endpoint, SERVICE_APP, SERVICE_SECRET, IMAP_SERVICE_SCOPE);
    let e = cache.token(&req).await.unwrap_err();
    assert!(
        matches!(e.kind(), OAuthErrorKind::Unreachable { .. }),
        "{e:?}"
    );
    assert_eq!(e.attempts(), 4);
    assert!(e.is_transient());
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "token request to {addr} failed: endpoint unreachable — "
        )),
        "{shown}"
    );
    assert!(!shown.contains(SERVICE_SECRET) && !format!("{e:?}").contains(SERVICE_SECRET));
}

#[tokio::test]
async fn a_non_microsoft_answer_is_excerpted_without_secrets() {
    // A proxy page that echoes the request (and so the secret), with a token-like blob.
    let app = axum::Router::new().fallback(|body: String| async move {
        let page = format!(
            "<html><body><h1>Bad gateway</h1><p>request: {body}</p><p>{}</p></body></html>",
            "eyJ".repeat(40)
        );
        (StatusCode::BAD_GATEWAY, page)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let cache = cache();
    let req = TokenRequest::password(
        TokenEndpoint::from_url(&format!("http://{addr}/t/oauth2/v2.0/token")).unwrap(),
        USER_APP,
        ANNA,
        "pw-that-must-not-leak",
        IMAP_USER_SCOPE,
    );
    let e = cache.token(&req).await.unwrap_err();
    assert_eq!(e.attempts(), 4, "5xx is retried");
    match e.kind() {
        OAuthErrorKind::Unparsable {
            status: 502,
            excerpt,
        } => {
            assert!(
                excerpt.starts_with("<html><body><h1>Bad gateway</h1>"),
                "{excerpt}"
            );
            assert!(!excerpt.contains("pw-that-must-not-leak"), "{excerpt}");
            assert!(!excerpt.contains("eyJeyJ"), "{excerpt}");
            assert!(excerpt.chars().count() <= 201);
        }
        other => panic!("{other:?}"),
    }
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains("pw-that-must-not-leak"), "{text}");
    }
}

#[tokio::test]
async fn secrets_never_show_in_debug_or_display() {
    let sb = Sandbox::start().await;
    let cache = cache();
    let req = sb.anna();
    let token = cache.token(&req).await.unwrap();
    let shown = format!("{token:?} {req:?} {cache:?} {:?}", req.key());
    for secret in [token.secret(), ANNA_PASSWORD] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(shown.contains("expires_at"));
}

/// A minimal HTTPS token endpoint with the sandbox's certificates: answers every request with a token.
async fn https_token_endpoint() -> (std::net::SocketAddr, mailqueue_sandbox::tls::Certificates) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!(
        "mailqueue-connectors-tls-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let certs = mailqueue_sandbox::tls::Certificates::generate(&dir).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // Read the head and the form body (Content-Length), then answer and close.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0usize);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                let body = r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"tls-token"}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, certs)
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[tokio::test]
async fn https_endpoint_with_an_extra_ca_and_without() {
    let (addr, certs) = https_token_endpoint().await;
    let endpoint = TokenEndpoint::from_url(&format!("https://{addr}/t/oauth2/v2.0/token")).unwrap();
    let req =
        TokenRequest::client_credentials(endpoint, SERVICE_APP, SERVICE_SECRET, IMAP_SERVICE_SCOPE);

    let trusting = TokenCache::builder()
        .no_proxy()
        .retry(quick_retry())
        .add_root_certificate_pem(std::fs::read(&certs.ca_pem).unwrap())
        .build()
        .unwrap();
    assert_eq!(trusting.token(&req).await.unwrap().secret(), "tls-token");

    let e = cache().token(&req).await.unwrap_err();
    assert!(matches!(e.kind(), OAuthErrorKind::Tls { .. }), "{e:?}");
    assert_eq!(e.attempts(), 1, "TLS failures are not retried");
    assert!(!e.is_transient());
    let shown = e.to_string();
    assert!(
        shown.contains("TLS failure") && shown.contains("certificate"),
        "{shown}"
    );
    let _ = std::fs::remove_dir_all(certs.ca_pem.parent().unwrap());
}
