//! The sandbox's IMAP side, checked with clients that are not ours: Python's imaplib (`tests/imap_client.py`) for
//! logins, STARTTLS and SELECT, and async-imap (the engine's client) for IDLE. One shared sandbox per test process;
//! every test works on mailboxes of its own (`Sandbox::new_mailbox`).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use async_imap::extensions::idle::IdleResponse;
use mailqueue_sandbox::{
    Sandbox,
    idp::MintRequest,
    sandbox::{IMAP_AUDIENCE, SMTP_AUDIENCE},
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream, rustls::pki_types::ServerName};

/// Refusals must come at once: Dovecot's auth-failure tarpit (2 s and more) must be off.
const QUICK_MS: f64 = 1500.0;

const FABRIKAM_APP: &str = "3d3d3d3d-0000-4000-8000-0000000fab01";
const IMAP_ONLY_APP: &str = "5b5b5b5b-0000-4000-8000-0000000000b5";

#[derive(Clone, Copy)]
enum Tls {
    Implicit,
    Starttls,
    None,
}

/// One login attempt for the Python client.
fn case(sb: &Sandbox, tls: Tls, user: &str, token: &str) -> Value {
    let (port, mode) = match tls {
        Tls::Implicit => (sb.imaps_port(), "implicit"),
        Tls::Starttls => (sb.imap_port(), "starttls"),
        Tls::None => (sb.imap_port(), "none"),
    };
    json!({ "port": port, "tls": mode, "mech": "XOAUTH2", "user": user, "token": token, "select": true })
}

/// Runs the cases through `tests/imap_client.py`; one result per case.
async fn python_imap(sb: &Sandbox, cases: Vec<Value>) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/imap_client.py");
    let request = json!({ "ca": sb.ca_file(), "host": sb.mail_host().to_string(), "cases": cases });
    let mut child = tokio::process::Command::new("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs it)");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(request.to_string().as_bytes())
            .await
            .unwrap();
    }
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "imap_client.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "bad output {e}: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn service_token(sb: &Sandbox, audience: &str, roles: &[&str]) -> String {
    let app = &sb.service_app().client_id;
    sb.idp()
        .mint(&MintRequest::app(sb.tenant_id(), app, audience, roles))
        .unwrap()
        .0
}

fn imap_app_token(sb: &Sandbox) -> String {
    service_token(sb, IMAP_AUDIENCE, &["IMAP.AccessAsApp"])
}

fn user_token(sb: &Sandbox, upn: &str) -> String {
    let client = sb
        .public_client_id()
        .expect("the default world has a public client");
    sb.idp()
        .mint(&MintRequest::user(
            sb.tenant_id(),
            client,
            upn,
            IMAP_AUDIENCE,
            &["IMAP.AccessAsUser.All"],
        ))
        .unwrap()
        .0
}

fn assert_ok(result: &Value, what: &str) {
    assert_eq!(result["ok"], true, "{what}: {result}");
}

fn assert_refused(result: &Value, what: &str) {
    assert_eq!(result["ok"], false, "{what} was let in: {result}");
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("AUTHENTICATIONFAILED"),
        "{what}: expected NO [AUTHENTICATIONFAILED], got {result}"
    );
    let ms = result["ms"].as_f64().unwrap_or(f64::MAX);
    assert!(ms < QUICK_MS, "{what}: refusal took {ms:.0} ms");
}

/// A token from the real token endpoint (client credentials), as the engine gets it.
async fn token_from_endpoint(sb: &Sandbox, scope: &str) -> String {
    let app = sb.service_app();
    let response: Value = reqwest::Client::new()
        .post(sb.token_endpoint(sb.tenant_id()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.as_str()),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {response}"))
        .to_owned()
}

#[tokio::test]
async fn app_and_delegated_tokens_log_in_over_imaps_and_starttls() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("login");
    let (upn, _) = sb.new_user("delegated");
    let app_token = token_from_endpoint(sb, "https://outlook.office365.com/.default").await;
    assert!(
        app_token.len() > 1500,
        "tokens are realistic: {}",
        app_token.len()
    );
    let own = user_token(sb, &upn);
    let mut oauthbearer = case(sb, Tls::Implicit, &mailbox, &app_token);
    oauthbearer["mech"] = json!("OAUTHBEARER");
    let results = python_imap(
        sb,
        vec![
            case(sb, Tls::Implicit, &mailbox, &app_token),
            case(sb, Tls::Starttls, &mailbox, &app_token),
            // Login names are case-insensitive, as in Exchange.
            case(sb, Tls::Implicit, &mailbox.to_uppercase(), &app_token),
            oauthbearer,
            case(sb, Tls::Implicit, &upn, &own),
            case(sb, Tls::Starttls, &upn, &own),
        ],
    )
    .await;
    for (i, r) in results.iter().enumerate() {
        assert_ok(r, &format!("case {i}"));
        assert_eq!(r["exists"], 0, "case {i}: {r}");
    }
    let folders = results[0]["folders"].to_string();
    for special in [
        r#"\\Sent) \"/\" \"Sent Items\""#,
        r"\\Drafts",
        r#"\"Deleted Items\""#,
        r#"\"Junk Email\""#,
        r"\\Archive",
    ] {
        assert!(folders.contains(special), "{special} missing: {folders}");
    }
    assert!(
        results[0]["caps"].to_string().contains("AUTH=XOAUTH2"),
        "{}",
        results[0]
    );
}

