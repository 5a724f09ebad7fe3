//! PCI for the DMA checks: the generic ECAM host bridge from the DT, configuration accesses,
//! bus enumeration and BAR setup, plus the MMIO helpers the SMMU and `edu` drivers share.
//!
//! Every access is a single load or store of the register's width, so that a hypervisor that
//! traps the ECAM window gets a data abort with a valid syndrome.

use core::arch::asm;

use fdt::Fdt;

use crate::report::{Msg, ensure, fail};

macro_rules! mmio_read {
    ($name:ident, $ty:ty, $insn:literal) => {
        #[doc = concat!("Reads a `", stringify!($ty), "` device register with one `", $insn, "`.")]
        ///
        /// # Safety
        /// `addr` must be a naturally aligned device register, mapped as Device memory, whose
        /// read has no effect on memory safety.
        pub unsafe fn $name(addr: usize) -> $ty {
            let v: u64;
            // SAFETY: the caller guarantees the address may be read.
            unsafe {
                asm!($insn, a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags))
            };
            v as $ty
        }
    };
}

macro_rules! mmio_write {
    ($name:ident, $ty:ty, $insn:literal) => {
        #[doc = concat!("Writes a `", stringify!($ty), "` device register with one `", $insn, "`.")]
        ///
        /// # Safety
        /// `addr` must be a naturally aligned device register, mapped as Device memory, whose
        /// write has no effect on memory safety (a DMA it starts must target memory the caller
        /// owns, or memory the SMMU must keep it from).
        pub unsafe fn $name(addr: usize, v: $ty) {
            let v = v as u64;
            // SAFETY: the caller guarantees the address may be written.
            unsafe {
                asm!($insn, a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags))
            };
        }
    };
}

// Byte, halfword and word accesses take a W register; `ldrb`/`ldrh`/`ldr w` zero-extend.
// Doubleword accesses take an X register.
mmio_read!(read8, u8, "ldrb {v:w}, [{a}]");
mmio_read!(read16, u16, "ldrh {v:w}, [{a}]");
mmio_read!(read32, u32, "ldr {v:w}, [{a}]");
mmio_read!(read64, u64, "ldr {v:x}, [{a}]");
mmio_write!(write8, u8, "strb {v:w}, [{a}]");
mmio_write!(write16, u16, "strh {v:w}, [{a}]");
mmio_write!(write32, u32, "str {v:w}, [{a}]");
mmio_write!(write64, u64, "str {v:x}, [{a}]");

/// Full-system data synchronisation barrier: orders normal-memory writes (queues, tables, DMA
/// buffers) before the device register write that makes a device use them, and a device's
/// completion before the reads of what it wrote.
pub fn dsb_sy() {
    // SAFETY: a barrier has no effect besides ordering.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// A bus/device/function.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// The requester ID: `bus << 8 | dev << 3 | func`.
    pub fn rid(self) -> u32 {
        (u32::from(self.bus) << 8) | (u32::from(self.dev) << 3) | u32::from(self.func)
    }
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// A window of the host bridge's `ranges`: `size` bytes at PCI address `pci`, CPU address `cpu`.
#[derive(Clone, Copy)]
pub struct Window {
    pub pci: u64,
    pub cpu: u64,
    pub size: u64,
}

/// One `iommu-map` entry: requester IDs `rid_base..rid_base + len` are stream IDs
/// `sid_base..` of the IOMMU with phandle `iommu`.
#[derive(Clone, Copy)]
pub struct IommuMap {
    pub rid_base: u32,
    pub iommu: u32,
    pub sid_base: u32,
    pub len: u32,
}

/// Configuration header offsets and bits.
pub mod cfg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const CMD_MEMORY: u16 = 1 << 1;
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
}

/// A `pci-host-ecam-generic` host bridge.
pub struct HostBridge {
    /// CPU address of the ECAM window (bus `bus_start`).
    pub ecam: usize,
    pub bus_start: u8,
    pub bus_end: u8,
    /// The 32-bit memory window, where BARs go.
    pub mem32: Window,
    /// The first `iommu-map` entry (QEMU and the hypervisor describe one).
    pub iommu_map: Option<IommuMap>,
}

/// Big-endian cells of a property.
pub(crate) fn cells(value: &[u8]) -> impl Iterator<Item = u32> + '_ {
    value
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

