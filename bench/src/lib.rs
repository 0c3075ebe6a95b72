//! tandem's benchmark harness. [`scenario`] says what to run, [`workload`]
//! drives it, [`run`] launches the cluster and the faults around it,
//! [`check`] verifies the invariants afterwards, [`calibrate`] measures the
//! machine's floors in the same run, and [`report`] writes what a person
//! reads. [`postgres`] runs the same workload against PostgreSQL, as
//! baselines beside tandem's protocols.

pub mod calibrate;
pub mod check;
pub mod counters;
pub mod operator;
pub mod postgres;
pub mod report;
pub mod run;
pub mod scenario;
pub mod workload;
