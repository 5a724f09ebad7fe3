//! The guest's virtual timer as an interrupt source.
//!
//! The EL1 virtual timer is PPI 27 (the DT's timer node: `<1 11 …>`, PPI 11 = INTID 27), level
//! triggered: its output is asserted while CNTV_CTL_EL0 has ENABLE = 1, IMASK = 0 and
//! ISTATUS = 1 ([`vtimer_asserted`]).
//!
//! # The scheme: forward the physical PPI with the HW bit
//!
//! The guest owns the virtual timer registers outright (static partitioning: CNTV_* stay in the
//! CPU, and CNTHCTL_EL2 does not trap them). Its output is the *physical* PPI 27 of the CPU the
//! vCPU runs on, which the hypervisor keeps enabled in that CPU's redistributor (Group 1, any
//! priority). The vGIC is built with PPI 27 in [`VgicConfig::hw_ppis`](super::VgicConfig) (the
//! default), and:
//!
//! 1. While the guest runs, its timer condition becomes true: physical PPI 27 fires. With
//!    HCR_EL2.IMO = 1 it is taken at EL2.
//! 2. The arch layer acknowledges it (ICC_IAR1_EL1 → 27; it is now active in the physical
//!    redistributor, so it cannot fire again) and drops its priority with ICC_EOIR1_EL1
//!    *without deactivating it* — the EL2 CPU interface runs with ICC_CTLR_EL1.EOImode = 1, and
//!    the hypervisor deactivates its own interrupts with ICC_DIR_EL1.
//! 3. It calls [`Vgic::inject_phys_ppi`]`(vcpu, 27)`: virtual PPI 27 becomes pending with the
//!    physical one attached. The next [`Vgic::flush`] writes a list register with HW = 1 and
//!    pINTID = 27.
//! 4. The guest takes it, handles its timer (reprograms CVAL, or sets IMASK or clears ENABLE)
//!    and deactivates it (EOI). Because the list register has HW = 1, that deactivates physical
//!    PPI 27 too — no trap, no maintenance interrupt.
//! 5. If the condition still holds (the guest did not reprogram the timer), physical PPI 27
//!    fires again at once and the cycle repeats: level semantics come from the hardware.
//!
//! Nothing touches the guest's CNTV_CTL_EL0 (no IMASK games, no state the guest could observe),
//! and the physical interrupt is never left active without a virtual one to end it: if the
//! guest clears the virtual PPI's pending or active state through its redistributor, or the VM
//! stops ([`Vgic::release_phys`]), the vGIC deactivates physical PPI 27 through
//! [`PhysIrqOps::deactivate`](super::PhysIrqOps::deactivate). If the guest disables virtual
//! PPI 27, an occurrence stays pending (and physically active, so it does not storm) until it
//! re-enables it.
//!
//! [`vtimer_asserted`] is for the arch layer's other decisions: whether a vCPU in WFI has a
//! timer interrupt coming, or whether a PPI 27 taken at EL2 is stale (the guest masked the timer
//! in the meantime — then it may deactivate it with ICC_DIR_EL1 instead of injecting).

#[cfg(doc)]
use super::Vgic;

/// INTID of the EL1 virtual timer PPI.
pub const VTIMER_PPI: u32 = 27;
/// INTID of the EL1 physical timer PPI (not forwarded: the guest uses the virtual timer).
pub const PTIMER_PPI: u32 = 30;
/// INTID of the GIC maintenance interrupt (PPI 9). The hypervisor's own: the guest never sees
/// it raised.
pub const MAINTENANCE_PPI: u32 = 25;

/// CNTV_CTL_EL0.ENABLE.
pub const CNTV_CTL_ENABLE: u64 = 1 << 0;
/// CNTV_CTL_EL0.IMASK.
pub const CNTV_CTL_IMASK: u64 = 1 << 1;
/// CNTV_CTL_EL0.ISTATUS (read-only: the timer condition is met).
pub const CNTV_CTL_ISTATUS: u64 = 1 << 2;

/// Whether the virtual timer's interrupt output is asserted for this CNTV_CTL_EL0 value:
/// ENABLE = 1, IMASK = 0 and ISTATUS = 1.
pub fn vtimer_asserted(cntv_ctl: u64) -> bool {
    cntv_ctl & (CNTV_CTL_ENABLE | CNTV_CTL_IMASK | CNTV_CTL_ISTATUS)
        == CNTV_CTL_ENABLE | CNTV_CTL_ISTATUS
}