/// Reads `n` cells (1 or 2) as one number.
fn take(it: &mut impl Iterator<Item = u32>, n: usize) -> Option<u64> {
    (0..n).try_fold(0u64, |acc, _| Some((acc << 32) | u64::from(it.next()?)))
}

impl HostBridge {
    /// The first `pci-host-ecam-generic` node of the DT.
    pub fn from_dt(fdt: &Fdt<'_>) -> Result<Self, Msg> {
        let Some(node) = fdt.find_compatible(&["pci-host-ecam-generic"]) else {
            fail!("no pci-host-ecam-generic node in the DT");
        };
        let Some(reg) = node.reg().and_then(|mut r| r.next()) else {
            fail!("{}: no usable reg", node.name);
        };
        let ecam = reg.starting_address as usize;
        let ecam_size = reg.size.unwrap_or(0);
        let (bus_start, bus_end) = match node.property("bus-range") {
            Some(p) => {
                let mut c = cells(p.value);
                match (c.next(), c.next()) {
                    (Some(s), Some(e)) if s <= e && e <= 0xff => (s as u8, e as u8),
                    _ => fail!("{}: bad bus-range", node.name),
                }
            }
            None => (0, 0xff),
        };
        ensure!(
            ecam_size >= (usize::from(bus_end - bus_start) + 1) << 20,
            "{}: ECAM reg {ecam:#x}+{ecam_size:#x} is too small for buses {bus_start}..={bus_end}",
            node.name
        );

        // ranges: (pci.hi pci.mid pci.lo) (parent address) (size).
        let child = node.cell_sizes();
        let parent_cells = fdt
            .find_node("/")
            .map_or(2, |root| root.cell_sizes().address_cells);
        ensure!(
            child.address_cells == 3 && child.size_cells <= 2 && parent_cells <= 2,
            "{}: unexpected #address-cells/#size-cells",
            node.name
        );
        let mut mem32 = None;
        if let Some(p) = node.property("ranges") {
            let mut c = cells(p.value);
            while let Some(hi) = c.next() {
                let (Some(pci), Some(cpu), Some(size)) = (
                    take(&mut c, 2),
                    take(&mut c, parent_cells),
                    take(&mut c, child.size_cells),
                ) else {
                    fail!("{}: truncated ranges", node.name);
                };
                // Space code 0b10: 32-bit memory.
                if (hi >> 24) & 3 == 2 && mem32.is_none() {
                    mem32 = Some(Window { pci, cpu, size });
                }
            }
        }
        let Some(mem32) = mem32 else {
            fail!("{}: no 32-bit memory window in ranges", node.name);
        };

        let iommu_map = node.property("iommu-map").and_then(|p| {
            let mut c = cells(p.value);
            Some(IommuMap {
                rid_base: c.next()?,
                iommu: c.next()?,
                sid_base: c.next()?,
                len: c.next()?,
            })
        });

        Ok(HostBridge {
            ecam,
            bus_start,
            bus_end,
            mem32,
            iommu_map,
        })
    }

    /// Address of register `off` of `bdf` in the ECAM window.
    fn cfg_addr(&self, bdf: Bdf, off: usize) -> usize {
        self.ecam
            + ((usize::from(bdf.bus - self.bus_start) << 20)
                | (usize::from(bdf.dev) << 15)
                | (usize::from(bdf.func) << 12)
                | off)
    }

    pub fn read16(&self, bdf: Bdf, off: usize) -> u16 {
        // SAFETY: an aligned configuration register inside the ECAM window from the DT (mapped
        // as Device memory by the boot code); configuration reads have no side effects.
        unsafe { read16(self.cfg_addr(bdf, off)) }
    }

    pub fn read8(&self, bdf: Bdf, off: usize) -> u8 {
        // SAFETY: as in `read16`.
        unsafe { read8(self.cfg_addr(bdf, off)) }
    }

    pub fn read32(&self, bdf: Bdf, off: usize) -> u32 {
        // SAFETY: as in `read16`.
        unsafe { read32(self.cfg_addr(bdf, off)) }
    }

    pub fn write16(&self, bdf: Bdf, off: usize, v: u16) {
        // SAFETY: an aligned configuration register inside the ECAM window; the callers only
        // write the Command register and BARs of the function they drive.
        unsafe { write16(self.cfg_addr(bdf, off), v) }
    }

