//! tandem's participant: the ledger of one bank shard. [`core`] is the
//! protocol with no I/O; [`node`] drives it over gRPC and RocksDB.

pub mod core;
pub mod node;
pub mod saga;
