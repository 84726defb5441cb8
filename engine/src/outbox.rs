//! The outbox: replies written by agents, stored as outbound messages with a Message-ID of our own, waiting for
//! the outbox [`worker`] to build them as mails and send them through the outgoing SMTP server.

pub mod worker;

use chrono::{DateTime, Utc};
use mailqueue_config::EmailAddress;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::{
    contacts::Actor,
    engine::Engine,
    error::{Error, Result},
    store::{self, events::NewEvent, messages::NewMessage, outbox::ReplyRow},
};

/// At most this many References are carried into a reply (the thread's first and newest ones).
const MAX_REFERENCES: usize = 20;

/// A reply an agent submits.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyRequest {
    /// Plain-text body.
    pub text: String,
    /// Optional HTML body.
    #[serde(default)]
    pub html: Option<String>,
    /// Recipients; default: the customer (Reply-To of the last inbound mail, else its From).
    #[serde(default)]
    pub to: Option<Vec<String>>,
    #[serde(default)]
    pub cc: Vec<String>,
    /// Default: `Re: <subject>` without stacking prefixes.
    #[serde(default)]
    pub subject: Option<String>,
    /// A sender-enabled address of the contact's queue; default chosen by the outgoing connector.
    #[serde(default)]
    pub from: Option<String>,
    /// Files sent with the reply (`multipart/mixed`, each as `Content-Disposition: attachment`); stored as
    /// attachments of the outbound message. Their decoded sizes count towards the outgoing size limit.
    #[serde(default)]
    pub attachments: Vec<ReplyAttachment>,
}

/// A file attached to a reply.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyAttachment {
    /// File name shown to the customer; not empty.
    #[schema(example = "invoice-4711.pdf")]
    pub filename: String,
    /// MIME type, e.g. `application/pdf` or `text/plain; charset=utf-8`.
    #[schema(example = "application/pdf")]
    pub content_type: String,
    /// The file's bytes, standard base64 (padding optional, line breaks allowed).
    pub content_base64: String,
}

/// A validated, decoded reply attachment.
struct DecodedAttachment {
    filename: String,
    content_type: String,
    data: Vec<u8>,
}

/// Checks and decodes the attachments of a reply.
fn decode_attachments(list: &[ReplyAttachment]) -> Result<Vec<DecodedAttachment>> {
    use base64::Engine as _;
    let b64 = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let filename = a.filename.trim();
            if filename.is_empty() || filename.chars().any(char::is_control) {
                return Err(Error::Invalid(format!(
                    "`attachments[{i}].filename` must be a non-empty name without control characters"
                )));
            }
            lettre::message::header::ContentType::parse(a.content_type.trim())
                .map_err(|e| {
                    Error::Invalid(format!(
                        "`attachments[{i}].content_type` `{}` is not a MIME type: {e}",
                        a.content_type
                    ))
                })?;
            let compact: String = a
                .content_base64
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            let data = b64.decode(compact.as_bytes()).map_err(|e| {
                Error::Invalid(format!(
                    "`attachments[{i}].content_base64` ({filename}) is not valid base64: {e}"
                ))
            })?;
            Ok(DecodedAttachment {
                filename: filename.to_owned(),
                content_type: a.content_type.trim().to_owned(),
                data,
            })
        })
        .collect()
}

