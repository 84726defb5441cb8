//! The IMAP connector against the real sandbox: Dovecot on 127.0.0.2 (implicit TLS and STARTTLS) checking XOAUTH2
//! tokens against the Entra ID emulator. One shared sandbox per test process; every test works on mailboxes of its
//! own (`Sandbox::new_mailbox`). A few failure styles Dovecot does not produce (Exchange's direct `NO`, a refused or
//! injected STARTTLS) come from small scripted servers.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use base64::Engine as _;
use mailqueue_config::model::{ImapEndpoint, ImapTls as TlsMode};
use mailqueue_connectors::imap::{
    self, ConnectFailure, IdleOutcome, ImapError, ImapTls, MailboxSession, TlsProblem,
};
use mailqueue_sandbox::{
    Sandbox,
    idp::MintRequest,
    maildir,
    sandbox::{IMAP_AUDIENCE, SMTP_AUDIENCE},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

/// A refused login must come at once (no tarpit, no hang on Dovecot's error challenge).
const QUICK: Duration = Duration::from_millis(1500);

const ANNA: &str = "anna@contoso.com";

fn endpoint(sb: &Sandbox, mode: TlsMode) -> ImapEndpoint {
    ImapEndpoint {
        host: sb.mail_host().to_string(),
        port: match mode {
            TlsMode::Implicit => sb.imaps_port(),
            TlsMode::Starttls => sb.imap_port(),
        },
        tls: mode,
    }
}

fn sandbox_tls(sb: &Sandbox) -> ImapTls {
    ImapTls::new(Some(sb.ca_file())).expect("the sandbox CA loads")
}

fn app_token(sb: &Sandbox) -> String {
    app_token_with_roles(sb, &["IMAP.AccessAsApp"])
}

fn app_token_with_roles(sb: &Sandbox, roles: &[&str]) -> String {
    let app = &sb.service_app().client_id;
    sb.idp()
        .mint(&MintRequest::app(sb.tenant_id(), app, IMAP_AUDIENCE, roles))
        .unwrap()
        .0
}

fn user_token(sb: &Sandbox, upn: &str) -> String {
    let client = sb.public_client_id().expect("a public client");
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

async fn login(
    sb: &Sandbox,
    mode: TlsMode,
    mailbox: &str,
    token: &str,
) -> Result<MailboxSession, ImapError> {
    let client = imap::connect(&endpoint(sb, mode), &sandbox_tls(sb)).await?;
    imap::authenticate_xoauth2(client, mailbox, token).await
}

async fn open(sb: &Sandbox, mailbox: &str) -> MailboxSession {
    login(sb, TlsMode::Implicit, mailbox, &app_token(sb))
        .await
        .unwrap_or_else(|e| panic!("login to {mailbox}: {e}"))
}

/// A CRLF message with 8-bit UTF-8 text, `lines` body lines, and a unique Message-ID.
fn message(tag: &str, i: usize, lines: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Kunde {i} <kunde{i}@example.com>\r\nTo: support@contoso.com\r\nSubject: {tag} #{i} Grüße\r\n\
         Message-ID: <{tag}-{i}@example.com>\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    );
    for l in 0..lines {
        m.push_str(&format!("Zeile {l} von Nachricht {i}: äöü ß — test\r\n"));
    }
    m.into_bytes()
}

fn assert_auth_failed(
    result: Result<MailboxSession, ImapError>,
    token: &str,
    what: &str,
) -> String {
    let err = result.err().unwrap_or_else(|| panic!("{what}: was let in"));
    assert_eq!(err.class(), "auth", "{what}: {err}");
    let ImapError::AuthFailed { server_text, .. } = &err else {
        panic!("{what}: {err:?}");
    };
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(token), "{what}: the token leaked: {shown}");
    server_text.clone()
}

#[tokio::test]
async fn app_token_logs_in_over_implicit_tls_and_starttls() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-login");
    for mode in [TlsMode::Implicit, TlsMode::Starttls] {
        let mut session = login(sb, mode, &mailbox, &app_token(sb))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(session.mailbox(), mailbox);
        assert!(session.supports_idle(), "{:?}", session.capabilities());
        assert!(session.supports_move());
        assert!(session.supports_uidplus());
        assert!(session.has_capability("imap4rev1"));
        let state = session.select("INBOX").await.unwrap();
        assert!(state.uid_validity > 0);
        assert_eq!(state.exists, 0);
        assert_eq!(session.selected_folder(), Some("INBOX"));
        session.noop().await.unwrap();
        session.logout().await.unwrap();
    }
}

