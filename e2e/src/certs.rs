//! What `runner certs` writes, for tests: made by the real command, and read through
//! the runner's own names for a host folder's files (`runner::certs`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// Runs `runner certs --out DIR/certs` with `hosts` (`NAME=ADDR,...` each); returns
    /// the folder and what the command printed.
    pub fn make(dir: &Path, hosts: &[String]) -> (Self, String) {
        let out = dir.join("certs");
        let mut command = Command::new(crate::bin("runner"));
        command.args(["certs", "--out"]).arg(&out);
        for host in hosts {
            command.args(["--host", host]);
        }
        let output = command.output().expect("runner certs runs");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "runner certs: {printed}");
        (Self { dir: out }, printed)
    }

    /// The CA certificate.
    pub fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// File `name` of `host`'s folder.
    pub fn file(&self, host: &str, name: &str) -> String {
        runner::certs::host_file(&self.dir.join(host), name)
    }

    /// The TLS flags of our binaries, for `service` on `host`.
    pub fn flags(&self, host: &str, service: &str) -> Vec<String> {
        runner::certs::flags(&self.dir.join(host), service)
    }

    /// Calls made with `service@host`'s certificate.
    pub fn transport(&self, host: &str, service: &str) -> rpc::Transport {
        rpc::Tls::load(
            Path::new(&self.file(host, &format!("{service}.pem"))),
            Path::new(&self.file(host, &format!("{service}.key"))),
            Path::new(&self.ca()),
        )
        .expect("certificates load")
        .transport()
    }

    /// The nkey seed in `path`, relative to the folder (`a/logging.nk`, `admin.nk`).
    pub fn seed(&self, path: &str) -> String {
        std::fs::read_to_string(self.dir.join(path))
            .expect("an nkey file")
            .trim()
            .to_owned()
    }
}
