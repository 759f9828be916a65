//! Waking the relays after a commit, outside the committing transaction.
//!
//! # Guarantees
//!
//! - **Nothing in the appending transaction serialises commits.** No
//!   trigger and no `NOTIFY` runs inside it: PostgreSQL takes a cluster-wide
//!   lock from a notifying transaction's commit until its commit record is
//!   flushed, so notifying transactions commit one at a time and lose group
//!   commit. The wake is a `NOTIFY` of its own, sent after the commit.
//! - **Coalesced and spaced.** One task per store sends the wakes, one at a
//!   time and at least [`SPACING`] apart: the commits in between are covered
//!   by the next one, so a store sends at most 100 `NOTIFY`s a second
//!   whatever its command rate (each is a transaction of its own, and
//!   notifying transactions commit one at a time). The first commit after a
//!   quiet spell is woken for at once; under load the relays are busy
//!   reading anyway.
//! - **A wake is a hint.** A lost wake (the database away, no relay
//!   listening) costs latency, never an event: the relay also polls, faster
//!   right after a wake or a read that found rows (see the relay's docs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::PgPool;
use tokio::sync::Notify;

/// The channel relays `LISTEN` on.
pub const OUTBOX_CHANNEL: &str = "tidings_outbox";

/// The least time between two wakes of one store.
pub(crate) const SPACING: std::time::Duration = std::time::Duration::from_millis(10);

/// Sends coalesced wakes for one store (shared by its clones).
pub(crate) struct Waker {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    wake: Notify,
    started: AtomicBool,
    closed: AtomicBool,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").finish_non_exhaustive()
    }
}

impl Waker {
    pub(crate) fn new(pool: PgPool) -> Self {
        Waker {
            shared: Arc::new(Shared {
                pool,
                wake: Notify::new(),
                started: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Asks for a wake to be sent soon (never waits). The sending task is
    /// started on the first call, on the current Tokio runtime.
    pub(crate) fn wake(&self) {
        if !self.shared.started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(send_wakes(Arc::clone(&self.shared)));
                }
                Err(_) => {
                    self.shared.started.store(false, Ordering::Release);
                    return;
                }
            }
        }
        // One stored permit at most: commits while a wake is on its way are
        // covered by the next one.
        self.shared.wake.notify_one();
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

async fn send_wakes(shared: Arc<Shared>) {
    let statement = format!("SELECT pg_notify('{OUTBOX_CHANNEL}', '')");
    loop {
        shared.wake.notified().await;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sqlx::query(&statement).execute(&shared.pool),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            tracing::debug!(
                "store: a relay wake could not be sent; relays find the rows by polling"
            );
        }
        // Commits meanwhile leave one permit: the next wake, after the spacing.
        tokio::time::sleep(SPACING).await;
    }
}
