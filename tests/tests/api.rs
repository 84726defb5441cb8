//! The HTTP queue API end to end: the real server (`startup::spawn`) on a random port over PostgreSQL and SQLite.

use std::time::{Duration, Instant};

use mailqueue_engine::ingest::{Incoming, Outcome};
use mailqueue_tests::{Kind, TestApp, both_backends, mail, seed_contact, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn json_of(resp: reqwest::Response, status: StatusCode) -> Value {
    let got = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts the `{ error, message }` error shape and returns the body.
async fn error_of(resp: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let body = json_of(resp, status).await;
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    body
}

async fn claim(app: &TestApp, token: &str, body: Option<Value>) -> Option<Value> {
    let resp = app.post("/v1/contacts/claim", token, body).await;
    match resp.status() {
        StatusCode::NO_CONTENT => None,
        _ => Some(json_of(resp, StatusCode::OK).await),
    }
}

async fn ingest(app: &TestApp, to: &str, subject: &str, message_id: &str) -> i64 {
    let raw = mail("customer@example.com", to, subject, message_id, "Hello");
    match app
        .engine
        .ingest(Incoming {
            raw: &raw,
            address: to,
            source_key: None,
        })
        .await
        .expect("ingest")
    {
        Outcome::Created { contact_id, .. } => contact_id,
        other => panic!("unexpected {other:?}"),
    }
}

async fn claim_then_nothing(kind: Kind) {
    let app = spawn_app(kind).await;
    let id = seed_contact(&app.engine, "support", "en", 5, 60).await;
    let c = claim(&app, "alice-token", None).await.expect("a contact");
    assert_eq!(c["id"], id);
    assert_eq!(c["state"], "claimed");
    assert_eq!(c["claimed_by"], "alice");
    assert_eq!(c["queue"], "support");
    assert!(c["lease_expires_at"].is_string());
    let resp = app.post("/v1/contacts/claim", "alice-token", None).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    // An empty JSON object is the same as no body.
    assert!(claim(&app, "alice-token", Some(json!({}))).await.is_none());
}

async fn claim_order_across_queues(kind: Kind) {
    let app = spawn_app(kind).await;
    let support_old = seed_contact(&app.engine, "support", "en", 5, 3000).await;
    let sales_new = seed_contact(&app.engine, "sales", "fr", 1, 10).await;
    let sales_old = seed_contact(&app.engine, "sales", "fr", 1, 100).await;
    let vip_newest = seed_contact(&app.engine, "vip", "en", 0, 1).await;
    let support_urgent = seed_contact(&app.engine, "support", "de", 1, 50).await;

    let mut order = Vec::new();
    while let Some(c) = claim(&app, "carol-token", None).await {
        assert_eq!(c["claimed_by"], "carol");
        order.push(c["id"].as_i64().unwrap());
    }
    // Lowest priority value first; within a priority the oldest first, whatever the queue.
    assert_eq!(
        order,
        vec![
            vip_newest,
            sales_old,
            support_urgent,
            sales_new,
            support_old
        ]
    );
}

async fn claim_order_from_ingest(kind: Kind) {
    let app = spawn_app(kind).await;
    // help@ takes the support queue's priority 5 and language en; support@ has priority 3 and language de.
    let help = ingest(
        &app,
        "help@contoso.com",
        "Older but less urgent",
        "order-1@example.com",
    )
    .await;
    let support = ingest(
        &app,
        "support@contoso.com",
        "Newer and more urgent",
        "order-2@example.com",
    )
    .await;
    let first = claim(&app, "alice-token", None).await.expect("first");
    assert_eq!(
        (
            first["id"].as_i64(),
            first["language"].as_str(),
            first["priority"].as_i64()
        ),
        (Some(support), Some("de"), Some(3))
    );
    let second = claim(&app, "alice-token", None).await.expect("second");
    assert_eq!(second["id"], help);
    assert!(claim(&app, "alice-token", None).await.is_none());
}

async fn language_filter(kind: Kind) {
    let app = spawn_app(kind).await;
    let french = seed_contact(&app.engine, "support", "fr", 5, 500).await;
    let english = seed_contact(&app.engine, "support", "en", 5, 100).await;
    let german = seed_contact(&app.engine, "support", "de", 5, 50).await;

    // Narrowed to German: the German one although the English one is older.
    let c = claim(&app, "alice-token", Some(json!({ "languages": ["de"] })))
        .await
        .expect("German");
    assert_eq!(c["id"], german);
    // alice handles en and de only: the older French contact is never hers.
    let c = claim(&app, "alice-token", None).await.expect("English");
    assert_eq!(c["id"], english);
    assert!(claim(&app, "alice-token", None).await.is_none());
    // carol handles any language.
    let c = claim(&app, "carol-token", Some(json!({ "queues": ["support"] })))
        .await
        .expect("French");
    assert_eq!(c["id"], french);
}

async fn alice_never_sees_sales(kind: Kind) {
    let app = spawn_app(kind).await;
    let sales = seed_contact(&app.engine, "sales", "en", 1, 100).await;
    let _support = seed_contact(&app.engine, "support", "en", 5, 10).await;

    let c = claim(&app, "alice-token", None)
        .await
        .expect("support contact");
    assert_eq!(c["queue"], "support");
    assert!(
        claim(&app, "alice-token", None).await.is_none(),
        "the sales contact is not alice's"
    );
    error_of(
        app.get(&format!("/v1/contacts/{sales}"), "alice-token")
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;

    let queues = json_of(app.get("/v1/queues", "alice-token").await, StatusCode::OK).await;
    let names: Vec<&str> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["support"]);
    assert_eq!(queues[0]["claimed"], 1);
    assert_eq!(queues[0]["waiting"], 0);

    let queues = json_of(app.get("/v1/queues", "router-token").await, StatusCode::OK).await;
    let names: Vec<&str> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vip", "sales", "support"]);
    assert_eq!(queues[1]["waiting"], 1);
    assert!(queues[1]["oldest_waiting_seconds"].as_i64().unwrap() >= 99);

    // bob claims the sales contact; alice's events show none of it.
    let c = claim(&app, "bob-token", None).await.expect("sales contact");
    assert_eq!(c["id"], sales);
    let page = json_of(
        app.get("/v1/events?after=0", "alice-token").await,
        StatusCode::OK,
    )
    .await;
    let events = page["events"].as_array().unwrap();
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e["queue"] == "support"), "{page}");
    let page = json_of(
        app.get("/v1/events?after=0", "router-token").await,
        StatusCode::OK,
    )
    .await;
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["queue"] == "sales"),
        "{page}"
    );
}

