//! The supervisor: fetches the mailboxes of the configuration that this instance holds the lease of, one worker
//! task each, sharing one token cache. It follows the configuration (`Engine::config_changes`): mailboxes added
//! are taken, removed or disabled ones are stopped and their leases released, changed ones are restarted.
//!
//! **Several instances.** Every `ttl / 3` (`defaults.mailbox_lease`) the supervisor heartbeats its `instances` row,
//! renews its leases (one statement), and balances: its fair share is `ceil(mailboxes / live instances)`; under it,
//! it takes free or expired leases (one conditional upsert each, so two instances never both win); over it, it
//! stops the workers of the extra mailboxes and releases their leases once they stopped, so a new instance gets
//! work. A lease that another instance took over stops its worker at once; a lease that could not be renewed runs
//! out on the worker's own clock (see `leases`). A dead instance's mailboxes are taken by the others once its
//! leases expire, and their workers continue from the stored cursor (source keys make a re-fetch harmless).
//!
//! **Shutdown.** The instance row goes first (the others count one less), then every worker stops (a batch being
//! stored finishes), then the leases are released so that another instance takes the mailboxes at once. A worker
//! that panics is restarted after a pause; the others never notice.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use mailqueue_config::Config;
use mailqueue_connectors::oauth::{TokenCache, TokenRequest};
use sha2::{Digest, Sha256};
use tokio::{
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    leases::{InstanceId, LeaseGuard, Timing, fair_share},
    status::{MailboxError, MailboxStatus, StatusHandle},
    worker::{Mailbox, Server, Settings, Worker},
};
use crate::{
    engine::Engine,
    store::{
        instances,
        mailbox_leases::{self, LeaseKey},
    },
};

/// A crashed worker is restarted after this pause.
const RESTART_PAUSE: Duration = Duration::from_secs(5);
/// At shutdown, the database gets this long to remove the instance row and release the leases (both expire on
/// their own otherwise), so that an unreachable database does not hold the exit up.
const SHUTDOWN_DB_WAIT: Duration = Duration::from_secs(5);

/// What the configuration asks to fetch.
pub struct Plan {
    pub settings: Arc<Settings>,
    pub mailboxes: Vec<Arc<Mailbox>>,
    /// Names of the servers with `enabled: false`, with how many addresses they have.
    pub disabled: Vec<(String, usize)>,
    /// Addresses whose server is not configured (`load` rejects such configurations; kept for safety).
    pub unknown_server: Vec<String>,
    /// The extra CA files of the enabled servers, for the token endpoint's HTTPS.
    pub ca_files: Vec<std::path::PathBuf>,
    /// A digest of everything a mailbox's worker takes from the configuration, by lease key: a worker whose
    /// digest changed on reload is restarted.
    pub fingerprints: HashMap<LeaseKey, String>,
}

impl Plan {
    pub fn from_config(config: &Config) -> Self {
        let mut servers: HashMap<&str, Arc<Server>> = HashMap::new();
        let mut disabled: Vec<(String, usize)> = Vec::new();
        let mut ca_files = Vec::new();
        for s in &config.incoming_servers {
            if servers.contains_key(s.name.as_str()) || disabled.iter().any(|(n, _)| *n == s.name) {
                continue;
            }
            if !s.enabled {
                disabled.push((s.name.clone(), 0));
                continue;
            }
            if let Some(ca) = &s.ca_file
                && !ca_files.contains(ca)
            {
                ca_files.push(ca.clone());
            }
            servers.insert(&s.name, Arc::new(Server::new(s.clone())));
        }
        let settings = Settings::from_config(config);
        let mut mailboxes = Vec::new();
        let mut fingerprints = HashMap::new();
        let mut unknown_server = Vec::new();
        for queue in &config.queues {
            for a in &queue.addresses {
                if let Some((_, n)) = disabled.iter_mut().find(|(n, _)| *n == a.server) {
                    *n += 1;
                    continue;
                }
                let Some(server) = servers.get(a.server.as_str()) else {
                    unknown_server.push(a.address.to_string());
                    continue;
                };
                fingerprints.insert(
                    LeaseKey {
                        mailbox: a.address.to_string(),
                        folder: a.folder.clone(),
                    },
                    fingerprint(&server.config, a, &queue.name, &settings),
                );
                mailboxes.push(Arc::new(Mailbox {
                    address: a.address.to_string(),
                    queue: queue.name.clone(),
                    login: a.login().to_string(),
                    folder: a.folder.clone(),
                    after_fetch: a.after_fetch.clone(),
                    request: TokenRequest::for_mailbox(&server.config, a),
                    server: server.clone(),
                }));
            }
        }
        Self {
            settings: Arc::new(settings),
            mailboxes,
            disabled,
            unknown_server,
            ca_files,
            fingerprints,
        }
    }

