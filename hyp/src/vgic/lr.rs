//! List registers: their encoding, the [`ListRegs`] access the arch layer provides, and the
//! portable [`Vgic::flush`] (before entering the guest) and [`Vgic::sync`] (after it exits).
//!
//! # `ICH_LR<n>_EL2` (IHI0069, `ICH_LR<n>_EL2`)
//!
//! | bits | field |
//! |---|---|
//! | 63:62 | State: 0 invalid, 1 pending, 2 active, 3 pending and active |
//! | 61 | HW: the virtual interrupt is the physical interrupt pINTID; the guest's deactivation deactivates it |
//! | 60 | Group: 1 = Group 1 (always 1 here) |
//! | 59 | NMI (FEAT_GICv3_NMI; never set here) |
//! | 55:48 | Priority |
//! | 41:32 | pINTID when HW = 1; when HW = 0, bit 41 is EOI (maintenance interrupt on deactivation) and 40:32 are RES0 |
//! | 31:0 | vINTID |
//!
//! # The model
//!
//! Between exits the software state ([`IrqState`]) is the authority; the list registers are a
//! window onto it that is rebuilt on every entry. [`Vgic::flush`] chooses up to
//! ICH_VTR_EL2.ListRegs + 1 interrupts of the vCPU — active ones first (an active interrupt
//! must stay in a list register until the guest deactivates it, or its deactivation would find
//! nothing), then pending and enabled ones by priority (lower value first), then by INTID — and
//! *moves* their pending latch and active state into the list registers. [`Vgic::sync`] reads
//! the list registers back and merges: what the guest did (acknowledge: pending → active;
//! deactivate: → invalid) with what arrived in the meantime (new edges, guest writes from other
//! vCPUs). A flush with list registers still outstanding syncs them first, so an entry that is
//! abandoned (the vCPU exits to EL2 again before running the guest) loses nothing.
//!
//! Semantics:
//!
//! - **Edge** (and SGIs): a new edge while the interrupt is in a list register sets the latch; at
//!   sync, a list register still pending restores it too (two edges before the acknowledge are
//!   one interrupt, as on hardware). An edge that arrives while the interrupt is active makes it
//!   pending and active: the list register is written with state 3, so the guest takes it again
//!   right after deactivating it, with no exit.
//! - **Level**: pending while the line is high (or the software latch is set). The list register
//!   gets the pending state from the line; if the line is still high when the guest has the
//!   interrupt active, the register is written active only, with EOI = 1, so its deactivation
//!   raises a maintenance interrupt and the next flush samples the line again: pending again if
//!   the device still asserts it, nothing otherwise (no spurious second interrupt). A line that
//!   drops while the interrupt is pending in a list register kicks the vCPU so it is taken back.
//! - **HW** (a physical SPI, or the virtual timer PPI): the hypervisor acknowledged the physical
//!   interrupt and left it active; the list register is written with HW = 1 and the physical
//!   INTID, so the guest's deactivation deactivates the physical interrupt in hardware, and
//!   a level-triggered device that still asserts it simply fires again. Pending and active at
//!   once cannot be expressed with HW = 1, so such an interrupt (only reachable by the guest
//!   writing ISPENDR for it while active) is written active only and the pending part waits.
//!   If the guest clears the pending or active state through the distributor while the
//!   interrupt sits in a list register with HW = 1, the physical interrupt is deactivated at the
//!   next sync, when that register is no longer live. A new physical occurrence that arrives
//!   after the guest's deactivation but before that sync (taken on another CPU after a reroute)
//!   is kept apart from the one the list register ended.
//! - **More than fit**: when interrupts are left over, ICH_HCR_EL2 asks for a maintenance
//!   interrupt at the first point the guest could take more: NPIE (no list register pending)
//!   if a pending one was placed; else, when at least two are valid (all active), UIE (at most
//!   one valid); else (a single list register) EOI = 1 on it. So the maintenance interrupt
//!   never fires on entry, and a vCPU never live-locks on it. (One corner waits for the next
//!   exit: a lone HW = 1 list register, active, with work left over — HW = 1 has no EOI bit.)
//! - Group 0 is not implemented: every list register is Group 1.
//!
//! More interrupts active at once than there are list registers can only happen if the guest
//! sets active states itself (ISACTIVER); those beyond the list registers stay active in the
//! software state until the guest clears them. ICH_HCR_EL2.LRENPIE is not used.

