//! The SMTP connector against the sandbox's Exchange-like submission server (127.0.0.2, STARTTLS and implicit TLS,
//! XOAUTH2 checked against the Entra ID emulator). One shared sandbox per test process: every test sends from and to
//! mailboxes of its own (`Sandbox::new_mailbox`). Fault injection and a small size limit use private SMTP servers
//! (same certificates and identity provider), because faults armed on the shared server would hit other tests.
//! The one test that shortens token lifetimes holds [`LIFETIME`] exclusively and restores the lifetime.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use mailqueue_config::model::{AuthType, EmailAddress, OutgoingServer, Secret, SecretSource};
use mailqueue_connectors::{
    oauth::{SMTP_SERVICE_SCOPE, TokenCache, TokenRequest},
    smtp::{
        Envelope, SenderOptions, SmtpError, SmtpErrorKind, SmtpFailure, SmtpSender, TlsProblem,
    },
};
use mailqueue_sandbox::{
    Sandbox,
    idp::Idp,
    maildir,
    smtp::{FaultAction, FaultPoint, SmtpAuthority, SmtpFault, SmtpOptions, SmtpServer},
    tokens::{TokenError, TokenInfo},
    world::SmtpDenial,
};
use tokio::{net::TcpListener, sync::RwLock};
use tokio_util::sync::CancellationToken;

/// Shared by every test; taken exclusively by the one that shortens token lifetimes.
static LIFETIME: RwLock<()> = RwLock::const_new(());

const FABRIKAM: &str = "fabrikam.onmicrosoft.com";

fn secret(value: &str) -> Secret {
    Secret::new(SecretSource::Inline(value.into()), Some(value.into()))
}

fn address(a: &str) -> EmailAddress {
    EmailAddress::parse(a).unwrap()
}

/// The outgoing server as an admin would configure it for the sandbox: the service app, STARTTLS port, sandbox CA.
fn outgoing(sb: &Sandbox, username: &str) -> OutgoingServer {
    let app = sb.service_app();
    OutgoingServer {
        host: sb.mail_host().to_string(),
        port: sb.smtp_port(),
        starttls: true,
        login_address: Some(sb.login_address(sb.tenant_id())),
        token_endpoint: None,
        auth: AuthType::OauthService,
        client_id: app.client_id.clone(),
        client_secret: Some(secret(&app.client_secret)),
        username: address(username),
        password: None,
        scopes: vec![SMTP_SERVICE_SCOPE.into()],
        max_email_size_mb: 25,
        connections: 3,
        contact_information: None,
        ca_file: Some(sb.ca_file().to_path_buf()),
    }
}

/// An app of the world by name: (client id, first secret).
fn app(sb: &Sandbox, name: &str) -> (String, String) {
    let world = sb.idp().world();
    let app = world
        .apps
        .iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("app {name} in the world"));
    (app.client_id.clone(), app.secrets[0].value.clone())
}

fn cache() -> TokenCache {
    TokenCache::builder().no_proxy().build().unwrap()
}

fn sender(server: &OutgoingServer, cache: &TokenCache) -> SmtpSender {
    SmtpSender::new(server, cache.clone()).unwrap()
}

fn envelope(from: &str, to: &[&str]) -> Envelope {
    Envelope::new(address(from), to.iter().map(|a| address(a)).collect())
}

/// A message with a unique Message-ID, a line starting with a dot and non-ASCII text; returns (Message-ID, raw).
fn message(from: &str, to: &str, subject: &str) -> (String, Vec<u8>) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = format!("{nanos}.{}@mailqueue.test", subject.replace(' ', "-"));
    let raw = format!(
        "From: Support <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n\
         Date: Sat, 21 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nHello,\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\n\
         Grüße aus Zürich\r\n"
    );
    (id, raw.into_bytes())
}

fn sent_entry(sb: &Sandbox, message_id: &str) -> Option<mailqueue_sandbox::smtp::SentEntry> {
    sb.sent()
        .into_iter()
        .find(|e| e.message_id.as_deref() == Some(message_id))
}

