//! Finding live instances: a registry lookup per call (the specified behaviour), with
//! the last list seen kept as a fallback for when the registry cannot be reached.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use config_server::client::RegistryClient;
use tracing::{info, warn};

pub struct Discovery {
    registry: RegistryClient,
    last_known: Mutex<HashMap<String, Vec<String>>>,
    registry_down: AtomicBool,
}

impl Discovery {
    pub fn new(registry: RegistryClient) -> Self {
        Self {
            registry,
            last_known: Mutex::new(HashMap::new()),
            registry_down: AtomicBool::new(false),
        }
    }

    fn last_known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.last_known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Addresses of the live instances of `service`; when the registry is unreachable,
    /// the last list it gave (said once in the log per outage).
    pub async fn instances(&self, service: &str) -> Vec<String> {
        match self.registry.lookup(service).await {
            Ok(reply) => {
                let addresses: Vec<String> =
                    reply.instances.into_iter().map(|i| i.address).collect();
                if self.registry_down.swap(false, Ordering::Relaxed) {
                    info!("registry reachable again; using fresh lookups");
                }
                let mut last = self.last_known();
                if last.get(service) != Some(&addresses) {
                    last.insert(service.to_owned(), addresses.clone());
                }
                addresses
            }
            Err(status) => {
                let fallback = self.last_known().get(service).cloned().unwrap_or_default();
                if !self.registry_down.swap(true, Ordering::Relaxed) {
                    warn!(error = status.message(), service, known = ?fallback,
                          "registry unreachable; using the last known instances");
                }
                fallback
            }
        }
    }
}
