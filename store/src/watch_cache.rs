//! [`WatchCache`]: an in-memory copy of every key under a prefix, kept current by a
//! watch; and [`WatchedView`], the same machinery for any [`View`] of the prefix (an
//! index, a parsed form) that can be rebuilt from a listing and updated by events.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{EventKind, KeyValue, Result, Revision, Store, StoreError, WatchStream};

/// Most events applied under one write lock.
const MAX_APPLY: usize = 4096;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a watched prefix is kept as in memory.
pub trait View: Send + Sync + 'static {
    /// The view of a fresh listing (the first, and each re-list after a failed watch).
    fn from_list(kvs: Vec<KeyValue>) -> Self;
    /// A key was written.
    fn put(&mut self, kv: KeyValue);
    /// A key was deleted.
    fn delete(&mut self, key: &str);
}

/// The plain view: every key, by key.
#[derive(Default)]
pub struct KeyMap(BTreeMap<String, KeyValue>);

impl KeyMap {
    /// The keys, ascending.
    pub fn map(&self) -> &BTreeMap<String, KeyValue> {
        &self.0
    }
}

impl View for KeyMap {
    fn from_list(kvs: Vec<KeyValue>) -> Self {
        Self(kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect())
    }
    fn put(&mut self, kv: KeyValue) {
        self.0.insert(kv.key.clone(), kv);
    }
    fn delete(&mut self, key: &str) {
        self.0.remove(key);
    }
}

/// A [`View`] of the keys under a prefix, listed once and then kept current by a watch
/// from a tokio task. If the watch fails (compacted, lagged, store unavailable), the
/// task lists the prefix again and re-watches, with a backoff while that keeps failing,
/// and swaps the rebuilt view in atomically.
///
/// Events are applied in batches (everything the watch has ready); readers see a batch
/// entirely or not at all. Clones share the view; the task stops when the last clone is
/// dropped.
pub struct WatchedView<V: View> {
    inner: Arc<Handle<V>>,
}

impl<V: View> Clone for WatchedView<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// The keys under a prefix, as a [`WatchedView`] of them: reads are served from memory.
#[derive(Clone)]
pub struct WatchCache {
    view: WatchedView<KeyMap>,
}

struct Handle<V: View> {
    shared: Arc<Shared<V>>,
    task: tokio::task::JoinHandle<()>,
}

impl<V: View> Drop for Handle<V> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared<V> {
    data: RwLock<Data<V>>,
    changes: watch::Sender<Revision>,
    resyncs: AtomicU64,
}

struct Data<V> {
    view: V,
    revision: Revision,
}

/// Lists `prefix` and starts a watch right after the listed revision.
async fn list_and_watch<V: View>(
    store: &dyn Store,
    prefix: &str,
) -> Result<(Data<V>, WatchStream)> {
    let range = store.range(prefix).await?;
    let stream = store.watch(prefix, range.revision + 1).await?;
    Ok((
        Data {
            view: V::from_list(range.kvs),
            revision: range.revision,
        },
        stream,
    ))
}

/// A read-locked view.
pub struct ViewGuard<'a, V>(RwLockReadGuard<'a, Data<V>>);

impl<V> std::ops::Deref for ViewGuard<'_, V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.0.view
    }
}

impl<V: View> WatchedView<V> {
    /// Lists `prefix` and starts watching it. Fails if the first list or watch fails.
    pub async fn start(store: Arc<dyn Store>, prefix: &str) -> Result<Self> {
        let (data, stream) = list_and_watch::<V>(store.as_ref(), prefix).await?;
        let (changes, _) = watch::channel(data.revision);
        let shared = Arc::new(Shared {
            data: RwLock::new(data),
            changes,
            resyncs: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(store, prefix.to_string(), shared.clone(), stream));
        Ok(Self {
            inner: Arc::new(Handle { shared, task }),
        })
    }

    fn data(&self) -> RwLockReadGuard<'_, Data<V>> {
        self.inner
            .shared
            .data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The view, read-locked while the guard lives: keep it short and free of I/O.
    pub fn read(&self) -> ViewGuard<'_, V> {
        ViewGuard(self.data())
    }

    /// Changes the view in place (e.g. to drop what this process just deleted, before
    /// the watch reports it). The watch's own events still apply afterwards.
    pub fn update(&self, f: impl FnOnce(&mut V)) {
        let mut data: RwLockWriteGuard<'_, Data<V>> = self
            .inner
            .shared
            .data
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut data.view);
    }

    /// The highest revision applied: the last list's revision or the last event's.
    /// Writes outside the prefix do not advance it.
    pub fn revision(&self) -> Revision {
        self.data().revision
    }

    /// Waits until [`Self::revision`] reaches `rev`; false on timeout.
    pub async fn wait_for(&self, rev: Revision, timeout: Duration) -> bool {
        let mut rx = self.changes();
        match tokio::time::timeout(timeout, rx.wait_for(|r| *r >= rev)).await {
            Ok(Ok(_)) => true,
            _ => self.revision() >= rev,
        }
    }

    /// How many times the view re-listed after its watch failed (a metric).
    pub fn resyncs(&self) -> u64 {
        self.inner.shared.resyncs.load(Ordering::Relaxed)
    }

    /// The applied revision; changes after each applied batch or re-list.
    pub fn changes(&self) -> watch::Receiver<Revision> {
        self.inner.shared.changes.subscribe()
    }

    /// Stops the watch now, for every clone (a component shutting down while tasks of
    /// its own still hold clones): the view stays as it was, and nothing more is read
    /// from the store.
    pub fn stop(&self) {
        self.inner.task.abort();
    }
}

