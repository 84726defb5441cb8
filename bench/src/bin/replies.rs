//! Replies through the outbox: `cargo run --release -p mailqueue-bench --bin replies -- [--replies 2000]
//! [--text-bytes 2000] [--connections 8] [--submitters 8] [--db postgres|sqlite]`.
//!
//! Starts a private sandbox and the engine (`startup::spawn`) without an outgoing server, and opens one contact per
//! reply (customer mails stored through `Engine::ingest`, not timed). Then two phases of N replies each, stored with
//! `Engine::submit_reply` by `--submitters` concurrent tasks:
//! 1. backlog: the replies are stored while no outgoing server is configured; a configuration reload
//!    (`Engine::replace_config`) then adds the sandbox's SMTP server (STARTTLS, XOAUTH2 with the service app) and the
//!    time until every reply is accepted gives the sending rate alone;
//! 2. live: replies are stored while the worker sends them; first reply stored → last reply accepted by the SMTP
//!    server gives the end-to-end rate.
//!
//! Prints both beside the target, the store rate and the peak RSS. Bounded by `--timeout-secs`; the engine, the
//! sandbox and the database are removed at the end.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mailqueue_bench::{
    db::{self, BenchDb, DbKind},
    mail::MailGen,
    report::{Table, Verdict, rate, thousands},
    rss,
    setup::{self, EngineSettings},
};
use mailqueue_engine::{
    Engine,
    contacts::Actor,
    ingest::{Incoming, Outcome},
    outbox::ReplyRequest,
    startup::{self, RunningApp},
};
use mailqueue_sandbox::Sandbox;

/// Reply throughput: stored → sent through the outgoing SMTP server.
#[derive(Debug, Clone, Parser)]
#[command(name = "replies")]
struct Args {
    /// Replies stored and sent (one contact each).
    #[arg(long, default_value_t = 2000)]
    replies: usize,
    /// Size of each reply's text body in bytes (about).
    #[arg(long, default_value_t = 2000)]
    text_bytes: usize,
    /// The outgoing server's `connections`: replies in flight at once (1..=32). The engine's default is 3,
    /// Exchange Online's per-mailbox limit; the sandbox has no such limit, so the benchmark measures the engine's
    /// ceiling with 8.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Tasks storing replies at once (agents replying in parallel).
    #[arg(long, default_value_t = 8)]
    submitters: usize,
    /// The store: a fresh PostgreSQL database (`MQ_BENCH_PG_URL`) or a SQLite file.
    #[arg(long, value_enum, default_value_t = DbKind::Postgres)]
    db: DbKind,
    /// The whole run stops after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// The target: replies per second, stored and sent.
const TARGET_PER_SEC: f64 = 500.0;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    setup::init_logs();
    setup::exit_code("replies", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.replies == 0 {
        bail!("--replies must be at least 1");
    }
    setup::in_sandbox(
        args.db,
        Duration::from_secs(args.timeout_secs),
        async |sb, db, app| measure(&args, sb, db, app).await,
        |table| println!("{}", table.render()),
    )
    .await
}

/// `outgoing_server:` for the sandbox's SMTP server (STARTTLS), authenticating as `username` with the service app.
fn outgoing_yaml(sb: &Sandbox, username: &str, connections: u32) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    format!(
        "outgoing_server:\n  host: {host}\n  port: {port}\n  starttls: true\n  login_address: {login}\n  \
         auth: oauth_service\n  client_id: {id}\n  client_secret: {secret}\n  username: {user}\n  ca_file: {ca}\n  \
         connections: {connections}\n",
        host = q(&sb.mail_host().to_string()),
        port = sb.smtp_port(),
        login = q(&sb.login_address(sb.tenant_id())),
        id = q(&sb.service_app().client_id),
        secret = q(&sb.service_app().client_secret),
        user = q(username),
        ca = q(&sb.ca_file().display().to_string()),
    )
}

