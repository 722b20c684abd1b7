//! TLS for every port and every call: rustls on the server, tonic's rustls on clients.
//!
//! A process has at most one identity: its certificate and key, and the CA that signed
//! every certificate of the deployment ([`TlsArgs`], the same three flags on every
//! binary). With them, its listener speaks only TLS ([`Listener`]) and every channel it
//! opens is TLS with its certificate as the client's ([`Transport`]). Internal ports
//! require a client certificate signed by the CA ([`ClientCerts::Required`]); the
//! facade's public port serves TLS and takes one if offered ([`ClientCerts::Optional`]).
//!
//! Who a caller is comes from its certificate's subject common name, which
//! `runner certs` writes as `SERVICE@HOST` ([`Identity`]); it reaches handlers with the
//! connection's [`Peer`].
//!
//! Nothing downgrades silently. A `https://` or `tls://` address without TLS configured,
//! or an `http://` one with it, is an error naming both; and a listener on a
//! non-loopback address without TLS refuses to start unless `--insecure` says so
//! ([`TlsArgs::bind`]).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::warn;

use crate::Listener;

/// How long a client may take over its TLS handshake before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS flags every binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate (PEM), served to clients and presented to servers.
    /// With it, the listener speaks only TLS and every call goes over TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// The certificate's private key (PEM); must not be readable by group or others.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// The CA that signed every certificate of the deployment (PEM): servers are checked
    /// against it, and so are clients' certificates.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// Listen on a non-loopback address without TLS. Anyone who can reach the port can
    /// then read, forge and replay what crosses it.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The TLS files, all three given.
    pub fn files(cert: PathBuf, key: PathBuf, ca: PathBuf) -> Self {
        Self {
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_ca: Some(ca),
            insecure: false,
        }
    }

    /// The certificate, key and CA files, when all three are given (`None` when none
    /// is; clap refuses some without the others).
    pub fn paths(&self) -> Option<(&Path, &Path, &Path)> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some((cert, key, ca)),
            _ => None,
        }
    }

    /// The identity these flags name, if any.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        match self.paths() {
            Some((cert, key, ca)) => Tls::load(cert, key, ca).map(Some),
            None if self.tls_cert.is_none() && self.tls_key.is_none() && self.tls_ca.is_none() => {
                Ok(None)
            }
            None => anyhow::bail!("--tls-cert, --tls-key and --tls-ca go together"),
        }
    }

    /// How this process calls others: TLS with its identity, or plaintext.
    pub fn transport(&self) -> anyhow::Result<Transport> {
        Ok(self
            .load()?
            .map_or_else(Transport::plaintext, |tls| tls.transport()))
    }

    /// Binds `addr` and returns the listener to serve on, with the transport for this
    /// process's calls, both from one reading of the files: TLS when configured (client
    /// certificates as `clients` says), plaintext otherwise, which is refused on any
    /// address but loopback unless `--insecure` was given.
    pub async fn bind(
        &self,
        addr: SocketAddr,
        clients: ClientCerts,
    ) -> anyhow::Result<(Listener, Transport)> {
        let tls = self.load()?;
        if tls.is_none() {
            refuse_cleartext(addr, self.insecure)?;
        }
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        Ok(match tls {
            Some(tls) => (
                Listener::tls(tcp, tls.server_config(clients)?),
                tls.transport(),
            ),
            None => (Listener::from(tcp), Transport::plaintext()),
        })
    }
}

/// A plaintext listener on a non-loopback address is an error unless `insecure`.
pub fn refuse_cleartext(addr: SocketAddr, insecure: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if insecure {
        warn!(%addr, "listening without TLS beyond loopback (--insecure): anyone who can reach this port can read and forge its traffic");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {addr} without TLS: anyone who could reach it could read and \
         forge its traffic. Pass --tls-cert, --tls-key and --tls-ca (`runner certs` makes \
         them), listen on 127.0.0.1, or pass --insecure to accept the risk"
    )
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Internal ports: no certificate signed by the CA, no connection.
    Required,
    /// A public port: a certificate is checked if offered, and not needed.
    Optional,
}

/// A process's identity: its certificate chain and key, and the deployment's CA.
#[derive(Clone)]
pub struct Tls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the three PEM files. The key must be readable by its owner only.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<Self> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        check_private(key)?;
        let (cert_pem, key_pem, ca_pem) = (
            read(cert, "certificate")?,
            read(key, "key")?,
            read(ca, "CA certificate")?,
        );
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
        anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("{} is not a PEM private key", key.display()))?;
        let roots = roots(&ca_pem, ca)?;
        Ok(Self {
            chain,
            key: Arc::new(key_der),
            roots: Arc::new(roots),
            cert_pem,
            key_pem,
            ca_pem,
        })
    }

    /// The subject of this process's own certificate.
    pub fn identity(&self) -> Option<Identity> {
        Identity::of(&self.chain[0])
    }

    /// The server side: this identity, and client certificates as `clients` says.
    pub fn server_config(&self, clients: ClientCerts) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider.clone());
        let verifier = match clients {
            ClientCerts::Required => verifier.build(),
            ClientCerts::Optional => verifier.allow_unauthenticated().build(),
        }
        .context("cannot check client certificates against the CA")?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("no TLS version in common with the crypto provider")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the certificate and key do not go together")?;
        // gRPC needs HTTP/2; curl and browsers may ask for either.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side: servers checked against the CA, this certificate presented.
    pub fn transport(&self) -> Transport {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ));
        Transport { tls: Some(config) }
    }
}

