//! The incoming side end to end: the engine (`startup::spawn`, and the real `mailqueue serve` binary for the crash
//! test) fetching from the local Microsoft 365 sandbox — Dovecot checking XOAUTH2 tokens of the Entra ID emulator —
//! over PostgreSQL and SQLite. One shared sandbox per test process; every test uses fresh mailboxes.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mailqueue_engine::store::stmt;
use mailqueue_sandbox::{Sandbox, maildir};
use mailqueue_tests::{
    Kind, SandboxConfig, SbAddress, SbQueue, SbServer, TestApp, TestDb, both_backends, eventually,
    folder_uids, inspect, mail, spawn_app_with,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, Value};
use serde_json::Value as Json;

/// Generous: a loaded machine runs many of these at once.
const WAIT: Duration = Duration::from_secs(60);

fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// A mail to `to` from a sender of its own, with a unique Message-ID.
fn customer_mail(to: &str, subject: &str) -> Vec<u8> {
    let id = unique("m");
    mail(
        &format!("{id}@example.com"),
        to,
        subject,
        &format!("{id}@example.com"),
        "Hello, I need help.",
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ContactRow {
    queue: String,
    priority: i32,
    language: String,
    subject: Option<String>,
}

async fn contacts_on(db: &DatabaseConnection, address: &str) -> Vec<ContactRow> {
    let rows = db
        .query_all_raw(stmt(
            db,
            "SELECT q.name AS queue, c.priority AS priority, c.language AS language, c.subject AS subject \
             FROM contacts c JOIN queues q ON q.id = c.queue_id WHERE c.arrived_on = $1 ORDER BY c.id",
            [address.into()],
        ))
        .await
        .expect("contacts query");
    rows.iter()
        .map(|r| ContactRow {
            queue: r.try_get("", "queue").unwrap(),
            priority: r.try_get("", "priority").unwrap(),
            language: r.try_get("", "language").unwrap(),
            subject: r.try_get("", "subject").unwrap(),
        })
        .collect()
}

async fn count(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> i64 {
    db.query_one_raw(stmt(db, sql, values))
        .await
        .expect("count query")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("n")
}

async fn quarantined_on(db: &DatabaseConnection, address: &str) -> Vec<(String, i64)> {
    db.query_all_raw(stmt(
        db,
        "SELECT reason, size FROM quarantine WHERE mailbox = $1 ORDER BY id",
        [address.into()],
    ))
    .await
    .expect("quarantine query")
    .iter()
    .map(|r| {
        (
            r.try_get("", "reason").unwrap(),
            r.try_get("", "size").unwrap(),
        )
    })
    .collect()
}

async fn wait_contacts(db: &DatabaseConnection, address: &str, n: usize) -> Vec<ContactRow> {
    eventually(&format!("{n} contact(s) on {address}"), WAIT, async || {
        let rows = contacts_on(db, address).await;
        (rows.len() >= n).then_some(rows)
    })
    .await
}

/// Waits until every mail in `folder` is `\Seen` and there are `n` of them.
async fn wait_all_seen(sb: &Sandbox, mailbox: &str, n: usize) {
    eventually(
        &format!("{n} seen mail(s) in {mailbox}"),
        WAIT,
        async || {
            let (all, seen) = folder_uids(sb, mailbox, "INBOX").await;
            (all.len() == n && seen == all).then_some(())
        },
    )
    .await
}

/// Waits until the mailbox's status matches `check`; returns it.
async fn wait_status(
    app: &TestApp,
    address: &str,
    what: &str,
    check: impl Fn(&Json) -> bool,
) -> Json {
    eventually(&format!("{address}: {what}"), WAIT, async || {
        let s = app.mailbox(address).await;
        check(&s).then_some(s)
    })
    .await
}

fn is_idle(s: &Json) -> bool {
    s["state"] == "idle" && !s["last_fetch_at"].is_null()
}

// ---- OAuth Service and OAuth User, end to end ----

async fn end_to_end(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let (config, boxes) = SandboxConfig::standard(sb, &db.url, "e2e");
    sb.deliver(
        &boxes.service,
        &customer_mail(&boxes.service, "Order 17 is late"),
    )
    .unwrap();
    let app = spawn_app_with(db, &config.yaml()).await;
    sb.deliver(&boxes.user, &customer_mail(&boxes.user, "Rechnung"))
        .unwrap();
    let db = &app.engine.db;

    let service = wait_contacts(db, &boxes.service, 1).await;
    assert_eq!(
        service,
        [ContactRow {
            queue: "support".into(),
            priority: 3,
            language: "de".into(),
            subject: Some("Order 17 is late".into()),
        }]
    );
    let user = wait_contacts(db, &boxes.user, 1).await;
    assert_eq!(
        user,
        [ContactRow {
            queue: "sales".into(),
            priority: 1,
            language: "it".into(),
            subject: Some("Rechnung".into()),
        }]
    );
    wait_all_seen(sb, &boxes.service, 1).await;
    wait_all_seen(sb, &boxes.user, 1).await;

    let s = wait_status(&app, &boxes.service, "idle after one fetch", |s| {
        is_idle(s) && s["fetched"] == 1
    })
    .await;
    assert_eq!(s["queue"], "support");
    assert_eq!(s["server"], "svc");
    assert_eq!(s["auth"], "oauth_service");
    assert_eq!(s["folder"], "INBOX");
    assert_eq!(s["idle_supported"], true);
    assert_eq!(s["quarantined"], 0);
    assert!(s["error"].is_null() && s["next_retry_at"].is_null(), "{s}");
    assert!(s["token_expires_at"].is_string(), "{s}");
    assert!(s["uidvalidity"].as_u64().unwrap() > 0);
    assert_eq!(s["last_uid"], 1);
    let u = wait_status(&app, &boxes.user, "idle after one fetch", |s| {
        is_idle(s) && s["fetched"] == 1
    })
    .await;
    assert_eq!(
        (u["auth"].as_str(), u["login"].as_str()),
        (Some("oauth_user"), Some(boxes.user.as_str()))
    );

    // Router and admin read the status; agents may not; no secret is ever in it.
    let r = app.get("/v1/mailboxes", "router-token").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for secret in [
        sb.service_app().client_secret.as_str(),
        boxes.user_password.as_str(),
    ] {
        assert!(!text.contains(secret), "the status leaks a secret: {text}");
    }
    assert_eq!(app.get("/v1/mailboxes", "alice-token").await.status(), 403);
    assert_eq!(app.get("/v1/mailboxes", "").await.status(), 401);
    let openapi: Json = app.get("/openapi.json", "").await.json().await.unwrap();
    assert!(openapi["paths"]["/v1/mailboxes"]["get"].is_object());
    app.stop().await;
}

// ---- IDLE: new mail is claimable within about a second ----

async fn idle_latency(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let mailbox = sb.new_mailbox("idle");
    let mut config = SandboxConfig::empty(sb, &db.url);
    // A long safety poll: only IDLE can bring the mail in quickly.
    config.poll_interval = "5m".into();
    config.servers = vec![SbServer::service(sb, "svc")];
    config.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![SbAddress::new(&mailbox, "svc")],
    )];
    let app = spawn_app_with(db, &config.yaml()).await;
    let db = &app.engine.db;
    let mut latencies = Vec::new();
    for i in 0..3 {
        wait_status(&app, &mailbox, "idle", is_idle).await;
        // Let the IDLE command reach the server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        sb.deliver(&mailbox, &customer_mail(&mailbox, &format!("idle {i}")))
            .unwrap();
        loop {
            let n = count(
                db,
                "SELECT COUNT(*) AS n FROM contacts WHERE arrived_on = $1 AND state = 'queued'",
                vec![mailbox.clone().into()],
            )
            .await;
            if n > i {
                break;
            }
            assert!(started.elapsed() < WAIT, "mail {i} never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(started.elapsed());
    }
    println!("IDLE delivery → claimable contact ({kind:?}): {latencies:?}");
    for l in &latencies {
        // About a second on a quiet machine; the bound only catches a fall-back to the 5-minute poll.
        assert!(*l < Duration::from_secs(5), "{latencies:?}");
    }
    app.stop().await;
}

// ---- 5-second tokens are renewed without a failed fetch ----

/// Sets the sandbox's token lifetime for the whole test process and restores it when dropped (also on panic).
struct LifetimeGuard {
    sb: &'static Sandbox,
    previous: i64,
}

impl LifetimeGuard {
    fn set(sb: &'static Sandbox, seconds: i64) -> Self {
        let previous = sb.idp().lifetime();
        sb.idp().set_lifetime(seconds);
        Self { sb, previous }
    }
}

impl Drop for LifetimeGuard {
    fn drop(&mut self) {
        self.sb.idp().set_lifetime(self.previous);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_second_tokens_are_renewed_without_a_failed_fetch() {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let guard = LifetimeGuard::set(sb, 5);
    let (config, boxes) = SandboxConfig::standard(sb, &db.url, "short-token");
    let app = spawn_app_with(db, &config.yaml()).await;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(15) {
        sb.deliver(
            &boxes.service,
            &customer_mail(&boxes.service, "short token"),
        )
        .unwrap();
        sb.deliver(&boxes.user, &customer_mail(&boxes.user, "short token"))
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let db = &app.engine.db;
    wait_contacts(db, &boxes.service, sent).await;
    wait_contacts(db, &boxes.user, sent).await;
    wait_all_seen(sb, &boxes.service, sent).await;
    wait_all_seen(sb, &boxes.user, sent).await;
    for address in [&boxes.service, &boxes.user] {
        let s = app.mailbox(address).await;
        assert_eq!(s["failures"], 0, "a fetch failed: {s}");
        assert!(s["error"].is_null(), "{s}");
        assert_eq!(s["fetched"], sent as u64, "{s}");
        // A session per token: at least three over 15 s of 5-second tokens.
        assert!(s["connects"].as_u64().unwrap() >= 3, "{s}");
        let expires: chrono::DateTime<chrono::Utc> =
            s["token_expires_at"].as_str().unwrap().parse().unwrap();
        assert!(
            expires < chrono::Utc::now() + chrono::Duration::seconds(10),
            "{s}"
        );
        println!("{address}: {sent} mails, {} sessions", s["connects"]);
    }
    drop(guard);
    app.stop().await;
}

// ---- Explained failures ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_client_secret_shows_aadsts7000215_with_cause_and_fix() {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let mailbox = sb.new_mailbox("bad-secret");
    let wrong = "Wrong~Secret-Value-S3CRET";
    let mut config = SandboxConfig::empty(sb, &db.url);
    config.servers = vec![SbServer::service(sb, "svc").with_secret(wrong)];
    config.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![SbAddress::new(&mailbox, "svc")],
    )];
    sb.deliver(&mailbox, &customer_mail(&mailbox, "waiting"))
        .unwrap();
    let app = spawn_app_with(db, &config.yaml()).await;
    let s = wait_status(&app, &mailbox, "a token error", |s| !s["error"].is_null()).await;
    let e = &s["error"];
    assert_eq!(e["class"], "token", "{s}");
    assert_eq!(e["code"], "AADSTS7000215", "{s}");
    assert_eq!(e["cause"], "the client secret is wrong", "{s}");
    assert!(e["fix"].as_str().unwrap().contains("*Value*"), "{s}");
    assert!(
        e["message"].as_str().unwrap().contains("AADSTS7000215"),
        "{s}"
    );
    assert_eq!(e["temporary"], false);
    assert_eq!(s["state"], "backing_off");
    assert!(s["next_retry_at"].is_string(), "{s}");
    let text = app
        .get("/v1/mailboxes", "admin-token")
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains(wrong), "the status leaks the secret: {text}");
    // Nothing was fetched.
    assert!(contacts_on(&app.engine.db, &mailbox).await.is_empty());
    let (all, seen) = folder_uids(sb, &mailbox, "INBOX").await;
    assert_eq!((all.len(), seen.len()), (1, 0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_imap_logins_show_the_exchange_checklist() {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    // A mailbox the service app has no FullAccess on (a user's own mailbox).
    let (no_access, _) = sb.new_user("no-full-access");
    // A user whose token is fine but who has no mailbox: Exchange refuses the delegated login.
    let (no_mailbox, password) = sb.new_user("no-mailbox");
    sb.idp().update_world(|w| {
        w.mailboxes
            .retain(|m| !m.address.eq_ignore_ascii_case(&no_mailbox))
    });
    let mut config = SandboxConfig::empty(sb, &db.url);
    config.servers = vec![SbServer::service(sb, "svc"), SbServer::user(sb, "usr")];
    config.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![
            SbAddress::new(&no_access, "svc"),
            SbAddress::new(&no_mailbox, "usr").password(&password),
        ],
    )];
    let app = spawn_app_with(db, &config.yaml()).await;

    let s = wait_status(&app, &no_access, "an auth error", |s| !s["error"].is_null()).await;
    let e = &s["error"];
    assert_eq!(e["class"], "auth", "{s}");
    let fix = e["fix"].as_str().unwrap();
    let client_id = &sb.service_app().client_id;
    for needle in [
        "IMAP.AccessAsApp".to_owned(),
        "admin consent".to_owned(),
        format!("New-ServicePrincipal -AppId {client_id}"),
        format!(
            "Add-MailboxPermission -Identity {no_access} -User <service principal id> -AccessRights FullAccess"
        ),
    ] {
        assert!(fix.contains(&needle), "missing {needle:?}: {s}");
    }
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("AUTHENTICATIONFAILED"),
        "{s}"
    );
    assert_eq!(s["state"], "backing_off");

    let s = wait_status(&app, &no_mailbox, "an auth error", |s| {
        !s["error"].is_null()
    })
    .await;
    let e = &s["error"];
    assert_eq!(e["class"], "auth", "{s}");
    let fix = e["fix"].as_str().unwrap();
    for needle in [
        "password",
        "ImapEnabled",
        "IMAP.AccessAsUser.All",
        "consent",
    ] {
        assert!(fix.contains(needle), "missing {needle:?}: {s}");
    }
    let text = app
        .get("/v1/mailboxes", "admin-token")
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains(&password), "the status leaks the password");
    app.stop().await;
}

// ---- Exactly once: a crash between the commit and `\Seen` ----

async fn crash_between_commit_and_seen(kind: Kind) {
    use std::os::unix::process::ExitStatusExt as _;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let mailbox = sb.new_mailbox("crash");
    let config = SandboxConfig::support_queue(sb, &db.url, &mailbox);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailqueue.yaml");
    std::fs::write(&path, config.yaml()).unwrap();
    sb.deliver(&mailbox, &customer_mail(&mailbox, "exactly once"))
        .unwrap();

    // Run 1 stores the mail and dies before marking it \Seen.
    let log1 = dir.path().join("run1.log");
    let mut child = mailqueue_tests::serve(&path, &log1, Some("after_ingest_commit"));
    let status = mailqueue_tests::wait_exit(&mut child, &log1, WAIT).await;
    let logs = std::fs::read_to_string(&log1).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(6),
        "run 1 must abort (SIGABRT): {status:?}\n{logs}"
    );
    assert!(logs.contains("failpoint after_ingest_commit"), "{logs}");
    let conn = mailqueue_schema::connect(&db.url).await.unwrap();
    assert_eq!(
        contacts_on(&conn, &mailbox).await.len(),
        1,
        "stored before the crash"
    );
    let (all, seen) = folder_uids(sb, &mailbox, "INBOX").await;
    assert_eq!(
        (all.len(), seen.len()),
        (1, 0),
        "not acted on before the crash"
    );

    // Run 2 finishes the job: \Seen, and no second contact.
    let log2 = dir.path().join("run2.log");
    let mut child = mailqueue_tests::serve(&path, &log2, None);
    let port = mailqueue_tests::serve_addr(&mut child, &log2, WAIT)
        .await
        .port();
    let waited = tokio::time::timeout(WAIT, wait_all_seen(sb, &mailbox, 1)).await;
    let client = reqwest::Client::new();
    let status = async || -> Option<Json> {
        let r = client
            .get(format!("http://127.0.0.1:{port}/v1/mailboxes"))
            .bearer_auth("admin-token")
            .send()
            .await
            .ok()?;
        let list: Vec<Json> = r.json().await.ok()?;
        list.into_iter().next()
    };
    let s = eventually("run 2 fetched", WAIT, async || {
        status().await.filter(|s| !s["last_fetch_at"].is_null())
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = mailqueue_tests::wait_exit(&mut child, &log2, WAIT).await;
    let logs = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        waited.is_ok(),
        "run 2 did not mark the mail \\Seen:\n{logs}"
    );
    assert!(
        exit.success(),
        "run 2 stops cleanly on SIGTERM: {exit:?}\n{logs}"
    );
    let secret = sb.service_app().client_secret.as_str();
    let logs1 = std::fs::read_to_string(&log1).unwrap_or_default();
    for (run, text) in [("run 1", &logs1), ("run 2", &logs)] {
        assert!(
            !text.contains(secret),
            "{run} logs the client secret:\n{text}"
        );
        assert!(text.contains("mailbox connected"), "{run}:\n{text}");
    }
    assert!(
        logs.contains("finishing the server actions of stored mail"),
        "{logs}"
    );
    assert_eq!(contacts_on(&conn, &mailbox).await.len(), 1, "no duplicate");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) AS n FROM messages", vec![]).await,
        1
    );
    assert_eq!(s["fetched"], 0, "nothing new was stored: {s}");
    assert!(s["error"].is_null(), "{s}");
}