fn explanation(e: &SmtpError) -> String {
    e.explain().to_string()
}

#[track_caller]
fn assert_reply(e: &SmtpError, code: u16, enhanced: &str) {
    assert_eq!(e.code(), Some(code), "{e}");
    assert_eq!(e.enhanced_status(), Some(enhanced), "{e}");
}

/// The sandbox's view of the identity provider, for private SMTP servers.
struct Authority(Idp);

impl SmtpAuthority for Authority {
    fn validate_token(&self, token: &str) -> Result<TokenInfo, TokenError> {
        self.0.tokens().validate(token)
    }
    fn authorize(&self, info: &TokenInfo, user: &str, host: &str) -> Result<(), SmtpDenial> {
        self.0.world().authorize_smtp(info, user, host)
    }
    fn send_as(&self, user: &str, from: &str) -> Result<(), SmtpDenial> {
        self.0.world().authorize_send_as(user, from)
    }
    fn is_local_mailbox(&self, address: &str) -> bool {
        self.0.world().mailbox(address).is_some()
    }
}

/// A private STARTTLS submission server on 127.0.0.2 with the sandbox's certificate and identity provider.
struct PrivateSmtp {
    handle: mailqueue_sandbox::smtp::SmtpHandle,
    stop: CancellationToken,
}

impl Drop for PrivateSmtp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn private_smtp(sb: &Sandbox, max_message_size: usize) -> PrivateSmtp {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir: PathBuf = sb.dir().join(format!(
        "private-sent-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = SmtpOptions::new(sb.certificates().server_config().unwrap(), dir);
    opts.max_message_size = max_message_size;
    let listener = TcpListener::bind((sb.mail_host(), 0)).await.unwrap();
    let stop = CancellationToken::new();
    let handle = SmtpServer::start(
        listener,
        opts,
        Arc::new(Authority(sb.idp().clone())),
        stop.clone(),
    )
    .unwrap();
    PrivateSmtp { handle, stop }
}

/// A TCP forwarder on 127.0.0.2 that counts the connections made through it.
async fn counting_proxy(target: SocketAddr) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((target.ip(), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (port, count)
}

#[tokio::test]
async fn a_message_is_accepted_stored_byte_exact_and_delivered() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("smtp-from");
    let to = sb.new_mailbox("smtp-to");
    let cache = cache();
    let sender = sender(&outgoing(sb, &from), &cache);
    let (id, raw) = message(&from, &to, "byte exact");

    let accepted = sender.send(&envelope(&from, &[&to]), &raw).await.unwrap();
    assert!(
        accepted.reply.starts_with("250 2.6.0 <")
            && accepted.reply.contains("Queued mail for delivery"),
        "{}",
        accepted.reply
    );
    assert_eq!(accepted.queued_id(), Some(id.as_str()));
    assert!((chrono::Utc::now() - accepted.at).num_seconds().abs() < 5);

    let entry = sent_entry(sb, &id).expect("in the sent index");
    assert_eq!(std::fs::read(entry.path(sb.sent_dir())).unwrap(), raw);
    assert_eq!(entry.size, raw.len());
    assert_eq!(entry.user, from);
    assert_eq!(entry.mail_from, from);
    assert_eq!(entry.rcpt_to, std::slice::from_ref(&to));
    assert_eq!(entry.delivered_to, std::slice::from_ref(&to));

    // In the recipient's INBOX (what Dovecot serves), after the server's Received: header.
    let new = maildir::maildir_path(sb.mail_root(), &to)
        .unwrap()
        .join("new");
    let files: Vec<_> = std::fs::read_dir(&new).unwrap().collect();
    assert_eq!(files.len(), 1);
    let delivered = std::fs::read(files[0].as_ref().unwrap().path()).unwrap();
    assert!(delivered.starts_with(b"Received: "));
    assert!(delivered.ends_with(&raw));

    // Bare LF line ends go out as CRLF; a message without a final line end gets one.
    let (id2, raw2) = message(&from, &to, "bare lf");
    let lf: Vec<u8> = String::from_utf8(raw2.clone())
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    sender.send(&envelope(&from, &[&to]), &lf).await.unwrap();
    let stored = std::fs::read(sent_entry(sb, &id2).unwrap().path(sb.sent_dir())).unwrap();
    assert_eq!(stored, raw2);
    let (id3, raw3) = message(&from, &to, "no final crlf");
    sender
        .send(&envelope(&from, &[&to]), &raw3[..raw3.len() - 2])
        .await
        .unwrap();
    let stored = std::fs::read(sent_entry(sb, &id3).unwrap().path(sb.sent_dir())).unwrap();
    assert_eq!(stored, raw3);
    assert_eq!(cache.stats().requests, 1, "one token for all sends");
}

#[tokio::test]
async fn implicit_tls_port_works() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("smtps-from");
    let to = sb.new_mailbox("smtps-to");
    let mut server = outgoing(sb, &from);
    server.port = sb.smtps_port();
    server.starttls = false;
    let sender = sender(&server, &cache());
    let (id, raw) = message(&from, &to, "implicit tls");
    sender.send(&envelope(&from, &[&to]), &raw).await.unwrap();
    assert_eq!(
        std::fs::read(sent_entry(sb, &id).unwrap().path(sb.sent_dir())).unwrap(),
        raw
    );
    sender.check().await.unwrap();
}

#[tokio::test]
async fn oauth_user_sends_as_its_own_mailbox() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let (upn, password) = sb.new_user("smtp-user");
    let to = sb.new_mailbox("user-to");
    let mut server = outgoing(sb, &upn);
    server.auth = AuthType::OauthUser;
    server.client_id = sb.public_client_id().expect("a public client").to_owned();
    server.client_secret = None;
    server.password = Some(secret(&password));
    let sender = sender(&server, &cache());
    let (id, raw) = message(&upn, &to, "delegated");
    sender.send(&envelope(&upn, &[&to]), &raw).await.unwrap();
    assert_eq!(sent_entry(sb, &id).unwrap().user, upn);
    sender.check().await.unwrap();

