//! [`LeaseKeeper`]: grants a lease and keeps it alive from a background task.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::{LeaseId, Result, Store, StoreError};

/// A lease kept alive every `ttl / 3` by a tokio task.
///
/// The lease counts as lost once a keep-alive answers [`StoreError::LeaseNotFound`],
/// or when no keep-alive has succeeded for a whole `ttl` (the store may have expired
/// it by then). A lost lease is not renewed again; grant a new one. Dropping the keeper
/// stops the keep-alives without revoking (the lease then expires after its TTL);
/// [`LeaseKeeper::revoke`] revokes it now.
pub struct LeaseKeeper {
    id: LeaseId,
    store: Arc<dyn Store>,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and starts keeping it alive. Needs a tokio runtime.
    pub async fn start(store: Arc<dyn Store>, ttl: Duration) -> Result<LeaseKeeper> {
        let ttl = ttl.max(Duration::from_millis(30));
        let granted_at = Instant::now();
        let id = store.grant_lease(ttl).await?;
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(keep_alive_loop(store.clone(), id, ttl, granted_at, tx));
        Ok(LeaseKeeper {
            id,
            store,
            lost,
            task,
        })
    }

    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Whether the lease is lost (see the type's docs).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        // An error means the task is gone, which only happens once the lease is lost.
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Stops the keep-alives and revokes the lease, deleting its keys. A lease that is
    /// already gone is not an error.
    pub async fn revoke(self) -> Result<()> {
        self.task.abort();
        match self.store.revoke_lease(self.id).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_alive_loop(
    store: Arc<dyn Store>,
    id: LeaseId,
    ttl: Duration,
    granted_at: Instant,
    lost: watch::Sender<bool>,
) {
    let interval = ttl / 3;
    let retry = (ttl / 10).max(Duration::from_millis(10));
    // The lease is safe until `expires` at least: every renewal sets the server's expiry
    // to ttl after the server handled it, which is after we sent it.
    let mut expires = granted_at + ttl;
    let mut next = Instant::now() + interval;
    loop {
        tokio::time::sleep_until(next.min(expires)).await;
        let sent = Instant::now();
        if sent >= expires {
            tracing::warn!(
                lease = id,
                "lease lost: no successful keep-alive for a whole TTL"
            );
            break;
        }
        match tokio::time::timeout_at(expires, store.keep_alive(id)).await {
            Ok(Ok(())) => {
                expires = sent + ttl;
                next = sent + interval;
            }
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                tracing::warn!(lease = id, "lease lost: the store no longer has it");
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "lease keep-alive failed; retrying");
                next = Instant::now() + retry;
            }
            Err(_) => next = expires,
        }
    }
    let _ = lost.send(true);
}
