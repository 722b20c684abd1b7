use clap::Parser;
use messages::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log.log_format);
    messages::run(config, shutdown::on_signal()).await
}
