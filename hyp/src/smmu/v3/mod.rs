//! SMMUv3: register layout, table and queue formats, the lock-free command queue and the driver
//! through which the hypervisor owns the physical SMMU.

pub mod cmd;
pub mod cmdq;
pub mod driver;
pub mod event;
#[cfg(test)]
pub(crate) mod model;
pub mod regs;
pub mod ste;
