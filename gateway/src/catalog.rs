//! The gateway's in-memory view of functions and versions, rebuilt from store watches,
//! so the invoke path reads no store. A miss falls back to the store (another gateway
//! may have just created the function). The gateway that took a deploy answers only
//! once its own view includes it; other gateways see a new version after their watch
//! delivers it (milliseconds), so an unqualified invoke there may briefly run the
//! previous version. Invoke `name:VERSION` where that matters.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_core::model::{AliasRecord, FunctionRecord, VersionRecord};
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{Revision, Store, StoreError, WatchCache};

use crate::tenancy::shown;

#[derive(Default)]
struct Snapshot {
    functions: HashMap<String, FunctionRecord>,
    versions: HashMap<(String, u32), Arc<VersionRecord>>,
    aliases: HashMap<(String, String), Arc<AliasRecord>>,
}

/// What follows `name:` in an invocation: a version number or an alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Qualifier {
    Latest,
    Version(u32),
    Alias(String),
}

impl Qualifier {
    /// `""` → latest, digits → a version, anything else → an alias (`latest` is latest).
    pub fn parse(q: Option<&str>) -> Qualifier {
        match q {
            None | Some("") | Some("latest") | Some("$LATEST") => Qualifier::Latest,
            Some(q) => match q.parse::<u32>() {
                Ok(v) => Qualifier::Version(v),
                Err(_) => Qualifier::Alias(q.to_string()),
            },
        }
    }
}

/// Picks a route of a weighted alias for draw `n`: a low-discrepancy sequence (the
/// golden-ratio rotation from a random start), so the split matches the weights within
/// a fraction of a point over any run of a few hundred calls, and no two gateways march
/// in step.
pub fn pick_route(alias: &AliasRecord, n: u64, start: f64) -> Option<u32> {
    const PHI_INV: f64 = 0.618_033_988_749_894_8;
    let total: u64 = alias.routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return None;
    }
    let x = (start + (n as f64) * PHI_INV).fract() * total as f64;
    let mut acc = 0.0;
    for r in &alias.routes {
        acc += f64::from(r.weight);
        if x < acc {
            return Some(r.version);
        }
    }
    alias.routes.last().map(|r| r.version)
}

pub struct Catalog {
    store: Arc<dyn Store>,
    functions: WatchCache,
    versions: WatchCache,
    aliases: WatchCache,
    snap: RwLock<Arc<Snapshot>>,
    /// Draws from weighted aliases, and where this gateway's sequence starts.
    draws: std::sync::atomic::AtomicU64,
    draw_start: f64,
    /// (functions, versions, aliases) cache revisions at the last rebuild.
    revision: tokio::sync::watch::Sender<(Revision, Revision, Revision)>,
}

impl Catalog {
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let functions = WatchCache::start(store.clone(), keys::FUNCTIONS).await?;
        let versions = WatchCache::start(store.clone(), keys::VERSIONS).await?;
        let aliases = WatchCache::start(store.clone(), keys::ALIASES).await?;
        let (revision, _) = tokio::sync::watch::channel((0, 0, 0));
        let catalog = Arc::new(Self {
            store,
            functions,
            versions,
            aliases,
            snap: RwLock::default(),
            draws: std::sync::atomic::AtomicU64::new(0),
            draw_start: rand::random::<f64>(),
            revision,
        });
        catalog.rebuild();
        let weak = Arc::downgrade(&catalog);
        let (mut a, mut b, mut c) = (
            catalog.functions.changes(),
            catalog.versions.changes(),
            catalog.aliases.changes(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = a.changed() => if r.is_err() { return },
                    r = b.changed() => if r.is_err() { return },
                    r = c.changed() => if r.is_err() { return },
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
        let rev = (
            self.functions.revision(),
            self.versions.revision(),
            self.aliases.revision(),
        );
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
        for kv in self.aliases.snapshot() {
            if let Ok(a) = serde_json::from_slice::<AliasRecord>(&kv.value) {
                snap.aliases
                    .insert((a.function.clone(), a.alias.clone()), Arc::new(a));
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
        let reached =
            move |r: &(Revision, Revision, Revision)| r.0 >= rev && (!versions || r.1 >= rev);
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

    /// Waits (bounded) until this gateway's view includes an alias write at `rev`.
    pub async fn wait_for_alias(&self, rev: Revision) {
        let mut rx = self.revision.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            rx.wait_for(|r| r.2 >= rev),
        )
        .await;
    }

    /// The version an invocation of `name` with `q` runs, and the alias that chose it.
    pub async fn resolve(
        &self,
        name: &str,
        q: &Qualifier,
    ) -> Result<(Arc<VersionRecord>, Option<String>), Error> {
        match q {
            Qualifier::Latest => Ok((self.version(name, None).await?, None)),
            Qualifier::Version(v) => Ok((self.version(name, Some(*v)).await?, None)),
            Qualifier::Alias(a) => {
                let alias = self.alias(name, a).await?;
                let n = self
                    .draws
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let v = pick_route(&alias, n, self.draw_start).ok_or_else(|| {
                    Error::new(
                        ErrorCode::VersionNotFound,
                        format!("alias {a:?} of {:?} routes nowhere", shown(name)),
                    )
                })?;
                Ok((self.version(name, Some(v)).await?, Some(a.clone())))
            }
        }
    }

    /// An alias (from memory, else from the store: another gateway may have just set it).
    pub async fn alias(&self, name: &str, alias: &str) -> Result<Arc<AliasRecord>, Error> {
        if let Some(a) = self
            .snap()
            .aliases
            .get(&(name.to_string(), alias.to_string()))
        {
            return Ok(a.clone());
        }
        let kv = self.store.get(&keys::alias(name, alias)).await?;
        match kv.and_then(|kv| serde_json::from_slice::<AliasRecord>(&kv.value).ok()) {
            Some(a) => Ok(Arc::new(a)),
            None => {
                self.function(name).await?;
                Err(Error::new(
                    ErrorCode::VersionNotFound,
                    format!("function {:?} has no alias {alias:?}", shown(name)),
                ))
            }
        }
    }

    pub fn aliases_of(&self, name: &str) -> Vec<Arc<AliasRecord>> {
        let mut v: Vec<_> = self
            .snap()
            .aliases
            .values()
            .filter(|a| a.function == name)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.alias.cmp(&b.alias));
        v
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::model::AliasRoute;

    #[test]
    fn qualifiers() {
        assert_eq!(Qualifier::parse(None), Qualifier::Latest);
        assert_eq!(Qualifier::parse(Some("latest")), Qualifier::Latest);
        assert_eq!(Qualifier::parse(Some("3")), Qualifier::Version(3));
        assert_eq!(
            Qualifier::parse(Some("prod")),
            Qualifier::Alias("prod".into())
        );
    }

    #[test]
    fn weighted_routes_follow_their_weights() {
        let alias = AliasRecord {
            function: "f".into(),
            alias: "prod".into(),
            routes: vec![
                AliasRoute {
                    version: 3,
                    weight: 90,
                },
                AliasRoute {
                    version: 4,
                    weight: 10,
                },
            ],
            updated_ms: 0,
        };
        for start in [0.0, 0.37, 0.99] {
            let canary = (0..1000)
                .filter(|n| pick_route(&alias, *n, start) == Some(4))
                .count();
            assert!((95..=105).contains(&canary), "{canary} of 1000 at {start}");
        }
        let none = AliasRecord {
            routes: vec![],
            ..alias
        };
        assert_eq!(pick_route(&none, 1, 0.5), None);
    }
}
