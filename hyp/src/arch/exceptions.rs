//! EL2 exception vectors, the guest entry/exit path, and the hypervisor's own fault handlers.
//!
//! Guest world switch works like a function call: [`enter_guest`] pushes the hypervisor's
//! callee-saved registers on the EL2 stack, loads the guest's x0–x30, ELR and SPSR from its
//! [`GuestRegs`] and `eret`s. An exception from the guest lands in the lower-EL vectors, which store
//! every general-purpose register into the `GuestRegs` that TPIDR_EL2 points at, pop the
//! hypervisor's registers and return from `enter_guest` with the exit reason. The guest's EL1 system
//! registers and SP_EL1 stay in the CPU while the hypervisor runs (each pCPU runs exactly one vCPU,
//! and the hypervisor never touches them except through [`super::vcpu::El1Regs`]). The hypervisor is
//! built soft-float, so it never uses FP/SIMD registers: the guest's FP/SIMD state is never
//! touched.

use core::arch::global_asm;

/// General-purpose register state of a guest vCPU, as saved on every exit.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct GuestRegs {
    /// x0–x30.
    pub x: [u64; 31],
    /// Guest PC (ELR_EL2).
    pub elr: u64,
    /// Guest PSTATE (SPSR_EL2).
    pub spsr: u64,
}

/// Why `enter_guest` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ExitReason {
    Sync = 0,
    Irq = 1,
    Fiq = 2,
    SError = 3,
    /// An exception from AArch32 state, which guests are not allowed to use.
    AArch32 = 4,
}

unsafe extern "C" {
    fn __enter_guest(regs: *mut GuestRegs) -> u64;
}

/// Runs the guest until its next exception to EL2.
///
/// # Safety
/// TPIDR_EL2 must point at `regs`, and stage 2, HCR_EL2 and the EL1 registers must be set up for
/// this guest.
pub unsafe fn enter_guest(regs: &mut GuestRegs) -> ExitReason {
    // SAFETY: per the caller's guarantee; `regs` outlives the call.
    match unsafe { __enter_guest(regs) } {
        0 => ExitReason::Sync,
        1 => ExitReason::Irq,
        2 => ExitReason::Fiq,
        3 => ExitReason::SError,
        _ => ExitReason::AArch32,
    }
}

