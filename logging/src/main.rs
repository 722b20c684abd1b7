use clap::Parser;
use logging::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log.log_format);
    logging::run(config, shutdown::on_signal()).await
}
