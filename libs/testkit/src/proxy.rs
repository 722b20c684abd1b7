//! A TCP proxy a test can cut: [`Proxy::reset_all`] resets every connection through it
//! at once while both ends live on, the way a restarted load balancer or NAT box drops
//! connections. New connections go through as before.

use std::net::SocketAddr;

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

pub struct Proxy {
    addr: SocketAddr,
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (resets, _) = watch::channel(0);
        let cut = resets.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut cut = cut.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    forward(inbound, outbound, cut).await;
                });
            }
        });
        Self {
            addr,
            resets,
            accept,
        }
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

async fn forward(mut inbound: TcpStream, mut outbound: TcpStream, mut cut: watch::Receiver<u64>) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.changed() => {
            // No linger: closing sends RST instead of FIN, on both sides.
            let _ = inbound.set_zero_linger();
            let _ = outbound.set_zero_linger();
        }
    }
}
