//! The retention job: closed contacts older than `retention.closed_contacts` are deleted with their messages,
//! attachments and replies; the raw bytes of contacts closed longer than `retention.raw_messages` are dropped (the
//! API answers 410 Gone); events older than `retention.events` are deleted, never the newest nor unsequenced ones;
//! open and recently closed contacts are never touched; batches; the background service follows reloads. On
//! PostgreSQL and SQLite. Also the `retention:` configuration section.

use std::{path::Path, time::Duration};

use chrono::{DateTime, Utc};
use mailqueue_config::Retention;
use mailqueue_engine::{
    Engine, Error,
    contacts::Actor,
    ingest::{Incoming, Outcome},
    retention::{self, Job, Pass},
    store,
};
use mailqueue_schema::entity::{attachment, contact, event, message, outbox};
use mailqueue_tests::{
    Kind, TestDb, both_backends, config_yaml, eventually, parse_config, seed_contact,
    spawn_app_with,
};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;
use tokio_util::sync::CancellationToken;

both_backends! {
    old_closed_contacts_go_with_their_mail => old_closed_contacts_go_with_their_mail;
    batches_cover_more_rows_than_one_batch => batches_cover_more_rows_than_one_batch;
    old_events_go_but_the_sequence_continues => old_events_go_but_the_sequence_continues;
    the_service_follows_reloads_and_stops => the_service_follows_reloads_and_stops;
    raw_passes_follow_the_closing_time_and_rescan_daily => raw_passes_follow_the_closing_time_and_rescan_daily;
    instances_running_at_once_share_the_work => instances_running_at_once_share_the_work;
}

fn days_ago(days: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(days)
}

/// A `retention:` section parsed as the loader would.
fn retention(yaml: &str) -> Retention {
    let text = format!("{}retention: {yaml}\n", config_yaml("sqlite://unused.db"));
    parse_config(&text).retention
}

async fn pass(engine: &Engine, r: &Retention) -> Pass {
    Job::default()
        .pass(engine, r, Utc::now(), &CancellationToken::new())
        .await
        .expect("retention pass")
}

