//! Layer 3: the glommio runtime.
//!
//! One executor per configured CPU ([`runtime`]), each owning an [`crate::core::engine::Engine`]
//! behind an `Rc<RefCell<_>>` that only its own tasks touch: the accept loops ([`listener`]),
//! one driver task per connection ([`connection`]), the cross-shard receive and flush tasks
//! ([`mesh`]), a timer task and a stats task; the first MQTT shard also publishes the `$SYS/`
//! tree ([`sys`]). Nothing is shared between shards except the channels, the shutdown flag,
//! the stats snapshots ([`stats`]) and each shard's mailbox of requests from the admin API
//! ([`control`]).

pub mod clock;
pub mod connection;
pub mod control;
pub mod listener;
pub mod mesh;
pub mod park;
pub mod runtime;
pub mod stats;
pub mod sys;

pub use runtime::{start, BrokerHandle, Shards, StartError};
pub use stats::ShardStats;
