//! The VM's filtered view of PCI configuration space: an emulated ECAM window.
//!
//! A VM sees only the PCI functions its board entry assigns to it. The hypervisor traps every
//! access to the VM's ECAM window and answers it here: functions that are not the VM's read as
//! absent (all ones, so vendor ID 0xFFFF) and ignore writes; the VM's own functions are read from
//! the physical configuration space ([`ConfigSpace`]) and written through a filter, so a guest can
//! neither reprogram another function, nor move its own BARs, nor change the bus numbering that
//! stream IDs depend on.
//!
//! # Window
//!
//! The window covers buses `bus_start..=bus_end` ([`EcamWindow`]); an offset decodes as
//! `(bus - bus_start) << 20 | device << 15 | function << 12 | register`. Bus numbers are not
//! renumbered: the guest's BDF is the physical BDF, which is also what its devices' stream IDs
//! are derived from. Accesses are 1, 2 or 4 bytes, naturally aligned (anything else is an
//! [`MmioError`], which the trap layer turns into an abort).
//!
//! # BAR model
//!
//! BARs are placed by the hypervisor, once, and never move while the VM exists:
//!
//! * [`VirtEcam::new`] turns decoding and bus mastering off in each assigned function (the state a
//!   function has after reset), turns off its expansion ROM, MSI and MSI-X, and probes its BARs
//!   (that is the only time BAR registers are written with all-ones in hardware, with decoding
//!   off).
//! * [`VirtEcam::assign_bars`] (or [`VirtEcam::assign_bars_from`] with an allocator shared by all
//!   VMs) keeps a BAR that firmware placed inside the host bridge's MEM32 window, page aligned and
//!   clear of every BAR placed before it, and programs every other memory BAR into free space in
//!   that window. Every BAR is given whole 4 KiB pages of its own (size and alignment at least
//!   4 KiB), so no page of one VM's BAR can hold another VM's registers. 64-bit BARs are placed
//!   below 4 GiB too.
//! * The guest reads the BAR values the hypervisor chose: guest-physical BAR address ==
//!   physical BAR address (IPA == PA), so guest drivers need no translation. BAR writes never
//!   reach hardware. Writing all-ones to the address bits starts sizing (the BAR then reads back
//!   its size mask, as hardware would); any other write ends sizing and is otherwise ignored, so
//!   the BAR keeps reading its fixed address. A guest can size its BARs but cannot move one onto
//!   another VM's memory or device. Linux guests must therefore not reassign resources
//!   (`linux,pci-probe-only` in the guest DT's `/chosen`, or `pci=nobar`-like setups).
//! * Stage 2 follows Memory Space Enable: when the guest sets Command.MSE the function's memory
//!   BARs are mapped into the VM ([`BarMapper::map_bar`], IPA = PA, rounded up to whole pages),
//!   when it clears it they are unmapped ([`BarMapper::unmap_bar`]). Until the BARs have been
//!   assigned, MSE is filtered out and never reaches hardware.
//! * I/O BARs are hidden (read as 0, unimplemented) and I/O Space Enable is filtered: guests get
//!   no port I/O. The expansion ROM BAR reads as 0 (no ROM) and ignores writes.
//!
//! # Write filter of an assigned function
//!
//! | register | guest writes |
//! |---|---|
//! | Command | Memory Space, Bus Master, Parity Error Response, SERR# Enable and INTx Disable pass through (bus mastering is safe: the device's DMA is translated by the VM's SMMU context); I/O Space, Special Cycles, MWI, VGA snoop and Fast Back-to-Back are written as 0 |
//! | Status | the RW1C error bits pass through (clearing the function's own error flags) |
//! | Cache Line Size, Latency Timer, Interrupt Line | pass through (no effect on other functions) |
//! | BAR0..5 | emulated, see above |
//! | Expansion ROM, BIST, everything else in the header | dropped |
//! | PCI Express capability | Device Control passes through except Initiate FLR (an FLR would clear the BARs the hypervisor placed) and Max Payload Size (the fabric's setting, kept at the hardware value); the RW1C bits of Device Status pass through; everything else is read-only |
//! | Power Management capability | PMCSR PowerState (only transitions the spec allows to states the function supports; others keep the current state), Data_Select and PME_Status (RW1C) pass through; PME_En keeps its hardware value (PME messages go to the root port, which is the host's) |
//! | other capabilities, extended configuration space | read-only |
//!
//! Bits the filter removes are written as 0 (every register forwarded above treats 0 in those
//! bits as "no change": reserved, read-only or RW1C) or, for Max Payload Size and PME_En, as the
//! current hardware value. Bridges (type 1 headers) can never be assigned, so no guest ever
//! reaches bus number registers, and a function's own header has none.
//!
//! # Capabilities
//!
//! Guests get no MSI yet (the GIC ITS is not virtualised): the MSI and MSI-X capabilities are
//! unlinked from the capability list (the previous capability's next pointer, or the header's
//! capabilities pointer, skips them), read as 0, and their enables are off in hardware. Status
//! bit 4 (capability list) reads as 0 when nothing visible is left. Guests use INTx. The Power
//! Management capability stays visible and its PMCSR is writable (see the filter above), so
//! guests can put their functions into D3hot.
//!
//! A D3hot to D0 transition of a function whose PMCSR No_Soft_Reset bit is 0 resets it
//! internally: BARs, Command and Device Control return to their defaults. The guest restores its
//! own state afterwards, but its BAR writes never reach hardware, so the hypervisor puts the BARs
//! (and Max Payload Size) back itself. It cannot do that at once: the function needs 10 ms before
//! it answers configuration accesses again, a delay the guest observes before its next access.
//! So the restore happens at the guest's next access to the function, before that access; until
//! the BARs read back right, Memory Space Enable is filtered as before [`VirtEcam::assign_bars`].
//!
//! # Activity (SMMU power)
//!
//! The SMMU in front of the functions is powered only while some master behind it is active
//! (`power::activity`). A function is *active* while Command.BME is set in hardware and it is
//! in D0 (always, without a Power Management capability: then only BME counts). With a sink
//! attached ([`VirtEcam::set_activity`]), every configuration write that changes that is
//! reported once:
//!
//! * Turning active is reported **before** the write reaches hardware, so the SMMU is powered
//!   before the function can issue its first request. If powering up fails, the function stays
//!   inactive and bus mastering stays off in hardware: the write goes through without BME (a
//!   D0 transition of a function with BME set clears BME first). The guest reads BME back as 0,
//!   as from a function that cannot master, and can retry by setting it again. Letting the
//!   device master with its SMMU unpowered is not an option: depending on the SoC its requests
//!   would fault on the interconnect or hang it, none of which the guest could recover from.
//! * Turning inactive (BME cleared, a lower-power D-state, [`VirtEcam::quiesce`]) is reported
//!   **after** the write reached hardware, once the function can no longer start requests.
//!   Requests already in flight are the sink's concern (runtime PM does not power down at once).
//!
//! Which state counts is what hardware holds: BME is read back after each Command write (a
//! function that hardwires it to 0 never turns active for long), the D-state is the one last
//! written (PMCSR is not read back: a function is not accessible for 10 ms after a D3hot
//! transition).
//!
//! # Concurrency
//!
//! Each assigned function has its own lock (BAR sizing state, whether its BARs are mapped, its
//! activity); accesses to different functions never contend, and unassigned functions take no
//! lock. The [`BarMapper`] and the [`ActivitySink`] are called with the function's lock held, so
//! the stage-2 map and the reported activity follow the hardware registers in order, exactly once
//! per transition; they must not access this device.
//!
//! # Not done
//!
//! FLR and other resets that clear BARs are not supported (FLR is filtered), except the soft
//! reset of a D3hot -> D0 transition (see Capabilities). Functions > 0 of a device are only found
//! by most guests when function 0 is also assigned. SR-IOV, ATS and PRI capabilities are
//! read-only, so a guest cannot enable them.

use core::fmt;

use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use crate::config::PciFunction;
use crate::power::activity::ActivitySink;
use crate::trap::{MmioDevice, MmioError};

/// The physical configuration space (the lead implements it with ECAM MMIO).
///
/// `bdf` is the requester ID (`bus << 8 | device << 3 | function`), `offset` a register offset in
/// the function's 4 KiB configuration space, `size` 1, 2 or 4, naturally aligned. Reads of absent
/// functions return all ones.
pub trait ConfigSpace: Send + Sync {
    fn read(&self, bdf: u16, offset: u16, size: u8) -> u32;
    fn write(&self, bdf: u16, offset: u16, size: u8, value: u32);
}

/// Reflects a function's BAR decoding in the VM's stage 2.
///
/// `pa` and `size` are page aligned (the BAR's address and its size rounded up to 4 KiB); the BAR
/// appears in the VM at IPA = `pa`. Called from the trap path of the vCPU that wrote the Command
/// register, with the function's lock held: implementations must not access the [`VirtEcam`].
pub trait BarMapper: Send + Sync {
    /// The guest enabled memory decoding: map `pa..pa + size` into the VM at the same IPA.
    fn map_bar(&self, bdf: u16, bar_index: u8, pa: u64, size: u64);
    /// The guest disabled memory decoding: unmap it again (with TLB invalidation).
    fn unmap_bar(&self, bdf: u16, bar_index: u8, pa: u64, size: u64);
}

/// The buses an ECAM window covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamWindow {
    pub bus_start: u8,
    pub bus_end: u8,
}

impl EcamWindow {
    /// Bytes of the window: 1 MiB per bus.
    pub const fn size(&self) -> u64 {
        ((self.bus_end as u64).saturating_sub(self.bus_start as u64) + 1) << 20
    }

    /// Whether `bus` lies in the window.
    pub const fn contains_bus(&self, bus: u8) -> bool {
        self.bus_start <= bus && bus <= self.bus_end
    }
}

/// Why a [`VirtEcam`] could not be built or its BARs placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcamError {
    /// `bus_start > bus_end`.
    BadWindow { bus_start: u8, bus_end: u8 },
    /// The function's bus is outside the window.
    BusOutOfRange { bdf: u16 },
    /// Nothing answers at this BDF.
    NoSuchFunction { bdf: u16 },
    /// Only type 0 headers (endpoints) can be assigned; bridges never are.
    NotAnEndpoint { bdf: u16, header_type: u8 },
    /// The function is listed twice.
    Duplicate { bdf: u16 },
    /// No room left in the MEM32 window for this BAR.
    WindowFull { bdf: u16, bar: u8, size: u64 },
    /// The function is not one of the VM's.
    NotAssigned { bdf: u16 },
}

/// A BDF printed as `bb:dd.f`.
struct Bdf(u16);

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}.{}", b >> 8, (b >> 3) & 0x1f, b & 7)
    }
}

impl fmt::Display for EcamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EcamError::BadWindow { bus_start, bus_end } => {
                write!(f, "bad bus range {bus_start:#x}..={bus_end:#x}")
            }
            EcamError::BusOutOfRange { bdf } => {
                write!(f, "PCI function {} is outside the ECAM bus range", Bdf(bdf))
            }
            EcamError::NoSuchFunction { bdf } => write!(f, "no PCI function at {}", Bdf(bdf)),
            EcamError::NotAnEndpoint { bdf, header_type } => write!(
                f,
                "PCI function {} has header type {header_type:#x}: only endpoints can be assigned",
                Bdf(bdf)
            ),
            EcamError::Duplicate { bdf } => {
                write!(f, "PCI function {} is assigned twice", Bdf(bdf))
            }
            EcamError::WindowFull { bdf, bar, size } => write!(
                f,
                "no room in the PCI MEM32 window for {} BAR{bar} ({size:#x} bytes)",
                Bdf(bdf)
            ),
            EcamError::NotAssigned { bdf } => {
                write!(f, "PCI function {} is not assigned to this VM", Bdf(bdf))
            }
        }
    }
}

