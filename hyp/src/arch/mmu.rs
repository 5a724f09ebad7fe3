//! The hypervisor's own EL2 stage-1 MMU: the early identity map used while booting, the final
//! map built from the device tree, and the register values that switch them on.

use core::cell::UnsafeCell;

use super::sysreg::{dsb_ish, isb, read_sysreg, write_sysreg};
use crate::mm::pgtable::{Attrs, MAIR_EL2_VALUE, PageTable, Regime, TableAlloc};

const GIB: u64 = 1 << 30;
const BLOCK_2M: u64 = 2 << 20;
/// Input address bits for the EL2 map: T0SZ = 16, walks start at level 0.
pub const VA_BITS: u32 = 48;

/// SCTLR_EL2 RES1 bits (non-VHE) plus M, C, SA, I.
const SCTLR_EL2_ON: u64 = 0x30c5_0830 | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 12);
/// SCTLR_EL1 RES1 bits plus M, C, I (only used on the "entered at EL1" error path).
const SCTLR_EL1_ON: u64 = 0x30d0_0800 | (1 << 0) | (1 << 2) | (1 << 12);

/// Values for MAIR/TCR/TTBR0/SCTLR that turn on translation with a given table.
#[derive(Clone, Copy, Debug)]
pub struct MmuRegs {
    pub mair: u64,
    pub tcr: u64,
    pub ttbr0: u64,
    pub sctlr: u64,
}

/// Physical address size code (TCR PS/IPS encoding) this CPU supports, capped at 48 bits.
pub fn pa_range_code() -> u64 {
    (read_sysreg!("id_aa64mmfr0_el1") & 0xf).min(5)
}

/// Physical address bits for a PARange code.
pub fn pa_bits(code: u64) -> u32 {
    [32, 36, 40, 42, 44, 48][code.min(5) as usize]
}

fn tcr_el2(ps: u64) -> u64 {
    let t0sz = 64 - VA_BITS as u64;
    // IRGN0/ORGN0 write-back write-allocate, SH0 inner shareable, TG0 4 KiB, RES1 bits 31 and 23.
    t0sz | (1 << 8) | (1 << 10) | (3 << 12) | (ps << 16) | (1 << 31) | (1 << 23)
}

/// The register values for an EL2 table rooted at `root`.
pub fn el2_regs(root: u64) -> MmuRegs {
    MmuRegs {
        mair: MAIR_EL2_VALUE,
        tcr: tcr_el2(pa_range_code()),
        ttbr0: root,
        sctlr: SCTLR_EL2_ON,
    }
}

/// Turns the EL2 MMU on.
///
/// # Safety
/// The table must identity-map the running code, its stack and everything it touches next.
pub unsafe fn enable_el2(regs: &MmuRegs) {
    // SAFETY: per the caller's guarantee the identity map covers the code that runs on.
    unsafe {
        write_sysreg!("mair_el2", regs.mair);
        write_sysreg!("tcr_el2", regs.tcr);
        write_sysreg!("ttbr0_el2", regs.ttbr0);
        isb();
        core::arch::asm!("tlbi alle2", "dsb nsh", "isb", options(nostack));
        write_sysreg!("sctlr_el2", regs.sctlr);
    }
    isb();
}

/// Turns the EL1&0 MMU on with the same identity map (error path when entered at EL1).
///
/// # Safety
/// As [`enable_el2`].
pub unsafe fn enable_el1(regs: &MmuRegs) {
    // TCR_EL1: same walk attributes for TTBR0, TTBR1 walks disabled (EPD1), IPS at [34:32].
    let tcr = (64 - VA_BITS as u64)
        | (1 << 8)
        | (1 << 10)
        | (3 << 12)
        | (1 << 23)
        | (pa_range_code() << 32);
    // SAFETY: per the caller's guarantee the identity map covers the code that runs on.
    unsafe {
        write_sysreg!("mair_el1", regs.mair);
        write_sysreg!("tcr_el1", tcr);
        write_sysreg!("ttbr0_el1", regs.ttbr0);
        isb();
        core::arch::asm!("tlbi vmalle1", "dsb nsh", "isb", options(nostack));
        write_sysreg!("sctlr_el1", SCTLR_EL1_ON);
    }
    isb();
}