use core::sync::atomic::Ordering;

use super::VcpuSet;
use super::state::{InLr, IrqState, NR_PRIVATE, VcpuInner, Vgic};

/// At most 16 list registers (ICH_VTR_EL2.ListRegs is 4 bits wide).
pub const MAX_LRS: usize = 16;

/// ICH_HCR_EL2.En: enables the virtual CPU interface.
pub const ICH_HCR_EN: u64 = 1 << 0;
/// ICH_HCR_EL2.UIE: maintenance interrupt when at most one list register is valid.
pub const ICH_HCR_UIE: u64 = 1 << 1;
/// ICH_HCR_EL2.LRENPIE: maintenance interrupt while EOIcount is non-zero.
pub const ICH_HCR_LRENPIE: u64 = 1 << 2;
/// ICH_HCR_EL2.NPIE: maintenance interrupt when no list register is pending.
pub const ICH_HCR_NPIE: u64 = 1 << 3;

/// ICH_MISR_EL2.EOI: a list register with EOI = 1 was deactivated.
pub const ICH_MISR_EOI: u64 = 1 << 0;
/// ICH_MISR_EL2.U: underflow (UIE and at most one valid list register).
pub const ICH_MISR_U: u64 = 1 << 1;
/// ICH_MISR_EL2.LRENP: LRENPIE and EOIcount non-zero.
pub const ICH_MISR_LRENP: u64 = 1 << 2;
/// ICH_MISR_EL2.NP: NPIE and no pending list register.
pub const ICH_MISR_NP: u64 = 1 << 3;

/// The number of list registers from ICH_VTR_EL2 (ListRegs, bits 4:0, is the count minus one).
pub fn num_lrs_from_vtr(ich_vtr: u64) -> usize {
    (ich_vtr & 0x1f) as usize + 1
}

/// List register State field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrState {
    Invalid = 0,
    Pending = 1,
    Active = 2,
    PendingActive = 3,
}

impl LrState {
    fn new(pending: bool, active: bool) -> Self {
        match (pending, active) {
            (false, false) => LrState::Invalid,
            (true, false) => LrState::Pending,
            (false, true) => LrState::Active,
            (true, true) => LrState::PendingActive,
        }
    }

    /// Has the pending state.
    pub fn pending(self) -> bool {
        matches!(self, LrState::Pending | LrState::PendingActive)
    }

    /// Has the active state.
    pub fn active(self) -> bool {
        matches!(self, LrState::Active | LrState::PendingActive)
    }
}

/// One list register, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lr {
    pub vintid: u32,
    /// HW = 1 with this physical INTID (10 bits).
    pub pintid: Option<u32>,
    /// Maintenance interrupt on deactivation (only with HW = 0).
    pub eoi: bool,
    pub priority: u8,
    pub group1: bool,
    pub state: LrState,
}

const LR_STATE_SHIFT: u32 = 62;
const LR_HW: u64 = 1 << 61;
const LR_GROUP1: u64 = 1 << 60;
const LR_PRIORITY_SHIFT: u32 = 48;
const LR_EOI: u64 = 1 << 41;
const LR_PINTID_SHIFT: u32 = 32;
const LR_PINTID_MASK: u64 = 0x3ff;

impl Lr {
    /// The `ICH_LR<n>_EL2` value.
    pub fn encode(&self) -> u64 {
        let mut v = u64::from(self.vintid)
            | (u64::from(self.priority) << LR_PRIORITY_SHIFT)
            | ((self.state as u64) << LR_STATE_SHIFT);
        if self.group1 {
            v |= LR_GROUP1;
        }
        match self.pintid {
            Some(p) => v |= LR_HW | ((u64::from(p) & LR_PINTID_MASK) << LR_PINTID_SHIFT),
            None if self.eoi => v |= LR_EOI,
            None => {}
        }
        v
    }

    /// Decodes an `ICH_LR<n>_EL2` value.
    pub fn decode(v: u64) -> Self {
        let hw = v & LR_HW != 0;
        Lr {
            vintid: v as u32,
            pintid: hw.then_some(((v >> LR_PINTID_SHIFT) & LR_PINTID_MASK) as u32),
            eoi: !hw && v & LR_EOI != 0,
            priority: (v >> LR_PRIORITY_SHIFT) as u8,
            group1: v & LR_GROUP1 != 0,
            state: match v >> LR_STATE_SHIFT {
                0 => LrState::Invalid,
                1 => LrState::Pending,
                2 => LrState::Active,
                _ => LrState::PendingActive,
            },
        }
    }
}

