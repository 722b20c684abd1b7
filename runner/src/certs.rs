//! `runner certs`: a CA and a certificate for every service on every host, in one
//! command, made with rcgen.
//!
//! Each certificate's subject is `SERVICE@HOST`: the registry reads the service before
//! the `@` as the one service the holder may register, and the whole name as the owner
//! of what it registers. Its alternative names are the host's addresses and names, which
//! clients check when they connect. Every certificate serves and calls (server and client
//! authentication), so one file pair is all a service needs.
//!
//! For the NATS cluster it also makes the logging user's nkey (`logging.nk`, the seed
//! logging connects with) and a password for the routes, and writes each host's
//! `nats.conf` (`local_nats::Lockdown`): client and route ports on the host's first
//! address (4222 and 6222), TLS with client certificates on both, the route password,
//! logging's nkey as a user with permissions to append and read only, and an admin user
//! whose seed (`admin.nk`) stays beside the CA's key, for an operator's stream edits.
//!
//! Keys are written readable by their owner only, nothing is overwritten, and the
//! command prints which folder goes to which host.

use std::{
    fs::OpenOptions,
    io::Write,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The services a host runs unless `--services` says otherwise.
pub const SERVICES: [&str; 5] = ["config-server", "logging", "messages", "facade", "nats"];
/// The logging user's nkey seed, in each host's folder.
pub const LOGGING_NKEY: &str = "logging.nk";
/// Each host's NATS node configuration, in its folder.
pub const NATS_CONFIG: &str = "nats.conf";
/// The NATS operator's nkey seed, next to the CA's key (not in any host's folder).
pub const ADMIN_NKEY: &str = "admin.nk";

/// A file of host folder `dir`, as a flag's value.
pub fn host_file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// The TLS flags of `service`, from host folder `dir`.
pub fn flags(dir: &Path, service: &str) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        host_file(dir, &format!("{service}.pem")),
        "--tls-key".into(),
        host_file(dir, &format!("{service}.key")),
        "--tls-ca".into(),
        host_file(dir, "ca.pem"),
    ]
}

/// The lockdown of the NATS node of host folder `dir`: its certificate, the routes'
/// password, and the users let in.
pub fn lockdown(
    dir: &Path,
    route_secret: String,
    logging_user: String,
    admin_user: Option<String>,
) -> local_nats::Lockdown {
    local_nats::Lockdown {
        cert: dir.join("nats.pem"),
        key: dir.join("nats.key"),
        ca: dir.join("ca.pem"),
        route_secret,
        logging_user,
        admin_user,
    }
}

/// How logging gets into the cluster from host folder `dir`: its certificate and the
/// nkey `seed`.
pub fn logging_credentials(dir: &Path, seed: String) -> local_nats::Credentials {
    local_nats::Credentials {
        tls: Some((
            dir.join("ca.pem"),
            dir.join("logging.pem"),
            dir.join("logging.key"),
        )),
        nkey_seed: Some(seed),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Folder to write into; it must not hold a CA already.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,

    /// A host and the addresses and DNS names clients reach it by:
    /// NAME=ADDR[,ADDR...] (repeatable) [default: local=127.0.0.1,localhost].
    #[arg(long = "host", value_name = "NAME=ADDR,...", value_parser = parse_host)]
    pub hosts: Vec<Host>,

    /// The services each host gets a certificate for.
    #[arg(long, value_delimiter = ',', default_values_t = SERVICES.map(String::from))]
    pub services: Vec<String>,

    /// A certificate for a tool or an operator (grpcurl, say) with this subject, for
    /// calling internal ports; it serves nothing (repeatable).
    #[arg(long = "client", value_name = "NAME")]
    pub clients: Vec<String>,
}

/// A host of the deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub dns_names: Vec<String>,
}

