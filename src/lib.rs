//! tandem's shared library: the gRPC code generated from `proto/`, the domain
//! types every binary uses, the error type that classifies failures, the
//! group-committing RocksDB store, and the plumbing every server shares
//! (health, reflection, tracing, graceful shutdown, mutual TLS and the role
//! of every caller, a node's configuration from flags, environment and
//! file), and the local-cluster launcher with its link proxies and
//! throw-away CA.
//!
//! Protobuf stays at the edge: the protocol cores in `coordinator` and
//! `participant` see only the types of [`domain`]; [`pb`] and its conversions
//! are used by the thin gRPC handlers.

pub mod clock;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod crash;
pub mod domain;
pub mod error;
pub mod health;
pub mod local_ca;
pub mod metrics;
pub mod net;
pub mod pb;
pub mod proxy;
pub mod reflection;
pub mod rng;
pub mod server;
pub mod store;
pub mod tls;
pub mod trace;
pub mod trust;

pub use error::Error;
