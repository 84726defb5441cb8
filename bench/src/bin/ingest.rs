//! Ingest throughput and memory: `cargo run --release -p mailqueue-bench --bin ingest -- [--messages 20000]
//! [--size-kb 6] [--db postgres|sqlite] [--mailboxes 1] [--large-mb 40]`.
//!
//! 1. Starts a private sandbox and delivers N generated mails (Maildir fast path), spread over the mailboxes.
//! 2. Lets Dovecot index them (a first SELECT per mailbox, timed apart).
//! 3. The ceiling: one raw IMAP connection (TLS + XOAUTH2) on the first mailbox fetching everything with
//!    `UID FETCH … BODY.PEEK[]` in batches of 500, then one FETCH per message for a sample.
//! 4. End to end: the engine (`startup::spawn`) with one queue fed by the mailboxes, on a fresh database, until
//!    every mail is accounted for (stored or quarantined), with the process's peak RSS (`VmHWM`, reset before the
//!    engine starts; Dovecot is a separate process and is shown apart).
//! 5. A breakdown without IMAP: parse alone, and `Engine::ingest_batch` into another fresh database.
//! 6. With `--large-mb` (default 40): a child run of this binary starts an engine on `--mailboxes` empty mailboxes
//!    plus one, reports its RSS at rest once every worker IDLEs, then delivers one mail of that size and reports the
//!    peak RSS while it is stored.
//!
//! By default the engine finds a stored cursor (UIDVALIDITY, last UID 0) and takes its steady-state path (the one
//! a burst of new mail takes); `--first-fetch` leaves the cursor out, so the engine takes its first-fetch
//! (resynchronisation) path, which also looks every Message-ID up. Bounded by `--timeout-secs`; the engine, the
//! sandbox and the database are removed at the end whatever happened.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mailqueue_bench::{
    db::{BenchDb, Counts, DbKind},
    mail::{MailGen, write_large_mail},
    report::{Table, Verdict, rate, thousands},
    rss,
    setup::{self, EngineSettings},
};
use mailqueue_engine::{
    Engine,
    ingest::{Cursor, Incoming},
    mailboxes::MailboxState,
    startup::{self, RunningApp},
};
use mailqueue_sandbox::{Sandbox, maildir};

/// Ingest throughput (raw IMAP ceiling and end to end) and memory.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest")]
struct Args {
    /// Mails to deliver and ingest.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Size of each mail in KB (about).
    #[arg(long, default_value_t = 6)]
    size_kb: usize,
    /// The store: a fresh PostgreSQL database (`MQ_BENCH_PG_URL`) or a SQLite file.
    #[arg(long, value_enum, default_value_t = DbKind::Postgres)]
    db: DbKind,
    /// Mailboxes (queue addresses) the mail is spread over; the ceiling uses the first one.
    #[arg(long, default_value_t = 1)]
    mailboxes: usize,
    /// Also ingest one mail of this many MB on an idle engine (a child run) and report its peak RSS; 0 skips.
    #[arg(long, default_value_t = 40)]
    large_mb: u32,
    /// Messages fetched one FETCH each for the per-message figure.
    #[arg(long, default_value_t = 5_000)]
    single_fetch: usize,
    /// Mails for the breakdown without IMAP (parse alone; `Engine::ingest_batch` into another fresh database);
    /// 0 skips it.
    #[arg(long, default_value_t = 5_000)]
    breakdown: usize,
    /// Let the engine find the mail on its first fetch of the folder (no stored cursor).
    #[arg(long)]
    first_fetch: bool,
    /// Seed of the generated mail.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The whole run stops after this long.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Internal: only the large-mail measurement (what the child run does).
    #[arg(long, hide = true)]
    large_only: bool,
}