    // A wrong password is a token error (AADSTS50126), not an SMTP one.
    let mut wrong = server.clone();
    wrong.password = Some(secret("not-the-password"));
    let e = self::sender(&wrong, &cache())
        .send(&envelope(&upn, &[&to]), &raw)
        .await
        .unwrap_err();
    assert_eq!(e.oauth().and_then(|o| o.aadsts()), Some(50126), "{e}");
    assert!(!e.to_string().contains("not-the-password"));
}

#[tokio::test]
async fn the_pool_reuses_one_connection() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("pool-from");
    let to = sb.new_mailbox("pool-to");
    let (port, connections) = counting_proxy(sb.smtp().local_addr()).await;
    let mut server = outgoing(sb, &from);
    server.port = port;
    let sender = sender(&server, &cache());
    for i in 0..4 {
        let (_, raw) = message(&from, &to, &format!("pooled {i}"));
        sender.send(&envelope(&from, &[&to]), &raw).await.unwrap();
        // lettre returns a connection to the pool from a spawned task.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert_eq!(sender.transports_built(), 1);
    let files = std::fs::read_dir(
        maildir::maildir_path(sb.mail_root(), &to)
            .unwrap()
            .join("new"),
    )
    .unwrap()
    .count();
    assert_eq!(files, 4);
}

/// Puts the token lifetime back even if the test fails.
struct RestoreLifetime<'a>(&'a Idp, i64);

impl Drop for RestoreLifetime<'_> {
    fn drop(&mut self) {
        self.0.set_lifetime(self.1);
    }
}

