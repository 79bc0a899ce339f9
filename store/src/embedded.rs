//! The embedded backend: one process, durable in a write-ahead log plus snapshots
//! (`DIR/store.wal`, `DIR/store.snap`; see [`wal`] for the format and recovery rules).
//!
//! - Writes go through one writer thread. It takes every request queued at the time,
//!   applies them in order (each write request is its own revision, as in etcd),
//!   appends them as ONE log record (group commit, one write, fdatasync'd), and only
//!   then makes them visible to reads and watches and answers the callers. An
//!   acknowledged write survives kill -9 and power loss; a torn last record (never
//!   acknowledged) is dropped at the next open.
//! - When the log outgrows max([`EmbeddedOptions::compact_log_bytes`], 2 × the last
//!   snapshot), the writer writes a new snapshot of the whole state and restarts the log.
//! - Reads are served from an in-memory copy of all the data (loaded at open); they
//!   never touch the disk.
//! - Watches replay from an in-memory history of the last [`EmbeddedOptions::history_events`]
//!   events. The history is not persisted: after a restart, a watch from a revision at
//!   or before the current one fails with [`StoreError::Compacted`]. Each watcher gets
//!   a revision's events together (like etcd); one that falls
//!   [`EmbeddedOptions::watch_buffer`] revisions behind is cancelled with
//!   [`StoreError::WatchLagged`].
//! - Leases (id, ttl) are persisted; after a restart each gets a fresh full TTL, like
//!   etcd. A background thread revokes expired leases every 100 ms. TTLs keep their
//!   millisecond precision (etcd rounds up to whole seconds).
//! - The directory is locked (`DIR/store.lock`) while open: a second open fails.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak, mpsc,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::oneshot;

use crate::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, MAX_TXN_OPS, NO_LEASE,
    Op, Page, Range, RangeQuery, Result, Revision, Store, StoreError, Txn, TxnResult, WatchStream,
};

mod wal;

/// The most requests one group commit takes.
const MAX_BATCH: usize = 4096;
/// How often the expiry thread looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Tuning for [`EmbeddedStore::open_with`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Events kept in memory for watches that start in the past.
    pub history_events: usize,
    /// Bytes (keys and values) kept in that history, at most.
    pub history_bytes: usize,
    /// Revisions (each with its events) buffered per watcher before it is cancelled
    /// with `WatchLagged`.
    pub watch_buffer: usize,
    /// The log is compacted into a snapshot when it grows past this many bytes (or twice
    /// the last snapshot's size, if that is more).
    pub compact_log_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            history_events: 100_000,
            history_bytes: 64 << 20,
            watch_buffer: 4096,
            compact_log_bytes: 64 << 20,
        }
    }
}

/// The embedded store. Cheap to clone; the writer and expiry threads stop (and the
/// file is closed) when the last clone is dropped.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    expiry: Option<JoinHandle<()>>,
}

/// What readers, watchers and the writer share.
struct Shared {
    state: RwLock<State>,
    leases: Mutex<HashMap<LeaseId, LiveLease>>,
    watch_buffer: usize,
}

struct State {
    revision: Revision,
    /// Shared with the history and the watchers' queues, so publishing a value is not
    /// a copy of it; readers and watch streams copy what they hand out.
    kvs: BTreeMap<String, Arc<KeyValue>>,
    history: VecDeque<SharedEvent>,
    history_bytes: usize,
    history_events_max: usize,
    history_bytes_max: usize,
    /// Every revision up to this one has left the history.
    compacted: Revision,
    watchers: HashMap<u64, Watcher>,
    next_watcher: u64,
}

struct Watcher {
    prefix: String,
    /// Live events before this revision are not sent (0: all).
    from: Revision,
    /// One message per revision.
    tx: tokio::sync::mpsc::Sender<Vec<SharedEvent>>,
    lagged: Arc<AtomicBool>,
}

/// An [`Event`] whose value is shared with the state, the history and other watchers.
#[derive(Clone)]
struct SharedEvent {
    kind: EventKind,
    kv: Arc<KeyValue>,
}

