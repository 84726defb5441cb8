//! Configuration reload: SIGHUP to the real `mailqueue serve` binary adds a queue whose mailbox then feeds it
//! without a restart, and an invalid file changes nothing; `POST /v1/admin/reload` answers 422 with every error
//! (file, line, column, field) and changes nothing, swaps the API tokens, disables removed queues without losing
//! their contacts, and keeps settings that need a restart. On PostgreSQL and SQLite.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use mailqueue_sandbox::Sandbox;
use mailqueue_tests::{
    Kind, SandboxConfig, SbAddress, SbQueue, TestApp, TestDb, both_backends, config_yaml,
    eventually, mail, seed_contact, spawn_app_from_file, spawn_app_with,
};
use serde_json::Value as Json;

both_backends! {
    sighup_adds_a_queue_whose_mail_flows => sighup_adds_a_queue_whose_mail_flows;
    invalid_file_is_refused_and_changes_nothing => invalid_file_is_refused_and_changes_nothing;
    tokens_follow_the_file => tokens_follow_the_file;
    removed_queue_is_disabled_and_keeps_its_contacts => removed_queue_is_disabled_and_keeps_its_contacts;
    restart_only_settings_keep_their_values => restart_only_settings_keep_their_values;
}

/// Generous: a loaded machine runs many of these at once.
const WAIT: Duration = Duration::from_secs(60);

fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// A temporary folder with the configuration file `mailqueue.yaml` holding `yaml`.
fn config_file(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailqueue.yaml");
    std::fs::write(&path, yaml).unwrap();
    (dir, path)
}

/// The app over [`config_yaml`], started from a file.
async fn app_from_file(kind: Kind) -> (TestApp, tempfile::TempDir, PathBuf, String) {
    let db = TestDb::new(kind).await;
    let yaml = config_yaml(&db.url);
    let (dir, path) = config_file(&yaml);
    let app = spawn_app_from_file(db, &path).await;
    (app, dir, path, yaml)
}

async fn reload(app: &TestApp, token: &str) -> (u16, Json) {
    let resp = app.post("/v1/admin/reload", token, None).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Json::Null))
}

/// Queue name → (enabled, waiting) from `GET /v1/queues` as admin.
async fn queues(app: &TestApp) -> Vec<(String, bool, i64)> {
    let resp = app.get("/v1/queues", "admin-token").await;
    assert_eq!(resp.status(), 200);
    let list: Vec<Json> = resp.json().await.unwrap();
    let mut out: Vec<_> = list
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap().to_owned(),
                q["enabled"].as_bool().unwrap(),
                q["waiting"].as_i64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the file"))
        + 1
}

async fn invalid_file_is_refused_and_changes_nothing(kind: Kind) {
    let (app, _dir, path, yaml) = app_from_file(kind).await;
    let before = queues(&app).await;
    // Two mistakes: a priority that is not a number, and a new token naming an unknown queue.
    let broken = yaml
        .replace("    priority: 1\n", "    priority: high\n")
        .replace(
            "    - { name: admin, role: admin, secret: admin-token }\n",
            "    - { name: admin, role: admin, secret: admin-token }\n    \
             - { name: dave, role: agent, secret: dave-token, queues: [nope] }\n",
        );
    std::fs::write(&path, &broken).unwrap();

    // Only admins may reload.
    for token in ["router-token", "alice-token"] {
        let (status, body) = reload(&app, token).await;
        assert_eq!(status, 403, "{token}: {body}");
    }
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "invalid");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("still running on the previous configuration"),
        "{body}"
    );
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{body}");
    let file = path.display().to_string();
    let by_field = |field: &str| {
        errors
            .iter()
            .find(|e| e["field"] == field)
            .unwrap_or_else(|| panic!("no error at {field}: {body}"))
    };
    let priority = by_field("queues[1].priority");
    assert_eq!(priority["file"], file.as_str());
    assert_eq!(
        priority["line"],
        line_of(&broken, "priority: high") as u64,
        "{body}"
    );
    assert_eq!(priority["column"], 15);
    assert!(
        priority["message"].as_str().unwrap().contains("high"),
        "{body}"
    );
    let unknown = by_field("api.tokens[5].queues[0]");
    assert_eq!(unknown["file"], file.as_str());
    assert_eq!(unknown["line"], line_of(&broken, "dave-token") as u64);
    assert!(
        unknown["message"]
            .as_str()
            .unwrap()
            .contains("unknown queue `nope`"),
        "{body}"
    );
    // Never a secret, not even an inline one.
    let text = body.to_string();
    for secret in ["dave-token", "admin-token", "not-a-real-secret"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }

    // Nothing changed: same queues, the new token does not work, the old ones do.
    assert_eq!(queues(&app).await, before);
    assert_eq!(app.get("/v1/queues", "dave-token").await.status(), 401);
    assert_eq!(app.get("/v1/queues", "bob-token").await.status(), 200);
    app.stop().await;
}