#[tokio::test]
async fn delegated_token_logs_in_to_its_own_mailbox() {
    let sb = Sandbox::shared().await;
    for mode in [TlsMode::Implicit, TlsMode::Starttls] {
        let mut session = login(sb, mode, ANNA, &user_token(sb, ANNA))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let state = session.select("INBOX").await.unwrap();
        assert!(state.uid_validity > 0);
        session.logout().await.unwrap();
    }
    // A user token is for that user's mailbox only.
    let (upn, _) = sb.new_user("imap-other-user");
    let token = user_token(sb, ANNA);
    let started = Instant::now();
    let result = login(sb, TlsMode::Implicit, &upn, &token).await;
    assert_auth_failed(result, &token, "anna's token on another mailbox");
    assert!(started.elapsed() < QUICK);
}

#[tokio::test]
async fn expired_revoked_and_unpermitted_tokens_fail_auth_quickly() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-refused");
    let app = sb.service_app().client_id.clone();

    let expired = sb
        .idp()
        .mint(
            &MintRequest::app(sb.tenant_id(), &app, IMAP_AUDIENCE, &["IMAP.AccessAsApp"])
                .lifetime(-60),
        )
        .unwrap()
        .0;
    let revoked = app_token(sb);
    assert!(sb.idp().revoke(&revoked));
    let smtp_audience = sb
        .idp()
        .mint(&MintRequest::app(
            sb.tenant_id(),
            &app,
            SMTP_AUDIENCE,
            &["SMTP.SendAsApp"],
        ))
        .unwrap()
        .0;
    let (no_full_access, _) = sb.new_user("imap-no-fullaccess");

    let cases = [
        ("expired token", mailbox.as_str(), expired.as_str()),
        ("revoked token", mailbox.as_str(), revoked.as_str()),
        (
            "token for the SMTP audience",
            mailbox.as_str(),
            smtp_audience.as_str(),
        ),
        ("mailbox without FullAccess", no_full_access.as_str(), ""),
    ];
    let valid = app_token(sb);
    for mode in [TlsMode::Implicit, TlsMode::Starttls] {
        for (what, mailbox, token) in cases {
            let token = if token.is_empty() {
                valid.as_str()
            } else {
                token
            };
            let started = Instant::now();
            let result = login(sb, mode, mailbox, token).await;
            let elapsed = started.elapsed();
            let text = assert_auth_failed(result, token, what);
            assert!(
                text.contains("AUTHENTICATIONFAILED"),
                "{what} ({mode:?}): {text}"
            );
            assert!(elapsed < QUICK, "{what} ({mode:?}): took {elapsed:?}");
        }
    }
    // The same valid token does open a permitted mailbox.
    open(sb, &mailbox).await.logout().await.unwrap();
}

