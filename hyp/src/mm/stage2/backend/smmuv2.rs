//! SMMUv2 (MMU-500) TLB maintenance for one VM's stage 2, through the registers of the VM's
//! stage-2 context bank.
//!
//! | invalidation | register writes |
//! |---|---|
//! | a range, only leaf entries changed | `CB_S2_TLBIIPAS2L` per 4 KiB page, or per block when the changed entries were all blocks of one level |
//! | a range, a table entry changed | `CB_S2_TLBIIPAS2` per 4 KiB page (also removes walk-cache entries) |
//! | everything (`range: None`), or more than [`FULL_FLUSH_PAGES`] writes | `CB_S2_TLBIIPAS2` per 4 KiB page over the VM's IPA windows (see below) |
//!
//! The value written is `IPA >> 12` (64-bit write: the context bank uses the AArch64 format).
//! Before the writes of one invalidation, [`V2Hooks::pte_barrier`] runs once (a `DSB ISHST` on
//! hardware): the register writes are not ordered after the PTE stores otherwise, and the SMMU
//! could walk the old PTE again after the TLBI. One barrier precedes all the writes of a batch.
//!
//! `sync` writes `CB_TLBSYNC` and polls `CB_TLBSTATUS.SACTIVE` until it clears, at most
//! `max_polls` times (calling [`V2Hooks::relax`] between polls), then gives up with a
//! [`TlbError`] — never a hang.
//!
//! ## Why a full flush walks the VM's IPA windows
//!
//! A stage-2 context bank has no "invalidate everything" register: `CB_TLBIALL` belongs to the
//! stage-1 context-bank format (Linux's drivers only ever use it, as `CB_S1_TLBIALL`, for stage-1
//! contexts, and flush a stage-2 context through global space). The VMID-wide operation is
//! global: `SMMU_TLBIVMID` in global register
//! space 0 (what Linux's `tlb_flush_all` does for stage 2). Its completion is only guaranteed by
//! the **global** sync (`SMMU_sTLBGSYNC`/`sTLBGSTATUS`), which waits for every context's
//! maintenance, needs a lock shared by all VMs, and is therefore not allowed here. Whether a
//! context bank's own `TLBSYNC` also waits for a `TLBIVMID` issued through global space is not
//! something the SMMUv2 specification promises as far as we could establish (Linux always pairs
//! `TLBIVMID` with the global sync), so we do not rely on it.
//!
//! The least bad per-context option left is `TLBIIPAS2` (not the leaf form: walk caches too) for
//! every 4 KiB page of every IPA window the VM's stage 2 may map (its RAM and passthrough
//! windows, given at construction), followed by the context bank's own `TLBSYNC`. It is exact
//! and stays per VM, but costs one register write per page (16 Ki writes for 64 MiB), so it
//! must stay rare: gathers only become full past [`FULL_FLUSH_PAGES`] pages. Stepping by larger
//! blocks would be wrong: a TLBI by IPA only removes the entry that covers that address, and a
//! window may hold 4 KiB entries anywhere. **Invariant the caller keeps:** every IPA the VM's
//! stage 2 ever maps lies inside one of the windows (with no windows, nothing is ever cached).
//!
//! ## Concurrency
//!
//! `TLBSYNC`/`TLBSTATUS` are one pair per context bank: two CPUs of the VM syncing at once could
//! see each other's `SACTIVE` and one could return early. Syncs are therefore serialised by a
//! small spin lock inside the backend. The context bank belongs to one VM, so the lock is per VM
//! (Linux's per-domain `cb_lock` plays the same role); TLBI writes need no lock.

use alloc::vec::Vec;
use core::ptr::NonNull;

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, WriteOnly};

use crate::mm::stage2::backend::smmuv3::level_size;
use crate::mm::stage2::tlb::{FULL_FLUSH_PAGES, Invalidation, TlbBackend, TlbError};

register_bitfields![u32,
    /// `SMMU_CBn_TLBSTATUS`.
    pub TLBSTATUS [
        /// A TLB synchronisation started by a write to `CB_TLBSYNC` is still in progress.
        SACTIVE OFFSET(0) NUMBITS(1) []
    ]
];

register_structs! {
    /// The TLB maintenance registers of one SMMUv2 stage-2 context bank (offsets from the
    /// context bank's base).
    pub CbRegs {
        (0x000 => _reserved0),
        /// `SMMU_CBn_TLBIIPAS2`: invalidate by IPA (`IPA >> 12`), all levels and walk caches.
        (0x630 => pub tlbiipas2: WriteOnly<u64>),
        /// `SMMU_CBn_TLBIIPAS2L`: invalidate by IPA, last-level (leaf) entries only.
        (0x638 => pub tlbiipas2l: WriteOnly<u64>),
        (0x640 => _reserved1),
        /// `SMMU_CBn_TLBSYNC`: start a synchronisation of this context bank's TLB maintenance.
        (0x7f0 => pub tlbsync: WriteOnly<u32>),
        /// `SMMU_CBn_TLBSTATUS`.
        (0x7f4 => pub tlbstatus: ReadOnly<u32, TLBSTATUS::Register>),
        (0x7f8 => @END),
    }
}

