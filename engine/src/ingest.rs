//! The ingest pipeline every mail source uses (import now, IMAP later): RFC 822 bytes + the queue address they
//! arrived on → parse → dedupe → thread → store contact, message, attachments and event in one transaction.
//! Mail that is too large or cannot be parsed goes to quarantine with the reason; nothing is dropped.
//!
//! Dedupe is by source key only: `imap:<mailbox>:<uidvalidity>:<uid>` from the IMAP connector, `sha256:<hex>` of
//! the raw bytes otherwise. A pre-check skips known keys cheaply; the unique indexes on `messages.source_key` and
//! `quarantine.source_key` are the final guard, and a unique violation (two ingests of the same mail racing)
//! becomes [`Outcome::Duplicate`].
//!
//! The Message-ID is a threading hint only, never a dedupe key. A mail joins a stored contact when its
//! In-Reply-To or one of its References names a stored message (inbound or outbound). The same mail sent to two
//! queue addresses arrives twice: from IMAP with two source keys, so the second copy is stored too and joins the
//! first copy's contact (same Message-ID and From) without re-opening it; from `import`, both copies have the same
//! content hash, so the second is a `Duplicate` even on another address. That is accepted: an import names one
//! address for all its mail anyway.

use std::{
    borrow::Cow,
    panic::{AssertUnwindSafe, catch_unwind},
};

use chrono::{DateTime, TimeZone, Utc};
use mail_parser::{
    Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType,
    decoders::charsets::map::charset_decoder,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, SqlErr};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    engine::{Engine, Route},
    error::{Error, Result},
    store::{
        self, attachments::NewAttachment, contacts::NewContact, events::NewEvent,
        messages::NewMessage, quarantine::NewQuarantine,
    },
};

/// The actor named in ingest events.
const ACTOR: &str = "ingest";
/// At most this many References are kept and looked up (the newest ones).
const MAX_REFERENCES: usize = 50;

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
    /// The same mail (same source key) was stored before; nothing changed.
    Duplicate,
    /// Kept in quarantine with the reason.
    Quarantined { quarantine_id: i64, reason: String },
}

/// `sha256:<hex>` of the raw bytes: the source key of mail without one of its own.
pub fn content_key(raw: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(raw)))
}

impl Engine {
    /// Ingests one mail. See the module doc.
    pub async fn ingest(&self, mail: Incoming<'_>) -> Result<Outcome> {
        let route = self.route(mail.address).await.ok_or_else(|| {
            Error::Invalid(format!(
                "`{}` is not a configured queue address",
                mail.address
            ))
        })?;
        let key = mail
            .source_key
            .clone()
            .unwrap_or_else(|| content_key(mail.raw));
        if is_known(&self.db, &key).await? {
            return Ok(Outcome::Duplicate);
        }
        let limit_mb = self.config().await.defaults.max_email_size_mb;
        if mail.raw.len() as u64 > u64::from(limit_mb) * 1024 * 1024 {
            let reason = format!("too large: {} bytes, limit {limit_mb} MB", mail.raw.len());
            return self.quarantine(&route, &key, mail.raw, reason).await;
        }
        match parse_mail(mail.raw) {
            Ok(parsed) => self.store_mail(&route, &key, mail.raw, parsed).await,
            Err(reason) => self.quarantine(&route, &key, mail.raw, reason).await,
        }
    }

    /// Stores a parsed mail: a new contact or the thread it belongs to, the message, its attachments and events.
    async fn store_mail(
        &self,
        route: &Route,
        key: &str,
        raw: &[u8],
        mail: ParsedMail,
    ) -> Result<Outcome> {
        let txn = store::begin_write(&self.db).await?;
        if is_known(&txn, key).await? {
            txn.rollback().await?;
            return Ok(Outcome::Duplicate);
        }
        let stored = self.store_in(&txn, route, key, raw, &mail).await;
        let stored = match stored {
            Ok(outcome) => txn.commit().await.map(|()| outcome),
            Err(e) => {
                let _ = txn.rollback().await;
                Err(e)
            }
        };
        match stored {
            Ok(outcome) => {
                self.events_appended();
                tracing::debug!(queue = %route.queue, ?outcome, "mail ingested");
                Ok(outcome)
            }
            Err(e) => self.duplicate_or(e, key).await,
        }
    }

