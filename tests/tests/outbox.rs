//! The outgoing side end to end: replies stored by `Engine::submit_reply` are sent by the outbox worker through the
//! local Microsoft 365 sandbox's SMTP server (XOAUTH2, Send As checks, fault injection). The SMTP server is shared
//! by every test of this binary, so the tests run one at a time (`SERIAL`): a fault armed by one must not hit
//! another's send.

use std::time::Duration;

use mailqueue_engine::{
    Engine,
    contacts::Actor,
    outbox::{ReplyRequest, worker},
    store::stmt,
};
use mailqueue_sandbox::{
    Sandbox,
    smtp::{FaultAction, FaultPoint, SmtpFault},
};
use mailqueue_tests::{
    Kind, SandboxConfig, SbAddress, SbQueue, SbServer, TestDb, eventually, parse_config,
    spawn_app_with,
};
use sea_orm::ConnectionTrait;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::const_new(());

fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// A config with queue `support` fed by a fresh mailbox on server `svc` (sender on or off) and the outgoing server
/// authenticating as `username` (`None`: the queue mailbox itself).
fn config(sb: &Sandbox, db: &TestDb, sender: bool, username: Option<&str>) -> (String, String) {
    let queue_box = sb.new_mailbox("outbox-q");
    let mut c = SandboxConfig::empty(sb, &db.url);
    c.poll_interval = "1s".into();
    c.servers = vec![SbServer::service(sb, "svc")];
    c.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![SbAddress::new(&queue_box, "svc")],
    )];
    c.extra = mailqueue_tests::sandbox_outgoing_yaml(
        sb,
        username.unwrap_or(&queue_box),
        "ops-oncall@example.com",
    );
    let mut yaml = c.yaml();
    if !sender {
        yaml = yaml.replace("        sender: true\n", "        sender: false\n");
    }
    (yaml, queue_box)
}

