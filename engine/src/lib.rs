//! mailqueue engine: the domain of a contact-center email queue.
//!
//! It owns the ingest pipeline (RFC 822 bytes → contact), queues and claim routing, the contact lifecycle
//! (claim, heartbeat, release, transfer, close, re-open), the outbox of replies, the append-only event log, the HTTP
//! queue API used by agents and routing backends, and the `mailqueue` binary. Storage goes through `store`, which
//! holds all SQL, one module per table, over PostgreSQL and SQLite alike.

pub mod api;
pub mod contacts;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod events;
pub mod import;
pub mod ingest;
pub mod mailboxes;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod outbox;
pub mod queues;
pub mod reload;
pub mod rescuer;
pub mod retention;
pub mod sqlite_lock;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use engine::Engine;
pub use error::{Error, Result};
