//! Mailbox leases as the supervisor and the workers use them: who this instance is, how long a lease lasts and
//! when it is renewed, how many mailboxes this instance should fetch, and the guard a worker checks before it
//! stores a batch.
//!
//! **Timing.** A lease is written to expire `ttl` after each renewal and renewed every `ttl / 3`. A worker
//! counts its lease as held only until `ttl * 2 / 3` after the last renewal that succeeded (measured on this
//! process's monotonic clock from before the renewal was sent): after two missed renewals it stops before storing
//! another batch, a third of the TTL before another instance can take the lease over. That third is the margin
//! for clock skew between hosts and for a batch whose commit was already under way.
//!
//! **The remaining window.** The guard is checked right before a batch's transaction; a commit that takes longer
//! than the margin (or hosts whose clocks differ by more) could still overlap with the next holder's first batch.
//! That costs no mail and no duplicate: both transactions take the folder's cursor lock in turn, source keys are
//! unique (the second store of a mail is a `Duplicate`), and the cursor never moves backwards.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The shortest lease accepted (shorter ones are raised to this): renewals must fit in a third of it.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// Who this process is, in `instances.id` and `mailbox_leases.owner`: `<hostname>:<pid>:<random>`, so that an
/// operator can tell which machine and process fetches a mailbox, and a restarted process is a new owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId {
    pub id: String,
    pub hostname: String,
    pub pid: u32,
}

impl InstanceId {
    pub fn new() -> Self {
        let hostname = hostname();
        let pid = std::process::id();
        let id = format!("{hostname}:{pid}:{:08x}", rand::random::<u32>());
        Self { id, hostname, pid }
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

/// The host's name (Linux), else `$HOSTNAME`, else `localhost`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The lease's durations, from `defaults.mailbox_lease`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease (and an instance's heartbeat) lasts without renewal.
    pub ttl: Duration,
}

impl Timing {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl: ttl.max(MIN_TTL),
        }
    }

    /// How often leases and the instance heartbeat are renewed.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long after a renewal (sent at that instant) a worker may still store mail.
    pub fn hold_for(&self) -> Duration {
        self.ttl * 2 / 3
    }
}

/// How many of `mailboxes` one of `instances` live instances should fetch: `ceil(mailboxes / instances)`. Every
/// mailbox finds room somewhere, and an instance over its share gives mailboxes up so that new instances get work.
pub fn fair_share(mailboxes: usize, instances: usize) -> usize {
    mailboxes.div_ceil(instances.max(1))
}

/// A worker's view of its mailbox lease. The supervisor extends it after each renewal and revokes it when the
/// lease is lost; the worker checks [`LeaseGuard::is_held`] before storing a batch, and its stop token is
/// cancelled when the lease is lost or runs out (see [`LeaseGuard::watch`]).
#[derive(Clone)]
pub struct LeaseGuard {
    inner: Arc<Inner>,
}

struct Inner {
    valid_until: Mutex<Instant>,
    revoked: AtomicBool,
    stop: CancellationToken,
}

impl LeaseGuard {
    /// A lease held until `valid_until`; `stop` is the worker's own stop token.
    pub fn new(valid_until: Instant, stop: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                valid_until: Mutex::new(valid_until),
                revoked: AtomicBool::new(false),
                stop,
            }),
        }
    }

    /// A guard that never runs out, for a worker without leases (tools, tests).
    pub fn unlimited(stop: CancellationToken) -> Self {
        Self::new(
            Instant::now() + Duration::from_secs(100 * 365 * 86_400),
            stop,
        )
    }

    pub fn valid_until(&self) -> Instant {
        *self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the worker may still store mail.
    pub fn is_held(&self) -> bool {
        !self.inner.revoked.load(Ordering::SeqCst) && Instant::now() < self.valid_until()
    }

    /// The lease was renewed: held until `until` (never shortened).
    pub fn extend(&self, until: Instant) {
        let mut v = self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *v = (*v).max(until);
    }

    /// The lease is gone (taken over, or not renewed in time): no more batches, and the worker stops.
    pub fn revoke(&self) {
        self.inner.revoked.store(true, Ordering::SeqCst);
        self.inner.stop.cancel();
    }

    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::SeqCst)
    }

    /// Runs `work` (the worker) and revokes the lease when it runs out without renewal, which stops the worker
    /// even while the supervisor cannot reach the database.
    pub async fn watch(&self, work: impl Future<Output = ()>) {
        tokio::pin!(work);
        loop {
            let until = self.valid_until();
            tokio::select! {
                () = &mut work => return,
                () = tokio::time::sleep_until(until), if !self.inner.stop.is_cancelled() => {
                    if !self.is_held() && !self.is_revoked() {
                        tracing::warn!(
                            "the mailbox lease was not renewed in time; stopping before storing another batch"
                        );
                        self.revoke();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(6, 3), 2);
        assert_eq!(fair_share(7, 3), 3);
        assert_eq!(fair_share(6, 1), 6);
        assert_eq!(fair_share(2, 5), 1);
        assert_eq!(fair_share(0, 3), 0);
        assert_eq!(fair_share(4, 0), 4);
    }

    #[test]
    fn timing_renews_every_third_and_holds_two_thirds() {
        let t = Timing::new(Duration::from_secs(15));
        assert_eq!(t.renew_every(), Duration::from_secs(5));
        assert_eq!(t.hold_for(), Duration::from_secs(10));
        assert_eq!(Timing::new(Duration::ZERO).ttl, MIN_TTL);
    }

    #[test]
    fn instance_ids_name_host_and_process() {
        let a = InstanceId::new();
        let b = InstanceId::new();
        assert!(
            a.id.starts_with(&format!("{}:{}:", a.hostname, a.pid)),
            "{a:?}"
        );
        assert_ne!(a.id, b.id);
    }

    #[tokio::test]
    async fn a_lease_that_runs_out_stops_the_worker() {
        let stop = CancellationToken::new();
        let guard = LeaseGuard::new(Instant::now() + Duration::from_millis(200), stop.clone());
        assert!(guard.is_held());
        // Extending never shortens.
        guard.extend(Instant::now());
        assert!(guard.valid_until() > Instant::now() + Duration::from_millis(50));
        let worker_stop = stop.clone();
        let watched = guard.clone();
        let task = tokio::spawn(async move { watched.watch(worker_stop.cancelled()).await });
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the watchdog stops the worker")
            .unwrap();
        assert!(stop.is_cancelled() && guard.is_revoked() && !guard.is_held());
    }

    #[tokio::test]
    async fn a_stopped_worker_keeps_its_lease() {
        let stop = CancellationToken::new();
        let guard = LeaseGuard::unlimited(stop.clone());
        stop.cancel();
        guard.watch(async {}).await;
        assert!(guard.is_held() && !guard.is_revoked());
    }
}