/// A memory BAR as placed for a VM: `size` bytes of registers at physical (and guest-physical)
/// address `pa`; stage 2 maps [`BarRegion::map_size`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub bdf: u16,
    pub index: u8,
    pub pa: u64,
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

impl BarRegion {
    /// Bytes stage 2 maps for this BAR: its size rounded up to whole 4 KiB pages.
    pub const fn map_size(&self) -> u64 {
        page_span(self.size)
    }
}

const PAGE: u64 = 4096;

/// Size and alignment a BAR occupies: at least one page (BAR sizes are powers of two).
const fn page_span(size: u64) -> u64 {
    if size < PAGE { PAGE } else { size }
}

/// First-fit allocator of naturally aligned, page-granular ranges in the host bridge's MEM32
/// window. Use one for all VMs so their BARs never overlap.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    base: u64,
    end: u64,
    /// Occupied `(start, end)` ranges, sorted, disjoint.
    used: Vec<(u64, u64)>,
}

impl BarAllocator {
    /// An allocator for `base..base + size` (from the host bridge's `ranges`, MEM32 space).
    pub fn new(base: u64, size: u64) -> Self {
        BarAllocator {
            base,
            end: base.saturating_add(size),
            used: Vec::new(),
        }
    }

    fn insert(&mut self, start: u64, end: u64) {
        let at = self.used.partition_point(|&(s, _)| s < start);
        self.used.insert(at, (start, end));
    }

    /// Claims `pa..pa + size` if it lies inside the window and nothing claimed it before.
    pub fn reserve(&mut self, pa: u64, size: u64) -> bool {
        let Some(end) = pa.checked_add(size) else {
            return false;
        };
        if size == 0 || pa < self.base || end > self.end {
            return false;
        }
        if self.used.iter().any(|&(s, e)| pa < e && s < end) {
            return false;
        }
        self.insert(pa, end);
        true
    }

    /// Claims `size` bytes (a power of two) aligned to `size`, or `None` if nothing fits.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let mut at = self.base.checked_next_multiple_of(size)?;
        for &(s, e) in &self.used {
            if at.checked_add(size)? <= s {
                break;
            }
            if at < e {
                at = e.checked_next_multiple_of(size)?;
            }
        }
        if at.checked_add(size)? > self.end {
            return None;
        }
        self.insert(at, at + size);
        Some(at)
    }
}

/// Configuration-space register offsets and bits (PCI Local Bus 3.0, PCIe Base 4.0 ch. 7).
mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const CACHE_LINE: u16 = 0x0c;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    pub const BAR5: u16 = 0x24;
    pub const ROM: u16 = 0x30;
    pub const CAP_PTR: u16 = 0x34;
    pub const RESERVED_38: u16 = 0x38;
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// First byte after the type 0 header: where capabilities may live.
    pub const CAPS_START: u16 = 0x40;
    /// Start of PCIe extended configuration space.
    pub const EXT_START: u16 = 0x100;

    pub const CMD_IO: u32 = 1 << 0;
    pub const CMD_MEMORY: u32 = 1 << 1;
    pub const CMD_BUS_MASTER: u32 = 1 << 2;
    pub const CMD_PARITY: u32 = 1 << 6;
    pub const CMD_SERR: u32 = 1 << 8;
    pub const CMD_INTX_DISABLE: u32 = 1 << 10;
    /// Command bits a guest controls.
    pub const CMD_GUEST: u32 =
        CMD_MEMORY | CMD_BUS_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE;
    // Port I/O is never the guest's.
    const _: () = assert!(CMD_GUEST & CMD_IO == 0);
    /// Status: capabilities list present.
    pub const STATUS_CAP_LIST: u32 = 1 << 4;
    /// Status RW1C error bits: master data parity error, signalled/received target abort,
    /// received master abort, signalled system error, detected parity error.
    pub const STATUS_W1C: u32 = (1 << 8) | (0x1f << 11);

    pub const BAR_IO: u32 = 1 << 0;
    pub const BAR_TYPE_MASK: u32 = 3 << 1;
    pub const BAR_TYPE_64: u32 = 2 << 1;
    pub const BAR_PREFETCH: u32 = 1 << 3;

    pub const CAP_ID_PM: u8 = 0x01;
    pub const CAP_ID_MSI: u8 = 0x05;
    pub const CAP_ID_PCIE: u8 = 0x10;
    pub const CAP_ID_MSIX: u8 = 0x11;
    /// MSI Message Control: enable, 64-bit address, per-vector masking.
    pub const MSI_ENABLE: u16 = 1 << 0;
    pub const MSI_64BIT: u16 = 1 << 7;
    pub const MSI_MASKING: u16 = 1 << 8;
    /// MSI-X Message Control: enable.
    pub const MSIX_ENABLE: u16 = 1 << 15;
    pub const MSIX_LEN: u8 = 12;

    /// PCIe capability: Device Control / Device Status dword.
    pub const PCIE_DEVCTL: u16 = 0x08;
    /// Device Control: Max Payload Size (kept at the hardware value).
    pub const DEVCTL_MPS: u32 = 7 << 5;
    /// Device Control: Initiate Function Level Reset (filtered).
    pub const DEVCTL_FLR: u32 = 1 << 15;
    /// Device Status RW1C bits: correctable/non-fatal/fatal/unsupported request detected.
    pub const DEVSTA_W1C: u32 = 0xf;

    /// Power Management capability (PCI PM 1.2): PMCSR, after the header and PMC.
    pub const PM_PMCSR: u16 = 0x04;
    /// PMC: D1 and D2 supported.
    pub const PMC_D1: u16 = 1 << 9;
    pub const PMC_D2: u16 = 1 << 10;
    /// PMCSR: PowerState (D0 = 0, D1, D2, D3hot = 3).
    pub const PMCSR_STATE: u32 = 3;
    /// PMCSR: the function keeps its state on D3hot -> D0 (otherwise it resets internally).
    pub const PMCSR_NO_SOFT_RESET: u32 = 1 << 3;
    /// PMCSR: PME_En (kept at the hardware value).
    pub const PMCSR_PME_EN: u32 = 1 << 8;
    /// PMCSR: Data_Select.
    pub const PMCSR_DATA_SELECT: u32 = 0xf << 9;
    /// PMCSR: PME_Status (RW1C).
    pub const PMCSR_PME_STATUS: u32 = 1 << 15;
    pub const D0: u8 = 0;
    pub const D3HOT: u8 = 3;
}

