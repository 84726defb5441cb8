//! Storing a batch of prepared mails in one transaction: duplicates, quarantine, the policies, threading (also
//! onto mails earlier in the same batch), contacts, messages, attachments, events and the mailbox cursor.
//!
//! Two phases. **Plan**: a few reads (statements for the whole batch: source keys, sender counts, the stored
//! messages the batch's Message-IDs name, the replies bounces name, and the contacts they join, locked in id
//! order), then every decision in memory, in batch order. **Execute**: bulk writes in batch order — new contacts,
//! messages (`INSERT … RETURNING`), quarantine rows, re-opens, attachments, events — and the cursor. A statement
//! takes up to 256 rows, so a batch of 500 new mails is about 20 statements. A source key taken meanwhile by a
//! concurrent ingest fails the transaction with a unique violation, and the caller runs the batch again (its keys
//! are then known: duplicates).
//!
//! With a cursor, the batch first takes the cursor's lock (`mailbox_cursors::lock`), so batches of one folder from
//! several instances take turns.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use mailqueue_config::{AutomatedMail, SenderLimit};
use sea_orm::{DatabaseTransaction, DbErr};
use serde_json::{Value, json};

use super::{
    Outcome,
    parse::ParsedMail,
    policy::{Automated, AutomatedKind},
};
use crate::{
    engine::{QueueDirectory, Route},
    store::{
        self,
        attachments::NewAttachment,
        contacts::NewContact,
        events::NewEvent,
        mailbox_cursors::Cursor,
        messages::{OutboundHit, ThreadHit},
        quarantine::NewQuarantine,
    },
};

/// The actor named in ingest events.
const ACTOR: &str = "ingest";
/// Message-IDs per threading lookup.
const IDS_PER_QUERY: usize = 512;

/// One mail after the steps that need no database.
pub(super) struct Prepared<'a> {
    pub raw: &'a [u8],
    /// Index into [`Settings::routes`].
    pub route: usize,
    pub key: String,
    pub step: Step,
}

pub(super) enum Step {
    /// Its source key was stored before the batch started.
    Known,
    /// Goes to quarantine with this reason (too large, unparsable).
    Quarantine(String),
    /// Parsed, and automated or not.
    Parsed(Box<ParsedMail>, Option<Automated>),
}

/// What the batch needs from the configuration.
pub(super) struct Settings<'a> {
    pub routes: &'a [Route],
    pub dir: &'a QueueDirectory,
    pub automated_mail: AutomatedMail,
    pub sender_limit: Option<SenderLimit>,
}

