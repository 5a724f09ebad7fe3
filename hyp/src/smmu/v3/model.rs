//! Test only: a register-level model of an SMMUv3, good enough to run the driver on the host.
//!
//! [`HostDma`] hands out host memory as "physical" memory (address = pointer). [`SmmuModel`]
//! implements [`SmmuMmio`]: CR0/CR0ACK, GBPA's UPDATE handshake, IRQ_CTRL/ACK, GERROR/GERRORN,
//! the stream-table and queue registers. Writing CMDQ_PROD makes it consume the command queue
//! from host memory at once (as QEMU does): every command is decoded with
//! [`Command::decode`]; illegal ones (or ones the model's IDR0 stages forbid, or opcodes a test
//! marks illegal) stop the queue with CMDQ_CONS.ERR = CERROR_ILL and GERROR.CMDQ_ERR, which
//! acknowledging GERRORN (or writing PROD) resumes; as in QEMU, CMDQ_CONS.ERR then stays set
//! (stale) until the next error overwrites it. Each executed command is logged, with — for
//! `CMD_CFGI_STE` and `CMD_SYNC` — a snapshot of the STE a test watches, read through the stream
//! table the way the SMMU would walk it: that is how the tests check the order of STE writes
//! against invalidations. [`SmmuModel::inject_event`] writes event records into the event queue
//! (with overflow). Knobs: a stuck CR0ACK or GBPA.UPDATE, a stalled command queue.
//!
//! The model also records *violations*: register writes the architecture forbids in the current
//! state (CR1/CR2/STRTAB_* while SMMUEN = 1, CMDQ_BASE/CONS while CMDQEN = 1, an IRQ_CFG0 while
//! its interrupt is enabled, …), so tests can assert the driver never makes them.
//!
//! Power: [`SmmuModel::power_off`] loses every register (they read as their reset values after
//! [`SmmuModel::power_on`]; [`SmmuModel::power_cycle`] does both) and the configuration cache;
//! while off, any register access is a violation. The configuration cache
//! ([`SmmuModel::cached_ste`]: the STE a transaction would use) is filled on use and emptied by
//! `CMD_CFGI_STE`/`CMD_CFGI_STE_RANGE`/`CMD_CFGI_ALL` and by power loss, never by disabling the
//! SMMU, as the architecture allows: a driver that forgets to invalidate sees stale STEs.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::BTreeMap;
use std::format;
use std::string::String;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::vec::Vec;

use super::cmd::{CmdError, Command};
use super::driver::{DmaPages, SmmuMmio};
use super::event::EVENT_BYTES;
use super::regs::{self, GERROR_CMDQ_ERR, Q_OVF, off};
use super::ste::{L1Desc, STE_BYTES, Ste};

/// Host memory handed out as DMA memory. Freed when the last owner drops it.
pub(crate) struct HostDma {
    allocs: Mutex<Vec<(u64, Layout)>>,
    /// Calls to `clean`.
    pub cleans: AtomicUsize,
    /// Fail allocations once this many have been made (`usize::MAX`: never).
    pub fail_after: AtomicUsize,
}

impl HostDma {
    pub(crate) fn new() -> HostDma {
        HostDma {
            allocs: Mutex::new(Vec::new()),
            cleans: AtomicUsize::new(0),
            fail_after: AtomicUsize::new(usize::MAX),
        }
    }

    /// Panics unless `[addr, addr + len)` lies inside one allocation.
    fn check(&self, addr: u64, len: usize) {
        let a = self.allocs.lock().unwrap();
        assert!(
            a.iter()
                .any(|&(b, l)| addr >= b && addr + len as u64 <= b + l.size() as u64),
            "model access outside DMA memory: {addr:#x}+{len}"
        );
    }

    pub(crate) fn read_u64(&self, addr: u64) -> u64 {
        self.check(addr, 8);
        // SAFETY: `check` proved the 8 bytes lie in a live allocation of ours (freed only on
        // drop); the address is 8-byte aligned (all SMMU structures are).
        u64::from_le(unsafe { core::ptr::read_volatile(addr as *const u64) })
    }

