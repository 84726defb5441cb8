use sea_orm::entity::prelude::*;

/// `direction` is `inbound` or `outbound`. `source_key` dedupes ingest: `imap:<mailbox>:<uidvalidity>:<uid>` or
/// `sha256:<hex of the raw bytes>` for imports.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub contact_id: i64,
    pub direction: String,
    #[sea_orm(unique)]
    pub source_key: Option<String>,
    pub mailbox: Option<String>,
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    /// JSON array of Message-IDs.
    pub references: Json,
    pub from_address: Option<String>,
    pub from_name: Option<String>,
    pub reply_to: Option<String>,
    /// JSON array of `{ "name": …, "address": … }`.
    pub to_addresses: Json,
    pub cc_addresses: Json,
    pub subject: Option<String>,
    pub sent_at: Option<DateTimeUtc>,
    /// JSON array of `[name, value]` pairs in order.
    pub headers: Json,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub raw: Option<Vec<u8>>,
    pub size: i64,
    /// Who wrote an outbound message (API token name).
    pub created_by: Option<String>,
    pub created_at: DateTimeUtc,
    /// When the retention job dropped `raw` (the parsed fields stay); `None` while it is kept.
    pub raw_deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