#[tokio::test]
async fn a_renewed_token_rebuilds_the_transport() {
    let _exclusive = LIFETIME.write().await;
    let sb = Sandbox::shared().await;
    let _restore = RestoreLifetime(sb.idp(), sb.idp().lifetime());
    sb.idp().set_lifetime(3);
    let from = sb.new_mailbox("renew-from");
    let to = sb.new_mailbox("renew-to");
    let cache = cache();
    let sender = sender(&outgoing(sb, &from), &cache);
    let (first_id, raw) = message(&from, &to, "first token");
    sender.send(&envelope(&from, &[&to]), &raw).await.unwrap();
    assert_eq!(sender.transports_built(), 1);

    tokio::time::sleep(Duration::from_millis(3300)).await; // past the refresh point and the expiry
    let (second_id, raw) = message(&from, &to, "second token");
    sender.send(&envelope(&from, &[&to]), &raw).await.unwrap();
    assert_eq!(sender.transports_built(), 2, "rebuilt for the new token");
    assert_eq!(cache.stats().requests, 2);
    assert!(sent_entry(sb, &first_id).is_some() && sent_entry(sb, &second_id).is_some());
}

#[tokio::test]
async fn tenant_smtp_auth_off_is_535_5_7_139_with_the_tenant_fix() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let (client_id, client_secret) = app(sb, "fabrikam-service");
    let to = sb.new_mailbox("fab-to");
    let mut server = outgoing(sb, "info@fabrikam.com");
    server.login_address = Some(sb.login_address(FABRIKAM));
    server.client_id = client_id;
    server.client_secret = Some(secret(&client_secret));
    let cache = cache();
    let sender = sender(&server, &cache);
    let (id, raw) = message("info@fabrikam.com", &to, "fabrikam");
    let e = sender
        .send(&envelope("info@fabrikam.com", &[&to]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert_reply(&e, 535, "5.7.139");
    assert!(e.server_text().unwrap().contains("disabled for the Tenant"));
    let text = explanation(&e);
    assert!(text.contains("whole Microsoft 365 tenant"), "{text}");
    assert!(text.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"));
    assert_eq!(
        cache.stats().requests,
        1,
        "5.7.139 is not a token problem: no retry"
    );
    assert!(sent_entry(sb, &id).is_none());
    assert!(!e.is_temporary());
}

#[tokio::test]
async fn mailbox_smtp_auth_off_is_535_5_7_139_with_the_mailbox_fix() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let to = sb.new_mailbox("smtpoff-to");
    let sender = sender(&outgoing(sb, "smtpoff@contoso.com"), &cache());
    let (_, raw) = message("smtpoff@contoso.com", &to, "smtp off");
    let e = sender
        .send(&envelope("smtpoff@contoso.com", &[&to]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert_reply(&e, 535, "5.7.139");
    let text = explanation(&e);
    assert!(
        text.contains("Authenticated SMTP is turned off for the mailbox smtpoff@contoso.com"),
        "{text}"
    );
    assert!(
        text.contains("Manage email apps")
            && text.contains("Set-CASMailbox -Identity smtpoff@contoso.com")
    );
    assert!(!text.contains("whole Microsoft 365 tenant"));
}

#[tokio::test]
async fn an_app_without_smtp_send_as_app_gets_the_5_7_3_checklist() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let (client_id, client_secret) = app(sb, "imap-only");
    let from = sb.new_mailbox("imaponly-from");
    let mut server = outgoing(sb, &from);
    server.client_id = client_id.clone();
    server.client_secret = Some(secret(&client_secret));
    let cache = cache();
    let sender = sender(&server, &cache);
    let (_, raw) = message(&from, &from, "imap only");
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert_reply(&e, 535, "5.7.3");
    assert_eq!(
        cache.stats().requests,
        2,
        "refused once, retried once with a new token"
    );
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "sending through 127.0.0.2:{} as {from} failed: 535 5.7.3 Authentication unsuccessful",
            sb.smtp_port()
        )),
        "{shown}"
    );
    for needle in [
        "SMTP.SendAsApp",
        "admin consent",
        &format!("New-ServicePrincipal -AppId {client_id}"),
        &format!("Add-MailboxPermission -Identity {from}"),
        "FullAccess",
        "https://outlook.office.com/.default",
        " Fix: ",
    ] {
        assert!(shown.contains(needle), "{needle}: {shown}");
    }
    // The same through check().
    let e = sender.check().await.unwrap_err();
    assert_reply(&e, 535, "5.7.3");
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent);
}