    pub(crate) fn write_u64(&self, addr: u64, v: u64) {
        self.check(addr, 8);
        // SAFETY: as in `read_u64`.
        unsafe { core::ptr::write_volatile(addr as *mut u64, v.to_le()) }
    }

    /// Allocations made so far: (address, bytes).
    pub(crate) fn allocations(&self) -> Vec<(u64, usize)> {
        let a = self.allocs.lock().unwrap();
        a.iter().map(|&(b, l)| (b, l.size())).collect()
    }
}

// SAFETY: `alloc_zeroed` returns fresh, zeroed, suitably aligned host allocations that live until
// the `HostDma` drops (after every driver and model holding it); on the host, "physical" is the
// pointer value, and the CPU (the test) and the model (the "SMMU") both access it there.
unsafe impl DmaPages for HostDma {
    fn alloc_zeroed(&self, bytes: usize, align: usize) -> Option<u64> {
        let mut a = self.allocs.lock().unwrap();
        if a.len() >= self.fail_after.load(Ordering::Relaxed) {
            return None;
        }
        let layout = Layout::from_size_align(bytes, align).ok()?;
        // SAFETY: `bytes` is non-zero (the driver never asks for less than 64).
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        a.push((p as u64, layout));
        Some(p as u64)
    }

    fn clean(&self, pa: u64, len: usize) {
        self.check(pa, len);
        self.cleans.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for HostDma {
    fn drop(&mut self) {
        for &(p, l) in self.allocs.get_mut().unwrap().iter() {
            // SAFETY: allocated above with this layout, freed once.
            unsafe { dealloc(p as *mut u8, l) };
        }
    }
}

/// One command the model executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Executed {
    pub cmd: Command,
    /// Queue index it was read from.
    pub index: u32,
    /// For CFGI_STE and SYNC: the watched StreamID's STE as the SMMU would fetch it then
    /// (`None`: unreachable).
    pub ste: Option<Ste>,
    /// Register writes made before it (its position in `writes`).
    pub at_write: usize,
}

/// Model registers and knobs (public to the tests).
pub(crate) struct ModelState {
    pub idr: [u32; 6],
    pub cr0: u32,
    pub cr0ack: u32,
    pub cr1: u32,
    pub cr2: u32,
    pub gbpa: u32,
    pub irq_ctrl: u32,
    pub irq_ctrlack: u32,
    pub gerror: u32,
    pub gerrorn: u32,
    pub gerror_irq_cfg0: u64,
    pub eventq_irq_cfg0: u64,
    pub strtab_base: u64,
    pub strtab_base_cfg: u32,
    pub cmdq_base: u64,
    pub cmdq_prod: u32,
    pub cmdq_cons: u32,
    pub eventq_base: u64,
    pub eventq_prod: u32,
    pub eventq_cons: u32,
    /// CR0ACK never follows CR0.
    pub stuck_cr0ack: bool,
    /// GBPA.UPDATE never clears.
    pub stuck_gbpa: bool,
    /// The command queue is never consumed.
    pub stall_cmdq: bool,
    /// Opcodes the model treats as illegal (besides what `Command::decode` rejects).
    pub illegal_ops: Vec<u8>,
    /// Fail the command at this queue index once with this CERROR code.
    pub fail_once_at: Option<(u32, u8)>,
    /// StreamID whose STE is snapshotted at every CFGI_STE / SYNC.
    pub watch_sid: Option<u32>,
    /// Every register write, in order: (offset, value).
    pub writes: Vec<(u64, u64)>,
    /// Every command executed, in order.
    pub executed: Vec<Executed>,
    /// Command errors raised: (index, code).
    pub errors: Vec<(u32, u8)>,
    /// Forbidden register writes.
    pub violations: Vec<String>,
    /// The power domain is on.
    pub powered: bool,
    /// Times the power went off.
    pub power_losses: u32,
    /// Cached STEs by StreamID (the configuration cache).
    pub ste_cache: BTreeMap<u32, Ste>,
}

impl ModelState {
    /// Every register at its reset value (QEMU's), as after power-on.
    fn reset_registers(&mut self) {
        self.cr0 = 0;
        self.cr0ack = 0;
        self.cr1 = 0;
        self.cr2 = 0;
        self.gbpa = GBPA_RESET;
        self.irq_ctrl = 0;
        self.irq_ctrlack = 0;
        self.gerror = 0;
        self.gerrorn = 0;
        self.gerror_irq_cfg0 = 0;
        self.eventq_irq_cfg0 = 0;
        self.strtab_base = 0;
        self.strtab_base_cfg = 0;
        self.cmdq_base = 0;
        self.cmdq_prod = 0;
        self.cmdq_cons = 0;
        self.eventq_base = 0;
        self.eventq_prod = 0;
        self.eventq_cons = 0;
    }
}

/// The model SMMU.
pub(crate) struct SmmuModel {
    pub st: Mutex<ModelState>,
    pub mem: std::sync::Arc<HostDma>,
}

/// QEMU 10 virt's nested SMMUv3 ID registers (shared/reference/qemu-virt.md §1).
pub(crate) const QEMU_IDR: [u32; 6] = [0x0d44_101b, 0x0273_0010, 0, 0x1414, 0, 0x74];

const CR0_SMMUEN: u32 = 1;
const CR0_EVENTQEN: u32 = 1 << 2;
const CR0_CMDQEN: u32 = 1 << 3;
const GBPA_UPDATE: u32 = 1 << 31;
/// QEMU's GBPA reset value: bypass, SHCFG = incoming.
pub(crate) const GBPA_RESET: u32 = 0x1000;
const IRQ_CTRL_GERROR_IRQEN: u32 = 1;
const IRQ_CTRL_EVENTQ_IRQEN: u32 = 1 << 2;

impl SmmuModel {
    pub(crate) fn new(mem: std::sync::Arc<HostDma>, idr: [u32; 6]) -> SmmuModel {
        SmmuModel {
            st: Mutex::new(ModelState {
                idr,
                cr0: 0,
                cr0ack: 0,
                cr1: 0,
                cr2: 0,
                gbpa: GBPA_RESET,
                irq_ctrl: 0,
                irq_ctrlack: 0,
                gerror: 0,
                gerrorn: 0,
                gerror_irq_cfg0: 0,
                eventq_irq_cfg0: 0,
                strtab_base: 0,
                strtab_base_cfg: 0,
                cmdq_base: 0,
                cmdq_prod: 0,
                cmdq_cons: 0,
                eventq_base: 0,
                eventq_prod: 0,
                eventq_cons: 0,
                stuck_cr0ack: false,
                stuck_gbpa: false,
                stall_cmdq: false,
                illegal_ops: Vec::new(),
                fail_once_at: None,
                watch_sid: None,
                writes: Vec::new(),
                executed: Vec::new(),
                errors: Vec::new(),
                violations: Vec::new(),
                powered: true,
                power_losses: 0,
                ste_cache: BTreeMap::new(),
            }),
            mem,
        }
    }

