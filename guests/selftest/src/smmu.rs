//! A small SMMUv3 driver, written the way an OS driver would program the SMMU it is given: the
//! physical one on bare QEMU, the hypervisor's emulated one in a VM (same register interface).
//!
//! It resets the SMMU (`CR0` off and acknowledged, `GBPA` abort, `CR1`/`CR2`, a linear stream
//! table sized for the highest stream ID it serves, a command queue and an event queue, then
//! `CR0` enables), writes stream table entries with the invalidate-then-update protocol, submits
//! commands (each batch ends with `CMD_SYNC` and is waited for by polling `CMDQ_CONS`), and
//! drains the event queue.
//!
//! Command queue: only the SMMU consumes it, and every batch is waited for, so after a batch the
//! queue is empty and CONS = PROD. The driver keeps that CONS cached and reads the register only
//! while waiting for a batch (or, if the cached value ever left too little room, before writing):
//! a batch costs one `CMDQ_PROD` write and, on an SMMU that completes `CMD_SYNC` by the time the
//! PROD write returns (the hypervisor's emulated one), one `CMDQ_CONS` read. A command error
//! (`GERROR.CMDQ_ERR`, `CMDQ_CONS.ERR`) is recovered from as Linux does: the bad command is
//! overwritten with a `CMD_SYNC`, the error acknowledged in `GERRORN`, and the queue resumes.
//! Everything is polled: the SMMU's interrupts are off (IRQ_CTRL = 0) except while `smmu-irq`
//! (`smmu_irq.rs`) checks them ([`Smmu::set_irq_ctrl`], [`Cmd::SyncIrq`]). The tables and
//! queues live in this guest's .bss (VA == IPA, Normal write-back memory); the SMMU is expected
//! to be cache-coherent (`IDR0.COHACC`, `dma-coherent` in the DT), as QEMU's is.
//!
//! Register and structure layouts: Arm IHI 0070 (SMMUv3), chapters 3, 4, 5 and 6.

use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};

use fdt::Fdt;

use crate::arch::wait_until;
use crate::pci::{dsb_sy, read32, write32, write64};
use crate::report::{Msg, ensure, fail};

/// Register offsets (page 0 unless noted).
mod reg {
    pub const IDR0: usize = 0x00;
    pub const IDR1: usize = 0x04;
    pub const IDR5: usize = 0x14;
    pub const CR0: usize = 0x20;
    pub const CR0ACK: usize = 0x24;
    pub const CR1: usize = 0x28;
    pub const CR2: usize = 0x2c;
    pub const GBPA: usize = 0x44;
    pub const IRQ_CTRL: usize = 0x50;
    pub const IRQ_CTRLACK: usize = 0x54;
    pub const GERROR_IRQ_CFG0: usize = 0x68;
    pub const GERROR: usize = 0x60;
    pub const GERRORN: usize = 0x64;
    pub const STRTAB_BASE: usize = 0x80;
    pub const STRTAB_BASE_CFG: usize = 0x88;
    pub const CMDQ_BASE: usize = 0x90;
    pub const CMDQ_PROD: usize = 0x98;
    pub const CMDQ_CONS: usize = 0x9c;
    pub const EVTQ_BASE: usize = 0xa0;
    pub const EVTQ_IRQ_CFG0: usize = 0xb0;
    /// Page 1.
    pub const EVTQ_PROD: usize = 0x1_00a8;
    pub const EVTQ_CONS: usize = 0x1_00ac;

    pub const IDR0_S2P: u32 = 1 << 0;
    pub const IDR0_S1P: u32 = 1 << 1;
    pub const IDR0_TTF_AA64: u32 = 2 << 2;
    pub const IDR1_PRESET: u32 = (1 << 30) | (1 << 29);
    pub const IDR5_GRAN4K: u32 = 1 << 4;

    pub const CR0_SMMUEN: u32 = 1 << 0;
    pub const CR0_EVTQEN: u32 = 1 << 2;
    pub const CR0_CMDQEN: u32 = 1 << 3;
    /// CR1: tables and queues inner shareable, inner/outer write-back.
    pub const CR1_ISH_WB: u32 = (3 << 10) | (1 << 8) | (1 << 6) | (3 << 4) | (1 << 2) | 1;
    /// CR2: private TLB maintenance (ignore broadcast TLBI), record invalid SIDs.
    pub const CR2_PTM_RECINVSID: u32 = (1 << 2) | (1 << 1);
    pub const GBPA_UPDATE: u32 = 1 << 31;
    pub const GBPA_ABORT: u32 = 1 << 20;
    pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
    pub const STRTAB_BASE_HI: usize = STRTAB_BASE + 4;
    /// Read/write allocate hint of the queue and table base registers.
    pub const BASE_RA: u64 = 1 << 62;
    pub const CMDQ_CONS_ERR_SHIFT: u32 = 24;
}