async fn tokens_follow_the_file(kind: Kind) {
    let (app, _dir, path, yaml) = app_from_file(kind).await;
    assert_eq!(app.get("/v1/queues", "bob-token").await.status(), 200);
    // bob goes, dave (an agent of sales) comes, carol gets a new secret.
    let next = yaml
        .replace(
            "    - { name: bob, role: agent, secret: bob-token, queues: [sales] }\n",
            "    - { name: dave, role: agent, secret: dave-token, queues: [sales] }\n",
        )
        .replace("secret: carol-token", "secret: carol-token-2");
    std::fs::write(&path, &next).unwrap();
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], true);
    assert_eq!(body["tokens"]["count"], 5);
    assert_eq!(body["tokens"]["added"], serde_json::json!(["dave"]));
    assert_eq!(body["tokens"]["removed"], serde_json::json!(["bob"]));
    assert_eq!(body["tokens"]["changed"], serde_json::json!(["carol"]));
    assert!(!body.to_string().contains("carol-token"), "{body}");

    assert_eq!(app.get("/v1/queues", "bob-token").await.status(), 401);
    assert_eq!(app.get("/v1/queues", "carol-token").await.status(), 401);
    assert_eq!(app.get("/v1/queues", "carol-token-2").await.status(), 200);
    let resp = app.get("/v1/queues", "dave-token").await;
    assert_eq!(resp.status(), 200);
    let seen: Vec<Json> = resp.json().await.unwrap();
    let names: Vec<&str> = seen.iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sales"], "dave serves sales only");

    // Assignment knows the new agents too.
    let id = seed_contact(&app.engine, "sales", "fr", 1, 10).await;
    let resp = app
        .post(
            &format!("/v1/contacts/{id}/assign"),
            "router-token",
            Some(serde_json::json!({ "agent": "dave" })),
        )
        .await;
    assert_eq!(resp.status(), 200);

    // Reloading the same file again changes nothing.
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], false, "{body}");
    app.stop().await;
}

async fn removed_queue_is_disabled_and_keeps_its_contacts(kind: Kind) {
    let (app, _dir, path, yaml) = app_from_file(kind).await;
    let waiting = seed_contact(&app.engine, "vip", "en", 0, 30).await;
    // vip goes (carol no longer serves it), sales gets another priority.
    let without_vip = yaml
        .replace("queues: [support, sales, vip]", "queues: [support, sales]")
        .replace(
            "  - name: vip\n    priority: 0\n    addresses:\n      - { address: vip@contoso.com, server: m365, sender: true }\n",
            "",
        )
        .replace("    priority: 1\n", "    priority: 2\n");
    assert!(!without_vip.contains("vip@"), "the test removes the queue");
    std::fs::write(&path, &without_vip).unwrap();
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queues"]["removed"], serde_json::json!(["vip"]));
    assert_eq!(body["queues"]["changed"], serde_json::json!(["sales"]));
    let note = body["notes"][0].as_str().unwrap();
    assert!(
        note.contains("queue `vip` is disabled") && note.contains("1 waiting"),
        "{note}"
    );

    // The contact stays stored and visible in the disabled queue, but nobody claims it.
    let list = queues(&app).await;
    assert!(
        list.contains(&("vip".into(), false, 1)),
        "vip is disabled with its contact: {list:?}"
    );
    let resp = app.post("/v1/contacts/claim", "router-token", None).await;
    assert_eq!(resp.status(), 204, "nothing claimable: vip is disabled");
    let resp = app
        .get(&format!("/v1/contacts/{waiting}"), "admin-token")
        .await;
    assert_eq!(resp.status(), 200);
    let resp = app
        .post(
            "/v1/contacts/claim",
            "router-token",
            Some(serde_json::json!({ "queues": ["sales"] })),
        )
        .await;
    assert_eq!(resp.status(), 204);

    // Adding the queue back makes the contact claimable again.
    std::fs::write(&path, &yaml).unwrap();
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queues"]["added"], serde_json::json!(["vip"]));
    let resp = app.post("/v1/contacts/claim", "router-token", None).await;
    assert_eq!(resp.status(), 200);
    let claimed: Json = resp.json().await.unwrap();
    assert_eq!(claimed["id"], waiting);
    app.stop().await;
}

