//! # shardmq-protocol: layer 1, sans-IO codecs
//!
//! Everything here turns bytes into typed packets and back. No sockets, no clock reads, no
//! glommio (the crate does not depend on them, and `scripts/check-layers.sh` keeps it so): the
//! runtime feeds bytes in and writes out what comes back. Each decoder checks that a frame is
//! complete and within the configured size before it allocates, and treats "not enough bytes
//! yet" as `Ok(None)`, never as an error.
//!
//! [`units`] is the text grammar of durations and sizes that the broker's configuration and the
//! load generator's scenario files share.

pub mod bytestr;
pub mod lwm2m;
pub mod mqtt;
pub mod mqttsn;
pub mod tcpgw;
pub mod units;
