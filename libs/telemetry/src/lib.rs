//! Logs and metrics set-up shared by every binary.
//!
//! Logs: readable lines by default (coloured on a terminal), `--log-format json` for
//! machines, `RUST_LOG` respected. Metrics: one Prometheus recorder per process, served
//! as `GET /metrics` on the service's own port.

use std::{sync::OnceLock, time::Duration};

use axum::{http::header::CONTENT_TYPE, response::IntoResponse, routing::get, Router};
use clap::ValueEnum;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `--log-format` flag, flattened into every binary's command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// How log lines are written.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// What is logged when `RUST_LOG` is not set: our `info`, and only warnings from the
/// NATS client, whose connection chatter would otherwise fill the runner's terminal.
pub const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// Installs the global subscriber; [`DEFAULT_FILTER`] unless `RUST_LOG` says otherwise.
/// Colours only when stdout is a terminal, so captured output (runner, tests) stays
/// plain.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = fmt().with_env_filter(filter).with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Latency buckets, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Only the first recorder of a process can be global; in-process tests start
        // several services, and they then share the first one.
        let _ = metrics::set_global_recorder(recorder);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let upkeep = handle.clone();
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
        }
        handle
    })
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics_router() -> Router {
    metrics(); // installed now: counting starts before the first scrape
    Router::new().route("/metrics", get(|| async { render_metrics() }))
}

/// The process's metrics in the Prometheus text format, as `GET /metrics` answers.
pub fn render_metrics() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
}