async fn restart_only_settings_keep_their_values(kind: Kind) {
    let (app, _dir, path, yaml) = app_from_file(kind).await;
    let other_db = match kind {
        Kind::Sqlite => "sqlite:///tmp/mailqueue-reload-elsewhere.db".to_owned(),
        Kind::Postgres => "postgres://mq:hunter2@127.0.0.1:5432/elsewhere".to_owned(),
    };
    let db_url = app.db.url.clone();
    let next = yaml
        .replace(&db_url, &other_db)
        .replace("listen: \"127.0.0.1:0\"", "listen: \"127.0.0.1:1\"")
        .replace("claim_lease: 5m", "claim_lease: 7m");
    std::fs::write(&path, &next).unwrap();
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 200, "{body}");
    let fields: Vec<&str> = body["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["database.url", "api.listen"], "{body}");
    assert!(!body.to_string().contains("hunter2"), "{body}");
    assert_eq!(body["sections"], serde_json::json!(["defaults"]));
    // The rest applies: the new claim lease; the database and listener are the old ones.
    let config = app.engine.config().await;
    assert_eq!(config.defaults.claim_lease.0, Duration::from_secs(420));
    assert_eq!(config.database.url, db_url);
    assert_eq!(app.get("/v1/queues", "admin-token").await.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_without_a_file_refuses_to_reload() {
    let db = TestDb::new(Kind::Sqlite).await;
    let yaml = config_yaml(&db.url);
    let app = spawn_app_with(db, &yaml).await;
    let (status, body) = reload(&app, "admin-token").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not started from a configuration file"),
        "{body}"
    );
    app.stop().await;
}

// ---- SIGHUP to the real binary, with sandbox mailboxes ----

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}

/// `GET path` as admin on the binary's port; `None` until it answers 200.
async fn get_json(client: &reqwest::Client, port: u16, path: &str) -> Option<Json> {
    let resp = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth("admin-token")
        .send()
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.json().await.ok()
}

/// The `waiting` figure of queue `name` in `GET /v1/queues`, if the queue is listed.
async fn waiting_in(client: &reqwest::Client, port: u16, name: &str) -> Option<i64> {
    let list = get_json(client, port, "/v1/queues").await?;
    list.as_array()?
        .iter()
        .find(|q| q["name"] == name && q["enabled"] == true)
        .and_then(|q| q["waiting"].as_i64())
}

async fn sighup_adds_a_queue_whose_mail_flows(kind: Kind) {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(kind).await;
    let support = sb.new_mailbox(&unique("reload-support"));
    let billing = sb.new_mailbox(&unique("reload-billing"));
    let mut config = SandboxConfig::support_queue(sb, &db.url, &support);
    let (dir, path) = config_file(&config.yaml());
    let log = dir.path().join("serve.log");
    let mut child = mailqueue_tests::serve(&path, &log, None);
    let port = mailqueue_tests::serve_addr(&mut child, &log, WAIT)
        .await
        .port();
    let client = reqwest::Client::new();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the engine serves", WAIT, async || {
        waiting_in(&client, port, "support").await
    })
    .await;
    assert_eq!(waiting_in(&client, port, "billing").await, None);

    // Add queue `billing` with its own mailbox and send SIGHUP.
    config.queues.push(SbQueue::new(
        "billing",
        2,
        "de",
        vec![SbAddress::new(&billing, "svc")],
    ));
    std::fs::write(&path, config.yaml()).unwrap();
    signal(&child, "HUP");
    eventually("billing appears in GET /v1/queues", WAIT, async || {
        waiting_in(&client, port, "billing").await
    })
    .await;
    let customer = unique("customer");
    sb.deliver(
        &billing,
        &mail(
            &format!("{customer}@example.com"),
            &billing,
            "Invoice",
            &format!("{customer}@example.com"),
            "Wrong amount",
        ),
    )
    .unwrap();
    let flowed = tokio::time::timeout(
        WAIT,
        eventually("the mail becomes a contact in billing", WAIT, async || {
            waiting_in(&client, port, "billing")
                .await
                .filter(|n| *n == 1)
        }),
    )
    .await;
    assert!(flowed.is_ok(), "no contact in billing; logs:\n{}", logs());
    assert!(logs().contains("SIGHUP received"), "{}", logs());
    assert!(logs().contains("configuration reloaded"), "{}", logs());

    // An invalid file on SIGHUP: logged with file and line, and the engine keeps running as it was.
    let valid = config.yaml();
    let broken = valid.replace("priority: 2", "priority: [2]");
    std::fs::write(&path, &broken).unwrap();
    signal(&child, "HUP");
    let line = line_of(&broken, "priority: [2]");
    let expected = format!("{}:{line}:", path.display());
    eventually("the refused reload is logged", WAIT, async || {
        logs()
            .contains("configuration reload refused")
            .then_some(())
    })
    .await;
    assert!(logs().contains(&expected), "{expected} not in:\n{}", logs());
    assert!(
        child.try_wait().unwrap().is_none(),
        "the engine keeps running"
    );
    assert_eq!(waiting_in(&client, port, "billing").await, Some(1));
    assert_eq!(waiting_in(&client, port, "support").await, Some(0));

    signal(&child, "TERM");
    let status = mailqueue_tests::wait_exit(&mut child, &log, WAIT).await;
    assert!(status.success(), "{status:?}\n{}", logs());
}
