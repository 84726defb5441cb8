//! Several instances on one database: the mailbox lease store on both backends, and real `mailqueue serve`
//! processes on one PostgreSQL fetching sandbox mailboxes that receive mail all along — work spreads, every mail
//! becomes exactly one contact through `kill -9` and SIGTERM, events reach clients of every instance — and a
//! second `serve` on one SQLite file is refused.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use mailqueue_engine::store::{instances, mailbox_leases, stmt};
use mailqueue_sandbox::Sandbox;
use mailqueue_tests::{
    Kind, SandboxConfig, SbAddress, SbQueue, SbServer, TestDb, both_backends, eventually, mail,
    mailqueue_bin,
};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::Value as Json;

/// Generous: a loaded machine runs many tests at once, and three debug builds of the engine share it here.
const WAIT: Duration = Duration::from_secs(120);

// ---- The lease store ----

both_backends! {
    lease_store => lease_store;
    instance_store => instance_store;
}

async fn lease_store(kind: Kind) {
    let (engine, _db) = mailqueue_tests::engine(kind).await;
    let db = &engine.db;
    let ttl = Duration::from_secs(10);
    let t0 = Utc::now();
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    let acquire = async |owner: &str, s: i64| {
        mailbox_leases::acquire(db, "a@x.com", "INBOX", owner, at(s), ttl)
            .await
            .unwrap()
    };

    assert!(acquire("A", 0).await, "a free lease is taken");
    assert!(
        !acquire("B", 1).await,
        "a live lease of another owner is not"
    );
    assert!(acquire("A", 1).await, "the owner may take it again");
    let renewed = mailbox_leases::renew(db, "A", at(5), ttl).await.unwrap();
    assert_eq!(
        renewed,
        [mailbox_leases::LeaseKey {
            mailbox: "a@x.com".into(),
            folder: "INBOX".into()
        }]
    );
    assert!(!acquire("B", 14).await, "renewed until 15 s");
    assert!(acquire("B", 16).await, "expired: taken over");
    assert!(
        mailbox_leases::renew(db, "A", at(16), ttl)
            .await
            .unwrap()
            .is_empty(),
        "the former owner renews nothing"
    );
    let rows = mailbox_leases::all(db).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].owner, "B");
    assert_eq!(rows[0].acquired_at.timestamp(), at(16).timestamp());
    assert_eq!(rows[0].expires_at.timestamp(), at(26).timestamp());

    assert!(
        !mailbox_leases::release(db, "a@x.com", "INBOX", "A")
            .await
            .unwrap()
    );
    assert!(
        mailbox_leases::release(db, "a@x.com", "INBOX", "B")
            .await
            .unwrap()
    );
    assert!(acquire("C", 17).await, "released: free at once");
    // Another folder of the same address is another lease.
    assert!(
        mailbox_leases::acquire(db, "a@x.com", "Orders", "D", at(17), ttl)
            .await
            .unwrap()
    );
    assert_eq!(mailbox_leases::release_all(db, "C").await.unwrap(), 1);
    assert_eq!(mailbox_leases::all(db).await.unwrap().len(), 1);
    assert!(acquire("E", 18).await);
    assert_eq!(mailbox_leases::forget_others(db, "E").await.unwrap(), 1);
    assert_eq!(mailbox_leases::all(db).await.unwrap()[0].owner, "E");
    assert_eq!(mailbox_leases::release_all(db, "E").await.unwrap(), 1);

    // Many instances reaching for one free lease at once: exactly one gets it.
    let now = Utc::now();
    let racers = (0..8).map(|i| {
        let db = db.clone();
        tokio::spawn(async move {
            mailbox_leases::acquire(&db, "race@x.com", "INBOX", &format!("r{i}"), now, ttl)
                .await
                .unwrap()
        })
    });
    let won = futures::future::join_all(racers)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(won, 1);
}

