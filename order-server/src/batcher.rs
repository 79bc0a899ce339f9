//! Commits of task results, grouped: completions that arrive together go to the store
//! as one transaction (the conjunction of their compares, the union of their writes),
//! so a burst of results costs one round trip, not one each. When the grouped
//! transaction's compares fail (one of them is stale) or the store refuses it, each
//! commit is retried on its own, so a stale completion still fails alone and every
//! other one lands. Transactions of one group never write the same key (each is about
//! its own task).

use std::sync::Arc;

use ferry_store::{Store, StoreError, Txn};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Most compares or operations in one grouped transaction (etcd's default limit is
/// 128 per branch).
const MAX_OPS: usize = 120;
/// Grouped transactions in flight at once.
const IN_FLIGHT: usize = 8;

type Item = (Txn, oneshot::Sender<Result<bool, StoreError>>);

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Item>,
}

impl Batcher {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    /// Runs `txn` (possibly grouped with others); whether its compares held.
    pub async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send((txn, done))
            .map_err(|_| StoreError::Unavailable("the commit batcher stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the commit batcher stopped".into()))?
    }
}

fn size(t: &Txn) -> usize {
    t.compares.len().max(t.success.len())
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Item>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carry: Option<Item> = None;
    loop {
        let first = match carry.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        // Wait for a free slot first: while all are busy, results pile up in the
        // channel and the next group is bigger.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut compares, mut ops) = (first.0.compares.len(), first.0.success.len());
        let mut group = vec![first];
        while let Ok(next) = rx.try_recv() {
            if compares + next.0.compares.len() > MAX_OPS || ops + next.0.success.len() > MAX_OPS {
                carry = Some(next);
                break;
            }
            compares += next.0.compares.len();
            ops += next.0.success.len();
            group.push(next);
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit_group(&store, group).await;
            drop(permit);
        });
    }
}

async fn commit_group(store: &Arc<dyn Store>, group: Vec<Item>) {
    if group.len() > 1 && group.iter().all(|(t, _)| t.failure.is_empty()) {
        let mut all = Txn::new();
        for (t, _) in &group {
            all.compares.extend(t.compares.iter().cloned());
            all.success.extend(t.success.iter().cloned());
        }
        if size(&all) <= MAX_OPS
            && let Ok(r) = store.txn(all).await
            && r.succeeded
        {
            for (_, done) in group {
                let _ = done.send(Ok(true));
            }
            return;
        }
    }
    // One at a time (concurrently): a single item, or a group with a stale member.
    let runs = group.into_iter().map(|(t, done)| {
        let store = store.clone();
        async move {
            let r = store.txn(t).await.map(|r| r.succeeded);
            let _ = done.send(r);
        }
    });
    futures::future::join_all(runs).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_store::{Compare, Op};

    #[tokio::test]
    async fn a_stale_member_fails_alone_and_the_rest_of_its_group_lands() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(ferry_store::embedded::EmbeddedStore::open(dir.path()).unwrap());
        let ra = store.put("a", b"1".to_vec(), 0).await.unwrap();
        let rb = store.put("b", b"1".to_vec(), 0).await.unwrap();
        let b = Batcher::start(store.clone());
        let txn = |key: &str, rev: i64| {
            Txn::new()
                .when(Compare::mod_revision(key, rev))
                .then(Op::put(key, b"2".to_vec()))
        };
        // Many at once, so they group; b's compare is stale.
        let mut calls = vec![];
        for i in 0..50 {
            let k = format!("k{i}");
            calls.push(
                b.txn(
                    Txn::new()
                        .when(Compare::absent(&k))
                        .then(Op::put(k, b"x".to_vec())),
                ),
            );
        }
        let (oa, ob, rest) = tokio::join!(
            b.txn(txn("a", ra)),
            b.txn(txn("b", rb - 1)),
            futures::future::join_all(calls)
        );
        assert!(oa.unwrap());
        assert!(!ob.unwrap());
        assert!(rest.into_iter().all(|r| r.unwrap()));
        assert_eq!(store.get("a").await.unwrap().unwrap().value, b"2");
        assert_eq!(store.get("b").await.unwrap().unwrap().value, b"1");
        assert_eq!(store.range("k").await.unwrap().kvs.len(), 50);
    }
}