/// All ones in the low `size` bytes (1, 2 or 4).
const fn lane_mask(size: u8) -> u32 {
    u32::MAX >> (32 - size as u32 * 8)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarKind {
    /// Unimplemented, or hidden (I/O BARs).
    None,
    Mem32,
    /// The low half of a 64-bit memory BAR; the next slot is its [`BarKind::Mem64Hi`].
    Mem64,
    Mem64Hi,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    kind: BarKind,
    /// The BAR's size in bytes (a power of two); 0 when unimplemented.
    size: u64,
    /// Its physical (= guest-physical) address; 0 until placed.
    pa: u64,
    /// The read-only low bits of the BAR register (type, prefetchable).
    flags: u32,
}

impl Bar {
    const NONE: Bar = Bar {
        kind: BarKind::None,
        size: 0,
        pa: 0,
        flags: 0,
    };

    fn is_mem(&self) -> bool {
        matches!(self.kind, BarKind::Mem32 | BarKind::Mem64) && self.size != 0
    }
}

/// A capability in the standard list.
#[derive(Clone, Copy, Debug)]
struct Cap {
    offset: u8,
    id: u8,
    /// Bytes zeroed in the guest's view when hidden.
    len: u8,
    hidden: bool,
}

/// What the guest can change about a function.
struct FnState {
    /// BARs being sized: they read back their size mask.
    sizing: [bool; 6],
    /// Whether the memory BARs are mapped into the VM (Command.MSE as last seen in hardware).
    mapped: bool,
    /// Command.BME as last seen in hardware.
    bme: bool,
    /// PMCSR PowerState as last written (D0 without a PM capability).
    power: u8,
    /// Whether the function is active, as last reported to its sink (tracked without one too).
    active: bool,
    /// The function went through a soft reset (D3hot -> D0): its BARs must be restored before
    /// anything else reaches it.
    reset_pending: bool,
}

impl FnState {
    /// Whether the function can master, from the hardware state.
    fn can_master(&self) -> bool {
        self.bme && self.power == reg::D0
    }
}

/// A visible Power Management capability.
#[derive(Clone, Copy, Debug)]
struct PmCap {
    /// Offset of PMCSR.
    pmcsr: u16,
    d1: bool,
    d2: bool,
    /// D3hot -> D0 keeps the function's state (no internal reset).
    no_soft_reset: bool,
}

impl PmCap {
    /// Whether a function in `from` can be put into `to` (PCI PM 1.2, 5.4): back to D0 always,
    /// otherwise only deeper, and only into a state the function supports.
    fn allows(&self, from: u8, to: u8) -> bool {
        let supported = match to {
            1 => self.d1,
            2 => self.d2,
            _ => true,
        };
        to == from || to == reg::D0 || (to > from && supported)
    }
}

struct Function {
    bdf: u16,
    bars: [Bar; 6],
    /// Set once every memory BAR has a place; until then MSE is filtered.
    bars_placed: bool,
    caps: Vec<Cap>,
    /// Offset of the PCI Express capability, if visible.
    pcie: Option<u16>,
    /// Device Control Max Payload Size as found (restored after a soft reset).
    mps: u32,
    /// The Power Management capability, if any.
    pm: Option<PmCap>,
    /// Told when the function turns active or inactive.
    activity: Option<Arc<dyn ActivitySink>>,
    state: Mutex<FnState>,
}

impl Function {
    /// Offset of the first visible capability, 0 if none.
    fn first_visible_cap(&self) -> u8 {
        self.caps.iter().find(|c| !c.hidden).map_or(0, |c| c.offset)
    }

    /// The guest's next pointer of visible capability `i`.
    fn next_visible_cap(&self, i: usize) -> u8 {
        self.caps[i + 1..]
            .iter()
            .find(|c| !c.hidden)
            .map_or(0, |c| c.offset)
    }
}

/// The emulated ECAM window of one VM. Register it on the VM's bus with [`EcamWindow::size`]
/// bytes at the IPA of the host bridge's `reg` in the guest DT.
pub struct VirtEcam {
    phys: Arc<dyn ConfigSpace>,
    mapper: Arc<dyn BarMapper>,
    window: EcamWindow,
    /// The VM's functions, sorted by BDF.
    functions: Vec<Function>,
}

impl VirtEcam {
    /// The filtered view of `functions` (the VM's assignment) in `window`.
    ///
    /// Checks that every function exists, is an endpoint and is listed once; then puts each into
    /// its reset state (decoding, bus mastering, expansion ROM, MSI and MSI-X off) and probes its
    /// BARs and capabilities. Call [`VirtEcam::assign_bars`] before the VM runs.
    pub fn new(
        phys: Arc<dyn ConfigSpace>,
        functions: &[PciFunction],
        window: EcamWindow,
        mapper: Arc<dyn BarMapper>,
    ) -> Result<Self, EcamError> {
        if window.bus_start > window.bus_end {
            return Err(EcamError::BadWindow {
                bus_start: window.bus_start,
                bus_end: window.bus_end,
            });
        }
        let mut bdfs: Vec<u16> = functions.iter().map(PciFunction::bdf).collect();
        bdfs.sort_unstable();
        if let Some(w) = bdfs.windows(2).find(|w| w[0] == w[1]) {
            return Err(EcamError::Duplicate { bdf: w[0] });
        }
        // Check everything before touching any hardware.
        for &bdf in &bdfs {
            if !window.contains_bus((bdf >> 8) as u8) {
                return Err(EcamError::BusOutOfRange { bdf });
            }
            if phys.read(bdf, reg::VENDOR_ID, 2) == 0xffff {
                return Err(EcamError::NoSuchFunction { bdf });
            }
            let header_type = phys.read(bdf, reg::HEADER_TYPE, 1) as u8;
            if header_type & 0x7f != 0 {
                return Err(EcamError::NotAnEndpoint { bdf, header_type });
            }
        }
        let functions = bdfs.iter().map(|&bdf| probe(&*phys, bdf)).collect();
        Ok(VirtEcam {
            phys,
            mapper,
            window,
            functions,
        })
    }

    /// The window this device emulates.
    pub fn window(&self) -> EcamWindow {
        self.window
    }

    /// Places the memory BARs of the VM's functions in the MEM32 window `(base, size)` and
    /// returns them. Only for a single VM with PCI functions: with several, use
    /// [`VirtEcam::assign_bars_from`] with one allocator for all of them.
    pub fn assign_bars(&mut self, window: (u64, u64)) -> Result<Vec<BarRegion>, EcamError> {
        self.assign_bars_from(&mut BarAllocator::new(window.0, window.1))
    }

    /// Places the memory BARs of the VM's functions with `alloc` and returns them (IPA = PA).
    ///
    /// A BAR firmware placed is kept when it lies inside the allocator's window, is aligned to its
    /// page span and overlaps nothing placed before; every other one is given free space and
    /// programmed in hardware (decoding is off). The caller must check that the returned ranges do
    /// not collide with the VM's other IPAs (RAM, devices); stage 2 maps them when the guest
    /// enables memory decoding.
    pub fn assign_bars_from(
        &mut self,
        alloc: &mut BarAllocator,
    ) -> Result<Vec<BarRegion>, EcamError> {
        // First claim what firmware placed, so fresh allocations go around it.
        let keep: Vec<[bool; 6]> = self
            .functions
            .iter()
            .map(|f| {
                f.bars.map(|bar| {
                    let span = page_span(bar.size);
                    bar.is_mem()
                        && bar.pa != 0
                        && bar.pa.is_multiple_of(span)
                        && alloc.reserve(bar.pa, span)
                })
            })
            .collect();
        let mut placed = Vec::new();
        for (kept, f) in keep.iter().zip(&mut self.functions) {
            let bdf = f.bdf;
            for (i, (bar, &kept)) in f.bars.iter_mut().zip(kept).enumerate() {
                if !bar.is_mem() {
                    continue;
                }
                if !kept {
                    let pa = alloc
                        .alloc(page_span(bar.size))
                        .ok_or(EcamError::WindowFull {
                            bdf,
                            bar: i as u8,
                            size: bar.size,
                        })?;
                    let off = reg::BAR0 + 4 * i as u16;
                    self.phys.write(bdf, off, 4, pa as u32);
                    if bar.kind == BarKind::Mem64 {
                        self.phys.write(bdf, off + 4, 4, (pa >> 32) as u32);
                    }
                    bar.pa = pa;
                }
                placed.push(BarRegion {
                    bdf,
                    index: i as u8,
                    pa: bar.pa,
                    size: bar.size,
                    is_64bit: bar.kind == BarKind::Mem64,
                    prefetchable: bar.flags & reg::BAR_PREFETCH != 0,
                });
            }
            f.bars_placed = true;
        }
        Ok(placed)
    }

    /// Stops every function of the VM (decoding and bus mastering off, BARs unmapped, reported
    /// inactive), e.g. when the VM stops, so its devices cannot DMA any more.
    pub fn quiesce(&self) {
        for f in &self.functions {
            let mut st = f.state.lock();
            self.phys.write(f.bdf, reg::COMMAND, 2, 0);
            self.sync_command(f, &mut st);
        }
    }

    /// Reports the activity of assigned function `bdf` to `sink` from now on (replacing any
    /// sink set before). Call it before the VM runs: the function is then inactive (`new` turned
    /// bus mastering off), so the sink's first call is the guest's first transition. Should the
    /// function already be active, the sink is told so at once; if that fails, bus mastering is
    /// turned off as for a failed power-up during a write.
    pub fn set_activity(&mut self, bdf: u16, sink: Arc<dyn ActivitySink>) -> Result<(), EcamError> {
        let i = self
            .functions
            .binary_search_by_key(&bdf, |f| f.bdf)
            .map_err(|_| EcamError::NotAssigned { bdf })?;
        let f = &mut self.functions[i];
        f.activity = Some(sink);
        let f = &self.functions[i];
        let mut st = f.state.lock();
        if st.active && !self.activate(f) {
            self.bme_off(f, &mut st);
            st.active = false;
        }
        Ok(())
    }

    /// Whether assigned function `bdf` is active (bus master in D0), `None` if it is not the
    /// VM's.
    pub fn is_active(&self, bdf: u16) -> Option<bool> {
        self.function(bdf).map(|f| f.state.lock().active)
    }

    fn function(&self, bdf: u16) -> Option<&Function> {
        self.functions
            .binary_search_by_key(&bdf, |f| f.bdf)
            .ok()
            .map(|i| &self.functions[i])
    }

    /// Tells `f`'s sink it turned active; `false` if powering its SMMU failed. Without a sink
    /// nothing can fail.
    fn activate(&self, f: &Function) -> bool {
        let Some(sink) = &f.activity else {
            return true;
        };
        match sink.set_active(true) {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "PCI {}: SMMU power-up failed, bus mastering stays off: {e}",
                    Bdf(f.bdf)
                );
                false
            }
        }
    }

    /// Reports `f` inactive if it was active and can no longer master.
    fn sync_activity(&self, f: &Function, st: &mut FnState) {
        if st.active && !st.can_master() {
            if let Some(Err(e)) = f.activity.as_ref().map(|s| s.set_active(false)) {
                // Only turning active can fail; the function is inactive either way.
                log::warn!("PCI {}: SMMU power-down: {e}", Bdf(f.bdf));
            }
            st.active = false;
        }
    }

    /// Clears Command.BME in hardware, leaving the other Command bits as they are.
    fn bme_off(&self, f: &Function, st: &mut FnState) {
        let cmd = self.phys.read(f.bdf, reg::COMMAND, 2);
        self.phys
            .write(f.bdf, reg::COMMAND, 2, cmd & !reg::CMD_BUS_MASTER);
        st.bme = false;
    }

    /// Puts back what a soft reset (D3hot -> D0 without No_Soft_Reset) cleared and the guest
    /// cannot restore itself: the BAR addresses and Max Payload Size. Retried at every access
    /// until the BARs read back right (the function may still have been recovering).
    fn restore_after_reset(&self, f: &Function, st: &mut FnState) {
        let mut ok = true;
        let mut put = |off: u16, value: u32, expect: u32| {
            self.phys.write(f.bdf, off, 4, value);
            ok &= self.phys.read(f.bdf, off, 4) == expect;
        };
        for (i, bar) in f.bars.iter().enumerate() {
            if !bar.is_mem() {
                continue;
            }
            let off = reg::BAR0 + 4 * i as u16;
            let lo = bar.pa as u32 & !0xf;
            put(off, lo, lo | bar.flags);
            if bar.kind == BarKind::Mem64 {
                let hi = (bar.pa >> 32) as u32;
                put(off + 4, hi, hi);
            }
        }
        if let Some(pcie) = f.pcie {
            let off = pcie + reg::PCIE_DEVCTL;
            let devctl = self.phys.read(f.bdf, off, 2);
            let devctl = (devctl & !(reg::DEVCTL_MPS | reg::DEVCTL_FLR)) | f.mps;
            self.phys.write(f.bdf, off, 2, devctl);
        }
        st.reset_pending = !ok;
    }

    /// Decodes a window offset into `(bdf, register)`, checking size and alignment.
    fn decode(&self, offset: u64, size: u8) -> Result<(u16, u16), MmioError> {
        if !matches!(size, 1 | 2 | 4) {
            return Err(MmioError::BadSize { size });
        }
        if !offset.is_multiple_of(u64::from(size)) || offset >= self.window.size() {
            return Err(MmioError::BadOffset { offset });
        }
        // `offset` is below the window size, so the bus fits in a u8 after adding bus_start.
        let bus = u64::from(self.window.bus_start) + (offset >> 20);
        let devfn = (offset >> 12) & 0xff;
        Ok((((bus << 8) | devfn) as u16, (offset & 0xfff) as u16))
    }

    /// Reads `size` bytes at register `offset` of `bdf` as the VM sees them.
    pub fn config_read(&self, bdf: u16, offset: u16, size: u8) -> u32 {
        let Some(f) = self.function(bdf) else {
            return lane_mask(size);
        };
        let dword = offset & !3;
        let shift = u32::from(offset & 3) * 8;
        let mut st = f.state.lock();
        if st.reset_pending {
            self.restore_after_reset(f, &mut st);
        }
        (self.view(f, &st, dword) >> shift) & lane_mask(size)
    }

    /// The guest's view of the aligned dword at `dword`.
    fn view(&self, f: &Function, st: &FnState, dword: u16) -> u32 {
        let hw = || self.phys.read(f.bdf, dword, 4);
        match dword {
            reg::COMMAND => {
                let v = hw() & !(reg::STATUS_CAP_LIST << 16);
                if f.first_visible_cap() != 0 {
                    v | (reg::STATUS_CAP_LIST << 16)
                } else {
                    v
                }
            }
            reg::BAR0..=reg::BAR5 => bar_view(f, st, usize::from((dword - reg::BAR0) / 4)),
            reg::ROM | reg::RESERVED_38 => 0,
            reg::CAP_PTR => u32::from(f.first_visible_cap()),
            reg::CAPS_START..reg::EXT_START => {
                let mut v = hw();
                for (i, cap) in f.caps.iter().enumerate() {
                    let start = u16::from(cap.offset);
                    if cap.hidden {
                        // Zero the bytes of the hidden capability inside this dword.
                        let end = start + u16::from(cap.len);
                        for b in 0..4 {
                            if (start..end).contains(&(dword + b)) {
                                v &= !(0xff << (b * 8));
                            }
                        }
                    } else if start & !3 == dword {
                        // The next pointer is the capability's second byte.
                        let b = (start & 3) + 1;
                        v = (v & !(0xff << (b * 8)))
                            | (u32::from(f.next_visible_cap(i)) << (b * 8));
                    }
                }
                v
            }
            _ => hw(),
        }
    }

    /// Writes `size` bytes of `value` at register `offset` of `bdf` through the VM's filter.
    pub fn config_write(&self, bdf: u16, offset: u16, size: u8, value: u32) {
        let Some(f) = self.function(bdf) else {
            return;
        };
        let w = Lanes::new(offset, size);
        let (dword, bytes) = (w.dword, w.bytes);
        let value = (value & lane_mask(size)) << w.shift;
        let mut st = f.state.lock();
        if st.reset_pending {
            self.restore_after_reset(f, &mut st);
        }
        let forward = |value, allowed, keep_from_hw| {
            self.forward(f, &w, value, allowed, keep_from_hw);
        };
        match dword {
            reg::COMMAND => {
                let mut cmd = reg::CMD_GUEST;
                if !f.bars_placed || st.reset_pending {
                    cmd &= !reg::CMD_MEMORY;
                }
                // Setting BME in D0 turns the function active: power its SMMU first.
                let sets_bme = bytes & value & reg::CMD_BUS_MASTER != 0;
                if sets_bme && st.power == reg::D0 && !st.active {
                    if self.activate(f) {
                        st.active = true;
                    } else {
                        cmd &= !reg::CMD_BUS_MASTER;
                    }
                }
                forward(value, cmd | (reg::STATUS_W1C << 16), 0);
                if bytes & 0xffff != 0 {
                    self.sync_command(f, &mut st);
                }
            }
            reg::CACHE_LINE => forward(value, 0xffff, 0),
            reg::INTERRUPT_LINE => forward(value, 0xff, 0),
            reg::BAR0..=reg::BAR5 => {
                let i = usize::from((dword - reg::BAR0) / 4);
                let new = (bar_view(f, &st, i) & !bytes) | value;
                match f.bars[i].kind {
                    BarKind::None => {}
                    BarKind::Mem32 | BarKind::Mem64 => {
                        st.sizing[i] = new | 0xf == u32::MAX;
                    }
                    BarKind::Mem64Hi => st.sizing[i] = new == u32::MAX,
                }
            }
            _ if f.pcie.map(|p| p + reg::PCIE_DEVCTL) == Some(dword) => forward(
                value,
                (!(reg::DEVCTL_MPS | reg::DEVCTL_FLR) & 0xffff) | (reg::DEVSTA_W1C << 16),
                reg::DEVCTL_MPS,
            ),
            _ if f.pm.is_some_and(|pm| pm.pmcsr == dword) => {
                self.write_pmcsr(f, &mut st, &w, value);
            }
            // The rest of the header, capabilities and extended space: read-only.
            _ => {}
        }
    }

    /// Writes the written bytes of `w` to hardware: the `allowed` bits of `value` (the guest's,
    /// in its lanes of the dword), and the `keep_from_hw` bits as hardware has them.
    fn forward(&self, f: &Function, w: &Lanes, value: u32, allowed: u32, keep_from_hw: u32) {
        let mut v = value & allowed;
        if keep_from_hw & w.bytes != 0 {
            v |= self.phys.read(f.bdf, w.dword, 4) & keep_from_hw;
        }
        self.phys
            .write(f.bdf, w.offset, w.size, (v & w.bytes) >> w.shift);
    }

    /// A guest write to the PMCSR dword of `f` (`value` in its lanes): D-state changes, and the
    /// activity and soft-reset bookkeeping that comes with them.
    fn write_pmcsr(&self, f: &Function, st: &mut FnState, w: &Lanes, value: u32) {
        let Some(pm) = f.pm else {
            return;
        };
        let from = st.power;
        let mut to = from;
        if w.bytes & reg::PMCSR_STATE != 0 {
            let asked = (value & reg::PMCSR_STATE) as u8;
            if pm.allows(from, asked) {
                to = asked;
            }
        }
        // A refused state is written as the current one: no transition, and the state we
        // believe the function is in stays the one it has.
        let value = (value & !reg::PMCSR_STATE) | u32::from(to);
        let soft_reset = from == reg::D3HOT && to == reg::D0 && !pm.no_soft_reset;
        // Back to D0 with BME kept: active again, so power the SMMU first; if that fails, bus
        // mastering goes off before the function can use it.
        if to == reg::D0 && st.bme && !soft_reset && !st.active {
            if self.activate(f) {
                st.active = true;
            } else {
                self.bme_off(f, st);
            }
        }
        self.forward(
            f,
            w,
            value,
            reg::PMCSR_STATE | reg::PMCSR_DATA_SELECT | reg::PMCSR_PME_STATUS,
            reg::PMCSR_PME_EN,
        );
        st.power = to;
        if soft_reset {
            // Command is 0 now. The function must not be accessed for 10 ms, so nothing is read
            // back: its BARs are restored at the guest's next access (which comes after that).
            st.bme = false;
            st.reset_pending = true;
            self.set_mapped(f, st, false);
        }
        self.sync_activity(f, st);
    }

    /// Brings the stage-2 mapping of `f`'s BARs and its activity in line with the Command
    /// register in hardware (MSE and BME).
    fn sync_command(&self, f: &Function, st: &mut FnState) {
        let cmd = self.phys.read(f.bdf, reg::COMMAND, 2);
        self.set_mapped(f, st, cmd & reg::CMD_MEMORY != 0);
        st.bme = cmd & reg::CMD_BUS_MASTER != 0;
        self.sync_activity(f, st);
    }

    /// Maps or unmaps `f`'s memory BARs in stage 2, as memory decoding is now on or off.
    fn set_mapped(&self, f: &Function, st: &mut FnState, mse: bool) {
        if mse == st.mapped {
            return;
        }
        for (i, bar) in f.bars.iter().enumerate() {
            if bar.is_mem() && bar.pa != 0 {
                let span = page_span(bar.size);
                if mse {
                    self.mapper.map_bar(f.bdf, i as u8, bar.pa, span);
                } else {
                    self.mapper.unmap_bar(f.bdf, i as u8, bar.pa, span);
                }
            }
        }
        st.mapped = mse;
    }
}

