//! The etcd backend, through etcd-client (gRPC, etcd v3 API).
//!
//! Every call is bounded by a timeout ([`REQUEST_TIMEOUT`]), and failures to reach
//! etcd map to [`StoreError::Unavailable`]. Lease TTLs are rounded up to whole seconds
//! and etcd applies its own minimum (about 2 s with default election settings).

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use etcd_client as ec;
use futures::StreamExt;

use crate::{
    CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, NO_LEASE, Op, Page, Range,
    RangeQuery, Result, Revision, Store, StoreError, Txn, TxnResult, WatchStream,
};

/// How long connecting to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request (or the start of a watch) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response accepted (ranges of many keys).
const MAX_MESSAGE: usize = 256 << 20;

/// A store backed by an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    kv: ec::KvClient,
    watch: ec::WatchClient,
    lease: ec::LeaseClient,
}

/// gRPC's status code `INVALID_ARGUMENT`.
const GRPC_INVALID_ARGUMENT: i32 = 3;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps an etcd-client error; `lease` is the lease the request named, if any.
fn map_err(e: ec::Error, lease: LeaseId) -> StoreError {
    match &e {
        ec::Error::GRpcStatus(s) => {
            let msg = s.message();
            if msg.contains("lease not found") {
                StoreError::LeaseNotFound(lease)
            } else if i32::from(s.code()) == GRPC_INVALID_ARGUMENT {
                StoreError::InvalidRequest(msg.trim_start_matches("etcdserver: ").to_string())
            } else {
                unavailable(e)
            }
        }
        ec::Error::LeaseKeepAliveError(m) if m.contains("lease not found") => {
            StoreError::LeaseNotFound(lease)
        }
        ec::Error::Utf8Error(_) => StoreError::Corrupt(e.to_string()),
        _ => unavailable(e),
    }
}

/// Runs one etcd call under [`REQUEST_TIMEOUT`].
async fn call<T>(lease: LeaseId, f: impl Future<Output = Result<T, ec::Error>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| map_err(e, lease)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd did not answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

fn convert_kv(kv: &ec::KeyValue) -> Result<KeyValue> {
    let key = kv
        .key_str()
        .map_err(|e| StoreError::Corrupt(format!("non-UTF-8 key in etcd: {e}")))?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

fn header_revision(h: Option<&ec::ResponseHeader>) -> Result<Revision> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::Unavailable("etcd response without header".into()))
}

fn convert_op(op: Op) -> ec::TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = (lease != NO_LEASE).then(|| ec::PutOptions::new().with_lease(lease));
            ec::TxnOp::put(key, value, opts)
        }
        Op::Delete { key } => ec::TxnOp::delete(key, None),
        Op::DeletePrefix { prefix } => {
            ec::TxnOp::delete(prefix, Some(ec::DeleteOptions::new().with_prefix()))
        }
        Op::Get { key } => ec::TxnOp::get(key, None),
    }
}

/// The events of a watch response, or why the watch ended.
fn watch_events(resp: &ec::WatchResponse, from: Revision) -> Result<Vec<Event>> {
    if resp.compact_revision() > 0 {
        return Err(StoreError::Compacted {
            requested: from,
            oldest: resp.compact_revision(),
        });
    }
    if resp.canceled() {
        return Err(StoreError::Unavailable(format!(
            "etcd cancelled the watch: {}",
            resp.cancel_reason()
        )));
    }
    resp.events()
        .iter()
        .map(|ev| {
            let kv = ev
                .kv()
                .ok_or_else(|| StoreError::Corrupt("watch event without kv".into()))?;
            let kind = match ev.event_type() {
                ec::EventType::Put => EventKind::Put,
                ec::EventType::Delete => EventKind::Delete,
            };
            Ok(Event {
                kind,
                kv: convert_kv(kv)?,
            })
        })
        .collect()
}

