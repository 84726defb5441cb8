//! The ingest pipeline and `import`: parsing real-world-shaped mail, dedupe, threading, routing, quarantine and
//! concurrent ingest, on PostgreSQL and SQLite.

use std::{path::PathBuf, time::Duration};

use mailqueue_engine::{
    Engine, Error,
    contacts::Actor,
    events::{self, Event},
    import::import_paths,
    ingest::{Incoming, Outcome},
    messages::{ContactDetail, MessageView},
    store,
};
use mailqueue_schema::entity::{contact, message, quarantine};
use mailqueue_tests::{Kind, both_backends, engine, mail};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

both_backends! {
    fixtures_import => fixtures_import;
    oversize_and_unparsable_are_quarantined => oversize_and_unparsable_are_quarantined;
    threading_reopens_a_closed_contact => threading_reopens_a_closed_contact;
    routing_takes_address_priority_and_language => routing_takes_address_priority_and_language;
    concurrent_ingest_stores_once => concurrent_ingest_stores_once;
    same_mail_on_two_addresses => same_mail_on_two_addresses;
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/mail")
}

async fn all_events(engine: &Engine) -> Vec<Event> {
    events::read(engine, 0, 10_000, Duration::ZERO, |_| true)
        .await
        .expect("events")
        .0
}

async fn ingest(engine: &Engine, raw: &[u8], address: &str) -> Outcome {
    engine
        .ingest(Incoming {
            raw,
            address,
            source_key: None,
        })
        .await
        .expect("ingest")
}

fn created(outcome: Outcome) -> i64 {
    match outcome {
        Outcome::Created { contact_id, .. } => contact_id,
        other => panic!("expected Created, got {other:?}"),
    }
}

/// The contact whose first message has this subject.
async fn by_subject(engine: &Engine, subject: &str) -> ContactDetail {
    let m = message::Entity::find()
        .filter(message::Column::Subject.eq(subject))
        .one(&engine.db)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no message with subject {subject:?}"));
    engine.contact_detail(m.contact_id).await.unwrap()
}

fn first(detail: &ContactDetail) -> &MessageView {
    detail.messages.first().expect("a message")
}