// ---- A second run over mail left on the server imports nothing ----

async fn second_run_imports_nothing_new(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let (config, boxes) = SandboxConfig::standard(sb, &db.url, "rerun");
    let yaml = config.yaml();
    let app = spawn_app_with(db, &yaml).await;
    for i in 0..2 {
        sb.deliver(
            &boxes.service,
            &customer_mail(&boxes.service, &format!("first {i}")),
        )
        .unwrap();
    }
    sb.deliver(&boxes.user, &customer_mail(&boxes.user, "first"))
        .unwrap();
    wait_contacts(&app.engine.db, &boxes.service, 2).await;
    wait_contacts(&app.engine.db, &boxes.user, 1).await;
    wait_all_seen(sb, &boxes.service, 2).await;
    wait_all_seen(sb, &boxes.user, 1).await;
    let totals = async |db: &DatabaseConnection| {
        (
            count(db, "SELECT COUNT(*) AS n FROM contacts", vec![]).await,
            count(db, "SELECT COUNT(*) AS n FROM messages", vec![]).await,
            count(db, "SELECT COUNT(*) AS n FROM events", vec![]).await,
        )
    };
    let before = totals(&app.engine.db).await;
    assert_eq!((before.0, before.1), (3, 3));
    let db = app.stop_keep_db().await;

    let app = spawn_app_with(db, &yaml).await;
    for address in [&boxes.service, &boxes.user] {
        let s = wait_status(&app, address, "a completed fetch", is_idle).await;
        assert_eq!(s["fetched"], 0, "{s}");
        assert!(s["error"].is_null(), "{s}");
    }
    // The mail is still on the server, seen.
    wait_all_seen(sb, &boxes.service, 2).await;
    assert_eq!(totals(&app.engine.db).await, before);
    app.stop().await;
}

