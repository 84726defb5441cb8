//! HTTP API authentication and authorization: every `/v1` route refuses a missing or unknown token with 401, wrong
//! roles and foreign queues or languages get 403 without leaking content, health routes need no token.
//!
//! Choice for a claim narrowed to a queue the agent does not serve (bob asking for `support`): 403, not an empty
//! 204, so a misconfigured client notices.

use mailqueue_tests::{TestApp, both_backends, seed_contact, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every `/v1` route, with a body that would be valid.
fn routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/v1/queues", None),
        (Method::GET, "/v1/mailboxes", None),
        (Method::POST, "/v1/contacts/claim", None),
        (Method::GET, "/v1/contacts/1", None),
        (Method::GET, "/v1/contacts/1/messages/1/raw", None),
        (Method::GET, "/v1/contacts/1/attachments/1", None),
        (Method::POST, "/v1/contacts/1/heartbeat", None),
        (Method::POST, "/v1/contacts/1/release", None),
        (
            Method::POST,
            "/v1/contacts/1/transfer",
            Some(json!({ "queue": "sales" })),
        ),
        (Method::POST, "/v1/contacts/1/close", None),
        (Method::POST, "/v1/contacts/1/reopen", None),
        (
            Method::POST,
            "/v1/contacts/1/assign",
            Some(json!({ "agent": "alice" })),
        ),
        (
            Method::POST,
            "/v1/contacts/1/replies",
            Some(json!({ "text": "Hello" })),
        ),
        (Method::GET, "/v1/events", None),
        (Method::GET, "/v1/events/stream", None),
        (Method::POST, "/v1/admin/reload", None),
    ]
}

async fn send(
    app: &TestApp,
    method: &Method,
    path: &str,
    auth: Option<&str>,
    body: &Option<Value>,
) -> reqwest::Response {
    let mut req = app.client.request(method.clone(), app.url(path));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    req.send().await.expect("request")
}

async fn assert_unauthorized(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate is {challenge:?}"
    );
    let body: Value = resp
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
    let text = body.to_string();
    assert!(!text.contains("-token"), "{what}: a secret leaked: {text}");
}

async fn every_route_needs_a_token(kind: mailqueue_tests::Kind) {
    let app = spawn_app(kind).await;
    for (method, path, body) in routes() {
        let what = format!("{method} {path}");
        assert_unauthorized(
            send(&app, &method, path, None, &body).await,
            &format!("{what} without token"),
        )
        .await;
        assert_unauthorized(
            send(&app, &method, path, Some("Bearer not-a-token"), &body).await,
            &format!("{what} with unknown token"),
        )
        .await;
        assert_unauthorized(
            send(&app, &method, path, Some("Bearer "), &body).await,
            &format!("{what} with empty token"),
        )
        .await;
        assert_unauthorized(
            send(
                &app,
                &method,
                path,
                Some("Basic YWxpY2U6YWxpY2UtdG9rZW4="),
                &body,
            )
            .await,
            &format!("{what} with basic auth"),
        )
        .await;
        // A secret's prefix or a differently cased secret is not the secret.
        assert_unauthorized(
            send(&app, &method, path, Some("Bearer alice-toke"), &body).await,
            &format!("{what} with a prefix"),
        )
        .await;
        assert_unauthorized(
            send(&app, &method, path, Some("Bearer ALICE-TOKEN"), &body).await,
            &format!("{what} with other case"),
        )
        .await;
    }

    // The table covers every documented /v1 route.
    let doc: Value = app
        .get("/openapi.json", "")
        .await
        .json()
        .await
        .expect("openapi JSON");
    let mut documented: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .filter(|p| p.starts_with("/v1"))
        .cloned()
        .collect();
    documented.sort();
    let mut tested: Vec<String> = routes()
        .iter()
        .map(|(_, p, _)| p.replace("/contacts/1/messages/1", "/contacts/{id}/messages/{mid}"))
        .map(|p| {
            p.replace("/attachments/1", "/attachments/{aid}")
                .replace("/contacts/1", "/contacts/{id}")
        })
        .collect();
    tested.sort();
    tested.dedup();
    assert_eq!(documented, tested);
}

async fn health_needs_no_token(kind: mailqueue_tests::Kind) {
    let app = spawn_app(kind).await;
    let resp = app.get("/healthz", "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ok");
    let resp = app.get("/readyz", "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ready");
    // A token, even a wrong one, does not matter there.
    assert_eq!(app.get("/healthz", "nope").await.status(), StatusCode::OK);
}

async fn assert_forbidden(resp: reqwest::Response, what: &str, secret: &str) {
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{what}");
    let body: Value = resp
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
    assert_eq!(body["error"], "forbidden", "{what}: {body}");
    assert!(
        !body.to_string().contains(secret),
        "{what}: content leaked: {body}"
    );
}

