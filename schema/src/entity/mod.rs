//! One sea-orm entity per table. Column names match `sql/*.sql`.

pub mod attachment;
pub mod contact;
pub mod event;
pub mod mailbox_cursor;
pub mod message;
pub mod outbox;
pub mod quarantine;
pub mod queue;
