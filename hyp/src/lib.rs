//! The EL2 hypervisor.
//!
//! Everything outside [`arch`] is portable: it builds and is unit-tested on the host
//! (`cargo test -p hyp`). [`arch`] holds the AArch64-only parts (system registers, assembly,
//! exception vectors, GIC, timer) and only exists when building for the bare-metal target.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod arch;
pub mod config;
pub mod console;
pub mod dt;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod hypervisor;
pub mod mm;
pub mod power;
pub mod run;
pub mod smmu;
pub mod trap;
pub mod vdev;
pub mod vgic;
