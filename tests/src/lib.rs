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
    enabled: false
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
    let yaml = config_yaml(&db.url);
    spawn_app_with(db, &yaml).await
}

impl TestApp {
    /// The test's handle on `running`, with an HTTP client whose requests time out after 30 s.
    fn serving(db: TestDb, running: mailqueue_engine::startup::RunningApp) -> Self {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        Self {
            addr: running.addr,
            engine: running.engine.clone(),
            client,
            db,
            running: Some(running),
        }
    }

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

// ---- Mailbox tests: the engine against the local Microsoft 365 sandbox ----

/// An incoming server of a [`SandboxConfig`].
#[derive(Debug, Clone)]
pub struct SbServer {
    pub name: String,
    /// `oauth_service` or `oauth_user`.
    pub auth: &'static str,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub login_address: String,
    /// `implicit` (the IMAPS port) or `starttls` (the IMAP port).
    pub tls: &'static str,
    pub port: u16,
}

impl SbServer {
    /// The sandbox's service app (client credentials) over implicit TLS, tokens from the tenant named by its id.
    pub fn service(sb: &mailqueue_sandbox::Sandbox, name: &str) -> Self {
        Self {
            name: name.into(),
            auth: "oauth_service",
            client_id: sb.service_app().client_id.clone(),
            client_secret: Some(sb.service_app().client_secret.clone()),
            login_address: sb.login_address(sb.tenant_id()),
            tls: "implicit",
            port: sb.imaps_port(),
        }
    }

    /// The sandbox's public client (password grant) over STARTTLS.
    pub fn user(sb: &mailqueue_sandbox::Sandbox, name: &str) -> Self {
        Self {
            name: name.into(),
            auth: "oauth_user",
            client_id: sb
                .public_client_id()
                .expect("the sandbox world has a public client")
                .to_owned(),
            client_secret: None,
            login_address: sb.login_address(sb.tenant_id()),
            tls: "starttls",
            port: sb.imap_port(),
        }
    }

    pub fn with_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.into());
        self
    }

    /// Tokens from `login_address(tenant)`, e.g. the tenant's domain instead of its id (another token cache key).
    pub fn with_tenant(mut self, sb: &mailqueue_sandbox::Sandbox, tenant: &str) -> Self {
        self.login_address = sb.login_address(tenant);
        self
    }
}

/// A queue address of a [`SandboxConfig`].
#[derive(Debug, Clone, Default)]
pub struct SbAddress {
    pub address: String,
    pub server: String,
    pub priority: Option<i32>,
    pub language: Option<String>,
    pub password: Option<String>,
    pub folder: Option<String>,
    /// YAML of `after_fetch`, e.g. `delete` or `{ move: Processed }`.
    pub after_fetch: Option<String>,
}

impl SbAddress {
    pub fn new(address: &str, server: &str) -> Self {
        Self {
            address: address.into(),
            server: server.into(),
            ..Self::default()
        }
    }
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = Some(p);
        self
    }
    pub fn language(mut self, l: &str) -> Self {
        self.language = Some(l.into());
        self
    }
    pub fn password(mut self, p: &str) -> Self {
        self.password = Some(p.into());
        self
    }
    pub fn folder(mut self, f: &str) -> Self {
        self.folder = Some(f.into());
        self
    }
    pub fn after_fetch(mut self, yaml: &str) -> Self {
        self.after_fetch = Some(yaml.into());
        self
    }
}

/// A queue of a [`SandboxConfig`].
#[derive(Debug, Clone)]
pub struct SbQueue {
    pub name: String,
    pub priority: i32,
    pub language: String,
    pub addresses: Vec<SbAddress>,
}

impl SbQueue {
    pub fn new(name: &str, priority: i32, language: &str, addresses: Vec<SbAddress>) -> Self {
        Self {
            name: name.into(),
            priority,
            language: language.into(),
            addresses,
        }
    }
}

/// An engine configuration wired to [`mailqueue_sandbox::Sandbox::shared`]: the API on a random port with the
/// tokens of [`config_yaml`] (alice agent, router, admin), the sandbox CA as `ca_file`, a short poll interval.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub db_url: String,
    /// Default `127.0.0.1:0`.
    pub listen: String,
    /// Default `2s`.
    pub poll_interval: String,
    /// Default 25.
    pub max_email_size_mb: u32,
    pub ca_file: String,
    pub servers: Vec<SbServer>,
    pub queues: Vec<SbQueue>,
    /// Appended as it is (e.g. an `ingest:` section).
    pub extra: String,
}

