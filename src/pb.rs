//! Generated protobuf and gRPC code (package `tandem.v1`) and the conversions
//! between it and the domain types.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tandem.v1");

/// The encoded descriptor set of every tandem proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_descriptor");

use crate::domain;

impl From<domain::Leg> for Leg {
    fn from(leg: domain::Leg) -> Self {
        Leg { account: leg.account, amount: leg.amount }
    }
}

impl From<&Leg> for domain::Leg {
    fn from(leg: &Leg) -> Self {
        domain::Leg { account: leg.account, amount: leg.amount }
    }
}
