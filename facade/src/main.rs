use clap::Parser;
use facade::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log.log_format);
    facade::run(config, shutdown::on_signal()).await
}
