//! The outbox: replies written by agents, stored as outbound messages with a Message-ID of our own, waiting for
//! the outgoing connector (SMTP issue) to send them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{contacts::Actor, engine::Engine, error::Result};

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
    pub async fn submit_reply(&self, contact_id: i64, actor: Actor<'_>, req: ReplyRequest) -> Result<Reply> {
        let _ = (contact_id, actor, req);
        todo!()
    }
}
