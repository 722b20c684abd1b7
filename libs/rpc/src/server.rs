//! The server side of every service: the [`Listener`] (TCP, or TLS whose handshakes run
//! beside the accept loop) and the loop that serves its connections, HTTP/1.1 and
//! HTTP/2 on one port, under the [`ServeLimits`].
//!
//! What one client can hold, and for how long:
//! - **connections**: at most [`ServeLimits::connections_per_peer`] from one address and
//!   [`ServeLimits::connections`] in all, TLS handshakes included; a connection over a
//!   limit is accepted and closed at once, so the kernel's backlog never fills with it.
//! - **time**: a TLS handshake [`HANDSHAKE_TIMEOUT`]; a new connection
//!   [`ServeLimits::header_timeout`] to send its first request's headers (an HTTP/1
//!   connection, each request's); then [`ServeLimits::idle_timeout`] with no request in
//!   flight before it is closed (gracefully: a request in flight, or an open gRPC
//!   stream, always finishes).
//! - **bytes**: a gRPC request message over [`ServeLimits::max_request_bytes`] is
//!   refused by tonic (`OUT_OF_RANGE`) before it is decoded; the service sets the limit
//!   on its server (see [`crate::routes`]), and refusals are counted here.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, HttpBody},
    extract::{ConnectInfo, Request},
    Router,
};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Instant,
};
use tokio_rustls::{rustls::ServerConfig, server::TlsStream, TlsAcceptor};
use tokio_util::{either::Either, sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::{
    limits::{Gate, Pass, ServeLimits, HEADER_TIMEOUTS, REQUEST_BYTES},
    tls::{Identity, Peer, HANDSHAKE_TIMEOUT},
};

type Handshake = Option<(TlsStream<TcpStream>, Peer, Pass)>;

/// What [`crate::serve`] accepts connections from: plain TCP, or TLS whose handshakes run
/// beside the accept loop (a slow one holds up nobody, and is dropped after
/// [`HANDSHAKE_TIMEOUT`]), under the connection limits of its [`ServeLimits`].
pub struct Listener {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    handshakes: JoinSet<Handshake>,
    limits: ServeLimits,
    connections: Arc<Gate>,
}

impl Listener {
    pub fn tls(tcp: TcpListener, config: Arc<ServerConfig>) -> Self {
        Self {
            tls: Some(TlsAcceptor::from(config)),
            ..Self::from(tcp)
        }
    }

    /// The same listener under `limits` (the defaults otherwise).
    pub fn with_limits(mut self, limits: ServeLimits) -> Self {
        self.connections = connection_gate(&limits);
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &ServeLimits {
        &self.limits
    }

    /// Whether connections must speak TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection that is within the limits (and, with TLS, finished its
    /// handshake).
    async fn accept(&mut self) -> (Connection, Peer) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let Ok(pass) = self.connections.enter(Some(addr.ip())) else {
                            continue; // dropped: closed at once
                        };
                        // Small request/response messages: never wait for Nagle.
                        let _ = tcp.set_nodelay(true);
                        match &self.tls {
                            None => {
                                let peer = Peer { addr, identity: None };
                                return (Connection { io: Either::Right(tcp), _pass: pass }, peer);
                            }
                            Some(acceptor) => {
                                self.handshakes.spawn(handshake(acceptor.clone(), tcp, addr, pass));
                            }
                        }
                    }
                    Err(error) => accept_failed(error).await,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some((stream, peer, pass))) = done {
                        return (Connection { io: Either::Left(stream), _pass: pass }, peer);
                    }
                }
            }
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(tcp: TcpListener) -> Self {
        let limits = ServeLimits::default();
        Self {
            tcp,
            tls: None,
            handshakes: JoinSet::new(),
            connections: connection_gate(&limits),
            limits,
        }
    }
}

fn connection_gate(limits: &ServeLimits) -> Arc<Gate> {
    Gate::new(
        "connections",
        Some((limits.connections_per_peer, "--max-connections-per-peer")),
        Some((limits.connections, "--max-connections")),
        "rpc_connections_refused_total",
    )
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    pass: Pass,
) -> Handshake {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(Identity::of);
            Some((stream, Peer { addr, identity }, pass))
        }
        Ok(Err(error)) => {
            debug!(%addr, %error, "TLS handshake refused");
            None
        }
        Err(_) => {
            debug!(%addr, "TLS handshake not finished in time");
            None
        }
    }
}