global_asm!(
    r#"
.macro guest_vector reason
    .balign 0x80
    stp     x0, x1, [sp, #-16]!
    mov     x1, #\reason
    b       guest_exit
.endm

.macro hyp_vector handler
    .balign 0x80
    sub     sp, sp, #(34 * 8)
    stp     x0, x1, [sp, #(0 * 8)]
    stp     x2, x3, [sp, #(2 * 8)]
    b       \handler
.endm

    .section .text.vectors, "ax"
    .balign 0x800
    .global el2_vectors
el2_vectors:
    // Current EL with SP_EL0: never used.
    hyp_vector hyp_sync_entry
    hyp_vector hyp_irq_entry
    hyp_vector hyp_sync_entry
    hyp_vector hyp_sync_entry
    // Current EL with SP_ELx: the hypervisor itself.
    hyp_vector hyp_sync_entry
    hyp_vector hyp_irq_entry
    hyp_vector hyp_sync_entry
    hyp_vector hyp_serror_entry
    // Lower EL, AArch64: the guest.
    guest_vector 0
    guest_vector 1
    guest_vector 2
    guest_vector 3
    // Lower EL, AArch32: not allowed (HCR_EL2.RW = 1), reported if it ever happens.
    guest_vector 4
    guest_vector 4
    guest_vector 4
    guest_vector 4

guest_exit:
    // sp: [guest x0, guest x1] on top of the frame __enter_guest pushed. x1 = reason.
    mrs     x0, tpidr_el2
    stp     x2, x3, [x0, #(2 * 8)]
    stp     x4, x5, [x0, #(4 * 8)]
    stp     x6, x7, [x0, #(6 * 8)]
    stp     x8, x9, [x0, #(8 * 8)]
    stp     x10, x11, [x0, #(10 * 8)]
    stp     x12, x13, [x0, #(12 * 8)]
    stp     x14, x15, [x0, #(14 * 8)]
    stp     x16, x17, [x0, #(16 * 8)]
    stp     x18, x19, [x0, #(18 * 8)]
    stp     x20, x21, [x0, #(20 * 8)]
    stp     x22, x23, [x0, #(22 * 8)]
    stp     x24, x25, [x0, #(24 * 8)]
    stp     x26, x27, [x0, #(26 * 8)]
    stp     x28, x29, [x0, #(28 * 8)]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x0, #(0 * 8)]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x30, x2, [x0, #(30 * 8)]
    str     x3, [x0, #(32 * 8)]
    mov     x0, x1
    // Restore the hypervisor's callee-saved registers and return from __enter_guest.
    ldp     x19, x20, [sp, #(0 * 8)]
    ldp     x21, x22, [sp, #(2 * 8)]
    ldp     x23, x24, [sp, #(4 * 8)]
    ldp     x25, x26, [sp, #(6 * 8)]
    ldp     x27, x28, [sp, #(8 * 8)]
    ldp     x29, x30, [sp, #(10 * 8)]
    add     sp, sp, #(12 * 8)
    ret

    .section .text, "ax"
    .global __enter_guest
__enter_guest:
    sub     sp, sp, #(12 * 8)
    stp     x19, x20, [sp, #(0 * 8)]
    stp     x21, x22, [sp, #(2 * 8)]
    stp     x23, x24, [sp, #(4 * 8)]
    stp     x25, x26, [sp, #(6 * 8)]
    stp     x27, x28, [sp, #(8 * 8)]
    stp     x29, x30, [sp, #(10 * 8)]
    ldp     x1, x2, [x0, #(31 * 8)]
    msr     elr_el2, x1
    msr     spsr_el2, x2
    ldp     x2, x3, [x0, #(2 * 8)]
    ldp     x4, x5, [x0, #(4 * 8)]
    ldp     x6, x7, [x0, #(6 * 8)]
    ldp     x8, x9, [x0, #(8 * 8)]
    ldp     x10, x11, [x0, #(10 * 8)]
    ldp     x12, x13, [x0, #(12 * 8)]
    ldp     x14, x15, [x0, #(14 * 8)]
    ldp     x16, x17, [x0, #(16 * 8)]
    ldp     x18, x19, [x0, #(18 * 8)]
    ldp     x20, x21, [x0, #(20 * 8)]
    ldp     x22, x23, [x0, #(22 * 8)]
    ldp     x24, x25, [x0, #(24 * 8)]
    ldp     x26, x27, [x0, #(26 * 8)]
    ldp     x28, x29, [x0, #(28 * 8)]
    ldr     x30, [x0, #(30 * 8)]
    ldp     x0, x1, [x0, #(0 * 8)]
    eret
    dsb     nsh
    isb

// The hypervisor's own exceptions: save everything into a frame on the stack and call Rust.
// Frame layout: x0..x30, elr, spsr, esr (34 slots).
.macro save_hyp_frame
    stp     x4, x5, [sp, #(4 * 8)]
    stp     x6, x7, [sp, #(6 * 8)]
    stp     x8, x9, [sp, #(8 * 8)]
    stp     x10, x11, [sp, #(10 * 8)]
    stp     x12, x13, [sp, #(12 * 8)]
    stp     x14, x15, [sp, #(14 * 8)]
    stp     x16, x17, [sp, #(16 * 8)]
    stp     x18, x19, [sp, #(18 * 8)]
    stp     x20, x21, [sp, #(20 * 8)]
    stp     x22, x23, [sp, #(22 * 8)]
    stp     x24, x25, [sp, #(24 * 8)]
    stp     x26, x27, [sp, #(26 * 8)]
    stp     x28, x29, [sp, #(28 * 8)]
    mrs     x0, elr_el2
    stp     x30, x0, [sp, #(30 * 8)]
    mrs     x0, spsr_el2
    mrs     x1, esr_el2
    stp     x0, x1, [sp, #(32 * 8)]
.endm

hyp_sync_entry:
    save_hyp_frame
    mov     x0, sp
    bl      hyp_sync_fault
1:  wfe
    b       1b

hyp_serror_entry:
    save_hyp_frame
    mov     x0, sp
    bl      hyp_serror
1:  wfe
    b       1b

hyp_irq_entry:
    save_hyp_frame
    bl      hyp_irq
    ldp     x0, x1, [sp, #(31 * 8)]
    msr     elr_el2, x0
    msr     spsr_el2, x1
    ldp     x0, x1, [sp, #(0 * 8)]
    ldp     x2, x3, [sp, #(2 * 8)]
    ldp     x4, x5, [sp, #(4 * 8)]
    ldp     x6, x7, [sp, #(6 * 8)]
    ldp     x8, x9, [sp, #(8 * 8)]
    ldp     x10, x11, [sp, #(10 * 8)]
    ldp     x12, x13, [sp, #(12 * 8)]
    ldp     x14, x15, [sp, #(14 * 8)]
    ldp     x16, x17, [sp, #(16 * 8)]
    ldp     x18, x19, [sp, #(18 * 8)]
    ldp     x20, x21, [sp, #(20 * 8)]
    ldp     x22, x23, [sp, #(22 * 8)]
    ldp     x24, x25, [sp, #(24 * 8)]
    ldp     x26, x27, [sp, #(26 * 8)]
    ldp     x28, x29, [sp, #(28 * 8)]
    ldr     x30, [sp, #(30 * 8)]
    add     sp, sp, #(34 * 8)
    eret
"#
);

/// Registers of the hypervisor at the time of its own exception.
#[repr(C)]
pub struct HypFrame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    pub esr: u64,
}

#[unsafe(no_mangle)]
extern "C" fn hyp_sync_fault(frame: &HypFrame) -> ! {
    let far = super::sysreg::read_sysreg!("far_el2");
    panic!(
        "synchronous exception in the hypervisor: esr={:#x} far={:#x} elr={:#x} lr={:#x} sp-frame={:#x}",
        frame.esr, far, frame.elr, frame.x[30], frame as *const HypFrame as u64
    );
}

#[unsafe(no_mangle)]
extern "C" fn hyp_serror(frame: &HypFrame) -> ! {
    panic!(
        "SError in the hypervisor: esr={:#x} elr={:#x}",
        frame.esr, frame.elr
    );
}

#[unsafe(no_mangle)]
extern "C" fn hyp_irq() {
    crate::hypervisor::handle_irq();
}
