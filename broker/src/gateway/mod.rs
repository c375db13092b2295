//! The gateways' drivers: sockets and tasks on the shard a profile pins each gateway to. The
//! protocols themselves are sans-IO state machines in the core crate
//! ([`crate::core::gateway`]); a gateway's clients are engine connections with a packet sink,
//! so routing, retained, wills, authentication, ACL, takeover, metrics and `$SYS` events treat
//! them as any client.

pub mod tcp;
