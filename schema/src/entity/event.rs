use sea_orm::entity::prelude::*;

/// An append-only event. `seq` is NULL until the sequencer numbers it (see the migration's comment).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub seq: Option<i64>,
    pub kind: String,
    pub contact_id: Option<i64>,
    pub queue: Option<String>,
    pub actor: Option<String>,
    pub data: Json,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
