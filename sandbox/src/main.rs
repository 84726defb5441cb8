//! `mailqueue-sandbox`: runs the local Microsoft 365 sandbox (identity provider, Dovecot IMAP, SMTP submission).
//!
//! ```text
//! mailqueue-sandbox up [--dir DIR] [--world FILE] [--api-port N]   start, print a summary, run until Ctrl-C/SIGTERM
//! mailqueue-sandbox down --dir DIR                                 stop the sandbox running in DIR
//! mailqueue-sandbox deliver --dir DIR --to MAILBOX FILE…           put messages (or directories of them) into a mailbox
//! ```

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mailqueue_sandbox::{
    Sandbox, SandboxOptions, dovecot, maildir,
    sandbox::{CONFIG_FILE, ENV_FILE, IMAP_AUDIENCE, process_alive, read_env},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, Uid},
};

/// The pid file `up` writes in the sandbox directory.
const PID_FILE: &str = "sandbox.pid";

#[derive(Parser)]
#[command(
    name = "mailqueue-sandbox",
    version,
    about = "A local Microsoft 365 sandbox: Entra ID token endpoint emulator, Dovecot IMAP with XOAUTH2, \
             Exchange-like SMTP submission"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Starts the sandbox, writes DIR/sandbox.env and DIR/mailqueue.yaml, and runs until Ctrl-C or SIGTERM.
    Up {
        /// The sandbox directory (created if missing, kept afterwards); default: a temporary one, removed at exit.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The world (tenants, apps, users, mailboxes) as YAML; default: the built-in fixture.
        #[arg(long)]
        world: Option<PathBuf>,
        /// The port the generated mailqueue.yaml lets the engine's HTTP API listen on (127.0.0.1).
        #[arg(long, default_value_t = 8080)]
        api_port: u16,
    },
    /// Stops the sandbox running in DIR (SIGTERM, then waits for it and its Dovecot to end).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Puts messages into a mailbox's INBOX by writing Maildir files (fast: thousands per second).
    Deliver {
        #[arg(long)]
        dir: PathBuf,
        /// The mailbox, e.g. support@contoso.com.
        #[arg(long)]
        to: String,
        /// Message files (RFC 5322), or directories whose files are all delivered (sorted by name).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,mailqueue_sandbox=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Up {
            dir,
            world,
            api_port,
        } => up(dir, world, api_port),
        Command::Down { dir } => down(&dir),
        Command::Deliver { dir, to, files } => deliver(&dir, &to, &files),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn up(dir: Option<PathBuf>, world: Option<PathBuf>, api_port: u16) -> anyhow::Result<()> {
    let world = world
        .map(|path| SandboxOptions::world_from_file(&path))
        .transpose()?;
    let runtime = tokio::runtime::Runtime::new()?;
    // Everything runs inside `block_on` on this (main) thread: Dovecot's parent-death signal is tied to it.
    runtime.block_on(async move {
        let sandbox = Sandbox::start(SandboxOptions {
            dir,
            world,
            api_port: Some(api_port),
        })
        .await?;
        let pid_file = sandbox.dir().join(PID_FILE);
        std::fs::write(&pid_file, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", pid_file.display()))?;
        print!("{}", summary(&sandbox, api_port));
        let waited = wait_for_signal().await;
        eprintln!("stopping the sandbox…");
        sandbox.stop().await?;
        waited
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
    Ok(())
}

fn summary(sandbox: &Sandbox, api_port: u16) -> String {
    let dir = sandbox.dir().display();
    let host = sandbox.mail_host();
    let world = sandbox.idp().world();
    let tenant = world
        .tenant(sandbox.tenant_id())
        .map_or("", |t| t.name.as_str())
        .to_owned();
    let app = sandbox.service_app();
    let full_access = world
        .app(&app.client_id)
        .map(|a| a.full_access.join(", "))
        .unwrap_or_default();
    let users: Vec<String> = world
        .users
        .iter()
        .map(|u| format!("{} ({})", u.upn, u.password))
        .collect();
    drop(world);
    let public = sandbox
        .public_client_id()
        .map(|id| format!("  public client     {id} (ROPC with a user's password)\n"))
        .unwrap_or_default();
    format!(
        "\nmailqueue sandbox running (pid {pid}) in {dir}\n\n\
         \x20 identity provider {idp}   tenant {tenant_id} ({tenant})\n\
         \x20 token endpoint    {token}\n\
         \x20 IMAP              {host}:{imap} (STARTTLS)   {host}:{imaps} (implicit TLS)\n\
         \x20 SMTP              {host}:{smtp} (STARTTLS)   {host}:{smtps} (implicit TLS)\n\
         \x20 CA certificate    {ca}\n\
         \x20 service app       {client_id} ({name}); secret in {dir}/secrets/service-client-secret\n\
         \x20                   FullAccess on {full_access}\n\
         {public}\
         \x20 users             {users}\n\
         \x20 sent mail         {sent}/index.jsonl\n\
         \x20 Dovecot log       {log}\n\
         \x20 environment       {dir}/{ENV_FILE}\n\
         \x20 engine config     {dir}/{CONFIG_FILE} (API on 127.0.0.1:{api_port}; API tokens in {dir}/secrets/api-token-*)\n\n\
         Get a token (client credentials, IMAP):\n\
         \x20 . {dir}/{ENV_FILE}\n\
         \x20 curl -s \"$MQ_SANDBOX_TOKEN_URL\" -d grant_type=client_credentials -d client_id=\"$MQ_SANDBOX_CLIENT_ID\" \\\n\
         \x20      --data-urlencode client_secret=\"$MQ_SANDBOX_CLIENT_SECRET\" -d scope={IMAP_AUDIENCE}/.default\n\
         Run the engine against the sandbox:\n\
         \x20 mailqueue serve --config {dir}/{CONFIG_FILE}    (or: cargo run -p mailqueue-engine -- serve --config …)\n\
         Put mail into a mailbox:\n\
         \x20 mailqueue-sandbox deliver --dir {dir} --to support@contoso.com message.eml…\n\
         Stop: Ctrl-C, or `mailqueue-sandbox down --dir {dir}`\n",
        pid = std::process::id(),
        idp = sandbox.idp_url(),
        tenant_id = sandbox.tenant_id(),
        token = sandbox.token_endpoint(sandbox.tenant_id()),
        imap = sandbox.imap_port(),
        imaps = sandbox.imaps_port(),
        smtp = sandbox.smtp_port(),
        smtps = sandbox.smtps_port(),
        ca = sandbox.ca_file().display(),
        client_id = app.client_id,
        name = app.name,
        users = users.join(", "),
        sent = sandbox.sent_dir().display(),
        log = sandbox.dovecot().log_path().display(),
    )
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let env = read_env(dir).ok();
    let pid = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .or_else(|| env.as_ref()?.get("MQ_SANDBOX_PID").cloned())
        .and_then(|p| p.trim().parse::<u32>().ok());
    let Some(pid) = pid.filter(|p| process_alive(*p)) else {
        println!("no sandbox is running in {}", dir.display());
        stop_dovecot_leftovers(env.as_ref());
        return Ok(());
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("mailqueue-sandbox") {
        bail!(
            "pid {pid} from {} is not a mailqueue-sandbox process; remove the stale file",
            dir.join(PID_FILE).display()
        );
    }
    let target = Pid::from_raw(i32::try_from(pid)?);
    kill(target, Signal::SIGTERM).with_context(|| format!("cannot signal pid {pid}"))?;
    if !wait_until(Duration::from_secs(15), || !process_alive(pid)) {
        eprintln!("the sandbox (pid {pid}) did not stop within 15 s; killing it");
        let _ = kill(target, Signal::SIGKILL);
        wait_until(Duration::from_secs(5), || !process_alive(pid));
    }
    stop_dovecot_leftovers(env.as_ref());
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    println!("sandbox in {} stopped (pid {pid})", dir.display());
    Ok(())
}

/// A Dovecot master that outlived its sandbox (it gets SIGTERM when the sandbox dies; this is the safety net).
fn stop_dovecot_leftovers(env: Option<&std::collections::BTreeMap<String, String>>) {
    let Some(env) = env else { return };
    let Some(instance) = env.get("MQ_SANDBOX_DOVECOT_INSTANCE") else {
        return;
    };
    if wait_until(Duration::from_secs(5), || {
        dovecot::processes_of(instance).is_empty()
    }) {
        return;
    }
    if let Some(master) = env
        .get("MQ_SANDBOX_DOVECOT_PID")
        .and_then(|p| p.parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(master), Signal::SIGTERM);
    }
    if !wait_until(Duration::from_secs(5), || {
        dovecot::processes_of(instance).is_empty()
    }) {
        for pid in dovecot::processes_of(instance) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn deliver(dir: &Path, to: &str, files: &[PathBuf]) -> anyhow::Result<()> {
    let env = read_env(dir)?;
    let mail_root = env
        .get("MQ_SANDBOX_MAIL_ROOT")
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "{} has no MQ_SANDBOX_MAIL_ROOT",
                dir.join(ENV_FILE).display()
            )
        })?;
    // Files must belong to Dovecot's run user: the owner of the mail root (we chown only as root).
    let meta = std::fs::metadata(&mail_root)
        .with_context(|| format!("cannot read the mail root {}", mail_root.display()))?;
    let owner = (Uid::effective().is_root() && meta.uid() != 0).then_some((meta.uid(), meta.gid()));
    let mut paths = Vec::new();
    for file in files {
        if file.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            inner.sort();
            paths.extend(inner);
        } else {
            paths.push(file.clone());
        }
    }
    let maildir = maildir::Maildir::open(&mail_root, to, owner)
        .with_context(|| format!("cannot open the Maildir of {to}"))?;
    for path in &paths {
        let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        maildir
            .deliver(&raw)
            .with_context(|| format!("cannot deliver {}", path.display()))?;
    }
    println!(
        "delivered {} message(s) to {to} ({})",
        paths.len(),
        maildir.path().join("new").display()
    );
    Ok(())
}