// ---- UIDVALIDITY changes: nothing stored twice ----

async fn uidvalidity(sb: &Sandbox, mailbox: &str) -> u32 {
    let mut s = inspect(sb, mailbox).await;
    let v = s.select("INBOX").await.unwrap().uid_validity;
    let _ = s.logout().await;
    v
}

async fn uidvalidity_change_imports_nothing_twice(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let mailbox = sb.new_mailbox("uidvalidity");
    let config = SandboxConfig::support_queue(sb, &db.url, &mailbox);
    let yaml = config.yaml();
    let app = spawn_app_with(db, &yaml).await;
    for tag in ["uv-A", "uv-B", "uv-C"] {
        sb.deliver(&mailbox, &customer_mail(&mailbox, tag)).unwrap();
    }
    wait_contacts(&app.engine.db, &mailbox, 3).await;
    wait_all_seen(sb, &mailbox, 3).await;
    let db = app.stop_keep_db().await;
    let before = uidvalidity(sb, &mailbox).await;

    // Rebuild the folder: Dovecot forgets its UIDs (new UIDVALIDITY, UIDs from 1 again). uv-B looks unseen, as if
    // the run that stored it had stopped before marking it \Seen; uv-D is new.
    let dir = maildir::maildir_path(sb.mail_root(), &mailbox).unwrap();
    let mut unseen = 0;
    for entry in std::fs::read_dir(dir.join("cur")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if text.contains("Subject: uv-B") && name.ends_with(":2,S") {
            std::fs::rename(&path, dir.join("cur").join(name.trim_end_matches('S'))).unwrap();
            unseen += 1;
        }
    }
    assert_eq!(unseen, 1);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "dovecot-uidlist" || name.starts_with("dovecot.index") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    sb.deliver(&mailbox, &customer_mail(&mailbox, "uv-D"))
        .unwrap();
    let after = uidvalidity(sb, &mailbox).await;
    assert_ne!(before, after, "Dovecot assigned a new UIDVALIDITY");
    let (all, seen) = folder_uids(sb, &mailbox, "INBOX").await;
    assert_eq!((all.len(), seen.len()), (4, 2), "uv-A and uv-C are seen");

    let app = spawn_app_with(db, &yaml).await;
    let db = &app.engine.db;
    let rows = wait_contacts(db, &mailbox, 4).await;
    wait_all_seen(sb, &mailbox, 4).await;
    let s = wait_status(&app, &mailbox, "idle", is_idle).await;
    let subjects: Vec<String> = rows.iter().filter_map(|r| r.subject.clone()).collect();
    assert_eq!(subjects, ["uv-A", "uv-B", "uv-C", "uv-D"], "nothing twice");
    assert_eq!(
        count(
            db,
            "SELECT COUNT(*) AS n FROM messages WHERE mailbox = $1",
            vec![mailbox.clone().into()]
        )
        .await,
        4
    );
    assert_eq!(s["fetched"], 1, "only uv-D is new: {s}");
    assert_eq!(s["uidvalidity"], after);
    let cursor = app.engine.cursor(&mailbox, "INBOX").await.unwrap().unwrap();
    assert_eq!(cursor.uidvalidity, i64::from(after));
    assert_eq!(cursor.last_uid, 4);
    app.stop().await;
}

