//! The order-server's Prometheus metrics, `ferry_order_server_…`: read from its live
//! state when scraped (nodes by state, slots, open breakers, tasks it runs, the queue
//! it sees), so the scheduling paths carry no metric code.

use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts};

use crate::service::{Inner, OrderService};

/// Counters the scheduling paths bump (one relaxed add each).
#[derive(Default)]
pub(crate) struct Counts {
    /// Tasks claimed (queued → running).
    pub claimed: AtomicU64,
    /// Attempts committed final (succeeded, failed, timed out, cancelled, dead).
    pub finished: AtomicU64,
    /// Attempts committed back to the queue for a retry.
    pub retried: AtomicU64,
    /// Of those commits, the ones made for another instance or a lost node (orphan
    /// re-queues, adopted results).
    pub orphans: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// Builds the gauges anew at each scrape from a (weakly held) service.
struct Live {
    service: Weak<Inner>,
    descs: Vec<Desc>,
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> Option<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels).ok()
}

fn gauge(name: &str, help: &str) -> Option<IntGauge> {
    IntGauge::new(name, help).ok()
}

/// The gauges, with their values from `s`.
fn snapshot(s: &OrderService) -> Vec<MetricFamily> {
    let mut out = vec![];
    let statuses = s.inner.nodes.statuses();
    if let Some(g) = gauge_vec(
        "ferry_order_server_nodes",
        "Attached node agents by state (ready, suspect, ejected, half-open, draining, disabled)",
        &["state"],
    ) {
        for st in [
            "ready",
            "suspect",
            "ejected",
            "half-open",
            "draining",
            "disabled",
        ] {
            g.with_label_values(&[st]).set(0);
        }
        for n in &statuses {
            g.with_label_values(&[n.state.as_str()]).inc();
        }
        out.extend(g.collect());
    }
    if let Some(g) = gauge_vec(
        "ferry_order_server_slots",
        "Task slots of the attached nodes: total and used",
        &["kind"],
    ) {
        let total: u64 = statuses
            .iter()
            .map(|n| n.capacity.as_ref().map_or(0, |c| u64::from(c.slots)))
            .sum();
        let used: u64 = statuses
            .iter()
            .map(|n| n.used.as_ref().map_or(0, |c| u64::from(c.slots)))
            .sum();
        g.with_label_values(&["total"]).set(total as i64);
        g.with_label_values(&["used"]).set(used as i64);
        out.extend(g.collect());
    }
    if let Some(g) = gauge_vec(
        "ferry_order_server_open_breakers",
        "Circuit breakers not closed: per node, and per node x function",
        &["scope"],
    ) {
        let open = |b: &ferry_core::proto::BreakerStatus| b.state != "closed";
        let nodes = statuses
            .iter()
            .filter(|n| n.breaker.as_ref().is_some_and(open))
            .count();
        let functions: usize = statuses
            .iter()
            .map(|n| n.function_breakers.iter().filter(|b| open(b)).count())
            .sum();
        g.with_label_values(&["node"]).set(nodes as i64);
        g.with_label_values(&["function"]).set(functions as i64);
        out.extend(g.collect());
    }
    if let Some(g) = gauge(
        "ferry_order_server_running_tasks",
        "Async tasks this instance has claimed and not committed",
    ) {
        let n = s
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        g.set(n as i64);
        out.extend(g.collect());
    }
    if let Some(g) = gauge(
        "ferry_order_server_queued_tasks",
        "Tasks in this cluster's queue (every instance sees the same queue)",
    ) {
        g.set(s.inner.queue.len() as i64);
        out.extend(g.collect());
    }
    let c = &s.inner.counts;
    for (name, help, v) in [
        (
            "ferry_order_server_claimed_total",
            "Tasks claimed (queued to running) by this instance",
            &c.claimed,
        ),
        (
            "ferry_order_server_finished_total",
            "Attempts committed in a final state by this instance",
            &c.finished,
        ),
        (
            "ferry_order_server_retried_total",
            "Attempts committed back to the queue for a retry by this instance",
            &c.retried,
        ),
        (
            "ferry_order_server_orphan_commits_total",
            "Commits made for a lost instance or node (re-queues, adopted results)",
            &c.orphans,
        ),
    ] {
        if let Ok(counter) = prometheus::IntCounter::new(name, help) {
            counter.inc_by(v.load(Ordering::Relaxed));
            out.extend(counter.collect());
        }
    }
    if let Some(g) = gauge(
        "ferry_order_server_stale_completions",
        "Completions refused as stale since start (an old attempt, or a lost lease)",
    ) {
        g.set(
            s.inner
                .stale_completions
                .load(std::sync::atomic::Ordering::Relaxed) as i64,
        );
        out.extend(g.collect());
    }
    out
}

impl Collector for Live {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.service.upgrade() {
            Some(inner) => snapshot(&OrderService { inner }),
            None => vec![],
        }
    }
}

/// A registry whose metrics read `service` when gathered.
pub(crate) fn registry(service: &OrderService) -> prometheus::Registry {
    let registry = prometheus::Registry::new_custom(
        None,
        Some([("instance_id".to_string(), service.inner.cfg.id.clone())].into()),
    )
    .unwrap_or_default();
    // Descriptions are only used for registration checks; the families come from
    // `snapshot`, whose names are unique.
    let descs = snapshot(service)
        .iter()
        .filter_map(|f| {
            Desc::new(
                f.name().to_string(),
                f.help().to_string(),
                vec![],
                Default::default(),
            )
            .ok()
        })
        .collect();
    let live = Live {
        service: std::sync::Arc::downgrade(&service.inner),
        descs,
    };
    if let Err(e) = registry.register(Box::new(live)) {
        tracing::warn!(error = %e, "order-server metrics not registered");
    }
    registry
}
