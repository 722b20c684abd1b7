//! Request ids: one per client request, taken from the `x-request-id` header when the
//! client sends a usable one, else made fresh; carried in gRPC metadata from the facade
//! to the services it calls, so every log line about one message, in every service,
//! names the same id.

use tonic::metadata::MetadataValue;

/// The header (and gRPC metadata key) that carries the id.
pub const HEADER: &str = "x-request-id";
/// Longest id accepted from a client.
const MAX_LEN: usize = 128;

/// The client's id when it is 1-128 visible ASCII characters, else a fresh uuid.
pub fn accept(presented: Option<&str>) -> String {
    match presented {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_LEN
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// Adds the id to an outgoing gRPC request.
pub fn attach<T>(request: &mut tonic::Request<T>, id: &str) {
    if let Ok(value) = MetadataValue::try_from(id) {
        request.metadata_mut().insert(HEADER, value);
    }
}

/// The id an incoming gRPC request carries, if any.
pub fn of<T>(request: &tonic::Request<T>) -> Option<String> {
    request
        .metadata()
        .get(HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_ids_are_kept_and_others_replaced() {
        assert_eq!(accept(Some("abc-123")), "abc-123");
        for bad in [None, Some(""), Some("has space"), Some("ünï")] {
            let id = accept(bad);
            assert_eq!(id.len(), 36, "{bad:?} -> {id}");
        }
        assert_ne!(accept(Some(&"x".repeat(129))), "x".repeat(129));
        let mut request = tonic::Request::new(());
        attach(&mut request, "abc-123");
        assert_eq!(of(&request).as_deref(), Some("abc-123"));
    }
}