async fn fixtures_import(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let report = import_paths(&engine, "support", None, &[fixtures()], false)
        .await
        .expect("import");
    let counts = (
        report.imported,
        report.threaded,
        report.duplicate,
        report.quarantined,
        report.failed,
    );
    assert_eq!(counts, (14, 1, 0, 1, 0), "{report} {:?}", report.failures);
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 14);
    assert_eq!(message::Entity::find().count(&engine.db).await.unwrap(), 15);

    // multipart/alternative, and the reply threaded onto it; import uses the queue's first address (support@).
    let order = by_subject(&engine, "Order 4711 has not arrived").await;
    assert_eq!(
        (order.contact.priority, order.contact.language.as_str()),
        (3, "de")
    );
    assert_eq!(order.contact.arrived_on, "support@contoso.com");
    assert_eq!(
        order.contact.customer_address.as_deref(),
        Some("anna.schmidt@example.de")
    );
    assert_eq!(order.messages.len(), 2, "the reply joined the contact");
    let m = first(&order);
    assert_eq!(
        m.message_id.as_deref(),
        Some("CAF4711.alt.0001@mail.example.de")
    );
    assert!(
        m.text_body
            .as_deref()
            .unwrap()
            .contains("still not arrived")
    );
    assert!(m.html_body.as_deref().unwrap().contains("<b>4711</b>"));
    assert_eq!(m.sent_at.unwrap().to_rfc3339(), "2026-11-16T09:12:40+00:00");
    assert_eq!(m.to, vec!["support@contoso.com".to_owned()]);
    let reply = &order.messages[1];
    assert_eq!(
        reply.in_reply_to.as_deref(),
        Some("CAF4711.alt.0001@mail.example.de")
    );
    assert_eq!(
        reply.subject.as_deref(),
        Some("Re: Order 4711 has not arrived")
    );

    // multipart/mixed with an inline image and a base64 PDF.
    let invoice = by_subject(&engine, "Invoice INV-2026-118 with our logo").await;
    let m = first(&invoice);
    assert_eq!(
        m.cc,
        vec![
            "marie@example.fr".to_owned(),
            "compta@example.fr".to_owned()
        ]
    );
    assert!(
        m.html_body
            .as_deref()
            .unwrap()
            .contains("cid:logo.png@example.fr")
    );
    assert!(
        m.text_body
            .as_deref()
            .unwrap()
            .contains("Please find the invoice attached.")
    );
    assert_eq!(m.attachments.len(), 2, "{:?}", m.attachments);
    let png = m
        .attachments
        .iter()
        .find(|a| a.content_type == "image/png")
        .expect("inline image");
    assert!(png.inline);
    assert_eq!(png.filename.as_deref(), Some("logo.png"));
    let pdf = m
        .attachments
        .iter()
        .find(|a| a.content_type == "application/pdf")
        .expect("pdf");
    assert!(!pdf.inline);
    assert_eq!(pdf.filename.as_deref(), Some("INV-2026-118.pdf"));
    let content = engine.attachment(invoice.contact.id, pdf.id).await.unwrap();
    assert!(content.data.starts_with(b"%PDF-1.4"));
    assert_eq!(content.data.len() as i64, pdf.size);
    let png_data = engine
        .attachment(invoice.contact.id, png.id)
        .await
        .unwrap()
        .data;
    assert!(png_data.starts_with(b"\x89PNG\r\n\x1a\n"));
    // Not this contact's attachment: NotFound.
    assert!(matches!(
        engine.attachment(order.contact.id, pdf.id).await,
        Err(Error::NotFound(_))
    ));

    // RFC 2047 (UTF-8 base64 + ISO-8859-1 Q); the customer is the Reply-To.
    let encoded = by_subject(&engine, "Rückfrage zur Rechnung – dringend (grüße)").await;
    assert_eq!(
        encoded.contact.customer_address.as_deref(),
        Some("buero@example.at")
    );
    assert_eq!(
        encoded.contact.customer_name.as_deref(),
        Some("Jörg Müller (Büro)")
    );
    assert_eq!(first(&encoded).from_name.as_deref(), Some("Jörg Müller"));
    assert!(
        first(&encoded)
            .text_body
            .as_deref()
            .unwrap()
            .contains("Grüß Gott")
    );

    // Quoted-printable with soft line breaks and UTF-8.
    let qp = by_subject(&engine, "Question about the warranty").await;
    let text = first(&qp).text_body.clone().unwrap();
    assert!(text.contains("soft line break so that"), "{text}");
    assert!(
        text.contains("Price: 49€, café crème, naïve = equal sign."),
        "{text}"
    );
    assert_eq!(first(&qp).from_name.as_deref(), Some("Zoë Leclair"));

    // Broken headers: stored, nothing invented.
    let broken = message::Entity::find()
        .filter(message::Column::MessageId.eq("no-angle-brackets and spaces"))
        .one(&engine.db)
        .await
        .unwrap()
        .expect("the broken mail is stored");
    assert_eq!(broken.from_address, None);
    assert_eq!(broken.sent_at, None);
    assert!(broken.subject.as_deref().unwrap().contains("headers"));
    let headers = broken.headers.as_array().unwrap();
    assert!(
        headers.iter().any(|h| h[0] == "X-Binary-Junk-2"),
        "{headers:?}"
    );
    assert!(!broken.headers.to_string().contains("\\u0000"));

    // No Message-ID, no Date.
    assert_eq!(
        first(&by_subject(&engine, "Mail without a Message-ID").await).message_id,
        None
    );
    let no_date = by_subject(&engine, "Mail without a Date header").await;
    assert_eq!(first(&no_date).sent_at, None);
    assert_eq!(
        first(&no_date).message_id.as_deref(),
        Some("no-date-0007@example.jp")
    );

    // 8-bit Latin-1 body and raw Latin-1 header bytes.
    let latin1 = by_subject(&engine, "Commande réception").await;
    assert_eq!(first(&latin1).from_name.as_deref(), Some("François Dupré"));
    assert!(
        first(&latin1)
            .text_body
            .as_deref()
            .unwrap()
            .contains("arrivée abîmée")
    );
    let raw = engine
        .raw_message(latin1.contact.id, first(&latin1).id)
        .await
        .unwrap();
    assert_eq!(
        raw,
        std::fs::read(fixtures().join("08-latin1-8bit.eml")).unwrap(),
        "raw bytes are kept exactly"
    );
    assert!(matches!(
        engine
            .raw_message(order.contact.id, first(&latin1).id)
            .await,
        Err(Error::NotFound(_))
    ));

    // ISO-2022-JP encoded words and body.
    let jp = by_subject(&engine, "注文の配送について").await;
    assert_eq!(first(&jp).from_name.as_deref(), Some("山田太郎"));
    assert!(
        first(&jp)
            .text_body
            .as_deref()
            .unwrap()
            .contains("配送状況")
    );

    // mbox: three messages, `>From ` un-escaped once.
    let quoting = by_subject(&engine, "Quoting a letter").await;
    let text = first(&quoting).text_body.clone().unwrap();
    assert!(text.contains("\nFrom the desk of the director"), "{text}");
    assert!(text.contains("\n>From here on"), "{text}");
    by_subject(&engine, "Password reset does not work").await;
    by_subject(&engine, "SV: Delivery times").await;

    // Maildir cur/ and new/.
    by_subject(&engine, "Maildir cur message").await;
    by_subject(&engine, "Maildir new message").await;

    // The headerless file is in quarantine with its reason and bytes.
    let q = quarantine::Entity::find().all(&engine.db).await.unwrap();
    assert_eq!(q.len(), 1);
    assert!(q[0].reason.contains("no header fields"), "{}", q[0].reason);
    assert_eq!(q[0].queue.as_deref(), Some("support"));
    assert_eq!(q[0].mailbox.as_deref(), Some("support@contoso.com"));
    assert_eq!(
        q[0].raw,
        std::fs::read(fixtures().join("10-unparsable.eml")).unwrap()
    );

    let events = all_events(&engine).await;
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("contact.created"), 14);
    assert_eq!(count("contact.message_added"), 1);
    assert_eq!(count("message.quarantined"), 1);
    let created = events
        .iter()
        .find(|e| e.kind == "contact.created" && e.contact_id == Some(order.contact.id))
        .unwrap();
    assert_eq!(created.data["from"], "anna.schmidt@example.de");
    assert_eq!(created.data["subject"], "Order 4711 has not arrived");
    assert_eq!(created.data["address"], "support@contoso.com");
    assert_eq!(created.data["message_id"], first(&order).id);

    // Everything again: all duplicates, nothing changes.
    let again = import_paths(&engine, "support", None, &[fixtures()], false)
        .await
        .expect("re-import");
    let counts = (
        again.imported,
        again.threaded,
        again.duplicate,
        again.quarantined,
        again.failed,
    );
    assert_eq!(counts, (0, 0, 16, 0, 0), "{again}");
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 14);
    assert_eq!(all_events(&engine).await.len(), events.len());

    // Wrong queue or address: an error before anything is read.
    let wrong = import_paths(
        &engine,
        "support",
        Some("sales@contoso.com"),
        &[fixtures()],
        false,
    )
    .await;
    assert!(
        wrong
            .unwrap_err()
            .to_string()
            .contains("not an address of queue `support`")
    );
    assert!(
        import_paths(&engine, "nope", None, &[fixtures()], false)
            .await
            .is_err()
    );
    let missing = import_paths(
        &engine,
        "support",
        None,
        &[fixtures().join("missing.eml")],
        false,
    )
    .await;
    assert!(missing.is_err());
}