/// CMDQ_PROD/CMDQ_CONS index with its wrap bit.
const CMDQ_WRAP_MASK: u32 = (2 << CMDQ_LOG2) - 1;
pub const CMDQ_WRAP: u32 = CMDQ_WRAP_MASK;
pub const GERROR_CMDQ_ERR: u32 = reg::GERROR_CMDQ_ERR;
/// SMMU_IRQ_CTRL: GERROR_IRQEN and EVENTQ_IRQEN.
pub const IRQ_CTRL_GERROR: u32 = 1 << 0;
pub const IRQ_CTRL_EVENTQ: u32 = 1 << 2;

/// Stream table capacity: stream IDs 0..=255 (bus 0).
pub const MAX_STREAMS: usize = 256;
const CMDQ_LOG2: u32 = 8;
const EVTQ_LOG2: u32 = 9;
const CMDQ_ENTRIES: usize = 1 << CMDQ_LOG2;
const EVTQ_ENTRIES: usize = 1 << EVTQ_LOG2;
const TIMEOUT_MS: u64 = 1000;

/// Memory the SMMU reads or writes, as a static of this guest: accessed only through volatile
/// raw-pointer reads and writes, by vCPU 0 (the DMA checks run there only).
#[repr(C, align(16384))]
pub struct DmaMem<T>(UnsafeCell<T>);

// SAFETY: only vCPU 0 touches these, from the DMA checks; the device side is synchronised with
// barriers and the SMMU's own protocol (queue indices, CMD_SYNC).
unsafe impl<T> Sync for DmaMem<T> {}

impl<T> DmaMem<T> {
    pub const fn new(v: T) -> Self {
        DmaMem(UnsafeCell::new(v))
    }

    /// Its address: VA == IPA under the guest's identity map.
    pub fn addr(&self) -> usize {
        self.0.get() as usize
    }

    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

static STRTAB: DmaMem<[[u64; 8]; MAX_STREAMS]> = DmaMem::new([[0; 8]; MAX_STREAMS]);
static CMDQ: DmaMem<[[u64; 2]; CMDQ_ENTRIES]> = DmaMem::new([[0; 2]; CMDQ_ENTRIES]);
static EVTQ: DmaMem<[[u64; 4]; EVTQ_ENTRIES]> = DmaMem::new([[0; 4]; EVTQ_ENTRIES]);
/// The one context descriptor (S1CDMax = 0: no substreams).
static CD: DmaMem<[u64; 8]> = DmaMem::new([0; 8]);

/// Writes dword `i` of the 64-bit words at `p`.
///
/// # Safety
/// `p` must point into one of the statics above and `i` be in bounds.
unsafe fn put(p: *mut u64, i: usize, v: u64) {
    // SAFETY: per the caller.
    unsafe { write_volatile(p.add(i), v) }
}

/// A command (IHI 0070 §4).
#[derive(Clone, Copy)]
pub enum Cmd {
    CfgiSte {
        sid: u32,
    },
    CfgiAll,
    CfgiCd {
        sid: u32,
    },
    /// Invalidate the stage-1 entries for `va` of `asid` (VMID 0: no stage 2 from this guest's
    /// point of view).
    TlbiNhVa {
        asid: u16,
        va: u64,
    },
    TlbiNhAsid {
        asid: u16,
    },
    TlbiNsnhAll,
    Sync,
    /// `CMD_SYNC` with CS = SIG_IRQ: completion also raises the cmdq-sync interrupt.
    SyncIrq,
}

impl Cmd {
    /// The command's two dwords.
    pub fn encode_raw(self) -> [u64; 2] {
        self.encode()
    }

