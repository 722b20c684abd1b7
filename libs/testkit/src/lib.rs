//! Test support for driving the real binaries: free ports, child processes that are
//! killed when a test ends (and show their output when it fails), bounded waits on a
//! condition, readiness on gRPC health, and the real command-line clients (grpcurl,
//! curl), a TCP proxy whose connections a test can reset ([`proxy`]), and hosts in
//! network namespaces whose links a test can cut ([`hosts`]). With the `nats` feature,
//! real `nats-server` nodes too ([`nats`]).
//!
//! It is lean on purpose: any crate's tests can use it without compiling the runner, the
//! registry server or NATS. The whole system on free ports is the `e2e` crate's.
//!
//! The binaries come from the same target directory as the test; `scripts/test` builds
//! them first (`cargo build --workspace --bins`).

use std::{
    fs::File,
    future::Future,
    io::Read,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

pub mod hosts;
#[cfg(feature = "nats")]
pub mod nats;
pub mod proxy;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testkit lives in libs/ of the workspace")
        .to_path_buf()
}

/// The path of one of the workspace's binaries, built next to this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which scripts/test does)",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1; never the same twice in a process.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `count` consecutive ports that were all free a moment ago on 127.0.0.1
/// (the runner numbers its logging instances' and NATS nodes' ports from one).
///
/// They come from below the kernel's ephemeral range, not from binding port 0: the
/// kernel takes source ports for outgoing connections from that range, so a port picked
/// there could be taken by any connection before the server it was picked for binds it.
/// That happened: a NATS node's route port became the source port of another node's
/// route, the node died at start ("address already in use"), and the R3 stream could not
/// be placed, so a test waited for logging in vain.
pub fn free_ports(count: u16) -> u16 {
    static NEXT: parking_lot::Mutex<Option<u16>> = parking_lot::Mutex::new(None);
    const LOW: u16 = 10_000;
    let high = ephemeral_start();
    let span = high.saturating_sub(LOW);
    assert!(
        span >= 1_000,
        "the ephemeral port range starts at {high}: too low to pick test ports below it"
    );
    let mut next = NEXT.lock();
    // Test processes run one after another; each starts elsewhere in the range.
    let mut port = next.unwrap_or(LOW + (std::process::id() % u32::from(span)) as u16);
    for _ in 0..span {
        if port.saturating_add(count) > high {
            port = LOW;
        }
        let first = port;
        port += count;
        let all_free = (first..first + count).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            *next = Some(port);
            return first;
        }
    }
    panic!("no {count} consecutive free ports between {LOW} and {high}");
}

/// Where the kernel's ephemeral port range starts: 32768 unless the machine says
/// otherwise.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A running child process. Killed when dropped; its output is printed if the test
/// is failing at that moment.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    cwd: PathBuf,
    /// Sent first when the process is dropped still running (see
    /// [`Proc::stopped_on_drop_with`]); SIGKILL otherwise.
    drop_signal: Option<Signal>,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[&str]) -> Self {
        Self::spawn_in(None, name, program, args)
    }

    /// [`spawn`](Self::spawn) in the working directory `cwd` (another process's
    /// [`cwd`](Self::cwd), to find the files it wrote), or in an empty one of its own.
    pub fn spawn_in(cwd: Option<&Path>, name: &str, program: &Path, args: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "e2e-{}-{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            name,
        ));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        // An empty working directory of its own: files a service looks for by default
        // (config-server.toml, data/registry.token) never leak between tests.
        let cwd = cwd.map_or_else(|| log.with_extension("cwd"), Path::to_path_buf);
        std::fs::create_dir_all(&cwd).expect("working directory");
        let mut command = Command::new(program);
        // The services' own default log filter, as a user sees it, unless E2E_RUST_LOG
        // asks for another (a RUST_LOG of the test's own never leaks in).
        match std::env::var("E2E_RUST_LOG") {
            Ok(filter) => command.env("RUST_LOG", filter),
            Err(_) => command.env_remove("RUST_LOG"),
        };
        let child = command
            .args(args)
            .current_dir(&cwd)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            name: name.to_owned(),
            child,
            log,
            cwd,
            drop_signal: None,
        }
    }

    /// The process's working directory.
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// When dropped still running (a failed test), first send `signal` and wait up to
    /// 15 s for it to exit, before SIGKILL. For a process with children of its own, like
    /// the runner: SIGKILL would leave them running, since they live in process groups
    /// of their own.
    pub fn stopped_on_drop_with(mut self, signal: Signal) -> Self {
        self.drop_signal = Some(signal);
        self
    }

    /// Starts one of the workspace's binaries.
    pub fn start(name: &str, binary: &str, args: &[&str]) -> Self {
        Self::spawn(name, &bin(binary), args)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"))
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send signal");
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}; output:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// SIGKILL: a crash, with no chance to deregister.
    pub async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10)).await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // A stopped process must be continued to die promptly on some kernels.
            let _ = nix::sys::signal::kill(self.pid(), Signal::SIGCONT);
            if let Some(signal) = self.drop_signal {
                let _ = nix::sys::signal::kill(self.pid(), signal);
                let started = Instant::now();
                while self.child.try_wait().ok().flatten().is_none()
                    && started.elapsed() < Duration::from_secs(15)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.output());
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(self.log.with_extension("cwd"));
    }
}