    /// The lease key of a planned mailbox: the key of its cursor.
    pub fn key(mailbox: &Mailbox) -> LeaseKey {
        LeaseKey {
            mailbox: mailbox.address.clone(),
            folder: mailbox.folder.clone(),
        }
    }

    fn get(&self, key: &LeaseKey) -> Option<&Arc<Mailbox>> {
        self.mailboxes.iter().find(|m| Self::key(m) == *key)
    }

    fn log(&self) {
        for (name, addresses) in &self.disabled {
            tracing::info!(
                server = %name,
                addresses,
                "incoming server `{name}` is disabled (`enabled: false`); its {addresses} address(es) are not fetched"
            );
        }
        for address in &self.unknown_server {
            tracing::error!(%address, "address names an incoming server that is not configured; not fetched");
        }
        tracing::info!(
            mailboxes = self.mailboxes.len(),
            poll_interval = ?self.settings.poll_interval,
            "{} mailbox(es) configured for fetching",
            self.mailboxes.len()
        );
    }
}

/// A digest of what a worker of this address uses: server, address, queue, settings and the secrets' values
/// (the `Debug` forms show only where secrets come from). Kept as a digest so no secret is held twice.
fn fingerprint(
    server: &mailqueue_config::IncomingServer,
    address: &mailqueue_config::model::Address,
    queue: &str,
    settings: &Settings,
) -> String {
    let mut h = Sha256::new();
    h.update(format!("{server:?}\n{address:?}\n{queue}\n{settings:?}\n"));
    for secret in [&server.client_secret, &address.password]
        .into_iter()
        .flatten()
    {
        h.update(Sha256::digest(secret.expose().as_bytes()));
    }
    hex::encode(h.finalize())
}

/// One token cache for every mailbox, trusting the servers' `ca_file`s as extra roots (for an https token endpoint
/// behind a private CA, like the sandbox's).
pub fn token_cache(ca_files: &[std::path::PathBuf]) -> TokenCache {
    let mut builder = TokenCache::builder();
    for path in ca_files {
        match std::fs::read(path) {
            Ok(pem) => builder = builder.add_root_certificate_pem(pem),
            Err(e) => tracing::warn!(
                ca_file = %path.display(),
                error = %e,
                "cannot read the CA file; the token endpoint is checked without it"
            ),
        }
    }
    builder.build().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot use the CA files for the token endpoint; using the system roots");
        TokenCache::new()
    })
}

/// Starts the supervisor and returns its task. Status entries (`standby` until a lease is held) are registered
/// before this returns, so `GET /v1/mailboxes` lists every configured mailbox at once.
pub fn spawn(engine: Engine, config: &Config, stop: CancellationToken) -> JoinHandle<()> {
    let supervisor = Supervisor::new(engine, InstanceId::new(), config, stop);
    tokio::spawn(supervisor.run())
}

/// A worker that runs (or is stopping).
struct Running {
    worker: Worker,
    fingerprint: String,
}

