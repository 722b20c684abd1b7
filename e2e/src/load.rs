//! A small closed-loop load generator: `clients` connections, each sending one POST at a
//! time and counting every answer. Each message has its own Idempotency-Key, and a 503 is
//! retried with the same key after its Retry-After (at most 1 s), as a careful client
//! would, so a message the system acknowledged once is never stored twice.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{
    body::Bytes,
    client::conn::http1::{self, SendRequest},
    header::HOST,
    Request,
};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio_rustls::{rustls, TlsConnector};
use tokio_util::sync::CancellationToken;

/// Where requests go: an address, over TLS (checked against a CA) or not.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    tls: Option<TlsConnector>,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, tls: None }
    }
}

impl Target {
    /// HTTPS to `addr`, whose certificate the CA in `ca` (PEM) signed.
    pub fn https(addr: SocketAddr, ca: &Path) -> io::Result<Self> {
        let roots = rpc::tls::roots(&std::fs::read(ca)?, ca).map_err(io::Error::other)?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr,
            tls: Some(TlsConnector::from(Arc::new(config))),
        })
    }
}

/// An HTTP/1.1 client (hyper's) on one keep-alive connection, opened again after an error.
pub struct HttpClient {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// Status, lower-cased headers, body (read whole, chunked or not).
pub type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

impl HttpClient {
    pub fn new(target: impl Into<Target>) -> Self {
        Self {
            target: target.into(),
            sender: None,
        }
    }

    /// Sends one request; connects first if there is no open connection.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.target.addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(io::Error::other)?;
        let result = self.exchange(request).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> io::Result<HttpResponse> {
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.sender.insert(connect(&self.target).await?),
        };
        sender.ready().await.map_err(io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok((status, headers, body.to_vec()))
    }
}

/// Opens a connection to `target` and drives it on a task of its own.
async fn connect(target: &Target) -> io::Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let Some(tls) = &target.tls else {
        return handshake(tcp).await;
    };
    let name = rustls::pki_types::ServerName::IpAddress(target.addr.ip().into());
    handshake(tls.connect(name, tcp).await?).await
}

async fn handshake<Io>(io: Io) -> io::Result<SendRequest<Full<Bytes>>>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection); // ends when the sender is dropped or the peer closes
    Ok(sender)
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
pub async fn post_load<T: Into<Target>>(
    facades: Vec<T>,
    clients: usize,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> LoadReport {
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let facades: Vec<Target> = facades.into_iter().map(Into::into).collect();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let report = Arc::clone(&report);
        let progress = Arc::clone(&progress);
        let stop = stop.clone();
        let facade = facades[client % facades.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut http = HttpClient::new(facade);
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let msg = format!("client{client}-msg{i}");
                let body = serde_json::json!({ "msg": msg }).to_string();
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

#[cfg(test)]
mod tests {
    use axum::{body::Body, routing::get, Router};
    use tokio::net::TcpListener;

    use super::*;

    /// A chunked body is read whole, request after request.
    #[tokio::test]
    async fn reads_chunked_bodies_whole_request_after_request() {
        let chunks = || {
            let parts = ["ab", "cd", "ef"].map(|part| Ok::<_, io::Error>(Bytes::from(part)));
            Body::from_stream(futures_util::stream::iter(parts))
        };
        let app = Router::new().route("/chunks", get(move || async move { chunks() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut client = HttpClient::new(addr);
        for _ in 0..2 {
            let (status, headers, body) = client
                .request("GET", "/chunks", &[], &[])
                .await
                .expect("answer");
            assert_eq!(status, 200);
            assert!(
                headers.contains(&("transfer-encoding".to_owned(), "chunked".to_owned())),
                "{headers:?}"
            );
            assert_eq!(body, b"abcdef");
        }
        let (status, _, _) = client
            .request("GET", "/nowhere", &[], &[])
            .await
            .expect("404");
        assert_eq!(status, 404);
    }
}