/// The list registers and hypervisor control registers of the virtual CPU interface of the
/// physical CPU that runs the vCPU — implemented by the arch layer over the ICH_*_EL2 system
/// registers (and by a model in the tests). [`Vgic::flush`] and [`Vgic::sync`] are the only
/// callers; they run on that CPU with the guest not running.
pub trait ListRegs {
    /// Implemented list registers: ICH_VTR_EL2.ListRegs + 1 ([`num_lrs_from_vtr`]).
    fn num_lrs(&self) -> usize;
    /// Reads `ICH_LR<n>_EL2`.
    fn read_lr(&self, n: usize) -> u64;
    /// Writes `ICH_LR<n>_EL2`.
    fn write_lr(&mut self, n: usize, value: u64);
    /// Writes ICH_HCR_EL2. The value has En, UIE and NPIE as [`Vgic::flush`] decided; the arch
    /// layer may OR in its own trap bits (TC, TALL0, TALL1, TDIR, …), which the vGIC never sets.
    fn write_hcr(&mut self, value: u64);
    /// Reads ICH_MISR_EL2 (why a maintenance interrupt is asserted), for the arch layer's
    /// diagnostics; flush/sync do not need it: they re-derive everything from the list
    /// registers.
    fn read_misr(&self) -> u64;
    /// Reads ICH_ELRSR_EL2: bit n set when list register n holds no interrupt (state invalid
    /// and, with HW = 0, EOI = 0), so sync can skip reading it.
    fn read_elrsr(&self) -> u64;
}

/// A vCPU's record of what its list registers hold.
pub(crate) struct LrShadow {
    /// List registers `0..used` hold the interrupts `intids[..used]` placed by the last flush
    /// and not yet synced.
    used: usize,
    intids: [u32; MAX_LRS],
    /// List registers `0..written` may hold a non-zero value.
    written: usize,
    /// The last value written to ICH_HCR_EL2.
    hcr: Option<u64>,
    /// The last sync read interrupts back: the next flush must rescan.
    rescan: bool,
}

impl LrShadow {
    pub const fn new() -> Self {
        LrShadow {
            used: 0,
            intids: [0; MAX_LRS],
            written: 0,
            hcr: None,
            rescan: false,
        }
    }
}

/// The best `n` candidates by key (smallest first).
struct Best {
    n: usize,
    len: usize,
    total: usize,
    items: [(u64, u32); MAX_LRS],
}

impl Best {
    fn new(n: usize) -> Self {
        Best {
            n,
            len: 0,
            total: 0,
            items: [(0, 0); MAX_LRS],
        }
    }

    fn offer(&mut self, key: u64, intid: u32) {
        self.total += 1;
        let at = self.items[..self.len].partition_point(|&(k, _)| k < key);
        if at >= self.n {
            return;
        }
        let end = self.len.min(self.n - 1);
        self.items.copy_within(at..end, at + 1);
        self.items[at] = (key, intid);
        self.len = (self.len + 1).min(self.n);
    }

    fn overflow(&self) -> bool {
        self.total > self.len
    }
}

/// Sort key of a candidate for the list registers, or None if it has nothing to put there.
/// Active first, then priority (lower value is higher priority), then INTID.
fn candidate_key(irq: &IrqState, intid: u32, grp1: bool) -> Option<u64> {
    if irq.lr.is_some() {
        return None;
    }
    let deliverable = grp1 && irq.enabled && irq.pending();
    if !irq.active && !deliverable {
        return None;
    }
    let not_active = u64::from(!irq.active);
    Some((not_active << 40) | (u64::from(irq.priority) << 32) | u64::from(intid))
}