async fn instance_store(kind: Kind) {
    let (engine, _db) = mailqueue_tests::engine(kind).await;
    let db = &engine.db;
    let ttl = Duration::from_secs(10);
    let now = Utc::now();
    instances::heartbeat(db, "h:1:a", "h", 1, now, ttl)
        .await
        .unwrap();
    instances::heartbeat(db, "h:2:b", "h", 2, now, ttl)
        .await
        .unwrap();
    let later = now + chrono::Duration::seconds(8);
    instances::heartbeat(db, "h:1:a", "h", 1, later, ttl)
        .await
        .unwrap();
    let live = instances::live(db, now + chrono::Duration::seconds(12))
        .await
        .unwrap();
    assert_eq!(live.len(), 1, "b expired, a was renewed: {live:?}");
    assert_eq!((live[0].id.as_str(), live[0].pid), ("h:1:a", 1));
    assert_eq!(live[0].started_at.timestamp(), now.timestamp());
    assert_eq!(instances::live(db, now).await.unwrap().len(), 2);
    assert_eq!(
        instances::purge(db, now + chrono::Duration::seconds(12))
            .await
            .unwrap(),
        1
    );
    instances::heartbeat(db, "h:3:c", "h", 3, now, ttl)
        .await
        .unwrap();
    assert_eq!(instances::forget_others(db, "h:3:c").await.unwrap(), 1);
    instances::remove(db, "h:3:c").await.unwrap();
    assert!(instances::live(db, now).await.unwrap().is_empty());
}

/// On PostgreSQL an engine that committed events notifies `mailqueue_events` afterwards, in a transaction of its
/// own (its notifier), so the readers of every instance wake up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appending_events_notifies_listeners() {
    use sea_orm::sqlx::postgres::PgListener;
    let (engine, _db) = mailqueue_tests::engine(Kind::Postgres).await;
    let mut listener = PgListener::connect_with(engine.db.get_postgres_connection_pool())
        .await
        .unwrap();
    listener
        .listen(mailqueue_engine::events::CHANNEL)
        .await
        .unwrap();
    let contact = mailqueue_tests::seed_contact(&engine, "support", "en", 5, 0).await;
    engine
        .close(
            contact,
            mailqueue_engine::contacts::Actor::Supervisor("test"),
        )
        .await
        .unwrap();
    let n = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(n.channel(), mailqueue_engine::events::CHANNEL);
}

/// The PIDs of the backends that LISTEN on the test database.
async fn listen_backends(db: &DatabaseConnection) -> Vec<i32> {
    db.query_all_raw(stmt(
        db,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        [],
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| r.try_get::<i32>("", "pid").unwrap())
    .collect()
}

/// The instance's LISTEN connection comes back after PostgreSQL drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_events_listener_reconnects_when_its_connection_drops() {
    let (engine, db) = mailqueue_tests::engine(Kind::Postgres).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = mailqueue_engine::events::spawn_listener(engine.clone(), stop.clone())
        .expect("a listener on PostgreSQL");
    let observer = sea_orm::Database::connect(&db.url).await.unwrap();
    let first = eventually("a LISTEN connection", WAIT, async || {
        listen_backends(&observer).await.first().copied()
    })
    .await;
    observer
        .execute_raw(stmt(
            &observer,
            "SELECT pg_terminate_backend($1)",
            [first.into()],
        ))
        .await
        .unwrap();
    eventually("a new LISTEN connection", WAIT, async || {
        let now = listen_backends(&observer).await;
        (!now.is_empty() && !now.contains(&first)).then_some(())
    })
    .await;
    stop.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    observer.close().await.unwrap();
}

// ---- Real processes ----

