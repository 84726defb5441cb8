//! The outbox worker: claims due replies, builds them as RFC 5322 messages, sends them through the outgoing SMTP
//! server and records the outcome. Safe on several instances (rows are claimed atomically, see
//! [`store::outbox::claim`]).
//!
//! # Concurrency
//!
//! Up to `outgoing_server.connections` replies are in flight at once, each on its own pooled SMTP connection. The
//! worker claims a batch of due rows (as many as there are free slots) in one statement, so on SQLite one write
//! transaction serves several sends. It wakes as soon as a reply is stored in this process
//! ([`Engine::reply_stored`]) and polls every `poll_interval` for replies stored by other instances and for retries
//! coming due.
//!
//! The outgoing server is read from the engine's configuration at start and again whenever it is replaced
//! ([`Engine::config_changes`]): a reload that changes the server, its credentials or its limits takes effect for
//! the next claimed replies; sends already in flight finish with the server they started with.
//!
//! # At most one copy
//!
//! A claim commits `state = 'sending'` and the attempt count before anything is sent. A row found in `sending`
//! after its lease ran out belonged to a worker that stopped while sending: whether the server accepted the
//! message cannot be known (SMTP gives no way to ask), so it is marked `failed` with "outcome unknown" and never
//! resent blindly; an agent checks the customer's mailbox and sends again if needed.
//!
//! The remaining window is at-least-once in one case only: the server accepted the message (`250` after DATA)
//! and the worker could not record `sent` (crash, database down) — then the row stays in `sending`, expires and
//! is marked failed, and an agent who resends creates a second copy. Nothing is resent automatically. The `sent`
//! record commits asynchronously on PostgreSQL ([`store::commit_asynchronously`]): a database server crash within
//! about 200 ms after it falls into the same window, with the same outcome.

use std::{
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use chrono::Utc;
use lettre::message::{Attachment, Mailbox, Message, MultiPart, SinglePart, header::ContentType};
use mailqueue_config::{Config, model::OutgoingServer};
use mailqueue_connectors::smtp::{
    Accepted, Envelope, SenderOptions, SmtpError, SmtpErrorKind, SmtpSender,
};
use mailqueue_schema::entity::outbox;
use serde_json::json;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    engine::Engine,
    error::{Error, Result},
    mailboxes::{FAILPOINT_ENV, worker::failpoint_armed},
    metrics::ReplyOutcome,
    store::{self, events::NewEvent},
};

/// What a row left in `sending` past its lease becomes.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown: the engine stopped while sending; check the customer's mailbox before resending";

/// Failpoint (`MAILQUEUE_FAILPOINT`, tests): abort the process after the attempt is recorded and the mail built,
/// right before it is handed to the SMTP server.
pub const FAILPOINT_BEFORE_SEND: &str = "before_smtp_send";
/// Failpoint (`MAILQUEUE_FAILPOINT`, tests): abort the process right after the SMTP server accepted a reply,
/// before `sent` is recorded — the at-least-once window.
pub const FAILPOINT_AFTER_ACCEPT: &str = "after_smtp_accept";

/// Timing of the worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often due rows are looked for when no reply was stored in this process meanwhile.
    pub poll_interval: Duration,
    /// How long a claim lasts; longer than one send may take (the sender's timeout is 2 minutes).
    pub lease: Duration,
    /// First retry delay after a temporary failure; doubled per attempt.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// Attempts before a temporarily failing reply is `failed`.
    pub max_attempts: i32,
    /// The outgoing server is reported unhealthy when every attempt failed for this long.
    pub unhealthy_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(10 * 60),
            retry_base: Duration::from_secs(30),
            retry_cap: Duration::from_secs(30 * 60),
            max_attempts: 8,
            unhealthy_after: Duration::from_secs(5 * 60),
        }
    }
}

impl Settings {
    /// The delay before attempt `attempts + 1`: `retry_base × 2^(attempts-1)`, at most `retry_cap`.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exp = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(20);
        self.retry_base
            .saturating_mul(1u32 << exp)
            .min(self.retry_cap)
    }
}

/// Starts the outbox worker. It sends while the configuration has a usable outgoing server and waits for a
/// configuration change otherwise (replies stay `pending` meanwhile).
pub fn spawn(engine: Engine, stop: CancellationToken) -> JoinHandle<()> {
    spawn_with(engine, Settings::default(), stop)
}

