//! The emulated SMMUv3 each VM sees, with stream-table shadowing.
//!
//! A VM with DMA-capable devices gets a [`VSmmu`]: an SMMUv3 register file (pages 0 and 1,
//! [`VSMMU_MMIO_SIZE`]) at the IPA where its device tree says the SMMU is. The guest's driver
//! programs it like real hardware — stream table, command queue and event queue in its own
//! memory — and the emulation turns what the guest configures into the physical SMMU's state
//! for the VM's streams:
//!
//! - **Stream table shadowing.** Each guest STE the guest invalidates (`CFGI_STE`,
//!   `CFGI_STE_RANGE`, `CFGI_ALL`) is read from the guest's stream table (linear or 2-level)
//!   through the VM's stage 2, validated, and becomes a physical STE: a guest stage-1 STE
//!   becomes a *nested* STE whose context-descriptor pointer is the guest's (an IPA, walked by the
//!   SMMU through stage 2) over the VM's VMID and stage 2; a guest bypass STE (and GBPA bypass
//!   while the guest SMMU is disabled) becomes a stage-2-only STE (IOVA = IPA); everything else
//!   becomes abort, plus the event real hardware would report (see "What a guest STE becomes").
//!   A physical STE is never bypass, and only the VM's own StreamIDs are ever written.
//! - **Command queue.** Consumed synchronously when the guest writes CMDQ_PROD (and when it
//!   enables the queue or acknowledges a command error): see "Commands".
//! - **Event queue.** Events the hypervisor synthesises (invalid STEs) and physical events of the
//!   VM's streams ([`VSmmu::inject_event`]) are written into the guest's event queue with the
//!   architecture's overflow semantics.
//!
//! What the guest is offered (the ID registers are the hardware's with the rest masked; the
//! field-by-field table is in the `idregs` submodule): stage 1 only (AArch64 tables), no
//! substreams, no stall, no ATS/PRI/MSI/HTTU/BTM/SEV, no EL2 StreamWorld; linear and 2-level
//! stream tables; SIDSIZE, queue sizes, ASID16, COHACC, granules, RIL and BBML as the hardware;
//! OAS = the VM's IPA size; wired interrupts through [`VsmmuIrq`].
//!
//! # Registers
//!
//! ID registers as above; IIDR and AIDR as the hardware's (so the guest applies the right errata
//! workarounds). At reset everything is 0 but GBPA = 0x1000 (ABORT = 0, SHCFG = incoming, as
//! QEMU), so a guest without an SMMU driver does DMA to IPAs through its stage 2.
//!
//! - CR0 keeps SMMUEN, EVENTQEN and CMDQEN (the other bits control features not offered);
//!   CR0ACK equals CR0 at once. IRQ_CTRL keeps GERROR_IRQEN and EVENTQ_IRQEN; IRQ_CTRLACK
//!   equals it. CR1 is stored; CR2 keeps RECINVSID and PTM. GBPA takes a write only with
//!   UPDATE = 1, which reads back as 0 at once.
//! - GERROR is read-only; an error is active while its GERROR and GERRORN bits differ.
//! - Read-only while enabled (the SMMUv3.2 rule; earlier versions leave it CONSTRAINED
//!   UNPREDICTABLE, and ignoring is one of the permitted choices): STRTAB_BASE and
//!   STRTAB_BASE_CFG while SMMUEN = 1; CMDQ_BASE and CMDQ_CONS while CMDQEN = 1; EVENTQ_BASE
//!   and EVENTQ_PROD while EVENTQEN = 1. EVENTQ_PROD/CONS are in page 1 (0x100A8/0x100AC); the
//!   page-0 offsets 0xA8/0xAC are reserved.
//! - Access sizes: 32-bit registers take aligned 32-bit accesses only; 64-bit registers
//!   (STRTAB_BASE, CMDQ_BASE, EVENTQ_BASE, the IRQ_CFG0s) take an aligned 64-bit access or a
//!   32-bit access to either half. Any other size — including a 64-bit access to a 32-bit
//!   register or a pair of them — is [`MmioError::BadSize`], a misaligned access
//!   [`MmioError::BadOffset`]; the hypervisor then injects an abort.
//! - Offsets with no register (reserved space, PRI queue and MSI registers, the page-0 aliases,
//!   the IMPLEMENTATION DEFINED ID space) read as zero and ignore writes, for aligned 32- and
//!   64-bit accesses alike.
//!
//! # What a guest STE becomes
//!
//! | guest STE (SMMUEN = 1) | physical STE | event to the guest |
//! |---|---|---|
//! | V = 1, Config = abort | abort | — |
//! | V = 1, Config = bypass | stage 2 only (IOVA = IPA) | — |
//! | V = 1, Config = S1, valid | nested: the guest's S1 fields (context pointer = IPA) over the VM's VMID and stage 2; S1STALLD = 1 where the hardware could stall | — |
//! | V = 0 | abort | — (see below) |
//! | StreamID outside the table: ≥ 2^LOG2SIZE (LOG2SIZE capped at SIDSIZE), L1 SPAN = 0, beyond the L2 table's span | abort | `C_BAD_STREAMID` if CR2.RECINVSID, on a guest `CFGI_*` only |
//! | L1 descriptor or STE not readable (IPA outside the VM or unmapped) | abort | `F_STE_FETCH` with the fetch address |
//! | Config = S2, nested (no S2P advertised) or reserved | abort | `C_BAD_STE` |
//! | S1CDMax ≠ 0 (SSIDSIZE = 0), S1STALLD = 1 (no stall advertised), S1ContextPtr above the advertised OAS | abort | `C_BAD_STE` |
//! | S1ContextPtr not readable through stage 2 | abort | `F_CD_FETCH` with the pointer |
//!
//! With SMMUEN = 0 every stream follows GBPA: ABORT = 1 → abort, ABORT = 0 → stage 2 only.
//!
//! Real hardware reports these errors when a transaction arrives; the emulation reports them
//! when it loads the configuration (a guest `CFGI_STE*` / `CFGI_ALL`, or SMMUEN 0 → 1: nothing
//! is cached while the SMMU is disabled, so enabling it loads every stream), since that is the
//! only time it looks at the guest's tables. Two cases are deliberately silent: V = 0, the normal
//! state of an unused stream (drivers invalidate such streams routinely and would see spurious
//! events), and a StreamID outside the table when the load came from enabling the SMMU (a 2-level
//! table whose level-2 tables are filled in later, as Linux builds it, is the normal case).
//! A context-descriptor pointer that does not lead to the VM's memory gets `F_CD_FETCH`: to a
//! guest that sees no stage 2 it is a physical address with no memory behind it, and the CD
//! fetch of a real SMMU would end in an external abort. S1Fmt and S1DSS only matter with
//! substreams and are 0 in the physical STE; EATS (no ATS) and STRW (no EL2 StreamWorld) are
//! ignored: physical STEs have EATS = 0 and STRW = NS-EL1. The guest's own stage-2 fields are
//! ignored, as the architecture says for a stage-1-only configuration.
//!
//! # Commands
//!
//! | guest command | what happens |
//! |---|---|
//! | `CFGI_STE`, `CFGI_STE_RANGE`, `CFGI_ALL` | while SMMUEN = 1: re-shadow the VM's StreamIDs in range (each gets a physical STE write, and a nested one a physical `CFGI_CD_ALL` for its StreamID, since the guest's invalidation covers the CD the SMMU fetched through the STE). While SMMUEN = 0 nothing is cached, so nothing to do: enabling the SMMU loads every stream. StreamIDs that are not the VM's are ignored (the guest sees StreamIDs without devices) |
//! | `CFGI_CD`, `CFGI_CD_ALL` | forwarded for the VM's StreamIDs (SubstreamID forced to 0: there are no substreams); for any other StreamID dropped silently and counted (`foreign_dropped`) |
//! | `TLBI_NH_ALL`, `TLBI_NH_ASID`, `TLBI_NH_VA`, `TLBI_NH_VAA` | forwarded with the VMID replaced by the VM's (range fields kept only if the hardware has IDR3.RIL) |
//! | `TLBI_NSNH_ALL` | forwarded as `TLBI_NH_ALL` for the VM's VMID: for an SMMU without stage 2 or EL2 that is everything it caches, and Linux issues it at every reset |
//! | `TLBI_EL2_*`, `TLBI_S12_VMALL`, `TLBI_S2_IPA` | `CERROR_ILL` (no stage 2, no HYP advertised) |
//! | `ATC_INV`, `PRI_RESP`, `RESUME`, `STALL_TERM` | `CERROR_ILL` (no ATS, PRI or stall advertised) |
//! | `PREFETCH_CONFIG`, `PREFETCH_ADDR` | no-op |
//! | `CMD_SYNC` | submits what was forwarded and, if anything was forwarded since the last physical sync, waits for a physical sync; then CONS moves past it. CS = SIG_IRQ raises [`VsmmuIrq::cmd_sync`]; SIG_SEV does nothing |
//! | anything [`Command::decode`] rejects (reserved opcodes, SSec = 1, CS = 0b11, …) | `CERROR_ILL` |
//!
//! Every forwarded command is rebuilt from the decoded fields with [`Command::encode`], so
//! nothing the guest put in reserved or undefined bits reaches the hardware, and only the
//! commands above, with the VM's VMID and StreamIDs, ever do. On an error the queue stops as on
//! hardware: CMDQ_CONS points at the bad command with CMDQ_CONS.ERR = `CERROR_ILL` (or
//! `CERROR_ABT` when the command cannot be read from guest memory), GERROR.CMDQ_ERR toggles
//! ([`VsmmuIrq::gerror`] if GERROR_IRQEN), and PROD writes are only recorded. When the guest
//! acknowledges the error in GERRORN (after replacing the command, as Linux does, or after
//! moving CONS with the queue disabled), CMDQ_CONS.ERR clears and processing resumes at CONS.
//!
//! A `CMD_SYNC` completes before the PROD write returns, so a driver that writes PROD and then
//! polls CONS reads CONS once: one PROD write plus at most one CONS read per batch.
//! [`VSmmu::stats`] counts this.
//!
//! # Errors from the physical side
//!
//! If [`PhysSmmu::write_ste`], [`PhysSmmu::submit`] or [`PhysSmmu::sync`] fails, the failure is
//! logged and counted (`phys_errors`) and the guest's command still completes: the guest cannot
//! do anything about it, and stalling its queue would only hang its driver. A failed STE write
//! leaves the previous physical STE, which was itself one of the safe forms above.
//!
//! # Concurrency
//!
//! Each VM has its own `VSmmu`, and all of its state sits behind one `spin::Mutex` (there is no
//! global state). Its vCPUs serialise on it, which is what a single command queue implies
//! anyway; another VM's vSMMU never waits for it. Guest memory and the physical SMMU are called
//! with the lock held (a physical sync waits with it held); the interrupt callbacks are called
//! after it is released. [`VSmmu::inject_event`] takes the same lock, so it must not be called
//! from an interrupt handler that can interrupt a holder of that lock on the same CPU.
//!
//! [`Command::decode`]: crate::smmu::v3::cmd::Command::decode
//! [`Command::encode`]: crate::smmu::v3::cmd::Command::encode

