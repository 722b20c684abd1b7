use clap::Parser;
use config_server::Config;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log.log_format);
    config_server::run(config, shutdown::on_signal()).await
}
