//! Portable guest-trap logic: everything the EL2 exception path needs that is not a system
//! register access, so it is unit-tested on the host.
//!
//! The arch layer saves the guest's registers, reads `ESR_EL2`/`FAR_EL2`/`HPFAR_EL2` and calls
//! [`decode`]. Then, per [`Trap`] variant:
//! - [`Trap::Hvc`] / [`Trap::Smc`]: [`VPsci::handle_call`] with w0 and x1..x3, and applies the
//!   [`PsciOutcome`] (for SMC, also step the PC by [`instruction_len`]);
//! - [`Trap::DataAbort`] with an [`MmioAccess`]: [`MmioBus::dispatch`], write the loaded value
//!   back, step the PC; without one, or on an [`MmioError`], [`inject_sync_abort`];
//! - the rest as the arch layer sees fit.

pub mod esr;
pub mod hyptest;
pub mod inject;
pub mod mmio;
pub mod psci;

pub use esr::{DataAbort, MmioAccess, Trap, decode, instruction_len};
pub use inject::{AbortKind, GuestExcState, InjectedException, inject_sync_abort};
pub use mmio::{MmioBus, MmioDevice, MmioError};
pub use psci::{
    MAX_VCPUS, PSCI_VERSION_1_1, PsciOutcome, SMCCC_VERSION_1_1, VPsci, VcpuPowerState, mpidr_of,
};
