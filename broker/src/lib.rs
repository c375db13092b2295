//! # ShardMQ
//!
//! An MQTT broker on a sharded thread-per-core runtime.
//!
//! # Layout
//!
//! From the bottom up; a layer may use the ones below it, never the ones above:
//!
//! 1. [`protocol`] — sans-IO codecs (MQTT 3.1/3.1.1). No sockets, no clock, no glommio.
//! 2. [`core`] — sans-IO broker logic: topics, trie, route table, sessions, retained messages,
//!    and the per-shard [`core::engine::Engine`] that ties them together. Driven by `handle_*`
//!    calls with an explicit time, drained by `poll_*` calls.
//! 3. [`shard`] — the glommio runtime: executors pinned to CPUs, listeners, connection drivers,
//!    cross-shard channels.
//!
//! [`config`] loads and validates the layered configuration (compiled defaults, file, profile,
//! environment); it holds plain data that every layer reads.

pub mod config;
pub mod core;
pub mod protocol;
pub mod shard;
