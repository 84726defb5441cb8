//! The ingest pipeline every mail source uses (import now, IMAP later): RFC 822 bytes + the queue address they
//! arrived on → parse → dedupe → thread → store contact, message, attachments and event in one transaction.
//! Mail that is too large or cannot be parsed goes to quarantine with the reason; nothing is dropped.

use serde::Serialize;

use crate::{engine::Engine, error::Result};

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
    Threaded { contact_id: i64, message_id: i64, reopened: bool },
    /// The same mail (same source key) was stored before; nothing changed.
    Duplicate,
    /// Kept in quarantine with the reason.
    Quarantined { quarantine_id: i64, reason: String },
}

impl Engine {
    /// Ingests one mail. See the module doc.
    pub async fn ingest(&self, mail: Incoming<'_>) -> Result<Outcome> {
        let _ = mail;
        todo!("ingest pipeline")
    }
}