    fn encode(self) -> [u64; 2] {
        match self {
            Cmd::CfgiSte { sid } => [0x03 | (u64::from(sid) << 32), 1],
            Cmd::CfgiAll => [0x04, 31],
            Cmd::CfgiCd { sid } => [0x05 | (u64::from(sid) << 32), 1],
            Cmd::TlbiNhVa { asid, va } => [0x12 | (u64::from(asid) << 48), (va & !0xfff) | 1],
            Cmd::TlbiNhAsid { asid } => [0x11 | (u64::from(asid) << 48), 0],
            Cmd::TlbiNsnhAll => [0x30, 0],
            // CS = 0: completion is seen by CMDQ_CONS passing it.
            Cmd::Sync => [0x46, 0],
            // CS (bits 13:12) = 0b01, SIG_IRQ.
            Cmd::SyncIrq => [0x46 | (1 << 12), 0],
        }
    }
}

/// `CMDQ_CONS.ERR` for an illegal command.
pub const CERROR_ILL: u32 = 1;

/// Why a batch was not consumed.
#[derive(Clone, Copy)]
pub enum QueueStop {
    /// `GERROR.CMDQ_ERR` became active: `cons` (index and wrap bit) points at the bad command,
    /// `code` is `CMDQ_CONS.ERR`.
    Error { cons: u32, code: u32 },
    /// Neither consumed nor an error within the timeout: CONS as last read.
    Timeout { cons: u32 },
}

impl core::fmt::Display for QueueStop {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            QueueStop::Error { cons, code } => {
                write!(f, "command queue error {code:#x} at CONS {cons:#x}")
            }
            QueueStop::Timeout { cons } => write!(f, "commands not consumed: CONS {cons:#x}"),
        }
    }
}

/// Event IDs (IHI 0070 §7.3).
pub const C_BAD_STE: u8 = 0x04;
pub const F_CD_FETCH: u8 = 0x09;
pub const F_TRANSLATION: u8 = 0x10;

/// An event record.
#[derive(Clone, Copy, Default)]
pub struct Event {
    pub raw: [u64; 4],
}

impl Event {
    pub fn id(&self) -> u8 {
        self.raw[0] as u8
    }
    pub fn sid(&self) -> u32 {
        (self.raw[0] >> 32) as u32
    }
    /// The input address of a translation-class fault.
    pub fn addr(&self) -> u64 {
        self.raw[2]
    }
    /// Whether the faulting access was a read.
    pub fn is_read(&self) -> bool {
        self.raw[1] & (1 << 35) != 0
    }
}

impl core::fmt::Display for Event {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "event {:#x} sid={:#x} addr={:#x} {}",
            self.id(),
            self.sid(),
            self.addr(),
            if self.is_read() { "read" } else { "write" }
        )
    }
}

/// Where the DT says the SMMU is: `(base, phandle)`.
pub fn from_dt(fdt: &Fdt<'_>) -> Result<(usize, Option<u32>), Msg> {
    let Some(node) = fdt.find_compatible(&["arm,smmu-v3"]) else {
        fail!("no arm,smmu-v3 node in the DT");
    };
    let Some(reg) = node.reg().and_then(|mut r| r.next()) else {
        fail!("{}: no usable reg", node.name);
    };
    ensure!(
        reg.size.unwrap_or(0) >= 0x2_0000,
        "{}: reg is smaller than the two 64 KiB register pages",
        node.name
    );
    let phandle = node
        .property("phandle")
        .or_else(|| node.property("linux,phandle"))
        .and_then(|p| p.as_usize())
        .map(|p| p as u32);
    Ok((reg.starting_address as usize, phandle))
}

/// The driver state.
pub struct Smmu {
    base: usize,
    /// IDR5.OAS: the output address size, also what CDs put in IPS.
    oas: u64,
    /// CMDQ_PROD as last written (index and wrap bit).
    cmd_prod: u32,
    /// CMDQ_CONS (index and wrap bit) as last read: only the SMMU moves it, and only forward,
    /// so the free space it implies is never more than the real one.
    cmd_cons: u32,
    /// Streams the stream table has entries for.
    streams: u32,
}

impl Smmu {
    fn read(&self, off: usize) -> u32 {
        // SAFETY: a 32-bit register of the SMMU the DT describes (Device memory in the boot
        // map); reading it has no memory side effects.
        unsafe { read32(self.base + off) }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: a 32-bit SMMU register; the values written point the SMMU only at this
        // driver's own statics.
        unsafe { write32(self.base + off, v) }
    }

    fn write64(&self, off: usize, v: u64) {
        // SAFETY: as in `write`, for the 64-bit base registers.
        unsafe { write64(self.base + off, v) }
    }