/// Stores `prepared` and the cursor in `txn`. Returns an outcome per mail, in order, and whether events were
/// appended. The caller commits.
pub(super) async fn store(
    txn: &DatabaseTransaction,
    settings: &Settings<'_>,
    prepared: &[Prepared<'_>],
    cursor: Option<&Cursor>,
) -> Result<(Vec<Outcome>, bool), DbErr> {
    if let Some(c) = cursor {
        store::mailbox_cursors::lock(txn, &c.mailbox, &c.folder).await?;
    }
    let mut planner = Planner::load(txn, settings, prepared).await?;
    let plans = prepared
        .iter()
        .map(|p| planner.plan(p))
        .collect::<Result<Vec<_>, _>>()?;
    let stored = execute(txn, settings, prepared, planner, plans).await?;
    if let Some(cursor) = cursor {
        store::mailbox_cursors::upsert(txn, cursor).await?;
    }
    Ok(stored)
}

/// A contact a mail joins: stored already, or the n-th new contact of this batch.
#[derive(Debug, Clone, Copy)]
enum ContactRef {
    Stored(i64),
    New(usize),
}

/// What becomes of one mail.
enum Plan {
    Duplicate,
    /// Kept in quarantine; `bounced` when it is a bounce of one of our replies (`automated_mail: quarantine`).
    Quarantine {
        reason: String,
        automated: Option<AutomatedKind>,
        bounced: Option<OutboundHit>,
    },
    /// Stored as a message of `contact`.
    Message {
        contact: ContactRef,
        effect: Effect,
    },
}

enum Effect {
    /// Opened the new contact.
    Created,
    /// Joined the contact as a customer's reply; re-opens it.
    Threaded { reopen: bool },
    /// Automated mail that joined the contact.
    Attached(AutomatedKind),
    /// A bounce of our reply, joined to the reply's contact.
    Bounced(OutboundHit),
}

/// A message stored earlier in this batch, for threading.
struct Stored {
    contact: ContactRef,
    from: Option<String>,
}

/// A stored contact mails of this batch join: its queue and whether it is closed (as planned so far).
struct ContactState {
    queue_id: i64,
    closed: bool,
}

/// The contact a mail joins, and whether joining may re-open it.
struct Thread {
    contact: ContactRef,
    reopen: bool,
}

struct Planner<'s> {
    settings: &'s Settings<'s>,
    /// Source keys stored (before or planned in this batch).
    keys: HashSet<String>,
    /// Inbound messages per sender address within the sender-limit window, this batch's included.
    sent: HashMap<String, i64>,
    /// Stored messages by Message-ID, newest first, as read at the start.
    hits: HashMap<String, Vec<ThreadHit>>,
    /// Our replies by Message-ID, for bounces.
    replies: HashMap<String, OutboundHit>,
    /// This batch's messages by Message-ID, oldest first.
    stored: HashMap<String, Vec<Stored>>,
    contacts: HashMap<i64, ContactState>,
    new_contacts: Vec<NewContact>,
    reopen: Vec<i64>,
}