/// The addresses [`SandboxConfig::standard`] created.
#[derive(Debug, Clone)]
pub struct StandardBoxes {
    /// `support` (priority 5, en) on the `svc` server, with address priority 3 and language de.
    pub service: String,
    /// `sales` (priority 1, fr) on the `usr` server (a user's own mailbox, its password), language it.
    pub user: String,
    pub user_password: String,
}

impl SandboxConfig {
    /// No servers, no queues.
    pub fn empty(sb: &mailqueue_sandbox::Sandbox, db_url: &str) -> Self {
        Self {
            db_url: db_url.into(),
            listen: "127.0.0.1:0".into(),
            poll_interval: "2s".into(),
            max_email_size_mb: 25,
            ca_file: sb.ca_file().display().to_string(),
            servers: Vec::new(),
            queues: Vec::new(),
            extra: String::new(),
        }
    }

    /// The `oauth_service` server `svc` (the service app) and queue `support` (priority 5, `en`) fed by `mailbox`.
    pub fn support_queue(sb: &mailqueue_sandbox::Sandbox, db_url: &str, mailbox: &str) -> Self {
        let mut config = Self::empty(sb, db_url);
        config.servers = vec![SbServer::service(sb, "svc")];
        config.queues = vec![SbQueue::new(
            "support",
            5,
            "en",
            vec![SbAddress::new(mailbox, "svc")],
        )];
        config
    }

    /// An `oauth_service` server `svc` (the service app) and an `oauth_user` server `usr` (the public client);
    /// queue `support` fed by a fresh shared mailbox on `svc`, queue `sales` by a fresh user's own mailbox on `usr`.
    pub fn standard(
        sb: &mailqueue_sandbox::Sandbox,
        db_url: &str,
        prefix: &str,
    ) -> (Self, StandardBoxes) {
        let service = sb.new_mailbox(&format!("{prefix}-svc"));
        let (user, password) = sb.new_user(&format!("{prefix}-usr"));
        let mut config = Self::empty(sb, db_url);
        config.servers = vec![SbServer::service(sb, "svc"), SbServer::user(sb, "usr")];
        config.queues = vec![
            SbQueue::new(
                "support",
                5,
                "en",
                vec![SbAddress::new(&service, "svc").priority(3).language("de")],
            ),
            SbQueue::new(
                "sales",
                1,
                "fr",
                vec![
                    SbAddress::new(&user, "usr")
                        .password(&password)
                        .language("it"),
                ],
            ),
        ];
        let boxes = StandardBoxes {
            service,
            user,
            user_password: password,
        };
        (config, boxes)
    }

    /// The YAML text.
    pub fn yaml(&self) -> String {
        use std::fmt::Write as _;
        let q = |s: &str| serde_json::to_string(s).expect("a JSON string is a YAML string");
        let mut out = format!(
            "database: {{ url: {db} }}\napi:\n  listen: {listen}\n  tokens:\n\
             \x20   - {{ name: alice, role: agent, secret: alice-token, queues: [{queues}] }}\n\
             \x20   - {{ name: router, role: router, secret: router-token }}\n\
             \x20   - {{ name: admin, role: admin, secret: admin-token }}\n\
             defaults: {{ language: en, poll_interval: {poll}, max_email_size_mb: {max}, claim_lease: 5m }}\n",
            db = q(&self.db_url),
            listen = q(&self.listen),
            queues = self
                .queues
                .iter()
                .map(|qu| q(&qu.name))
                .collect::<Vec<_>>()
                .join(", "),
            poll = self.poll_interval,
            max = self.max_email_size_mb,
        );
        out.push_str("incoming_servers:\n");
        for s in &self.servers {
            let _ = writeln!(
                out,
                "  - name: {}\n    login_address: {}\n    auth: {}\n    client_id: {}",
                q(&s.name),
                q(&s.login_address),
                s.auth,
                q(&s.client_id)
            );
            if let Some(secret) = &s.client_secret {
                let _ = writeln!(out, "    client_secret: {}", q(secret));
            }
            let _ = writeln!(
                out,
                "    imap: {{ host: \"127.0.0.2\", port: {}, tls: {} }}\n    ca_file: {}",
                s.port,
                s.tls,
                q(&self.ca_file)
            );
        }
        out.push_str("queues:\n");
        for queue in &self.queues {
            let _ = writeln!(
                out,
                "  - name: {}\n    priority: {}\n    language: {}\n    addresses:",
                q(&queue.name),
                queue.priority,
                queue.language
            );
            for a in &queue.addresses {
                let _ = writeln!(
                    out,
                    "      - address: {}\n        server: {}\n        sender: true",
                    q(&a.address),
                    q(&a.server)
                );
                if let Some(p) = a.priority {
                    let _ = writeln!(out, "        priority: {p}");
                }
                if let Some(l) = &a.language {
                    let _ = writeln!(out, "        language: {l}");
                }
                if let Some(p) = &a.password {
                    let _ = writeln!(out, "        password: {}", q(p));
                }
                if let Some(f) = &a.folder {
                    let _ = writeln!(out, "        folder: {}", q(f));
                }
                if let Some(x) = &a.after_fetch {
                    let _ = writeln!(out, "        after_fetch: {x}");
                }
            }
        }
        out.push_str(&self.extra);
        out
    }
}

