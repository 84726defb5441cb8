//! The Entra ID emulator over HTTP, in-process on 127.0.0.1:0, with reqwest and Python's urllib as clients.

use std::time::{Duration, Instant};

use mailqueue_sandbox::{
    idp::{EXCHANGE_APP_ID, Fault, Idp, MintRequest},
    tokens::TokenKind,
    world::{Mailbox, World},
};
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

const TENANT_ID: &str = "9f3c2b1a-5d4e-4f60-8a7b-0c1d2e3f4a5b";
const TENANT_NAME: &str = "contoso.onmicrosoft.com";
const FAB_TENANT_ID: &str = "1a2b3c4d-0000-4000-8000-00000000f00d";
const SVC: &str = "6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5";
const SVC_SECRET: &str = "svc~Secret.Value-1234567890abcdefGHIJ";
const SVC_SECRET_ID: &str = "0b7c9a1e-1111-4222-8333-444455556666";
const SVC_EXPIRED_SECRET: &str = "svc~Expired.Value-0987654321zyxwvuTSRQ";
const DELEGATED: &str = "2c4e6a8b-1d3f-4a5b-8c7d-9e0f1a2b3c4d";
const NO_CONSENT: &str = "7a7a7a7a-0000-4000-8000-000000000065";
const NO_CONSENT_SECRET: &str = "noconsent~Secret-abcdefghijklmnop";
const IMAP_ONLY: &str = "5b5b5b5b-0000-4000-8000-0000000000b5";
const IMAP_ONLY_SECRET: &str = "imaponly~Secret-abcdefghijklmnop";
const FAB: &str = "3d3d3d3d-0000-4000-8000-0000000fab01";
const FAB_SECRET: &str = "fab~Secret-abcdefghijklmnopqrst";
const IMAP: &str = "https://outlook.office365.com";
const SMTP: &str = "https://outlook.office.com";
const IMAP_DEFAULT: &str = "https://outlook.office365.com/.default";
const SMTP_DEFAULT: &str = "https://outlook.office.com/.default";
const ANNA_IMAP: &str = "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access";