    async fn store_in(
        &self,
        txn: &DatabaseTransaction,
        route: &Route,
        key: &str,
        raw: &[u8],
        mail: &ParsedMail,
    ) -> Result<Outcome, DbErr> {
        let dir = self.queues().await;
        let thread = find_thread(txn, mail).await?;
        let (contact, reopened) = match &thread {
            Some(t) => {
                // Lock the contact first: whether it must be re-opened is decided on the state that holds until
                // commit, so a close racing with this reply cannot leave the reply on a closed contact.
                let c = store::contacts::get_for_update(txn, t.contact_id)
                    .await?
                    .ok_or_else(|| DbErr::RecordNotFound(format!("contact {}", t.contact_id)))?;
                if c.state == "closed" && t.reopen {
                    let c = store::contacts::reopen(txn, c.id).await?;
                    (
                        c.ok_or_else(|| {
                            DbErr::RecordNotFound(format!("contact {}", t.contact_id))
                        })?,
                        true,
                    )
                } else {
                    (c, false)
                }
            }
            None => {
                let customer = mail
                    .reply_to
                    .as_ref()
                    .filter(|m| m.address.is_some())
                    .or(mail.from.as_ref());
                let new = NewContact {
                    queue_id: route.queue_id,
                    priority: route.priority,
                    language: route.language.clone(),
                    arrived_on: route.address.clone(),
                    customer_address: customer.and_then(|c| c.address.clone()),
                    customer_name: customer.and_then(|c| c.name.clone()),
                    subject: mail.subject.clone(),
                    queued_at: Utc::now(),
                };
                (store::contacts::insert(txn, new).await?, false)
            }
        };
        let message_id = store::messages::insert(
            txn,
            mail.to_new_message(contact.id, key, &route.address, raw),
        )
        .await?;
        for a in &mail.attachments {
            let new = NewAttachment {
                message_id,
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
                content_id: a.content_id.clone(),
                inline: a.inline,
                data: a.data.clone(),
            };
            store::attachments::insert(txn, new).await?;
        }

        let queue = dir
            .by_id(contact.queue_id)
            .map(|q| q.name.clone())
            .unwrap_or_else(|| route.queue.clone());
        let from = mail.from.as_ref().and_then(|f| f.address.clone());
        let data = json!({
            "message_id": message_id,
            "rfc_message_id": mail.message_id,
            "from": from,
            "subject": mail.subject,
            "address": route.address,
        });
        let event = |kind, data| NewEvent {
            kind,
            contact_id: Some(contact.id),
            queue: Some(&queue),
            actor: Some(ACTOR),
            data,
        };
        if thread.is_none() {
            store::events::insert(txn, event("contact.created", data)).await?;
            return Ok(Outcome::Created {
                contact_id: contact.id,
                message_id,
            });
        }
        if reopened {
            let why = json!({ "message_id": message_id, "reason": "the customer wrote again" });
            store::events::insert(txn, event("contact.reopened", why)).await?;
        }
        store::events::insert(txn, event("contact.message_added", data)).await?;
        Ok(Outcome::Threaded {
            contact_id: contact.id,
            message_id,
            reopened,
        })
    }

    /// Keeps a mail whole in quarantine with the reason, and appends `message.quarantined`.
    async fn quarantine(
        &self,
        route: &Route,
        key: &str,
        raw: &[u8],
        reason: String,
    ) -> Result<Outcome> {
        let txn = store::begin_write(&self.db).await?;
        if is_known(&txn, key).await? {
            txn.rollback().await?;
            return Ok(Outcome::Duplicate);
        }
        let stored = async {
            let row = NewQuarantine {
                source_key: Some(key.to_owned()),
                mailbox: Some(route.address.clone()),
                queue: Some(route.queue.clone()),
                reason: reason.clone(),
                raw: raw.to_vec(),
            };
            let id = store::quarantine::insert(&txn, row).await?;
            let data = json!({
                "quarantine_id": id,
                "reason": reason,
                "address": route.address,
                "queue": route.queue,
                "size": raw.len(),
            });
            let event = NewEvent {
                kind: "message.quarantined",
                contact_id: None,
                queue: Some(&route.queue),
                actor: Some(ACTOR),
                data,
            };
            store::events::insert(&txn, event).await?;
            Ok::<_, DbErr>(id)
        }
        .await;
        let stored = match stored {
            Ok(id) => txn.commit().await.map(|()| id),
            Err(e) => {
                let _ = txn.rollback().await;
                Err(e)
            }
        };
        match stored {
            Ok(quarantine_id) => {
                self.events_appended();
                tracing::warn!(queue = %route.queue, quarantine_id, %reason, "mail quarantined");
                Ok(Outcome::Quarantined {
                    quarantine_id,
                    reason,
                })
            }
            Err(e) => self.duplicate_or(e, key).await,
        }
    }

