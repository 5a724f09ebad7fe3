//! Image header, primary and secondary entry, self-relocation and the early EL2 MMU.
//!
//! The image starts with the arm64 Linux `Image` header so any Linux-capable loader boots it. The
//! primary CPU enters at `_start` with x0 = DTB, MMU off, at EL2 (or EL1 if the firmware keeps EL2).
//! Before any Rust runs it applies the image's own relocations (the image is linked at 0 as a PIE),
//! zeroes .bss and takes the boot stack. [`early_mmu_on`] then builds a small identity map and turns
//! on the MMU and caches, so that spin locks and atomics (exclusives need cacheable memory) are only
//! ever used with the MMU on.

use core::arch::global_asm;

use super::mmu::{self, EarlyTables};
use crate::mm::pgtable::Regime;

global_asm!(
    r#"
    .section .text.head, "ax"
    .global _start
_start:
    b       primary_entry           // code0
    .long   0                       // code1
    .quad   0                       // text_offset: any 2 MiB aligned base
    .quad   __hyp_image_size        // image_size, .bss included
    .quad   0xa                     // flags: little endian, 4 KiB pages, anywhere in RAM
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5

    .section .text.boot, "ax"
primary_entry:
    mov     x19, x0                 // DTB
    adr     x20, _start             // where we were loaded

    // Relocate: every entry must be R_AARCH64_RELATIVE (1027); anything else means a broken link.
    adrp    x1, __rela_start
    add     x1, x1, :lo12:__rela_start
    adrp    x2, __rela_end
    add     x2, x2, :lo12:__rela_end
1:  cmp     x1, x2
    b.hs    2f
    ldp     x3, x4, [x1], #16       // r_offset, r_info
    ldr     x5, [x1], #8            // r_addend
    cmp     x4, #1027
    b.ne    .Lbad_reloc
    add     x5, x5, x20
    str     x5, [x20, x3]
    b       1b
2:
    // Zero .bss (the boot stack is in it).
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b
4:
    adrp    x1, __boot_stack_top
    add     x1, x1, :lo12:__boot_stack_top
    mov     sp, x1

    mrs     x1, CurrentEL
    lsr     x1, x1, #2
    cmp     x1, #2
    b.ne    5f

    adrp    x1, el2_vectors
    add     x1, x1, :lo12:el2_vectors
    msr     vbar_el2, x1
    isb
    mov     x0, x20
    mov     x1, x19
    bl      early_mmu_on
    mov     x0, x19
    mov     x1, x20
    bl      primary_main
    b       .Lhalt

5:  // Not at EL2: say so and stop (in Rust, with the EL1 MMU on for the same reasons).
    mov     x0, x20
    mov     x1, x19
    bl      early_mmu_on_el1
    mov     x0, x19
    mov     x1, x20
    bl      not_el2_main
    b       .Lhalt

.Lbad_reloc:
    // No console yet; spin where a debugger will find us.
    wfe
    b       .Lbad_reloc

.Lhalt:
    wfe
    b       .Lhalt

    // Secondary CPUs, started by PSCI CPU_ON with x0 = &SecondaryBoot. MMU is off: the boot CPU
    // cleaned that struct to the point of coherency before CPU_ON.
    .global secondary_entry
secondary_entry:
    ldr     x1, [x0, #0]            // mair
    msr     mair_el2, x1
    ldr     x1, [x0, #8]            // tcr
    msr     tcr_el2, x1
    ldr     x1, [x0, #16]           // ttbr0
    msr     ttbr0_el2, x1
    adrp    x1, el2_vectors
    add     x1, x1, :lo12:el2_vectors
    msr     vbar_el2, x1
    isb
    tlbi    alle2
    dsb     nsh
    isb
    ldr     x1, [x0, #24]           // sctlr
    msr     sctlr_el2, x1
    isb
    ldr     x1, [x0, #32]           // stack top
    mov     sp, x1
    bl      secondary_main
    b       .Lhalt
"#
);

/// Boot parameters a secondary CPU reads with its MMU off (layout used by `secondary_entry`).
#[repr(C, align(64))]
pub struct SecondaryBoot {
    pub mair: u64,
    pub tcr: u64,
    pub ttbr0: u64,
    pub sctlr: u64,
    pub stack_top: u64,
    /// Index of the CPU in the DT `/cpus` list.
    pub cpu_index: u64,
}

unsafe extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __image_end: u8;
    static __bss_start: u8;
    fn secondary_entry();
}

/// Address ranges of the loaded image, for mapping and integrity checks.
#[derive(Clone, Copy, Debug)]
pub struct ImageLayout {
    pub start: u64,
    pub text_end: u64,
    pub rodata_end: u64,
    pub bss_start: u64,
    pub end: u64,
}

/// Where the image lives now (after relocation, so these are physical = virtual addresses).
pub fn image_layout() -> ImageLayout {
    // Only the addresses of the linker-defined symbols are taken, never their contents.
    ImageLayout {
        start: &raw const __image_start as u64,
        text_end: &raw const __text_end as u64,
        rodata_end: &raw const __rodata_end as u64,
        bss_start: &raw const __bss_start as u64,
        end: &raw const __image_end as u64,
    }
}

/// Physical address of the secondary CPUs' entry point.
pub fn secondary_entry_pa() -> u64 {
    secondary_entry as *const () as u64
}

static EARLY: EarlyTables = EarlyTables::new();

/// Turns on the EL2 MMU with an identity map: normal memory for the 2 MiB blocks holding the image
/// and the DTB, device memory for everything else in the low 512 GiB. Runs with the MMU off, so it
/// only does aligned stores to .bss and system register writes — no atomics.
#[unsafe(no_mangle)]
extern "C" fn early_mmu_on(image_base: u64, dtb: u64) {
    let image_end = image_layout().end;
    let regs = EARLY.build(Regime::El2, image_base, image_end, dtb);
    // SAFETY: the tables identity-map the running image, its stack and the DTB.
    unsafe { mmu::enable_el2(&regs) };
}

/// As [`early_mmu_on`], for the EL1&0 regime when we were (wrongly) entered at EL1.
#[unsafe(no_mangle)]
extern "C" fn early_mmu_on_el1(image_base: u64, dtb: u64) {
    let image_end = image_layout().end;
    let regs = EARLY.build(Regime::El1, image_base, image_end, dtb);
    // SAFETY: as above, for the EL1 regime.
    unsafe { mmu::enable_el1(&regs) };
}
