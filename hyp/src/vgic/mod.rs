//! The virtual GICv3 of a VM: the portable part.
//!
//! Each VM gets a [`Vgic`]: the interrupt state of its vCPUs and of the SPIs assigned to it, an
//! emulated distributor ([`Distributor`], one 64 KiB frame) and emulated redistributors
//! ([`Redistributors`], RD_base + SGI_base per vCPU) on its MMIO bus, and the logic that turns
//! that state into list-register contents of the hardware's virtual CPU interface and back
//! ([`Vgic::flush`], [`Vgic::sync`]). The guest's CPU interface is the hardware's: with
//! HCR_EL2.IMO/FMO = 1 its ICC_* system registers are the ICV_* ones, backed by the list
//! registers, so acknowledge, priority drop, deactivation, priority masking and preemption
//! need no trap. Register semantics follow IHI0069 (the GICv3/v4 architecture specification).
//!
//! # What the guest sees
//!
//! - A GICv3 with affinity routing always on and a **single Security state** (GICD_CTLR.DS = 1,
//!   as on QEMU's and KVM's virtual GICs): priorities are stored as written (no Non-secure
//!   shift), so a Linux guest's pseudo-NMI priorities mean what it thinks.
//! - **Group 1 only.** Group 0 is not implemented: GICD_CTLR.EnableGrp0 is RAZ/WI, every
//!   IGROUPR bit of the VM's interrupts is RAO/WI, IGRPMODR and NSACR are RAZ/WI, and every list
//!   register is written Group 1.
//! - SGIs 0–15 and PPIs 16–31 per vCPU; the SPIs assigned to the VM, and nothing else. No LPIs,
//!   no ITS, no extended ranges, no 1-of-N routing, no GICv2 compatibility.
//! - Priorities keep their top 5 bits ([`PRIORITY_MASK`]): the minimum the virtual CPU interface
//!   implements, so what the guest reads back is what the list registers express.
//! - vCPU i has affinity 0.0.0.i (Aff0 = i, as `VMPIDR_EL2` from [`crate::trap::mpidr_of`]);
//!   GICR_TYPER says so, with Processor_Number = i and Last on the final vCPU.
//!
//! The register-by-register tables are in the `dist` and `redist` modules, the list-register
//! semantics (edge vs level, pending while active, HW, more pending than list registers) in
//! `lr`, SGI generation in `sgi`, and the virtual timer flow in `timer`.
//!
//! # Emulated vs passed through
//!
//! Emulated (state in this module, never in hardware): the distributor and redistributor
//! registers, every SGI, every PPI's configuration and state, every SPI's enable, priority,
//! trigger, routing, pending and active state.
//!
//! Passed through: the CPU interface (list registers, as above), and the *occurrences* of the
//! physical interrupts assigned to the VM: an SPI of a device the VM owns (SPI "mapped to
//! hardware", [`SpiKind::Hw`]) and the virtual timer's PPI ([`VgicConfig::hw_ppis`]). The
//! hypervisor takes such an interrupt at EL2, acknowledges it without deactivating it, and hands
//! it to [`Vgic::inject_phys_spi`] / [`Vgic::inject_phys_ppi`]; the vGIC puts it in a list
//! register with HW = 1, so the guest's deactivation deactivates the physical interrupt. For a
//! mapped SPI the guest's enable and routing also reach the physical SPI, through
//! [`PhysIrqOps`]: ISENABLER/ICENABLER → `enable`/`disable`, IROUTER → `route` (to the
//! physical CPU of the named vCPU). Priority and trigger are not forwarded: the physical
//! priority is the hypervisor's (it only orders the hypervisor's own handling), the guest's
//! priority lives in the list register, and the physical trigger is fixed by the board (the
//! guest sees it read-only in ICFGR).
//!
//! # Isolation: why a guest cannot touch other VMs' interrupts
//!
//! - The guest names interrupts only by *virtual* INTID, through its own distributor and
//!   redistributors. Each per-INTID access looks the INTID up in the VM's own table (the SPIs
//!   given at construction) and skips what is not there: another VM's SPI, the hypervisor's
//!   SPIs, SPIs nobody has — they read as zero and ignore writes, and nothing else happens.
//!   SGIs and PPIs are this VM's vCPUs' own state; PPI accesses never reach hardware except
//!   deactivating an occurrence of a forwarded PPI (the virtual timer) that the hypervisor
//!   acknowledged *for this vCPU*.
//! - The physical side is reached only through [`PhysIrqOps`], and only with a physical INTID
//!   taken from the VM's fixed table (the SPI mapped to a virtual SPI the guest owns) or a
//!   configured forwarded PPI — never a number the guest wrote — and only with a vCPU index
//!   of this VM (IROUTER values that name no vCPU of the VM route nowhere and leave the
//!   physical routing as it was).
//! - SGIs (ICC_SGI1R_EL1) reach only vCPUs of this VM ([`Sgi1r::targets`]); IRM = 1 means the
//!   VM's other vCPUs.
//! - [`Vgic::inject_phys_spi`] refuses a physical INTID the VM does not map, so the arch
//!   layer's dispatch cannot mis-deliver either.
//! - State is per VM: no lock, table or atomic is shared between two VMs' vGICs, so one VM
//!   cannot even slow another's interrupt handling down by contention.
//!
//! That no two VMs map the same physical SPI, and that the hypervisor's own interrupts are not
//! among the mapped ones, is the board configuration's job (checked where it is built).
//!
//! # Concurrency
//!
//! [`Vgic`] is shared (`Arc`) by the VM's vCPUs, its emulated devices and the interrupt handlers.
//! Each vCPU's private interrupts are behind that vCPU's spin lock, each SPI behind its own (see
//! `state`). A vCPU's flush and sync take its own lock and then each SPI lock briefly. Anything
//! that may make an interrupt deliverable to vCPU v (an injection, a guest write from any vCPU,
//! a reroute, a sync that hands an SPI on) marks v as having work and calls [`VcpuKick::kick`]
//! after the state change, with no lock held; v's next flush rescans. A vCPU with no work and
//! nothing in its list registers skips the scan.
//!
//! # What the arch layer does (and the traits it implements)
//!
//! Traits: [`ListRegs`] (`ICH_LR<n>_EL2`, ICH_HCR_EL2, ICH_MISR_EL2, ICH_ELRSR_EL2, ICH_VTR_EL2 of the
//! current CPU), [`PhysIrqOps`] (physical GIC: enable, disable, route, deactivate), [`VcpuKick`]
//! (make a vCPU re-evaluate its interrupts). Then:
//!
//! 1. **Build**: [`Vgic::new`] with the VM's vCPU count and SPIs; register
//!    [`Distributor::new`] at the GICD IPA ([`GICD_SIZE`]) and [`Redistributors::new`] at the
//!    GICR IPA ([`Redistributors::size`]) on the VM's MMIO bus; the guest DT's GIC node must
//!    describe those windows. Configure each mapped physical SPI (Group 1, the hypervisor's
//!    priority, its trigger) and leave it disabled: the guest's enable enables it.
//! 2. **Per CPU**: ICC_SRE_EL2.Enable = 1 and SRE = 1; HCR_EL2.IMO = FMO = 1; EL2 CPU interface
//!    with ICC_CTLR_EL1.EOImode = 1 (EOIR drops priority only; the hypervisor deactivates its own
//!    interrupts with ICC_DIR_EL1, and leaves forwarded ones active for the guest); the
//!    maintenance PPI ([`MAINTENANCE_PPI`]) and the virtual timer PPI ([`VTIMER_PPI`]) enabled in
//!    the physical redistributor; ICH_VMCR_EL2 reset (the guest programs it through ICV_*).
//!    With static partitioning the ICH_* registers (VMCR, APRs, LRs, HCR) stay in the CPU: no
//!    save/restore.
//! 3. **Run loop** on vCPU v: [`Vgic::flush`] right before entering the guest; [`Vgic::sync`]
//!    right after every exit, before handling it. Physical IRQ taken at EL2:
//!    - the maintenance interrupt: nothing more (sync + flush re-derive everything and clear
//!      its cause); deactivate it after the flush (or keep PSTATE.I set until entry);
//!    - the virtual timer PPI: EOIR (no deactivation) and `inject_phys_ppi(v, 27)` (see `timer`);
//!    - an SPI mapped to a VM: EOIR (no deactivation) and that VM's `inject_phys_spi(pintid)`
//!      (if it fails, deactivate it with ICC_DIR_EL1);
//!    - the kick SGI: EOIR + DIR, nothing more.
//!
//!    Trapped ICC_SGI1R_EL1 write (EC 0x18): [`Vgic::write_sgi1r`]; ICC_SGI0R_EL1 and
//!    ICC_ASGI1R_EL1 writes are ignored. Trapped WFI: sleep only if not
//!    [`Vgic::has_pending`] (and no [`vtimer_asserted`]), until a kick or a physical interrupt.
//! 4. **Kick** ([`VcpuKick::kick`]): if v runs its guest on another CPU, send that CPU the kick
//!    SGI (it exits, syncs, flushes); if it waits in WFI, wake it; if it is the caller's own
//!    vCPU, nothing (its flush comes before it re-enters the guest). A kick that arrives while
//!    the target is between exit and entry must still force an exit once it enters (a pending
//!    physical SGI does that by itself).
//! 5. **Stop**: [`Vgic::release_phys`] once no vCPU of the VM runs.

