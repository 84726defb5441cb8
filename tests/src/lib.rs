//! Test harness for mailqueue's integration tests: an isolated database per test (a fresh PostgreSQL database
//! or a SQLite file in a temp dir), an engine over it, and the HTTP API on a random port.
//!
//! PostgreSQL is reached at `MQ_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); each test
//! creates its own database `mq_test_<uuid>`.

use std::path::Path;

use mailqueue_config::Config;
use mailqueue_engine::Engine;

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Sqlite,
}

/// An isolated, empty database that lives as long as this value.
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub fn pg_admin_url() -> String {
    std::env::var("MQ_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    pub async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("mailqueue.db").display());
                Self {
                    kind,
                    url,
                    _dir: Some(dir),
                }
            }
            Kind::Postgres => {
                let admin = pg_admin_url();
                let name = format!("mq_test_{}", uuid::Uuid::new_v4().simple());
                let db = sea_orm::Database::connect(&admin).await.unwrap_or_else(|e| {
                    panic!("PostgreSQL at {admin} is not reachable ({e}); start it or set MQ_TEST_PG_URL")
                });
                use sea_orm::ConnectionTrait;
                db.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                let _ = db.close().await;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                Self {
                    kind,
                    url: format!("{base}/{name}"),
                    _dir: None,
                }
            }
        }
    }
}

/// A test configuration: queues `support` (priority 5, en; addresses support@ p3/de and help@), `sales`
/// (priority 1, fr) and `vip` (priority 0); tokens for agents alice (support; en, de), bob (sales), carol (all
/// three queues), a router and an admin. Every token's secret is `<name>-token`.
pub fn config_yaml(db_url: &str) -> String {
    format!(
        r#"database: {{ url: "{db_url}" }}
api:
  listen: "127.0.0.1:0"
  tokens:
    - {{ name: alice, role: agent, secret: alice-token, queues: [support], languages: [en, de] }}
    - {{ name: bob, role: agent, secret: bob-token, queues: [sales] }}
    - {{ name: carol, role: agent, secret: carol-token, queues: [support, sales, vip] }}
    - {{ name: router, role: router, secret: router-token }}
    - {{ name: admin, role: admin, secret: admin-token }}
defaults: {{ language: en, poll_interval: 30s, max_email_size_mb: 1, claim_lease: 5m }}
incoming_servers:
  - name: m365
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_service
    client_id: "00000000-0000-0000-0000-000000000000"
    client_secret: not-a-real-secret
    imap: {{ host: outlook.office365.com, port: 993, tls: implicit }}
queues:
  - name: support
    priority: 5
    language: en
    addresses:
      - {{ address: support@contoso.com, server: m365, priority: 3, language: de, sender: true }}
      - {{ address: help@contoso.com, server: m365, sender: true }}
  - name: sales
    priority: 1
    language: fr
    addresses:
      - {{ address: sales@contoso.com, server: m365, sender: true }}
  - name: vip
    priority: 0
    addresses:
      - {{ address: vip@contoso.com, server: m365, sender: true }}
"#
    )
}

/// Parses a configuration text as `mailqueue serve` would.
pub fn parse_config(yaml: &str) -> Config {
    mailqueue_config::load_str(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
        .config
}

/// A migrated engine over a fresh database with [`config_yaml`].
pub async fn engine(kind: Kind) -> (Engine, TestDb) {
    let db = TestDb::new(kind).await;
    let engine = Engine::start(parse_config(&config_yaml(&db.url)))
        .await
        .expect("engine starts");
    (engine, db)
}

/// A small RFC 822 mail.
pub fn mail(from: &str, to: &str, subject: &str, message_id: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Customer <{from}>\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\
         Date: Sat, 21 Nov 2026 08:00:00 +0000\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// Defines `mod $name { postgres, sqlite }` tests that each call the function `$body(Kind)` of the calling module.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident => $body:ident;)*) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$body($crate::Kind::Postgres).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$body($crate::Kind::Sqlite).await
            }
        }
    )*};
}

/// The `mailqueue` binary, built on first use (a no-op when it is fresh). `MAILQUEUE_BIN` overrides it.
pub fn mailqueue_bin() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("MAILQUEUE_BIN") {
            return bin.into();
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "mailqueue-engine",
                "--bin",
                "mailqueue",
            ])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the mailqueue binary failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(Into::into)
            .unwrap_or_else(|_| root.join("target"));
        target.join("debug").join("mailqueue")
    })
    .clone()
}

/// The engine and its HTTP API running on a random port over a fresh database with [`config_yaml`], as
/// `mailqueue serve` runs them (`startup::spawn`).
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub engine: Engine,
    pub client: reqwest::Client,
    pub db: TestDb,
    running: Option<mailqueue_engine::startup::RunningApp>,
}

/// Starts a [`TestApp`] on `kind`.
pub async fn spawn_app(kind: Kind) -> TestApp {
    let db = TestDb::new(kind).await;
    let running = mailqueue_engine::startup::spawn(parse_config(&config_yaml(&db.url)))
        .await
        .expect("app starts");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    TestApp {
        addr: running.addr,
        engine: running.engine.clone(),
        client,
        db,
        running: Some(running),
    }
}

impl TestApp {
    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request with `Authorization: Bearer <token>` (none when `token` is empty).
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        if token.is_empty() {
            builder
        } else {
            builder.bearer_auth(token)
        }
    }

    /// `GET path` as `token` (none when empty).
    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, token)
            .send()
            .await
            .expect("GET")
    }

    /// `POST path` as `token` (none when empty) with a JSON `body` (none when `None`).
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let builder = self.request(reqwest::Method::POST, path, token);
        let builder = match body {
            Some(body) => builder.json(&body),
            None => builder,
        };
        builder.send().await.expect("POST")
    }

    /// Stops the app gracefully (what `mailqueue serve` does on SIGTERM).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// A waiting contact stored directly (no message, no `contact.created` event), for tests of claim order and the
/// lifecycle: in `queue` (arriving on its first address) with `language` and `priority`, waiting since
/// `waiting_secs` seconds. Returns its id.
pub async fn seed_contact(
    engine: &Engine,
    queue: &str,
    language: &str,
    priority: i32,
    waiting_secs: i64,
) -> i64 {
    let dir = engine.queues().await;
    let info = dir
        .by_name
        .get(queue)
        .unwrap_or_else(|| panic!("no queue {queue}"));
    let config = engine.config().await;
    let address = config
        .queue(queue)
        .and_then(|q| q.addresses.first())
        .map(|a| a.address.to_string())
        .unwrap_or_default();
    let contact = mailqueue_engine::store::contacts::insert(
        &engine.db,
        mailqueue_engine::store::contacts::NewContact {
            queue_id: info.id,
            priority,
            language: language.into(),
            arrived_on: address,
            customer_address: Some("customer@example.com".into()),
            customer_name: Some("Customer".into()),
            subject: Some(format!("seeded {queue}/{language}/p{priority}")),
            queued_at: chrono::Utc::now() - chrono::Duration::seconds(waiting_secs),
        },
    )
    .await
    .expect("insert contact");
    contact.id
}