    pub(crate) fn qemu(mem: std::sync::Arc<HostDma>) -> SmmuModel {
        SmmuModel::new(mem, QEMU_IDR)
    }

    /// Runs `f` on the state.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut ModelState) -> R) -> R {
        f(&mut self.st.lock().unwrap())
    }

    /// Power collapse: every register is lost (reads as its reset value once powered again),
    /// and so is the configuration cache. Register accesses are violations until `power_on`.
    /// Memory (tables, queues) is kept.
    pub(crate) fn power_off(&self) {
        let mut s = self.st.lock().unwrap();
        s.reset_registers();
        s.ste_cache.clear();
        s.powered = false;
        s.power_losses += 1;
    }

    /// Power back on: registers at their reset values.
    pub(crate) fn power_on(&self) {
        self.st.lock().unwrap().powered = true;
    }

    /// `power_off` then `power_on`.
    pub(crate) fn power_cycle(&self) {
        self.power_off();
        self.power_on();
    }

    /// The STE a transaction from `sid` would use now: the cached one, or fetched through the
    /// stream table (and cached). `None` while translation is off (SMMUEN = 0, or no power) or
    /// when `sid` has no STE (out of range, no level-2 table).
    pub(crate) fn cached_ste(&self, s: &mut ModelState, sid: u32) -> Option<Ste> {
        if !s.powered || s.cr0ack & CR0_SMMUEN == 0 {
            return None;
        }
        if let Some(ste) = s.ste_cache.get(&sid) {
            return Some(*ste);
        }
        let ste = self.fetch_ste(s, sid)?;
        s.ste_cache.insert(sid, ste);
        Some(ste)
    }