async fn exec(engine: &Engine, sql: &str, values: Vec<sea_orm::Value>) {
    engine
        .db
        .execute_raw(store::stmt(&engine.db, sql, values))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Pretends contact `id` was closed `days` ago.
async fn closed_days_ago(engine: &Engine, id: i64, days: i64) {
    exec(
        engine,
        "UPDATE contacts SET closed_at = $1 WHERE id = $2",
        vec![days_ago(days).into(), id.into()],
    )
    .await;
}

/// A customer mail with a PDF attachment on support@, from its own sender (the sender breaker stays quiet).
async fn customer_mail(engine: &Engine, n: u32) -> i64 {
    let raw = format!(
        "From: Customer <c{n}@example.com>\r\nTo: support@contoso.com\r\nSubject: Case {n}\r\n\
         Message-ID: <case-{n}@example.com>\r\nDate: Sat, 21 Nov 2026 08:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello {n}\r\n--b\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         JVBERi0xLjQK\r\n--b--\r\n"
    );
    let outcome = engine
        .ingest(Incoming {
            raw: raw.as_bytes(),
            address: "support@contoso.com",
            source_key: None,
        })
        .await
        .unwrap();
    match outcome {
        Outcome::Created { contact_id, .. } => contact_id,
        other => panic!("expected Created, got {other:?}"),
    }
}

/// A contact with a customer mail (with attachment) and a reply, claimed by alice and closed; the reply's outbox
/// row is left `pending` or marked `sent`.
async fn answered_and_closed(engine: &Engine, n: u32, reply_sent: bool) -> i64 {
    let id = customer_mail(engine, n).await;
    let support = engine.queues().await.by_name["support"].id;
    let claimed = engine
        .claim_next("alice", &[support], &[])
        .await
        .unwrap()
        .expect("a contact to claim");
    assert_eq!(claimed.id, id);
    let request = serde_json::from_value(json!({ "text": "Thanks!" })).unwrap();
    let reply = engine
        .submit_reply(id, Actor::Agent("alice"), request)
        .await
        .unwrap();
    if reply_sent {
        exec(
            engine,
            "UPDATE outbox SET state = 'sent', sent_at = $1 WHERE message_id = $2",
            vec![Utc::now().into(), reply.message_id.into()],
        )
        .await;
        exec(
            engine,
            "UPDATE messages SET raw = $1 WHERE id = $2",
            vec![
                b"From: support@contoso.com\r\n\r\nThanks!\r\n"
                    .to_vec()
                    .into(),
                reply.message_id.into(),
            ],
        )
        .await;
    }
    engine.close(id, Actor::Agent("alice")).await.unwrap();
    id
}

async fn contact_exists(engine: &Engine, id: i64) -> bool {
    contact::Entity::find_by_id(id)
        .one(&engine.db)
        .await
        .unwrap()
        .is_some()
}

async fn messages_of(engine: &Engine, id: i64) -> Vec<message::Model> {
    message::Entity::find()
        .filter(message::Column::ContactId.eq(id))
        .all(&engine.db)
        .await
        .unwrap()
}

async fn old_closed_contacts_go_with_their_mail(kind: Kind) {
    let db = TestDb::new(kind).await;
    let yaml = config_yaml(&db.url);
    let app = spawn_app_with(db, &yaml).await;
    let engine = app.engine.clone();

    let old = answered_and_closed(&engine, 1, true).await;
    let old_pending_reply = answered_and_closed(&engine, 2, false).await;
    let raw_only = answered_and_closed(&engine, 3, true).await;
    let recent = answered_and_closed(&engine, 4, true).await;
    let open = customer_mail(&engine, 5).await;
    closed_days_ago(&engine, old, 100).await;
    closed_days_ago(&engine, old_pending_reply, 100).await;
    closed_days_ago(&engine, raw_only, 50).await;
    closed_days_ago(&engine, recent, 10).await;
    // An open contact that has waited long is never touched, whatever its age.
    exec(
        &engine,
        "UPDATE contacts SET queued_at = $1, created_at = $1 WHERE id = $2",
        vec![days_ago(400).into(), open.into()],
    )
    .await;
    let old_messages: Vec<i64> = messages_of(&engine, old)
        .await
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(old_messages.len(), 2, "the customer's mail and the reply");

    let r = retention("{ closed_contacts: 90d, raw_messages: 30d }");
    let done = pass(&engine, &r).await;
    assert_eq!(done.contacts, 1, "{done:?}");

    // The old contact is gone with everything of it.
    assert!(!contact_exists(&engine, old).await);
    assert!(messages_of(&engine, old).await.is_empty());
    let left_attachments = attachment::Entity::find()
        .filter(attachment::Column::MessageId.is_in(old_messages.clone()))
        .count(&engine.db)
        .await
        .unwrap();
    assert_eq!(left_attachments, 0);
    let left_outbox = outbox::Entity::find()
        .filter(outbox::Column::ContactId.eq(old))
        .count(&engine.db)
        .await
        .unwrap();
    assert_eq!(left_outbox, 0);
    let deleted = event::Entity::find()
        .filter(event::Column::Kind.eq("contact.deleted"))
        .all(&engine.db)
        .await
        .unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].contact_id, Some(old));
    assert_eq!(deleted[0].queue.as_deref(), Some("support"));
    assert_eq!(deleted[0].actor.as_deref(), Some("retention"));

    // A reply still waiting to be sent keeps its contact (closed 100 days ago, so the customer's raw mail goes).
    assert!(contact_exists(&engine, old_pending_reply).await);
    let pending = outbox::Entity::find()
        .filter(outbox::Column::ContactId.eq(old_pending_reply))
        .one(&engine.db)
        .await
        .unwrap()
        .expect("the pending reply stays");
    assert_eq!(pending.state, "pending");
    // Closed 50 days ago: kept, but the raw bytes of its messages are gone (the parsed mail stays).
    assert!(contact_exists(&engine, raw_only).await);
    for m in messages_of(&engine, raw_only).await {
        assert!(m.raw.is_none(), "message {} kept its raw bytes", m.id);
        assert!(m.raw_deleted_at.is_some());
        assert!(m.subject.is_some());
    }
    let inbound = messages_of(&engine, raw_only)
        .await
        .into_iter()
        .find(|m| m.direction == "inbound")
        .unwrap();
    assert!(
        inbound
            .text_body
            .as_deref()
            .unwrap_or("")
            .contains("Hello 3")
    );
    match engine.raw_message(raw_only, inbound.id).await {
        Err(Error::Gone(m)) => assert!(m.contains("retention"), "{m}"),
        other => panic!("expected Gone, got {other:?}"),
    }
    let path = format!("/v1/contacts/{raw_only}/messages/{}/raw", inbound.id);
    let resp = app.get(&path, "admin-token").await;
    assert_eq!(resp.status(), 410);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "gone");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("retention.raw_messages"),
        "{body}"
    );
    let attachment_id = attachment::Entity::find()
        .filter(attachment::Column::MessageId.eq(inbound.id))
        .one(&engine.db)
        .await
        .unwrap()
        .expect("the attachment stays")
        .id;
    let resp = app
        .get(
            &format!("/v1/contacts/{raw_only}/attachments/{attachment_id}"),
            "admin-token",
        )
        .await;
    assert_eq!(resp.status(), 200);
    // Recent and open contacts keep everything.
    for id in [recent, open] {
        assert!(contact_exists(&engine, id).await);
        let inbound = messages_of(&engine, id)
            .await
            .into_iter()
            .find(|m| m.direction == "inbound")
            .unwrap();
        assert!(inbound.raw.is_some(), "contact {id} lost its raw mail");
        assert!(engine.raw_message(id, inbound.id).await.is_ok());
    }
    let open_contact = engine.contact(open).await.unwrap();
    assert_eq!(open_contact.state, "queued");

    // A second pass (or another instance) finds nothing more to do.
    assert!(pass(&engine, &r).await.is_empty());
    app.stop().await;
}

