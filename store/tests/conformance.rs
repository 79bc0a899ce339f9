//! One conformance suite, run against both backends (`embedded::*` and `etcd::*`; every
//! etcd test starts its own etcd), plus backend-specific tests at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_store::embedded::{EmbeddedOptions, EmbeddedStore};
use ferry_store::etcd::EtcdStore;
use ferry_store::testing::EtcdServer;
use ferry_store::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseKeeper, NO_LEASE, Op,
    RangeQuery, Store, StoreError, Txn, WatchCache, WatchStream,
};
use futures::StreamExt;

type Guard = Box<dyn std::any::Any + Send>;

async fn make_embedded() -> (Arc<dyn Store>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (Arc::new(store), Box::new(dir))
}

async fn start_etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap()
        .expect("start etcd")
}

async fn make_etcd() -> (Arc<dyn Store>, Guard) {
    let server = start_etcd().await;
    let store = EtcdStore::connect(&[server.endpoint()]).await.unwrap();
    (Arc::new(store), Box::new(server))
}

const WAIT: Duration = Duration::from_secs(10);

async fn next_event(s: &mut WatchStream) -> Event {
    match tokio::time::timeout(WAIT, s.next()).await {
        Ok(Some(Ok(e))) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn assert_quiet(s: &mut WatchStream, d: Duration) {
    if let Ok(item) = tokio::time::timeout(d, s.next()).await {
        panic!("expected no event, got {item:?}");
    }
}

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

async fn rev(s: &Arc<dyn Store>) -> i64 {
    s.range("").await.unwrap().revision
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// Polls `f` until it is true, for at most `limit`.
async fn eventually<F: AsyncFnMut() -> bool>(limit: Duration, mut f: F) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f().await
}

mod suite {
    use super::*;

    pub async fn put_get(s: Arc<dyn Store>) {
        assert_eq!(s.get("k").await.unwrap(), None);
        let r1 = s.put("k", v("v1"), NO_LEASE).await.unwrap();
        assert!(r1 >= 1);
        let kv = s.get("k").await.unwrap().unwrap();
        let want = KeyValue {
            key: "k".into(),
            value: v("v1"),
            create_revision: r1,
            mod_revision: r1,
            version: 1,
            lease: 0,
        };
        assert_eq!(kv, want);
        let r2 = s.put("k", v("v2"), NO_LEASE).await.unwrap();
        assert_eq!(r2, r1 + 1);
        let kv = s.get("k").await.unwrap().unwrap();
        assert_eq!(
            (
                kv.value.as_slice(),
                kv.create_revision,
                kv.mod_revision,
                kv.version
            ),
            (&b"v2"[..], r1, r2, 2)
        );
        let r3 = s.put("other", Vec::new(), NO_LEASE).await.unwrap();
        assert_eq!(r3, r2 + 1);
        assert_eq!(
            s.get("other").await.unwrap().unwrap().value,
            Vec::<u8>::new()
        );
        assert_eq!(rev(&s).await, r3);
        // Reads do not bump the revision.
        s.get("k").await.unwrap();
        assert_eq!(rev(&s).await, r3);
        // Empty keys are rejected like etcd does.
        assert!(matches!(
            s.put("", v("x"), NO_LEASE).await,
            Err(StoreError::InvalidRequest(_))
        ));
        assert!(matches!(
            s.get("").await,
            Err(StoreError::InvalidRequest(_))
        ));
        assert!(matches!(
            s.delete("").await,
            Err(StoreError::InvalidRequest(_))
        ));
    }

    pub async fn range_prefix(s: Arc<dyn Store>) {
        let mut last = 0;
        for k in ["a/2", "a", "ab", "a/10", "b/1", "a/", "a/1", "a/é"] {
            last = s.put(k, v(&format!("val-{k}")), NO_LEASE).await.unwrap();
        }
        let r = s.range("a/").await.unwrap();
        assert_eq!(keys(&r.kvs), ["a/", "a/1", "a/10", "a/2", "a/é"]);
        assert_eq!(r.revision, last);
        assert_eq!(r.kvs[2].value, v("val-a/10"));
        let r = s.range("a").await.unwrap();
        assert_eq!(keys(&r.kvs), ["a", "a/", "a/1", "a/10", "a/2", "a/é", "ab"]);
        let r = s.range("a/é").await.unwrap();
        assert_eq!(keys(&r.kvs), ["a/é"]);
        let r = s.range("c").await.unwrap();
        assert!(r.kvs.is_empty());
        assert_eq!(r.revision, last);
        assert_eq!(s.range("").await.unwrap().kvs.len(), 8);
    }

    pub async fn range_page(s: Arc<dyn Store>) {
        let mut last = 0;
        for k in ["p/3", "p/1", "p/2", "p/20", "p", "q/1", "p/é", "p/4"] {
            last = s.put(k, v(&format!("val-{k}")), NO_LEASE).await.unwrap();
        }
        // Pages of two through the prefix, continued after each page's last key.
        let mut q = RangeQuery::prefix("p/", 2);
        let mut seen = vec![];
        let mut pages = 0;
        loop {
            let page = s.range_page(&q).await.unwrap();
            assert_eq!(page.revision, last);
            assert!(page.kvs.len() <= 2);
            pages += 1;
            seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
            if !page.more {
                break;
            }
            q = q.after(&page.kvs.last().unwrap().key);
        }
        assert_eq!(seen, ["p/1", "p/2", "p/20", "p/3", "p/4", "p/é"]);
        assert_eq!(pages, 3);
        // Bounds: start inclusive, end exclusive; no limit takes all.
        let q = RangeQuery {
            start: "p/2".into(),
            end: "p/4".into(),
            limit: 0,
        };
        let page = s.range_page(&q).await.unwrap();
        assert_eq!(keys(&page.kvs), ["p/2", "p/20", "p/3"]);
        assert!(!page.more);
        assert_eq!(page.kvs[1].value, v("val-p/20"));
        // A limit the range meets exactly leaves nothing more.
        let page = s
            .range_page(&RangeQuery {
                limit: 3,
                ..q.clone()
            })
            .await
            .unwrap();
        assert_eq!(page.kvs.len(), 3);
        assert!(!page.more);
        // Nothing in range.
        let page = s.range_page(&RangeQuery::prefix("r/", 5)).await.unwrap();
        assert!(page.kvs.is_empty() && !page.more);
        // Bad bounds are refused.
        for bad in [
            RangeQuery {
                start: "".into(),
                end: "z".into(),
                limit: 1,
            },
            RangeQuery {
                start: "p/4".into(),
                end: "p/2".into(),
                limit: 1,
            },
            RangeQuery {
                start: "p".into(),
                end: "p".into(),
                limit: 1,
            },
        ] {
            assert!(
                matches!(s.range_page(&bad).await, Err(StoreError::InvalidRequest(_))),
                "{bad:?}"
            );
        }
        assert_eq!(ferry_store::prefix_end("a/"), "a0");
        assert_eq!(ferry_store::prefix_end("a/é"), "a/ê");
    }

    pub async fn delete(s: Arc<dyn Store>) {
        let r1 = s.put("d", v("1"), NO_LEASE).await.unwrap();
        s.put("d2", v("1"), NO_LEASE).await.unwrap();
        assert!(s.delete("d").await.unwrap());
        assert_eq!(s.get("d").await.unwrap(), None);
        assert!(s.get("d2").await.unwrap().is_some());
        let r = rev(&s).await;
        assert_eq!(r, r1 + 2);
        // Deleting an absent key writes nothing.
        assert!(!s.delete("d").await.unwrap());
        assert_eq!(rev(&s).await, r);
        let r3 = s.put("d", v("again"), NO_LEASE).await.unwrap();
        assert_eq!(r3, r + 1);
        let kv = s.get("d").await.unwrap().unwrap();
        assert_eq!(
            (kv.version, kv.create_revision, kv.mod_revision),
            (1, r3, r3)
        );
    }

    pub async fn compare_and_put(s: Arc<dyn Store>) {
        let r1 = s
            .compare_and_put("c", v("1"), 0)
            .await
            .unwrap()
            .expect("absent key");
        assert_eq!(s.compare_and_put("c", v("x"), 0).await.unwrap(), None);
        let r2 = s
            .compare_and_put("c", v("2"), r1)
            .await
            .unwrap()
            .expect("current revision");
        assert_eq!(r2, r1 + 1);
        // Stale revision: nothing changes.
        assert_eq!(s.compare_and_put("c", v("3"), r1).await.unwrap(), None);
        let kv = s.get("c").await.unwrap().unwrap();
        assert_eq!((kv.value, kv.mod_revision, kv.version), (v("2"), r2, 2));
        assert_eq!(rev(&s).await, r2);
    }

    pub async fn txn_compares(s: Arc<dyn Store>) {
        let ra = s.put("t/a", v("m"), NO_LEASE).await.unwrap();
        let rb = s.put("t/a", v("n"), NO_LEASE).await.unwrap();
        let cmp = |key: &str, op, target| Compare {
            key: key.into(),
            op,
            target,
        };
        use CompareOp::*;
        use CompareTarget::*;
        let cases = [
            (cmp("t/a", Equal, ModRevision(rb)), true),
            (cmp("t/a", NotEqual, ModRevision(rb)), false),
            (cmp("t/a", Greater, ModRevision(ra)), true),
            (cmp("t/a", Less, ModRevision(rb)), false),
            (cmp("t/a", Less, ModRevision(rb + 1)), true),
            (cmp("t/a", Equal, CreateRevision(ra)), true),
            (cmp("t/a", Greater, CreateRevision(ra)), false),
            (cmp("t/a", Less, CreateRevision(ra + 1)), true),
            (cmp("t/a", NotEqual, CreateRevision(0)), true),
            (cmp("t/a", Equal, Version(2)), true),
            (cmp("t/a", Greater, Version(1)), true),
            (cmp("t/a", Less, Version(2)), false),
            (cmp("t/a", NotEqual, Version(2)), false),
            (cmp("t/a", Equal, Value(v("n"))), true),
            (cmp("t/a", NotEqual, Value(v("n"))), false),
            (cmp("t/a", Greater, Value(v("m"))), true),
            (cmp("t/a", Less, Value(v("o"))), true),
            (cmp("t/a", Less, Value(v("n"))), false),
            (Compare::exists("t/a"), true),
            (Compare::absent("t/a"), false),
            (Compare::mod_revision("t/a", rb), true),
            (Compare::value("t/a", "n"), true),
            // An absent key.
            (Compare::absent("t/b"), true),
            (Compare::exists("t/b"), false),
            (Compare::mod_revision("t/b", 0), true),
            (cmp("t/b", Less, CreateRevision(1)), true),
            (cmp("t/b", Equal, Value(Vec::new())), false),
            // etcd: a value compare on an absent key is false, even "not equal".
            (cmp("t/b", NotEqual, Value(v("x"))), false),
        ];
        for (i, (c, want)) in cases.into_iter().enumerate() {
            let r = s
                .txn(
                    Txn::new()
                        .when(c.clone())
                        .then(Op::get("t/a"))
                        .otherwise(Op::get("t/b")),
                )
                .await
                .unwrap();
            assert_eq!(r.succeeded, want, "case {i}: {c:?}");
            assert_eq!(r.revision, rb, "case {i}: a read-only txn does not write");
            assert_eq!(r.gets.len(), 1);
            assert_eq!(r.gets[0].is_some(), want, "case {i}: the branch that ran");
        }
        // Several compares: all must hold.
        let all = Txn::new()
            .when(Compare::exists("t/a"))
            .when(Compare::value("t/a", "n"))
            .when(Compare::absent("t/b"));
        assert!(s.txn(all.clone()).await.unwrap().succeeded);
        assert!(
            !s.txn(all.when(Compare::mod_revision("t/a", ra)))
                .await
                .unwrap()
                .succeeded
        );
        // No compares: success.
        let r = s.txn(Txn::new().then(Op::get("t/a"))).await.unwrap();
        assert!(r.succeeded);
        assert_eq!(r.gets[0].as_ref().unwrap().value, v("n"));
    }

    pub async fn txn_ops(s: Arc<dyn Store>) {
        for k in ["p/1", "p/2", "p/3/x", "pq"] {
            s.put(k, v("1"), NO_LEASE).await.unwrap();
        }
        let r0 = s.put("x", v("old"), NO_LEASE).await.unwrap();
        let r = s
            .txn(
                Txn::new()
                    .when(Compare::value("x", "old"))
                    .then(Op::get("x"))
                    .then(Op::put("x", "new"))
                    .then(Op::get("x"))
                    .then(Op::DeletePrefix {
                        prefix: "p/".into(),
                    })
                    .then(Op::get("p/1"))
                    .then(Op::put("y", "1")),
            )
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, r0 + 1, "a txn is one revision");
        assert_eq!(r.gets.len(), 3);
        let old = r.gets[0].as_ref().unwrap();
        assert_eq!(
            (old.value.as_slice(), old.mod_revision, old.version),
            (&b"old"[..], r0, 1)
        );
        let new = r.gets[1].as_ref().unwrap();
        assert_eq!(
            (new.value.as_slice(), new.mod_revision, new.version),
            (&b"new"[..], r0 + 1, 2)
        );
        assert_eq!(r.gets[2], None, "a get after the delete in the same txn");
        assert_eq!(keys(&s.range("p").await.unwrap().kvs), ["pq"]);
        assert_eq!(s.get("y").await.unwrap().unwrap().mod_revision, r0 + 1);
        assert_eq!(s.get("x").await.unwrap().unwrap().value, v("new"));

        // The failure branch.
        let r = s
            .txn(
                Txn::new()
                    .when(Compare::value("x", "old"))
                    .then(Op::put("z", "1"))
                    .otherwise(Op::put("w", "1"))
                    .otherwise(Op::delete("y"))
                    .otherwise(Op::get("w")),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, r0 + 2);
        assert_eq!(r.gets.len(), 1);
        assert_eq!(r.gets[0].as_ref().unwrap().mod_revision, r0 + 2);
        assert_eq!(s.get("z").await.unwrap(), None);
        assert_eq!(s.get("y").await.unwrap(), None);

        // A txn that writes nothing keeps the revision.
        let r = s
            .txn(Txn::new().then(Op::delete("nope")).then(Op::DeletePrefix {
                prefix: "nothing/".into(),
            }))
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, r0 + 2);
        assert_eq!(rev(&s).await, r0 + 2);
        // Deleting one key twice is allowed.
        let r = s
            .txn(Txn::new().then(Op::delete("w")).then(Op::delete("w")))
            .await
            .unwrap();
        assert_eq!(r.revision, r0 + 3);
    }

    pub async fn txn_invalid(s: Arc<dyn Store>) {
        let r0 = s.put("a", v("1"), NO_LEASE).await.unwrap();
        let too_many = (0..129).fold(Txn::new(), |t, i| t.then(Op::put(format!("k{i}"), "v")));
        let bad = [
            Txn::new().then(Op::put("a", "1")).then(Op::put("a", "2")),
            Txn::new().then(Op::put("a", "1")).then(Op::delete("a")),
            Txn::new()
                .then(Op::DeletePrefix {
                    prefix: "d/".into(),
                })
                .then(Op::put("d/1", "1")),
            Txn::new()
                .then(Op::put("b", "1"))
                .otherwise(Op::put("a", "1"))
                .otherwise(Op::put("a", "2")),
            Txn::new().then(Op::put("", "1")),
            too_many,
        ];
        for (i, t) in bad.into_iter().enumerate() {
            match s.txn(t).await {
                Err(StoreError::InvalidRequest(_)) => {}
                other => panic!("case {i}: expected InvalidRequest, got {other:?}"),
            }
        }
        assert_eq!(rev(&s).await, r0, "nothing was written");
        assert_eq!(s.get("b").await.unwrap(), None);
        // 128 operations are fine.
        let max = (0..128).fold(Txn::new(), |t, i| t.then(Op::put(format!("k{i}"), "v")));
        assert_eq!(s.txn(max).await.unwrap().revision, r0 + 1);
        assert_eq!(s.range("k").await.unwrap().kvs.len(), 128);
    }

    pub async fn watch_replay(s: Arc<dyn Store>) {
        let r0 = s.put("w/a", v("1"), NO_LEASE).await.unwrap();
        s.put("w/b", v("2"), NO_LEASE).await.unwrap();
        s.put("x/ignored", v("0"), NO_LEASE).await.unwrap();
        s.delete("w/a").await.unwrap();
        s.txn(
            Txn::new()
                .then(Op::put("w/d", "4"))
                .then(Op::put("w/c", "3"))
                .then(Op::delete("w/b")),
        )
        .await
        .unwrap();
        s.put("w/c", v("5"), NO_LEASE).await.unwrap();
        use EventKind::*;
        let want = [
            (Put, "w/a", "1", r0, 1),
            (Put, "w/b", "2", r0 + 1, 1),
            (Delete, "w/a", "", r0 + 3, 0),
            (Put, "w/d", "4", r0 + 4, 1),
            (Put, "w/c", "3", r0 + 4, 1),
            (Delete, "w/b", "", r0 + 4, 0),
            (Put, "w/c", "5", r0 + 5, 2),
        ];
        let mut st = s.watch("w/", r0).await.unwrap();
        for (i, (kind, key, value, rev, version)) in want.iter().enumerate() {
            let e = next_event(&mut st).await;
            assert_eq!(
                (
                    e.kind,
                    e.kv.key.as_str(),
                    e.kv.value.as_slice(),
                    e.kv.mod_revision,
                    e.kv.version
                ),
                (*kind, *key, value.as_bytes(), *rev, *version),
                "event {i}"
            );
        }
        assert_quiet(&mut st, Duration::from_millis(300)).await;
        let r = s.put("w/e", v("6"), NO_LEASE).await.unwrap();
        let e = next_event(&mut st).await;
        assert_eq!((e.kv.key.as_str(), e.kv.mod_revision), ("w/e", r));

        // From the middle: starts exactly at that revision.
        let mut st = s.watch("w/", r0 + 3).await.unwrap();
        let e = next_event(&mut st).await;
        assert_eq!(
            (e.kind, e.kv.key.as_str(), e.kv.mod_revision),
            (Delete, "w/a", r0 + 3)
        );
        // From a future revision: only events from there on.
        let mut st = s.watch("w/", r + 2).await.unwrap();
        s.put("w/f", v("7"), NO_LEASE).await.unwrap();
        let r2 = s.put("w/g", v("8"), NO_LEASE).await.unwrap();
        assert_eq!(r2, r + 2);
        let e = next_event(&mut st).await;
        assert_eq!((e.kv.key.as_str(), e.kv.mod_revision), ("w/g", r2));
    }

    pub async fn watch_from_now(s: Arc<dyn Store>) {
        s.put("w/old", v("1"), NO_LEASE).await.unwrap();
        let mut st = s.watch("w/", 0).await.unwrap();
        let r = s.put("w/new", v("2"), NO_LEASE).await.unwrap();
        let e = next_event(&mut st).await;
        assert_eq!(
            (e.kind, e.kv.key.as_str(), e.kv.mod_revision),
            (EventKind::Put, "w/new", r)
        );
        assert_quiet(&mut st, Duration::from_millis(200)).await;
    }

    pub async fn watch_concurrent_writers(s: Arc<dyn Store>) {
        let mut st = s.watch("c/", 0).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..4 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..200 {
                    revs.push(
                        s.put(&format!("c/{t}/{i}"), v("x"), NO_LEASE)
                            .await
                            .unwrap(),
                    );
                }
                revs
            }));
        }
        let mut seen = Vec::new();
        let mut seen_keys = BTreeSet::new();
        for _ in 0..800 {
            let e = next_event(&mut st).await;
            assert!(
                seen_keys.insert(e.kv.key.clone()),
                "key seen twice: {}",
                e.kv.key
            );
            seen.push(e.kv.mod_revision);
        }
        let mut written = Vec::new();
        for t in tasks {
            written.extend(t.await.unwrap());
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "revisions strictly increase"
        );
        written.sort();
        assert_eq!(seen, written, "every write seen exactly once");
        assert_quiet(&mut st, Duration::from_millis(200)).await;
    }

    pub async fn watch_prefix_isolation(s: Arc<dyn Store>) {
        let mut st = s.watch("w/", 0).await.unwrap();
        for k in ["wx", "v/1", "w", "w/1", "x/w/2", "w/2"] {
            s.put(k, v("1"), NO_LEASE).await.unwrap();
        }
        s.delete("wx").await.unwrap();
        assert_eq!(next_event(&mut st).await.kv.key, "w/1");
        assert_eq!(next_event(&mut st).await.kv.key, "w/2");
        assert_quiet(&mut st, Duration::from_millis(300)).await;
    }

    pub async fn lease_expiry(s: Arc<dyn Store>) {
        let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
        let granted = Instant::now();
        s.put("l/a", v("1"), lease).await.unwrap();
        s.put("l/keep", v("1"), NO_LEASE).await.unwrap();
        assert_eq!(s.get("l/a").await.unwrap().unwrap().lease, lease);
        let mut st = s.watch("l/", 0).await.unwrap();
        // etcd raises the TTL to its minimum and checks expiry every 500 ms.
        let e = match tokio::time::timeout(Duration::from_secs(15), st.next()).await {
            Ok(Some(Ok(e))) => e,
            other => panic!("no expiry event: {other:?}"),
        };
        assert!(
            granted.elapsed() >= Duration::from_millis(900),
            "expired early: {:?}",
            granted.elapsed()
        );
        assert_eq!((e.kind, e.kv.key.as_str()), (EventKind::Delete, "l/a"));
        assert_eq!(s.get("l/a").await.unwrap(), None);
        assert!(s.get("l/keep").await.unwrap().is_some());
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.put("l/b", v("1"), lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    pub async fn lease_keep_alive(s: Arc<dyn Store>) {
        let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
        s.put("k/a", v("1"), lease).await.unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            s.keep_alive(lease).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                s.get("k/a").await.unwrap().is_some(),
                "expired while kept alive"
            );
        }
        let s2 = s.clone();
        let gone = eventually(Duration::from_secs(15), async || {
            s2.get("k/a").await.unwrap().is_none()
        })
        .await;
        assert!(gone, "expires once no longer kept alive");
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    pub async fn lease_revoke(s: Arc<dyn Store>) {
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        let other = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert_ne!(lease, other);
        s.put("r/b", v("1"), lease).await.unwrap();
        s.put("r/a", v("1"), lease).await.unwrap();
        s.put("r/c", v("1"), NO_LEASE).await.unwrap();
        // Re-put without the lease: detached.
        s.put("r/d", v("1"), lease).await.unwrap();
        s.put("r/d", v("2"), NO_LEASE).await.unwrap();
        let mut st = s.watch("r/", 0).await.unwrap();
        s.revoke_lease(lease).await.unwrap();
        assert_eq!(s.get("r/a").await.unwrap(), None);
        assert_eq!(s.get("r/b").await.unwrap(), None);
        assert!(s.get("r/c").await.unwrap().is_some());
        assert!(s.get("r/d").await.unwrap().is_some());
        let r = rev(&s).await;
        let (e1, e2) = (next_event(&mut st).await, next_event(&mut st).await);
        assert_eq!(
            (e1.kind, e1.kv.key.as_str(), e1.kv.mod_revision),
            (EventKind::Delete, "r/a", r)
        );
        assert_eq!(
            (e2.kind, e2.kv.key.as_str(), e2.kv.mod_revision),
            (EventKind::Delete, "r/b", r)
        );
        assert_quiet(&mut st, Duration::from_millis(200)).await;

        assert!(matches!(
            s.put("r/e", v("1"), lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        let t = Txn::new().then(Op::put_with_lease("r/e", "1", lease));
        assert!(matches!(s.txn(t).await, Err(StoreError::LeaseNotFound(_))));
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.revoke_lease(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.put("r/e", v("1"), 987_654_321).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert_eq!(s.get("r/e").await.unwrap(), None);
        // Revoking a lease without keys writes nothing.
        s.revoke_lease(other).await.unwrap();
        assert_eq!(rev(&s).await, r);
    }

    pub async fn watch_cache(s: Arc<dyn Store>) {
        s.put("wc/a", v("1"), NO_LEASE).await.unwrap();
        s.put("wc/b", v("2"), NO_LEASE).await.unwrap();
        let r0 = s.put("other", v("x"), NO_LEASE).await.unwrap();
        let cache = WatchCache::start(s.clone(), "wc/").await.unwrap();
        assert_eq!(keys(&cache.snapshot()), ["wc/a", "wc/b"]);
        assert_eq!(cache.revision(), r0);
        let mut changes = cache.changes();
        changes.mark_unchanged();

        let r1 = s.put("wc/c", v("3"), NO_LEASE).await.unwrap();
        assert!(cache.wait_for(r1, WAIT).await);
        assert_eq!(cache.get("wc/c").unwrap().value, v("3"));
        assert_eq!(cache.revision(), r1);
        assert!(changes.has_changed().unwrap());

        s.delete("wc/a").await.unwrap();
        let r2 = rev(&s).await;
        assert!(cache.wait_for(r2, WAIT).await);
        assert_eq!(cache.get("wc/a"), None);

        let t = s
            .txn(
                Txn::new()
                    .then(Op::put("wc/b/1", "4"))
                    .then(Op::put("wc/bb", "5")),
            )
            .await
            .unwrap();
        assert!(cache.wait_for(t.revision, WAIT).await);
        assert_eq!(
            keys(&cache.values_with_prefix("wc/b")),
            ["wc/b", "wc/b/1", "wc/bb"]
        );
        assert_eq!(keys(&cache.values_with_prefix("wc/b/")), ["wc/b/1"]);
        assert_eq!(keys(&cache.snapshot()), ["wc/b", "wc/b/1", "wc/bb", "wc/c"]);

        // Outside the prefix: not cached, no progress.
        let r3 = s.put("wc", v("no"), NO_LEASE).await.unwrap();
        assert!(!cache.wait_for(r3, Duration::from_millis(300)).await);
        assert_eq!(cache.get("wc"), None);

        // A clone shares the cache; the task stops once every clone is gone.
        let clone = cache.clone();
        drop(cache);
        assert_eq!(clone.get("wc/c").unwrap().value, v("3"));
        drop(clone);
        let s2 = s.clone();
        assert!(
            eventually(WAIT, async || Arc::strong_count(&s2) == 2).await,
            "cache task still holds the store"
        );

        // `stop` ends the watch for every clone at once: the view stays as it was and
        // the store is let go, though clones live on.
        let cache = WatchCache::start(s.clone(), "wc/").await.unwrap();
        let clone = cache.clone();
        cache.stop();
        assert!(
            eventually(WAIT, async || Arc::strong_count(&s2) == 2).await,
            "a stopped cache's task still holds the store"
        );
        let r4 = s.put("wc/d", v("5"), NO_LEASE).await.unwrap();
        assert!(!clone.wait_for(r4, Duration::from_millis(300)).await);
        assert_eq!(clone.get("wc/d"), None);
        assert_eq!(clone.get("wc/c").unwrap().value, v("3"));
    }

    pub async fn lease_keeper(s: Arc<dyn Store>) {
        let keeper = LeaseKeeper::start(s.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        s.put("lk/a", v("1"), keeper.id()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(
            s.get("lk/a").await.unwrap().is_some(),
            "kept alive past its TTL"
        );
        assert!(!keeper.is_lost());
        let id = keeper.id();
        keeper.revoke().await.unwrap();
        assert_eq!(s.get("lk/a").await.unwrap(), None);
        assert!(matches!(
            s.keep_alive(id).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }
}

macro_rules! conformance {
    ($backend:ident, $make:path; $($name:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = $make().await;
                    super::suite::$name(store).await;
                }
            )*
        }
    };
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        conformance!(embedded, super::make_embedded; $($name),*);
        conformance!(etcd, super::make_etcd; $($name),*);
    };
}

both_backends!(
    put_get,
    range_prefix,
    range_page,
    delete,
    compare_and_put,
    txn_compares,
    txn_ops,
    txn_invalid,
    watch_replay,
    watch_from_now,
    watch_concurrent_writers,
    watch_prefix_isolation,
    lease_expiry,
    lease_keep_alive,
    lease_revoke,
    watch_cache,
    lease_keeper,
);

// ------------------------------------------------------------ embedded only

mod embedded_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_data_and_leases() {
        let dir = tempfile::tempdir().unwrap();
        let (a, lease, short, before) = {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.put("a", v("1"), NO_LEASE).await.unwrap();
            s.put("a", v("2"), NO_LEASE).await.unwrap();
            s.put("gone", v("1"), NO_LEASE).await.unwrap();
            s.delete("gone").await.unwrap();
            let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
            s.put("leased", v("1"), lease).await.unwrap();
            let short = s.grant_lease(Duration::from_millis(1500)).await.unwrap();
            s.put("short", v("1"), short).await.unwrap();
            (
                s.get("a").await.unwrap().unwrap(),
                lease,
                short,
                s.range("").await.unwrap(),
            )
        };
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.range("").await.unwrap(),
            before,
            "same keys, values and revisions"
        );
        assert_eq!(s.get("a").await.unwrap().unwrap(), a);
        assert_eq!(s.get("gone").await.unwrap(), None);
        // Leases exist again, with a fresh TTL.
        s.keep_alive(lease).await.unwrap();
        assert_eq!(s.get("leased").await.unwrap().unwrap().lease, lease);
        assert!(s.get("short").await.unwrap().is_some());
        let new_lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert!(
            new_lease != lease && new_lease != short,
            "lease ids are not reused"
        );
        // History is not persisted: a watch from before the restart is compacted.
        match s.watch("", before.revision).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (before.revision, before.revision + 1))
            }
            other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
        }
        let mut st = s.watch("", before.revision + 1).await.unwrap();
        let r = s.put("b", v("1"), NO_LEASE).await.unwrap();
        assert_eq!(r, before.revision + 1);
        assert_eq!(next_event(&mut st).await.kv.key, "b");
        // The short lease, not renewed, expires after its (fresh) TTL.
        let e = next_event(&mut st).await;
        assert_eq!((e.kind, e.kv.key.as_str()), (EventKind::Delete, "short"));
        assert!(matches!(
            s.keep_alive(short).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        drop(st);
        drop(s);
        // Reopen once more: the expiry was persisted too.
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.get("short").await.unwrap(), None);
        assert!(matches!(
            s.keep_alive(short).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        s.keep_alive(lease).await.unwrap();
    }

    #[test]
    fn open_outside_runtime_and_twice() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Io(m)) => assert!(m.contains("already open"), "{m}"),
            Err(e) => panic!("expected Io, got {e}"),
            Ok(_) => panic!("a second open of a live store succeeded"),
        }
        // Dropping a clone keeps the store (and its lock).
        drop(s.clone());
        assert!(EmbeddedStore::open(dir.path()).is_err());
        drop(s);
        // Dropping the last handle closes the file.
        EmbeddedStore::open(dir.path()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lagging_watcher_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EmbeddedOptions {
            watch_buffer: 8,
            ..Default::default()
        };
        let s = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        let mut slow = s.watch("", 0).await.unwrap();
        let mut fast = s.watch("", 0).await.unwrap();
        for i in 0..50 {
            let r = s.put(&format!("k{i}"), v("x"), NO_LEASE).await.unwrap();
            assert_eq!(next_event(&mut fast).await.kv.mod_revision, r);
        }
        for _ in 0..8 {
            next_event(&mut slow).await;
        }
        assert!(matches!(
            slow.next().await,
            Some(Err(StoreError::WatchLagged))
        ));
        assert!(slow.next().await.is_none());
        assert_eq!(s.watchers(), 1, "the lagging watcher is unregistered");
        // The store and the other watcher go on.
        let r = s.put("after", v("x"), NO_LEASE).await.unwrap();
        assert_eq!(next_event(&mut fast).await.kv.mod_revision, r);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EmbeddedOptions {
            history_events: 10,
            ..Default::default()
        };
        let s = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        let mut revs = Vec::new();
        for i in 0..20 {
            revs.push(s.put(&format!("k{i}"), v("x"), NO_LEASE).await.unwrap());
        }
        match s.watch("", revs[0]).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (revs[0], revs[10]))
            }
            other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
        }
        let mut st = s.watch("", revs[10]).await.unwrap();
        for r in &revs[10..] {
            assert_eq!(next_event(&mut st).await.kv.mod_revision, *r);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_watch_unregisters() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let kept = s.watch("a/", 0).await.unwrap();
        for _ in 0..100 {
            drop(s.watch("b/", 0).await.unwrap());
        }
        assert_eq!(s.watchers(), 1);
        drop(kept);
        assert_eq!(s.watchers(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let start = rev(&s).await;
        let mut tasks = Vec::new();
        for t in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..20 {
                    revs.push(
                        s.put(&format!("g/{t}/{i}"), v("x"), NO_LEASE)
                            .await
                            .unwrap(),
                    );
                }
                revs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        let want: Vec<i64> = (start + 1..=start + 1280).collect();
        assert_eq!(all, want, "every write its own revision, none lost");
        assert_eq!(s.range("g/").await.unwrap().kvs.len(), 1280);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_cache_resyncs_after_lag() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EmbeddedOptions {
            watch_buffer: 1,
            ..Default::default()
        };
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open_with(dir.path(), opts).unwrap());
        let cache = WatchCache::start(s.clone(), "g/").await.unwrap();
        // A burst of concurrent puts lands in few group commits; publishing several
        // revisions at once overflows the cache's 1-revision watch buffer.
        let mut n = 0;
        for _ in 0..10 {
            let puts = (0..50).map(|_| {
                n += 1;
                let key = format!("g/{n}");
                let s = s.clone();
                async move { s.put(&key, v("x"), NO_LEASE).await.unwrap() }
            });
            let last = *futures::future::join_all(puts).await.iter().max().unwrap();
            assert!(cache.wait_for(last, WAIT).await, "caught up");
            if cache.resyncs() > 0 {
                break;
            }
        }
        assert!(cache.resyncs() > 0, "the cache lagged and re-listed");
        assert_eq!(cache.snapshot(), s.range("g/").await.unwrap().kvs);
        let r = s.put("g/x", v("1"), NO_LEASE).await.unwrap();
        assert!(cache.wait_for(r, WAIT).await, "watching again");
        assert_eq!(cache.get("g/x").unwrap().mod_revision, r);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_keeper_loss_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        // Revoked behind the keeper's back: it notices.
        let keeper = LeaseKeeper::start(s.clone(), Duration::from_millis(300))
            .await
            .unwrap();
        s.revoke_lease(keeper.id()).await.unwrap();
        tokio::time::timeout(WAIT, keeper.lost())
            .await
            .expect("lost() resolves");
        assert!(keeper.is_lost());
        // Dropped: stops renewing but does not revoke.
        let keeper = LeaseKeeper::start(s.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        s.put("k", v("1"), keeper.id()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(s.get("k").await.unwrap().is_some());
        drop(keeper);
        assert!(s.get("k").await.unwrap().is_some(), "not revoked on drop");
        let s2 = s.clone();
        assert!(
            eventually(WAIT, async || s2.get("k").await.unwrap().is_none()).await,
            "expires after drop"
        );
    }

    // ---- durability: the write-ahead log and snapshots

    fn log_path(dir: &std::path::Path) -> std::path::PathBuf {
        dir.join("store.wal")
    }

    fn file_len(p: &std::path::Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    /// Puts `k0`..`k{n-1}` (value `v{i}`), one acknowledged group commit each; returns
    /// the revisions and the log's length after each.
    async fn puts(s: &EmbeddedStore, dir: &std::path::Path, n: usize) -> Vec<(i64, u64)> {
        let mut out = Vec::new();
        for i in 0..n {
            let r = s
                .put(&format!("k{i}"), v(&format!("v{i}")), NO_LEASE)
                .await
                .unwrap();
            out.push((r, file_len(&log_path(dir))));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_log_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (acked, full) = {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            let acked = puts(&s, dir.path(), 5).await;
            (acked, std::fs::read(log_path(dir.path())).unwrap())
        };
        let last_start = acked[3].1 as usize;
        assert_eq!(acked[4].1 as usize, full.len());
        let check = async |damaged: Vec<u8>, how: String| {
            std::fs::write(log_path(dir.path()), &damaged).unwrap();
            let s = EmbeddedStore::open(dir.path()).unwrap_or_else(|e| panic!("{how}: {e}"));
            for (i, (r, _)) in acked.iter().enumerate().take(4) {
                let kv = s.get(&format!("k{i}")).await.unwrap().expect(&how);
                assert_eq!(
                    (kv.value, kv.mod_revision),
                    (v(&format!("v{i}")), *r),
                    "{how}"
                );
            }
            assert_eq!(s.get("k4").await.unwrap(), None, "{how}: the torn commit");
            assert_eq!(
                file_len(&log_path(dir.path())),
                last_start as u64,
                "{how}: the tail was truncated"
            );
            // The store goes on: the next write takes the next revision, once.
            let r = s.put("after", v("x"), NO_LEASE).await.unwrap();
            assert_eq!(r, acked[3].0 + 1, "{how}");
            drop(s);
            let s = EmbeddedStore::open(dir.path()).unwrap();
            let range = s.range("").await.unwrap();
            assert_eq!(range.revision, r, "{how}");
            let revs: BTreeSet<i64> = range.kvs.iter().map(|kv| kv.mod_revision).collect();
            assert_eq!(revs.len(), 5, "{how}: distinct revisions");
            assert_eq!(s.get("after").await.unwrap().unwrap().mod_revision, r);
        };
        // Cut anywhere inside the last record (or right before it).
        for cut in last_start..full.len() {
            check(full[..cut].to_vec(), format!("cut at {cut}")).await;
        }
        // Complete length but a damaged body (bad CRC).
        for at in [last_start + 12, full.len() - 1] {
            let mut bad = full.clone();
            bad[at] ^= 0x40;
            check(bad, format!("flipped byte {at}")).await;
        }
        // Power loss after the file grew but before its blocks were written: zeros.
        let mut zeroed = full[..last_start].to_vec();
        zeroed.resize(full.len(), 0);
        check(zeroed, "zero-filled tail".into()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_log_record_before_valid_ones_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let acked = {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            puts(&s, dir.path(), 5).await
        };
        let good = std::fs::read(log_path(dir.path())).unwrap();
        // Inside the second record's body (its frame header is 12 bytes).
        for at in [acked[0].1 as usize + 20, acked[1].1 as usize - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            std::fs::write(log_path(dir.path()), &bad).unwrap();
            match EmbeddedStore::open(dir.path()) {
                Err(StoreError::Corrupt(m)) => {
                    assert!(m.contains("store.wal") && m.contains("damaged"), "{m}")
                }
                Err(e) => panic!("expected Corrupt, got {e}"),
                Ok(_) => panic!("opened over a damaged record at byte {at}"),
            }
            // Nothing was truncated: the data is still there for a human to look at.
            assert_eq!(std::fs::read(log_path(dir.path())).unwrap(), bad);
        }
        // The same damage to a record's length field.
        let mut bad = good.clone();
        bad[acked[0].1 as usize] ^= 0x01;
        std::fs::write(log_path(dir.path()), &bad).unwrap();
        assert!(matches!(
            EmbeddedStore::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
        // A whole record missing from the middle (every frame intact): a seq gap.
        let mut gap = good[..acked[0].1 as usize].to_vec();
        gap.extend_from_slice(&good[acked[1].1 as usize..]);
        std::fs::write(log_path(dir.path()), &gap).unwrap();
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("seq"), "{m}"),
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
        // Undamaged, it opens with everything.
        std::fs::write(log_path(dir.path()), &good).unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.range("").await.unwrap().revision, acked[4].0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_compaction_keeps_exactly_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let opts = EmbeddedOptions {
            compact_log_bytes: 2048,
            ..Default::default()
        };
        let (before, live, revoked, compactions) = {
            let s = EmbeddedStore::open_with(dir.path(), opts.clone()).unwrap();
            let mut live = Vec::new();
            let mut revoked = Vec::new();
            let mut compactions = 0;
            let mut last_len = file_len(&log_path(dir.path()));
            for i in 0..600 {
                let key = format!("k{}", i % 37);
                match i % 10 {
                    0..=5 => {
                        s.put(
                            &key,
                            v(&format!("value {i} {}", "x".repeat(i % 50))),
                            NO_LEASE,
                        )
                        .await
                        .unwrap();
                    }
                    6 => {
                        s.delete(&key).await.unwrap();
                    }
                    7 => {
                        let l = s.grant_lease(Duration::from_secs(60)).await.unwrap();
                        s.put(&format!("leased/{i}"), v("l"), l).await.unwrap();
                        live.push(l);
                    }
                    8 if live.len() > 2 => {
                        let l = live.remove(0);
                        s.revoke_lease(l).await.unwrap();
                        revoked.push(l);
                    }
                    _ => {
                        s.txn(Txn {
                            compares: vec![],
                            success: vec![
                                Op::Put {
                                    key: format!("t/{}", i % 7),
                                    value: v("t"),
                                    lease: NO_LEASE,
                                },
                                Op::Delete { key: key.clone() },
                            ],
                            failure: vec![],
                        })
                        .await
                        .unwrap();
                    }
                }
                let len = file_len(&log_path(dir.path()));
                if len < last_len {
                    compactions += 1;
                }
                last_len = len;
            }
            (s.range("").await.unwrap(), live, revoked, compactions)
        };
        assert!(compactions >= 3, "compacted {compactions} times");
        let snap = file_len(&dir.path().join("store.snap"));
        let log = file_len(&log_path(dir.path()));
        assert!(
            log <= 2048.max(2 * snap) + 12 + 1024,
            "the log was restarted: {log} bytes (snapshot {snap})"
        );
        assert!(before.kvs.iter().any(|kv| kv.key.starts_with("leased/")));
        assert!(before.kvs.len() > 10);
        let s = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        assert_eq!(
            s.range("").await.unwrap(),
            before,
            "same keys, values, revisions"
        );
        for l in &live {
            s.keep_alive(*l).await.unwrap();
        }
        for l in &revoked {
            assert!(matches!(
                s.keep_alive(*l).await,
                Err(StoreError::LeaseNotFound(_))
            ));
            assert!(!before.kvs.iter().any(|kv| kv.lease == *l));
        }
        let fresh = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert!(
            live.iter().chain(&revoked).all(|l| *l < fresh),
            "ids not reused"
        );
        assert_eq!(
            s.put("next", v("1"), NO_LEASE).await.unwrap(),
            before.revision + 1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_replay_after_snapshot_skips_covered_records() {
        // A crash after a snapshot was installed but before the log was restarted leaves
        // records the snapshot covers; they must not be applied again.
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        for i in 1..=3 {
            s.put("a", v(&i.to_string()), NO_LEASE).await.unwrap();
        }
        s.put("b", v("1"), NO_LEASE).await.unwrap();
        drop(s);
        let old_log = std::fs::read(log_path(dir.path())).unwrap();
        // The same next commit without compaction, for its log record.
        let twin = tempfile::tempdir().unwrap();
        std::fs::write(log_path(twin.path()), &old_log).unwrap();
        let s = EmbeddedStore::open(twin.path()).unwrap();
        s.delete("b").await.unwrap();
        drop(s);
        let with_delete = std::fs::read(log_path(twin.path())).unwrap();
        // With compaction: the delete's commit writes a snapshot and restarts the log.
        let opts = EmbeddedOptions {
            compact_log_bytes: 0,
            ..Default::default()
        };
        let s = EmbeddedStore::open_with(dir.path(), opts.clone()).unwrap();
        s.delete("b").await.unwrap();
        // Compaction runs after the commit is answered; any later request through the
        // writer waits for it.
        assert!(s.revoke_lease(i64::MAX).await.is_err());
        assert!(dir.path().join("store.snap").exists());
        assert_eq!(file_len(&log_path(dir.path())), 12, "restarted");
        let at_snapshot = s.range("").await.unwrap();
        s.put("a", v("after"), NO_LEASE).await.unwrap();
        let after = s.range("").await.unwrap();
        drop(s);
        let new_log = std::fs::read(log_path(dir.path())).unwrap();
        // The crash: the old log, through the snapshot's last commit, is still there.
        std::fs::write(log_path(dir.path()), &with_delete).unwrap();
        let s = EmbeddedStore::open_with(dir.path(), opts.clone()).unwrap();
        assert_eq!(s.range("").await.unwrap(), at_snapshot);
        drop(s);
        // Restarting the log failed and commits went on after the old records.
        let mut log = with_delete.clone();
        log.extend_from_slice(&new_log[12..]);
        std::fs::write(log_path(dir.path()), &log).unwrap();
        let s = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        assert_eq!(s.range("").await.unwrap(), after);
        assert_eq!(s.get("a").await.unwrap().unwrap().version, 4);
    }

    fn kill_9_value(key: &str, i: usize) -> Vec<u8> {
        v(&format!("value of {key} {}", "v".repeat(i % 300)))
    }

    /// The child of `kill_9_keeps_acknowledged_writes`: writes until killed (or for 10 s),
    /// printing `ack REVISION KEY` for each acknowledged put.
    #[test]
    #[ignore = "run by kill_9_keeps_acknowledged_writes"]
    fn kill_9_child() {
        let Some(dir) = std::env::var_os("FERRY_STORE_KILL9_DIR") else {
            return;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let s = EmbeddedStore::open(std::path::Path::new(&dir)).unwrap();
            let stop = Instant::now() + Duration::from_secs(10);
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let mut i = 0;
                        while Instant::now() < stop {
                            let key = format!("w{t}/{i}");
                            let r = s.put(&key, kill_9_value(&key, i), NO_LEASE).await.unwrap();
                            use std::io::Write;
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "ack {r} {t} {i}").unwrap();
                            out.flush().unwrap();
                            i += 1;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
    }

    #[test]
    fn kill_9_keeps_acknowledged_writes() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "embedded_only::kill_9_child",
                "--ignored",
                "--nocapture",
            ])
            .env("FERRY_STORE_KILL9_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(ack) = line.strip_prefix("ack ") {
                    let mut f = ack.split(' ');
                    let r: i64 = f.next().unwrap().parse().unwrap();
                    let t: usize = f.next().unwrap().parse().unwrap();
                    let i: usize = f.next().unwrap().parse().unwrap();
                    if tx.send((r, t, i)).is_err() {
                        break;
                    }
                }
            }
        });
        // Mid-stream: after some hundreds of acknowledged writes.
        let mut acked = Vec::new();
        while acked.len() < 300 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(a) => acked.push(a),
                Err(e) => panic!("the child stopped acknowledging after {}: {e}", acked.len()),
            }
        }
        // The child holds the store: another process cannot open it.
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Io(m)) => assert!(m.contains("already open"), "{m}"),
            Err(e) => panic!("expected Io, got {e}"),
            Ok(_) => panic!("opened a store another process holds"),
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            let range = s.range("").await.unwrap();
            for (r, t, i) in &acked {
                let key = format!("w{t}/{i}");
                let kv = s
                    .get(&key)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("acknowledged {key} at {r} is lost"));
                assert_eq!(kv.mod_revision, *r, "{key}");
                assert_eq!(kv.value, kill_9_value(&key, *i), "{key}");
            }
            // Every revision up to the store's is one put (no gaps, no duplicates).
            let revs: BTreeSet<i64> = range.kvs.iter().map(|kv| kv.mod_revision).collect();
            assert_eq!(revs.len(), range.kvs.len());
            assert_eq!(revs, (1..=range.revision).collect());
            assert!(range.revision >= acked.iter().map(|a| a.0).max().unwrap());
            s.put("after", v("1"), NO_LEASE).await.unwrap();
        });
    }

    #[test]
    fn old_redb_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.redb"), b"old").unwrap();
        match EmbeddedStore::open(dir.path()) {
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("store.redb") && m.contains("format"), "{m}");
            }
            Ok(_) => panic!("opened over an old redb store"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_by_url() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("embedded:{}", dir.path().join("sub").display());
        let s = ferry_store::open(&url).await.unwrap();
        s.put("a", v("1"), NO_LEASE).await.unwrap();
        assert!(dir.path().join("sub/store.wal").exists());
        assert!(matches!(
            ferry_store::open("nope://x").await,
            Err(StoreError::InvalidUrl(_))
        ));
        assert!(matches!(
            ferry_store::open("embedded:").await,
            Err(StoreError::InvalidUrl(_))
        ));
    }
}

