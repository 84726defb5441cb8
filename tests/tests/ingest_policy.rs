//! Ingest policies: automated mail (out-of-office and vacation replies, bulk mail, bounces, loops) never opens a
//! contact, joins the contact it belongs to without re-opening it, or goes to quarantine; bounces of our replies
//! become `reply.bounced`; the per-sender rate breaker. On PostgreSQL and SQLite.

use std::{path::PathBuf, time::Duration};

use mailqueue_engine::{
    Engine,
    contacts::Actor,
    events::{self, Event},
    ingest::{AutomatedKind, Incoming, Outcome},
    outbox::{Reply, ReplyRequest},
    store,
};
use mailqueue_schema::entity::{contact, quarantine};
use mailqueue_tests::{Kind, TestDb, both_backends, config_yaml, engine, mail, parse_config};
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait};
use serde_json::json;

both_backends! {
    automated_mail_never_opens_a_contact => automated_mail_never_opens_a_contact;
    replies_to_our_reply_attach_without_reopening => replies_to_our_reply_attach_without_reopening;
    quarantine_policy_quarantines_even_threaded_mail => quarantine_policy_quarantines_even_threaded_mail;
    sender_rate_breaker => sender_rate_breaker;
}

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/automated")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture that names our reply: its `REPLY-MESSAGE-ID` placeholder replaced.
fn naming(name: &str, reply: &Reply) -> String {
    fixture(name).replace("REPLY-MESSAGE-ID", &reply.rfc_message_id)
}

async fn ingest(engine: &Engine, raw: &str) -> Outcome {
    engine
        .ingest(Incoming {
            raw: raw.as_bytes(),
            address: "support@contoso.com",
            source_key: None,
        })
        .await
        .expect("ingest")
}

async fn all_events(engine: &Engine) -> Vec<Event> {
    events::read(engine, 0, 10_000, Duration::ZERO, |_| true)
        .await
        .expect("events")
        .0
}

async fn contacts(engine: &Engine) -> u64 {
    contact::Entity::find().count(&engine.db).await.unwrap()
}

#[track_caller]
fn quarantined(outcome: &Outcome, needles: &[&str]) {
    let Outcome::Quarantined { reason, .. } = outcome else {
        panic!("expected Quarantined, got {outcome:?}")
    };
    for needle in needles {
        assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
    }
    assert!(outcome.move_to_quarantine_folder());
}

/// An engine over a fresh database with the test configuration plus `ingest`.
async fn engine_with(kind: Kind, ingest: &str) -> (Engine, TestDb) {
    let db = TestDb::new(kind).await;
    let yaml = format!("{}ingest:\n{ingest}", config_yaml(&db.url));
    let engine = Engine::start(parse_config(&yaml))
        .await
        .expect("engine starts");
    (engine, db)
}

/// A customer mail on support@, a reply of ours to it (with its outbox row), and the contact closed.
async fn closed_contact_with_reply(engine: &Engine) -> (i64, Reply) {
    let raw = mail(
        "kettle.owner@example.net",
        "support@contoso.com",
        "Broken kettle",
        "kettle-1@example.net",
        "It broke.",
    );
    let Outcome::Created { contact_id, .. } =
        ingest(engine, &String::from_utf8(raw).unwrap()).await
    else {
        panic!("expected a new contact")
    };
    let req: ReplyRequest =
        serde_json::from_value(json!({ "text": "Sorry! A new one is on its way." })).unwrap();
    let reply = engine
        .submit_reply(contact_id, Actor::Supervisor("admin"), req)
        .await
        .expect("reply");
    engine
        .close(contact_id, Actor::Supervisor("admin"))
        .await
        .expect("close");
    (contact_id, reply)
}

async fn automated_mail_never_opens_a_contact(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let cases = [
        (
            "01-exchange-out-of-office.eml",
            "automated mail (auto-reply: Auto-Submitted: auto-replied) that belongs to no contact",
            "auto-reply",
        ),
        (
            "02-vacation-x-autoreply.eml",
            "automated mail (auto-reply: X-Autoreply: yes) that belongs to no contact",
            "auto-reply",
        ),
        (
            "03-newsletter-bulk.eml",
            "automated mail (bulk: Precedence: bulk) that belongs to no contact",
            "bulk",
        ),
        (
            "04-postmaster-dsn.eml",
            "automated mail (bounce: Content-Type: multipart/report; report-type=delivery-status) that belongs \
             to no contact (it reports on <REPLY-MESSAGE-ID>, which is none of our replies)",
            "bounce",
        ),
        (
            "05-mailer-daemon-unknown.eml",
            "(it reports on <never-stored-4242@contoso.com>, which is none of our replies)",
            "bounce",
        ),
        (
            "06-loop-own-address.eml",
            "automated mail (loop: From: Sales@contoso.com is one of our queue addresses) that belongs to no contact",
            "loop",
        ),
    ];
    for (name, reason, _) in &cases {
        let outcome = ingest(&engine, &fixture(name)).await;
        quarantined(&outcome, &[reason]);
        // Again: a duplicate, still no contact.
        assert_eq!(ingest(&engine, &fixture(name)).await, Outcome::Duplicate);
    }
    assert_eq!(contacts(&engine).await, 0);
    let rows = quarantine::Entity::find().all(&engine.db).await.unwrap();
    assert_eq!(rows.len(), cases.len());
    assert_eq!(rows[0].raw, fixture(cases[0].0).into_bytes(), "kept whole");

    let events = all_events(&engine).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["message.quarantined"; cases.len()]);
    for (event, (_, _, automated)) in events.iter().zip(&cases) {
        assert_eq!(event.data["automated"], *automated, "{event:?}");
        assert_eq!(event.contact_id, None);
    }

    // Normal mail still opens contacts.
    let raw = mail(
        "p@example.com",
        "support@contoso.com",
        "Hi",
        "p-1@example.com",
        "Hello",
    );
    let outcome = ingest(&engine, &String::from_utf8(raw).unwrap()).await;
    assert!(matches!(outcome, Outcome::Created { .. }), "{outcome:?}");
    assert!(!outcome.move_to_quarantine_folder());
    assert_eq!(contacts(&engine).await, 1);
}