async fn batches_cover_more_rows_than_one_batch(kind: Kind) {
    let (engine, _db) = mailqueue_tests::engine(kind).await;
    const N: usize = 1_100;
    let mut ids = Vec::with_capacity(N);
    for _ in 0..N {
        ids.push(seed_contact(&engine, "sales", "fr", 1, 60).await);
    }
    let keep = seed_contact(&engine, "sales", "fr", 1, 60).await;
    exec(
        &engine,
        "UPDATE contacts SET state = 'closed', closed_at = $1 WHERE id <> $2",
        vec![days_ago(40).into(), keep.into()],
    )
    .await;

    let done = pass(&engine, &retention("{ closed_contacts: 30d }")).await;
    assert_eq!(done.contacts, N as u64, "{done:?}");
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 1);
    assert!(contact_exists(&engine, keep).await);
    let deleted = event::Entity::find()
        .filter(event::Column::Kind.eq("contact.deleted"))
        .count(&engine.db)
        .await
        .unwrap();
    assert_eq!(deleted, N as u64);

    // Small batches reach the same end: 25 contacts in batches of 7.
    let mut more = Vec::new();
    for _ in 0..25 {
        more.push(seed_contact(&engine, "sales", "fr", 1, 60).await);
    }
    exec(
        &engine,
        "UPDATE contacts SET state = 'closed', closed_at = $1 WHERE id <> $2",
        vec![days_ago(40).into(), keep.into()],
    )
    .await;
    let done = pass(
        &engine,
        &retention("{ closed_contacts: 30d, batch_size: 7 }"),
    )
    .await;
    assert_eq!(done.contacts, 25);
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 1);
}

async fn old_events_go_but_the_sequence_continues(kind: Kind) {
    let (engine, _db) = mailqueue_tests::engine(kind).await;
    for n in 0..12 {
        customer_mail(&engine, 100 + n).await;
    }
    store::events::sequence(&engine.db).await.unwrap();
    let last = store::events::last_seq(&engine.db).await.unwrap();
    assert!(last >= 12, "{last}");
    // Every event so far is old; one more is written but not yet sequenced.
    exec(
        &engine,
        "UPDATE events SET created_at = $1",
        vec![days_ago(60).into()],
    )
    .await;
    exec(
        &engine,
        "INSERT INTO events (kind, data, created_at) VALUES ('test.unsequenced', '{}', $1)",
        vec![days_ago(60).into()],
    )
    .await;

    let done = pass(&engine, &retention("{ events: 30d, batch_size: 5 }")).await;
    assert_eq!(
        done.events,
        (last - 1) as u64,
        "all but the newest sequenced event: {done:?}"
    );
    let left = event::Entity::find().all(&engine.db).await.unwrap();
    let mut seqs: Vec<Option<i64>> = left.iter().map(|e| e.seq).collect();
    seqs.sort();
    assert_eq!(seqs, [None, Some(last)], "{left:?}");

    // Numbering continues after the kept event: a reader resuming after it misses nothing.
    store::events::sequence(&engine.db).await.unwrap();
    let after = store::events::after(&engine.db, last, 10).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].seq, Some(last + 1));
    assert_eq!(after[0].kind, "test.unsequenced");

    // Recent events are kept; the two old ones go now that newer ones exist.
    customer_mail(&engine, 200).await;
    store::events::sequence(&engine.db).await.unwrap();
    let newest = store::events::last_seq(&engine.db).await.unwrap();
    assert!(newest > last + 1);
    let done = pass(&engine, &retention("{ events: 30d }")).await;
    assert_eq!(done.events, 2, "{done:?}");
    let left = event::Entity::find().count(&engine.db).await.unwrap();
    assert_eq!(left, (newest - last - 1) as u64);
}

