//! The `Engine` handle: a database pool, the configuration and the queue directory, shared by the API, the
//! ingest pipeline and the background services.

use std::{collections::HashMap, sync::Arc, time::Duration};

use mailqueue_config::Config;
use sea_orm::DatabaseConnection;
use tokio::sync::{Notify, RwLock};

use crate::{error::Result, queues::QueueInfo, store::Backend};

/// Cheap to clone; every clone shares the same pool and state.
#[derive(Clone)]
pub struct Engine {
    pub db: DatabaseConnection,
    pub backend: Backend,
    config: Arc<RwLock<Arc<Config>>>,
    queues: Arc<RwLock<Arc<QueueDirectory>>>,
    events_appended: Arc<Notify>,
    /// PostgreSQL: asks this instance's notifier to wake the event readers of the other instances (see
    /// [`crate::events::spawn_notifier`]).
    notify_instances: Option<tokio::sync::mpsc::Sender<()>>,
    /// Wakes the outbox workers of this process when a reply is stored (other instances find it by polling).
    reply_stored: Arc<Notify>,
    /// Bumped by [`Engine::replace_config`]; services that follow the configuration (mailbox supervisor, outbox
    /// worker, API tokens) watch it.
    config_version: Arc<tokio::sync::watch::Sender<u64>>,
    mailboxes: crate::mailboxes::StatusBoard,
    metrics: crate::metrics::Metrics,
}

/// Queues by name and id, as synced from the configuration.
#[derive(Debug, Default)]
pub struct QueueDirectory {
    pub by_name: HashMap<String, QueueInfo>,
}

impl QueueDirectory {
    pub fn by_id(&self, id: i64) -> Option<&QueueInfo> {
        self.by_name.values().find(|q| q.id == id)
    }
}

/// Where a mail arriving on a queue address goes, and with which priority and language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub queue_id: i64,
    pub queue: String,
    pub address: String,
    pub priority: i32,
    pub language: String,
}

impl Engine {
    /// Connects, migrates, and syncs queues from the configuration.
    pub async fn start(config: Config) -> Result<Self> {
        let db = mailqueue_schema::connect(&config.database.url).await?;
        mailqueue_schema::migrate(&db).await?;
        Self::with_connection(db, config).await
    }

    /// Like [`Engine::start`] on an already migrated connection.
    pub async fn with_connection(db: DatabaseConnection, config: Config) -> Result<Self> {
        crate::memory::tune_allocator();
        let backend = Backend::of(&db);
        let notify_instances = crate::events::spawn_notifier(&db, backend);
        let engine = Self {
            db,
            backend,
            config: Arc::new(RwLock::new(Arc::new(config))),
            queues: Arc::default(),
            events_appended: Arc::default(),
            notify_instances,
            reply_stored: Arc::default(),
            config_version: Arc::new(tokio::sync::watch::Sender::new(0)),
            mailboxes: crate::mailboxes::StatusBoard::default(),
            metrics: crate::metrics::Metrics::default(),
        };
        engine.sync_queues().await?;
        Ok(engine)
    }

    pub async fn config(&self) -> Arc<Config> {
        self.config.read().await.clone()
    }

    /// Swaps in a new (already validated) configuration, syncs the queues from it and tells the watchers of
    /// [`Engine::config_changes`]. Reload validates before calling this, so a bad file never gets here.
    ///
    /// The queues are synced first, so a database error leaves the engine on its old configuration.
    pub async fn replace_config(&self, config: Config) -> Result<()> {
        let dir = crate::queues::sync(&self.db, &config).await?;
        *self.config.write().await = Arc::new(config);
        *self.queues.write().await = Arc::new(dir);
        self.config_version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// A receiver that changes each time the configuration is replaced.
    pub fn config_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.config_version.subscribe()
    }

    pub async fn queues(&self) -> Arc<QueueDirectory> {
        self.queues.read().await.clone()
    }

    /// Upserts the configured queues, disables the others, and refreshes the directory.
    pub async fn sync_queues(&self) -> Result<()> {
        let config = self.config().await;
        let dir = crate::queues::sync(&self.db, &config).await?;
        *self.queues.write().await = Arc::new(dir);
        Ok(())
    }

    /// The route for mail arriving on `address` (a configured queue address): the address's priority and
    /// language, else the queue's, else the defaults.
    pub async fn route(&self, address: &str) -> Option<Route> {
        let config = self.config().await;
        let (queue, addr) = config.address(address)?;
        let dir = self.queues().await;
        let info = dir.by_name.get(&queue.name)?;
        Some(Route {
            queue_id: info.id,
            queue: queue.name.clone(),
            address: addr.address.to_string(),
            priority: addr.priority.unwrap_or(queue.priority),
            language: addr
                .language
                .as_ref()
                .or(queue.language.as_ref())
                .unwrap_or(&config.defaults.language)
                .to_string(),
        })
    }

    /// The configured claim lease.
    pub async fn claim_lease(&self) -> Duration {
        self.config().await.defaults.claim_lease.0
    }

    /// Wakes event long-pollers, here and (PostgreSQL) on every other instance; call after committing a transaction
    /// that appended events.
    pub fn events_appended(&self) {
        self.wake_event_readers();
        if let Some(notifier) = &self.notify_instances {
            // A full channel means a NOTIFY is already due to start after this commit, so it covers this one too.
            let _ = notifier.try_send(());
        }
    }

    /// Wakes this process's event long-pollers only (on a notification from another instance).
    pub fn wake_event_readers(&self) {
        self.events_appended.notify_waiters();
    }

    /// Resolves when events may have been appended (or spuriously); used by long polls.
    pub fn events_notify(&self) -> &Notify {
        &self.events_appended
    }

    /// Wakes an outbox worker of this process; call after committing a new (due) reply.
    pub fn reply_stored(&self) {
        // `notify_one` keeps a permit when no worker is waiting, so a reply stored while the worker is busy is
        // not missed.
        self.reply_stored.notify_one();
    }

    /// Resolves after [`Engine::reply_stored`]; the outbox worker waits on it between its polls.
    pub fn reply_stored_notify(&self) -> &Notify {
        &self.reply_stored
    }

    /// The status of every fetched mailbox (filled by the mailbox workers, read by `GET /v1/mailboxes`).
    pub fn mailboxes(&self) -> &crate::mailboxes::StatusBoard {
        &self.mailboxes
    }

    /// This instance's process figures for `GET /metrics` (claims, replies, HTTP requests).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }
}