#[tokio::test]
async fn bad_tokens_and_foreign_mailboxes_are_refused_quickly() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("refused");
    let (alice, _) = sb.new_user("alice");
    let (bob, _) = sb.new_user("bob");
    let tenant = sb.tenant_id();
    let app = sb.service_app().client_id.clone();
    let mint = |req: MintRequest| sb.idp().mint(&req).unwrap().0;

    let expired =
        mint(MintRequest::app(tenant, &app, IMAP_AUDIENCE, &["IMAP.AccessAsApp"]).lifetime(-60));
    let revoked = imap_app_token(sb);
    let tampered = {
        let good = imap_app_token(sb);
        let mut bytes = good.into_bytes();
        let i = bytes.len() - 10;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let other_tenant = mint(MintRequest::app(
        "fabrikam.onmicrosoft.com",
        FABRIKAM_APP,
        IMAP_AUDIENCE,
        &["IMAP.AccessAsApp"],
    ));
    let no_grants = mint(MintRequest::app(
        tenant,
        IMAP_ONLY_APP,
        IMAP_AUDIENCE,
        &["IMAP.AccessAsApp"],
    ));
    let wrong_audience = service_token(sb, SMTP_AUDIENCE, &["IMAP.AccessAsApp"]);
    let good = imap_app_token(sb);
    let alice_token = user_token(sb, &alice);

    // The revoked token works until it is revoked (no cache: the next login asks the emulator again).
    let before = python_imap(sb, vec![case(sb, Tls::Implicit, &mailbox, &revoked)]).await;
    assert_ok(&before[0], "token before revocation");
    assert!(sb.idp().revoke(&revoked));

    let cases = [
        ("expired token", case(sb, Tls::Implicit, &mailbox, &expired)),
        ("revoked token", case(sb, Tls::Implicit, &mailbox, &revoked)),
        (
            "tampered token",
            case(sb, Tls::Implicit, &mailbox, &tampered),
        ),
        (
            "other tenant's app",
            case(sb, Tls::Implicit, &mailbox, &other_tenant),
        ),
        (
            "app without FullAccess",
            case(sb, Tls::Implicit, &mailbox, &no_grants),
        ),
        (
            "SMTP audience",
            case(sb, Tls::Implicit, &mailbox, &wrong_audience),
        ),
        // The service app has no FullAccess on a user's own mailbox.
        (
            "service app → user mailbox",
            case(sb, Tls::Implicit, &bob, &good),
        ),
        (
            "delegated → other user",
            case(sb, Tls::Implicit, &bob, &alice_token),
        ),
        (
            "delegated → shared mailbox",
            case(sb, Tls::Starttls, &mailbox, &alice_token),
        ),
        ("garbage", case(sb, Tls::Starttls, &mailbox, "not-a-token")),
        (
            "unknown mailbox",
            case(sb, Tls::Implicit, "nobody-here@contoso.com", &good),
        ),
    ];
    let (names, cases): (Vec<&str>, Vec<Value>) = cases.into_iter().unzip();
    let results = python_imap(sb, cases).await;
    for (name, result) in names.iter().zip(&results) {
        assert_refused(result, name);
    }
}

#[tokio::test]
async fn the_plain_port_allows_no_authentication_before_starttls() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("plain");
    let token = imap_app_token(sb);
    let results = python_imap(sb, vec![case(sb, Tls::None, &mailbox, &token)]).await;
    let r = &results[0];
    let caps = r["caps"].to_string();
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED"),
        "{r}"
    );
    assert!(!caps.contains("AUTH="), "AUTH offered in cleartext: {r}");
    assert_eq!(r["ok"], false, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("PRIVACYREQUIRED"), "{r}");
}

#[tokio::test]
async fn select_shows_delivered_mail_and_three_kb_tokens_work() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("select");
    let messages: Vec<String> = (1..=3)
        .map(|i| format!("From: c{i}@example.com\r\nSubject: message {i}\r\n\r\nbody {i}\r\n"))
        .collect();
    for m in &messages {
        sb.deliver(&mailbox, m.as_bytes()).unwrap();
    }
    // Real Entra tokens reach 3 KB; long role claims make this one bigger than that.
    let filler: Vec<String> = (0..40)
        .map(|i| format!("Sandbox.Filler.Role.{i:03}"))
        .collect();
    let mut roles: Vec<&str> = filler.iter().map(String::as_str).collect();
    roles.push("IMAP.AccessAsApp");
    let big = service_token(sb, IMAP_AUDIENCE, &roles);
    assert!(big.len() >= 3072, "token is {} bytes", big.len());
    let mut with_fetch = case(sb, Tls::Implicit, &mailbox, &big);
    with_fetch["fetch"] = json!(1);
    let results = python_imap(
        sb,
        vec![with_fetch, case(sb, Tls::Starttls, &mailbox, &big)],
    )
    .await;
    for r in &results {
        assert_ok(r, "3 KB token");
        assert_eq!(r["exists"], 3, "{r}");
    }
    assert_eq!(results[0]["body"], messages[0].as_str());
}