#[tokio::test]
async fn a_mailbox_without_full_access_is_535_5_7_3() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("nofull-from");
    let service = sb.service_app().client_id.clone();
    sb.idp().update_world(|w| {
        let app = w.apps.iter_mut().find(|a| a.client_id == service).unwrap();
        app.full_access.retain(|m| *m != from);
    });
    let sender = sender(&outgoing(sb, &from), &cache());
    let (_, raw) = message(&from, &from, "no full access");
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert_reply(&e, 535, "5.7.3");
    assert!(explanation(&e).contains(&format!(
        "Add-MailboxPermission -Identity {from} -User <its service principal id> -AccessRights FullAccess"
    )));
}

#[tokio::test]
async fn a_from_the_mailbox_may_not_send_as_is_554_5_2_252() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let user = sb.new_mailbox("sendas-user");
    let other = sb.new_mailbox("sendas-other");
    let to = sb.new_mailbox("sendas-to");
    let sender = sender(&outgoing(sb, &user), &cache());
    let (id, raw) = message(&other, &to, "send as denied");
    let e = sender
        .send(&envelope(&other, &[&to]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert_reply(&e, 554, "5.2.252");
    let text = explanation(&e);
    assert!(
        text.contains(&format!("{user} may not send as {other}")),
        "{text}"
    );
    assert!(text.contains(&format!("`sender` flag of {other} off")));
    assert!(text.contains(&format!(
        "Add-RecipientPermission {other} -Trustee {user} -AccessRights SendAs"
    )));
    assert!(sent_entry(sb, &id).is_none());

    // support@ may send as help@ (a Send As grant in the world).
    let sender = self::sender(&outgoing(sb, "support@contoso.com"), &cache());
    let (id, raw) = message("help@contoso.com", &to, "send as granted");
    sender
        .send(&envelope("help@contoso.com", &[&to]), &raw)
        .await
        .unwrap();
    assert_eq!(sent_entry(sb, &id).unwrap().mail_from, "help@contoso.com");
}

#[tokio::test]
async fn an_oversize_message_is_refused_before_sending() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("big-from");
    let mut server = outgoing(sb, &from);
    server.max_email_size_mb = 1;
    let cache = cache();
    let sender = sender(&server, &cache);
    assert_eq!(sender.max_bytes(), 1024 * 1024);
    let (id, mut raw) = message(&from, &from, "too large");
    raw.resize(1024 * 1024 + 1, b'x');
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_eq!(
        *e.kind(),
        SmtpErrorKind::TooLarge {
            size: 1024 * 1024 + 1,
            limit: 1024 * 1024
        }
    );
    assert_eq!(e.code(), None);
    let text = explanation(&e);
    assert!(
        text.contains("max_email_size_mb") && text.contains("not sent"),
        "{text}"
    );
    assert_eq!(cache.stats().requests, 0, "nothing was even tried");
    assert!(sent_entry(sb, &id).is_none());
}

#[tokio::test]
async fn a_server_size_limit_is_552_5_3_4() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let private = private_smtp(sb, 64 * 1024).await;
    let from = sb.new_mailbox("552-from");
    let mut server = outgoing(sb, &from);
    server.port = private.handle.local_addr().port();
    server.max_email_size_mb = 1;
    let sender = sender(&server, &cache());
    let (_, mut raw) = message(&from, &from, "over the server limit");
    raw.extend(
        std::iter::repeat_n(b"0123456789abcdef0123456789abcdef\r\n".as_slice(), 3000).flatten(),
    );
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert_reply(&e, 552, "5.3.4");
    let text = explanation(&e);
    assert!(
        text.contains("max_email_size_mb") && text.contains("smaller attachments"),
        "{text}"
    );
    assert!(private.handle.sent().is_empty());
}