    /// A unique violation on the source key means a concurrent ingest stored the same mail first.
    async fn duplicate_or(&self, e: DbErr, key: &str) -> Result<Outcome> {
        if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
            && is_known(&self.db, key).await?
        {
            return Ok(Outcome::Duplicate);
        }
        Err(e.into())
    }
}

/// Whether a message or quarantined mail with this source key is stored.
async fn is_known(db: &impl ConnectionTrait, key: &str) -> Result<bool, DbErr> {
    Ok(store::messages::source_key_exists(db, key).await?
        || store::quarantine::source_key_exists(db, key).await?)
}

/// The contact a mail joins, and whether joining may re-open it.
struct Thread {
    contact_id: i64,
    reopen: bool,
}

async fn find_thread(
    db: &impl ConnectionTrait,
    mail: &ParsedMail,
) -> Result<Option<Thread>, DbErr> {
    // In-Reply-To first, then References newest first.
    let mut wanted: Vec<String> = Vec::new();
    for id in mail.in_reply_to.iter().chain(mail.references.iter().rev()) {
        if !wanted.contains(id) && Some(id) != mail.message_id.as_ref() {
            wanted.push(id.clone());
        }
    }
    if !wanted.is_empty() {
        let hits = store::messages::find_by_message_ids(db, &wanted).await?;
        // Hits are newest first, so each Message-ID resolves to its latest stored message.
        if let Some(hit) = wanted
            .iter()
            .find_map(|id| hits.iter().find(|h| &h.message_id == id))
        {
            return Ok(Some(Thread {
                contact_id: hit.contact_id,
                reopen: true,
            }));
        }
    }
    // The same mail stored before under another source key (sent to two queue addresses): join that contact.
    let (Some(own), Some(from)) = (
        &mail.message_id,
        mail.from.as_ref().and_then(|f| f.address.as_deref()),
    ) else {
        return Ok(None);
    };
    let hits = store::messages::find_by_message_ids(db, std::slice::from_ref(own)).await?;
    Ok(hits
        .iter()
        .find(|h| {
            h.direction == "inbound"
                && h.from_address
                    .as_deref()
                    .is_some_and(|a| a.eq_ignore_ascii_case(from))
        })
        .map(|h| Thread {
            contact_id: h.contact_id,
            reopen: false,
        }))
}

/// A mail parsed into what the store needs; owned, so nothing borrowed crosses an `await`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMail {
    /// Without angle brackets, like every Message-ID the store keeps.
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    /// Oldest first, at most the newest 50.
    pub references: Vec<String>,
    pub from: Option<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// Decoded (RFC 2047).
    pub subject: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    /// The top-level header fields in order, unfolded, as `(name, raw value)`.
    pub headers: Vec<(String, String)>,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub attachments: Vec<ParsedAttachment>,
}

/// A name and address from an address header; either may be missing in broken mail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAttachment {
    pub filename: Option<String>,
    /// `type/subtype`, lower case.
    pub content_type: String,
    /// Without angle brackets.
    pub content_id: Option<String>,
    pub inline: bool,
    pub data: Vec<u8>,
}

impl ParsedMail {
    fn to_new_message(&self, contact_id: i64, key: &str, mailbox: &str, raw: &[u8]) -> NewMessage {
        let list = |l: &[Mailbox]| serde_json::to_value(l).unwrap_or_else(|_| json!([]));
        NewMessage {
            contact_id,
            direction: "inbound",
            source_key: Some(key.to_owned()),
            mailbox: Some(mailbox.to_owned()),
            message_id: self.message_id.clone(),
            in_reply_to: self.in_reply_to.clone(),
            references: json!(self.references),
            from_address: self.from.as_ref().and_then(|f| f.address.clone()),
            from_name: self.from.as_ref().and_then(|f| f.name.clone()),
            reply_to: self.reply_to.as_ref().and_then(|r| r.address.clone()),
            to_addresses: list(&self.to),
            cc_addresses: list(&self.cc),
            subject: self.subject.clone(),
            sent_at: self.sent_at,
            headers: json!(self.headers.iter().map(|(n, v)| [n, v]).collect::<Vec<_>>()),
            text_body: self.text_body.clone(),
            html_body: self.html_body.clone(),
            raw: Some(raw.to_vec()),
            size: raw.len() as i64,
            created_by: None,
        }
    }
}

/// Parses RFC 822 bytes with mail-parser. `Err` carries the quarantine reason. Never panics: broken headers,
/// undecodable encoded words and unknown charsets degrade to lossy text; header lines in a legacy 8-bit charset
/// (not UTF-8) are decoded with the mail's declared charset, else Windows-1252.
pub fn parse_mail(raw: &[u8]) -> std::result::Result<ParsedMail, String> {
    catch_unwind(AssertUnwindSafe(|| parse_unguarded(raw)))
        .unwrap_or_else(|_| Err("unparsable: the MIME parser failed on this mail".into()))
}

