//! The ingest pipeline every mail source uses (import, and the IMAP mailbox workers): RFC 822 bytes + the queue
//! address they arrived on → dedupe → size → parse → policies → thread → store contact, message, attachments and
//! events. Nothing is dropped: mail that is too large, cannot be parsed, or must not open a contact goes to
//! quarantine with the reason, and [`Outcome::move_to_quarantine_folder`] tells an IMAP worker to move it to
//! `ingest.quarantine_folder`.
//!
//! **Batches.** [`Engine::ingest_batch`] stores several mails and, optionally, the IMAP [`Cursor`] up to them in one
//! transaction: all contacts, messages, attachments, events, quarantine rows and the cursor commit together or not
//! at all. An IMAP worker stores first and acts on the server (`\Seen`, move, delete) after the commit; a crash
//! before the commit fetches the same UIDs again, and their source keys make the second ingest a no-op.
//! [`Engine::ingest`] is a batch of one without a cursor.
//!
//! **Dedupe** is by source key only: `imap:<mailbox>:<uidvalidity>:<uid>` from IMAP, `sha256:<hex>` of the raw
//! bytes otherwise. All keys of a batch are checked with one query before parsing (known mail is not parsed) and
//! again inside the transaction; a key twice in one batch is stored once. The unique indexes on
//! `messages.source_key` and `quarantine.source_key` are the final guard: when a concurrent ingest on another
//! instance stores one of the batch's mails first, the batch's insert fails with a unique violation and the batch
//! is run again from the start, where that mail is a [`Outcome::Duplicate`] — one duplicate never fails the batch.
//! Batches with a cursor hold the cursor's lock for their transaction, so two instances storing the same folder
//! take turns (the second finds the first one's mail stored). Deadlocks and serialization failures are retried the
//! same way, up to six runs in all.
//!
//! **Speed.** Deciding is done in memory after a few reads for the whole batch; writing is a few multi-row
//! statements per table (see `batch`), so a batch of 500 mails takes about 25 statements, not two per mail.
//!
//! **Threading.** The Message-ID is a threading hint only, never a dedupe key. A mail joins a stored contact when
//! its In-Reply-To or one of its References names a stored message (inbound or outbound), also one stored earlier
//! in the same batch. The same mail sent to two queue addresses arrives twice: from IMAP with two source keys, so
//! the second copy is stored too and joins the first copy's contact (same Message-ID and From) without re-opening
//! it; from `import`, both copies have the same content hash, so the second is a `Duplicate` even on another
//! address. That is accepted: an import names one address for all its mail anyway.
//!
//! **Policies** (`ingest:` in the configuration):
//! * Automated mail ([`policy::classify`]: auto-replies, auto-generated and bulk mail, bounces, loops from our own
//!   queue addresses) never opens a contact and never re-opens one. With `automated_mail: attach` (the default) it
//!   joins the contact it threads onto ([`Outcome::Attached`], event `contact.message_added` with
//!   `"automated": "<kind>"`) and goes to quarantine when it threads onto nothing; with `quarantine` it always goes
//!   to quarantine.
//! * A bounce (delivery status notification) whose original Message-ID (enclosed message or headers,
//!   `Original-Message-ID`) names one of our replies joins that reply's contact, and the event is `reply.bounced`
//!   with the outbox id and the report's status and diagnostic. The outbox row itself is left as it is.
//! * `sender_limit` quarantines mail from a sender address that already has `max` inbound messages stored within
//!   `per` — a count in the database, so it holds across instances (approximately: two instances may both let
//!   the last mail through). The address is matched exactly as written. Bounces are not limited (a provider's
//!   bounces all come from one postmaster address), and `import` is not limited either.

mod batch;
pub mod parse;
pub mod policy;

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use self::{
    parse::{Mailbox, ParsedAttachment, ParsedMail, Report, parse_mail},
    policy::{Automated, AutomatedKind, classify},
};
pub use crate::store::mailbox_cursors::Cursor;
use crate::{
    engine::{Engine, Route},
    error::{Error, Result},
    store,
};
use batch::{Prepared, Settings, Step};

/// A batch is run at most this often when it conflicts with a concurrent writer.
const MAX_ATTEMPTS: u32 = 6;
/// Batches with at least this many mails to parse are parsed on several threads.
const PARALLEL_PARSE_MIN: usize = 16;

