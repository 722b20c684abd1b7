//! Child processes: started with their output prefixed by a coloured name (or kept in a
//! log file, with only their problems shown), watched for unexpected exits, and stopped
//! politely (their stop signal, then SIGKILL after a grace period).

use std::{
    io::{IsTerminal, Write},
    path::Path,
    process::{ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::Command,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// How long a child gets to stop after its stop signal before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

const COLOURS: &[&str] = &["36", "33", "35", "32", "34", "91", "96", "93", "95", "92"];

/// nats-server's log levels worth a person's attention.
const PROBLEMS: &[&str] = &["[WRN]", "[ERR]", "[FTL]"];
/// Warnings nats-server 2.15 logs in routine operation (a snapshot of the cluster's
/// metadata, twice per node at start-up and now and then after), kept in the log file only.
const ROUTINE: &[&str] = &["Metalayer blocking snapshot"];

/// Whether a nats-server log line goes to the terminal as well as to its file.
fn worth_showing(line: &str) -> bool {
    PROBLEMS.iter().any(|p| line.contains(p)) && !ROUTINE.iter().any(|r| line.contains(r))
}

/// A child that exited while it was not being stopped.
#[derive(Debug)]
pub(crate) struct Exited {
    pub(crate) name: String,
    pub(crate) status: std::io::Result<ExitStatus>,
}

impl Exited {
    pub(crate) fn describe(&self) -> String {
        match &self.status {
            Ok(status) => status.to_string(),
            Err(error) => error.to_string(),
        }
    }
}

/// Where a child's output goes.
pub(crate) enum Output {
    /// Every line to the terminal, prefixed with the child's name.
    Terminal,
    /// Every line to a log file; warnings and errors also to the terminal, prefixed,
    /// but only once [`Child::started`] says start-up noise is over (a forming cluster
    /// logs connection errors that mean nothing).
    LogFile {
        file: tokio::fs::File,
        show_problems: Arc<AtomicBool>,
    },
}

impl Output {
    /// A fresh log file at `path`, problems shown after start-up.
    pub(crate) fn problems_after_start(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot write the log file {}", path.display()))?;
        Ok(Self::LogFile {
            file: tokio::fs::File::from_std(file),
            show_problems: Arc::new(AtomicBool::new(false)),
        })
    }
}

pub(crate) struct Child {
    pub(crate) name: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
    show_problems: Option<Arc<AtomicBool>>,
}

/// Starts children and prints their output; every child reports an unexpected exit on
/// one channel.
pub(crate) struct Supervisor {
    exits_tx: mpsc::UnboundedSender<Exited>,
    pub(crate) exits: mpsc::UnboundedReceiver<Exited>,
    coloured: bool,
    started: usize,
}

impl Supervisor {
    pub(crate) fn new() -> Self {
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

    pub(crate) fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        output: Output,
        stop_signal: Signal,
    ) -> anyhow::Result<Child> {
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
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let show_problems = match output {
            Output::Terminal => {
                if let Some(out) = stdout {
                    tokio::spawn(to_terminal(out, label.clone()));
                }
                if let Some(err) = stderr {
                    tokio::spawn(to_terminal(err, label));
                }
                None
            }
            Output::LogFile {
                file,
                show_problems,
            } => {
                // nats-server writes its log to stderr; both streams go to the one file.
                let (lines_tx, lines) = mpsc::unbounded_channel();
                if let Some(out) = stdout {
                    tokio::spawn(read_lines(out, lines_tx.clone()));
                }
                if let Some(err) = stderr {
                    tokio::spawn(read_lines(err, lines_tx));
                }
                tokio::spawn(to_log_file(lines, file, label, Arc::clone(&show_problems)));
                Some(show_problems)
            }
        };
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let stop = CancellationToken::new();
        let exits = self.exits_tx.clone();
        let owned_name = name.to_owned();
        let stop_requested = stop.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let _ = exits.send(Exited { name: owned_name, status });
                }
                () = stop_requested.cancelled() => {
                    if let Some(pid) = pid {
                        let _ = nix::sys::signal::kill(pid, stop_signal);
                    }
                    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(Ok(status)) if status.success() => println!("runner: {owned_name} stopped"),
                        Ok(Ok(status)) => println!("runner: {owned_name} stopped with an error ({status})"),
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
            show_problems,
        })
    }
}

impl Child {
    /// Start-up is over: from now on a log-file child's problems reach the terminal.
    pub(crate) fn started(&self) {
        if let Some(show) = &self.show_problems {
            show.store(true, Ordering::Relaxed);
        }
    }

    /// Its stop signal, wait up to [`STOP_GRACE`], then SIGKILL.
    pub(crate) async fn stop(self) {
        println!("runner: stopping {}", self.name);
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Copies a child's output to the runner's, every line behind `label`, in order: the
/// lines that have arrived go out in one write (a `println!` per line cost the runner
/// about 10 µs per POST under load, logging printing every message), and a last line
/// without a newline is printed when the child's output ends. Bytes pass as they are.
async fn to_terminal(stream: impl AsyncRead + Unpin, label: String) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut lines = Lines::new(&label);
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ => break,
        };
        let read = chunk.len();
        let out = lines.take(chunk);
        reader.consume(read);
        write_stdout(out);
    }
    write_stdout(lines.finish());
}

fn write_stdout(bytes: &[u8]) {
    if !bytes.is_empty() {
        let _ = std::io::stdout().lock().write_all(bytes);
    }
}

