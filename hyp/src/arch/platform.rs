//! Firmware services: PSCI (through the `smccc` crate, with the conduit the DT names) and Arm
//! semihosting `SYS_EXIT` for ending a run under QEMU with a status.

use smccc::{Hvc, Smc, psci};

use super::sysreg::{read_sysreg, write_sysreg};

/// Which instruction reaches the PSCI firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    Smc,
    Hvc,
}

/// Starts CPU `mpidr` at physical address `entry` with x0 = `context`.
pub fn cpu_on(conduit: Conduit, mpidr: u64, entry: u64, context: u64) -> Result<(), psci::Error> {
    match conduit {
        Conduit::Smc => psci::cpu_on::<Smc>(mpidr, entry, context),
        Conduit::Hvc => psci::cpu_on::<Hvc>(mpidr, entry, context),
    }
}

/// Powers the system off (returns only if the firmware refuses).
pub fn system_off(conduit: Conduit) {
    let _ = match conduit {
        Conduit::Smc => psci::system_off::<Smc>(),
        Conduit::Hvc => psci::system_off::<Hvc>(),
    };
}

/// Resets the system (returns only if the firmware refuses).
pub fn system_reset(conduit: Conduit) {
    let _ = match conduit {
        Conduit::Smc => psci::system_reset::<Smc>(),
        Conduit::Hvc => psci::system_reset::<Hvc>(),
    };
}

/// Semihosting `SYS_EXIT` with `ADP_Stopped_ApplicationExit` and `status`: QEMU exits with it.
/// Only valid under a debugger/emulator with semihosting enabled; on hardware HLT is undefined.
pub fn semihosting_exit(status: u32) -> ! {
    let block: [u64; 2] = [0x20026, status as u64];
    loop {
        // SAFETY: the semihosting call reads the two-word block and ends the emulation.
        unsafe {
            core::arch::asm!(
                "hlt #0xf000",
                in("x0") 0x18u64,
                in("x1") block.as_ptr(),
                options(nostack)
            );
        }
    }
}

/// The EL2 physical timer (CNTHP): one-shot deadline in counter ticks.
pub fn hyp_timer_arm(ticks_from_now: u64) {
    // SAFETY: programming the EL2 timer only raises its PPI later.
    unsafe {
        write_sysreg!("cnthp_tval_el2", ticks_from_now.min(u32::MAX as u64));
        write_sysreg!("cnthp_ctl_el2", 1);
    }
    super::sysreg::isb();
}

/// Stops the EL2 physical timer (masks its output).
pub fn hyp_timer_stop() {
    // SAFETY: disabling the EL2 timer has no other effect.
    unsafe { write_sysreg!("cnthp_ctl_el2", 0b10) };
    super::sysreg::isb();
}

/// True when the EL2 timer's condition is met.
pub fn hyp_timer_fired() -> bool {
    read_sysreg!("cnthp_ctl_el2") & 0b100 != 0
}

/// Unmasks IRQs at EL2 (used while parked or waiting).
pub fn irq_enable() {
    // SAFETY: the vectors are installed and the handler is ready.
    unsafe { core::arch::asm!("msr daifclr, #2", options(nostack)) };
}

/// Masks IRQs at EL2.
pub fn irq_disable() {
    // SAFETY: masking interrupts is always safe.
    unsafe { core::arch::asm!("msr daifset, #2", options(nostack)) };
}

/// Waits for an interrupt.
pub fn wfi() {
    // SAFETY: WFI only pauses the CPU.
    unsafe { core::arch::asm!("wfi", options(nostack)) };
}