struct Supervisor {
    engine: Engine,
    me: InstanceId,
    stop: CancellationToken,
    timing: Timing,
    plan: Plan,
    tokens: TokenCache,
    ca_files: Vec<std::path::PathBuf>,
    /// Status entries of the configured mailboxes, by address.
    statuses: HashMap<String, StatusHandle>,
    /// The leases this instance holds, with how long its workers may use them (this process's clock).
    held: HashMap<LeaseKey, Instant>,
    /// Leases to give up once their worker has stopped (over the fair share).
    releasing: HashSet<LeaseKey>,
    running: HashMap<LeaseKey, Running>,
    tasks: JoinSet<LeaseKey>,
    by_task: HashMap<tokio::task::Id, LeaseKey>,
    /// Workers that crashed wait until then before they are started again.
    restart_after: HashMap<LeaseKey, Instant>,
}

impl Supervisor {
    fn new(engine: Engine, me: InstanceId, config: &Config, stop: CancellationToken) -> Self {
        tracing::info!(instance = %me.id, "mailbox supervisor of instance {}", me.id);
        let plan = Plan::from_config(config);
        plan.log();
        let mut supervisor = Self {
            engine,
            me,
            stop,
            timing: Timing::new(config.defaults.mailbox_lease.0),
            tokens: token_cache(&plan.ca_files),
            ca_files: plan.ca_files.clone(),
            plan,
            statuses: HashMap::new(),
            held: HashMap::new(),
            releasing: HashSet::new(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            by_task: HashMap::new(),
            restart_after: HashMap::new(),
        };
        supervisor.sync_statuses(&HashMap::new());
        supervisor
    }

    async fn run(mut self) {
        if self.engine.backend == crate::store::Backend::Sqlite {
            self.forget_previous_runs().await;
        }
        let mut changes = self.engine.config_changes();
        let mut next_tick = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                Ok(()) = changes.changed() => {
                    let config = self.engine.config().await;
                    self.timing = Timing::new(config.defaults.mailbox_lease.0);
                    self.adopt(Plan::from_config(&config));
                    self.reconcile();
                    // Take newly configured mailboxes now rather than at the next renewal.
                    next_tick = Instant::now();
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.exited(joined).await;
                    self.reconcile();
                }
                () = tokio::time::sleep_until(next_tick) => {
                    // A tick waiting on an unreachable database must not hold up shutdown; stopping it midway
                    // is safe (whatever it took is released with all of this instance's leases).
                    let stop = self.stop.clone();
                    tokio::select! {
                        () = self.tick() => {}
                        () = stop.cancelled() => {}
                    }
                    next_tick = Instant::now() + self.timing.renew_every();
                }
            }
        }
        self.shutdown().await;
    }

    /// SQLite: one instance at a time (`serve` holds the database's lock file), so leases and instance rows of
    /// other owners belong to a process that died; waiting for their expiry would only delay fetching.
    async fn forget_previous_runs(&self) {
        let db = &self.engine.db;
        let forgotten = async {
            let leases = mailbox_leases::forget_others(db, &self.me.id).await?;
            instances::forget_others(db, &self.me.id).await?;
            Ok::<_, sea_orm::DbErr>(leases)
        };
        match forgotten.await {
            Ok(n) if n > 0 => {
                tracing::info!(leases = n, "dropped the mailbox leases of a previous run")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot drop the mailbox leases of a previous run")
            }
        }
    }

    /// Takes a new plan: registers the status entries of new (or changed) mailboxes, drops those of removed ones,
    /// and renews the token cache when the CA files changed. Workers are started and stopped by `reconcile`.
    fn adopt(&mut self, plan: Plan) {
        plan.log();
        if plan.ca_files != self.ca_files {
            self.tokens = token_cache(&plan.ca_files);
            self.ca_files = plan.ca_files.clone();
        }
        let previous = std::mem::replace(&mut self.plan, plan);
        self.sync_statuses(&previous.fingerprints);
    }

    /// Registers the status entries of new mailboxes and of those whose configuration changed since `previous`,
    /// and drops the entries of mailboxes no longer configured.
    fn sync_statuses(&mut self, previous: &HashMap<LeaseKey, String>) {
        for m in &self.plan.mailboxes {
            let key = Plan::key(m);
            let changed = previous.get(&key) != self.plan.fingerprints.get(&key);
            if self.statuses.contains_key(&m.address) && !changed {
                continue;
            }
            let status = self.engine.mailboxes().register(MailboxStatus::new(
                &m.address,
                &m.queue,
                &m.server.config.name,
                m.server.auth_name(),
                &m.login,
                &m.folder,
            ));
            if self.held.contains_key(&key) {
                status.leased(&self.me.id);
            } else {
                status.standby(None);
            }
            self.statuses.insert(m.address.clone(), status);
        }
        let configured: HashSet<&str> = self
            .plan
            .mailboxes
            .iter()
            .map(|m| m.address.as_str())
            .collect();
        self.statuses
            .retain(|address, _| configured.contains(address.as_str()));
        self.engine
            .mailboxes()
            .retain(|address| configured.contains(address));
    }

    /// The status entry of the mailbox `key` names, if it is configured with that folder.
    fn status_of(&self, key: &LeaseKey) -> Option<&StatusHandle> {
        self.statuses
            .get(&key.mailbox)
            .filter(|s| s.get().folder == key.folder)
    }

    /// Heartbeat, lease renewal, balancing, then `reconcile`. A database failure skips the rest of the tick: the
    /// workers' leases run out on their own clock if it persists.
    async fn tick(&mut self) {
        if let Err(e) = self.tick_inner().await {
            tracing::warn!(error = %e, "cannot renew the mailbox leases; retrying");
        }
        self.reconcile();
    }

    async fn tick_inner(&mut self) -> Result<(), sea_orm::DbErr> {
        let db = &self.engine.db;
        let ttl = self.timing.ttl;
        // Taken before the statements are sent: the leases were valid from at least this instant.
        let sent = Instant::now();
        let now = Utc::now();
        instances::heartbeat(db, &self.me.id, &self.me.hostname, self.me.pid, now, ttl).await?;
        let live = instances::live(db, now).await?.len();
        let renewed: HashSet<LeaseKey> = mailbox_leases::renew(db, &self.me.id, now, ttl)
            .await?
            .into_iter()
            .collect();
        self.renewed(&renewed, sent + self.timing.hold_for());

        // Leases of mailboxes no longer configured whose workers stopped: give them up.
        let stale: Vec<LeaseKey> = self
            .held
            .keys()
            .filter(|k| !self.plan.fingerprints.contains_key(*k) && !self.running.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            self.release(&key).await?;
        }

        let share = fair_share(self.plan.mailboxes.len(), live);
        let mine: BTreeSet<LeaseKey> = self
            .held
            .keys()
            .filter(|k| self.plan.fingerprints.contains_key(*k) && !self.releasing.contains(*k))
            .cloned()
            .collect();
        if mine.len() > share {
            self.give_up(
                mine.iter()
                    .rev()
                    .take(mine.len() - share)
                    .cloned()
                    .collect(),
            )
            .await?;
        }
        let leases = mailbox_leases::all(&self.engine.db).await?;
        if mine.len() < share {
            self.take(&leases, share - mine.len(), live).await?;
        }
        self.show_owners(&leases);
        // Instances dead for a day are forgotten.
        instances::purge(&self.engine.db, now - chrono::Duration::days(1)).await?;
        Ok(())
    }

    /// Applies a renewal: held leases are extended; a lease that is gone was taken over (or released).
    fn renewed(&mut self, renewed: &HashSet<LeaseKey>, valid_until: Instant) {
        let lost: Vec<LeaseKey> = self
            .held
            .keys()
            .filter(|k| !renewed.contains(*k))
            .cloned()
            .collect();
        for key in lost {
            self.held.remove(&key);
            self.releasing.remove(&key);
            if let Some(r) = self.running.get(&key) {
                tracing::warn!(
                    address = %key.mailbox,
                    folder = %key.folder,
                    "the mailbox lease was taken over by another instance; stopping its worker"
                );
                r.worker.lease.revoke();
            }
        }
        for key in renewed {
            self.held.insert(key.clone(), valid_until);
            if let Some(r) = self.running.get(key) {
                r.worker.lease.extend(valid_until);
            }
        }
    }

    /// Over the fair share: stop these workers; their leases are released once they stopped.
    async fn give_up(&mut self, keys: Vec<LeaseKey>) -> Result<(), sea_orm::DbErr> {
        for key in keys {
            tracing::info!(
                address = %key.mailbox,
                folder = %key.folder,
                "over this instance's fair share of mailboxes; handing one over to another instance"
            );
            match self.running.get(&key) {
                Some(r) => {
                    r.worker.stop.cancel();
                    self.releasing.insert(key);
                }
                None => self.release(&key).await?,
            }
        }
        Ok(())
    }

    /// Under the fair share: take up to `wanted` configured mailboxes whose lease is free or expired.
    async fn take(
        &mut self,
        leases: &[mailbox_leases::Lease],
        wanted: usize,
        live: usize,
    ) -> Result<(), sea_orm::DbErr> {
        let now = Utc::now();
        let taken: HashSet<LeaseKey> = leases
            .iter()
            .filter(|l| l.expires_at >= now)
            .map(|l| LeaseKey {
                mailbox: l.mailbox.clone(),
                folder: l.folder.clone(),
            })
            .collect();
        let mut free: Vec<LeaseKey> = self
            .plan
            .mailboxes
            .iter()
            .map(|m| Plan::key(m))
            .filter(|k| !taken.contains(k) && !self.held.contains_key(k))
            .collect();
        // Instances that start together should not all reach for the same mailboxes first.
        if live > 1 {
            use rand::seq::SliceRandom as _;
            free.shuffle(&mut rand::rng());
        }
        let mut got = 0;
        for key in free {
            if got == wanted {
                break;
            }
            let sent = Instant::now();
            let (now, ttl) = (Utc::now(), self.timing.ttl);
            if mailbox_leases::acquire(
                &self.engine.db,
                &key.mailbox,
                &key.folder,
                &self.me.id,
                now,
                ttl,
            )
            .await?
            {
                tracing::info!(address = %key.mailbox, folder = %key.folder, "took the mailbox lease");
                self.held.insert(key, sent + self.timing.hold_for());
                got += 1;
            }
        }
        Ok(())
    }

    /// Gives up a lease now (its worker, if any, has stopped).
    async fn release(&mut self, key: &LeaseKey) -> Result<(), sea_orm::DbErr> {
        self.held.remove(key);
        self.releasing.remove(key);
        mailbox_leases::release(&self.engine.db, &key.mailbox, &key.folder, &self.me.id).await?;
        if let Some(status) = self.status_of(key) {
            status.standby(None);
        }
        Ok(())
    }

    /// Shows, for the mailboxes fetched elsewhere, which instance holds them.
    fn show_owners(&self, leases: &[mailbox_leases::Lease]) {
        let now = Utc::now();
        for m in &self.plan.mailboxes {
            let key = Plan::key(m);
            if self.held.contains_key(&key) || self.running.contains_key(&key) {
                continue;
            }
            let owner = leases
                .iter()
                .find(|l| l.mailbox == key.mailbox && l.folder == key.folder && l.expires_at >= now)
                .map(|l| l.owner.clone());
            if let Some(status) = self.statuses.get(&m.address) {
                status.standby(owner);
            }
        }
    }

    /// Stops the workers that should not run (mailbox removed or changed, lease lost or being handed over) and
    /// starts those that should (lease held and usable, configured, not waiting after a crash).
    fn reconcile(&mut self) {
        for (key, r) in &self.running {
            let wanted = self.held.contains_key(key)
                && !self.releasing.contains(key)
                && self.plan.fingerprints.get(key) == Some(&r.fingerprint);
            if !wanted && !r.worker.stop.is_cancelled() {
                r.worker.stop.cancel();
            }
        }
        if self.stop.is_cancelled() {
            return;
        }
        let now = Instant::now();
        let startable: Vec<(LeaseKey, Instant)> = self
            .held
            .iter()
            .filter(|(k, until)| {
                **until > now
                    && !self.running.contains_key(*k)
                    && !self.releasing.contains(*k)
                    && self.restart_after.get(*k).is_none_or(|t| *t <= now)
            })
            .map(|(k, until)| (k.clone(), *until))
            .collect();
        for (key, until) in startable {
            self.start(key, until);
        }
    }

    fn start(&mut self, key: LeaseKey, valid_until: Instant) {
        let (Some(mailbox), Some(fingerprint), Some(status)) = (
            self.plan.get(&key).cloned(),
            self.plan.fingerprints.get(&key).cloned(),
            self.statuses.get(&key.mailbox).cloned(),
        ) else {
            return;
        };
        self.restart_after.remove(&key);
        status.leased(&self.me.id);
        let stop = self.stop.child_token();
        let worker = Worker {
            engine: self.engine.clone(),
            status,
            mailbox,
            tokens: self.tokens.clone(),
            settings: self.plan.settings.clone(),
            lease: LeaseGuard::new(valid_until, stop.clone()),
            stop,
        };
        let task = {
            let worker = worker.clone();
            let key = key.clone();
            async move {
                let lease = worker.lease.clone();
                lease.watch(worker.run()).await;
                key
            }
        };
        let handle = self.tasks.spawn(task);
        self.by_task.insert(handle.id(), key.clone());
        self.running.insert(
            key,
            Running {
                worker,
                fingerprint,
            },
        );
    }

    /// A worker ended: it was stopped (release its lease if it is being handed over or no longer configured) or
    /// it crashed (restart it after a pause).
    async fn exited(
        &mut self,
        joined: Result<(tokio::task::Id, LeaseKey), tokio::task::JoinError>,
    ) {
        let (key, crash) = match joined {
            Ok((id, key)) => {
                self.by_task.remove(&id);
                (key, None)
            }
            Err(e) => match self.by_task.remove(&e.id()) {
                Some(key) => (key, Some(e)),
                None => return,
            },
        };
        let Some(running) = self.running.remove(&key) else {
            return;
        };
        if let Some(error) = crash.filter(|e| !e.is_cancelled()) {
            let message = panic_message(error);
            tracing::error!(address = %key.mailbox, panic = %message, "mailbox worker crashed; restarting it");
            let next = Utc::now()
                + chrono::Duration::from_std(RESTART_PAUSE).unwrap_or(chrono::Duration::zero());
            running.worker.status.failed(
                MailboxError::internal(format!("the mailbox worker crashed: {message}")),
                next,
            );
            self.restart_after
                .insert(key.clone(), Instant::now() + RESTART_PAUSE);
        }
        let configured = self.plan.fingerprints.contains_key(&key);
        if self.releasing.contains(&key) || (!configured && self.held.contains_key(&key)) {
            if let Err(e) = self.release(&key).await {
                // It expires on its own within the TTL.
                tracing::warn!(error = %e, address = %key.mailbox, "cannot release the mailbox lease");
            }
        } else if !self.held.contains_key(&key)
            && let Some(status) = self.status_of(&key)
        {
            status.standby(None);
        }
    }

    /// See the module doc: instance row, workers, then leases.
    async fn shutdown(mut self) {
        let db = self.engine.db.clone();
        let removed =
            tokio::time::timeout(SHUTDOWN_DB_WAIT, instances::remove(&db, &self.me.id)).await;
        if let Some(e) = shutdown_failure(removed) {
            tracing::warn!(error = %e, "cannot remove this instance's row; it expires on its own");
        }
        for r in self.running.values() {
            r.worker.stop.cancel();
        }
        while let Some(joined) = self.tasks.join_next_with_id().await {
            if let Err(e) = joined
                && e.is_panic()
                && let Some(key) = self.by_task.get(&e.id())
                && let Some(r) = self.running.get(key)
            {
                r.worker.status.stopped();
            }
        }
        let released = tokio::time::timeout(
            SHUTDOWN_DB_WAIT,
            mailbox_leases::release_all(&db, &self.me.id),
        )
        .await;
        match released {
            Ok(Ok(n)) if n > 0 => tracing::info!(leases = n, "released {n} mailbox lease(s)"),
            Ok(Ok(_)) => {}
            other => tracing::warn!(
                error = %shutdown_failure(other.map(|r| r.map(|_| ()))).unwrap_or_default(),
                "cannot release the mailbox leases; other instances take them when they expire"
            ),
        }
        for status in self.statuses.values() {
            if status.get().state != super::MailboxState::Stopped {
                status.stopped();
            }
        }
        tracing::debug!("all mailbox workers stopped");
    }
}

