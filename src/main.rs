use clap::Parser;
use tracing_subscriber::EnvFilter;

use rivernode::cli::args::{Cli, Command};

fn main() {
    // containerd's shim starts us as the task log driver with its own argument order.
    let raw: Vec<String> = std::env::args().collect();
    if raw
        .iter()
        .any(|a| a == rivernode::runner::logdriver::MARKER)
    {
        std::process::exit(rivernode::runner::logdriver::main(&raw));
    }
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Host(_) | Command::Runner(_) | Command::Up(_)
    );
    // Daemons log at info; client commands only say something when it matters.
    let default = if daemon { "info" } else { "warn" };
    let filter =
        EnvFilter::try_from_env("RIVERNODE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(rivernode::cli::run(cli)) {
        // One line: the error and its causes, joined.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