/// As axum's own listener does: a connection that died before it was accepted is
/// nothing; anything else (out of file descriptors) is logged and waited out.
async fn accept_failed(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    warn!(%error, "accept failed; trying again in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One accepted connection: its stream, and its place under the connection limits
/// (given back when it closes).
pub(crate) struct Connection {
    io: Either<TlsStream<TcpStream>, TcpStream>,
    _pass: Pass,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `app` on every connection `listener` accepts until `shutdown`, then stops
/// accepting and waits for the connections to finish their requests.
pub(crate) async fn serve(
    mut listener: Listener,
    app: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limits = listener.limits().clone();
    let connections = TaskTracker::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        connections.spawn(connection(
            io,
            peer,
            app.clone(),
            limits.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

/// One request in flight, until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock() = Some(Instant::now());
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct Counted {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Counted {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether a response is tonic refusing a request message over its decoding limit: a
/// trailers-only answer, which carries its status in the extensions.
fn refused_as_too_large(response: &axum::response::Response) -> bool {
    response
        .extensions()
        .get::<tonic::Status>()
        .is_some_and(|status| {
            status.code() == tonic::Code::OutOfRange
                && status.message().contains("message length too large")
        })
}

/// Serves one connection: its requests, then closing it when it idles past its limit or
/// the server shuts down.
async fn connection(
    io: Connection,
    peer: Peer,
    app: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity::default());
    let service = {
        let (activity, peer) = (Arc::clone(&activity), peer.clone());
        tower::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = InFlight::new(&activity);
            let mut request: Request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer.clone()));
            let (app, ip) = (app.clone(), peer.addr.ip());
            async move {
                let response = app
                    .oneshot(request)
                    .await
                    .unwrap_or_else(|never| match never {});
                if refused_as_too_large(&response) {
                    REQUEST_BYTES
                        .refuse(Some(ip), &"a gRPC request message over --max-request-bytes");
                }
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Counted {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    // Until its first request, a connection has the header timeout; then the idle one.
    let accepted = Instant::now();
    let mut check = accepted + limits.header_timeout;
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    let timed_out = error
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_timeout);
                    if timed_out {
                        let why = "request headers not sent within --header-timeout";
                        HEADER_TIMEOUTS.refuse(Some(peer.addr.ip()), &why);
                    }
                    debug!(peer = %peer.addr, %error, "connection ended");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(check), if !closing => {
                let idle = activity.in_flight.load(Ordering::SeqCst) == 0;
                let idle_since = *activity.idle_since.lock();
                let deadline = match idle_since {
                    None => accepted + limits.header_timeout,
                    Some(since) => since + limits.idle_timeout,
                };
                let now = Instant::now();
                if idle && now >= deadline {
                    if idle_since.is_none() {
                        let why = "no request within --header-timeout of connecting";
                        HEADER_TIMEOUTS.refuse(Some(peer.addr.ip()), &why);
                    } else {
                        debug!(peer = %peer.addr, "closing a connection idle for --idle-timeout");
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    check = if idle { deadline } else { now + limits.idle_timeout };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server with `limits` answering `GET /` on a free port.
    async fn server(limits: ServeLimits) -> (SocketAddr, CancellationToken) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = Listener::from(tcp).with_limits(limits);
        let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, app, shutdown.clone()));
        (addr, shutdown)
    }

    /// How long until the server closes `stream` (at most 10 s).
    async fn until_closed(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buffer = [0; 1024];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
                .await
                .expect("closed within 10 s");
            if matches!(read, Ok(0) | Err(_)) {
                return started.elapsed();
            }
        }
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once_and_the_rest_served() {
        let (addr, _stop) = server(ServeLimits {
            connections: 2,
            ..ServeLimits::default()
        })
        .await;
        let mut held = [
            TcpStream::connect(addr).await.expect("first"),
            TcpStream::connect(addr).await.expect("second"),
        ];
        let mut third = TcpStream::connect(addr).await.expect("third connects");
        assert!(until_closed(&mut third).await < Duration::from_secs(1));
        // The two within the limit are served.
        for stream in &mut held {
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("send");
            let mut answer = [0; 512];
            let n = stream.read(&mut answer).await.expect("answer");
            assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        }
        // One closing lets the next in.
        drop(held);
        let mut next = loop {
            let mut next = TcpStream::connect(addr).await.expect("connect");
            next.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("send");
            let mut answer = [0; 512];
            if let Ok(n @ 1..) = next.read(&mut answer).await {
                assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
                break next;
            }
        };
        next.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_after_their_timeouts() {
        let (addr, _stop) = server(ServeLimits {
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..ServeLimits::default()
        })
        .await;
        // Silent from the start: the header timeout.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let took = until_closed(&mut silent).await;
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");
        // Over HTTP/2 (prior knowledge), a request, then nothing: the idle timeout.
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("handshake");
        let closed = tokio::spawn(async move {
            let started = Instant::now();
            let _ = connection.await;
            started.elapsed()
        });
        let request = hyper::Request::get(format!("http://{addr}/"))
            .body(axum::body::Body::empty())
            .expect("request");
        let response = sender.send_request(request).await.expect("answer");
        assert_eq!(response.status(), 200);
        drop(response);
        let took = tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("closed within 10 s")
            .expect("join");
        assert!(took >= Duration::from_millis(500), "closed after {took:?}");
    }
}
