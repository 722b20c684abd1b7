//! The message path: what the facade does, independent of how it is asked (HTTP or
//! gRPC). POST validates, makes the id and writes through [`Failover`], in a call
//! shared with the POSTs that arrived meanwhile ([`crate::batch`]); a page read is
//! one failover call; a full read ([`FullRead`]) streams the whole log from one
//! instance and, if that instance fails midway, resumes on another that serves the same
//! log (a shared NATS store), from the last position received.
//!
//! Errors that reach a client say what failed in plain words ([`FacadeError`]); the
//! details (addresses, transport errors) go to the log with the request id.
//!
//! - `input`: what clients send, checked: texts, Idempotency-Keys (and the ids made
//!   from them), page limits and cursors;
//! - `errors`: [`FacadeError`], and how a failed call becomes one;
//! - `channels`: the pool of channels to instances;
//! - `post`: POST, and the batches it goes to logging in;
//! - `read`: pages and full reads;
//! - `messages`: the messages service's text.

mod channels;
mod errors;
mod input;
mod messages;
mod post;
mod read;

use std::{sync::Arc, time::Duration};

use proto::logging::v1::logging_client::LoggingClient;
use rpc::request_id;
use tokio::time::Instant;
use tonic::{transport::Channel, Status};

use self::{channels::Channels, post::MAX_APPEND_BATCH_BYTES};
pub use self::{
    errors::FacadeError,
    input::{cursor, position, MAX_IDEMPOTENCY_KEY},
    messages::MessagesText,
    post::AppendBatching,
    read::{FullRead, LogEntry, Page},
};
use crate::{
    batch::{self, Batcher},
    discovery::Discovery,
    failover::{Failover, FailoverError},
};

pub const LOGGING: &str = "logging";
pub const MESSAGES: &str = "messages";
/// Messages in a page when the client does not say.
pub const DEFAULT_PAGE: u32 = 100;
/// Most messages in one page.
pub const MAX_PAGE: u32 = 1000;

/// The message path, shared by the HTTP and gRPC front ends.
pub struct Facade {
    discovery: Discovery,
    failover: Failover,
    channels: Channels,
    max_message_bytes: usize,
    messages_deadline: Duration,
    /// POSTs on their way to logging: those that arrive while earlier calls are in
    /// flight go out together, in one AppendBatch call.
    appends: Batcher<Facade>,
}

impl Facade {
    pub fn new(
        discovery: Discovery,
        failover: Failover,
        max_message_bytes: usize,
        batching: AppendBatching,
    ) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            failover,
            channels: Channels::default(),
            max_message_bytes,
            messages_deadline: Duration::from_secs(1),
            appends: Batcher::new(batch::Limits {
                in_flight: batching.calls,
                items: batching.messages,
                bytes: MAX_APPEND_BATCH_BYTES,
                patience: batching.patience,
            }),
        })
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// A channel to the instance at `address`, from the pool.
    fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.channels.get(address, &self.discovery)
    }

    /// One call to a live logging instance through the failover, for a request that
    /// began at `began`: `call` gets the instance's address and a client on its pooled
    /// channel.
    async fn call_logging<T, C, CF>(
        &self,
        began: Instant,
        request_id: &str,
        call: C,
    ) -> Result<T, FailoverError>
    where
        C: Fn(String, LoggingClient<Channel>) -> CF,
        CF: std::future::Future<Output = Result<T, Status>>,
    {
        self.failover
            .run(
                began,
                LOGGING,
                request_id,
                || self.discovery.instances(LOGGING),
                |address| {
                    let channel = self.channel(&address);
                    let call = &call;
                    async move { call(address, LoggingClient::new(channel?)).await }
                },
            )
            .await
    }
}

/// A request to a logging instance: the attempt's deadline (when the call has one) and
/// the client's request id.
fn logging_request<T>(
    message: T,
    deadline: Option<Duration>,
    request_id: &str,
) -> tonic::Request<T> {
    let mut request = match deadline {
        Some(deadline) => rpc::request(message, deadline),
        None => tonic::Request::new(message),
    };
    request_id::attach(&mut request, request_id);
    request
}
