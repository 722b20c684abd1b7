//! Every start-up wait stops on shutdown: a `logging` whose store or registry never
//! answers still exits cleanly, at once, on Ctrl+C (SIGINT) or SIGTERM.

use std::time::{Duration, Instant};

use e2e::{eventually, free_port, Proc};
use nix::sys::signal::Signal;

/// Starts `logging` with `args`, waits until its log says it is retrying `waiting_for`,
/// sends `signal`, and returns how long it took to exit (it must exit 0).
async fn stops_while_waiting(args: &[&str], waiting_for: &str, signal: Signal) -> Duration {
    let mut logging = Proc::start("logging", "logging", args);
    let retrying = format!("{waiting_for}: failed; retrying");
    eventually(Duration::from_secs(20), &retrying, || async {
        logging.output().contains(&retrying)
    })
    .await;
    let sent = Instant::now();
    logging.signal(signal);
    let status = logging.wait_exit(Duration::from_secs(10)).await;
    let took = sent.elapsed();
    assert!(status.success(), "{status}; output:\n{}", logging.output());
    assert!(
        logging.output().contains("stopped before"),
        "says why it stopped:\n{}",
        logging.output()
    );
    eprintln!("{signal:?} while waiting for {waiting_for}: exited in {took:?}");
    took
}

#[tokio::test]
async fn logging_with_an_unreachable_store_stops_on_sigint_and_sigterm() {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // Nothing listens on either port.
        let store = format!("nats://127.0.0.1:{}", free_port());
        let registry = format!("http://127.0.0.1:{}", free_port());
        let port = free_port().to_string();
        let took = stops_while_waiting(
            &[&port, "--store", &store, "--registry", &registry],
            &format!("store: reaching JetStream at {store}"),
            signal,
        )
        .await;
        // It should take well under a second; allow for a loaded CI machine, while a
        // process that ignored the signal would never exit at all.
        assert!(took < Duration::from_secs(3), "{signal:?}: {took:?}");
    }
}

#[tokio::test]
async fn logging_waiting_for_the_registrys_store_setting_stops_on_sigint() {
    // Without --store, logging asks the registry which store to use, for up to 5 s.
    let registry = format!("http://127.0.0.1:{}", free_port());
    let port = free_port().to_string();
    let took = stops_while_waiting(
        &[&port, "--registry", &registry],
        "reading the registry's logging.store setting",
        Signal::SIGINT,
    )
    .await;
    // Well under the 5 s it would otherwise wait before falling back to memory.
    assert!(took < Duration::from_secs(3), "{took:?}");
}