/// One `mailqueue serve` process with its own configuration file and log (stderr). It listens on a port the
/// kernel picks (`127.0.0.1:0`), known once [`Instance::ready`] read it from the log.
struct Instance {
    name: &'static str,
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Instance {
    fn start(dir: &Path, name: &'static str, yaml: impl Fn(u16) -> String) -> Self {
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml(0)).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(mailqueue_bin())
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("MAILQUEUE_FAILPOINT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start mailqueue serve");
        Self {
            name,
            child,
            port: 0,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, path: &str) -> String {
        assert_ne!(self.port, 0, "{} is not ready yet", self.name);
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the API answers; fails with the log if the process exited.
    async fn ready(&mut self, client: &reqwest::Client) {
        self.port = mailqueue_tests::serve_addr(&mut self.child, &self.log, WAIT)
            .await
            .port();
        let what = format!("{} to answer /healthz", self.name);
        eventually(&what, WAIT, async || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited with {status}:\n{}", self.name, self.logs());
            }
            let r = client.get(self.url("/healthz")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    async fn exited(&mut self) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        eventually(&what, WAIT, async || self.child.try_wait().unwrap()).await
    }

    async fn get(&self, client: &reqwest::Client, path: &str, token: &str) -> Json {
        let r = client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.name));
        assert!(
            r.status().is_success(),
            "GET {path} on {}: {}",
            self.name,
            r.status()
        );
        r.json().await.unwrap()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The configuration text with a short mailbox lease (the sandbox configuration sets the other defaults).
fn with_lease(yaml: String, lease: &str) -> String {
    let short = yaml.replace(
        "claim_lease: 5m }",
        &format!("claim_lease: 5m, mailbox_lease: {lease} }}"),
    );
    assert_ne!(short, yaml, "the defaults line changed; update with_lease");
    short
}

/// The instance (pid) of a lease owner `<host>:<pid>:<random>`.
fn owner_pid(owner: &str) -> u32 {
    owner
        .rsplit(':')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("owner {owner} has no pid"))
}

/// The live lease owner (pid) of each mailbox.
async fn lease_pids(db: &DatabaseConnection) -> HashMap<String, u32> {
    let now = Utc::now();
    mailbox_leases::all(db)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.expires_at > now)
        .map(|l| (l.mailbox, owner_pid(&l.owner)))
        .collect()
}

/// Waits until every one of `boxes` is leased by one of `pids`, and each of `pids` holds at least `each`.
async fn wait_spread(db: &DatabaseConnection, boxes: &[String], pids: &[u32], each: usize) {
    let what = format!("the mailboxes leased by {pids:?}, at least {each} each");
    eventually(&what, WAIT, async || {
        let leases = lease_pids(db).await;
        let all = boxes
            .iter()
            .all(|b| leases.get(b).is_some_and(|p| pids.contains(p)));
        let spread = pids
            .iter()
            .all(|p| leases.values().filter(|o| *o == p).count() >= each);
        (all && spread).then_some(())
    })
    .await
}

/// Delivers mail to `boxes` in turn until `stop`; returns the Message-IDs sent.
fn keep_delivering(
    sb: &'static Sandbox,
    boxes: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let to = &boxes[i % boxes.len()];
            let id = format!("scale-{}@example.com", uuid::Uuid::new_v4().simple());
            let raw = mail(&id, to, &format!("mail {i}"), &id, "Hello, I need help.");
            sb.deliver(to, &raw).unwrap();
            sent.push(id);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        sent
    })
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(stmt(db, sql, []))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}

