//! The gateways' sans-IO state machines: each turns its protocol's frames into engine packets
//! for a connection with a packet sink, and the packets the engine has for it back into frames.
//! Their drivers (sockets, timers) live in the runtime, on the shard a profile pins them to.

pub mod lwm2m;
pub mod mqttsn;
pub mod tcp;