fn parse_host(text: &str) -> Result<Host, String> {
    let (name, names) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDR[,ADDR...], got {text:?}"))?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if !valid(name) {
        return Err(format!("invalid host name {name:?}: use [A-Za-z0-9._-]"));
    }
    let mut host = Host {
        name: name.to_owned(),
        addresses: Vec::new(),
        dns_names: Vec::new(),
    };
    for item in names.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<IpAddr>() {
            Ok(ip) => host.addresses.push(ip),
            Err(_) if valid(item) => host.dns_names.push(item.to_owned()),
            Err(_) => return Err(format!("{item:?} is neither an IP address nor a DNS name")),
        }
    }
    if host.addresses.is_empty() && host.dns_names.is_empty() {
        return Err(format!("host {name:?} needs an address or a DNS name"));
    }
    Ok(host)
}

/// What [`write`] made: each host with its folder.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub hosts: Vec<(Host, PathBuf)>,
    pub clients: Vec<PathBuf>,
}

/// Writes the CA, then a folder per host with the CA certificate and a certificate and
/// key per service, and one pair per client.
pub fn write(args: &CertsArgs) -> anyhow::Result<Written> {
    let hosts = if args.hosts.is_empty() {
        vec![parse_host("local=127.0.0.1,localhost").map_err(anyhow::Error::msg)?]
    } else {
        args.hosts.clone()
    };
    let ca_path = args.out.join("ca.pem");
    anyhow::ensure!(
        !ca_path.exists(),
        "{} exists: refusing to overwrite a CA (certificates it signed would stop working); \
         choose another --out or remove the folder",
        ca_path.display()
    );
    make_dir(&args.out)?;

    let ca_key = KeyPair::generate().context("cannot make a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject("microservices lab CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(params, ca_key).context("cannot make the CA")?;
    let ca_pem = ca.pem();
    write_new(&ca_path, ca_pem.as_bytes(), 0o644)?;
    write_new(
        &args.out.join("ca.key"),
        ca.key().serialize_pem().as_bytes(),
        0o600,
    )?;

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().context("cannot make the logging user's nkey")?;
    let admin = nkeys::KeyPair::new_user();
    let admin_seed = admin.seed().context("cannot make the admin's nkey")?;
    write_new(
        &args.out.join(ADMIN_NKEY),
        format!("{admin_seed}\n").as_bytes(),
        0o600,
    )?;
    let route_secret = random_secret();
    let nodes: Vec<local_nats::Node> = hosts
        .iter()
        .filter_map(|host| {
            Some(local_nats::Node {
                name: format!("nats-{}", host.name),
                host: host.addresses.first()?.to_string(),
                client_port: 4222,
                cluster_port: (hosts.len() > 1).then_some(6222),
                data_dir: PathBuf::from("data/nats").join(&host.name),
            })
        })
        .collect();

    let mut written = Written {
        ca: ca_path,
        hosts: Vec::new(),
        clients: Vec::new(),
    };
    for host in &hosts {
        let dir = args.out.join(&host.name);
        make_dir(&dir)?;
        write_new(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
        write_new(
            &dir.join(LOGGING_NKEY),
            format!("{seed}\n").as_bytes(),
            0o600,
        )?;
        let node = nodes
            .iter()
            .find(|node| node.name == format!("nats-{}", host.name));
        if let Some(node) = node.filter(|_| args.services.iter().any(|s| s == "nats")) {
            let lockdown = lockdown(
                &dir,
                route_secret.clone(),
                user.public_key(),
                Some(admin.public_key()),
            );
            let config = node.config(&nodes, &lockdown);
            write_new(&dir.join(NATS_CONFIG), config.as_bytes(), 0o600)?;
        }
        for service in &args.services {
            let mut sans: Vec<SanType> = host
                .addresses
                .iter()
                .map(|ip| SanType::IpAddress(*ip))
                .collect();
            for name in &host.dns_names {
                sans.push(SanType::DnsName(name.as_str().try_into()?));
            }
            let name = format!("{service}@{}", host.name);
            issue(&ca, &name, sans, &dir.join(service))?;
        }
        written.hosts.push((host.clone(), dir));
    }
    if !args.clients.is_empty() {
        let dir = args.out.join("clients");
        make_dir(&dir)?;
        for client in &args.clients {
            let path = dir.join(client.replace('@', "-at-"));
            issue(&ca, client, Vec::new(), &path)?;
            written.clients.push(path);
        }
    }
    Ok(written)
}

/// Signs a certificate for `name` with these alternative names, written to
/// `path.pem` and `path.key`.
fn issue(
    ca: &CertifiedIssuer<'_, KeyPair>,
    name: &str,
    sans: Vec<SanType>,
    path: &Path,
) -> anyhow::Result<()> {
    let key = KeyPair::generate().context("cannot make a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params
        .signed_by(&key, ca)
        .with_context(|| format!("cannot sign a certificate for {name}"))?;
    write_new(&path.with_extension("pem"), cert.pem().as_bytes(), 0o644)?;
    write_new(
        &path.with_extension("key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )
}

/// 32 random characters a NATS URL can carry as a password.
pub fn random_secret() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes a file that must not exist yet, with `mode` from its creation on.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What to copy where, and the flags that use it.
pub fn print(written: &Written) {
    println!("runner: wrote a CA to {}", written.ca.display());
    println!(
        "  its key ({}) signs new certificates, and {} is NATS's admin user: keep both, \
         off the hosts",
        written.ca.with_extension("key").display(),
        written.ca.with_file_name(ADMIN_NKEY).display()
    );
    for (host, dir) in &written.hosts {
        let reached: Vec<String> = host
            .addresses
            .iter()
            .map(IpAddr::to_string)
            .chain(host.dns_names.iter().cloned())
            .collect();
        println!(
            "  host {} ({}): copy {}/ to it; there, a service takes",
            host.name,
            reached.join(", "),
            dir.display()
        );
        println!(
            "    --tls-cert {d}/SERVICE.pem --tls-key {d}/SERVICE.key --tls-ca {d}/ca.pem",
            d = dir.display()
        );
        println!(
            "    and logging --store-nkey {d}/{LOGGING_NKEY}; NATS: nats-server --config {d}/{NATS_CONFIG}",
            d = dir.display()
        );
    }
    for client in &written.clients {
        println!(
            "  client: {} and {}",
            client.with_extension("pem").display(),
            client.with_extension("key").display()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        certs: CertsArgs,
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("file").permissions().mode() & 0o777
    }

    #[test]
    fn writes_a_ca_and_a_pair_per_service_and_host_and_never_overwrites() {
        let out = std::env::temp_dir().join(format!("certs-test-{}", std::process::id()));
        std::fs::remove_dir_all(&out).ok();
        let out_arg = out.to_string_lossy().into_owned();
        let cli = Cli::parse_from([
            "certs",
            "--out",
            &out_arg,
            "--host",
            "a=10.0.0.1,a.lab",
            "--host",
            "b=10.0.0.2",
            "--services",
            "logging,facade",
            "--client",
            "admin@laptop",
        ]);
        let written = write(&cli.certs).expect("written");
        assert_eq!(written.hosts.len(), 2);
        for host in ["a", "b"] {
            for service in ["logging", "facade"] {
                let cert = out.join(host).join(format!("{service}.pem"));
                let key = out.join(host).join(format!("{service}.key"));
                assert_eq!(mode(&key), 0o600, "{}", key.display());
                let tls = rpc::Tls::load(&cert, &key, &out.join(host).join("ca.pem"))
                    .expect("usable by the services");
                let identity = tls.identity().expect("a subject");
                assert_eq!(identity.name(), format!("{service}@{host}"));
                assert_eq!(identity.service(), service);
            }
            assert!(!out.join(host).join("messages.pem").exists());
        }
        assert_eq!(mode(&out.join("ca.key")), 0o600);
        assert_eq!(mode(&out.join("clients/admin-at-laptop.key")), 0o600);

        let again = write(&cli.certs).expect_err("refused").to_string();
        assert!(again.contains("refusing to overwrite"), "{again}");
        std::fs::remove_dir_all(&out).ok();
    }

    #[test]
    fn hosts_need_a_name_and_an_address() {
        assert_eq!(
            parse_host("a=10.0.0.1,a.lab,::1").expect("valid"),
            Host {
                name: "a".into(),
                addresses: vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
                dns_names: vec!["a.lab".into()],
            }
        );
        for bad in ["a", "a=", "=10.0.0.1", "a b=10.0.0.1", "a=10.0.0.1,x y"] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }
}
