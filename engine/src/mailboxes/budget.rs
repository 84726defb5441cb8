//! The process-wide budget of mail bytes in flight: what every mailbox worker has downloaded and not yet stored.
//!
//! A worker takes its batch's size from the budget before it downloads the batch and gives it back once the batch
//! is stored, so 100 mailboxes receiving a burst hold at most [`DEFAULT_BYTES`] of mail (plus its parsed copies)
//! at once instead of 100 batches. Each byte of a batch briefly costs several (raw bytes, parsed bodies, the
//! statement's values, the database driver's buffers), so the budget is a fraction of the memory goal.
//!
//! A request larger than the whole budget (one large mail) is clamped to it: it waits until nothing else is in
//! flight and then runs alone, so it can never wait forever. Waiting is first come, first served, so a large mail
//! is not starved by a stream of small batches.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget of a process: 3 MiB of mail in flight across all mailboxes (two batches of 256 ordinary mails of
/// 6 KB: one stored while the next is downloaded); with its parsed and encoded copies about 20 MB.
pub const DEFAULT_BYTES: u64 = 3 * 1024 * 1024;
/// Permits are counted in KiB (a tokio semaphore takes at most `u32` permits per request).
const UNIT: u64 = 1024;

/// A byte budget shared by tasks; cheap to clone.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    units: u32,
    /// Mail was taken since memory was last released.
    used: Arc<AtomicBool>,
}

/// Bytes taken from a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct Taken {
    _permit: OwnedSemaphorePermit,
}

impl ByteBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: u64) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
            used: Arc::default(),
        }
    }

    /// The budget every mailbox worker of this process shares.
    pub fn shared() -> &'static ByteBudget {
        static SHARED: OnceLock<ByteBudget> = OnceLock::new();
        SHARED.get_or_init(|| ByteBudget::new(DEFAULT_BYTES))
    }

    /// Waits until `bytes` are free and takes them; more than the whole budget takes the whole budget.
    pub async fn take(&self, bytes: u64) -> Taken {
        let units = self.units_for(bytes);
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget's semaphore is never closed");
        self.used.store(true, Ordering::Relaxed);
        Taken { _permit: permit }
    }

    /// KiB that `bytes` takes: at least 1, at most the whole budget.
    fn units_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.units)
    }

    /// After a burst: when no mail is in flight any more, hands the memory malloc kept from it back to the
    /// system (see [`crate::memory::release_free_memory`]). Does nothing when no mail came since the last time.
    pub fn release_memory_if_idle(&self) {
        if self.permits.available_permits() == self.units as usize
            && self.used.swap(false, Ordering::Relaxed)
        {
            crate::memory::release_free_memory();
        }
    }

    /// Bytes free right now (for tests and figures).
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_mail_larger_than_the_budget_is_admitted_alone() {
        let budget = ByteBudget::new(100 * 1024);
        let small = budget.take(60 * 1024).await;
        assert_eq!(budget.available(), 40 * 1024);

        // 5 MiB against a 100 KiB budget: it waits for the small batch, then takes everything.
        let large = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(5 * 1024 * 1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!large.is_finished(), "admitted beside another batch");
        drop(small);
        let large = tokio::time::timeout(Duration::from_secs(10), large)
            .await
            .expect("a mail larger than the budget must still be admitted")
            .unwrap();
        assert_eq!(budget.available(), 0);

        // While it runs nothing else is admitted; afterwards the whole budget is back.
        let next = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(1).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!next.is_finished());
        drop(large);
        let next = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .unwrap()
            .unwrap();
        drop(next);
        assert_eq!(budget.available(), 100 * 1024);
    }

    #[tokio::test]
    async fn waiting_is_first_come_first_served() {
        let budget = ByteBudget::new(10 * 1024);
        let first = budget.take(8 * 1024).await;
        // The whole budget is asked for first; a small request after it waits behind it.
        let large = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(10 * 1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let small = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !small.is_finished(),
            "a small request overtook a waiting large one"
        );
        drop(first);
        drop(large.await.unwrap());
        drop(small.await.unwrap());
        assert_eq!(budget.available(), 10 * 1024);
    }

    #[test]
    fn sizes_round_up_to_kib_and_stay_within_the_budget() {
        let budget = ByteBudget::new(4 * 1024);
        assert_eq!(budget.units_for(0), 1);
        assert_eq!(budget.units_for(1025), 2);
        assert_eq!(budget.units_for(u64::MAX), 4);
        assert_eq!(ByteBudget::new(0).units, 1);
    }
}