/// Starts the engine and its API (`startup::spawn`, as `mailqueue serve` does) with a configuration text.
pub async fn spawn_app_with(db: TestDb, yaml: &str) -> TestApp {
    let running = mailqueue_engine::startup::spawn(parse_config(yaml))
        .await
        .expect("app starts");
    TestApp::serving(db, running)
}

/// Starts the engine and its API from a configuration file, as `mailqueue serve --config FILE` does: a reload
/// (`POST /v1/admin/reload`) re-reads that file.
pub async fn spawn_app_from_file(db: TestDb, file: &Path) -> TestApp {
    let config = mailqueue_config::load(file)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
        .config;
    let options = mailqueue_engine::startup::Options {
        config_file: Some(file.to_owned()),
    };
    let running = mailqueue_engine::startup::spawn_with(config, options)
        .await
        .expect("app starts");
    TestApp::serving(db, running)
}

/// Calls `check` every 50 ms until it returns `Some`, and returns that; panics with `what` after `limit`.
pub async fn eventually<T>(
    what: &str,
    limit: std::time::Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// `GET /v1/mailboxes` as admin.
    pub async fn mailboxes(&self) -> Vec<serde_json::Value> {
        let r = self.get("/v1/mailboxes", "admin-token").await;
        assert_eq!(r.status(), 200, "GET /v1/mailboxes");
        r.json().await.expect("JSON")
    }

    /// The status of the mailbox `address` from `GET /v1/mailboxes`.
    pub async fn mailbox(&self, address: &str) -> serde_json::Value {
        self.mailboxes()
            .await
            .into_iter()
            .find(|m| m["address"].as_str() == Some(address))
            .unwrap_or_else(|| panic!("{address} is not in GET /v1/mailboxes"))
    }
}

/// An IMAP session on a sandbox mailbox for checks (flags, folders): a delegated token for a user's own mailbox,
/// else an app token of the service app (which has FullAccess on `new_mailbox` mailboxes).
pub async fn inspect(
    sb: &mailqueue_sandbox::Sandbox,
    mailbox: &str,
) -> mailqueue_connectors::imap::MailboxSession {
    use mailqueue_connectors::imap;
    use mailqueue_sandbox::{idp::MintRequest, sandbox::IMAP_AUDIENCE};
    let is_user = sb.idp().world().user(mailbox).is_some();
    let request = if is_user {
        MintRequest::user(
            sb.tenant_id(),
            sb.public_client_id().expect("a public client"),
            mailbox,
            IMAP_AUDIENCE,
            &["IMAP.AccessAsUser.All"],
        )
    } else {
        MintRequest::app(
            sb.tenant_id(),
            &sb.service_app().client_id,
            IMAP_AUDIENCE,
            &["IMAP.AccessAsApp"],
        )
    }
    .lifetime(3600);
    let (token, _) = sb.idp().mint(&request).expect("mint a token");
    let endpoint = mailqueue_config::model::ImapEndpoint {
        host: sb.mail_host().to_string(),
        port: sb.imaps_port(),
        tls: mailqueue_config::model::ImapTls::Implicit,
    };
    let tls = imap::ImapTls::new(Some(sb.ca_file())).expect("the sandbox CA");
    let client = imap::connect(&endpoint, &tls).await.expect("IMAP connect");
    imap::authenticate_xoauth2(client, mailbox, &token)
        .await
        .unwrap_or_else(|e| panic!("IMAP login to {mailbox}: {e}"))
}

