//! Queue core: claim order, language filter, queue isolation, concurrent claims, leases, release, transfer,
//! close/re-open and the event log — each against PostgreSQL and SQLite.

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use mailqueue_engine::{
    Engine, Error,
    contacts::Actor,
    events,
    store::{self, contacts::NewContact},
};
use mailqueue_tests::{Kind, both_backends, engine};
use sea_orm::ConnectionTrait;

both_backends! {
    claim_order_is_priority_then_age => claim_order_is_priority_then_age;
    language_filter => language_filter;
    agents_only_claim_from_their_queues => agents_only_claim_from_their_queues;
    concurrent_claimers_claim_each_contact_once => concurrent_claimers_claim_each_contact_once;
    non_atomic_claim_control_is_detected => non_atomic_claim_control_is_detected;
    expired_lease_returns_contact => expired_lease_returns_contact;
    release_keeps_age_transfer_takes_queue_priority => release_keeps_age_transfer_takes_queue_priority;
    lifecycle_conflicts => lifecycle_conflicts;
    events_are_ordered_and_resumable => events_are_ordered_and_resumable;
    concurrent_events_resume_without_gaps => concurrent_events_resume_without_gaps;
    queues_removed_from_config_are_disabled => queues_removed_from_config_are_disabled;
    rescuer_service_returns_expired_claims => rescuer_service_returns_expired_claims;
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000 + secs, 0).unwrap()
}

async fn queue_id(engine: &Engine, name: &str) -> i64 {
    engine.queues().await.by_name[name].id
}

/// Inserts a waiting contact in `queue` with `priority`, `language`, waiting since `at(age)`.
async fn waiting(engine: &Engine, queue: &str, priority: i32, language: &str, age: i64) -> i64 {
    let c = NewContact {
        queue_id: queue_id(engine, queue).await,
        priority,
        language: language.into(),
        arrived_on: format!("{queue}@contoso.com"),
        customer_address: Some("customer@example.com".into()),
        customer_name: None,
        subject: Some(format!("{queue} p{priority} {language} t{age}")),
        queued_at: at(age),
    };
    store::contacts::insert(&engine.db, c).await.unwrap().id
}

async fn all_queue_ids(engine: &Engine) -> Vec<i64> {
    engine
        .queues()
        .await
        .by_name
        .values()
        .map(|q| q.id)
        .collect()
}

async fn claim_all(engine: &Engine, agent: &str, queues: &[i64], langs: &[String]) -> Vec<i64> {
    let mut out = Vec::new();
    while let Some(c) = engine.claim_next(agent, queues, langs).await.unwrap() {
        assert_eq!(c.state, "claimed");
        assert_eq!(c.claimed_by.as_deref(), Some(agent));
        out.push(c.id);
    }
    out
}

async fn claim_order_is_priority_then_age(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let old_low = waiting(&engine, "support", 5, "en", 0).await;
    let new_high = waiting(&engine, "sales", 1, "fr", 50).await;
    let old_high = waiting(&engine, "vip", 1, "en", 10).await;
    let newest_low = waiting(&engine, "support", 5, "en", 100).await;
    let top = waiting(&engine, "support", 0, "en", 200).await;
    let queues = all_queue_ids(&engine).await;
    let order = claim_all(&engine, "carol", &queues, &[]).await;
    assert_eq!(order, vec![top, old_high, new_high, old_low, newest_low]);
}

async fn language_filter(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let en = waiting(&engine, "support", 5, "en", 0).await;
    let de = waiting(&engine, "support", 5, "de", 1).await;
    let fr = waiting(&engine, "support", 1, "fr", 2).await;
    let support = [queue_id(&engine, "support").await];
    let got = claim_all(&engine, "alice", &support, &["de".into(), "en".into()]).await;
    assert_eq!(
        got,
        vec![en, de],
        "fr must not be claimed by an en/de agent"
    );
    let got = claim_all(&engine, "carol", &support, &[]).await;
    assert_eq!(got, vec![fr]);
}

async fn agents_only_claim_from_their_queues(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let sales = waiting(&engine, "sales", 0, "fr", 0).await;
    let support = waiting(&engine, "support", 9, "en", 5).await;
    let got = claim_all(&engine, "alice", &[queue_id(&engine, "support").await], &[]).await;
    assert_eq!(got, vec![support]);
    let left = engine.contact(sales).await.unwrap();
    assert_eq!(
        left.state, "queued",
        "a sales contact must stay for sales agents"
    );
    assert!(
        engine
            .claim_next("alice", &[], &[])
            .await
            .unwrap()
            .is_none(),
        "no queues, no contacts"
    );
}

