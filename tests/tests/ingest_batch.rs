//! Batch ingest with the IMAP cursor in the same transaction: all or nothing, re-runs are no-ops, duplicates and
//! threading inside one batch, concurrent batches of the same mail, and a cursor that never moves back. On
//! PostgreSQL and SQLite.

use std::time::{Duration, Instant};

use mailqueue_engine::{
    Engine, Error,
    events::{self, Event},
    ingest::{AutomatedKind, Cursor, Incoming, Outcome},
    store,
};
use mailqueue_schema::entity::{contact, message, quarantine};
use mailqueue_tests::{Kind, TestDb, both_backends, config_yaml, engine, mail, parse_config};
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait};

both_backends! {
    batch_commits_contacts_and_cursor_together => batch_commits_contacts_and_cursor_together;
    same_key_twice_in_one_batch => same_key_twice_in_one_batch;
    replies_thread_inside_one_batch => replies_thread_inside_one_batch;
    cursor_never_moves_back => cursor_never_moves_back;
    failing_batch_leaves_nothing => failing_batch_leaves_nothing;
    concurrent_instances_store_each_mail_once => concurrent_instances_store_each_mail_once;
}

const MAILBOX: &str = "support@contoso.com";

fn cursor(uidvalidity: i64, last_uid: i64) -> Cursor {
    Cursor {
        mailbox: MAILBOX.into(),
        folder: "INBOX".into(),
        uidvalidity,
        last_uid,
    }
}

/// Mail `uid` of a mailbox: a customer of its own, a Message-ID of its own.
fn customer_mail(uid: usize) -> Vec<u8> {
    mail(
        &format!("customer{uid}@example.com"),
        MAILBOX,
        &format!("Question {uid}"),
        &format!("q-{uid}@example.com"),
        &format!("Question number {uid}."),
    )
}

/// The batch of `raws` on support@ with IMAP source keys `imap:support@contoso.com:7:<first + i>`.
fn imap_batch(raws: &[Vec<u8>], first: usize) -> Vec<Incoming<'_>> {
    raws.iter()
        .enumerate()
        .map(|(i, raw)| Incoming {
            raw,
            address: MAILBOX,
            source_key: Some(format!("imap:{MAILBOX}:7:{}", first + i)),
        })
        .collect()
}

async fn count_contacts(engine: &Engine) -> u64 {
    contact::Entity::find().count(&engine.db).await.unwrap()
}

async fn all_events(engine: &Engine) -> Vec<Event> {
    events::read(engine, 0, 100_000, Duration::ZERO, |_| true)
        .await
        .expect("events")
        .0
}

fn with_header(raw: Vec<u8>, header: &str) -> Vec<u8> {
    String::from_utf8(raw)
        .unwrap()
        .replace("Date:", &format!("{header}\r\nDate:"))
        .into_bytes()
}

async fn batch_commits_contacts_and_cursor_together(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let raws: Vec<Vec<u8>> = (1..=200).map(customer_mail).collect();
    let started = Instant::now();
    let outcomes = engine
        .ingest_batch(imap_batch(&raws, 1), Some(cursor(7, 200)))
        .await
        .expect("batch");
    eprintln!(
        "{kind:?}: 200 mails in one batch took {:?}",
        started.elapsed()
    );
    assert_eq!(outcomes.len(), 200);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Created { .. })),
        "{outcomes:?}"
    );
    assert_eq!(count_contacts(&engine).await, 200);
    assert_eq!(
        message::Entity::find().count(&engine.db).await.unwrap(),
        200
    );
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 200))
    );
    assert_eq!(engine.cursor(MAILBOX, "Archive").await.unwrap(), None);
    let events = all_events(&engine).await;
    assert_eq!(events.len(), 200);
    assert!(events.iter().all(|e| e.kind == "contact.created"));
    // Events follow the order of the batch.
    let Outcome::Created { contact_id, .. } = outcomes[0] else {
        unreachable!()
    };
    assert_eq!(events[0].contact_id, Some(contact_id));
    assert_eq!(events[0].data["subject"], "Question 1");
    assert_eq!(events[199].data["subject"], "Question 200");

    // The same batch again (a crash after the commit, before the server was told): nothing changes.
    let again = engine
        .ingest_batch(imap_batch(&raws, 1), Some(cursor(7, 200)))
        .await
        .expect("batch again");
    assert!(again.iter().all(|o| *o == Outcome::Duplicate), "{again:?}");
    assert_eq!(count_contacts(&engine).await, 200);
    assert_eq!(all_events(&engine).await.len(), 200);
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 200))
    );
    // And an older, overlapping batch of a stale worker: duplicates, and the cursor stays.
    let stale = engine
        .ingest_batch(imap_batch(&raws[..50], 1), Some(cursor(7, 50)))
        .await
        .unwrap();
    assert!(stale.iter().all(|o| *o == Outcome::Duplicate));
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 200))
    );
}