impl WatchCache {
    /// Lists `prefix` and starts watching it. Fails if the first list or watch fails.
    pub async fn start(store: Arc<dyn Store>, prefix: &str) -> Result<WatchCache> {
        Ok(WatchCache {
            view: WatchedView::start(store, prefix).await?,
        })
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.view.read().map().get(key).cloned()
    }

    /// Every cached key, ascending.
    pub fn snapshot(&self) -> Vec<KeyValue> {
        self.view.read().map().values().cloned().collect()
    }

    /// Runs `f` over every cached entry, ascending, without copying them (the cache
    /// is read-locked meanwhile: keep `f` short and free of I/O).
    pub fn for_each(&self, mut f: impl FnMut(&KeyValue)) {
        for v in self.view.read().map().values() {
            f(v);
        }
    }

    /// The cached keys starting with `prefix`, ascending.
    pub fn values_with_prefix(&self, prefix: &str) -> Vec<KeyValue> {
        self.view
            .read()
            .map()
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The highest revision applied: the last list's revision or the last event's.
    /// Writes outside the prefix do not advance it.
    pub fn revision(&self) -> Revision {
        self.view.revision()
    }

    /// Waits until [`Self::revision`] reaches `rev`; false on timeout.
    pub async fn wait_for(&self, rev: Revision, timeout: Duration) -> bool {
        self.view.wait_for(rev, timeout).await
    }

    /// How many times the cache re-listed after its watch failed (a metric).
    pub fn resyncs(&self) -> u64 {
        self.view.resyncs()
    }

    /// The applied revision; changes after each applied batch or re-list.
    pub fn changes(&self) -> watch::Receiver<Revision> {
        self.view.changes()
    }

    /// See [`WatchedView::stop`].
    pub fn stop(&self) {
        self.view.stop();
    }
}

async fn run<V: View>(
    store: Arc<dyn Store>,
    prefix: String,
    shared: Arc<Shared<V>>,
    mut stream: WatchStream,
) {
    let mut backoff = MIN_BACKOFF;
    let mut watching_since = Instant::now();
    loop {
        let err = consume(&shared, &mut stream).await;
        tracing::debug!(prefix = %prefix, error = %err, "watch cache: watch ended; re-listing");
        // A watch that broke soon after it started: keep backing off.
        if watching_since.elapsed() > MAX_BACKOFF * 2 {
            backoff = MIN_BACKOFF;
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match list_and_watch::<V>(store.as_ref(), &prefix).await {
                Ok((data, s)) => {
                    let rev = data.revision;
                    *shared.data.write().unwrap_or_else(PoisonError::into_inner) = data;
                    shared.resyncs.fetch_add(1, Ordering::Relaxed);
                    shared.changes.send_replace(rev);
                    stream = s;
                    watching_since = Instant::now();
                    break;
                }
                Err(e) => {
                    tracing::warn!(prefix = %prefix, error = %e, "watch cache: re-list failed")
                }
            }
        }
    }
}

/// Applies events until the stream fails; returns why it stopped.
async fn consume<V: View>(shared: &Shared<V>, stream: &mut WatchStream) -> StoreError {
    loop {
        let first = match stream.next().await {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => return e,
            None => return StoreError::Unavailable("watch stream ended".into()),
        };
        let mut batch = vec![first];
        let mut failed = None;
        while batch.len() < MAX_APPLY {
            match stream.next().now_or_never() {
                Some(Some(Ok(ev))) => batch.push(ev),
                Some(Some(Err(e))) => {
                    failed = Some(e);
                    break;
                }
                Some(None) => {
                    failed = Some(StoreError::Unavailable("watch stream ended".into()));
                    break;
                }
                None => break,
            }
        }
        let rev = {
            let mut data = shared.data.write().unwrap_or_else(PoisonError::into_inner);
            for ev in batch {
                data.revision = data.revision.max(ev.kv.mod_revision);
                match ev.kind {
                    EventKind::Put => data.view.put(ev.kv),
                    EventKind::Delete => data.view.delete(&ev.kv.key),
                }
            }
            data.revision
        };
        shared.changes.send_replace(rev);
        if let Some(e) = failed {
            return e;
        }
    }
}
