//! Interrupt state of one VM's vGIC and the injection API.
//!
//! Every interrupt the VM can see has one [`IrqState`]: the 32 private ones (SGIs and PPIs) of a
//! vCPU live together behind that vCPU's lock, each SPI the VM owns behind a lock of its own. No
//! lock is shared with another VM, and there is no VM-wide lock: a distributor access, an SPI
//! injection and a vCPU's list-register flush only ever contend on the interrupts they touch.
//!
//! Lock order: a vCPU's lock, then an SPI's lock; never the other way, never two SPIs or two vCPUs
//! at once. [`PhysIrqOps`] is called with the interrupt's lock held (so the physical enable,
//! routing and active state follow the virtual ones in the order the guest wrote them);
//! [`VcpuKick`] is called with no lock held.
//!
//! # The state of one interrupt
//!
//! - `latch`: the edge latch of an edge-triggered interrupt, or the software pending latch
//!   (ISPENDR, or [`Vgic::inject`]) of a level-sensitive one. For an interrupt forwarded from
//!   hardware, each physical occurrence sets it.
//! - `level`: the input line of a level-sensitive emulated source ([`Vgic::set_level`]). A
//!   level-sensitive interrupt is pending while `latch || level`; an edge-triggered one while
//!   `latch`.
//! - `active`, `enabled`, `priority`, `edge` (ICFGR).
//! - `phys_active`: the physical INTID it is mapped to was acknowledged by the hypervisor on the
//!   guest's behalf and is still active; the guest's deactivation (through a list register with
//!   HW = 1) or the vGIC ([`PhysIrqOps::deactivate`]) ends it. While a list register with HW = 1
//!   holds the interrupt, that activation belongs to the list register (like the latch, below).
//!   Invariant, outside list registers: `phys_active` implies pending or active, so a physical
//!   interrupt is never left active with no virtual instance that could ever deactivate it.
//! - `lr`: set while the interrupt sits in a list register of vCPU `owner`. Its pending latch and
//!   active state then *moved* into the list register (see `lr.rs`); what arrives meanwhile
//!   (a new edge, ISPENDR, ISACTIVER) accumulates here and is merged at the next sync, and
//!   guest clears (ICPENDR, ICACTIVER) are recorded as requests that override what the list
//!   register says at sync.

use core::sync::atomic::{AtomicBool, Ordering};

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use super::lr::LrShadow;
use super::{
    MAX_SPI_INTID, MAX_VCPUS, PhysIrqOps, SpiConfig, SpiKind, VcpuKick, VcpuSet, VgicConfig,
    VgicError, vcpu_affinity, vcpu_of_affinity,
};

/// Number of private interrupts per vCPU: SGIs 0–15 and PPIs 16–31.
pub const NR_PRIVATE: u32 = 32;
/// First SPI INTID.
pub const FIRST_SPI: u32 = 32;
/// Priority bits kept by the emulated priority registers: the top five, the minimum number of
/// virtual priority bits a GICv3 CPU interface implements (ICH_VTR_EL2.PRIbits ≥ 4), so every
/// value the guest can read back is one the list registers can express.
pub const PRIORITY_MASK: u8 = 0xf8;
/// Sentinel in the SPI index table.
const NO_SLOT: u16 = u16::MAX;

/// What a list register holds of an interrupt, recorded when it was placed there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct InLr {
    /// Placed with the pending state.
    pub pending: bool,
    /// Placed with the active state.
    pub active: bool,
    /// The pending state came (also) from `latch`, which was cleared when placed: if the guest
    /// has not acknowledged it by the next sync, the latch is set again.
    pub moved_latch: bool,
    /// Placed with HW = 1 (the physical INTID is deactivated by the guest's deactivation).
    pub hw: bool,
    /// The guest cleared the pending state (ICPENDR) while it was in the list register.
    pub clr_pending: bool,
    /// The guest cleared the active state (ICACTIVER) while it was in the list register.
    pub clr_active: bool,
}