fn parse_unguarded(raw: &[u8]) -> std::result::Result<ParsedMail, String> {
    let parser = MessageParser::default();
    let message = parser
        .parse(raw)
        .ok_or_else(|| "unparsable: not an RFC 822 message".to_owned())?;
    // mail-parser takes any text before a colon as a field name; binary junk yields names like "\0\0IHDR".
    if !message
        .root_part()
        .headers
        .iter()
        .any(|h| is_field_name(h.name.as_str()))
    {
        return Err("unparsable: no header fields".into());
    }
    match repair_header_charset(raw, &message) {
        Some(repaired) => {
            let message = parser
                .parse(&repaired)
                .ok_or_else(|| "unparsable: not an RFC 822 message".to_owned())?;
            Ok(extract(&message))
        }
        None => Ok(extract(&message)),
    }
}

/// RFC 5322 field-name: printable US-ASCII except the colon.
fn is_field_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// The header block with every non-UTF-8 line decoded from the mail's charset (else Windows-1252), followed by
/// the unchanged body; `None` when the header block is valid UTF-8 already.
fn repair_header_charset(raw: &[u8], message: &Message<'_>) -> Option<Vec<u8>> {
    let mut end = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line == b"\n" || line == b"\r\n" {
            break;
        }
        end += line.len();
    }
    let head = &raw[..end];
    if std::str::from_utf8(head).is_ok() {
        return None;
    }
    let declared = message
        .root_part()
        .content_type()
        .and_then(|ct| ct.attribute("charset"))
        .filter(|c| {
            !c.to_ascii_lowercase()
                .replace(['-', '_'], "")
                .starts_with("utf")
        })
        .and_then(|c| charset_decoder(c.as_bytes()));
    let decode = declared.or_else(|| charset_decoder(b"windows-1252"))?;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 8);
    for line in head.split_inclusive(|&b| b == b'\n') {
        match std::str::from_utf8(line) {
            Ok(_) => out.extend_from_slice(line),
            Err(_) => out.extend_from_slice(decode(line).as_bytes()),
        }
    }
    out.extend_from_slice(&raw[end..]);
    Some(out)
}

fn extract(m: &Message<'_>) -> ParsedMail {
    let root = m.root_part();
    let headers = root
        .headers
        .iter()
        .map(|h| {
            let value = m
                .raw_message
                .get(h.offset_start as usize..h.offset_end as usize)
                .unwrap_or_default();
            (
                clean(h.name.as_str()),
                unfold(&String::from_utf8_lossy(value)),
            )
        })
        .collect();

    let mut references: Vec<String> = Vec::new();
    for value in m.header_values("References") {
        for id in ids(value) {
            if !references.contains(&id) {
                references.push(id);
            }
        }
    }
    if references.len() > MAX_REFERENCES {
        references.drain(..references.len() - MAX_REFERENCES);
    }

    let text: Vec<String> = (0..m.text_body_count())
        .filter_map(|i| m.body_text(i))
        .map(|t| clean(&t))
        .collect();
    let has_html = m.html_bodies().any(|p| matches!(p.body, PartType::Html(_)));
    let html: Vec<String> = if has_html {
        (0..m.html_body_count())
            .filter_map(|i| m.body_html(i))
            .map(|t| clean(&t))
            .collect()
    } else {
        Vec::new()
    };

    ParsedMail {
        message_id: m.message_id().and_then(message_id),
        in_reply_to: m
            .header("In-Reply-To")
            .and_then(|v| ids(v).into_iter().next()),
        references,
        from: m.from().and_then(first_mailbox),
        reply_to: m.reply_to().and_then(first_mailbox),
        to: m.to().map(mailboxes).unwrap_or_default(),
        cc: m.cc().map(mailboxes).unwrap_or_default(),
        subject: m
            .subject()
            .map(|s| clean(s.trim()))
            .filter(|s| !s.is_empty()),
        sent_at: m
            .date()
            .filter(|d| d.is_valid())
            .and_then(|d| Utc.timestamp_opt(d.to_timestamp(), 0).single()),
        headers,
        text_body: (!text.is_empty()).then(|| text.join("\n")),
        html_body: (!html.is_empty()).then(|| html.join("\n")),
        attachments: attachments(m),
    }
}