    /// Writes CR0 and waits for CR0ACK to match.
    fn set_cr0(&self, v: u32) -> Result<(), Msg> {
        self.write(reg::CR0, v);
        ensure!(
            wait_until(TIMEOUT_MS, || self.read(reg::CR0ACK) == v),
            "CR0ACK = {:#x}, want {v:#x}",
            self.read(reg::CR0ACK)
        );
        Ok(())
    }

    /// Resets the SMMU at `base` for stream IDs `0..streams` and enables it, with every stream
    /// aborting until [`Smmu::set_ste`] gives it an entry.
    pub fn reset(base: usize, streams: u32) -> Result<Self, Msg> {
        ensure!(
            (1..=MAX_STREAMS as u32).contains(&streams),
            "stream ID {} is beyond this driver's {MAX_STREAMS}-entry stream table",
            streams.saturating_sub(1)
        );
        let mut smmu = Smmu {
            base,
            oas: 0,
            cmd_prod: 0,
            cmd_cons: 0,
            streams,
        };
        let idr0 = smmu.read(reg::IDR0);
        let idr1 = smmu.read(reg::IDR1);
        let idr5 = smmu.read(reg::IDR5);
        ensure!(
            idr0 & reg::IDR0_S1P != 0 && idr0 & reg::IDR0_TTF_AA64 != 0,
            "IDR0 = {idr0:#x}: no AArch64 stage-1 translation"
        );
        ensure!(
            idr5 & reg::IDR5_GRAN4K != 0,
            "IDR5 = {idr5:#x}: no 4K granule"
        );
        ensure!(
            idr1 & reg::IDR1_PRESET == 0,
            "IDR1 = {idr1:#x}: preset tables/queues are not supported"
        );
        let sid_bits = idr1 & 0x3f;
        let log2 = streams.next_power_of_two().trailing_zeros();
        ensure!(
            log2 <= sid_bits,
            "IDR1.SIDSIZE = {sid_bits}: stream ID {} is too large",
            streams - 1
        );
        let cmdqs = (idr1 >> 21) & 0x1f;
        let evtqs = (idr1 >> 16) & 0x1f;
        ensure!(
            cmdqs >= CMDQ_LOG2 && evtqs >= EVTQ_LOG2,
            "IDR1 = {idr1:#x}: queues smaller than 2^{CMDQ_LOG2}/2^{EVTQ_LOG2} entries"
        );
        // 52-bit output needs more than this driver does: cap IPS at 48 bits.
        smmu.oas = u64::from(idr5 & 7).min(5);

        // 1. Off, acknowledged; incoming traffic aborts while the SMMU is off.
        smmu.set_cr0(0)?;
        smmu.write(reg::GBPA, reg::GBPA_UPDATE | reg::GBPA_ABORT);
        ensure!(
            wait_until(TIMEOUT_MS, || smmu.read(reg::GBPA) & reg::GBPA_UPDATE == 0),
            "GBPA update did not complete"
        );
        let gerror = smmu.read(reg::GERROR);
        smmu.write(reg::GERRORN, gerror);
        smmu.write(reg::IRQ_CTRL, 0);
        // 2. Attributes of table and queue accesses; PTM, RECINVSID.
        smmu.write(reg::CR1, reg::CR1_ISH_WB);
        smmu.write(reg::CR2, reg::CR2_PTM_RECINVSID);
        // 3. Linear stream table, every entry invalid (STE.V = 0: the stream aborts).
        for sid in 0..MAX_STREAMS {
            for i in 0..8 {
                // SAFETY: in bounds of STRTAB.
                unsafe { put(STRTAB.ptr().cast::<u64>(), sid * 8 + i, 0) };
            }
        }
        dsb_sy();
        smmu.write64(reg::STRTAB_BASE, reg::BASE_RA | STRTAB.addr() as u64);
        smmu.write(reg::STRTAB_BASE_CFG, log2.max(1));
        // 4. Command queue, then flush any cached configuration and TLB entries.
        smmu.write64(
            reg::CMDQ_BASE,
            reg::BASE_RA | CMDQ.addr() as u64 | u64::from(CMDQ_LOG2),
        );
        smmu.write(reg::CMDQ_PROD, 0);
        smmu.write(reg::CMDQ_CONS, 0);
        smmu.set_cr0(reg::CR0_CMDQEN)?;
        smmu.submit(&[Cmd::CfgiAll])?;
        smmu.submit(&[Cmd::TlbiNsnhAll])?;
        // 5. Event queue.
        smmu.write64(
            reg::EVTQ_BASE,
            reg::BASE_RA | EVTQ.addr() as u64 | u64::from(EVTQ_LOG2),
        );
        smmu.write(reg::EVTQ_PROD, 0);
        smmu.write(reg::EVTQ_CONS, 0);
        smmu.set_cr0(reg::CR0_CMDQEN | reg::CR0_EVTQEN)?;
        // 6. Translation on.
        smmu.set_cr0(reg::CR0_CMDQEN | reg::CR0_EVTQEN | reg::CR0_SMMUEN)?;
        Ok(smmu)
    }

