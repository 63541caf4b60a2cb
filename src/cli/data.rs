//! Commands on a store's data, as opposed to the control plane of a running node:
//!
//! - `check`: verifies an embedded store's file offline (redb's integrity check on a copy,
//!   every record read back, every org's conservation).
//! - `export` / `import`: every org as JSON lines ([`crate::store::export`]) out of, and into
//!   an empty, store of either kind, opened with the same configuration as `serve` (`--config`,
//!   `CREDITD_*`, and `--store`, `--data-dir`, `--redis-url` on top).
//! - `backup` / `restore`: the same, from a running node (`GET /v1/admin/export`) and back into
//!   an empty store.
//!
//! Exit codes: 0 done; 1 failed (store unreachable, target not empty, node refused);
//! 64 usage or configuration; 65 ([`EXIT_DAMAGED`]) a damaged data file or export file.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;

use super::{client, BaseUrl, Remote, EXIT_FAILED};
use crate::config::{Config, StoreKind, EXIT_CONFIG};
use crate::server::{open_store, RunError, EXIT_DAMAGED};
use crate::store::embedded::EmbeddedStore;
use crate::store::export::{self, ImportError};
use crate::store::StoreError;

/// Which store a data command opens: the configuration of `serve`, with overrides.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// A TOML file like config/default.toml; CREDITD_* variables override it.
    #[arg(long, env = "CREDITD_CONFIG")]
    pub config: Option<PathBuf>,
    /// `embedded` or `redis` (overrides CREDITD_STORE).
    #[arg(long)]
    pub store: Option<String>,
    /// The embedded store's folder (overrides CREDITD_DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// One redis:// URL, or a comma-separated list of Redis Cluster seeds (overrides
    /// CREDITD_REDIS_URL).
    #[arg(long)]
    pub redis_url: Option<String>,
}

impl StoreArgs {
    fn load(&self) -> Result<Config, ExitCode> {
        let mut env: Vec<(String, String)> = std::env::vars().collect();
        let mut set = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                env.retain(|(k, _)| k != key);
                env.push((key.to_string(), value));
            }
        };
        set("CREDITD_STORE", self.store.clone());
        set(
            "CREDITD_DATA_DIR",
            self.data_dir.as_ref().map(|d| d.display().to_string()),
        );
        set("CREDITD_REDIS_URL", self.redis_url.clone());
        Config::load(self.config.as_deref(), env).map_err(|e| {
            eprintln!("creditd: {e}");
            ExitCode::from(EXIT_CONFIG as u8)
        })
    }
}

/// The data commands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Verify an embedded store's data file offline; exit 0 if sound, 65 if damaged.
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write every org of a store (not in use by a node, or Redis) as JSON lines.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// The file to write (default: standard output).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Load an export into an empty store of either kind (refuses a store holding any org).
    Import {
        #[command(flatten)]
        store: StoreArgs,
        /// The export to read.
        #[arg(long)]
        from: PathBuf,
    },
    /// Take a consistent backup of a running node's store (GET /v1/admin/export).
    Backup {
        #[command(flatten)]
        remote: Remote,
        /// The file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Bring a backup back into an empty store (stop the node first for the embedded store).
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        /// The backup to read.
        #[arg(long)]
        from: PathBuf,
    },
}