mod commands;
mod idregs;
mod queue;
mod regfile;
mod shadow;
#[cfg(test)]
mod tests;

use core::fmt;

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use spin::Mutex;

use crate::smmu::v3::cmd::Command;
use crate::smmu::v3::event::{EVENT_BYTES, Event};
use crate::smmu::v3::regs::off;
use crate::smmu::v3::ste::{S2Config, Ste};
use crate::trap::{MmioDevice, MmioError};

use idregs::IdRegs;
use queue::Queue;
use regfile::{
    CMDQ_CONS_ERR_MASK, CR0_CMDQEN, CR0_MASK, CR0_SMMUEN, GERROR_CMDQ_ERR, GERROR_EVENTQ_ABT_ERR,
    GERROR_MASK, IRQ_EVENTQ_EN, IRQ_GERROR_EN, Part, Q_OVF, Q_PTR_MASK, Regs, Target,
};
use shadow::GuestCfg;

/// Size of the emulated SMMU's MMIO window: register pages 0 and 1.
pub const VSMMU_MMIO_SIZE: u64 = off::SIZE;

/// Why a guest-memory access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// The IPA is outside the VM's memory or not mapped in its stage 2.
    Unmapped { ipa: u64 },
    /// The IPA is mapped but not for this kind of access (read-only memory, a device).
    Denied { ipa: u64 },
}

