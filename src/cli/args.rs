//! The operator commands' arguments, as clap parses them.

use clap::{Args, Subcommand};

use super::DEFAULT_URL;
use crate::model::Mode;

/// How to reach the node; every operator command takes these, before or after its arguments.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The node's base URL, http://HOST:PORT.
    #[arg(long, global = true, env = "CREDITD_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// The admin token (sent as Authorization: Bearer).
    #[arg(
        long,
        global = true,
        env = "CREDITD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A credit mode argument: the model's own names (`shared`, `budget`).
fn mode_arg() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Mode::ALL.map(Mode::as_str))
        .map(|s: String| Mode::parse(&s).expect("clap accepts only the modes' names"))
}

/// The control-plane commands (docs/api.md, "Control plane").
#[derive(Debug, Subcommand)]
pub enum Operator {
    /// Create or show an org.
    Org {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Add credits to an org; they land in its Primary Workspace.
    Credits {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Create or delete a workspace.
    Workspace {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// Move credits between two workspaces of a budget-mode org.
    Transfer {
        #[command(flatten)]
        remote: Remote,
        /// The org id.
        org: String,
        /// The workspace giving the credits.
        from: String,
        /// The workspace receiving them.
        to: String,
        /// Credits, an integer from 1 to 10^15.
        amount: u64,
        /// Change nothing; show the balances as they would be.
        #[arg(long)]
        dry_run: bool,
        /// Retrying with the same key moves the credits once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Switch an org's credit mode.
    Mode {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ModeCommand,
    },
    /// Show an org's ledger, oldest first, one page at a time.
    Ledger {
        #[command(flatten)]
        remote: Remote,
        /// The org id.
        org: String,
        /// Entries per page (the node's default is 100).
        #[arg(long)]
        limit: Option<u64>,
        /// Cursor: the `next` of the previous page.
        #[arg(long)]
        after: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an org with its Primary Workspace.
    Create {
        /// The org id.
        org: String,
        /// Credit mode: shared (every workspace spends from the Primary's balance) or budget
        /// (each workspace spends only its own); the node's default: shared.
        #[arg(long, value_parser = mode_arg())]
        mode: Option<Mode>,
        /// Name of the Primary Workspace (the node's default: primary).
        #[arg(long)]
        primary: Option<String>,
    },
    /// Show the org view: figures and every workspace.
    Show {
        /// The org id.
        org: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add (purchase) credits.
    Add {
        /// The org id.
        org: String,
        /// Credits, an integer from 1 to 10^15.
        amount: u64,
        /// Retrying with the same key adds the credits once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Add a workspace (balance 0).
    Create {
        /// The org id.
        org: String,
        /// The new workspace id.
        workspace: String,
    },
    /// Delete a workspace; its credits return to the Primary.
    Delete {
        /// The org id.
        org: String,
        /// The workspace to delete (never the Primary).
        workspace: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModeCommand {
    /// Set the mode: budget -> shared sweeps every balance into the Primary.
    Set {
        /// The org id.
        org: String,
        /// shared or budget.
        #[arg(value_parser = mode_arg())]
        mode: Mode,
    },
}