/// Three engines (as three instances would, each with its own pool) run a pass at once over the same contacts:
/// every contact is deleted exactly once, with one event, and no pass fails.
async fn instances_running_at_once_share_the_work(kind: Kind) {
    let (engine, db) = mailqueue_tests::engine(kind).await;
    const N: u64 = 600;
    for _ in 0..N {
        seed_contact(&engine, "sales", "fr", 1, 60).await;
    }
    exec(
        &engine,
        "UPDATE contacts SET state = 'closed', closed_at = $1",
        vec![days_ago(40).into()],
    )
    .await;
    let r = retention("{ closed_contacts: 30d, batch_size: 25 }");
    let mut passes = Vec::new();
    for _ in 0..3 {
        let other = Engine::start(parse_config(&config_yaml(&db.url)))
            .await
            .expect("another instance");
        let r = r.clone();
        passes.push(tokio::spawn(async move { pass(&other, &r).await }));
    }
    let mut deleted = 0;
    for p in passes {
        deleted += p.await.unwrap().contacts;
    }
    // A pass that found only rows locked by the others stops early; one more pass finishes whatever is left.
    deleted += pass(&engine, &r).await.contacts;
    assert_eq!(deleted, N);
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 0);
    let events = event::Entity::find()
        .filter(event::Column::Kind.eq("contact.deleted"))
        .count(&engine.db)
        .await
        .unwrap();
    assert_eq!(events, N, "one event per deleted contact");
}

/// The raw bytes of `contact`'s inbound message, if it still has them.
async fn inbound_raw(engine: &Engine, contact: i64) -> Option<Vec<u8>> {
    messages_of(engine, contact)
        .await
        .into_iter()
        .find(|m| m.direction == "inbound")
        .and_then(|m| m.raw)
}

async fn raw_passes_follow_the_closing_time_and_rescan_daily(kind: Kind) {
    let (engine, _db) = mailqueue_tests::engine(kind).await;
    let old = answered_and_closed(&engine, 1, true).await;
    let nearly = answered_and_closed(&engine, 2, true).await;
    closed_days_ago(&engine, old, 50).await;
    // Closed 29½ days ago: old enough for `raw_messages: 30d` in 12 hours.
    exec(
        &engine,
        "UPDATE contacts SET closed_at = $1 WHERE id = $2",
        vec![
            (Utc::now() - chrono::Duration::hours(29 * 24 + 12)).into(),
            nearly.into(),
        ],
    )
    .await;
    let r = retention("{ raw_messages: 30d }");
    let stop = CancellationToken::new();
    let mut job = Job::default();
    let now = Utc::now();

    let done = job.pass(&engine, &r, now, &stop).await.unwrap();
    assert_eq!(
        done.raw_messages, 2,
        "the mail and the reply of the old contact"
    );
    assert!(inbound_raw(&engine, old).await.is_none());
    assert!(inbound_raw(&engine, nearly).await.is_some());

    // Raw bytes that appear later on a contact the pass already covered (a reply sent after the pass) wait for
    // the daily full scan; a contact that becomes old enough is covered by the next pass.
    exec(
        &engine,
        "UPDATE messages SET raw = $1, raw_deleted_at = NULL WHERE contact_id = $2 AND direction = 'inbound'",
        vec![b"late".to_vec().into(), old.into()],
    )
    .await;
    let later = now + chrono::Duration::hours(13);
    let done = job.pass(&engine, &r, later, &stop).await.unwrap();
    assert_eq!(
        done.raw_messages, 2,
        "only the contact that became old: {done:?}"
    );
    assert!(inbound_raw(&engine, nearly).await.is_none());
    assert!(inbound_raw(&engine, old).await.is_some());
    let done = job
        .pass(&engine, &r, now + chrono::Duration::hours(25), &stop)
        .await
        .unwrap();
    assert_eq!(done.raw_messages, 1, "the daily full scan: {done:?}");
    assert!(inbound_raw(&engine, old).await.is_none());
}