/// A VM's memory as its SMMU sees it: IPAs translated through the VM's stage 2.
///
/// An access succeeds only if every byte of it is ordinary RAM the stage 2 maps with the needed
/// permission. Implementations should copy naturally aligned 8-byte chunks with single 64-bit
/// loads and stores, so an STE, descriptor or command doubleword is read single-copy atomically,
/// as the SMMU reads it.
pub trait GuestMemory: Send + Sync {
    /// Reads `buf.len()` bytes at `ipa`.
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError>;
    /// Writes `buf` at `ipa`.
    fn write(&self, ipa: u64, buf: &[u8]) -> Result<(), GuestMemError>;
}

/// Why the physical SMMU could not do what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysError {
    /// The SMMU did not complete in time.
    Timeout,
    /// The SMMU reported a command error (`CERROR_*` code).
    Command(u8),
    /// The StreamID is not one the hypervisor can program.
    Stream(u32),
    /// Anything else.
    Other(&'static str),
}

impl fmt::Display for PhysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhysError::Timeout => f.write_str("timeout"),
            PhysError::Command(code) => write!(f, "command error {code}"),
            PhysError::Stream(sid) => write!(f, "bad StreamID {sid:#x}"),
            PhysError::Other(msg) => f.write_str(msg),
        }
    }
}

