//! A running creditd: store, node, settler and HTTP server, started together and stopped in
//! order (stop accepting, let connections finish, settle everything, mark a clean stop).

use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiOptions, App};
use crate::config::{Config, StoreKind};
use crate::node::{Node, NodeError, NodeOptions};
use crate::store::embedded::{EmbeddedOptions, EmbeddedStore};
use crate::store::redis::{RedisOpenError, RedisOptions, RedisStore};
use crate::store::{Store, StoreError};

/// Why creditd could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The embedded store's file is damaged or unreadable: exit [`EXIT_DAMAGED`].
    #[error("{0}")]
    Damaged(String),
    #[error("cannot open the redis store: {0}")]
    Redis(#[from] RedisOpenError),
    #[error("cannot start the node: {0}")]
    Node(#[from] NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The server task panicked or was cancelled.
    #[error("the server task failed: {0}")]
    TaskFailed(#[from] tokio::task::JoinError),
}

/// Exit code of a start refused because the embedded store's data file is damaged or
/// unreadable (EX_DATAERR); 64 is a bad configuration, 1 any other failure.
pub const EXIT_DAMAGED: u8 = 65;

impl RunError {
    /// The process's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Damaged(_) => EXIT_DAMAGED,
            _ => 1,
        }
    }
}

/// A started creditd.
pub struct Server {
    addr: SocketAddr,
    node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

/// Opens the store named by the configuration.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, RunError> {
    match config.store {
        StoreKind::Embedded => {
            let options = EmbeddedOptions {
                idempotency_keys_max: config.idempotency_keys_max,
                idempotency_ttl: config.idempotency_ttl,
                cache_bytes: config.embedded_cache_bytes,
                ledger_retain: config.ledger_retain,
            };
            match EmbeddedStore::open(&config.data_dir, options) {
                Ok(store) => Ok(Arc::new(store)),
                Err(StoreError::Corrupt(why)) => Err(RunError::Damaged(why)),
                Err(e) => Err(e.into()),
            }
        }
        StoreKind::Redis => Ok(Arc::new(
            RedisStore::open(RedisOptions::from_config(config)).await?,
        )),
    }
}

impl Server {
    /// Opens the store, starts the node, binds the listener and starts serving.
    pub async fn start(
        config: Config,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Server, RunError> {
        let store = open_store(&config).await?;
        let node = Node::start(store, config.node(), NodeOptions::from_config(&config)).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
        let app = Arc::new(App {
            node: Arc::clone(&node),
            options: ApiOptions::from_config(&config),
            metrics,
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task_node = Arc::clone(&node);
        let task = tokio::spawn(async move {
            let (settler_stop_tx, settler_stop_rx) = oneshot::channel::<()>();
            let settler = tokio::spawn(Arc::clone(&task_node).run_settler(
                config.settle_interval,
                async {
                    let _ = settler_stop_rx.await;
                },
            ));
            let shutdown = async {
                let _ = stop_rx.await;
                // Readiness goes 503 first, so that load balancers stop sending.
                task_node.set_unready();
            };
            api::serve(listener, app, shutdown, config.shutdown_grace).await;
            let _ = settler_stop_tx.send(());
            let _ = settler.await;
            task_node.stop(config.shutdown_grace).await?;
            tracing::info!("stopped cleanly: every usage settled, every lease returned");
            Ok(())
        });
        tracing::info!(%addr, store = node.store_kind(), node = %node.node_id(), epoch = node.epoch(), "creditd listening");
        Ok(Server {
            addr,
            node,
            stop: Some(stop_tx),
            task,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Stops: no new connections, open ones finish within the grace period, everything is
    /// settled and leases are returned.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await?
    }
}
