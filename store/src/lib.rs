//! Ferry's storage: one [`Store`] trait with etcd's semantics, and two backends.
//!
//! - [`embedded::EmbeddedStore`]: durable (write-ahead log + snapshots), for a single process (`ferry up`).
//! - [`etcd::EtcdStore`]: the distributed engine, through etcd-client.
//!
//! Both run the same conformance suite (`tests/conformance.rs`). Semantics follow
//! etcd v3: one global revision that every write bumps; per key `create_revision`,
//! `mod_revision` and `version`; transactions of compares and operations that commit
//! atomically at one revision; watches that replay from a revision, in order, without
//! gaps; leases whose expiry deletes their keys.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;

pub mod embedded;
pub mod etcd;
pub mod lease;
#[cfg(feature = "testing")]
pub mod testing;
pub mod watch_cache;

pub use lease::LeaseKeeper;
pub use watch_cache::{KeyMap, View, ViewGuard, WatchCache, WatchedView};

/// A store revision. Revisions start at 1 and increase by one per committed write
/// transaction.
pub type Revision = i64;
/// A lease id; [`NO_LEASE`] attaches a key to no lease.
pub type LeaseId = i64;
pub const NO_LEASE: LeaseId = 0;

/// The most compares, or operations in one branch, that a [`Txn`] may hold (etcd's
/// default `--max-txn-ops`). Both backends reject bigger transactions with
/// [`StoreError::InvalidRequest`].
pub const MAX_TXN_OPS: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Writes since creation: 1 after the first put.
    pub version: i64,
    pub lease: LeaseId,
}

/// The result of a range read: keys in ascending order, at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub kvs: Vec<KeyValue>,
    /// The store's revision when the range was read.
    pub revision: Revision,
}

/// A bounded slice of the key space, ascending: keys in `[start, end)`, at most `limit`
/// of them (see [`Store::range_page`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeQuery {
    /// The first key (inclusive); not empty.
    pub start: String,
    /// The end (exclusive); above `start`.
    pub end: String,
    /// The most keys returned; 0: no limit.
    pub limit: usize,
}

impl RangeQuery {
    /// Every key starting with `prefix` (not empty), at most `limit`.
    pub fn prefix(prefix: &str, limit: usize) -> Self {
        Self {
            start: prefix.to_string(),
            end: prefix_end(prefix),
            limit,
        }
    }

    /// The keys strictly after `key` (a page's last key), up to the same end.
    pub fn after(&self, key: &str) -> Self {
        Self {
            start: format!("{key}\u{0}"),
            end: self.end.clone(),
            limit: self.limit,
        }
    }
}

/// The smallest string above every string that starts with `prefix` (its last
/// character incremented; UTF-8 order is code-point order). An empty prefix, or one
/// whose last character cannot be incremented, has no such bound: `"\u{10FFFF}"` then,
/// above every key Ferry writes.
pub fn prefix_end(prefix: &str) -> String {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        // The next scalar value (skipping the surrogate gap).
        let next = (c as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(n) = next {
            chars.push(n);
            return chars.into_iter().collect();
        }
    }
    char::MAX.to_string()
}

/// One page of a [`RangeQuery`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// The store's revision when the page was read.
    pub revision: Revision,
    /// Keys of the range were left out by the limit.
    pub more: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// What a compare looks at. An absent key has mod/create revision 0 and version 0; a
/// `Value` compare on an absent key is false whatever the operator (as in etcd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    ModRevision(Revision),
    CreateRevision(Revision),
    Version(i64),
    Value(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// The key's last write was at `rev` (0: the key does not exist).
    pub fn mod_revision(key: impl Into<String>, rev: Revision) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(rev),
        }
    }

    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Version(0),
        }
    }

    /// The key exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Greater,
            target: CompareTarget::Version(0),
        }
    }

    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(value.into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    Get {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: NO_LEASE,
        }
    }
    pub fn put_with_lease(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }
}

