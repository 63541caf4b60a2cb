//! The `creditd` binary: parse the command line, load the configuration, start tracing and
//! metrics, run until SIGTERM/SIGINT, exit with a meaningful code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use creditd::config::{Config, LogFormat, EXIT_CONFIG};
use creditd::server::Server;

#[derive(Parser)]
#[command(
    name = "creditd",
    version,
    about = "Credit-metering sidecar for API gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default). Without --config it runs the embedded single-node default.
    Serve {
        /// A TOML file like config/default.toml; CREDITD_* variables override it.
        #[arg(long, env = "CREDITD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Exit 0 if the node at CREDITD_LISTEN answers /readyz with 200 (for container health checks).
    Healthcheck {
        #[arg(long, env = "CREDITD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Operator commands against a running node: org, credits, workspace, transfer, mode,
    /// ledger (see `creditd help <command>`).
    #[command(flatten)]
    Operator(creditd::cli::Operator),
    /// Data commands: check, export, import, backup, restore.
    #[command(flatten)]
    Data(creditd::cli::data::DataCommand),
}

fn load(config: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(config.as_deref(), std::env::vars()).map_err(|e| {
        eprintln!("creditd: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // A usage error exits 64 (EX_USAGE) like a bad configuration, not clap's 2; --help and
    // --version still exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.exit_code() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CONFIG as u8)
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("creditd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::Serve { config } => {
            let config = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(serve(config))
        }
        Command::Healthcheck { config } => {
            let config = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(creditd::cli::healthcheck(&config))
        }
        Command::Operator(operator) => runtime.block_on(creditd::cli::run(operator)),
        Command::Data(command) => runtime.block_on(creditd::cli::data::run(command)),
    }
}

async fn serve(config: Config) -> ExitCode {
    init_tracing(config.log_format);
    let metrics = match creditd::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the metrics recorder");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config, metrics).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(e.exit_code());
        }
    };
    wait_for_signal().await;
    tracing::info!("stopping: draining connections, settling, returning leases");
    match server.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped with unsettled state");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
