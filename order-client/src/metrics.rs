//! The node agent's Prometheus metrics, `ferry_order_client_…`, in a registry of its
//! own (several agents may share a process).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub tasks: IntCounterVec,
    pub duration: Histogram,
    pub cold_starts: IntCounter,
    pub rejections: IntCounterVec,
    pub running: IntGauge,
    pub connected: IntGauge,
}

impl Metrics {
    #[allow(clippy::expect_used)] // Static metric definitions: a failure is a programming error.
    pub fn new(node_id: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some([("node".to_string(), node_id.to_string())].into()),
        )
        .expect("valid registry labels");
        let tasks = IntCounterVec::new(
            Opts::new(
                "ferry_order_client_tasks_total",
                "Assignments this node ran to the end, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "ferry_order_client_task_duration_seconds",
                "Time from accepting an assignment to its result (package preparation included)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
            ]),
        )
        .expect("valid metric");
        let cold_starts = IntCounter::new(
            "ferry_order_client_cold_starts_total",
            "Runs that fetched or compiled their package first",
        )
        .expect("valid metric");
        let rejections = IntCounterVec::new(
            Opts::new(
                "ferry_order_client_rejections_total",
                "Assignments refused, by reason (capacity, gpu, invalid)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let running = IntGauge::new(
            "ferry_order_client_running_tasks",
            "Assignments running on this node now",
        )
        .expect("valid metric");
        let connected = IntGauge::new(
            "ferry_order_client_connected",
            "1 while attached to an order-server",
        )
        .expect("valid metric");
        for m in [
            Box::new(tasks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(cold_starts.clone()),
            Box::new(rejections.clone()),
            Box::new(running.clone()),
            Box::new(connected.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Self {
            registry,
            tasks,
            duration,
            cold_starts,
            rejections,
            running,
            connected,
        }
    }

    /// Counts a finished run.
    pub fn finished(&self, r: &ferry_core::proto::TaskResult) {
        self.tasks
            .with_label_values(&[r.outcome().as_str_name()])
            .inc();
        self.duration.observe(r.duration_us as f64 / 1e6);
        if r.cold {
            self.cold_starts.inc();
        }
    }
}