/// The state of one virtual interrupt (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct IrqState {
    pub enabled: bool,
    pub edge: bool,
    /// Whether the guest may change `edge` (ICFGR): not for SGIs, nor for interrupts mapped to
    /// hardware, whose trigger is the physical one.
    pub cfg_writable: bool,
    pub priority: u8,
    pub latch: bool,
    pub level: bool,
    pub active: bool,
    /// The physical INTID this interrupt is forwarded from, if any (fixed at construction).
    pub pintid: Option<u32>,
    pub phys_active: bool,
    pub lr: Option<InLr>,
    /// The vCPU whose list register holds this interrupt, or held it when it became active
    /// (SPIs: an active SPI stays on that vCPU until deactivated, whatever its routing says, so
    /// the guest's deactivation on that vCPU finds it). Private interrupts: their own vCPU.
    pub owner: u16,
}

impl IrqState {
    const fn new(edge: bool, cfg_writable: bool, pintid: Option<u32>, owner: u16) -> Self {
        IrqState {
            enabled: false,
            edge,
            cfg_writable,
            priority: 0,
            latch: false,
            level: false,
            active: false,
            pintid,
            phys_active: false,
            lr: None,
            owner,
        }
    }

    /// Pending in the software state (not counting what a list register holds).
    pub fn pending(&self) -> bool {
        self.latch || (!self.edge && self.level)
    }

    /// Pending as the guest reads it (ISPENDR): the software state plus, while in a list
    /// register, what was placed there (as of the owning vCPU's last entry).
    pub fn visible_pending(&self) -> bool {
        self.pending() || self.lr.is_some_and(|l| l.pending && !l.clr_pending)
    }

    /// Active as the guest reads it (ISACTIVER); see [`Self::visible_pending`].
    pub fn visible_active(&self) -> bool {
        self.active || self.lr.is_some_and(|l| l.active && !l.clr_active)
    }

    /// Anything here a vCPU might have to act on.
    pub fn busy(&self) -> bool {
        self.pending() || self.active || self.lr.is_some()
    }

    /// Restores the invariant "outside a list register, `phys_active` implies pending or
    /// active": returns true if the physical INTID must now be deactivated.
    pub fn settle_phys(&mut self) -> bool {
        if self.lr.is_none() && self.phys_active && !self.latch && !self.active {
            self.phys_active = false;
            true
        } else {
            false
        }
    }
}

/// The set/clear-bitmap registers, one bit per INTID, shared by GICD_* and GICR_* (SGI_base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BitReg {
    Group,
    SetEnable,
    ClearEnable,
    SetPending,
    ClearPending,
    SetActive,
    ClearActive,
}

/// What has to happen after an interrupt's state changed, once its lock is dropped (`notify`)
/// or while it is still held (the physical operations).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Effects {
    /// Enable (`Some(true)`) or disable the physical SPI.
    pub phys_enable: Option<bool>,
    /// Deactivate the physical INTID.
    pub deactivate: bool,
    /// The vCPU that holds or would receive this interrupt must re-evaluate it.
    pub notify: bool,
}

impl BitReg {
    /// Reads this register's bit for `irq`.
    pub fn read(self, irq: &IrqState) -> bool {
        match self {
            // Every interrupt is Group 1 (Group 0 is not implemented): RAO/WI.
            BitReg::Group => true,
            BitReg::SetEnable | BitReg::ClearEnable => irq.enabled,
            BitReg::SetPending | BitReg::ClearPending => irq.visible_pending(),
            BitReg::SetActive | BitReg::ClearActive => irq.visible_active(),
        }
    }