async fn scalar<T: sea_orm::TryGetable>(
    engine: &Engine,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Option<T> {
    let db = &engine.db;
    db.query_one_raw(stmt(db, sql, values))
        .await
        .expect("query")
        .map(|r| r.try_get::<T>("", "v").expect("column v"))
}

/// Delivers a customer mail to `queue_box` and waits for its contact; returns (contact id, customer, Message-ID).
async fn customer_writes(sb: &Sandbox, engine: &Engine, queue_box: &str) -> (i64, String, String) {
    let customer = format!("{}@example.com", unique("cust"));
    let mid = format!("{}@example.com", unique("m"));
    let raw = mailqueue_tests::mail(&customer, queue_box, "Order 4711", &mid, "Where is it?");
    sb.deliver(queue_box, &raw).expect("deliver");
    let contact = eventually("the contact from IMAP", WAIT, async || {
        scalar::<i64>(
            engine,
            "SELECT c.id AS v FROM contacts c JOIN messages m ON m.contact_id = c.id WHERE m.message_id = $1",
            vec![mid.clone().into()],
        )
        .await
    })
    .await;
    (contact, customer, mid)
}

/// The id and Message-ID of a reply stored through the API.
struct Sent {
    id: i64,
    rfc_message_id: String,
}

fn reply(text: &str) -> ReplyRequest {
    ReplyRequest {
        text: text.into(),
        html: None,
        to: None,
        cc: Vec::new(),
        subject: None,
        from: None,
        attachments: Vec::new(),
    }
}

async fn state_of(engine: &Engine, reply: i64) -> (String, i32, Option<String>) {
    let db = &engine.db;
    let r = db
        .query_one_raw(stmt(
            db,
            "SELECT state, attempts, last_error FROM outbox WHERE id = $1",
            [reply.into()],
        ))
        .await
        .expect("query")
        .expect("row");
    (
        r.try_get("", "state").unwrap(),
        r.try_get("", "attempts").unwrap(),
        r.try_get("", "last_error").unwrap(),
    )
}

async fn wait_state(engine: &Engine, reply: i64, want: &str) -> (String, i32, Option<String>) {
    eventually(&format!("reply {reply} {want}"), WAIT, async || {
        let s = state_of(engine, reply).await;
        (s.0 == want).then_some(s)
    })
    .await
}

fn sent_raw(sb: &Sandbox, message_id: &str) -> (mailqueue_sandbox::smtp::SentEntry, String) {
    let entries: Vec<_> = sb
        .sent()
        .into_iter()
        .filter(|e| e.message_id.as_deref() == Some(message_id))
        .collect();
    assert_eq!(entries.len(), 1, "exactly one copy of {message_id} sent");
    let entry = entries.into_iter().next().unwrap();
    let raw = std::fs::read_to_string(sb.sent_dir().join(&entry.file)).expect("sent file");
    (entry, raw)
}

async fn events(engine: &Engine, kind: &str) -> Vec<serde_json::Value> {
    let db = &engine.db;
    db.query_all_raw(stmt(
        db,
        "SELECT data FROM events WHERE kind = $1 ORDER BY id",
        [kind.into()],
    ))
    .await
    .expect("events")
    .iter()
    .map(|r| {
        let v: serde_json::Value = r.try_get("", "data").unwrap();
        match v {
            serde_json::Value::String(s) => serde_json::from_str(&s).unwrap_or_default(),
            v => v,
        }
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reply_is_sent_and_the_answer_threads_back() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, queue_box) = config(sb, &db, true, None);
    let app = spawn_app_with(db, &yaml).await;
    let engine = app.engine.clone();
    let (contact, customer, mid) = customer_writes(sb, &engine, &queue_box).await;

    let r = engine
        .submit_reply(
            contact,
            Actor::Supervisor("admin"),
            reply("It ships today."),
        )
        .await
        .expect("reply stored");
    let (_, attempts, _) = wait_state(&engine, r.id, "sent").await;
    assert_eq!(attempts, 1);

    let (entry, raw) = sent_raw(sb, &r.rfc_message_id);
    assert_eq!(entry.rcpt_to, vec![customer.clone()]);
    assert!(
        entry.mail_from.eq_ignore_ascii_case(&queue_box),
        "{entry:?}"
    );
    assert!(raw.contains(&format!("From: {queue_box}")), "{raw}");
    assert!(!raw.contains("\nReply-To:"), "{raw}");
    assert!(raw.contains(&format!("To: {customer}")), "{raw}");
    assert!(raw.contains(&format!("In-Reply-To: <{mid}>")), "{raw}");
    assert!(raw.contains(&format!("References: <{mid}>")), "{raw}");
    assert!(raw.contains("Subject: Re: Order 4711"), "{raw}");
    assert!(raw.contains("It ships today."), "{raw}");
    // The raw bytes are kept on the message row.
    let stored: Option<Vec<u8>> = scalar(
        &engine,
        "SELECT raw AS v FROM messages WHERE id = $1",
        vec![r.message_id.into()],
    )
    .await;
    assert!(
        stored.is_some_and(|s| String::from_utf8_lossy(&s).contains("It ships today.")),
        "raw stored"
    );
    let sent = events(&engine, "reply.sent").await;
    assert!(sent.iter().any(|e| e["reply_id"] == r.id), "{sent:?}");

    // The customer answers our reply: it threads into the same contact.
    let answer_id = format!("{}@example.com", unique("a"));
    let answer = format!(
        "From: Customer <{customer}>\r\nTo: {queue_box}\r\nSubject: Re: Order 4711\r\nMessage-ID: <{answer_id}>\r\n\
         In-Reply-To: <{}>\r\nReferences: <{mid}> <{}>\r\nDate: Sat, 21 Nov 2026 09:00:00 +0000\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nThanks!\r\n",
        r.rfc_message_id, r.rfc_message_id
    );
    sb.deliver(&queue_box, answer.as_bytes()).expect("deliver");
    let threaded = eventually("the answer stored", WAIT, async || {
        scalar::<i64>(
            &engine,
            "SELECT contact_id AS v FROM messages WHERE message_id = $1",
            vec![answer_id.clone().into()],
        )
        .await
    })
    .await;
    assert_eq!(threaded, contact);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_sender_address_goes_out_as_username_with_reply_to() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let bot = sb.new_mailbox("outbox-bot");
    let (yaml, queue_box) = config(sb, &db, false, Some(&bot));
    let app = spawn_app_with(db, &yaml).await;
    let engine = app.engine.clone();
    let (contact, _, _) = customer_writes(sb, &engine, &queue_box).await;
    // Through the API, as an agent tool would.
    let resp = app
        .post(
            &format!("/v1/contacts/{contact}/replies"),
            "admin-token",
            Some(serde_json::json!({ "text": "Noted.", "html": "<p>Noted, <b>thanks</b>.</p>" })),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let r: serde_json::Value = resp.json().await.expect("reply JSON");
    let (id, rfc) = (
        r["id"].as_i64().expect("id"),
        r["rfc_message_id"]
            .as_str()
            .expect("rfc_message_id")
            .to_owned(),
    );
    let r = Sent {
        id,
        rfc_message_id: rfc,
    };
    wait_state(&engine, r.id, "sent").await;
    let (entry, raw) = sent_raw(sb, &r.rfc_message_id);
    assert!(entry.mail_from.eq_ignore_ascii_case(&bot), "{entry:?}");
    assert!(raw.contains(&format!("From: {bot}")), "{raw}");
    assert!(raw.contains(&format!("Reply-To: {queue_box}")), "{raw}");
    assert!(raw.contains("multipart/alternative"), "{raw}");
    assert!(raw.contains("<b>thanks</b>"), "{raw}");
    // The contact's detail shows the reply's state.
    let detail: serde_json::Value = app
        .get(&format!("/v1/contacts/{contact}"), "admin-token")
        .await
        .json()
        .await
        .expect("detail JSON");
    assert_eq!(detail["replies"][0]["state"], "sent", "{detail}");
    assert_eq!(detail["replies"][0]["attempts"], 1, "{detail}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temporary_fault_is_retried_then_sent() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, queue_box) = config(sb, &db, true, None);
    let app = spawn_app_with(db, &yaml).await;
    let engine = app.engine.clone();
    let (contact, _, _) = customer_writes(sb, &engine, &queue_box).await;

    sb.smtp().inject_fault(SmtpFault {
        point: FaultPoint::Mail,
        action: FaultAction::Reply451,
        count: 1,
    });
    let r = engine
        .submit_reply(contact, Actor::Supervisor("admin"), reply("Retry me."))
        .await
        .expect("reply stored");
    let (_, attempts, error) = eventually("the first attempt failed", WAIT, async || {
        let s = state_of(&engine, r.id).await;
        (s.0 == "pending" && s.1 == 1).then_some(s)
    })
    .await;
    assert_eq!(attempts, 1);
    assert!(error.unwrap_or_default().contains("451"));
    // Skip the 30 s backoff.
    engine
        .db
        .execute_raw(stmt(
            &engine.db,
            "UPDATE outbox SET next_attempt_at = $1 WHERE id = $2",
            [chrono::Utc::now().into(), r.id.into()],
        ))
        .await
        .expect("due now");
    let (_, attempts, _) = wait_state(&engine, r.id, "sent").await;
    assert_eq!(attempts, 2);
    sent_raw(sb, &r.rfc_message_id);
    sb.smtp().clear_faults();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_auth_disabled_mailbox_fails_with_the_fix() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, queue_box) = config(sb, &db, true, Some("smtpoff@contoso.com"));
    let app = spawn_app_with(db, &yaml).await;
    let engine = app.engine.clone();
    let (contact, _, _) = customer_writes(sb, &engine, &queue_box).await;
    let r = engine
        .submit_reply(contact, Actor::Supervisor("admin"), reply("Never sent."))
        .await
        .expect("reply stored");
    let (_, attempts, error) = wait_state(&engine, r.id, "failed").await;
    assert_eq!(attempts, 1);
    assert!(error.unwrap_or_default().contains("5.7.139"));
    let failed = events(&engine, "reply.failed").await;
    let event = failed
        .iter()
        .find(|e| e["reply_id"] == r.id)
        .expect("reply.failed");
    assert!(
        event["fix"].as_str().is_some_and(|f| !f.is_empty()),
        "{event}"
    );
    let unhealthy = events(&engine, "outgoing.unhealthy").await;
    assert_eq!(unhealthy.len(), 1, "{unhealthy:?}");
    assert_eq!(
        unhealthy[0]["contact_information"],
        "ops-oncall@example.com"
    );
    app.stop().await;
}

/// Two workers over 50 due replies on PostgreSQL: each is sent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_send_each_reply_once() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Postgres).await;
    let (yaml, _queue_box) = config(sb, &db, true, None);
    let config = parse_config(&yaml);
    let engine = Engine::start(config.clone()).await.expect("engine");
    let mut ids = Vec::new();
    for i in 0..50 {
        let contact = mailqueue_tests::seed_contact(&engine, "support", "en", 5, 0).await;
        let mut req = reply(&format!("reply {i}"));
        req.to = Some(vec![format!("{}@example.com", unique("c"))]);
        let r = engine
            .submit_reply(contact, Actor::Supervisor("admin"), req)
            .await
            .expect("reply stored");
        ids.push(r);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let settings = worker::Settings {
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let workers: Vec<_> = (0..2)
        .map(|_| worker::spawn_with(engine.clone(), settings.clone(), stop.clone()))
        .collect();
    for r in &ids {
        wait_state(&engine, r.id, "sent").await;
    }
    stop.cancel();
    for w in workers {
        w.await.expect("worker task");
    }
    let sent = sb.sent();
    for r in &ids {
        let n = sent
            .iter()
            .filter(|e| e.message_id.as_deref() == Some(r.rfc_message_id.as_str()))
            .count();
        assert_eq!(n, 1, "reply {} sent {n} times", r.id);
        assert_eq!(state_of(&engine, r.id).await.1, 1, "one attempt");
    }
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for e in events(&engine, "reply.sent").await {
        *by_worker
            .entry(e["worker"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(by_worker.values().sum::<usize>(), 50, "{by_worker:?}");
    assert_eq!(by_worker.len(), 2, "both workers sent: {by_worker:?}");
}

/// A reply left in `sending` past its lease (its worker died mid-send) is failed as "outcome unknown", not resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stuck_sending_row_is_failed_not_resent() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, _queue_box) = config(sb, &db, true, None);
    let config = parse_config(&yaml);
    let engine = Engine::start(config.clone()).await.expect("engine");
    let contact = mailqueue_tests::seed_contact(&engine, "support", "en", 5, 0).await;
    let mut req = reply("Was I sent?");
    req.to = Some(vec![format!("{}@example.com", unique("c"))]);
    let r = engine
        .submit_reply(contact, Actor::Supervisor("admin"), req)
        .await
        .expect("reply stored");
    engine
        .db
        .execute_raw(stmt(
            &engine.db,
            "UPDATE outbox SET state = 'sending', attempts = 1, locked_by = 'dead-worker', locked_until = $1 \
             WHERE id = $2",
            [
                (chrono::Utc::now() - chrono::Duration::minutes(1)).into(),
                r.id.into(),
            ],
        ))
        .await
        .expect("stuck");
    let stop = tokio_util::sync::CancellationToken::new();
    let w = worker::spawn(engine.clone(), stop.clone());
    let (_, attempts, error) = wait_state(&engine, r.id, "failed").await;
    assert_eq!(attempts, 1);
    assert_eq!(error.as_deref(), Some(worker::OUTCOME_UNKNOWN));
    let failed = events(&engine, "reply.failed").await;
    assert!(failed.iter().any(|e| e["reply_id"] == r.id), "{failed:?}");
    stop.cancel();
    w.await.expect("worker task");
    assert!(
        !sb.sent()
            .iter()
            .any(|e| e.message_id.as_deref() == Some(r.rfc_message_id.as_str())),
        "not resent"
    );
}

/// Every attempt failing for `unhealthy_after` (zero here) reports the outgoing server unhealthy once; the next
/// accepted message reports it healthy again. The retry comes after the (shortened) backoff by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_server_is_reported_unhealthy_then_healthy() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, _queue_box) = config(sb, &db, true, None);
    let config = parse_config(&yaml);
    let engine = Engine::start(config.clone()).await.expect("engine");
    let contact = mailqueue_tests::seed_contact(&engine, "support", "en", 5, 0).await;
    let mut req = reply("Flaky server.");
    req.to = Some(vec![format!("{}@example.com", unique("c"))]);
    sb.smtp().inject_fault(SmtpFault {
        point: FaultPoint::Mail,
        action: FaultAction::Reply451,
        count: 2,
    });
    let r = engine
        .submit_reply(contact, Actor::Supervisor("admin"), req)
        .await
        .expect("reply stored");
    let stop = tokio_util::sync::CancellationToken::new();
    let settings = worker::Settings {
        poll_interval: Duration::from_millis(50),
        retry_base: Duration::from_millis(200),
        unhealthy_after: Duration::ZERO,
        ..Default::default()
    };
    let w = worker::spawn_with(engine.clone(), settings, stop.clone());
    let (_, attempts, _) = wait_state(&engine, r.id, "sent").await;
    sb.smtp().clear_faults();
    assert_eq!(attempts, 3);
    let unhealthy = events(&engine, "outgoing.unhealthy").await;
    assert_eq!(unhealthy.len(), 1, "reported once: {unhealthy:?}");
    assert_eq!(
        unhealthy[0]["contact_information"],
        "ops-oncall@example.com"
    );
    let healthy = eventually("outgoing.healthy", WAIT, async || {
        let h = events(&engine, "outgoing.healthy").await;
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(healthy.len(), 1);
    let retrying = events(&engine, "reply.retrying").await;
    assert_eq!(retrying.len(), 2, "{retrying:?}");
    assert!(retrying[0]["fix"].as_str().is_some_and(|f| !f.is_empty()));
    stop.cancel();
    w.await.expect("worker task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reply_with_attachments_is_sent_as_multipart_mixed() {
    use mail_parser::{MessageParser, MimeHeaders};
    use mailqueue_engine::{Error, outbox::ReplyAttachment};

    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, queue_box) = config(sb, &db, true, None);
    let app = spawn_app_with(db, &yaml).await;
    let engine = app.engine.clone();
    let (contact, _customer, _mid) = customer_writes(sb, &engine, &queue_box).await;

    // Binary bytes (every byte value) behind a PDF header, and a UTF-8 text file.
    let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    pdf.extend(0u8..=255);
    pdf.extend_from_slice(b"\n%%EOF\n");
    let txt = "Lieferschein 4711\r\nGrüße\r\n".as_bytes().to_vec();
    let b64 = |d: &[u8]| {
        // Minimal standard base64 encoder, so the test does not depend on the engine's decoder crate.
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in d.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    };

    // Invalid base64 is refused before anything is stored.
    let mut bad = reply("See attached.");
    bad.attachments = vec![ReplyAttachment {
        filename: "x.bin".into(),
        content_type: "application/octet-stream".into(),
        content_base64: "not*base64!".into(),
    }];
    let err = engine
        .submit_reply(contact, Actor::Supervisor("admin"), bad)
        .await
        .expect_err("bad base64 refused");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");

    let mut req = reply("Please find the documents attached.");
    req.attachments = vec![
        ReplyAttachment {
            filename: "invoice-4711.pdf".into(),
            content_type: "application/pdf".into(),
            content_base64: b64(&pdf),
        },
        ReplyAttachment {
            filename: "notes.txt".into(),
            content_type: "text/plain; charset=utf-8".into(),
            content_base64: b64(&txt),
        },
    ];
    let r = engine
        .submit_reply(contact, Actor::Supervisor("admin"), req)
        .await
        .expect("reply stored");
    let stored: Option<i64> = scalar(
        &engine,
        "SELECT COUNT(*) AS v FROM attachments WHERE message_id = $1",
        vec![r.message_id.into()],
    )
    .await;
    assert_eq!(stored, Some(2));
    wait_state(&engine, r.id, "sent").await;

    let (_, raw) = sent_raw(sb, &r.rfc_message_id);
    assert!(raw.contains("multipart/mixed"), "{raw}");
    let parsed = MessageParser::default()
        .parse(raw.as_bytes())
        .expect("parse the sent mail");
    assert!(
        parsed
            .body_text(0)
            .is_some_and(|t| t.contains("Please find the documents attached.")),
        "{raw}"
    );
    let files: Vec<(String, Vec<u8>)> = parsed
        .attachments()
        .map(|p| {
            (
                p.attachment_name().unwrap_or_default().to_owned(),
                p.contents().to_vec(),
            )
        })
        .collect();
    assert_eq!(
        files,
        vec![
            ("invoice-4711.pdf".to_owned(), pdf),
            ("notes.txt".to_owned(), txt)
        ],
        "{raw}"
    );
    app.stop().await;
}

/// Starts an engine (no services) over `yaml` and a worker with fast retries; the worker follows the engine's
/// configuration.
async fn engine_with_worker(
    yaml: &str,
    settings: worker::Settings,
) -> (
    Engine,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let engine = Engine::start(parse_config(yaml)).await.expect("engine");
    let stop = tokio_util::sync::CancellationToken::new();
    let w = worker::spawn_with(engine.clone(), settings, stop.clone());
    (engine, stop, w)
}

fn fast() -> worker::Settings {
    worker::Settings {
        poll_interval: Duration::from_millis(50),
        retry_base: Duration::from_millis(50),
        ..Default::default()
    }
}

/// A reply to a fresh seeded contact of queue `support`, to a fresh customer address.
async fn seeded_reply(engine: &Engine, text: &str) -> mailqueue_engine::outbox::Reply {
    let contact = mailqueue_tests::seed_contact(engine, "support", "en", 5, 0).await;
    let mut req = reply(text);
    req.to = Some(vec![format!("{}@example.com", unique("c"))]);
    engine
        .submit_reply(contact, Actor::Supervisor("admin"), req)
        .await
        .expect("reply stored")
}

fn copies(sb: &Sandbox, rfc_message_id: &str) -> usize {
    sb.sent()
        .iter()
        .filter(|e| e.message_id.as_deref() == Some(rfc_message_id))
        .count()
}

/// The outgoing username is a mailbox the service app has no FullAccess on: Exchange answers `535 5.7.3` to the
/// first token and again to a freshly fetched one. The reply fails after one attempt with the 5.7.3 checklist and
/// is not retried; the outgoing server is reported unhealthy to its contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_rejected_twice_fails_with_the_5_7_3_checklist() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, _queue_box) = config(sb, &db, false, Some("anna@contoso.com"));
    let (engine, stop, w) = engine_with_worker(&yaml, fast()).await;
    let r = seeded_reply(&engine, "Refused twice.").await;

    let (_, attempts, error) = wait_state(&engine, r.id, "failed").await;
    assert_eq!(attempts, 1, "a refused token is not retried by the worker");
    let error = error.unwrap_or_default();
    assert!(error.contains("535 5.7.3"), "{error}");
    let failed = events(&engine, "reply.failed").await;
    let event = failed
        .iter()
        .find(|e| e["reply_id"] == r.id)
        .expect("reply.failed");
    let fix = event["fix"].as_str().unwrap_or_default();
    for step in [
        "SMTP.SendAsApp",
        "New-ServicePrincipal",
        "Add-MailboxPermission",
    ] {
        assert!(fix.contains(step), "the fix names {step}: {event}");
    }
    let unhealthy = events(&engine, "outgoing.unhealthy").await;
    assert_eq!(unhealthy.len(), 1, "{unhealthy:?}");
    assert_eq!(
        unhealthy[0]["contact_information"],
        "ops-oncall@example.com"
    );
    assert!(
        unhealthy[0]["cause"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{unhealthy:?}"
    );
    stop.cancel();
    w.await.expect("worker task");
    assert_eq!(copies(sb, &r.rfc_message_id), 0);
}

/// The server answers `451` to every attempt: the reply is retried with backoff and failed at the attempt limit,
/// with the cause, and never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temporary_faults_give_up_at_the_attempt_limit() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, _queue_box) = config(sb, &db, true, None);
    sb.smtp().inject_fault(SmtpFault {
        point: FaultPoint::Mail,
        action: FaultAction::Reply451,
        count: 1000,
    });
    let settings = worker::Settings {
        max_attempts: 3,
        ..fast()
    };
    let (engine, stop, w) = engine_with_worker(&yaml, settings).await;
    let r = seeded_reply(&engine, "Never accepted.").await;

    let (_, attempts, error) = wait_state(&engine, r.id, "failed").await;
    sb.smtp().clear_faults();
    assert_eq!(attempts, 3);
    let error = error.unwrap_or_default();
    assert!(error.starts_with("gave up after 3 attempts"), "{error}");
    assert!(error.contains("451"), "{error}");
    let retrying: Vec<_> = events(&engine, "reply.retrying")
        .await
        .into_iter()
        .filter(|e| e["reply_id"] == r.id)
        .collect();
    assert_eq!(retrying.len(), 2, "{retrying:?}");
    let failed = events(&engine, "reply.failed").await;
    let event = failed
        .iter()
        .find(|e| e["reply_id"] == r.id)
        .expect("reply.failed");
    assert_eq!(event["attempts"], 3, "{event}");
    assert!(
        event["cause"].as_str().is_some_and(|c| !c.is_empty()),
        "{event}"
    );
    stop.cancel();
    w.await.expect("worker task");
    assert_eq!(copies(sb, &r.rfc_message_id), 0);
}

/// `max_email_size_mb` lowered (by a configuration reload) after a reply was stored: the worker refuses it before
/// connecting, fails it with the size explanation, and does not count it against the server's health.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reply_too_large_after_a_reload_is_failed_not_sent() {
    use mailqueue_engine::outbox::ReplyAttachment;
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, _queue_box) = config(sb, &db, true, None);
    let engine = Engine::start(parse_config(&yaml)).await.expect("engine");
    let contact = mailqueue_tests::seed_contact(&engine, "support", "en", 5, 0).await;
    let mut req = reply("The file you asked for.");
    req.to = Some(vec![format!("{}@example.com", unique("c"))]);
    // 1.2 MB of 'A's is valid base64 for 900 KB: about 1.2 MB once encoded in the mail, above a 1 MB limit.
    req.attachments = vec![ReplyAttachment {
        filename: "scan.bin".into(),
        content_type: "application/octet-stream".into(),
        content_base64: "A".repeat(1_200_000),
    }];
    let r = engine
        .submit_reply(contact, Actor::Supervisor("admin"), req)
        .await
        .expect("stored under the 25 MB limit");

    let lowered = yaml.replace(
        "outgoing_server:\n",
        "outgoing_server:\n  max_email_size_mb: 1\n",
    );
    engine
        .replace_config(parse_config(&lowered))
        .await
        .expect("reload");
    let stop = tokio_util::sync::CancellationToken::new();
    let w = worker::spawn_with(engine.clone(), fast(), stop.clone());

    let (_, attempts, error) = wait_state(&engine, r.id, "failed").await;
    assert_eq!(attempts, 1);
    let error = error.unwrap_or_default();
    assert!(error.contains("message too large"), "{error}");
    assert!(error.contains("max_email_size_mb"), "{error}");
    let failed = events(&engine, "reply.failed").await;
    let event = failed
        .iter()
        .find(|e| e["reply_id"] == r.id)
        .expect("reply.failed");
    assert!(
        event["fix"]
            .as_str()
            .is_some_and(|f| f.contains("smaller attachments")),
        "{event}"
    );
    assert!(
        events(&engine, "outgoing.unhealthy").await.is_empty(),
        "a local size refusal says nothing about the server"
    );
    stop.cancel();
    w.await.expect("worker task");
    assert_eq!(copies(sb, &r.rfc_message_id), 0);
}

/// A running worker follows a configuration reload: after the outgoing `username` changes, the next reply is sent
/// by the new mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_switches_the_outgoing_server() {
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (yaml, queue_box) = config(sb, &db, false, None);
    let (engine, stop, w) = engine_with_worker(&yaml, fast()).await;
    let first = seeded_reply(&engine, "From the first mailbox.").await;
    wait_state(&engine, first.id, "sent").await;
    assert!(
        sent_raw(sb, &first.rfc_message_id)
            .0
            .user
            .eq_ignore_ascii_case(&queue_box)
    );

    let other = sb.new_mailbox("outbox-reload");
    let quoted = |s: &str| serde_json::to_string(s).unwrap();
    let reloaded = yaml.replace(
        &format!("username: {}", quoted(&queue_box)),
        &format!("username: {}", quoted(&other)),
    );
    assert_ne!(reloaded, yaml);
    engine
        .replace_config(parse_config(&reloaded))
        .await
        .expect("reload");
    let second = seeded_reply(&engine, "From the second mailbox.").await;
    wait_state(&engine, second.id, "sent").await;
    let (entry, raw) = sent_raw(sb, &second.rfc_message_id);
    assert!(entry.user.eq_ignore_ascii_case(&other), "{entry:?}");
    assert!(raw.contains(&format!("From: {other}")), "{raw}");
    stop.cancel();
    w.await.expect("worker task");
}

/// From when the contact arrived on an address whose `sender` flag is off: another sender-enabled address of the
/// queue; the agent's choice in the reply request wins over both (also over a sender-enabled arrival address).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn from_falls_back_to_another_sender_address_or_the_agents_choice() {
    use mailqueue_engine::ingest::{Incoming, Outcome};
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    // support@contoso.com may send as help@contoso.com in the sandbox world; the app has FullAccess on support@.
    let (sender, alias) = ("support@contoso.com", "help@contoso.com");
    let arrival = sb.new_mailbox("outbox-nosend");
    let mut c = SandboxConfig::empty(sb, &db.url);
    c.servers = vec![SbServer::service(sb, "svc")];
    c.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        vec![
            SbAddress::new(&arrival, "svc"),
            SbAddress::new(sender, "svc"),
            SbAddress::new(alias, "svc"),
        ],
    )];
    c.extra = mailqueue_tests::sandbox_outgoing_yaml(sb, sender, "ops-oncall@example.com");
    let quoted = |s: &str| serde_json::to_string(s).unwrap();
    let yaml = c.yaml().replace(
        &format!(
            "address: {}\n        server: \"svc\"\n        sender: true",
            quoted(&arrival)
        ),
        &format!(
            "address: {}\n        server: \"svc\"\n        sender: false",
            quoted(&arrival)
        ),
    );
    assert!(yaml.contains("sender: false"), "{yaml}");
    let (engine, stop, w) = engine_with_worker(&yaml, fast()).await;

    let contact_on = async |address: &str| {
        let customer = format!("{}@example.com", unique("cust"));
        let raw = mailqueue_tests::mail(
            &customer,
            address,
            "Order 4711",
            &format!("{}@example.com", unique("m")),
            "Where is it?",
        );
        match engine
            .ingest(Incoming {
                raw: &raw,
                address,
                source_key: None,
            })
            .await
            .expect("ingest")
        {
            Outcome::Created { contact_id, .. } => contact_id,
            other => panic!("expected a new contact, got {other:?}"),
        }
    };
    let send = async |contact: i64, from: Option<&str>| {
        let mut req = reply("Here you are.");
        req.from = from.map(str::to_owned);
        let r = engine
            .submit_reply(contact, Actor::Supervisor("admin"), req)
            .await
            .expect("reply stored");
        wait_state(&engine, r.id, "sent").await;
        sent_raw(sb, &r.rfc_message_id)
    };

    // Arrived on the non-sender address, no choice: the queue's first sender-enabled address, no Reply-To.
    let on_arrival = contact_on(&arrival).await;
    let (entry, raw) = send(on_arrival, None).await;
    assert!(entry.mail_from.eq_ignore_ascii_case(sender), "{entry:?}");
    assert!(raw.contains(&format!("From: {sender}")), "{raw}");
    assert!(!raw.contains("\nReply-To:"), "{raw}");
    // The agent chose the alias.
    let (entry, raw) = send(on_arrival, Some(alias)).await;
    assert!(entry.mail_from.eq_ignore_ascii_case(alias), "{entry:?}");
    assert!(raw.contains(&format!("From: {alias}")), "{raw}");
    // Arrived on a sender-enabled address, but the agent chose the alias: the choice wins.
    let on_sender = contact_on(sender).await;
    let (entry, raw) = send(on_sender, Some(alias)).await;
    assert!(entry.mail_from.eq_ignore_ascii_case(alias), "{entry:?}");
    assert!(raw.contains(&format!("From: {alias}")), "{raw}");
    stop.cancel();
    w.await.expect("worker task");
}