// ---- after_fetch ----

async fn after_fetch_seen_move_delete(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let seen = sb.new_mailbox("af-seen");
    let moved = sb.new_mailbox("af-move");
    let deleted = sb.new_mailbox("af-delete");
    let mut config = SandboxConfig::empty(sb, &db.url);
    config.servers = vec![SbServer::service(sb, "svc")];
    config.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![
            SbAddress::new(&seen, "svc").after_fetch("seen"),
            SbAddress::new(&moved, "svc").after_fetch("{ move: Processed }"),
            SbAddress::new(&deleted, "svc").after_fetch("delete"),
        ],
    )];
    let app = spawn_app_with(db, &config.yaml()).await;
    for mailbox in [&seen, &moved, &deleted] {
        for i in 0..2 {
            sb.deliver(mailbox, &customer_mail(mailbox, &format!("af {i}")))
                .unwrap();
        }
    }
    for mailbox in [&seen, &moved, &deleted] {
        wait_contacts(&app.engine.db, mailbox, 2).await;
    }
    wait_all_seen(sb, &seen, 2).await;
    eventually("the moved mail in Processed", WAIT, async || {
        let inbox = folder_uids(sb, &moved, "INBOX").await.0;
        let processed = folder_uids(sb, &moved, "Processed").await.0;
        (inbox.is_empty() && processed.len() == 2).then_some(())
    })
    .await;
    eventually("the deleted mail gone", WAIT, async || {
        folder_uids(sb, &deleted, "INBOX")
            .await
            .0
            .is_empty()
            .then_some(())
    })
    .await;
    for mailbox in [&seen, &moved, &deleted] {
        let s = wait_status(&app, mailbox, "two fetched", |s| s["fetched"] == 2).await;
        assert!(s["error"].is_null(), "{s}");
    }
    app.stop().await;
}

