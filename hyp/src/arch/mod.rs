//! Everything AArch64-specific: boot code, exception vectors and world switch, system registers,
//! the EL2 MMU, the physical GIC, the EL2 timer, PSCI and semihosting. Nothing outside this module
//! touches a system register or contains assembly, so the rest of the hypervisor builds and is
//! tested on the host.

pub mod boot;
pub mod exceptions;
pub mod gic;
pub mod ich;
pub mod mmu;
pub mod platform;
pub mod sysreg;
pub mod tlb;
pub mod vcpu;