/// The line a `--large-only` child prints for its parent.
const LARGE_RESULT: &str = "LARGE_RESULT";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    setup::init_logs();
    setup::exit_code("ingest", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.large_only {
        if args.large_mb == 0 || args.large_mb > 40 {
            bail!("--large-mb must be 1..=40 (the engine's largest `max_email_size_mb`)");
        }
    } else if args.messages == 0 || args.mailboxes == 0 || args.size_kb == 0 {
        bail!("--messages, --mailboxes and --size-kb must be at least 1");
    }
    setup::in_sandbox(
        args.db,
        Duration::from_secs(args.timeout_secs),
        async |sb, db, app| {
            if args.large_only {
                large_only(&args, sb, db, app).await
            } else {
                bulk(&args, sb, db, app).await
            }
        },
        |table| {
            if let Some(table) = table {
                println!("{}", table.render());
            }
        },
    )
    .await
}

/// The main run: delivery, the IMAP ceiling, end-to-end ingest, and the large-mail child.
async fn bulk(
    args: &Args,
    sb: &Sandbox,
    db: &BenchDb,
    app: &mut Option<RunningApp>,
) -> anyhow::Result<Option<Table>> {
    let n = args.messages;
    let load_before = rss::load_average();
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!(
        "ingest benchmark: {n} mails of ~{} KB into {} mailbox(es), {} database, {cores} core(s), {} path",
        args.size_kb,
        args.mailboxes,
        args.db.as_str(),
        if args.first_fetch {
            "first-fetch"
        } else {
            "steady-state"
        }
    );

    // 1. Mailboxes and mail.
    let addresses: Vec<String> = (0..args.mailboxes)
        .map(|_| sb.new_mailbox("bench"))
        .collect();
    let started = Instant::now();
    let mut generator = MailGen::new(args.seed, args.size_kb * 1024);
    let mut total_bytes = 0u64;
    let mut per_mailbox = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let count = n / args.mailboxes + usize::from(i < n % args.mailboxes);
        per_mailbox.push(count);
        let mut left = count;
        while left > 0 {
            let chunk: Vec<Vec<u8>> = (0..left.min(1000))
                .map(|_| generator.next_mail(address).raw)
                .collect();
            left -= chunk.len();
            total_bytes += chunk.iter().map(|m| m.len() as u64).sum::<u64>();
            maildir::deliver_many(sb.mail_root(), address, &chunk, sb.mail_owner())
                .with_context(|| format!("delivering to {address}"))?;
        }
    }
    let average = total_bytes as f64 / n as f64;
    println!(
        "delivered {n} mails ({:.1} MB, {:.0} bytes on average) in {:.2} s",
        total_bytes as f64 / 1e6,
        average,
        started.elapsed().as_secs_f64()
    );

    // 2. Dovecot indexes the new mail on the first SELECT.
    let started = Instant::now();
    let mut uidvalidities = Vec::new();
    for address in &addresses {
        let mut s = setup::imap_session(sb, address).await?;
        let folder = s.select("INBOX").await?;
        uidvalidities.push(folder.uid_validity);
        let _ = s.logout().await;
    }
    let indexing = started.elapsed();
    println!(
        "Dovecot indexed the mail (first SELECT of {} mailbox(es)) in {:.2} s",
        addresses.len(),
        indexing.as_secs_f64()
    );

    // 3. The ceiling: one connection, batched FETCH.
    let first = &addresses[0];
    let first_count = per_mailbox[0];
    let started = Instant::now();
    let mut s = setup::imap_session(sb, first).await?;
    let login = started.elapsed();
    s.select("INBOX").await?;
    let uids: Vec<u32> = s.fetch_sizes(0).await?.into_iter().map(|u| u.0).collect();
    let (mut fetched, mut bytes) = (0usize, 0u64);
    for chunk in uids.chunks(500) {
        for mail in s.fetch_bodies(chunk).await? {
            fetched += 1;
            bytes += mail.raw.len() as u64;
        }
    }
    let batched = started.elapsed();
    if fetched != first_count {
        bail!("the ceiling run fetched {fetched} mails of {first_count}");
    }
    let batched_rate = rate(fetched as f64, batched);
    let batched_mbs = bytes as f64 / 1e6 / batched.as_secs_f64().max(1e-9);
    println!(
        "IMAP ceiling, batched: {fetched} mails, {:.1} MB in {:.2} s (login {:.0} ms): {} msg/s, {:.1} MB/s",
        bytes as f64 / 1e6,
        batched.as_secs_f64(),
        login.as_secs_f64() * 1e3,
        thousands(batched_rate),
        batched_mbs
    );
    // One FETCH per message, on the same connection.
    let sample: Vec<u32> = uids.iter().copied().take(args.single_fetch).collect();
    let started = Instant::now();
    for &uid in &sample {
        let got = s.fetch_bodies(&[uid]).await?;
        if got.len() != 1 {
            bail!("UID {uid} was not fetched");
        }
    }
    let single = started.elapsed();
    let single_rate = rate(sample.len() as f64, single);
    println!(
        "IMAP, one FETCH per message: {} mails in {:.2} s: {} msg/s",
        sample.len(),
        single.as_secs_f64(),
        thousands(single_rate)
    );
    let _ = s.logout().await;
    drop(uids);

    // 4. End to end.
    let settings = EngineSettings::default();
    let config = setup::parse_config(&setup::engine_yaml(sb, &db.url, &addresses, &settings))?;
    {
        // Migrate first (not part of the measured time) and, for the steady-state path, store the cursors.
        let engine = Engine::start(config.clone())
            .await
            .context("migrating the database")?;
        if !args.first_fetch {
            for (address, uv) in addresses.iter().zip(&uidvalidities) {
                let cursor = Cursor {
                    mailbox: address.clone(),
                    folder: "INBOX".into(),
                    uidvalidity: i64::from(*uv),
                    last_uid: 0,
                };
                engine.ingest_batch(Vec::new(), Some(cursor)).await?;
            }
        }
        let _ = engine.db.close().await;
    }
    let rss_before = rss::current();
    let reset = rss::reset_peak();
    let started = Instant::now();
    let running = startup::spawn(config)
        .await
        .context("starting the engine")?;
    let engine = running.engine.clone();
    *app = Some(running);
    let spawned = started.elapsed();
    let mut first_stored: Option<Duration> = None;
    let mut last_report = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    // The allocator's figures at their highest (sampled with the status board): in use, and in use + kept free.
    let mut allocator_peak = (0u64, 0u64);
    let (done, failures) = loop {
        if let Some(a) = mailqueue_engine::memory::allocator_figures() {
            allocator_peak.0 = allocator_peak.0.max(a.in_use);
            allocator_peak.1 = allocator_peak.1.max(a.in_use + a.free_kept);
        }
        let board = engine.mailboxes().snapshot();
        let done: u64 = board.iter().map(|m| m.fetched + m.quarantined).sum();
        let failures: u64 = board.iter().map(|m| m.failures).sum();
        if done > 0 && first_stored.is_none() {
            first_stored = Some(started.elapsed());
        }
        if done >= n as u64 {
            break (done, failures);
        }
        if Instant::now() > deadline {
            let errors: Vec<String> = board
                .iter()
                .filter_map(|m| {
                    m.error
                        .as_ref()
                        .map(|e| format!("{}: {}", m.address, e.message))
                })
                .collect();
            bail!("only {done} of {n} mails were ingested in time; errors: {errors:?}");
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            println!(
                "  … {done} of {n} after {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let total = started.elapsed();
    let peak = rss::peak();
    let rss_after = rss::current();
    let dovecot_rss = rss::tree_rss(sb.dovecot().pid());
    let e2e_rate = rate(n as f64, total);
    let after_first = first_stored.map(|f| total.saturating_sub(f));
    println!(
        "end to end: {n} mails in {:.2} s (engine start {:.0} ms, first batch stored after {:.2} s): {} msg/s",
        total.as_secs_f64(),
        spawned.as_secs_f64() * 1e3,
        first_stored.unwrap_or_default().as_secs_f64(),
        thousands(e2e_rate)
    );
    let counts = Counts::read(&engine.db).await?;
    println!(
        "stored: {} contacts, {} inbound messages, {} quarantined (status board: {done}, failures {failures})",
        counts.contacts, counts.messages, counts.quarantined
    );
    println!(
        "RSS of this process: {} before the engine, peak {} (reset {}), {} after; Dovecot: {}",
        rss::mb(rss_before),
        rss::mb(peak),
        if reset { "ok" } else { "not possible" },
        rss::mb(rss_after),
        rss::mb(dovecot_rss)
    );
    if let Some(a) = mailqueue_engine::memory::allocator_figures() {
        println!(
            "allocator after the run: {} in use, {} freed but kept by malloc; at most {} in use and {} held \
             during the run (sampled every 10 ms)",
            rss::mb(a.in_use),
            rss::mb(a.free_kept),
            rss::mb(allocator_peak.0),
            rss::mb(allocator_peak.1)
        );
    }
    // Every mail must be stopped before it idles again, so that nothing is left running into the next phase.
    let idle = engine
        .mailboxes()
        .snapshot()
        .iter()
        .all(|m| m.state == MailboxState::Idle);
    drop(engine);
    if let Some(running) = app.take() {
        running.stop().await;
    }

    // 5. Where the time goes, without IMAP.
    let parts = if args.breakdown > 0 {
        Some(breakdown(args, sb, first).await?)
    } else {
        None
    };

    // 6. One large mail on an idle engine, in a child run.
    let large = if args.large_mb > 0 {
        Some(large_child(args).await)
    } else {
        None
    };

    // The table.
    let mut table = Table::new(format!(
        "ingest: {n} mails of ~{:.1} KB, {} mailbox(es), {} ({cores} cores)",
        average / 1024.0,
        args.mailboxes,
        args.db.as_str()
    ));
    table.row(
        "IMAP ceiling, 1 connection, FETCH 500/command",
        format!("{} msg/s, {batched_mbs:.1} MB/s", thousands(batched_rate)),
        "~20,000 msg/s (reference)",
        Verdict::Info,
    );
    table.row(
        "IMAP, one FETCH per message",
        format!("{} msg/s", thousands(single_rate)),
        "~5,000 msg/s (reference)",
        Verdict::Info,
    );
    table.row(
        format!("End-to-end ingest into {}", args.db.as_str()),
        format!(
            "{} msg/s ({:.2} s)",
            thousands(e2e_rate),
            total.as_secs_f64()
        ),
        "≥ 5,000 msg/s",
        Verdict::of(e2e_rate >= 5000.0),
    );
    if let Some(after_first) = after_first {
        table.row(
            "  … from the first stored batch on",
            format!(
                "{} msg/s",
                thousands(rate(n as f64, after_first.max(Duration::from_millis(1))))
            ),
            "",
            Verdict::Info,
        );
    }
    table.row(
        "  … share of the IMAP ceiling",
        format!("{:.0} %", 100.0 * e2e_rate / batched_rate.max(1e-9)),
        "",
        Verdict::Info,
    );
    if let Some(parts) = &parts {
        table.row(
            format!("  … parse alone, 1 thread ({} mails)", parts.mails),
            format!("{} msg/s", thousands(parts.parse_rate)),
            "",
            Verdict::Info,
        );
        table.row(
            format!(
                "  … Engine::ingest_batch of 250, no IMAP ({} mails)",
                parts.mails
            ),
            format!("{} msg/s", thousands(parts.store_rate)),
            "",
            Verdict::Info,
        );
    }
    table.row(
        "Stored + quarantined",
        format!(
            "{} + {} (contacts {})",
            counts.messages, counts.quarantined, counts.contacts
        ),
        format!("= {n}"),
        Verdict::of(counts.messages + counts.quarantined == n as i64),
    );
    let hundred = args.mailboxes >= 100;
    table.row(
        format!("Peak RSS, {} mailbox(es)", args.mailboxes),
        rss::mb(peak),
        "≤ 60 MB with 100 mailboxes",
        if hundred {
            Verdict::of(peak <= 60 * 1024 * 1024)
        } else {
            Verdict::Info
        },
    );
    table.row(
        "Dovecot RSS (separate processes)",
        rss::mb(dovecot_rss),
        "",
        Verdict::Info,
    );
    match large {
        Some(Ok(l)) => {
            table.row(
                format!("RSS at rest, {} mailboxes in IDLE", l.idle_mailboxes),
                rss::mb(l.idle),
                "≤ 60 MB with 100 mailboxes",
                if l.idle_mailboxes >= 100 {
                    Verdict::of(l.idle <= 60 * 1024 * 1024)
                } else {
                    Verdict::Info
                },
            );
            let ratio = l.peak as f64 / l.size as f64;
            table.row(
                format!("Peak RSS, one {:.1} MB mail", l.size as f64 / 1048576.0),
                format!(
                    "{} = {ratio:.2}× (growth {} = {:.2}×; {}, {:.2} s)",
                    rss::mb(l.peak),
                    rss::mb(l.peak.saturating_sub(l.before)),
                    l.peak.saturating_sub(l.before) as f64 / l.size as f64,
                    l.outcome,
                    l.secs
                ),
                "≤ 3× its size",
                Verdict::of(l.peak as f64 <= 3.0 * l.size as f64),
            );
        }
        Some(Err(e)) => table.row(
            format!("Peak RSS, one {} MB mail", args.large_mb),
            format!("failed: {e:#}"),
            "≤ 3× its size",
            Verdict::Missed,
        ),
        None => {}
    }
    table.note(format!(
        "Load average (1/5/15 min) at the start {load_before}, at the end {}: other work on the {cores} cores \
         lowers every figure.",
        rss::load_average()
    ));
    table.note(format!(
        "Dovecot indexed the {n} new mails in {:.2} s before either measurement (first SELECT); not counted.",
        indexing.as_secs_f64()
    ));
    table.note(format!(
        "End to end runs from startup::spawn (migrations done before) until the status board counts {n} mails; \
         it includes the engine's IMAP login and one connection per mailbox; {} path{}.",
        if args.first_fetch {
            "first-fetch (resynchronisation)"
        } else {
            "steady-state (stored cursor)"
        },
        if idle { "" } else { "; not every worker was back in IDLE at the end" }
    ));
    table.note(
        "Peak RSS is this process's VmHWM, reset when the engine starts; it includes the sandbox's token \
         emulator (small) but not Dovecot.",
    );
    if !hundred {
        table.note("The 60 MB goal is for 100 mailboxes: run with --mailboxes 100 to measure it.");
    }
    Ok(Some(table))
}

/// Where the time of end-to-end ingest goes, measured without IMAP.
struct Breakdown {
    mails: usize,
    parse_rate: f64,
    store_rate: f64,
}

/// The same mail (same seed) parsed alone on one thread, then stored with `Engine::ingest_batch` in batches of
/// 250 with a cursor, as a mailbox worker stores it, into another fresh database.
async fn breakdown(args: &Args, sb: &Sandbox, address: &str) -> anyhow::Result<Breakdown> {
    let count = args.breakdown.min(args.messages);
    let mut generator = MailGen::new(args.seed, args.size_kb * 1024);
    let mails: Vec<Vec<u8>> = (0..count)
        .map(|_| generator.next_mail(address).raw)
        .collect();
    let started = Instant::now();
    let mut failed = 0;
    for raw in &mails {
        failed += usize::from(mailqueue_engine::ingest::parse_mail(raw).is_err());
    }
    let parse_rate = rate(count as f64, started.elapsed());
    if failed > 0 {
        println!("breakdown: {failed} of {count} mails did not parse");
    }

    let db = BenchDb::create(args.db).await?;
    let result = async {
        let yaml = setup::engine_yaml(
            sb,
            &db.url,
            &[address.to_owned()],
            &EngineSettings::default(),
        );
        let engine = Engine::start(setup::parse_config(&yaml)?).await?;
        let mut stored = Duration::ZERO;
        for (i, chunk) in mails.chunks(250).enumerate() {
            let first_uid = i * 250;
            let incoming: Vec<Incoming<'_>> = chunk
                .iter()
                .enumerate()
                .map(|(j, raw)| Incoming {
                    raw,
                    address,
                    source_key: Some(format!("bench:{address}:1:{}", first_uid + j + 1)),
                })
                .collect();
            let cursor = Cursor {
                mailbox: address.to_owned(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                last_uid: (first_uid + chunk.len()) as i64,
            };
            let started = Instant::now();
            engine.ingest_batch(incoming, Some(cursor)).await?;
            stored += started.elapsed();
        }
        let _ = engine.db.close().await;
        anyhow::Ok(rate(count as f64, stored))
    }
    .await;
    db.drop_database().await?;
    let store_rate = result?;
    println!(
        "breakdown without IMAP ({count} mails): parse alone {} msg/s (1 thread), ingest_batch {} msg/s",
        thousands(parse_rate),
        thousands(store_rate)
    );
    Ok(Breakdown {
        mails: count,
        parse_rate,
        store_rate,
    })
}

/// What the large-mail child measured.
struct Large {
    size: u64,
    before: u64,
    peak: u64,
    secs: f64,
    outcome: String,
    /// RSS with `idle_mailboxes` workers in IDLE, before the large mail.
    idle: u64,
    idle_mailboxes: usize,
}

/// Runs this binary with `--large-only` and reads its result line.
async fn large_child(args: &Args) -> anyhow::Result<Large> {
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .args([
            "--large-only",
            "--large-mb",
            &args.large_mb.to_string(),
            "--db",
            args.db.as_str(),
            "--mailboxes",
            &args.mailboxes.to_string(),
            "--timeout-secs",
            "300",
        ])
        .kill_on_drop(true)
        .output()
        .await
        .context("running the large-mail child")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    if !output.status.success() {
        bail!(
            "the large-mail child failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(LARGE_RESULT))
        .context("the large-mail child printed no result")?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
            .with_context(|| format!("no {name} in the child's result"))
    };
    Ok(Large {
        size: field("size")?.parse()?,
        before: field("before")?.parse()?,
        peak: field("peak")?.parse()?,
        secs: field("secs")?.parse()?,
        outcome: field("outcome")?,
        idle: field("idle")?.parse()?,
        idle_mailboxes: field("idle_mailboxes")?.parse()?,
    })
}

/// The child run: an engine idling on an empty mailbox receives one large mail; its peak RSS while storing it.
async fn large_only(
    args: &Args,
    sb: &Sandbox,
    db: &BenchDb,
    app: &mut Option<RunningApp>,
) -> anyhow::Result<Option<Table>> {
    // Idle mailboxes beside the one that receives the large mail: the engine's RSS at rest with that many.
    let mut addresses: Vec<String> = (0..args.mailboxes)
        .map(|_| sb.new_mailbox("idle"))
        .collect();
    let address = sb.new_mailbox("large");
    addresses.push(address.clone());
    let settings = EngineSettings {
        max_email_size_mb: args.large_mb,
        ..EngineSettings::default()
    };
    let config = setup::parse_config(&setup::engine_yaml(sb, &db.url, &addresses, &settings))?;
    let before_engine = rss::current();
    let running = startup::spawn(config)
        .await
        .context("starting the engine")?;
    let engine = running.engine.clone();
    *app = Some(running);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let board = engine.mailboxes().snapshot();
        if board.len() == addresses.len() && board.iter().all(|m| m.state == MailboxState::Idle) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the engine did not reach IDLE on all {} mailboxes",
                addresses.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let start-up allocations settle before reading the resting figure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss::current();
    println!(
        "engine at rest with {} mailboxes in IDLE: RSS {} ({} before the engine started)",
        addresses.len(),
        rss::mb(idle),
        rss::mb(before_engine)
    );
    // Just under the limit: the mail is downloaded and stored, not quarantined from its headers.
    let target = (args.large_mb as usize) * 1024 * 1024 - 64 * 1024;
    let before = rss::current();
    rss::reset_peak();
    let started = Instant::now();
    let size = setup::deliver_streamed(sb, &address, |out| {
        write_large_mail(out, &address, target, args.seed)
    })?;
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        let status = engine.mailboxes().get(&address).context("no status")?;
        if status.fetched + status.quarantined >= 1 {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "the large mail was not ingested in time: {:?}",
                status.error
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let peak = rss::peak();
    let outcome = if status.fetched == 1 {
        "stored"
    } else {
        "quarantined"
    };
    println!(
        "large mail: {:.1} MB {outcome} in {secs:.2} s; RSS before {}, peak {}",
        size as f64 / 1048576.0,
        rss::mb(before),
        rss::mb(peak)
    );
    println!(
        "{LARGE_RESULT} size={size} before={before} peak={peak} secs={secs:.3} outcome={outcome} idle={idle} \
         idle_mailboxes={}",
        addresses.len()
    );
    Ok(None)
}
