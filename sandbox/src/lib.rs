//! A local Microsoft 365 sandbox for mailqueue's tests, benchmarks and first run: an emulator of the Microsoft
//! identity platform v2.0 token endpoint (Entra ID), a real Dovecot IMAP server that validates bearer tokens against
//! it, and an Exchange-like SMTP submission server (STARTTLS + XOAUTH2). It runs on loopback ports in a private
//! directory, as an unprivileged process tree.

pub mod dovecot;
pub mod idp;
pub mod maildir;
pub mod sandbox;
pub mod smtp;
pub mod tls;
pub mod tokens;
pub mod world;

pub use sandbox::{Sandbox, SandboxOptions};
