//! Admission limits: token buckets (a tenant's QPS, each of its functions' QPS) and a
//! cap on synchronous invocations in flight per function. All in memory, per gateway:
//! N gateways admit up to N times a rate (the operator sizes limits per replica).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::ErrorCode;
use ferry_core::model::TenantLimits;

use crate::error::ApiError;
use crate::tenancy::Principal;

/// Why a request was refused (the `reason` label and `X-Ferry-Limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    TenantQps,
    FunctionQps,
    FunctionConcurrency,
    QueueQps,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TenantQps => "tenant_qps",
            Reason::FunctionQps => "function_qps",
            Reason::FunctionConcurrency => "function_concurrency",
            Reason::QueueQps => "queue_qps",
        }
    }
}

/// A refusal: why, and when trying again may succeed.
#[derive(Debug)]
pub struct Throttled {
    pub reason: Reason,
    pub retry_after: Duration,
    pub message: String,
}

impl Throttled {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    pub fn into_api_error(self) -> (ApiError, Reason, u64) {
        let secs = self.retry_after_secs();
        (
            ApiError::new(ErrorCode::RateLimited, self.message),
            self.reason,
            secs,
        )
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

const SHARDS: usize = 16;

/// Buckets and in-flight counts, sharded by key to keep lock hold times short.
#[derive(Default)]
pub struct Limiter {
    hasher: std::collections::hash_map::RandomState,
    buckets: [Mutex<HashMap<String, Bucket>>; SHARDS],
    inflight: [Mutex<HashMap<String, u32>>; SHARDS],
}

fn bucket_size(rate: f64, burst: Option<u32>) -> f64 {
    burst.map_or(rate.max(1.0), f64::from)
}

impl Limiter {
    fn shard(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Takes one token from `key`'s bucket (`rate` per second, `size` deep), or says
    /// how long until one is there.
    fn take(&self, key: &str, rate: f64, size: f64, now: Instant) -> Result<(), Duration> {
        let mut shard = self.buckets[self.shard(key)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let b = match shard.get_mut(key) {
            Some(b) => b,
            None => shard.entry(key.to_string()).or_insert(Bucket {
                tokens: size,
                last: now,
            }),
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(size);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    fn refund(&self, key: &str, size: f64) {
        let mut shard = self.buckets[self.shard(key)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(b) = shard.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(size);
        }
    }

    /// Admits one invocation by `who` against its tenant's bucket. Called as soon as
    /// the caller is known, before the request is read further, so refusing a tenant
    /// over its rate costs as little as possible. The admin token is not limited.
    pub fn admit_tenant(&self, who: &Principal) -> Result<(), Throttled> {
        match who.tenant() {
            Some(t) => self.tenant_with(&t.id, &t.limits, Instant::now()),
            None => Ok(()),
        }
    }

    /// Admits one invocation of `function` (its internal name) against the function's
    /// bucket, once [`Limiter::admit_tenant`] admitted it; a refusal gives the tenant
    /// its token back.
    pub fn admit_function(&self, who: &Principal, function: &str) -> Result<(), Throttled> {
        match who.tenant() {
            Some(t) => self.function_with(&t.id, &t.limits, function, Instant::now()),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    fn admit_with(
        &self,
        tenant: &str,
        l: &TenantLimits,
        function: &str,
        now: Instant,
    ) -> Result<(), Throttled> {
        self.tenant_with(tenant, l, now)?;
        self.function_with(tenant, l, function, now)
    }

    fn tenant_key(tenant: &str, l: &TenantLimits) -> Option<(String, f64, f64)> {
        l.qps
            .map(|rate| (format!("t/{tenant}"), rate, bucket_size(rate, l.burst)))
    }

    fn tenant_with(&self, tenant: &str, l: &TenantLimits, now: Instant) -> Result<(), Throttled> {
        if let Some((key, rate, size)) = Self::tenant_key(tenant, l) {
            self.take(&key, rate, size, now)
                .map_err(|retry_after| Throttled {
                    reason: Reason::TenantQps,
                    retry_after,
                    message: format!("over this tenant's limit of {rate} requests/s"),
                })?;
        }
        Ok(())
    }

    fn function_with(
        &self,
        tenant: &str,
        l: &TenantLimits,
        function: &str,
        now: Instant,
    ) -> Result<(), Throttled> {
        if let Some(rate) = l.function_qps {
            let size = bucket_size(rate, None);
            let key = format!("f/{function}");
            if let Err(retry_after) = self.take(&key, rate, size, now) {
                if let Some((key, _, size)) = Self::tenant_key(tenant, l) {
                    self.refund(&key, size);
                }
                return Err(Throttled {
                    reason: Reason::FunctionQps,
                    retry_after,
                    message: format!("over this function's limit of {rate} requests/s"),
                });
            }
        }
        Ok(())
    }

    /// Admits one submission to queue `q` (every caller, the admin token too: the
    /// queue's rate is the queue's, whoever fills it).
    pub fn admit_queue(&self, q: &ferry_core::model::QueueRecord) -> Result<(), Throttled> {
        let Some(rate) = q.qps else {
            return Ok(());
        };
        let key = format!("q/{}", q.name);
        self.take(&key, rate, bucket_size(rate, q.burst), Instant::now())
            .map_err(|retry_after| Throttled {
                reason: Reason::QueueQps,
                retry_after,
                message: format!("over this queue's limit of {rate} submissions/s"),
            })
    }

    /// Counts a synchronous invocation in flight until the guard drops; refuses one
    /// over the tenant's per-function cap.
    pub fn enter(
        self: &Arc<Self>,
        who: &Principal,
        function: &str,
    ) -> Result<Option<InFlight>, Throttled> {
        let Some(cap) = who.tenant().and_then(|t| t.limits.function_concurrency) else {
            return Ok(None);
        };
        let key = function.to_string();
        let shard = self.shard(&key);
        let mut map = self.inflight[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return Err(Throttled {
                reason: Reason::FunctionConcurrency,
                retry_after: Duration::from_secs(1),
                message: format!("this function already has {cap} invocations in flight"),
            });
        }
        *n += 1;
        Ok(Some(InFlight {
            limiter: self.clone(),
            key,
            shard,
        }))
    }
}

/// One invocation in flight; leaving drops the count.
pub struct InFlight {
    limiter: Arc<Limiter>,
    key: String,
    shard: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.limiter.inflight[self.shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(qps: Option<f64>, burst: Option<u32>, fqps: Option<f64>) -> TenantLimits {
        TenantLimits {
            qps,
            burst,
            function_qps: fqps,
            ..TenantLimits::default()
        }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_refills_at_its_rate() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let lim = limits(Some(10.0), Some(5), None);
        for _ in 0..5 {
            assert!(l.admit_with("a", &lim, "a.f", t0).is_ok());
        }
        let refused = l.admit_with("a", &lim, "a.f", t0).unwrap_err();
        assert_eq!(refused.reason, Reason::TenantQps);
        assert!(refused.retry_after <= Duration::from_millis(100));
        assert_eq!(refused.retry_after_secs(), 1);
        // 100 ms later, one token (10/s) is back; not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.admit_with("a", &lim, "a.f", t1).is_ok());
        assert!(l.admit_with("a", &lim, "a.f", t1).is_err());
        // Another tenant has its own bucket.
        assert!(l.admit_with("b", &lim, "b.f", t1).is_ok());
    }

    #[test]
    fn a_function_limit_refunds_the_tenant_token() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let lim = limits(Some(100.0), Some(3), Some(1.0));
        assert!(l.admit_with("a", &lim, "a.f", t0).is_ok());
        let r = l.admit_with("a", &lim, "a.f", t0).unwrap_err();
        assert_eq!(r.reason, Reason::FunctionQps);
        // The refusal cost the tenant nothing: two more tokens remain for other functions.
        assert!(l.admit_with("a", &lim, "a.g", t0).is_ok());
        assert!(l.admit_with("a", &lim, "a.h", t0).is_ok());
        assert_eq!(
            l.admit_with("a", &lim, "a.i", t0).unwrap_err().reason,
            Reason::TenantQps
        );
    }

    #[test]
    fn concurrency_is_capped_and_released() {
        let l = Arc::new(Limiter::default());
        let who = Principal::Tenant(Arc::new(ferry_core::model::TenantRecord {
            id: "a".into(),
            description: None,
            created_ms: 0,
            limits: TenantLimits {
                function_concurrency: Some(2),
                ..TenantLimits::default()
            },
        }));
        let a = l.enter(&who, "a.f").unwrap();
        let b = l.enter(&who, "a.f").unwrap();
        assert_eq!(
            l.enter(&who, "a.f").err().map(|t| t.reason),
            Some(Reason::FunctionConcurrency)
        );
        assert!(l.enter(&who, "a.g").is_ok(), "per function");
        drop(a);
        assert!(l.enter(&who, "a.f").is_ok());
        drop(b);
        assert!(l.enter(&Principal::Admin, "a.f").unwrap().is_none());
    }
}