/// Where a configuration access falls in its dword.
struct Lanes {
    offset: u16,
    size: u8,
    /// The aligned dword holding it.
    dword: u16,
    /// Bit position of its first byte in the dword.
    shift: u32,
    /// The bits of the dword it covers.
    bytes: u32,
}

impl Lanes {
    fn new(offset: u16, size: u8) -> Self {
        let shift = u32::from(offset & 3) * 8;
        Lanes {
            offset,
            size,
            dword: offset & !3,
            shift,
            bytes: lane_mask(size) << shift,
        }
    }
}

/// The guest's view of BAR register `i`.
fn bar_view(f: &Function, st: &FnState, i: usize) -> u32 {
    let bar = f.bars[i];
    match bar.kind {
        BarKind::None => 0,
        BarKind::Mem32 | BarKind::Mem64 => {
            let addr = if st.sizing[i] {
                !(bar.size - 1)
            } else {
                bar.pa
            };
            (addr as u32 & !0xf) | bar.flags
        }
        BarKind::Mem64Hi => {
            let lo = f.bars[i - 1];
            if st.sizing[i] {
                (!(lo.size - 1) >> 32) as u32
            } else {
                (lo.pa >> 32) as u32
            }
        }
    }
}

/// Puts `bdf` into its reset state and reads its BARs and capabilities.
fn probe(phys: &dyn ConfigSpace, bdf: u16) -> Function {
    // Decoding off before BARs are written; no bus mastering until the guest asks for it.
    phys.write(bdf, reg::COMMAND, 2, 0);
    phys.write(bdf, reg::ROM, 4, 0);

    let mut bars = [Bar::NONE; 6];
    let mut i = 0;
    while i < 6 {
        let off = reg::BAR0 + 4 * i as u16;
        let orig = phys.read(bdf, off, 4);
        phys.write(bdf, off, 4, u32::MAX);
        let mask = phys.read(bdf, off, 4);
        phys.write(bdf, off, 4, orig);
        if orig & reg::BAR_IO != 0 {
            // Hidden: guests get no port I/O.
            i += 1;
            continue;
        }
        let flags = orig & 0xf;
        if flags & reg::BAR_TYPE_MASK == reg::BAR_TYPE_64 && i < 5 {
            let orig_hi = phys.read(bdf, off + 4, 4);
            phys.write(bdf, off + 4, 4, u32::MAX);
            let mask_hi = phys.read(bdf, off + 4, 4);
            phys.write(bdf, off + 4, 4, orig_hi);
            let mask64 = (u64::from(mask_hi) << 32) | u64::from(mask & !0xf);
            if mask64 != 0 {
                bars[i] = Bar {
                    kind: BarKind::Mem64,
                    size: (!mask64).wrapping_add(1),
                    pa: (u64::from(orig_hi) << 32) | u64::from(orig & !0xf),
                    flags,
                };
                bars[i + 1] = Bar {
                    kind: BarKind::Mem64Hi,
                    ..Bar::NONE
                };
            }
            i += 2;
            continue;
        }
        let mask32 = mask & !0xf;
        if flags & reg::BAR_TYPE_MASK == 0 && mask32 != 0 {
            bars[i] = Bar {
                kind: BarKind::Mem32,
                size: u64::from((!mask32).wrapping_add(1)),
                pa: u64::from(orig & !0xf),
                flags,
            };
        }
        i += 1;
    }

    let mut caps = Vec::new();
    let mut pm = None;
    let mut power = reg::D0;
    if (phys.read(bdf, reg::STATUS, 2) & reg::STATUS_CAP_LIST) != 0 {
        let mut ptr = phys.read(bdf, reg::CAP_PTR, 1) as u8 & 0xfc;
        // At most 48 capabilities fit in 0x40..0x100; the bound also stops a looping list.
        while ptr >= reg::CAPS_START as u8 && caps.len() < 48 {
            let hdr = phys.read(bdf, u16::from(ptr), 4);
            let id = hdr as u8;
            let ctrl = (hdr >> 16) as u16;
            let (hidden, len) = match id {
                reg::CAP_ID_MSI => {
                    phys.write(
                        bdf,
                        u16::from(ptr) + 2,
                        2,
                        u32::from(ctrl & !reg::MSI_ENABLE),
                    );
                    let mut len = 10;
                    if ctrl & reg::MSI_64BIT != 0 {
                        len += 4;
                    }
                    if ctrl & reg::MSI_MASKING != 0 {
                        len += 10;
                    }
                    (true, len)
                }
                reg::CAP_ID_MSIX => {
                    phys.write(
                        bdf,
                        u16::from(ptr) + 2,
                        2,
                        u32::from(ctrl & !reg::MSIX_ENABLE),
                    );
                    (true, reg::MSIX_LEN)
                }
                reg::CAP_ID_PM if pm.is_none() => {
                    let pmcsr = u16::from(ptr) + reg::PM_PMCSR;
                    let csr = phys.read(bdf, pmcsr, 2);
                    pm = Some(PmCap {
                        pmcsr,
                        d1: ctrl & reg::PMC_D1 != 0,
                        d2: ctrl & reg::PMC_D2 != 0,
                        no_soft_reset: csr & reg::PMCSR_NO_SOFT_RESET != 0,
                    });
                    power = (csr & reg::PMCSR_STATE) as u8;
                    (false, 0)
                }
                _ => (false, 0),
            };
            caps.push(Cap {
                offset: ptr,
                id,
                len,
                hidden,
            });
            ptr = (hdr >> 8) as u8 & 0xfc;
        }
    }
    let pcie = caps
        .iter()
        .find(|c| c.id == reg::CAP_ID_PCIE && !c.hidden)
        .map(|c| u16::from(c.offset));
    let mps = pcie.map_or(0, |p| {
        phys.read(bdf, p + reg::PCIE_DEVCTL, 2) & reg::DEVCTL_MPS
    });

    Function {
        bdf,
        bars,
        bars_placed: false,
        caps,
        pcie,
        mps,
        pm,
        activity: None,
        state: Mutex::new(FnState {
            sizing: [false; 6],
            mapped: false,
            bme: false,
            power,
            active: false,
            reset_pending: false,
        }),
    }
}

impl MmioDevice for VirtEcam {
    fn name(&self) -> &str {
        "pci-ecam"
    }

