//! A facade in front of a logging instance from before `AppendBatch` (a rolling upgrade
//! that reached the facade first): tonic answers UNIMPLEMENTED, and the facade sends the
//! same appends one `Append` call each. A test binary of its own, since the facade's
//! metrics are per process and `group_commit.rs` waits on one of them.

mod support;

use std::sync::Arc;

use logging::{
    service::LoggingService,
    store::{MemoryStore, MessageStore},
};
use proto::logging::v1::{AppendBatchRequest, AppendBatchResponse};
use support::{AppendBatch, Wrapped};
use testkit::curl_post;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// A logging instance from before AppendBatch: tonic answers UNIMPLEMENTED for it.
struct Old;

#[tonic::async_trait]
impl AppendBatch for Old {
    async fn append_batch(
        &self,
        _: &LoggingService<MemoryStore>,
        _: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        Err(Status::unimplemented("this logging predates AppendBatch"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logging_instance_without_append_batch_still_takes_every_post() {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let store = Arc::new(MemoryStore::default());
    let facade = support::facade_over(&Wrapped::new(&store, Old), &shutdown, |_| {}).await;

    let posts: Vec<_> = (0..8)
        .map(|i| tokio::task::spawn_blocking(move || curl_post(facade, &format!("old {i}"))))
        .collect();
    for post in posts {
        let (status, reply) = post.await.expect("curl");
        assert_eq!(status, 201, "{reply}");
    }
    let page = store.read(0, 100).await.expect("read");
    let mut stored: Vec<String> = page.messages.into_iter().map(|m| m.text).collect();
    stored.sort();
    let mut sent: Vec<String> = (0..8).map(|i| format!("old {i}")).collect();
    sent.sort();
    assert_eq!(stored, sent);
}