/// The physical SMMU, as the emulation of one VM uses it.
pub trait PhysSmmu: Send + Sync {
    /// Makes `ste` the live STE of `sid`: write it (following the architecture's rules for
    /// updating a live STE), invalidate the SMMU's cached copy (`CFGI_STE`) and wait for that to
    /// complete (`CMD_SYNC`). Only ever called with StreamIDs the VM owns.
    fn write_ste(&self, sid: u32, ste: Ste) -> Result<(), PhysError>;
    /// Queues `cmds` on the physical command queue (no sync implied).
    fn submit(&self, cmds: &[[u64; 2]]) -> Result<(), PhysError>;
    /// Waits until every command submitted so far has completed (`CMD_SYNC`).
    fn sync(&self) -> Result<(), PhysError>;
    /// SMMU_IDR0..5.
    fn idr(&self) -> [u32; 6];
    /// SMMU_IIDR.
    fn iidr(&self) -> u32;
    /// SMMU_AIDR.
    fn aidr(&self) -> u32;
}

/// The emulated SMMU's interrupt lines (eventq, gerror, cmdq-sync), as edge triggers. No-ops
/// until there is a virtual interrupt controller.
pub trait VsmmuIrq: Send + Sync {
    /// New entries in the event queue (with IRQ_CTRL.EVENTQ_IRQEN set).
    fn eventq(&self);
    /// A global error became active (with IRQ_CTRL.GERROR_IRQEN set).
    fn gerror(&self);
    /// A `CMD_SYNC` with CS = SIG_IRQ completed.
    fn cmd_sync(&self);
}

/// Counters of one VM's emulated SMMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsmmuStats {
    /// Guest writes of CMDQ_PROD.
    pub prod_writes: u64,
    /// Guest reads of CMDQ_CONS.
    pub cons_reads: u64,
    /// Other guest register reads.
    pub other_reads: u64,
    /// Other guest register writes.
    pub other_writes: u64,
    /// Guest commands consumed (CONS moved past them).
    pub commands: u64,
    /// Commands sent to the physical SMMU on the guest's behalf.
    pub commands_forwarded: u64,
    /// Guest commands that stopped the queue with a command error.
    pub commands_rejected: u64,
    /// `CFGI_CD*` commands naming a StreamID that is not the VM's (dropped).
    pub foreign_dropped: u64,
    /// Physical syncs waited for on behalf of a guest `CMD_SYNC`.
    pub phys_syncs: u64,
    /// Physical STEs written.
    pub stes_installed: u64,
    /// Guest STEs that were invalid and became abort (with or without an event).
    pub bad_stes: u64,
    /// Events written into the guest's event queue.
    pub events_injected: u64,
    /// Events lost: queue disabled, full (overflow) or not writable.
    pub events_dropped: u64,
    /// Failed calls to the physical SMMU.
    pub phys_errors: u64,
}

/// Interrupts to raise once the lock is released.
#[derive(Clone, Copy, Default)]
struct PendingIrqs {
    eventq: bool,
    gerror: bool,
    cmd_sync: bool,
}

/// Commands forwarded in one physical submission at most.
const BATCH: usize = 32;

