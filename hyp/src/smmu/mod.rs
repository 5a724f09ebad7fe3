//! The SMMUs the hypervisor owns: what their ID registers say about the stage-2 tables they walk
//! ([`id`]), the SMMUv3 driver and formats ([`v3`]), and the emulated SMMUv3 each VM sees
//! ([`vsmmu`]).

pub mod id;
pub mod v3;
pub mod vsmmu;

pub use id::{SmmuCaps, read_caps};
