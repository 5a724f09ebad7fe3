//! The driver through which the hypervisor owns a physical SMMUv3.
//!
//! [`SmmuV3::probe`] reads the ID registers and allocates the stream table and the queues;
//! [`SmmuV3::reset`] programs the SMMU from whatever state firmware left it in and enables it
//! with every stream aborting; [`SmmuV3::write_ste`] then gives streams to VMs. Events and global
//! errors are collected with [`SmmuV3::drain_events`] and [`SmmuV3::gerror`].
//!
//! Everything goes through two small traits, so the whole driver runs on the host against the
//! register-level model in [`super::model`]:
//!
//! * [`SmmuMmio`]: 32/64-bit register accesses by offset ([`MmioAt`] on the target).
//! * [`DmaPages`]: zeroed, identity-mapped memory for the tables and queues, and a cache clean
//!   for SMMUs that do not snoop (IDR0.COHACC = 0).
//!
//! ## Command submission
//!
//! Until [`SmmuV3::install_cmd_queue`] the driver submits through a small internal queue: one
//! producer at a time (a spin lock), each call appends its commands and a `CMD_SYNC` and waits
//! for the sync. It serves the reset sequence and [`SmmuV3::write_ste`]. Per-VM TLB maintenance
//! needs the lock-free [`CmdQueue`] (many CPUs at once): `install_cmd_queue` builds it over the
//! same queue memory (the internal queue is empty then) and from then on every command the
//! driver issues goes through it too. [`CommandSubmit`] is the common "append and wait" view.
//!
//! ## Command errors
//!
//! When the SMMU stops at a command (CMDQ_CONS.ERR != 0, GERROR.CMDQ_ERR active) the internal
//! queue does what Linux does: for `CERROR_ILL` it overwrites the command at CONS with a
//! `CMD_SYNC` (so the SMMU skips it), for `CERROR_ABT` / `CERROR_ATC_INV_SYNC` it leaves the
//! command (the SMMU fetches it again / moves on); then it acknowledges GERROR.CMDQ_ERR by
//! toggling GERRORN.CMDQ_ERR (which restarts the queue) and writes the same PROD again (harmless;
//! it restarts an implementation that only looks at the queue on PROD writes). The commands
//! after the bad one still execute; the caller gets [`SmmuError::CommandError`] once its
//! `CMD_SYNC` completed. With the lock-free queue installed, [`SmmuV3::gerror`] does the same
//! through [`CmdQueue::skip_failed_command`] (and a failing [`CommandSubmit::submit_sync`] calls
//! it at once).
//!
//! CMDQ_CONS.ERR only means something while GERROR.CMDQ_ERR is active: QEMU leaves the last code
//! in the register after the error is acknowledged. Every CONS read here, including the one
//! [`CmdQueue`] makes through [`SmmuV3::cmdq_hw`], masks such a stale code.
//!
//! ## STE updates
//!
//! See [`SmmuV3::write_ste`]: the order follows IHI0070 §3.21.3 ("Configuration structure update
//! procedure"). Every STE starts as [`Ste::abort`]; the driver never writes a bypass STE, and
//! [`SmmuV3::reset`] sets GBPA to abort before it disables the SMMU, so from then on no DMA
//! bypasses translation (before it, whatever firmware set applies: QEMU resets GBPA to bypass).
//!
//! ## Power
//!
//! Runtime PM ([`crate::power::rpm`]) turns the SMMU's power domain off when nobody uses it. The
//! registers lose their state then; the stream table, the queues and the driver's own state live
//! in hypervisor RAM and survive. So the driver's memory *is* the saved state, and nothing needs
//! copying out:
//!
//! * [`SmmuV3::suspend`] quiesces: the command queue drained (CONS = PROD), translation off
//!   (GBPA = abort first, so no DMA bypasses), every event handed to the caller, then CR0 = 0.
//! * [`SmmuV3::write_ste_offline`] changes an STE while the SMMU is off: memory only, no command
//!   and no register access.
//! * [`SmmuV3::resume`] programs the registers again as [`SmmuV3::reset`] does, but continues the
//!   queues where they stopped (the lock-free [`CmdQueue`]'s counters go on seamlessly, see
//!   [`CmdQueue::resync`]) and keeps the stream table: `CMD_CFGI_ALL` makes the SMMU fetch every
//!   STE again, `CMD_TLBI_*_ALL` empties its TLBs. It is valid whether or not the registers
//!   were lost.
//! * [`SmmuV3::simulate_power_loss`] writes the registers' reset values, for a board (QEMU) whose
//!   power domain is simulated, so that the resume path is exercised for real.
//!
//! ## Polling
//!
//! Every wait is bounded by [`Poll::spins`] iterations, each calling [`Poll::relax`]; running out
//! is an [`SmmuError::Timeout`] naming the register, never a hang.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use spin::{Mutex, Once};
use tock_registers::LocalRegisterCopy;

use super::cmd::Command;
use super::cmdq::{CmdQueue, CmdqError, CmdqOptions, QueueHw};
use super::event::{EVENT_BYTES, Event};
use super::regs::{
    self, CERROR_ABT, CERROR_ATC_INV_SYNC, CERROR_ILL, CR0, CR1, CR2, GBPA, GERROR_CMDQ_ERR,
    GERROR_ERR_MASK, IDR0, IDR1, IDR3, IDR5, IRQ_CTRL, Q_OVF, off,
};
use super::ste::{L1_DESC_BYTES, L1Desc, STE_BYTES, STE_DWORDS, STRTAB_SPLIT, Ste, SteConfig};
use crate::smmu::SmmuCaps;

/// Largest command queue the driver allocates (entries, log2): 4 KiB.
pub const CMDQ_MAX_LOG2: u32 = 8;
/// Largest event queue the driver allocates (entries, log2): 128 KiB. Faulting DMA floods it
/// (QEMU writes one event per 4-byte chunk of a failed transfer).
pub const EVTQ_MAX_LOG2: u32 = 12;
/// StreamID bits above which the driver uses a 2-level stream table (when the SMMU has one).
pub const LINEAR_MAX_SID_BITS: u32 = 8;
/// Largest level-1 table (log2 of its descriptors): 8192 descriptors, 64 KiB, so at most
/// `STRTAB_SPLIT + 13` = 21 StreamID bits. Streams above are out of range (`C_BAD_STREAMID`:
/// they abort).
pub const L1_MAX_LOG2: u32 = 13;

const CMD_BYTES: usize = 16;

/// Register access to one SMMU, by byte offset from its base (page 1 included).
pub trait SmmuMmio: Send + Sync {
    /// Reads a 32-bit register. Ordered before the caller's later memory reads (queue entries).
    fn read32(&self, off: u64) -> u32;
    /// Writes a 32-bit register. The caller's earlier memory writes (queue entries, STEs) are
    /// visible to the SMMU before the SMMU sees this write.
    fn write32(&self, off: u64, v: u32);
    /// Reads a 64-bit register.
    fn read64(&self, off: u64) -> u64;
    /// Writes a 64-bit register (same ordering as [`SmmuMmio::write32`]).
    fn write64(&self, off: u64, v: u64);
}

/// Memory the SMMU reads and writes: stream tables and queues.
///
/// # Safety
///
/// Implementations promise that `alloc_zeroed` returns the address of `bytes` zeroed bytes,
/// aligned to `align`, that the CPU can read and write at that very address (physical = virtual)
/// and the SMMU can access at it, that nothing else uses them, and that they stay allocated for
/// the life of the program (or of every [`SmmuV3`] holding this allocator). On an SMMU without
/// IDR0.COHACC the memory must be mapped non-cacheable, or `clean` must clean *and invalidate*
/// the range to the point of coherency (it is called after the CPU writes the memory and before
/// it reads what the SMMU wrote).
pub unsafe trait DmaPages: Send + Sync {
    /// `bytes` zeroed bytes aligned to `align` (a power of two), or `None`.
    fn alloc_zeroed(&self, bytes: usize, align: usize) -> Option<u64>;
    /// Makes `[pa, pa + len)` coherent with a non-snooping SMMU (see the trait docs).
    fn clean(&self, _pa: u64, _len: usize) {}
}

/// [`DmaPages`] from the global allocator, never freed: for a hypervisor whose heap is
/// identity-mapped normal memory.
#[derive(Debug)]
pub struct HeapDma {
    clean: Option<fn(u64, usize)>,
}

impl HeapDma {
    /// Allocates from the global allocator; `clean` is the cache maintenance for a
    /// non-coherent SMMU (clean + invalidate to the point of coherency), `None` if coherent.
    ///
    /// # Safety
    ///
    /// The global allocator's memory is mapped at its physical address (virtual = physical),
    /// as normal memory the SMMU can reach.
    pub const unsafe fn new(clean: Option<fn(u64, usize)>) -> HeapDma {
        HeapDma { clean }
    }
}

// SAFETY: every allocation is fresh, zeroed, aligned as asked, never freed (so nothing else ever
// gets it), and — by `new`'s contract — at its physical address.
unsafe impl DmaPages for HeapDma {
    fn alloc_zeroed(&self, bytes: usize, align: usize) -> Option<u64> {
        let layout = core::alloc::Layout::from_size_align(bytes.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(p as u64)
    }

    fn clean(&self, pa: u64, len: usize) {
        if let Some(f) = self.clean {
            f(pa, len);
        }
    }
}

/// An SMMU's registers at a fixed address, accessed with volatile loads and stores.
#[derive(Debug)]
pub struct MmioAt {
    base: usize,
}

impl MmioAt {
    /// Registers at `base`.
    ///
    /// # Safety
    ///
    /// `base` is the SMMU's register base from the device tree, mapped as device memory for at
    /// least [`off::SIZE`] bytes for as long as this value lives, and no other code drives this
    /// SMMU's registers.
    pub const unsafe fn new(base: u64) -> MmioAt {
        MmioAt {
            base: base as usize,
        }
    }
}

/// Orders earlier memory writes before a later device write, as seen by the SMMU.
#[inline]
fn io_wmb() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    crate::arch::sysreg::dsb_sy();
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// Orders a device read before later memory reads.
#[inline]
fn io_rmb() {
    io_wmb();
}

impl SmmuMmio for MmioAt {
    fn read32(&self, off: u64) -> u32 {
        // SAFETY: `new`'s contract: the register file is mapped at `base`; `off` is a register
        // offset within it, 4-byte aligned.
        let v = unsafe { core::ptr::read_volatile((self.base + off as usize) as *const u32) };
        io_rmb();
        v
    }

    fn write32(&self, off: u64, v: u32) {
        io_wmb();
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile((self.base + off as usize) as *mut u32, v) };
    }

    fn read64(&self, off: u64) -> u64 {
        // SAFETY: as in `read32`; 64-bit registers are 8-byte aligned.
        let v = unsafe { core::ptr::read_volatile((self.base + off as usize) as *const u64) };
        io_rmb();
        v
    }

    fn write64(&self, off: u64, v: u64) {
        io_wmb();
        // SAFETY: as in `read64`.
        unsafe { core::ptr::write_volatile((self.base + off as usize) as *mut u64, v) };
    }
}

/// How the driver waits for the SMMU.
#[derive(Clone, Copy, Debug)]
pub struct Poll {
    /// Most iterations of one wait.
    pub spins: u64,
    /// Called once per iteration (a pause, a short delay).
    pub relax: fn(),
}

impl Default for Poll {
    /// About as long as Linux's one-second `ARM_SMMU_POLL_TIMEOUT_US` when each spin is an MMIO
    /// read.
    fn default() -> Self {
        Poll {
            spins: 1 << 22,
            relax: core::hint::spin_loop,
        }
    }
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmmuError {
    /// The SMMU lacks something the driver needs.
    Unsupported(&'static str),
    /// [`DmaPages`] could not provide the named structure.
    NoMemory(&'static str),
    /// A poll of the named register ran out of spins.
    Timeout {
        /// The register polled.
        reg: &'static str,
    },
    /// The SMMU stopped at a command: CMDQ_CONS.ERR = `code`, CONS index `index`.
    CommandError {
        /// `CERROR_*` code.
        code: u8,
        /// Queue index of the command.
        index: u32,
    },
    /// The StreamID is beyond the stream table.
    SidOutOfRange {
        /// The StreamID.
        sid: u32,
    },
    /// The lock-free command queue failed.
    Queue(CmdqError),
}

impl fmt::Display for SmmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmmuError::Unsupported(what) => write!(f, "SMMU unsupported: {what}"),
            SmmuError::NoMemory(what) => write!(f, "no memory for the SMMU {what}"),
            SmmuError::Timeout { reg } => write!(f, "SMMU timeout polling {reg}"),
            SmmuError::CommandError { code, index } => {
                write!(f, "SMMU command error {code} at queue index {index}")
            }
            SmmuError::SidOutOfRange { sid } => write!(f, "StreamID {sid:#x} out of range"),
            SmmuError::Queue(e) => write!(f, "SMMU command queue: {e}"),
        }
    }
}

impl From<CmdqError> for SmmuError {
    fn from(e: CmdqError) -> Self {
        match e {
            CmdqError::Command { code, index } => SmmuError::CommandError { code, index },
            CmdqError::Timeout => SmmuError::Timeout { reg: "CMDQ_CONS" },
            e => SmmuError::Queue(e),
        }
    }
}

/// What the SMMU can do, from its ID registers, and the geometry the driver chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuV3Caps {
    /// IDR0.S1P.
    pub s1p: bool,
    /// IDR0.S2P.
    pub s2p: bool,
    /// Both stages: nested STEs possible.
    pub nested: bool,
    /// IDR0.COHACC: table and queue accesses snoop the CPU caches.
    pub coherent: bool,
    /// IDR0.HYP: EL2 StreamWorld (the driver then issues `CMD_TLBI_EL2_ALL` at reset).
    pub hyp: bool,
    /// IDR0.VMID16.
    pub vmid16: bool,
    /// IDR0.ASID16.
    pub asid16: bool,
    /// IDR0.MSI.
    pub msi: bool,
    /// IDR3.RIL: range invalidation.
    pub ril: bool,
    /// IDR3.BBML.
    pub bbml: u8,
    /// IDR5.OAS in bits.
    pub oas_bits: u32,
    /// IDR1.SIDSIZE.
    pub hw_sid_bits: u32,
    /// StreamID bits the stream table covers.
    pub sid_bits: u32,
    /// IDR1.SSIDSIZE.
    pub ssid_bits: u32,
    /// The stream table is 2-level (SPLIT = [`STRTAB_SPLIT`]).
    pub two_level: bool,
    /// Command queue entries (log2).
    pub cmdq_log2size: u32,
    /// Event queue entries (log2).
    pub evtq_log2size: u32,
    /// Raw IDR0..IDR5.
    pub idr: [u32; 6],
}