    fn read(&self, _vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
        let (bdf, reg) = self.decode(offset, size)?;
        Ok(u64::from(self.config_read(bdf, reg, size)))
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let (bdf, reg) = self.decode(offset, size)?;
        self.config_write(bdf, reg, size, value as u32);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::power::PowerError;
    use alloc::collections::BTreeMap;
    use alloc::vec;
    use core::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex as StdMutex;

    /// One fake function: config bytes, which bits are writable and which are RW1C.
    #[derive(Clone)]
    struct FakeFn {
        cfg: [u8; 4096],
        wmask: [u8; 4096],
        w1c: [u8; 4096],
    }

    impl FakeFn {
        fn new(vendor: u16, device: u16, class: u32, header_type: u8) -> Self {
            let mut f = FakeFn {
                cfg: [0; 4096],
                wmask: [0; 4096],
                w1c: [0; 4096],
            };
            f.set(0x00, 2, u32::from(vendor));
            f.set(0x02, 2, u32::from(device));
            f.set(0x08, 4, class << 8 | 0x10);
            f.set(0x0e, 1, u32::from(header_type));
            // Command: I/O, memory, bus master, MWI, parity, SERR, INTx disable.
            f.wmask(0x04, 2, 0x0557);
            f.w1c(0x06, 2, 0xf900);
            f.wmask(0x0c, 2, 0xffff);
            f.wmask(0x0f, 1, 0x40);
            f.wmask(0x3c, 1, 0xff);
            f
        }

        fn set(&mut self, off: usize, size: usize, v: u32) {
            for i in 0..size {
                self.cfg[off + i] = (v >> (8 * i)) as u8;
            }
        }

        fn get(&self, off: usize, size: usize) -> u32 {
            (0..size).fold(0, |v, i| v | u32::from(self.cfg[off + i]) << (8 * i))
        }

        fn wmask(&mut self, off: usize, size: usize, v: u32) {
            for i in 0..size {
                self.wmask[off + i] = (v >> (8 * i)) as u8;
            }
        }

        fn w1c(&mut self, off: usize, size: usize, v: u32) {
            for i in 0..size {
                self.w1c[off + i] = (v >> (8 * i)) as u8;
            }
        }

        fn bar32(mut self, i: usize, size: u32, flags: u32, pa: u32) -> Self {
            let off = 0x10 + 4 * i;
            self.set(off, 4, pa | flags);
            self.wmask(off, 4, !(size - 1) & !0xf);
            self
        }

        fn bar64(mut self, i: usize, size: u64, prefetch: bool, pa: u64) -> Self {
            let off = 0x10 + 4 * i;
            let flags = 0b100 | if prefetch { 0b1000 } else { 0 };
            self.set(off, 4, pa as u32 | flags);
            self.set(off + 4, 4, (pa >> 32) as u32);
            let mask = !(size - 1);
            self.wmask(off, 4, mask as u32 & !0xf);
            self.wmask(off + 4, 4, (mask >> 32) as u32);
            self
        }

        fn io_bar(mut self, i: usize, size: u32) -> Self {
            let off = 0x10 + 4 * i;
            self.set(off, 4, 0xc000 | 1);
            self.wmask(off, 4, !(size - 1) & !0x3);
            self
        }

        /// Adds a capability at `off` with `len` bytes of (read-only) body pattern.
        fn cap(mut self, off: usize, id: u8, next: u8, ctrl: u16) -> Self {
            if self.cfg[0x34] == 0 {
                self.cfg[0x34] = off as u8;
            }
            self.cfg[0x06] |= 0x10;
            self.set(
                off,
                4,
                u32::from(id) | u32::from(next) << 8 | u32::from(ctrl) << 16,
            );
            self
        }
    }

    type Write = (u16, u16, u8, u32);

    #[derive(Default)]
    struct FakeConfig {
        fns: StdMutex<BTreeMap<u16, FakeFn>>,
        writes: StdMutex<Vec<Write>>,
    }

    impl FakeConfig {
        fn with(&self, bdf: u16, f: FakeFn) {
            self.fns.lock().unwrap().insert(bdf, f);
        }

        fn hw(&self, bdf: u16, off: usize, size: usize) -> u32 {
            self.fns.lock().unwrap()[&bdf].get(off, size)
        }

        fn writes_to(&self, bdf: u16) -> Vec<Write> {
            self.writes
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|w| w.0 == bdf)
                .collect()
        }

        fn clear_log(&self) {
            self.writes.lock().unwrap().clear();
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read(&self, bdf: u16, offset: u16, size: u8) -> u32 {
            assert!(matches!(size, 1 | 2 | 4) && offset.is_multiple_of(u16::from(size)));
            match self.fns.lock().unwrap().get(&bdf) {
                Some(f) => f.get(usize::from(offset), usize::from(size)),
                None => lane_mask(size),
            }
        }

        fn write(&self, bdf: u16, offset: u16, size: u8, value: u32) {
            assert!(matches!(size, 1 | 2 | 4) && offset.is_multiple_of(u16::from(size)));
            assert_eq!(value & !lane_mask(size), 0, "value wider than the access");
            self.writes.lock().unwrap().push((bdf, offset, size, value));
            if let Some(f) = self.fns.lock().unwrap().get_mut(&bdf) {
                for i in 0..usize::from(size) {
                    let a = usize::from(offset) + i;
                    let b = (value >> (8 * i)) as u8;
                    f.cfg[a] = (f.cfg[a] & !f.wmask[a]) | (b & f.wmask[a]);
                    f.cfg[a] &= !(b & f.w1c[a]);
                }
            }
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum MapEvent {
        Map(u16, u8, u64, u64),
        Unmap(u16, u8, u64, u64),
    }

    #[derive(Default)]
    struct Mapper(StdMutex<Vec<MapEvent>>);

    impl Mapper {
        fn take(&self) -> Vec<MapEvent> {
            core::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl BarMapper for Mapper {
        fn map_bar(&self, bdf: u16, bar_index: u8, pa: u64, size: u64) {
            self.0
                .lock()
                .unwrap()
                .push(MapEvent::Map(bdf, bar_index, pa, size));
        }
        fn unmap_bar(&self, bdf: u16, bar_index: u8, pa: u64, size: u64) {
            self.0
                .lock()
                .unwrap()
                .push(MapEvent::Unmap(bdf, bar_index, pa, size));
        }
    }

    const EDU: u16 = 0x0008; // 00:01.0
    const BRIDGE: u16 = 0x0010; // 00:02.0
    const NVME: u16 = 0x0018; // 00:03.0
    const OTHER: u16 = 0x0020; // 00:04.0, another VM's
    const ON_BUS1: u16 = 0x0100; // 01:00.0
    const MEM32: (u64, u64) = (0x1000_0000, 0x2eff_0000);

    fn pf(bus: u8, device: u8, function: u8) -> PciFunction {
        PciFunction {
            bus,
            device,
            function,
        }
    }

    /// edu-like endpoint: BAR0 1 MiB 32-bit, unassigned; MSI (64-bit, enabled) -> PCIe ->
    /// MSI-X (enabled) -> power management. Bus mastering left on by "firmware".
    fn edu() -> FakeFn {
        let mut f = FakeFn::new(0x1234, 0x11e8, 0x00ff00, 0)
            .bar32(0, 1 << 20, 0, 0)
            .cap(0x40, reg::CAP_ID_MSI, 0x50, 0x0081)
            .cap(0x50, reg::CAP_ID_PCIE, 0x80, 0x0002)
            .cap(0x80, reg::CAP_ID_MSIX, 0x90, 0x8000)
            .cap(0x90, 0x01, 0x00, 0x0003);
        f.set(0x04, 2, 0x0006);
        f.set(0x3d, 1, 1); // INTA
        // MSI address/data, readable in hardware.
        f.set(0x44, 4, 0x0809_0040);
        f.set(0x4c, 2, 0x1234);
        f.wmask(0x42, 2, 0x0071);
        // MSI-X table offset/BIR and enable.
        f.set(0x84, 4, 0x2000);
        f.wmask(0x82, 2, 0xc000);
        // PCIe: Device Control (MPS 256 bytes set by the host), Device Status, Link Control.
        f.set(0x58, 2, 0x2830);
        f.wmask(0x58, 2, 0xffff);
        f.w1c(0x5a, 2, 0x000f);
        f.set(0x5a, 2, 0x0005);
        f.wmask(0x60, 2, 0x0fff);
        f
    }

    /// nvme-like endpoint: BAR0 64-bit 16 KiB at a firmware address, BAR2 256 B 32-bit
    /// prefetchable unassigned, BAR4 I/O, an enabled expansion ROM, no capabilities.
    fn nvme() -> FakeFn {
        let mut f = FakeFn::new(0x8086, 0x5845, 0x010802, 0x80)
            .bar64(0, 0x4000, false, 0x1010_0000)
            .bar32(2, 0x100, 0b1000, 0)
            .io_bar(4, 0x100);
        f.set(0x30, 4, 0x1020_0001);
        f.wmask(0x30, 4, 0xffff_0001);
        f
    }

    fn bridge() -> FakeFn {
        let mut f = FakeFn::new(0x1b36, 0x000c, 0x060400, 1);
        // Primary, secondary, subordinate bus numbers.
        f.wmask(0x18, 4, 0x00ff_ffff);
        f.set(0x18, 4, 0x0001_0100);
        f
    }

    fn machine() -> Arc<FakeConfig> {
        let phys = Arc::new(FakeConfig::default());
        phys.with(EDU, edu());
        phys.with(BRIDGE, bridge());
        phys.with(NVME, nvme());
        phys.with(
            OTHER,
            FakeFn::new(0x1af4, 0x1000, 0x020000, 0).bar32(0, 0x1000, 0, 0x1000_0000),
        );
        phys.with(ON_BUS1, FakeFn::new(0x1af4, 0x1001, 0x010000, 0));
        phys
    }

    const WINDOW: EcamWindow = EcamWindow {
        bus_start: 0,
        bus_end: 1,
    };

    fn vm(phys: &Arc<FakeConfig>) -> (VirtEcam, Arc<Mapper>) {
        let mapper = Arc::new(Mapper::default());
        let ecam = VirtEcam::new(
            phys.clone(),
            &[pf(0, 3, 0), pf(0, 1, 0)],
            WINDOW,
            mapper.clone(),
        )
        .unwrap();
        (ecam, mapper)
    }

    fn ecam_offset(bdf: u16, reg: u16) -> u64 {
        (u64::from(bdf) << 12) | u64::from(reg)
    }

    fn rd(e: &VirtEcam, bdf: u16, reg: u16, size: u8) -> u32 {
        e.read(0, ecam_offset(bdf, reg), size).unwrap() as u32
    }

    fn wr(e: &VirtEcam, bdf: u16, reg: u16, size: u8, v: u32) {
        e.write(0, ecam_offset(bdf, reg), size, u64::from(v))
            .unwrap();
    }

    /// The guest's capability list as (offset, id).
    fn guest_caps(e: &VirtEcam, bdf: u16) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        if rd(e, bdf, reg::STATUS, 2) & reg::STATUS_CAP_LIST == 0 {
            return out;
        }
        let mut p = rd(e, bdf, reg::CAP_PTR, 1) as u16;
        while p != 0 {
            out.push((p as u8, rd(e, bdf, p, 1) as u8));
            p = rd(e, bdf, p + 1, 1) as u16;
        }
        out
    }

    #[test]
    fn absent_and_foreign_functions_read_all_ones() {
        let phys = machine();
        let (e, _) = vm(&phys);
        phys.clear_log();
        // Nothing there at all; another VM's function; a bridge; a function on bus 1.
        for bdf in [0x0000, 0x00f8, OTHER, BRIDGE, ON_BUS1] {
            assert_eq!(rd(&e, bdf, 0, 2), 0xffff, "vendor of {bdf:#x}");
            assert_eq!(rd(&e, bdf, 0, 4), 0xffff_ffff);
            assert_eq!(rd(&e, bdf, 0x0e, 1), 0xff);
            assert_eq!(rd(&e, bdf, 0x10, 4), 0xffff_ffff);
            assert_eq!(rd(&e, bdf, 0x100, 4), 0xffff_ffff);
            wr(&e, bdf, reg::COMMAND, 2, 0x0007);
            wr(&e, bdf, 0x10, 4, 0x2000_0000);
            wr(&e, bdf, 0x18, 4, 0x00ff_0500);
        }
        assert!(phys.writes.lock().unwrap().is_empty());
        // The bridge's bus numbers and the other VM's BAR are untouched.
        assert_eq!(phys.hw(BRIDGE, 0x18, 4), 0x0001_0100);
        assert_eq!(phys.hw(OTHER, 0x10, 4), 0x1000_0000);
        // The VM's own functions are there.
        assert_eq!(rd(&e, EDU, 0, 4), 0x11e8_1234);
        assert_eq!(rd(&e, NVME, 0, 2), 0x8086);
        assert_eq!(rd(&e, NVME, 0x0e, 1), 0x80);
        assert_eq!(rd(&e, EDU, 0x09, 1), 0x00);
        assert_eq!(rd(&e, EDU, 0x0a, 2), 0x00ff);
        assert_eq!(rd(&e, EDU, 0x3d, 1), 1);
    }

    #[test]
    fn construction_checks_and_resets() {
        let phys = machine();
        let mapper = Arc::new(Mapper::default());
        let new = |fns: &[PciFunction], window| {
            VirtEcam::new(phys.clone(), fns, window, mapper.clone()).map(|_| ())
        };
        assert_eq!(
            new(&[pf(0, 2, 0)], WINDOW),
            Err(EcamError::NotAnEndpoint {
                bdf: BRIDGE,
                header_type: 1
            })
        );
        assert_eq!(
            new(&[pf(0, 5, 0)], WINDOW),
            Err(EcamError::NoSuchFunction { bdf: 0x28 })
        );
        assert_eq!(
            new(&[pf(0, 1, 0), pf(0, 1, 0)], WINDOW),
            Err(EcamError::Duplicate { bdf: EDU })
        );
        assert_eq!(
            new(&[pf(2, 0, 0)], WINDOW),
            Err(EcamError::BusOutOfRange { bdf: 0x200 })
        );
        assert_eq!(
            new(
                &[],
                EcamWindow {
                    bus_start: 3,
                    bus_end: 2
                }
            ),
            Err(EcamError::BadWindow {
                bus_start: 3,
                bus_end: 2
            })
        );
        // Failed constructions touched no hardware.
        assert!(phys.writes.lock().unwrap().is_empty());
        assert!(
            EcamError::NotAnEndpoint {
                bdf: BRIDGE,
                header_type: 1
            }
            .to_string()
            .contains("00:02.0")
        );

        let (_e, _) = vm(&phys);
        // Bus mastering, MSI, MSI-X and the ROM are off in hardware; BARs are as they were.
        assert_eq!(phys.hw(EDU, 0x04, 2), 0);
        assert_eq!(phys.hw(EDU, 0x42, 2) & 1, 0);
        assert_eq!(phys.hw(EDU, 0x82, 2) & 0x8000, 0);
        assert_eq!(phys.hw(NVME, 0x30, 4) & 1, 0);
        assert_eq!(phys.hw(NVME, 0x10, 4), 0x1010_0004);
        assert_eq!(phys.hw(NVME, 0x14, 4), 0);
        // Nothing but the VM's functions was touched.
        for bdf in [BRIDGE, OTHER, ON_BUS1] {
            assert!(phys.writes_to(bdf).is_empty());
        }
    }

    #[test]
    fn bar_sizing_and_no_moving() {
        let phys = machine();
        let (mut e, _) = vm(&phys);
        let bars = e.assign_bars(MEM32).unwrap();
        let edu_bar0 = bars.iter().find(|b| b.bdf == EDU).unwrap().pa;
        assert_eq!(edu_bar0 % (1 << 20), 0);
        assert_eq!(u64::from(phys.hw(EDU, 0x10, 4)), edu_bar0);
        phys.clear_log();

        // The guest reads the address the hypervisor chose.
        assert_eq!(u64::from(rd(&e, EDU, 0x10, 4)), edu_bar0);
        // Sizing: all ones reads back the size mask, restoring ends it.
        wr(&e, EDU, 0x10, 4, 0xffff_ffff);
        assert_eq!(rd(&e, EDU, 0x10, 4), 0xfff0_0000);
        assert_eq!(rd(&e, EDU, 0x12, 2), 0xfff0);
        wr(&e, EDU, 0x10, 4, edu_bar0 as u32);
        assert_eq!(u64::from(rd(&e, EDU, 0x10, 4)), edu_bar0);
        // Unimplemented BARs size to 0.
        wr(&e, EDU, 0x14, 4, 0xffff_ffff);
        assert_eq!(rd(&e, EDU, 0x14, 4), 0);

        // Moving: ignored, in every width.
        wr(&e, EDU, 0x10, 4, 0x2000_0000);
        assert_eq!(u64::from(rd(&e, EDU, 0x10, 4)), edu_bar0);
        wr(&e, EDU, 0x13, 1, 0x3f);
        wr(&e, EDU, 0x12, 2, 0x3f00);
        assert_eq!(u64::from(rd(&e, EDU, 0x10, 4)), edu_bar0);
        // None of that reached hardware.
        assert!(phys.writes_to(EDU).is_empty());
        assert_eq!(u64::from(phys.hw(EDU, 0x10, 4)), edu_bar0);

        // 64-bit BAR: both halves size, flags stay.
        assert_eq!(rd(&e, NVME, 0x10, 4), 0x1010_0004);
        assert_eq!(rd(&e, NVME, 0x14, 4), 0);
        wr(&e, NVME, 0x10, 4, 0xffff_ffff);
        wr(&e, NVME, 0x14, 4, 0xffff_ffff);
        assert_eq!(rd(&e, NVME, 0x10, 4), 0xffff_c004);
        assert_eq!(rd(&e, NVME, 0x14, 4), 0xffff_ffff);
        wr(&e, NVME, 0x10, 4, 0x1010_0000);
        wr(&e, NVME, 0x14, 4, 0x0000_0012);
        assert_eq!(rd(&e, NVME, 0x10, 4), 0x1010_0004);
        assert_eq!(rd(&e, NVME, 0x14, 4), 0);
        // Small prefetchable BAR: real size mask, page-aligned address.
        let bar2 = rd(&e, NVME, 0x18, 4);
        assert_eq!(bar2 & 0xfff, 0b1000);
        wr(&e, NVME, 0x18, 4, 0xffff_ffff);
        assert_eq!(rd(&e, NVME, 0x18, 4), 0xffff_ff08);
        // I/O BAR and expansion ROM are hidden.
        assert_eq!(rd(&e, NVME, 0x20, 4), 0);
        wr(&e, NVME, 0x20, 4, 0xffff_ffff);
        assert_eq!(rd(&e, NVME, 0x20, 4), 0);
        assert_eq!(rd(&e, NVME, 0x30, 4), 0);
        wr(&e, NVME, 0x30, 4, 0xffff_ffff);
        assert_eq!(rd(&e, NVME, 0x30, 4), 0);
        assert!(phys.writes_to(NVME).is_empty());
    }

    #[test]
    fn assign_bars_places_and_keeps() {
        let phys = machine();
        let (mut e, _) = vm(&phys);
        let mut alloc = BarAllocator::new(MEM32.0, MEM32.1);
        // Another VM's BAR, placed first by firmware at the window base.
        assert!(alloc.reserve(0x1000_0000, 0x1000));
        let bars = e.assign_bars_from(&mut alloc).unwrap();
        assert_eq!(bars.len(), 3);
        // nvme BAR0 keeps its firmware address.
        assert_eq!(
            bars[1],
            BarRegion {
                bdf: NVME,
                index: 0,
                pa: 0x1010_0000,
                size: 0x4000,
                is_64bit: true,
                prefetchable: false
            }
        );
        let edu_bar = bars[0];
        assert_eq!(
            (edu_bar.bdf, edu_bar.index, edu_bar.size),
            (EDU, 0, 1 << 20)
        );
        let small = bars[2];
        assert_eq!((small.bdf, small.index, small.size), (NVME, 2, 0x100));
        assert_eq!(small.map_size(), 0x1000);
        assert!(small.prefetchable && !small.is_64bit);
        // Page granular, naturally aligned, inside the window, disjoint from everything.
        let mut spans: Vec<(u64, u64)> = bars.iter().map(|b| (b.pa, b.map_size())).collect();
        spans.push((0x1000_0000, 0x1000));
        for &(pa, sz) in &spans {
            assert!(pa.is_multiple_of(sz) && pa >= MEM32.0 && pa + sz <= MEM32.0 + MEM32.1);
        }
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} {b:x?}");
            }
        }
        assert_eq!(u64::from(phys.hw(NVME, 0x18, 4) & !0xf), small.pa);

        // A second VM with the same allocator never lands on the first one's BARs.
        let phys2 = Arc::new(FakeConfig::default());
        phys2.with(EDU, edu());
        let mut e2 = VirtEcam::new(
            phys2.clone(),
            &[pf(0, 1, 0)],
            WINDOW,
            Arc::new(Mapper::default()),
        )
        .unwrap();
        let bars2 = e2.assign_bars_from(&mut alloc).unwrap();
        assert_ne!(bars2[0].pa, edu_bar.pa);
        for &(pa, sz) in &spans {
            assert!(bars2[0].pa + bars2[0].size <= pa || pa + sz <= bars2[0].pa);
        }

        // Firmware BAR outside the window or misaligned: moved. Window too small: error.
        let phys3 = Arc::new(FakeConfig::default());
        phys3.with(
            EDU,
            FakeFn::new(1, 2, 0, 0).bar32(0, 0x1000, 0, 0x8000_0000),
        );
        let mut e3 = VirtEcam::new(
            phys3.clone(),
            &[pf(0, 1, 0)],
            WINDOW,
            Arc::new(Mapper::default()),
        )
        .unwrap();
        let b3 = e3.assign_bars((0x2000_0000, 0x10_0000)).unwrap();
        assert_eq!(b3[0].pa, 0x2000_0000);
        assert_eq!(phys3.hw(EDU, 0x10, 4), 0x2000_0000);
        let phys4 = Arc::new(FakeConfig::default());
        phys4.with(EDU, edu());
        let mut e4 =
            VirtEcam::new(phys4, &[pf(0, 1, 0)], WINDOW, Arc::new(Mapper::default())).unwrap();
        assert_eq!(
            e4.assign_bars((0x2000_0000, 0x8_0000)),
            Err(EcamError::WindowFull {
                bdf: EDU,
                bar: 0,
                size: 1 << 20
            })
        );
    }

    #[test]
    fn allocator() {
        let mut a = BarAllocator::new(0x1000_0000, 0x10_0000);
        assert_eq!(a.alloc(0x1000), Some(0x1000_0000));
        assert_eq!(a.alloc(0x4000), Some(0x1000_4000));
        assert_eq!(a.alloc(0x1000), Some(0x1000_1000));
        assert!(!a.reserve(0x1000_4000, 0x1000));
        assert!(!a.reserve(0x0fff_f000, 0x2000));
        assert!(!a.reserve(0x1010_0000, 0x1000));
        assert!(a.reserve(0x1008_0000, 0x1000));
        assert_eq!(a.alloc(0x8_0000), None);
        assert_eq!(a.alloc(0x4_0000), Some(0x1004_0000));
        assert_eq!(a.alloc(0x3000), None);
        assert_eq!(a.alloc(0x10_0000), None);
    }

    #[test]
    fn command_filter_and_stage2_mapping() {
        let phys = machine();
        let (mut e, mapper) = vm(&phys);
        // Before the BARs are placed, memory decoding cannot be turned on.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0004);
        assert!(mapper.take().is_empty());
        wr(&e, EDU, reg::COMMAND, 2, 0);

        let bars = e.assign_bars(MEM32).unwrap();
        let edu_pa = bars[0].pa;
        // I/O, MWI filtered; memory, bus master, INTx disable pass.
        wr(&e, EDU, reg::COMMAND, 2, 0x0417);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0406);
        assert_eq!(rd(&e, EDU, reg::COMMAND, 2), 0x0406);
        assert_eq!(mapper.take(), [MapEvent::Map(EDU, 0, edu_pa, 1 << 20)]);
        // Writing it again changes nothing; a byte write of the high half keeps MSE.
        wr(&e, EDU, reg::COMMAND, 2, 0x0406);
        wr(&e, EDU, 0x05, 1, 0x00);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0006);
        assert!(mapper.take().is_empty());
        // Clearing MSE unmaps.
        wr(&e, EDU, 0x04, 1, 0x04);
        assert_eq!(mapper.take(), [MapEvent::Unmap(EDU, 0, edu_pa, 1 << 20)]);

