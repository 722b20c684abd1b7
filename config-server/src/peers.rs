//! The other replicas of this registry, as its status page sees them.
//!
//! Replicas share no state (every instance registers with each; see ARCHITECTURE.md),
//! so a replica needs to know its peers only to list them (as the static entries of the
//! service `config-server`, from `--replica`) and to show whether each answers: a health
//! check every second, with a short deadline.

use std::{sync::Arc, time::Duration};

use parking_lot::RwLock;

use tokio_util::sync::CancellationToken;

/// How often each peer is asked whether it serves.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The gRPC health service name of the registry.
const REGISTRY_HEALTH: &str = "registry.v1.Registry";

/// One replica as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Peer {
    pub(crate) address: String,
    /// This replica (the one serving the page).
    pub(crate) this: bool,
    /// Whether it answered its last health check; `None` before the first one.
    pub(crate) answers: Option<bool>,
}

#[derive(Clone, Default)]
pub(crate) struct Peers {
    peers: Arc<RwLock<Vec<Peer>>>,
}

impl Peers {
    /// The replicas in `addresses`, `this` among them (or not: a replica bound to an
    /// address nobody listed still probes the others).
    pub(crate) fn new(addresses: &[String], this: &str) -> Self {
        let peers = addresses
            .iter()
            .map(|address| Peer {
                address: address.clone(),
                this: address == this,
                answers: (address == this).then_some(true),
            })
            .collect();
        Self {
            peers: Arc::new(RwLock::new(peers)),
        }
    }

    pub(crate) fn list(&self) -> Vec<Peer> {
        self.peers.read().clone()
    }

    /// Health-checks every other replica over `transport` each second until `shutdown`.
    pub(crate) async fn probe(self, transport: rpc::Transport, shutdown: CancellationToken) {
        let others: Vec<String> = self
            .list()
            .into_iter()
            .filter(|peer| !peer.this)
            .map(|peer| peer.address)
            .collect();
        if others.is_empty() {
            return;
        }
        // The first check a second after start: replicas started together are up by then.
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let checks = others
                .iter()
                .map(|address| rpc::is_serving_over(&transport, address, REGISTRY_HEALTH));
            let answers = futures_util::future::join_all(checks).await;
            let mut peers = self.peers.write();
            for (address, answers) in others.iter().zip(answers) {
                if let Some(peer) = peers.iter_mut().find(|p| &p.address == address) {
                    // Said on a change, and when the first check finds it down.
                    if peer.answers != Some(answers) && (peer.answers.is_some() || !answers) {
                        if answers {
                            tracing::info!(replica = address, "registry replica answers");
                        } else {
                            tracing::warn!(replica = address, "registry replica does not answer");
                        }
                    }
                    peer.answers = Some(answers);
                }
            }
        }
    }
}
