//! The SMMUs the hypervisor owns. For now: what their ID registers say about the stage-2 tables
//! they will walk (output address size, break-before-make level, coherent walks), which decides
//! the IPA size and the split policy of every VM's stage 2. The drivers come with the SMMU issue.

pub mod id;

pub use id::{SmmuCaps, read_caps};