async fn oversize_and_unparsable_are_quarantined(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let body = "x".repeat(76).repeat(15_000); // > 1 MB, the test config's limit
    let raw = mail(
        "big@example.com",
        "help@contoso.com",
        "Huge",
        "huge-1@example.com",
        &body,
    );
    let outcome = ingest(&engine, &raw, "help@contoso.com").await;
    let Outcome::Quarantined {
        quarantine_id,
        reason,
    } = outcome
    else {
        panic!("expected quarantine, got {outcome:?}")
    };
    assert_eq!(
        reason,
        format!("too large: {} bytes, limit 1 MB", raw.len())
    );
    let row = store::quarantine::get(&engine.db, quarantine_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.queue.as_deref(), row.mailbox.as_deref()),
        (Some("support"), Some("help@contoso.com"))
    );
    assert_eq!(row.raw, raw);
    assert_eq!(row.size, raw.len() as i64);
    assert_eq!(
        ingest(&engine, &raw, "help@contoso.com").await,
        Outcome::Duplicate
    );

    let junk = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01binary junk";
    let outcome = ingest(&engine, junk, "support@contoso.com").await;
    let Outcome::Quarantined { reason, .. } = outcome else {
        panic!("expected quarantine, got {outcome:?}")
    };
    assert!(reason.starts_with("unparsable"), "{reason}");
    let outcome = ingest(
        &engine,
        b"plain words, no header\nat all\n",
        "support@contoso.com",
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Quarantined { .. }),
        "{outcome:?}"
    );

    let events = all_events(&engine).await;
    let quarantined: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "message.quarantined")
        .collect();
    assert_eq!(quarantined.len(), 3);
    assert_eq!(
        quarantined[0].data["reason"],
        format!("too large: {} bytes, limit 1 MB", raw.len())
    );
    assert_eq!(quarantined[0].data["address"], "help@contoso.com");
    assert_eq!(quarantined[0].data["queue"], "support");
    assert_eq!(quarantined[0].queue.as_deref(), Some("support"));
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 0);
}

