//! CPU TLB maintenance for a VM's stage 2: the CPU side of [`TlbBackend`].
//!
//! TLBI by IPA only reaches entries tagged with the VMID currently in VTTBR_EL2, so a flush for a
//! VM that is not the one this pCPU runs switches VTTBR_EL2 to that VM and back (the hypervisor
//! runs with interrupts masked, so nothing else on this CPU sees the temporary value). Stage-2
//! invalidation by IPA does not touch combined stage-1+2 entries, so every range flush ends with
//! TLBI VMALLE1IS for the VMID. All operations are Inner Shareable broadcasts: the VM's other
//! vCPUs, on other pCPUs, drop the entries too. `sync` is the DSB that waits for completion; no
//! lock is taken and no other VM is affected.

use super::sysreg::{isb, read_sysreg, write_sysreg};
use crate::mm::stage2::tlb::{Invalidation, RangeOp, TlbBackend, TlbError, range_ops};
use crate::mm::stage2::{AtomicU64, WalkerSync};

/// Stage-2 table writes as the hardware walkers need them: DSB ISHST before an entry is published,
/// and DC CVAC for walkers that do not snoop the caches.
pub struct ArchWalkerSync;

impl WalkerSync for ArchWalkerSync {
    fn publish_barrier(&self) {
        // SAFETY: barrier only.
        unsafe { core::arch::asm!("dsb ishst", options(nostack, preserves_flags)) };
    }

    fn clean(&self, addr: *const AtomicU64, len_bytes: usize) {
        super::sysreg::clean_dcache_range(addr as u64, len_bytes as u64);
    }
}

/// Break-before-make level the CPUs implement (ID_AA64MMFR2_EL1.BBM).
pub fn cpu_bbm_level() -> u8 {
    ((read_sysreg!("id_aa64mmfr2_el1") >> 52) & 0xf) as u8
}

/// Invalidates every stage-1 and stage-2 entry of the current VMID on this CPU only (recovery from
/// a TLB conflict abort).
pub fn local_flush_current_vmid() {
    // SAFETY: TLB maintenance only.
    unsafe { core::arch::asm!("tlbi vmalls12e1", "dsb nsh", "isb", options(nostack)) };
}

/// The CPUs' TLBs for one VM (identified by its VTTBR value: root table + VMID).
pub struct CpuTlb {
    vttbr: u64,
    range_ops: bool,
}

impl CpuTlb {
    /// TLB maintenance for the VM whose VTTBR_EL2 value is `vttbr`.
    pub fn new(vttbr: u64) -> Self {
        // ID_AA64ISAR0_EL1.TLB[59:56] = 0b0010: TLBI range instructions (FEAT_TLBIRANGE).
        let range_ops = (read_sysreg!("id_aa64isar0_el1") >> 56) & 0xf >= 2;
        Self { vttbr, range_ops }
    }
}

/// Runs `f` with VTTBR_EL2 = `vttbr`, restoring the previous value.
fn with_vttbr(vttbr: u64, f: impl FnOnce()) {
    let old = read_sysreg!("vttbr_el2");
    if old != vttbr {
        // SAFETY: only TLB maintenance runs under the temporary value (no guest, IRQs masked).
        unsafe { write_sysreg!("vttbr_el2", vttbr) };
        isb();
    }
    f();
    if old != vttbr {
        // SAFETY: restores this pCPU's own VM.
        unsafe { write_sysreg!("vttbr_el2", old) };
        isb();
    }
}

fn tlbi_ipas2(page: u64, leaf: bool) {
    // SAFETY: TLB invalidation has no effect on memory contents.
    unsafe {
        if leaf {
            core::arch::asm!("tlbi ipas2le1is, {}", in(reg) page, options(nostack));
        } else {
            core::arch::asm!("tlbi ipas2e1is, {}", in(reg) page, options(nostack));
        }
    }
}

/// RIPAS2(L)E1IS operand: BaseADDR[36:0], TTL[38:37], NUM[43:39], SCALE[45:44], TG[47:46] = 4 KiB.
fn range_operand(op: &RangeOp, ttl: u64) -> u64 {
    ((op.ipa >> 12) & ((1 << 37) - 1)) | (ttl << 37) | (op.num << 39) | (op.scale << 44) | (1 << 46)
}

impl TlbBackend for CpuTlb {
    fn invalidate(&self, inv: &Invalidation) {
        with_vttbr(self.vttbr, || {
            // SAFETY: barrier only: make the PTE updates visible to the table walkers first.
            unsafe { core::arch::asm!("dsb ishst", options(nostack)) };
            match inv.range {
                Some((start, end)) => {
                    let pages = (end - start).div_ceil(4096);
                    let leaf = inv.leaf_only;
                    if self.range_ops && pages > 1 {
                        let ttl = if leaf && (1..=3).contains(&inv.level) {
                            inv.level as u64
                        } else {
                            0
                        };
                        for op in range_ops(start, pages) {
                            let operand = range_operand(&op, ttl);
                            // SAFETY: TLB invalidation only.
                            unsafe {
                                if leaf {
                                    core::arch::asm!(".arch_extension tlb-rmi", "tlbi ripas2le1is, {}", in(reg) operand, options(nostack));
                                } else {
                                    core::arch::asm!(".arch_extension tlb-rmi", "tlbi ripas2e1is, {}", in(reg) operand, options(nostack));
                                }
                            }
                        }
                    } else {
                        // One operation per unit of the level hint (a 2 MiB block is one entry).
                        let step = match inv.level {
                            1 => 1u64 << 30,
                            2 => 1 << 21,
                            _ => 1 << 12,
                        };
                        let step = if leaf { step } else { 4096 };
                        let mut ipa = start & !(step - 1);
                        while ipa < end {
                            tlbi_ipas2(ipa >> 12, leaf);
                            ipa += step;
                        }
                    }
                    // Stage-2 TLBIs must complete before the stage-1+2 invalidation.
                    // SAFETY: TLB maintenance and barriers only.
                    unsafe {
                        core::arch::asm!("dsb ish", "tlbi vmalle1is", options(nostack));
                    }
                }
                None => {
                    // SAFETY: TLB maintenance only; VMALLS12E1IS covers stage 2 and combined.
                    unsafe { core::arch::asm!("tlbi vmalls12e1is", options(nostack)) };
                }
            }
            // SAFETY: barrier only: complete before switching VTTBR back.
            unsafe { core::arch::asm!("dsb ish", options(nostack)) };
        });
    }

    fn sync(&self, _vmid: u16) -> Result<(), TlbError> {
        // The DSB ISH in `invalidate` already waited for every broadcast TLBI to complete on all
        // CPUs; the ISB makes this CPU's later instruction fetches use the new translations.
        // SAFETY: barriers only.
        unsafe { core::arch::asm!("dsb ish", "isb", options(nostack)) };
        Ok(())
    }

    fn name(&self) -> &str {
        "cpu"
    }
}