/// Moves `irq` into a list register for `vcpu`: the register's value, and whether part of its
/// state (pending) had to stay behind. None if it has nothing to place (it changed since the
/// scan).
fn place(irq: &mut IrqState, intid: u32, grp1: bool, vcpu: usize) -> Option<(Lr, bool)> {
    if irq.lr.is_some() {
        return None;
    }
    let pend = grp1 && irq.enabled && irq.pending();
    let act = irq.active;
    if !pend && !act {
        return None;
    }
    let hw = irq.phys_active;
    let mut lr_pend = pend;
    let mut eoi = false;
    let mut leftover = false;
    if act && pend {
        if hw {
            // HW = 1 cannot be pending and active.
            lr_pend = false;
            leftover = true;
        } else if !irq.edge {
            // Level: resample the line when the guest deactivates it.
            lr_pend = false;
            eoi = true;
        }
    }
    let moved_latch = lr_pend && irq.latch;
    if lr_pend {
        irq.latch = false;
    }
    irq.active = false;
    // The physical activation moves into the list register too: a new physical occurrence
    // (possible once the guest's deactivation ended this one, e.g. taken on another CPU after a
    // reroute) then sets `phys_active` again without being confused with this one.
    irq.phys_active = false;
    irq.owner = vcpu as u16;
    irq.lr = Some(InLr {
        pending: lr_pend,
        active: act,
        moved_latch,
        hw,
        clr_pending: false,
        clr_active: false,
    });
    let lr = Lr {
        vintid: intid,
        pintid: if hw { irq.pintid } else { None },
        eoi,
        priority: irq.priority,
        group1: true,
        state: LrState::new(lr_pend, act),
    };
    Some((lr, leftover))
}

/// Merges what list register state `state` says into `irq`, which it held. Returns whether the
/// physical INTID must now be deactivated.
fn fold(irq: &mut IrqState, state: LrState) -> bool {
    let Some(lr) = irq.lr.take() else {
        return false;
    };
    if lr.hw && state != LrState::Invalid {
        // Not deactivated yet: the physical activation is still owed. (Invalid: the guest's
        // deactivation deactivated it in hardware; `phys_active` then only says whether a new
        // occurrence arrived since.)
        irq.phys_active = true;
    }
    let pending = state.pending() && !lr.clr_pending;
    let active = state.active() && !lr.clr_active;
    if active {
        irq.active = true;
    }
    if pending && lr.moved_latch {
        // Not acknowledged yet: the latched pending state is still owed. (A level-sensitive
        // interrupt pending from its line alone follows the line again.)
        irq.latch = true;
    }
    irq.settle_phys()
}

impl Vgic {
    /// Before entering the guest on `vcpu`'s physical CPU: fills the list registers with the
    /// vCPU's active and highest-priority pending interrupts, clears the rest that were in use,
    /// and writes ICH_HCR_EL2 (En, plus UIE/NPIE when interrupts are left over). Syncs first if
    /// the previous flush was not synced.
    ///
    /// # Panics
    ///
    /// If `vcpu` is not a vCPU of this VM.
    pub fn flush(&self, vcpu: usize, lrs: &mut dyn ListRegs) {
        let v = &self.vcpus[vcpu];
        let mut kicks = VcpuSet::new();
        let mut inner = v.inner.lock();
        if inner.shadow.used > 0 {
            self.sync_locked(vcpu, &mut inner, lrs, &mut kicks);
        }
        let nr = lrs.num_lrs().min(MAX_LRS);
        let work = v.work.swap(false, Ordering::AcqRel);
        let mut placed = 0;
        let mut hcr = ICH_HCR_EN;
        if (work || inner.shadow.rescan) && nr > 0 {
            inner.shadow.rescan = false;
            let grp1 = self.grp1.load(Ordering::Acquire);
            let mut best = Best::new(nr);
            for (intid, irq) in inner.irqs.iter().enumerate() {
                if let Some(key) = candidate_key(irq, intid as u32, grp1) {
                    best.offer(key, intid as u32);
                }
            }
            for spi in self.spis.iter() {
                let st = spi.state.lock();
                if st.oracle() == Some(vcpu)
                    && let Some(key) = candidate_key(&st.irq, spi.vintid, grp1)
                {
                    best.offer(key, spi.vintid);
                }
            }

            let mut regs = [None::<Lr>; MAX_LRS];
            let mut leftover = best.overflow();
            let mut placed_pending = 0;
            for &(_, intid) in &best.items[..best.len] {
                let got = if intid < NR_PRIVATE {
                    place(&mut inner.irqs[intid as usize], intid, grp1, vcpu)
                } else {
                    let spi = self.spi(intid).expect("candidate SPI is owned");
                    let mut st = spi.state.lock();
                    // It may have moved or changed since the scan; then it is simply skipped
                    // (whoever changed it notified the vCPU that should now look at it).
                    if st.oracle() == Some(vcpu) {
                        place(&mut st.irq, intid, grp1, vcpu)
                    } else {
                        None
                    }
                };
                if let Some((lr, left)) = got {
                    leftover |= left;
                    // The hardware's "no pending" maintenance condition (NPIE) counts only LRs in the
                    // plain Pending state, not Pending+Active: count the same way, or a vCPU with
                    // only pending+active entries placed takes a maintenance interrupt on every
                    // entry and never runs.
                    placed_pending += usize::from(lr.state == LrState::Pending);
                    inner.shadow.intids[placed] = intid;
                    regs[placed] = Some(lr);
                    placed += 1;
                }
            }
            if leftover {
                if placed_pending > 0 {
                    hcr |= ICH_HCR_NPIE;
                } else if placed >= 2 {
                    hcr |= ICH_HCR_UIE;
                } else {
                    for lr in regs[..placed].iter_mut().flatten() {
                        if lr.pintid.is_none() {
                            lr.eoi = true;
                        }
                    }
                }
            }
            for (n, lr) in regs[..placed].iter().enumerate() {
                let lr = lr.expect("placed");
                lrs.write_lr(n, lr.encode());
            }
        }
        for n in placed..inner.shadow.written.min(nr) {
            lrs.write_lr(n, 0);
        }
        inner.shadow.used = placed;
        inner.shadow.written = placed;
        if inner.shadow.hcr != Some(hcr) {
            lrs.write_hcr(hcr);
            inner.shadow.hcr = Some(hcr);
        }
        drop(inner);
        self.notify(&kicks);
    }