async fn replies_to_our_reply_attach_without_reopening(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let (id, reply) = closed_contact_with_reply(&engine).await;

    // The customer's out-of-office answers our reply: attached, the contact stays closed.
    let outcome = ingest(&engine, &naming("01-exchange-out-of-office.eml", &reply)).await;
    let Outcome::Attached {
        contact_id,
        message_id: ooo_message,
        kind: automated,
    } = outcome
    else {
        panic!("expected Attached, got {outcome:?}")
    };
    assert_eq!((contact_id, automated), (id, AutomatedKind::AutoReply));
    assert!(!outcome.move_to_quarantine_folder());
    assert_eq!(
        serde_json::to_value(&outcome).unwrap(),
        json!({ "outcome": "attached", "contact_id": id, "message_id": ooo_message, "kind": "auto-reply" })
    );
    assert_eq!(engine.contact(id).await.unwrap().state, "closed");

    // Our reply bounced: attached to its contact, `reply.bounced` names the outbox row and the report.
    let outcome = ingest(&engine, &naming("04-postmaster-dsn.eml", &reply)).await;
    let Outcome::Attached {
        contact_id,
        message_id: bounce_message,
        kind: automated,
    } = outcome
    else {
        panic!("expected Attached, got {outcome:?}")
    };
    assert_eq!((contact_id, automated), (id, AutomatedKind::Bounce));
    assert_eq!(engine.contact(id).await.unwrap().state, "closed");
    let detail = engine.contact_detail(id).await.unwrap();
    assert_eq!(
        detail.messages.len(),
        4,
        "customer mail, reply, out-of-office, bounce"
    );
    assert_eq!(detail.messages[3].id, bounce_message);
    assert_eq!(
        detail.replies[0].state, "pending",
        "the outbox row is left alone"
    );

    let events = all_events(&engine).await;
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e.contact_id == Some(id))
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "contact.created",
            "reply.queued",
            "contact.closed",
            "contact.message_added",
            "reply.bounced"
        ]
    );
    let added = events
        .iter()
        .find(|e| e.kind == "contact.message_added")
        .unwrap();
    assert_eq!(added.data["automated"], "auto-reply");
    assert_eq!(added.data["message_id"], ooo_message);
    assert_eq!(added.queue.as_deref(), Some("support"));
    let bounced = events.iter().find(|e| e.kind == "reply.bounced").unwrap();
    assert_eq!(bounced.data["outbox_id"], reply.id);
    assert_eq!(bounced.data["reply_message_id"], reply.message_id);
    assert_eq!(bounced.data["rfc_message_id"], reply.rfc_message_id);
    assert_eq!(bounced.data["message_id"], bounce_message);
    assert_eq!(bounced.data["status"], "5.1.1");
    assert_eq!(bounced.data["action"], "failed");
    assert_eq!(
        bounced.data["diagnostic"],
        "smtp;550 5.1.1 RESOLVER.ADR.RecipNotFound; not found [mx.example.net]"
    );
    assert_eq!(bounced.data["recipient"], "rfc822;kettle.owner@example.net");
    assert_eq!(bounced.actor.as_deref(), Some("ingest"));

    // A bounce for a message that is not ours still goes to quarantine.
    quarantined(
        &ingest(&engine, &fixture("05-mailer-daemon-unknown.eml")).await,
        &["never-stored-4242@contoso.com"],
    );
    // A person answering our reply re-opens the contact as before.
    let raw = String::from_utf8(mail(
        "kettle.owner@example.net",
        "support@contoso.com",
        "Re: Broken kettle",
        "kettle-2@example.net",
        "Thanks!",
    ))
    .unwrap()
    .replace(
        "Date:",
        &format!("In-Reply-To: <{}>\r\nDate:", reply.rfc_message_id),
    );
    let outcome = ingest(&engine, &raw).await;
    assert!(
        matches!(outcome, Outcome::Threaded { contact_id, reopened: true, .. } if contact_id == id),
        "{outcome:?}"
    );
    assert_eq!(contacts(&engine).await, 1);
}