/// Why a database call at shutdown failed (its error, or that it took too long); `None` when it succeeded.
fn shutdown_failure(
    result: Result<Result<(), sea_orm::DbErr>, tokio::time::error::Elapsed>,
) -> Option<String> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {SHUTDOWN_DB_WAIT:?}")),
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        mailqueue_config::load_str(std::path::Path::new("t.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"))
            .config
    }

    const YAML: &str = r#"
defaults: { poll_interval: 5s }
incoming_servers:
  - name: svc
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_service
    client_id: "11111111-1111-1111-1111-111111111111"
    client_secret: s3cr3t
    imap: { host: outlook.office365.com }
  - name: usr
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_user
    client_id: "22222222-2222-2222-2222-222222222222"
    imap: { host: outlook.office365.com }
  - name: off
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_service
    client_id: "33333333-3333-3333-3333-333333333333"
    client_secret: s3cr3t
    imap: { host: outlook.office365.com }
    enabled: false
queues:
  - name: support
    addresses:
      - { address: support@contoso.com, server: svc, sender: true, folder: Orders, after_fetch: { move: Done } }
      - { address: old@contoso.com, server: off }
  - name: sales
    addresses:
      - { address: anna@contoso.com, account: anna.login@contoso.com, server: usr, password: pw, sender: true }
      - { address: legacy@contoso.com, server: off }