#[tokio::test]
async fn without_the_sandbox_ca_tls_fails_with_unknown_issuer() {
    let sb = Sandbox::shared().await;
    for mode in [TlsMode::Implicit, TlsMode::Starttls] {
        let err = imap::connect(&endpoint(sb, mode), &ImapTls::webpki())
            .await
            .expect_err("an untrusted certificate must be refused");
        assert_eq!(err.class(), "tls", "{err}");
        assert!(
            matches!(
                err,
                ImapError::Tls {
                    problem: TlsProblem::UnknownIssuer,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("unknown issuer"), "{text}");
        assert!(text.contains("ca_file"), "{text}");
    }
}

#[tokio::test]
async fn connection_and_configuration_errors_are_classified() {
    let sb = Sandbox::shared().await;

    // Implicit TLS on the STARTTLS port: the server answers in plaintext.
    let mut wrong = endpoint(sb, TlsMode::Implicit);
    wrong.port = sb.imap_port();
    let err = imap::connect(&wrong, &sandbox_tls(sb)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ImapError::Tls {
                problem: TlsProblem::NotTls,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("starttls"), "{err}");

    // Nothing listens.
    let port = {
        let l = std::net::TcpListener::bind((sb.mail_host(), 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let mut closed = endpoint(sb, TlsMode::Implicit);
    closed.port = port;
    let err = imap::connect(&closed, &sandbox_tls(sb)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ImapError::Connect {
                failure: ConnectFailure::Refused,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.class(), "connect");

    // A host name that does not resolve.
    let mut unknown = endpoint(sb, TlsMode::Implicit);
    unknown.host = "imap.does-not-exist.invalid".into();
    let err = imap::connect(&unknown, &sandbox_tls(sb)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ImapError::Connect {
                failure: ConnectFailure::Dns,
                ..
            }
        ),
        "{err:?}"
    );

    // CA file problems.
    let err = ImapTls::new(Some(std::path::Path::new("/nonexistent/ca.pem"))).unwrap_err();
    assert!(
        matches!(
            err,
            ImapError::Tls {
                problem: TlsProblem::CaFile,
                ..
            }
        ),
        "{err:?}"
    );
    let not_pem = sb.dir().join("not-a-ca.txt");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let err = ImapTls::new(Some(&not_pem)).unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
}

#[tokio::test]
async fn select_reports_uidvalidity_and_unknown_folders() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-select");
    for i in 0..3 {
        sb.deliver(&mailbox, &message("select", i, 2)).unwrap();
    }
    let mut session = open(sb, &mailbox).await;
    let state = session.select("INBOX").await.unwrap();
    assert!(state.uid_validity > 0);
    assert_eq!(state.exists, 3);
    assert_eq!(state.uid_next, Some(4));
    // Same folder again: same UIDVALIDITY.
    let again = session.select("INBOX").await.unwrap();
    assert_eq!(again.uid_validity, state.uid_validity);

    let err = session.select("No Such Folder").await.unwrap_err();
    assert_eq!(err.class(), "no_such_folder", "{err}");
    assert!(err.to_string().contains("No Such Folder"), "{err}");
    assert_eq!(session.selected_folder(), None);
    // Commands that need a folder say so; the session stays usable.
    let err = session.fetch_sizes(0).await.unwrap_err();
    assert_eq!(err.class(), "protocol", "{err}");
    assert!(session.is_usable());
    session.select("INBOX").await.unwrap();
    session.logout().await.unwrap();
}

#[tokio::test]
async fn fetches_250_messages_byte_exact_in_batches_of_100() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-bulk");
    let messages: Vec<Vec<u8>> = (0..250).map(|i| message("bulk", i, i % 37)).collect();
    maildir::deliver_many(sb.mail_root(), &mailbox, &messages, sb.mail_owner()).unwrap();
    let index: HashMap<&[u8], usize> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_slice(), i))
        .collect();

    let mut session = open(sb, &mailbox).await;
    let state = session.select("INBOX").await.unwrap();
    assert_eq!(state.exists, 250);

    let sizes = session.fetch_sizes(0).await.unwrap();
    assert_eq!(sizes.len(), 250);
    assert!(sizes.windows(2).all(|w| w[0].0 < w[1].0), "sorted by UID");
    let uids: Vec<u32> = sizes.iter().map(|(uid, _)| *uid).collect();
    let size_of: HashMap<u32, u32> = sizes.iter().copied().collect();

    let started = Instant::now();
    let mut seen = vec![false; messages.len()];
    let mut fetched_uids = Vec::new();
    for batch in uids.chunks(100) {
        let mails = session.fetch_bodies(batch).await.unwrap();
        assert_eq!(mails.len(), batch.len());
        for mail in mails {
            let i = *index
                .get(mail.raw.as_slice())
                .unwrap_or_else(|| panic!("uid {} is not byte-exact", mail.uid));
            assert!(!seen[i], "message {i} fetched twice");
            seen[i] = true;
            assert_eq!(size_of[&mail.uid] as usize, mail.raw.len(), "RFC822.SIZE");
            fetched_uids.push(mail.uid);
        }
    }
    assert!(seen.iter().all(|s| *s));
    assert_eq!(fetched_uids, uids, "in UID order");
    eprintln!("250 bodies in {:?}", started.elapsed());

    // BODY.PEEK: nothing became \Seen.
    assert_eq!(session.uid_search("SEEN").await.unwrap(), Vec::<u32>::new());

    // `UID FETCH <last+1>:*` answers with the last message; it must not come back as new.
    let last = *uids.last().unwrap();
    assert_eq!(session.fetch_sizes(last).await.unwrap(), vec![]);
    let tail = session.fetch_sizes(last - 1).await.unwrap();
    assert_eq!(tail.iter().map(|(u, _)| *u).collect::<Vec<_>>(), [last]);

    // Unknown UIDs are simply absent; UIDs given out of order come back sorted.
    let mails = session
        .fetch_bodies(&[last + 10, uids[5], uids[2]])
        .await
        .unwrap();
    assert_eq!(
        mails.iter().map(|m| m.uid).collect::<Vec<_>>(),
        [uids[2], uids[5]]
    );
    assert!(session.fetch_bodies(&[]).await.unwrap().is_empty());

    // Headers only, for mail too large to download.
    let headers = session.fetch_headers(&uids[..3]).await.unwrap();
    assert_eq!(headers.len(), 3);
    for h in &headers {
        assert!(
            h.header.ends_with(b"\r\n\r\n"),
            "{:?}",
            String::from_utf8_lossy(&h.header)
        );
        assert_eq!(h.size, Some(size_of[&h.uid]));
        let full = &session.fetch_bodies(&[h.uid]).await.unwrap()[0].raw;
        assert!(full.starts_with(&h.header));
    }
    session.logout().await.unwrap();
}

#[tokio::test]
async fn mark_seen_move_and_delete_take_effect() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-actions");
    for i in 0..6 {
        sb.deliver(&mailbox, &message("actions", i, 3)).unwrap();
    }
    let mut session = open(sb, &mailbox).await;
    let state = session.select("INBOX").await.unwrap();
    assert_eq!(state.exists, 6);
    let uids: Vec<u32> = session
        .fetch_sizes(0)
        .await
        .unwrap()
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(uids.len(), 6);

    session.mark_seen(&uids[0..2]).await.unwrap();
    assert_eq!(session.uid_search("SEEN").await.unwrap(), uids[0..2]);
    assert_eq!(session.uid_search("UNSEEN").await.unwrap(), uids[2..]);

    // Quarantine folder (also one with a non-ASCII name: modified UTF-7).
    assert!(
        session
            .create_folder_if_missing("Quarantine")
            .await
            .unwrap()
    );
    assert!(
        !session
            .create_folder_if_missing("Quarantine")
            .await
            .unwrap()
    );
    assert!(
        session
            .create_folder_if_missing("Quarantäne & Co")
            .await
            .unwrap()
    );
    assert!(
        !session
            .create_folder_if_missing("Quarantäne & Co")
            .await
            .unwrap()
    );
    assert!(!session.create_folder_if_missing("INBOX").await.unwrap());

    session.move_to(&uids[2..4], "Quarantine").await.unwrap();
    session
        .move_to(&uids[4..5], "Quarantäne & Co")
        .await
        .unwrap();
    session.delete(&uids[0..1]).await.unwrap();
    let left = session.uid_search("ALL").await.unwrap();
    assert_eq!(left, [uids[1], uids[5]]);

    let err = session.move_to(&uids[5..6], "Missing").await.unwrap_err();
    assert_eq!(err.class(), "no_such_folder", "{err}");
    assert!(session.is_usable());

    // Re-select: the counts are on the server.
    assert_eq!(session.select("INBOX").await.unwrap().exists, 2);
    assert_eq!(session.select("Quarantine").await.unwrap().exists, 2);
    let moved = session.fetch_sizes(0).await.unwrap();
    let bodies = session
        .fetch_bodies(&moved.iter().map(|(u, _)| *u).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| b.raw.starts_with(b"From: Kunde ")));
    assert_eq!(session.select("Quarantäne & Co").await.unwrap().exists, 1);
    session.logout().await.unwrap();

    // A second connection sees the same.
    let mut other = open(sb, &mailbox).await;
    other.select("INBOX").await.unwrap();
    assert_eq!(other.uid_search("ALL").await.unwrap(), [uids[1], uids[5]]);
    assert_eq!(other.uid_search("SEEN").await.unwrap(), [uids[1]]);
    other.logout().await.unwrap();
}