impl SharedEvent {
    fn into_event(self) -> Event {
        Event {
            kind: self.kind,
            kv: Arc::unwrap_or_clone(self.kv),
        }
    }
}

#[derive(Clone, Copy)]
struct LiveLease {
    ttl: Duration,
    deadline: Instant,
}

enum Request {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    Txn(Txn),
    Grant {
        ttl: Duration,
    },
    Revoke {
        lease: LeaseId,
    },
    /// Revokes those of these leases that are still expired when the writer gets here.
    Expire {
        leases: Vec<LeaseId>,
    },
}

enum Response {
    Revision(Revision),
    Deleted(bool),
    Txn(TxnResult),
    Lease(LeaseId),
    Done,
}

enum Cmd {
    Req(Request, oneshot::Sender<Result<Response>>),
    Stop,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn closed() -> StoreError {
    StoreError::Unavailable("embedded store is closed".into())
}

/// etcd's checks of a range: a start key, and an end above it.
pub(crate) fn check_range(q: &RangeQuery) -> Result<()> {
    if q.start.is_empty() {
        return Err(StoreError::InvalidRequest("key is not provided".into()));
    }
    if q.end <= q.start {
        return Err(StoreError::InvalidRequest(format!(
            "range end {:?} is not above its start {:?}",
            q.end, q.start
        )));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        Err(StoreError::InvalidRequest("key is not provided".into()))
    } else {
        Ok(())
    }
}

/// etcd's static checks of a txn: sizes, empty keys, and no key written twice per branch.
pub(crate) fn validate_txn(txn: &Txn) -> Result<()> {
    let invalid = |m: String| Err(StoreError::InvalidRequest(m));
    if txn
        .compares
        .len()
        .max(txn.success.len())
        .max(txn.failure.len())
        > MAX_TXN_OPS
    {
        return invalid(format!(
            "too many operations in txn request (max {MAX_TXN_OPS})"
        ));
    }
    for c in &txn.compares {
        check_key(&c.key)?;
    }
    for branch in [&txn.success, &txn.failure] {
        let mut puts = BTreeSet::new();
        let mut dels: Vec<(&str, bool)> = Vec::new();
        for op in branch {
            match op {
                Op::Put { key, .. } | Op::Get { key } => check_key(key)?,
                Op::Delete { key } => {
                    check_key(key)?;
                    dels.push((key, false));
                }
                Op::DeletePrefix { prefix } => dels.push((prefix, true)),
            }
        }
        for op in branch {
            if let Op::Put { key, .. } = op {
                let deleted = dels.iter().any(|(d, prefix)| {
                    if *prefix {
                        key.starts_with(d)
                    } else {
                        key == d
                    }
                });
                if !puts.insert(key.as_str()) || deleted {
                    return invalid(format!("duplicate key given in txn request: {key:?}"));
                }
            }
        }
    }
    Ok(())
}

/// Whether `c` holds for `kv` (None: the key is absent).
pub(crate) fn compare_holds(c: &Compare, kv: Option<&KeyValue>) -> bool {
    use std::cmp::Ordering as O;
    let ord = match &c.target {
        CompareTarget::ModRevision(r) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
        CompareTarget::CreateRevision(r) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
        CompareTarget::Version(v) => kv.map_or(0, |kv| kv.version).cmp(v),
        CompareTarget::Value(v) => match kv {
            Some(kv) => kv.value.as_slice().cmp(v.as_slice()),
            // etcd: a value compare on an absent key is always false.
            None => return false,
        },
    };
    match c.op {
        CompareOp::Equal => ord == O::Equal,
        CompareOp::NotEqual => ord != O::Equal,
        CompareOp::Greater => ord == O::Greater,
        CompareOp::Less => ord == O::Less,
    }
}

fn range_of<'a>(
    kvs: &'a BTreeMap<String, Arc<KeyValue>>,
    prefix: &'a str,
) -> impl Iterator<Item = &'a KeyValue> + 'a {
    kvs.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
        .map(|(_, v)| &**v)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`, with default options.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// Opens (creating if needed) the store in `dir`. Needs no tokio runtime. Fails if
    /// the store is already open (in this process or another).
    pub fn open_with(dir: &Path, options: EmbeddedOptions) -> Result<Self> {
        let (files, loaded) = wal::Files::open(dir, options.compact_log_bytes)?;
        let wal::Loaded {
            revision,
            next_lease,
            kvs,
            leases,
        } = loaded;
        let now = Instant::now();
        let mut lease_keys: HashMap<LeaseId, BTreeSet<String>> = HashMap::new();
        for kv in kvs.values().filter(|kv| kv.lease != NO_LEASE) {
            lease_keys
                .entry(kv.lease)
                .or_default()
                .insert(kv.key.clone());
        }
        let live = leases
            .into_iter()
            .map(|(id, ttl)| {
                (
                    id,
                    LiveLease {
                        ttl,
                        deadline: now + ttl,
                    },
                )
            })
            .collect();

        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                revision,
                kvs: kvs.into_iter().map(|(k, kv)| (k, Arc::new(kv))).collect(),
                history: VecDeque::new(),
                history_bytes: 0,
                history_events_max: options.history_events.max(1),
                history_bytes_max: options.history_bytes,
                compacted: revision,
                watchers: HashMap::new(),
                next_watcher: 0,
            }),
            leases: Mutex::new(live),
            watch_buffer: options.watch_buffer.max(1),
        });
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));

        let mut w = Writer {
            files,
            shared: shared.clone(),
            lease_keys,
            next_lease,
        };
        let writer = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || w.run(rx))
            .map_err(io)?;
        let expiry = {
            let (shared, tx, stop) = (shared.clone(), tx.clone(), stop.clone());
            std::thread::Builder::new()
                .name("ferry-store-expiry".into())
                .spawn(move || expire_loop(&shared, &tx, &stop))
        };
        let expiry = match expiry {
            Ok(t) => t,
            Err(e) => {
                let _ = tx.send(Cmd::Stop);
                let _ = writer.join();
                return Err(io(e));
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                tx,
                stop,
                writer: Some(writer),
                expiry: Some(expiry),
            }),
        })
    }

    /// The number of registered watchers (for metrics and tests).
    pub fn watchers(&self) -> usize {
        read(&self.inner.shared.state).watchers.len()
    }

    async fn request(&self, req: Request) -> Result<Response> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Req(req, tx))
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.expiry.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
    }
}

fn expire_loop(shared: &Shared, tx: &mpsc::Sender<Cmd>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(EXPIRY_TICK);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let expired: Vec<LeaseId> = lock(&shared.leases)
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            continue;
        }
        let (reply, done) = oneshot::channel();
        if tx
            .send(Cmd::Req(Request::Expire { leases: expired }, reply))
            .is_err()
        {
            return;
        }
        // Wait, so that the same leases are not queued twice.
        if let Ok(Err(e)) = done.blocking_recv() {
            tracing::warn!(error = %e, "embedded store: revoking expired leases failed");
        }
    }
}

// ---------------------------------------------------------------- the writer

struct Writer {
    files: wal::Files,
    shared: Arc<Shared>,
    /// Keys attached to each lease (as committed).
    lease_keys: HashMap<LeaseId, BTreeSet<String>>,
    next_lease: LeaseId,
}

/// The changes of one group commit, on top of the committed state.
struct Batch<'a> {
    base: &'a State,
    shared: &'a Shared,
    lease_keys: &'a HashMap<LeaseId, BTreeSet<String>>,
    revision: Revision,
    next_lease: LeaseId,
    /// Key → new value (None: deleted).
    kvs: BTreeMap<String, Option<Arc<KeyValue>>>,
    /// Lease → granted with this TTL (Some) or revoked (None) in this batch.
    leases: BTreeMap<LeaseId, Option<Duration>>,
    events: Vec<SharedEvent>,
    now: Instant,
}

impl Batch<'_> {
    fn lookup(&self, key: &str) -> Option<&KeyValue> {
        match self.kvs.get(key) {
            Some(v) => v.as_deref(),
            None => self.base.kvs.get(key).map(|kv| &**kv),
        }
    }

    /// Whether the lease exists (and, unless `expired_ok`, has not expired).
    fn lease_exists(&self, id: LeaseId, expired_ok: bool) -> bool {
        match self.leases.get(&id) {
            Some(granted) => granted.is_some(),
            None => lock(&self.shared.leases)
                .get(&id)
                .is_some_and(|l| expired_ok || l.deadline > self.now),
        }
    }

    fn check_lease(&self, id: LeaseId) -> Result<()> {
        if id == NO_LEASE || self.lease_exists(id, false) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(id))
        }
    }

    fn put(&mut self, rev: Revision, key: &str, value: Vec<u8>, lease: LeaseId) {
        let (create_revision, version) = match self.lookup(key) {
            Some(old) => (old.create_revision, old.version + 1),
            None => (rev, 1),
        };
        let kv = Arc::new(KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: rev,
            version,
            lease,
        });
        self.events.push(SharedEvent {
            kind: EventKind::Put,
            kv: kv.clone(),
        });
        self.kvs.insert(key.to_string(), Some(kv));
    }

    /// Deletes `key` at `rev`; false if it did not exist.
    fn delete(&mut self, rev: Revision, key: &str) -> bool {
        if self.lookup(key).is_none() {
            return false;
        }
        let kv = Arc::new(KeyValue {
            key: key.to_string(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            version: 0,
            lease: NO_LEASE,
        });
        self.events.push(SharedEvent {
            kind: EventKind::Delete,
            kv,
        });
        self.kvs.insert(key.to_string(), None);
        true
    }

    fn keys_with_prefix(&self, prefix: &str) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = range_of(&self.base.kvs, prefix)
            .map(|kv| kv.key.clone())
            .collect();
        let overlay = self
            .kvs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded));
        keys.extend(
            overlay
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone()),
        );
        keys
    }

    fn apply(&mut self, req: Request) -> Result<Response> {
        let rev = self.revision + 1;
        match req {
            Request::Put { key, value, lease } => {
                check_key(&key)?;
                self.check_lease(lease)?;
                self.put(rev, &key, value, lease);
                self.revision = rev;
                Ok(Response::Revision(rev))
            }
            Request::Delete { key } => {
                check_key(&key)?;
                let existed = self.delete(rev, &key);
                if existed {
                    self.revision = rev;
                }
                Ok(Response::Deleted(existed))
            }
            Request::Txn(txn) => {
                validate_txn(&txn)?;
                let succeeded = txn
                    .compares
                    .iter()
                    .all(|c| compare_holds(c, self.lookup(&c.key)));
                let ops = if succeeded { txn.success } else { txn.failure };
                for op in &ops {
                    if let Op::Put { lease, .. } = op {
                        self.check_lease(*lease)?;
                    }
                }
                let mut wrote = false;
                let mut gets = Vec::new();
                for op in ops {
                    match op {
                        Op::Put { key, value, lease } => {
                            self.put(rev, &key, value, lease);
                            wrote = true;
                        }
                        Op::Delete { key } => wrote |= self.delete(rev, &key),
                        Op::DeletePrefix { prefix } => {
                            for key in self.keys_with_prefix(&prefix) {
                                wrote |= self.delete(rev, &key);
                            }
                        }
                        Op::Get { key } => gets.push(self.lookup(&key).cloned()),
                    }
                }
                if wrote {
                    self.revision = rev;
                }
                Ok(Response::Txn(TxnResult {
                    succeeded,
                    revision: self.revision,
                    gets,
                }))
            }
            Request::Grant { ttl } => {
                let id = self.next_lease;
                self.next_lease += 1;
                self.leases
                    .insert(id, Some(ttl.max(Duration::from_millis(1))));
                Ok(Response::Lease(id))
            }
            Request::Revoke { lease } => {
                if !self.lease_exists(lease, true) {
                    return Err(StoreError::LeaseNotFound(lease));
                }
                self.revoke(lease);
                Ok(Response::Done)
            }
            Request::Expire { leases } => {
                for id in leases {
                    let expired = !self.leases.contains_key(&id)
                        && lock(&self.shared.leases)
                            .get(&id)
                            .is_some_and(|l| l.deadline <= self.now);
                    if expired {
                        self.revoke(id);
                    }
                }
                Ok(Response::Done)
            }
        }
    }

    /// Revokes a lease: deletes its keys at one revision (none if it has no keys).
    fn revoke(&mut self, lease: LeaseId) {
        let rev = self.revision + 1;
        let mut keys: BTreeSet<String> = self.lease_keys.get(&lease).cloned().unwrap_or_default();
        keys.extend(
            self.kvs
                .iter()
                .filter(|(_, v)| v.as_ref().is_some_and(|kv| kv.lease == lease))
                .map(|(k, _)| k.clone()),
        );
        let mut wrote = false;
        for key in keys {
            if self.lookup(&key).is_some_and(|kv| kv.lease == lease) {
                wrote |= self.delete(rev, &key);
            }
        }
        if wrote {
            self.revision = rev;
        }
        self.leases.insert(lease, None);
    }
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        let mut stopping = false;
        while !stopping {
            let Ok(first) = rx.recv() else { return };
            let mut cmds = vec![first];
            while cmds.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let mut reqs = Vec::with_capacity(cmds.len());
            for c in cmds {
                match c {
                    Cmd::Req(r, reply) => reqs.push((r, reply)),
                    Cmd::Stop => stopping = true,
                }
            }
            if !reqs.is_empty() {
                self.process(reqs);
            }
        }
    }

    fn process(&mut self, reqs: Vec<(Request, oneshot::Sender<Result<Response>>)>) {
        let shared = self.shared.clone();
        // Only this thread changes the state, so what it reads here stays current until
        // it applies the batch below. Readers go on meanwhile.
        let state = read(&shared.state);
        let mut batch = Batch {
            base: &state,
            shared: &shared,
            lease_keys: &self.lease_keys,
            revision: state.revision,
            next_lease: self.next_lease,
            kvs: BTreeMap::new(),
            leases: BTreeMap::new(),
            events: Vec::new(),
            now: Instant::now(),
        };
        let mut replies = Vec::with_capacity(reqs.len());
        for (req, reply) in reqs {
            replies.push((batch.apply(req), reply));
        }
        let Batch {
            revision,
            next_lease,
            kvs,
            leases,
            events,
            ..
        } = batch;
        drop(state);

        let changed = !kvs.is_empty() || !leases.is_empty() || next_lease != self.next_lease;
        if changed && let Err(e) = self.files.append(revision, next_lease, &kvs, &leases) {
            tracing::error!(error = %e, "embedded store: commit failed");
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        self.next_lease = next_lease;

        // Make the batch visible: leases, then data, history and watchers.
        {
            let now = Instant::now();
            let mut live = lock(&shared.leases);
            for (id, granted) in &leases {
                match granted {
                    Some(ttl) => {
                        live.insert(
                            *id,
                            LiveLease {
                                ttl: *ttl,
                                deadline: now + *ttl,
                            },
                        );
                    }
                    None => {
                        live.remove(id);
                        self.lease_keys.remove(id);
                    }
                }
            }
        }
        {
            let mut st = write(&shared.state);
            for (key, new) in kvs {
                let old_lease = st.kvs.get(&key).map_or(NO_LEASE, |kv| kv.lease);
                let new_lease = new.as_ref().map_or(NO_LEASE, |kv| kv.lease);
                if old_lease != new_lease {
                    if let Some(set) = self.lease_keys.get_mut(&old_lease) {
                        set.remove(&key);
                        if set.is_empty() {
                            self.lease_keys.remove(&old_lease);
                        }
                    }
                    if new_lease != NO_LEASE && !leases.get(&new_lease).is_some_and(Option::is_none)
                    {
                        self.lease_keys
                            .entry(new_lease)
                            .or_default()
                            .insert(key.clone());
                    }
                }
                match new {
                    Some(kv) => st.kvs.insert(key, kv),
                    None => st.kvs.remove(&key),
                };
            }
            st.revision = revision;
            st.publish(events);
        }
        for (result, reply) in replies {
            let _ = reply.send(result);
        }
        if changed {
            self.maybe_compact();
        }
    }

    /// Snapshots the committed state and restarts the log, if the log has grown enough.
    /// Runs on the writer thread, so the next group commit waits for it: it encodes every
    /// key (a memory copy of the data set, holding the state's read lock, which only
    /// delays watch registration) and writes and fsyncs a file that size. With the default
    /// threshold that happens after at least 64 MiB of log, i.e. rarely, and costs
    /// about as much as writing those 64 MiB did in the first place.
    fn maybe_compact(&mut self) {
        if !self.files.wants_compaction() {
            return;
        }
        let started = Instant::now();
        let leases: Vec<(LeaseId, Duration)> = lock(&self.shared.leases)
            .iter()
            .map(|(id, l)| (*id, l.ttl))
            .collect();
        let st = read(&self.shared.state);
        let result = self.files.compact(
            st.revision,
            self.next_lease,
            st.kvs.values().map(|kv| &**kv),
            leases.into_iter(),
        );
        let keys = st.kvs.len();
        drop(st);
        match result {
            Ok(()) => tracing::debug!(
                keys,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "embedded store: log compacted into a snapshot"
            ),
            Err(e) => tracing::warn!(error = %e, "embedded store: log compaction failed"),
        }
    }
}

impl State {
    /// Appends committed events to the history and sends them to the watchers: one
    /// message per revision, so that a watcher gets a revision entirely or not at all.
    fn publish(&mut self, events: Vec<SharedEvent>) {
        for group in events.chunk_by(|a, b| a.kv.mod_revision == b.kv.mod_revision) {
            let rev = group.first().map_or(0, |e| e.kv.mod_revision);
            self.watchers.retain(|_, w| {
                if rev < w.from {
                    return true;
                }
                let mine: Vec<SharedEvent> = group
                    .iter()
                    .filter(|e| e.kv.key.starts_with(&w.prefix))
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    return true;
                }
                match w.tx.try_send(mine) {
                    Ok(()) => true,
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        w.lagged.store(true, Ordering::SeqCst);
                        false
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        for ev in events {
            self.history_bytes += ev.kv.key.len() + ev.kv.value.len();
            self.history.push_back(ev);
        }
        // Trim whole revisions, so that a revision is either fully kept or compacted.
        while self.history.len() > self.history_events_max
            || self.history_bytes > self.history_bytes_max
        {
            let Some(rev) = self.history.front().map(|e| e.kv.mod_revision) else {
                break;
            };
            while let Some(e) = self.history.front()
                && e.kv.mod_revision == rev
            {
                self.history_bytes -= e.kv.key.len() + e.kv.value.len();
                self.history.pop_front();
            }
            self.compacted = rev;
        }
    }
}

// ---------------------------------------------------------------- watches

struct WatchGuard {
    shared: Weak<Shared>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            write(&shared.state).watchers.remove(&self.id);
        }
    }
}

struct WatchState {
    /// The replayed history, then the rest of the revision being delivered.
    buffered: VecDeque<SharedEvent>,
    rx: tokio::sync::mpsc::Receiver<Vec<SharedEvent>>,
    lagged: Arc<AtomicBool>,
    done: bool,
    _guard: WatchGuard,
}

impl EmbeddedStore {
    fn watch_now(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let shared = &self.inner.shared;
        let mut st = write(&shared.state);
        if from != 0 && from <= st.compacted {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: st.compacted + 1,
            });
        }
        let replay: VecDeque<SharedEvent> = if from == 0 {
            VecDeque::new()
        } else {
            let start = st.history.partition_point(|e| e.kv.mod_revision < from);
            st.history
                .range(start..)
                .filter(|e| e.kv.key.starts_with(prefix))
                .cloned()
                .collect()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(shared.watch_buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = st.next_watcher;
        st.next_watcher += 1;
        st.watchers.insert(
            id,
            Watcher {
                prefix: prefix.to_string(),
                from,
                tx,
                lagged: lagged.clone(),
            },
        );
        drop(st);

        let state = WatchState {
            buffered: replay,
            rx,
            lagged,
            done: false,
            _guard: WatchGuard {
                shared: Arc::downgrade(shared),
                id,
            },
        };
        Ok(futures::stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            loop {
                if let Some(e) = s.buffered.pop_front() {
                    // The copy is made here, by the consumer, not by the writer.
                    return Some((Ok(e.into_event()), s));
                }
                match s.rx.recv().await {
                    Some(evs) => s.buffered.extend(evs),
                    None => break,
                }
            }
            s.done = true;
            let err = if s.lagged.load(Ordering::SeqCst) {
                StoreError::WatchLagged
            } else {
                closed()
            };
            Some((Err(err), s))
        })
        .boxed())
    }
}

// ---------------------------------------------------------------- the trait

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        Ok(read(&self.inner.shared.state)
            .kvs
            .get(key)
            .map(|kv| KeyValue::clone(kv)))
    }

    async fn range(&self, prefix: &str) -> Result<Range> {
        let st = read(&self.inner.shared.state);
        Ok(Range {
            kvs: range_of(&st.kvs, prefix).cloned().collect(),
            revision: st.revision,
        })
    }

    async fn range_page(&self, q: &RangeQuery) -> Result<Page> {
        check_range(q)?;
        let st = read(&self.inner.shared.state);
        let mut it = st
            .kvs
            .range::<str, _>((
                Bound::Included(q.start.as_str()),
                Bound::Excluded(q.end.as_str()),
            ))
            .map(|(_, kv)| &**kv);
        let kvs: Vec<KeyValue> = match q.limit {
            0 => it.by_ref().cloned().collect(),
            n => it.by_ref().take(n).cloned().collect(),
        };
        Ok(Page {
            kvs,
            revision: st.revision,
            more: it.next().is_some(),
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        match self
            .request(Request::Put {
                key: key.to_string(),
                value,
                lease,
            })
            .await?
        {
            Response::Revision(r) => Ok(r),
            _ => Err(StoreError::Io("unexpected writer response".into())),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        match self
            .request(Request::Delete {
                key: key.to_string(),
            })
            .await?
        {
            Response::Deleted(d) => Ok(d),
            _ => Err(StoreError::Io("unexpected writer response".into())),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let read_only = txn
            .success
            .iter()
            .chain(&txn.failure)
            .all(|op| matches!(op, Op::Get { .. }));
        if read_only {
            // Nothing to write: answer from the committed state.
            validate_txn(&txn)?;
            let st = read(&self.inner.shared.state);
            let succeeded = txn
                .compares
                .iter()
                .all(|c| compare_holds(c, st.kvs.get(&c.key).map(|kv| &**kv)));
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let gets = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Get { key } => Some(st.kvs.get(key).map(|kv| KeyValue::clone(kv))),
                    _ => None,
                })
                .collect();
            return Ok(TxnResult {
                succeeded,
                revision: st.revision,
                gets,
            });
        }
        match self.request(Request::Txn(txn)).await? {
            Response::Txn(r) => Ok(r),
            _ => Err(StoreError::Io("unexpected writer response".into())),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        self.watch_now(prefix, from)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        match self.request(Request::Grant { ttl }).await? {
            Response::Lease(id) => Ok(id),
            _ => Err(StoreError::Io("unexpected writer response".into())),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let now = Instant::now();
        match lock(&self.inner.shared.leases).get_mut(&lease) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.request(Request::Revoke { lease }).await.map(|_| ())
    }
}
