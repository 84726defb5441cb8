//! Benchmarks that print figures; speed and memory goals live here, never as timed assertions in tests.
//!
//! Three binaries, each starting a private sandbox (the identity-provider emulator and Dovecot with XOAUTH2) and an
//! engine on a fresh database, and cleaning everything up when they end:
//!
//! * `ingest`: the raw IMAP ceiling of one connection (batched and one FETCH per message), then end-to-end ingest
//!   (TLS, XOAUTH2, FETCH, parse, store, flag) of N generated mails, the process's peak RSS, and optionally the
//!   peak RSS while one very large mail is stored.
//! * `latency`: mail delivered one at a time while the engine IDLEs; delivery → claimable through the API.
//! * `replies`: N replies stored with `Engine::submit_reply` and sent by the outbox worker through the sandbox's
//!   SMTP server (STARTTLS, XOAUTH2); replies/s and the process's peak RSS.
//! * `claims` (no sandbox): N seeded contacts claimed and closed over HTTP by 64 concurrent agents; claims/s, claim
//!   and close latency, and a check that no contact was claimed twice.
//!
//! All print a table with the project's targets beside the measured figures. Nothing here asserts on a figure:
//! the machine decides the numbers, the table shows them.
//!
//! Run on the project's 2-core machine, in release mode:
//! `cargo run --release -p mailqueue-bench --bin ingest -- --messages 20000`.

pub mod db;
pub mod mail;
pub mod report;
pub mod rss;
pub mod setup;