mod dist;
mod lr;
mod redist;
mod sgi;
mod state;
mod timer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use core::fmt;

pub use dist::{CTLR_ARE, CTLR_DS, CTLR_ENABLE_GRP1, Distributor, GICD_SIZE, IIDR};
pub use lr::{
    ICH_HCR_EN, ICH_HCR_LRENPIE, ICH_HCR_NPIE, ICH_HCR_UIE, ICH_MISR_EOI, ICH_MISR_LRENP,
    ICH_MISR_NP, ICH_MISR_U, ListRegs, Lr, LrState, MAX_LRS, num_lrs_from_vtr,
};
pub use redist::{
    GICR_FRAME_SIZE, GICR_STRIDE, Redistributors, TYPER_LAST, WAKER_CHILDREN_ASLEEP,
    WAKER_PROCESSOR_SLEEP,
};
pub use sgi::Sgi1r;
pub use state::{FIRST_SPI, NR_PRIVATE, PRIORITY_MASK, Vgic};
pub use timer::{
    CNTV_CTL_ENABLE, CNTV_CTL_IMASK, CNTV_CTL_ISTATUS, MAINTENANCE_PPI, PTIMER_PPI, VTIMER_PPI,
    vtimer_asserted,
};

/// Largest VM: Aff0 (= vCPU index) is 8 bits wide.
pub const MAX_VCPUS: usize = crate::trap::MAX_VCPUS;
/// Highest SPI INTID (1020–1023 are special).
pub const MAX_SPI_INTID: u32 = 1019;