#[tokio::test]
async fn injected_421_and_451_faults_are_temporary() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let private = private_smtp(sb, 1024 * 1024).await;
    let from = sb.new_mailbox("fault-from");
    let mut server = outgoing(sb, &from);
    server.port = private.handle.local_addr().port();
    let sender = sender(&server, &cache());
    let send = |subject: &'static str| {
        let sender = sender.clone();
        let from = from.clone();
        async move {
            let (_, raw) = message(&from, &from, subject);
            sender.send(&envelope(&from, &[&from]), &raw).await
        }
    };
    let fault = |point, action| {
        private.handle.inject_fault(SmtpFault {
            point,
            action,
            count: 1,
        })
    };

    fault(FaultPoint::Greeting, FaultAction::Reply421);
    let e = send("greeting 421").await.unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert_reply(&e, 421, "4.3.2");
    assert!(e.is_temporary() && explanation(&e).contains("retries"));

    fault(FaultPoint::Mail, FaultAction::Reply451);
    let e = send("mail 451").await.unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert_reply(&e, 451, "4.7.0");

    fault(FaultPoint::DataEnd, FaultAction::Reply451);
    let e = send("data end 451").await.unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert_reply(&e, 451, "4.7.0");

    fault(FaultPoint::DataEnd, FaultAction::Reply421);
    let e = send("data end 421").await.unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert_reply(&e, 421, "4.3.2");

    fault(FaultPoint::DataEnd, FaultAction::Drop);
    let e = send("data end drop").await.unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert!(matches!(e.failure(), SmtpFailure::Closed { .. }), "{e:?}");

    assert!(private.handle.sent().is_empty());
    send("after the faults").await.unwrap();
    assert_eq!(private.handle.sent().len(), 1);
}

#[tokio::test]
async fn a_wrong_client_secret_is_a_token_error_with_the_7000215_explanation() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("badsecret-from");
    let mut server = outgoing(sb, &from);
    let wrong = "wrong~Secret-Value-0000000000";
    server.client_secret = Some(secret(wrong));
    let sender = sender(&server, &cache());
    let (_, raw) = message(&from, &from, "wrong secret");
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    let SmtpErrorKind::Token(oauth) = e.kind() else {
        panic!("{e:?}")
    };
    assert_eq!(oauth.aadsts(), Some(7000215));
    assert_eq!(e.explain().cause, "the client secret is wrong");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "sending through 127.0.0.2:{} as {from} failed: no access token: token request to",
            sb.smtp_port()
        )),
        "{shown}"
    );
    assert!(
        shown.contains("AADSTS7000215") && shown.contains("*Secret ID*"),
        "{shown}"
    );
    assert!(!shown.contains(wrong) && !format!("{e:?}").contains(wrong));
    assert!(!e.is_temporary());
    assert!(sender.check().await.unwrap_err().oauth().is_some());
}