/// Polls `check` every 20 ms until it holds; panics after `limit`. Returns the time taken.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `addr` reports SERVING (20 s bound: a cold start on a busy 2-core box).
pub async fn wait_serving(addr: SocketAddr) {
    let address = addr.to_string();
    eventually(Duration::from_secs(20), &format!("{addr} SERVING"), || {
        rpc::is_serving(&address, "")
    })
    .await;
}

/// The grpcurl command: `$GRPCURL`, else the one scripts/setup installs, else PATH.
pub fn grpcurl_path() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let local = repo_root().join(".tools/bin/grpcurl");
    if local.exists() {
        local
    } else {
        PathBuf::from("grpcurl")
    }
}

/// Waits until `addr` reports SERVING over `transport` (TLS, for a server that speaks
/// only TLS).
pub async fn wait_serving_over(transport: &rpc::Transport, addr: SocketAddr) {
    let address = addr.to_string();
    eventually(Duration::from_secs(20), &format!("{addr} SERVING"), || {
        rpc::is_serving_over(transport, &address, "")
    })
    .await;
}

/// Runs grpcurl in plaintext against `addr`, optionally with a JSON body.
pub fn grpcurl(addr: SocketAddr, method: &str, body: Option<&str>) -> Output {
    grpcurl_with(&["-plaintext"], addr, method, body)
}

/// Runs grpcurl with `flags` (`-plaintext`, or `-cacert`, `-cert`, `-key`, `-H` ...)
/// against `addr`, optionally with a JSON body.
pub fn grpcurl_with(flags: &[&str], addr: SocketAddr, method: &str, body: Option<&str>) -> Output {
    let mut command = Command::new(grpcurl_path());
    command.args(flags).args(["-max-time", "10"]);
    if let Some(body) = body {
        command.args(["-d", body]);
    }
    command.arg(addr.to_string());
    if !method.is_empty() {
        command.arg(method);
    }
    command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run grpcurl ({}): {e}; run scripts/setup",
            grpcurl_path().display()
        )
    })
}

/// grpcurl that must succeed; returns its JSON output parsed.
pub fn grpcurl_json(addr: SocketAddr, method: &str, body: Option<&str>) -> serde_json::Value {
    let output = grpcurl(addr, method, body);
    assert!(
        output.status.success(),
        "grpcurl {method} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "grpcurl {method} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A metric without labels from the Prometheus page of the service at `addr`, read
/// with curl; `None` when the page does not have it (yet).
pub fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, _, body) = curl("GET", &format!("http://{addr}/metrics"), &[]);
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
}

/// Runs curl and returns (HTTP status, headers, body). `args` go before the URL.
pub fn curl(method: &str, url: &str, args: &[&str]) -> (u16, String, String) {
    let output = Command::new("curl")
        .args(["-s", "-S", "-i", "--max-time", "20", "-X", method])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {method} {url} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    // A large body makes curl send `Expect: 100-continue`; skip the interim answer.
    while text.starts_with("HTTP/1.1 100") {
        text = text
            .split_once("\r\n\r\n")
            .map_or_else(String::new, |(_, rest)| rest.to_owned());
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in: {head}"));
    (status, head.to_owned(), body.to_owned())
}

/// The HTTP status curl gets from `url` with `args` (`-X POST`, `-d ...`), as curl
/// prints it: `000` when no HTTP answer came (a refused or non-HTTP connection).
pub fn http_code(url: &str, args: &[&str]) -> String {
    let output = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// POSTs `{"msg": msg}` with curl; returns (status, parsed JSON body).
pub fn curl_post(facade: SocketAddr, msg: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "msg": msg }).to_string();
    let (status, _, reply) = curl(
        "POST",
        &format!("http://{facade}/messages"),
        &["-H", "content-type: application/json", "-d", &body],
    );
    (
        status,
        serde_json::from_str(&reply).unwrap_or(serde_json::Value::Null),
    )
}

/// POSTs `{"msg": msg}` with an `Idempotency-Key`; returns (status, headers, body).
pub fn curl_post_keyed(facade: SocketAddr, msg: &str, key: &str) -> (u16, String, String) {
    let body = serde_json::json!({ "msg": msg }).to_string();
    curl(
        "POST",
        &format!("http://{facade}/messages"),
        &[
            "-H",
            "content-type: application/json",
            "-H",
            &format!("Idempotency-Key: {key}"),
            "-d",
            &body,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_never_given_twice() {
        let ephemeral = ephemeral_start();
        let mut given = std::collections::HashSet::new();
        for _ in 0..200 {
            let port = free_port();
            assert!(port < ephemeral, "{port} is in the ephemeral range");
            assert!(given.insert(port), "{port} given twice");
        }
        let first = free_ports(3);
        for port in first..first + 3 {
            assert!(port < ephemeral && given.insert(port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("free");
        }
    }
}