async fn quarantine_policy_quarantines_even_threaded_mail(kind: Kind) {
    let (engine, _db) = engine_with(kind, "  automated_mail: quarantine\n").await;
    let (id, reply) = closed_contact_with_reply(&engine).await;
    let policy = "`ingest.automated_mail` is `quarantine`";
    quarantined(
        &ingest(&engine, &naming("01-exchange-out-of-office.eml", &reply)).await,
        &[
            "automated mail (auto-reply: Auto-Submitted: auto-replied)",
            policy,
        ],
    );
    let outcome = ingest(&engine, &naming("04-postmaster-dsn.eml", &reply)).await;
    quarantined(&outcome, &["automated mail (bounce:", policy]);
    let Outcome::Quarantined { quarantine_id, .. } = outcome else {
        unreachable!()
    };
    quarantined(
        &ingest(&engine, &fixture("03-newsletter-bulk.eml")).await,
        &[policy],
    );
    assert_eq!(engine.contact_detail(id).await.unwrap().messages.len(), 2);
    assert_eq!(engine.contact(id).await.unwrap().state, "closed");
    assert_eq!(contacts(&engine).await, 1);
    // The bounce is still reported on the reply's contact, pointing at the quarantined mail.
    let events = all_events(&engine).await;
    let bounced = events
        .iter()
        .find(|e| e.kind == "reply.bounced")
        .expect("reply.bounced");
    assert_eq!(bounced.contact_id, Some(id));
    assert_eq!(bounced.data["outbox_id"], reply.id);
    assert_eq!(bounced.data["quarantine_id"], quarantine_id);
    assert_eq!(bounced.data["status"], "5.1.1");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "message.quarantined")
            .count(),
        3
    );
}

async fn sender_rate_breaker(kind: Kind) {
    let (engine, _db) = engine_with(kind, "  sender_limit: { max: 3, per: 10m }\n").await;
    let from = |sender: &str, n: usize| {
        mail(
            sender,
            "support@contoso.com",
            &format!("Flood {n}"),
            &format!("flood-{n}@{sender}"),
            "again",
        )
    };
    for n in 0..3 {
        let outcome = ingest(
            &engine,
            &String::from_utf8(from("flood@example.com", n)).unwrap(),
        )
        .await;
        assert!(
            matches!(outcome, Outcome::Created { .. }),
            "{n}: {outcome:?}"
        );
    }
    let outcome = ingest(
        &engine,
        &String::from_utf8(from("flood@example.com", 3)).unwrap(),
    )
    .await;
    quarantined(
        &outcome,
        &[
            "sender rate limit: flood@example.com has 3 mails stored within the last 10m; the limit is 3",
        ],
    );
    // Other senders are not affected; a reply from the flooding sender is limited too.
    let outcome = ingest(
        &engine,
        &String::from_utf8(from("calm@example.com", 0)).unwrap(),
    )
    .await;
    assert!(matches!(outcome, Outcome::Created { .. }), "{outcome:?}");
    let reply = String::from_utf8(from("flood@example.com", 4))
        .unwrap()
        .replace("Date:", "In-Reply-To: <flood-0@flood@example.com>\r\nDate:");
    quarantined(&ingest(&engine, &reply).await, &["sender rate limit"]);

    // In one batch: the batch's own mails count.
    let raws: Vec<Vec<u8>> = (0..5).map(|n| from("burst@example.com", n)).collect();
    let batch = raws
        .iter()
        .map(|raw| Incoming {
            raw,
            address: "help@contoso.com",
            source_key: None,
        })
        .collect();
    let outcomes = engine.ingest_batch(batch, None).await.unwrap();
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Created { .. }))
        .count();
    assert_eq!(created, 3, "{outcomes:?}");
    quarantined(&outcomes[3], &["burst@example.com has 3 mails"]);
    quarantined(&outcomes[4], &["burst@example.com has 3 mails"]);

    // Once the window has passed, the sender gets through again.
    engine
        .db
        .execute_raw(store::stmt(
            &engine.db,
            "UPDATE messages SET created_at = $1 WHERE from_address = $2",
            [
                (chrono::Utc::now() - chrono::Duration::minutes(11)).into(),
                "flood@example.com".into(),
            ],
        ))
        .await
        .unwrap();
    let outcome = ingest(
        &engine,
        &String::from_utf8(from("flood@example.com", 5)).unwrap(),
    )
    .await;
    assert!(matches!(outcome, Outcome::Created { .. }), "{outcome:?}");
    // Bounces are never limited: five from one postmaster are all stored.
    let (id, reply) = closed_contact_with_reply(&engine).await;
    for n in 0..5 {
        let dsn = naming("04-postmaster-dsn.eml", &reply).replace(
            "Message-ID: <b3c1e7d2",
            &format!("Message-ID: <{n}-b3c1e7d2"),
        );
        let outcome = ingest(&engine, &dsn).await;
        assert!(
            matches!(outcome, Outcome::Attached { contact_id, kind: AutomatedKind::Bounce, .. } if contact_id == id),
            "{n}: {outcome:?}"
        );
    }
    assert_eq!(contacts(&engine).await, 3 + 1 + 3 + 1 + 1);
}
