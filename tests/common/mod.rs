//! The one test harness of the black-box tests: creditd on 127.0.0.1:0 (in this process or as
//! the real binary), an HTTP/1.1 client for it, real `redis-server`s and a WebDriver client
//! for the tests that need them, the repository's YAML files, and one way to wait.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod cluster;
pub mod process;
pub mod redis;
pub mod views;
pub mod webdriver;
pub mod yaml;

use std::time::{Duration, Instant};

pub use client::{Answer, Client};
pub use process::*;
pub use views::*;

/// The control-plane token every test node is configured with.
pub const TOKEN: &str = "test-admin-token";

/// Polls `check` until it returns true or `limit` passes (then fails the test with `what`).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(limit, what, || {
        let answer = check();
        async move { answer.await.then_some(()) }
    })
    .await
}

/// Polls `f` until it gives `Some` or `limit` passes (then fails the test with `what`); the
/// value it gave.
pub async fn eventually_some<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