async fn same_key_twice_in_one_batch(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let one = customer_mail(1);
    let two = customer_mail(2);
    let three = customer_mail(3);
    let key = |uid: u32| Some(format!("imap:{MAILBOX}:7:{uid}"));
    let outcomes = engine
        .ingest_batch(
            vec![
                Incoming {
                    raw: &one,
                    address: MAILBOX,
                    source_key: key(1),
                },
                Incoming {
                    raw: &one,
                    address: MAILBOX,
                    source_key: key(1),
                },
                // No key of its own: the content hash, twice.
                Incoming {
                    raw: &two,
                    address: MAILBOX,
                    source_key: None,
                },
                Incoming {
                    raw: &two,
                    address: "help@contoso.com",
                    source_key: None,
                },
                // An oversize or unparsable mail twice: quarantined once.
                Incoming {
                    raw: b"no headers\n",
                    address: MAILBOX,
                    source_key: key(9),
                },
                Incoming {
                    raw: b"no headers\n",
                    address: MAILBOX,
                    source_key: key(9),
                },
                Incoming {
                    raw: &three,
                    address: MAILBOX,
                    source_key: key(3),
                },
            ],
            Some(cursor(7, 9)),
        )
        .await
        .unwrap();
    let shape: Vec<&str> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Created { .. } => "created",
            Outcome::Duplicate => "duplicate",
            Outcome::Quarantined { .. } => "quarantined",
            _ => "other",
        })
        .collect();
    assert_eq!(
        shape,
        [
            "created",
            "duplicate",
            "created",
            "duplicate",
            "quarantined",
            "duplicate",
            "created"
        ]
    );
    assert!(outcomes[4].move_to_quarantine_folder());
    assert_eq!(count_contacts(&engine).await, 3);
    assert_eq!(
        quarantine::Entity::find().count(&engine.db).await.unwrap(),
        1
    );

    // A batch mixing stored and new mail.
    let four = customer_mail(4);
    let outcomes = engine
        .ingest_batch(
            vec![
                Incoming {
                    raw: &one,
                    address: MAILBOX,
                    source_key: key(1),
                },
                Incoming {
                    raw: &four,
                    address: MAILBOX,
                    source_key: key(4),
                },
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcomes[0], Outcome::Duplicate);
    assert!(
        matches!(outcomes[1], Outcome::Created { .. }),
        "{outcomes:?}"
    );
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 9)),
        "no cursor given, none changed"
    );
}

