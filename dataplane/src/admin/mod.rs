//! The admin API: its HTTP server (`server`) and wire types, defined in
//! `kvroute-admin-api` so the control daemon shares them without linking the data plane.

pub mod server;

pub use kvroute_admin_api::{
    ClearApplied, ClearRequest, HotPrefix, HotPrefixes, LoadApplied, LoadUpdate, PushRecord,
    ReplicaLoad, ReplicaState, ReplicasUpdate, State, WorkerState,
};