struct Sandbox {
    idp: Idp,
    base: String,
    http: reqwest::Client,
    _stop: DropGuard,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

async fn start() -> Sandbox {
    let idp = Idp::new(World::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(idp.clone().serve(listener, stop.clone()));
    Sandbox {
        idp,
        base,
        http: reqwest::Client::new(),
        _stop: stop.drop_guard(),
    }
}

impl Sandbox {
    async fn answer(resp: reqwest::Response) -> Answer {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn token(&self, tenant: &str, form: &[(&str, &str)]) -> Answer {
        let url = format!("{}/{tenant}/oauth2/v2.0/token", self.base);
        Self::answer(self.http.post(url).form(form).send().await.unwrap()).await
    }

    async fn client_credentials(&self, client_id: &str, secret: &str, scope: &str) -> Answer {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", scope),
        ];
        self.token(TENANT_ID, &form).await
    }

    /// An access token through the real token endpoint (must succeed).
    async fn access_token(&self, tenant: &str, form: &[(&str, &str)]) -> String {
        let a = self.token(tenant, form).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body["access_token"].as_str().unwrap().to_owned()
    }

    async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        Self::answer(
            self.http
                .post(format!("{}{path}", self.base))
                .form(form)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn post_json(&self, path: &str, body: Value) -> Answer {
        Self::answer(
            self.http
                .post(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn introspect(&self, token: &str) -> Value {
        let a = self.post_form("/introspect", &[("token", token)]).await;
        assert_eq!(a.status, StatusCode::OK);
        a.body
    }

    /// Dovecot's grant request, exactly as Dovecot 2.3 sends it (the `@` unescaped).
    async fn grant(&self, username: &str, token: &str) -> Answer {
        let body = format!(
            "grant_type=password&username={username}&password={token}&client_id=dovecot&client_secret=unused"
        );
        let resp = self
            .http
            .post(format!("{}/dovecot/grant", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        Self::answer(resp).await
    }

    async fn assert_grant_allows(&self, username: &str, token: &str) {
        let a = self.grant(username, token).await;
        assert_eq!(a.status, StatusCode::OK, "{username}: {}", a.body);
        assert_eq!(a.body["username"], username.to_ascii_lowercase());
        assert_eq!(a.body["active"], true);
        assert_eq!(a.body["token_type"], "Bearer");
        assert!(!a.body["access_token"].as_str().unwrap().is_empty());
        assert!(a.body["expires_in"].as_i64().unwrap() > 0);
    }

    async fn assert_grant_denies(&self, username: &str, token: &str, reason: &str) {
        let a = self.grant(username, token).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{username}: {}", a.body);
        assert_eq!(a.body["error"], "invalid_grant");
        let description = a.body["error_description"].as_str().unwrap();
        assert!(
            description.contains(reason),
            "{username}: {description:?} lacks {reason:?}"
        );
    }
}

fn is_guid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

/// (what, tenant, form, status, `error`, AADSTS code, text the description contains)
type ErrorCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    u16,
    &'static str,
    u32,
    &'static str,
);

/// Microsoft's error shape: status, `error`, `error_codes`, description `AADSTS<code>: …\r\nTrace ID: …`, ids, time.
fn assert_aad(a: &Answer, status: u16, error: &str, code: u32) -> String {
    let b = &a.body;
    assert_eq!(a.status.as_u16(), status, "{b}");
    assert_eq!(b["error"], error, "{b}");
    assert_eq!(b["error_codes"], json!([code]), "{b}");
    let trace_id = b["trace_id"].as_str().unwrap();
    let correlation_id = b["correlation_id"].as_str().unwrap();
    let timestamp = b["timestamp"].as_str().unwrap();
    assert!(is_guid(trace_id), "{b}");
    assert!(
        is_guid(correlation_id) || correlation_id == "my-correlation-0001",
        "{b}"
    );
    assert!(
        chrono::NaiveDateTime::parse_from_str(timestamp, "%Y-%m-%d %H:%M:%SZ").is_ok(),
        "{timestamp}"
    );
    let description = b["error_description"].as_str().unwrap();
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    let tail = format!(
        "\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
    );
    assert!(description.ends_with(&tail), "{description:?}");
    assert_eq!(
        b["error_uri"],
        format!("https://login.microsoftonline.com/error?code={code}")
    );
    assert_eq!(a.headers["content-type"], "application/json; charset=utf-8");
    assert!(
        a.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("no-store")
    );
    description.to_owned()
}

#[tokio::test]
async fn client_credentials_for_imap_smtp_and_graph_by_tenant_id_name_and_domain() {
    let sb = start().await;
    for tenant in [TENANT_ID, TENANT_NAME, "CONTOSO.COM"] {
        for (scope, audience, roles) in [
            (
                IMAP_DEFAULT,
                IMAP,
                vec!["IMAP.AccessAsApp", "SMTP.SendAsApp"],
            ),
            (
                SMTP_DEFAULT,
                SMTP,
                vec!["IMAP.AccessAsApp", "SMTP.SendAsApp"],
            ),
            (
                "https://graph.microsoft.com/.default",
                "https://graph.microsoft.com",
                vec![],
            ),
        ] {
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", SVC),
                ("client_secret", SVC_SECRET),
                ("scope", scope),
            ];
            let a = sb.token(tenant, &form).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
            assert_eq!(a.headers["content-type"], "application/json; charset=utf-8");
            assert!(
                a.headers["cache-control"]
                    .to_str()
                    .unwrap()
                    .contains("no-store")
            );
            let keys: Vec<&str> = a
                .body
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys.len(), 4, "{}", a.body);
            assert_eq!(a.body["token_type"], "Bearer");
            assert_eq!(a.body["expires_in"], 3599);
            assert_eq!(a.body["ext_expires_in"], 3599);
            let token = a.body["access_token"].as_str().unwrap();
            assert!(
                (1500..=3072).contains(&token.len()),
                "token of {} bytes",
                token.len()
            );
            let info = sb.idp.tokens().validate(token).unwrap();
            assert_eq!(info.tenant_id, TENANT_ID);
            assert_eq!(info.audience, audience);
            assert_eq!(
                info.kind,
                TokenKind::App {
                    client_id: SVC.into(),
                    roles: roles.iter().map(|r| r.to_string()).collect()
                }
            );
        }
    }
}

#[tokio::test]
async fn ropc_for_anna_returns_scopes_and_a_refresh_token_that_redeems() {
    let sb = start().await;
    let form = [
        ("grant_type", "password"),
        ("client_id", DELEGATED),
        ("username", "Anna@Contoso.com"),
        ("password", "Anna-Passw0rd!"),
        ("scope", ANNA_IMAP),
    ];
    let a = sb.token(TENANT_NAME, &form).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(
        a.body["scope"],
        "https://outlook.office365.com/IMAP.AccessAsUser.All"
    );
    assert_eq!(a.body["expires_in"], 3599);
    assert_eq!(a.body["ext_expires_in"], 3599);
    let token = a.body["access_token"].as_str().unwrap();
    assert!((1500..=3072).contains(&token.len()));
    let info = sb.idp.tokens().validate(token).unwrap();
    assert_eq!(info.audience, IMAP);
    assert_eq!(
        info.kind,
        TokenKind::User {
            client_id: DELEGATED.into(),
            upn: "anna@contoso.com".into(),
            scopes: vec!["IMAP.AccessAsUser.All".into()]
        }
    );
    let refresh = a.body["refresh_token"].as_str().unwrap().to_owned();

    // Redeem for SMTP (another resource of the same consent), then with the original scope by default.
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", DELEGATED),
        ("refresh_token", &refresh),
        (
            "scope",
            "https://outlook.office.com/SMTP.Send offline_access",
        ),
    ];
    let r = sb.token(TENANT_ID, &form).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["scope"], "https://outlook.office.com/SMTP.Send");
    let info = sb
        .idp
        .tokens()
        .validate(r.body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(info.audience, SMTP);
    assert_eq!(info.upn(), Some("anna@contoso.com"));
    let rotated = r.body["refresh_token"].as_str().unwrap();
    assert_ne!(rotated, refresh);
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", DELEGATED),
        ("refresh_token", rotated),
    ];
    let r = sb.token(TENANT_ID, &form).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["scope"],
        "https://outlook.office365.com/IMAP.AccessAsUser.All"
    );

    // Without offline_access: no refresh token. `.default` grants every consented Exchange permission.
    let form = [
        ("grant_type", "password"),
        ("client_id", DELEGATED),
        ("username", "anna@contoso.com"),
        ("password", "Anna-Passw0rd!"),
        ("scope", IMAP_DEFAULT),
    ];
    let a = sb.token(TENANT_ID, &form).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(a.body.get("refresh_token").is_none());
    assert_eq!(
        a.body["scope"],
        "https://outlook.office365.com/IMAP.AccessAsUser.All https://outlook.office365.com/SMTP.Send"
    );
}

#[tokio::test]
async fn every_aadsts_error_has_microsofts_status_and_shape() {
    let sb = start().await;
    let cc = |client: &'static str, secret: &'static str, scope: &'static str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_secret", secret),
            ("scope", scope),
        ]
    };
    let ropc = |user: &'static str, password: &'static str, scope: &'static str| {
        vec![
            ("grant_type", "password"),
            ("client_id", DELEGATED),
            ("username", user),
            ("password", password),
            ("scope", scope),
        ]
    };
    let cases: Vec<ErrorCase> = vec![
        (
            "unknown tenant",
            "nowhere.onmicrosoft.com",
            cc(SVC, SVC_SECRET, IMAP_DEFAULT),
            400,
            "invalid_request",
            90002,
            "Tenant 'nowhere.onmicrosoft.com' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
        ),
        (
            "unknown tenant wins over unknown app",
            "nowhere",
            cc("00000000-0000-0000-0000-000000000000", "x", "y"),
            400,
            "invalid_request",
            90002,
            "Tenant 'nowhere'",
        ),
        (
            "unknown app",
            TENANT_ID,
            cc(
                "00000000-0000-0000-0000-000000000000",
                SVC_SECRET,
                IMAP_DEFAULT,
            ),
            400,
            "unauthorized_client",
            700016,
            "Application with identifier '00000000-0000-0000-0000-000000000000' was not found in the directory 'contoso.onmicrosoft.com'.",
        ),
        (
            "app of another tenant",
            TENANT_ID,
            cc(FAB, FAB_SECRET, IMAP_DEFAULT),
            400,
            "unauthorized_client",
            700016,
            FAB,
        ),
        (
            "wrong secret",
            TENANT_ID,
            cc(SVC, "wrong", IMAP_DEFAULT),
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5'.",
        ),
        (
            "secret id instead of value",
            TENANT_ID,
            cc(SVC, SVC_SECRET_ID, IMAP_DEFAULT),
            401,
            "invalid_client",
            7000215,
            "not the client secret ID",
        ),
        (
            "credentials before scope",
            TENANT_ID,
            cc(SVC, "wrong", "bogus"),
            401,
            "invalid_client",
            7000215,
            "Invalid client secret",
        ),
        (
            "expired secret",
            TENANT_ID,
            cc(SVC, SVC_EXPIRED_SECRET, IMAP_DEFAULT),
            401,
            "invalid_client",
            7000222,
            "The provided client secret keys for app '6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5' are expired. Visit the Azure portal to create new keys for your app",
        ),
        (
            "no secret",
            TENANT_ID,
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", SVC),
                ("scope", IMAP_DEFAULT),
            ],
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ),
        (
            "confidential ROPC without secret",
            TENANT_ID,
            vec![
                ("grant_type", "password"),
                ("client_id", SVC),
                ("username", "anna@contoso.com"),
                ("password", "Anna-Passw0rd!"),
                ("scope", ANNA_IMAP),
            ],
            401,
            "invalid_client",
            7000218,
            "'client_assertion' or 'client_secret'",
        ),
        (
            "public client with a secret",
            TENANT_ID,
            vec![
                ("grant_type", "password"),
                ("client_id", DELEGATED),
                ("client_secret", "x"),
                ("username", "anna@contoso.com"),
                ("password", "Anna-Passw0rd!"),
                ("scope", ANNA_IMAP),
            ],
            401,
            "invalid_client",
            700025,
            "Client is public",
        ),
        (
            "bad password",
            TENANT_ID,
            ropc("anna@contoso.com", "wrong", ANNA_IMAP),
            400,
            "invalid_grant",
            50126,
            "Error validating credentials due to invalid username or password.",
        ),
        (
            "bad password before MFA",
            TENANT_ID,
            ropc("ben@contoso.com", "wrong", ANNA_IMAP),
            400,
            "invalid_grant",
            50126,
            "invalid username or password",
        ),
        (
            "unknown user",
            TENANT_ID,
            ropc("nobody@contoso.com", "x", ANNA_IMAP),
            400,
            "invalid_grant",
            50034,
            "The user account {EUII Hidden} does not exist in the 9f3c2b1a-5d4e-4f60-8a7b-0c1d2e3f4a5b directory.",
        ),
        (
            "user of another tenant",
            TENANT_ID,
            ropc("info@fabrikam.com", "Fab-Passw0rd!", ANNA_IMAP),
            400,
            "invalid_grant",
            50034,
            "does not exist",
        ),
        (
            "shared mailbox has no account",
            TENANT_ID,
            ropc("support@contoso.com", "x", ANNA_IMAP),
            400,
            "invalid_grant",
            50034,
            "does not exist",
        ),
        (
            "MFA",
            TENANT_ID,
            ropc("ben@contoso.com", "Ben-Passw0rd!", ANNA_IMAP),
            400,
            "invalid_grant",
            50076,
            "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
        ),
        (
            "no admin consent",
            TENANT_ID,
            cc(NO_CONSENT, NO_CONSENT_SECRET, IMAP_DEFAULT),
            400,
            "invalid_grant",
            65001,
            "The user or administrator has not consented to use the application with ID '7a7a7a7a-0000-4000-8000-000000000065' named 'no-consent'. Send an interactive authorization request for this user and resource.",
        ),
        (
            "consent before scope",
            TENANT_ID,
            cc(NO_CONSENT, NO_CONSENT_SECRET, "bogus"),
            400,
            "invalid_grant",
            65001,
            "has not consented",
        ),
        (
            "delegated permission not consented",
            TENANT_ID,
            vec![
                ("grant_type", "password"),
                ("client_id", SVC),
                ("client_secret", SVC_SECRET),
                ("username", "anna@contoso.com"),
                ("password", "Anna-Passw0rd!"),
                ("scope", ANNA_IMAP),
            ],
            400,
            "invalid_grant",
            65001,
            "named 'mailqueue-service'",
        ),
        (
            ".default combined",
            TENANT_ID,
            cc(
                SVC,
                SVC_SECRET,
                "https://outlook.office365.com/.default offline_access",
            ),
            400,
            "invalid_scope",
            70011,
            "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid.",
        ),
        (
            "unknown delegated permission",
            TENANT_ID,
            ropc(
                "anna@contoso.com",
                "Anna-Passw0rd!",
                "https://outlook.office365.com/Bogus.Scope",
            ),
            400,
            "invalid_scope",
            70011,
            "is not valid",
        ),
        (
            "two resources",
            TENANT_ID,
            ropc(
                "anna@contoso.com",
                "Anna-Passw0rd!",
                "https://outlook.office365.com/IMAP.AccessAsUser.All https://graph.microsoft.com/User.Read",
            ),
            400,
            "invalid_scope",
            70011,
            "more than one resource",
        ),
        (
            "client credentials without .default",
            TENANT_ID,
            cc(
                SVC,
                SVC_SECRET,
                "https://outlook.office365.com/IMAP.AccessAsApp",
            ),
            400,
            "invalid_scope",
            1002012,
            "Client credential flows must have a scope value with /.default suffixed",
        ),
        (
            "unknown resource",
            TENANT_ID,
            cc(SVC, SVC_SECRET, "https://mail.example.com/.default"),
            400,
            "invalid_resource",
            500011,
            "The resource principal named https://mail.example.com was not found in the tenant named contoso.onmicrosoft.com.",
        ),
        (
            "missing grant_type",
            TENANT_ID,
            vec![("client_id", SVC)],
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        ),
        (
            "missing client_id",
            TENANT_ID,
            vec![("grant_type", "client_credentials")],
            400,
            "invalid_request",
            900144,
            "parameter: 'client_id'.",
        ),
        (
            "missing scope",
            TENANT_ID,
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", SVC),
                ("client_secret", SVC_SECRET),
            ],
            400,
            "invalid_request",
            900144,
            "'scope'",
        ),
        (
            "missing password",
            TENANT_ID,
            vec![
                ("grant_type", "password"),
                ("client_id", DELEGATED),
                ("username", "anna@contoso.com"),
                ("scope", ANNA_IMAP),
            ],
            400,
            "invalid_request",
            900144,
            "'password'",
        ),
        (
            "missing refresh_token",
            TENANT_ID,
            vec![("grant_type", "refresh_token"), ("client_id", DELEGATED)],
            400,
            "invalid_request",
            900144,
            "'refresh_token'",
        ),
        (
            "bad refresh token",
            TENANT_ID,
            vec![
                ("grant_type", "refresh_token"),
                ("client_id", DELEGATED),
                ("refresh_token", "1.AQnotarealtoken"),
            ],
            400,
            "invalid_grant",
            70000,
            "Provided grant is invalid or malformed.",
        ),
        (
            "unsupported grant type",
            TENANT_ID,
            vec![("grant_type", "urn:example:magic"), ("client_id", SVC)],
            400,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type 'urn:example:magic'.",
        ),
    ];
    for (what, tenant, form, status, error, code, text) in cases {
        let a = sb.token(tenant, &form).await;
        let description = assert_aad(&a, status, error, code);
        assert!(
            description.contains(text),
            "{what}: {description:?} lacks {text:?}"
        );
    }

    // Suberrors as Entra sends them; the correlation id echoes client-request-id.
    let a = sb
        .token(
            TENANT_ID,
            &ropc("ben@contoso.com", "Ben-Passw0rd!", ANNA_IMAP),
        )
        .await;
    assert_eq!(a.body["suberror"], "basic_action");
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains(EXCHANGE_APP_ID)
    );
    let a = sb
        .token(TENANT_ID, &cc(NO_CONSENT, NO_CONSENT_SECRET, IMAP_DEFAULT))
        .await;
    assert_eq!(a.body["suberror"], "consent_required");
    let resp = sb
        .http
        .post(format!("{}/{TENANT_ID}/oauth2/v2.0/token", sb.base))
        .header("client-request-id", "my-correlation-0001")
        .form(&cc(SVC, "wrong", IMAP_DEFAULT))
        .send()
        .await
        .unwrap();
    let a = Sandbox::answer(resp).await;
    let description = assert_aad(&a, 401, "invalid_client", 7000215);
    assert_eq!(a.body["correlation_id"], "my-correlation-0001");
    assert!(description.contains("\r\nCorrelation ID: my-correlation-0001\r\n"));

    // A refresh token only redeems for the app it was issued to.
    let refresh = sb
        .token(
            TENANT_ID,
            &ropc("anna@contoso.com", "Anna-Passw0rd!", ANNA_IMAP),
        )
        .await
        .body["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", SVC),
        ("client_secret", SVC_SECRET),
        ("refresh_token", &refresh),
    ];
    assert_aad(
        &sb.token(TENANT_ID, &form).await,
        400,
        "invalid_grant",
        70000,
    );

    // GET on the token endpoint.
    let a = Sandbox::answer(
        sb.http
            .get(format!("{}/{TENANT_ID}/oauth2/v2.0/token", sb.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let description = assert_aad(&a, 400, "invalid_request", 900561);
    assert!(description.contains("Received a GET request."));
}

#[tokio::test]
async fn introspection_reports_active_and_inactive_tokens() {
    let sb = start().await;
    let app = sb
        .client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let i = sb.introspect(&app).await;
    assert_eq!(i["active"], true);
    assert_eq!(i["client_id"], SVC);
    assert_eq!(i["sub"], SVC);
    assert_eq!(i["tid"], TENANT_ID);
    assert_eq!(i["aud"], IMAP);
    assert_eq!(i["username"], "");
    assert_eq!(i["roles"], "IMAP.AccessAsApp SMTP.SendAsApp");
    assert_eq!(i["scope"], "");
    assert!(
        i["mailboxes"]
            .as_str()
            .unwrap()
            .contains(",support@contoso.com,")
    );
    let exp = i["exp"].as_i64().unwrap() - chrono::Utc::now().timestamp();
    assert!((3590..=3600).contains(&exp), "{exp}");

    let form = [
        ("grant_type", "password"),
        ("client_id", DELEGATED),
        ("username", "anna@contoso.com"),
        ("password", "Anna-Passw0rd!"),
        ("scope", ANNA_IMAP),
    ];
    let user = sb.access_token(TENANT_ID, &form).await;
    let i = sb.introspect(&user).await;
    assert_eq!(
        (i["active"].clone(), i["username"].clone(), i["sub"].clone()),
        (
            json!(true),
            json!("anna@contoso.com"),
            json!("anna@contoso.com")
        )
    );
    assert_eq!(i["scope"], "IMAP.AccessAsUser.All");
    assert_eq!(i["client_id"], DELEGATED);
    assert_eq!(i["roles"], "");

    // Also as a bearer header (Dovecot's `introspection_mode = auth`).
    let resp = sb
        .http
        .get(format!("{}/introspect", sb.base))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(Sandbox::answer(resp).await.body["active"], true);

    let (expired, _) = sb
        .idp
        .mint(&MintRequest::app(TENANT_ID, SVC, IMAP, &["IMAP.AccessAsApp"]).lifetime(-5))
        .unwrap();
    assert_eq!(sb.introspect(&expired).await, json!({ "active": false }));
    let mut tampered = app.clone();
    let at = tampered.len() / 2;
    let c = if &app[at..=at] == "A" { "B" } else { "A" };
    tampered.replace_range(at..=at, c);
    assert_eq!(sb.introspect(&tampered).await, json!({ "active": false }));
    assert!(sb.idp.revoke(&app));
    assert_eq!(sb.introspect(&app).await, json!({ "active": false }));
    assert_eq!(
        sb.introspect("not-a-token").await,
        json!({ "active": false })
    );
}

#[tokio::test]
async fn dovecot_grant_applies_exchanges_imap_rules() {
    let sb = start().await;
    let svc = sb
        .client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    sb.assert_grant_allows("support@contoso.com", &svc).await;
    sb.assert_grant_allows("Sales@Contoso.com", &svc).await;
    sb.assert_grant_denies("anna@contoso.com", &svc, "FullAccess")
        .await;
    sb.assert_grant_denies("nobody@contoso.com", &svc, "no such mailbox")
        .await;

    // The SMTP-audience token of the same app does not open IMAP.
    let svc_smtp = sb
        .client_credentials(SVC, SVC_SECRET, SMTP_DEFAULT)
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    sb.assert_grant_denies("support@contoso.com", &svc_smtp, "audience")
        .await;

    // An app with the role but no FullAccess; the service app's identity without the role.
    let imap_only = sb
        .client_credentials(IMAP_ONLY, IMAP_ONLY_SECRET, IMAP_DEFAULT)
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    sb.assert_grant_denies("support@contoso.com", &imap_only, "FullAccess")
        .await;
    let (no_role, _) = sb
        .idp
        .mint(&MintRequest::app(TENANT_ID, SVC, IMAP, &["SMTP.SendAsApp"]))
        .unwrap();
    sb.assert_grant_denies("support@contoso.com", &no_role, "IMAP.AccessAsApp")
        .await;

    // Another tenant's app, and its token against its own mailbox.
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", FAB),
        ("client_secret", FAB_SECRET),
        ("scope", IMAP_DEFAULT),
    ];
    let fab = sb.access_token(FAB_TENANT_ID, &form).await;
    sb.assert_grant_denies("support@contoso.com", &fab, "another tenant")
        .await;
    sb.assert_grant_allows("info@fabrikam.com", &fab).await;

    // Delegated: only the user's own mailbox.
    let form = [
        ("grant_type", "password"),
        ("client_id", DELEGATED),
        ("username", "anna@contoso.com"),
        ("password", "Anna-Passw0rd!"),
        ("scope", ANNA_IMAP),
    ];
    let anna = sb.access_token(TENANT_ID, &form).await;
    sb.assert_grant_allows("anna@contoso.com", &anna).await;
    sb.assert_grant_denies("support@contoso.com", &anna, "own mailbox")
        .await;
    sb.assert_grant_denies("ben@contoso.com", &anna, "own mailbox")
        .await;

    // Expired, revoked, tampered and missing tokens.
    let (expired, _) = sb
        .idp
        .mint(&MintRequest::app(TENANT_ID, SVC, IMAP, &["IMAP.AccessAsApp"]).lifetime(-1))
        .unwrap();
    sb.assert_grant_denies("support@contoso.com", &expired, "expired")
        .await;
    let mut tampered = svc.clone();
    tampered.truncate(svc.len() - 3);
    tampered.push_str("AAA");
    sb.assert_grant_denies("support@contoso.com", &tampered, "unknown or tampered")
        .await;
    assert!(sb.idp.revoke(&svc));
    sb.assert_grant_denies("support@contoso.com", &svc, "revoked")
        .await;
    let a = sb
        .post_form(
            "/dovecot/grant",
            &[
                ("grant_type", "password"),
                ("username", "support@contoso.com"),
            ],
        )
        .await;
    assert_eq!(
        (a.status, a.body["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_grant"))
    );

    // A mailbox and a FullAccess grant added at runtime take effect at the next login.
    let svc = sb
        .client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    sb.assert_grant_denies("queue7@contoso.com", &svc, "no such mailbox")
        .await;
    sb.idp.update_world(|w| {
        w.mailboxes.push(Mailbox {
            address: "queue7@contoso.com".into(),
            smtp_auth: true,
            send_as: vec![],
        });
        w.apps
            .iter_mut()
            .find(|a| a.client_id == SVC)
            .unwrap()
            .full_access
            .push("queue7@contoso.com".into());
    });
    sb.assert_grant_allows("queue7@contoso.com", &svc).await;
    assert!(sb.idp.world().mailbox("queue7@contoso.com").is_some());
}

#[tokio::test]
async fn faults_throttle_fail_and_delay_the_next_token_requests() {
    let sb = start().await;
    let a = sb
        .post_json(
            "/_sandbox/faults",
            json!({ "status": 429, "count": 2, "retry_after_seconds": 7 }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    for _ in 0..2 {
        let a = sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT).await;
        let description = assert_aad(&a, 429, "temporarily_unavailable", 50196);
        assert!(description.contains("client request loop"));
        assert_eq!(a.headers["retry-after"], "7");
    }
    assert_eq!(
        sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
            .await
            .status,
        StatusCode::OK
    );

    sb.post_json("/_sandbox/faults", json!({ "status": 503, "count": 1 }))
        .await;
    let a = sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT).await;
    assert_aad(&a, 503, "temporarily_unavailable", 90033);
    assert_eq!(
        sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
            .await
            .status,
        StatusCode::OK
    );

    sb.post_json("/_sandbox/faults", json!({ "delay_ms": 400, "count": 1 }))
        .await;
    let t = Instant::now();
    assert_eq!(
        sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
            .await
            .status,
        StatusCode::OK
    );
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(
        sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
            .await
            .status,
        StatusCode::OK
    );
    assert!(t.elapsed() < Duration::from_millis(300));

    // Faults queue in order; the Rust API does the same; bad hook bodies are refused.
    sb.idp.inject_fault(
        Fault::Unavailable {
            retry_after_seconds: Some(3),
        },
        1,
    );
    sb.idp.inject_fault(
        Fault::Throttle {
            retry_after_seconds: 2,
        },
        1,
    );
    let a = sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT).await;
    assert_eq!(
        (
            a.status.as_u16(),
            a.headers["retry-after"].to_str().unwrap()
        ),
        (503, "3")
    );
    let a = sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT).await;
    assert_eq!(
        (
            a.status.as_u16(),
            a.headers["retry-after"].to_str().unwrap()
        ),
        (429, "2")
    );
    sb.idp.inject_fault(
        Fault::Throttle {
            retry_after_seconds: 2,
        },
        5,
    );
    sb.idp.clear_faults();
    assert_eq!(
        sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        sb.post_json("/_sandbox/faults", json!({ "status": 500 }))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn lifetime_hook_sets_expires_in_of_new_tokens() {
    let sb = start().await;
    let a = sb
        .post_json("/_sandbox/lifetime", json!({ "seconds": 1 }))
        .await;
    assert_eq!(a.body["lifetime_seconds"], 1);
    let a = sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT).await;
    assert_eq!(
        (
            a.body["expires_in"].clone(),
            a.body["ext_expires_in"].clone()
        ),
        (json!(1), json!(1))
    );
    let token = a.body["access_token"].as_str().unwrap().to_owned();
    sb.assert_grant_allows("support@contoso.com", &token).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sb.assert_grant_denies("support@contoso.com", &token, "expired")
        .await;
    assert_eq!(sb.introspect(&token).await["active"], false);
    sb.idp.set_lifetime(3599);
    assert_eq!(
        sb.client_credentials(SVC, SVC_SECRET, IMAP_DEFAULT)
            .await
            .body["expires_in"],
        3599
    );
}