/// A stored reply and its sending state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Reply {
    /// Outbox id.
    pub id: i64,
    /// The stored outbound message.
    pub message_id: i64,
    /// Our own RFC 5322 Message-ID, generated before sending.
    pub rfc_message_id: String,
    /// `pending`, `sending`, `sent` or `failed`.
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl Engine {
    /// Stores a reply on an open contact the actor may work on: an outbound message plus an outbox row and a
    /// `reply.queued` event, in one transaction.
    ///
    /// Errors: `NotFound` (no such contact), `Conflict` (closed, or an agent that does not hold the claim),
    /// `Invalid` (`from` not a sender-enabled address of the contact's queue, bad or missing recipients, empty
    /// body, an attachment with an empty filename, a bad content type or bad base64), `TooLarge` (above the
    /// outgoing server's `max_email_size_mb`, else the defaults'; attachments count with their decoded size).
    pub async fn submit_reply(
        &self,
        contact_id: i64,
        actor: Actor<'_>,
        req: ReplyRequest,
    ) -> Result<Reply> {
        let config = self.config().await;
        let dir = self.queues().await;
        if req.text.trim().is_empty() && req.html.as_deref().is_none_or(|h| h.trim().is_empty()) {
            return Err(Error::Invalid("a reply needs a text or html body".into()));
        }
        let cc = recipients(&req.cc, "cc")?;
        let attachments = decode_attachments(&req.attachments)?;
        let to_given = req
            .to
            .as_deref()
            .map(|to| recipients(to, "to"))
            .transpose()?;

        let txn = store::begin_write(&self.db).await?;
        let result = async {
            // Locked, so a concurrent close or release waits for this reply to commit.
            let contact = store::contacts::get_for_update(&txn, contact_id)
                .await?
                .ok_or_else(|| Error::not_found(format!("there is no contact {contact_id}")))?;
            if contact.state == "closed" {
                return Err(Error::conflict(format!(
                    "contact {contact_id} is closed; re-open it to reply"
                )));
            }
            if let Actor::Agent(agent) = actor
                && (contact.state != "claimed" || contact.claimed_by.as_deref() != Some(agent))
            {
                return Err(Error::conflict(format!(
                    "contact {contact_id} is not claimed by {agent}: it is {}{}",
                    contact.state,
                    contact
                        .claimed_by
                        .as_deref()
                        .map(|a| format!(" by {a}"))
                        .unwrap_or_default()
                )));
            }
            let queue = dir
                .by_id(contact.queue_id)
                .map(|q| q.name.clone())
                .ok_or_else(|| {
                    Error::Invalid(format!("contact {contact_id} is in an unknown queue"))
                })?;
            let from = match &req.from {
                None => None,
                Some(from) => Some(
                    config
                        .queue(&queue)
                        .into_iter()
                        .flat_map(|q| q.addresses.iter())
                        .find(|a| a.sender && a.address.as_str().eq_ignore_ascii_case(from.trim()))
                        .map(|a| a.address.to_string())
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "`{from}` is not a sender-enabled address of queue `{queue}`"
                            ))
                        })?,
                ),
            };

            let parent = store::messages::latest_inbound(&txn, contact_id).await?;
            let to = match to_given {
                Some(to) => to,
                None => parent
                    .as_ref()
                    .and_then(|p| p.reply_to.clone().or_else(|| p.from_address.clone()))
                    .or_else(|| contact.customer_address.clone())
                    .into_iter()
                    .collect(),
            };
            if to.is_empty() {
                return Err(Error::Invalid(format!(
                    "contact {contact_id} has no customer address; give `to`"
                )));
            }
            let subject = req.subject.clone().unwrap_or_else(|| {
                reply_subject(
                    parent
                        .as_ref()
                        .and_then(|p| p.subject.as_deref())
                        .or(contact.subject.as_deref()),
                )
            });
            let in_reply_to = parent.as_ref().and_then(|p| p.message_id.clone());
            let references = parent.as_ref().map(references_of).unwrap_or_default();

            let limit_mb = config
                .outgoing_server
                .as_ref()
                .map_or(config.defaults.max_email_size_mb, |s| s.max_email_size_mb);
            let size = estimated_size(&req, &to, &cc, &subject, &references, &attachments);
            if size > u64::from(limit_mb) * 1024 * 1024 {
                return Err(Error::TooLarge(format!(
                    "the reply would be about {size} bytes as a mail; the outgoing limit is {limit_mb} MB"
                )));
            }

            let domain = from
                .as_deref()
                .unwrap_or(&contact.arrived_on)
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_else(|| "mailqueue.invalid".into());
            let rfc_message_id = format!("{:032x}@{domain}", rand::random::<u128>());
            let as_list = |l: &[String]| {
                json!(
                    l.iter()
                        .map(|a| json!({ "name": null, "address": a }))
                        .collect::<Vec<_>>()
                )
            };
            let message = NewMessage {
                contact_id,
                direction: "outbound",
                source_key: None,
                mailbox: from.clone(),
                message_id: Some(rfc_message_id.clone()),
                in_reply_to: in_reply_to.clone(),
                references: json!(references),
                from_address: from.clone(),
                from_name: None,
                reply_to: None,
                to_addresses: as_list(&to),
                cc_addresses: as_list(&cc),
                subject: Some(subject.clone()),
                sent_at: None,
                headers: json!([]),
                text_body: Some(req.text.clone()),
                html_body: req.html.clone(),
                raw: None,
                size: size as i64,
                created_by: Some(actor.name().to_owned()),
            };
            let message_id = store::messages::insert(&txn, message).await?;
            let files = attachments
                .into_iter()
                .map(|a| store::attachments::NewAttachment {
                    message_id,
                    filename: Some(a.filename),
                    content_type: a.content_type,
                    content_id: None,
                    inline: false,
                    data: a.data.into(),
                })
                .collect::<Vec<_>>();
            let attachment_count = files.len();
            if !files.is_empty() {
                store::attachments::insert_many(&txn, files).await?;
            }
            let row = store::outbox::insert(&txn, contact_id, message_id).await?;
            let data = json!({
                "reply_id": row.id,
                "message_id": message_id,
                "rfc_message_id": rfc_message_id,
                "in_reply_to": in_reply_to,
                "from": from,
                "to": to,
                "subject": subject,
                "attachments": attachment_count,
            });
            let event = NewEvent {
                kind: "reply.queued",
                contact_id: Some(contact_id),
                queue: Some(&queue),
                actor: Some(actor.name()),
                data,
            };
            store::events::insert(&txn, event).await?;
            Ok::<_, Error>(Reply {
                id: row.id,
                message_id,
                rfc_message_id,
                state: row.state,
                attempts: row.attempts,
                last_error: row.last_error,
                sent_at: row.sent_at,
                created_at: row.created_at,
            })
        }
        .await;
        match result {
            Ok(reply) => {
                txn.commit().await?;
                self.events_appended();
                self.reply_stored();
                Ok(reply)
            }
            Err(e) => {
                let _ = txn.rollback().await;
                Err(e)
            }
        }
    }
}