    /// After the guest exits on `vcpu`'s physical CPU (every exit, before handling it, so
    /// that emulation sees current state): reads back the list registers the last flush filled
    /// and merges their state into the vCPU's interrupts. Does not write them; the next
    /// [`Vgic::flush`] does.
    ///
    /// # Panics
    ///
    /// If `vcpu` is not a vCPU of this VM.
    pub fn sync(&self, vcpu: usize, lrs: &mut dyn ListRegs) {
        let mut kicks = VcpuSet::new();
        {
            let mut inner = self.vcpus[vcpu].inner.lock();
            self.sync_locked(vcpu, &mut inner, lrs, &mut kicks);
        }
        self.notify(&kicks);
    }

    fn sync_locked(
        &self,
        vcpu: usize,
        inner: &mut VcpuInner,
        lrs: &mut dyn ListRegs,
        kicks: &mut VcpuSet,
    ) {
        let used = inner.shadow.used;
        if used == 0 {
            return;
        }
        let elrsr = lrs.read_elrsr();
        for n in 0..used {
            let intid = inner.shadow.intids[n];
            let state = if elrsr & (1 << n) != 0 {
                LrState::Invalid
            } else {
                Lr::decode(lrs.read_lr(n)).state
            };
            if intid < NR_PRIVATE {
                if fold(&mut inner.irqs[intid as usize], state) {
                    self.phys.deactivate(intid, vcpu);
                }
            } else if let Some(spi) = self.spi(intid) {
                let mut st = spi.state.lock();
                if fold(&mut st.irq, state)
                    && let Some(pintid) = st.irq.pintid
                {
                    self.phys.deactivate(pintid, vcpu);
                }
                // Rerouted while it was here: its new target must pick it up.
                if st.irq.busy() {
                    match st.oracle() {
                        Some(t) if t != vcpu => kicks.insert(t),
                        _ => {}
                    }
                }
            }
        }
        inner.shadow.used = 0;
        inner.shadow.rescan = true;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::vec::Vec;

    #[test]
    fn best_keeps_the_smallest_keys_in_order() {
        let mut seed = 0x1234_5678u64;
        for n in 1..=MAX_LRS {
            for len in [0, 1, n - 1, n, n + 1, 40] {
                let keys: Vec<u64> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        (seed >> 33) % 64
                    })
                    .collect();
                let mut best = Best::new(n);
                for (i, &k) in keys.iter().enumerate() {
                    best.offer((k << 32) | i as u64, i as u32);
                }
                let mut want: Vec<(u64, u32)> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| ((k << 32) | i as u64, i as u32))
                    .collect();
                want.sort_unstable();
                want.truncate(n);
                assert_eq!(&best.items[..best.len], &want[..], "n {n} len {len}");
                assert_eq!(best.overflow(), len > n);
            }
        }
    }
}
