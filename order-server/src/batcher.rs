//! Commits of task results, grouped: completions that arrive together go to the store
//! as one transaction (the conjunction of their compares, the union of their writes),
//! so a burst of results costs one round trip, not one each. When the grouped
//! transaction's compares fail (one of them is stale) or the store refuses it, each
//! commit is retried on its own, so a stale completion still fails alone and every
//! other one lands. Transactions of one group never write the same key (each is about
//! its own task).
//!
//! A final commit also files its task under a finish-time key (retention reads them):
//! a group writes one key listing all of its finished tasks
//! ([`keys::done_group_value`]), not one per task; a commit run alone writes its own.

use std::sync::Arc;

use std::collections::BTreeMap;

use ferry_core::keys;
use ferry_store::{Op, Store, StoreError, Txn};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Most compares or operations in one grouped transaction (etcd's default limit is
/// 128 per branch).
const MAX_OPS: usize = 120;
/// Grouped transactions in flight at once.
const IN_FLIGHT: usize = 8;

/// A finished task, to be filed under a finish-time key with its commit.
#[derive(Clone, Debug)]
pub struct Done {
    pub cluster: String,
    pub finished_ms: u64,
    pub task_id: String,
    pub created_ms: u64,
    pub function: String,
}

struct Item {
    txn: Txn,
    done: Option<Done>,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

impl Item {
    fn ops(&self) -> usize {
        self.txn.success.len() + usize::from(self.done.is_some())
    }
}

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

    /// Runs `txn` (possibly grouped with others), filing `done` under a finish-time
    /// key with it; whether its compares held.
    pub async fn txn(&self, txn: Txn, done: Option<Done>) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Item { txn, done, reply })
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
        let (mut compares, mut ops) = (first.txn.compares.len(), first.ops());
        let mut group = vec![first];
        while let Ok(next) = rx.try_recv() {
            if compares + next.txn.compares.len() > MAX_OPS || ops + next.ops() > MAX_OPS {
                carry = Some(next);
                break;
            }
            compares += next.txn.compares.len();
            ops += next.ops();
            group.push(next);
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit_group(&store, group).await;
            drop(permit);
        });
    }
}

/// The finish-time keys for `dones`: one per cluster, listing its tasks, named after
/// the first and filed under the latest finish.
fn done_keys<'a>(dones: impl IntoIterator<Item = &'a Done>) -> Vec<Op> {
    let mut by_cluster: BTreeMap<&str, Vec<&Done>> = BTreeMap::new();
    for d in dones {
        by_cluster.entry(&d.cluster).or_default().push(d);
    }
    by_cluster
        .into_iter()
        .filter_map(|(cluster, ds)| {
            let first = ds.first()?;
            let finished = ds.iter().map(|d| d.finished_ms).max()?;
            let value = if ds.len() == 1 {
                keys::done_value(first.created_ms, &first.function)
            } else {
                keys::done_group_value(
                    ds.iter()
                        .map(|d| (d.task_id.as_str(), d.created_ms, d.function.as_str())),
                )
            };
            Some(Op::put(
                keys::done(cluster, finished, &first.task_id),
                value,
            ))
        })
        .collect()
}

async fn commit_group(store: &Arc<dyn Store>, group: Vec<Item>) {
    if group.len() > 1 && group.iter().all(|i| i.txn.failure.is_empty()) {
        let mut all = Txn::new();
        for i in &group {
            all.compares.extend(i.txn.compares.iter().cloned());
            all.success.extend(i.txn.success.iter().cloned());
        }
        all.success
            .extend(done_keys(group.iter().filter_map(|i| i.done.as_ref())));
        if size(&all) <= MAX_OPS
            && let Ok(r) = store.txn(all).await
            && r.succeeded
        {
            for i in group {
                let _ = i.reply.send(Ok(true));
            }
            return;
        }
    }
    // One at a time (concurrently): a single item, or a group with a stale member.
    let runs = group.into_iter().map(
        |Item {
             mut txn,
             done,
             reply,
         }| {
            let store = store.clone();
            async move {
                txn.success.extend(done_keys(done.as_ref()));
                let r = store.txn(txn).await.map(|r| r.succeeded);
                let _ = reply.send(r);
            }
        },
    );
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
                    None,
                ),
            );
        }
        let (oa, ob, rest) = tokio::join!(
            b.txn(txn("a", ra), Some(done("a"))),
            b.txn(txn("b", rb - 1), Some(done("b"))),
            futures::future::join_all(calls)
        );
        assert!(oa.unwrap());
        assert!(!ob.unwrap());
        assert!(rest.into_iter().all(|r| r.unwrap()));
        assert_eq!(store.get("a").await.unwrap().unwrap().value, b"2");
        assert_eq!(store.get("b").await.unwrap().unwrap().value, b"1");
        assert_eq!(filed(&store).await, ["a"], "a stale commit files nothing");
        assert_eq!(store.range("k").await.unwrap().kvs.len(), 50);

        // Finished tasks committed together are filed under one finish-time key.
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let k = format!("f{i:02}");
                b.txn(
                    Txn::new()
                        .when(Compare::absent(&k))
                        .then(Op::put(&k, b"x".to_vec())),
                    Some(done(&k)),
                )
            })
            .collect();
        assert!(
            futures::future::join_all(calls)
                .await
                .into_iter()
                .all(|r| r.unwrap())
        );
        let mut want: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
        want.insert(0, "a".into());
        assert_eq!(filed(&store).await, want);
        assert_eq!(
            store.range(&keys::done_of("c")).await.unwrap().kvs.len(),
            2,
            "one key for a, one for the group of 40"
        );
    }

    fn done(id: &str) -> Done {
        Done {
            cluster: "c".into(),
            finished_ms: 5_000,
            task_id: id.into(),
            created_ms: 1,
            function: "f".into(),
        }
    }

    /// The task ids filed under finish-time keys, sorted.
    async fn filed(store: &Arc<dyn Store>) -> Vec<String> {
        let mut ids: Vec<String> = vec![];
        for kv in store.range(&keys::done_of("c")).await.unwrap().kvs {
            for (id, listed) in keys::done_tasks(&kv.key, &kv.value) {
                assert_eq!(listed, Some((1, "f")));
                ids.push(id.to_string());
            }
        }
        ids.sort();
        ids
    }
}
