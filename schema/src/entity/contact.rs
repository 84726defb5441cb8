use sea_orm::entity::prelude::*;

/// `state` is one of `queued`, `claimed`, `closed`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "contacts")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub queue_id: i64,
    pub state: String,
    pub priority: i32,
    pub language: String,
    /// The queue address the first mail arrived on.
    pub arrived_on: String,
    pub customer_address: Option<String>,
    pub customer_name: Option<String>,
    pub subject: Option<String>,
    /// The contact's age for claim order; kept on release, reset on re-open.
    pub queued_at: DateTimeUtc,
    pub claimed_by: Option<String>,
    pub claimed_at: Option<DateTimeUtc>,
    pub lease_expires_at: Option<DateTimeUtc>,
    pub closed_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