async fn measure(
    args: &Args,
    sb: &Sandbox,
    db: &BenchDb,
    app: &mut Option<RunningApp>,
) -> anyhow::Result<Table> {
    let load_before = rss::load_average();
    let address = sb.new_mailbox("replies");
    let mut yaml = setup::engine_yaml(
        sb,
        &db.url,
        std::slice::from_ref(&address),
        &EngineSettings::default(),
    );
    // The queue address sends the replies itself (From: the address the customer wrote to).
    let plain = "server: svc }\n";
    if !yaml.contains(plain) {
        bail!("unexpected benchmark configuration:\n{yaml}");
    }
    yaml = yaml.replace(plain, "server: svc, sender: true }\n");
    // The engine starts without an outgoing server, so the first replies wait as a backlog.
    let running = startup::spawn(setup::parse_config(&yaml)?)
        .await
        .context("starting the engine")?;
    let engine = running.engine.clone();
    *app = Some(running);

    // Two contacts per reply pair, opened by a customer mail each (not timed).
    let opened = Instant::now();
    let contacts = open_contacts(&engine, &address, 2 * args.replies).await?;
    let (backlog_contacts, live_contacts) = contacts.split_at(args.replies);
    println!(
        "replies benchmark: {} contacts opened in {:.1} s; {} replies of ~{} bytes per phase, {} submitters, {} \
         database, {} SMTP connections",
        contacts.len(),
        opened.elapsed().as_secs_f64(),
        args.replies,
        args.text_bytes,
        args.submitters,
        args.db.as_str(),
        args.connections
    );
    let line = "Thank you for your message. We have looked into your order and it ships today.\n";
    let text: String = line.repeat(args.text_bytes / line.len() + 1);
    let peak_reset = rss::reset_peak();

    // Phase 1, the sender alone: a backlog stored while no outgoing server is configured, then sent after a
    // configuration reload adds one.
    store(&engine, backlog_contacts, &text, args.submitters).await?;
    yaml.push_str(&outgoing_yaml(sb, &address, args.connections));
    let reloaded = Instant::now();
    engine
        .replace_config(setup::parse_config(&yaml)?)
        .await
        .context("adding the outgoing server")?;
    let (drained, drain_failed) = wait_done(&engine, args.replies).await?;
    let drain_time = reloaded.elapsed();

    // Phase 2, end to end: replies stored by concurrent submitters while the worker sends them.
    let started = Instant::now();
    store(&engine, live_contacts, &text, args.submitters).await?;
    let stored_in = started.elapsed();
    let (sent, failed) = wait_done(&engine, 2 * args.replies).await?;
    let (sent, failed) = (sent - drained, failed - drain_failed);
    let total = started.elapsed();
    let peak = rss::peak();
    let in_sandbox = sb.sent().len();

    let drain_rate = rate(drained as f64, drain_time);
    let store_rate = rate(args.replies as f64, stored_in);
    let end_to_end = rate(sent as f64, total);
    println!(
        "backlog: {drained} sent, {drain_failed} failed in {:.2} s ({} /s); live: stored {} replies in {:.2} s \
         ({} /s), {sent} sent and {failed} failed after {:.2} s ({} /s end to end); {in_sandbox} in the SMTP \
         server's sent index",
        drain_time.as_secs_f64(),
        thousands(drain_rate),
        args.replies,
        stored_in.as_secs_f64(),
        thousands(store_rate),
        total.as_secs_f64(),
        thousands(end_to_end),
    );

    let mut table = Table::new(format!(
        "replies: 2 × {} replies sent through SMTP, {}, {} connections, {} submitters ({} cores)",
        args.replies,
        args.db.as_str(),
        args.connections,
        args.submitters,
        std::thread::available_parallelism().map_or(0, |c| c.get())
    ));
    table.row(
        "replies/s sent from a backlog (claim → accepted by SMTP)",
        thousands(drain_rate),
        format!("≥ {TARGET_PER_SEC:.0}/s"),
        Verdict::of(drain_rate >= TARGET_PER_SEC && drain_failed == 0),
    );
    table.row(
        "replies/s end to end, stored → accepted by SMTP",
        thousands(end_to_end),
        format!("≥ {TARGET_PER_SEC:.0}/s"),
        Verdict::of(end_to_end >= TARGET_PER_SEC && failed == 0),
    );
    table.row(
        "replies/s stored (submit_reply) meanwhile",
        thousands(store_rate),
        "",
        Verdict::Info,
    );
    table.row(
        "failed replies",
        (drain_failed + failed).to_string(),
        "0",
        Verdict::of(drain_failed + failed == 0),
    );
    table.row(
        "in the SMTP server's sent index",
        in_sandbox.to_string(),
        (2 * args.replies).to_string(),
        Verdict::of(in_sandbox == 2 * args.replies),
    );
    table.row(
        if peak_reset {
            "peak RSS of this process while replying"
        } else {
            "peak RSS of this process (peak not resettable)"
        },
        rss::mb(peak),
        "",
        Verdict::Info,
    );
    table.note(
        "This process runs the engine and the sandbox's SMTP server (TLS, XOAUTH2, writing each mail to disk), so \
         both share the machine's cores.",
    );
    table.note(
        "Exchange Online itself accepts at most 3 concurrent submissions and 30 messages a minute per mailbox; \
         these figures are the engine's own ceiling.",
    );
    table.note(format!(
        "Load average (1/5/15 min) at the start {load_before}, at the end {}.",
        rss::load_average()
    ));
    Ok(table)
}