impl From<ReplyRow> for Reply {
    fn from(r: ReplyRow) -> Self {
        Self {
            id: r.id,
            message_id: r.message_id,
            rfc_message_id: r.rfc_message_id.unwrap_or_default(),
            state: r.state,
            attempts: r.attempts,
            last_error: r.last_error,
            sent_at: r.sent_at,
            created_at: r.created_at,
        }
    }
}

/// Validated, normalised recipient addresses.
fn recipients(list: &[String], field: &str) -> Result<Vec<String>> {
    list.iter()
        .map(|a| {
            EmailAddress::parse(a)
                .map(|a| a.to_string())
                .map_err(|e| Error::Invalid(format!("`{field}`: {e}")))
        })
        .collect()
}

/// The References of a reply to `parent`: the parent's References (else its In-Reply-To) plus its Message-ID;
/// long chains keep the first and the newest ones.
fn references_of(parent: &store::messages::MessageRow) -> Vec<String> {
    let mut refs: Vec<String> = parent
        .references
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if refs.is_empty()
        && let Some(irt) = &parent.in_reply_to
    {
        refs.push(irt.clone());
    }
    if let Some(id) = &parent.message_id
        && !refs.contains(id)
    {
        refs.push(id.clone());
    }
    if refs.len() > MAX_REFERENCES {
        refs.drain(1..refs.len() - (MAX_REFERENCES - 1));
    }
    refs
}