        // nvme: both memory BARs, the I/O BAR never.
        wr(&e, NVME, reg::COMMAND, 4, 0x0000_0003);
        assert_eq!(phys.hw(NVME, 0x04, 2), 0x0002);
        let ev = mapper.take();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0], MapEvent::Map(NVME, 0, 0x1010_0000, 0x4000));
        assert!(matches!(ev[1], MapEvent::Map(NVME, 2, _, 0x1000)));

        // Status: RW1C error bits pass, written along with the command as one dword.
        phys.fns.lock().unwrap().get_mut(&NVME).unwrap().cfg[0x07] = 0x20;
        wr(&e, NVME, reg::COMMAND, 4, 0x2000_0002);
        assert_eq!(phys.hw(NVME, 0x06, 2), 0);
        assert!(mapper.take().is_empty());

        // Quiesce: everything off, everything unmapped.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        mapper.take();
        e.quiesce();
        assert_eq!(phys.hw(EDU, 0x04, 2), 0);
        assert_eq!(phys.hw(NVME, 0x04, 2), 0);
        assert_eq!(mapper.take().len(), 3);
    }

    #[test]
    fn header_writes_filtered() {
        let phys = machine();
        let (e, _) = vm(&phys);
        phys.clear_log();
        wr(&e, EDU, 0x0c, 4, 0x40ff_2010); // cache line, latency, BIST start
        assert_eq!(phys.hw(EDU, 0x0c, 2), 0x2010);
        assert_eq!(phys.hw(EDU, 0x0f, 1), 0);
        wr(&e, EDU, 0x3c, 4, 0xffff_ff2a); // interrupt line only
        assert_eq!(phys.hw(EDU, 0x3c, 4), 0x0000_012a);
        // Read-only header fields and the capability pointer: dropped.
        for (off, size) in [(0x00, 4), (0x08, 4), (0x2c, 4), (0x34, 1), (0x38, 4)] {
            wr(&e, EDU, off, size, 0xffff_ffff);
        }
        assert_eq!(
            phys.writes_to(EDU),
            [(EDU, 0x0c, 4, 0x0000_2010), (EDU, 0x3c, 4, 0x2a)]
        );
    }

    #[test]
    fn msi_hidden_and_pcie_devctl() {
        let phys = machine();
        let (e, _) = vm(&phys);
        // The guest sees PCIe -> PM; MSI and MSI-X are unlinked.
        assert_eq!(rd(&e, EDU, reg::CAP_PTR, 1), 0x50);
        assert_eq!(guest_caps(&e, EDU), [(0x50, 0x10), (0x90, 0x01)]);
        assert_eq!(rd(&e, EDU, 0x50, 4), 0x0002_9010);
        assert_eq!(rd(&e, EDU, 0x90, 4), 0x0003_0001);
        // Their bytes read as zero.
        for off in (0x40..0x4e).chain(0x80..0x8c) {
            assert_eq!(rd(&e, EDU, off, 1), 0, "{off:#x}");
        }
        assert_eq!(rd(&e, EDU, 0x4c, 4), 0);
        // Writes to them are dropped: MSI enable, MSI-X enable, the MSI address.
        phys.clear_log();
        wr(&e, EDU, 0x42, 2, 0x0001);
        wr(&e, EDU, 0x40, 4, 0x0001_0000);
        wr(&e, EDU, 0x82, 2, 0x8000);
        wr(&e, EDU, 0x44, 4, 0x1234_5678);
        // Other capability registers, Link Control, PM capabilities (PMC): read-only.
        wr(&e, EDU, 0x60, 2, 0x0fff);
        wr(&e, EDU, 0x90, 4, 0xffff_ffff);
        assert!(phys.writes_to(EDU).is_empty());
        assert_eq!(phys.hw(EDU, 0x42, 2) & 1, 0);
        assert_eq!(phys.hw(EDU, 0x44, 4), 0x0809_0040);

        // Device Control: relaxed ordering and error reporting pass, MPS stays, FLR dropped;
        // Device Status RW1C bits pass.
        assert_eq!(rd(&e, EDU, 0x58, 2), 0x2830);
        wr(&e, EDU, 0x58, 2, 0x80ff);
        assert_eq!(phys.hw(EDU, 0x58, 2), 0x003f);
        wr(&e, EDU, 0x58, 4, 0x0001_5000);
        assert_eq!(phys.hw(EDU, 0x58, 4), 0x0004_5020);
        wr(&e, EDU, 0x5a, 2, 0x0004);
        assert_eq!(phys.hw(EDU, 0x5a, 2), 0);

        // No capabilities left: status bit clear, pointer 0.
        let phys2 = Arc::new(FakeConfig::default());
        phys2.with(
            EDU,
            FakeFn::new(1, 2, 0, 0).cap(0x40, reg::CAP_ID_MSI, 0x00, 0),
        );
        let e2 = VirtEcam::new(
            phys2.clone(),
            &[pf(0, 1, 0)],
            WINDOW,
            Arc::new(Mapper::default()),
        )
        .unwrap();
        assert_eq!(phys2.hw(EDU, 0x06, 2) & 0x10, 0x10);
        assert_eq!(rd(&e2, EDU, reg::STATUS, 2) & 0x10, 0);
        assert_eq!(rd(&e2, EDU, reg::CAP_PTR, 1), 0);
        assert!(guest_caps(&e2, EDU).is_empty());
        // And the nvme has none in the first place.
        let (e, _) = vm(&machine());
        assert!(guest_caps(&e, NVME).is_empty());
    }

    #[test]
    fn looping_capability_list_terminates() {
        let phys = Arc::new(FakeConfig::default());
        phys.with(
            EDU,
            FakeFn::new(1, 2, 0, 0)
                .cap(0x40, 0x01, 0x50, 0)
                .cap(0x50, reg::CAP_ID_MSI, 0x40, 0),
        );
        let e = VirtEcam::new(phys, &[pf(0, 1, 0)], WINDOW, Arc::new(Mapper::default())).unwrap();
        assert_eq!(rd(&e, EDU, reg::CAP_PTR, 1), 0x40);
    }

    #[test]
    fn decoding_sizes_and_alignment() {
        let phys = machine();
        let (e, _) = vm(&phys);
        assert_eq!(e.window().size(), 2 << 20);
        for size in [0, 3, 8, 16] {
            assert_eq!(
                e.read(0, ecam_offset(EDU, 0), size),
                Err(MmioError::BadSize { size })
            );
            assert_eq!(
                e.write(0, ecam_offset(EDU, 0), size, 0),
                Err(MmioError::BadSize { size })
            );
        }
        for (off, size) in [(1, 2), (2, 4), (3, 2), (0x11, 4), (0xffe, 4)] {
            let offset = ecam_offset(EDU, off);
            assert_eq!(
                e.read(0, offset, size),
                Err(MmioError::BadOffset { offset })
            );
            assert_eq!(
                e.write(0, offset, size, 0),
                Err(MmioError::BadOffset { offset })
            );
        }
        // Past the last bus of the window.
        let offset = 2 << 20;
        assert_eq!(e.read(0, offset, 4), Err(MmioError::BadOffset { offset }));
        // Every aligned width works, and reads the right lane.
        assert_eq!(rd(&e, EDU, 0x01, 1), 0x12);
        assert_eq!(rd(&e, EDU, 0x02, 2), 0x11e8);
        assert_eq!(rd(&e, EDU, 0x03, 1), 0x11);
        assert_eq!(rd(&e, EDU, 0xffc, 4), 0);

        // A window starting at bus 1 puts bus 1 at offset 0.
        let phys = machine();
        let e1 = VirtEcam::new(
            phys.clone(),
            &[pf(1, 0, 0)],
            EcamWindow {
                bus_start: 1,
                bus_end: 1,
            },
            Arc::new(Mapper::default()),
        )
        .unwrap();
        assert_eq!(e1.read(0, 0, 4), Ok(0x1001_1af4));
        assert_eq!(e1.read(0, 1 << 15, 4), Ok(0xffff_ffff));
        assert_eq!(
            e1.read(0, 1 << 20, 4),
            Err(MmioError::BadOffset { offset: 1 << 20 })
        );
        let _ = vec![0u8];
    }

    /// What a sink saw at one call: (active, BME in hardware, PowerState in hardware). Reading
    /// hardware at the call shows whether it came before or after the write.
    type Seen = (bool, bool, u32);

    /// Records every `set_active` call; fails power-ups while `fail` is set.
    struct Sink {
        phys: Arc<FakeConfig>,
        bdf: u16,
        pmcsr: usize,
        calls: StdMutex<Vec<Seen>>,
        fail: AtomicBool,
    }

    impl Sink {
        fn new(phys: &Arc<FakeConfig>, bdf: u16) -> Arc<Self> {
            Arc::new(Sink {
                phys: phys.clone(),
                bdf,
                pmcsr: 0x94,
                calls: StdMutex::new(Vec::new()),
                fail: AtomicBool::new(false),
            })
        }

        fn take(&self) -> Vec<Seen> {
            core::mem::take(&mut *self.calls.lock().unwrap())
        }

        /// Only the `active` values of the calls so far.
        fn take_states(&self) -> Vec<bool> {
            self.take().into_iter().map(|c| c.0).collect()
        }
    }

    impl ActivitySink for Sink {
        fn set_active(&self, active: bool) -> Result<(), PowerError> {
            let bme = self.phys.hw(self.bdf, 0x04, 2) & 4 != 0;
            let state = self.phys.hw(self.bdf, self.pmcsr, 2) & 3;
            self.calls.lock().unwrap().push((active, bme, state));
            if active && self.fail.load(Ordering::Relaxed) {
                return Err(PowerError::Timeout {
                    domain: "smmu",
                    what: "power on",
                });
            }
            Ok(())
        }
    }

    /// edu with a writable PMCSR (PowerState, PME_En, Data_Select, PME_Status RW1C), keeping its
    /// state across D3hot -> D0 or not.
    fn edu_pm(no_soft_reset: bool) -> FakeFn {
        let mut f = edu();
        f.wmask(0x94, 2, 0x1f03);
        f.w1c(0x94, 2, 0x8000);
        if no_soft_reset {
            f.set(0x94, 2, 0x0008);
        }
        f
    }

    /// A VM with edu (PM as `edu_pm`) and nvme, BARs placed, a sink on each.
    fn pm_vm(
        no_soft_reset: bool,
    ) -> (Arc<FakeConfig>, VirtEcam, Arc<Mapper>, Arc<Sink>, Arc<Sink>) {
        let phys = machine();
        phys.with(EDU, edu_pm(no_soft_reset));
        let (mut e, mapper) = vm(&phys);
        e.assign_bars(MEM32).unwrap();
        let (edu, nvme) = (Sink::new(&phys, EDU), Sink::new(&phys, NVME));
        e.set_activity(EDU, edu.clone()).unwrap();
        e.set_activity(NVME, nvme.clone()).unwrap();
        mapper.take();
        (phys, e, mapper, edu, nvme)
    }

    const PMCSR: u16 = 0x94;

    #[test]
    fn activity_follows_bus_master_enable() {
        let (phys, e, mapper, sink, nvme) = pm_vm(false);
        assert_eq!(e.is_active(EDU), Some(false));
        assert_eq!(e.is_active(OTHER), None);
        // BME on: reported before hardware has it.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(sink.take(), [(true, false, 0)]);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0006);
        assert_eq!(e.is_active(EDU), Some(true));
        assert_eq!(mapper.take().len(), 1);
        // The same value again, the high byte, the status half, MSE off: no transition.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        wr(&e, EDU, 0x05, 1, 0x04);
        wr(&e, EDU, reg::STATUS, 2, 0xffff);
        wr(&e, EDU, 0x04, 1, 0x04);
        assert!(sink.take().is_empty());
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0404);
        // A byte write clearing BME: reported after hardware dropped it.
        wr(&e, EDU, 0x04, 1, 0x02);
        assert_eq!(sink.take(), [(false, false, 0)]);
        wr(&e, EDU, 0x04, 1, 0x00);
        assert!(sink.take().is_empty());
        // Dword writes (command + status) work the same.
        wr(&e, EDU, reg::COMMAND, 4, 0xffff_0004);
        wr(&e, EDU, reg::COMMAND, 4, 0x0000_0004);
        wr(&e, EDU, reg::COMMAND, 4, 0);
        assert_eq!(sink.take_states(), [true, false]);
        // No PM capability (nvme): BME alone decides.
        wr(&e, NVME, reg::COMMAND, 2, 0x0004);
        assert_eq!(nvme.take_states(), [true]);
        wr(&e, NVME, reg::COMMAND, 2, 0x0004);
        assert!(nvme.take().is_empty());
        // Quiesce reports every active function inactive, once.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        sink.take();
        e.quiesce();
        assert_eq!(sink.take(), [(false, false, 0)]);
        assert_eq!(nvme.take(), [(false, false, 0)]);
        assert_eq!(
            (e.is_active(EDU), e.is_active(NVME)),
            (Some(false), Some(false))
        );
        e.quiesce();
        assert!(sink.take().is_empty() && nvme.take().is_empty());
    }

    #[test]
    fn activity_follows_d_state() {
        let (phys, e, _mapper, sink, _) = pm_vm(true);
        // The PM capability stays visible.
        assert!(guest_caps(&e, EDU).contains(&(0x90, 0x01)));
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(sink.take_states(), [true]);
        // D3hot with BME on: inactive, after the function got there. BME stays set.
        wr(&e, EDU, PMCSR, 2, 0x0003);
        assert_eq!(sink.take(), [(false, true, 3)]);
        assert_eq!(phys.hw(EDU, 0x94, 2), 0x000b);
        assert_eq!(rd(&e, EDU, PMCSR, 2) & 3, 3);
        assert_eq!(e.is_active(EDU), Some(false));
        // Again, the BME rewritten, the other PMCSR byte: nothing.
        wr(&e, EDU, PMCSR, 2, 0x0003);
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        wr(&e, EDU, PMCSR + 1, 1, 0x00);
        assert!(sink.take().is_empty());
        // D1 is unsupported and not reachable from D3hot: refused, the state stays.
        wr(&e, EDU, PMCSR, 1, 0x01);
        assert_eq!(phys.hw(EDU, 0x94, 1) & 3, 3);
        assert!(sink.take().is_empty());
        // Back to D0 (no soft reset, BME kept): active, before the function left D3hot.
        wr(&e, EDU, PMCSR, 2, 0x0000);
        assert_eq!(sink.take(), [(true, true, 3)]);
        assert_eq!(phys.hw(EDU, 0x94, 1) & 3, 0);
        assert_eq!(e.is_active(EDU), Some(true));
        // D3hot with BME off, then BME on in D3hot, then D0: one transition, at D0.
        wr(&e, EDU, 0x04, 1, 0x02);
        wr(&e, EDU, PMCSR, 4, 0x0000_0003);
        wr(&e, EDU, 0x04, 1, 0x06);
        assert_eq!(sink.take_states(), [false]);
        wr(&e, EDU, PMCSR, 4, 0xffff_0000);
        assert_eq!(sink.take_states(), [true]);
        // PME_En keeps its hardware value; PME_Status is cleared by writing 1; Data_Select
        // passes.
        phys.fns.lock().unwrap().get_mut(&EDU).unwrap().cfg[0x95] = 0x81;
        wr(&e, EDU, PMCSR, 2, 0x8200);
        assert_eq!(phys.hw(EDU, 0x94, 2), 0x0308);
        wr(&e, EDU, PMCSR, 2, 0x0000);
        assert_eq!(phys.hw(EDU, 0x94, 2), 0x0108);
        assert!(sink.take().is_empty());
        e.quiesce();
        assert_eq!(sink.take_states(), [false]);
    }

    #[test]
    fn soft_reset_restores_bars() {
        let (phys, e, mapper, sink, _) = pm_vm(false);
        let bar0 = rd(&e, EDU, 0x10, 4);
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(mapper.take().len(), 1);
        assert_eq!(sink.take_states(), [true]);
        wr(&e, EDU, PMCSR, 2, 0x0003);
        wr(&e, EDU, PMCSR, 2, 0x0000);
        // Inactive in D3hot. D3hot -> D0 resets the function: BME is gone, so it stays
        // inactive; MSE too, so the BARs are unmapped.
        assert_eq!(sink.take_states(), [false]);
        assert!(matches!(mapper.take()[..], [MapEvent::Unmap(EDU, 0, _, _)]));
        assert_eq!(e.is_active(EDU), Some(false));
        // What the function's reset does (the fake does not model it).
        {
            let mut fns = phys.fns.lock().unwrap();
            let f = fns.get_mut(&EDU).unwrap();
            f.set(0x04, 2, 0);
            f.set(0x10, 4, 0);
            f.set(0x58, 2, 0x2810);
        }
        phys.clear_log();
        // Its BAR does not take the write yet: MSE stays filtered.
        let wmask = phys.fns.lock().unwrap()[&EDU].wmask;
        phys.fns.lock().unwrap().get_mut(&EDU).unwrap().wmask[0x10..0x14].fill(0);
        wr(&e, EDU, reg::COMMAND, 2, 0x0002);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0);
        assert!(mapper.take().is_empty());
        // Next access: the BAR and Max Payload Size are restored before anything else.
        phys.fns.lock().unwrap().get_mut(&EDU).unwrap().wmask = wmask;
        phys.clear_log();
        assert_eq!(rd(&e, EDU, 0x10, 4), bar0);
        assert_eq!(phys.hw(EDU, 0x10, 4), bar0);
        assert_eq!(phys.hw(EDU, 0x58, 2), 0x2830);
        let log = phys.writes_to(EDU);
        assert_eq!(log[0], (EDU, 0x10, 4, bar0));
        // Only once.
        phys.clear_log();
        rd(&e, EDU, 0, 4);
        assert!(phys.writes_to(EDU).is_empty());
        // The guest turns it back on.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(sink.take_states(), [true]);
        assert!(matches!(mapper.take()[..], [MapEvent::Map(EDU, 0, _, _)]));
    }

    #[test]
    fn failed_power_up_keeps_bus_mastering_off() {
        let (phys, e, _mapper, sink, _) = pm_vm(true);
        sink.fail.store(true, Ordering::Relaxed);
        // MSE gets through, BME does not.
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(sink.take(), [(true, false, 0)]);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0002);
        assert_eq!(rd(&e, EDU, reg::COMMAND, 2), 0x0002);
        assert_eq!(e.is_active(EDU), Some(false));
        // Clearing it is no transition; setting it again is a new attempt, which works now.
        wr(&e, EDU, reg::COMMAND, 2, 0x0002);
        assert!(sink.take().is_empty());
        sink.fail.store(false, Ordering::Relaxed);
        wr(&e, EDU, reg::COMMAND, 2, 0x0006);
        assert_eq!(sink.take_states(), [true]);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0006);

        // Failing on the way back to D0: BME goes off before the function is in D0.
        wr(&e, EDU, PMCSR, 2, 0x0003);
        sink.fail.store(true, Ordering::Relaxed);
        wr(&e, EDU, PMCSR, 2, 0x0000);
        assert_eq!(sink.take(), [(false, true, 3), (true, true, 3)]);
        assert_eq!(phys.hw(EDU, 0x04, 2), 0x0002);
        assert_eq!(phys.hw(EDU, 0x94, 1) & 3, 0);
        assert_eq!(e.is_active(EDU), Some(false));
        e.quiesce();
        assert!(sink.take().is_empty());
    }

    #[test]
    fn set_activity_checks_and_catches_up() {
        let phys = machine();
        let (mut e, _) = vm(&phys);
        let sink = Sink::new(&phys, EDU);
        assert_eq!(
            e.set_activity(OTHER, sink.clone()),
            Err(EcamError::NotAssigned { bdf: OTHER })
        );
        assert!(
            EcamError::NotAssigned { bdf: OTHER }
                .to_string()
                .contains("00:04.0")
        );
        // Active before a sink is attached: the sink hears it at once.
        wr(&e, EDU, reg::COMMAND, 2, 0x0004);
        e.set_activity(EDU, sink.clone()).unwrap();
        assert_eq!(sink.take_states(), [true]);
        // A replacement that fails to power up: bus mastering goes off.
        let failing = Sink::new(&phys, EDU);
        failing.fail.store(true, Ordering::Relaxed);
        e.set_activity(EDU, failing.clone()).unwrap();
        assert_eq!(failing.take_states(), [true]);
        assert_eq!(phys.hw(EDU, 0x04, 2) & 4, 0);
        assert_eq!(e.is_active(EDU), Some(false));
    }

    #[test]
    fn through_the_bus() {
        let phys = machine();
        let (e, _) = vm(&phys);
        let mut bus = crate::trap::MmioBus::new();
        let ecam: Arc<dyn MmioDevice> = Arc::new(e);
        bus.register(0x40_1000_0000, WINDOW.size(), ecam).unwrap();
        let (dev, off) = bus.find(0x40_1000_8000).unwrap();
        assert_eq!(dev.name(), "pci-ecam");
        assert_eq!(dev.read(0, off, 4), Ok(0x11e8_1234));
        let (dev, off) = bus.find(0x40_1002_0000).unwrap();
        assert_eq!(dev.read(0, off, 2), Ok(0xffff));
    }
}
