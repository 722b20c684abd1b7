use clap::Parser;
use logging::Config;

/// mimalloc rather than glibc's malloc, which gives threads that meet contention arenas
/// of their own, up to eight per core, and keeps what is freed in each: full reads of
/// 60 KiB texts on every worker thread left an instance up to 175 MiB larger than
/// before them (`e2e/tests/abuse.rs` allows 64 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log.log_format);
    logging::run(config, shutdown::on_signal()).await
}
