//! What a client is told when a call fails: plain words, no internal details (those go
//! to the log, with the request id).

use std::time::Duration;

use tonic::Code;
use tracing::warn;

use super::facade::{Facade, LOGGING, MAX_PAGE};
use crate::failover::FailoverError;

/// What a client is told when a call fails: plain words, no internal details.
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
    /// A logging instance refused the input (its own validation, in words for users).
    #[error("{0}")]
    Invalid(String),
    #[error("this Idempotency-Key was already used with another message; the first one is kept")]
    KeyReused,
    #[error("the message store is full: nothing was stored")]
    StoreFull,
    #[error("limit must be a whole number from 1 to {MAX_PAGE}")]
    InvalidLimit,
    #[error("unknown cursor: pass the `next` of an earlier page")]
    InvalidCursor,
    #[error("no {0} instance is registered; start one, then try again")]
    NoInstance(&'static str),
    #[error("no {service} instance could {what} within {budget:?}; try again")]
    Unavailable {
        service: &'static str,
        what: &'static str,
        budget: Duration,
    },
    #[error("the {0} service answered with an error")]
    Upstream(&'static str),
    #[error("the facade is shutting down; try again")]
    ShuttingDown,
    #[error("the log could not be read to the end; try again")]
    Broken,
    /// At a limit of the facade or of the logging instances: nothing was done.
    #[error("busy: {0}; try again shortly")]
    Busy(String),
}

impl Facade {
    /// What a client is told about a failed failover, with the details logged.
    pub(super) fn failed(
        &self,
        what: &'static str,
        request_id: &str,
        error: FailoverError,
    ) -> FacadeError {
        match error {
            FailoverError::Rejected(status) => match status.code() {
                Code::InvalidArgument => FacadeError::Invalid(status.message().to_owned()),
                Code::AlreadyExists => FacadeError::KeyReused,
                Code::ResourceExhausted => {
                    warn!(
                        request_id,
                        error = status.message(),
                        "logging refused: store full"
                    );
                    FacadeError::StoreFull
                }
                Code::OutOfRange => FacadeError::InvalidCursor,
                code => {
                    warn!(
                        request_id,
                        ?code,
                        error = status.message(),
                        "a logging instance answered with an error"
                    );
                    FacadeError::Upstream(LOGGING)
                }
            },
            FailoverError::Exhausted { .. } => {
                warn!(request_id, error = %error, "gave up: could not {what}");
                FacadeError::Unavailable {
                    service: LOGGING,
                    what,
                    budget: self.failover.policy().budget,
                }
            }
            FailoverError::Unlisted { .. } => {
                warn!(request_id, error = %error, "gave up: could not {what}");
                FacadeError::NoInstance(LOGGING)
            }
            FailoverError::ShuttingDown => FacadeError::ShuttingDown,
        }
    }
}