async fn the_service_follows_reloads_and_stops(kind: Kind) {
    let (engine, _db) = mailqueue_tests::engine(kind).await;
    let id = seed_contact(&engine, "support", "en", 5, 60).await;
    exec(
        &engine,
        "UPDATE contacts SET state = 'closed', closed_at = $1 WHERE id = $2",
        vec![days_ago(400).into(), id.into()],
    )
    .await;
    let stop = CancellationToken::new();
    let service = tokio::spawn(retention::run(engine.clone(), stop.clone()));
    // Off by default: the contact stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(contact_exists(&engine, id).await);

    // A reload that sets an age starts a pass at once.
    let old = engine.config().await;
    let mut config = (*old).clone();
    config.retention = retention("{ closed_contacts: 365d, interval: 1h }");
    engine.replace_config(config).await.unwrap();
    eventually(
        "the retention service deletes the contact",
        Duration::from_secs(30),
        async || (!contact_exists(&engine, id).await).then_some(()),
    )
    .await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .expect("the service stops when cancelled")
        .unwrap();
}

#[test]
fn the_section_is_optional_and_validated() {
    let base = config_yaml("sqlite://unused.db");
    let load =
        |extra: &str| mailqueue_config::load_str(Path::new("mq.yaml"), &format!("{base}{extra}"));
    let off = load("").unwrap().config.retention;
    assert!(!off.is_enabled());
    let on = load("retention:\n  closed_contacts: 365d\n  raw_messages: 30d\n  events: 90d\n  interval: 10m\n")
        .unwrap();
    assert!(
        on.config
            .summary()
            .ends_with("retention: closed contacts 365d, raw messages 30d, events 90d"),
        "{}",
        on.config.summary()
    );
    let r = &on.config.retention;
    assert_eq!(
        r.closed_contacts.unwrap().0,
        Duration::from_secs(365 * 86_400)
    );
    assert_eq!(r.raw_messages.unwrap().0, Duration::from_secs(30 * 86_400));
    assert_eq!(r.events.unwrap().0, Duration::from_secs(90 * 86_400));
    assert_eq!(r.interval.0, Duration::from_secs(600));
    assert_eq!(r.batch_size, 1000);
    let retention_warnings = |l: &mailqueue_config::Loaded| {
        l.warnings
            .iter()
            .filter(|w| {
                w.field
                    .as_deref()
                    .is_some_and(|f| f.starts_with("retention"))
            })
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(retention_warnings(&on), "");

    let lines = base.lines().count();
    let errors = load("retention:\n  closed_contacts: soon\n  batch_size: 0\n  keep: forever\n")
        .unwrap_err()
        .to_string();
    for needle in [
        format!("mq.yaml:{}:", lines + 2),
        "retention.closed_contacts".into(),
        format!("mq.yaml:{}:", lines + 3),
        "retention.batch_size 0 is out of range; expected 1..=10000".into(),
        format!("mq.yaml:{}:", lines + 4),
        "unknown key `keep`".into(),
    ] {
        assert!(errors.contains(&needle), "{needle:?} not in:\n{errors}");
    }

    let warned = load("retention: { closed_contacts: 30d, raw_messages: 60d }\n").unwrap();
    let text = retention_warnings(&warned);
    assert!(
        text.contains(
            "retention.raw_messages (60d) is not shorter than retention.closed_contacts (30d)"
        ) && text.contains("has no effect"),
        "{text}"
    );
    let warned = load("retention: {}\n").unwrap();
    let text = retention_warnings(&warned);
    assert!(text.contains("nothing is ever deleted"), "{text}");

    let schema = serde_json::to_string(&mailqueue_config::json_schema()).unwrap();
    for needle in ["closed_contacts", "raw_messages", "batch_size", "410 Gone"] {
        assert!(schema.contains(needle), "the schema lacks {needle}");
    }
}

#[test]
fn the_example_documents_the_section() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/mailqueue.yaml");
    let text = std::fs::read_to_string(example).unwrap();
    for key in [
        "retention:",
        "closed_contacts:",
        "raw_messages:",
        "events:",
        "batch_size:",
    ] {
        assert!(text.contains(key), "the example lacks {key}");
    }
}