/// Register offsets (for [`V2Hooks::wrote`]).
pub const CB_S2_TLBIIPAS2: usize = 0x630;
/// See [`CbRegs::tlbiipas2l`].
pub const CB_S2_TLBIIPAS2L: usize = 0x638;
/// See [`CbRegs::tlbsync`].
pub const CB_TLBSYNC: usize = 0x7f0;
/// See [`CbRegs::tlbstatus`].
pub const CB_TLBSTATUS: usize = 0x7f4;

/// Platform hooks of the SMMUv2 backend. All default to nothing, which is right on the host.
pub trait V2Hooks: Send + Sync {
    /// Makes the PTE stores so far visible to the SMMU's table walker before the TLBI register
    /// writes that follow (`DSB ISHST` on hardware; a cache clean is the table's business).
    fn pte_barrier(&self) {}
    /// The backend just wrote the register at `offset`. Test models react here (e.g. raise
    /// `SACTIVE` on a `TLBSYNC` write); nothing to do on hardware.
    fn wrote(&self, _offset: usize) {}
    /// Called between two polls of `TLBSTATUS` (a short delay on hardware).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Hooks that do nothing (host builds) beyond a spin-loop hint between polls.
pub struct NoHooks;

impl V2Hooks for NoHooks {}

/// Default poll bound of [`SmmuV2ContextTlb::sync`].
pub const DEFAULT_MAX_POLLS: u32 = 1 << 20;

const PAGE: u64 = 4096;
const AGENT: &str = "smmuv2";

/// Stage-2 TLB maintenance of one VM through its SMMUv2 context bank.
pub struct SmmuV2ContextTlb<H: V2Hooks = NoHooks> {
    regs: NonNull<CbRegs>,
    vmid: u16,
    /// The IPA ranges `[start, end)` the VM's stage 2 may map: what a full flush walks.
    windows: Vec<(u64, u64)>,
    max_polls: u32,
    hooks: H,
    /// Serialises `TLBSYNC` + `TLBSTATUS` polling on this context bank (see the module docs).
    sync_lock: spin::Mutex<()>,
}

// SAFETY: `regs` points at memory-mapped registers (or a test model of them) that any CPU may
// access; the only state shared between CPUs beyond the registers is `sync_lock`, a lock.
unsafe impl<H: V2Hooks> Send for SmmuV2ContextTlb<H> {}
// SAFETY: as for Send; concurrent TLBI writes are fine for the hardware, and syncs are serialised.
unsafe impl<H: V2Hooks> Sync for SmmuV2ContextTlb<H> {}

impl<H: V2Hooks> SmmuV2ContextTlb<H> {
    /// The backend for VM `vmid` whose stage-2 context bank's registers start at `regs`.
    /// `windows`: every IPA range `[start, end)` the VM's stage 2 may map (what a full flush
    /// walks). `max_polls`: how many times `sync` reads `TLBSTATUS` before giving up.
    ///
    /// # Safety
    /// `regs` must point at the context bank's registers (mapped as device memory, or a host
    /// model laid out like [`CbRegs`]) and stay valid as long as the backend exists; the context
    /// bank must be used by this VM only.
    pub unsafe fn new(
        regs: NonNull<CbRegs>,
        vmid: u16,
        windows: Vec<(u64, u64)>,
        max_polls: u32,
        hooks: H,
    ) -> Self {
        Self {
            regs,
            vmid,
            windows,
            max_polls,
            hooks,
            sync_lock: spin::Mutex::new(()),
        }
    }

    /// The VMID this backend serves.
    pub fn vmid(&self) -> u16 {
        self.vmid
    }

    fn regs(&self) -> &CbRegs {
        // SAFETY: `new`'s contract: `regs` is valid for the backend's lifetime.
        unsafe { self.regs.as_ref() }
    }

    fn tlbi(&self, leaf: bool, ipa: u64) {
        let (reg, off) = if leaf {
            (&self.regs().tlbiipas2l, CB_S2_TLBIIPAS2L)
        } else {
            (&self.regs().tlbiipas2, CB_S2_TLBIIPAS2)
        };
        reg.set(ipa >> 12);
        self.hooks.wrote(off);
    }

