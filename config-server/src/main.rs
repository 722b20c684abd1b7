use clap::Parser;
use config_server::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let runtime = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        threads => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads.into());
            builder
        }
    }
    .enable_all()
    .build()?;
    runtime.block_on(async {
        telemetry::init(config.log.log_format);
        config_server::run(config, shutdown::on_signal()).await
    })
}