// ------------------------------------------------------------ etcd only

mod etcd_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_from_compacted_revision() {
        let server = start_etcd().await;
        let s = ferry_store::open(&server.url()).await.unwrap();
        let r1 = s.put("a", v("1"), NO_LEASE).await.unwrap();
        let r2 = s.put("a", v("2"), NO_LEASE).await.unwrap();
        let mut client = etcd_client::Client::connect([server.endpoint()], None)
            .await
            .unwrap();
        client.compact(r2, None).await.unwrap();
        let mut st = s.watch("", r1).await.unwrap();
        match tokio::time::timeout(WAIT, st.next()).await.unwrap() {
            Some(Err(StoreError::Compacted { requested, oldest })) => {
                assert_eq!((requested, oldest), (r1, r2))
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(st.next().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_etcd_is_unavailable_not_a_hang() {
        let mut server = start_etcd().await;
        let s = EtcdStore::connect(&[server.endpoint()]).await.unwrap();
        s.put("a", v("1"), NO_LEASE).await.unwrap();
        let mut st = s.watch("", 0).await.unwrap();
        server.stop();
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(30), s.put("a", v("2"), NO_LEASE))
            .await
            .expect("bounded");
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        let item = tokio::time::timeout(Duration::from_secs(30), st.next())
            .await
            .expect("watch ends");
        assert!(
            matches!(item, Some(Err(StoreError::Unavailable(_)))),
            "{item:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        // Connecting to nothing fails fast too.
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            EtcdStore::connect(&[server.endpoint()]),
        )
        .await;
        assert!(matches!(r, Ok(Err(StoreError::Unavailable(_)))));
    }

    #[test]
    fn server_is_killed_on_drop() {
        let server = EtcdServer::start().unwrap();
        let pid = server.pid();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert!(server.url().starts_with("etcd://127.0.0.1:"));
        drop(server);
        // Reaped, so no zombie either.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