async fn lifecycle(kind: Kind) {
    let app = spawn_app(kind).await;
    let id = seed_contact(&app.engine, "support", "en", 5, 60).await;
    let path = |action: &str| format!("/v1/contacts/{id}/{action}");

    // alice claims; carol (who serves support too) cannot touch it.
    let c = claim(&app, "alice-token", None).await.expect("claimed");
    assert_eq!(c["id"], id);
    let lease = c["lease_expires_at"].as_str().unwrap().to_owned();
    for action in ["heartbeat", "release", "close"] {
        let body = error_of(
            app.post(&path(action), "carol-token", None).await,
            StatusCode::CONFLICT,
            "conflict",
        )
        .await;
        assert!(
            body["message"].as_str().unwrap().contains("alice"),
            "{body}"
        );
    }
    let resp = app
        .post(
            &path("transfer"),
            "carol-token",
            Some(json!({ "queue": "sales" })),
        )
        .await;
    error_of(resp, StatusCode::CONFLICT, "conflict").await;

    // Heartbeat extends the lease.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let c = json_of(
        app.post(&path("heartbeat"), "alice-token", None).await,
        StatusCode::OK,
    )
    .await;
    assert!(
        c["lease_expires_at"].as_str().unwrap() > lease.as_str(),
        "{c}"
    );

    // Release: waiting again, and releasing twice conflicts.
    let c = json_of(
        app.post(&path("release"), "alice-token", None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(c["state"], "queued");
    assert!(c["claimed_by"].is_null());
    error_of(
        app.post(&path("release"), "alice-token", None).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    error_of(
        app.post(&path("heartbeat"), "alice-token", None).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;

    // Transfer needs the claim; to an unknown queue it is invalid.
    error_of(
        app.post(
            &path("transfer"),
            "alice-token",
            Some(json!({ "queue": "sales" })),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    claim(&app, "alice-token", None)
        .await
        .expect("claimed again");
    error_of(
        app.post(
            &path("transfer"),
            "alice-token",
            Some(json!({ "queue": "nope" })),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
    )
    .await;
    let c = json_of(
        app.post(
            &path("transfer"),
            "alice-token",
            Some(json!({ "queue": "sales" })),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            c["queue"].as_str(),
            c["state"].as_str(),
            c["language"].as_str()
        ),
        (Some("sales"), Some("queued"), Some("fr"))
    );
    assert_eq!(c["priority"], 1);
    // Now it is bob's business, not alice's.
    error_of(
        app.get(&format!("/v1/contacts/{id}"), "alice-token").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let c = claim(&app, "bob-token", None).await.expect("bob claims it");
    assert_eq!(c["id"], id);

    // Close, close again (conflict), re-open, re-open again (conflict).
    let c = json_of(
        app.post(&path("close"), "bob-token", None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(c["state"], "closed");
    assert!(c["closed_at"].is_string());
    error_of(
        app.post(&path("close"), "bob-token", None).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    let c = json_of(
        app.post(&path("reopen"), "bob-token", None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(c["state"], "queued");
    error_of(
        app.post(&path("reopen"), "bob-token", None).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;

    // Admin may close a contact nobody holds; router may release and transfer any.
    let c = claim(&app, "bob-token", None)
        .await
        .expect("bob claims it again");
    assert_eq!(c["id"], id);
    let c = json_of(
        app.post(&path("release"), "router-token", None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(c["state"], "queued");
    let c = json_of(
        app.post(
            &path("transfer"),
            "router-token",
            Some(json!({ "queue": "vip" })),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(c["queue"], "vip");
    let c = json_of(
        app.post(&path("close"), "admin-token", None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(c["state"], "closed");

    // The event log tells the story in order.
    let page = json_of(
        app.get("/v1/events?after=0&limit=1000", "admin-token")
            .await,
        StatusCode::OK,
    )
    .await;
    let kinds: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "contact.claimed",
            "contact.released",
            "contact.claimed",
            "contact.transferred",
            "contact.claimed",
            "contact.closed",
            "contact.reopened",
            "contact.claimed",
            "contact.released",
            "contact.transferred",
            "contact.closed",
        ]
    );
}

async fn unknown_contacts(kind: Kind) {
    let app = spawn_app(kind).await;
    for token in ["alice-token", "admin-token"] {
        error_of(
            app.get("/v1/contacts/987654", token).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        error_of(
            app.post("/v1/contacts/987654/heartbeat", token, None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        error_of(
            app.post("/v1/contacts/987654/release", token, None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        error_of(
            app.post("/v1/contacts/987654/close", token, None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        error_of(
            app.post("/v1/contacts/987654/reopen", token, None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        let resp = app
            .post(
                "/v1/contacts/987654/transfer",
                token,
                Some(json!({ "queue": "sales" })),
            )
            .await;
        error_of(resp, StatusCode::NOT_FOUND, "not_found").await;
        let resp = app.get("/v1/contacts/987654/messages/1/raw", token).await;
        error_of(resp, StatusCode::NOT_FOUND, "not_found").await;
        let resp = app.get("/v1/contacts/987654/attachments/1", token).await;
        error_of(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let resp = app
        .post(
            "/v1/contacts/987654/assign",
            "router-token",
            Some(json!({ "agent": "alice" })),
        )
        .await;
    error_of(resp, StatusCode::NOT_FOUND, "not_found").await;
    // An existing contact without such a message or attachment.
    let id = seed_contact(&app.engine, "support", "en", 5, 60).await;
    let resp = app
        .get(
            &format!("/v1/contacts/{id}/messages/987654/raw"),
            "alice-token",
        )
        .await;
    error_of(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app
        .get(
            &format!("/v1/contacts/{id}/attachments/987654"),
            "alice-token",
        )
        .await;
    error_of(resp, StatusCode::NOT_FOUND, "not_found").await;
}

async fn assign_by_router(kind: Kind) {
    let app = spawn_app(kind).await;
    let id = seed_contact(&app.engine, "support", "de", 5, 60).await;
    let path = format!("/v1/contacts/{id}/assign");
    let assign =
        |agent: &'static str| app.post(&path, "router-token", Some(json!({ "agent": agent })));

    // bob does not serve support; the router is not an agent; nobody is called nobody.
    for agent in ["bob", "router", "nobody"] {
        error_of(
            assign(agent).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        )
        .await;
    }
    let c = json_of(assign("alice").await, StatusCode::OK).await;
    assert_eq!(
        (c["state"].as_str(), c["claimed_by"].as_str()),
        (Some("claimed"), Some("alice"))
    );
    // alice holds it now: she can heartbeat it; it is no longer waiting, so it cannot be assigned again.
    json_of(
        app.post(&format!("/v1/contacts/{id}/heartbeat"), "alice-token", None)
            .await,
        StatusCode::OK,
    )
    .await;
    error_of(assign("carol").await, StatusCode::CONFLICT, "conflict").await;
    // A bad body is a bad request.
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/assign"),
            "admin-token",
            Some(json!({ "agnt": "alice" })),
        )
        .await;
    error_of(resp, StatusCode::BAD_REQUEST, "bad_request").await;

    let page = json_of(
        app.get("/v1/events?after=0", "router-token").await,
        StatusCode::OK,
    )
    .await;
    let e = &page["events"][0];
    assert_eq!(
        (e["kind"].as_str(), e["actor"].as_str()),
        (Some("contact.assigned"), Some("router"))
    );
    assert_eq!(e["data"]["agent"], "alice");
}

async fn events_long_poll(kind: Kind) {
    let app = spawn_app(kind).await;
    let start = json_of(app.get("/v1/events", "router-token").await, StatusCode::OK).await;
    let from = start["next"].as_i64().unwrap();
    seed_contact(&app.engine, "support", "en", 5, 60).await;
    seed_contact(&app.engine, "sales", "fr", 1, 60).await;
    let s = claim(&app, "alice-token", None).await.unwrap()["id"]
        .as_i64()
        .unwrap();
    json_of(
        app.post(&format!("/v1/contacts/{s}/release"), "alice-token", None)
            .await,
        StatusCode::OK,
    )
    .await;
    claim(&app, "bob-token", None).await.unwrap();

    let page = json_of(
        app.get(&format!("/v1/events?after={from}"), "router-token")
            .await,
        StatusCode::OK,
    )
    .await;
    let events = page["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["contact.claimed", "contact.released", "contact.claimed"]
    );
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > from);
    let next = page["next"].as_i64().unwrap();
    assert_eq!(next, *seqs.last().unwrap());

    // alice sees only the support events, but resumes from the same position.
    let page = json_of(
        app.get(&format!("/v1/events?after={from}"), "alice-token")
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], next);

    // Paging with limit.
    let page = json_of(
        app.get(&format!("/v1/events?after={from}&limit=1"), "router-token")
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], seqs[0]);
    let page = json_of(
        app.get(
            &format!("/v1/events?after={}&limit=1", seqs[0]),
            "router-token",
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["events"][0]["seq"], seqs[1]);

    // Nothing new: an empty page at once (wait=0), next unchanged.
    let page = json_of(
        app.get(&format!("/v1/events?after={next}"), "router-token")
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 0);
    assert_eq!(page["next"], next);

    // A long poll returns as soon as something happens.
    let url = format!("/v1/events?after={next}&wait=20");
    let started = Instant::now();
    let poll = {
        let req = app.request(reqwest::Method::GET, &url, "router-token");
        tokio::spawn(async move { req.send().await.expect("poll") })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    json_of(
        app.post(&format!("/v1/contacts/{s}/close"), "admin-token", None)
            .await,
        StatusCode::OK,
    )
    .await;
    let page = json_of(poll.await.unwrap(), StatusCode::OK).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the long poll waited {:?}",
        started.elapsed()
    );
    assert_eq!(page["events"][0]["kind"], "contact.closed");
    assert_eq!(page["events"][0]["contact_id"], s);
    assert!(page["next"].as_i64().unwrap() > next);

    // A long poll with nothing to see returns empty after its wait.
    let started = Instant::now();
    let after = page["next"].as_i64().unwrap();
    let page = json_of(
        app.get(&format!("/v1/events?after={after}&wait=1"), "bob-token")
            .await,
        StatusCode::OK,
    )
    .await;
    assert!(page["events"].as_array().unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    error_of(
        app.get("/v1/events?limit=many", "router-token").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
}

/// Reads the SSE stream until `n` events arrived; returns them as (id, event, data).
async fn read_sse(resp: &mut reqwest::Response, n: usize) -> Vec<(i64, String, Value)> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while events.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("SSE event in time")
            .expect("read");
        buffer.push_str(std::str::from_utf8(&chunk.expect("stream open")).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            // Keep-alive comments have none of these.
            if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                events.push((id, event, data));
            }
        }
    }
    events
}

async fn sse_stream(kind: Kind) {
    let app = spawn_app(kind).await;
    let s = seed_contact(&app.engine, "support", "en", 5, 60).await;
    let b = seed_contact(&app.engine, "sales", "fr", 5, 60).await;

    let mut router = app.get("/v1/events/stream", "router-token").await;
    assert_eq!(router.status(), StatusCode::OK);
    assert!(
        router.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut bob = app.get("/v1/events/stream?after=0", "bob-token").await;
    assert_eq!(bob.status(), StatusCode::OK);

    claim(&app, "alice-token", None).await.unwrap();
    claim(&app, "bob-token", None).await.unwrap();
    json_of(
        app.post(&format!("/v1/contacts/{s}/release"), "alice-token", None)
            .await,
        StatusCode::OK,
    )
    .await;

    let events = read_sse(&mut router, 3).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["contact.claimed", "contact.claimed", "contact.released"]
    );
    for (id, kind, data) in &events {
        assert_eq!(data["seq"], *id);
        assert_eq!(data["kind"], kind.as_str());
    }
    assert_eq!(events[0].2["contact_id"], s);

    // bob only gets the sales event.
    let bobs = read_sse(&mut bob, 1).await;
    assert_eq!(
        (bobs[0].1.as_str(), bobs[0].2["contact_id"].as_i64()),
        ("contact.claimed", Some(b))
    );

    // Reconnecting with Last-Event-ID resumes after it (and wins over `after`).
    let mut resumed = app
        .request(
            reqwest::Method::GET,
            "/v1/events/stream?after=0",
            "router-token",
        )
        .header("last-event-id", events[0].0.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), StatusCode::OK);
    let again = read_sse(&mut resumed, 2).await;
    assert_eq!(
        again.iter().map(|e| e.0).collect::<Vec<_>>(),
        [events[1].0, events[2].0]
    );

    let resp = app
        .request(reqwest::Method::GET, "/v1/events/stream", "router-token")
        .header("last-event-id", "x")
        .send()
        .await;
    error_of(resp.unwrap(), StatusCode::BAD_REQUEST, "bad_request").await;

    // Stopping the server ends open streams instead of waiting for them.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), app.stop())
        .await
        .expect("graceful stop in time");
    assert!(started.elapsed() < Duration::from_secs(8));
    drop((router, bob, resumed));
}

async fn openapi_and_docs(kind: Kind) {
    let app = spawn_app(kind).await;
    let resp = app.get("/openapi.json", "").await;
    let doc = json_of(resp, StatusCode::OK).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/v1/queues", "get"),
        ("/v1/mailboxes", "get"),
        ("/v1/contacts/claim", "post"),
        ("/v1/contacts/{id}", "get"),
        ("/v1/contacts/{id}/messages/{mid}/raw", "get"),
        ("/v1/contacts/{id}/attachments/{aid}", "get"),
        ("/v1/contacts/{id}/heartbeat", "post"),
        ("/v1/contacts/{id}/release", "post"),
        ("/v1/contacts/{id}/transfer", "post"),
        ("/v1/contacts/{id}/close", "post"),
        ("/v1/contacts/{id}/reopen", "post"),
        ("/v1/contacts/{id}/assign", "post"),
        ("/v1/contacts/{id}/replies", "post"),
        ("/v1/events", "get"),
        ("/v1/events/stream", "get"),
        ("/v1/admin/reload", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ];
    assert_eq!(
        paths.len(),
        expected.len(),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (path, method) in expected {
        let op = &paths.get(path).unwrap_or_else(|| panic!("{path} missing"))[method];
        assert!(op.is_object(), "{method} {path} missing");
        let security = op["security"].to_string();
        if path.starts_with("/v1") {
            assert!(security.contains("bearer"), "{method} {path}: {security}");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Contact",
        "ContactDetail",
        "MessageView",
        "Reply",
        "ReplyRequest",
        "QueueStats",
        "Event",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    let resp = app.get("/docs/", "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        resp.text()
            .await
            .unwrap()
            .to_lowercase()
            .contains("swagger")
    );
    // `/docs` redirects there.
    assert_eq!(app.get("/docs", "").await.status(), StatusCode::OK);
}

async fn error_shapes(kind: Kind) {
    let app = spawn_app(kind).await;
    let id = seed_contact(&app.engine, "support", "en", 5, 60).await;
    claim(&app, "alice-token", None).await.unwrap();
    let transfer = format!("/v1/contacts/{id}/transfer");

    let send_raw = |path: String, content_type: Option<&'static str>, body: &'static str| {
        let mut req = app
            .request(reqwest::Method::POST, &path, "alice-token")
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    // Broken JSON, JSON of the wrong shape, unknown fields: 400.
    error_of(
        send_raw(transfer.clone(), Some("application/json"), "{")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    error_of(
        send_raw(transfer.clone(), Some("application/json"), "{}")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    error_of(
        send_raw(
            transfer.clone(),
            Some("application/json"),
            r#"{"queue":"sales","x":1}"#,
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    error_of(
        send_raw(transfer.clone(), None, r#"{"queue":"sales"}"#)
            .await
            .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    error_of(
        send_raw("/v1/contacts/claim".into(), Some("application/json"), "[1")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    // Bad path parameters, unknown routes, wrong methods.
    error_of(
        app.get("/v1/contacts/abc", "alice-token").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    error_of(
        app.get("/v1/nope", "alice-token").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    error_of(
        app.get("/nope", "").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let resp = app
        .request(reqwest::Method::DELETE, "/v1/queues", "alice-token")
        .send()
        .await
        .unwrap();
    error_of(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    // The contact is still alice's.
    assert_eq!(
        app.engine.contact(id).await.unwrap().claimed_by.as_deref(),
        Some("alice")
    );

    // A reply body above the limit (max_email_size_mb 1 → 2.4 MB) is refused before anything is stored.
    let big = "x".repeat(3 * 1024 * 1024);
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/replies"),
            "alice-token",
            Some(json!({ "text": big })),
        )
        .await;
    error_of(resp, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
}

const MULTIPART: &str = "From: Customer <customer@example.com>\r\n\
To: help@contoso.com\r\n\
Subject: Invoice\r\n\
Message-ID: <invoice-1@example.com>\r\n\
Date: Sat, 21 Nov 2026 08:00:00 +0000\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
See attached.\r\n\
--b1\r\n\
Content-Type: application/pdf; name=\"report.pdf\"\r\n\
Content-Disposition: attachment; filename=\"report.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQK\r\n\
--b1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Disposition: attachment; filename*=UTF-8''Rechnung%20M%C3%A4rz.txt\r\n\
\r\n\
Betrag\r\n\
--b1--\r\n";

async fn messages_raw_and_attachments(kind: Kind) {
    let app = spawn_app(kind).await;
    let raw = MULTIPART.as_bytes();
    let Outcome::Created {
        contact_id: id,
        message_id: mid,
    } = app
        .engine
        .ingest(Incoming {
            raw,
            address: "help@contoso.com",
            source_key: None,
        })
        .await
        .expect("ingest")
    else {
        panic!("not created")
    };
    let detail = json_of(
        app.get(&format!("/v1/contacts/{id}"), "alice-token").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(detail["id"], id);
    assert_eq!(detail["subject"], "Invoice");
    let message = &detail["messages"][0];
    assert_eq!(message["id"], mid);
    assert_eq!(message["direction"], "inbound");
    let attachments = message["attachments"].as_array().unwrap();
    let pdf = attachments
        .iter()
        .find(|a| a["filename"] == "report.pdf")
        .expect("pdf listed");
    let txt = attachments
        .iter()
        .find(|a| a["filename"] == "Rechnung März.txt")
        .expect("txt listed");

    let resp = app
        .get(
            &format!("/v1/contacts/{id}/messages/{mid}/raw"),
            "alice-token",
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "message/rfc822");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), raw);

    let resp = app
        .get(
            &format!("/v1/contacts/{id}/attachments/{}", pdf["id"]),
            "alice-token",
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/pdf");
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.starts_with("attachment;") && disposition.contains("filename=\"report.pdf\""),
        "{disposition}"
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"%PDF-1.4\n");

    let resp = app
        .get(
            &format!("/v1/contacts/{id}/attachments/{}", txt["id"]),
            "alice-token",
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.contains("filename*=UTF-8''Rechnung%20M%C3%A4rz.txt"),
        "{disposition}"
    );

    // bob sees none of it.
    for path in [
        format!("/v1/contacts/{id}"),
        format!("/v1/contacts/{id}/messages/{mid}/raw"),
        format!("/v1/contacts/{id}/attachments/{}", pdf["id"]),
    ] {
        let body = error_of(
            app.get(&path, "bob-token").await,
            StatusCode::FORBIDDEN,
            "forbidden",
        )
        .await;
        assert!(!body.to_string().contains("Invoice"), "{body}");
    }
}

async fn reply_created(kind: Kind) {
    let app = spawn_app(kind).await;
    let id = ingest(
        &app,
        "help@contoso.com",
        "Where is my order?",
        "reply-1@example.com",
    )
    .await;
    assert_eq!(claim(&app, "alice-token", None).await.unwrap()["id"], id);
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/replies"),
            "alice-token",
            Some(json!({ "text": "It is on its way." })),
        )
        .await;
    let reply = json_of(resp, StatusCode::CREATED).await;
    assert_eq!(reply["state"], "pending");
    assert!(
        reply["rfc_message_id"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    let detail = json_of(
        app.get(&format!("/v1/contacts/{id}"), "alice-token").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(detail["replies"][0]["id"], reply["id"]);
    assert!(
        detail["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["direction"] == "outbound"),
        "{detail}"
    );
    // Unknown fields are refused.
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/replies"),
            "alice-token",
            Some(json!({ "text": "x", "bcc": [] })),
        )
        .await;
    error_of(resp, StatusCode::BAD_REQUEST, "bad_request").await;
}

both_backends! {
    claim_then_nothing => claim_then_nothing;
    claim_order_across_queues => claim_order_across_queues;
    claim_order_from_ingest => claim_order_from_ingest;
    language_filter => language_filter;
    alice_never_sees_sales => alice_never_sees_sales;
    lifecycle => lifecycle;
    unknown_contacts => unknown_contacts;
    assign_by_router => assign_by_router;
    events_long_poll => events_long_poll;
    sse_stream => sse_stream;
    openapi_and_docs => openapi_and_docs;
    error_shapes => error_shapes;
    messages_raw_and_attachments => messages_raw_and_attachments;
    reply_created => reply_created;
}