/// One mail to ingest.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// The raw RFC 822 bytes.
    pub raw: &'a [u8],
    /// The configured queue address the mail arrived on.
    pub address: &'a str,
    /// Dedupe key, e.g. `imap:<mailbox>:<uidvalidity>:<uid>`; `None` uses `sha256:<hex of raw>`.
    pub source_key: Option<String>,
}

/// What became of one mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A new contact was opened.
    Created { contact_id: i64, message_id: i64 },
    /// The mail joined an existing contact (reply to a stored message); `reopened` if that contact was closed.
    Threaded {
        contact_id: i64,
        message_id: i64,
        reopened: bool,
    },
    /// Automated mail joined the contact it belongs to, which was not re-opened (a bounce: the contact of the
    /// reply it reports on).
    Attached {
        contact_id: i64,
        message_id: i64,
        kind: AutomatedKind,
    },
    /// The same mail (same source key) was stored before; nothing changed.
    Duplicate,
    /// Kept in quarantine with the reason.
    Quarantined { quarantine_id: i64, reason: String },
}

impl Outcome {
    /// Whether an IMAP worker should move the mail to `ingest.quarantine_folder` (instead of its `after_fetch`):
    /// true for every [`Outcome::Quarantined`] (too large, unparsable, automated without a contact, over the
    /// sender limit).
    pub fn move_to_quarantine_folder(&self) -> bool {
        matches!(self, Self::Quarantined { .. })
    }
}

/// `sha256:<hex>` of the raw bytes: the source key of mail without one of its own.
pub fn content_key(raw: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(raw)))
}

impl Engine {
    /// Ingests one mail. See the module doc.
    pub async fn ingest(&self, mail: Incoming<'_>) -> Result<Outcome> {
        let mut outcomes = self.ingest_mails(vec![mail], None, true).await?;
        outcomes
            .pop()
            .ok_or_else(|| Error::Other(anyhow::anyhow!("ingest returned no outcome")))
    }

    /// Ingests `mails` and stores `cursor` in one transaction; returns one outcome per mail, in order. Fails as a
    /// whole, with nothing stored, when an address is not a configured queue address (`Invalid`) or the database
    /// fails. See the module doc.
    pub async fn ingest_batch(
        &self,
        mails: Vec<Incoming<'_>>,
        cursor: Option<Cursor>,
    ) -> Result<Vec<Outcome>> {
        self.ingest_mails(mails, cursor, true).await
    }

    /// [`Engine::ingest`] without `ingest.sender_limit`, for `import`: an archive holds many mails of one sender.
    pub(crate) async fn ingest_unlimited(&self, mail: Incoming<'_>) -> Result<Outcome> {
        let mut outcomes = self.ingest_mails(vec![mail], None, false).await?;
        outcomes
            .pop()
            .ok_or_else(|| Error::Other(anyhow::anyhow!("ingest returned no outcome")))
    }

    /// The stored cursor of an IMAP mailbox folder.
    pub async fn cursor(&self, mailbox: &str, folder: &str) -> Result<Option<Cursor>> {
        Ok(store::mailbox_cursors::get(&self.db, mailbox, folder).await?)
    }