/// `Re: <subject>` without stacking reply prefixes (`Re:`, `RE:`, `AW:`, `SV:`, `Antw:`, `Re[2]:` …).
pub fn reply_subject(subject: Option<&str>) -> String {
    let base = strip_reply_prefixes(subject.unwrap_or_default());
    if base.is_empty() {
        "Re:".into()
    } else {
        format!("Re: {base}")
    }
}

/// Removes leading reply prefixes in common languages, repeatedly.
pub fn strip_reply_prefixes(subject: &str) -> &str {
    const PREFIXES: &[&str] = &[
        "re", "aw", "sv", "vs", "antw", "antwort", "rif", "res", "odp", "yn", "atb", "vá", "r",
        "回复", "答复",
    ];
    let mut s = subject.trim();
    loop {
        let Some(rest) = strip_one(s, PREFIXES) else {
            return s;
        };
        s = rest.trim_start();
    }
}

fn strip_one<'a>(s: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    for p in prefixes {
        let Some(head) = s.get(..p.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(p) && head.to_lowercase() != *p {
            continue;
        }
        let mut rest = &s[p.len()..];
        // An optional counter: `Re[2]:`, `Re(2):`, `Re^2:`.
        for (open, close) in [('[', ']'), ('(', ')')] {
            if let Some(inner) = rest.strip_prefix(open)
                && let Some(end) = inner.find(close)
                && inner[..end].chars().all(|c| c.is_ascii_digit())
            {
                rest = &inner[end + 1..];
            }
        }
        if let Some(r) = rest.strip_prefix('^') {
            rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        // `Re :` (French spacing) and the full-width colon.
        let rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix(':').or_else(|| rest.strip_prefix('：')) {
            return Some(r);
        }
    }
    None
}

/// The size the reply will have as a MIME mail: headers plus bodies, counted as base64 (76-column lines) unless
/// they are plain ASCII, so the estimate errs on the large side.
fn estimated_size(
    req: &ReplyRequest,
    to: &[String],
    cc: &[String],
    subject: &str,
    references: &[String],
    attachments: &[DecodedAttachment],
) -> u64 {
    fn encoded(body: &str) -> u64 {
        let n = body.len() as u64;
        if body.is_ascii() {
            n + n / 76 * 3
        } else {
            n.div_ceil(3) * 4 * 78 / 76
        }
    }
    let headers = 1024
        + to.iter().chain(cc).map(|a| a.len() as u64 + 2).sum::<u64>()
        + references.iter().map(|r| r.len() as u64 + 3).sum::<u64>()
        + encoded(subject);
    // Each attachment: base64 in 76-column lines plus its part headers (and the filename, perhaps encoded).
    let files = attachments
        .iter()
        .map(|a| {
            (a.data.len() as u64).div_ceil(3) * 4 * 78 / 76
                + 300
                + encoded(&a.filename)
                + a.content_type.len() as u64
        })
        .sum::<u64>();
    headers + encoded(&req.text) + req.html.as_deref().map_or(0, |h| encoded(h) + 200) + files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_prefixes_do_not_stack() {
        assert_eq!(reply_subject(Some("Order 4711")), "Re: Order 4711");
        assert_eq!(reply_subject(Some("Re: Order 4711")), "Re: Order 4711");
        assert_eq!(reply_subject(Some("RE: AW: Sv: re[2]: Order")), "Re: Order");
        assert_eq!(reply_subject(Some("Re : Antw: commande")), "Re: commande");
        assert_eq!(reply_subject(Some("Fwd: Re: x")), "Re: Fwd: Re: x");
        assert_eq!(reply_subject(Some("Reminder: pay")), "Re: Reminder: pay");
        assert_eq!(reply_subject(Some("Résumé")), "Re: Résumé");
        assert_eq!(reply_subject(None), "Re:");
    }
}