    fn flush_windows(&self) {
        for &(start, end) in &self.windows {
            let mut ipa = start & !(PAGE - 1);
            while ipa < end {
                self.tlbi(false, ipa);
                ipa += PAGE;
            }
        }
    }
}

impl<H: V2Hooks> TlbBackend for SmmuV2ContextTlb<H> {
    fn invalidate(&self, inv: &Invalidation) {
        debug_assert_eq!(inv.vmid, self.vmid, "one context bank per VM");
        self.hooks.pte_barrier();
        let Some((start, end)) = inv.range else {
            self.flush_windows();
            return;
        };
        // Leaf changes all at one block level: one write per block. Otherwise per page: any
        // 4 KiB entry in the range may be cached.
        let step = if inv.leaf_only && (1..=2).contains(&inv.level) {
            level_size(inv.level)
        } else {
            PAGE
        };
        let first = start & !(step - 1);
        let count = end.saturating_sub(first).div_ceil(step);
        if count > FULL_FLUSH_PAGES {
            self.flush_windows();
            return;
        }
        for i in 0..count {
            self.tlbi(inv.leaf_only, first + i * step);
        }
    }

    fn sync(&self, _vmid: u16) -> Result<(), TlbError> {
        let _serialised = self.sync_lock.lock();
        // Any value starts the sync. Not zero: some firmware-mediated SMMUs mishandle stores of
        // the zero register (Linux writes a dummy non-zero value for the same reason).
        self.regs().tlbsync.set(u32::MAX);
        self.hooks.wrote(CB_TLBSYNC);
        for _ in 0..self.max_polls {
            if !self.regs().tlbstatus.is_set(TLBSTATUS::SACTIVE) {
                return Ok(());
            }
            self.hooks.relax();
        }
        Err(TlbError {
            agent: AGENT,
            what: "TLBSYNC timed out: TLBSTATUS.SACTIVE stayed set",
        })
    }

