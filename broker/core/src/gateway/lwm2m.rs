//! The LwM2M gateway's sans-IO parts: the object registry that types the values devices send
//! ([`registry`]).

pub mod coap;
pub mod command;
pub mod registry;
pub mod server;