"#;

    #[test]
    fn plans_a_worker_per_address_of_enabled_servers() {
        let plan = Plan::from_config(&config(YAML));
        let addresses: Vec<&str> = plan.mailboxes.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(addresses, ["support@contoso.com", "anna@contoso.com"]);
        assert_eq!(plan.disabled, [("off".to_owned(), 2)]);
        assert!(plan.unknown_server.is_empty());
        assert_eq!(plan.settings.poll_interval, Duration::from_secs(5));

        let support = &plan.mailboxes[0];
        assert_eq!(support.queue, "support");
        assert_eq!(support.folder, "Orders");
        assert_eq!(
            support.after_fetch,
            mailqueue_config::AfterFetch::Move("Done".into())
        );
        assert_eq!(support.server.auth_name(), "oauth_service");
        assert_eq!(support.request.as_ref().unwrap().user(), None);

        let anna = &plan.mailboxes[1];
        assert_eq!(anna.login, "anna.login@contoso.com");
        assert_eq!(anna.folder, "INBOX");
        assert_eq!(
            anna.request.as_ref().unwrap().user(),
            Some("anna.login@contoso.com")
        );
        assert_eq!(anna.server.auth_name(), "oauth_user");
    }

    #[tokio::test]
    async fn spawn_registers_every_mailbox_and_stops_on_cancel() {
        let db = mailqueue_schema::connect("sqlite::memory:").await.unwrap();
        mailqueue_schema::migrate(&db).await.unwrap();
        // Point the enabled servers at a closed local port: the workers fail and back off, never reaching out.
        let yaml = YAML.replace(
            "imap: { host: outlook.office365.com }",
            "imap: { host: 127.0.0.1, port: 9 }",
        );
        let config = config(&yaml.replace(
            "https://login.microsoftonline.com/contoso.onmicrosoft.com",
            "http://127.0.0.1:9/contoso",
        ));
        let engine = Engine::with_connection(db, config.clone()).await.unwrap();
        let stop = CancellationToken::new();
        let task = spawn(engine.clone(), &config, stop.clone());
        let listed: Vec<String> = engine
            .mailboxes()
            .snapshot()
            .into_iter()
            .map(|s| s.address)
            .collect();
        assert_eq!(listed, ["anna@contoso.com", "support@contoso.com"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the supervisor stops")
            .unwrap();
        for s in engine.mailboxes().snapshot() {
            assert_eq!(s.state, super::super::MailboxState::Stopped, "{s:?}");
        }
    }

    /// Waits (generously) until `check` holds.
    async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn leased(engine: &Engine) -> Vec<(String, String, String)> {
        mailbox_leases::all(&engine.db)
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.mailbox, l.folder, l.owner))
            .collect()
    }

    #[tokio::test]
    async fn follows_configuration_changes_with_its_leases() {
        let dir = std::env::temp_dir().join(format!("mq-sup-{:08x}", rand::random::<u32>()));
        let url = format!("sqlite://{}", dir.join("mq.db").display());
        let db = mailqueue_schema::connect(&url).await.unwrap();
        mailqueue_schema::migrate(&db).await.unwrap();
        let unreachable = |yaml: &str| {
            config(
                &yaml
                    .replace(
                        "imap: { host: outlook.office365.com }",
                        "imap: { host: 127.0.0.1, port: 9 }",
                    )
                    .replace(
                        "https://login.microsoftonline.com/contoso.onmicrosoft.com",
                        "http://127.0.0.1:9/contoso",
                    ),
            )
        };
        let first = unreachable(YAML);
        let engine = Engine::with_connection(db, first.clone()).await.unwrap();
        let stop = CancellationToken::new();
        let task = spawn(engine.clone(), &first, stop.clone());

        // The only instance (SQLite) takes both mailboxes, keyed like their cursors, and shows itself as owner.
        until("both mailboxes leased", async || {
            leased(&engine).await.len() == 2
        })
        .await;
        let rows = leased(&engine).await;
        let keys: Vec<(&str, &str)> = rows
            .iter()
            .map(|(m, f, _)| (m.as_str(), f.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("anna@contoso.com", "INBOX"),
                ("support@contoso.com", "Orders")
            ]
        );
        let owner = rows[0].2.clone();
        assert_eq!(rows[1].2, owner);
        assert!(
            owner.contains(&format!(":{}:", std::process::id())),
            "{owner}"
        );
        for s in engine.mailboxes().snapshot() {
            assert_eq!(s.owner.as_deref(), Some(owner.as_str()), "{s:?}");
        }

        // Reload: anna's address is removed, a new address appears.
        let second = unreachable(
            &YAML
                .replace(
                    "      - { address: anna@contoso.com, account: anna.login@contoso.com, server: usr, password: pw, sender: true }\n",
                    "",
                )
                .replace(
                    "- { address: old@contoso.com, server: off }",
                    "- { address: new@contoso.com, server: svc }",
                ),
        );
        engine.replace_config(second).await.unwrap();
        until("the new mailbox leased and anna's released", async || {
            let keys: Vec<String> = leased(&engine).await.into_iter().map(|l| l.0).collect();
            keys == ["new@contoso.com", "support@contoso.com"]
        })
        .await;
        let listed: Vec<String> = engine
            .mailboxes()
            .snapshot()
            .into_iter()
            .map(|s| s.address)
            .collect();
        assert_eq!(listed, ["new@contoso.com", "support@contoso.com"]);

        // Shutdown releases every lease and the instance row.
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the supervisor stops")
            .unwrap();
        assert!(leased(&engine).await.is_empty());
        assert!(
            instances::live(&engine.db, Utc::now())
                .await
                .unwrap()
                .is_empty()
        );
        for s in engine.mailboxes().snapshot() {
            assert_eq!(s.state, super::super::MailboxState::Stopped, "{s:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
