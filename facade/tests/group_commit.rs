//! Group commit against a logging instance that answers some appends UNAVAILABLE: only
//! those are sent again, and every POST is answered and stored once. The instance is
//! the real logging service over a memory store, wrapped to hold its first call and to
//! refuse each `flaky` message the first time it sees it.

mod support;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use logging::{
    service::LoggingService,
    store::{MemoryStore, MessageStore},
};
use proto::logging::v1::{
    logging_server::Logging as _, AppendBatchRequest, AppendBatchResponse, AppendResult,
};
use support::{AppendBatch, Wrapped};
use testkit::{curl_post, eventually, metric};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

/// Holds its first call until released, and refuses each `flaky` text once.
#[derive(Default)]
struct Flaky {
    /// The texts of every AppendBatch call, in order.
    calls: Mutex<Vec<Vec<String>>>,
    /// `flaky` texts already refused once.
    refused: Mutex<HashSet<String>>,
    first_call: Notify,
    release_first: Notify,
}

#[tonic::async_trait]
impl AppendBatch for Flaky {
    async fn append_batch(
        &self,
        real: &LoggingService<MemoryStore>,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        let appends = request.into_inner().appends;
        let first = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(appends.iter().map(|a| a.text.clone()).collect());
            calls.len() == 1
        };
        if first {
            // Hold the first call, so the POSTs sent meanwhile queue behind it.
            self.first_call.notify_one();
            self.release_first.notified().await;
        }
        let mut results = Vec::new();
        for append in appends {
            let refuse = append.text.starts_with("flaky")
                && self.refused.lock().unwrap().insert(append.text.clone());
            if refuse {
                results.push(AppendResult {
                    code: Code::Unavailable as i32,
                    error: "not now".into(),
                    duplicate: false,
                });
                continue;
            }
            let one = AppendBatchRequest {
                appends: vec![append],
            };
            let answer = real.append_batch(Request::new(one)).await?;
            results.extend(answer.into_inner().results);
        }
        Ok(Response::new(AppendBatchResponse { results }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_answered_unavailable_are_sent_again_alone_and_stored_once() {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let store = Arc::new(MemoryStore::default());
    let wrapped = Wrapped::new(&store, Flaky::default());
    let flaky = &wrapped.batch;
    let facade = support::facade_over(&wrapped, &shutdown, |config| {
        // One call at a time; the held first call keeps its slot and is not given
        // up on.
        config.append_calls = 1;
        config.append_patience = Duration::from_secs(30);
        config.attempt_deadline = Duration::from_secs(10);
        config.retry_budget = Duration::from_secs(30);
    })
    .await;

    let first = tokio::task::spawn_blocking(move || curl_post(facade, "first"));
    flaky.first_call.notified().await;
    let others: Vec<_> = ["ok", "flaky"]
        .into_iter()
        .map(|text| tokio::task::spawn_blocking(move || curl_post(facade, text)))
        .collect();
    eventually(
        Duration::from_secs(10),
        "two POSTs waiting in the facade",
        || async { metric(facade, "facade_append_waiting") == Some(2.0) },
    )
    .await;
    flaky.release_first.notify_one();
    for post in std::iter::once(first).chain(others) {
        let (status, reply) = post.await.expect("curl");
        assert_eq!(status, 201, "{reply}");
    }

    let calls = flaky.calls.lock().unwrap().clone();
    let mut second = calls.get(1).cloned().unwrap_or_default();
    second.sort();
    assert_eq!(
        (calls.len(), calls[0].clone(), second, calls.get(2).cloned()),
        (
            3,
            vec!["first".to_owned()],
            vec!["flaky".to_owned(), "ok".to_owned()],
            Some(vec!["flaky".to_owned()])
        ),
        "the two POSTs sent during the first call share the second; only the refused one goes again: {calls:?}"
    );
    let page = store.read(0, 10).await.expect("read");
    let mut stored: Vec<String> = page.messages.into_iter().map(|m| m.text).collect();
    stored.sort();
    assert_eq!(stored, ["first", "flaky", "ok"]);
}