    fn name(&self) -> &str {
        AGENT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    /// A context bank's register page in host memory.
    #[repr(C, align(4096))]
    struct Page([u64; 512]);

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Ev {
        Barrier,
        Write(usize, u64),
        Sync,
    }

    /// The "hardware": sets SACTIVE when TLBSYNC is written and clears it after `latency`
    /// polls (never when `stuck`); logs every write.
    struct Model {
        page: *mut Page,
        latency: u32,
        stuck: bool,
        remaining: AtomicU32,
        active: AtomicBool,
        overlapped: AtomicBool,
        polls: AtomicU32,
        log: Mutex<Vec<Ev>>,
    }

    // SAFETY: the page outlives every backend using the model, and every access to it happens
    // on the thread that holds the backend's sync lock (syncs) or in single-threaded tests.
    unsafe impl Send for Model {}
    // SAFETY: as above.
    unsafe impl Sync for Model {}

    impl Model {
        fn new(latency: u32, stuck: bool) -> Arc<Self> {
            let page = Box::into_raw(Box::new(Page([0; 512])));
            Arc::new(Self {
                page,
                latency,
                stuck,
                remaining: AtomicU32::new(0),
                active: AtomicBool::new(false),
                overlapped: AtomicBool::new(false),
                polls: AtomicU32::new(0),
                log: Mutex::new(Vec::new()),
            })
        }
        fn word(&self, off: usize) -> *mut u64 {
            // SAFETY: `off` is a register offset below 0x800, inside the page.
            unsafe { (self.page as *mut u64).add(off / 8) }
        }
        fn set_status(&self, active: bool) {
            let p = self.word(CB_TLBSTATUS & !7);
            // SAFETY: the page is live; TLBSTATUS is the upper half of its doubleword.
            unsafe { p.write_volatile(u64::from(active) << 32) };
        }
        fn events(&self) -> Vec<Ev> {
            core::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    impl Drop for Model {
        fn drop(&mut self) {
            // SAFETY: allocated by Box::new in `Model::new` and freed only here.
            drop(unsafe { Box::from_raw(self.page) });
        }
    }

    impl V2Hooks for Arc<Model> {
        fn pte_barrier(&self) {
            self.log.lock().unwrap().push(Ev::Barrier);
        }
        fn wrote(&self, off: usize) {
            if off == CB_TLBSYNC {
                if self.active.swap(true, Ordering::SeqCst) {
                    self.overlapped.store(true, Ordering::SeqCst);
                }
                self.remaining.store(self.latency, Ordering::SeqCst);
                self.set_status(true);
                self.log.lock().unwrap().push(Ev::Sync);
            } else {
                // SAFETY: the page is live and written only on this thread.
                let v = unsafe { self.word(off).read_volatile() };
                self.log.lock().unwrap().push(Ev::Write(off, v));
            }
        }
        fn relax(&self) {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.stuck {
                return;
            }
            if self.remaining.fetch_sub(1, Ordering::SeqCst) <= 1 {
                self.active.store(false, Ordering::SeqCst);
                self.set_status(false);
            }
        }
    }

    fn backend(model: &Arc<Model>, windows: Vec<(u64, u64)>) -> SmmuV2ContextTlb<Arc<Model>> {
        let regs = NonNull::new(model.page as *mut CbRegs).unwrap();
        // SAFETY: the model's page is laid out like CbRegs (it is larger) and outlives the
        // backend (both are dropped at the end of each test, the backend first).
        unsafe { SmmuV2ContextTlb::new(regs, 3, windows, 1000, model.clone()) }
    }

    fn inv(range: Option<(u64, u64)>, leaf_only: bool, level: u8) -> Invalidation {
        Invalidation {
            vmid: 3,
            range,
            leaf_only,
            level,
        }
    }

    #[test]
    fn register_offsets() {
        let m = Model::new(1, false);
        let b = backend(&m, vec![]);
        let base = m.page as usize;
        let r = b.regs();
        assert_eq!(&r.tlbiipas2 as *const _ as usize - base, CB_S2_TLBIIPAS2);
        assert_eq!(&r.tlbiipas2l as *const _ as usize - base, CB_S2_TLBIIPAS2L);
        assert_eq!(&r.tlbsync as *const _ as usize - base, CB_TLBSYNC);
        assert_eq!(&r.tlbstatus as *const _ as usize - base, CB_TLBSTATUS);
    }

    #[test]
    fn leaf_pages_use_tlbiipas2l_after_a_barrier() {
        let m = Model::new(3, false);
        let b = backend(&m, vec![]);
        b.invalidate(&inv(Some((0x8000_1000, 0x8000_3000)), true, 3));
        b.sync(3).unwrap();
        assert_eq!(
            m.events(),
            vec![
                Ev::Barrier,
                Ev::Write(CB_S2_TLBIIPAS2L, 0x80001),
                Ev::Write(CB_S2_TLBIIPAS2L, 0x80002),
                Ev::Sync,
            ]
        );
        assert_eq!(m.polls.load(Ordering::SeqCst), 3);
        assert_eq!(b.name(), "smmuv2");
    }

    #[test]
    fn blocks_and_tables() {
        let m = Model::new(1, false);
        let b = backend(&m, vec![]);
        // Two 2 MiB blocks, leaf only: one write per block.
        b.invalidate(&inv(Some((0x8020_0000, 0x8060_0000)), true, 2));
        assert_eq!(
            m.events(),
            vec![
                Ev::Barrier,
                Ev::Write(CB_S2_TLBIIPAS2L, 0x80200),
                Ev::Write(CB_S2_TLBIIPAS2L, 0x80400),
            ]
        );
        // A level-3 table went: every page, the non-leaf register.
        b.invalidate(&inv(Some((0x8020_0000, 0x8040_0000)), false, 2));
        let ev = m.events();
        assert_eq!(ev.len(), 513);
        assert_eq!(ev[1], Ev::Write(CB_S2_TLBIIPAS2, 0x80200));
        assert_eq!(ev[512], Ev::Write(CB_S2_TLBIIPAS2, 0x803ff));
    }

    #[test]
    fn full_flush_walks_the_windows_per_page() {
        let m = Model::new(1, false);
        let b = backend(
            &m,
            vec![(0x8000_0000, 0x8000_3000), (0x0900_0000, 0x0900_1000)],
        );
        b.invalidate(&inv(None, false, 0));
        assert_eq!(
            m.events(),
            vec![
                Ev::Barrier,
                Ev::Write(CB_S2_TLBIIPAS2, 0x80000),
                Ev::Write(CB_S2_TLBIIPAS2, 0x80001),
                Ev::Write(CB_S2_TLBIIPAS2, 0x80002),
                Ev::Write(CB_S2_TLBIIPAS2, 0x09000),
            ]
        );
        // An over-long range becomes the same walk.
        b.invalidate(&inv(Some((0, (FULL_FLUSH_PAGES + 1) * PAGE)), true, 3));
        assert_eq!(m.events().len(), 5);
    }

    #[test]
    fn stuck_sync_times_out() {
        let m = Model::new(1, true);
        let b = backend(&m, vec![]);
        let e = b.sync(3).unwrap_err();
        assert_eq!(e.agent, "smmuv2");
        assert_eq!(m.polls.load(Ordering::SeqCst), 1000);
        // The lock was released: a later sync runs (and times out again).
        assert!(b.sync(3).is_err());
    }

    #[test]
    fn concurrent_syncs_are_serialised() {
        let m = Model::new(50, false);
        let b = Arc::new(backend(&m, vec![]));
        std::thread::scope(|s| {
            for _ in 0..2 {
                let b = b.clone();
                s.spawn(move || {
                    for _ in 0..500 {
                        b.sync(3).unwrap();
                    }
                });
            }
        });
        assert!(!m.overlapped.load(Ordering::SeqCst));
        assert_eq!(m.events().len(), 1000);
    }
}