// ---- At most one copy: the real binary killed mid-send ----

/// Runs `mailqueue serve` with `failpoint` armed over one stored reply, which makes the process abort mid-send;
/// then restarts it. `accepted`: whether the failpoint fires after the server accepted the reply. After the restart
/// the interrupted reply is failed as "outcome unknown" and never sent again (the sent index holds exactly the
/// copies the server had accepted before the crash), and a reply stored meanwhile is sent once.
async fn killed_mid_send(kind: Kind, failpoint: &str, accepted: bool) {
    use std::os::unix::process::ExitStatusExt as _;
    let _serial = SERIAL.lock().await;
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let (yaml, _queue_box) = config(sb, &db, true, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mailqueue.yaml");
    std::fs::write(&path, &yaml).expect("config file");
    // The test's own engine stores replies and reads the rows; it runs no worker.
    let engine = Engine::start(parse_config(&yaml)).await.expect("engine");
    let interrupted = seeded_reply(&engine, "Interrupted.").await;

    let log1 = dir.path().join("run1.log");
    let mut child = mailqueue_tests::serve(&path, &log1, Some(failpoint));
    let status = mailqueue_tests::wait_exit(&mut child, &log1, WAIT).await;
    let logs = std::fs::read_to_string(&log1).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(6),
        "run 1 must abort: {status:?}\n{logs}"
    );
    assert!(logs.contains(&format!("failpoint {failpoint}")), "{logs}");
    let (state, attempts, _) = state_of(&engine, interrupted.id).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("sending", 1),
        "the attempt was recorded before sending"
    );
    let before = usize::from(accepted);
    assert_eq!(copies(sb, &interrupted.rfc_message_id), before, "{logs}");

    // While the engine is down, another reply is stored; the interrupted claim's 10-minute lease runs out
    // (moved into the past here instead of waiting).
    let waiting = seeded_reply(&engine, "Stored while the engine was down.").await;
    engine
        .db
        .execute_raw(stmt(
            &engine.db,
            "UPDATE outbox SET locked_until = $1 WHERE id = $2",
            [
                (chrono::Utc::now() - chrono::Duration::seconds(1)).into(),
                interrupted.id.into(),
            ],
        ))
        .await
        .expect("lease ran out");

    let log2 = dir.path().join("run2.log");
    let mut child = mailqueue_tests::serve(&path, &log2, None);
    let failed = tokio::time::timeout(WAIT, wait_state(&engine, interrupted.id, "failed")).await;
    let sent = tokio::time::timeout(WAIT, wait_state(&engine, waiting.id, "sent")).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = mailqueue_tests::wait_exit(&mut child, &log2, WAIT).await;
    let logs = std::fs::read_to_string(&log2).unwrap_or_default();
    let (_, attempts, error) =
        failed.unwrap_or_else(|_| panic!("not failed after restart:\n{logs}"));
    sent.unwrap_or_else(|_| panic!("the waiting reply was not sent:\n{logs}"));
    assert!(exit.success(), "run 2 stops cleanly: {exit:?}\n{logs}");
    assert_eq!(attempts, 1, "never attempted again");
    assert_eq!(error.as_deref(), Some(worker::OUTCOME_UNKNOWN));
    let event = events(&engine, "reply.failed")
        .await
        .into_iter()
        .find(|e| e["reply_id"] == interrupted.id)
        .expect("reply.failed");
    assert!(
        event["fix"]
            .as_str()
            .is_some_and(|f| f.contains("Sent Items")),
        "{event}"
    );
    assert_eq!(
        copies(sb, &interrupted.rfc_message_id),
        before,
        "not resent after the restart"
    );
    assert_eq!(copies(sb, &waiting.rfc_message_id), 1);
}

mod killed_after_the_server_accepted {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        killed_mid_send(Kind::Postgres, worker::FAILPOINT_AFTER_ACCEPT, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        killed_mid_send(Kind::Sqlite, worker::FAILPOINT_AFTER_ACCEPT, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_before_sending_sends_nothing() {
    killed_mid_send(Kind::Sqlite, worker::FAILPOINT_BEFORE_SEND, false).await;
}