/// [`spawn`] with explicit timing (tests).
pub fn spawn_with(engine: Engine, settings: Settings, stop: CancellationToken) -> JoinHandle<()> {
    let worker = Worker {
        me: format!(
            "outbox-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ),
        engine,
        settings,
        health: Mutex::default(),
    };
    tokio::spawn(Arc::new(worker).run(stop))
}

/// Aborts the process if failpoint `name` is armed in `MAILQUEUE_FAILPOINT` (read once; unset costs a load).
fn failpoint(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var(FAILPOINT_ENV).ok());
    if armed.is_some() && failpoint_armed(armed.as_deref(), name) {
        tracing::error!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Logs a send task that panicked (its row stays `sending` and is failed as "outcome unknown" after its lease).
fn log_panic(done: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "outbox: a send task panicked");
    }
}

/// The outgoing server of the current configuration, with its sender.
struct Outgoing {
    server: OutgoingServer,
    sender: SmtpSender,
    /// Sends in flight at most.
    connections: usize,
}

impl Outgoing {
    /// The outgoing server of `config`, or `None` (logged) when there is none or it is unusable.
    fn from_config(config: &Config) -> Option<Arc<Self>> {
        let Some(server) = config.outgoing_server.clone() else {
            tracing::info!("no outgoing server is configured; replies are stored but not sent");
            return None;
        };
        let connections = usize::try_from(server.connections.max(1)).unwrap_or(1);
        let ca_files: Vec<_> = server.ca_file.iter().cloned().collect();
        let tokens = crate::mailboxes::supervisor::token_cache(&ca_files);
        let options = SenderOptions {
            pool_max_idle: server.connections.max(1),
            ..SenderOptions::default()
        };
        match SmtpSender::with_options(&server, tokens, options) {
            Ok(sender) => {
                tracing::info!(
                    host = %server.host,
                    username = %server.username,
                    connections,
                    "sending replies through the outgoing server"
                );
                Some(Arc::new(Self {
                    server,
                    sender,
                    connections,
                }))
            }
            Err(e) => {
                let ex = e.explain();
                tracing::error!(error = %e, "the outgoing server is unusable; replies are not sent: {ex}");
                None
            }
        }
    }
}

#[derive(Default)]
struct Health {
    /// When the current run of failures started.
    failing_since: Option<Instant>,
    unhealthy: bool,
}

/// One outbox worker; shared by its loop and its sends in flight.
struct Worker {
    me: String,
    engine: Engine,
    settings: Settings,
    health: Mutex<Health>,
}