impl EtcdStore {
    /// Connects to etcd (`endpoints` like `http://127.0.0.1:2379`) and checks that it
    /// answers; [`StoreError::Unavailable`] if it does not within a few seconds.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let options = ec::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // etcd refuses pings more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            ec::Client::connect(endpoints, Some(options)),
        )
        .await
        {
            Ok(r) => r.map_err(|e| map_err(e, NO_LEASE))?,
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "connecting to etcd {endpoints:?} timed out"
                )));
            }
        };
        let store = Self {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            lease: client.lease_client(),
        };
        let mut kv = store.kv.clone();
        match tokio::time::timeout(CONNECT_TIMEOUT, kv.get("\0", None)).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(map_err(e, NO_LEASE)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {endpoints:?} did not answer within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.kv.clone();
        let resp = call(NO_LEASE, kv.get(key, None)).await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<Range> {
        let mut kv = self.kv.clone();
        let resp = call(
            NO_LEASE,
            kv.get(prefix, Some(ec::GetOptions::new().with_prefix())),
        )
        .await?;
        Ok(Range {
            kvs: resp.kvs().iter().map(convert_kv).collect::<Result<_>>()?,
            revision: header_revision(resp.header())?,
        })
    }

    async fn range_page(&self, q: &RangeQuery) -> Result<Page> {
        crate::embedded::check_range(q)?;
        let mut kv = self.kv.clone();
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let resp = call(
            NO_LEASE,
            kv.get(
                q.start.as_str(),
                Some(
                    ec::GetOptions::new()
                        .with_range(q.end.as_str())
                        .with_limit(limit),
                ),
            ),
        )
        .await?;
        Ok(Page {
            kvs: resp.kvs().iter().map(convert_kv).collect::<Result<_>>()?,
            revision: header_revision(resp.header())?,
            more: resp.more(),
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        let mut kv = self.kv.clone();
        let opts = (lease != NO_LEASE).then(|| ec::PutOptions::new().with_lease(lease));
        let resp = call(lease, kv.put(key, value, opts)).await?;
        header_revision(resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut kv = self.kv.clone();
        let resp = call(NO_LEASE, kv.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let compares: Vec<ec::Compare> = txn
            .compares
            .into_iter()
            .map(|c| {
                let op = match c.op {
                    CompareOp::Equal => ec::CompareOp::Equal,
                    CompareOp::NotEqual => ec::CompareOp::NotEqual,
                    CompareOp::Greater => ec::CompareOp::Greater,
                    CompareOp::Less => ec::CompareOp::Less,
                };
                match c.target {
                    CompareTarget::ModRevision(r) => ec::Compare::mod_revision(c.key, op, r),
                    CompareTarget::CreateRevision(r) => ec::Compare::create_revision(c.key, op, r),
                    CompareTarget::Version(v) => ec::Compare::version(c.key, op, v),
                    CompareTarget::Value(v) => ec::Compare::value(c.key, op, v),
                }
            })
            .collect();
        // The lease a "lease not found" error is about: the first one the txn names.
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                Op::Put { lease, .. } if *lease != NO_LEASE => Some(*lease),
                _ => None,
            })
            .unwrap_or(NO_LEASE);
        let etxn = ec::Txn::new()
            .when(compares)
            .and_then(txn.success.into_iter().map(convert_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(convert_op).collect::<Vec<_>>());
        let mut kv = self.kv.clone();
        let resp = call(lease, kv.txn(etxn)).await?;
        let mut gets = Vec::new();
        for r in resp.op_responses() {
            if let ec::TxnOpResponse::Get(g) = r {
                gets.push(g.kvs().first().map(convert_kv).transpose()?);
            }
        }
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header())?,
            gets,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let mut opts = ec::WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let mut wc = self.watch.clone();
        let mut stream = call(NO_LEASE, wc.watch(prefix, Some(opts))).await?;
        // Wait until etcd has registered the watch, so that "from = 0" means "after this call".
        let mut pending = VecDeque::new();
        let mut first_error = None;
        loop {
            match call(NO_LEASE, stream.message()).await? {
                Some(resp) => {
                    match watch_events(&resp, from) {
                        Ok(evs) => pending.extend(evs),
                        Err(e) => first_error = Some(e),
                    }
                    if resp.created() || first_error.is_some() {
                        break;
                    }
                }
                None => {
                    return Err(StoreError::Unavailable(
                        "etcd closed the watch stream".into(),
                    ));
                }
            }
        }
        struct S {
            stream: ec::WatchStream,
            pending: VecDeque<Event>,
            error: Option<StoreError>,
            from: Revision,
            done: bool,
        }
        let s = S {
            stream,
            pending,
            error: first_error,
            from,
            done: false,
        };
        Ok(futures::stream::unfold(s, |mut s| async move {
            loop {
                if s.done {
                    return None;
                }
                if let Some(e) = s.pending.pop_front() {
                    return Some((Ok(e), s));
                }
                if let Some(err) = s.error.take() {
                    s.done = true;
                    return Some((Err(err), s));
                }
                match s.stream.message().await {
                    Ok(Some(resp)) => match watch_events(&resp, s.from) {
                        Ok(evs) => s.pending.extend(evs),
                        Err(e) => s.error = Some(e),
                    },
                    Ok(None) => {
                        s.error = Some(StoreError::Unavailable(
                            "etcd closed the watch stream".into(),
                        ))
                    }
                    Err(e) => s.error = Some(map_err(e, NO_LEASE)),
                }
            }
        })
        .boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let mut lc = self.lease.clone();
        let resp = call(NO_LEASE, lc.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Unavailable(format!(
                "etcd lease grant: {}",
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut lc = self.lease.clone();
        // One request and its response on a fresh keep-alive stream; etcd-client turns a
        // response with TTL 0 (expired or unknown lease) into an error.
        call(lease, lc.keep_alive(lease)).await.map(|_| ())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut lc = self.lease.clone();
        call(lease, lc.revoke(lease)).await.map(|_| ())
    }
}