/// How often each Message-ID is stored.
async fn stored_message_ids(db: &DatabaseConnection) -> HashMap<String, i64> {
    db.query_all_raw(stmt(
        db,
        "SELECT message_id, COUNT(*) AS n FROM messages WHERE message_id IS NOT NULL GROUP BY message_id",
        [],
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| (r.try_get("", "message_id").unwrap(), r.try_get("", "n").unwrap()))
    .collect()
}

/// Polls `/v1/events` on `instance` from `after` until an event matches `wanted`; returns it.
async fn wait_event(
    client: reqwest::Client,
    instance_url: String,
    mut after: i64,
    wanted: impl Fn(&Json) -> bool,
) -> Json {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(std::time::Instant::now() < deadline, "no matching event");
        let page: Json = client
            .get(format!(
                "{instance_url}/v1/events?after={after}&wait=30&limit=500"
            ))
            .bearer_auth("router-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(e) = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| wanted(e))
        {
            return e.clone();
        }
        after = page["next"].as_i64().unwrap();
    }
}

/// Three instances on one PostgreSQL with six mailboxes receiving mail all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_fetch_every_mail_exactly_once_through_kill_and_sigterm() {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Postgres).await;
    let boxes: Vec<String> = (0..6)
        .map(|i| sb.new_mailbox(&format!("scale{i}")))
        .collect();
    let mut config = SandboxConfig::empty(sb, &db.url);
    config.poll_interval = "2s".into();
    config.servers = vec![SbServer::service(sb, "svc")];
    config.queues = vec![SbQueue::new(
        "support",
        5,
        "en",
        boxes.iter().map(|b| SbAddress::new(b, "svc")).collect(),
    )];
    let yaml = |port: u16| {
        let mut c = config.clone();
        c.listen = format!("127.0.0.1:{port}");
        with_lease(c.yaml(), "3s")
    };
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut a = Instance::start(dir.path(), "a", yaml);
    let mut b = Instance::start(dir.path(), "b", yaml);
    let mut c = Instance::start(dir.path(), "c", yaml);
    for i in [&mut a, &mut b, &mut c] {
        i.ready(&client).await;
    }
    let pg = sea_orm::Database::connect(&db.url).await.unwrap();

    let stop_mail = Arc::new(AtomicBool::new(false));
    let sender = keep_delivering(sb, boxes.clone(), stop_mail.clone());

    // Work spreads: each instance fetches some of the six mailboxes (two each at the fair share).
    wait_spread(&pg, &boxes, &[a.pid(), b.pid(), c.pid()], 1).await;
    let listed = eventually(
        "every mailbox listed on a with its owner",
        WAIT,
        async || {
            let list = a.get(&client, "/v1/mailboxes", "admin-token").await;
            let list = list.as_array().unwrap().clone();
            (list.len() == boxes.len() && list.iter().all(|m| m["owner"].is_string()))
                .then_some(list)
        },
    )
    .await;
    assert!(
        listed.iter().any(|m| m["state"] == "standby"
            && !m["owner"]
                .as_str()
                .unwrap()
                .contains(&format!(":{}:", a.pid()))),
        "a shows mailboxes fetched elsewhere with their owner: {listed:?}"
    );

    // A client of instance a sees a claim made through instance b.
    eventually("a contact to claim", WAIT, async || {
        (count(&pg, "SELECT COUNT(*) AS n FROM contacts").await > 0).then_some(())
    })
    .await;
    let after = count(&pg, "SELECT COALESCE(MAX(seq), 0) AS n FROM events").await;
    let watcher = tokio::spawn(wait_event(client.clone(), a.url(""), after, |e| {
        e["kind"] == "contact.claimed" && e["actor"] == "alice"
    }));
    let claimed: Json = client
        .post(b.url("/v1/contacts/claim"))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen = watcher.await.unwrap();
    assert_eq!(seen["contact_id"], claimed["id"], "{seen} vs {claimed}");

    // kill -9 a: its mailboxes move to b and c once their leases expire.
    let held_by_a: Vec<String> = lease_pids(&pg)
        .await
        .into_iter()
        .filter(|(_, p)| *p == a.pid())
        .map(|(m, _)| m)
        .collect();
    assert!(!held_by_a.is_empty());
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    wait_spread(&pg, &boxes, &[b.pid(), c.pid()], 1).await;

    // SIGTERM b: it drains, exits 0 and releases its leases; c takes everything.
    b.signal("-TERM");
    let status = b.exited().await;
    assert!(
        status.success(),
        "b exits 0 on SIGTERM: {status}\n{}",
        b.logs()
    );
    let b_rows = count(
        &pg,
        &format!(
            "SELECT COUNT(*) AS n FROM mailbox_leases WHERE owner LIKE '%:{}:%'",
            b.pid()
        ),
    )
    .await;
    assert_eq!(b_rows, 0, "b released its leases:\n{}", b.logs());
    assert_eq!(
        count(
            &pg,
            &format!(
                "SELECT COUNT(*) AS n FROM instances WHERE pid = {}",
                b.pid()
            )
        )
        .await,
        0
    );
    wait_spread(&pg, &boxes, &[c.pid()], boxes.len()).await;

    // Every mail sent, through both failures, is exactly one message and one contact.
    stop_mail.store(true, Ordering::SeqCst);
    let sent = sender.await.unwrap();
    let sent_set: HashSet<&String> = sent.iter().collect();
    assert_eq!(sent_set.len(), sent.len());
    let stored = eventually(
        &format!("all {} mails stored", sent.len()),
        WAIT,
        async || {
            let stored = stored_message_ids(&pg).await;
            sent.iter()
                .all(|id| stored.contains_key(id))
                .then_some(stored)
        },
    )
    .await;
    let twice: Vec<(&String, &i64)> = stored.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(stored.len(), sent.len(), "nothing else was stored");
    assert_eq!(
        count(&pg, "SELECT COUNT(*) AS n FROM contacts").await,
        sent.len() as i64,
        "one contact per mail"
    );
    assert_eq!(count(&pg, "SELECT COUNT(*) AS n FROM quarantine").await, 0);

    c.signal("-TERM");
    let status = c.exited().await;
    assert!(status.success(), "c exits 0: {status}\n{}", c.logs());
    assert_eq!(
        count(&pg, "SELECT COUNT(*) AS n FROM mailbox_leases").await,
        0
    );
    pg.close().await.unwrap();
}