#[tokio::test]
async fn idle_reports_new_mail_times_out_and_can_be_cancelled() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-idle");
    let mut session = open(sb, &mailbox).await;
    session.select("INBOX").await.unwrap();
    assert!(session.fetch_sizes(0).await.unwrap().is_empty());
    let never = CancellationToken::new();

    // Nothing arrives: Timeout after the wait.
    let started = Instant::now();
    let (session, outcome) = session
        .idle(Duration::from_millis(1500), &never)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(outcome, IdleOutcome::Timeout);
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );

    // A delivery during IDLE: NewData within 2 s of it.
    let raw = message("idle", 1, 1);
    let deliver_at = Instant::now() + Duration::from_millis(500);
    let delivery = {
        let mailbox = mailbox.clone();
        let raw = raw.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deliver_at.into()).await;
            sb.deliver(&mailbox, &raw).unwrap();
            Instant::now()
        })
    };
    let (mut session, outcome) = session.idle(Duration::from_secs(20), &never).await.unwrap();
    let returned = Instant::now();
    let delivered = delivery.await.unwrap();
    assert_eq!(outcome, IdleOutcome::NewData);
    let lag = returned.duration_since(delivered);
    assert!(
        lag < Duration::from_secs(2),
        "IDLE reported new mail after {lag:?}"
    );
    eprintln!("IDLE push after {lag:?}");
    let new = session.fetch_sizes(0).await.unwrap();
    assert_eq!(new.len(), 1);
    let mail = &session.fetch_bodies(&[new[0].0]).await.unwrap()[0];
    assert_eq!(mail.raw, raw);

    // Mail announced outside IDLE (here during NOOP) makes the next IDLE return at once.
    sb.deliver(&mailbox, &message("idle", 2, 1)).unwrap();
    let mut pending = false;
    for _ in 0..50 {
        session.noop().await.unwrap();
        if session.new_data_pending() {
            pending = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pending, "NOOP never reported the delivery");
    let started = Instant::now();
    let (mut session, outcome) = session.idle(Duration::from_secs(20), &never).await.unwrap();
    assert_eq!(outcome, IdleOutcome::NewData);
    assert!(started.elapsed() < Duration::from_millis(200));
    let after = new[0].0;
    assert_eq!(session.fetch_sizes(after).await.unwrap().len(), 1);
    assert!(!session.new_data_pending());

    // Shutdown: the token ends IDLE, and the session is still good.
    let stop = CancellationToken::new();
    let canceller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
        })
    };
    let started = Instant::now();
    let (mut session, outcome) = session.idle(Duration::from_secs(30), &stop).await.unwrap();
    canceller.await.unwrap();
    assert_eq!(outcome, IdleOutcome::Cancelled);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    session.noop().await.unwrap();
    // An already cancelled token returns at once, without IDLE.
    let (session, outcome) = session.idle(Duration::from_secs(30), &stop).await.unwrap();
    assert_eq!(outcome, IdleOutcome::Cancelled);
    session.logout().await.unwrap();
}

