//! Notices between nodes: PUBLISH on one channel, and a background task per store that keeps a
//! subscription open (its own connection, reconnecting with bounded backoff) and feeds a
//! broadcast channel. Delivery is best effort by design (docs/design.md): a notice published while
//! the subscription is down is lost, and the org version on every settle is the guarantee.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::store::Notice;

/// The channel every node publishes to and listens on. In a cluster, classic pub/sub reaches
/// the subscribers of every node, so one subscription to any node hears every notice.
pub(super) const CHANNEL: &str = "creditd:notices";

/// First wait before reconnecting the subscription; doubled up to [`RECONNECT_DELAY_MAX`].
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(50);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);

/// How often a quiet subscription is checked with a PING, so that a connection that died
/// silently (a partition, a frozen server) is replaced instead of listening forever.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps a subscription to [`CHANNEL`] on one of `clients` (tried in turn) and sends every
/// notice received to `tx`. Runs until aborted (when the store is dropped).
pub(super) async fn subscriber(
    clients: Vec<redis::Client>,
    tx: broadcast::Sender<Notice>,
    call_timeout: Duration,
) {
    let mut delay = RECONNECT_DELAY_MIN;
    let mut turn = 0usize;
    loop {
        let client = &clients[turn % clients.len()];
        turn = turn.wrapping_add(1);
        match listen(client, &tx, call_timeout).await {
            Ok(()) => delay = RECONNECT_DELAY_MIN,
            Err(e) => tracing::warn!(error = %e, "redis notice subscription lost; reconnecting"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
    }
}

/// One subscription, until it fails. `Ok` when it had been established (the backoff restarts).
async fn listen(
    client: &redis::Client,
    tx: &broadcast::Sender<Notice>,
    call_timeout: Duration,
) -> Result<(), String> {
    crate::metrics::store_call("redis_subscribe");
    let pubsub = tokio::time::timeout(call_timeout, client.get_async_pubsub())
        .await
        .map_err(|_| format!("no connection within {}ms", call_timeout.as_millis()))?
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = pubsub.split();
    tokio::time::timeout(call_timeout, sink.subscribe(CHANNEL))
        .await
        .map_err(|_| format!("SUBSCRIBE took more than {}ms", call_timeout.as_millis()))?
        .map_err(|e| e.to_string())?;
    tracing::debug!(channel = CHANNEL, "subscribed to redis notices");
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.reset();
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    tracing::warn!("redis notice subscription closed; reconnecting");
                    return Ok(());
                };
                match serde_json::from_slice::<Notice>(message.get_payload_bytes()) {
                    // No receiver is not an error: nobody needs to hear it.
                    Ok(notice) => drop(tx.send(notice)),
                    Err(e) => tracing::warn!(error = %e, "ignored a malformed notice"),
                }
            }
            _ = ping.tick() => {
                crate::metrics::store_call("redis_ping");
                match tokio::time::timeout(call_timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("PING failed: {e}")),
                    Err(_) => {
                        return Err(format!(
                            "PING not answered within {}ms",
                            call_timeout.as_millis()
                        ))
                    }
                }
            }
        }
    }
}