impl Worker {
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        self.load_health().await;
        let mut changes = self.engine.config_changes();
        changes.borrow_and_update();
        let mut outgoing = Outgoing::from_config(&*self.engine.config().await);
        let mut reload = false;
        let mut in_flight = JoinSet::new();
        // Rows stuck in `sending` are looked for at start and then every lease/10 (at least every second, at most
        // every minute), not on every poll: on SQLite each sweep is a write transaction.
        let sweep_every =
            (self.settings.lease / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut last_sweep: Option<Instant> = None;
        tracing::info!(worker = %self.me, "outbox worker started");
        loop {
            while let Some(done) = in_flight.try_join_next() {
                log_panic(done);
            }
            if stop.is_cancelled() {
                break;
            }
            if reload {
                reload = false;
                let config = self.engine.config().await;
                // An unchanged outgoing server keeps its sender: its pooled connections and its token.
                if config.outgoing_server.as_ref() != outgoing.as_ref().map(|o| &o.server) {
                    outgoing = Outgoing::from_config(&config);
                }
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= sweep_every) {
                last_sweep = Some(Instant::now());
                if let Err(e) = self.expire().await {
                    tracing::warn!(error = %e, "cannot check for replies stuck in sending");
                }
            }
            let more_due = match &outgoing {
                Some(out) => self.fill(out, &mut in_flight).await,
                None => false,
            };
            if more_due {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => log_panic(done),
                () = self.engine.reply_stored_notify().notified() => {}
                changed = changes.changed() => reload = changed.is_ok(),
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        // Sends in progress finish (and record their outcome) before the worker stops.
        while let Some(done) = in_flight.join_next().await {
            log_panic(done);
        }
        tracing::info!(worker = %self.me, "outbox worker stopped");
    }

    /// Claims due rows for the free send slots and starts sending them. True when every slot asked for was filled
    /// (more rows may be due). Claims only when at least half the slots are free (or none is busy), so that a
    /// burst is claimed in batches rather than one row per finished send.
    async fn fill(self: &Arc<Self>, out: &Arc<Outgoing>, in_flight: &mut JoinSet<()>) -> bool {
        let room = out.connections.saturating_sub(in_flight.len());
        if room == 0 || (!in_flight.is_empty() && room < out.connections.div_ceil(2)) {
            return false;
        }
        let lease = chrono::Duration::from_std(self.settings.lease)
            .unwrap_or_else(|_| chrono::Duration::minutes(10));
        let rows = match store::outbox::claim(&self.engine.db, &self.me, lease, room).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "outbox: cannot claim replies");
                return false;
            }
        };
        let full = rows.len() == room;
        for row in rows {
            let (worker, out) = (self.clone(), out.clone());
            in_flight.spawn(async move {
                let id = row.id;
                if let Err(e) = worker.process(&out, row).await {
                    tracing::warn!(reply = id, error = %e, "outbox: database error while sending reply {id}");
                }
            });
        }
        full
    }

    /// Reads the outgoing server's last reported health, so that a recovery after a restart is reported too.
    async fn load_health(&self) {
        match store::events::latest_outgoing_health(&self.engine.db).await {
            Ok(kind) => self.health().unhealthy = kind.as_deref() == Some("outgoing.unhealthy"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outgoing server's last health report")
            }
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks rows stuck in `sending` past their lease `failed` ("outcome unknown").
    async fn expire(&self) -> Result<()> {
        let txn = store::begin_write(&self.engine.db).await?;
        let rows = store::outbox::fail_expired(&txn, OUTCOME_UNKNOWN).await?;
        for row in &rows {
            tracing::error!(
                reply = row.id,
                contact = row.contact_id,
                "reply {} was being sent when its worker stopped; {OUTCOME_UNKNOWN}",
                row.id
            );
            store::events::insert(
                &txn,
                NewEvent {
                    kind: "reply.failed",
                    contact_id: Some(row.contact_id),
                    queue: None,
                    actor: None,
                    data: json!({
                        "reply_id": row.id,
                        "message_id": row.message_id,
                        "attempts": row.attempts,
                        "error": OUTCOME_UNKNOWN,
                        "cause": "outcome unknown: the engine stopped while sending",
                        "fix": "check the customer's mailbox (and the sending mailbox's Sent Items) before resending",
                    }),
                },
            )
            .await?;
        }
        txn.commit().await?;
        for _ in &rows {
            self.engine.metrics().reply(ReplyOutcome::Failed);
        }
        if !rows.is_empty() {
            self.engine.events_appended();
        }

        Ok(())
    }

    /// Builds, sends and records one claimed row. The built bytes are stored with the outcome, in the same
    /// transaction: one durable commit per send (the attempt itself was committed by the claim).
    async fn process(&self, out: &Outgoing, row: outbox::Model) -> Result<()> {
        let built = match self.build(out, &row).await {
            Ok(b) => b,
            Err(e) => {
                let error = format!("the reply cannot be built as a mail: {e}");
                return self
                    .finish_failed(
                        &row,
                        None,
                        &error,
                        &error,
                        "correct the reply and send it again",
                    )
                    .await;
            }
        };
        failpoint(FAILPOINT_BEFORE_SEND);
        match out.sender.send(&built.envelope, &built.raw).await {
            Ok(accepted) => {
                failpoint(FAILPOINT_AFTER_ACCEPT);
                self.record_sent(&row, &built, &accepted).await?;
                self.healthy(out).await;
            }
            Err(e) => {
                self.failed_send(&row, &built, &e).await?;
                self.note_failure(out, &e).await;
            }
        }
        Ok(())
    }

    async fn record_sent(
        &self,
        row: &outbox::Model,
        built: &Built,
        accepted: &Accepted,
    ) -> Result<()> {
        let txn = store::begin_write(&self.engine.db).await?;
        // Losing this commit to a database server crash is safe: the row stays `sending`, and after its lease it is
        // failed as "outcome unknown", never resent. Not waiting for the WAL flush saves a disk flush per send.
        store::commit_asynchronously(&txn).await?;
        store::outbox::store_raw(&txn, row.message_id, &built.raw, &built.from).await?;
        let ok = store::outbox::mark_sent(
            &txn,
            row.id,
            &self.me,
            &accepted.reply,
            accepted.at,
            OUTCOME_UNKNOWN,
        )
        .await?;
        if ok {
            store::events::insert(
                &txn,
                NewEvent {
                    kind: "reply.sent",
                    contact_id: Some(row.contact_id),
                    queue: built.queue.as_deref(),
                    actor: None,
                    data: json!({
                        "reply_id": row.id,
                        "message_id": row.message_id,
                        "attempts": row.attempts,
                        "from": built.from,
                        "server_reply": accepted.reply,
                        "worker": self.me,
                    }),
                },
            )
            .await?;
        } else {
            tracing::warn!(
                reply = row.id,
                reply_text = %accepted.reply,
                "reply {} was accepted by the server but its outbox row changed meanwhile; not recorded as sent",
                row.id
            );
        }
        txn.commit().await?;
        if ok {
            self.engine.metrics().reply(ReplyOutcome::Sent);
        }
        self.engine.events_appended();
        Ok(())
    }

    async fn failed_send(&self, row: &outbox::Model, built: &Built, e: &SmtpError) -> Result<()> {
        let ex = e.explain();
        // The sender already retried a rejected token once with a new one: a repeated rejection is permanent.
        let temporary = match e.kind() {
            SmtpErrorKind::Temporary => true,
            SmtpErrorKind::Token(o) => o.is_transient(),
            SmtpErrorKind::TokenRejected
            | SmtpErrorKind::Permanent
            | SmtpErrorKind::TooLarge { .. } => false,
        };
        let error = e.to_string();
        if temporary && row.attempts < self.settings.max_attempts {
            let delay = self.settings.backoff(row.attempts);
            let next = Utc::now()
                + chrono::Duration::from_std(delay)
                    .unwrap_or_else(|_| chrono::Duration::minutes(30));
            tracing::warn!(
                reply = row.id,
                attempts = row.attempts,
                retry_in = ?delay,
                "sending reply {} failed temporarily; retrying in {delay:?}: {error}",
                row.id
            );
            let txn = store::begin_write(&self.engine.db).await?;
            store::outbox::store_raw(&txn, row.message_id, &built.raw, &built.from).await?;
            if store::outbox::release(&txn, row.id, &self.me, Some(next), &error).await? {
                store::events::insert(
                    &txn,
                    NewEvent {
                        kind: "reply.retrying",
                        contact_id: Some(row.contact_id),
                        queue: built.queue.as_deref(),
                        actor: None,
                        data: json!({
                            "reply_id": row.id,
                            "attempts": row.attempts,
                            "next_attempt_at": next,
                            "error": error,
                            "cause": ex.cause,
                            "fix": ex.fix,
                        }),
                    },
                )
                .await?;
            }
            txn.commit().await?;
            self.engine.metrics().reply(ReplyOutcome::Retried);
            self.engine.events_appended();
            return Ok(());
        }
        let error = if temporary {
            format!("gave up after {} attempts: {error}", row.attempts)
        } else {
            error
        };
        self.finish_failed(row, Some(built), &error, &ex.cause, &ex.fix)
            .await
    }

    /// Records row `row` `failed` with its cause and fix (and the bytes of the mail, when it was built).
    async fn finish_failed(
        &self,
        row: &outbox::Model,
        built: Option<&Built>,
        error: &str,
        cause: &str,
        fix: &str,
    ) -> Result<()> {
        tracing::error!(
            reply = row.id,
            contact = row.contact_id,
            "reply {} failed: {error}",
            row.id
        );
        let txn = store::begin_write(&self.engine.db).await?;
        if let Some(b) = built {
            store::outbox::store_raw(&txn, row.message_id, &b.raw, &b.from).await?;
        }
        if store::outbox::release(&txn, row.id, &self.me, None, error).await? {
            store::events::insert(
                &txn,
                NewEvent {
                    kind: "reply.failed",
                    contact_id: Some(row.contact_id),
                    queue: built.and_then(|b| b.queue.as_deref()),
                    actor: None,
                    data: json!({
                        "reply_id": row.id,
                        "message_id": row.message_id,
                        "attempts": row.attempts,
                        "error": error,
                        "cause": cause,
                        "fix": fix,
                    }),
                },
            )
            .await?;
        }
        txn.commit().await?;
        self.engine.metrics().reply(ReplyOutcome::Failed);
        self.engine.events_appended();
        Ok(())
    }

    /// Counts a failure towards the health of the outgoing server: an authentication refusal makes it unhealthy
    /// at once, other failures when every attempt failed for `unhealthy_after`. A reply refused locally as too
    /// large says nothing about the server and is not counted.
    ///
    /// Health is tracked per worker: with several engine instances each reports `outgoing.unhealthy` (and
    /// `outgoing.healthy`) once.
    async fn note_failure(&self, out: &Outgoing, e: &SmtpError) {
        if matches!(e.kind(), SmtpErrorKind::TooLarge { .. }) {
            return;
        }
        let auth = matches!(
            e.kind(),
            SmtpErrorKind::TokenRejected | SmtpErrorKind::Token(_)
        ) || e.code() == Some(535);
        {
            let mut health = self.health();
            let since = *health.failing_since.get_or_insert_with(Instant::now);
            if health.unhealthy || !(auth || since.elapsed() >= self.settings.unhealthy_after) {
                return;
            }
            health.unhealthy = true;
        }
        let ex = e.explain();
        let server = &out.server;
        let contact = server
            .contact_information
            .as_deref()
            .unwrap_or("(no contact_information configured)");
        tracing::error!(
            host = %server.host,
            username = %server.username,
            contact_information = contact,
            "alert {contact}: the outgoing server keeps failing; replies are not being sent: {e}"
        );
        self.health_event(
            "outgoing.unhealthy",
            json!({
                "host": server.host,
                "username": server.username.to_string(),
                "contact_information": server.contact_information,
                "error": e.to_string(),
                "cause": ex.cause,
                "fix": ex.fix,
            }),
        )
        .await;
    }

    /// A message was accepted: the outgoing server works; reports `outgoing.healthy` if it was unhealthy.
    async fn healthy(&self, out: &Outgoing) {
        {
            let mut health = self.health();
            health.failing_since = None;
            if !health.unhealthy {
                return;
            }
            health.unhealthy = false;
        }
        let server = &out.server;
        tracing::info!(host = %server.host, "the outgoing server works again");
        self.health_event(
            "outgoing.healthy",
            json!({
                "host": server.host,
                "username": server.username.to_string(),
                "contact_information": server.contact_information,
                "cause": "a reply was accepted by the outgoing server",
            }),
        )
        .await;
    }

    async fn health_event(&self, kind: &str, data: serde_json::Value) {
        let event = NewEvent {
            kind,
            contact_id: None,
            queue: None,
            actor: None,
            data,
        };
        if let Err(e) = store::events::insert(&self.engine.db, event).await {
            tracing::warn!(error = %e, "cannot record {kind}");
        } else {
            self.engine.events_appended();
        }
    }

    /// The message of row `row` as RFC 5322 bytes, with its envelope. Its size is checked by the sender, against
    /// the `max_email_size_mb` of the outgoing server it is sent through.
    async fn build(&self, out: &Outgoing, row: &outbox::Model) -> Result<Built> {
        let config = self.engine.config().await;
        let dir = self.engine.queues().await;
        let db = &self.engine.db;
        let contact = store::contacts::get(db, row.contact_id)
            .await?
            .ok_or_else(|| Error::not_found(format!("there is no contact {}", row.contact_id)))?;
        let message = store::messages::get(db, row.message_id)
            .await?
            .ok_or_else(|| Error::not_found(format!("there is no message {}", row.message_id)))?;
        let files = store::attachments::list_with_data(db, message.id).await?;
        let queue = dir.by_id(contact.queue_id).map(|q| q.name.clone());
        let (from, reply_to) = sender_address(
            &config,
            queue.as_deref(),
            &contact.arrived_on,
            message.from_address.as_deref(),
            &out.server,
        );
        let to = addresses(&message.to_addresses);
        let cc = addresses(&message.cc_addresses);
        let raw = compose(&message, &from, reply_to.as_deref(), &to, &cc, files)?;
        let parse = |a: &str| {
            mailqueue_config::EmailAddress::parse(a)
                .map_err(|e| Error::Invalid(format!("`{a}`: {e}")))
        };
        let envelope = Envelope::new(
            parse(&from)?,
            to.iter()
                .chain(&cc)
                .map(|a| parse(a))
                .collect::<Result<Vec<_>>>()?,
        );
        Ok(Built {
            raw,
            envelope,
            from,
            queue,
        })
    }
}

/// The From of a reply and, when it is not a queue address, its Reply-To. In order:
/// 1. the address the agent chose in the reply request (`chosen`), if it is still a sender-enabled address of the
///    queue;
/// 2. the address the contact arrived on, if its `sender` flag is on;
/// 3. another sender-enabled address of the queue (the first configured);
/// 4. the outgoing server's `username`, with `Reply-To` the address the contact arrived on, so that the customer's
///    answer still reaches the queue.
fn sender_address(
    config: &Config,
    queue: Option<&str>,
    arrived_on: &str,
    chosen: Option<&str>,
    server: &OutgoingServer,
) -> (String, Option<String>) {
    let senders: Vec<&str> = queue
        .and_then(|q| config.queue(q))
        .into_iter()
        .flat_map(|q| q.addresses.iter())
        .filter(|a| a.sender)
        .map(|a| a.address.as_str())
        .collect();
    let enabled = |a: &str| {
        senders
            .iter()
            .find(|s| s.eq_ignore_ascii_case(a))
            .map(|s| (*s).to_owned())
    };
    let arrival = config
        .address(arrived_on)
        .filter(|(_, a)| a.sender)
        .map(|(_, a)| a.address.to_string());
    let from = chosen
        .and_then(enabled)
        .or(arrival)
        .or_else(|| senders.first().map(|s| (*s).to_owned()));
    match from {
        Some(from) => (from, None),
        None => (
            server.username.to_string(),
            Some(arrived_on.to_owned()).filter(|a| !a.is_empty()),
        ),
    }
}

/// The addresses of a stored recipient list (`[{"name": …, "address": …}]`).
fn addresses(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("address").and_then(|x| x.as_str()).map(str::to_owned))
        .collect()
}