#[tokio::test]
async fn polling_an_empty_folder_sees_new_mail() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-poll");
    let mut session = open(sb, &mailbox).await;
    assert_eq!(session.select("INBOX").await.unwrap().exists, 0);
    assert!(session.fetch_sizes(0).await.unwrap().is_empty());
    let raw = message("poll", 1, 4);
    sb.deliver(&mailbox, &raw).unwrap();
    // No IDLE, no NOOP from the caller: repeated fetches alone must find it.
    let started = Instant::now();
    let found = loop {
        let found = session.fetch_sizes(0).await.unwrap();
        if !found.is_empty() || started.elapsed() > Duration::from_secs(5) {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(found.len(), 1, "the delivery was never seen");
    assert_eq!(found[0].1 as usize, raw.len());
    session.logout().await.unwrap();
}

#[tokio::test]
async fn a_3_kb_token_works() {
    let sb = Sandbox::shared().await;
    let mailbox = sb.new_mailbox("imap-big-token");
    // Real Entra tokens carry many claims; pad the roles until the token is over 3 KB.
    let padding = format!("X.Sandbox.Padding.{}", "p".repeat(900));
    let token = app_token_with_roles(sb, &["IMAP.AccessAsApp", &padding]);
    assert!(token.len() >= 3072, "token is only {} bytes", token.len());
    for mode in [TlsMode::Implicit, TlsMode::Starttls] {
        let mut session = login(sb, mode, &mailbox, &token)
            .await
            .unwrap_or_else(|e| panic!("{mode:?} with a {} byte token: {e}", token.len()));
        session.select("INBOX").await.unwrap();
        session.logout().await.unwrap();
    }
}

/// The engine drives sessions from spawned tasks: every operation's future must be `Send`.
#[allow(dead_code)]
fn operations_are_send(
    endpoint: &ImapEndpoint,
    tls: &ImapTls,
    client: imap::Client,
    mut session: MailboxSession,
    stop: &CancellationToken,
) {
    fn send<T: Send>(_: T) {}
    send(imap::connect(endpoint, tls));
    send(imap::authenticate_xoauth2(client, "a@b.c", "t"));
    send(session.select("INBOX"));
    send(session.fetch_sizes(0));
    send(session.fetch_bodies(&[1]));
    send(session.fetch_headers(&[1]));
    send(session.mark_seen(&[1]));
    send(session.move_to(&[1], "x"));
    send(session.delete(&[1]));
    send(session.create_folder_if_missing("x"));
    send(session.uid_search("ALL"));
    send(session.noop());
    send(session.idle(Duration::from_secs(1), stop));
}

// ---- scripted servers for what Dovecot does not do ----

/// One connection on 127.0.0.2, TLS from the first byte with the sandbox certificate; `script` gets the lines.
async fn scripted_tls_server<F, Fut>(sb: &Sandbox, script: F) -> ImapEndpoint
where
    F: FnOnce(BufReader<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind((sb.mail_host(), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(sb.certificates().server_config().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        script(BufReader::new(tls)).await;
    });
    ImapEndpoint {
        host: sb.mail_host().to_string(),
        port,
        tls: TlsMode::Implicit,
    }
}

/// One plaintext connection on 127.0.0.2 for STARTTLS scripts.
async fn scripted_plain_server(sb: &Sandbox, greeting_then: &'static [u8]) -> ImapEndpoint {
    let listener = TcpListener::bind((sb.mail_host(), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = BufReader::new(tcp);
        conn.get_mut()
            .write_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        assert_eq!(line, "S0 STARTTLS\r\n");
        conn.get_mut().write_all(greeting_then).await.unwrap();
        // Keep the connection open a moment so the client decides on what it got.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    ImapEndpoint {
        host: sb.mail_host().to_string(),
        port,
        tls: TlsMode::Starttls,
    }
}

#[tokio::test]
async fn exchange_style_direct_no_is_an_auth_failure() {
    let sb = Sandbox::shared().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let endpoint = scripted_tls_server(sb, |mut conn| async move {
        conn.get_mut()
            .write_all(b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        let (tag, command) = line.trim_end().split_once(' ').unwrap();
        assert_eq!(command, "AUTHENTICATE XOAUTH2");
        conn.get_mut().write_all(b"+ \r\n").await.unwrap();
        let mut response = String::new();
        conn.read_line(&mut response).await.unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(response.trim_end())
            .unwrap();
        let _ = tx.send(String::from_utf8(decoded).unwrap());
        conn.get_mut()
            .write_all(format!("{tag} NO AUTHENTICATE failed.\r\n").as_bytes())
            .await
            .unwrap();
        let mut rest = String::new();
        let _ = conn.read_line(&mut rest).await;
    })
    .await;
    let client = imap::connect(&endpoint, &sandbox_tls(sb)).await.unwrap();
    let token = "eyJ0eXAiOiJKV1QifQ.secret-token-value.sig";
    let started = Instant::now();
    let result = imap::authenticate_xoauth2(client, "support@contoso.com", token).await;
    let text = assert_auth_failed(result, token, "Exchange-style refusal");
    assert_eq!(text, "AUTHENTICATE failed.");
    assert!(started.elapsed() < QUICK);
    assert_eq!(
        rx.await.unwrap(),
        format!("user=support@contoso.com\x01auth=Bearer {token}\x01\x01")
    );
}

#[tokio::test]
async fn starttls_refused_or_injected_never_continues_in_plaintext() {
    let sb = Sandbox::shared().await;
    let refused = scripted_plain_server(sb, b"S0 BAD STARTTLS not available\r\n").await;
    let err = imap::connect(&refused, &sandbox_tls(sb)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ImapError::Tls {
                problem: TlsProblem::StarttlsRefused,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("plaintext"), "{err}");

    let injected = scripted_plain_server(
        sb,
        b"S0 OK Begin TLS\r\n* OK [CAPABILITY IMAP4rev1] injected\r\n",
    )
    .await;
    let err = imap::connect(&injected, &sandbox_tls(sb))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injection"), "{err}");
    assert_eq!(err.class(), "tls");
}

#[tokio::test]
async fn a_silent_server_times_out_instead_of_hanging() {
    let sb = Sandbox::shared().await;
    // TLS is accepted, then nothing: no greeting.
    let endpoint = scripted_tls_server(sb, |conn| async move {
        let _open = conn;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let tls = sandbox_tls(sb).with_timeouts(Duration::from_secs(2), Duration::from_millis(500));
    let started = Instant::now();
    let err = imap::connect(&endpoint, &tls).await.unwrap_err();
    assert!(
        matches!(
            err,
            ImapError::Connect {
                failure: ConnectFailure::Timeout,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}