async fn threading_reopens_a_closed_contact(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let first_mail = mail(
        "c@example.com",
        "support@contoso.com",
        "Broken kettle",
        "k-1@example.com",
        "It broke.",
    );
    let id = created(ingest(&engine, &first_mail, "support@contoso.com").await);
    let closed = engine.close(id, Actor::Supervisor("admin")).await.unwrap();
    assert_eq!(closed.state, "closed");

    let reply = String::from_utf8(mail(
        "c@example.com",
        "support@contoso.com",
        "Re: Broken kettle",
        "k-2@example.com",
        "Still broken.",
    ))
    .unwrap()
    .replace("Date:", "In-Reply-To: <k-1@example.com>\r\nDate:");
    let outcome = ingest(&engine, reply.as_bytes(), "support@contoso.com").await;
    let Outcome::Threaded {
        contact_id,
        reopened,
        ..
    } = outcome
    else {
        panic!("expected Threaded, got {outcome:?}")
    };
    assert_eq!((contact_id, reopened), (id, true));
    let c = engine.contact(id).await.unwrap();
    assert_eq!(c.state, "queued");
    assert_eq!(c.closed_at, None);
    assert!(c.queued_at >= closed.closed_at.unwrap());

    // Only References (no In-Reply-To), on another address of another queue: joins, no re-open needed.
    let third = String::from_utf8(mail(
        "c@example.com",
        "sales@contoso.com",
        "Kettle again",
        "k-3@example.com",
        "Hello?",
    ))
    .unwrap()
    .replace(
        "Date:",
        "References: <unknown@example.com>\r\n <k-1@example.com> <k-2@example.com>\r\nDate:",
    );
    let outcome = ingest(&engine, third.as_bytes(), "sales@contoso.com").await;
    assert!(
        matches!(outcome, Outcome::Threaded { contact_id, reopened: false, .. } if contact_id == id),
        "{outcome:?}"
    );
    let detail = engine.contact_detail(id).await.unwrap();
    assert_eq!(detail.messages.len(), 3);
    assert_eq!(
        detail.contact.queue, "support",
        "a threaded mail does not move the contact"
    );

    // A reply to something never stored opens a new contact.
    let stranger = String::from_utf8(mail(
        "d@example.com",
        "support@contoso.com",
        "Re: ?",
        "k-4@example.com",
        "Hi",
    ))
    .unwrap()
    .replace("Date:", "In-Reply-To: <never-seen@example.com>\r\nDate:");
    created(ingest(&engine, stranger.as_bytes(), "support@contoso.com").await);

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
            "contact.closed",
            "contact.reopened",
            "contact.message_added",
            "contact.message_added"
        ]
    );
    let added = events
        .iter()
        .find(|e| e.kind == "contact.message_added")
        .unwrap();
    assert_eq!(added.actor.as_deref(), Some("ingest"));
    assert_eq!(added.data["rfc_message_id"], "k-2@example.com");
}