/// The physical GIC, as far as one VM's mapped interrupts need it. Implemented by the arch layer
/// (one instance per VM, knowing which physical CPU runs each of its vCPUs). The vGIC calls it
/// only with a physical INTID from the VM's own configuration (see "Isolation" in the module
/// docs), with that interrupt's vGIC lock held: implementations must not call back into the
/// vGIC, and should be quick (a few MMIO writes).
pub trait PhysIrqOps: Send + Sync {
    /// Enables physical SPI `pintid` (GICD_ISENABLER): the guest enabled its virtual SPI.
    fn enable(&self, pintid: u32);
    /// Disables physical SPI `pintid` (GICD_ICENABLER): the guest disabled its virtual SPI, or the
    /// VM stops.
    fn disable(&self, pintid: u32);
    /// Routes physical SPI `pintid` (GICD_IROUTER) to the physical CPU that runs vCPU `vcpu` of
    /// this VM: the guest routed its virtual SPI there (also called once at construction, for
    /// vCPU 0).
    fn route(&self, pintid: u32, vcpu: usize);
    /// Deactivates physical INTID `pintid`, which the hypervisor acknowledged on the guest's
    /// behalf and left active, when the guest's deactivation will not (the guest cleared the
    /// virtual interrupt's pending or active state through the distributor or redistributor, or
    /// the VM stops). An SPI: in the distributor (GICD_ICACTIVER); a PPI: in the redistributor
    /// of the physical CPU that runs vCPU `vcpu` (GICR_ICACTIVER0).
    fn deactivate(&self, pintid: u32, vcpu: usize);
}