// ---- Quarantine: too large (never downloaded) and broken mail ----

async fn oversize_and_broken_mail_is_quarantined(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let mailbox = sb.new_mailbox("quarantine");
    let mut config = SandboxConfig::empty(sb, &db.url);
    config.max_email_size_mb = 1;
    config.servers = vec![SbServer::service(sb, "svc")];
    config.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![SbAddress::new(&mailbox, "svc")],
    )];
    let mut big = customer_mail(&mailbox, "huge attachment");
    big.truncate(big.len() - 2);
    while big.len() < 1_500_000 {
        big.extend_from_slice(
            b"\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        );
    }
    big.extend_from_slice(b"\r\n");
    let broken = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mail/10-unparsable.eml"),
    )
    .unwrap();
    sb.deliver(&mailbox, &customer_mail(&mailbox, "fine"))
        .unwrap();
    sb.deliver(&mailbox, &big).unwrap();
    sb.deliver(&mailbox, &broken).unwrap();
    let app = spawn_app_with(db, &config.yaml()).await;
    let s = wait_status(&app, &mailbox, "1 stored, 2 quarantined", |s| {
        s["fetched"] == 1 && s["quarantined"] == 2
    })
    .await;
    assert!(s["error"].is_null(), "{s}");
    let db = &app.engine.db;
    assert_eq!(contacts_on(db, &mailbox).await.len(), 1);
    let rows = quarantined_on(db, &mailbox).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (reason, size) = rows
        .iter()
        .find(|(r, _)| r.contains("too large"))
        .unwrap_or_else(|| panic!("no size reason: {rows:?}"));
    assert!(reason.contains(&format!("{} bytes", big.len())), "{reason}");
    assert!(reason.contains("limit 1 MB"), "{reason}");
    assert!(*size < 10_000, "only the headers are kept: {size}");
    assert!(
        rows.iter().any(|(r, _)| r.contains("unparsable")),
        "{rows:?}"
    );
    assert_eq!(
        count(
            db,
            "SELECT COUNT(*) AS n FROM events WHERE kind = 'message.quarantined'",
            vec![]
        )
        .await,
        2
    );
    eventually("quarantined mail moved", WAIT, async || {
        let (inbox, seen) = folder_uids(sb, &mailbox, "INBOX").await;
        let quarantine = folder_uids(sb, &mailbox, "Quarantine").await.0;
        (inbox.len() == 1 && seen == inbox && quarantine.len() == 2).then_some(())
    })
    .await;
    app.stop().await;
}

