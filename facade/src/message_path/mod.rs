//! The message path: what the facade does, independent of how it is asked (HTTP or
//! gRPC). POST validates, makes the id and writes through the failover ([`crate::failover`]), in a call
//! shared with the POSTs that arrived meanwhile ([`crate::batch`]); a page read is
//! one failover call; a full read ([`FullRead`]) streams the whole log from one
//! instance and, if that instance fails midway, resumes on another that serves the same
//! log (a shared NATS store), from the last position received.
//!
//! Errors that reach a client say what failed in plain words ([`FacadeError`]); the
//! details (addresses, transport errors) go to the log with the request id.
//!
//! - `channels`: the pool of channels to instances;
//! - `facade`: the [`Facade`] itself, how it is built, and its one call to logging;
//! - `errors`: [`FacadeError`], and how a failed call becomes one;
//! - `input`: what clients send, checked: texts, Idempotency-Keys (and the ids made
//!   from them), page limits and cursors;
//! - `post`: POST, and the batches it goes to logging in;
//! - `read`: pages and full reads;
//! - `messages`: the messages service's text.
//!
//! Each file uses only files above it in this list, never one below; this one only
//! declares them and says what the rest of the crate may use.

mod channels;
mod errors;
mod facade;
mod input;
mod messages;
mod post;
mod read;

pub use self::{
    errors::FacadeError,
    facade::{
        max_request_bytes, AppendBatching, Facade, DEFAULT_MAX_FULL_READS, DEFAULT_PAGE, LOGGING,
        MAX_PAGE, MESSAGES,
    },
    input::{cursor, position, MAX_IDEMPOTENCY_KEY},
    messages::MessagesText,
    read::{FullRead, LogEntry, Page},
};