    pub fn write32(&self, bdf: Bdf, off: usize, v: u32) {
        // SAFETY: as in `write16`.
        unsafe { write32(self.cfg_addr(bdf, off), v) }
    }

    /// Finds `vendor:device` among the functions of every bus in the window (a flat scan: no
    /// bridges are followed, so only buses that answer directly are seen).
    pub fn find(&self, vendor: u16, device: u16) -> Option<Bdf> {
        for bus in self.bus_start..=self.bus_end {
            for dev in 0..32 {
                let f0 = Bdf { bus, dev, func: 0 };
                if self.read16(f0, cfg::VENDOR_ID) == 0xffff {
                    continue;
                }
                let funcs = if self.read8(f0, cfg::HEADER_TYPE) & 0x80 != 0 {
                    8
                } else {
                    1
                };
                for func in 0..funcs {
                    let bdf = Bdf { bus, dev, func };
                    if self.read16(bdf, cfg::VENDOR_ID) == vendor
                        && self.read16(bdf, cfg::DEVICE_ID) == device
                    {
                        return Some(bdf);
                    }
                }
            }
            // The scan is for small test machines: stop after the first bus without devices.
            if (0..32).all(|dev| self.read16(Bdf { bus, dev, func: 0 }, cfg::VENDOR_ID) == 0xffff) {
                break;
            }
        }
        None
    }

    /// The CPU address of `bdf`'s 32-bit memory BAR0, assigning it from the MEM32 window
    /// (naturally aligned, at the window's start) when it is still 0, then enables memory
    /// decoding and bus mastering.
    pub fn setup_bar0(&self, bdf: Bdf) -> Result<(usize, u64), Msg> {
        // Decoding off while the BAR is sized.
        let cmd = self.read16(bdf, cfg::COMMAND);
        self.write16(
            bdf,
            cfg::COMMAND,
            cmd & !(cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER),
        );
        let orig = self.read32(bdf, cfg::BAR0);
        ensure!(
            orig & 0x7 == 0,
            "{bdf} BAR0 {orig:#x} is not a 32-bit memory BAR"
        );
        self.write32(bdf, cfg::BAR0, u32::MAX);
        let mask = self.read32(bdf, cfg::BAR0) & !0xf;
        self.write32(bdf, cfg::BAR0, orig);
        ensure!(mask != 0, "{bdf} BAR0 is not implemented");
        let size = u64::from((!mask).wrapping_add(1));

        let mut bar = u64::from(orig & !0xf);
        let w = self.mem32;
        if bar == 0 {
            bar = w.pci.next_multiple_of(size);
            ensure!(
                bar + size <= w.pci + w.size,
                "{bdf} BAR0 ({size:#x} bytes) does not fit the MEM32 window"
            );
            self.write32(bdf, cfg::BAR0, bar as u32);
            ensure!(
                u64::from(self.read32(bdf, cfg::BAR0) & !0xf) == bar,
                "{bdf} BAR0 did not take {bar:#x}"
            );
        }
        ensure!(
            w.pci <= bar && bar + size <= w.pci + w.size,
            "{bdf} BAR0 {bar:#x}+{size:#x} lies outside the MEM32 window"
        );
        self.write16(
            bdf,
            cfg::COMMAND,
            cmd | cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER,
        );
        let now = self.read16(bdf, cfg::COMMAND);
        ensure!(
            now & (cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER) == cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER,
            "{bdf} Command = {now:#x}: memory decoding or bus mastering did not stick"
        );
        Ok(((bar - w.pci + w.cpu) as usize, size))
    }

    /// The stream ID of `bdf` behind the IOMMU with phandle `iommu` (per `iommu-map`).
    pub fn stream_id(&self, bdf: Bdf, iommu: Option<u32>) -> Result<u32, Msg> {
        let Some(m) = self.iommu_map else {
            fail!("the host bridge has no iommu-map: {bdf} is not behind an SMMU");
        };
        if let Some(ph) = iommu {
            ensure!(
                m.iommu == ph,
                "iommu-map points at phandle {:#x}, not the SMMU ({ph:#x})",
                m.iommu
            );
        }
        let rid = bdf.rid();
        ensure!(
            m.rid_base <= rid && rid - m.rid_base < m.len,
            "RID {rid:#x} of {bdf} is outside the iommu-map"
        );
        Ok(m.sid_base + (rid - m.rid_base))
    }
}