// ---- One broken server never stops the others ----

async fn one_broken_server_does_not_stop_the_others(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let good: Vec<String> = (0..3)
        .map(|i| sb.new_mailbox(&format!("flow-good{i}")))
        .collect();
    let bad: Vec<String> = (0..2)
        .map(|i| sb.new_mailbox(&format!("flow-bad{i}")))
        .collect();
    let (user, password) = sb.new_user("flow-user");
    let mut config = SandboxConfig::empty(sb, &db.url);
    config.servers = vec![
        SbServer::service(sb, "good"),
        // Same app, wrong secret; the tenant by its domain keeps its tokens apart from `good`'s.
        SbServer::service(sb, "broken")
            .with_secret("not-the-secret")
            .with_tenant(sb, "contoso.onmicrosoft.com"),
        SbServer::user(sb, "usr"),
    ];
    config.queues = vec![
        SbQueue::new(
            "first",
            1,
            "en",
            vec![
                SbAddress::new(&good[0], "good"),
                SbAddress::new(&bad[0], "broken"),
            ],
        ),
        SbQueue::new(
            "second",
            2,
            "de",
            vec![
                SbAddress::new(&good[1], "good"),
                SbAddress::new(&user, "usr").password(&password),
            ],
        ),
        SbQueue::new(
            "third",
            3,
            "fr",
            vec![
                SbAddress::new(&bad[1], "broken"),
                SbAddress::new(&good[2], "good"),
            ],
        ),
    ];
    let app = spawn_app_with(db, &config.yaml()).await;
    let flowing: Vec<&String> = good.iter().chain([&user]).collect();
    for mailbox in flowing.iter().copied().chain(bad.iter()) {
        sb.deliver(mailbox, &customer_mail(mailbox, "one")).unwrap();
    }
    for mailbox in &flowing {
        wait_contacts(&app.engine.db, mailbox, 1).await;
    }
    for mailbox in &bad {
        let s = wait_status(&app, mailbox, "a token error", |s| !s["error"].is_null()).await;
        assert_eq!(s["error"]["code"], "AADSTS7000215", "{s}");
        assert_eq!(s["state"], "backing_off", "{s}");
    }
    // Still flowing while the broken server keeps failing.
    for mailbox in &flowing {
        sb.deliver(mailbox, &customer_mail(mailbox, "two")).unwrap();
    }
    for mailbox in &flowing {
        wait_contacts(&app.engine.db, mailbox, 2).await;
        let s = app.mailbox(mailbox).await;
        assert!(s["error"].is_null(), "{s}");
    }
    let queues: Vec<String> = {
        let mut q = Vec::new();
        for mailbox in &flowing {
            q.push(contacts_on(&app.engine.db, mailbox).await[0].queue.clone());
        }
        q
    };
    assert_eq!(queues, ["first", "second", "third", "second"]);
    for mailbox in &bad {
        assert!(contacts_on(&app.engine.db, mailbox).await.is_empty());
        let (all, seen) = folder_uids(sb, mailbox, "INBOX").await;
        assert_eq!((all.len(), seen.len()), (1, 0), "untouched");
    }
    app.stop().await;
}

