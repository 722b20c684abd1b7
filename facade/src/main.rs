use clap::Parser;
use facade::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if config.print_openapi {
        println!("{}", facade::http_api::openapi().to_pretty_json()?);
        return Ok(());
    }
    telemetry::init(config.log.log_format);
    facade::run(config, shutdown::on_signal()).await
}