struct State {
    regs: Regs,
    /// The guest's configuration of each of the VM's streams (parallel to `VSmmu::sids`) as
    /// last loaded; meaningful while SMMUEN = 1.
    cfgs: Vec<GuestCfg>,
    /// Forwarded commands not yet submitted.
    batch: Vec<[u64; 2]>,
    /// Commands were submitted since the last physical sync.
    unsynced: bool,
    stats: VsmmuStats,
    irqs: PendingIrqs,
}

/// One VM's emulated SMMUv3. Register it on the VM's [`MmioBus`](crate::trap::MmioBus) with a
/// [`VSMMU_MMIO_SIZE`] window.
pub struct VSmmu {
    vmid: u16,
    s2: S2Config,
    /// The VM's StreamIDs, sorted.
    sids: Vec<u32>,
    ids: IdRegs,
    mem: Arc<dyn GuestMemory>,
    phys: Arc<dyn PhysSmmu>,
    irq: Arc<dyn VsmmuIrq>,
    state: Mutex<State>,
}

impl VSmmu {
    /// The emulated SMMU of VM `vmid`, whose stage 2 is `s2` and whose devices use the
    /// StreamIDs `stream_ids` (the same numbers for the guest and the hardware).
    ///
    /// Reads the physical ID registers from `phys` and puts every one of the VM's streams in
    /// the reset state at once: guest SMMU disabled with GBPA bypass, so each physical STE is
    /// stage 2 only.
    pub fn new(
        vmid: u16,
        s2: S2Config,
        stream_ids: &[u32],
        mem: Arc<dyn GuestMemory>,
        phys: Arc<dyn PhysSmmu>,
        irq: Arc<dyn VsmmuIrq>,
    ) -> VSmmu {
        let mut sids = stream_ids.to_vec();
        sids.sort_unstable();
        sids.dedup();
        let ipa_bits = 64 - u32::from(s2.t0sz);
        let ids = IdRegs::derive(
            phys.idr(),
            phys.iidr(),
            phys.aidr(),
            ipa_bits,
            sids.last().copied(),
        );
        let cfgs = vec![GuestCfg::Abort; sids.len()];
        let vsmmu = VSmmu {
            vmid,
            s2,
            ids,
            mem,
            phys,
            irq,
            sids,
            state: Mutex::new(State {
                regs: Regs::RESET,
                cfgs,
                batch: Vec::with_capacity(BATCH),
                unsynced: false,
                stats: VsmmuStats::default(),
                irqs: PendingIrqs::default(),
            }),
        };
        {
            let mut st = vsmmu.state.lock();
            vsmmu.install_all(&mut st);
        }
        vsmmu
    }

    /// The VM's VMID.
    pub fn vmid(&self) -> u16 {
        self.vmid
    }

    /// Whether `sid` is one of the VM's StreamIDs.
    pub fn owns(&self, sid: u32) -> bool {
        self.stream_index(sid).is_some()
    }

    /// The VM's StreamIDs, sorted.
    pub fn stream_ids(&self) -> &[u32] {
        &self.sids
    }

    /// Index of `sid` in `sids` (and `State::cfgs`).
    fn stream_index(&self, sid: u32) -> Option<usize> {
        self.sids.binary_search(&sid).ok()
    }

    /// The counters.
    pub fn stats(&self) -> VsmmuStats {
        self.state.lock().stats
    }

    /// Puts the emulated SMMU back in its reset state (for a VM reset): registers at their
    /// reset values, every stream stage 2 only (GBPA bypass). Completes anything still queued
    /// for the hardware first. The counters keep counting.
    pub fn reset(&self) {
        self.locked(|vs, st| {
            vs.sync(st);
            st.regs = Regs::RESET;
            st.cfgs.fill(GuestCfg::Abort);
            vs.install_all(st);
        });
    }

    /// Writes `ev` into the guest's event queue: for events the hypervisor synthesises and for
    /// physical events of the VM's streams (the caller translates those: StreamID as the guest
    /// knows it, which is the same number for now).
    ///
    /// Returns whether the record was written. It is dropped (and counted) if its StreamID is
    /// not the VM's, if the guest has not enabled the SMMU and its event queue, if the queue is
    /// full (the overflow flag in EVENTQ_PROD toggles, unless an overflow is already pending),
    /// or if the queue's memory cannot be written (GERROR.EVENTQ_ABT_ERR). Raises
    /// [`VsmmuIrq::eventq`] when a record was written and EVENTQ_IRQEN is set.
    pub fn inject_event(&self, ev: Event) -> bool {
        self.locked(|vs, st| {
            if vs.stream_index(ev.sid).is_none() || !st.regs.smmu_enabled() {
                st.stats.events_dropped += 1;
                return false;
            }
            vs.write_event(st, &ev)
        })
    }