async fn replies_thread_inside_one_batch(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let first = customer_mail(1);
    let reply = with_header(
        mail(
            "customer1@example.com",
            MAILBOX,
            "Re: Question 1",
            "q-1b@example.com",
            "More.",
        ),
        "In-Reply-To: <q-1@example.com>",
    );
    let colleague = with_header(
        mail(
            "colleague@example.com",
            MAILBOX,
            "Fwd",
            "q-1c@example.com",
            "Me too.",
        ),
        "References: <q-1@example.com> <q-1b@example.com>",
    );
    let out_of_office = with_header(
        mail(
            "away@example.com",
            MAILBOX,
            "Automatic reply",
            "ooo-1@example.com",
            "Away.",
        ),
        "Auto-Submitted: auto-replied\r\nIn-Reply-To: <q-1c@example.com>",
    );
    let lonely_ooo = with_header(
        mail(
            "away@example.com",
            MAILBOX,
            "Automatic reply",
            "ooo-2@example.com",
            "Away.",
        ),
        "Auto-Submitted: auto-replied\r\nIn-Reply-To: <nothing@example.com>",
    );
    let raws = vec![
        first.clone(),
        reply,
        colleague,
        out_of_office,
        lonely_ooo,
        first.clone(),
    ];
    let mut batch = imap_batch(&raws, 1);
    // The same mail on a second address (its own IMAP key): joins the first copy's contact.
    batch[5].address = "help@contoso.com";
    batch[5].source_key = Some("imap:help@contoso.com:3:1".into());
    let outcomes = engine
        .ingest_batch(batch, Some(cursor(7, 6)))
        .await
        .unwrap();
    let Outcome::Created { contact_id: id, .. } = outcomes[0] else {
        panic!("{outcomes:?}")
    };
    assert!(
        matches!(outcomes[1], Outcome::Threaded { contact_id, reopened: false, .. } if contact_id == id),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], Outcome::Threaded { contact_id, reopened: false, .. } if contact_id == id),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[3], Outcome::Attached { contact_id, kind: AutomatedKind::AutoReply, .. } if contact_id == id),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[4], Outcome::Quarantined { .. }),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[5], Outcome::Threaded { contact_id, reopened: false, .. } if contact_id == id),
        "{outcomes:?}"
    );
    assert_eq!(count_contacts(&engine).await, 1);
    assert_eq!(engine.contact_detail(id).await.unwrap().messages.len(), 5);
    let kinds: Vec<String> = all_events(&engine)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "contact.created",
            "contact.message_added",
            "contact.message_added",
            "contact.message_added",
            "message.quarantined",
            "contact.message_added"
        ]
    );

    // A closed contact re-opens once, though two replies to it arrive in one batch.
    engine
        .close(id, mailqueue_engine::contacts::Actor::Supervisor("admin"))
        .await
        .unwrap();
    let again: Vec<Vec<u8>> = (0..2)
        .map(|n| {
            with_header(
                mail(
                    "customer1@example.com",
                    MAILBOX,
                    "Re",
                    &format!("q-1r{n}@example.com"),
                    "?",
                ),
                "In-Reply-To: <q-1@example.com>",
            )
        })
        .collect();
    let outcomes = engine
        .ingest_batch(imap_batch(&again, 10), None)
        .await
        .unwrap();
    assert!(
        matches!(outcomes[0], Outcome::Threaded { contact_id, reopened: true, .. } if contact_id == id),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[1], Outcome::Threaded { contact_id, reopened: false, .. } if contact_id == id),
        "{outcomes:?}"
    );
    assert_eq!(engine.contact(id).await.unwrap().state, "queued");
}

async fn cursor_never_moves_back(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let set = |c: Cursor| {
        let engine = engine.clone();
        async move { engine.ingest_batch(Vec::new(), Some(c)).await.unwrap() }
    };
    let get = || async { engine.cursor(MAILBOX, "INBOX").await.unwrap() };
    assert_eq!(get().await, None);
    set(cursor(7, 100)).await;
    assert_eq!(get().await, Some(cursor(7, 100)));
    set(cursor(7, 50)).await;
    assert_eq!(
        get().await,
        Some(cursor(7, 100)),
        "a stale writer changes nothing"
    );
    set(cursor(7, 100)).await;
    set(cursor(7, 150)).await;
    assert_eq!(get().await, Some(cursor(7, 150)));
    // A new UIDVALIDITY starts over.
    set(cursor(8, 3)).await;
    assert_eq!(get().await, Some(cursor(8, 3)));
    set(cursor(8, 2)).await;
    assert_eq!(get().await, Some(cursor(8, 3)));
    // Folders and mailboxes are independent.
    let archive = Cursor {
        folder: "Archive".into(),
        ..cursor(1, 5)
    };
    set(archive.clone()).await;
    assert_eq!(
        engine.cursor(MAILBOX, "Archive").await.unwrap(),
        Some(archive)
    );
    assert_eq!(get().await, Some(cursor(8, 3)));
    // The store function says whether it moved.
    let txn = store::begin_write(&engine.db).await.unwrap();
    assert!(
        !store::mailbox_cursors::upsert(&txn, &cursor(8, 1))
            .await
            .unwrap()
    );
    assert!(
        store::mailbox_cursors::upsert(&txn, &cursor(8, 4))
            .await
            .unwrap()
    );
    txn.commit().await.unwrap();
    assert_eq!(get().await, Some(cursor(8, 4)));
}