async fn routing_takes_address_priority_and_language(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let cases = [
        ("support@contoso.com", "support", 3, "de"),
        ("Help@Contoso.com", "support", 5, "en"),
        ("vip@contoso.com", "vip", 0, "en"),
        ("sales@contoso.com", "sales", 1, "fr"),
    ];
    for (i, (address, queue, priority, language)) in cases.into_iter().enumerate() {
        let raw = mail(
            "r@example.com",
            address,
            &format!("Routing {i}"),
            &format!("route-{i}@example.com"),
            "x",
        );
        let c = engine
            .contact(created(ingest(&engine, &raw, address).await))
            .await
            .unwrap();
        assert_eq!(
            (c.queue.as_str(), c.priority, c.language.as_str()),
            (queue, priority, language),
            "{address}"
        );
        assert!(c.arrived_on.eq_ignore_ascii_case(address));
    }
    let raw = mail(
        "r@example.com",
        "nobody@contoso.com",
        "Lost",
        "lost@example.com",
        "x",
    );
    let err = engine
        .ingest(Incoming {
            raw: &raw,
            address: "nobody@contoso.com",
            source_key: None,
        })
        .await;
    match err {
        Err(Error::Invalid(msg)) => assert!(msg.contains("nobody@contoso.com"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(
        quarantine::Entity::find().count(&engine.db).await.unwrap(),
        0
    );
}

async fn concurrent_ingest_stores_once(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let raw = mail(
        "race@example.com",
        "support@contoso.com",
        "Race",
        "race-1@example.com",
        "Same mail, 8 times.",
    );
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (engine, raw) = (engine.clone(), raw.clone());
            tokio::spawn(async move {
                engine
                    .ingest(Incoming {
                        raw: &raw,
                        address: "support@contoso.com",
                        source_key: None,
                    })
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(
            t.await
                .unwrap()
                .expect("no error, only Created or Duplicate"),
        );
    }
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Created { .. }))
        .count();
    let duplicate = outcomes
        .iter()
        .filter(|o| **o == Outcome::Duplicate)
        .count();
    assert_eq!((created, duplicate), (1, 7), "{outcomes:?}");
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 1);
    assert_eq!(message::Entity::find().count(&engine.db).await.unwrap(), 1);
    let events = all_events(&engine).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "contact.created")
            .count(),
        1
    );

    // The same with an explicit (IMAP) source key, and a quarantined mail.
    let big = mail(
        "race@example.com",
        "support@contoso.com",
        "Big",
        "race-2@example.com",
        &"y".repeat(1_100_000),
    );
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let engine = engine.clone();
            let raw = if i % 2 == 0 { raw.clone() } else { big.clone() };
            let key = if i % 2 == 0 {
                "imap:support@contoso.com:1:42"
            } else {
                "imap:support@contoso.com:1:43"
            };
            tokio::spawn(async move {
                let mail = Incoming {
                    raw: &raw,
                    address: "support@contoso.com",
                    source_key: Some(key.into()),
                };
                engine.ingest(mail).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().expect("no error"));
    }
    let threaded = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Threaded { .. }))
        .count();
    let quarantined = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Quarantined { .. }))
        .count();
    let duplicate = outcomes
        .iter()
        .filter(|o| **o == Outcome::Duplicate)
        .count();
    assert_eq!(
        (threaded, quarantined, duplicate),
        (1, 1, 6),
        "{outcomes:?}"
    );
    assert_eq!(
        quarantine::Entity::find().count(&engine.db).await.unwrap(),
        1
    );
}

async fn same_mail_on_two_addresses(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let raw = mail(
        "two@example.com",
        "support@contoso.com, help@contoso.com",
        "Both",
        "both-1@example.com",
        "Hi",
    );
    let imap = |address: &'static str, uid: u32| Incoming {
        raw: &raw,
        address,
        source_key: Some(format!("imap:{address}:7:{uid}")),
    };
    let id = created(engine.ingest(imap("support@contoso.com", 1)).await.unwrap());
    let outcome = engine.ingest(imap("help@contoso.com", 5)).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Threaded { contact_id, reopened: false, .. } if contact_id == id),
        "{outcome:?}"
    );
    assert_eq!(contact::Entity::find().count(&engine.db).await.unwrap(), 1);

    // Imports key by content: the second address sees a duplicate (documented in `ingest`).
    let other = mail(
        "two@example.com",
        "support@contoso.com, sales@contoso.com",
        "Both 2",
        "both-2@example.com",
        "Hi",
    );
    created(ingest(&engine, &other, "support@contoso.com").await);
    assert_eq!(
        ingest(&engine, &other, "sales@contoso.com").await,
        Outcome::Duplicate
    );
}