/// Runs one data command.
pub async fn run(command: DataCommand) -> ExitCode {
    match command {
        DataCommand::Check { store } => match store.load() {
            Ok(config) => check(&config),
            Err(code) => code,
        },
        DataCommand::Export { store, to } => match store.load() {
            Ok(config) => export_to(&config, to.as_deref()).await,
            Err(code) => code,
        },
        DataCommand::Import { store, from } | DataCommand::Restore { store, from } => {
            match store.load() {
                Ok(config) => import_from(&config, &from).await,
                Err(code) => code,
            }
        }
        DataCommand::Backup { remote, to } => backup(&remote, &to).await,
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("creditd: {message}");
    ExitCode::from(code)
}

fn store_failure(e: StoreError) -> ExitCode {
    match e {
        StoreError::Corrupt(m) => fail(EXIT_DAMAGED, m),
        other => fail(EXIT_FAILED, other),
    }
}

fn check(config: &Config) -> ExitCode {
    if config.store != StoreKind::Embedded {
        return fail(
            EXIT_CONFIG as u8,
            "check verifies the embedded store's file; this configuration uses redis",
        );
    }
    match EmbeddedStore::check(&config.data_dir) {
        Ok(report) => {
            println!(
                "ok: {}: {} orgs (each conserved), {} ledger entries, {} idempotency keys, {} bytes",
                config
                    .data_dir
                    .join(crate::store::embedded::DB_FILE)
                    .display(),
                report.orgs,
                report.ledger_entries,
                report.keys,
                report.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => store_failure(e),
    }
}

async fn open(config: &Config) -> Result<std::sync::Arc<dyn crate::store::Store>, ExitCode> {
    open_store(config).await.map_err(|e| match e {
        RunError::Damaged(m) => fail(EXIT_DAMAGED, m),
        other => fail(EXIT_FAILED, other),
    })
}

/// Writes `bytes` to `path` through a temporary file beside it: a reader never sees half a
/// file, and a failure leaves no file that looks like a finished export.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let temp = path.with_file_name(format!(".{name}.partial"));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

async fn export_to(config: &Config, to: Option<&Path>) -> ExitCode {
    let store = match open(config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut out = Vec::new();
    let orgs = match export::export(&*store, &mut out).await {
        Ok(n) => n,
        Err(e) => return store_failure(e),
    };
    match to {
        None => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(&out).and_then(|()| stdout.flush()) {
                return fail(EXIT_FAILED, format!("cannot write the export: {e}"));
            }
        }
        Some(path) => {
            if let Err(e) = write_atomically(path, &out) {
                return fail(EXIT_FAILED, format!("cannot write {}: {e}", path.display()));
            }
            eprintln!("exported {orgs} orgs to {}", path.display());
        }
    }
    ExitCode::SUCCESS
}

async fn import_from(config: &Config, from: &Path) -> ExitCode {
    // The whole file is read and checked before the store is even opened: a bad file
    // changes nothing.
    let dumps = match std::fs::File::open(from) {
        Ok(file) => match export::read(BufReader::new(file)) {
            Ok(d) => d,
            Err(e) => return fail(EXIT_DAMAGED, format!("{}: {e}", from.display())),
        },
        Err(e) => return fail(EXIT_FAILED, format!("cannot read {}: {e}", from.display())),
    };
    let store = match open(config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match export::import(&*store, &dumps).await {
        Ok(n) => {
            eprintln!(
                "imported {n} orgs from {} into the {} store",
                from.display(),
                store.kind()
            );
            ExitCode::SUCCESS
        }
        Err(ImportError::Store(e)) => fail(
            EXIT_FAILED,
            format!("{e}; the store may hold part of the export: empty it before retrying"),
        ),
        Err(e) => fail(EXIT_FAILED, e),
    }
}

async fn backup(remote: &Remote, to: &Path) -> ExitCode {
    let base = match BaseUrl::parse(&remote.url) {
        Ok(b) => b,
        Err(e) => return fail(EXIT_CONFIG as u8, e),
    };
    let answer = match client::send(
        &base,
        remote.token.as_deref(),
        Method::GET,
        "/v1/admin/export",
        None,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return fail(EXIT_FAILED, e),
    };
    if !answer.status.is_success() {
        let text = String::from_utf8_lossy(&answer.body);
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
        let message = parsed
            .as_ref()
            .and_then(|v| {
                Some(format!(
                    "{}: {}",
                    v["error"].as_str()?,
                    v["message"].as_str()?
                ))
            })
            .unwrap_or_else(|| format!("http_{}: {}", answer.status.as_u16(), text.trim()));
        return fail(EXIT_FAILED, format!("error: {message}"));
    }
    // A backup that cannot be restored is worse than none: it is read back first.
    let orgs = match export::read(answer.body.as_ref()) {
        Ok(d) => d.len(),
        Err(e) => {
            return fail(
                EXIT_FAILED,
                format!("the node's export does not read back ({e}); nothing written"),
            )
        }
    };
    if let Err(e) = write_atomically(to, &answer.body) {
        return fail(EXIT_FAILED, format!("cannot write {}: {e}", to.display()));
    }
    eprintln!(
        "backed up {orgs} orgs from {} to {}",
        base.authority,
        to.display()
    );
    ExitCode::SUCCESS
}