/// `(all UIDs, seen UIDs)` of `folder` in a sandbox mailbox (empty when the folder does not exist).
pub async fn folder_uids(
    sb: &mailqueue_sandbox::Sandbox,
    mailbox: &str,
    folder: &str,
) -> (Vec<u32>, Vec<u32>) {
    let mut s = inspect(sb, mailbox).await;
    let result = match s.select(folder).await {
        Ok(_) => (
            s.uid_search("ALL").await.expect("SEARCH ALL"),
            s.uid_search("SEEN").await.expect("SEARCH SEEN"),
        ),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let _ = s.logout().await;
    result
}

impl TestApp {
    /// Stops the app gracefully and hands its database back, for another run over the same data.
    pub async fn stop_keep_db(mut self) -> TestDb {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        self.db
    }
}

/// The address a `mailqueue serve` process (started with `--log-format json`, its stderr in `log`) listens on,
/// read from its `mailqueue API listening on …` log line. Configure such processes with `listen: 127.0.0.1:0`: no
/// port is picked before the process binds it, so a connection opened meanwhile (by this or a parallel test) can
/// never take it. Panics with the log if the process exits first or `within` passes.
pub async fn serve_addr(
    child: &mut std::process::Child,
    log: &Path,
    within: std::time::Duration,
) -> std::net::SocketAddr {
    let logs = || std::fs::read_to_string(log).unwrap_or_default();
    eventually("mailqueue serve to listen", within, async || {
        if let Some(status) = child.try_wait().expect("wait for mailqueue serve") {
            panic!("mailqueue serve exited with {status}:\n{}", logs());
        }
        listening_addr(&logs())
    })
    .await
}

/// The `addr` of the first `mailqueue API listening on` line in a JSON log.
fn listening_addr(log: &str) -> Option<std::net::SocketAddr> {
    log.lines()
        .filter(|line| line.contains("mailqueue API listening on"))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|event| event["addr"].as_str()?.parse().ok())
}

/// Starts `mailqueue serve --config CONFIG` (the real binary) with JSON logs at `info` written to `log`, with the
/// failpoint `failpoint` armed (`MAILQUEUE_FAILPOINT`, see the engine's failpoints) or none.
pub fn serve(config: &Path, log: &Path, failpoint: Option<&str>) -> std::process::Child {
    use std::process::{Command, Stdio};
    let log = std::fs::File::create(log).expect("create the log file");
    let mut command = Command::new(mailqueue_bin());
    command
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    match failpoint {
        Some(name) => command.env("MAILQUEUE_FAILPOINT", name),
        None => command.env_remove("MAILQUEUE_FAILPOINT"),
    };
    command.spawn().expect("start mailqueue serve")
}

/// Waits until `child` exits; panics with its log after `within`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    log: &Path,
    within: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for mailqueue serve") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mailqueue serve did not exit within {within:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An `outgoing_server:` section for the sandbox's SMTP server (STARTTLS), authenticating as `username` with the
/// service app, with `contact_information`.
pub fn sandbox_outgoing_yaml(
    sb: &mailqueue_sandbox::Sandbox,
    username: &str,
    contact_information: &str,
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    format!(
        "outgoing_server:\n  host: {host}\n  port: {port}\n  starttls: true\n  login_address: {login}\n  \
         auth: oauth_service\n  client_id: {id}\n  client_secret: {secret}\n  username: {user}\n  \
         contact_information: {contact}\n  ca_file: {ca}\n",
        host = q(&sb.mail_host().to_string()),
        port = sb.smtp_port(),
        login = q(&sb.login_address(sb.tenant_id())),
        id = q(&sb.service_app().client_id),
        secret = q(&sb.service_app().client_secret),
        user = q(username),
        contact = q(contact_information),
        ca = q(&sb.ca_file().display().to_string()),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn listening_addr_reads_the_json_log_line() {
        let log = concat!(
            r#"{"timestamp":"t","level":"INFO","message":"migrated"}"#,
            "\n",
            r#"{"timestamp":"t","level":"INFO","message":"mailqueue API listening on http://127.0.0.1:41234","addr":"127.0.0.1:41234"}"#,
        );
        assert_eq!(
            super::listening_addr(log),
            Some("127.0.0.1:41234".parse().unwrap())
        );
        assert_eq!(super::listening_addr("not json"), None);
    }
}
