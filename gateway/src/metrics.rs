//! Prometheus metrics, `ferry_gateway_…`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub invocations: IntCounterVec,
    pub cold_starts: IntCounterVec,
    pub rejections: IntCounterVec,
    /// Set at each scrape from the store: tasks by queue, priority and state.
    pub queue_tasks: IntGaugeVec,
}

impl Metrics {
    #[allow(clippy::expect_used)] // Static metric definitions: a failure is a programming error.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ferry_gateway_http_requests_total",
                "HTTP requests by route and status code",
            ),
            &["route", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "ferry_gateway_http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 10.0, 60.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let invocations = IntCounterVec::new(
            Opts::new(
                "ferry_gateway_invocations_total",
                "Invocations by function, version and outcome",
            ),
            &["function", "version", "outcome"],
        )
        .expect("valid metric");
        let cold_starts = IntCounterVec::new(
            Opts::new(
                "ferry_gateway_cold_starts_total",
                "Invocations that fetched or compiled their package first",
            ),
            &["function"],
        )
        .expect("valid metric");
        let rejections = IntCounterVec::new(
            Opts::new(
                "ferry_gateway_rejections_total",
                "Requests refused by a limit, by reason (tenant_qps, function_qps, function_concurrency, queue_qps)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let queue_tasks = IntGaugeVec::new(
            Opts::new(
                "ferry_gateway_queue_tasks",
                "Async tasks by queue, priority class and state (queued, running), across clusters",
            ),
            &["queue", "priority", "state"],
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(invocations.clone()),
            Box::new(cold_starts.clone()),
            Box::new(rejections.clone()),
            Box::new(queue_tasks.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Self {
            registry,
            requests,
            latency,
            invocations,
            cold_starts,
            rejections,
            queue_tasks,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