/// SQLite is single-instance: a second `serve` on the same file stops at once and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_instance_on_one_sqlite_file_is_refused() {
    let db = TestDb::new(Kind::Sqlite).await;
    let yaml = |port: u16| {
        mailqueue_tests::config_yaml(&db.url).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
    };
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut first = Instance::start(dir.path(), "first", yaml);
    first.ready(&client).await;
    let mut second = Instance::start(dir.path(), "second", yaml);
    let status = second.exited().await;
    let stderr = second.logs();
    assert!(!status.success(), "the second instance must fail: {stderr}");
    let file = db.url.trim_start_matches("sqlite://");
    assert!(
        stderr.contains(&format!("{file}.lock"))
            && stderr.contains("single-instance")
            && stderr.contains("PostgreSQL"),
        "{stderr}"
    );
    // The first one is untouched and stops cleanly; then the file is free again.
    first.ready(&client).await;
    first.signal("-TERM");
    assert!(first.exited().await.success(), "{}", first.logs());
    let mut third = Instance::start(dir.path(), "third", yaml);
    third.ready(&client).await;
    third.signal("-INT");
    assert!(third.exited().await.success(), "{}", third.logs());
}

/// `defaults.mailbox_lease` is renewed every third of it: under a second is refused where it is written.
#[test]
fn a_mailbox_lease_under_a_second_is_refused_with_its_position() {
    let load = |lease: &str| {
        mailqueue_config::load_str(
            Path::new("mq.yaml"),
            &format!("defaults:\n  mailbox_lease: {lease}\n"),
        )
    };
    let e = load("500ms").map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("mq.yaml:2:18") && e.contains("defaults.mailbox_lease 500ms is out of range"),
        "{e}"
    );
    let config = load("3s").unwrap().config;
    assert_eq!(config.defaults.mailbox_lease.0, Duration::from_secs(3));
    let config = load("15s").unwrap().config;
    assert_eq!(
        mailqueue_config::load_str(Path::new("mq.yaml"), "{}\n")
            .unwrap()
            .config
            .defaults
            .mailbox_lease,
        config.defaults.mailbox_lease,
        "15 s by default"
    );
}
