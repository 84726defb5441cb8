//! Transport to Microsoft 365: OAuth2 token providers, IMAP, SMTP.
//!
//! * [`oauth`]: access tokens from the Microsoft identity platform (Entra ID) v2.0 token endpoint — client
//!   credentials (*OAuth Service*) and the resource-owner password grant (*OAuth User*) — cached per
//!   (endpoint, client, scope, user), refreshed ahead of expiry, fetched once for concurrent callers, retried on
//!   throttling and outages, with errors that keep Microsoft's diagnostics and explain them in plain words.
//! * [`imap`]: IMAP over implicit TLS or STARTTLS with SASL XOAUTH2, and a typed session on one mailbox folder
//!   (select, fetch by UID, mark seen, move, delete, IDLE).
//! * [`explain`]: the table that turns AADSTS codes and transport failures into a cause and a fix.

pub mod explain;
pub mod imap;
pub mod oauth;
pub mod smtp;