#[tokio::test]
async fn mint_revoke_world_and_discovery_hooks() {
    let sb = start().await;
    let a = sb
        .post_json(
            "/_sandbox/token",
            json!({ "tenant": TENANT_NAME, "kind": "user", "client_id": DELEGATED, "upn": "anna@contoso.com",
                    "audience": IMAP, "scopes": ["IMAP.AccessAsUser.All"], "lifetime_seconds": 600 }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["expires_in"], 600);
    let token = a.body["access_token"].as_str().unwrap().to_owned();
    assert!((1500..=3072).contains(&token.len()));
    sb.assert_grant_allows("anna@contoso.com", &token).await;
    let a = sb
        .post_json("/_sandbox/revoke", json!({ "token": token }))
        .await;
    assert_eq!(a.body["revoked"], true);
    sb.assert_grant_denies("anna@contoso.com", &token, "revoked")
        .await;
    assert_eq!(
        sb.post_json("/_sandbox/revoke", json!({ "token": "nope" }))
            .await
            .body["revoked"],
        false
    );

    // App token with the app's roles by default, already expired.
    let a = sb
        .post_json("/_sandbox/token", json!({ "tenant": TENANT_ID, "kind": "app", "client_id": SVC, "lifetime_seconds": -30 }))
        .await;
    assert_eq!(a.body["expires_in"], -30);
    assert_eq!(
        sb.introspect(a.body["access_token"].as_str().unwrap())
            .await["active"],
        false
    );
    let a = sb
        .post_json(
            "/_sandbox/token",
            json!({ "tenant": TENANT_ID, "kind": "user", "client_id": DELEGATED }),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let (t, info) = sb
        .idp
        .mint(&MintRequest::app(TENANT_ID, SVC, IMAP, &[]))
        .unwrap();
    assert!(sb.idp.tokens().validate(&t).is_ok());
    assert_eq!(
        info.expires_at - info.issued_at,
        chrono::Duration::seconds(3599)
    );

    let resp = sb
        .http
        .get(format!("{}/_sandbox/world", sb.base))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(SVC_SECRET) && !text.contains("Anna-Passw0rd!"),
        "the summary leaks secrets"
    );
    let w: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(w["tenants"][0]["id"], TENANT_ID);
    assert!(
        w["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["client_id"] == SVC && a["secrets"][1]["expired"] == true)
    );
    assert!(
        w["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["address"] == "support@contoso.com")
    );

    let d = Sandbox::answer(
        sb.http
            .get(format!(
                "{}/{TENANT_NAME}/v2.0/.well-known/openid-configuration",
                sb.base
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        d.body["token_endpoint"],
        format!("{}/{TENANT_ID}/oauth2/v2.0/token", sb.base)
    );
    assert_eq!(
        d.body["issuer"],
        format!("https://login.microsoftonline.com/{TENANT_ID}/v2.0")
    );
    let d = Sandbox::answer(
        sb.http
            .get(format!(
                "{}/nowhere/v2.0/.well-known/openid-configuration",
                sb.base
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(d.status, StatusCode::BAD_REQUEST);
    assert!(
        d.body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS90002: ")
    );
}

#[tokio::test]
async fn serve_stops_on_cancel() {
    let idp = Idp::new(World::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(idp.serve(listener, stop.clone()));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns after cancel")
        .unwrap();
}

/// Python's urllib as an independent client: the token endpoint's JSON and errors, and the grant endpoint.
#[tokio::test]
async fn python_urllib_client_sees_the_same_answers() {
    let sb = start().await;
    let script = r#"
import json, sys, urllib.parse, urllib.request, urllib.error
base, tenant, client_id, secret = sys.argv[1:5]
def post(path, data):
    req = urllib.request.Request(base + path, data=data.encode(), method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers.get("Content-Type"), json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), json.load(e)
form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                               "client_secret": secret, "scope": "https://outlook.office365.com/.default"})
ok = post("/%s/oauth2/v2.0/token" % tenant, form)
bad = post("/%s/oauth2/v2.0/token" % tenant, form.replace("Secret", "Wrong"))
token = ok[2]["access_token"]
grant = post("/dovecot/grant", "grant_type=password&username=support@contoso.com&password=%s&client_id=dovecot&client_secret=unused" % token)
deny = post("/dovecot/grant", "grant_type=password&username=vip2@contoso.com&password=%s&client_id=dovecot&client_secret=unused" % token)
print(json.dumps({"ok": ok, "bad": bad, "grant": grant, "deny": deny, "len": len(token),
                  "ok_keys": list(ok[2]), "bad_keys": list(bad[2])}))
"#;
    let (base, tenant) = (sb.base.clone(), TENANT_NAME);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, &base, tenant, SVC, SVC_SECRET])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"][0], 200);
    assert_eq!(v["ok"][1], "application/json; charset=utf-8");
    assert_eq!(v["ok"][2]["token_type"], "Bearer");
    assert!((1500..=3072).contains(&v["len"].as_u64().unwrap()));
    assert_eq!(
        (v["bad"][0].clone(), v["bad"][2]["error_codes"][0].clone()),
        (json!(401), json!(7000215))
    );
    // Field order as Entra writes it (Python's json keeps it).
    assert_eq!(
        v["ok_keys"],
        json!(["token_type", "expires_in", "ext_expires_in", "access_token"])
    );
    assert_eq!(
        v["bad_keys"],
        json!([
            "error",
            "error_description",
            "error_codes",
            "timestamp",
            "trace_id",
            "correlation_id",
            "error_uri"
        ])
    );
    assert_eq!(v["grant"][0], 200);
    assert_eq!(v["grant"][2]["username"], "support@contoso.com");
    assert_eq!(
        (v["deny"][0].clone(), v["deny"][2]["error"].clone()),
        (json!(400), json!("invalid_grant"))
    );
}