/// The reply as RFC 5322 bytes: headers (our Message-ID, threading), the text (or text/html alternative) body, and
/// the files as `multipart/mixed` attachments.
fn compose(
    message: &store::messages::MessageRow,
    from: &str,
    reply_to: Option<&str>,
    to: &[String],
    cc: &[String],
    files: Vec<mailqueue_schema::entity::attachment::Model>,
) -> Result<Vec<u8>> {
    let mbox = |a: &str| -> Result<Mailbox> {
        a.parse::<Mailbox>()
            .map_err(|e| Error::Invalid(format!("`{a}`: {e}")))
    };
    let mut b = Message::builder()
        .from(mbox(from)?)
        .subject(message.subject.clone().unwrap_or_default())
        .date_now();
    if let Some(r) = reply_to {
        b = b.reply_to(mbox(r)?);
    }
    for a in to {
        b = b.to(mbox(a)?);
    }
    for a in cc {
        b = b.cc(mbox(a)?);
    }
    if let Some(id) = &message.message_id {
        b = b.message_id(Some(format!("<{id}>")));
    }
    if let Some(irt) = &message.in_reply_to {
        b = b.in_reply_to(format!("<{irt}>"));
    }
    let refs: Vec<String> = message
        .references
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(|r| format!("<{r}>")))
        .collect();
    if !refs.is_empty() {
        b = b.references(refs.join(" "));
    }
    let text = message.text_body.clone().unwrap_or_default();
    let plain = |text: String| {
        SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(text)
    };
    let email = if files.is_empty() {
        match message.html_body.clone() {
            Some(html) => b.multipart(MultiPart::alternative_plain_html(text, html)),
            None => b.singlepart(plain(text)),
        }
    } else {
        // multipart/mixed: the body (text, or the text/html alternative), then each file as an attachment.
        let mixed = match message.html_body.clone() {
            Some(html) => {
                MultiPart::mixed().multipart(MultiPart::alternative_plain_html(text, html))
            }
            None => MultiPart::mixed().singlepart(plain(text)),
        };
        let mixed = files.into_iter().try_fold(mixed, |mixed, f| {
            let content_type = ContentType::parse(&f.content_type).map_err(|e| {
                Error::Invalid(format!(
                    "attachment {} has a bad content type `{}`: {e}",
                    f.id, f.content_type
                ))
            })?;
            let name = f.filename.unwrap_or_else(|| format!("attachment-{}", f.id));
            Ok::<_, Error>(mixed.singlepart(Attachment::new(name).body(f.data, content_type)))
        })?;
        b.multipart(mixed)
    }
    .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(email.formatted())
}

/// A built reply.
struct Built {
    raw: Vec<u8>,
    envelope: Envelope,
    from: String,
    queue: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Settings::default();
        assert_eq!(s.backoff(1), Duration::from_secs(30));
        assert_eq!(s.backoff(2), Duration::from_secs(60));
        assert_eq!(s.backoff(4), Duration::from_secs(240));
        assert_eq!(s.backoff(7), Duration::from_secs(30 * 60));
        assert_eq!(s.backoff(100), Duration::from_secs(30 * 60));
        assert_eq!(s.backoff(0), Duration::from_secs(30));
    }
}
