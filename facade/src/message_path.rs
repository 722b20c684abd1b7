//! The message path: what the facade does, independent of how it is asked (HTTP or
//! gRPC). POST validates, makes the id and writes through [`Failover`]; GET reads every
//! message the same way and asks the messages service for its text.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use dashmap::DashMap;
use proto::{
    logging::v1::{logging_client::LoggingClient, AppendRequest, ListRequest},
    messages::v1::{messages_client::MessagesClient, GetRequest},
};
use rpc::request_id;
use tonic::{transport::Channel, Status};
use tracing::debug;
use uuid::Uuid;

use crate::{
    discovery::Discovery,
    failover::{Failover, FailoverError},
};

pub const LOGGING: &str = "logging";
pub const MESSAGES: &str = "messages";
/// Longest Idempotency-Key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Ids made from idempotency keys live in their own uuid v5 namespace.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_3b8e_2a4d_4e0f_9c51_7d2b_8a3e_4f60);

#[derive(Debug, thiserror::Error)]
pub enum FacadeError {
    #[error("msg is required: send {{\"msg\": \"...\"}}")]
    MissingMessage,
    #[error("msg is empty")]
    EmptyMessage,
    #[error("msg is {len} bytes, at most {limit} allowed")]
    MessageTooLarge { len: usize, limit: usize },
    #[error("invalid Idempotency-Key: {0}")]
    InvalidIdempotencyKey(String),
    #[error(transparent)]
    Failover(#[from] FailoverError),
}

/// One stored message, as the facade returns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogEntry {
    pub id: String,
    pub msg: String,
}

/// The answer to GET: every message, plus the messages service's text when reachable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    pub logs: Vec<LogEntry>,
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

pub struct Facade {
    discovery: Discovery,
    failover: Failover,
    /// One channel per instance address, made on first use and reused (channels are
    /// cheap handles over one HTTP/2 connection that reconnects by itself). Addresses
    /// that left every list are forgotten, so the pool does not grow with churn.
    channels: DashMap<String, Channel>,
    /// The discovery change count the pool was last pruned at.
    pruned_at: AtomicU64,
    max_message_bytes: usize,
    messages_deadline: Duration,
}

