//! Limits on what a client can make a server hold, and how refusals are reported.
//!
//! Every limit has a flag and a default. At the limit the server refuses (closes the
//! connection, answers `RESOURCE_EXHAUSTED`, or `503` over HTTP), counts the refusal in a
//! metric named for the limit, and logs it once per peer address per
//! [`REPORT_EVERY`], with how many were refused since: a flood of refusals is one line a
//! minute per peer, not one per request.
//!
//! - [`ServeLimits`] (flags: [`LimitArgs`]): connections per peer address and in all,
//!   how long a connection may take to send a request's headers, how long it may stay
//!   open with no request in flight, and the largest gRPC request message.
//! - [`Gate`]: anything held open (a connection, a Watch, a Session, a full read, a
//!   POST in progress), counted per peer address, in all, or both.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{Arc, LazyLock},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::warn;

/// How often a refusal is logged for one peer and one limit, at most.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Peers remembered per limit for [`REPORT_EVERY`]; past it, those not logged in the last
/// minute are forgotten, and all of them if every one was (so a refusal may be logged
/// sooner than once a minute, never missed, and the memory stays bounded).
const PEERS_REMEMBERED: usize = 4096;

/// The limits [`crate::serve`] applies to every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// Most open connections (TLS handshakes included) from one peer address.
    pub connections_per_peer: usize,
    /// Most open connections in all.
    pub connections: usize,
    /// How long a new connection may take to send its first request's headers, and an
    /// HTTP/1 connection each next request's headers (its keep-alive wait included).
    pub header_timeout: Duration,
    /// How long a connection may stay open with no request in flight (a gRPC stream
    /// counts as in flight for as long as it is open).
    pub idle_timeout: Duration,
    /// Largest gRPC request message the service accepts; set by the service to its
    /// largest valid request unless a flag says otherwise.
    pub max_request_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            connections_per_peer: 512,
            connections: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_request_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The flags of [`ServeLimits`], the same in every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Most open connections from one peer address; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = ServeLimits::default().connections_per_peer)]
    pub max_connections_per_peer: usize,

    /// Most open connections in all; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = ServeLimits::default().connections)]
    pub max_connections: usize,

    /// How long a connection may take to send a request's headers (its first request,
    /// and each HTTP/1 request after it); then it is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// How long a connection may stay open with no request in flight.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Largest gRPC request message accepted, in bytes [default: the service's largest
    /// valid request].
    #[arg(long, value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
}

impl LimitArgs {
    /// The limits, with `max_request_bytes` the service's own unless the flag is given.
    pub fn limits(&self, max_request_bytes: usize) -> ServeLimits {
        ServeLimits {
            connections_per_peer: self.max_connections_per_peer.max(1),
            connections: self.max_connections.max(1),
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            max_request_bytes: self.max_request_bytes.unwrap_or(max_request_bytes),
        }
    }
}

/// Counts refusals of one limit and logs them once per peer per [`REPORT_EVERY`].
pub struct Refusals {
    /// The limit, as logs name it.
    limit: &'static str,
    /// The counter, named for the limit.
    metric: &'static str,
    /// Per peer: when its refusals were last logged, and how many since.
    reported: Mutex<HashMap<Option<IpAddr>, (Instant, u64)>>,
}

impl Refusals {
    pub fn new(limit: &'static str, metric: &'static str) -> Self {
        Self {
            limit,
            metric,
            reported: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one refusal of `peer` (`None`: not known), and logs `why` if this peer's
    /// refusals were not logged in the last [`REPORT_EVERY`].
    pub fn refuse(&self, peer: Option<IpAddr>, why: &dyn fmt::Display) {
        metrics::counter!(self.metric).increment(1);
        let now = Instant::now();
        let since = {
            let mut reported = self.reported.lock();
            if reported.len() >= PEERS_REMEMBERED && !reported.contains_key(&peer) {
                reported.retain(|_, (at, _)| now.duration_since(*at) < REPORT_EVERY);
                if reported.len() >= PEERS_REMEMBERED {
                    reported.clear();
                }
            }
            let (at, since) = reported.entry(peer).or_insert((now, 0));
            if *since > 0 && now.duration_since(*at) < REPORT_EVERY {
                *since += 1;
                return;
            }
            let before = *since;
            (*at, *since) = (now, 1);
            before
        };
        let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        warn!(
            limit = self.limit,
            peer,
            refused_before_in_the_last_minute = since.saturating_sub(1),
            "refused: {why} (logged once a minute per peer; counted in {})",
            self.metric
        );
    }
}

/// Why a [`Gate`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    PerPeer {
        held: usize,
        limit: usize,
        flag: &'static str,
    },
    Total {
        held: usize,
        limit: usize,
        flag: &'static str,
    },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PerPeer { held, limit, flag } => {
                write!(f, "{held} open from this address, at most {limit} ({flag})")
            }
            Self::Total { held, limit, flag } => {
                write!(f, "{held} open, at most {limit} in all ({flag})")
            }
        }
    }
}

