//! Layer 2: sans-IO broker logic.
//!
//! Topic matching and the trie, the route table and shard placement, sessions, retained
//! messages, the messages shards exchange, counters, and the per-shard [`engine::Engine`] that
//! ties them together. Nothing here performs I/O, reads a clock or imports glommio: every input
//! carries the current time, and tests drive it on a simulated clock.

pub mod acl;
pub mod auth;
pub mod ban;
pub mod engine;
pub mod gateway;
pub mod index;
pub mod message;
pub mod metrics;
pub mod msgs;
pub mod rate;
pub mod retained;
pub mod route;
pub mod session;
pub mod sink;
pub mod time;
pub mod topic;
pub mod trie;