/// Replaces the live EL2 table (both must map the running code identically).
///
/// # Safety
/// `root` must be a complete identity map of everything the hypervisor uses.
pub unsafe fn switch_el2_table(root: u64) {
    dsb_ish();
    // SAFETY: per the caller's guarantee; old TLB entries are dropped right after.
    unsafe {
        write_sysreg!("ttbr0_el2", root);
        isb();
        core::arch::asm!("tlbi alle2", "dsb ish", "isb", options(nostack));
    }
}

const EARLY_PAGES: usize = 8;

/// A handful of page-table pages in .bss for the boot identity map, handed out by a bump index.
/// Used by one CPU with the MMU off, before anything else runs, so no atomics (which would not
/// work yet) and no locking.
#[repr(C, align(4096))]
pub struct EarlyTables {
    pages: UnsafeCell<[[u64; 512]; EARLY_PAGES]>,
    next: UnsafeCell<usize>,
}

// SAFETY: only the boot CPU uses it, once, before secondaries exist.
unsafe impl Sync for EarlyTables {}

impl Default for EarlyTables {
    fn default() -> Self {
        Self::new()
    }
}

impl EarlyTables {
    pub const fn new() -> Self {
        Self {
            pages: UnsafeCell::new([[0; 512]; EARLY_PAGES]),
            next: UnsafeCell::new(0),
        }
    }

    /// Builds the boot identity map: the 2 MiB blocks holding `[image_base, image_end)` and the
    /// DTB (up to its 2 MiB maximum) as normal memory, the rest of the low 512 GiB as device.
    pub fn build(
        &'static self,
        regime: Regime,
        image_base: u64,
        image_end: u64,
        dtb: u64,
    ) -> MmuRegs {
        let image = (
            image_base & !(BLOCK_2M - 1),
            image_end.next_multiple_of(BLOCK_2M),
        );
        let dtb_blocks = (
            dtb & !(BLOCK_2M - 1),
            (dtb & !(BLOCK_2M - 1)) + 2 * BLOCK_2M,
        );
        let is_normal =
            |a: u64| (a >= image.0 && a < image.1) || (a >= dtb_blocks.0 && a < dtb_blocks.1);
        let Ok(mut table) = PageTable::new(self, regime, VA_BITS) else {
            halt()
        };
        for gib in 0..512u64 {
            let base = gib * GIB;
            let touches_normal = (0..512).any(|i| is_normal(base + i * BLOCK_2M));
            if !touches_normal {
                if table.map(base, base, GIB, Attrs::DEVICE).is_err() {
                    halt();
                }
                continue;
            }
            for i in 0..512 {
                let a = base + i * BLOCK_2M;
                let attrs = if is_normal(a) {
                    Attrs::RWX
                } else {
                    Attrs::DEVICE
                };
                if table.map(a, a, BLOCK_2M, attrs).is_err() {
                    halt();
                }
            }
        }
        el2_regs(table.root_pa())
    }
}

/// Nothing can be reported this early (no console, MMU off): stop where a debugger finds it.
fn halt() -> ! {
    loop {
        super::sysreg::wfe();
    }
}

impl TableAlloc for &'static EarlyTables {
    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        // SAFETY: single-threaded boot use, see the type's docs.
        let next = unsafe { &mut *self.next.get() };
        if pages != 1 || *next >= EARLY_PAGES {
            return None;
        }
        let pa = self.pages.get() as u64 + (*next as u64) * 4096;
        *next += 1;
        Some(pa)
    }

    fn table(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}
