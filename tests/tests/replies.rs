//! Replies: stored as outbound messages with our own Message-ID, threaded on the customer's mail, queued in the
//! outbox with a `reply.queued` event; holder, size and sender checks. On PostgreSQL and SQLite.

use std::time::Duration;

use chrono::Utc;
use mailqueue_engine::{
    Engine, Error,
    contacts::Actor,
    events,
    ingest::{Incoming, Outcome},
    outbox::{Reply, ReplyRequest},
};
use mailqueue_schema::entity::{message, outbox};
use mailqueue_tests::{Kind, TestDb, both_backends, config_yaml, engine, mail, parse_config};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;

both_backends! {
    reply_is_stored_threaded_and_queued => reply_is_stored_threaded_and_queued;
    only_the_holder_may_reply => only_the_holder_may_reply;
    too_large_reply_is_refused => too_large_reply_is_refused;
    sender_must_be_enabled_on_the_queue => sender_must_be_enabled_on_the_queue;
}

fn req(value: serde_json::Value) -> ReplyRequest {
    serde_json::from_value(value).expect("a valid reply request")
}

/// A customer mail with a Reply-To and a stacked subject, ingested on support@; returns the contact id.
async fn customer_mail(engine: &Engine, message_id: &str) -> i64 {
    let raw = String::from_utf8(mail(
        "c@example.com",
        "support@contoso.com",
        "RE: AW: Lieferung",
        message_id,
        "Wo?",
    ))
    .unwrap()
    .replace("Date:", "Reply-To: Kunde <replies@example.com>\r\nDate:");
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

async fn claim(engine: &Engine, agent: &str, contact_id: i64) {
    let support = engine.queues().await.by_name["support"].id;
    let c = engine
        .claim_next(agent, &[support], &[])
        .await
        .unwrap()
        .expect("a contact to claim");
    assert_eq!(c.id, contact_id);
}

async fn reply_is_stored_threaded_and_queued(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = customer_mail(&engine, "cust-1@example.com").await;
    claim(&engine, "alice", id).await;
    let before = Utc::now();
    let reply: Reply = engine
        .submit_reply(id, Actor::Agent("alice"), req(json!({ "text": "Hallo!" })))
        .await
        .unwrap();
    assert_eq!(reply.state, "pending");
    assert_eq!(reply.attempts, 0);
    assert!(
        reply.rfc_message_id.ends_with("@contoso.com"),
        "{}",
        reply.rfc_message_id
    );
    assert!(!reply.rfc_message_id.contains('<'));

    let detail = engine.contact_detail(id).await.unwrap();
    assert_eq!(detail.messages.len(), 2);
    let out = &detail.messages[1];
    assert_eq!(out.direction, "outbound");
    assert_eq!(out.id, reply.message_id);
    assert_eq!(
        out.message_id.as_deref(),
        Some(reply.rfc_message_id.as_str())
    );
    assert_eq!(out.in_reply_to.as_deref(), Some("cust-1@example.com"));
    assert_eq!(
        out.subject.as_deref(),
        Some("Re: Lieferung"),
        "prefixes are not stacked"
    );
    assert_eq!(
        out.to,
        vec!["replies@example.com".to_owned()],
        "the Reply-To is the default recipient"
    );
    assert_eq!(out.text_body.as_deref(), Some("Hallo!"));
    assert_eq!(detail.replies.len(), 1);
    assert_eq!(detail.replies[0].id, reply.id);
    assert_eq!(detail.replies[0].state, "pending");
    assert_eq!(detail.replies[0].rfc_message_id, reply.rfc_message_id);
    let stored = message::Entity::find_by_id(reply.message_id)
        .one(&engine.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.references, json!(["cust-1@example.com"]));
    assert_eq!(stored.created_by.as_deref(), Some("alice"));
    assert_eq!(stored.raw, None, "rendered when sent");
    let row = outbox::Entity::find_by_id(reply.id)
        .one(&engine.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.state.as_str(), row.contact_id, row.message_id),
        ("pending", id, reply.message_id)
    );
    assert!(
        row.next_attempt_at >= before - chrono::Duration::seconds(1)
            && row.next_attempt_at <= Utc::now()
    );
    assert!(matches!(
        engine.raw_message(id, reply.message_id).await,
        Err(Error::NotFound(_))
    ));

    // A second reply from another sender address of the queue, to explicit recipients and subject.
    let second = engine
        .submit_reply(
            id,
            Actor::Agent("alice"),
            req(json!({
                "text": "Noch etwas.", "html": "<p>Noch etwas.</p>", "from": "Help@contoso.com",
                "to": ["c@example.com"], "cc": ["boss@example.com"], "subject": "Ihre Lieferung"
            })),
        )
        .await
        .unwrap();
    let detail = engine.contact_detail(id).await.unwrap();
    let out = detail
        .messages
        .iter()
        .find(|m| m.id == second.message_id)
        .unwrap();
    assert_eq!(out.from_address.as_deref(), Some("help@contoso.com"));
    assert_eq!(
        (out.to.clone(), out.cc.clone()),
        (
            vec!["c@example.com".to_owned()],
            vec!["boss@example.com".to_owned()]
        )
    );
    assert_eq!(out.subject.as_deref(), Some("Ihre Lieferung"));
    assert_eq!(out.html_body.as_deref(), Some("<p>Noch etwas.</p>"));
    assert_eq!(detail.replies.len(), 2);

    let events = events::read(&engine, 0, 1000, Duration::ZERO, |_| true)
        .await
        .unwrap()
        .0;
    let queued: Vec<_> = events.iter().filter(|e| e.kind == "reply.queued").collect();
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0].contact_id, Some(id));
    assert_eq!(queued[0].actor.as_deref(), Some("alice"));
    assert_eq!(queued[0].queue.as_deref(), Some("support"));
    assert_eq!(queued[0].data["rfc_message_id"], reply.rfc_message_id);
    assert_eq!(queued[0].data["in_reply_to"], "cust-1@example.com");

    // The customer answers our reply: it threads onto the contact by our Message-ID.
    engine.close(id, Actor::Agent("alice")).await.unwrap();
    let answer = String::from_utf8(mail(
        "c@example.com",
        "support@contoso.com",
        "Danke",
        "cust-2@example.com",
        "Danke",
    ))
    .unwrap()
    .replace(
        "Date:",
        &format!("In-Reply-To: <{}>\r\nDate:", reply.rfc_message_id),
    );
    let outcome = engine
        .ingest(Incoming {
            raw: answer.as_bytes(),
            address: "support@contoso.com",
            source_key: None,
        })
        .await
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Threaded { contact_id, reopened: true, .. } if contact_id == id),
        "{outcome:?}"
    );
}