/// The CA certificates in `pem` (read from `path`, which errors name) as the roots to
/// check peers against.
pub fn roots(pem: &[u8], path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca_cert in CertificateDer::pem_slice_iter(pem) {
        let ca_cert =
            ca_cert.with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        roots
            .add(ca_cert)
            .with_context(|| format!("{} is not a usable CA certificate", path.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", path.display());
    Ok(roots)
}

/// Refuses a key or token file that its group or others may read.
pub fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions()
        .mode();
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{} is readable by others (mode {:o}): run `chmod 600 {}`",
        path.display(),
        mode & 0o777,
        path.display()
    );
    Ok(())
}

/// Who a certificate says its holder is: the subject's common name, `SERVICE@HOST` for
/// the certificates `runner certs` makes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(Arc<str>);

impl Identity {
    pub fn new(name: &str) -> Self {
        Self(name.into())
    }

    /// The subject common name of `cert`, if it has one.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let name = parsed.subject().iter_common_name().next()?.as_str().ok()?;
        Some(Self::new(name))
    }

    /// The whole common name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The service the certificate was made for: the name before `@`.
    pub fn service(&self) -> &str {
        self.0
            .split_once('@')
            .map_or(&self.0, |(service, _)| service)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The other end of a connection: its address, and its certificate's identity if it
/// presented one. Handlers find it in the request's extensions ([`peer`]).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
}

/// The peer of a gRPC request served by [`crate::serve`].
pub fn peer<T>(request: &tonic::Request<T>) -> Option<&Peer> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|info| &info.0)
}

/// The address of the peer of a gRPC request, as the limits count it.
pub fn peer_ip<T>(request: &tonic::Request<T>) -> Option<std::net::IpAddr> {
    peer(request).map(|peer| peer.addr.ip())
}

/// How a process opens channels: plaintext, or TLS with its identity.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    tls: Option<ClientTlsConfig>,
}

/// An address a channel cannot be made to.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("{0} asks for TLS, but no TLS is configured: pass --tls-cert, --tls-key and --tls-ca")]
    TlsNotConfigured(String),
    #[error("{0} asks for plaintext, but this process speaks TLS: use https:// or host:port")]
    PlaintextWithTls(String),
    #[error("invalid address {0}: {1}")]
    Invalid(String, tonic::transport::Error),
}

impl Transport {
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// The endpoint for `address` (`host:port`, or a URL): TLS when this transport is,
    /// plaintext otherwise; a scheme that says the other is an error.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, AddressError> {
        let (scheme, rest) = address.split_once("://").unwrap_or(("", address));
        let wants_tls = match scheme {
            "" => self.tls.is_some(),
            "https" | "tls" => true,
            _ => false,
        };
        let uri = match (wants_tls, &self.tls) {
            (true, None) => return Err(AddressError::TlsNotConfigured(address.to_owned())),
            (false, Some(_)) => return Err(AddressError::PlaintextWithTls(address.to_owned())),
            (true, Some(_)) => format!("https://{rest}"),
            (false, None) => format!("http://{rest}"),
        };
        let invalid = |error| AddressError::Invalid(address.to_owned(), error);
        let endpoint = Endpoint::from_shared(uri)
            .map_err(invalid)?
            .connect_timeout(crate::CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone()).map_err(invalid),
            None => Ok(endpoint),
        }
    }

    /// A lazily connected channel to `address`; see [`Transport::endpoint`].
    pub fn channel(&self, address: &str) -> Result<Channel, AddressError> {
        Ok(self.endpoint(address)?.connect_lazy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_never_downgrade() {
        let plain = Transport::plaintext();
        assert!(plain.endpoint("127.0.0.1:1").is_ok());
        assert!(plain.endpoint("http://127.0.0.1:1").is_ok());
        for url in ["https://127.0.0.1:1", "tls://127.0.0.1:1"] {
            let error = plain.endpoint(url).expect_err("refused").to_string();
            assert!(error.contains("no TLS is configured"), "{error}");
        }
        let tls = Transport {
            tls: Some(ClientTlsConfig::new()),
        };
        assert!(tls.endpoint("127.0.0.1:1").is_ok());
        assert!(tls.endpoint("https://127.0.0.1:1").is_ok());
        let error = tls
            .endpoint("http://127.0.0.1:1")
            .expect_err("refused")
            .to_string();
        assert!(error.contains("asks for plaintext"), "{error}");
    }

    #[test]
    fn cleartext_is_refused_beyond_loopback_unless_insecure() {
        assert!(refuse_cleartext("127.0.0.1:1".parse().unwrap(), false).is_ok());
        assert!(refuse_cleartext("[::1]:1".parse().unwrap(), false).is_ok());
        for addr in ["0.0.0.0:1", "10.0.0.1:1", "[::]:1"] {
            let error = refuse_cleartext(addr.parse().unwrap(), false)
                .expect_err("refused")
                .to_string();
            assert!(error.contains("--insecure"), "{error}");
            assert!(refuse_cleartext(addr.parse().unwrap(), true).is_ok());
        }
    }

    #[test]
    fn an_identity_names_its_service_before_the_at() {
        assert_eq!(Identity::new("logging@a").service(), "logging");
        assert_eq!(Identity::new("facade").service(), "facade");
    }
}
