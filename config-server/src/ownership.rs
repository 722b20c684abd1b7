//! Who may change a registration: every rule in one place.
//!
//! Each write names its [`Caller`]: the identity of the client certificate it presented
//! (`SERVICE@HOST`, as `runner certs` writes them), else the bearer token when the
//! registry checks one, else nobody in particular (a registry on loopback with neither).
//!
//! 1. **A certificate names the one service it may register.** `logging@a` registers
//!    `logging`, and nothing else.
//! 2. **Only a replica registers `config-server`**, with a certificate made for
//!    `config-server`. Clients open a session, token included, with every instance of
//!    that service, so anyone else listing himself there would collect them.
//! 3. **Whoever registered an id owns it.** Only the same caller may register it again,
//!    heartbeat it, hold a session on it or deregister it, and a registration at an
//!    address another caller's instance holds does not replace that instance.
//!
//! Everything else is [`Denied`], which the gRPC layer answers `PERMISSION_DENIED`, logs
//! and counts. Without certificates every token holder is one caller, so rule 3 keeps
//! apart only callers the registry can tell apart.

use std::fmt;

use rpc::Identity;

use crate::auth::Auth;

/// The service only replicas may register.
pub(crate) const REGISTRY_SERVICE: &str = registry_client::REGISTRY_SERVICE;

/// Who makes a registry call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Caller {
    /// The subject of a client certificate the CA signed.
    Certificate(Identity),
    /// Whoever holds the shared bearer token.
    Token,
    /// A registry with neither certificates nor a token: everyone is this one caller.
    Anyone,
}

impl Caller {
    /// The caller of `request`, whose token (if any is required) was already checked.
    pub(crate) fn of<T>(request: &tonic::Request<T>, auth: Option<&Auth>) -> Self {
        match rpc::peer(request).and_then(|peer| peer.identity.clone()) {
            Some(identity) => Self::Certificate(identity),
            None if auth.is_some() => Self::Token,
            None => Self::Anyone,
        }
    }

    /// Rules 1 and 2: whether this caller may register instances of `service`.
    pub(crate) fn may_register(&self, service: &str) -> Result<(), Denied> {
        let allowed = match self {
            Self::Certificate(identity) => identity.service() == service,
            Self::Token | Self::Anyone => service != REGISTRY_SERVICE,
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied::Service {
                caller: self.clone(),
                service: service.to_owned(),
            })
        }
    }

    /// Rule 3: whether this caller may change the instance `id`, which `owner` registered.
    pub(crate) fn may_change(&self, id: &str, owner: &Caller) -> Result<(), Denied> {
        if self == owner {
            Ok(())
        } else {
            Err(Denied::NotOwner {
                caller: self.clone(),
                id: id.to_owned(),
            })
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Certificate(identity) => write!(f, "certificate {identity}"),
            Self::Token => f.write_str("the token's holder"),
            Self::Anyone => f.write_str("an unauthenticated caller"),
        }
    }
}

/// A call its caller may not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    #[error("{caller} may not register the service {service:?}{}", allowed(caller))]
    Service { caller: Caller, service: String },
    #[error("instance {id:?} was registered by someone else; {caller} may not change it")]
    NotOwner { caller: Caller, id: String },
}

fn allowed(caller: &Caller) -> String {
    match caller {
        Caller::Certificate(identity) => format!(" (only {:?})", identity.service()),
        Caller::Token | Caller::Anyone => {
            format!(" ({REGISTRY_SERVICE:?} is registered by its replicas' certificates)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str) -> Caller {
        Caller::Certificate(Identity::new(name))
    }

    #[test]
    fn a_certificate_registers_its_own_service_only() {
        assert!(cert("logging@a").may_register("logging").is_ok());
        for service in ["messages", "config-server", "logging2"] {
            let denied = cert("logging@a").may_register(service).expect_err("denied");
            assert!(denied.to_string().contains("only \"logging\""), "{denied}");
        }
        assert!(cert("config-server@b")
            .may_register("config-server")
            .is_ok());
    }

    #[test]
    fn without_a_certificate_nobody_registers_the_registry() {
        for caller in [Caller::Token, Caller::Anyone] {
            assert!(caller.may_register("logging").is_ok());
            assert!(caller.may_register("config-server").is_err());
        }
    }

    #[test]
    fn only_the_owner_changes_an_instance() {
        let owner = cert("logging@a");
        assert!(owner.may_change("x", &owner).is_ok());
        for other in [cert("logging@b"), Caller::Token, Caller::Anyone] {
            assert!(other.may_change("x", &owner).is_err(), "{other}");
        }
        assert!(Caller::Token.may_change("x", &Caller::Token).is_ok());
    }
}