    fn cmdq_log2(s: &ModelState) -> u32 {
        (s.cmdq_base & 0x1f) as u32
    }

    fn evtq_log2(s: &ModelState) -> u32 {
        (s.eventq_base & 0x1f) as u32
    }

    /// The STE of `sid` as the SMMU would fetch it now (`None`: out of range / no level-2 table).
    pub(crate) fn fetch_ste(&self, s: &ModelState, sid: u32) -> Option<Ste> {
        let cfg = s.strtab_base_cfg;
        let log2size = cfg & 0x3f;
        if sid >> log2size != 0 {
            return None;
        }
        let base = s.strtab_base & regs::STRTAB_BASE_ADDR_MASK;
        let addr = if (cfg >> 16) & 3 == 1 {
            let split = (cfg >> 6) & 0x1f;
            let desc = L1Desc(self.mem.read_u64(base + u64::from(sid >> split) * 8));
            super::ste::l2_ste_addr(desc, sid, split)?
        } else {
            base + u64::from(sid) * STE_BYTES as u64
        };
        let mut ste = Ste::invalid();
        for (i, d) in ste.0.iter_mut().enumerate() {
            *d = self.mem.read_u64(addr + 8 * i as u64);
        }
        Some(ste)
    }

    /// Consumes the command queue as far as it can.
    fn consume(&self, s: &mut ModelState) {
        if s.cr0 & CR0_CMDQEN == 0 || s.stall_cmdq {
            return;
        }
        if (s.gerror ^ s.gerrorn) & GERROR_CMDQ_ERR != 0 {
            return;
        }
        let log2 = Self::cmdq_log2(s);
        let base = s.cmdq_base & regs::Q_BASE_ADDR_MASK;
        let (s1p, s2p) = (s.idr[0] & 2 != 0, s.idr[0] & 1 != 0);
        while !regs::q_empty(s.cmdq_prod, s.cmdq_cons, log2) {
            let index = regs::q_idx(s.cmdq_cons, log2);
            let e = base + u64::from(index) * 16;
            let raw = [self.mem.read_u64(e), self.mem.read_u64(e + 8)];
            let mut res = Command::decode(raw).and_then(|c| c.check_caps(s1p, s2p).map(|_| c));
            if s.illegal_ops.contains(&((raw[0] & 0xff) as u8)) {
                res = Err(CmdError::Illegal);
            }
            let mut code = res.err().map(|e| e.code());
            if let Some((at, c)) = s.fail_once_at
                && at == index
            {
                s.fail_once_at = None;
                code = Some(c);
            }
            if let Some(code) = code {
                s.cmdq_cons =
                    (s.cmdq_cons & regs::q_wrap_index_mask(log2)) | (u32::from(code) << 24);
                s.gerror = (s.gerror & !GERROR_CMDQ_ERR) | (!s.gerrorn & GERROR_CMDQ_ERR);
                s.errors.push((index, code));
                return;
            }
            let cmd = res.unwrap();
            let ste = match (cmd, s.watch_sid) {
                (Command::CfgiSte { .. } | Command::Sync { .. }, Some(w)) => self.fetch_ste(s, w),
                _ => None,
            };
            match cmd {
                Command::CfgiAll => s.ste_cache.clear(),
                Command::CfgiSte { sid, .. } => {
                    s.ste_cache.remove(&sid);
                }
                Command::CfgiSteRange { sid, range } => {
                    let n = 2u64 << range;
                    let first = u64::from(sid) & !(n - 1);
                    s.ste_cache
                        .retain(|&k, _| !(first..first + n).contains(&u64::from(k)));
                }
                _ => {}
            }
            let at_write = s.writes.len();
            s.executed.push(Executed {
                cmd,
                index,
                ste,
                at_write,
            });
            // Like QEMU (`queue_cons_incr` deposits only the index and wrap bits), a CONS.ERR
            // left from an earlier, acknowledged error stays set.
            s.cmdq_cons =
                regs::q_inc(s.cmdq_cons, log2) | (s.cmdq_cons & !regs::q_wrap_index_mask(log2));
        }
    }