async fn seed(engine: &Engine, n: usize) -> HashSet<i64> {
    let queues = ["support", "sales", "vip"];
    let mut ids = HashSet::new();
    for i in 0..n {
        ids.insert(waiting(engine, queues[i % 3], (i % 4) as i32, "en", i as i64).await);
    }
    ids
}

/// Runs `claimers` tasks that each claim until nothing is left, returning every id each claim returned.
async fn race<F, Fut>(claimers: usize, claim: F) -> Vec<i64>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<i64>> + Send,
{
    let claim = Arc::new(claim);
    let tasks: Vec<_> = (0..claimers)
        .map(|i| {
            let claim = claim.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(id) = claim(format!("agent{i}")).await {
                    got.push(id);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Every id claimed exactly once, and every seeded contact claimed.
fn double_claims(claimed: &[i64]) -> usize {
    claimed.len() - claimed.iter().collect::<HashSet<_>>().len()
}

async fn concurrent_claimers_claim_each_contact_once(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let seeded = seed(&engine, 1000).await;
    let queues = all_queue_ids(&engine).await;
    let e = engine.clone();
    let claimed = race(32, move |agent| {
        let (e, queues) = (e.clone(), queues.clone());
        async move {
            e.claim_next(&agent, &queues, &[])
                .await
                .unwrap()
                .map(|c| c.id)
        }
    })
    .await;
    assert_eq!(double_claims(&claimed), 0, "a contact was claimed twice");
    assert_eq!(claimed.iter().copied().collect::<HashSet<_>>(), seeded);
    let row = engine
        .db
        .query_one_raw(store::stmt(
            &engine.db,
            "SELECT COUNT(*) AS n FROM contacts WHERE state = 'claimed'",
            [],
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<i64>("", "n").unwrap(), 1000);
}

/// The negative control: a claim that reads, then updates without a lock, is caught by the same check. This shows
/// the check above can fail.
async fn non_atomic_claim_control_is_detected(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    seed(&engine, 200).await;
    let e = engine.clone();
    let claimed = race(32, move |agent| {
        let e = e.clone();
        async move {
            let row = e
                .db
                .query_one_raw(store::stmt(
                    &e.db,
                    "SELECT id FROM contacts WHERE state = 'queued' ORDER BY priority, queued_at, id LIMIT 1",
                    [],
                ))
                .await
                .unwrap()?;
            let id: i64 = row.try_get("", "id").unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await; // widen the race window
            e.db.execute_raw(store::stmt(
                &e.db,
                "UPDATE contacts SET state = 'claimed', claimed_by = $2 WHERE id = $1",
                [id.into(), agent.into()],
            ))
            .await
            .unwrap();
            Some(id)
        }
    })
    .await;
    assert!(
        double_claims(&claimed) > 0,
        "the control should double-claim; the check would be blind otherwise"
    );
}

async fn expired_lease_returns_contact(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = waiting(&engine, "support", 5, "en", 0).await;
    let support = [queue_id(&engine, "support").await];
    let c = engine
        .claim_next("alice", &support, &[])
        .await
        .unwrap()
        .unwrap();
    let lease = c.lease_expires_at.expect("claim sets a lease");
    assert!(
        lease > Utc::now() + chrono::Duration::minutes(4),
        "test config lease is 5m"
    );
    assert_eq!(
        engine.rescue_expired(Utc::now()).await.unwrap(),
        0,
        "lease still valid"
    );
    let hb = engine.heartbeat(id, "alice").await.unwrap();
    assert!(hb.lease_expires_at.unwrap() >= lease);
    assert_eq!(
        engine
            .rescue_expired(Utc::now() + chrono::Duration::minutes(10))
            .await
            .unwrap(),
        1
    );
    let c = engine.contact(id).await.unwrap();
    assert_eq!(
        (c.state.as_str(), c.claimed_by.as_deref()),
        ("queued", None)
    );
    assert_eq!(c.queued_at, at(0), "a rescued contact keeps its age");
    assert!(
        matches!(engine.heartbeat(id, "alice").await, Err(Error::Conflict(_))),
        "the lease is gone"
    );
    let again = engine
        .claim_next("carol", &support, &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.id, id);
}

async fn release_keeps_age_transfer_takes_queue_priority(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = waiting(&engine, "support", 3, "de", 7).await;
    let support = [queue_id(&engine, "support").await];
    engine
        .claim_next("alice", &support, &[])
        .await
        .unwrap()
        .unwrap();
    let released = engine.release(id, Actor::Agent("alice")).await.unwrap();
    assert_eq!(
        (
            released.state.as_str(),
            released.priority,
            released.queued_at
        ),
        ("queued", 3, at(7))
    );
    let newer = waiting(&engine, "support", 3, "de", 8).await;
    assert_eq!(
        engine
            .claim_next("alice", &support, &[])
            .await
            .unwrap()
            .unwrap()
            .id,
        id,
        "released keeps its place"
    );
    let moved = engine
        .transfer(id, Actor::Agent("alice"), "sales")
        .await
        .unwrap();
    assert_eq!(
        (
            moved.queue.as_str(),
            moved.priority,
            moved.language.as_str(),
            moved.state.as_str(),
            moved.queued_at
        ),
        ("sales", 1, "fr", "queued", at(7)),
        "transfer takes the target queue's priority and language and keeps the age"
    );
    assert!(moved.claimed_by.is_none());
    let sales = [queue_id(&engine, "sales").await];
    assert_eq!(
        engine
            .claim_next("bob", &sales, &[])
            .await
            .unwrap()
            .unwrap()
            .id,
        id
    );
    assert_eq!(
        engine
            .claim_next("alice", &support, &[])
            .await
            .unwrap()
            .unwrap()
            .id,
        newer
    );
    assert!(matches!(
        engine.transfer(id, Actor::Agent("bob"), "nope").await,
        Err(Error::Invalid(_))
    ));
}

async fn lifecycle_conflicts(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = waiting(&engine, "support", 5, "en", 0).await;
    let support = [queue_id(&engine, "support").await];
    engine
        .claim_next("alice", &support, &[])
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        engine.release(id, Actor::Agent("carol")).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        engine.close(id, Actor::Agent("carol")).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        engine.heartbeat(id, "carol").await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        engine.assign(id, "router", "carol").await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        engine.close(999_999, Actor::Agent("alice")).await,
        Err(Error::NotFound(_))
    ));
    let closed = engine.close(id, Actor::Agent("alice")).await.unwrap();
    assert_eq!(closed.state, "closed");
    assert!(closed.closed_at.is_some());
    assert!(matches!(
        engine.close(id, Actor::Supervisor("admin")).await,
        Err(Error::Conflict(_))
    ));
    let reopened = engine.reopen(id, "admin").await.unwrap();
    assert_eq!(reopened.state, "queued");
    assert!(
        reopened.queued_at > at(0),
        "a re-opened contact waits from now"
    );
    let assigned = engine.assign(id, "router", "carol").await.unwrap();
    assert_eq!(assigned.claimed_by.as_deref(), Some("carol"));
    engine.close(id, Actor::Supervisor("admin")).await.unwrap();
}

async fn read_all(engine: &Engine, mut after: i64, page: u64) -> Vec<events::Event> {
    let mut out = Vec::new();
    loop {
        let (batch, next) = events::read(engine, after, page, Duration::ZERO, |_| true)
            .await
            .unwrap();
        if batch.is_empty() {
            return out;
        }
        after = next;
        out.extend(batch);
    }
}

async fn events_are_ordered_and_resumable(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let id = waiting(&engine, "support", 5, "en", 0).await;
    let support = [queue_id(&engine, "support").await];
    engine
        .claim_next("alice", &support, &[])
        .await
        .unwrap()
        .unwrap();
    engine.release(id, Actor::Agent("alice")).await.unwrap();
    engine
        .transfer(id, Actor::Supervisor("router"), "sales")
        .await
        .unwrap();
    engine.assign(id, "router", "bob").await.unwrap();
    engine.close(id, Actor::Agent("bob")).await.unwrap();
    engine.reopen(id, "admin").await.unwrap();
    let all = read_all(&engine, 0, 2).await;
    let kinds: Vec<_> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "contact.claimed",
            "contact.released",
            "contact.transferred",
            "contact.assigned",
            "contact.closed",
            "contact.reopened"
        ]
    );
    assert!(
        all.windows(2).all(|w| w[0].seq < w[1].seq),
        "strictly increasing sequence"
    );
    assert_eq!(all[2].data["from"], "support");
    assert_eq!(all[3].actor.as_deref(), Some("router"));
    let rest = read_all(&engine, all[2].seq, 10).await;
    assert_eq!(
        rest.iter().map(|e| e.seq).collect::<Vec<_>>(),
        all[3..].iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    // A long poll wakes on a new event.
    let last = all.last().unwrap().seq;
    let e2 = engine.clone();
    let poll = tokio::spawn(async move {
        events::read(&e2, last, 10, Duration::from_secs(20), |_| true).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    engine
        .claim_next("bob", &[queue_id(&engine, "sales").await], &[])
        .await
        .unwrap()
        .unwrap();
    let (woke, _) = poll.await.unwrap().unwrap();
    assert_eq!(
        woke.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["contact.claimed"]
    );
}

/// Many writers append concurrently while a reader pages through with small pages: it sees every event exactly
/// once, in increasing order.
async fn concurrent_events_resume_without_gaps(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    seed(&engine, 300).await;
    let queues = all_queue_ids(&engine).await;
    let e = engine.clone();
    let writers = tokio::spawn(async move {
        race(16, move |agent| {
            let (e, queues) = (e.clone(), queues.clone());
            async move {
                e.claim_next(&agent, &queues, &[])
                    .await
                    .unwrap()
                    .map(|c| c.id)
            }
        })
        .await
    });
    let mut seen = Vec::new();
    let mut after = 0;
    while !writers.is_finished() || seen.len() < 300 {
        let (batch, next) = events::read(&engine, after, 7, Duration::from_millis(50), |_| true)
            .await
            .unwrap();
        after = next;
        seen.extend(batch.into_iter().map(|e| (e.seq, e.contact_id.unwrap())));
        if writers.is_finished() && seen.len() >= 300 {
            break;
        }
    }
    assert_eq!(writers.await.unwrap().len(), 300);
    seen.extend(
        read_all(&engine, after, 50)
            .await
            .into_iter()
            .map(|e| (e.seq, e.contact_id.unwrap())),
    );
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "increasing");
    let contacts: HashSet<_> = seen.iter().map(|s| s.1).collect();
    assert_eq!(
        (seen.len(), contacts.len()),
        (300, 300),
        "every claim event exactly once"
    );
}

async fn queues_removed_from_config_are_disabled(kind: Kind) {
    let (engine, db) = engine(kind).await;
    let id = waiting(&engine, "vip", 0, "en", 0).await;
    let yaml = mailqueue_tests::config_yaml(&db.url);
    let without_vip = yaml
        .split("  - name: vip")
        .next()
        .unwrap()
        .replace("support, sales, vip", "support, sales");
    let engine2 = Engine::start(mailqueue_tests::parse_config(&without_vip))
        .await
        .unwrap();
    let dir = engine2.queues().await;
    assert!(!dir.by_name["vip"].enabled, "vip is disabled, not deleted");
    assert!(dir.by_name["support"].enabled);
    assert_eq!(
        engine2.contact(id).await.unwrap().queue,
        "vip",
        "its contacts stay"
    );
    let engine3 = Engine::start(mailqueue_tests::parse_config(&yaml))
        .await
        .unwrap();
    assert!(
        engine3.queues().await.by_name["vip"].enabled,
        "re-adding enables it again"
    );
}

/// The rescuer as a background service: an expired claim goes back to its queue with a `contact.lease_expired`
/// event, a live one stays, and the service stops when told.
async fn rescuer_service_returns_expired_claims(kind: Kind) {
    let (engine, _db) = engine(kind).await;
    let expired = waiting(&engine, "support", 1, "en", 0).await;
    let live = waiting(&engine, "support", 2, "en", 1).await;
    let support = [queue_id(&engine, "support").await];
    engine
        .claim_next("alice", &support, &[])
        .await
        .unwrap()
        .unwrap();
    engine
        .claim_next("carol", &support, &[])
        .await
        .unwrap()
        .unwrap();
    engine
        .db
        .execute_raw(store::stmt(
            &engine.db,
            "UPDATE contacts SET lease_expires_at = $2 WHERE id = $1",
            [
                expired.into(),
                (Utc::now() - chrono::Duration::seconds(1)).into(),
            ],
        ))
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let service = tokio::spawn(mailqueue_engine::rescuer::run(
        engine.clone(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.contact(expired).await.unwrap().state != "queued" {
        assert!(
            std::time::Instant::now() < deadline,
            "the rescuer did not return the expired claim"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        engine.contact(live).await.unwrap().claimed_by.as_deref(),
        Some("carol")
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), service)
        .await
        .expect("the rescuer stops")
        .unwrap();
    let all = read_all(&engine, 0, 100).await;
    let rescued: Vec<_> = all
        .iter()
        .filter(|e| e.kind == "contact.lease_expired")
        .collect();
    assert_eq!(rescued.len(), 1);
    assert_eq!(
        (rescued[0].contact_id, rescued[0].data["agent"].as_str()),
        (Some(expired), Some("alice"))
    );
}
