//! Wiring shared by the benchmarks: logs, the engine configuration (YAML text, as an admin writes it) for queue
//! addresses in the sandbox, and raw IMAP sessions on sandbox mailboxes.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail};
use mailqueue_config::{
    Config,
    model::{ImapEndpoint, ImapTls as TlsMode},
};
use mailqueue_connectors::imap::{self, ImapTls, MailboxSession};
use mailqueue_engine::startup::RunningApp;
use mailqueue_sandbox::{Sandbox, SandboxOptions, idp::MintRequest, sandbox::IMAP_AUDIENCE};

use crate::db::{BenchDb, DbKind};

/// The queue every benchmark address feeds.
pub const QUEUE: &str = "bench";
/// The secret of the agent token (serves [`QUEUE`]).
pub const AGENT_TOKEN: &str = "bench-agent-token";

/// Logs to stderr when `RUST_LOG` is set (e.g. `RUST_LOG=info`); otherwise none, so logging costs nothing.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// The exit code of a benchmark run: success, or failure with the error and its causes on stderr.
pub fn exit_code(bench: &str, outcome: anyhow::Result<()>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bench} benchmark failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one benchmark in a private sandbox on a fresh database, bounded by `limit`. Whatever happens, it then stops
/// the engine `measure` left in `app`, drops the database and stops the sandbox — in that order — and hands the
/// result to `show` before reporting a clean-up failure, so figures are never lost to one.
pub async fn in_sandbox<T>(
    db_kind: DbKind,
    limit: Duration,
    measure: impl AsyncFnOnce(&Sandbox, &BenchDb, &mut Option<RunningApp>) -> anyhow::Result<T>,
    show: impl FnOnce(T),
) -> anyhow::Result<()> {
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .context("starting the sandbox")?;
    let db = match BenchDb::create(db_kind).await {
        Ok(db) => db,
        Err(e) => {
            let _ = sb.stop().await;
            return Err(e);
        }
    };
    let mut app: Option<RunningApp> = None;
    let outcome = tokio::time::timeout(limit, measure(&sb, &db, &mut app)).await;
    if let Some(app) = app.take() {
        app.stop().await;
    }
    let dropped = db.drop_database().await;
    let stopped = sb.stop().await;
    match outcome {
        Ok(result) => show(result?),
        Err(_) => bail!("stopped after --timeout-secs {}", limit.as_secs()),
    }
    dropped.context("dropping the benchmark database")?;
    stopped.context("stopping the sandbox")?;
    Ok(())
}

/// Engine settings a benchmark varies.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub poll_interval: Duration,
    pub max_email_size_mb: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(30),
            max_email_size_mb: 25,
        }
    }
}

/// The configuration text: the API on a random loopback port with an agent and an admin token, the sandbox's
/// service app as incoming server `svc` (implicit TLS, the sandbox CA), and one queue [`QUEUE`] fed by
/// `addresses` (after_fetch `seen`, the default).
pub fn engine_yaml(
    sb: &Sandbox,
    db_url: &str,
    addresses: &[String],
    settings: &EngineSettings,
) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let mut out = format!(
        "database: {{ url: {db} }}\n\
         api:\n  listen: \"127.0.0.1:0\"\n  tokens:\n\
         \x20   - {{ name: agent, role: agent, secret: {agent}, queues: [{QUEUE}] }}\n\
         \x20   - {{ name: admin, role: admin, secret: bench-admin-token }}\n\
         defaults: {{ language: en, poll_interval: {poll}s, max_email_size_mb: {max}, claim_lease: 5m }}\n\
         incoming_servers:\n\
         \x20 - name: svc\n    login_address: {login}\n    auth: oauth_service\n    client_id: {client}\n\
         \x20   client_secret: {secret}\n    imap: {{ host: \"{host}\", port: {port}, tls: implicit }}\n\
         \x20   ca_file: {ca}\n\
         queues:\n  - name: {QUEUE}\n    priority: 5\n    language: en\n    addresses:\n",
        db = q(db_url),
        agent = q(AGENT_TOKEN),
        poll = settings.poll_interval.as_secs().max(1),
        max = settings.max_email_size_mb,
        login = q(&sb.login_address(sb.tenant_id())),
        client = q(&sb.service_app().client_id),
        secret = q(&sb.service_app().client_secret),
        host = sb.mail_host(),
        port = sb.imaps_port(),
        ca = q(&sb.ca_file().display().to_string()),
    );
    for address in addresses {
        out.push_str(&format!(
            "      - {{ address: {}, server: svc }}\n",
            q(address)
        ));
    }
    out
}

/// Parses a configuration text as `mailqueue serve` would.
pub fn parse_config(yaml: &str) -> anyhow::Result<Config> {
    mailqueue_config::load_str(Path::new("bench.yaml"), yaml)
        .map(|loaded| loaded.config)
        .map_err(|e| anyhow::anyhow!("benchmark configuration invalid:\n{e}\n---\n{yaml}"))
}

/// A logged-in IMAP session (implicit TLS + XOAUTH2 with an app token of the service app) on a sandbox mailbox.
pub async fn imap_session(sb: &Sandbox, mailbox: &str) -> anyhow::Result<MailboxSession> {
    let request = MintRequest::app(
        sb.tenant_id(),
        &sb.service_app().client_id,
        IMAP_AUDIENCE,
        &["IMAP.AccessAsApp"],
    )
    .lifetime(3600);
    let (token, _) = sb
        .idp()
        .mint(&request)
        .map_err(|e| anyhow::anyhow!("cannot mint an IMAP token: {e:?}"))?;
    let endpoint = ImapEndpoint {
        host: sb.mail_host().to_string(),
        port: sb.imaps_port(),
        tls: TlsMode::Implicit,
    };
    let tls = ImapTls::new(Some(sb.ca_file())).context("the sandbox CA")?;
    let client = imap::connect(&endpoint, &tls)
        .await
        .context("IMAP connect")?;
    imap::authenticate_xoauth2(client, mailbox, &token)
        .await
        .with_context(|| format!("IMAP login to {mailbox}"))
}

/// Delivers a mail that `write` produces straight into `mailbox`'s INBOX (`Maildir/tmp` then `new/`, owned by
/// Dovecot's run user), a buffer at a time, so that the benchmark never holds a large mail in memory. Returns its
/// size.
pub fn deliver_streamed(
    sb: &Sandbox,
    mailbox: &str,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<u64>,
) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let maildir =
        mailqueue_sandbox::maildir::Maildir::open(sb.mail_root(), mailbox, sb.mail_owner())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!(
        "{}.M{}P{}Q0.mq-bench",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id()
    );
    let tmp = maildir.path().join("tmp").join(&name);
    let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let size = write(&mut out)?;
    out.flush()?;
    drop(out);
    if let Some((uid, gid)) = sb.mail_owner() {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
    }
    let target = maildir.path().join("new").join(format!("{name},S={size}"));
    std::fs::rename(&tmp, &target)?;
    Ok(size)
}
