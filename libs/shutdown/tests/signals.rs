//! Real signals sent to this test process (its own binary, so no other test hears them).

use std::time::Duration;

use nix::{sys::signal::Signal, unistd::Pid};
use shutdown::Received;
use tokio::sync::mpsc;

fn send(signal: Signal) {
    nix::sys::signal::kill(Pid::this(), signal).expect("signal this process");
}

async fn next(heard: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("the signal was reported")
        .expect("reporter alive")
}

#[tokio::test]
async fn the_first_signal_cancels_and_later_ones_are_reported_not_swallowed() {
    let (tx, mut heard) = mpsc::unbounded_channel();
    let token = shutdown::on_signal_with(move |received| {
        let _ = tx.send(received);
    });
    assert!(!token.is_cancelled());

    send(Signal::SIGTERM);
    assert_eq!(next(&mut heard).await, Received::First("SIGTERM"));
    assert!(token.is_cancelled());

    send(Signal::SIGINT);
    assert_eq!(next(&mut heard).await, Received::Again("SIGINT"));
    send(Signal::SIGINT);
    assert_eq!(next(&mut heard).await, Received::Again("SIGINT"));
}
