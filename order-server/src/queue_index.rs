//! [`QueueIndex`]: this cluster's task queue in memory, kept current by a watch. Each
//! entry is parsed once, when its event arrives, and filed under its (queue, priority
//! class) group sorted by [`queue_rank`]; a claim pass then reads only the heads of the
//! groups instead of walking and parsing the whole queue (O(queue) per pass).
//!
//! It is a `ferry_store::WatchedView`: listed once, then watched from the listed
//! revision; if the watch fails (compacted, lagged, store unavailable) it lists again
//! and swaps the rebuilt index in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ferry_core::task::{Priority, QueueEntry};
use ferry_store::{KeyValue, Revision, Store, StoreError, View, WatchedView};
use tokio::sync::watch;

use crate::fairness::{queue_name, queue_rank};

/// One queue entry as the index holds it.
#[derive(Clone, Debug)]
pub(crate) struct Indexed {
    pub id: String,
    pub key: String,
    pub mod_revision: Revision,
    /// Its `queue` normalised (empty → the default queue's name).
    pub entry: QueueEntry,
    pub rank: u64,
}

#[derive(Default)]
pub(crate) struct Data {
    /// Unclaimed entries, by task id.
    entries: HashMap<String, Indexed>,
    /// Claimed entries (tasks running somewhere), by task id: never handed out by
    /// [`QueueIndex::gather`]; the orphan sweep looks for those of gone instances.
    claimed: HashMap<String, Indexed>,
    /// (queue, class) → (rank, task id), ascending.
    groups: BTreeMap<(String, Priority), BTreeSet<(u64, String)>>,
}

impl View for Data {
    fn from_list(kvs: Vec<KeyValue>) -> Self {
        let mut d = Data::default();
        for kv in kvs {
            d.insert(kv);
        }
        d
    }
    fn put(&mut self, kv: KeyValue) {
        self.insert(kv);
    }
    fn delete(&mut self, key: &str) {
        self.remove(key.rsplit('/').next().unwrap_or_default());
    }
}

impl Data {
    fn insert(&mut self, kv: KeyValue) {
        let id = kv.key.rsplit('/').next().unwrap_or_default().to_string();
        self.remove(&id);
        // An entry that does not parse is left out (the claim never sees it).
        let Ok(mut entry) = serde_json::from_slice::<QueueEntry>(&kv.value) else {
            return;
        };
        entry.queue = queue_name(&entry.queue).to_string();
        let rank = queue_rank(&entry);
        let indexed = Indexed {
            id: id.clone(),
            key: kv.key,
            mod_revision: kv.mod_revision,
            entry,
            rank,
        };
        if indexed.entry.claim.is_some() {
            self.claimed.insert(id, indexed);
            return;
        }
        self.groups
            .entry((indexed.entry.queue.clone(), indexed.entry.priority))
            .or_default()
            .insert((rank, id.clone()));
        self.entries.insert(id, indexed);
    }

    fn remove(&mut self, id: &str) -> Option<Indexed> {
        if let Some(old) = self.claimed.remove(id) {
            return Some(old);
        }
        let old = self.entries.remove(id)?;
        let group = (old.entry.queue.clone(), old.entry.priority);
        if let Some(set) = self.groups.get_mut(&group) {
            set.remove(&(old.rank, old.id.clone()));
            if set.is_empty() {
                self.groups.remove(&group);
            }
        }
        Some(old)
    }
}

/// See the module docs. Clones share the index; its watch stops with the last clone.
#[derive(Clone)]
pub(crate) struct QueueIndex {
    view: WatchedView<Data>,
}

impl QueueIndex {
    /// Lists `prefix` and starts watching it. Fails if the first list or watch fails.
    pub async fn start(store: Arc<dyn Store>, prefix: &str) -> Result<Self, StoreError> {
        Ok(Self {
            view: WatchedView::start(store, prefix).await?,
        })
    }

    /// The applied revision; changes after each applied batch of events or re-list.
    pub fn changes(&self) -> watch::Receiver<Revision> {
        self.view.changes()
    }

    /// Stops the watch (at shutdown).
    pub fn stop(&self) {
        self.view.stop();
    }

    /// Unclaimed entries indexed (queued tasks, less those our claims took and the
    /// watch has not reported yet).
    pub fn len(&self) -> usize {
        self.view.read().entries.len()
    }

    /// Claimed entries whose claim is not by one of `live` incarnations (their
    /// instance is gone), for the orphan sweep.
    pub fn orphans(&self, live: &[String]) -> Vec<Indexed> {
        self.view
            .read()
            .claimed
            .values()
            .filter(|e| {
                e.entry
                    .claim
                    .as_ref()
                    .is_some_and(|c| !live.contains(&c.by))
            })
            .cloned()
            .collect()
    }

