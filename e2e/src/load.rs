//! A small closed-loop load generator: `clients` connections, each sending one POST at a
//! time and counting every answer. Each message has its own Idempotency-Key, and a 503 is
//! retried with the same key after its Retry-After (as a careful client would), so a
//! message the system acknowledged once is never stored twice.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

/// A keep-alive HTTP/1.1 client for one connection; just enough for JSON requests.
pub struct HttpClient {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

/// Status, lower-cased headers, body.
pub type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, stream: None }
    }

    /// Sends one request; reconnects first if the previous connection was closed.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        if self.stream.is_none() {
            let tcp = TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            self.stream = Some(BufReader::new(tcp));
        }
        let result = self.exchange(method, path, headers, body).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let broken = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP response");
        let stream = self.stream.as_mut().ok_or_else(broken)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream.get_mut().write_all(&request).await?;

        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(broken)?;
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                let value = value.trim().to_owned();
                if name == "content-length" {
                    length = value.parse().map_err(|_| broken())?;
                }
                headers.push((name, value));
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        Ok((status, headers, body))
    }
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Every request sent, retries included.
    pub requests: usize,
    /// (id, msg) of every acknowledged message.
    pub acked: Vec<(String, String)>,
    /// 503 answers, each retried with the same key.
    pub retried_503: usize,
    /// Messages never acknowledged, with the reason.
    pub failed: Vec<String>,
}

/// Shared progress of a running load.
#[derive(Default)]
pub struct Progress {
    pub acked: AtomicUsize,
    /// 503 answers so far (each retried).
    pub rejected: AtomicUsize,
}

/// Most retries of one message before it counts as failed.
const MAX_RETRIES: usize = 30;

/// Runs `clients` closed-loop clients until `stop` is cancelled, client `i` against
/// `facades[i % facades.len()]`.
pub async fn post_load(
    facades: Vec<SocketAddr>,
    clients: usize,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> LoadReport {
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let report = Arc::clone(&report);
        let progress = Arc::clone(&progress);
        let stop = stop.clone();
        let facade = facades[client % facades.len()];
        tasks.push(tokio::spawn(async move {
            let mut http = HttpClient::new(facade);
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let msg = format!("client{client}-msg{i}");
                let body = format!(r#"{{"msg":"{msg}"}}"#);
                let headers = [
                    ("content-type", "application/json"),
                    ("idempotency-key", msg.as_str()),
                ];
                let mut outcome = Err(String::from("not sent"));
                for _attempt in 0..=MAX_RETRIES {
                    let answer = http
                        .request("POST", "/messages", &headers, body.as_bytes())
                        .await;
                    report.lock().requests += 1;
                    match answer {
                        Ok((201, _, reply)) => {
                            let id = serde_json::from_slice::<serde_json::Value>(&reply)
                                .ok()
                                .and_then(|v| v["id"].as_str().map(str::to_owned));
                            outcome = id.ok_or_else(|| "201 without an id".to_owned());
                            break;
                        }
                        Ok((503, headers, _)) => {
                            report.lock().retried_503 += 1;
                            progress.rejected.fetch_add(1, Ordering::Relaxed);
                            let wait = headers
                                .iter()
                                .find(|(name, _)| name == "retry-after")
                                .and_then(|(_, value)| value.parse::<u64>().ok())
                                .unwrap_or(1);
                            tokio::time::sleep(Duration::from_secs(wait.min(1))).await;
                            outcome = Err("503 after every retry".to_owned());
                        }
                        Ok((status, _, reply)) => {
                            outcome = Err(format!("{status}: {}", String::from_utf8_lossy(&reply)));
                            break;
                        }
                        Err(error) => {
                            outcome = Err(format!("transport: {error}"));
                            break;
                        }
                    }
                }
                match outcome {
                    Ok(id) => {
                        report.lock().acked.push((id, msg));
                        progress.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(reason) => report.lock().failed.push(format!("{msg}: {reason}")),
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut report = report.lock();
    std::mem::take(&mut *report)
}

/// What reading the log back found, against what a load saw acknowledged.
#[derive(Debug, PartialEq, Eq)]
pub struct Audit {
    /// Acknowledged (id, msg) pairs not stored.
    pub lost: usize,
    /// Texts or ids stored more than once.
    pub duplicated: usize,
}

pub fn audit(acked: &[(String, String)], stored: &[(String, String)]) -> Audit {
    use std::collections::{HashMap, HashSet};
    let kept: HashSet<(&str, &str)> = stored
        .iter()
        .map(|(i, m)| (i.as_str(), m.as_str()))
        .collect();
    let lost = acked
        .iter()
        .filter(|(id, msg)| !kept.contains(&(id.as_str(), msg.as_str())))
        .count();
    let mut texts: HashMap<&str, usize> = HashMap::new();
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for (id, msg) in stored {
        *texts.entry(msg.as_str()).or_default() += 1;
        *ids.entry(id.as_str()).or_default() += 1;
    }
    let duplicated = texts
        .values()
        .chain(ids.values())
        .filter(|&&n| n > 1)
        .count();
    Audit { lost, duplicated }
}
