//! What the registry refuses, and why: the limits on what one registration may claim,
//! the checks of every field a request brings, and [`RegistryError`], every refusal the
//! registry answers with. The state machine (`registry`) calls the checks first; nothing
//! here holds state.

use std::collections::BTreeMap;

/// Longest service name, in bytes.
pub(crate) const MAX_SERVICE_NAME: usize = 64;
/// Most metadata entries on one instance.
pub(crate) const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key, in bytes.
pub(crate) const MAX_METADATA_KEY: usize = 128;
/// Longest metadata value, in bytes.
pub(crate) const MAX_METADATA_VALUE: usize = 1024;
/// Longest instance id an instance may choose, in bytes.
pub(crate) const MAX_INSTANCE_ID: usize = 128;
/// Longest host part of an address, in bytes (the DNS limit).
const MAX_HOST: usize = 253;

/// What the registry refuses, and why. Mapped to a gRPC status in one place (`convert::status`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RegistryError {
    #[error("invalid service name {0:?}: use 1-{MAX_SERVICE_NAME} characters from [A-Za-z0-9._-]")]
    InvalidService(String),
    #[error("invalid address {0:?}: expected host:port with a port from 1 to 65535")]
    InvalidAddress(String),
    #[error(
        "address {0:?} is unspecified (0.0.0.0 or [::]), which nobody can connect to: \
         register the address others reach the instance at (a service's --advertise)"
    )]
    UnspecifiedAddress(String),
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    #[error("invalid instance id: it is empty")]
    EmptyInstanceId,
    #[error("invalid instance id {0:?}: use 1-{MAX_INSTANCE_ID} characters from [A-Za-z0-9._:-], not starting with \"static-\"")]
    InvalidInstanceId(String),
    #[error("unknown instance id {0:?}: not registered, or evicted after missing heartbeats")]
    UnknownInstance(String),
    #[error("instance {0:?} is a static entry from configuration and cannot be deregistered")]
    StaticInstance(String),
    #[error("service {service:?} already has {limit} instances, the most allowed")]
    ServiceFull { service: String, limit: usize },
    #[error("the registry already holds {limit} instances, the most allowed")]
    RegistryFull { limit: usize },
    #[error("unknown setting {0:?}")]
    UnknownSetting(String),
    #[error(transparent)]
    Denied(#[from] crate::ownership::Denied),
}

pub(crate) fn validate_service(service: &str) -> Result<(), RegistryError> {
    let ok = !service.is_empty()
        && service.len() <= MAX_SERVICE_NAME
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidService(truncate(service)))
    }
}

/// An id an instance chose: short, printable, and never one of the static entries' ids.
pub(crate) fn validate_instance_id(id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_INSTANCE_ID
        && !id.starts_with("static-")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidInstanceId(truncate(id)))
    }
}

/// Accepts `host:port` and `[ipv6]:port`, where host is a name or an IP address.
pub(crate) fn validate_address(address: &str) -> Result<(), RegistryError> {
    let invalid = || RegistryError::InvalidAddress(truncate(address));
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let unspecified = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => inner
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_unspecified()),
        None => host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_unspecified()),
    };
    if unspecified {
        return Err(RegistryError::UnspecifiedAddress(truncate(address)));
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= MAX_HOST
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(invalid())
    }
}

pub(crate) fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(RegistryError::InvalidMetadata(format!(
            "{} entries, at most {MAX_METADATA_ENTRIES} allowed",
            metadata.len()
        )));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(RegistryError::InvalidMetadata(format!(
                "key {:?} must be 1-{MAX_METADATA_KEY} bytes",
                truncate(key)
            )));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(RegistryError::InvalidMetadata(format!(
                "value of {:?} is {} bytes, at most {MAX_METADATA_VALUE} allowed",
                truncate(key),
                value.len()
            )));
        }
    }
    Ok(())
}

/// Keeps error messages short when the input is huge.
fn truncate(text: &str) -> String {
    const SHOWN: usize = 80;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names_addresses_and_metadata() {
        for service in [
            "",
            "has space",
            "slash/y",
            &"x".repeat(MAX_SERVICE_NAME + 1),
        ] {
            assert!(
                matches!(
                    validate_service(service),
                    Err(RegistryError::InvalidService(_))
                ),
                "{service:?}"
            );
        }
        for address in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:65536",
            "host:-1",
            "ho st:80",
            "[zz]:80",
        ] {
            assert!(validate_address(address).is_err(), "{address:?}");
        }
        for address in [
            "127.0.0.1:50051",
            "localhost:1",
            "[::1]:8080",
            "a.b-c_d:65535",
        ] {
            assert_eq!(validate_address(address), Ok(()), "{address:?}");
        }
        let many: BTreeMap<_, _> = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(validate_metadata(&many).is_err());
        let big = BTreeMap::from([("k".to_owned(), "v".repeat(MAX_METADATA_VALUE + 1))]);
        assert!(validate_metadata(&big).is_err());
        let empty_key = BTreeMap::from([(String::new(), "v".to_owned())]);
        assert!(validate_metadata(&empty_key).is_err());
    }
}