    /// Writes an event record into the event queue. Returns false when it was dropped (queue
    /// disabled, or full: then the overflow flag toggles, once until acknowledged).
    pub(crate) fn inject_event(&self, rec: [u64; 4]) -> bool {
        let mut s = self.st.lock().unwrap();
        if !s.powered || s.cr0 & CR0_EVENTQEN == 0 {
            return false;
        }
        let log2 = Self::evtq_log2(&s);
        if regs::q_full(s.eventq_prod, s.eventq_cons, log2) {
            if (s.eventq_prod ^ s.eventq_cons) & Q_OVF == 0 {
                s.eventq_prod ^= Q_OVF;
            }
            return false;
        }
        let base = s.eventq_base & regs::Q_BASE_ADDR_MASK;
        let e = base + u64::from(regs::q_idx(s.eventq_prod, log2)) * EVENT_BYTES as u64;
        for (i, d) in rec.iter().enumerate() {
            self.mem.write_u64(e + 8 * i as u64, *d);
        }
        s.eventq_prod = regs::q_inc(s.eventq_prod, log2) | (s.eventq_prod & Q_OVF);
        true
    }

    fn violation(s: &mut ModelState, what: String) {
        s.violations.push(what);
    }
}

impl SmmuMmio for SmmuModel {
    fn read32(&self, o: u64) -> u32 {
        let mut s = self.st.lock().unwrap();
        if !s.powered {
            Self::violation(&mut s, format!("32-bit read {o:#x} while powered off"));
            return 0;
        }
        match o {
            off::IDR0..=off::IDR5 => s.idr[(o / 4) as usize],
            off::AIDR => 1,
            off::CR0 => s.cr0,
            off::CR0ACK => s.cr0ack,
            off::CR1 => s.cr1,
            off::CR2 => s.cr2,
            off::GBPA => s.gbpa,
            off::IRQ_CTRL => s.irq_ctrl,
            off::IRQ_CTRLACK => s.irq_ctrlack,
            off::GERROR => s.gerror,
            off::GERRORN => s.gerrorn,
            off::STRTAB_BASE_CFG => s.strtab_base_cfg,
            off::CMDQ_PROD => s.cmdq_prod,
            off::CMDQ_CONS => s.cmdq_cons,
            off::EVENTQ_PROD => s.eventq_prod,
            off::EVENTQ_CONS => s.eventq_cons,
            _ => 0,
        }
    }

