//! # ShardMQ
//!
//! An MQTT broker on a sharded thread-per-core runtime.
//!
//! # Layout
//!
//! Three crates, from the bottom up; a crate may use the ones below it, never the ones above,
//! and `scripts/check-layers.sh` fails CI when glommio or libc shows up under the lower two:
//!
//! 1. `shardmq-protocol`, re-exported as [`protocol`] — sans-IO codecs (MQTT 3.1/3.1.1). No
//!    sockets, no clock, no glommio.
//! 2. `shardmq-core`, re-exported as [`core`] — sans-IO broker logic: topics, trie, route table,
//!    sessions, retained messages, and the per-shard [`core::engine::Engine`] that ties them
//!    together. Driven by `handle_*` calls with an explicit time, drained by `poll_*` calls;
//!    configured by the plain [`core::engine::EngineConfig`].
//! 3. This crate — [`config`] loads and validates the layered configuration (compiled
//!    defaults, file, profile, environment) and derives the engine's settings from it;
//!    [`shard`] is the glommio runtime: executors pinned to CPUs, the clock, listeners,
//!    connection drivers, cross-shard channels; [`transport`] is what a connection's bytes
//!    travel over (plain TCP; TLS and WebSocket next), behind one seam.

pub mod admin;
pub mod auth;
pub mod config;
pub mod ctl;
pub mod gateway;
pub mod shard;
pub mod transport;

pub use shardmq_core as core;
pub use shardmq_protocol as protocol;
