//! `blockrep`: the node daemon, in the foreground (what a systemd unit runs).
//! `blockrep-ctl up` starts it in the background when it is not running.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "blockrep",
    version,
    about = "blockrep node daemon (one per resource per node)"
)]
struct Args {
    /// The resource's config file (the same file on both nodes).
    #[arg(short = 'c', long)]
    config: PathBuf,
    /// This node's name in the config (default: the host name).
    #[arg(short = 'n', long)]
    node: Option<String>,
    /// Bring the resource up at start.
    #[arg(long)]
    up: bool,
}

/// Errors are logged in one line with their causes (`{:#}`), never printed as `Debug`: with
/// `RUST_BACKTRACE` set that appends a backtrace, and `blockrep-ctl up` shows only the tail
/// of the log, where the reason would then be cut off.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The subscriber is set up first thing in `run`, so this reaches the log.
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKREP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // Taken before any thread starts (it leaves the environment the handlers inherit).
    let notify = blockrep::notify::Notifier::take_from_env().map_err(|e| anyhow::anyhow!(e))?;
    let cfg = blockrep::config::Config::load(&args.config, args.node.as_deref())?;
    // One thread runs every task. A write's path hops between tasks (client reader, peer
    // sender, ack reader, reply writer); on one thread these hops are plain queue operations,
    // and work that arrives together is handled together (one send for many records). With a
    // thread per core, every hop woke the other thread: on two cores shared with the client
    // and the peer that was about half of the CPU a replicated 4 KiB write cost. Bulk copies
    // still run in parallel: large writes go to the kernel's io_uring workers (see engine),
    // blocking calls to tokio's blocking pool.
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("blockrep")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let daemon = blockrep::daemon::Daemon::new(cfg);
    let r = rt.block_on(daemon.run(args.up, notify));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    r
}