    /// The first entries of each (queue, class) group, in rank order, that `eligible`
    /// accepts: at most `cap(queue)` per group (0 skips the group). The index is
    /// read-locked meanwhile: keep both closures short and free of I/O.
    pub fn gather(
        &self,
        cap: impl Fn(&str) -> usize,
        mut eligible: impl FnMut(&Indexed) -> bool,
    ) -> Vec<Indexed> {
        let data = self.view.read();
        let mut out = vec![];
        for ((queue, _), set) in &data.groups {
            let cap = cap(queue);
            if cap == 0 {
                continue;
            }
            let mut n = 0;
            for (_, id) in set {
                let Some(e) = data.entries.get(id) else {
                    continue;
                };
                if eligible(e) {
                    out.push(e.clone());
                    n += 1;
                    if n == cap {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Drops entries our own claim marked, before the watch reports the mark, so the
    /// next pass does not read them again. Only the claimed revision is dropped: a
    /// newer one (the mark itself, or the task re-queued since) stays.
    pub fn forget(&self, claimed: &[(&str, Revision)]) {
        self.view.update(|data| {
            for &(id, rev) in claimed {
                if data.entries.get(id).is_some_and(|e| e.mod_revision == rev) {
                    data.remove(id);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_core::keys;

    fn entry(priority: Priority, enqueued_ms: u64, queue: &str) -> Vec<u8> {
        serde_json::to_vec(&QueueEntry {
            priority,
            not_before_ms: 0,
            enqueued_ms,
            queue: queue.into(),
            claim: None,
        })
        .unwrap()
    }

    /// Puts task `id`'s entry and waits until the index has applied it.
    async fn put_and_wait(
        store: &Arc<dyn Store>,
        changes: &mut watch::Receiver<Revision>,
        id: &str,
        value: Vec<u8>,
    ) -> Revision {
        let rev = store.put(&keys::queued("c", id), value, 0).await.unwrap();
        while *changes.borrow_and_update() < rev {
            changes.changed().await.unwrap();
        }
        rev
    }

    #[tokio::test]
    async fn follows_the_queue_and_hands_out_group_heads_in_rank_order() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(ferry_store::embedded::EmbeddedStore::open(dir.path()).unwrap());
        let prefix = keys::queue_of("c");
        store
            .put(&keys::queued("c", "t1"), entry(Priority::Normal, 5, ""), 0)
            .await
            .unwrap();
        let index = QueueIndex::start(store.clone(), &prefix).await.unwrap();
        let handed_out = |index: &QueueIndex| -> Vec<String> {
            index
                .gather(|_| 10, |_| true)
                .into_iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(index.len(), 1);
        let mut changes = index.changes();
        store
            .put(&keys::queued("c", "t2"), entry(Priority::Normal, 1, ""), 0)
            .await
            .unwrap();
        store
            .put(&keys::queued("c", "t3"), entry(Priority::Batch, 0, "q"), 0)
            .await
            .unwrap();
        let rev = store
            .put(&keys::queued("c", "bad"), b"not json".to_vec(), 0)
            .await
            .unwrap();
        while *changes.borrow_and_update() < rev {
            changes.changed().await.unwrap();
        }
        assert_eq!(index.len(), 3, "the unparsable entry is left out");
        let all = index.gather(|_| 10, |_| true);
        let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["t2", "t1", "t3"], "default queue first, by rank");
        assert_eq!(all[0].entry.queue, "default", "empty is the default queue");
        let heads = index.gather(|q| usize::from(q == "default"), |e| e.id != "t2");
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].id, "t1");

        // A claim forgets its revision; a later one (re-queued) is kept.
        let t1 = all[1].clone();
        index.forget(&[(t1.id.as_str(), t1.mod_revision - 1)]);
        assert_eq!(index.len(), 3);
        index.forget(&[(t1.id.as_str(), t1.mod_revision)]);
        assert_eq!(index.len(), 2);
        let rev = store.delete(&keys::queued("c", "t3")).await.unwrap();
        assert!(rev);
        put_and_wait(&store, &mut changes, "t4", entry(Priority::Critical, 9, "")).await;
        assert_eq!(handed_out(&index), ["t4", "t2"]);

        // A claim mark takes the entry out of what is handed out; a mark by a gone
        // incarnation is an orphan; unmarked again, it is handed out again.
        let mut marked: QueueEntry =
            serde_json::from_slice(&entry(Priority::Critical, 9, "")).unwrap();
        marked.claim = Some(ferry_core::task::Claim {
            by: "os-1@7".into(),
            attempt: 1,
            node: "n".into(),
            started_ms: 10,
        });
        let rev = put_and_wait(
            &store,
            &mut changes,
            "t4",
            serde_json::to_vec(&marked).unwrap(),
        )
        .await;
        assert_eq!(handed_out(&index), ["t2"]);
        assert!(index.orphans(&["os-1@7".into()]).is_empty());
        let orphans = index.orphans(&["os-1@8".into()]);
        assert_eq!(orphans.len(), 1);
        assert_eq!(
            (orphans[0].id.as_str(), orphans[0].mod_revision),
            ("t4", rev)
        );
        put_and_wait(&store, &mut changes, "t4", entry(Priority::Critical, 9, "")).await;
        assert!(index.orphans(&[]).is_empty());
        assert_eq!(index.gather(|_| 10, |_| true).len(), 2);
    }
}