    /// Whether the SMMU implements stage 2 (IDR0.S2P): then STEs with Config = S2 or nested
    /// are legal.
    pub fn has_s2(&self) -> bool {
        self.read(reg::IDR0) & reg::IDR0_S2P != 0
    }

    /// The IPS field for context descriptors.
    pub fn ips(&self) -> u64 {
        self.oas
    }

    /// Submits `cmds` followed by `CMD_SYNC` and waits until the SMMU has consumed them all.
    /// On a command error the queue is recovered ([`Smmu::skip_error`]) and the error returned.
    pub fn submit(&mut self, cmds: &[Cmd]) -> Result<(), Msg> {
        let mut raw = [[0u64; 2]; 16];
        ensure!(cmds.len() < raw.len(), "batch of {} commands", cmds.len());
        for (r, &c) in raw.iter_mut().zip(cmds.iter().chain(&[Cmd::Sync])) {
            *r = c.encode();
        }
        match self.submit_raw(&raw[..=cmds.len()]) {
            Ok(()) => Ok(()),
            Err(stop @ QueueStop::Error { .. }) => {
                let recovered = self.skip_error();
                match recovered {
                    Ok(()) => fail!("{stop} (skipped)"),
                    Err(e) => fail!("{stop}; recovery: {e}"),
                }
            }
            Err(stop) => fail!("{stop}, PROD {:#x}", self.cmd_prod),
        }
    }

    /// Writes `cmds` (raw dwords, as given: the caller ends the batch with a `CMD_SYNC`) into
    /// the command queue with one `CMDQ_PROD` write and waits until the SMMU has consumed them
    /// or stopped at an error.
    pub fn submit_raw(&mut self, cmds: &[[u64; 2]]) -> Result<(), QueueStop> {
        let n = cmds.len() as u32;
        if n > CMDQ_ENTRIES as u32 {
            return Err(QueueStop::Timeout {
                cons: self.cmd_cons,
            });
        }
        // Room from the cached CONS; read the register only when that is not enough (never, as
        // long as every batch is waited for).
        let free =
            |cons: u32, prod: u32| CMDQ_ENTRIES as u32 - (prod.wrapping_sub(cons) & CMDQ_WRAP_MASK);
        if free(self.cmd_cons, self.cmd_prod) < n {
            let prod = self.cmd_prod;
            let mut cons = self.cmd_cons;
            let room = wait_until(TIMEOUT_MS, || {
                cons = self.read(reg::CMDQ_CONS) & CMDQ_WRAP_MASK;
                free(cons, prod) >= n
            });
            self.cmd_cons = cons;
            if !room {
                return Err(QueueStop::Timeout { cons });
            }
        }
        for &[d0, d1] in cmds {
            let slot = (self.cmd_prod as usize) & (CMDQ_ENTRIES - 1);
            // SAFETY: `slot` is in bounds of CMDQ; the SMMU has consumed this slot (the free
            // space was checked above).
            unsafe {
                put(CMDQ.ptr().cast::<u64>(), slot * 2, d0);
                put(CMDQ.ptr().cast::<u64>(), slot * 2 + 1, d1);
            }
            self.cmd_prod = (self.cmd_prod + 1) & CMDQ_WRAP_MASK;
        }
        dsb_sy();
        self.write(reg::CMDQ_PROD, self.cmd_prod);
        self.wait_consumed()
    }

