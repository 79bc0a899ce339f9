//! Put throughput of both backends, with 1 and with 64 concurrent writers.
//!
//! `cargo run --release -p ferry-store --example throughput [-- SECONDS]`
//!
//! Each run writes 100-byte values for about SECONDS (default 3) of wall time. The
//! etcd run starts a throwaway etcd (see `ferry_store::testing::EtcdServer`) in /tmp.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_store::embedded::EmbeddedStore;
use ferry_store::etcd::EtcdStore;
use ferry_store::testing::EtcdServer;
use ferry_store::{NO_LEASE, Store};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn bench(store: Arc<dyn Store>, writers: usize, secs: f64) -> Result<f64, Error> {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, done) = (store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < until {
                store
                    .put(&format!("bench/{w}/{i}"), vec![b'x'; 100], NO_LEASE)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, ferry_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);

    let dir = tempfile::tempdir()?;
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path())?);
    for writers in [1, 64] {
        let rate = bench(embedded.clone(), writers, secs).await?;
        println!("embedded  writers={writers:<3} {rate:>9.0} puts/s");
    }

    let server = tokio::task::spawn_blocking(EtcdServer::start).await??;
    let etcd: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[server.endpoint()]).await?);
    for writers in [1, 64] {
        let rate = bench(etcd.clone(), writers, secs).await?;
        println!("etcd      writers={writers:<3} {rate:>9.0} puts/s");
    }
    Ok(())
}