/// Limits on one kind of thing held open: how many per peer address, in all, or both.
pub struct Gate {
    /// What is held, for messages: "connections", "watches".
    what: &'static str,
    /// The limit per peer address and in all, each with the flag that sets it.
    per_peer: Option<(usize, &'static str)>,
    total: Option<(usize, &'static str)>,
    held: Mutex<Held>,
    refusals: Refusals,
}

#[derive(Default)]
struct Held {
    total: usize,
    /// Counted only under a per-peer limit.
    by_peer: HashMap<IpAddr, usize>,
}

impl Gate {
    /// At most `per_peer` from one address and `total` in all (`None`: no such limit),
    /// each given with the flag that sets it; refusals counted in `metric`.
    pub fn new(
        what: &'static str,
        per_peer: Option<(usize, &'static str)>,
        total: Option<(usize, &'static str)>,
        metric: &'static str,
    ) -> Arc<Self> {
        let at_least_one = |(limit, flag): (usize, &'static str)| (limit.max(1), flag);
        Arc::new(Self {
            what,
            per_peer: per_peer.map(at_least_one),
            total: total.map(at_least_one),
            held: Mutex::new(Held::default()),
            refusals: Refusals::new(what, metric),
        })
    }

    /// Holds one for `peer` (`None`: not known, counted in all only) until the pass is
    /// dropped; refused (counted and logged) at a limit.
    pub fn enter(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Pass, Refused> {
        // Only a gate with a per-peer limit counts by peer.
        let counted = peer.filter(|_| self.per_peer.is_some());
        let entered = {
            let mut held = self.held.lock();
            let from_peer = counted.map_or(0, |ip| held.by_peer.get(&ip).copied().unwrap_or(0));
            match (self.total, self.per_peer) {
                (Some((limit, flag)), _) if held.total >= limit => Err(Refused::Total {
                    held: held.total,
                    limit,
                    flag,
                }),
                (_, Some((limit, flag))) if counted.is_some() && from_peer >= limit => {
                    Err(Refused::PerPeer {
                        held: from_peer,
                        limit,
                        flag,
                    })
                }
                _ => {
                    held.total += 1;
                    if let Some(ip) = counted {
                        *held.by_peer.entry(ip).or_default() += 1;
                    }
                    Ok(())
                }
            }
        };
        match entered {
            Ok(()) => Ok(Pass {
                gate: Arc::clone(self),
                peer: counted,
            }),
            Err(refused) => {
                self.refusals
                    .refuse(peer, &format_args!("{}: {refused}", self.what));
                Err(refused)
            }
        }
    }

    /// How many are held now, in all.
    pub fn held(&self) -> usize {
        self.held.lock().total
    }
}

/// One thing held through a [`Gate`]; dropping it lets the next one in.
pub struct Pass {
    gate: Arc<Gate>,
    /// The peer it is counted for (none when the gate has no per-peer limit).
    peer: Option<IpAddr>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock();
        held.total -= 1;
        if let Some(ip) = self.peer {
            if let Some(count) = held.by_peer.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    held.by_peer.remove(&ip);
                }
            }
        }
    }
}

impl fmt::Debug for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pass({}, {:?})", self.gate.what, self.peer)
    }
}

/// gRPC requests over [`ServeLimits::max_request_bytes`], refused by tonic and counted
/// here.
pub(crate) static REQUEST_BYTES: LazyLock<Refusals> =
    LazyLock::new(|| Refusals::new("max-request-bytes", "rpc_request_bytes_refused_total"));
/// Connections closed for sending no request headers within
/// [`ServeLimits::header_timeout`].
pub(crate) static HEADER_TIMEOUTS: LazyLock<Refusals> =
    LazyLock::new(|| Refusals::new("header-timeout", "rpc_header_timeouts_total"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_holds_up_to_its_limits_and_lets_the_next_in_when_one_goes() {
        let gate = Gate::new(
            "watches",
            Some((2, "--max-watches-per-peer")),
            Some((3, "--max-watches")),
            "test_refused_total",
        );
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = gate.enter(Some(a)).expect("first");
        let _second = gate.enter(Some(a)).expect("second");
        assert!(matches!(
            gate.enter(Some(a)),
            Err(Refused::PerPeer {
                held: 2,
                limit: 2,
                ..
            })
        ));
        let _third = gate.enter(Some(b)).expect("another peer");
        assert!(matches!(
            gate.enter(Some(b)),
            Err(Refused::Total {
                held: 3,
                limit: 3,
                ..
            })
        ));
        assert_eq!(gate.held(), 3);
        drop(first);
        assert_eq!(gate.held(), 2);
        let _again = gate.enter(Some(a)).expect("room again");
        let refused = gate.enter(None).expect_err("full").to_string();
        assert!(refused.contains("--max-watches"), "{refused}");
    }

    #[test]
    fn a_gate_with_one_limit_applies_only_that_one() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let in_all = Gate::new("full reads", None, Some((2, "--max-full-reads")), "t_total");
        let _held = [
            in_all.enter(Some(ip)).expect("1"),
            in_all.enter(None).expect("2"),
        ];
        assert!(matches!(in_all.enter(Some(ip)), Err(Refused::Total { .. })));
        let per_peer = Gate::new("posts", Some((1, "--max-posts-per-peer")), None, "t_peer");
        let _first = per_peer.enter(Some(ip)).expect("first");
        assert!(matches!(
            per_peer.enter(Some(ip)),
            Err(Refused::PerPeer { .. })
        ));
        let others: Vec<Pass> = (0..100)
            .map(|i| {
                per_peer
                    .enter(Some(IpAddr::from([10, 1, 0, i])))
                    .expect("others")
            })
            .collect();
        assert_eq!(per_peer.held(), 101, "no limit in all");
        drop(others);
    }

    #[test]
    fn refusals_are_logged_once_per_peer_per_interval() {
        let refusals = Refusals::new("test", "test_refused_total");
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            refusals.refuse(Some(peer), &"full");
        }
        let reported = refusals.reported.lock();
        let (_, since) = reported.get(&Some(peer)).expect("remembered");
        assert_eq!(*since, 100, "one line, then counted");
    }
}