impl Facade {
    pub fn new(discovery: Discovery, failover: Failover, max_message_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            failover,
            channels: DashMap::new(),
            pruned_at: AtomicU64::new(0),
            max_message_bytes,
            messages_deadline: Duration::from_secs(1),
        })
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.forget_unlisted();
        if let Some(channel) = self.channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = rpc::channel(address)
            .map_err(|e| Status::unavailable(format!("bad instance address {address}: {e}")))?;
        let channel = self
            .channels
            .entry(address.to_owned())
            .or_insert(channel)
            .clone();
        metrics::gauge!("facade_channels").set(self.channels.len() as f64);
        Ok(channel)
    }

    /// After any list changed, drops the channels of addresses no list holds any more
    /// (calls still using one keep their own clone). Costs one atomic load otherwise.
    fn forget_unlisted(&self) {
        let changes = self.discovery.changes();
        if self.pruned_at.swap(changes, Ordering::AcqRel) == changes {
            return;
        }
        let listed = self.discovery.listed();
        self.channels.retain(|address, _| listed.contains(address));
        metrics::gauge!("facade_channels").set(self.channels.len() as f64);
    }

    /// The id a message gets: from the idempotency key when there is one (the same key
    /// always gives the same id), else a fresh random uuid.
    pub fn message_id(idempotency_key: Option<&str>) -> Result<String, FacadeError> {
        match idempotency_key {
            None => Ok(Uuid::new_v4().to_string()),
            Some(key) => {
                if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
                    return Err(FacadeError::InvalidIdempotencyKey(format!(
                        "must be 1-{MAX_IDEMPOTENCY_KEY} bytes"
                    )));
                }
                Ok(Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes()).to_string())
            }
        }
    }

    fn validate(&self, msg: &str) -> Result<(), FacadeError> {
        if msg.is_empty() {
            return Err(FacadeError::EmptyMessage);
        }
        if msg.len() > self.max_message_bytes {
            return Err(FacadeError::MessageTooLarge {
                len: msg.len(),
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }

    /// Stores `msg` through a live logging instance, failing over and retrying with the
    /// same id; returns the id.
    pub async fn post(
        &self,
        msg: String,
        idempotency_key: Option<&str>,
        request_id: &str,
    ) -> Result<String, FacadeError> {
        self.validate(&msg)?;
        let id = Self::message_id(idempotency_key)?;
        debug!(request_id, id, "posting");
        let deadline = self.failover.policy().attempt_deadline;
        self.failover
            .run(
                LOGGING,
                request_id,
                || self.discovery.instances(LOGGING),
                |address| {
                    let channel = self.channel(&address);
                    let request = AppendRequest {
                        id: id.clone(),
                        text: msg.clone(),
                    };
                    let request = logging_request(request, deadline, request_id);
                    async move {
                        let mut client = LoggingClient::new(channel?);
                        client.append(request).await
                    }
                },
            )
            .await?;
        Ok(id)
    }

    /// Every message (from one live logging instance, with failover) and the messages
    /// service's text, fetched concurrently. A messages outage does not fail the read:
    /// the logs are what the caller came for, so it is reported in `warnings`.
    pub async fn get(&self, request_id: &str) -> Result<Listing, FacadeError> {
        let deadline = self.failover.policy().attempt_deadline;
        let logs = self.failover.run(
            LOGGING,
            request_id,
            || self.discovery.instances(LOGGING),
            |address| {
                let channel = self.channel(&address);
                let request = logging_request(ListRequest {}, deadline, request_id);
                async move {
                    let mut client = LoggingClient::new(channel?);
                    client.list(request).await
                }
            },
        );
        let (logs, message) = tokio::join!(logs, self.messages_text());
        let logs = logs?
            .into_inner()
            .messages
            .into_iter()
            .map(|m| LogEntry {
                id: m.id,
                msg: m.text,
            })
            .collect();
        Ok(match message {
            Ok(text) => Listing {
                logs,
                message: Some(text),
                warnings: Vec::new(),
            },
            Err(reason) => Listing {
                logs,
                message: None,
                warnings: vec![format!("messages service unavailable: {reason}")],
            },
        })
    }

    async fn messages_text(&self) -> Result<String, String> {
        let instances = self.discovery.instances(MESSAGES).await;
        let Some(address) = instances.first() else {
            return Err("not in the registry".to_owned());
        };
        let channel = self.channel(address).map_err(|s| s.message().to_owned())?;
        let mut client = MessagesClient::new(channel);
        let deadline = self.messages_deadline;
        rpc::call(deadline, async move {
            client.get(rpc::request(GetRequest {}, deadline)).await
        })
        .await
        .map(|reply| reply.into_inner().text)
        .map_err(|status| format!("{address}: {}", status.message()))
    }
}

/// A request to a logging instance: the attempt's deadline and the client's request id.
fn logging_request<T>(message: T, deadline: Duration, request_id: &str) -> tonic::Request<T> {
    let mut request = rpc::request(message, deadline);
    request_id::attach(&mut request, request_id);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_idempotency_key_gives_the_same_id_and_others_differ() {
        let a = Facade::message_id(Some("order-42")).expect("id");
        assert_eq!(a, Facade::message_id(Some("order-42")).expect("id"));
        assert_ne!(a, Facade::message_id(Some("order-43")).expect("id"));
        assert_ne!(
            Facade::message_id(None).expect("id"),
            Facade::message_id(None).expect("id")
        );
        assert!(Facade::message_id(Some("")).is_err());
        assert!(Facade::message_id(Some(&"k".repeat(MAX_IDEMPOTENCY_KEY + 1))).is_err());
    }
}
