//! The hypervisor's side of the devices it emulates for VMs: the physical PCI configuration space
//! behind each VM's filtered ECAM window, BAR mappings in the VM's stage 2, and the VM's memory as
//! its emulated SMMU reads and writes it (through the VM's stage 2).

use alloc::sync::Arc;

use super::VmStage2;
use crate::mm::stage2::{Attrs, MemType};
use crate::smmu::vsmmu::{GuestMemError, GuestMemory};
use crate::vdev::pci_ecam::{BarMapper, ConfigSpace};

/// The host bridge's ECAM window (identity mapped at EL2 as device memory).
pub struct PhysEcam {
    base: u64,
    size: u64,
}

impl PhysEcam {
    /// # Safety
    /// `base..base + size` must be the ECAM window from the DT, mapped as device memory.
    pub unsafe fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    fn addr(&self, bdf: u16, offset: u16, size: u8) -> Option<u64> {
        let off = ((bdf as u64) << 12) | (offset as u64 & 0xfff);
        (off.is_multiple_of(size as u64) && off + size as u64 <= self.size)
            .then_some(self.base + off)
    }
}

impl ConfigSpace for PhysEcam {
    fn read(&self, bdf: u16, offset: u16, size: u8) -> u32 {
        let Some(a) = self.addr(bdf, offset, size) else {
            return u32::MAX;
        };
        // SAFETY: inside the ECAM window (checked), naturally aligned, device memory.
        unsafe {
            match size {
                1 => (a as *const u8).read_volatile() as u32,
                2 => (a as *const u16).read_volatile() as u32,
                _ => (a as *const u32).read_volatile(),
            }
        }
    }

    fn write(&self, bdf: u16, offset: u16, size: u8, value: u32) {
        let Some(a) = self.addr(bdf, offset, size) else {
            return;
        };
        // SAFETY: as in `read`; the filtered ECAM only forwards writes it allows.
        unsafe {
            match size {
                1 => (a as *mut u8).write_volatile(value as u8),
                2 => (a as *mut u16).write_volatile(value as u16),
                _ => (a as *mut u32).write_volatile(value),
            }
        }
    }
}

/// Maps a VM's BARs (IPA = PA) into its stage 2 when the guest enables memory decoding.
pub struct Stage2Bars(pub Arc<VmStage2>);

impl BarMapper for Stage2Bars {
    fn map_bar(&self, bdf: u16, bar_index: u8, pa: u64, size: u64) {
        if let Err(e) = self.0.table.map(pa, pa, size, Attrs::DEVICE) {
            log::warn!("PCI {bdf:#06x} BAR{bar_index}: cannot map {pa:#x}+{size:#x}: {e}");
        }
    }

    fn unmap_bar(&self, bdf: u16, bar_index: u8, pa: u64, size: u64) {
        if let Err(e) = self.0.unmap_sync(pa, size) {
            log::warn!("PCI {bdf:#06x} BAR{bar_index}: cannot unmap {pa:#x}+{size:#x}: {e}");
        }
    }
}

/// A VM's RAM through its stage 2, as its SMMU would access it: 8-byte naturally aligned chunks
/// (single-copy atomic like the SMMU's own reads of STEs and commands), RAM only.
pub struct Stage2Memory(pub Arc<VmStage2>);

impl Stage2Memory {
    /// Host address of `ipa` for an access of `len` bytes that stays inside one page.
    fn host(&self, ipa: u64, write: bool) -> Result<u64, GuestMemError> {
        let (pa, attrs, _) = self
            .0
            .table
            .translate(ipa)
            .ok_or(GuestMemError::Unmapped { ipa })?;
        if attrs.mem != MemType::Normal || (write && !attrs.write) {
            return Err(GuestMemError::Denied { ipa });
        }
        Ok(pa)
    }
}

impl GuestMemory for Stage2Memory {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let mut done = 0;
        while done < buf.len() {
            let at = ipa + done as u64;
            let pa = self.host(at, false)?;
            if at.is_multiple_of(8) && buf.len() - done >= 8 {
                // SAFETY: `pa` is RAM the VM owns (its stage 2 maps it), identity mapped at EL2;
                // aligned 64-bit load.
                let v = unsafe { (pa as *const u64).read_volatile() };
                buf[done..done + 8].copy_from_slice(&v.to_le_bytes());
                done += 8;
            } else {
                // SAFETY: as above, one byte.
                buf[done] = unsafe { (pa as *const u8).read_volatile() };
                done += 1;
            }
        }
        Ok(())
    }

    fn write(&self, ipa: u64, buf: &[u8]) -> Result<(), GuestMemError> {
        let mut done = 0;
        while done < buf.len() {
            let at = ipa + done as u64;
            let pa = self.host(at, true)?;
            if at.is_multiple_of(8) && buf.len() - done >= 8 {
                let v = u64::from_le_bytes(buf[done..done + 8].try_into().unwrap_or([0; 8]));
                // SAFETY: as in `read`, writable RAM of the VM; aligned 64-bit store.
                unsafe { (pa as *mut u64).write_volatile(v) };
                done += 8;
            } else {
                // SAFETY: as above, one byte.
                unsafe { (pa as *mut u8).write_volatile(buf[done]) };
                done += 1;
            }
        }
        Ok(())
    }
}
