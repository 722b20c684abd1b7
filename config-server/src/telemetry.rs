//! Tracing set-up shared by every binary: readable lines, `RUST_LOG` respected.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber; `info` unless `RUST_LOG` says otherwise. Colours only
/// when stdout is a terminal, so captured output (runner, tests) stays plain.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}