impl<'s> Planner<'s> {
    /// Reads, with one statement each, what deciding on every mail needs, and locks the contacts they may join.
    async fn load(
        txn: &DatabaseTransaction,
        settings: &'s Settings<'s>,
        prepared: &[Prepared<'_>],
    ) -> Result<Self, DbErr> {
        let pending: Vec<&Prepared<'_>> = prepared
            .iter()
            .filter(|p| !matches!(p.step, Step::Known))
            .collect();
        let keys: Vec<String> = pending.iter().map(|p| p.key.clone()).collect();
        let keys = if keys.is_empty() {
            HashSet::new()
        } else {
            store::messages::known_source_keys(txn, &keys).await?
        };
        let parsed: Vec<(&ParsedMail, Option<&Automated>)> = pending
            .iter()
            .filter(|p| !keys.contains(&p.key))
            .filter_map(|p| match &p.step {
                Step::Parsed(mail, automated) => Some((&**mail, automated.as_ref())),
                _ => None,
            })
            .collect();

        let mut sent = HashMap::new();
        if let Some(limit) = settings.sender_limit {
            let mut senders: Vec<String> = parsed
                .iter()
                .filter_map(|(m, _)| from_address(m).map(str::to_owned))
                .collect();
            senders.sort_unstable();
            senders.dedup();
            if !senders.is_empty() {
                let window = chrono::Duration::from_std(limit.per.0)
                    .unwrap_or_else(|_| chrono::Duration::days(1));
                sent = store::messages::inbound_counts_since(txn, &senders, Utc::now() - window)
                    .await?;
            }
        }

        let mut wanted: Vec<String> = parsed
            .iter()
            .flat_map(|(m, _)| {
                m.in_reply_to
                    .iter()
                    .chain(&m.references)
                    .chain(&m.message_id)
            })
            .cloned()
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut hits: HashMap<String, Vec<ThreadHit>> = HashMap::new();
        for chunk in wanted.chunks(IDS_PER_QUERY) {
            // Newest first within a chunk, and each Message-ID is in one chunk only.
            for hit in store::messages::find_by_message_ids(txn, chunk).await? {
                hits.entry(hit.message_id.clone()).or_default().push(hit);
            }
        }

        let mut originals: Vec<String> = parsed
            .iter()
            .filter(|(_, a)| a.is_some_and(|a| a.kind == AutomatedKind::Bounce))
            .filter_map(|(m, _)| m.original_message_id.clone())
            .collect();
        originals.sort_unstable();
        originals.dedup();
        let mut replies: HashMap<String, OutboundHit> = HashMap::new();
        for chunk in originals.chunks(IDS_PER_QUERY) {
            for hit in store::messages::find_outbound_by_message_ids(txn, chunk).await? {
                replies.entry(hit.message_id.clone()).or_insert(hit);
            }
        }

        let ids: Vec<i64> = hits
            .values()
            .flatten()
            .map(|h| h.contact_id)
            .chain(replies.values().map(|r| r.contact_id))
            .collect();
        let contacts = store::contacts::get_many_for_update(txn, &ids)
            .await?
            .into_iter()
            .map(|c| {
                let state = ContactState {
                    queue_id: c.queue_id,
                    closed: c.state == "closed",
                };
                (c.id, state)
            })
            .collect();

        Ok(Self {
            settings,
            keys,
            sent,
            hits,
            replies,
            stored: HashMap::new(),
            contacts,
            new_contacts: Vec::new(),
            reopen: Vec::new(),
        })
    }

    fn plan(&mut self, p: &Prepared<'_>) -> Result<Plan, DbErr> {
        if matches!(p.step, Step::Known) || !self.keys.insert(p.key.clone()) {
            return Ok(Plan::Duplicate);
        }
        let route = &self.settings.routes[p.route];
        let quarantine = |reason, automated: Option<&Automated>| Plan::Quarantine {
            reason,
            automated: automated.map(|a| a.kind),
            bounced: None,
        };
        let (mail, automated) = match &p.step {
            Step::Known => return Ok(Plan::Duplicate),
            Step::Quarantine(reason) => return Ok(quarantine(reason.clone(), None)),
            Step::Parsed(mail, automated) => (&**mail, automated.as_ref()),
        };
        // Bounces are exempt: every bounce of a provider comes from the same postmaster, often in bursts.
        let bounce = automated.is_some_and(|a| a.kind == AutomatedKind::Bounce);
        if let (Some(limit), Some(from), false) =
            (self.settings.sender_limit, from_address(mail), bounce)
        {
            let n = self.sent.get(from).copied().unwrap_or(0);
            if n >= i64::from(limit.max) {
                let reason = format!(
                    "sender rate limit: {from} has {n} mails stored within the last {}; the limit is {}",
                    limit.per, limit.max
                );
                return Ok(quarantine(reason, automated));
            }
        }
        let Some(automated) = automated else {
            return self.customer_mail(route, mail);
        };

        // Automated mail never opens or re-opens a contact.
        let kind = automated.kind;
        let policy = self.settings.automated_mail;
        let by_policy =
            || format!("automated mail ({automated}); `ingest.automated_mail` is `quarantine`");
        let reply = mail
            .original_message_id
            .as_ref()
            .filter(|_| kind == AutomatedKind::Bounce)
            .and_then(|id| self.replies.get(id))
            .cloned();
        if let Some(reply) = reply {
            if policy == AutomatedMail::Quarantine {
                return Ok(Plan::Quarantine {
                    reason: by_policy(),
                    automated: Some(kind),
                    bounced: Some(reply),
                });
            }
            let contact = ContactRef::Stored(reply.contact_id);
            self.contact(contact)?;
            self.record(mail, contact);
            let effect = Effect::Bounced(reply);
            return Ok(Plan::Message { contact, effect });
        }
        if policy == AutomatedMail::Quarantine {
            return Ok(quarantine(by_policy(), Some(automated)));
        }
        let Some(thread) = self.find_thread(mail) else {
            let mut reason = format!("automated mail ({automated}) that belongs to no contact");
            if kind == AutomatedKind::Bounce
                && let Some(original) = &mail.original_message_id
            {
                reason.push_str(&format!(
                    " (it reports on <{original}>, which is none of our replies)"
                ));
            }
            return Ok(quarantine(reason, Some(automated)));
        };
        self.contact(thread.contact)?;
        self.record(mail, thread.contact);
        Ok(Plan::Message {
            contact: thread.contact,
            effect: Effect::Attached(kind),
        })
    }

    /// Mail from a person: a new contact, or the thread it belongs to (re-opened if closed).
    fn customer_mail(&mut self, route: &Route, mail: &ParsedMail) -> Result<Plan, DbErr> {
        let Some(thread) = self.find_thread(mail) else {
            let customer = mail
                .reply_to
                .as_ref()
                .filter(|m| m.address.is_some())
                .or(mail.from.as_ref());
            self.new_contacts.push(NewContact {
                queue_id: route.queue_id,
                priority: route.priority,
                language: route.language.clone(),
                arrived_on: route.address.clone(),
                customer_address: customer.and_then(|c| c.address.clone()),
                customer_name: customer.and_then(|c| c.name.clone()),
                subject: mail.subject.clone(),
                queued_at: Utc::now(),
            });
            let contact = ContactRef::New(self.new_contacts.len() - 1);
            self.record(mail, contact);
            let effect = Effect::Created;
            return Ok(Plan::Message { contact, effect });
        };
        let reopen = match thread.contact {
            ContactRef::New(_) => false,
            ContactRef::Stored(id) => {
                let c = self
                    .contacts
                    .get_mut(&id)
                    .ok_or_else(|| DbErr::RecordNotFound(format!("contact {id}")))?;
                let reopen = c.closed && thread.reopen;
                if reopen {
                    c.closed = false;
                    self.reopen.push(id);
                }
                reopen
            }
        };
        self.record(mail, thread.contact);
        Ok(Plan::Message {
            contact: thread.contact,
            effect: Effect::Threaded { reopen },
        })
    }

    /// Notes a message planned for `contact`: for threading later mails of the batch, and the sender's count.
    fn record(&mut self, mail: &ParsedMail, contact: ContactRef) {
        let from = from_address(mail).map(str::to_owned);
        if let Some(from) = &from {
            *self.sent.entry(from.clone()).or_default() += 1;
        }
        if let Some(id) = &mail.message_id {
            self.stored
                .entry(id.clone())
                .or_default()
                .push(Stored { contact, from });
        }
    }

    /// The contact a mail joins: the newest stored message (this batch's first) that its In-Reply-To, else one of
    /// its References (newest first), names; else an inbound copy of the same mail (same Message-ID and From)
    /// stored under another source key, which it joins without re-opening.
    fn find_thread(&self, mail: &ParsedMail) -> Option<Thread> {
        let mut wanted: Vec<&String> = Vec::new();
        for id in mail.in_reply_to.iter().chain(mail.references.iter().rev()) {
            if !wanted.contains(&id) && Some(id) != mail.message_id.as_ref() {
                wanted.push(id);
            }
        }
        for id in wanted {
            let in_batch = self
                .stored
                .get(id)
                .and_then(|s| s.last())
                .map(|s| s.contact);
            let contact = in_batch.or_else(|| {
                let hit = self.hits.get(id).and_then(|h| h.first())?;
                Some(ContactRef::Stored(hit.contact_id))
            });
            if let Some(contact) = contact {
                return Some(Thread {
                    contact,
                    reopen: true,
                });
            }
        }
        let own = mail.message_id.as_ref()?;
        let from = from_address(mail)?;
        let same_from = |a: Option<&str>| a.is_some_and(|a| a.eq_ignore_ascii_case(from));
        let in_batch = self
            .stored
            .get(own)
            .and_then(|s| s.iter().rev().find(|s| same_from(s.from.as_deref())))
            .map(|s| s.contact);
        let stored = || {
            let hit = self
                .hits
                .get(own)?
                .iter()
                .find(|h| h.direction == "inbound" && same_from(h.from_address.as_deref()))?;
            Some(ContactRef::Stored(hit.contact_id))
        };
        in_batch.or_else(stored).map(|contact| Thread {
            contact,
            reopen: false,
        })
    }

    fn contact(&self, contact: ContactRef) -> Result<(), DbErr> {
        match contact {
            ContactRef::Stored(id) if !self.contacts.contains_key(&id) => {
                Err(DbErr::RecordNotFound(format!("contact {id}")))
            }
            _ => Ok(()),
        }
    }

    /// The queue name of a contact, for its events.
    fn queue_of(&self, contact: ContactRef, route: &Route) -> String {
        let queue_id = match contact {
            ContactRef::Stored(id) => self.contacts.get(&id).map(|c| c.queue_id),
            ContactRef::New(_) => Some(route.queue_id),
        };
        queue_id
            .and_then(|id| self.settings.dir.by_id(id))
            .map_or_else(|| route.queue.clone(), |q| q.name.clone())
    }
}

/// An event to append.
struct EventRow {
    kind: &'static str,
    contact_id: Option<i64>,
    queue: String,
    data: Value,
}

/// Writes what `plans` decided, in bulk and in batch order, and returns each mail's outcome.
async fn execute(
    txn: &DatabaseTransaction,
    settings: &Settings<'_>,
    prepared: &[Prepared<'_>],
    mut planner: Planner<'_>,
    plans: Vec<Plan>,
) -> Result<(Vec<Outcome>, bool), DbErr> {
    let new_ids =
        store::contacts::insert_many(txn, std::mem::take(&mut planner.new_contacts)).await?;
    let resolve = |c: ContactRef| match c {
        ContactRef::Stored(id) => id,
        ContactRef::New(i) => new_ids[i],
    };

    let mut messages = Vec::new();
    let mut quarantined = Vec::new();
    for (p, plan) in prepared.iter().zip(&plans) {
        let route = &settings.routes[p.route];
        match plan {
            Plan::Duplicate => {}
            Plan::Message { contact, .. } => messages.push(parsed(p)?.to_new_message(
                resolve(*contact),
                &p.key,
                &route.address,
                p.raw,
            )),
            Plan::Quarantine { reason, .. } => quarantined.push(NewQuarantine {
                source_key: Some(p.key.clone()),
                mailbox: Some(route.address.clone()),
                queue: Some(route.queue.clone()),
                reason: reason.clone(),
                raw: p.raw.to_vec(),
            }),
        }
    }
    let mut message_ids = store::messages::insert_many(txn, messages)
        .await?
        .into_iter();
    let mut quarantine_ids = store::quarantine::insert_many(txn, quarantined)
        .await?
        .into_iter();
    store::contacts::reopen_many(txn, &planner.reopen).await?;

    let mut outcomes = Vec::with_capacity(plans.len());
    let mut events: Vec<EventRow> = Vec::new();
    let mut attachments: Vec<NewAttachment> = Vec::new();
    let missing = || DbErr::Custom("an inserted row without its id".into());
    for (p, plan) in prepared.iter().zip(plans) {
        let route = &settings.routes[p.route];
        let outcome = match plan {
            Plan::Duplicate => Outcome::Duplicate,
            Plan::Message { contact, effect } => {
                let mail = parsed(p)?;
                let message_id = message_ids.next().ok_or_else(missing)?;
                let contact_id = resolve(contact);
                attachments.extend(mail.attachments.iter().map(|a| NewAttachment {
                    message_id,
                    filename: a.filename.clone(),
                    content_type: a.content_type.clone(),
                    content_id: a.content_id.clone(),
                    inline: a.inline,
                    data: (&a.data[..]).into(),
                }));
                let queue = planner.queue_of(contact, route);
                let mut event = |kind, data| {
                    events.push(EventRow {
                        kind,
                        contact_id: Some(contact_id),
                        queue: queue.clone(),
                        data,
                    });
                };
                let data = message_data(message_id, mail, route);
                match effect {
                    Effect::Created => {
                        event("contact.created", data);
                        Outcome::Created {
                            contact_id,
                            message_id,
                        }
                    }
                    Effect::Threaded { reopen } => {
                        if reopen {
                            let why = json!({ "message_id": message_id, "reason": "the customer wrote again" });
                            event("contact.reopened", why);
                        }
                        event("contact.message_added", data);
                        Outcome::Threaded {
                            contact_id,
                            message_id,
                            reopened: reopen,
                        }
                    }
                    Effect::Attached(kind) => {
                        let mut data = data;
                        data["automated"] = json!(kind);
                        event("contact.message_added", data);
                        Outcome::Attached {
                            contact_id,
                            message_id,
                            kind,
                        }
                    }
                    Effect::Bounced(reply) => {
                        let mut data = bounce_data(&reply, mail, route);
                        data["message_id"] = json!(message_id);
                        event("reply.bounced", data);
                        Outcome::Attached {
                            contact_id,
                            message_id,
                            kind: AutomatedKind::Bounce,
                        }
                    }
                }
            }
            Plan::Quarantine {
                reason,
                automated,
                bounced,
            } => {
                let quarantine_id = quarantine_ids.next().ok_or_else(missing)?;
                let mut data = json!({
                    "quarantine_id": quarantine_id,
                    "reason": reason,
                    "address": route.address,
                    "queue": route.queue,
                    "size": p.raw.len(),
                });
                if let Some(kind) = automated {
                    data["automated"] = json!(kind);
                }
                events.push(EventRow {
                    kind: "message.quarantined",
                    contact_id: None,
                    queue: route.queue.clone(),
                    data,
                });
                if let Some(reply) = bounced {
                    let contact = ContactRef::Stored(reply.contact_id);
                    let mut data = bounce_data(&reply, parsed(p)?, route);
                    data["quarantine_id"] = json!(quarantine_id);
                    events.push(EventRow {
                        kind: "reply.bounced",
                        contact_id: Some(reply.contact_id),
                        queue: planner.queue_of(contact, route),
                        data,
                    });
                }
                Outcome::Quarantined {
                    quarantine_id,
                    reason,
                }
            }
        };
        outcomes.push(outcome);
    }

    store::attachments::insert_many(txn, attachments).await?;
    let rows: Vec<NewEvent<'_>> = events
        .iter()
        .map(|e| NewEvent {
            kind: e.kind,
            contact_id: e.contact_id,
            queue: Some(&e.queue),
            actor: Some(ACTOR),
            data: e.data.clone(),
        })
        .collect();
    store::events::insert_many(txn, &rows).await?;
    Ok((outcomes, !events.is_empty()))
}

/// The parsed mail of a mail planned as a message.
fn parsed<'p>(p: &'p Prepared<'_>) -> Result<&'p ParsedMail, DbErr> {
    match &p.step {
        Step::Parsed(mail, _) => Ok(mail),
        _ => Err(DbErr::Custom(
            "a stored message without its parsed mail".into(),
        )),
    }
}

fn from_address(mail: &ParsedMail) -> Option<&str> {
    mail.from.as_ref().and_then(|f| f.address.as_deref())
}

/// The data of `contact.created` and `contact.message_added`.
fn message_data(message_id: i64, mail: &ParsedMail, route: &Route) -> Value {
    json!({
        "message_id": message_id,
        "rfc_message_id": mail.message_id,
        "from": from_address(mail),
        "subject": mail.subject,
        "address": route.address,
    })
}

/// The data of `reply.bounced`, without where the bounce was kept.
fn bounce_data(reply: &OutboundHit, mail: &ParsedMail, route: &Route) -> Value {
    let report = mail.report.clone().unwrap_or_default();
    json!({
        "outbox_id": reply.outbox_id,
        "reply_message_id": reply.id,
        "rfc_message_id": reply.message_id,
        "status": report.status,
        "diagnostic": report.diagnostic,
        "action": report.action,
        "recipient": report.recipient,
        "from": from_address(mail),
        "subject": mail.subject,
        "address": route.address,
        "automated": AutomatedKind::Bounce,
    })
}