    /// Polls CMDQ_CONS until it reaches the cached PROD (one read when the SMMU is done by then)
    /// or a command error is active.
    fn wait_consumed(&mut self) -> Result<(), QueueStop> {
        let prod = self.cmd_prod;
        let mut cons = self.cmd_cons;
        let mut error = false;
        let done = wait_until(TIMEOUT_MS, || {
            cons = self.read(reg::CMDQ_CONS);
            if cons & CMDQ_WRAP_MASK == prod {
                return true;
            }
            error = self.gerror() & reg::GERROR_CMDQ_ERR != 0;
            error
        });
        if error {
            // CONS as of the error: the bad command.
            cons = self.read(reg::CMDQ_CONS);
            self.cmd_cons = cons & CMDQ_WRAP_MASK;
            return Err(QueueStop::Error {
                cons: cons & CMDQ_WRAP_MASK,
                code: (cons >> reg::CMDQ_CONS_ERR_SHIFT) & 0x7f,
            });
        }
        self.cmd_cons = cons & CMDQ_WRAP_MASK;
        if done {
            Ok(())
        } else {
            Err(QueueStop::Timeout {
                cons: self.cmd_cons,
            })
        }
    }

    /// Recovers from an active command error as Linux does (`arm_smmu_cmdq_skip_err`): the
    /// command at CONS is replaced by a `CMD_SYNC`, `GERROR.CMDQ_ERR` is acknowledged in
    /// `GERRORN`, and the SMMU goes on from CONS; waits until the queue is drained.
    pub fn skip_error(&mut self) -> Result<(), Msg> {
        let gerror = self.read(reg::GERROR);
        let gerrorn = self.read(reg::GERRORN);
        ensure!(
            (gerror ^ gerrorn) & reg::GERROR_CMDQ_ERR != 0,
            "no command queue error to skip (GERROR {gerror:#x}, GERRORN {gerrorn:#x})"
        );
        let cons = self.read(reg::CMDQ_CONS) & CMDQ_WRAP_MASK;
        let slot = (cons as usize) & (CMDQ_ENTRIES - 1);
        let [d0, d1] = Cmd::Sync.encode();
        // SAFETY: in bounds of CMDQ; the SMMU is stopped at this slot until the error is
        // acknowledged below.
        unsafe {
            put(CMDQ.ptr().cast::<u64>(), slot * 2, d0);
            put(CMDQ.ptr().cast::<u64>(), slot * 2 + 1, d1);
        }
        dsb_sy();
        self.cmd_cons = cons;
        self.write(
            reg::GERRORN,
            (gerrorn & !reg::GERROR_CMDQ_ERR) | (gerror & reg::GERROR_CMDQ_ERR),
        );
        match self.wait_consumed() {
            Ok(()) => Ok(()),
            Err(stop) => fail!("after skipping the command at {cons:#x}: {stop}"),
        }
    }

    /// STRTAB_BASE (read as two 32-bit halves) and STRTAB_BASE_CFG.
    pub fn strtab_regs(&self) -> (u64, u32) {
        let lo = u64::from(self.read(reg::STRTAB_BASE));
        let hi = u64::from(self.read(reg::STRTAB_BASE_HI));
        (hi << 32 | lo, self.read(reg::STRTAB_BASE_CFG))
    }

    /// Writes STRTAB_BASE (one 64-bit write, then a 32-bit write to its low half) and
    /// STRTAB_BASE_CFG, as a guest that tries to move its stream table would.
    ///
    /// # Safety
    /// Unless the SMMU ignores the writes (it is enabled and implements the SMMUv3.2 rule), it
    /// takes its stream table from `base` afterwards, which must then be a stream table.
    pub unsafe fn write_strtab_regs(&self, base: u64, cfg: u32) {
        self.write64(reg::STRTAB_BASE, base);
        self.write(reg::STRTAB_BASE, base as u32);
        self.write(reg::STRTAB_BASE_CFG, cfg);
    }

    /// Replaces the stream table entry of `sid`: invalidate it (V = 0) and sync, write the other
    /// dwords, then dword 0, and sync again.
    pub fn set_ste(&mut self, sid: u32, ste: [u64; 8]) -> Result<(), Msg> {
        ensure!(sid < self.streams, "stream ID {sid:#x} has no entry");
        // SAFETY: `sid` < streams <= MAX_STREAMS, so every index is in bounds of STRTAB.
        let p = unsafe { STRTAB.ptr().cast::<u64>().add(sid as usize * 8) };
        // SAFETY: in bounds (above).
        unsafe { put(p, 0, 0) };
        dsb_sy();
        self.submit(&[Cmd::CfgiSte { sid }])?;
        for (i, &v) in ste.iter().enumerate().skip(1) {
            // SAFETY: in bounds (above).
            unsafe { put(p, i, v) };
        }
        dsb_sy();
        // SAFETY: in bounds (above).
        unsafe { put(p, 0, ste[0]) };
        dsb_sy();
        self.submit(&[Cmd::CfgiSte { sid }])
    }