impl SmmuV3Caps {
    /// The capabilities stage-2 table sharing looks at ([`crate::smmu::SmmuCaps`]).
    pub fn stage2_caps(&self) -> SmmuCaps {
        SmmuCaps {
            oas_bits: self.oas_bits,
            bbml: self.bbml,
            coherent_walk: self.coherent,
            range_invalidation: self.ril,
        }
    }

    /// Decodes the ID registers (`sid_bits`, `two_level` and the queue sizes are what the SMMU
    /// allows before the driver's caps).
    pub fn from_idr(idr: [u32; 6]) -> SmmuV3Caps {
        let i0 = LocalRegisterCopy::<u32, IDR0::Register>::new(idr[0]);
        let i1 = LocalRegisterCopy::<u32, IDR1::Register>::new(idr[1]);
        let i3 = LocalRegisterCopy::<u32, IDR3::Register>::new(idr[3]);
        let i5 = LocalRegisterCopy::<u32, IDR5::Register>::new(idr[5]);
        let s1p = i0.is_set(IDR0::S1P);
        let s2p = i0.is_set(IDR0::S2P);
        SmmuV3Caps {
            s1p,
            s2p,
            nested: s1p && s2p,
            coherent: i0.is_set(IDR0::COHACC),
            hyp: i0.is_set(IDR0::HYP),
            vmid16: i0.is_set(IDR0::VMID16),
            asid16: i0.is_set(IDR0::ASID16),
            msi: i0.is_set(IDR0::MSI),
            ril: i3.is_set(IDR3::RIL),
            bbml: i3.read(IDR3::BBML) as u8,
            oas_bits: regs::addr_size_bits(i5.read(IDR5::OAS)),
            hw_sid_bits: i1.read(IDR1::SIDSIZE),
            sid_bits: i1.read(IDR1::SIDSIZE),
            ssid_bits: i1.read(IDR1::SSIDSIZE),
            two_level: i0.read(IDR0::ST_LVL) == 1,
            cmdq_log2size: i1.read(IDR1::CMDQS),
            evtq_log2size: i1.read(IDR1::EVENTQS),
            idr,
        }
    }
}

/// Appends commands and waits until the SMMU completed them.
pub trait CommandSubmit: Send + Sync {
    /// Appends `cmds` (in order) and a `CMD_SYNC`, and returns once the sync completed.
    fn submit_sync(&self, cmds: &[[u64; 2]]) -> Result<(), SmmuError>;
}

impl CommandSubmit for CmdQueue {
    fn submit_sync(&self, cmds: &[[u64; 2]]) -> Result<(), SmmuError> {
        let chunk = self.capacity() - 1;
        if cmds.is_empty() {
            return self.issue(&[], true).map_err(SmmuError::from);
        }
        let n = cmds.len().div_ceil(chunk);
        for (i, c) in cmds.chunks(chunk).enumerate() {
            self.issue(c, i + 1 == n)?;
        }
        Ok(())
    }
}

/// CMDQ_PROD/CMDQ_CONS of an SMMU, for the lock-free [`CmdQueue`].
struct CmdqRegs {
    mmio: Arc<dyn SmmuMmio>,
}

impl QueueHw for CmdqRegs {
    fn write_prod(&self, prod: u32) {
        self.mmio.write32(off::CMDQ_PROD, prod);
    }

    fn read_cons(&self) -> u32 {
        read_cmdq_cons(&*self.mmio)
    }
}

/// CMDQ_CONS.ERR, bits [30:24].
const CONS_ERR: u32 = 0x7f << 24;

/// CMDQ_CONS with ERR cleared unless a command-queue error is active (GERROR.CMDQ_ERR !=
/// GERRORN.CMDQ_ERR). The architecture only defines ERR while the error is active; QEMU leaves
/// the last code in the register after the error was acknowledged and the queue moved on, which
/// would otherwise look like a new error to every later reader.
fn read_cmdq_cons(mmio: &dyn SmmuMmio) -> u32 {
    let cons = mmio.read32(off::CMDQ_CONS);
    if cons & CONS_ERR == 0 {
        return cons;
    }
    let active = (mmio.read32(off::GERROR) ^ mmio.read32(off::GERRORN)) & GERROR_CMDQ_ERR;
    if active != 0 { cons } else { cons & !CONS_ERR }
}

/// Where the STEs are.
enum Strtab {
    /// `2^sid_bits` STEs at `base`.
    Linear { base: u64 },
    /// Level-1 descriptors at `l1`; level-2 tables allocated on demand.
    TwoLevel { l1: u64 },
}

/// Everything `write_ste` and `reset` change, under one lock.
struct Tables {
    /// Level-2 table address of each level-1 descriptor (0: none yet). Empty when linear.
    l2: Vec<u64>,
    /// Every STE that is not [`Ste::abort`], as last written.
    shadow: BTreeMap<u32, Ste>,
}

/// The internal single-producer command queue (reset, `write_ste` before `install_cmd_queue`).
struct SimpleQueue {
    /// Our PROD (index + wrap).
    prod: u32,
    /// The lock-free queue took over: this one must not be used.
    retired: bool,
}

/// Event queue consumer state.
struct EvtqState {
    /// Our CONS (index + wrap + OVACKFLG).
    cons: u32,
    /// Overflows seen (events lost).
    overflows: u64,
}

/// One SMMUv3 owned by the hypervisor.
pub struct SmmuV3 {
    mmio: Arc<dyn SmmuMmio>,
    mem: Arc<dyn DmaPages>,
    caps: SmmuV3Caps,
    poll: Poll,
    strtab: Strtab,
    tables: Mutex<Tables>,
    cmdq_base: u64,
    cmdq: Mutex<SimpleQueue>,
    external: Once<Arc<CmdQueue>>,
    evtq_base: u64,
    evtq: Mutex<EvtqState>,
    /// Serialises GERRORN acknowledgements (two CPUs toggling the same bit would re-raise it).
    gerror_lock: Mutex<()>,
    /// The driver has set (or is about to set) CR0.SMMUEN, and no [`SmmuV3::suspend`] has begun
    /// since: [`SmmuV3::write_ste_offline`] is refused. Changed with `tables` held, except by
    /// `suspend`, which runs only when nobody uses the SMMU.
    live: AtomicBool,
}

fn write_u64(pa: u64, v: u64) {
    // SAFETY: every address the driver writes lies in memory it got from its `DmaPages`, which
    // (per that trait's contract) is ours, mapped at its physical address, and live; the
    // addresses are 8-byte aligned (tables and queues are aligned to at least 32 bytes and
    // entries are multiples of 8 bytes).
    unsafe { core::ptr::write_volatile(pa as *mut u64, v.to_le()) }
}

fn read_u64(pa: u64) -> u64 {
    // SAFETY: as in `write_u64`.
    u64::from_le(unsafe { core::ptr::read_volatile(pa as *const u64) })
}