fn attachments(m: &Message<'_>) -> Vec<ParsedAttachment> {
    let mut out = Vec::new();
    for &id in &m.attachments {
        let Some(part) = m.parts.get(id as usize) else {
            continue;
        };
        let (data, fallback_type): (Cow<'_, [u8]>, &str) = match &part.body {
            PartType::Binary(b) | PartType::InlineBinary(b) => {
                (Cow::Borrowed(b.as_ref()), "application/octet-stream")
            }
            PartType::Text(t) => (Cow::Borrowed(t.as_bytes()), "text/plain"),
            PartType::Html(t) => (Cow::Borrowed(t.as_bytes()), "text/html"),
            PartType::Message(inner) => {
                (Cow::Borrowed(inner.raw_message.as_ref()), "message/rfc822")
            }
            PartType::Multipart(_) => continue,
        };
        let content_type = part
            .content_type()
            .map(|ct| match &ct.c_subtype {
                Some(sub) => format!("{}/{}", ct.c_type, sub),
                None => ct.c_type.to_string(),
            })
            .map(|t| clean(t.trim()).to_ascii_lowercase())
            .filter(|t| t.contains('/'))
            .unwrap_or_else(|| fallback_type.to_owned());
        let content_id = part
            .content_id()
            .map(|c| clean(c.trim().trim_start_matches('<').trim_end_matches('>')));
        let content_id = content_id.filter(|c| !c.is_empty());
        let inline = match part.content_disposition() {
            Some(d) => d.is_inline(),
            None => content_id.is_some() || matches!(part.body, PartType::InlineBinary(_)),
        };
        out.push(ParsedAttachment {
            filename: part
                .attachment_name()
                .map(|n| clean(n.trim()))
                .filter(|n| !n.is_empty()),
            content_type,
            content_id,
            inline,
            data: data.into_owned(),
        });
    }
    out
}

/// Message-IDs in a header value, without angle brackets.
fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(t) => message_id(t).into_iter().collect(),
        HeaderValue::TextList(l) => l.iter().filter_map(|t| message_id(t)).collect(),
        _ => Vec::new(),
    }
}

fn message_id(s: &str) -> Option<String> {
    let id = clean(
        s.trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim(),
    );
    (!id.is_empty()).then_some(id)
}

fn first_mailbox(a: &Address<'_>) -> Option<Mailbox> {
    mailboxes(a).into_iter().next()
}

fn mailboxes(a: &Address<'_>) -> Vec<Mailbox> {
    let addrs: Vec<&mail_parser::Addr<'_>> = match a {
        Address::List(l) => l.iter().collect(),
        Address::Group(g) => g.iter().flat_map(|g| g.addresses.iter()).collect(),
    };
    addrs
        .into_iter()
        .map(|a| Mailbox {
            name: a
                .name
                .as_deref()
                .map(|n| clean(n.trim()))
                .filter(|n| !n.is_empty()),
            address: a
                .address
                .as_deref()
                .map(|n| clean(n.trim()))
                .filter(|n| !n.is_empty()),
        })
        .filter(|m| m.name.is_some() || m.address.is_some())
        .collect()
}

/// Removes NUL characters, which PostgreSQL text and JSON columns reject.
fn clean(s: &str) -> String {
    s.replace('\0', "")
}

/// A raw header value on one line: folding line breaks removed, ends trimmed.
fn unfold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        out.push_str(line);
    }
    clean(out.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_headers_is_unparsable() {
        assert!(
            parse_mail(b"\r\n\r\njust a body\r\n")
                .unwrap_err()
                .contains("no header")
        );
        assert!(parse_mail(b"").is_err());
        assert!(
            parse_mail(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01binary")
                .unwrap_err()
                .contains("no header")
        );
        assert!(parse_mail(b"just text\nmore text\n").is_err());
    }

    #[test]
    fn latin1_header_lines_are_repaired() {
        let raw = b"From: Fran\xe7ois <f@example.fr>\nSubject: r\xe9ception\nContent-Type: text/plain; charset=iso-8859-1\n\nbody\n";
        let m = parse_mail(raw).unwrap();
        assert_eq!(m.subject.as_deref(), Some("réception"));
        assert_eq!(m.from.unwrap().name.as_deref(), Some("François"));
    }

    #[test]
    fn ids_lose_brackets_and_nul() {
        let raw = b"From: a@b.c\nMessage-ID: <x\x00y@b.c>\nIn-Reply-To: <p@b.c>\nReferences: <r1@b.c> <p@b.c>\n\nbody\n";
        let m = parse_mail(raw).unwrap();
        assert_eq!(m.message_id.as_deref(), Some("xy@b.c"));
        assert_eq!(m.in_reply_to.as_deref(), Some("p@b.c"));
        assert_eq!(m.references, vec!["r1@b.c".to_owned(), "p@b.c".to_owned()]);
    }
}
