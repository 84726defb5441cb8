//! The outbox worker: claims due replies, builds them as RFC 5322 messages, sends them through the outgoing SMTP
//! server and records the outcome. Safe on several instances (rows are claimed atomically, see
//! [`store::outbox::claim`]).
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
//! is marked failed, and an agent who resends creates a second copy. Nothing is resent automatically.

use std::time::{Duration, Instant};

use chrono::Utc;
use lettre::message::{Attachment, Mailbox, Message, MultiPart, SinglePart, header::ContentType};
use mailqueue_config::{Config, model::OutgoingServer};
use mailqueue_connectors::smtp::{Envelope, SmtpError, SmtpErrorKind, SmtpSender};
use mailqueue_schema::entity::outbox;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    engine::Engine,
    error::{Error, Result},
    store::{self, events::NewEvent},
};

/// What a row left in `sending` past its lease becomes.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown: the engine stopped while sending; check the customer's mailbox before resending";

/// Timing of the worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often due rows are looked for when idle.
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

/// Starts the outbox worker when an outgoing server is configured.
pub fn spawn(engine: Engine, config: &Config, stop: CancellationToken) -> Option<JoinHandle<()>> {
    spawn_with(engine, config, Settings::default(), stop)
}

/// [`spawn`] with explicit timing (tests).
pub fn spawn_with(
    engine: Engine,
    config: &Config,
    settings: Settings,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    let server = config.outgoing_server.clone()?;
    let ca_files: Vec<_> = server.ca_file.iter().cloned().collect();
    let tokens = crate::mailboxes::supervisor::token_cache(&ca_files);
    let sender = match SmtpSender::new(&server, tokens) {
        Ok(s) => s,
        Err(e) => {
            let ex = e.explain();
            tracing::error!(error = %e, "the outgoing server is unusable; replies are not sent: {ex}");
            return None;
        }
    };
    let worker = Worker {
        me: format!(
            "outbox-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ),
        engine,
        sender,
        server,
        settings,
        health: Health::default(),
    };
    tracing::info!(worker = %worker.me, host = %worker.server.host, "sending replies through the outgoing server");
    Some(tokio::spawn(worker.run(stop)))
}

#[derive(Default)]
struct Health {
    /// When the current run of failures started.
    failing_since: Option<Instant>,
    unhealthy: bool,
}

/// One outbox worker.
pub struct Worker {
    me: String,
    engine: Engine,
    sender: SmtpSender,
    server: OutgoingServer,
    settings: Settings,
    health: Health,
}

/// What became of one claimed row.
enum Outcome {
    Sent,
    Retry,
    Failed,
}

impl Worker {
    async fn run(mut self, stop: CancellationToken) {
        // Rows stuck in `sending` are looked for at start and then every lease/10 (at least every second, at most
        // every minute), not on every poll: on SQLite each sweep is a write transaction.
        let sweep_every =
            (self.settings.lease / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut last_sweep: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= sweep_every) {
                last_sweep = Some(Instant::now());
                if let Err(e) = self.expire().await {
                    tracing::warn!(error = %e, "cannot check for replies stuck in sending");
                }
            }
            // Send what is due; a send in progress finishes before stopping.
            loop {
                if stop.is_cancelled() {
                    break;
                }
                match self.step().await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox: database error");
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        tracing::info!(worker = %self.me, "outbox worker stopped");
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
                        "cause": "outcome unknown: the engine stopped while sending",
                        "fix": "check the customer's mailbox (and the sending mailbox's Sent Items) before resending",
                    }),
                },
            )
            .await?;
        }
        txn.commit().await?;
        if !rows.is_empty() {
            self.engine.events_appended();
        }
        Ok(())
    }

    /// Claims and processes one due row; false when none is due.
    pub async fn step(&mut self) -> Result<bool> {
        let lease = chrono::Duration::from_std(self.settings.lease)
            .unwrap_or_else(|_| chrono::Duration::minutes(10));
        let Some(row) = store::outbox::claim(&self.engine.db, &self.me, lease).await? else {
            return Ok(false);
        };
        self.process(row).await?;
        Ok(true)
    }

    async fn process(&mut self, row: outbox::Model) -> Result<Outcome> {
        let built = match self.build(&row).await {
            Ok(b) => b,
            Err(e) => {
                let error = format!("the reply cannot be built as a mail: {e}");
                self.finish_failed(
                    &row,
                    &error,
                    &error,
                    "correct the reply and send it again",
                    None,
                )
                .await?;
                return Ok(Outcome::Failed);
            }
        };
        store::outbox::store_raw(&self.engine.db, row.message_id, &built.raw, &built.from).await?;
        let result = self.sender.send(&built.envelope, &built.raw).await;
        match result {
            Ok(accepted) => {
                let txn = store::begin_write(&self.engine.db).await?;
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
                self.engine.events_appended();
                self.healthy().await;
                Ok(Outcome::Sent)
            }
            Err(e) => {
                let outcome = self.failed_send(&row, &built, &e).await?;
                self.note_failure(&e).await;
                Ok(outcome)
            }
        }
    }

    async fn failed_send(
        &self,
        row: &outbox::Model,
        built: &Built,
        e: &SmtpError,
    ) -> Result<Outcome> {
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
            self.engine.events_appended();
            return Ok(Outcome::Retry);
        }
        let error = if temporary {
            format!("gave up after {} attempts: {error}", row.attempts)
        } else {
            error
        };
        self.finish_failed(row, &error, &ex.cause, &ex.fix, built.queue.as_deref())
            .await?;
        Ok(Outcome::Failed)
    }

    async fn finish_failed(
        &self,
        row: &outbox::Model,
        error: &str,
        cause: &str,
        fix: &str,
        queue: Option<&str>,
    ) -> Result<()> {
        tracing::error!(
            reply = row.id,
            contact = row.contact_id,
            "reply {} failed: {error}",
            row.id
        );
        let txn = store::begin_write(&self.engine.db).await?;
        if store::outbox::release(&txn, row.id, &self.me, None, error).await? {
            store::events::insert(
                &txn,
                NewEvent {
                    kind: "reply.failed",
                    contact_id: Some(row.contact_id),
                    queue,
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
        self.engine.events_appended();
        Ok(())
    }

    /// Counts a failure towards the health of the outgoing server: an authentication refusal makes it unhealthy
    /// at once, other failures when every attempt failed for `unhealthy_after`.
    ///
    /// Health is tracked per worker: with several engine instances each reports `outgoing.unhealthy` (and
    /// `outgoing.healthy`) once.
    async fn note_failure(&mut self, e: &SmtpError) {
        let auth = matches!(
            e.kind(),
            SmtpErrorKind::TokenRejected | SmtpErrorKind::Token(_)
        ) || e.code() == Some(535);
        let since = *self.health.failing_since.get_or_insert_with(Instant::now);
        if self.health.unhealthy || !(auth || since.elapsed() >= self.settings.unhealthy_after) {
            return;
        }
        self.health.unhealthy = true;
        let ex = e.explain();
        let contact = self
            .server
            .contact_information
            .as_deref()
            .unwrap_or("(no contact_information configured)");
        tracing::error!(
            host = %self.server.host,
            username = %self.server.username,
            contact_information = contact,
            "alert {contact}: the outgoing server keeps failing; replies are not being sent: {e}"
        );
        self.health_event(
            "outgoing.unhealthy",
            json!({
                "host": self.server.host,
                "username": self.server.username.to_string(),
                "contact_information": self.server.contact_information,
                "error": e.to_string(),
                "cause": ex.cause,
                "fix": ex.fix,
            }),
        )
        .await;
    }

    async fn healthy(&mut self) {
        self.health.failing_since = None;
        if !self.health.unhealthy {
            return;
        }
        self.health.unhealthy = false;
        tracing::info!(host = %self.server.host, "the outgoing server works again");
        self.health_event(
            "outgoing.healthy",
            json!({ "host": self.server.host, "username": self.server.username.to_string() }),
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

    /// The message of row `row` as RFC 5322 bytes, with its envelope.
    async fn build(&self, row: &outbox::Model) -> Result<Built> {
        let config = self.engine.config().await;
        let dir = self.engine.queues().await;
        let contact = store::contacts::get(&self.engine.db, row.contact_id)
            .await?
            .ok_or_else(|| Error::not_found(format!("there is no contact {}", row.contact_id)))?;
        let message = store::messages::list_for_contact(&self.engine.db, row.contact_id)
            .await?
            .into_iter()
            .find(|m| m.id == row.message_id)
            .ok_or_else(|| Error::not_found(format!("there is no message {}", row.message_id)))?;
        let queue = dir.by_id(contact.queue_id).map(|q| q.name.clone());
        let addresses: Vec<_> = queue
            .as_deref()
            .and_then(|q| config.queue(q))
            .map(|q| q.addresses.clone())
            .unwrap_or_default();
        let sender_of = |a: &str| {
            addresses
                .iter()
                .find(|x| x.sender && x.address.as_str().eq_ignore_ascii_case(a))
                .map(|x| x.address.to_string())
        };
        let arrival = config
            .address(&contact.arrived_on)
            .filter(|(_, a)| a.sender)
            .map(|(_, a)| a.address.to_string());
        let chosen = message.from_address.as_deref().and_then(sender_of);
        let any = addresses
            .iter()
            .find(|a| a.sender)
            .map(|a| a.address.to_string());
        let username = self.server.username.to_string();
        let (from, reply_to) = match arrival.or(chosen).or(any) {
            Some(from) => (from, None),
            None => (
                username.clone(),
                Some(contact.arrived_on.clone()).filter(|a| !a.is_empty()),
            ),
        };

        let list = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.get("address").and_then(|x| x.as_str()).map(str::to_owned))
                .collect()
        };
        let to = list(&message.to_addresses);
        let cc = list(&message.cc_addresses);
        let mbox = |a: &str| -> Result<Mailbox> {
            a.parse::<Mailbox>()
                .map_err(|e| Error::Invalid(format!("`{a}`: {e}")))
        };
        let mut b = Message::builder()
            .from(mbox(&from)?)
            .subject(message.subject.clone().unwrap_or_default())
            .date_now();
        if let Some(r) = &reply_to {
            b = b.reply_to(mbox(r)?);
        }
        for a in &to {
            b = b.to(mbox(a)?);
        }
        for a in &cc {
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
        let files = store::attachments::list_with_data(&self.engine.db, message.id).await?;
        let email = if files.is_empty() {
            match message.html_body.clone() {
                Some(html) => b.multipart(MultiPart::alternative_plain_html(text, html)),
                None => b.singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(text),
                ),
            }
        } else {
            // multipart/mixed: the body (text, or the text/html alternative), then each file as an attachment.
            let mixed = match message.html_body.clone() {
                Some(html) => {
                    MultiPart::mixed().multipart(MultiPart::alternative_plain_html(text, html))
                }
                None => MultiPart::mixed().singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(text),
                ),
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
        let raw = email.formatted();
        let limit = u64::from(self.server.max_email_size_mb) * 1024 * 1024;
        if raw.len() as u64 > limit {
            return Err(Error::TooLarge(format!(
                "the reply is {} bytes as a mail; the outgoing limit is {} MB",
                raw.len(),
                self.server.max_email_size_mb
            )));
        }
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