    /// Applies a 1 written to this register's bit for `irq`. `hw_spi`: the interrupt is an SPI
    /// mapped to a physical SPI (whose enable follows the virtual one).
    pub fn write_one(self, irq: &mut IrqState, hw_spi: bool) -> Effects {
        let mut fx = Effects::default();
        match self {
            BitReg::Group => return fx,
            BitReg::SetEnable => {
                if !irq.enabled {
                    irq.enabled = true;
                    fx.phys_enable = hw_spi.then_some(true);
                }
                fx.notify = irq.busy();
            }
            BitReg::ClearEnable => {
                if irq.enabled {
                    irq.enabled = false;
                    fx.phys_enable = hw_spi.then_some(false);
                }
                // A pending interrupt already in a list register must be taken back.
                fx.notify = irq.lr.is_some();
            }
            BitReg::SetPending => {
                irq.latch = true;
                fx.notify = true;
            }
            BitReg::ClearPending => {
                irq.latch = false;
                if let Some(lr) = irq.lr.as_mut() {
                    lr.clr_pending = true;
                    fx.notify = true;
                }
            }
            BitReg::SetActive => {
                irq.active = true;
                fx.notify = true;
            }
            BitReg::ClearActive => {
                irq.active = false;
                if let Some(lr) = irq.lr.as_mut() {
                    lr.clr_active = true;
                    fx.notify = true;
                }
            }
        }
        fx.deactivate = irq.settle_phys();
        fx
    }
}

/// One SPI the VM owns.
pub(crate) struct Spi {
    pub vintid: u32,
    pub kind: SpiKind,
    pub state: Mutex<SpiState>,
}

pub(crate) struct SpiState {
    pub irq: IrqState,
    /// GICD_IROUTER as the guest wrote it (Aff2..Aff0; IRM and Aff3 are RES0 here).
    pub irouter: u64,
    /// The vCPU IROUTER names, if it names one of this VM's.
    pub target: Option<u16>,
}

impl SpiState {
    /// The vCPU this SPI is (to be) delivered to: the one holding it in a list register or
    /// active, else the routing target.
    pub fn oracle(&self) -> Option<usize> {
        if self.irq.lr.is_some() || self.irq.active {
            Some(usize::from(self.irq.owner))
        } else {
            self.target.map(usize::from)
        }
    }
}

/// The private interrupts and list-register bookkeeping of one vCPU.
pub(crate) struct VcpuInner {
    pub irqs: [IrqState; NR_PRIVATE as usize],
    pub shadow: LrShadow,
}

pub(crate) struct Vcpu {
    pub inner: Mutex<VcpuInner>,
    /// Set (after the state changed) whenever something may have become deliverable to this
    /// vCPU; its next flush then rescans.
    pub work: AtomicBool,
    /// GICR_WAKER.ProcessorSleep.
    pub asleep: AtomicBool,
}

/// The virtual GICv3 of one VM: the state behind its distributor and redistributors, the
/// injection API for the hypervisor's interrupt sources, and the list-register flush/sync (in
/// `lr.rs`).
pub struct Vgic {
    pub(crate) vcpus: Box<[Vcpu]>,
    pub(crate) spis: Box<[Spi]>,
    /// `vintid - 32` → index into `spis`, or [`NO_SLOT`]; covers up to the highest owned SPI.
    spi_index: Box<[u16]>,
    /// `(pintid, slot)` of the SPIs mapped to hardware, sorted by pintid.
    by_pintid: Box<[(u32, u16)]>,
    /// PPIs that may be forwarded from the same physical PPI (the virtual timer).
    pub(crate) hw_ppis: u32,
    /// GICD_CTLR.EnableGrp1.
    pub(crate) grp1: AtomicBool,
    pub(crate) phys: Arc<dyn PhysIrqOps>,
    pub(crate) kick: Arc<dyn VcpuKick>,
}

