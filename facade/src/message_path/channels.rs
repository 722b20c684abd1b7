//! The facade's channels to instances: one per address, made on first use and reused
//! (channels are cheap handles over one HTTP/2 connection that reconnects by itself).
//! Addresses that left every list are forgotten, so the pool does not grow with churn.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tonic::{transport::Channel, Status};

use crate::discovery::Discovery;

pub(super) struct Channels {
    transport: rpc::Transport,
    channels: DashMap<String, Channel>,
    /// The discovery change count the pool was last pruned at.
    pruned_at: AtomicU64,
}

impl Channels {
    pub(super) fn new(transport: rpc::Transport) -> Self {
        Self {
            transport,
            channels: DashMap::new(),
            pruned_at: AtomicU64::new(0),
        }
    }

    /// The channel to `address`, made now if there is none.
    pub(super) fn get(&self, address: &str, discovery: &Discovery) -> Result<Channel, Status> {
        self.forget_unlisted(discovery);
        if let Some(channel) = self.channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = self
            .transport
            .channel(address)
            .map_err(|e| Status::unavailable(format!("bad instance address {address}: {e}")))?;
        let channel = self
            .channels
            .entry(address.to_owned())
            .or_insert(channel)
            .clone();
        metrics::gauge!("facade_channels").set(self.channels.len() as f64);
        Ok(channel)
    }

    /// After any list changed, drops the channels of addresses no list holds any more
    /// (calls still using one keep their own clone). Costs one atomic load otherwise.
    fn forget_unlisted(&self, discovery: &Discovery) {
        let changes = discovery.changes();
        if self.pruned_at.swap(changes, Ordering::AcqRel) == changes {
            return;
        }
        let listed = discovery.listed();
        self.channels.retain(|address, _| listed.contains(address));
        metrics::gauge!("facade_channels").set(self.channels.len() as f64);
    }
}
