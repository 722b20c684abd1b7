use clap::Parser;
use runner::{certs, Command, Config, STOP_GRACE};
use shutdown::Received;

#[tokio::main]
async fn main() {
    let config = Config::parse();
    if let Some(Command::Certs(args)) = &config.command {
        match certs::write(args) {
            Ok(written) => certs::print(&written),
            Err(error) => {
                eprintln!("runner: error: {error:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    let shutdown = shutdown::on_signal_with(|received| match received {
        Received::First(signal) => println!("runner: {signal}: stopping everything"),
        Received::Again(signal) => println!(
            "runner: {signal} again: still stopping; each child gets {STOP_GRACE:?} before kill -9"
        ),
    });
    if let Some(Command::Lab(args)) = config.command {
        match runner::lab::run(args, shutdown).await {
            Ok(true) => return,
            Ok(false) => std::process::exit(1),
            Err(error) => {
                eprintln!("runner: lab: error: {error:#}");
                std::process::exit(1);
            }
        }
    }
    if let Err(error) = runner::run(config, shutdown).await {
        eprintln!("runner: error: {error:#}");
        std::process::exit(1);
    }
}
