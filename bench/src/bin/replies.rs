//! Replies through the outbox: `cargo run --release -p mailqueue-bench --bin replies -- [--replies 2000]
//! [--text-bytes 2000] [--connections 3] [--db postgres|sqlite]`.
//!
//! Starts a private sandbox and the engine (`startup::spawn`, with the sandbox's SMTP server as outgoing server:
//! STARTTLS, XOAUTH2 with the service app), opens one contact per reply (customer mails stored through
//! `Engine::ingest`, not timed), then stores N replies with `Engine::submit_reply` while the outbox worker sends
//! them. Prints the store rate, the end-to-end rate (first reply stored → last reply accepted by the SMTP server)
//! and the peak RSS beside the target. Bounded by `--timeout-secs`; the engine, the sandbox and the database are
//! removed at the end.

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
    /// The outgoing server's `connections`: replies in flight at once (1..=32; Exchange Online allows 3 per
    /// mailbox, the sandbox has no such limit).
    #[arg(long, default_value_t = 3)]
    connections: u32,
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
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replies benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    yaml.push_str(&outgoing_yaml(sb, &address, args.connections));
    let config = setup::parse_config(&yaml)?;
    let running = startup::spawn(config)
        .await
        .context("starting the engine")?;
    let engine = running.engine.clone();
    *app = Some(running);

    // One contact per reply, opened by a customer mail each (not timed).
    let opened = Instant::now();
    let mut generator = MailGen::new(11, 3 * 1024).without_replies();
    let mut contacts = Vec::with_capacity(args.replies);
    for _ in 0..args.replies {
        let mail = generator.next_mail(&address);
        let outcome = engine
            .ingest(Incoming {
                raw: &mail.raw,
                address: &address,
                source_key: None,
            })
            .await
            .context("storing a customer mail")?;
        match outcome {
            Outcome::Created { contact_id, .. } => contacts.push(contact_id),
            other => bail!("a customer mail did not open a contact: {other:?}"),
        }
    }
    println!(
        "replies benchmark: {} contacts opened in {:.1} s; storing {} replies of ~{} bytes, {} database, {} SMTP \
         connections",
        contacts.len(),
        opened.elapsed().as_secs_f64(),
        args.replies,
        args.text_bytes,
        args.db.as_str(),
        args.connections
    );

    let line = "Thank you for your message. We have looked into your order and it ships today.\n";
    let text: String = line.repeat(args.text_bytes / line.len() + 1);
    let peak_reset = rss::reset_peak();
    let started = Instant::now();
    for &contact in &contacts {
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
    let stored_in = started.elapsed();

    // The worker sends while replies are stored; wait until every reply is sent (or failed).
    let (sent, failed) = loop {
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
        if (sent + failed) as usize >= args.replies {
            break (sent, failed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let total = started.elapsed();
    let peak = rss::peak();
    let in_sandbox = sb.sent().len();

    let store_rate = rate(args.replies as f64, stored_in);
    let end_to_end = rate(sent as f64, total);
    println!(
        "stored {} replies in {:.2} s ({} /s); {sent} sent and {failed} failed after {:.2} s ({} /s end to end); \
         {in_sandbox} in the SMTP server's sent index",
        args.replies,
        stored_in.as_secs_f64(),
        thousands(store_rate),
        total.as_secs_f64(),
        thousands(end_to_end),
    );

    let mut table = Table::new(format!(
        "replies: {} replies stored and sent through SMTP, {}, {} connections ({} cores)",
        args.replies,
        args.db.as_str(),
        args.connections,
        std::thread::available_parallelism().map_or(0, |c| c.get())
    ));
    table.row(
        "replies/s, stored → accepted by SMTP",
        thousands(end_to_end),
        format!("≥ {TARGET_PER_SEC:.0}/s"),
        Verdict::of(end_to_end >= TARGET_PER_SEC && failed == 0),
    );
    table.row(
        "replies/s stored (submit_reply)",
        thousands(store_rate),
        "",
        Verdict::Info,
    );
    table.row(
        "failed replies",
        failed.to_string(),
        "0",
        Verdict::of(failed == 0),
    );
    table.row(
        "in the SMTP server's sent index",
        in_sandbox.to_string(),
        args.replies.to_string(),
        Verdict::of(in_sandbox == args.replies),
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
    table.note(format!(
        "Load average (1/5/15 min) at the start {load_before}, at the end {}.",
        rss::load_average()
    ));
    Ok(table)
}