/// Opens `n` contacts on `address`, one customer mail each (stored through `Engine::ingest`).
async fn open_contacts(engine: &Engine, address: &str, n: usize) -> anyhow::Result<Vec<i64>> {
    let mut generator = MailGen::new(11, 3 * 1024).without_replies();
    let mut contacts = Vec::with_capacity(n);
    for _ in 0..n {
        let mail = generator.next_mail(address);
        let outcome = engine
            .ingest(Incoming {
                raw: &mail.raw,
                address,
                source_key: None,
            })
            .await
            .context("storing a customer mail")?;
        match outcome {
            Outcome::Created { contact_id, .. } => contacts.push(contact_id),
            other => bail!("a customer mail did not open a contact: {other:?}"),
        }
    }
    Ok(contacts)
}

/// Stores one reply with `text` on each contact, from `submitters` concurrent tasks (agents reply in parallel).
async fn store(
    engine: &Engine,
    contacts: &[i64],
    text: &str,
    submitters: usize,
) -> anyhow::Result<()> {
    let chunk = contacts.len().div_ceil(submitters.max(1)).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for part in contacts.chunks(chunk) {
        let (engine, part, text) = (engine.clone(), part.to_vec(), text.to_owned());
        tasks.spawn(async move {
            for contact in part {
                let req = ReplyRequest {
                    text: text.clone(),
                    html: None,
                    to: None,
                    cc: Vec::new(),
                    subject: None,
                    from: None,
                    attachments: Vec::new(),
                };
                engine
                    .submit_reply(contact, Actor::Supervisor("bench"), req)
                    .await
                    .with_context(|| format!("submit_reply on contact {contact}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a submitter panicked")??;
    }
    Ok(())
}

/// Waits until `n` replies in all are sent or failed; returns (sent, failed).
async fn wait_done(engine: &Engine, n: usize) -> anyhow::Result<(i64, i64)> {
    loop {
        let sent = db::count(
            &engine.db,
            "SELECT COUNT(*) FROM outbox WHERE state = 'sent'",
        )
        .await?;
        let failed = db::count(
            &engine.db,
            "SELECT COUNT(*) FROM outbox WHERE state = 'failed'",
        )
        .await?;
        if (sent + failed) as usize >= n {
            return Ok((sent, failed));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