async fn only_the_holder_may_reply(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = customer_mail(&engine, "hold-1@example.com").await;
    let text = || req(json!({ "text": "Hi" }));

    // Waiting, not claimed: no agent may reply.
    assert!(matches!(
        engine.submit_reply(id, Actor::Agent("alice"), text()).await,
        Err(Error::Conflict(_))
    ));
    claim(&engine, "alice", id).await;
    match engine.submit_reply(id, Actor::Agent("carol"), text()).await {
        Err(Error::Conflict(msg)) => assert!(msg.contains("claimed by alice"), "{msg}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    engine
        .submit_reply(id, Actor::Supervisor("admin"), text())
        .await
        .expect("a supervisor may reply");
    engine
        .submit_reply(id, Actor::Agent("alice"), text())
        .await
        .expect("the holder may reply");

    engine.close(id, Actor::Agent("alice")).await.unwrap();
    assert!(matches!(
        engine
            .submit_reply(id, Actor::Supervisor("admin"), text())
            .await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        engine
            .submit_reply(id + 100, Actor::Supervisor("admin"), text())
            .await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(outbox::Entity::find().count(&engine.db).await.unwrap(), 2);
}

async fn too_large_reply_is_refused(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = customer_mail(&engine, "big-1@example.com").await;
    claim(&engine, "alice", id).await;
    let huge = "a".repeat(1_100_000);
    match engine
        .submit_reply(id, Actor::Agent("alice"), req(json!({ "text": huge })))
        .await
    {
        Err(Error::TooLarge(msg)) => assert!(msg.contains("1 MB"), "{msg}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Non-ASCII text is counted as it will be encoded (base64): 900 KB of umlauts exceed 1 MB.
    let umlauts = "ä".repeat(450_000);
    let result = engine
        .submit_reply(
            id,
            Actor::Agent("alice"),
            req(json!({ "text": "x", "html": umlauts })),
        )
        .await;
    assert!(matches!(result, Err(Error::TooLarge(_))), "{result:?}");
    // Attachments count with their size as encoded in the mail: 800 KB of zeros become about 1.07 MB of base64.
    let result = engine
        .submit_reply(
            id,
            Actor::Agent("alice"),
            req(json!({ "text": "x", "attachments": [{
                "filename": "zeros.bin",
                "content_type": "application/octet-stream",
                "content_base64": "A".repeat(1_066_668),
            }] })),
        )
        .await;
    assert!(matches!(result, Err(Error::TooLarge(_))), "{result:?}");
    assert_eq!(outbox::Entity::find().count(&engine.db).await.unwrap(), 0);
    let events = events::read(&engine, 0, 1000, Duration::ZERO, |_| true)
        .await
        .unwrap()
        .0;
    assert!(!events.iter().any(|e| e.kind == "reply.queued"));
}

async fn sender_must_be_enabled_on_the_queue(kind: Kind) {
    let db = TestDb::new(kind).await;
    let yaml = config_yaml(&db.url).replace(
        "{ address: help@contoso.com, server: m365, sender: true }",
        "{ address: help@contoso.com, server: m365 }",
    );
    assert!(yaml.contains("{ address: help@contoso.com, server: m365 }"));
    let engine = Engine::start(parse_config(&yaml)).await.unwrap();
    let id = customer_mail(&engine, "from-1@example.com").await;
    claim(&engine, "alice", id).await;

    for from in [
        "help@contoso.com",
        "sales@contoso.com",
        "nobody@example.com",
    ] {
        match engine
            .submit_reply(
                id,
                Actor::Agent("alice"),
                req(json!({ "text": "Hi", "from": from })),
            )
            .await
        {
            Err(Error::Invalid(msg)) => {
                assert!(msg.contains(from) && msg.contains("support"), "{msg}")
            }
            other => panic!("{from}: expected Invalid, got {other:?}"),
        }
    }
    let bad_to = engine.submit_reply(
        id,
        Actor::Agent("alice"),
        req(json!({ "text": "Hi", "to": ["not an address"] })),
    );
    assert!(matches!(bad_to.await, Err(Error::Invalid(_))));
    let empty = engine.submit_reply(id, Actor::Agent("alice"), req(json!({ "text": "  " })));
    assert!(matches!(empty.await, Err(Error::Invalid(_))));

    let ok = engine
        .submit_reply(
            id,
            Actor::Agent("alice"),
            req(json!({ "text": "Hi", "from": "SUPPORT@contoso.com" })),
        )
        .await
        .unwrap();
    let stored = message::Entity::find_by_id(ok.message_id)
        .one(&engine.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.from_address.as_deref(),
        Some("SUPPORT@contoso.com".to_lowercase().as_str())
    );
    assert!(ok.rfc_message_id.ends_with("@contoso.com"));
}
