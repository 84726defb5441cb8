//! New mail → claimable: `cargo run --release -p mailqueue-bench --bin latency -- [--mails 50] [--gap-ms 200]
//! [--db postgres|sqlite]`.
//!
//! Starts a private sandbox and the engine (`startup::spawn`) with one queue address, waits until its worker IDLEs,
//! then delivers one mail at a time (Maildir, as a mail server does) and measures the time from the delivery until
//! an agent's `POST /v1/contacts/claim` returns that contact (polled every `--poll-ms`). Prints p50, p95 and max
//! beside the target. Bounded by `--timeout-secs`; the engine, the sandbox and the database are removed at the end.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mailqueue_bench::{
    db::{BenchDb, DbKind},
    mail::MailGen,
    report::{Table, Verdict, percentile},
    rss,
    setup::{self, AGENT_TOKEN, EngineSettings},
};
use mailqueue_engine::{
    mailboxes::MailboxState,
    startup::{self, RunningApp},
};
use mailqueue_sandbox::Sandbox;

/// Delivery → claimable latency with IDLE.
#[derive(Debug, Clone, Parser)]
#[command(name = "latency")]
struct Args {
    /// Mails measured (one warm-up mail before them is not counted).
    #[arg(long, default_value_t = 50)]
    mails: usize,
    /// Pause between one mail being claimed and the next delivery.
    #[arg(long, default_value_t = 200)]
    gap_ms: u64,
    /// How often the agent tries to claim.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Size of each mail in KB (about).
    #[arg(long, default_value_t = 6)]
    size_kb: usize,
    /// The store: a fresh PostgreSQL database (`MQ_BENCH_PG_URL`) or a SQLite file.
    #[arg(long, value_enum, default_value_t = DbKind::Postgres)]
    db: DbKind,
    /// A mail not claimable after this long counts as lost (and with this latency).
    #[arg(long, default_value_t = 10)]
    give_up_secs: u64,
    /// The whole run stops after this long.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    setup::init_logs();
    setup::exit_code("latency", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.mails == 0 {
        bail!("--mails must be at least 1");
    }
    setup::in_sandbox(
        args.db,
        Duration::from_secs(args.timeout_secs),
        async |sb, db, app| measure(&args, sb, db, app).await,
        |table| println!("{}", table.render()),
    )
    .await
}

async fn measure(
    args: &Args,
    sb: &Sandbox,
    db: &BenchDb,
    app: &mut Option<RunningApp>,
) -> anyhow::Result<Table> {
    let load_before = rss::load_average();
    let address = sb.new_mailbox("latency");
    let config = setup::parse_config(&setup::engine_yaml(
        sb,
        &db.url,
        std::slice::from_ref(&address),
        &EngineSettings::default(),
    ))?;
    let running = startup::spawn(config)
        .await
        .context("starting the engine")?;
    let engine = running.engine.clone();
    let claim_url = format!("http://{}/v1/contacts/claim", running.addr);
    *app = Some(running);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = engine.mailboxes().get(&address);
        match status {
            Some(s) if s.state == MailboxState::Idle => break,
            Some(s) if Instant::now() > deadline => {
                bail!("the worker did not reach IDLE: {:?} {:?}", s.state, s.error)
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    println!(
        "latency benchmark: {} mails of ~{} KB, {} database, engine IDLEs on {address}",
        args.mails,
        args.size_kb,
        args.db.as_str()
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut generator = MailGen::new(7, args.size_kb * 1024).without_replies();
    let give_up = Duration::from_secs(args.give_up_secs);
    let mut latencies = Vec::with_capacity(args.mails);
    let mut lost = 0;
    let mut claims = 0u64;
    let mut warm_up = None;
    for i in 0..=args.mails {
        let mail = generator.next_mail(&address);
        let started = Instant::now();
        sb.deliver(&address, &mail.raw)
            .with_context(|| format!("delivering to {address}"))?;
        let latency = loop {
            claims += 1;
            let response = client
                .post(&claim_url)
                .bearer_auth(AGENT_TOKEN)
                .send()
                .await
                .context("POST /v1/contacts/claim")?;
            let elapsed = started.elapsed();
            match response.status().as_u16() {
                200 => {
                    let contact: serde_json::Value = response.json().await?;
                    if contact["subject"].as_str() == Some(mail.subject.as_str()) {
                        break Some(elapsed);
                    }
                    // Some other contact (not expected): keep waiting for ours.
                }
                204 => {}
                status => bail!(
                    "POST /v1/contacts/claim answered {status}: {}",
                    response.text().await.unwrap_or_default()
                ),
            }
            if elapsed > give_up {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
        };
        match (i, latency) {
            (0, l) => warm_up = l,
            (_, Some(l)) => latencies.push(l.as_secs_f64()),
            (_, None) => {
                lost += 1;
                latencies.push(give_up.as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    let rss_now = rss::current();
    latencies.sort_by(f64::total_cmp);
    let ms = |s: f64| format!("{:.0} ms", s * 1e3);
    let (p50, p95, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 95.0),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    let min = latencies.first().copied().unwrap_or(f64::NAN);
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    println!(
        "delivery → claimable over {} mails: min {}, p50 {}, mean {}, p95 {}, max {} ({claims} claim calls, \
         warm-up mail {})",
        latencies.len(),
        ms(min),
        ms(p50),
        ms(mean),
        ms(p95),
        ms(max),
        warm_up.map_or("lost".into(), |w| ms(w.as_secs_f64()))
    );
    let mut table = Table::new(format!(
        "latency: new mail → claimable with IDLE, {} mails, {} ({} cores)",
        latencies.len(),
        args.db.as_str(),
        std::thread::available_parallelism().map_or(0, |c| c.get())
    ));
    table.row(
        "p95 delivery → claimable",
        ms(p95),
        "≤ 1.5 s",
        Verdict::of(p95 <= 1.5 && lost == 0),
    );
    table.row("p50", ms(p50), "", Verdict::Info);
    table.row("max", ms(max), "", Verdict::Info);
    table.row(
        "not claimable within the give-up time",
        lost.to_string(),
        "0",
        Verdict::of(lost == 0),
    );
    table.row(
        "RSS of this process, 1 mailbox",
        rss::mb(rss_now),
        "",
        Verdict::Info,
    );
    table.note(
        "The sandbox's Dovecot tells an IDLE session about new mail 500 ms after it sees it (NOTIFY_DELAY_MSECS in \
         its mailbox-watch.c), so about 500 ms of every figure is the server's; the engine's share is the rest.",
    );
    table.note(format!(
        "Load average (1/5/15 min) at the start {load_before}, at the end {}.",
        rss::load_average()
    ));
    table.note(format!(
        "Each mail is delivered into the Maildir (Dovecot notifies the IDLE session), and an agent polls \
         POST /v1/contacts/claim every {} ms, so figures are up to {} ms high; {} ms pause between mails.",
        args.poll_ms, args.poll_ms, args.gap_ms
    ));
    Ok(table)
}