impl SmmuV3 {
    /// Reads the ID registers of the SMMU behind `mmio`, checks that the driver can use it and
    /// allocates its stream table (every STE [`Ste::abort`]) and queues from `mem`. Touches no
    /// control register: call [`SmmuV3::reset`] next.
    ///
    /// `sid_bits_wanted` limits the StreamIDs the stream table covers (the SMMU's IDR1.SIDSIZE
    /// otherwise). The table is linear when it covers at most [`LINEAR_MAX_SID_BITS`] bits or the
    /// SMMU has no 2-level tables, else 2-level with SPLIT = 8 and level-2 tables allocated for
    /// the StreamIDs that get an STE.
    pub fn probe(
        mmio: Arc<dyn SmmuMmio>,
        mem: Arc<dyn DmaPages>,
        sid_bits_wanted: Option<u32>,
    ) -> Result<SmmuV3, SmmuError> {
        let idr = [
            mmio.read32(off::IDR0),
            mmio.read32(off::IDR1),
            mmio.read32(off::IDR2),
            mmio.read32(off::IDR3),
            mmio.read32(off::IDR4),
            mmio.read32(off::IDR5),
        ];
        let mut caps = SmmuV3Caps::from_idr(idr);
        let i0 = LocalRegisterCopy::<u32, IDR0::Register>::new(idr[0]);
        let i1 = LocalRegisterCopy::<u32, IDR1::Register>::new(idr[1]);
        let i5 = LocalRegisterCopy::<u32, IDR5::Register>::new(idr[5]);
        if !caps.s2p {
            return Err(SmmuError::Unsupported("no stage 2 (IDR0.S2P)"));
        }
        if i0.read(IDR0::TTF) & 0b10 == 0 {
            return Err(SmmuError::Unsupported("no AArch64 tables (IDR0.TTF)"));
        }
        if i0.read(IDR0::TTENDIAN) == 3 {
            return Err(SmmuError::Unsupported(
                "big-endian tables only (IDR0.TTENDIAN)",
            ));
        }
        if !i5.is_set(IDR5::GRAN4K) {
            return Err(SmmuError::Unsupported("no 4 KiB granule (IDR5.GRAN4K)"));
        }
        if i1.is_set(IDR1::TABLES_PRESET) || i1.is_set(IDR1::QUEUES_PRESET) {
            return Err(SmmuError::Unsupported(
                "fixed table/queue bases (IDR1.*_PRESET)",
            ));
        }
        if caps.cmdq_log2size == 0 || caps.evtq_log2size == 0 {
            return Err(SmmuError::Unsupported(
                "zero-sized queues (IDR1.CMDQS/EVENTQS)",
            ));
        }
        let mut sid_bits = sid_bits_wanted
            .unwrap_or(caps.hw_sid_bits)
            .min(caps.hw_sid_bits);
        let two_level = caps.two_level && sid_bits > LINEAR_MAX_SID_BITS;
        if two_level {
            sid_bits = sid_bits.min(STRTAB_SPLIT + L1_MAX_LOG2);
        }
        caps.sid_bits = sid_bits;
        caps.two_level = two_level;
        caps.cmdq_log2size = caps.cmdq_log2size.min(CMDQ_MAX_LOG2);
        caps.evtq_log2size = caps.evtq_log2size.min(EVTQ_MAX_LOG2);

        let alloc = |bytes: usize, what: &'static str| {
            let bytes = bytes.max(64);
            mem.alloc_zeroed(bytes, bytes)
                .ok_or(SmmuError::NoMemory(what))
        };
        let (strtab, l2) = if two_level {
            let n = 1usize << (sid_bits - STRTAB_SPLIT);
            let l1 = alloc(n * L1_DESC_BYTES, "level-1 stream table")?;
            // Zero = SPAN 0: no level-2 table, the streams are out of range and abort.
            (Strtab::TwoLevel { l1 }, vec![0; n])
        } else {
            let n = 1usize << sid_bits;
            let base = alloc(n * STE_BYTES, "stream table")?;
            for sid in 0..n {
                write_ste_words(base + (sid * STE_BYTES) as u64, &Ste::abort());
            }
            (Strtab::Linear { base }, Vec::new())
        };
        let cmdq_base = alloc(CMD_BYTES << caps.cmdq_log2size, "command queue")?;
        let evtq_base = alloc(EVENT_BYTES << caps.evtq_log2size, "event queue")?;
        let smmu = SmmuV3 {
            mmio,
            mem,
            caps,
            poll: Poll::default(),
            strtab,
            tables: Mutex::new(Tables {
                l2,
                shadow: BTreeMap::new(),
            }),
            cmdq_base,
            cmdq: Mutex::new(SimpleQueue {
                prod: 0,
                retired: false,
            }),
            external: Once::new(),
            evtq_base,
            evtq: Mutex::new(EvtqState {
                cons: 0,
                overflows: 0,
            }),
            gerror_lock: Mutex::new(()),
            live: AtomicBool::new(false),
        };
        smmu.clean_all_tables(&smmu.tables.lock());
        Ok(smmu)
    }

    /// The same driver with a different polling policy.
    pub fn with_poll(mut self, poll: Poll) -> SmmuV3 {
        self.poll = poll;
        self
    }

    /// Capabilities and chosen geometry.
    pub fn caps(&self) -> &SmmuV3Caps {
        &self.caps
    }

    /// Physical address of the command queue memory (`1 << cmdq_log2size()` 16-byte entries).
    pub fn cmdq_base_pa(&self) -> u64 {
        self.cmdq_base
    }

    /// CMDQ_BASE.LOG2SIZE.
    pub fn cmdq_log2size(&self) -> u32 {
        self.caps.cmdq_log2size
    }

    /// Physical address of the event queue memory.
    pub fn evtq_base_pa(&self) -> u64 {
        self.evtq_base
    }

    /// The SMMU's registers.
    pub fn mmio(&self) -> &Arc<dyn SmmuMmio> {
        &self.mmio
    }

    /// Events lost to event-queue overflow so far.
    pub fn event_overflows(&self) -> u64 {
        self.evtq.lock().overflows
    }

    fn clean(&self, pa: u64, len: usize) {
        if !self.caps.coherent {
            self.mem.clean(pa, len);
        }
    }

    /// Bounded wait until `cond(read32(reg))`.
    fn wait32(
        &self,
        reg: u64,
        name: &'static str,
        cond: impl Fn(u32) -> bool,
    ) -> Result<u32, SmmuError> {
        let mut spins = 0u64;
        loop {
            let v = self.mmio.read32(reg);
            if cond(v) {
                return Ok(v);
            }
            spins += 1;
            if spins > self.poll.spins {
                return Err(SmmuError::Timeout { reg: name });
            }
            (self.poll.relax)();
        }
    }

    /// Writes CR0 and waits for CR0ACK to follow.
    fn write_cr0(&self, v: u32) -> Result<(), SmmuError> {
        self.mmio.write32(off::CR0, v);
        self.wait32(off::CR0ACK, "CR0ACK", |a| a == v).map(|_| ())
    }

    /// Sets GBPA.ABORT (keeping the other fields) with the UPDATE handshake.
    fn gbpa_abort(&self) -> Result<(), SmmuError> {
        let update = GBPA::UPDATE::SET.value;
        let g = self.wait32(off::GBPA, "GBPA", |g| g & update == 0)?;
        self.mmio
            .write32(off::GBPA, g | GBPA::ABORT::SET.value | update);
        self.wait32(off::GBPA, "GBPA", |g| g & update == 0)
            .map(|_| ())
    }

    /// Brings the SMMU from any state (firmware's, or lost power) to the driver's: disabled with
    /// GBPA = abort, tables and queues programmed, caches invalidated, event queue and
    /// interrupts on, then enabled. Every stream gets the STE the driver holds for it (abort
    /// unless [`SmmuV3::write_ste`] said otherwise). Both queues start again at index 0.
    ///
    /// Sequence (Linux `arm_smmu_device_reset`, with GBPA set before disabling so that no DMA
    /// bypasses in between):
    /// 1. GBPA.ABORT = 1 (UPDATE handshake); CR0 = 0, wait CR0ACK; acknowledge stale GERRORs.
    /// 2. Rewrite the stream table from the shadow copies.
    /// 3. CR1 (tables and queues WB/ISH when IDR0.COHACC, else NC/OSH), CR2 = PTM | RECINVSID.
    /// 4. STRTAB_BASE (RA) and STRTAB_BASE_CFG.
    /// 5. CMDQ_BASE, CMDQ_PROD = CMDQ_CONS = 0; CR0 = CMDQEN.
    /// 6. `CMD_CFGI_ALL` + `CMD_SYNC`, then `CMD_TLBI_EL2_ALL` (IDR0.HYP) + `CMD_TLBI_NSNH_ALL`
    ///    + `CMD_SYNC` (as Linux).
    /// 7. EVENTQ_BASE, EVENTQ_PROD = EVENTQ_CONS = 0 (page 1); CR0 |= EVENTQEN.
    /// 8. IRQ_CTRL = 0 (ack), MSIs off (IRQ_CFG0 = 0) if IDR0.MSI, IRQ_CTRL = EVENTQ | GERROR (ack).
    /// 9. CR0 |= SMMUEN.
    ///
    /// Not supported once [`SmmuV3::install_cmd_queue`] handed the queue to a [`CmdQueue`]: a
    /// power cycle then goes through [`SmmuV3::suspend`] and [`SmmuV3::resume`], which keep the
    /// queue positions.
    pub fn reset(&self) -> Result<(), SmmuError> {
        if self.external.is_completed() {
            return Err(SmmuError::Unsupported(
                "reset after install_cmd_queue (the CmdQueue owns CMDQ_PROD/CONS)",
            ));
        }
        let tables = self.tables.lock();
        // 1. Abort incoming traffic while disabled, then disable.
        self.abort_and_disable(true)?;
        // 2. Tables.
        self.rewrite_tables(&tables);
        // 3 to 9.
        self.program_and_enable(false)?;
        drop(tables);
        Ok(())
    }

    /// Programs the SMMU again after its power domain was off (or after [`SmmuV3::suspend`] with
    /// the power kept on: the same sequence is valid then), from the driver's memory: the stream
    /// table as it is (including [`SmmuV3::write_ste_offline`]'s changes), the command queue at
    /// the position where it stopped, the event queue at the driver's consumer position.
    ///
    /// The sequence is [`SmmuV3::reset`]'s, except that:
    /// * CR0 is written (and CR0ACK awaited) only when CR0 or CR0ACK is not 0 already.
    /// * The stream table is not rewritten: the memory is the saved state. `CMD_CFGI_ALL`
    ///   (before any TLB invalidation, IHI0070 §4.3.6) makes the SMMU fetch every STE again and
    ///   drops whatever it cached before the power went off (or kept, if it did not).
    /// * CMDQ_PROD = CMDQ_CONS = the queue's current position (index + wrap), so the lock-free
    ///   [`CmdQueue`] goes on with its counters ([`CmdQueue::resync`]); the invalidations go
    ///   through it. Commands that were published but never consumed (a [`SmmuV3::suspend`]
    ///   that timed out) are dropped: `CFGI_ALL` and `TLBI_*_ALL` cover every invalidation.
    /// * EVENTQ_PROD = EVENTQ_CONS = the driver's event consumer position.
    ///
    /// GBPA stays abort. Every wait is bounded; on an error the SMMU is left disabled (or as far
    /// as the sequence got) and `resume` can be called again.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Timeout`] naming the register that did not respond; a command error from the
    /// invalidations; [`SmmuError::Queue`] with [`CmdqError::Busy`] when a CPU is in the middle
    /// of issuing commands (runtime PM rules that out), or [`CmdqError::Broken`].
    pub fn resume(&self) -> Result<(), SmmuError> {
        // Held throughout: a `write_ste_offline` either completes before `CFGI_ALL` or sees
        // `live` set and is refused.
        let tables = self.tables.lock();
        self.abort_and_disable(false)?;
        self.program_and_enable(true)?;
        drop(tables);
        Ok(())
    }

    /// Quiesces the SMMU before its power domain goes off. Runtime PM calls it when nobody uses
    /// the SMMU: no command is being issued, though published commands may still be waiting in
    /// the queue for the SMMU.
    ///
    /// 1. Waits until the SMMU consumed every published command (CMDQ_CONS = CMDQ_PROD). A
    ///    command error (CMDQ_CONS.ERR) is handled as everywhere else (module docs: the command
    ///    is skipped, GERROR.CMDQ_ERR acknowledged) and the queue drained on; the error is
    ///    returned at the end. A queue that does not drain ends the wait with a timeout, and the
    ///    suspend goes on: [`SmmuV3::resume`] supersedes the commands left.
    /// 2. GBPA.ABORT = 1 (UPDATE handshake), so that no DMA bypasses once SMMUEN is clear.
    /// 3. CR0.SMMUEN = 0, queues still on (wait CR0ACK): the SMMU stops translating, so it
    ///    records no new events.
    /// 4. Hands every event in the event queue to `on_event` (as [`SmmuV3::drain_events`]).
    /// 5. CR0 = 0 (wait CR0ACK).
    ///
    /// The driver's state (queue positions, stream table) stays as it is, ready for
    /// [`SmmuV3::resume`]. From the start of this call on, [`SmmuV3::write_ste_offline`] is
    /// allowed.
    ///
    /// # Errors
    ///
    /// The first error: a [`SmmuError::CommandError`] from step 1 (after all steps completed),
    /// a step-1 timeout (after all steps completed), or a [`SmmuError::Timeout`] of GBPA or CR0ACK
    /// (at once: with GBPA not known to abort, translation is left on). Whatever it returns, the
    /// SMMU may lose power and [`SmmuV3::resume`] brings it back.
    pub fn suspend(&self, mut on_event: impl FnMut(Event)) -> Result<(), SmmuError> {
        self.live.store(false, Ordering::Release);
        // 1.
        let drained = self.drain_cmdq();
        if let Err(e) = drained {
            log::error!("smmuv3: suspend: command queue not drained: {e}");
        }
        // 2.
        self.gbpa_abort()?;
        // 3.
        let queues = (CR0::CMDQEN::SET + CR0::EVENTQEN::SET).value;
        self.write_cr0(self.mmio.read32(off::CR0) & queues)?;
        // 4. Translation is off (acknowledged): nothing adds to the queue any more.
        self.drain_events(&mut on_event);
        // 5.
        self.write_cr0(0)?;
        drained
    }

    /// Writes the reset value into every register the driver programs, as losing power would:
    /// for a board whose SMMU power domain is simulated (QEMU), called after
    /// [`SmmuV3::suspend`] when the domain "goes off", so that [`SmmuV3::resume`] has to program
    /// everything again. Real hardware loses the registers by itself; never call this there
    /// while anything relies on the SMMU.
    ///
    /// CR0 is 0 after a successful suspend (written here otherwise); IRQ_CTRL goes to 0 before
    /// the MSI address registers; then CR1, CR2, STRTAB_BASE, STRTAB_BASE_CFG, CMDQ_BASE,
    /// CMDQ_PROD, CMDQ_CONS, EVENTQ_BASE, EVENTQ_PROD and EVENTQ_CONS become 0. GBPA keeps
    /// abort (its reset value may be bypass, which a simulation has no reason to open).
    /// GERROR/GERRORN are left alone: GERROR is read-only. Failed waits are logged.
    pub fn simulate_power_loss(&self) {
        self.live.store(false, Ordering::Release);
        let enabled = self.mmio.read32(off::CR0) != 0 || self.mmio.read32(off::CR0ACK) != 0;
        if enabled && let Err(e) = self.write_cr0(0) {
            log::error!("smmuv3: simulated power loss: {e}");
        }
        self.mmio.write32(off::IRQ_CTRL, 0);
        if let Err(e) = self.wait32(off::IRQ_CTRLACK, "IRQ_CTRLACK", |a| a == 0) {
            log::error!("smmuv3: simulated power loss: {e}");
        }
        if self.caps.msi {
            self.mmio.write64(off::GERROR_IRQ_CFG0, 0);
            self.mmio.write64(off::EVENTQ_IRQ_CFG0, 0);
        }
        self.mmio.write32(off::CR1, 0);
        self.mmio.write32(off::CR2, 0);
        self.mmio.write64(off::STRTAB_BASE, 0);
        self.mmio.write32(off::STRTAB_BASE_CFG, 0);
        self.mmio.write64(off::CMDQ_BASE, 0);
        self.mmio.write32(off::CMDQ_PROD, 0);
        self.mmio.write32(off::CMDQ_CONS, 0);
        self.mmio.write64(off::EVENTQ_BASE, 0);
        self.mmio.write32(off::EVENTQ_PROD, 0);
        self.mmio.write32(off::EVENTQ_CONS, 0);
    }

    /// Step 1 of `reset` and `resume`: GBPA = abort, CR0 = 0 (always with `force`, else only
    /// when it is not 0 yet), stale global errors acknowledged.
    fn abort_and_disable(&self, force: bool) -> Result<(), SmmuError> {
        self.gbpa_abort()?;
        if force || self.mmio.read32(off::CR0) != 0 || self.mmio.read32(off::CR0ACK) != 0 {
            self.write_cr0(0)?;
        }
        self.live.store(false, Ordering::Release);
        let _g = self.gerror_lock.lock();
        let g = self.mmio.read32(off::GERROR);
        let active = (g ^ self.mmio.read32(off::GERRORN)) & GERROR_ERR_MASK;
        if active != 0 {
            log::warn!("smmuv3: stale global error(s) {active:#x} acknowledged");
        }
        self.mmio.write32(off::GERRORN, g);
        Ok(())
    }

    /// Steps 3 to 9 of `reset` (queues at 0) and `resume` (queues where they were). The SMMU is
    /// disabled (CR0ACK = 0) and the caller holds `tables`.
    fn program_and_enable(&self, resume: bool) -> Result<(), SmmuError> {
        // 3. Attributes of the SMMU's own accesses.
        let cr1 = if self.caps.coherent {
            CR1::QUEUE_IC::WriteBack
                + CR1::QUEUE_OC::WriteBack
                + CR1::QUEUE_SH::InnerShareable
                + CR1::TABLE_IC::WriteBack
                + CR1::TABLE_OC::WriteBack
                + CR1::TABLE_SH::InnerShareable
        } else {
            CR1::QUEUE_IC::NonCacheable
                + CR1::QUEUE_OC::NonCacheable
                + CR1::QUEUE_SH::OuterShareable
                + CR1::TABLE_IC::NonCacheable
                + CR1::TABLE_OC::NonCacheable
                + CR1::TABLE_SH::OuterShareable
        };
        self.mmio.write32(off::CR1, cr1.value);
        self.mmio
            .write32(off::CR2, (CR2::PTM::SET + CR2::RECINVSID::SET).value);
        // 4. Stream table.
        let (base, two_level) = match self.strtab {
            Strtab::Linear { base } => (base, false),
            Strtab::TwoLevel { l1 } => (l1, true),
        };
        self.mmio
            .write64(off::STRTAB_BASE, regs::strtab_base(base, true));
        self.mmio.write32(
            off::STRTAB_BASE_CFG,
            regs::strtab_base_cfg(self.caps.sid_bits, two_level, STRTAB_SPLIT),
        );
        // 5. Command queue.
        {
            let mut q = self.cmdq.lock();
            let pos = match self.external.get() {
                // SAFETY: CR0ACK.CMDQEN is 0 (step 1), so the SMMU does not read the queue until
                // CMDQ_PROD and CMDQ_CONS are written below, before CMDQEN is set; no CPU issues
                // commands during a resume (runtime PM's contract; `resync` checks what it can).
                Some(ext) if resume => unsafe { ext.resync() }?,
                _ if resume => q.prod & regs::q_wrap_index_mask(self.caps.cmdq_log2size),
                _ => 0,
            };
            self.mmio.write64(
                off::CMDQ_BASE,
                regs::q_base(self.cmdq_base, self.caps.cmdq_log2size, true),
            );
            self.mmio.write32(off::CMDQ_PROD, pos);
            self.mmio.write32(off::CMDQ_CONS, pos);
            q.prod = pos;
        }
        let mut cr0 = CR0::CMDQEN::SET.value;
        self.write_cr0(cr0)?;
        // 6. Invalidate cached configuration, then TLBs (in this order: IHI0070 §4.3.6).
        self.submit_sync_any(&[Command::CfgiAll.encode()])?;
        let mut tlbi = vec![Command::TlbiNsnhAll.encode()];
        if self.caps.hyp {
            tlbi.insert(0, Command::TlbiEl2All.encode());
        }
        self.submit_sync_any(&tlbi)?;
        // 7. Event queue. PROD takes CONS's OVACKFLG as its OVFLG: no overflow pending.
        {
            let mut e = self.evtq.lock();
            if !resume {
                e.cons = 0;
            }
            self.mmio.write64(
                off::EVENTQ_BASE,
                regs::q_base(self.evtq_base, self.caps.evtq_log2size, true),
            );
            self.mmio.write32(off::EVENTQ_PROD, e.cons);
            self.mmio.write32(off::EVENTQ_CONS, e.cons);
        }
        cr0 |= CR0::EVENTQEN::SET.value;
        self.write_cr0(cr0)?;
        // 8. Interrupts: wired (MSIs off), event queue and global errors.
        self.mmio.write32(off::IRQ_CTRL, 0);
        self.wait32(off::IRQ_CTRLACK, "IRQ_CTRLACK", |a| a == 0)?;
        if self.caps.msi {
            self.mmio.write64(off::GERROR_IRQ_CFG0, 0);
            self.mmio.write64(off::EVENTQ_IRQ_CFG0, 0);
        }
        let irq = (IRQ_CTRL::EVENTQ_IRQEN::SET + IRQ_CTRL::GERROR_IRQEN::SET).value;
        self.mmio.write32(off::IRQ_CTRL, irq);
        self.wait32(off::IRQ_CTRLACK, "IRQ_CTRLACK", |a| a == irq)?;
        // 9. Translate. `live` first: from the SMMUEN write on, offline STE writes are wrong.
        self.live.store(true, Ordering::Release);
        cr0 |= CR0::SMMUEN::SET.value;
        self.write_cr0(cr0)
    }

    /// Step 1 of `suspend`: waits until the SMMU consumed every published command, handling
    /// command errors on the way. Returns the first command error once drained.
    fn drain_cmdq(&self) -> Result<(), SmmuError> {
        // No internal submitter (nor `install_cmd_queue`) meanwhile.
        let q = self.cmdq.lock();
        let log2 = self.caps.cmdq_log2size;
        let mut err = None;
        let mut spins = 0u64;
        loop {
            let prod = self.mmio.read32(off::CMDQ_PROD);
            let cons = read_cmdq_cons(&*self.mmio);
            if cons & CONS_ERR != 0 {
                let e = match self.external.get() {
                    Some(ext) => self.recover_external_error(ext),
                    None => self.skip_internal_error(&q, cons),
                };
                if let Some(e) = e {
                    err.get_or_insert(e);
                }
            } else if regs::q_empty(prod, cons, log2) {
                return err.map_or(Ok(()), Err);
            }
            // Counted on errors too: an error that comes back after every skip ends in a
            // timeout, not a loop.
            spins += 1;
            if spins > self.poll.spins {
                return Err(SmmuError::Timeout { reg: "CMDQ_CONS" });
            }
            (self.poll.relax)();
        }
    }

    /// Writes every STE (and level-1 descriptor) from the shadow copies; for `reset`.
    fn rewrite_tables(&self, t: &Tables) {
        match self.strtab {
            Strtab::Linear { base } => {
                for sid in 0..1u32 << self.caps.sid_bits {
                    let ste = t.shadow.get(&sid).copied().unwrap_or(Ste::abort());
                    write_ste_words(base + u64::from(sid) * STE_BYTES as u64, &ste);
                }
            }
            Strtab::TwoLevel { l1 } => {
                for (i, &l2) in t.l2.iter().enumerate() {
                    let desc = if l2 == 0 {
                        L1Desc::invalid()
                    } else {
                        let first = (i as u32) << STRTAB_SPLIT;
                        for j in 0..1u32 << STRTAB_SPLIT {
                            let ste = t.shadow.get(&(first + j)).copied().unwrap_or(Ste::abort());
                            write_ste_words(l2 + u64::from(j) * STE_BYTES as u64, &ste);
                        }
                        L1Desc::for_split(l2, STRTAB_SPLIT)
                    };
                    write_u64(l1 + (i * L1_DESC_BYTES) as u64, desc.0);
                }
            }
        }
        self.clean_all_tables(t);
    }

    fn clean_all_tables(&self, t: &Tables) {
        match self.strtab {
            Strtab::Linear { base } => self.clean(base, STE_BYTES << self.caps.sid_bits),
            Strtab::TwoLevel { l1 } => {
                self.clean(l1, L1_DESC_BYTES * t.l2.len());
                for &l2 in t.l2.iter().filter(|&&a| a != 0) {
                    self.clean(l2, STE_BYTES << STRTAB_SPLIT);
                }
            }
        }
    }

    /// Address of `sid`'s STE, allocating (and publishing) its level-2 table if needed. On a
    /// `live` SMMU the new level-1 descriptor is then invalidated (`CMD_CFGI_STE`, Leaf = 0);
    /// otherwise nothing but memory is touched.
    fn ste_addr_alloc(&self, t: &mut Tables, sid: u32, live: bool) -> Result<u64, SmmuError> {
        match self.strtab {
            Strtab::Linear { base } => Ok(base + u64::from(sid) * STE_BYTES as u64),
            Strtab::TwoLevel { l1 } => {
                let i = (sid >> STRTAB_SPLIT) as usize;
                let j = u64::from(sid & ((1 << STRTAB_SPLIT) - 1));
                if t.l2[i] == 0 {
                    let bytes = STE_BYTES << STRTAB_SPLIT;
                    let l2 = self
                        .mem
                        .alloc_zeroed(bytes, bytes)
                        .ok_or(SmmuError::NoMemory("level-2 stream table"))?;
                    for k in 0..1u64 << STRTAB_SPLIT {
                        write_ste_words(l2 + k * STE_BYTES as u64, &Ste::abort());
                    }
                    self.clean(l2, bytes);
                    // A complete, all-abort table first; then the descriptor (one 64-bit
                    // write); then invalidate the descriptor the SMMU may have cached as
                    // invalid (CFGI_STE with Leaf = 0 covers the level-1 descriptor).
                    let d = l1 + (i * L1_DESC_BYTES) as u64;
                    write_u64(d, L1Desc::for_split(l2, STRTAB_SPLIT).0);
                    self.clean(d, L1_DESC_BYTES);
                    t.l2[i] = l2;
                    if live {
                        self.submit_sync(&[Command::CfgiSte { sid, leaf: false }.encode()])?;
                    }
                }
                Ok(t.l2[i] + j * STE_BYTES as u64)
            }
        }
    }

    /// Address of `sid`'s STE in memory, if it has one yet.
    pub fn ste_addr(&self, sid: u32) -> Option<u64> {
        if sid >> self.caps.sid_bits != 0 {
            return None;
        }
        match self.strtab {
            Strtab::Linear { base } => Some(base + u64::from(sid) * STE_BYTES as u64),
            Strtab::TwoLevel { .. } => {
                let t = self.tables.lock();
                let l2 = t.l2[(sid >> STRTAB_SPLIT) as usize];
                (l2 != 0)
                    .then(|| l2 + u64::from(sid & ((1 << STRTAB_SPLIT) - 1)) * STE_BYTES as u64)
            }
        }
    }

    /// The STE the driver last wrote for `sid` ([`Ste::abort`] if none).
    pub fn shadow_ste(&self, sid: u32) -> Ste {
        self.tables
            .lock()
            .shadow
            .get(&sid)
            .copied()
            .unwrap_or(Ste::abort())
    }

    /// Installs `ste` as `sid`'s STE, on a live SMMU, in the order IHI0070 §3.21.3 requires:
    ///
    /// * Exactly one doubleword changes: it is written in one single-copy-atomic 64-bit store
    ///   (the SMMU sees the old or the new STE, never a mix), then `CMD_CFGI_STE` + `CMD_SYNC`.
    /// * Several change: if the old STE is live (V = 1 and not abort), dword 0 first becomes
    ///   abort (V = 1, Config = 0: transactions are terminated, no events), `CFGI_STE` + `SYNC`;
    ///   then the changed dwords 1..7 are written, `CFGI_STE` + `SYNC` (so no fetch can combine
    ///   them with a stale dword 0); then dword 0, `CFGI_STE` + `SYNC`.
    ///
    /// Each `CFGI_STE` is queued only after the writes it covers (and after the cache clean on
    /// a non-coherent SMMU). When this returns, the SMMU uses `ste` for `sid`. The shadow copy
    /// is updated for [`SmmuV3::shadow_ste`] and [`SmmuV3::reset`].
    pub fn write_ste(&self, sid: u32, ste: Ste) -> Result<(), SmmuError> {
        if sid >> self.caps.sid_bits != 0 {
            return Err(SmmuError::SidOutOfRange { sid });
        }
        let mut t = self.tables.lock();
        let addr = self.ste_addr_alloc(&mut t, sid, true)?;
        let old = t.shadow.get(&sid).copied().unwrap_or(Ste::abort());
        let r = self.update_ste(addr, sid, &old, &ste);
        // The shadow is what memory holds (on an error midway, the partial state).
        let now = read_ste_words(addr);
        if now == Ste::abort() {
            t.shadow.remove(&sid);
        } else {
            t.shadow.insert(sid, now);
        }
        r
    }

    /// Installs `ste` as `sid`'s STE while the SMMU is off: its power domain is off, or it is
    /// between [`SmmuV3::suspend`] and [`SmmuV3::resume`] (or before the first
    /// [`SmmuV3::reset`]). Writes the stream table in memory only — allocating the level-2
    /// table if needed, cleaning what it wrote for a non-coherent SMMU — and issues no command
    /// and touches no register (an unpowered SMMU must not be accessed). The SMMU picks the STE
    /// up when `resume` issues `CMD_CFGI_ALL` (or `reset` rewrites the table from the shadow).
    ///
    /// With the SMMU disabled nothing fetches STEs, so the order of the writes does not matter
    /// here; on a live SMMU use [`SmmuV3::write_ste`].
    ///
    /// # Errors
    ///
    /// [`SmmuError::SidOutOfRange`]; [`SmmuError::NoMemory`] for a level-2 table;
    /// [`SmmuError::Unsupported`] while the driver has the SMMU enabled (after `reset` or
    /// `resume`, before `suspend`).
    pub fn write_ste_offline(&self, sid: u32, ste: Ste) -> Result<(), SmmuError> {
        if sid >> self.caps.sid_bits != 0 {
            return Err(SmmuError::SidOutOfRange { sid });
        }
        let mut t = self.tables.lock();
        // Under `tables`: `resume` sets `live` with it held, so this write is either covered by
        // its `CFGI_ALL` or refused.
        if self.live.load(Ordering::Acquire) {
            return Err(SmmuError::Unsupported(
                "write_ste_offline on an enabled SMMU (use write_ste)",
            ));
        }
        let addr = self.ste_addr_alloc(&mut t, sid, false)?;
        write_ste_words(addr, &ste);
        self.clean(addr, STE_BYTES);
        if ste == Ste::abort() {
            t.shadow.remove(&sid);
        } else {
            t.shadow.insert(sid, ste);
        }
        Ok(())
    }

    fn update_ste(&self, addr: u64, sid: u32, old: &Ste, new: &Ste) -> Result<(), SmmuError> {
        let changed: Vec<usize> = (0..STE_DWORDS).filter(|&i| old.0[i] != new.0[i]).collect();
        let inval = [Command::CfgiSte { sid, leaf: true }.encode()];
        let put = |i: usize, v: u64| {
            write_u64(addr + 8 * i as u64, v);
            self.clean(addr + 8 * i as u64, 8);
        };
        match changed.as_slice() {
            [] => Ok(()),
            &[i] => {
                put(i, new.0[i]);
                self.submit_sync(&inval)
            }
            _ => {
                let live = old.valid() && old.config() != SteConfig::Abort;
                let mut d0 = old.0[0];
                if live {
                    d0 = Ste::abort().0[0];
                    put(0, d0);
                    self.submit_sync(&inval)?;
                }
                if changed.iter().any(|&i| i != 0) {
                    for &i in changed.iter().filter(|&&i| i != 0) {
                        put(i, new.0[i]);
                    }
                    self.submit_sync(&inval)?;
                }
                if d0 != new.0[0] {
                    put(0, new.0[0]);
                    self.submit_sync(&inval)?;
                }
                Ok(())
            }
        }
    }

    /// Hands the command queue to a lock-free [`CmdQueue`] (for per-VM TLB maintenance from
    /// every CPU) and routes the driver's own commands through it from now on. Call after
    /// [`SmmuV3::reset`]. Calling it again returns the same queue (`opts` ignored).
    pub fn install_cmd_queue(&self, opts: CmdqOptions) -> Result<Arc<CmdQueue>, SmmuError> {
        let mut q = self.cmdq.lock();
        if let Some(ext) = self.external.get() {
            return Ok(ext.clone());
        }
        let cons = read_cmdq_cons(&*self.mmio);
        let log2 = self.caps.cmdq_log2size;
        if cons & CONS_ERR != 0 || !regs::q_empty(q.prod, cons, log2) {
            return Err(SmmuError::Unsupported(
                "install_cmd_queue: the command queue is not idle",
            ));
        }
        let hw = self.cmdq_hw();
        // SAFETY: `cmdq_base` is `1 << log2` 16-byte entries from our `DmaPages` (ours alone,
        // mapped at that address, never freed). From here on only the new queue writes them:
        // the internal queue is retired under this lock and every later command goes through
        // `external`. The queue is empty (PROD == CONS, no error), as checked above.
        let ext = unsafe { CmdQueue::new(self.cmdq_base as *mut [u64; 2], log2, hw, opts) };
        let ext = Arc::new(ext);
        q.retired = true;
        self.external.call_once(|| ext.clone());
        Ok(ext)
    }

    /// CMDQ_PROD/CMDQ_CONS as a [`QueueHw`] (CONS with a stale ERR masked, see
    /// [`read_cmdq_cons`]), for building a [`CmdQueue`] by hand. Prefer
    /// [`SmmuV3::install_cmd_queue`], which also retires the internal queue.
    pub fn cmdq_hw(&self) -> Arc<dyn QueueHw> {
        Arc::new(CmdqRegs {
            mmio: self.mmio.clone(),
        })
    }

    /// The lock-free queue, once installed.
    pub fn cmd_queue(&self) -> Option<&Arc<CmdQueue>> {
        self.external.get()
    }

    /// The internal queue: appends `cmds` + `CMD_SYNC` in chunks and waits for each sync.
    fn submit_internal(&self, cmds: &[[u64; 2]]) -> Result<(), SmmuError> {
        let mut q = self.cmdq.lock();
        if q.retired {
            return Err(SmmuError::Unsupported("internal command queue retired"));
        }
        let log2 = self.caps.cmdq_log2size;
        let chunk = (1usize << log2) - 1;
        let sync = Command::sync().encode();
        let mut first_err = None;
        let mut pieces: Vec<&[[u64; 2]]> = cmds.chunks(chunk).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        for piece in pieces {
            // The queue is empty between calls (each waits for its sync), so a chunk of at most
            // size - 1 commands plus the sync fits; check anyway.
            let cons = self.mmio.read32(off::CMDQ_CONS);
            if (regs::q_space(q.prod, cons, log2) as usize) < piece.len() + 1 {
                return Err(SmmuError::Timeout { reg: "CMDQ_CONS" });
            }
            for c in piece.iter().chain(core::iter::once(&sync)) {
                let slot = self.cmdq_base + (regs::q_idx(q.prod, log2) as usize * CMD_BYTES) as u64;
                write_u64(slot, c[0]);
                write_u64(slot + 8, c[1]);
                self.clean(slot, CMD_BYTES);
                q.prod = regs::q_inc(q.prod, log2);
            }
            self.mmio.write32(off::CMDQ_PROD, q.prod);
            let sync_at = regs::q_add(q.prod, (2u32 << log2) - 1, log2);
            if let Err(e) = self.wait_sync(&q, sync_at) {
                match e {
                    SmmuError::CommandError { .. } => {
                        first_err.get_or_insert(e);
                    }
                    e => return Err(e),
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Waits until CONS passed `sync_at`, skipping failed commands on the way (module docs).
    /// Returns the first command error seen, after the sync completed.
    fn wait_sync(&self, q: &SimpleQueue, sync_at: u32) -> Result<(), SmmuError> {
        let log2 = self.caps.cmdq_log2size;
        let mut spins = 0u64;
        let mut err = None;
        loop {
            let cons = self.mmio.read32(off::CMDQ_CONS);
            if regs::q_consumed(sync_at, cons, q.prod, log2) {
                return err.map_or(Ok(()), Err);
            }
            // Spins count here too: an error that comes back after every skip (CERROR_ABT on a
            // command fetch that keeps failing) must end in a timeout, not a loop.
            if cons & CONS_ERR != 0
                && let Some(e) = self.skip_internal_error(q, cons)
            {
                err.get_or_insert(e);
            }
            spins += 1;
            if spins > self.poll.spins {
                return Err(SmmuError::Timeout { reg: "CMDQ_CONS" });
            }
            (self.poll.relax)();
        }
    }

    /// With CONS.ERR set and GERROR.CMDQ_ERR active: skips the command (ILL → CMD_SYNC in its
    /// place), acknowledges CMDQ_ERR, kicks PROD. `None` if no error is active.
    fn skip_internal_error(&self, q: &SimpleQueue, cons: u32) -> Option<SmmuError> {
        let _g = self.gerror_lock.lock();
        let active =
            (self.mmio.read32(off::GERROR) ^ self.mmio.read32(off::GERRORN)) & GERROR_CMDQ_ERR;
        if active == 0 {
            return None;
        }
        let log2 = self.caps.cmdq_log2size;
        let code = (cons >> 24 & 0x7f) as u8;
        let index = regs::q_idx(cons, log2);
        let slot = self.cmdq_base + (index as usize * CMD_BYTES) as u64;
        match code {
            CERROR_ABT | CERROR_ATC_INV_SYNC => {}
            _ => {
                let bad = [read_u64(slot), read_u64(slot + 8)];
                log::error!(
                    "smmuv3: skipping command {:#x} ({:#018x} {:#018x}) at index {index}: CERROR {code}",
                    bad[0] & 0xff,
                    bad[0],
                    bad[1]
                );
                let sync = Command::sync().encode();
                write_u64(slot, sync[0]);
                write_u64(slot + 8, sync[1]);
                self.clean(slot, CMD_BYTES);
            }
        }
        let gn = self.mmio.read32(off::GERRORN);
        self.mmio.write32(off::GERRORN, gn ^ GERROR_CMDQ_ERR);
        self.mmio.write32(off::CMDQ_PROD, q.prod);
        Some(SmmuError::CommandError { code, index })
    }

    /// With the lock-free queue: if GERROR.CMDQ_ERR is active, skips the failed command
    /// ([`CmdQueue::skip_failed_command`]) and acknowledges the error, which restarts the queue.
    /// Returns the error (`None`: none was active).
    fn recover_external_error(&self, ext: &CmdQueue) -> Option<SmmuError> {
        let _g = self.gerror_lock.lock();
        let gn = self.mmio.read32(off::GERRORN);
        if (self.mmio.read32(off::GERROR) ^ gn) & GERROR_CMDQ_ERR == 0 {
            return None;
        }
        let e = match ext.skip_failed_command() {
            Some(e) => {
                log::error!("smmuv3: {e}");
                SmmuError::from(e)
            }
            // CMDQ_ERR without a CONS.ERR code (CERROR_NONE): nothing to skip.
            None => SmmuError::CommandError {
                code: 0,
                index: regs::q_idx(self.mmio.read32(off::CMDQ_CONS), self.caps.cmdq_log2size),
            },
        };
        self.mmio.write32(off::GERRORN, gn ^ GERROR_CMDQ_ERR);
        Some(e)
    }

    /// Active global errors, acknowledged; `None` when there are none. A command-queue error
    /// (CMDQ_ERR) is handled as in the module docs — unless a submitter is waiting on the
    /// internal queue right now, which then handles it itself.
    pub fn gerror(&self) -> Option<u32> {
        let mut handled = 0;
        if let Some(ext) = self.external.get() {
            if self.recover_external_error(ext).is_some() {
                handled |= GERROR_CMDQ_ERR;
            }
        } else if let Some(q) = self.cmdq.try_lock() {
            let cons = self.mmio.read32(off::CMDQ_CONS);
            if cons & CONS_ERR != 0 && self.skip_internal_error(&q, cons).is_some() {
                handled |= GERROR_CMDQ_ERR;
            }
        }
        let _g = self.gerror_lock.lock();
        let g = self.mmio.read32(off::GERROR);
        let gn = self.mmio.read32(off::GERRORN);
        // CMDQ_ERR is only ever acknowledged by the paths above, after the fix-up.
        let active = (g ^ gn) & GERROR_ERR_MASK & !GERROR_CMDQ_ERR;
        if active != 0 {
            self.mmio.write32(off::GERRORN, gn ^ active);
            log::error!("smmuv3: global error(s) {active:#x} acknowledged");
        }
        let all = active | handled;
        (all != 0).then_some(all)
    }

    /// Hands every event in the event queue to `f`, oldest first, and returns how many. An
    /// overflow (events lost: EVENTQ_PROD.OVFLG differs from CONS.OVACKFLG) is counted
    /// ([`SmmuV3::event_overflows`]) and acknowledged. Stops after twice the queue size per call
    /// so that a flood cannot keep the caller here forever.
    pub fn drain_events(&self, mut f: impl FnMut(Event)) -> usize {
        let mut st = self.evtq.lock();
        let log2 = self.caps.evtq_log2size;
        let limit = 2usize << log2;
        let mut n = 0;
        loop {
            let prod = self.mmio.read32(off::EVENTQ_PROD);
            let mut dirty = false;
            if (prod ^ st.cons) & Q_OVF != 0 {
                st.overflows += 1;
                st.cons ^= Q_OVF;
                dirty = true;
                log::warn!("smmuv3: event queue overflowed, events lost");
            }
            while !regs::q_empty(prod, st.cons, log2) && n < limit {
                let e = self.evtq_base + (regs::q_idx(st.cons, log2) as usize * EVENT_BYTES) as u64;
                self.clean(e, EVENT_BYTES);
                let raw = [
                    read_u64(e),
                    read_u64(e + 8),
                    read_u64(e + 16),
                    read_u64(e + 24),
                ];
                f(Event::decode(raw));
                st.cons = regs::q_inc(st.cons, log2) | (st.cons & Q_OVF);
                n += 1;
                dirty = true;
            }
            if dirty {
                self.mmio.write32(off::EVENTQ_CONS, st.cons);
            }
            if !dirty || n >= limit {
                return n;
            }
        }
    }

    /// Issues `cmds` + `CMD_SYNC` through whichever queue is active and waits.
    fn submit_sync_any(&self, cmds: &[[u64; 2]]) -> Result<(), SmmuError> {
        match self.external.get() {
            Some(ext) => {
                let r = ext.submit_sync(cmds);
                if let Err(SmmuError::CommandError { .. }) = r {
                    // Skip the bad command and restart the queue for everyone else.
                    self.gerror();
                }
                r
            }
            None => self.submit_internal(cmds),
        }
    }
}

impl CommandSubmit for SmmuV3 {
    fn submit_sync(&self, cmds: &[[u64; 2]]) -> Result<(), SmmuError> {
        self.submit_sync_any(cmds)
    }
}

/// Writes an STE's eight doublewords (for tables the SMMU cannot reach yet, or during reset).
fn write_ste_words(addr: u64, ste: &Ste) {
    for (i, d) in ste.0.iter().enumerate() {
        write_u64(addr + 8 * i as u64, *d);
    }
}

fn read_ste_words(addr: u64) -> Ste {
    let mut s = Ste::invalid();
    for (i, d) in s.0.iter_mut().enumerate() {
        *d = read_u64(addr + 8 * i as u64);
    }
    s
}

/// The CERROR code names, for logs.
pub fn cerror_name(code: u8) -> &'static str {
    match code {
        CERROR_ILL => "CERROR_ILL",
        CERROR_ABT => "CERROR_ABT",
        CERROR_ATC_INV_SYNC => "CERROR_ATC_INV_SYNC",
        _ => "CERROR_NONE",
    }
}

#[cfg(test)]
mod tests {
    use super::super::cmd::op;
    use super::super::event::{EventId, evt};
    use super::super::model::{Executed, HostDma, QEMU_IDR, SmmuModel};
    use super::super::ste::S2Config;
    use super::*;
    use std::sync::atomic::Ordering;

    /// Small polls so that timeouts come quickly.
    const FAST: Poll = Poll {
        spins: 1000,
        relax: core::hint::spin_loop,
    };

    struct Rig {
        model: Arc<SmmuModel>,
        mem: Arc<HostDma>,
        smmu: SmmuV3,
    }

    fn rig_with(idr: [u32; 6], sid_bits: Option<u32>) -> Rig {
        let mem = Arc::new(HostDma::new());
        let model = Arc::new(SmmuModel::new(mem.clone(), idr));
        let smmu = SmmuV3::probe(model.clone(), mem.clone(), sid_bits)
            .unwrap()
            .with_poll(FAST);
        Rig { model, mem, smmu }
    }

    fn rig() -> Rig {
        rig_with(QEMU_IDR, None)
    }

    /// IDR1 with SIDSIZE 8, EVENTQS 2 (4 entries), CMDQS 3 (8 entries).
    fn small_idr() -> [u32; 6] {
        let mut idr = QEMU_IDR;
        idr[1] = 8 | (2 << 16) | (3 << 21);
        idr
    }

    fn s2_ste(vmid: u16, ttb: u64) -> Ste {
        Ste::s2(vmid, &S2Config::for_table(ttb, 44, 0, 44))
    }

    #[test]
    fn probe_qemu() {
        let r = rig();
        let c = r.smmu.caps();
        assert!(c.s1p && c.s2p && c.nested && c.coherent && c.ril);
        assert!(!c.hyp && !c.msi);
        assert_eq!((c.bbml, c.oas_bits), (2, 44));
        assert_eq!((c.hw_sid_bits, c.sid_bits, c.ssid_bits), (16, 16, 0));
        assert!(c.two_level);
        assert_eq!((c.cmdq_log2size, c.evtq_log2size), (8, 12));
        assert_eq!(r.smmu.cmdq_log2size(), 8);
        assert_eq!(
            c.stage2_caps(),
            SmmuCaps {
                oas_bits: 44,
                bbml: 2,
                coherent_walk: true,
                range_invalidation: true
            }
        );
        // L1 table (256 descriptors), command queue, event queue: nothing else yet.
        let allocs = r.mem.allocations();
        assert_eq!(
            allocs.iter().map(|a| a.1).collect::<Vec<_>>(),
            vec![256 * 8, 16 << 8, 32 << 12]
        );
        for (a, len) in allocs {
            assert_eq!(a % len as u64, 0, "aligned to its size");
        }
        assert_eq!(r.smmu.cmdq_base_pa(), r.mem.allocations()[1].0);
        // No control register touched by probe.
        assert!(r.model.with(|s| s.writes.is_empty()));

        // Asking for 8 StreamID bits gives a linear table.
        let r = rig_with(QEMU_IDR, Some(8));
        assert!(!r.smmu.caps().two_level);
        assert_eq!(r.smmu.caps().sid_bits, 8);
        assert_eq!(r.mem.allocations()[0].1, 256 * 64);
        // More than the SMMU has is capped.
        let r = rig_with(small_idr(), Some(20));
        assert_eq!(r.smmu.caps().sid_bits, 8);
        assert_eq!(
            (r.smmu.caps().cmdq_log2size, r.smmu.caps().evtq_log2size),
            (3, 2)
        );
    }

    #[test]
    fn probe_rejects_what_the_driver_cannot_use() {
        let bad = |f: fn(&mut [u32; 6]), what: &str| {
            let mut idr = QEMU_IDR;
            f(&mut idr);
            let mem = Arc::new(HostDma::new());
            let model = Arc::new(SmmuModel::new(mem.clone(), idr));
            match SmmuV3::probe(model, mem, None) {
                Err(SmmuError::Unsupported(m)) => assert!(m.contains(what), "{m}"),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("accepted without {what}"),
            }
        };
        bad(|i| i[0] &= !1, "S2P");
        bad(|i| i[0] = (i[0] & !0xc) | (1 << 2), "TTF");
        bad(|i| i[0] |= 3 << 21, "TTENDIAN");
        bad(|i| i[5] &= !(1 << 4), "GRAN4K");
        bad(|i| i[1] |= 1 << 30, "PRESET");
        bad(|i| i[1] |= 1 << 29, "PRESET");
        // No memory.
        let mem = Arc::new(HostDma::new());
        mem.fail_after.store(1, Ordering::Relaxed);
        let model = Arc::new(SmmuModel::qemu(mem.clone()));
        assert!(matches!(
            SmmuV3::probe(model, mem, None),
            Err(SmmuError::NoMemory("command queue"))
        ));
    }

    fn cmds(model: &SmmuModel) -> Vec<Command> {
        model.with(|s| s.executed.iter().map(|e| e.cmd).collect())
    }

    #[test]
    fn reset_sequence_and_final_state() {
        let r = rig();
        r.smmu.reset().unwrap();
        let l1 = r.mem.allocations()[0].0;
        let cmdq = r.smmu.cmdq_base_pa();
        let evtq = r.smmu.evtq_base_pa();
        let writes = r.model.with(|s| s.writes.clone());
        let expected: Vec<(u64, u64)> = vec![
            (off::GBPA, 0x1000 | (1 << 20) | (1 << 31)),
            (off::CR0, 0),
            (off::GERRORN, 0),
            (off::CR1, 0xd75),
            (off::CR2, 0b110),
            (off::STRTAB_BASE, l1 | (1 << 62)),
            (off::STRTAB_BASE_CFG, (1 << 16) | (8 << 6) | 16),
            (off::CMDQ_BASE, cmdq | (1 << 62) | 8),
            (off::CMDQ_PROD, 0),
            (off::CMDQ_CONS, 0),
            (off::CR0, 0b1000),
            (off::CMDQ_PROD, 2),
            (off::CMDQ_PROD, 4),
            (off::EVENTQ_BASE, evtq | (1 << 62) | 12),
            (off::EVENTQ_PROD, 0),
            (off::EVENTQ_CONS, 0),
            (off::CR0, 0b1100),
            (off::IRQ_CTRL, 0),
            (off::IRQ_CTRL, 0b101),
            (off::CR0, 0b1101),
        ];
        assert_eq!(writes, expected);
        assert_eq!(
            cmds(&r.model),
            vec![
                Command::CfgiAll,
                Command::sync(),
                Command::TlbiNsnhAll,
                Command::sync()
            ]
        );
        r.model.with(|s| {
            assert_eq!(s.cr0ack, 0b1101);
            assert_eq!(s.gbpa & (1 << 20), 1 << 20, "GBPA abort");
            assert_eq!(s.gbpa & (1 << 31), 0);
            assert_eq!(s.irq_ctrlack, 0b101);
            assert_eq!(s.cmdq_cons, 4);
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        });
        // Every stream aborts: no level-2 table yet, so every StreamID is out of range.
        r.model.with(|s| {
            for sid in [0, 1, 8, 0xff, 0x100, 0xffff] {
                assert_eq!(r.model.fetch_ste(s, sid), None);
            }
        });
    }

    #[test]
    fn reset_with_hyp_msi_and_linear_table() {
        let mut idr = small_idr();
        idr[0] |= (1 << 9) | (1 << 13); // HYP, MSI
        let r = rig_with(idr, None);
        r.model.with(|s| {
            s.gerror = 0b100; // a stale EVENTQ_ABT_ERR
            s.gerror_irq_cfg0 = 0xdead_0000;
        });
        r.smmu.reset().unwrap();
        assert_eq!(
            cmds(&r.model),
            vec![
                Command::CfgiAll,
                Command::sync(),
                Command::TlbiEl2All,
                Command::TlbiNsnhAll,
                Command::sync()
            ]
        );
        r.model.with(|s| {
            assert_eq!(s.gerrorn, 0b100, "stale errors acknowledged");
            assert_eq!(s.gerror_irq_cfg0, 0, "MSIs off");
            assert_eq!(s.strtab_base_cfg, 8, "linear, 256 STEs");
            assert!(s.violations.is_empty(), "{:?}", s.violations);
            for sid in 0..256 {
                assert_eq!(r.model.fetch_ste(s, sid), Some(Ste::abort()), "{sid}");
            }
            assert_eq!(r.model.fetch_ste(s, 256), None);
        });
    }

    #[test]
    fn reset_timeouts_name_the_register() {
        let r = rig();
        r.model.with(|s| s.stuck_gbpa = true);
        r.model.with(|s| s.gbpa |= 1 << 31);
        assert_eq!(r.smmu.reset(), Err(SmmuError::Timeout { reg: "GBPA" }));
        let r = rig();
        r.model.with(|s| s.stuck_cr0ack = true);
        r.model.with(|s| s.cr0ack = 1);
        assert_eq!(r.smmu.reset(), Err(SmmuError::Timeout { reg: "CR0ACK" }));
        let r = rig();
        r.model.with(|s| s.stall_cmdq = true);
        assert_eq!(r.smmu.reset(), Err(SmmuError::Timeout { reg: "CMDQ_CONS" }));
    }

    /// The snapshots the model took of the watched STE at each CFGI_STE.
    fn cfgi_snapshots(model: &SmmuModel, sid: u32) -> Vec<Ste> {
        model.with(|s| {
            s.executed
                .iter()
                .filter(|e| e.cmd == Command::CfgiSte { sid, leaf: true })
                .map(|e| e.ste.unwrap())
                .collect()
        })
    }

    fn clear_log(model: &SmmuModel) {
        model.with(|s| s.executed.clear());
    }

    /// Every STE the SMMU could have fetched during an update is the old one, the new one, or
    /// one whose dword 0 is abort/invalid (whatever the other dwords hold).
    fn assert_safe(snaps: &[Ste], old: &Ste, new: &Ste) {
        for s in snaps {
            let d0_stops = !s.valid() || s.config() == SteConfig::Abort;
            assert!(s == old || s == new || d0_stops, "unsafe STE seen: {s:x?}");
        }
        assert_eq!(snaps.last(), Some(new), "the last CFGI_STE saw the new STE");
    }

    #[test]
    fn write_ste_orders_writes_and_invalidations() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        let sid = 0x21;
        r.model.with(|s| s.watch_sid = Some(sid));
        clear_log(&r.model);

        // abort -> S2: not live, so dwords 1..3 first, CFGI + SYNC, then dword 0, CFGI + SYNC.
        let a = s2_ste(1, 0x4800_0000);
        r.smmu.write_ste(sid, a).unwrap();
        let snaps = cfgi_snapshots(&r.model, sid);
        let mut half = a;
        half.0[0] = Ste::abort().0[0];
        assert_eq!(snaps, vec![half, a]);
        assert_eq!(
            cmds(&r.model),
            vec![
                Command::CfgiSte { sid, leaf: true },
                Command::sync(),
                Command::CfgiSte { sid, leaf: true },
                Command::sync()
            ]
        );
        assert_eq!(r.smmu.shadow_ste(sid), a);

        // Live S2 -> other VMID and table (dwords 2 and 3): break to abort first.
        clear_log(&r.model);
        let b = s2_ste(2, 0x4900_0000);
        r.smmu.write_ste(sid, b).unwrap();
        let snaps = cfgi_snapshots(&r.model, sid);
        let mut broken = a;
        broken.0[0] = Ste::abort().0[0];
        let mut filled = b;
        filled.0[0] = Ste::abort().0[0];
        assert_eq!(snaps, vec![broken, filled, b]);
        assert_safe(&snaps, &a, &b);

        // One dword (the table root): a single atomic write and one CFGI.
        clear_log(&r.model);
        let c = s2_ste(2, 0x4a00_0000);
        r.smmu.write_ste(sid, c).unwrap();
        assert_eq!(cfgi_snapshots(&r.model, sid), vec![c]);

        // S2 -> nested (dwords 0 and 1 change): break first.
        clear_log(&r.model);
        let s1 = super::super::ste::S1Fields {
            context_ptr: 0x8000_0000,
            fmt: 0,
            cd_max: 0,
            dss: 0,
            cir: 1,
            cor: 1,
            csh: 3,
        };
        let n = Ste::nested(2, &S2Config::for_table(0x4a00_0000, 44, 0, 44), &s1);
        r.smmu.write_ste(sid, n).unwrap();
        let snaps = cfgi_snapshots(&r.model, sid);
        assert_eq!(snaps.len(), 3);
        assert_safe(&snaps, &c, &n);

        // Live -> abort: break (dword 0 = abort), clear the rest; no third step.
        clear_log(&r.model);
        r.smmu.write_ste(sid, Ste::abort()).unwrap();
        let snaps = cfgi_snapshots(&r.model, sid);
        assert_eq!(snaps.len(), 2);
        assert_safe(&snaps, &n, &Ste::abort());
        assert_eq!(r.smmu.shadow_ste(sid), Ste::abort());

        // Same STE again: nothing to do.
        clear_log(&r.model);
        r.smmu.write_ste(sid, Ste::abort()).unwrap();
        assert!(cmds(&r.model).is_empty());
        r.model
            .with(|s| assert!(s.violations.is_empty(), "{:?}", s.violations));
    }

    #[test]
    fn write_ste_property_every_fetch_is_safe() {
        // Random sequences of STEs: every CFGI_STE snapshot is safe, and the final one is exact.
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        r.model.with(|s| s.watch_sid = Some(7));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut old = Ste::abort();
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let new = match x % 5 {
                0 => Ste::abort(),
                1 => Ste::invalid(),
                2 => s2_ste((x >> 8) as u16 & 3, (x >> 20) & 0x3000_0000),
                3 => {
                    let mut s = s2_ste(1, 0x4000_0000);
                    s.0[3] = (x >> 12) & 0xff_f000;
                    s
                }
                _ => Ste::nested(
                    (x >> 8) as u16 & 1,
                    &S2Config::for_table(0x4000_0000, 44, 0, 44),
                    &super::super::ste::S1Fields {
                        context_ptr: (x >> 16) & 0x3_0000,
                        ..Default::default()
                    },
                ),
            };
            clear_log(&r.model);
            r.smmu.write_ste(7, new).unwrap();
            let snaps = cfgi_snapshots(&r.model, 7);
            if old != new {
                assert_safe(&snaps, &old, &new);
            }
            r.model
                .with(|s| assert_eq!(r.model.fetch_ste(s, 7), Some(new)));
            old = new;
        }
    }

    #[test]
    fn two_level_tables_on_demand() {
        let r = rig();
        r.smmu.reset().unwrap();
        let before = r.mem.allocations().len();
        clear_log(&r.model);
        let a = s2_ste(1, 0x4800_0000);
        r.smmu.write_ste(0x0108, a).unwrap();
        let allocs = r.mem.allocations();
        assert_eq!(allocs.len(), before + 1);
        assert_eq!(allocs.last().unwrap().1, 256 * 64);
        // The level-1 descriptor is invalidated (Leaf = 0) before the STE is written.
        assert_eq!(
            cmds(&r.model)[..2],
            [
                Command::CfgiSte {
                    sid: 0x108,
                    leaf: false
                },
                Command::sync()
            ]
        );
        r.model.with(|s| {
            assert_eq!(r.model.fetch_ste(s, 0x108), Some(a));
            assert_eq!(r.model.fetch_ste(s, 0x100), Some(Ste::abort()));
            assert_eq!(r.model.fetch_ste(s, 0x1ff), Some(Ste::abort()));
            assert_eq!(r.model.fetch_ste(s, 0x208), None);
            assert_eq!(r.model.fetch_ste(s, 0x008), None);
        });
        // Same level-2 table: no new allocation.
        r.smmu.write_ste(0x01ff, a).unwrap();
        assert_eq!(r.mem.allocations().len(), before + 1);
        assert_eq!(
            r.smmu.ste_addr(0x1ff),
            Some(allocs.last().unwrap().0 + 255 * 64)
        );
        assert_eq!(r.smmu.ste_addr(0x200), None);
        assert_eq!(r.smmu.shadow_ste(0x1ff), a);
        assert_eq!(r.smmu.shadow_ste(0x1fe), Ste::abort());
        assert_eq!(
            r.smmu.write_ste(0x1_0000, a),
            Err(SmmuError::SidOutOfRange { sid: 0x1_0000 })
        );
        r.model
            .with(|s| assert!(s.violations.is_empty(), "{:?}", s.violations));
    }

    #[test]
    fn reset_restores_tables_from_the_shadow() {
        let r = rig();
        r.smmu.reset().unwrap();
        let a = s2_ste(3, 0x4800_0000);
        r.smmu.write_ste(0x0801, a).unwrap();
        // Power loss: registers back to reset values, table memory scribbled over.
        let addr = r.smmu.ste_addr(0x0801).unwrap();
        for i in 0..8 {
            r.mem.write_u64(addr + 8 * i, 0xdead);
        }
        r.model.with(|s| {
            s.cr0 = 0;
            s.cr0ack = 0;
            s.gbpa = 0x1000;
            s.strtab_base = 0;
        });
        r.smmu.reset().unwrap();
        r.model.with(|s| {
            assert_eq!(r.model.fetch_ste(s, 0x0801), Some(a));
            assert_eq!(r.model.fetch_ste(s, 0x0800), Some(Ste::abort()));
            assert_eq!(s.cr0ack, 0b1101);
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        });
    }

    #[test]
    fn sync_timeout_is_an_error() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        r.model.with(|s| s.stall_cmdq = true);
        assert_eq!(
            r.smmu.write_ste(1, s2_ste(1, 0x4000_0000)),
            Err(SmmuError::Timeout { reg: "CMDQ_CONS" })
        );
    }

    #[test]
    fn illegal_command_is_skipped_and_reported() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        clear_log(&r.model);
        // Opcode 0 is reserved: CERROR_ILL at the first slot of this batch (index 4: the reset
        // used slots 0..=3 of 8).
        let bad = [0u64, 0];
        let good = Command::TlbiS12Vmall { vmid: 4 }.encode();
        assert_eq!(
            r.smmu.submit_sync(&[bad, good]),
            Err(SmmuError::CommandError {
                code: CERROR_ILL,
                index: 4
            })
        );
        // The bad command became a CMD_SYNC; the rest ran; the error is acknowledged.
        assert_eq!(
            cmds(&r.model),
            vec![
                Command::sync(),
                Command::TlbiS12Vmall { vmid: 4 },
                Command::sync()
            ]
        );
        r.model.with(|s| {
            assert_eq!(s.errors, vec![(4, CERROR_ILL)]);
            assert_eq!(s.gerror, s.gerrorn);
        });
        assert_eq!(r.smmu.gerror(), None);
        // The queue works afterwards, across the wrap (8 entries).
        for vmid in 0..10 {
            r.smmu
                .submit_sync(&[Command::TlbiS12Vmall { vmid }.encode()])
                .unwrap();
        }
        // A stage-1 command on a stage-2-only SMMU is illegal too.
        let r = rig_with(
            {
                let mut i = small_idr();
                i[0] &= !2;
                i
            },
            None,
        );
        r.smmu.reset().unwrap();
        assert!(matches!(
            r.smmu
                .submit_sync(&[Command::TlbiNhAll { vmid: 1 }.encode()]),
            Err(SmmuError::CommandError { code: 1, .. })
        ));
    }

    #[test]
    fn abort_error_retries_the_command() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        clear_log(&r.model);
        r.model.with(|s| s.fail_once_at = Some((4, CERROR_ABT)));
        let c = Command::TlbiS12Vmall { vmid: 9 };
        assert_eq!(
            r.smmu.submit_sync(&[c.encode()]),
            Err(SmmuError::CommandError {
                code: CERROR_ABT,
                index: 4
            })
        );
        // The command was fetched again and executed.
        assert_eq!(cmds(&r.model), vec![c, Command::sync()]);
        // An error that keeps coming back ends in a timeout, not a loop.
        r.model.with(|s| s.illegal_ops.push(op::SYNC));
        assert_eq!(
            r.smmu.submit_sync(&[]),
            Err(SmmuError::Timeout { reg: "CMDQ_CONS" })
        );
    }

    #[test]
    fn gerror_acknowledges_other_errors() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        assert_eq!(r.smmu.gerror(), None);
        r.model.with(|s| s.gerror ^= 0b100 | (1 << 8));
        assert_eq!(r.smmu.gerror(), Some(0b100 | (1 << 8)));
        r.model.with(|s| assert_eq!(s.gerror, s.gerrorn));
        assert_eq!(r.smmu.gerror(), None);
        // A CMDQ error nobody is waiting for: gerror() skips the command and acknowledges it.
        r.model.with(|s| s.stall_cmdq = true);
        assert!(r.smmu.submit_sync(&[[0, 0]]).is_err());
        r.model.with(|s| s.stall_cmdq = false);
        r.model.with(|s| s.illegal_ops.clear());
        // Kick the model (as a PROD write would) so that it meets the bad command.
        let prod = r.model.with(|s| s.cmdq_prod);
        r.model.write32(off::CMDQ_PROD, prod);
        assert_eq!(r.smmu.gerror(), Some(GERROR_CMDQ_ERR));
        r.model.with(|s| {
            assert_eq!(s.gerror, s.gerrorn);
            assert!(regs::q_empty(s.cmdq_prod, s.cmdq_cons, 3), "queue drained");
        });
    }

    #[test]
    fn event_drain_wraps_and_handles_overflow() {
        let r = rig_with(small_idr(), None); // 4-entry event queue
        r.smmu.reset().unwrap();
        let ev = |sid: u32| Event::bad_ste(sid).raw;
        let mut seen = Vec::new();
        assert_eq!(r.smmu.drain_events(|e| seen.push(e.sid)), 0);
        for round in 0..5u32 {
            for i in 0..3 {
                assert!(r.model.inject_event(ev(round * 10 + i)));
            }
            seen.clear();
            assert_eq!(r.smmu.drain_events(|e| seen.push(e.sid)), 3);
            assert_eq!(seen, vec![round * 10, round * 10 + 1, round * 10 + 2]);
        }
        assert_eq!(r.smmu.event_overflows(), 0);
        // Overflow: 4 fit, the 5th and 6th are lost, the flag toggles once.
        for i in 0..6 {
            assert_eq!(r.model.inject_event(ev(100 + i)), i < 4);
        }
        seen.clear();
        assert_eq!(r.smmu.drain_events(|e| seen.push(e.sid)), 4);
        assert_eq!(seen, vec![100, 101, 102, 103]);
        assert_eq!(r.smmu.event_overflows(), 1);
        r.model.with(|s| {
            assert_eq!(s.eventq_cons & Q_OVF, s.eventq_prod & Q_OVF, "acknowledged");
            assert!(regs::q_empty(s.eventq_prod, s.eventq_cons, 2));
        });
        // After the acknowledgement: normal operation, a new overflow is counted again.
        assert!(r.model.inject_event(ev(200)));
        let mut got = Vec::new();
        assert_eq!(r.smmu.drain_events(|e| got.push(e)), 1);
        assert_eq!(got[0].event_id(), EventId::C_BAD_STE);
        assert_eq!(got[0].sid, 200);
        for i in 0..5 {
            r.model.inject_event(ev(300 + i));
        }
        assert_eq!(r.smmu.drain_events(|_| {}), 4);
        assert_eq!(r.smmu.event_overflows(), 2);
        // A translation fault decodes through.
        let raw = [
            u64::from(evt::F_TRANSLATION) | (8 << 32),
            (1 << 39) | (2 << 40),
            0xc000_0000,
            0xc000_0000,
        ];
        assert!(r.model.inject_event(raw));
        r.smmu.drain_events(|e| {
            assert_eq!(e.event_id(), EventId::F_TRANSLATION);
            assert!(e.s2);
            assert_eq!((e.sid, e.input_addr, e.ipa), (8, 0xc000_0000, 0xc000_0000));
        });
    }

    #[test]
    fn non_coherent_smmu_gets_nc_attributes_and_cleans() {
        let mut idr = small_idr();
        idr[0] &= !(1 << 4); // COHACC
        let r = rig_with(idr, None);
        assert!(!r.smmu.caps().coherent);
        r.smmu.reset().unwrap();
        r.model
            .with(|s| assert_eq!(s.cr1, 0x820, "NC, outer shareable"));
        let before = r.mem.cleans.load(Ordering::Relaxed);
        r.smmu.write_ste(3, s2_ste(1, 0x4000_0000)).unwrap();
        assert!(r.mem.cleans.load(Ordering::Relaxed) > before);
        // A coherent SMMU never asks for cleans.
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        r.smmu.write_ste(3, s2_ste(1, 0x4000_0000)).unwrap();
        assert_eq!(r.mem.cleans.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn lock_free_queue_takes_over() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        let opts = CmdqOptions {
            max_spins: 1000,
            ..CmdqOptions::default()
        };
        let q = r.smmu.install_cmd_queue(opts).unwrap();
        assert!(Arc::ptr_eq(&q, &r.smmu.install_cmd_queue(opts).unwrap()));
        assert!(Arc::ptr_eq(&q, r.smmu.cmd_queue().unwrap()));
        assert_eq!(q.log2size(), 3);
        clear_log(&r.model);
        // write_ste goes through it.
        let a = s2_ste(1, 0x4000_0000);
        r.smmu.write_ste(5, a).unwrap();
        r.model
            .with(|s| assert_eq!(r.model.fetch_ste(s, 5), Some(a)));
        assert!(cmds(&r.model).contains(&Command::CfgiSte { sid: 5, leaf: true }));
        // So does CommandSubmit on the queue itself, in chunks, across the wrap.
        let many: Vec<_> = (0..20)
            .map(|vmid| Command::TlbiS12Vmall { vmid }.encode())
            .collect();
        q.submit_sync(&many).unwrap();
        // A bad command: the waiter gets the error, the queue is repaired and goes on.
        assert!(matches!(
            r.smmu.submit_sync(&[[0, 0]]),
            Err(SmmuError::CommandError { code: 1, .. })
        ));
        r.model.with(|s| assert_eq!(s.gerror, s.gerrorn));
        r.smmu
            .submit_sync(&[Command::TlbiS12Vmall { vmid: 1 }.encode()])
            .unwrap();
        // The internal queue and reset are retired.
        assert!(matches!(r.smmu.reset(), Err(SmmuError::Unsupported(_))));
        r.model
            .with(|s| assert!(s.violations.is_empty(), "{:?}", s.violations));
    }

    #[test]
    fn stale_cons_err_is_not_an_error() {
        // After a recovered error, QEMU (and the model) leave CONS.ERR set.
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        assert!(r.smmu.submit_sync(&[[0, 0]]).is_err());
        r.model
            .with(|s| assert_ne!(s.cmdq_cons & CONS_ERR, 0, "stale ERR"));
        r.smmu.submit_sync(&[]).unwrap();
        let q = r.smmu.install_cmd_queue(CmdqOptions::default()).unwrap();
        assert_eq!(read_cmdq_cons(&*r.model) & CONS_ERR, 0);
        q.submit_sync(&[Command::TlbiS12Vmall { vmid: 3 }.encode()])
            .unwrap();
        assert_eq!(r.smmu.gerror(), None);
    }

    #[test]
    fn concurrent_write_ste_on_different_streams() {
        let r = Arc::new(rig());
        r.smmu.reset().unwrap();
        std::thread::scope(|sc| {
            for t in 0..4u32 {
                let r = r.clone();
                sc.spawn(move || {
                    for i in 0..50u32 {
                        let sid = (t << 9) | i;
                        r.smmu
                            .write_ste(sid, s2_ste(t as u16 + 1, 0x4000_0000))
                            .unwrap();
                        if i % 2 == 0 {
                            r.smmu.write_ste(sid, Ste::abort()).unwrap();
                        }
                    }
                });
            }
        });
        r.model.with(|s| {
            for t in 0..4u32 {
                for i in 0..50u32 {
                    let want = if i % 2 == 0 {
                        Ste::abort()
                    } else {
                        s2_ste(t as u16 + 1, 0x4000_0000)
                    };
                    assert_eq!(r.model.fetch_ste(s, (t << 9) | i), Some(want));
                }
            }
            assert!(s.violations.is_empty());
        });
    }

    #[test]
    fn heap_dma_is_zeroed_and_aligned() {
        // SAFETY: on the host the driver never dereferences these (only this test does, at the
        // pointer the allocator returned).
        let h = unsafe { HeapDma::new(None) };
        for (bytes, align) in [(64, 64), (4096, 4096), (16384, 16384), (100, 32)] {
            let p = h.alloc_zeroed(bytes, align).unwrap();
            assert_eq!(p % align as u64, 0);
            // SAFETY: just allocated, `bytes` long.
            let s = unsafe { core::slice::from_raw_parts(p as *const u8, bytes) };
            assert!(s.iter().all(|&b| b == 0));
        }
        h.clean(0, 0);
    }

    #[test]
    fn driver_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SmmuV3>();
        check::<MmioAt>();
        check::<HeapDma>();
    }

    #[test]
    fn executed_log_records_indexes() {
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        let first: Vec<Executed> = r.model.with(|s| s.executed.clone());
        assert_eq!(
            first.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    // ---- Power: suspend, power loss, offline STE writes, resume ----

    /// The configuration registers the driver programs (not the queue pointers).
    fn config_regs(model: &SmmuModel) -> [u64; 11] {
        model.with(|s| {
            [
                s.cr0.into(),
                s.cr0ack.into(),
                s.cr1.into(),
                s.cr2.into(),
                s.gbpa.into(),
                s.irq_ctrl.into(),
                s.irq_ctrlack.into(),
                s.strtab_base,
                s.strtab_base_cfg.into(),
                s.cmdq_base,
                s.eventq_base,
            ]
        })
    }

    fn no_violations(model: &SmmuModel) {
        model.with(|s| assert!(s.violations.is_empty(), "{:?}", s.violations));
    }

    /// A reset SMMU whose commands go through the lock-free queue.
    fn installed(r: &Rig) -> Arc<CmdQueue> {
        r.smmu.reset().unwrap();
        r.smmu
            .install_cmd_queue(CmdqOptions {
                max_spins: 1000,
                ..CmdqOptions::default()
            })
            .unwrap()
    }

    /// Position in `writes` of the (last) CR0 write that set SMMUEN.
    fn smmuen_write(model: &SmmuModel) -> usize {
        model.with(|s| {
            s.writes
                .iter()
                .rposition(|&(o, v)| o == off::CR0 && v & 1 != 0)
                .unwrap()
        })
    }

    /// The invalidations every resume makes, each before SMMUEN was written.
    fn assert_resume_invalidations(model: &SmmuModel, first_index: u32, log2: u32) {
        let en = smmuen_write(model);
        let ex = model.with(|s| s.executed.clone());
        assert_eq!(
            ex.iter().map(|e| e.cmd).collect::<Vec<_>>(),
            vec![
                Command::CfgiAll,
                Command::sync(),
                Command::TlbiNsnhAll,
                Command::sync()
            ]
        );
        for (i, e) in ex.iter().enumerate() {
            assert_eq!(e.index, regs::q_idx(first_index + i as u32, log2));
            assert!(e.at_write < en, "{:?} after SMMUEN", e.cmd);
        }
    }

    #[test]
    fn resume_sequence_and_final_state() {
        let r = rig();
        let q = installed(&r);
        let after_reset = config_regs(&r.model);
        let a = s2_ste(1, 0x4800_0000);
        r.smmu.write_ste(0x0801, a).unwrap();
        q.submit_sync(&[Command::TlbiS12Vmall { vmid: 1 }.encode()])
            .unwrap();
        for sid in [1, 2] {
            assert!(r.model.inject_event(Event::bad_ste(sid).raw));
        }
        let mut seen = Vec::new();
        r.smmu.suspend(|e| seen.push(e.sid)).unwrap();
        assert_eq!(seen, vec![1, 2]);
        let pos = r.model.with(|s| {
            assert_eq!((s.cr0, s.cr0ack), (0, 0));
            assert_eq!(s.cmdq_prod, s.cmdq_cons, "drained");
            s.cmdq_prod
        });
        r.smmu.simulate_power_loss();
        r.model.with(|s| {
            let regs = [
                s.cr0,
                s.cr1,
                s.cr2,
                s.irq_ctrl,
                s.strtab_base_cfg,
                s.cmdq_prod,
                s.cmdq_cons,
                s.eventq_prod,
                s.eventq_cons,
            ];
            assert_eq!(regs, [0; 9]);
            assert_eq!([s.strtab_base, s.cmdq_base, s.eventq_base], [0; 3]);
            assert_eq!(s.gbpa, 0x1000 | (1 << 20), "GBPA stays abort");
            s.writes.clear();
            s.executed.clear();
        });
        r.smmu.resume().unwrap();

        let l1 = r.mem.allocations()[0].0;
        let log2 = 8;
        let at = |n| regs::q_add(pos, n, log2);
        let expected: Vec<(u64, u64)> = vec![
            (off::GBPA, 0x1000 | (1 << 20) | (1 << 31)),
            // CR0 is 0 already: not written.
            (off::GERRORN, 0),
            (off::CR1, 0xd75),
            (off::CR2, 0b110),
            (off::STRTAB_BASE, l1 | (1 << 62)),
            (off::STRTAB_BASE_CFG, (1 << 16) | (8 << 6) | 16),
            (off::CMDQ_BASE, r.smmu.cmdq_base_pa() | (1 << 62) | 8),
            (off::CMDQ_PROD, pos.into()),
            (off::CMDQ_CONS, pos.into()),
            (off::CR0, 0b1000),
            (off::CMDQ_PROD, at(2).into()),
            (off::CMDQ_PROD, at(4).into()),
            (off::EVENTQ_BASE, r.smmu.evtq_base_pa() | (1 << 62) | 12),
            (off::EVENTQ_PROD, 2),
            (off::EVENTQ_CONS, 2),
            (off::CR0, 0b1100),
            (off::IRQ_CTRL, 0),
            (off::IRQ_CTRL, 0b101),
            (off::CR0, 0b1101),
        ];
        assert_eq!(r.model.with(|s| s.writes.clone()), expected);
        assert_resume_invalidations(&r.model, pos, log2);
        assert_eq!(config_regs(&r.model), after_reset);
        r.model.with(|s| {
            assert_eq!((s.cmdq_prod, s.cmdq_cons), (at(4), at(4)));
            assert_eq!((s.eventq_prod, s.eventq_cons), (2, 2));
            assert_eq!(r.model.fetch_ste(s, 0x0801), Some(a));
            assert_eq!(r.model.cached_ste(s, 0x0801), Some(a));
        });
        no_violations(&r.model);
        // The lock-free queue goes on from there.
        q.submit_sync(&[Command::TlbiS12Vmall { vmid: 2 }.encode()])
            .unwrap();
        r.model.with(|s| {
            let e = &s.executed[4..];
            assert_eq!(e[0].cmd, Command::TlbiS12Vmall { vmid: 2 });
            assert_eq!(e[0].index, regs::q_idx(at(4), log2));
            assert_eq!(e.len(), 2);
        });
    }

    #[test]
    fn full_power_cycle_with_offline_ste_writes() {
        let r = rig();
        let q = installed(&r);
        let after_reset = config_regs(&r.model);
        let (a, b, c) = (
            s2_ste(1, 0x4800_0000),
            s2_ste(2, 0x4900_0000),
            s2_ste(3, 0x4a00_0000),
        );
        r.smmu.write_ste(0x0801, a).unwrap();
        q.issue(&[Command::TlbiS12Vmall { vmid: 1 }.encode()], false)
            .unwrap();
        q.submit_sync(&[Command::TlbiS12Vmall { vmid: 2 }.encode()])
            .unwrap();
        // A transaction from 0x801 caches its STE.
        r.model
            .with(|s| assert_eq!(r.model.cached_ste(s, 0x0801), Some(a)));
        for sid in 10..13 {
            assert!(r.model.inject_event(Event::bad_ste(sid).raw));
        }
        let mut seen = Vec::new();
        r.smmu.suspend(|e| seen.push(e.sid)).unwrap();
        assert_eq!(seen, vec![10, 11, 12], "every pending event delivered");
        let pos = r.model.with(|s| s.cmdq_prod);
        r.smmu.simulate_power_loss();
        // The power really goes: from here until power-on, any register access is a violation.
        r.model.power_off();
        let allocs = r.mem.allocations().len();
        r.smmu.write_ste_offline(0x0801, b).unwrap();
        r.smmu.write_ste_offline(0x1234, c).unwrap();
        assert_eq!(r.mem.allocations().len(), allocs + 1, "level-2 table");
        assert_eq!(
            r.smmu.write_ste_offline(0x1_0000, c),
            Err(SmmuError::SidOutOfRange { sid: 0x1_0000 })
        );
        no_violations(&r.model);
        assert_eq!(r.smmu.shadow_ste(0x1234), c);
        r.model.power_on();
        r.model.with(|s| {
            s.writes.clear();
            s.executed.clear();
        });
        r.smmu.resume().unwrap();
        assert_eq!(config_regs(&r.model), after_reset);
        assert_resume_invalidations(&r.model, pos, 8);
        r.model.with(|s| {
            assert_eq!(r.model.fetch_ste(s, 0x1234), Some(c));
            assert_eq!(r.model.cached_ste(s, 0x1234), Some(c));
            assert_eq!(r.model.cached_ste(s, 0x0801), Some(b));
            assert_eq!(r.model.cached_ste(s, 0x1235), Some(Ste::abort()));
            assert_eq!(r.model.fetch_ste(s, 0x2000), None);
        });
        // Commands after the resume: next slots, executed once; live STE updates work.
        let next = regs::q_add(pos, 4, 8);
        q.submit_sync(&[Command::TlbiS12Vmall { vmid: 3 }.encode()])
            .unwrap();
        r.smmu.write_ste(0x1234, Ste::abort()).unwrap();
        r.model.with(|s| {
            let e = &s.executed[4..];
            assert_eq!(
                (e[0].cmd, e[0].index),
                (Command::TlbiS12Vmall { vmid: 3 }, regs::q_idx(next, 8))
            );
            assert_eq!(e[1].cmd, Command::sync());
            assert!(e[2..].iter().all(|e| matches!(
                e.cmd,
                Command::CfgiSte { sid: 0x1234, .. } | Command::Sync { .. }
            )));
            for w in s.executed.windows(2) {
                assert_eq!(
                    w[1].index,
                    (w[0].index + 1) % 256,
                    "no slot twice or skipped"
                );
            }
            assert_eq!(r.model.cached_ste(s, 0x1234), Some(Ste::abort()));
            assert_eq!(s.power_losses, 1);
        });
        assert_eq!(r.smmu.gerror(), None);
        no_violations(&r.model);
    }

    #[test]
    fn resume_without_power_loss_drops_stale_cached_stes() {
        let r = rig_with(small_idr(), None);
        let q = installed(&r);
        let (a, b) = (s2_ste(1, 0x4800_0000), s2_ste(2, 0x4900_0000));
        r.smmu.write_ste(5, a).unwrap();
        r.model
            .with(|s| assert_eq!(r.model.cached_ste(s, 5), Some(a)));
        // Offline writes are refused while the SMMU is enabled.
        assert!(matches!(
            r.smmu.write_ste_offline(5, b),
            Err(SmmuError::Unsupported(_))
        ));
        r.smmu.suspend(|_| {}).unwrap();
        r.model.with(|s| s.writes.clear());
        r.smmu.write_ste_offline(5, b).unwrap();
        assert!(r.model.with(|s| s.writes.is_empty()), "no register access");
        // Registers kept, and the SMMU kept its cached STE: only CFGI_ALL replaces it.
        r.model.with(|s| assert_eq!(s.ste_cache.get(&5), Some(&a)));
        r.smmu.resume().unwrap();
        r.model.with(|s| {
            assert_eq!(r.model.cached_ste(s, 5), Some(b));
            assert!(!s.writes.contains(&(off::CR0, 0)));
        });
        q.submit_sync(&[]).unwrap();
        // Resuming an SMMU that is running (no suspend) is a valid sequence too: it is disabled
        // first.
        r.smmu.resume().unwrap();
        r.model.with(|s| {
            assert!(s.writes.contains(&(off::CR0, 0)));
            assert_eq!(s.cr0ack, 0b1101);
            assert_eq!(s.cmdq_prod, s.cmdq_cons);
        });
        q.submit_sync(&[]).unwrap();
        no_violations(&r.model);
    }

    #[test]
    fn hundred_power_cycles_without_drift() {
        // 8-entry command queue and 4-entry event queue: both wrap many times.
        let r = rig_with(small_idr(), None);
        let q = installed(&r);
        let allocs = r.mem.allocations().len();
        let mut expected_cmds = 4; // reset's
        let mut events = 0u32;
        for i in 0..100u32 {
            let k = (i % 5) as usize;
            let cmds: Vec<_> = (0..k)
                .map(|j| {
                    Command::TlbiS12Vmall {
                        vmid: (i + j as u32) as u16,
                    }
                    .encode()
                })
                .collect();
            q.submit_sync(&cmds).unwrap();
            expected_cmds += k + 1;
            let n = i % 4;
            for j in 0..n {
                assert!(r.model.inject_event(Event::bad_ste(events + j).raw));
            }
            let mut seen = Vec::new();
            r.smmu.suspend(|e| seen.push(e.sid)).unwrap();
            assert_eq!(seen, (events..events + n).collect::<Vec<_>>(), "cycle {i}");
            events += n;
            match i % 3 {
                0 => r.smmu.simulate_power_loss(),
                1 => r.model.power_cycle(),
                _ => {} // registers kept
            }
            let sid = i % 256;
            let ste = s2_ste(i as u16 + 1, 0x4000_0000);
            r.smmu.write_ste_offline(sid, ste).unwrap();
            r.smmu.resume().unwrap();
            expected_cmds += 4;
            r.model.with(|s| {
                assert_eq!(r.model.cached_ste(s, sid), Some(ste));
                assert_eq!(s.cmdq_prod, s.cmdq_cons);
            });
        }
        q.submit_sync(&[]).unwrap();
        expected_cmds += 1;
        r.model.with(|s| {
            assert_eq!(s.executed.len(), expected_cmds);
            for w in s.executed.windows(2) {
                assert_eq!(w[1].index, (w[0].index + 1) % 8, "no slot twice or skipped");
            }
            assert_eq!(s.power_losses, 33);
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        });
        assert_eq!(r.mem.allocations().len(), allocs, "no allocation per cycle");
        assert_eq!(r.smmu.event_overflows(), 0);
        let st = q.stats();
        assert_eq!(st.batches, st.owned);
        assert_eq!(r.smmu.gerror(), None);
    }

    #[test]
    fn power_cycles_with_the_internal_queue() {
        // Before install_cmd_queue the same calls work on the internal queue.
        let r = rig_with(small_idr(), None);
        r.smmu.reset().unwrap();
        for i in 0..5u16 {
            r.smmu
                .submit_sync(&[Command::TlbiS12Vmall { vmid: i }.encode()])
                .unwrap();
            r.smmu.suspend(|_| {}).unwrap();
            if i % 2 == 0 {
                r.smmu.simulate_power_loss();
            }
            r.smmu.resume().unwrap();
        }
        r.smmu.submit_sync(&[]).unwrap();
        r.model.with(|s| {
            assert_eq!(s.executed.len(), 4 + 5 * (2 + 4) + 1);
            for w in s.executed.windows(2) {
                assert_eq!(w[1].index, (w[0].index + 1) % 8);
            }
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        });
        // The lock-free queue can still take over after a resume.
        let q = r.smmu.install_cmd_queue(CmdqOptions::default()).unwrap();
        q.submit_sync(&[]).unwrap();
    }

    #[test]
    fn suspend_with_a_stalled_queue_is_a_timeout() {
        let r = rig_with(small_idr(), None);
        let q = installed(&r);
        r.model.with(|s| s.stall_cmdq = true);
        let lost = Command::TlbiS12Vmall { vmid: 9 };
        q.issue(&[lost.encode()], false).unwrap();
        assert!(r.model.inject_event(Event::bad_ste(3).raw));
        let mut seen = Vec::new();
        assert_eq!(
            r.smmu.suspend(|e| seen.push(e.sid)),
            Err(SmmuError::Timeout { reg: "CMDQ_CONS" })
        );
        // The rest of the quiesce was done all the same.
        assert_eq!(seen, vec![3]);
        r.model.with(|s| {
            assert_eq!(s.cr0ack, 0);
            assert_ne!(s.gbpa & (1 << 20), 0);
            s.stall_cmdq = false;
            s.executed.clear();
        });
        // Resume supersedes the stuck command (CFGI_ALL + TLBI_NSNH_ALL) and goes on after it.
        let pos = r.model.with(|s| s.cmdq_prod);
        r.smmu.resume().unwrap();
        assert_resume_invalidations(&r.model, pos, 3);
        q.submit_sync(&[]).unwrap();
        assert!(!cmds(&r.model).contains(&lost));
        no_violations(&r.model);
    }

    #[test]
    fn suspend_with_a_stuck_acknowledgement_is_an_error() {
        let r = rig_with(small_idr(), None);
        let q = installed(&r);
        r.model.with(|s| s.stuck_cr0ack = true);
        assert_eq!(
            r.smmu.suspend(|_| {}),
            Err(SmmuError::Timeout { reg: "CR0ACK" })
        );
        assert_eq!(r.smmu.resume(), Err(SmmuError::Timeout { reg: "CR0ACK" }));
        r.model.with(|s| s.stuck_cr0ack = false);
        r.smmu.resume().unwrap();
        q.submit_sync(&[]).unwrap();
        // A GBPA that never completes its update: translation is left on.
        r.model.with(|s| {
            s.stuck_gbpa = true;
            s.gbpa |= 1 << 31;
        });
        assert_eq!(
            r.smmu.suspend(|_| {}),
            Err(SmmuError::Timeout { reg: "GBPA" })
        );
        r.model.with(|s| assert_eq!(s.cr0ack, 0b1101));
        assert_eq!(r.smmu.resume(), Err(SmmuError::Timeout { reg: "GBPA" }));
        r.model.with(|s| {
            s.stuck_gbpa = false;
            s.gbpa &= !(1 << 31);
        });
        r.smmu.suspend(|_| {}).unwrap();
        r.smmu.resume().unwrap();
        q.submit_sync(&[]).unwrap();
        no_violations(&r.model);
    }

    #[test]
    fn suspend_skips_a_failed_command_and_reports_it() {
        let r = rig_with(small_idr(), None);
        let q = installed(&r);
        // Published without a sync, so nobody waits for it: the SMMU stops at it (index 4).
        q.issue(&[[0, 0], Command::TlbiS12Vmall { vmid: 5 }.encode()], false)
            .unwrap();
        r.model
            .with(|s| assert_eq!(s.errors, vec![(4, CERROR_ILL)]));
        assert_eq!(
            r.smmu.suspend(|_| {}),
            Err(SmmuError::CommandError {
                code: CERROR_ILL,
                index: 4
            })
        );
        r.model.with(|s| {
            assert_eq!(s.gerror, s.gerrorn, "acknowledged");
            assert_eq!(s.cr0ack, 0, "quiesced all the same");
            assert_eq!(s.cmdq_prod & 0xf, s.cmdq_cons & 0xf);
            assert_eq!(
                s.executed.last().unwrap().cmd,
                Command::TlbiS12Vmall { vmid: 5 }
            );
        });
        r.smmu.simulate_power_loss();
        r.smmu.resume().unwrap();
        q.submit_sync(&[Command::TlbiS12Vmall { vmid: 6 }.encode()])
            .unwrap();
        assert_eq!(r.smmu.gerror(), None);
        no_violations(&r.model);
    }

    #[test]
    fn write_ste_offline_before_reset_and_on_a_non_coherent_smmu() {
        let mut idr = QEMU_IDR;
        idr[0] &= !(1 << 4); // COHACC
        let r = rig_with(idr, None);
        let a = s2_ste(4, 0x4800_0000);
        // Before the first reset the SMMU is not enabled either; reset keeps the STE.
        r.smmu.write_ste_offline(0x0305, a).unwrap();
        assert!(r.model.with(|s| s.writes.is_empty()));
        assert!(r.mem.cleans.load(Ordering::Relaxed) > 0);
        r.smmu.reset().unwrap();
        r.model
            .with(|s| assert_eq!(r.model.cached_ste(s, 0x0305), Some(a)));
        r.smmu.suspend(|_| {}).unwrap();
        r.model.power_off();
        let before = r.mem.cleans.load(Ordering::Relaxed);
        r.smmu.write_ste_offline(0x0305, Ste::abort()).unwrap();
        r.smmu.write_ste_offline(0x0905, a).unwrap();
        // The new level-2 table, its descriptor and the STE; then the abort STE's.
        assert_eq!(r.mem.cleans.load(Ordering::Relaxed), before + 4);
        r.model.power_on();
        r.smmu.resume().unwrap();
        r.model.with(|s| {
            assert_eq!(r.model.cached_ste(s, 0x0305), Some(Ste::abort()));
            assert_eq!(r.model.cached_ste(s, 0x0905), Some(a));
            assert_eq!(s.cr1, 0x820, "NC, outer shareable");
        });
        assert_eq!(r.smmu.shadow_ste(0x0305), Ste::abort());
        no_violations(&r.model);
    }

    #[test]
    fn model_flags_irq_configuration_while_enabled() {
        let mut idr = small_idr();
        idr[0] |= 1 << 13; // MSI
        let r = rig_with(idr, None);
        r.smmu.reset().unwrap();
        no_violations(&r.model);
        r.model.write64(off::GERROR_IRQ_CFG0, 0);
        r.model.write64(off::EVENTQ_IRQ_CFG0, 0);
        assert_eq!(r.model.with(|s| s.violations.len()), 2);
        // Suspend, power loss and resume with MSIs: no violation.
        r.model.with(|s| s.violations.clear());
        r.smmu.suspend(|_| {}).unwrap();
        r.smmu.simulate_power_loss();
        r.smmu.resume().unwrap();
        r.smmu.suspend(|_| {}).unwrap();
        r.smmu.resume().unwrap();
        no_violations(&r.model);
        // Registers of an unpowered SMMU must not be touched.
        r.model.power_off();
        r.model.read32(off::CR0);
        assert_eq!(r.model.with(|s| s.violations.len()), 1);
    }
}