#[tokio::test]
async fn without_ca_file_the_sandbox_certificate_is_not_trusted() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("noca-from");
    let mut server = outgoing(sb, &from);
    server.ca_file = None;
    let sender = sender(&server, &cache());
    let (_, raw) = message(&from, &from, "no ca file");
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Permanent, "{e}");
    assert!(
        matches!(
            e.failure(),
            SmtpFailure::Tls {
                problem: TlsProblem::UnknownIssuer,
                ..
            }
        ),
        "{e:?}"
    );
    let shown = e.to_string();
    assert!(
        shown.contains("TLS failure") && shown.contains("`ca_file`"),
        "{shown}"
    );
    assert!(shown.contains(&format!("127.0.0.2:{}", sb.smtp_port())));
    // check() reports the same.
    let e = sender.check().await.unwrap_err();
    assert!(matches!(
        e.failure(),
        SmtpFailure::Tls {
            problem: TlsProblem::UnknownIssuer,
            ..
        }
    ));

    // An unreadable ca_file is refused up front.
    let mut bad = outgoing(sb, &from);
    bad.ca_file = Some("/nonexistent/ca.pem".into());
    let e = SmtpSender::new(&bad, cache()).unwrap_err();
    assert!(
        matches!(
            e.failure(),
            SmtpFailure::Tls {
                problem: TlsProblem::CaFile,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("/nonexistent/ca.pem"));
}

#[tokio::test]
async fn wrong_tls_mode_and_closed_ports_are_explained() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("mode-from");
    let (_, raw) = message(&from, &from, "tls mode");

    // Implicit TLS to the STARTTLS port: the server greets in plaintext.
    let mut server = outgoing(sb, &from);
    server.starttls = false;
    let e = sender(&server, &cache())
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.failure(),
            SmtpFailure::Tls {
                problem: TlsProblem::NotTls,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(explanation(&e).contains("starttls: true"), "{e}");

    // Nothing listens: temporary, names host and port.
    let closed = TcpListener::bind((sb.mail_host(), 0)).await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut server = outgoing(sb, &from);
    server.port = port;
    let e = sender(&server, &cache())
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert!(matches!(e.failure(), SmtpFailure::Connect { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("cannot connect to 127.0.0.2:{port}")),
        "{e}"
    );
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("silent-from");
    // Accepts and says nothing.
    let listener = TcpListener::bind((sb.mail_host(), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut server = outgoing(sb, &from);
    server.port = port;
    let options = SenderOptions {
        timeout: Duration::from_millis(500),
        ..SenderOptions::default()
    };
    let sender = SmtpSender::with_options(&server, cache(), options).unwrap();
    let (_, raw) = message(&from, &from, "silent");
    let started = Instant::now();
    let e = sender
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(*e.kind(), SmtpErrorKind::Temporary, "{e}");
    assert!(matches!(e.failure(), SmtpFailure::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("did not answer within 0.5 s"), "{e}");
}

#[tokio::test]
async fn check_passes_on_the_good_configuration() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("check-from");
    let sender = sender(&outgoing(sb, &from), &cache());
    sender.check().await.unwrap();
    sender.check().await.unwrap();
}

/// Collects everything logged on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_appear_in_logs_or_errors() {
    let _shared = LIFETIME.read().await;
    let sb = Sandbox::shared().await;
    let from = sb.new_mailbox("nolog-from");
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = outgoing(sb, &from);
    let request = TokenRequest::for_outgoing(&server).unwrap();
    let cache = cache();
    let first = cache.token(&request).await.unwrap();
    let sender = sender(&server, &cache);
    let (_, raw) = message(&from, &from, "no token in logs");
    sender.send(&envelope(&from, &[&from]), &raw).await.unwrap();
    sender.check().await.unwrap();
    // A refused token (the mailbox loses FullAccess), retried once with a new one. A new sender: the first one's
    // pooled connection is authenticated already and would keep working.
    let service = sb.service_app().client_id.clone();
    sb.idp().update_world(|w| {
        let app = w.apps.iter_mut().find(|a| a.client_id == service).unwrap();
        app.full_access.retain(|m| *m != from);
    });
    let refused = self::sender(&server, &cache);
    let e = refused
        .send(&envelope(&from, &[&from]), &raw)
        .await
        .unwrap_err();
    assert_reply(&e, 535, "5.7.3");
    let second = cache.token(&request).await.unwrap();
    assert!(!second.same_as(&first));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // Which events show up is not asserted exactly: tracing caches callsite interest process-wide, and other tests
    // hit the same callsites concurrently without a subscriber.
    assert!(logs.contains("smtp_send{"), "{logs}");
    let secret_value = &sb.service_app().client_secret;
    for shown in [
        logs.as_str(),
        &e.to_string(),
        &format!("{e:?}"),
        &format!("{sender:?}"),
    ] {
        for token in [&first, &second] {
            assert!(!shown.contains(token.secret()), "a token was shown");
            assert!(
                !shown.contains(&token.secret()[..40]),
                "part of a token was shown"
            );
            let xoauth2 = STANDARD.encode(format!(
                "user={from}\x01auth=Bearer {}\x01\x01",
                token.secret()
            ));
            assert!(
                !shown.contains(&xoauth2[..60]),
                "an XOAUTH2 response was shown"
            );
        }
        assert!(!shown.contains("AUTH XOAUTH2 "), "the AUTH line was shown");
        assert!(
            !shown.contains(secret_value.as_str()),
            "the client secret was shown"
        );
        assert!(
            !shown.contains("auth=Bearer"),
            "an XOAUTH2 response was shown"
        );
    }
}