/// Splits output into lines and puts a label before each, across reads that end
/// mid-line.
struct Lines {
    label: Vec<u8>,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    out: Vec<u8>,
}

/// A line longer than this is cut, so a child that never ends its line cannot make the
/// runner hold its output.
const LONGEST_LINE: usize = 64 * 1024;

impl Lines {
    fn new(label: &str) -> Self {
        Self {
            label: format!("{label} ").into_bytes(),
            partial: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Every line `chunk` completes, labelled, ready to write.
    fn take(&mut self, chunk: &[u8]) -> &[u8] {
        self.out.clear();
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.out.extend_from_slice(&self.label);
            self.out.append(&mut self.partial);
            self.out.extend_from_slice(&rest[..=end]);
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > LONGEST_LINE {
            self.cut();
        }
        &self.out
    }

    /// The last line, if it had no newline.
    fn finish(&mut self) -> &[u8] {
        self.out.clear();
        if !self.partial.is_empty() {
            self.cut();
        }
        &self.out
    }

    fn cut(&mut self) {
        self.out.extend_from_slice(&self.label);
        self.out.append(&mut self.partial);
        self.out.push(b'\n');
    }
}

/// Sends a child's output line by line; bytes that are not UTF-8 become U+FFFD, so such
/// a line neither ends the relay nor leaves the child blocked on a full pipe.
async fn read_lines(stream: impl AsyncRead + Unpin, lines_tx: mpsc::UnboundedSender<String>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if lines_tx
            .send(String::from_utf8_lossy(text).into_owned())
            .is_err()
        {
            return;
        }
    }
}

async fn to_log_file(
    mut lines: mpsc::UnboundedReceiver<String>,
    mut file: tokio::fs::File,
    label: String,
    show_problems: Arc<AtomicBool>,
) {
    let mut writable = true;
    while let Some(line) = lines.recv().await {
        if show_problems.load(Ordering::Relaxed) && worth_showing(&line) {
            println!("{label} {line}");
        }
        if writable {
            let written = file.write_all(format!("{line}\n").as_bytes()).await;
            if let Err(error) = written {
                println!("{label} cannot write its log file any more: {error}");
                writable = false;
            }
        }
    }
    let _ = file.flush().await;
}

/// Prints the last `count` lines of a log file, for when a child that logs to a file
/// failed to start.
pub(crate) fn print_tail(path: &Path, count: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    println!("runner: last lines of {}:", path.display());
    for line in &lines[lines.len().saturating_sub(count)..] {
        println!("  {line}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn nats_problems_reach_the_terminal_and_routine_warnings_do_not() {
        let line = |text: &str| format!("[30084] 2026/11/27 16:58:46.562664 {text}");
        assert!(worth_showing(&line("[ERR] Error listening on router port")));
        assert!(worth_showing(&line(
            "[WRN] JetStream cluster stream has no quorum"
        )));
        assert!(!worth_showing(&line("[INF] Server is ready")));
        assert!(!worth_showing(&line(
            "[WRN] Metalayer blocking snapshot starting"
        )));
        assert!(!worth_showing(&line(
            "[WRN] Metalayer blocking snapshot took 0.001s (streams: 2, consumers: 0)"
        )));
    }

    #[test]
    fn output_is_labelled_line_by_line_across_reads() {
        let mut lines = Lines::new("[a] |");
        let mut out = Vec::new();
        for chunk in [&b"one\ntw"[..], b"o\n", b"", b"three\nfour\nfi", b"ve"] {
            out.extend_from_slice(lines.take(chunk));
        }
        out.extend_from_slice(lines.finish());
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "[a] | one\n[a] | two\n[a] | three\n[a] | four\n[a] | five\n"
        );
        // Not UTF-8: passed on as it is (reading lines as strings stopped the relay
        // there, and the child then blocked once its pipe was full).
        let mut bytes = Lines::new("x");
        assert_eq!(bytes.take(b"\xff\xfe\n"), b"x \xff\xfe\n");
        let mut long = Lines::new("x");
        let cut = long.take(&vec![b'y'; LONGEST_LINE + 1]).to_vec();
        assert_eq!(
            cut,
            [&b"x "[..], &vec![b'y'; LONGEST_LINE + 1], b"\n"].concat(),
            "a line too long is cut and labelled"
        );
        assert!(long.finish().is_empty());
    }

    #[tokio::test]
    async fn a_log_file_child_keeps_everything_in_its_file() {
        let dir = std::env::temp_dir().join(format!("runner-children-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log: PathBuf = dir.join("child.log");
        let mut supervisor = Supervisor::new();
        let child = supervisor
            .spawn(
                "printer",
                Path::new("/bin/sh"),
                &[
                    "-c".into(),
                    "printf 'bad \\377\\n'; echo '[INF] one'; echo '[ERR] two' >&2".into(),
                ],
                Output::problems_after_start(&log).expect("log file"),
                Signal::SIGTERM,
            )
            .expect("spawn");
        let exit = supervisor.exits.recv().await.expect("exit reported");
        assert!(exit.status.expect("status").success());
        // The writer finishes once both pipes close; wait on the file, bounded.
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        testkit::eventually(
            Duration::from_secs(2),
            "three lines in the log file",
            || {
                let lines = read().lines().count();
                async move { lines == 3 }
            },
        )
        .await;
        let text = read();
        assert!(
            text.contains("bad \u{fffd}")
                && text.contains("[INF] one")
                && text.contains("[ERR] two"),
            "{text}"
        );
        drop(child);
        std::fs::remove_dir_all(dir).ok();
    }
}
