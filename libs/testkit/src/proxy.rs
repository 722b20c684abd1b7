//! A TCP proxy a test can cut: [`Proxy::reset_all`] resets every connection through it
//! at once while both ends live on, the way a restarted load balancer or NAT box drops
//! connections. New connections go through as before. It also keeps every byte it
//! carried, both ways ([`Proxy::recorded`]), as an eavesdropper on the path would.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

pub struct Proxy {
    addr: SocketAddr,
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
    recorded: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (resets, _) = watch::channel(0);
        let cut = resets.subscribe();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&recorded);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut cut = cut.clone();
                cut.mark_unchanged();
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    forward(inbound, outbound, cut, record).await;
                });
            }
        });
        Self {
            addr,
            resets,
            accept,
            recorded,
        }
    }

    /// Every byte carried so far, in either direction.
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().clone()
    }

    /// Whether `needle` crossed the proxy in the clear, in either direction.
    pub fn saw(&self, needle: &[u8]) -> bool {
        !needle.is_empty()
            && self
                .recorded
                .lock()
                .windows(needle.len())
                .any(|window| window == needle)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets (TCP RST) both sides of every connection open now.
    pub fn reset_all(&self) {
        self.resets.send_modify(|count| *count += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn forward(
    inbound: TcpStream,
    outbound: TcpStream,
    mut cut: watch::Receiver<u64>,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut inbound = Recording {
        stream: inbound,
        record: Arc::clone(&record),
    };
    let mut outbound = Recording {
        stream: outbound,
        record,
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.changed() => {
            // No linger: closing sends RST instead of FIN, on both sides.
            let _ = inbound.stream.set_zero_linger();
            let _ = outbound.stream.set_zero_linger();
        }
    }
}

/// A stream that keeps a copy of everything read from it.
struct Recording {
    stream: TcpStream,
    record: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recording {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.record
                .lock()
                .extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
