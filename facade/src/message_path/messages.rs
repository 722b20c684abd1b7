//! The messages service's text, which a full read ends with. An outage does not fail
//! the read: the logs are what the caller came for.

use proto::messages::v1::{messages_client::MessagesClient, GetRequest};
use tracing::warn;

use super::facade::{Facade, MESSAGES};

/// The messages service's text, or why there is none.
#[derive(Debug, Clone)]
pub struct MessagesText {
    pub text: Option<String>,
    pub warnings: Vec<String>,
}

impl Facade {
    /// The messages service's text. An outage does not fail a read: the logs are what
    /// the caller came for, so it becomes a warning (details in the log).
    pub async fn messages_text(&self, request_id: &str) -> MessagesText {
        let instances = self.discovery.instances(MESSAGES).await;
        let result = match instances.first() {
            None => Err("not in the registry".to_owned()),
            Some(address) => match self.channel(address) {
                Err(status) => Err(status.message().to_owned()),
                Ok(channel) => {
                    let mut client = MessagesClient::new(channel);
                    let deadline = self.messages_deadline;
                    rpc::call(deadline, async move {
                        client.get(rpc::request(GetRequest {}, deadline)).await
                    })
                    .await
                    .map(|reply| reply.into_inner().text)
                    .map_err(|status| format!("{address}: {}", status.message()))
                }
            },
        };
        match result {
            Ok(text) => MessagesText {
                text: Some(text),
                warnings: Vec::new(),
            },
            Err(error) => {
                warn!(request_id, error, "messages service unavailable");
                MessagesText {
                    text: None,
                    warnings: vec!["messages service unavailable".to_owned()],
                }
            }
        }
    }
}
