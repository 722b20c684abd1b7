use clap::Parser;
use config_server::shutdown;
use runner::Config;

#[tokio::main]
async fn main() {
    let config = Config::parse();
    if let Err(error) = runner::run(config, shutdown::on_signal()).await {
        eprintln!("runner: error: {error:#}");
        std::process::exit(1);
    }
}