/// If every compare holds, run `success`, else `failure`; atomically, at one revision.
///
/// Operations run in order, and an `Op::Get` sees the writes of the operations before
/// it in the same branch. As in etcd, a branch may not write one key twice (two puts,
/// or a put and a delete or delete-prefix covering it), no key may be empty, and a
/// txn holds at most [`MAX_TXN_OPS`] compares and operations per branch: such a txn
/// fails with [`StoreError::InvalidRequest`] whichever branch would run. An empty
/// `compares` list holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
    /// One entry per `Op::Get` of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// Events in revision order (and, within a revision, in the order the transaction
/// wrote them). The stream ends with an error if the watch cannot continue (e.g.
/// [`StoreError::Compacted`]); the consumer re-reads and re-watches.
pub type WatchStream = BoxStream<'static, Result<Event, StoreError>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("revision {requested} is compacted (oldest available: {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("watcher fell behind and was cancelled; re-watch from the last seen revision")]
    WatchLagged,
    #[error("invalid store url {0:?}: expected etcd://HOST:PORT[,HOST:PORT…] or embedded:DIR")]
    InvalidUrl(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store i/o: {0}")]
    Io(String),
    /// A request that etcd rejects: an empty key, or a [`Txn`] that breaks its rules.
    #[error("invalid store request: {0}")]
    InvalidRequest(String),
}

impl StoreError {
    pub fn code(&self) -> ferry_core::ErrorCode {
        use ferry_core::ErrorCode;
        match self {
            StoreError::Unavailable(_) | StoreError::WatchLagged => ErrorCode::Unavailable,
            StoreError::InvalidUrl(_) => ErrorCode::BadRequest,
            StoreError::LeaseNotFound(_) => ErrorCode::Conflict,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<StoreError> for ferry_core::Error {
    fn from(e: StoreError) -> Self {
        ferry_core::Error::new(e.code(), e.to_string())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Storage with etcd v3 semantics. Keys are UTF-8 strings; values are bytes.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix`, ascending.
    async fn range(&self, prefix: &str) -> Result<Range>;

    /// The first `limit` keys of `[start, end)`, ascending, and whether more are left.
    /// An empty `start`, or an `end` not above it, fails with
    /// [`StoreError::InvalidRequest`]. For scans of prefixes too large to read at once:
    /// continue with [`RangeQuery::after`] the page's last key.
    async fn range_page(&self, q: &RangeQuery) -> Result<Page>;

    /// Writes `key`; returns the revision of the write. `lease` may be [`NO_LEASE`];
    /// an unknown or expired lease fails with [`StoreError::LeaseNotFound`].
    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision>;

    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// Changes to keys under `prefix` from revision `from` (inclusive). `from = 0`
    /// means "from the next write". A `from` older than the kept history fails with
    /// [`StoreError::Compacted`] (immediately, or as the stream's first item).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// Grants a lease that expires `ttl` after its last keep-alive. etcd rounds `ttl`
    /// up to whole seconds and raises it to its minimum (about 2 s by default).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease; [`StoreError::LeaseNotFound`] once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Revokes a lease now, deleting its keys (at one revision; none if it has no keys).
    /// [`StoreError::LeaseNotFound`] if there is no such lease.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Puts `value` if the key's `mod_revision` is still `expected` (0: absent).
    /// Returns the new revision, or `None` if another write came first.
    async fn compare_and_put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
    ) -> Result<Option<Revision>> {
        let r = self
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(key, expected))
                    .then(Op::put(key, value)),
            )
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }
}

/// Opens a store from its URL: `etcd://HOST:PORT[,HOST:PORT…]` or `embedded:DIR`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if let Some(rest) = url.strip_prefix("etcd://") {
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| format!("http://{}", s.trim_end_matches('/')))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::InvalidUrl(url.to_string()));
        }
        Ok(Arc::new(etcd::EtcdStore::connect(&endpoints).await?))
    } else if let Some(dir) = url.strip_prefix("embedded:") {
        if dir.is_empty() {
            return Err(StoreError::InvalidUrl(url.to_string()));
        }
        Ok(Arc::new(embedded::EmbeddedStore::open(
            std::path::Path::new(dir),
        )?))
    } else {
        Err(StoreError::InvalidUrl(url.to_string()))
    }
}
