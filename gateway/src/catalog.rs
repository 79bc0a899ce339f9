//! The gateway's in-memory view of functions and versions, rebuilt from store watches,
//! so the invoke path reads no store. A miss falls back to the store (another gateway
//! may have just created the function). The gateway that took a deploy answers only
//! once its own view includes it; other gateways see a new version after their watch
//! delivers it (milliseconds), so an unqualified invoke there may briefly run the
//! previous version. Invoke `name:VERSION` where that matters.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_core::model::{FunctionRecord, VersionRecord};
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{Revision, Store, StoreError, WatchCache};

use crate::tenancy::shown;

#[derive(Default)]
struct Snapshot {
    functions: HashMap<String, FunctionRecord>,
    versions: HashMap<(String, u32), Arc<VersionRecord>>,
}

pub struct Catalog {
    store: Arc<dyn Store>,
    functions: WatchCache,
    versions: WatchCache,
    snap: RwLock<Arc<Snapshot>>,
    /// (functions, versions) cache revisions at the last rebuild.
    revision: tokio::sync::watch::Sender<(Revision, Revision)>,
}

impl Catalog {
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let functions = WatchCache::start(store.clone(), keys::FUNCTIONS).await?;
        let versions = WatchCache::start(store.clone(), keys::VERSIONS).await?;
        let (revision, _) = tokio::sync::watch::channel((0, 0));
        let catalog = Arc::new(Self {
            store,
            functions,
            versions,
            snap: RwLock::default(),
            revision,
        });
        catalog.rebuild();
        let weak = Arc::downgrade(&catalog);
        let (mut a, mut b) = (catalog.functions.changes(), catalog.versions.changes());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = a.changed() => if r.is_err() { return },
                    r = b.changed() => if r.is_err() { return },
                }
                match weak.upgrade() {
                    Some(c) => c.rebuild(),
                    None => return,
                }
            }
        });
        Ok(catalog)
    }

    fn rebuild(&self) {
        let rev = (self.functions.revision(), self.versions.revision());
        let mut snap = Snapshot::default();
        for kv in self.functions.snapshot() {
            if let Ok(f) = serde_json::from_slice::<FunctionRecord>(&kv.value) {
                snap.functions.insert(f.name.clone(), f);
            }
        }
        for kv in self.versions.snapshot() {
            if let Ok(v) = serde_json::from_slice::<VersionRecord>(&kv.value) {
                snap.versions
                    .insert((v.name.clone(), v.version), Arc::new(v));
            }
        }
        *self.snap.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        self.revision.send_replace(rev);
    }

    fn snap(&self) -> Arc<Snapshot> {
        self.snap.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (bounded) until this gateway's view includes a write at `rev` that
    /// touched function records (and, with `versions`, version records too).
    pub async fn wait_for(&self, rev: Revision, versions: bool) {
        let mut rx = self.revision.subscribe();
        let reached = move |r: &(Revision, Revision)| r.0 >= rev && (!versions || r.1 >= rev);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), rx.wait_for(reached)).await;
    }

    pub async fn function(&self, name: &str) -> Result<FunctionRecord, Error> {
        if let Some(f) = self.snap().functions.get(name) {
            return Ok(f.clone());
        }
        let kv = self.store.get(&keys::function(name)).await?;
        kv.and_then(|kv| serde_json::from_slice(&kv.value).ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::FunctionNotFound,
                    format!("function {:?} not found", shown(name)),
                )
            })
    }

    pub async fn version(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Arc<VersionRecord>, Error> {
        let v = match version {
            Some(v) => v,
            None => {
                let f = self.function(name).await?;
                if f.latest_version == 0 {
                    return Err(Error::new(
                        ErrorCode::VersionNotFound,
                        format!("function {:?} has no versions yet", shown(name)),
                    ));
                }
                f.latest_version
            }
        };
        if let Some(rec) = self.snap().versions.get(&(name.to_string(), v)) {
            return Ok(rec.clone());
        }
        let kv = self.store.get(&keys::version(name, v)).await?;
        match kv.and_then(|kv| serde_json::from_slice::<VersionRecord>(&kv.value).ok()) {
            Some(rec) => Ok(Arc::new(rec)),
            None => {
                self.function(name).await?;
                Err(Error::new(
                    ErrorCode::VersionNotFound,
                    format!("function {:?} has no version {v}", shown(name)),
                ))
            }
        }
    }

    pub fn list(&self) -> Vec<FunctionRecord> {
        let mut v: Vec<_> = self.snap().functions.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn versions_of(&self, name: &str) -> Vec<Arc<VersionRecord>> {
        let mut v: Vec<_> = self
            .snap()
            .versions
            .values()
            .filter(|r| r.name == name)
            .cloned()
            .collect();
        v.sort_by_key(|r| r.version);
        v
    }
}