/// XOAUTH2 for async-imap: the response first, an empty line to an error challenge.
struct XOAuth2(String);

impl async_imap::Authenticator for &XOAuth2 {
    type Response = String;
    fn process(&mut self, challenge: &[u8]) -> String {
        if challenge.is_empty() {
            self.0.clone()
        } else {
            String::new()
        }
    }
}

async fn imaps_session(
    sb: &Sandbox,
    user: &str,
    token: &str,
) -> async_imap::Session<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect((sb.mail_host(), sb.imaps_port()))
        .await
        .unwrap();
    let connector = TlsConnector::from(sb.certificates().client_config().unwrap());
    let name = ServerName::from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut client = async_imap::Client::new(tls);
    client.read_response().await.unwrap().expect("a greeting");
    let auth = XOAuth2(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
    client
        .authenticate("XOAUTH2", &auth)
        .await
        .map_err(|(e, _)| e)
        .unwrap()
}

/// Waits in IDLE until the server reports something; returns the time from `trigger` to the report.
async fn idle_until_new_data<F, Fut>(
    session: async_imap::Session<TlsStream<TcpStream>>,
    trigger: F,
) -> (Duration, async_imap::Session<TlsStream<TcpStream>>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut idle = session.idle();
    idle.init().await.unwrap();
    let (wait, _interrupt) = idle.wait_with_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let triggered = tokio::spawn(trigger());
    let response = wait.await.unwrap();
    let elapsed = started.elapsed();
    triggered.await.unwrap();
    // New mail, not a keep-alive (`* OK Still here`).
    assert!(
        matches!(&response, IdleResponse::NewData(data) if format!("{:?}", data.parsed()).contains("Exists")),
        "IDLE ended with {response:?}"
    );
    (elapsed, idle.done().await.unwrap())
}

#[tokio::test]
async fn idle_reports_mail_delivered_directly_and_over_smtp_within_two_seconds() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("idle");
    let mut session = imaps_session(sb, &mailbox, &imap_app_token(sb)).await;
    assert_eq!(session.select("INBOX").await.unwrap().exists, 0);

    // 1. A Maildir delivery (what `Sandbox::deliver` and `mailqueue-sandbox deliver` do).
    let raw = b"From: customer@example.com\r\nSubject: pushed\r\n\r\nhello\r\n".to_vec();
    let target = mailbox.clone();
    let mail_root = sb.mail_root().to_path_buf();
    let owner = sb.mail_owner();
    let (elapsed, mut session) = idle_until_new_data(session, move || async move {
        mailqueue_sandbox::maildir::deliver(&mail_root, &target, &raw, owner).unwrap();
    })
    .await;
    assert!(
        elapsed < Duration::from_secs(2),
        "IDLE push took {elapsed:?}"
    );
    assert_eq!(session.select("INBOX").await.unwrap().exists, 1);

    // 2. A message submitted over SMTP by another mailbox (Python's smtplib), delivered locally by the server.
    let sender = sb.new_mailbox("idle-sender");
    let smtp_token = service_token(sb, SMTP_AUDIENCE, &["SMTP.SendAsApp"]);
    let message = sb.dir().join(format!("{sender}.eml"));
    std::fs::write(
        &message,
        format!("From: {sender}\r\nTo: {mailbox}\r\nSubject: over smtp\r\n\r\nhi\r\n"),
    )
    .unwrap();
    let args = json!({
        "host": sb.mail_host().to_string(), "port": sb.smtp_port(), "ca": sb.ca_file(), "mode": "starttls",
        "user": sender, "token": smtp_token, "mail_from": sender, "rcpt_to": [mailbox],
        "message_file": message,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_client.py");
    let (elapsed, mut session) = idle_until_new_data(session, move || async move {
        let out = tokio::process::Command::new("python3")
            .arg(&script)
            .arg(args.to_string())
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("\"ok\": true"),
            "smtplib: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
    assert!(
        elapsed < Duration::from_secs(2),
        "IDLE push after SMTP took {elapsed:?}"
    );
    assert_eq!(session.select("INBOX").await.unwrap().exists, 2);
    assert!(
        sb.sent().iter().any(|e| e.user == sender
            && e.delivered_to
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&mailbox))),
        "the SMTP server recorded the message: {:?}",
        sb.sent()
    );
    session.logout().await.unwrap();
}
