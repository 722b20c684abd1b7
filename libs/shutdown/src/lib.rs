//! One shutdown signal for every process.
//!
//! A [`CancellationToken`] is the whole mechanism: the first Ctrl+C (SIGINT) or SIGTERM
//! cancels it, every long-lived task and every wait ([`retry`](../retry/index.html))
//! selects on `cancelled()`, and `run` returns once the server has drained. Tests cancel
//! the token themselves.
//!
//! Signals that arrive while the process is already stopping are reported too (a user
//! pressing Ctrl+C again wants to know that it was heard and what is still running),
//! never silently swallowed.

use tokio_util::sync::CancellationToken;

/// A signal the process received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The first one: the token is now cancelled.
    First(&'static str),
    /// Another one, while the process is already stopping.
    Again(&'static str),
}

/// A token cancelled on the first SIGINT or SIGTERM; each signal is logged.
pub fn on_signal() -> CancellationToken {
    on_signal_with(|received| match received {
        Received::First(signal) => tracing::info!(signal, "shutting down"),
        Received::Again(signal) => tracing::warn!(
            signal,
            "already shutting down; waiting for in-flight work to finish (kill -9 forces it)"
        ),
    })
}

/// A token cancelled on the first SIGINT or SIGTERM; `report` hears of every signal.
pub fn on_signal_with(report: impl Fn(Received) + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        let first = signals.recv().await;
        cancel.cancel();
        report(Received::First(first));
        loop {
            let again = signals.recv().await;
            report(Received::Again(again));
        }
    });
    token
}

/// SIGINT and SIGTERM, listened for from the moment this is made (a signal between two
/// `recv` calls is not lost).
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(stream) => Some(stream),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for {name}");
                    None
                }
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for the next signal and names it.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(stream: &mut Option<tokio::signal::unix::Signal>) {
                let received = match stream {
                    Some(stream) => stream.recv().await.is_some(),
                    None => false,
                };
                if !received {
                    std::future::pending::<()>().await;
                }
            }
            tokio::select! {
                () = next(&mut self.interrupt) => "SIGINT",
                () = next(&mut self.terminate) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl+C"
        }
    }
}