    /// Runs `f` with the state locked, then raises the interrupts it left pending.
    fn locked<R>(&self, f: impl FnOnce(&Self, &mut State) -> R) -> R {
        let (r, irqs) = {
            let mut st = self.state.lock();
            let r = f(self, &mut st);
            (r, core::mem::take(&mut st.irqs))
        };
        if irqs.eventq {
            self.irq.eventq();
        }
        if irqs.gerror {
            self.irq.gerror();
        }
        if irqs.cmd_sync {
            self.irq.cmd_sync();
        }
        r
    }

    /// Makes the global error `bit` active, if it is not already (it toggles GERROR), and
    /// raises the GERROR interrupt if enabled.
    fn raise_gerror(&self, st: &mut State, bit: u32) {
        if st.regs.gerror_active() & bit == 0 {
            st.regs.gerror ^= bit;
            if st.regs.irq_ctrl & IRQ_GERROR_EN != 0 {
                st.irqs.gerror = true;
            }
        }
    }

    /// Appends `ev` to the guest's event queue (see [`VSmmu::inject_event`]).
    fn write_event(&self, st: &mut State, ev: &Event) -> bool {
        let regs = &mut st.regs;
        if !regs.eventq_enabled() {
            st.stats.events_dropped += 1;
            return false;
        }
        let q = Queue::from_base(regs.eventq_base, EVENT_BYTES as u64, self.ids.eventqs);
        let (prod, cons) = (regs.eventq_prod, regs.eventq_cons);
        if q.is_full(prod, cons) {
            // Overflow: the record is lost. OVFLG toggles so that it differs from OVACKFLG,
            // unless an overflow is already waiting for the guest's acknowledgement.
            if (prod ^ cons) & Q_OVF == 0 {
                regs.eventq_prod ^= Q_OVF;
            }
            st.stats.events_dropped += 1;
            return false;
        }
        let mut rec = [0u8; EVENT_BYTES];
        for (chunk, d) in rec.chunks_exact_mut(8).zip(ev.encode()) {
            chunk.copy_from_slice(&d.to_le_bytes());
        }
        if self.mem.write(q.entry_addr(prod), &rec).is_err() {
            st.stats.events_dropped += 1;
            self.raise_gerror(st, GERROR_EVENTQ_ABT_ERR);
            return false;
        }
        st.regs.eventq_prod = (prod & Q_OVF) | q.inc(prod);
        st.stats.events_injected += 1;
        if st.regs.irq_ctrl & IRQ_EVENTQ_EN != 0 {
            st.irqs.eventq = true;
        }
        true
    }

    /// Writes the physical STE of stream `i` for its current guest configuration.
    fn install(&self, st: &mut State, i: usize) {
        let sid = self.sids[i];
        let ste = shadow::physical(
            self.vmid,
            &self.s2,
            self.ids.phys_stall,
            &st.regs,
            &st.cfgs[i],
        );
        match self.phys.write_ste(sid, ste) {
            Ok(()) => st.stats.stes_installed += 1,
            Err(e) => {
                log::warn!(
                    "vsmmu (VMID {}): writing the STE of StreamID {:#x} failed: {e}",
                    self.vmid,
                    sid
                );
                st.stats.phys_errors += 1;
            }
        }
    }

    /// Writes the physical STE of every stream.
    fn install_all(&self, st: &mut State) {
        for i in 0..self.sids.len() {
            self.install(st, i);
        }
    }