impl core::fmt::Debug for Vgic {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vgic")
            .field("vcpus", &self.vcpus.len())
            .field(
                "spis",
                &self.spis.iter().map(|s| s.vintid).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn is_spi(intid: u32) -> bool {
    (FIRST_SPI..=MAX_SPI_INTID).contains(&intid)
}

impl Vgic {
    /// Builds the vGIC of one VM. Checks the configuration (vCPU count, SPI numbers, no virtual
    /// or physical SPI twice, HW PPIs are PPIs) and routes every SPI to vCPU 0 (IROUTER's reset
    /// value here is 0, vCPU 0's affinity), calling [`PhysIrqOps::route`] for the mapped ones;
    /// they stay physically disabled until the guest enables them.
    ///
    /// That no two VMs map the same physical SPI is the caller's to ensure (the board
    /// configuration assigns each physical SPI to at most one VM).
    pub fn new(
        config: &VgicConfig<'_>,
        phys: Arc<dyn PhysIrqOps>,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Arc<Self>, VgicError> {
        let nvcpus = config.vcpus;
        if !(1..=MAX_VCPUS).contains(&nvcpus) {
            return Err(VgicError::BadConfig("a VM needs 1..=256 vCPUs"));
        }
        if config.hw_ppis & 0xffff != 0 {
            return Err(VgicError::BadConfig("hw_ppis names an SGI"));
        }
        let mut spis: Vec<SpiConfig> = config.spis.to_vec();
        spis.sort_by_key(|s| s.vintid);
        if spis.windows(2).any(|w| w[0].vintid == w[1].vintid) {
            return Err(VgicError::BadConfig("a virtual SPI is listed twice"));
        }
        let mut by_pintid = Vec::new();
        for (slot, s) in spis.iter().enumerate() {
            if !is_spi(s.vintid) {
                return Err(VgicError::BadConfig("virtual SPI INTID outside 32..=1019"));
            }
            if let SpiKind::Hw { pintid } = s.kind {
                if !is_spi(pintid) {
                    return Err(VgicError::BadConfig("physical SPI INTID outside 32..=1019"));
                }
                by_pintid.push((pintid, slot as u16));
            }
        }
        by_pintid.sort_unstable();
        if by_pintid.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(VgicError::BadConfig("a physical SPI is mapped twice"));
        }
        let index_len = spis
            .last()
            .map_or(0, |s| (s.vintid - FIRST_SPI + 1) as usize);
        let mut spi_index = alloc::vec![NO_SLOT; index_len].into_boxed_slice();
        for (slot, s) in spis.iter().enumerate() {
            spi_index[(s.vintid - FIRST_SPI) as usize] = slot as u16;
        }

        let vcpus = (0..nvcpus)
            .map(|v| Vcpu {
                inner: Mutex::new(VcpuInner {
                    irqs: core::array::from_fn(|i| {
                        let intid = i as u32;
                        let hw = config.hw_ppis & (1 << intid) != 0;
                        if intid < 16 {
                            // SGIs: edge, fixed.
                            IrqState::new(true, false, None, v as u16)
                        } else {
                            // PPIs: level at reset; forwarded ones keep the physical trigger
                            // (the timer's is level).
                            IrqState::new(false, !hw, hw.then_some(intid), v as u16)
                        }
                    }),
                    shadow: LrShadow::new(),
                }),
                work: AtomicBool::new(false),
                asleep: AtomicBool::new(true),
            })
            .collect();
        let spis: Box<[Spi]> = spis
            .iter()
            .map(|s| {
                let pintid = match s.kind {
                    SpiKind::Virtual => None,
                    SpiKind::Hw { pintid } => Some(pintid),
                };
                Spi {
                    vintid: s.vintid,
                    kind: s.kind,
                    state: Mutex::new(SpiState {
                        irq: IrqState::new(s.edge, pintid.is_none(), pintid, 0),
                        irouter: u64::from(vcpu_affinity(0)),
                        target: Some(0),
                    }),
                }
            })
            .collect();
        for s in spis.iter() {
            if let SpiKind::Hw { pintid } = s.kind {
                phys.route(pintid, 0);
            }
        }
        Ok(Arc::new(Vgic {
            vcpus,
            spis,
            spi_index,
            by_pintid: by_pintid.into_boxed_slice(),
            hw_ppis: config.hw_ppis,
            grp1: AtomicBool::new(false),
            phys,
            kick,
        }))
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// The SPI with virtual INTID `vintid`, if this VM owns it.
    pub(crate) fn spi(&self, vintid: u32) -> Option<&Spi> {
        let i = vintid.checked_sub(FIRST_SPI)? as usize;
        match *self.spi_index.get(i)? {
            NO_SLOT => None,
            slot => Some(&self.spis[usize::from(slot)]),
        }
    }

    /// The highest SPI INTID this VM owns (31 when it owns none).
    pub(crate) fn max_spi(&self) -> u32 {
        self.spis.last().map_or(FIRST_SPI - 1, |s| s.vintid)
    }

    fn vcpu(&self, vcpu: usize) -> Result<&Vcpu, VgicError> {
        self.vcpus.get(vcpu).ok_or(VgicError::NoSuchVcpu)
    }

    /// Marks `vcpus` as having work and kicks them. Call with no vGIC lock held.
    pub(crate) fn notify(&self, vcpus: &VcpuSet) {
        for v in vcpus.iter() {
            self.vcpus[v].work.store(true, Ordering::Release);
            self.kick.kick(v);
        }
    }

    fn notify_one(&self, vcpu: Option<usize>) {
        if let Some(v) = vcpu {
            let mut set = VcpuSet::new();
            set.insert(v);
            self.notify(&set);
        }
    }

    /// Applies the physical side of `fx` for SPI `spi` (lock held).
    pub(crate) fn apply_phys_spi(&self, spi: &Spi, st: &SpiState, fx: &Effects) {
        if let SpiKind::Hw { pintid } = spi.kind {
            match fx.phys_enable {
                Some(true) => self.phys.enable(pintid),
                Some(false) => self.phys.disable(pintid),
                None => {}
            }
            if fx.deactivate {
                self.phys.deactivate(pintid, usize::from(st.irq.owner));
            }
        }
    }

    // ----- Injection API for the hypervisor's interrupt sources -----

    /// Makes SGI or PPI `intid` (0..32) pending on `vcpu`, as an edge: sets its latch (for a
    /// level-sensitive PPI, like a write to ISPENDR0). Kicks the vCPU if it is enabled.
    pub fn inject(&self, vcpu: usize, intid: u32) -> Result<(), VgicError> {
        if intid >= NR_PRIVATE {
            return Err(VgicError::BadIntid(intid));
        }
        let v = self.vcpu(vcpu)?;
        let deliver = {
            let mut inner = v.inner.lock();
            let irq = &mut inner.irqs[intid as usize];
            irq.latch = true;
            irq.enabled
        };
        if deliver {
            self.notify_one(Some(vcpu));
        }
        Ok(())
    }

    /// Drives the input line of level-sensitive PPI `intid` of `vcpu` (an emulated per-vCPU
    /// source). On an edge-configured PPI a rising level sets the latch.
    pub fn set_ppi_level(&self, vcpu: usize, intid: u32, level: bool) -> Result<(), VgicError> {
        if !(16..NR_PRIVATE).contains(&intid) {
            return Err(VgicError::BadIntid(intid));
        }
        if self.hw_ppis & (1 << intid) != 0 {
            return Err(VgicError::HwMapped(intid));
        }
        let v = self.vcpu(vcpu)?;
        let notify = {
            let mut inner = v.inner.lock();
            Self::drive_level(&mut inner.irqs[intid as usize], level)
        };
        if notify {
            self.notify_one(Some(vcpu));
        }
        Ok(())
    }

    /// Line change on `irq`; returns whether its vCPU must look at it.
    fn drive_level(irq: &mut IrqState, level: bool) -> bool {
        let rising = level && !irq.level;
        irq.level = level;
        if irq.edge {
            if rising {
                irq.latch = true;
            }
            return rising && irq.enabled;
        }
        // A level-sensitive line that dropped while a list register holds it as pending must
        // be taken back (unless a latched pending keeps it); one that rose must be delivered.
        (level && irq.enabled) || (!level && irq.lr.is_some())
    }

    /// The owned, purely virtual SPI `intid`, or why not.
    fn virtual_spi(&self, intid: u32) -> Result<&Spi, VgicError> {
        let spi = self.spi(intid).ok_or(VgicError::NotOwned(intid))?;
        match spi.kind {
            SpiKind::Virtual => Ok(spi),
            SpiKind::Hw { .. } => Err(VgicError::HwMapped(intid)),
        }
    }

    /// Makes the VM's virtual SPI `intid` pending (an edge; on a level-sensitive SPI, like a
    /// write to ISPENDR). It goes to the vCPU its IROUTER names. Only for SPIs the VM owns that
    /// are not mapped to hardware.
    pub fn inject_spi(&self, intid: u32) -> Result<(), VgicError> {
        let spi = self.virtual_spi(intid)?;
        let target = {
            let mut st = spi.state.lock();
            st.irq.latch = true;
            if st.irq.enabled { st.oracle() } else { None }
        };
        self.notify_one(target);
        Ok(())
    }

    /// Drives the input line of the VM's level-sensitive virtual SPI `intid` (an emulated device
    /// such as the vSMMU). On an edge-configured SPI a rising level sets the latch.
    pub fn set_level(&self, intid: u32, level: bool) -> Result<(), VgicError> {
        let spi = self.virtual_spi(intid)?;
        let target = {
            let mut st = spi.state.lock();
            if Self::drive_level(&mut st.irq, level) {
                st.oracle()
            } else {
                None
            }
        };
        self.notify_one(target);
        Ok(())
    }

    /// The physical SPI `pintid`, mapped to one of this VM's SPIs, was acknowledged by the
    /// hypervisor (and its priority dropped, not deactivated): make the virtual SPI pending with
    /// the physical one attached, so the guest's deactivation deactivates it. Returns
    /// [`VgicError::NotOwned`] (and changes nothing) if this VM does not map `pintid`; the
    /// caller must then deactivate it itself.
    pub fn inject_phys_spi(&self, pintid: u32) -> Result<(), VgicError> {
        let slot = self
            .by_pintid
            .binary_search_by_key(&pintid, |&(p, _)| p)
            .map_err(|_| VgicError::NotOwned(pintid))?;
        let spi = &self.spis[usize::from(self.by_pintid[slot].1)];
        let target = {
            let mut st = spi.state.lock();
            st.irq.latch = true;
            st.irq.phys_active = true;
            if st.irq.enabled { st.oracle() } else { None }
        };
        self.notify_one(target);
        Ok(())
    }

    /// Physical PPI `intid` of `vcpu`'s physical CPU (one named in
    /// [`VgicConfig::hw_ppis`], e.g. the virtual timer) was acknowledged by the hypervisor on
    /// that CPU and left active: make virtual PPI `intid` pending with the physical one
    /// attached (list register HW = 1, pINTID = `intid`).
    pub fn inject_phys_ppi(&self, vcpu: usize, intid: u32) -> Result<(), VgicError> {
        if !(16..NR_PRIVATE).contains(&intid) || self.hw_ppis & (1 << intid) == 0 {
            return Err(VgicError::NotOwned(intid));
        }
        let v = self.vcpu(vcpu)?;
        let deliver = {
            let mut inner = v.inner.lock();
            let irq = &mut inner.irqs[intid as usize];
            irq.latch = true;
            irq.phys_active = true;
            irq.enabled
        };
        if deliver {
            self.notify_one(Some(vcpu));
        }
        Ok(())
    }

    /// Whether `vcpu` has an interrupt pending that it could take (enabled, Group 1 enabled in
    /// GICD_CTLR), for deciding whether a trapped WFI may sleep. Ignores the guest's priority
    /// mask and running priority, so it may say yes where the guest would not take the
    /// interrupt yet; WFI may always complete early. Call it after [`Vgic::sync`].
    pub fn has_pending(&self, vcpu: usize) -> bool {
        let Ok(v) = self.vcpu(vcpu) else {
            return false;
        };
        if !self.grp1.load(Ordering::Acquire) {
            return false;
        }
        let inner = v.inner.lock();
        if inner.irqs.iter().any(|i| i.enabled && i.visible_pending()) {
            return true;
        }
        drop(inner);
        self.spis.iter().any(|s| {
            let st = s.state.lock();
            st.irq.enabled && st.irq.visible_pending() && st.oracle() == Some(vcpu)
        })
    }

    /// Gives back the physical side when the VM stops (call once no vCPU runs it any more):
    /// disables every mapped physical SPI and deactivates each physical INTID (SPI or PPI) the
    /// guest still held active.
    pub fn release_phys(&self) {
        for spi in self.spis.iter() {
            if let SpiKind::Hw { pintid } = spi.kind {
                let mut st = spi.state.lock();
                self.phys.disable(pintid);
                if st.irq.phys_active || st.irq.lr.is_some_and(|l| l.hw) {
                    st.irq.phys_active = false;
                    self.phys.deactivate(pintid, usize::from(st.irq.owner));
                }
            }
        }
        for (n, v) in self.vcpus.iter().enumerate() {
            let mut inner = v.inner.lock();
            for (intid, irq) in inner.irqs.iter_mut().enumerate() {
                if irq.phys_active || irq.lr.is_some_and(|l| l.hw) {
                    irq.phys_active = false;
                    self.phys.deactivate(intid as u32, n);
                }
            }
        }
    }

    // ----- Register-level access shared by the distributor and redistributor frames -----

    /// Reads a 32-bit bitmap register covering SPIs `first..first + 32`.
    pub(crate) fn spi_bits_read(&self, reg: BitReg, first: u32) -> u32 {
        let mut value = 0;
        for bit in 0..32 {
            if let Some(spi) = self.spi(first + bit)
                && reg.read(&spi.state.lock().irq)
            {
                value |= 1 << bit;
            }
        }
        value
    }

    /// Writes a 32-bit bitmap register covering SPIs `first..first + 32`: only owned SPIs with a
    /// 1 written change.
    pub(crate) fn spi_bits_write(&self, reg: BitReg, first: u32, value: u32) {
        let mut notify = VcpuSet::new();
        for bit in 0..32 {
            if value & (1 << bit) == 0 {
                continue;
            }
            let Some(spi) = self.spi(first + bit) else {
                continue;
            };
            let mut st = spi.state.lock();
            if reg == BitReg::SetActive && !st.irq.active && st.irq.lr.is_none() {
                // Becomes active where it is routed (or on vCPU 0 if routed nowhere).
                st.irq.owner = st.target.unwrap_or(0);
            }
            let hw = matches!(spi.kind, SpiKind::Hw { .. });
            let fx = reg.write_one(&mut st.irq, hw);
            self.apply_phys_spi(spi, &st, &fx);
            if fx.notify
                && let Some(v) = st.oracle()
            {
                notify.insert(v);
            }
        }
        self.notify(&notify);
    }

    /// Reads a bitmap register of `vcpu`'s private interrupts.
    pub(crate) fn private_bits_read(&self, vcpu: usize, reg: BitReg) -> u32 {
        let inner = self.vcpus[vcpu].inner.lock();
        (0..NR_PRIVATE)
            .filter(|&i| reg.read(&inner.irqs[i as usize]))
            .fold(0, |acc, i| acc | (1 << i))
    }

    /// Writes a bitmap register of `vcpu`'s private interrupts.
    pub(crate) fn private_bits_write(&self, vcpu: usize, reg: BitReg, value: u32) {
        let mut notify = false;
        {
            let mut inner = self.vcpus[vcpu].inner.lock();
            for intid in 0..NR_PRIVATE {
                if value & (1 << intid) == 0 {
                    continue;
                }
                let irq = &mut inner.irqs[intid as usize];
                let fx = reg.write_one(irq, false);
                if fx.deactivate {
                    self.phys.deactivate(intid, vcpu);
                }
                notify |= fx.notify;
            }
        }
        if notify {
            self.notify_one(Some(vcpu));
        }
    }

    /// Priority byte of interrupt `intid` as seen from `vcpu`'s redistributor (private) or the
    /// distributor (SPI); 0 for interrupts the VM does not have.
    pub(crate) fn priority_read(&self, vcpu: usize, intid: u32) -> u8 {
        if intid < NR_PRIVATE {
            self.vcpus[vcpu].inner.lock().irqs[intid as usize].priority
        } else {
            self.spi(intid).map_or(0, |s| s.state.lock().irq.priority)
        }
    }

    /// Writes the priority byte of `intid` (see [`Self::priority_read`]).
    pub(crate) fn priority_write(&self, vcpu: usize, intid: u32, priority: u8) {
        let priority = priority & PRIORITY_MASK;
        let target = if intid < NR_PRIVATE {
            let mut inner = self.vcpus[vcpu].inner.lock();
            let irq = &mut inner.irqs[intid as usize];
            irq.priority = priority;
            irq.busy().then_some(vcpu)
        } else if let Some(spi) = self.spi(intid) {
            let mut st = spi.state.lock();
            st.irq.priority = priority;
            if st.irq.busy() { st.oracle() } else { None }
        } else {
            None
        };
        self.notify_one(target);
    }

    /// Int_config[1] (1 = edge) of `intid`; SGIs read as edge, interrupts the VM lacks as 0.
    pub(crate) fn edge_read(&self, vcpu: usize, intid: u32) -> bool {
        if intid < NR_PRIVATE {
            self.vcpus[vcpu].inner.lock().irqs[intid as usize].edge
        } else {
            self.spi(intid).is_some_and(|s| s.state.lock().irq.edge)
        }
    }

    /// Sets Int_config[1] of `intid` where the guest may.
    pub(crate) fn edge_write(&self, vcpu: usize, intid: u32, edge: bool) {
        let target = if intid < NR_PRIVATE {
            let mut inner = self.vcpus[vcpu].inner.lock();
            let irq = &mut inner.irqs[intid as usize];
            if irq.cfg_writable && irq.edge != edge {
                irq.edge = edge;
                irq.busy().then_some(vcpu)
            } else {
                None
            }
        } else if let Some(spi) = self.spi(intid) {
            let mut st = spi.state.lock();
            if st.irq.cfg_writable && st.irq.edge != edge {
                st.irq.edge = edge;
                if st.irq.busy() { st.oracle() } else { None }
            } else {
                None
            }
        } else {
            None
        };
        self.notify_one(target);
    }

    /// GICD_IROUTER<intid> (0 for SPIs the VM does not own).
    pub(crate) fn irouter_read(&self, intid: u32) -> u64 {
        self.spi(intid).map_or(0, |s| s.state.lock().irouter)
    }

    /// Writes GICD_IROUTER<intid>: keeps Aff2..Aff0 (IRM and Aff3 are RES0: no 1-of-N routing,
    /// no Aff3), routes the SPI to the vCPU with that affinity if this VM has one (else it is
    /// routed nowhere and stays pending until rerouted), and follows with the physical routing
    /// of a mapped SPI.
    pub(crate) fn irouter_write(&self, intid: u32, value: u64) {
        let Some(spi) = self.spi(intid) else {
            return;
        };
        let nvcpus = self.vcpus.len();
        let target = {
            let mut st = spi.state.lock();
            let aff = value & 0xff_ffff;
            st.irouter = aff;
            let new = vcpu_of_affinity(aff as u32, nvcpus).map(|v| v as u16);
            let changed = new != st.target;
            st.target = new;
            if let (SpiKind::Hw { pintid }, Some(t), true) = (spi.kind, new, changed) {
                self.phys.route(pintid, usize::from(t));
            }
            if changed && st.irq.busy() {
                st.oracle()
            } else {
                None
            }
        };
        self.notify_one(target);
    }

    /// GICD_CTLR.EnableGrp1.
    pub(crate) fn set_grp1(&self, enable: bool) {
        if self.grp1.swap(enable, Ordering::AcqRel) != enable {
            let mut all = VcpuSet::new();
            (0..self.vcpus.len()).for_each(|v| all.insert(v));
            self.notify(&all);
        }
    }
}
