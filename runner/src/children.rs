//! Child processes: started with their output prefixed by a coloured name, watched for
//! unexpected exits, and stopped politely (SIGTERM, then SIGKILL after a grace period).

use std::{
    io::IsTerminal,
    path::Path,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::Context;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::Command,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// How long a child gets to stop after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

const COLOURS: &[&str] = &["36", "33", "35", "32", "34", "91", "96", "93", "95", "92"];

/// A child that exited while it was not being stopped.
#[derive(Debug)]
pub struct Exited {
    pub name: String,
    pub status: std::io::Result<ExitStatus>,
}

pub struct Child {
    pub name: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts children and prints their output; every child reports an unexpected exit on
/// one channel.
pub struct Supervisor {
    exits_tx: mpsc::UnboundedSender<Exited>,
    pub exits: mpsc::UnboundedReceiver<Exited>,
    coloured: bool,
    started: usize,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Self {
            exits_tx,
            exits,
            coloured: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            started: 0,
        }
    }

    fn label(&self, name: &str) -> String {
        if self.coloured {
            let colour = COLOURS[self.started % COLOURS.len()];
            format!("\x1b[{colour}m{name:>14} |\x1b[0m")
        } else {
            format!("{name:>14} |")
        }
    }

    pub fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> anyhow::Result<Child> {
        let label = self.label(name);
        self.started += 1;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a Ctrl+C in the terminal reaches only the runner,
            // which then stops the children one by one, in reverse start order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, label.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, label));
        }
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let stop = CancellationToken::new();
        let exits = self.exits_tx.clone();
        let owned_name = name.to_owned();
        let stop_signal = stop.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let _ = exits.send(Exited { name: owned_name, status });
                }
                () = stop_signal.cancelled() => {
                    if let Some(pid) = pid {
                        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
                    }
                    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(Ok(status)) => println!("runner: {owned_name} stopped ({status})"),
                        Ok(Err(error)) => println!("runner: {owned_name}: {error}"),
                        Err(_) => {
                            println!("runner: {owned_name} did not stop within {STOP_GRACE:?}; killing it");
                            let _ = child.kill().await;
                        }
                    }
                }
            }
        });
        Ok(Child {
            name: name.to_owned(),
            stop,
            task,
        })
    }
}

impl Child {
    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn pump(stream: impl AsyncRead + Unpin, label: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{label} {line}");
    }
}
