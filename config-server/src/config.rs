//! The config server's command line and its optional TOML file.
//!
//! ```toml
//! heartbeat_interval = "1s"   # optional; flags win
//! ttl = "3s"
//! session_grace = "0s"        # a broken session's instance stays listed this long
//!
//! [static]                    # never evicted
//! messages = ["127.0.0.1:50060"]
//!
//! [settings]                  # read by services with GetSetting
//! "logging.store" = "memory"
//! ```
//!
//! `tls_cert`, `tls_key` and `tls_ca` (paths) may stand at the top instead of the flags.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;

use crate::registry::{Limits, RegistryConfig, StreamLimits};

/// The file read when `--config` is not given, if it exists.
pub(crate) const DEFAULT_CONFIG_FILE: &str = "config-server.toml";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "config-server",
    version,
    about = "Service registry with heartbeats"
)]
pub struct Config {
    /// Address to listen on (gRPC and the HTTP status page share it).
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub addr: SocketAddr,

    /// TOML file with static entries and settings [default: config-server.toml, if present].
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// A static entry, never evicted: SERVICE=HOST:PORT (repeatable).
    #[arg(long = "static", value_name = "SERVICE=ADDR", value_parser = parse_pair)]
    pub static_entries: Vec<(String, String)>,

    /// Every replica of this registry, this one included: HOST:PORT (repeatable, or
    /// comma-separated). Each is listed as the service `config-server`, so clients find
    /// every replica from any one, and the status page shows whether each answers.
    /// Replicas share nothing: instances register with each of them.
    #[arg(long = "replica", value_name = "HOST:PORT", value_delimiter = ',')]
    pub replicas: Vec<String>,

    /// A setting services can read with GetSetting: KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub settings: Vec<(String, String)>,

    /// How often instances should heartbeat [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// How long an instance stays without a heartbeat before it is evicted [default: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,

    /// How long an instance whose session stream broke stays listed, waiting for it to
    /// open a new one; 0s removes it at once [default: 0s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub session_grace: Option<Duration>,

    /// Most instances one service may have.
    #[arg(long, default_value_t = Limits::default().max_instances_per_service)]
    pub max_instances_per_service: usize,

    /// Most dynamic instances in the whole registry.
    #[arg(long, default_value_t = Limits::default().max_instances)]
    pub max_instances: usize,

    /// Most open Watch streams from one peer address; more are refused
    /// (RESOURCE_EXHAUSTED).
    #[arg(long, value_name = "N", default_value_t = StreamLimits::default().watches_per_peer)]
    pub max_watches_per_peer: usize,

    /// Most open Watch streams in all.
    #[arg(long, value_name = "N", default_value_t = StreamLimits::default().watches)]
    pub max_watches: usize,

    /// Most open Session streams from one peer address; more are refused
    /// (RESOURCE_EXHAUSTED).
    #[arg(long, value_name = "N", default_value_t = StreamLimits::default().sessions_per_peer)]
    pub max_sessions_per_peer: usize,

    /// Most open Session streams in all.
    #[arg(long, value_name = "N", default_value_t = StreamLimits::default().sessions)]
    pub max_sessions: usize,

    /// Threads serving requests. One (tokio's current-thread runtime) is the cheapest
    /// per session; more let Lookups use more cores.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    #[command(flatten)]
    pub limits: rpc::LimitArgs,

    /// Require `authorization: Bearer <token>` (the file's first line) on Register,
    /// Heartbeat and Deregister [default: data/registry.token, if it exists].
    #[arg(long, value_name = "FILE", env = "CONFIG_SERVER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Also require the token on Lookup, ListServices, GetSetting and Watch (and on
    /// `/v1/services`).
    #[arg(long, requires = "token_file")]
    pub token_required_for_reads: bool,

    #[command(flatten)]
    pub tls: rpc::TlsArgs,

    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default, with = "humantime_serde_opt")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    session_grace: Option<Duration>,
    #[serde(default, rename = "static")]
    static_entries: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    settings: BTreeMap<String, String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
}

/// Reads `"1s"`-style durations in the config file.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

impl Config {
    /// A config with every default, listening on `addr`; handy for tests.
    pub fn for_addr(addr: SocketAddr) -> Self {
        let mut config = Config::parse_from(["config-server"]);
        config.addr = addr;
        config
    }

    /// The token check, when a token file is given or the default one exists.
    pub fn auth(&self) -> anyhow::Result<Option<crate::Auth>> {
        registry_client::token::token_file(self.token_file.as_ref())
            .map(|path| {
                let token = registry_client::token::read_token(&path)?;
                Ok(crate::Auth::new(token, self.token_required_for_reads))
            })
            .transpose()
    }

    /// The TLS files: the flags, else the config file's `tls_cert`, `tls_key` and
    /// `tls_ca` (all three from one place, never mixed).
    pub fn tls(&self) -> anyhow::Result<rpc::TlsArgs> {
        let given = &self.tls;
        if given.tls_cert.is_some() || given.tls_key.is_some() || given.tls_ca.is_some() {
            return Ok(given.clone());
        }
        let file = self.file()?;
        Ok(rpc::TlsArgs {
            tls_cert: file.tls_cert,
            tls_key: file.tls_key,
            tls_ca: file.tls_ca,
            insecure: given.insecure,
        })
    }

