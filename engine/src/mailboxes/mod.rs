//! The incoming side: for every queue address of every enabled incoming server, a worker logs into its mailbox
//! (IMAP, XOAUTH2 with a token of the server's OAuth type) and brings every new mail into the queue exactly once.
//!
//! * [`supervisor`]: plans the workers from the configuration (servers with `enabled: false` are skipped and
//!   logged), shares one token cache, restarts a worker that crashed, and ends after shutdown.
//! * [`worker`]: one task per address — sessions, IDLE or polling, batches stored with the cursor in one
//!   transaction before anything is done at the server, UIDVALIDITY resynchronisation, backoff.
//! * [`leases`]: with several instances on one database, which instance fetches which mailbox (lease rows,
//!   renewed by heartbeat, a fair share per live instance), and the guard a worker checks before storing.
//! * [`status`]: what each worker is doing, for `GET /v1/mailboxes` and the logs.
//! * [`budget`]: the process-wide budget of downloaded mail not yet stored, shared by every worker.

pub mod budget;
pub mod leases;
pub mod status;
pub mod supervisor;
pub mod worker;

pub use status::{MailboxError, MailboxState, MailboxStatus, StatusBoard, StatusHandle};
pub use supervisor::spawn;
pub use worker::FAILPOINT_ENV;