async fn wrong_role_is_forbidden(kind: mailqueue_tests::Kind) {
    let app = spawn_app(kind).await;
    let id = seed_contact(&app.engine, "support", "en", 5, 60).await;

    // Agents may not assign, not even contacts of their own queues.
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/assign"),
            "alice-token",
            Some(json!({ "agent": "alice" })),
        )
        .await;
    assert_forbidden(resp, "alice assigns", "seeded").await;
    // Not even with a broken body: the role is checked first.
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/assign"),
            "carol-token",
            Some(json!({ "x": 1 })),
        )
        .await;
    assert_forbidden(resp, "carol assigns with a bad body", "seeded").await;

    // The router reads and routes, but does not do agents' work.
    let resp = app
        .post(&format!("/v1/contacts/{id}/close"), "router-token", None)
        .await;
    assert_forbidden(resp, "router closes", "seeded").await;
    let resp = app
        .post(&format!("/v1/contacts/{id}/reopen"), "router-token", None)
        .await;
    assert_forbidden(resp, "router re-opens", "seeded").await;
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/replies"),
            "router-token",
            Some(json!({ "text": "hi" })),
        )
        .await;
    assert_forbidden(resp, "router replies", "seeded").await;
    assert_eq!(
        app.get(&format!("/v1/contacts/{id}"), "router-token")
            .await
            .status(),
        StatusCode::OK
    );

    // The contact is untouched.
    assert_eq!(app.engine.contact(id).await.unwrap().state, "queued");
}

async fn foreign_queue_is_forbidden(kind: mailqueue_tests::Kind) {
    let app = spawn_app(kind).await;
    let id = seed_contact(&app.engine, "support", "en", 5, 60).await;
    // alice holds it, so bob's attempts could only be refused for the queue.
    let resp = app.post("/v1/contacts/claim", "alice-token", None).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let contact = format!("/v1/contacts/{id}");
    for (method, path, body) in [
        (Method::GET, contact.clone(), None),
        (Method::GET, format!("{contact}/messages/1/raw"), None),
        (Method::GET, format!("{contact}/attachments/1"), None),
        (Method::POST, format!("{contact}/heartbeat"), None),
        (Method::POST, format!("{contact}/release"), None),
        (
            Method::POST,
            format!("{contact}/transfer"),
            Some(json!({ "queue": "sales" })),
        ),
        (Method::POST, format!("{contact}/close"), None),
        (Method::POST, format!("{contact}/reopen"), None),
        (
            Method::POST,
            format!("{contact}/replies"),
            Some(json!({ "text": "hi" })),
        ),
    ] {
        let resp = send(&app, &method, &path, Some("Bearer bob-token"), &body).await;
        assert_forbidden(resp, &format!("bob: {method} {path}"), "seeded").await;
    }
    let c = app.engine.contact(id).await.unwrap();
    assert_eq!(
        (c.state.as_str(), c.claimed_by.as_deref(), c.queue.as_str()),
        ("claimed", Some("alice"), "support")
    );

    // A claim narrowed to a queue bob does not serve: 403 (chosen over an empty 204).
    let resp = app
        .post(
            "/v1/contacts/claim",
            "bob-token",
            Some(json!({ "queues": ["support"] })),
        )
        .await;
    assert_forbidden(resp, "bob claims from support", "seeded").await;
    // Or to a language alice does not handle.
    let resp = app
        .post(
            "/v1/contacts/claim",
            "alice-token",
            Some(json!({ "languages": ["fr"] })),
        )
        .await;
    assert_forbidden(resp, "alice claims French", "seeded").await;
    // An unknown queue is a bad request content, not a permission question.
    let resp = app
        .post(
            "/v1/contacts/claim",
            "bob-token",
            Some(json!({ "queues": ["nope"] })),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // A contact of alice's queue in a language she does not handle is not hers either.
    let french = seed_contact(&app.engine, "support", "fr", 5, 60).await;
    let resp = app
        .get(&format!("/v1/contacts/{french}"), "alice-token")
        .await;
    assert_forbidden(resp, "alice reads a French contact", "seeded").await;
    assert_eq!(
        app.get(&format!("/v1/contacts/{french}"), "carol-token")
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/v1/contacts/{french}"), "admin-token")
            .await
            .status(),
        StatusCode::OK
    );
}

both_backends! {
    every_route_needs_a_token => every_route_needs_a_token;
    health_needs_no_token => health_needs_no_token;
    wrong_role_is_forbidden => wrong_role_is_forbidden;
    foreign_queue_is_forbidden => foreign_queue_is_forbidden;
}