    fn file(&self) -> anyhow::Result<ConfigFile> {
        Ok(match &self.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => ConfigFile::default(),
        })
    }

    /// Merges the file (if any) with the flags; flags win, static entries add up.
    pub fn registry_config(&self) -> anyhow::Result<RegistryConfig> {
        let file = self.file()?;
        let defaults = RegistryConfig::default();
        let heartbeat_interval = self
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .unwrap_or(defaults.heartbeat_interval);
        let ttl = self.ttl.or(file.ttl).unwrap_or(defaults.ttl);
        let session_grace = self
            .session_grace
            .or(file.session_grace)
            .unwrap_or(defaults.session_grace);
        anyhow::ensure!(
            session_grace < ttl,
            "the session grace ({}) must be shorter than the ttl ({}): a crashed instance \
             would otherwise stay listed longer than a hung one",
            humantime::format_duration(session_grace),
            humantime::format_duration(ttl),
        );
        anyhow::ensure!(
            !heartbeat_interval.is_zero() && ttl > heartbeat_interval,
            "the ttl ({}) must be longer than the heartbeat interval ({}), or every instance \
             would be evicted between two heartbeats",
            humantime::format_duration(ttl),
            humantime::format_duration(heartbeat_interval),
        );
        let mut static_entries: Vec<(String, String)> = file
            .static_entries
            .into_iter()
            .flat_map(|(service, addrs)| addrs.into_iter().map(move |a| (service.clone(), a)))
            .collect();
        static_entries.extend(self.static_entries.iter().cloned());
        if !self.replicas.is_empty() {
            let mut replicas = self.replicas.clone();
            let this = self.addr.to_string();
            if !self.addr.ip().is_unspecified() && !replicas.contains(&this) {
                replicas.insert(0, this);
            }
            static_entries.extend(
                replicas
                    .into_iter()
                    .map(|r| (registry_client::REGISTRY_SERVICE.to_owned(), r)),
            );
        }
        let mut settings = file.settings;
        settings.extend(self.settings.iter().cloned());
        Ok(RegistryConfig {
            heartbeat_interval,
            ttl,
            session_grace,
            limits: Limits {
                max_instances_per_service: self.max_instances_per_service,
                max_instances: self.max_instances,
            },
            streams: StreamLimits {
                watches_per_peer: self.max_watches_per_peer,
                watches: self.max_watches,
                sessions_per_peer: self.max_sessions_per_peer,
                sessions: self.max_sessions,
            },
            static_entries,
            settings,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_static_entries_add_up() {
        let dir = std::env::temp_dir().join(format!("cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config-server.toml");
        std::fs::write(
            &path,
            "ttl = \"5s\"\nheartbeat_interval = \"2s\"\n[static]\nmessages = [\"127.0.0.1:50060\"]\n\
             [settings]\n\"logging.store\" = \"memory\"\n",
        )
        .expect("write");
        let path_arg = path.to_string_lossy().into_owned();
        let config = Config::parse_from([
            "config-server",
            "--config",
            &path_arg,
            "--ttl",
            "4s",
            "--static",
            "extra=127.0.0.1:1",
            "--set",
            "logging.store=nats://127.0.0.1:4222",
        ]);
        let registry = config.registry_config().expect("valid");
        assert_eq!(registry.ttl, Duration::from_secs(4));
        assert_eq!(registry.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(
            registry.static_entries,
            [
                ("messages".to_owned(), "127.0.0.1:50060".to_owned()),
                ("extra".to_owned(), "127.0.0.1:1".to_owned())
            ]
        );
        assert_eq!(registry.settings["logging.store"], "nats://127.0.0.1:4222");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn replicas_are_listed_as_the_config_server_service_this_one_included() {
        let config = Config::parse_from([
            "config-server",
            "--addr",
            "127.0.0.1:50150",
            "--replica",
            "127.0.0.1:50050,127.0.0.1:50250",
        ]);
        let registry = config.registry_config().expect("valid");
        let listed: Vec<&str> = registry
            .static_entries
            .iter()
            .filter(|(service, _)| service == "config-server")
            .map(|(_, address)| address.as_str())
            .collect();
        assert_eq!(
            listed,
            ["127.0.0.1:50150", "127.0.0.1:50050", "127.0.0.1:50250"]
        );
    }

    #[test]
    fn tls_files_come_from_the_flags_else_from_the_file() {
        let dir = std::env::temp_dir().join(format!("cfg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config-server.toml");
        std::fs::write(
            &path,
            "tls_cert = \"a.pem\"\ntls_key = \"a.key\"\ntls_ca = \"ca.pem\"\n[static]\n",
        )
        .expect("write");
        let path_arg = path.to_string_lossy().into_owned();
        let from_file = Config::parse_from(["config-server", "--config", &path_arg])
            .tls()
            .expect("valid");
        assert_eq!(from_file.tls_cert, Some(PathBuf::from("a.pem")));
        assert_eq!(from_file.tls_key, Some(PathBuf::from("a.key")));
        assert_eq!(from_file.tls_ca, Some(PathBuf::from("ca.pem")));
        let flags = Config::parse_from([
            "config-server",
            "--config",
            &path_arg,
            "--tls-cert",
            "b.pem",
            "--tls-key",
            "b.key",
            "--tls-ca",
            "ca2.pem",
        ])
        .tls()
        .expect("valid");
        assert_eq!(flags.tls_cert, Some(PathBuf::from("b.pem")));
        assert_eq!(flags.tls_ca, Some(PathBuf::from("ca2.pem")));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_ttl_not_longer_than_the_heartbeat_is_refused() {
        let config = Config::parse_from([
            "config-server",
            "--ttl",
            "500ms",
            "--heartbeat-interval",
            "1s",
        ]);
        let error = config.registry_config().expect_err("refused").to_string();
        assert!(error.contains("must be longer"), "{error}");
    }

    #[test]
    fn a_missing_explicit_config_file_is_an_error() {
        let config = Config::parse_from(["config-server", "--config", "/nonexistent/x.toml"]);
        assert!(config.registry_config().is_err());
    }

    #[test]
    fn pairs_need_a_key() {
        assert!(parse_pair("=x").is_err());
        assert!(parse_pair("novalue").is_err());
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
    }
}
