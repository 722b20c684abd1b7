//! Bearer-token authentication for the registry.
//!
//! With `--token-file`, Register, Heartbeat and Deregister need the metadata
//! `authorization: Bearer <token>`; Lookup, ListServices, GetSetting and Watch stay open
//! unless `--token-required-for-reads`. A refusal is `UNAUTHENTICATED`, logged with the
//! peer's address. Services read the same token from `--registry-token-file`; by default
//! both sides use `data/registry.token` when it exists, which is where the runner writes a
//! fresh token for every run, so a bare `logging 50051` next to it just works. Reading
//! the file is the client crate's [`registry_client::token`], shared by both sides.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};
use tracing::warn;

/// What a call does, for deciding whether it needs the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

#[derive(Debug, Clone)]
pub struct Auth {
    token: String,
    reads_too: bool,
}

impl Auth {
    pub fn new(token: String, reads_too: bool) -> Self {
        Self { token, reads_too }
    }

    /// Admits the request, or refuses it with `UNAUTHENTICATED`.
    pub(crate) fn check<T>(&self, request: &Request<T>, access: Access) -> Result<(), Status> {
        if access == Access::Read && !self.reads_too {
            return Ok(());
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), self.token.as_bytes()) => Ok(()),
            other => {
                let peer = rpc::peer(request)
                    .map(|peer| peer.addr.to_string())
                    .unwrap_or_else(|| "unknown".to_owned());
                let reason = if other.is_some() {
                    "wrong token"
                } else {
                    "no bearer token"
                };
                warn!(peer, ?access, reason, "refused an unauthenticated call");
                metrics::counter!("registry_unauthenticated_total").increment(1);
                Err(Status::unauthenticated(format!(
                    "{reason}: send the metadata `authorization: Bearer <token>`"
                )))
            }
        }
    }
}

/// Compares in constant time (`subtle`), so timing tells nothing of the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().expect("ascii"));
        }
        request
    }

    #[test]
    fn writes_need_the_token_reads_only_when_asked() {
        let auth = Auth::new("s3cret".into(), false);
        assert!(auth
            .check(&request(Some("Bearer s3cret")), Access::Write)
            .is_ok());
        for header in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let status = auth
                .check(&request(header), Access::Write)
                .expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
        }
        assert!(auth.check(&request(None), Access::Read).is_ok());
        let strict = Auth::new("s3cret".into(), true);
        assert!(strict.check(&request(None), Access::Read).is_err());
        assert!(strict
            .check(&request(Some("Bearer s3cret")), Access::Read)
            .is_ok());
    }
}