/// Makes a vCPU notice that its interrupt state changed (see step 4 in the module docs).
/// Called with no vGIC lock held, from any CPU.
pub trait VcpuKick: Send + Sync {
    /// vCPU `vcpu` of this VM has work: it must flush before it next runs the guest, and if it
    /// is running the guest or waiting in WFI it must exit or wake.
    fn kick(&self, vcpu: usize);
}

/// One SPI assigned to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpiConfig {
    /// The INTID the guest sees (32..=1019).
    pub vintid: u32,
    pub kind: SpiKind,
    /// Initial trigger: edge (true) or level. For a mapped SPI, the physical trigger (read-only
    /// for the guest).
    pub edge: bool,
}

/// Where an SPI's occurrences come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpiKind {
    /// An emulated source in the hypervisor (e.g. the vSMMU): [`Vgic::inject_spi`],
    /// [`Vgic::set_level`].
    Virtual,
    /// Physical SPI `pintid` of a device assigned to the VM: [`Vgic::inject_phys_spi`].
    Hw { pintid: u32 },
}

/// What [`Vgic::new`] builds.
#[derive(Clone, Copy, Debug)]
pub struct VgicConfig<'a> {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: usize,
    /// The SPIs the VM owns; every other SPI does not exist for it.
    pub spis: &'a [SpiConfig],
    /// PPIs (bit n = INTID n, 16..=31) the arch layer forwards from the same physical PPI with
    /// [`Vgic::inject_phys_ppi`]: read-only level trigger for the guest. Default: the virtual
    /// timer.
    pub hw_ppis: u32,
}

impl<'a> VgicConfig<'a> {
    /// `vcpus` vCPUs, the SPIs `spis`, the virtual timer forwarded.
    pub const fn new(vcpus: usize, spis: &'a [SpiConfig]) -> Self {
        VgicConfig {
            vcpus,
            spis,
            hw_ppis: 1 << VTIMER_PPI,
        }
    }
}

/// Why a vGIC call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VgicError {
    /// [`Vgic::new`]: the configuration is invalid.
    BadConfig(&'static str),
    /// No such vCPU in this VM.
    NoSuchVcpu,
    /// The INTID is not of the kind the call takes.
    BadIntid(u32),
    /// The VM does not own this (virtual or physical) INTID.
    NotOwned(u32),
    /// The interrupt is mapped to hardware; software cannot drive it.
    HwMapped(u32),
}

impl fmt::Display for VgicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VgicError::BadConfig(why) => write!(f, "bad vGIC configuration: {why}"),
            VgicError::NoSuchVcpu => f.write_str("no such vCPU"),
            VgicError::BadIntid(i) => write!(f, "INTID {i} is not valid here"),
            VgicError::NotOwned(i) => write!(f, "INTID {i} is not the VM's"),
            VgicError::HwMapped(i) => write!(f, "INTID {i} is mapped to hardware"),
        }
    }
}

/// GIC affinity (Aff3.Aff2.Aff1.Aff0, as in GICR_TYPER\[63:32\]) of vCPU `vcpu`.
pub fn vcpu_affinity(vcpu: usize) -> u32 {
    let mpidr = crate::trap::mpidr_of(vcpu);
    (((mpidr >> 8) & 0xff00_0000) | (mpidr & 0xff_ffff)) as u32
}

/// The vCPU of a VM with `nvcpus` vCPUs whose affinity is `aff` (see [`vcpu_affinity`]).
pub fn vcpu_of_affinity(aff: u32, nvcpus: usize) -> Option<usize> {
    // vCPU i is 0.0.0.i.
    let v = aff as usize;
    (v < nvcpus.min(MAX_VCPUS)).then_some(v)
}

/// A set of vCPUs of one VM.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuSet([u64; MAX_VCPUS / 64]);

impl VcpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        VcpuSet([0; MAX_VCPUS / 64])
    }

    /// Adds vCPU `v` (< [`MAX_VCPUS`]).
    pub fn insert(&mut self, v: usize) {
        self.0[v / 64] |= 1 << (v % 64);
    }

    /// Whether vCPU `v` is in the set.
    pub fn contains(&self, v: usize) -> bool {
        v < MAX_VCPUS && self.0[v / 64] & (1 << (v % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The vCPUs in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            core::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + b)
            })
        })
    }
}

impl fmt::Debug for VcpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}
