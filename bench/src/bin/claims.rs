//! Claims through the HTTP API: `cargo run --release -p mailqueue-bench --bin claims -- [--agents 64]
//! [--contacts 50000] [--queues 4] [--languages 3] [--db postgres|sqlite] [--duration-secs 20] [--close true]
//! [--direct] [--no-analyze]`.
//!
//! Starts the engine (`startup::spawn`) on a fresh database with `--queues` queues and one agent token per agent,
//! each serving every queue and every language, and seeds `--contacts` waiting contacts straight into the store
//! (`store::contacts::insert_many`, not timed), spread over the queues, languages and four priorities with random
//! ages. Then `--agents` concurrent agents, each with its own keep-alive HTTP connection, loop
//! `POST /v1/contacts/claim` → `POST /v1/contacts/{id}/close` until the queue is empty or `--duration-secs` is up.
//!
//! Prints claims/s, the claim latency (p50/p95/p99/max) apart from the close latency, empty claims and errors
//! beside the target, and checks that no contact was claimed twice: the ids the agents got, and the
//! `contact.claimed` events in the database. No sandbox is needed; the agents and the engine share this process
//! (and the machine's cores with the database server). `--direct` calls the engine in process instead of over HTTP
//! (the HTTP layer's share), `--close false` only claims, and `--no-analyze` leaves the table without planner
//! statistics (the first minute after a bulk load).

