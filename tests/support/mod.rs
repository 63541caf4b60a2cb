//! Harnesses shared by integration tests that need real servers.
#![allow(dead_code)]

pub mod redis;