async fn failing_batch_leaves_nothing(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let raws: Vec<Vec<u8>> = (1..=3).map(customer_mail).collect();
    engine
        .ingest_batch(imap_batch(&raws[..1], 1), Some(cursor(7, 1)))
        .await
        .unwrap();
    let events_before = all_events(&engine).await.len();

    // The third mail's message insert fails, after the contacts of the first two were inserted.
    let poison = |sql: &str| sql.to_owned();
    let install = match kind {
        Kind::Postgres => vec![
            poison(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN IF NEW.subject = 'Question 3' THEN \
                 RAISE EXCEPTION 'forced failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            ),
            poison(
                "CREATE TRIGGER poison BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION poison()",
            ),
        ],
        Kind::Sqlite => vec![poison(
            "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.subject = 'Question 3' \
             BEGIN SELECT RAISE(ABORT, 'forced failure'); END",
        )],
    };
    for sql in &install {
        engine.db.execute_unprepared(sql).await.unwrap();
    }
    let junk = b"no headers at all\n".to_vec();
    let mut batch = imap_batch(&raws, 1);
    batch.insert(
        1,
        Incoming {
            raw: &junk,
            address: MAILBOX,
            source_key: Some("junk".into()),
        },
    );
    let err = engine
        .ingest_batch(batch, Some(cursor(7, 4)))
        .await
        .expect_err("the batch fails");
    assert!(err.to_string().contains("forced failure"), "{err}");
    assert_eq!(count_contacts(&engine).await, 1);
    assert_eq!(
        quarantine::Entity::find().count(&engine.db).await.unwrap(),
        0
    );
    assert_eq!(all_events(&engine).await.len(), events_before);
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 1))
    );

    // An unknown address fails the batch before anything is written.
    let err = engine
        .ingest_batch(
            vec![
                Incoming {
                    raw: &raws[1],
                    address: MAILBOX,
                    source_key: None,
                },
                Incoming {
                    raw: &raws[1],
                    address: "nobody@contoso.com",
                    source_key: None,
                },
            ],
            Some(cursor(7, 9)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("nobody@contoso.com")),
        "{err}"
    );
    assert_eq!(count_contacts(&engine).await, 1);
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 1))
    );

    // Without the fault, the same batch goes through (the first mail is a duplicate).
    engine
        .db
        .execute_unprepared("DROP TRIGGER poison")
        .await
        .ok();
    if kind == Kind::Postgres {
        engine
            .db
            .execute_unprepared("DROP TRIGGER poison ON messages")
            .await
            .unwrap();
    }
    let outcomes = engine
        .ingest_batch(imap_batch(&raws, 1), Some(cursor(7, 3)))
        .await
        .unwrap();
    assert_eq!(outcomes[0], Outcome::Duplicate);
    assert_eq!(count_contacts(&engine).await, 3);
    assert_eq!(
        engine.cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 3))
    );
}

/// Several engines (as several instances) ingest the same mails at once, in different orders: each mail is
/// stored once, no batch fails.
async fn concurrent_instances_store_each_mail_once(kind: Kind) {
    let db = TestDb::new(kind).await;
    let config = parse_config(&config_yaml(&db.url));
    let mut engines = Vec::new();
    for _ in 0..3 {
        engines.push(Engine::start(config.clone()).await.expect("engine starts"));
    }
    let raws: Vec<Vec<u8>> = (1..=60).map(customer_mail).collect();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let engine = engines[i % engines.len()].clone();
            let raws = raws.clone();
            tokio::spawn(async move {
                let mut batch = imap_batch(&raws, 1);
                if i % 2 == 1 {
                    batch.reverse();
                }
                // Most with the folder's cursor (they take turns), some without (they may deadlock and retry).
                let cursor = (i % 3 != 2).then(|| cursor(7, 60));
                engine.ingest_batch(batch, cursor).await
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let outcomes = t.await.unwrap().expect("no batch fails");
        created += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Created { .. }))
            .count();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Created { .. } | Outcome::Duplicate)),
            "{outcomes:?}"
        );
    }
    assert_eq!(created, 60);
    assert_eq!(count_contacts(&engines[0]).await, 60);
    assert_eq!(
        message::Entity::find().count(&engines[0].db).await.unwrap(),
        60
    );
    assert_eq!(
        all_events(&engines[0])
            .await
            .iter()
            .filter(|e| e.kind == "contact.created")
            .count(),
        60
    );
    assert_eq!(
        engines[0].cursor(MAILBOX, "INBOX").await.unwrap(),
        Some(cursor(7, 60))
    );
}