// ---- 2,000 messages, every one accounted for ----

async fn two_thousand_messages_are_all_accounted_for(kind: Kind) {
    const N: usize = 2000;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let mailbox = sb.new_mailbox("bulk");
    let mails: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            if i % 100 == 99 {
                // No header at all: quarantined as unparsable.
                format!("\r\njunk {i} without any header\r\n").into_bytes()
            } else {
                customer_mail(&mailbox, &format!("bulk {i}"))
            }
        })
        .collect();
    maildir::deliver_many(sb.mail_root(), &mailbox, &mails, sb.mail_owner()).unwrap();
    let config = SandboxConfig::support_queue(sb, &db.url, &mailbox);
    let started = Instant::now();
    let app = spawn_app_with(db, &config.yaml()).await;
    let db = &app.engine.db;
    let s = eventually(
        "2000 mails accounted for",
        Duration::from_secs(300),
        async || {
            let s = app.mailbox(&mailbox).await;
            (s["fetched"].as_u64().unwrap() + s["quarantined"].as_u64().unwrap() == N as u64
                && is_idle(&s))
            .then_some(s)
        },
    )
    .await;
    let elapsed = started.elapsed();
    println!("{N} messages ({kind:?}) stored in {elapsed:?}: {s}");
    let contacts = count(
        db,
        "SELECT COUNT(*) AS n FROM contacts WHERE arrived_on = $1",
        vec![mailbox.clone().into()],
    )
    .await;
    let quarantined = count(
        db,
        "SELECT COUNT(*) AS n FROM quarantine WHERE mailbox = $1",
        vec![mailbox.clone().into()],
    )
    .await;
    assert_eq!((contacts, quarantined), (1980, 20));
    let cursor = app.engine.cursor(&mailbox, "INBOX").await.unwrap().unwrap();
    assert_eq!(cursor.last_uid, N as i64);
    let (inbox, seen) = folder_uids(sb, &mailbox, "INBOX").await;
    assert_eq!((inbox.len(), seen.len()), (1980, 1980));
    assert_eq!(folder_uids(sb, &mailbox, "Quarantine").await.0.len(), 20);
    app.stop().await;
}

both_backends! {
    oauth_service_and_oauth_user_end_to_end => end_to_end;
    idle_makes_new_mail_claimable_at_once => idle_latency;
    a_crash_between_commit_and_seen_stores_once_and_ends_seen => crash_between_commit_and_seen;
    a_second_run_over_mail_left_on_the_server_imports_nothing => second_run_imports_nothing_new;
    a_uidvalidity_change_imports_nothing_twice => uidvalidity_change_imports_nothing_twice;
    after_fetch_seen_move_and_delete => after_fetch_seen_move_delete;
    oversize_and_broken_mail_goes_to_quarantine_and_its_folder => oversize_and_broken_mail_is_quarantined;
    one_broken_server_does_not_stop_the_others => one_broken_server_does_not_stop_the_others;
    two_thousand_messages_are_all_accounted_for => two_thousand_messages_are_all_accounted_for;
}