    /// Writes the context descriptor; with `live_sid`, also invalidates its cached copy.
    pub fn set_cd(&mut self, cd: [u64; 8], live_sid: Option<u32>) -> Result<(), Msg> {
        for (i, &v) in cd.iter().enumerate() {
            // SAFETY: in bounds of CD.
            unsafe { put(CD.ptr().cast::<u64>(), i, v) };
        }
        dsb_sy();
        match live_sid {
            Some(sid) => self.submit(&[Cmd::CfgiCd { sid }]),
            None => Ok(()),
        }
    }

    /// The address of the context descriptor, for [`ste_s1`].
    pub fn cd_addr(&self) -> u64 {
        CD.addr() as u64
    }

    /// Takes every pending event out of the event queue, calling `each` on it. Returns the
    /// number of events and whether the queue had overflowed.
    pub fn drain_events(&mut self, mut each: impl FnMut(&Event)) -> (usize, bool) {
        let wrap_mask = (2 << EVTQ_LOG2) - 1;
        let prod = self.read(reg::EVTQ_PROD);
        let overflow = (prod ^ self.read(reg::EVTQ_CONS)) & (1 << 31) != 0;
        dsb_sy();
        let mut cons = self.read(reg::EVTQ_CONS) & wrap_mask;
        let mut n = 0;
        while cons != prod & wrap_mask {
            let slot = (cons as usize) & (EVTQ_ENTRIES - 1);
            let mut ev = Event::default();
            for (i, d) in ev.raw.iter_mut().enumerate() {
                // SAFETY: in bounds of EVTQ; the SMMU wrote this record before moving PROD.
                *d = unsafe { read_volatile(EVTQ.ptr().cast::<u64>().add(slot * 4 + i)) };
            }
            each(&ev);
            n += 1;
            cons = (cons + 1) & wrap_mask;
        }
        // Hand the slots back; acknowledge an overflow by copying its flag.
        self.write(reg::EVTQ_CONS, cons | (prod & (1 << 31)));
        (n, overflow)
    }

    /// Sets SMMU_IRQ_CTRL to `irqen` ([`IRQ_CTRL_GERROR`], [`IRQ_CTRL_EVENTQ`]) and waits for
    /// IRQ_CTRLACK. Interrupts go out as wired interrupts: before enabling, the MSI addresses
    /// (`*_IRQ_CFG0`) are cleared with both sources disabled.
    pub fn set_irq_ctrl(&self, irqen: u32) -> Result<(), Msg> {
        for v in [0, irqen] {
            self.write(reg::IRQ_CTRL, v);
            ensure!(
                wait_until(TIMEOUT_MS, || self.read(reg::IRQ_CTRLACK) == v),
                "IRQ_CTRLACK = {:#x}, want {v:#x}",
                self.read(reg::IRQ_CTRLACK)
            );
            if v == 0 {
                self.write64(reg::GERROR_IRQ_CFG0, 0);
                self.write64(reg::EVTQ_IRQ_CFG0, 0);
            }
        }
        Ok(())
    }

    /// GERROR as read (errors toggle it).
    pub fn gerror_raw(&self) -> u32 {
        self.read(reg::GERROR)
    }

    /// CMDQ_PROD as last written (index and wrap bit).
    pub fn cmdq_prod(&self) -> u32 {
        self.cmd_prod
    }

    /// Active global errors (GERROR ^ GERRORN).
    pub fn gerror(&self) -> u32 {
        self.read(reg::GERROR) ^ self.read(reg::GERRORN)
    }
}

/// STE.Config values.
const STE_V: u64 = 1;
const STE_CFG_BYPASS: u64 = 0b100 << 1;
const STE_CFG_S1: u64 = 0b101 << 1;
/// STE dword 1: CD fetches inner/outer write-back, inner shareable; SHCFG = use incoming.
const STE_1_CD_WB_ISH: u64 = (1 << 2) | (1 << 4) | (3 << 6);
const STE_1_SHCFG_INCOMING: u64 = 1 << 44;

/// An STE that translates the stream with stage 1 through the single CD at `cd`.
pub fn ste_s1(cd: u64) -> [u64; 8] {
    let mut ste = [0; 8];
    ste[0] = STE_V | STE_CFG_S1 | (cd & 0x000f_ffff_ffff_ffc0);
    ste[1] = STE_1_CD_WB_ISH | STE_1_SHCFG_INCOMING;
    ste
}