    async fn ingest_mails(
        &self,
        mails: Vec<Incoming<'_>>,
        cursor: Option<Cursor>,
        sender_limit: bool,
    ) -> Result<Vec<Outcome>> {
        let config = self.config().await;
        let dir = self.queues().await;
        let mut routes: Vec<Route> = Vec::new();
        let mut route_index: HashMap<String, usize> = HashMap::new();
        let mut prepared: Vec<Prepared<'_>> = Vec::with_capacity(mails.len());
        for mail in &mails {
            let address = mail.address.to_ascii_lowercase();
            let route = match route_index.get(&address) {
                Some(&i) => i,
                None => {
                    let route = self.route(mail.address).await.ok_or_else(|| {
                        Error::Invalid(format!(
                            "`{}` is not a configured queue address",
                            mail.address
                        ))
                    })?;
                    routes.push(route);
                    route_index.insert(address, routes.len() - 1);
                    routes.len() - 1
                }
            };
            prepared.push(Prepared {
                raw: mail.raw,
                route,
                key: mail
                    .source_key
                    .clone()
                    .unwrap_or_else(|| content_key(mail.raw)),
                step: Step::Known,
            });
        }

        // Known mail is neither parsed nor written (a re-fetch after a crash is all known).
        let keys: Vec<String> = prepared.iter().map(|p| p.key.clone()).collect();
        let known = if keys.is_empty() {
            HashSet::new()
        } else {
            store::messages::known_source_keys(&self.db, &keys).await?
        };
        let limit_mb = config.defaults.max_email_size_mb;
        let mut to_parse: Vec<usize> = Vec::new();
        for (i, p) in prepared.iter_mut().enumerate() {
            if known.contains(&p.key) {
                continue;
            }
            if p.raw.len() as u64 > u64::from(limit_mb) * 1024 * 1024 {
                let reason = format!("too large: {} bytes, limit {limit_mb} MB", p.raw.len());
                p.step = Step::Quarantine(reason);
            } else {
                to_parse.push(i);
            }
        }
        let own: Vec<&str> = config
            .queues
            .iter()
            .flat_map(|q| q.addresses.iter().map(|a| a.address.as_str()))
            .collect();
        let raws: Vec<&[u8]> = to_parse.iter().map(|&i| prepared[i].raw).collect();
        for (i, parsed) in to_parse.into_iter().zip(parse_all(&raws)) {
            prepared[i].step = match parsed {
                Ok(mail) => {
                    let automated = classify(&mail, &own);
                    Step::Parsed(Box::new(mail), automated)
                }
                Err(reason) => Step::Quarantine(reason),
            };
        }
        if cursor.is_none() && prepared.iter().all(|p| matches!(p.step, Step::Known)) {
            return Ok(vec![Outcome::Duplicate; prepared.len()]);
        }

        let settings = Settings {
            routes: &routes,
            dir: &dir,
            automated_mail: config.ingest.automated_mail,
            sender_limit: config.ingest.sender_limit.filter(|_| sender_limit),
        };
        let mut attempt = 1;
        let (outcomes, appended) = loop {
            let txn = store::begin_write(&self.db).await?;
            let stored = match batch::store(&txn, &settings, &prepared, cursor.as_ref()).await {
                Ok(stored) => txn.commit().await.map(|()| stored),
                Err(e) => {
                    let _ = txn.rollback().await;
                    Err(e)
                }
            };
            match stored {
                Ok(stored) => break stored,
                Err(e) if attempt < MAX_ATTEMPTS && store::is_retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "ingest batch met a concurrent writer; running it again");
                    // Jitter, so two batches that deadlocked do not meet again at once.
                    let pause = 10 * u64::from(attempt) + rand::random_range(0..20);
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if appended {
            self.events_appended();
        }
        for (p, outcome) in prepared.iter().zip(&outcomes) {
            let queue = &routes[p.route].queue;
            match outcome {
                Outcome::Quarantined {
                    quarantine_id,
                    reason,
                } => {
                    tracing::warn!(%queue, quarantine_id, %reason, "mail quarantined");
                }
                _ => tracing::debug!(%queue, ?outcome, "mail ingested"),
            }
        }
        Ok(outcomes)
    }
}

/// Parses mails, on several threads when there are many (inside `block_in_place` on a multi-threaded runtime, so
/// the runtime's other tasks move on meanwhile).
fn parse_all(raws: &[&[u8]]) -> Vec<std::result::Result<ParsedMail, String>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if raws.len() < PARALLEL_PARSE_MIN || threads < 2 {
        return raws.iter().map(|raw| parse_mail(raw)).collect();
    }
    let parse = || {
        let chunk = raws.len().div_ceil(threads);
        std::thread::scope(|s| {
            let workers: Vec<_> = raws
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().map(|raw| parse_mail(raw)).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    // parse_mail catches panics, so a worker cannot fail.
                    w.join().unwrap_or_default()
                })
                .collect::<Vec<_>>()
        })
    };
    let parsed = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(parse)
        }
        _ => parse(),
    };
    if parsed.len() == raws.len() {
        parsed
    } else {
        raws.iter().map(|raw| parse_mail(raw)).collect()
    }
}
