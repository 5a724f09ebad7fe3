//! TLB maintenance backends for the agents other than the CPUs that walk a VM's stage-2 tables:
//! SMMUv3 (commands through the command queue) and SMMUv2 (context-bank registers). Both are
//! portable and host-tested; the CPU backend (TLBI instructions) lives with the arch code.

pub mod smmuv2;
pub mod smmuv3;

pub use smmuv2::{CbRegs, NoHooks, SmmuV2ContextTlb, V2Hooks};
pub use smmuv3::{CommandQueue, SmmuV3Tlb};
