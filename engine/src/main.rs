//! The `mailqueue` command line: serve, check-config, migrate, import, config-schema.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailqueue_engine::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "mailqueue",
    version,
    about = "Contact-center email queue engine"
)]
struct Cli {
    /// Log format: human on a terminal, JSON otherwise (auto), or forced.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto, env = "MAILQUEUE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine: HTTP queue API and background services.
    Serve {
        #[arg(long, short, env = "MAILQUEUE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file: exit 0 with a summary, or 1 with every error.
    CheckConfig { file: PathBuf },
    /// Create or upgrade the database schema.
    Migrate {
        #[arg(long, short, env = "MAILQUEUE_CONFIG")]
        config: PathBuf,
    },
    /// Import mail from .eml files, Maildir folders and mbox files into a queue.
    Import {
        #[arg(long, short, env = "MAILQUEUE_CONFIG")]
        config: PathBuf,
        /// The queue to import into.
        #[arg(long)]
        queue: String,
        /// The queue address the mail counts as arriving on (default: the queue's first address).
        #[arg(long)]
        address: Option<String>,
        /// Files and folders to import.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the configuration file (for editors).
    ConfigSchema,
    /// Check every mailbox and the outgoing server step by step: configuration, token, IMAP, SMTP.
    Doctor {
        #[arg(long, short, env = "MAILQUEUE_CONFIG")]
        config: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Also send a short test message from the outgoing username to this address.
        #[arg(long, value_name = "ADDRESS")]
        send_test: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Doctor {
            config,
            json,
            send_test,
        } => doctor(&config, json, send_test.as_deref()),
        Command::ConfigSchema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&mailqueue_config::json_schema())
                    .expect("schema is JSON")
            );
            ExitCode::SUCCESS
        }
        command => {
            telemetry::init(cli.log_format);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(run(command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match mailqueue_config::load(file) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}: ok — {}", file.display(), loaded.config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{}: {} error(s)", file.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

/// `mailqueue doctor`: exit 0 only when every chain passes. Never prints a secret or a token.
fn doctor(file: &std::path::Path, json: bool, send_test: Option<&str>) -> ExitCode {
    use mailqueue_engine::doctor;
    let fail_early = |errors: Vec<String>| {
        if json {
            println!(
                "{}",
                serde_json::json!({ "ok": false, "chains": [], "errors": errors })
            );
        } else {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "{}: {} error(s); nothing else was checked",
                file.display(),
                errors.len()
            );
        }
        ExitCode::FAILURE
    };
    let send_test = match send_test
        .map(mailqueue_config::model::EmailAddress::parse)
        .transpose()
    {
        Ok(a) => a,
        Err(e) => return fail_early(vec![format!("--send-test: {e}")]),
    };
    let config = match mailqueue_config::load(file) {
        Ok(loaded) => {
            if !json {
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
            }
            loaded.config
        }
        Err(errors) => return fail_early(errors.0.iter().map(ToString::to_string).collect()),
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let report = runtime.block_on(doctor::run(&config, &doctor::Options { send_test }));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report is JSON")
        );
    } else {
        print!(
            "{}",
            doctor::render_text(&report, std::io::stdout().is_terminal())
        );
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Loads a configuration, printing warnings; errors name every problem.
fn load_config(path: &std::path::Path) -> anyhow::Result<mailqueue_config::Config> {
    let loaded =
        mailqueue_config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded.config)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config: file } => {
            use mailqueue_engine::startup;
            let config = load_config(&file)?;
            // Registered before starting, so a SIGHUP during start-up does not end the process (its default).
            let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("cannot listen for SIGHUP")?;
            let options = startup::Options {
                config_file: Some(file),
            };
            let app = startup::spawn_with(config, options).await?;
            tokio::spawn(reload_on_sighup(hangup, app.reloader.clone()));
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate { config } => {
            let config = load_config(&config)?;
            let db = mailqueue_schema::connect(&config.database.url)
                .await
                .with_context(|| {
                    format!("cannot connect to {}", redact_url(&config.database.url))
                })?;
            let applied = mailqueue_schema::migrate(&db)
                .await
                .context("migration failed")?;
            println!(
                "database {} is up to date ({} migration(s) applied)",
                redact_url(&config.database.url),
                applied.len()
            );
            Ok(())
        }
        Command::Import {
            config,
            queue,
            address,
            paths,
        } => {
            let config = load_config(&config)?;
            let engine = mailqueue_engine::Engine::start(config)
                .await
                .context("cannot open the database")?;
            let progress = std::io::stderr().is_terminal();
            let report = mailqueue_engine::import::import_paths(
                &engine,
                &queue,
                address.as_deref(),
                &paths,
                progress,
            )
            .await?;
            println!("{report}");
            Ok(())
        }
        Command::CheckConfig { .. } | Command::ConfigSchema | Command::Doctor { .. } => {
            unreachable!("handled without a runtime")
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (how orchestrators stop a process).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
    }
}

/// Reloads the configuration file on every SIGHUP (the reloader logs the outcome: what changed, or every error
/// of an invalid file while the engine keeps its previous configuration).
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    reloader: mailqueue_engine::reload::Reloader,
) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received; reloading the configuration");
        // The outcome (changes or errors) is logged by the reloader.
        let _ = reloader.reload().await;
    }
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
