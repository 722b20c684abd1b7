//! The [`Facade`]: what the message path holds (discovery, the failover, the channel
//! pool, the batcher of POSTs), how it is built, and its one way to call a logging
//! instance. The operations live beside it: `post`, `read`, `messages`.

use std::{sync::Arc, time::Duration};

use proto::logging::v1::logging_client::LoggingClient;
use rpc::request_id;
use tokio::time::Instant;
use tonic::{transport::Channel, Status};

use super::channels::Channels;
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

/// Most bytes of text in one AppendBatch call (a message over it still goes, alone), far
/// below the 4 MiB a logging instance accepts by default.
const MAX_APPEND_BATCH_BYTES: usize = 1024 * 1024;
/// Full reads served at once by default (`--max-full-reads`).
pub const DEFAULT_MAX_FULL_READS: usize = 32;

/// The largest valid gRPC request for messages of up to `max_message_bytes`: a Post with
/// its Idempotency-Key and framing.
pub fn max_request_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes + 4096
}

/// How POSTs are grouped into calls to logging.
#[derive(Debug, Clone, Copy)]
pub struct AppendBatching {
    /// Most AppendBatch calls in flight at once; POSTs that arrive while all are busy
    /// wait for the next free one and go out together.
    pub calls: usize,
    /// Most messages in one call (1: every POST is its own call).
    pub messages: usize,
    /// A call that has not answered within this stops counting against `calls`, so
    /// the POSTs behind it go on in another call.
    pub patience: Duration,
    /// Most POSTs waiting for a call; past it a POST is answered busy (503) at once.
    pub max_waiting: usize,
    /// Most bytes of text waiting for a call; past it a POST is answered busy.
    pub max_waiting_bytes: usize,
    /// Most POSTs in progress from one peer address (a quarter of `max_waiting` by
    /// default, so one client cannot fill the queue for everyone); past it its POSTs
    /// are answered busy.
    pub max_posts_per_peer: usize,
}

impl Default for AppendBatching {
    fn default() -> Self {
        Self {
            calls: 1,
            messages: 64,
            patience: Duration::from_millis(50),
            max_waiting: 4096,
            max_waiting_bytes: 32 * 1024 * 1024,
            max_posts_per_peer: 1024,
        }
    }
}

/// The message path, shared by the HTTP and gRPC front ends.
pub struct Facade {
    pub(super) discovery: Discovery,
    pub(super) failover: Failover,
    channels: Channels,
    pub(super) max_message_bytes: usize,
    pub(super) messages_deadline: Duration,
    /// POSTs on their way to logging: those that arrive while earlier calls are in
    /// flight go out together, in one AppendBatch call.
    pub(super) appends: Batcher<Facade>,
    /// Full reads in progress; over the limit a read is answered busy (503).
    pub(super) full_reads: Arc<rpc::Gate>,
    /// POSTs refused because the queue was full.
    pub(super) queue_refusals: rpc::Refusals,
    /// POSTs in progress, per peer address.
    pub(super) posts: Arc<rpc::Gate>,
}

impl Facade {
    /// The message path over `discovery` and `failover`; its channels to instances go
    /// over `transport` (TLS when the process has an identity).
    pub fn new(
        discovery: Discovery,
        failover: Failover,
        transport: rpc::Transport,
        max_message_bytes: usize,
        batching: AppendBatching,
        max_full_reads: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            failover,
            channels: Channels::new(transport),
            max_message_bytes,
            messages_deadline: Duration::from_secs(1),
            appends: Batcher::new(batch::Limits {
                in_flight: batching.calls,
                items: batching.messages,
                bytes: MAX_APPEND_BATCH_BYTES,
                patience: batching.patience,
                waiting: batching.max_waiting,
                waiting_bytes: batching.max_waiting_bytes,
            }),
            full_reads: rpc::Gate::new(
                "full reads",
                None,
                Some((max_full_reads, "--max-full-reads")),
                "facade_full_reads_refused_total",
            ),
            queue_refusals: rpc::Refusals::new("queued posts", "facade_queued_posts_refused_total"),
            // In all, the queue's own limits (`batch::Limits`) answer.
            posts: rpc::Gate::new(
                "POSTs in progress",
                Some((batching.max_posts_per_peer, "--max-posts-per-peer")),
                None,
                "facade_posts_per_peer_refused_total",
            ),
        })
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// A channel to the instance at `address`, from the pool.
    pub(super) fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.channels.get(address, &self.discovery)
    }

    /// One call to a live logging instance through the failover, for a request that
    /// began at `began`: `call` gets the instance's address and a client on its pooled
    /// channel.
    pub(super) async fn call_logging<T, C, CF>(
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
pub(super) fn logging_request<T>(
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
