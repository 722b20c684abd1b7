//! What clients send, checked before anything is called: the text of a message, its
//! Idempotency-Key (and the id made from it), page limits and cursors.

use uuid::Uuid;

use super::{
    errors::FacadeError,
    facade::{Facade, DEFAULT_PAGE, MAX_PAGE},
};

/// Longest Idempotency-Key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Ids made from idempotency keys live in their own uuid v5 namespace.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_3b8e_2a4d_4e0f_9c51_7d2b_8a3e_4f60);

/// The cursor of the page after position `position`. Opaque to clients.
pub fn cursor(position: u64) -> String {
    format!("c{position}")
}

/// The position a cursor stands for; only cursors [`cursor`] makes are accepted.
pub fn position(cursor: &str) -> Result<u64, FacadeError> {
    cursor
        .strip_prefix('c')
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .filter(|position| *position > 0)
        .ok_or(FacadeError::InvalidCursor)
}

impl Facade {
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

    /// Refuses an empty text, or one over `--max-message-bytes`.
    pub(super) fn validate(&self, msg: &str) -> Result<(), FacadeError> {
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

    /// The page size asked for, or [`DEFAULT_PAGE`]; at most [`MAX_PAGE`].
    pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, FacadeError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(FacadeError::InvalidLimit);
        }
        Ok(limit)
    }
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

    #[test]
    fn cursors_round_trip_and_others_are_refused() {
        assert_eq!(position(&cursor(42)).expect("ours"), 42);
        for forged in [
            "",
            "c",
            "c0",
            "c+5",
            "c-1",
            "42",
            "c1x",
            "C1",
            "c99999999999999999999",
        ] {
            assert!(position(forged).is_err(), "{forged:?}");
        }
    }
}
