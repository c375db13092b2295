//! Layer 1: sans-IO protocol codecs.
//!
//! Everything here turns bytes into typed packets and back. No sockets, no clock reads, no
//! glommio: the shard layer feeds bytes in and writes out what comes back. Each decoder checks
//! that a frame is complete and within the configured size before it allocates, and treats
//! "not enough bytes yet" as `Ok(None)`, never as an error.

pub mod bytestr;
pub mod mqtt;
