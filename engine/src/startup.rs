//! Starting the engine: database, queues, background services and the HTTP API, and stopping them gracefully.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use mailqueue_config::{Config, DatabaseKind};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{api, engine::Engine, mailboxes, reload::Reloader, rescuer};

/// How long [`RunningApp::stop`] waits for open requests before cutting them off.
const GRACE: Duration = Duration::from_secs(10);

/// A running engine with its HTTP API and background services.
pub struct RunningApp {
    /// Where the API listens (the real port when the configuration asked for port 0).
    pub addr: SocketAddr,
    pub engine: Engine,
    /// Re-reads the configuration file; `mailqueue serve` calls it on SIGHUP.
    pub reloader: Reloader,
    stop: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
    services: Vec<JoinHandle<()>>,
    /// SQLite only: held while running, so a second `serve` on the same file is refused.
    _sqlite_lock: Option<crate::sqlite_lock::SqliteLock>,
}

/// How the engine is started, beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The file `config` was loaded from; configuration reload re-reads it (without one, reload is refused).
    pub config_file: Option<PathBuf>,
}

/// Binds `config.api.listen`, starts the engine (connect, migrate, sync queues), the rescuer, the mailbox workers
/// and the API.
pub async fn spawn(config: Config) -> anyhow::Result<RunningApp> {
    spawn_with(config, Options::default()).await
}

/// Like [`spawn`], with [`Options`].
pub async fn spawn_with(config: Config, options: Options) -> anyhow::Result<RunningApp> {
    let sqlite_lock = crate::sqlite_lock::acquire(&config.database.url)?;
    let listener = TcpListener::bind(&config.api.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.api.listen))?;
    let addr = listener.local_addr().context("listening address")?;
    let engine = Engine::start(config.clone())
        .await
        .context("starting the engine")?;
    let stop = CancellationToken::new();

    let lease = config.defaults.claim_lease.0;
    let every = (lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut services = vec![
        tokio::spawn(rescuer::run(engine.clone(), every, stop.clone())),
        // The mailbox workers: IMAP → queues, until `stop` (IDLE is cancelled, a batch being stored finishes).
        mailboxes::spawn(engine.clone(), &config, stop.clone()),
    ];
    // The outbox worker: replies → the outgoing SMTP server (idle while none is configured; follows reloads).
    services.push(crate::outbox::worker::spawn(engine.clone(), stop.clone()));
    // The retention job: deletes old closed contacts, raw mail and events (idle unless `retention` sets an age).
    services.push(tokio::spawn(crate::retention::run(
        engine.clone(),
        stop.clone(),
    )));
    // PostgreSQL: wake this instance's event readers when another instance appends events.
    services.extend(crate::events::spawn_listener(engine.clone(), stop.clone()));

    let tokens = Arc::new(api::auth::Tokens::from_config(&config));
    let reloader = Reloader::new(engine.clone(), options.config_file, tokens);
    let router = api::router(engine.clone(), &config, reloader.clone(), stop.clone());
    let shutdown = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    });

    let database = match config.database.kind() {
        Some(DatabaseKind::Postgres) => "postgres",
        Some(DatabaseKind::Sqlite) => "sqlite",
        None => "unknown",
    };
    tracing::info!(%addr, "mailqueue API listening on http://{addr}");
    tracing::info!(
        database,
        queues = config.queues.len(),
        addresses = config.queues.iter().map(|q| q.addresses.len()).sum::<usize>(),
        tokens = config.api.tokens.len(),
        claim_lease = %config.defaults.claim_lease,
        "mailqueue started: {} queue(s), {} API token(s), {database} database, claim lease {}",
        config.queues.len(),
        config.api.tokens.len(),
        config.defaults.claim_lease,
    );
    Ok(RunningApp {
        addr,
        engine,
        reloader,
        stop,
        server: Some(server),
        services,
        _sqlite_lock: sqlite_lock,
    })
}

impl RunningApp {
    /// Stops accepting requests, lets open ones finish (ending event streams and long polls at once; at most
    /// 10 s), and stops the background services.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(GRACE, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "API server failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "API server task failed"),
                Err(_) => {
                    tracing::warn!(
                        "open requests did not finish within {GRACE:?}; cutting them off"
                    );
                    server.abort();
                }
            }
        }
        for service in self.services.drain(..) {
            if let Err(e) = service.await {
                tracing::error!(error = %e, "background service failed");
            }
        }
        tracing::info!("mailqueue stopped");
    }
}

/// Runs everything until `shutdown` resolves (the binary passes ctrl-c/SIGTERM), then stops cleanly. Returns an
/// error if starting fails or the API server stops on its own.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    spawn(config).await?.run_until(shutdown).await
}

impl RunningApp {
    /// Runs until `shutdown` resolves, then stops cleanly (see [`serve`]).
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let mut server = self.server.take().expect("the server runs until stopped");
        tokio::select! {
            () = shutdown => {
                tracing::info!("shutting down");
                self.server = Some(server);
                self.stop().await;
                Ok(())
            }
            result = &mut server => {
                self.stop().await;
                match result {
                    Ok(Ok(())) => anyhow::bail!("the API server stopped unexpectedly"),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("the API server failed")),
                    Err(e) => Err(anyhow::Error::new(e).context("the API server task failed")),
                }
            }
        }
    }
}
