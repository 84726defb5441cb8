//! mailqueue storage schema: the sea-orm entities of every table and the migrations that create them on
//! PostgreSQL (production, shared by several engine instances) and SQLite (the embedded default).
//!
//! Migrations are plain SQL per backend, applied in order and recorded in `schema_migrations`; this keeps the
//! build free of sea-orm-migration and makes the DDL easy to read. The queries that use these tables live in the
//! engine's `store` module, one file per table.

pub mod entity;
pub mod migrate;

pub use migrate::{Backend, connect, migrate};
