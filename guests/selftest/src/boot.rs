//! Boot code, in assembly: the arm64 Image header, the entry points of the
//! boot vCPU and of secondaries, the EL1 stage-1 identity map and the
//! exception vectors.
//!
//! Every vCPU starts at EL1h with the MMU and caches off, so all data accesses
//! are Device-nGnRnE: no exclusives, no unaligned accesses. The assembly below
//! therefore turns the MMU on before any Rust code runs:
//!
//! * vCPU 0 (`_start`): clean+invalidate .bss to the PoC, zero it, build the
//!   page tables, clean+invalidate again (nothing stale may hide in a cache
//!   once the MMU is on), then `cpu_init`, then `selftest_main(dtb)`.
//! * secondaries (`selftest_secondary_entry`, the PSCI CPU_ON entry point):
//!   `cpu_init`, then `selftest_secondary_main(context_id)`.
//!
//! `cpu_init` selects the vCPU's stack by MPIDR_EL1.Aff0, enables FP/SIMD,
//! sets VBAR_EL1 and enables the MMU and caches with the shared tables.
//!
//! Stage 1 (TTBR0_EL1, 4 KiB granule, T0SZ = 24: 40-bit VA from level 0):
//! two level-1 tables of 1 GiB blocks cover VA = PA 0 .. 1 TiB. The block
//! holding the image (the guest's RAM) is Normal write-back, inner
//! shareable (MAIR index 0 = 0xff); every other block is Device-nGnRE
//! (MAIR index 1 = 0x04) and execute-never. The normal block is derived from
//! the image's own address, so the map also works where the guest is linked
//! elsewhere (the bare-QEMU smoke test). The high half (512 GiB .. 1 TiB) is
//! mapped so that the abort check at 0x80_0000_0000 reaches stage 2.

use core::arch::global_asm;

/// Number of per-vCPU stacks, indexed by MPIDR_EL1.Aff0. A vCPU whose Aff0 is
/// out of range parks itself in the boot code.
pub const MAX_CPUS: usize = 8;
/// log2 of the stack size of each vCPU (64 KiB).
const STACK_SHIFT: usize = 16;

// The SCTLR_EL1 value written by `cpu_init`: the ARMv8.0 RES1 bits
// (29, 28, 23, 22, 20, 11) plus M (0), C (2), SA (3) and I (12). A (1) = 0:
// no alignment checking, little-endian, WXN off.
const SCTLR_EL1: u64 = 0x30d0_0800 | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 12);
// TCR_EL1: T0SZ = 24, IRGN0 = ORGN0 = 0b01 (write-back), SH0 = 0b11 (inner
// shareable), TG0 = 4 KiB, EPD1 = 1 (no TTBR1 walks), TG1 = 4 KiB,
// IPS = 0b101 (48 bits; a PE with a smaller PARange uses its maximum).
const TCR_EL1: u64 = 24 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 30) | (5 << 32);
// MAIR_EL1: attr 0 = Normal WB RW-allocate (0xff), attr 1 = Device-nGnRE.
const MAIR_EL1: u64 = 0x04ff;
// Level-1 block descriptors: valid block, AttrIndx, SH, AF, PXN/UXN.
// (AttrIndx = 0 for normal memory.)
const BLOCK_NORMAL: u64 = 0b01 | (3 << 8) | (1 << 10);
const BLOCK_DEVICE: u64 = 0b01 | (1 << 2) | (1 << 10) | (1 << 53) | (1 << 54);

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    // arm64 Image header (Documentation/arch/arm64/booting.rst layout).
    b       selftest_primary_entry  // code0
    .word   0                       // code1
    .quad   0                       // text_offset
    .quad   __image_size            // image_size, including .bss
    .quad   0xa                     // flags: LE, 4 KiB pages, anywhere
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .word   0x644d5241              // magic "ARM\x64"
    .word   0                       // res5

selftest_primary_entry:
    msr     daifset, #0xf
    mov     x19, x0                 // DTB address
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    adrp    x1, __bss_end
    add     x1, x1, :lo12:__bss_end
    bl      selftest_dcache_civac
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
0:  cmp     x0, x1
    b.hs    1f
    stp     xzr, xzr, [x0], #16
    b       0b
1:  bl      selftest_build_tables
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    bl      selftest_dcache_civac
    bl      selftest_cpu_init
    mov     x0, x19
    bl      selftest_main
    b       selftest_park

    // PSCI CPU_ON entry point; x0 = context_id.
    .global selftest_secondary_entry
selftest_secondary_entry:
    msr     daifset, #0xf
    mov     x19, x0
    bl      selftest_cpu_init
    mov     x0, x19
    bl      selftest_secondary_main
selftest_park:
    wfe
    b       selftest_park

    // Clean and invalidate [x0, x1) to the PoC. Clobbers x0, x2-x4.
selftest_dcache_civac:
    mrs     x2, ctr_el0
    ubfx    x2, x2, #16, #4         // DminLine: log2(words per line)
    mov     x3, #4
    lsl     x3, x3, x2              // line size in bytes
    sub     x4, x3, #1
    bic     x0, x0, x4
0:  cmp     x0, x1
    b.hs    1f
    dc      civac, x0
    add     x0, x0, x3
    b       0b
1:  dsb     sy
    ret

    // Fill the (zeroed) page tables. Clobbers x0-x8.
