//! The built `messages` binary: answers its stub text, health and reflection work, and it
//! exits cleanly on SIGTERM.

use e2e::{free_addr, grpcurl_json, wait_serving, Proc};

#[tokio::test]
async fn messages_answers_not_implemented_yet_over_grpcurl() {
    let addr = free_addr();
    let mut messages = Proc::start("messages", "messages", &["--addr", &addr.to_string()]);
    wait_serving(addr).await;
    let reply = grpcurl_json(addr, "messages.v1.Messages/Get", None);
    assert_eq!(reply["text"], "not implemented yet");
    let health = grpcurl_json(
        addr,
        "grpc.health.v1.Health/Check",
        Some(r#"{"service":"messages.v1.Messages"}"#),
    );
    assert_eq!(health["status"], "SERVING");
    assert!(messages.terminate().await.success());
}