    /// Loads stream `i`'s configuration from the guest's stream table, reporting problems to the
    /// guest as the module docs describe, and installs the resulting physical STE. `from_cfgi`: the
    /// load was asked for by a guest command (rather than by enabling the SMMU).
    fn reload(&self, st: &mut State, i: usize, from_cfgi: bool) {
        let sid = self.sids[i];
        let loaded = shadow::fetch(&*self.mem, &st.regs, self.ids.sidsize, sid)
            .and_then(|ste| shadow::validate(&*self.mem, &ste, self.ids.oas_bits));
        let cfg = match loaded {
            Ok(cfg) => cfg,
            Err(problem) => {
                st.stats.bad_stes += 1;
                if let Some(ev) = problem.event(sid, &st.regs, from_cfgi) {
                    self.write_event(st, &ev);
                }
                GuestCfg::Abort
            }
        };
        st.cfgs[i] = cfg;
        self.install(st, i);
        if let GuestCfg::S1(_) = cfg {
            // The SMMU may still hold context descriptors it fetched for this stream earlier
            // (the physical STE may not even have changed, so writing it invalidated nothing):
            // the guest invalidated the stream's configuration, which includes its CD.
            self.forward(st, Command::CfgiCdAll { sid });
        }
    }

    /// A guest write of CR0 (CR0ACK follows at once).
    fn write_cr0(&self, st: &mut State, value: u32) {
        let old = st.regs.cr0;
        st.regs.cr0 = value & CR0_MASK;
        let changed = old ^ st.regs.cr0;
        if changed & CR0_SMMUEN != 0 {
            if st.regs.smmu_enabled() {
                // Nothing was cached while disabled: every stream's configuration comes from the
                // tables as they are now.
                for i in 0..self.sids.len() {
                    self.reload(st, i, false);
                }
                self.submit(st);
            } else {
                self.install_all(st);
            }
        }
        if changed & CR0_CMDQEN != 0 && st.regs.cmdq_enabled() {
            self.consume(st);
        }
    }

    /// A guest write of the register at `reg` (the whole register, halves already merged).
    fn write_reg(&self, st: &mut State, reg: u64, value: u64) {
        match reg {
            off::CR0 => self.write_cr0(st, value as u32),
            off::GBPA => {
                if st.regs.write_gbpa(value as u32) && !st.regs.smmu_enabled() {
                    self.install_all(st);
                }
            }
            off::GERRORN => {
                let was_stopped = st.regs.gerror_active() & GERROR_CMDQ_ERR != 0;
                st.regs.gerrorn = value as u32 & GERROR_MASK;
                // Acknowledging a command error restarts the queue (CMDQ_CONS.ERR is only
                // meaningful while the error is active).
                if was_stopped && st.regs.gerror_active() & GERROR_CMDQ_ERR == 0 {
                    st.regs.cmdq_cons &= !CMDQ_CONS_ERR_MASK;
                    self.consume(st);
                }
            }
            off::CMDQ_PROD => {
                st.regs.cmdq_prod = value as u32 & Q_PTR_MASK;
                self.consume(st);
            }
            _ => {
                st.regs.write_plain(reg, value);
            }
        }
    }

    /// The value of the register at `reg` (a register start offset).
    fn read_reg(&self, st: &State, reg: u64) -> u64 {
        match reg {
            off::IDR0..=off::IDR5 => self.ids.idr[(reg / 4) as usize].into(),
            off::IIDR => self.ids.iidr.into(),
            off::AIDR => self.ids.aidr.into(),
            _ => st.regs.read(reg).unwrap_or(0),
        }
    }
}

impl MmioDevice for VSmmu {
    fn name(&self) -> &str {
        "vsmmuv3"
    }

    fn read(&self, _vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
        let target = regfile::decode_access(offset, size)?;
        let mut st = self.state.lock();
        if target == Target::Reg(off::CMDQ_CONS, Part::Whole) {
            st.stats.cons_reads += 1;
        } else {
            st.stats.other_reads += 1;
        }
        Ok(match target {
            Target::Reg(reg, part) => regfile::extract(self.read_reg(&st, reg), part),
            Target::Unimplemented => 0,
        })
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let target = regfile::decode_access(offset, size)?;
        self.locked(|vs, st| {
            if target == Target::Reg(off::CMDQ_PROD, Part::Whole) {
                st.stats.prod_writes += 1;
            } else {
                st.stats.other_writes += 1;
            }
            if let Target::Reg(reg, part) = target {
                let current = vs.read_reg(st, reg);
                vs.write_reg(st, reg, regfile::merge(current, part, value));
            }
        });
        Ok(())
    }
}

impl fmt::Debug for VSmmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VSmmu")
            .field("vmid", &self.vmid)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
