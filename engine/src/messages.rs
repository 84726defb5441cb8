//! Reading what a contact holds: its messages (inbound and outbound), their raw bytes and attachments.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{contacts::Contact, engine::Engine, error::Result, outbox::Reply};

/// A contact with its messages and replies.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ContactDetail {
    #[serde(flatten)]
    pub contact: Contact,
    pub messages: Vec<MessageView>,
    pub replies: Vec<Reply>,
}

/// One stored message, without its raw bytes.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageView {
    pub id: i64,
    /// `inbound` or `outbound`.
    pub direction: String,
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub from_address: Option<String>,
    pub from_name: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub subject: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub size: i64,
    pub created_at: DateTime<Utc>,
    pub attachments: Vec<AttachmentMeta>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AttachmentMeta {
    pub id: i64,
    pub filename: Option<String>,
    pub content_type: String,
    pub size: i64,
    pub inline: bool,
}

/// An attachment's content for download.
#[derive(Debug, Clone)]
pub struct AttachmentContent {
    pub filename: Option<String>,
    pub content_type: String,
    pub data: Vec<u8>,
}

impl Engine {
    /// A contact with its messages (oldest first) and replies.
    pub async fn contact_detail(&self, id: i64) -> Result<ContactDetail> {
        let _ = id;
        todo!()
    }

    /// The raw RFC 822 bytes of message `message_id` of contact `contact_id`.
    pub async fn raw_message(&self, contact_id: i64, message_id: i64) -> Result<Vec<u8>> {
        let _ = (contact_id, message_id);
        todo!()
    }

    /// Attachment `attachment_id` of a message of contact `contact_id`.
    pub async fn attachment(&self, contact_id: i64, attachment_id: i64) -> Result<AttachmentContent> {
        let _ = (contact_id, attachment_id);
        todo!()
    }
}
