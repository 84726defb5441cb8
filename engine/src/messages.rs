//! Reading what a contact holds: its messages (inbound and outbound), their raw bytes and attachments.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    contacts::Contact,
    engine::Engine,
    error::{Error, Result},
    outbox::Reply,
    store::{self, attachments::AttachmentRow, messages::MessageRow},
};

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
        let contact = self.contact(id).await?;
        let rows = store::messages::list_for_contact(&self.db, id).await?;
        let ids: Vec<i64> = rows.iter().map(|m| m.id).collect();
        let mut attachments = store::attachments::list_for_messages(&self.db, &ids).await?;
        let messages = rows
            .into_iter()
            .map(|m| {
                let mine = attachments
                    .extract_if(.., |a| a.message_id == m.id)
                    .map(AttachmentMeta::from)
                    .collect();
                MessageView::from_row(m, mine)
            })
            .collect();
        let replies = store::outbox::list_for_contact(&self.db, id)
            .await?
            .into_iter()
            .map(Reply::from)
            .collect();
        Ok(ContactDetail {
            contact,
            messages,
            replies,
        })
    }

    /// The raw RFC 822 bytes of message `message_id` of contact `contact_id`.
    pub async fn raw_message(&self, contact_id: i64, message_id: i64) -> Result<Vec<u8>> {
        match store::messages::raw(&self.db, contact_id, message_id).await? {
            Some(Some(raw)) => Ok(raw),
            Some(None) => {
                match store::messages::raw_deleted_at(&self.db, contact_id, message_id).await? {
                    Some(at) => Err(Error::Gone(format!(
                        "the raw bytes of message {message_id} of contact {contact_id} were deleted by the retention job \
                     on {} (retention.raw_messages); its text, headers and attachments are still available",
                        at.format("%Y-%m-%d")
                    ))),
                    None => Err(Error::not_found(format!(
                        "message {message_id} of contact {contact_id} has no raw bytes yet (a reply is rendered when it is sent)"
                    ))),
                }
            }
            None => Err(Error::not_found(format!(
                "contact {contact_id} has no message {message_id}"
            ))),
        }
    }

    /// Attachment `attachment_id` of a message of contact `contact_id`.
    pub async fn attachment(
        &self,
        contact_id: i64,
        attachment_id: i64,
    ) -> Result<AttachmentContent> {
        let a = store::attachments::get_for_contact(&self.db, contact_id, attachment_id)
            .await?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "contact {contact_id} has no attachment {attachment_id}"
                ))
            })?;
        Ok(AttachmentContent {
            filename: a.filename,
            content_type: a.content_type,
            data: a.data,
        })
    }
}

impl MessageView {
    fn from_row(m: MessageRow, attachments: Vec<AttachmentMeta>) -> Self {
        Self {
            id: m.id,
            direction: m.direction,
            message_id: m.message_id,
            in_reply_to: m.in_reply_to,
            from_address: m.from_address,
            from_name: m.from_name,
            to: addresses(&m.to_addresses),
            cc: addresses(&m.cc_addresses),
            subject: m.subject,
            sent_at: m.sent_at,
            text_body: m.text_body,
            html_body: m.html_body,
            size: m.size,
            created_at: m.created_at,
            attachments,
        }
    }
}

impl From<AttachmentRow> for AttachmentMeta {
    fn from(a: AttachmentRow) -> Self {
        Self {
            id: a.id,
            filename: a.filename,
            content_type: a.content_type,
            size: a.size,
            inline: a.inline,
        }
    }
}

/// The addresses of a stored address list: `[{ "name": …, "address": … }, …]` (plain strings are accepted too).
fn addresses(list: &serde_json::Value) -> Vec<String> {
    let Some(items) = list.as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|v| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v.get("address").and_then(|a| a.as_str()).map(str::to_owned),
        })
        .collect()
}