/// An STE that lets the stream bypass (the guest's) translation.
pub fn ste_bypass() -> [u64; 8] {
    let mut ste = [0; 8];
    ste[0] = STE_V | STE_CFG_BYPASS;
    ste[1] = STE_1_SHCFG_INCOMING;
    ste
}

/// Stage-1 geometry: 4 KiB granule, 39-bit input (T0SZ = 25), walks start at level 1.
pub const S1_T0SZ: u64 = 25;
/// MAIR: attr 0 = Normal write-back, attr 1 = Device-nGnRE.
const S1_MAIR: u64 = 0x04ff;

/// A context descriptor: AArch64 tables at `ttb0`, TT1 disabled, faults recorded (R) and
/// aborted (A), `asid`, output size `ips`.
pub fn cd_s1(ttb0: u64, asid: u16, ips: u64) -> [u64; 8] {
    let mut cd = [0; 8];
    // TG0 (bits 7:6) = 0: 4 KiB granule.
    cd[0] = S1_T0SZ
        | (1 << 8) // IRGN0 = write-back
        | (1 << 10) // ORGN0 = write-back
        | (3 << 12) // SH0 = inner shareable
        | (1 << 30) // EPD1: no TTB1 walks
        | (1 << 31) // V
        | (ips << 32)
        | (1 << 41) // AA64
        | (1 << 45) // R: record faults
        | (1 << 46) // A: abort faulting transactions
        | (u64::from(asid) << 48);
    cd[1] = ttb0 & 0x000f_ffff_ffff_fff0;
    cd[3] = S1_MAIR;
    cd
}

/// A stage-1 page table for one 2 MiB IOVA region, 4 KiB pages: a level-1 table, one level-2
/// table and one level-3 table, all in this guest's RAM.
#[repr(C, align(4096))]
pub struct IoPageTable {
    l1: [u64; 512],
    l2: [u64; 512],
    l3: [u64; 512],
}

/// Table descriptor, and page descriptor: Normal (AttrIndx, bits 4:2, = 0), AP = read/write at
/// any privilege, inner shareable, AF set, not global (the ASID matters for invalidation).
const DESC_TABLE: u64 = 0b11;
const DESC_PAGE: u64 = 0b11 | (1 << 6) | (3 << 8) | (1 << 10) | (1 << 11);
const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

impl IoPageTable {
    pub const fn new() -> Self {
        IoPageTable {
            l1: [0; 512],
            l2: [0; 512],
            l3: [0; 512],
        }
    }

    fn index(iova: u64, level: u32) -> usize {
        ((iova >> (12 + 9 * (3 - level))) & 0x1ff) as usize
    }

    /// Sets up the tables for the 2 MiB region holding `base` (all pages unmapped).
    ///
    /// # Safety
    /// `t` must point to an `IoPageTable` that no SMMU walks at the moment.
    pub unsafe fn init(t: *mut Self, base: u64) {
        // SAFETY: per the caller, `t` is valid and not in use; raw-pointer field projections.
        unsafe {
            let l1 = &raw mut (*t).l1;
            let l2 = &raw mut (*t).l2;
            let l3 = &raw mut (*t).l3;
            for i in 0..512 {
                put(l1.cast(), i, 0);
                put(l2.cast(), i, 0);
                put(l3.cast(), i, 0);
            }
            put(l1.cast(), Self::index(base, 1), l2 as u64 | DESC_TABLE);
            put(l2.cast(), Self::index(base, 2), l3 as u64 | DESC_TABLE);
        }
        dsb_sy();
    }

    /// Maps the page at `iova` (inside the region) to `pa`, or unmaps it (`None`). The caller
    /// invalidates the SMMU's TLB after an unmap.
    ///
    /// # Safety
    /// `t` must point to an initialised `IoPageTable`.
    pub unsafe fn set(t: *mut Self, iova: u64, pa: Option<u64>) {
        let desc = pa.map_or(0, |pa| (pa & ADDR_MASK) | DESC_PAGE);
        // SAFETY: per the caller; the index is below 512.
        unsafe { put((&raw mut (*t).l3).cast(), Self::index(iova, 3), desc) };
        dsb_sy();
    }

    /// The level-1 table, for TTB0.
    ///
    /// # Safety
    /// `t` must point to an `IoPageTable`.
    pub unsafe fn root(t: *mut Self) -> u64 {
        // SAFETY: per the caller; only the address is taken.
        unsafe { (&raw mut (*t).l1) as u64 }
    }
}
