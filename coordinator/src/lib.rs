//! tandem's coordinator: two-phase commit with a durable decision log.
//! [`core`] is the protocol with no I/O; [`node`] drives it over gRPC and
//! RocksDB; [`log`] is the decision log's record format; [`directory`] says
//! which participant owns which account.

pub mod core;
pub mod directory;
pub mod log;
pub mod node;
pub mod saga;
mod saga_node;
mod traces;
pub mod watermark;

#[cfg(test)]
mod proptests;
