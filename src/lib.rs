//! creditd: a credit-metering sidecar. A gateway asks it, per request, "may workspace W spend
//! N credits?"; it answers from memory and settles usage to its store in batches.
//!
//! # Layout
//!
//! - [`model`]: the product's rules (modes, Primary, transfers, deletion, conservation) as pure
//!   types and functions; no I/O.
//! - [`cache`]: the hot path, a sharded map of accounts debited by compare-and-swap on leases.
//! - [`store`]: the truth behind the cache, one trait; [`store::embedded`] (redb) is the default;
//!   [`store::export`] writes and reads every org as JSON lines (backups, moving stores).
//! - [`node`]: ties cache and store together: loading orgs, the settler, control-plane changes
//!   with lease recall, reservations and idempotency.
//! - [`api`]: the hyper server: data plane, control plane, metrics and health, and the web
//!   console's embedded files.
//! - [`config`]: settings from file and `CREDITD_*` variables, validated before start.
//! - [`cli`]: operator subcommands of the binary over the HTTP API, and [`cli::data`]: check,
//!   export, import, backup and restore of a store.
//! - [`metrics`]: every metric's name, type and help.
//! - [`server`]: wires them into a running process with a clean shutdown.

pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod model;
pub mod node;
pub mod server;
pub mod store;