use std::{
    collections::HashSet,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use chrono::Utc;
use clap::Parser;
use mailqueue_bench::{
    db::{self, BenchDb, DbKind},
    report::{Table, Verdict, percentile, rate, thousands},
    rss, setup,
};
use mailqueue_engine::{
    Engine,
    contacts::Actor,
    startup::{self, RunningApp},
    store::{self, contacts::NewContact},
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use sea_orm::ConnectionTrait as _;

/// Claim throughput and latency of concurrent agents through the HTTP API.
#[derive(Debug, Clone, Parser)]
#[command(name = "claims")]
struct Args {
    /// Concurrent agents, one API token and one HTTP connection each.
    #[arg(long, default_value_t = 64)]
    agents: usize,
    /// Waiting contacts seeded before the agents start.
    #[arg(long, default_value_t = 50_000)]
    contacts: usize,
    /// Queues the contacts are spread over (every agent serves all of them).
    #[arg(long, default_value_t = 4)]
    queues: usize,
    /// Languages the contacts are spread over (every agent handles all of them, named in its token).
    #[arg(long, default_value_t = 3)]
    languages: usize,
    /// The store: a fresh PostgreSQL database (`MQ_BENCH_PG_URL`) or a SQLite file.
    #[arg(long, value_enum, default_value_t = DbKind::Postgres)]
    db: DbKind,
    /// The agents stop after this long, or earlier when the queue is empty.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Close each claimed contact (as an agent finishing it would); `--close false` only claims.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    close: bool,
    /// PostgreSQL: leave the seeded contacts without planner statistics (no `ANALYZE` after seeding), as in the first
    /// minute after a bulk load, before autovacuum has analysed the table. SQLite is never analysed (nor is it in
    /// production: nothing runs `ANALYZE` there).
    #[arg(long)]
    no_analyze: bool,
    /// Call `Engine::claim_next` and `Engine::close` in process instead of the HTTP API: the engine's share of the
    /// figures without the HTTP layer (client and server).
    #[arg(long)]
    direct: bool,
    /// Seed of the generated contacts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The whole run stops after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// The target: claims per second, and the 99th percentile of a claim's latency, at 64 concurrent agents.
const TARGET_PER_SEC: f64 = 3_000.0;
const TARGET_P99_MS: f64 = 20.0;
const TARGET_AGENTS: usize = 64;

/// The language tags contacts and agents use, in order (`--languages` takes the first ones).
const LANGUAGES: [&str; 6] = ["en", "de", "fr", "es", "it", "nl"];
/// The priorities contacts get, spread evenly (lowest value served first).
const PRIORITIES: [i32; 4] = [0, 1, 5, 9];
/// Contacts inserted per transaction while seeding.
const SEED_BATCH: usize = 5_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    setup::init_logs();
    setup::exit_code("claims", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.agents == 0 || args.contacts == 0 || args.queues == 0 {
        bail!("--agents, --contacts and --queues must be at least 1");
    }
    if !(1..=LANGUAGES.len()).contains(&args.languages) {
        bail!("--languages must be 1 to {}", LANGUAGES.len());
    }
    let db = BenchDb::create(args.db).await?;
    let mut app: Option<RunningApp> = None;
    let limit = Duration::from_secs(args.timeout_secs);
    let outcome = tokio::time::timeout(limit, measure(&args, &db, &mut app)).await;
    if let Some(app) = app.take() {
        app.stop().await;
    }
    let dropped = db.drop_database().await;
    match outcome {
        Ok(table) => println!("{}", table?.render()),
        Err(_) => bail!("stopped after --timeout-secs {}", args.timeout_secs),
    }
    dropped.context("dropping the benchmark database")
}

fn queue_name(i: usize) -> String {
    format!("claims-{i}")
}

fn agent_name(i: usize) -> String {
    format!("agent-{i:03}")
}

fn agent_secret(i: usize) -> String {
    format!("claims-agent-{i:03}")
}

/// The configuration text: the API on a random loopback port, one agent token per agent (every queue, every
/// language), and `--queues` queues, each on an address of a disabled incoming server (nothing is fetched).
fn engine_yaml(args: &Args, db_url: &str) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let queues: Vec<String> = (0..args.queues).map(queue_name).collect();
    let languages = LANGUAGES[..args.languages].join(", ");
    let mut out = format!(
        "database: {{ url: {db} }}\napi:\n  listen: \"127.0.0.1:0\"\n  tokens:\n",
        db = q(db_url)
    );
    for i in 0..args.agents {
        out.push_str(&format!(
            "    - {{ name: {}, role: agent, secret: {}, queues: [{}], languages: [{languages}] }}\n",
            agent_name(i),
            agent_secret(i),
            queues.join(", "),
        ));
    }
    out.push_str(
        "defaults: { language: en, poll_interval: 30s, claim_lease: 5m }\n\
         incoming_servers:\n\
         \x20 - name: off\n    login_address: \"https://login.microsoftonline.com/contoso.onmicrosoft.com\"\n\
         \x20   auth: oauth_service\n    client_id: \"00000000-0000-0000-0000-000000000000\"\n\
         \x20   client_secret: not-a-real-secret\n    imap: { host: outlook.office365.com, port: 993, tls: implicit }\n\
         \x20   enabled: false\n\
         queues:\n",
    );
    for name in &queues {
        out.push_str(&format!(
            "  - name: {name}\n    addresses:\n      - {{ address: {name}@bench.example, server: off, sender: true }}\n"
        ));
    }
    out
}

/// Seeds `n` waiting contacts spread over the queues, languages and [`PRIORITIES`], with ages up to a day, in
/// transactions of [`SEED_BATCH`].
async fn seed(engine: &Engine, args: &Args) -> anyhow::Result<()> {
    let dir = engine.queues().await;
    let queue_ids: Vec<i64> = (0..args.queues)
        .map(|i| {
            dir.by_name
                .get(&queue_name(i))
                .map(|q| q.id)
                .context("a configured queue is missing from the queue directory")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let now = Utc::now();
    let mut left = args.contacts;
    let mut next = 0usize;
    while left > 0 {
        let batch: Vec<NewContact> = (0..left.min(SEED_BATCH))
            .map(|_| {
                next += 1;
                let queue = next % args.queues;
                NewContact {
                    queue_id: queue_ids[queue],
                    priority: PRIORITIES[rng.random_range(0..PRIORITIES.len())],
                    language: LANGUAGES[rng.random_range(0..args.languages)].to_owned(),
                    arrived_on: format!("{}@bench.example", queue_name(queue)),
                    customer_address: Some(format!("customer{next}@example.com")),
                    customer_name: Some(format!("Customer {next}")),
                    subject: Some(format!("Order {next}")),
                    queued_at: now - chrono::Duration::seconds(rng.random_range(0..86_400)),
                }
            })
            .collect();
        left -= batch.len();
        let txn = store::begin_write(&engine.db).await?;
        store::contacts::insert_many(&txn, batch).await?;
        txn.commit().await?;
    }
    Ok(())
}

/// What one agent saw.
#[derive(Debug, Default)]
struct AgentRun {
    /// The ids of the contacts it claimed.
    claimed: Vec<i64>,
    /// Milliseconds per successful claim (200) and per close.
    claim_ms: Vec<f64>,
    close_ms: Vec<f64>,
    /// Claims that found nothing (204).
    empty: usize,
    errors: usize,
    first_error: Option<String>,
}

impl AgentRun {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// How an agent reaches the engine.
enum Transport {
    /// The HTTP API, on a keep-alive connection of its own.
    Http {
        client: reqwest::Client,
        base: String,
        secret: String,
    },
    /// `Engine::claim_next` and `Engine::close` in process (`--direct`): the engine without the HTTP layer.
    Direct {
        engine: Engine,
        name: String,
        queue_ids: Vec<i64>,
        languages: Vec<String>,
    },
}

impl Transport {
    /// One claim: the contact's id (200) or `None` when nothing waits (204).
    async fn claim(&self) -> anyhow::Result<Option<i64>> {
        match self {
            Self::Http {
                client,
                base,
                secret,
            } => {
                let response = client
                    .post(format!("{base}/v1/contacts/claim"))
                    .bearer_auth(secret)
                    .send()
                    .await?;
                match response.status() {
                    reqwest::StatusCode::NO_CONTENT => Ok(None),
                    reqwest::StatusCode::OK => {
                        let contact: serde_json::Value = response.json().await?;
                        let id = contact["id"].as_i64().with_context(|| {
                            format!("a claimed contact without an id: {contact}")
                        })?;
                        Ok(Some(id))
                    }
                    status => bail!("{status} {}", response.text().await.unwrap_or_default()),
                }
            }
            Self::Direct {
                engine,
                name,
                queue_ids,
                languages,
            } => Ok(engine
                .claim_next(name, queue_ids, languages)
                .await?
                .map(|c| c.id)),
        }
    }

    async fn close(&self, id: i64) -> anyhow::Result<()> {
        match self {
            Self::Http {
                client,
                base,
                secret,
            } => {
                let response = client
                    .post(format!("{base}/v1/contacts/{id}/close"))
                    .bearer_auth(secret)
                    .send()
                    .await?;
                let status = response.status();
                if status != reqwest::StatusCode::OK {
                    bail!("{status} {}", response.text().await.unwrap_or_default());
                }
                Ok(())
            }
            Self::Direct { engine, name, .. } => {
                engine.close(id, Actor::Agent(name)).await?;
                Ok(())
            }
        }
    }
}

/// One agent: claim, then close, until the queue is empty or `deadline`.
async fn agent(transport: Transport, close: bool, deadline: Instant) -> AgentRun {
    let mut run = AgentRun::default();
    while Instant::now() < deadline {
        let started = Instant::now();
        let id = match transport.claim().await {
            Ok(Some(id)) => id,
            Ok(None) => {
                run.empty += 1;
                break;
            }
            Err(e) => {
                run.error(format!("claim: {e:#}"));
                continue;
            }
        };
        run.claim_ms.push(started.elapsed().as_secs_f64() * 1e3);
        run.claimed.push(id);
        if !close {
            continue;
        }
        let started = Instant::now();
        match transport.close(id).await {
            Ok(()) => run.close_ms.push(started.elapsed().as_secs_f64() * 1e3),
            Err(e) => run.error(format!("close {id}: {e:#}")),
        }
    }
    run
}

/// The transport of agent `i`.
async fn transport(
    args: &Args,
    engine: &Engine,
    base: &str,
    i: usize,
) -> anyhow::Result<Transport> {
    if args.direct {
        let dir = engine.queues().await;
        return Ok(Transport::Direct {
            engine: engine.clone(),
            name: agent_name(i),
            queue_ids: dir.by_name.values().map(|q| q.id).collect(),
            languages: LANGUAGES[..args.languages]
                .iter()
                .map(|l| l.to_string())
                .collect(),
        });
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    Ok(Transport::Http {
        client,
        base: base.to_owned(),
        secret: agent_secret(i),
    })
}

/// Claims and their events, read back from the database after the run.
struct Stored {
    claim_events: i64,
    distinct_claimed: i64,
    closed: i64,
}

impl Stored {
    async fn read(engine: &Engine) -> anyhow::Result<Self> {
        let events = "FROM events WHERE kind = 'contact.claimed'";
        Ok(Self {
            claim_events: db::count(&engine.db, &format!("SELECT COUNT(*) {events}")).await?,
            distinct_claimed: db::count(
                &engine.db,
                &format!("SELECT COUNT(DISTINCT contact_id) {events}"),
            )
            .await?,
            closed: db::count(
                &engine.db,
                "SELECT COUNT(*) FROM contacts WHERE state = 'closed'",
            )
            .await?,
        })
    }
}

async fn measure(args: &Args, db: &BenchDb, app: &mut Option<RunningApp>) -> anyhow::Result<Table> {
    let load_before = rss::load_average();
    let config = setup::parse_config(&engine_yaml(args, &db.url))?;
    let running = startup::spawn(config)
        .await
        .context("starting the engine")?;
    let (engine, base) = (running.engine.clone(), format!("http://{}", running.addr));
    *app = Some(running);

    let seeded = Instant::now();
    seed(&engine, args).await.context("seeding contacts")?;
    let analysed = args.db == DbKind::Postgres && !args.no_analyze;
    if analysed {
        // A backlog builds up over hours, during which autovacuum has analysed the table; a bulk load has not.
        engine
            .db
            .execute_unprepared("ANALYZE contacts")
            .await
            .context("ANALYZE contacts")?;
    }
    println!(
        "claims benchmark: {} contacts seeded in {:.1} s over {} queues, {} languages and {} priorities{}; {} \
         agents, {} database, close {}",
        thousands(args.contacts as f64),
        seeded.elapsed().as_secs_f64(),
        args.queues,
        args.languages,
        PRIORITIES.len(),
        if analysed { "" } else { ", not analysed" },
        args.agents,
        args.db.as_str(),
        if args.close { "on" } else { "off" },
    );

    let mut transports = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        transports.push(transport(args, &engine, &base, i).await?);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for transport in transports {
        tasks.spawn(agent(transport, args.close, deadline));
    }
    let mut runs = Vec::with_capacity(args.agents);
    while let Some(done) = tasks.join_next().await {
        runs.push(done.context("an agent panicked")?);
    }
    let elapsed = started.elapsed();
    let stored = Stored::read(&engine).await?;
    Ok(report(args, &runs, elapsed, &stored, &load_before))
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// `p50 / p95 / p99 / max` in milliseconds.
fn latencies(sorted: &[f64]) -> String {
    let ms = |p: f64| format!("{:.1}", percentile(sorted, p));
    format!(
        "{} / {} / {} / {} ms",
        ms(50.0),
        ms(95.0),
        ms(99.0),
        ms(100.0)
    )
}

fn report(
    args: &Args,
    runs: &[AgentRun],
    elapsed: Duration,
    stored: &Stored,
    load_before: &str,
) -> Table {
    let claimed: Vec<i64> = runs
        .iter()
        .flat_map(|r| r.claimed.iter().copied())
        .collect();
    let distinct = claimed.iter().collect::<HashSet<_>>().len();
    let claim_ms = sorted(runs.iter().flat_map(|r| r.claim_ms.iter().copied()));
    let close_ms = sorted(runs.iter().flat_map(|r| r.close_ms.iter().copied()));
    let empty: usize = runs.iter().map(|r| r.empty).sum();
    let errors: usize = runs.iter().map(|r| r.errors).sum();
    let per_sec = rate(claimed.len() as f64, elapsed);
    let p99 = percentile(&claim_ms, 99.0);
    let at_target = args.agents == TARGET_AGENTS;
    let target_verdict = |ok: bool| {
        if at_target {
            Verdict::of(ok)
        } else {
            Verdict::Info
        }
    };
    let emptied = claimed.len() == args.contacts;

    let mut table = Table::new(format!(
        "claims: {} agents {}, {} contacts, {}, close {} ({} cores)",
        args.agents,
        if args.direct {
            "in process (--direct)"
        } else {
            "over HTTP"
        },
        thousands(args.contacts as f64),
        args.db.as_str(),
        if args.close { "on" } else { "off" },
        std::thread::available_parallelism().map_or(0, |c| c.get())
    ));
    table.row(
        "claims/s",
        thousands(per_sec),
        format!("≥ {} /s", thousands(TARGET_PER_SEC)),
        target_verdict(per_sec >= TARGET_PER_SEC),
    );
    table.row(
        "claim latency p50 / p95 / p99 / max",
        latencies(&claim_ms),
        format!("p99 ≤ {TARGET_P99_MS:.0} ms"),
        target_verdict(p99 <= TARGET_P99_MS),
    );
    if args.close {
        table.row(
            "close latency p50 / p95 / p99 / max",
            latencies(&close_ms),
            "",
            Verdict::Info,
        );
    }
    table.row(
        "claims (contacts claimed)",
        format!(
            "{} in {:.2} s{}",
            thousands(claimed.len() as f64),
            elapsed.as_secs_f64(),
            if emptied { ", queue emptied" } else { "" }
        ),
        "",
        Verdict::Info,
    );
    table.row("empty claims (204)", empty.to_string(), "", Verdict::Info);
    table.row("errors", errors.to_string(), "0", Verdict::of(errors == 0));
    table.row(
        "distinct ids the agents got = claims",
        format!("{distinct} = {}", claimed.len()),
        "equal",
        Verdict::of(distinct == claimed.len()),
    );
    table.row(
        "contact.claimed events: distinct contacts = events = claims",
        format!(
            "{} = {} = {}",
            stored.distinct_claimed,
            stored.claim_events,
            claimed.len()
        ),
        "equal",
        Verdict::of(
            stored.distinct_claimed == stored.claim_events
                && stored.claim_events == claimed.len() as i64,
        ),
    );
    if args.close {
        table.row(
            "contacts closed in the database = closes",
            format!("{} = {}", stored.closed, close_ms.len()),
            "equal",
            Verdict::of(stored.closed == close_ms.len() as i64),
        );
    }
    if let Some(e) = runs.iter().find_map(|r| r.first_error.as_deref()) {
        table.note(format!("First error: {e}"));
    }
    if !at_target {
        table.note(format!(
            "The target is for {TARGET_AGENTS} agents; this run used {}, so the verdicts are for reference.",
            args.agents
        ));
    }
    table.note(
        "Latency is measured by the agents: HTTP request → response on a keep-alive connection (the engine call \
         with --direct). The agents, the engine and the database server share the machine's cores.",
    );
    table.note(format!(
        "Load average (1/5/15 min) at the start {load_before}, at the end {}.",
        rss::load_average()
    ));
    table
}
