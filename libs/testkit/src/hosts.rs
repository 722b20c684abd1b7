//! Hosts for partition tests: Linux network namespaces on this machine, each with an
//! address of its own, joined by one veth pair per pair of hosts (a full mesh, so any
//! pair can be cut without touching the others). No host has a default route or a link
//! to a real interface: traffic between them never leaves the machine.
//!
//! Host `i` (from 0) has the address `10.201.0.(i + 1)`. It is set on each of its veth
//! ends, each with a route to the one peer at the other end. Cutting a pair points each
//! side's route to the other at `sink`, a veth end of its own whose peer is down: packets
//! between the two vanish without an error, as in a real partition (connects and calls
//! time out; nothing is refused), until the pair is healed, while every other pair
//! carries on. (This kernel has no netem, tc actions or dummy devices; the link itself
//! stays up, so nothing else changes.)
//!
//! Making namespaces needs root (CAP_NET_ADMIN); [`Hosts::new`] says why when it cannot.
//! Everything is deleted when the value is dropped, also while a failing test unwinds,
//! and namespaces left by a test process that died are deleted by the next one.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use crate::Proc;

/// The prefix of every namespace made here; the rest is the test process's pid and the
/// host's name.
const PREFIX: &str = "mst";

pub struct Hosts {
    names: Vec<String>,
    /// The namespace of each host.
    namespaces: Vec<String>,
}

/// Runs `ip` with `args`; the error says what failed and why.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The veth end on host `from` that leads to host `to` (names stay under 16 bytes).
fn end(pid: u32, from: usize, to: usize) -> String {
    format!("v{}-{from}-{to}", pid % 100_000)
}

impl Hosts {
    /// Hosts named `names` (short: `a`, `b`, ...), or why they cannot be made here.
    pub fn new(names: &[&str]) -> Result<Self, String> {
        remove_stale();
        let pid = std::process::id();
        let mut hosts = Self {
            names: names.iter().map(|name| (*name).to_owned()).collect(),
            namespaces: Vec::new(),
        };
        for name in names {
            let namespace = format!("{PREFIX}{pid}-{name}");
            ip(&["netns", "add", &namespace])?;
            hosts.namespaces.push(namespace.clone());
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &namespace,
                "link",
                "add",
                "sink",
                "type",
                "veth",
                "peer",
                "name",
                "sink-peer",
            ])?;
            ip(&["-n", &namespace, "link", "set", "sink", "up"])?;
        }
        for i in 0..names.len() {
            for j in i + 1..names.len() {
                hosts.link(pid, i, j)?;
            }
        }
        Ok(hosts)
    }

    fn link(&self, pid: u32, i: usize, j: usize) -> Result<(), String> {
        let (here, there) = (end(pid, i, j), end(pid, j, i));
        let (ns_i, ns_j) = (&self.namespaces[i], &self.namespaces[j]);
        ip(&[
            "link", "add", &here, "netns", ns_i, "type", "veth", "peer", "name", &there, "netns",
            ns_j,
        ])?;
        for (ns, dev, me, peer) in [(ns_i, &here, i, j), (ns_j, &there, j, i)] {
            let me = format!("{}/32", self.addr(me));
            ip(&["-n", ns, "addr", "add", &me, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &self.addr(peer).to_string(),
                "dev",
                dev,
            ])?;
        }
        Ok(())
    }

    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|known| known == name)
            .unwrap_or_else(|| panic!("no host named {name:?}"))
    }

    fn addr(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            201,
            0,
            u8::try_from(index + 1).expect("at most 254 hosts"),
        )
    }

    /// The address of host `name`.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.addr(self.index(name))
    }

    /// The namespace of host `name`, for `ip netns exec` and `setns`.
    pub fn namespace(&self, name: &str) -> &str {
        &self.namespaces[self.index(name)]
    }

    /// Routes `a` and `b` to each other through their mesh link, or into the sink.
    fn route_pair(&self, a: &str, b: &str, joined: bool) {
        let (i, j) = (self.index(a), self.index(b));
        let pid = std::process::id();
        for (from, to) in [(i, j), (j, i)] {
            let dev = if joined {
                end(pid, from, to)
            } else {
                "sink".to_owned()
            };
            let peer = self.addr(to).to_string();
            ip(&[
                "-n",
                &self.namespaces[from],
                "route",
                "replace",
                &peer,
                "dev",
                &dev,
            ])
            .expect("route between two hosts");
        }
    }

    /// Cuts `a` from `b`: what either sends the other is lost, silently, until
    /// [`Hosts::heal`].
    pub fn cut(&self, a: &str, b: &str) {
        self.route_pair(a, b, false);
    }

    /// Joins `a` and `b` again.
    pub fn heal(&self, a: &str, b: &str) {
        self.route_pair(a, b, true);
    }

    /// Cuts `name` from every other host.
    pub fn isolate(&self, name: &str) {
        for other in self.others(name) {
            self.cut(name, &other);
        }
    }

    /// Joins `name` to every other host again.
    pub fn rejoin(&self, name: &str) {
        for other in self.others(name) {
            self.heal(name, &other);
        }
    }

    fn others(&self, name: &str) -> Vec<String> {
        self.names
            .iter()
            .filter(|other| *other != name)
            .cloned()
            .collect()
    }

    /// Moves the calling thread onto host `name`: the sockets it opens from now on, and
    /// the processes it starts, are on that host. (Network namespaces are per thread;
    /// a test that drives the system from one host runs its runtime on this thread.)
    pub fn enter(&self, name: &str) -> Result<(), String> {
        let path = format!("/var/run/netns/{}", self.namespace(name));
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {path}: {e}"))
    }

    /// Starts `program` on host `host` (`ip netns exec`, which execs it, so the process
    /// is the program itself and signals reach it).
    pub fn spawn(&self, host: &str, name: &str, program: &Path, args: &[&str]) -> Proc {
        let program = program.to_string_lossy();
        let mut all = vec!["netns", "exec", self.namespace(host), program.as_ref()];
        all.extend_from_slice(args);
        Proc::spawn(name, Path::new("ip"), &all)
    }

    /// Runs `program` on host `host` to the end; its output, or why it failed.
    pub fn run(&self, host: &str, program: &str, args: &[&str]) -> Result<String, String> {
        let output = Command::new("ip")
            .args(["netns", "exec", self.namespace(host), program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{program} on {host}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with them their peers.
        for namespace in &self.namespaces {
            let _ = ip(&["netns", "delete", namespace]);
        }
    }
}

/// Deletes the namespaces of test processes that are gone (killed before their drop).
fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(namespace) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = namespace
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", namespace]);
        }
    }
}
