use clap::Parser;
use config_server::{shutdown, telemetry};
use facade::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init();
    facade::run(config, shutdown::on_signal()).await
}