selftest_build_tables:
    adrp    x0, selftest_pt_l0
    adrp    x1, selftest_pt_l1_low
    orr     x3, x1, #3              // table descriptor
    str     x3, [x0]
    adrp    x2, selftest_pt_l1_high
    orr     x3, x2, #3
    str     x3, [x0, #8]
    adrp    x3, _start
    lsr     x3, x3, #30             // index of the 1 GiB block holding the image
    mov     x4, #{block_normal}
    movz    x5, #{block_device_lo}
    movk    x5, #{block_device_hi}, lsl #48
    mov     x6, #0
0:  lsl     x7, x6, #30
    cmp     x6, x3
    csel    x8, x4, x5, eq
    orr     x8, x8, x7
    str     x8, [x1, x6, lsl #3]
    orr     x7, x7, #(1 << 39)
    orr     x7, x7, x5
    str     x7, [x2, x6, lsl #3]
    add     x6, x6, #1
    cmp     x6, #512
    b.lo    0b
    dsb     sy
    ret

    // Per-vCPU setup: stack, FP/SIMD, vectors, MMU. Uses no memory.
    // Clobbers x0, x1.
selftest_cpu_init:
    mrs     x0, mpidr_el1
    and     x0, x0, #0xff
    cmp     x0, #{max_cpus}
    b.hs    selftest_park
    adrp    x1, selftest_stacks
    add     x1, x1, :lo12:selftest_stacks
    add     x0, x0, #1
    add     x1, x1, x0, lsl #{stack_shift}
    mov     sp, x1
    mov     x0, #(3 << 20)          // CPACR_EL1.FPEN = 0b11
    msr     cpacr_el1, x0
    adrp    x0, selftest_vectors
    add     x0, x0, :lo12:selftest_vectors
    msr     vbar_el1, x0
    mov     x0, #{mair}
    msr     mair_el1, x0
    movz    x0, #{tcr_0}
    movk    x0, #{tcr_1}, lsl #16
    movk    x0, #{tcr_2}, lsl #32
    msr     tcr_el1, x0
    adrp    x0, selftest_pt_l0
    msr     ttbr0_el1, x0
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    movz    x0, #{sctlr_0}
    movk    x0, #{sctlr_1}, lsl #16
    msr     sctlr_el1, x0
    isb
    ret

    // Exception vectors. Only "current EL with SP_ELx, synchronous" is
    // expected (armed abort checks); everything else is reported and resets.
    .macro  SELFTEST_UNEXPECTED offset
    .balign 0x80
    mov     x0, #\offset
    bl      selftest_unexpected_exception
    b       selftest_park
    .endm

    .section .text.vectors, "ax"
    .balign 0x800
selftest_vectors:
    SELFTEST_UNEXPECTED 0x000
    SELFTEST_UNEXPECTED 0x080
    SELFTEST_UNEXPECTED 0x100
    SELFTEST_UNEXPECTED 0x180
    .balign 0x80                    // 0x200: current EL, SP_ELx, synchronous
    sub     sp, sp, #160
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x30, [sp, #144]
    bl      selftest_sync_exception
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x30, [sp, #144]
    add     sp, sp, #160
    eret
    SELFTEST_UNEXPECTED 0x280
    SELFTEST_UNEXPECTED 0x300
    SELFTEST_UNEXPECTED 0x380
    SELFTEST_UNEXPECTED 0x400
    SELFTEST_UNEXPECTED 0x480
    SELFTEST_UNEXPECTED 0x500
    SELFTEST_UNEXPECTED 0x580
    SELFTEST_UNEXPECTED 0x600
    SELFTEST_UNEXPECTED 0x680
    SELFTEST_UNEXPECTED 0x700
    SELFTEST_UNEXPECTED 0x780

    .section .bss.selftest_boot, "aw", %nobits
    .balign 4096
selftest_pt_l0:
    .space  4096
selftest_pt_l1_low:
    .space  4096
selftest_pt_l1_high:
    .space  4096
    .balign 16
selftest_stacks:
    .space  {stacks_size}
"#,
    max_cpus = const MAX_CPUS,
    stack_shift = const STACK_SHIFT,
    stacks_size = const MAX_CPUS << STACK_SHIFT,
    block_normal = const BLOCK_NORMAL,
    block_device_lo = const BLOCK_DEVICE & 0xffff,
    block_device_hi = const BLOCK_DEVICE >> 48,
    mair = const MAIR_EL1,
    tcr_0 = const TCR_EL1 & 0xffff,
    tcr_1 = const (TCR_EL1 >> 16) & 0xffff,
    tcr_2 = const TCR_EL1 >> 32,
    sctlr_0 = const SCTLR_EL1 & 0xffff,
    sctlr_1 = const SCTLR_EL1 >> 16,
);

// The descriptor constants must fit the instructions that load them.
const _: () = assert!(BLOCK_NORMAL < 0x1_0000);
const _: () = assert!(BLOCK_DEVICE & 0x0000_ffff_ffff_0000 == 0);
const _: () = assert!(TCR_EL1 >> 48 == 0 && SCTLR_EL1 >> 32 == 0);

unsafe extern "C" {
    /// The PSCI CPU_ON entry point of secondary vCPUs (x0 = context_id).
    fn selftest_secondary_entry();
    static __image_start: u8;
    static __image_end: u8;
}

/// Address of the secondary entry point (VA = IPA: identity map).
pub fn secondary_entry() -> u64 {
    selftest_secondary_entry as *const () as usize as u64
}

/// The image's extent in memory, `[start, end)`, including .bss.
pub fn image_range() -> (usize, usize) {
    (
        &raw const __image_start as usize,
        &raw const __image_end as usize,
    )
}