    fn write32(&self, o: u64, v: u32) {
        let mut s = self.st.lock().unwrap();
        if !s.powered {
            Self::violation(&mut s, format!("32-bit write {o:#x} while powered off"));
            return;
        }
        s.writes.push((o, v.into()));
        let enabled = s.cr0ack & CR0_SMMUEN != 0;
        match o {
            off::CR0 => {
                s.cr0 = v;
                if !s.stuck_cr0ack {
                    s.cr0ack = v;
                }
                if v & CR0_CMDQEN != 0 {
                    self.consume(&mut s);
                }
            }
            off::CR1 | off::CR2 | off::STRTAB_BASE_CFG if enabled => {
                Self::violation(&mut s, format!("{o:#x} written with SMMUEN=1"))
            }
            off::CR1 => s.cr1 = v,
            off::CR2 => s.cr2 = v,
            off::STRTAB_BASE_CFG => s.strtab_base_cfg = v,
            off::GBPA => {
                if v & GBPA_UPDATE == 0 {
                    Self::violation(&mut s, format!("GBPA written without UPDATE: {v:#x}"));
                }
                if s.gbpa & GBPA_UPDATE != 0 {
                    Self::violation(&mut s, "GBPA written while UPDATE pending".into());
                }
                s.gbpa = if s.stuck_gbpa { v } else { v & !GBPA_UPDATE };
            }
            off::IRQ_CTRL => {
                s.irq_ctrl = v;
                s.irq_ctrlack = v;
            }
            off::GERRORN => {
                s.gerrorn = v;
                self.consume(&mut s);
            }
            off::CMDQ_PROD => {
                s.cmdq_prod = v;
                self.consume(&mut s);
            }
            off::CMDQ_CONS => {
                if s.cr0ack & CR0_CMDQEN != 0 {
                    Self::violation(&mut s, "CMDQ_CONS written with CMDQEN=1".into());
                }
                s.cmdq_cons = v;
            }
            off::EVENTQ_PROD => {
                if s.cr0ack & CR0_EVENTQEN != 0 {
                    Self::violation(&mut s, "EVENTQ_PROD written with EVENTQEN=1".into());
                }
                s.eventq_prod = v;
            }
            off::EVENTQ_CONS => s.eventq_cons = v,
            off::RESERVED_PAGE0_EVENTQ_PROD | off::RESERVED_PAGE0_EVENTQ_CONS => {
                Self::violation(&mut s, format!("reserved page-0 offset {o:#x} written"))
            }
            _ => Self::violation(&mut s, format!("unexpected 32-bit write {o:#x}")),
        }
    }

    fn read64(&self, o: u64) -> u64 {
        let mut s = self.st.lock().unwrap();
        if !s.powered {
            Self::violation(&mut s, format!("64-bit read {o:#x} while powered off"));
            return 0;
        }
        match o {
            off::STRTAB_BASE => s.strtab_base,
            off::CMDQ_BASE => s.cmdq_base,
            off::EVENTQ_BASE => s.eventq_base,
            off::GERROR_IRQ_CFG0 => s.gerror_irq_cfg0,
            off::EVENTQ_IRQ_CFG0 => s.eventq_irq_cfg0,
            _ => 0,
        }
    }

    fn write64(&self, o: u64, v: u64) {
        let mut s = self.st.lock().unwrap();
        if !s.powered {
            Self::violation(&mut s, format!("64-bit write {o:#x} while powered off"));
            return;
        }
        s.writes.push((o, v));
        match o {
            off::STRTAB_BASE if s.cr0ack & CR0_SMMUEN != 0 => {
                Self::violation(&mut s, "STRTAB_BASE written with SMMUEN=1".into())
            }
            off::STRTAB_BASE => s.strtab_base = v,
            off::CMDQ_BASE if s.cr0ack & CR0_CMDQEN != 0 => {
                Self::violation(&mut s, "CMDQ_BASE written with CMDQEN=1".into())
            }
            off::CMDQ_BASE => s.cmdq_base = v,
            off::EVENTQ_BASE if s.cr0ack & CR0_EVENTQEN != 0 => {
                Self::violation(&mut s, "EVENTQ_BASE written with EVENTQEN=1".into())
            }
            off::EVENTQ_BASE => s.eventq_base = v,
            // An interrupt's configuration may only change while it is disabled (IRQ_CTRL and
            // IRQ_CTRLACK both clear).
            off::GERROR_IRQ_CFG0 if (s.irq_ctrl | s.irq_ctrlack) & IRQ_CTRL_GERROR_IRQEN != 0 => {
                Self::violation(&mut s, "GERROR_IRQ_CFG0 written with GERROR_IRQEN=1".into())
            }
            off::EVENTQ_IRQ_CFG0 if (s.irq_ctrl | s.irq_ctrlack) & IRQ_CTRL_EVENTQ_IRQEN != 0 => {
                Self::violation(&mut s, "EVENTQ_IRQ_CFG0 written with EVENTQ_IRQEN=1".into())
            }
            off::GERROR_IRQ_CFG0 => s.gerror_irq_cfg0 = v,
            off::EVENTQ_IRQ_CFG0 => s.eventq_irq_cfg0 = v,
            _ => Self::violation(&mut s, format!("unexpected 64-bit write {o:#x}")),
        }
    }
}
