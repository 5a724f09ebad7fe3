//! Dispatch of trapped guest MMIO accesses to emulated devices, by IPA range.
//!
//! Each VM has one [`MmioBus`]. Devices are registered while the VM is built, through `&mut`
//! access; once the VM is shared with its vCPUs (behind an `Arc` or a `&'static`), nothing can get
//! `&mut` any more, so the bus is frozen by the type system and lookups need no lock: a data
//! abort does a binary search over a `Vec` sorted by base address. Devices synchronise their own
//! state (they get `&self` from several vCPUs at once).

use core::fmt;

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::esr::MmioAccess;

/// Why an emulated MMIO access or a registration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// No device covers this IPA (the arch layer injects an abort into the guest).
    Unmapped { ipa: u64 },
    /// The device does not support accesses of this size.
    BadSize { size: u8 },
    /// The device has nothing at this offset, or the access is misaligned or runs past the end
    /// of the device's window.
    BadOffset { offset: u64 },
    /// Registration: the range overlaps an already registered device.
    Overlap { base: u64, size: u64 },
    /// Registration: the range is empty or wraps around the address space.
    InvalidRange { base: u64, size: u64 },
    /// A device-specific failure.
    Device(&'static str),
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmioError::Unmapped { ipa } => write!(f, "no device at IPA {ipa:#x}"),
            MmioError::BadSize { size } => write!(f, "unsupported {size}-byte access"),
            MmioError::BadOffset { offset } => write!(f, "bad register offset {offset:#x}"),
            MmioError::Overlap { base, size } => {
                write!(f, "range {base:#x}+{size:#x} overlaps another device")
            }
            MmioError::InvalidRange { base, size } => {
                write!(f, "invalid range {base:#x}+{size:#x}")
            }
            MmioError::Device(msg) => f.write_str(msg),
        }
    }
}

/// An emulated device with registers in guest-physical address space.
///
/// `offset` is relative to the device's base; `size` is 1, 2, 4 or 8 bytes. Reads return the raw
/// value in the low `size` bytes (the bus truncates and extends it for the destination register).
/// Called from the trap path of any vCPU of the VM, possibly concurrently.
pub trait MmioDevice: Send + Sync {
    /// Name for log messages.
    fn name(&self) -> &str;
    /// Emulates a load of `size` bytes at `offset` by `vcpu`.
    fn read(&self, vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError>;
    /// Emulates a store of the low `size` bytes of `value` at `offset` by `vcpu`.
    fn write(&self, vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError>;
}

struct Region {
    base: u64,
    size: u64,
    device: Arc<dyn MmioDevice>,
}

impl Region {
    /// Offset of `ipa` in this region, if it lies inside.
    fn offset_of(&self, ipa: u64) -> Option<u64> {
        ipa.checked_sub(self.base).filter(|&off| off < self.size)
    }
}

/// The emulated devices of one VM, sorted by base IPA, non-overlapping.
#[derive(Default)]
pub struct MmioBus {
    regions: Vec<Region>,
}

impl MmioBus {
    /// An empty bus.
    pub const fn new() -> Self {
        MmioBus {
            regions: Vec::new(),
        }
    }

    /// Registers `device` at IPAs `base..base + size`. Fails on an empty or wrapping range and on
    /// an overlap with a registered device. Only possible before the VM is shared (`&mut self`).
    pub fn register(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), MmioError> {
        let invalid = MmioError::InvalidRange { base, size };
        if size == 0 {
            return Err(invalid);
        }
        // Inclusive end, so a device may end at the very top of the address space.
        let last = base.checked_add(size - 1).ok_or(invalid)?;
        let at = self.regions.partition_point(|r| r.base < base);
        let overlaps_prev = at
            .checked_sub(1)
            .is_some_and(|i| self.regions[i].offset_of(base).is_some());
        let overlaps_next = self.regions.get(at).is_some_and(|next| next.base <= last);
        if overlaps_prev || overlaps_next {
            return Err(MmioError::Overlap { base, size });
        }
        self.regions.insert(at, Region { base, size, device });
        Ok(())
    }

    fn region(&self, ipa: u64) -> Option<(&Region, u64)> {
        // The last region starting at or below `ipa` is the only one that can contain it.
        let i = self
            .regions
            .partition_point(|r| r.base <= ipa)
            .checked_sub(1)?;
        let region = &self.regions[i];
        region.offset_of(ipa).map(|off| (region, off))
    }

    /// The device covering `ipa` and the offset of `ipa` inside it. Lock-free: O(log n).
    pub fn find(&self, ipa: u64) -> Option<(&dyn MmioDevice, u64)> {
        self.region(ipa).map(|(r, off)| (&*r.device, off))
    }

    /// Emulates the access `access` to `ipa` made by `vcpu`.
    ///
    /// For a store, `reg_value_for_write` is the value of the source register (pass 0 for XZR,
    /// `access.reg` = 31) and the result is `Ok(None)`. For a load, the result is `Ok(Some(v))`
    /// with `v` already truncated and sign- or zero-extended as the instruction requires; the arch
    /// layer writes it to register `access.reg` (unless that is XZR). Either way the arch layer
    /// then steps the guest PC past the instruction. On error it injects an abort instead.
    pub fn dispatch(
        &self,
        vcpu: usize,
        ipa: u64,
        access: &MmioAccess,
        reg_value_for_write: u64,
    ) -> Result<Option<u64>, MmioError> {
        let (region, offset) = self.region(ipa).ok_or(MmioError::Unmapped { ipa })?;
        // The whole access must lie inside the device's window.
        if region.size - offset < u64::from(access.size) {
            return Err(MmioError::BadOffset { offset });
        }
        let device = &*region.device;
        if access.write {
            device.write(
                vcpu,
                offset,
                access.size,
                access.write_value(reg_value_for_write),
            )?;
            Ok(None)
        } else {
            let raw = device.read(vcpu, offset, access.size)?;
            Ok(Some(access.read_result(raw)))
        }
    }

    /// Iterates over the registered devices as `(base, size, device)`, in IPA order, e.g. to
    /// describe them in the guest's device tree or to flush them when the VM stops.
    pub fn devices(&self) -> impl Iterator<Item = (u64, u64, &dyn MmioDevice)> {
        self.regions.iter().map(|r| (r.base, r.size, &*r.device))
    }
}

impl fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.regions
                    .iter()
                    .map(|r| (r.base, r.size, r.device.name())),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::string::ToString;
    use std::sync::Mutex;
    use std::vec;

    /// (vcpu, offset, size, value written or None for a read).
    type Logged = (usize, u64, u8, Option<u64>);

    /// Records every access; reads return `tag << 32 | offset`.
    struct Probe {
        tag: u64,
        log: Mutex<Vec<Logged>>,
    }

    impl Probe {
        fn new(tag: u64) -> Arc<Self> {
            Arc::new(Probe {
                tag,
                log: Mutex::new(Vec::new()),
            })
        }
    }

    impl MmioDevice for Probe {
        fn name(&self) -> &str {
            "probe"
        }
        fn read(&self, vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
            self.log.lock().unwrap().push((vcpu, offset, size, None));
            if offset == 0x666 {
                return Err(MmioError::Device("boom"));
            }
            Ok((self.tag << 32) | offset)
        }
        fn write(&self, vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
            self.log
                .lock()
                .unwrap()
                .push((vcpu, offset, size, Some(value)));
            Ok(())
        }
    }

    fn access(size: u8, write: bool) -> MmioAccess {
        MmioAccess {
            size,
            reg: 0,
            sign_extend: false,
            sf: true,
            write,
        }
    }

    #[test]
    fn register_rejects_overlaps_and_bad_ranges() {
        let mut bus = MmioBus::new();
        bus.register(0x1000, 0x1000, Probe::new(1)).unwrap();
        bus.register(0x3000, 0x1000, Probe::new(2)).unwrap();
        // Exactly between them fits.
        bus.register(0x2000, 0x1000, Probe::new(3)).unwrap();
        for (base, size) in [
            (0x1000, 0x1000),
            (0x0800, 0x1000),
            (0x1fff, 1),
            (0x3fff, 0x10),
            (0x0, 0x10_0000),
            (0x2800, 0x10),
        ] {
            assert_eq!(
                bus.register(base, size, Probe::new(9)),
                Err(MmioError::Overlap { base, size }),
                "{base:#x}+{size:#x}"
            );
        }
        assert_eq!(
            bus.register(0x9000, 0, Probe::new(9)),
            Err(MmioError::InvalidRange {
                base: 0x9000,
                size: 0
            })
        );
        assert_eq!(
            bus.register(u64::MAX, 2, Probe::new(9)),
            Err(MmioError::InvalidRange {
                base: u64::MAX,
                size: 2
            })
        );
        // A device ending at the top of the address space is fine.
        bus.register(u64::MAX - 0xfff, 0x1000, Probe::new(4))
            .unwrap();
        bus.register(0, 0x1000, Probe::new(0)).unwrap();
        let bases: vec::Vec<u64> = bus.devices().map(|(b, _, _)| b).collect();
        assert_eq!(bases, [0, 0x1000, 0x2000, 0x3000, u64::MAX - 0xfff]);
    }

    #[test]
    fn find_and_dispatch() {
        let uart = Probe::new(1);
        let gic = Probe::new(2);
        let mut bus = MmioBus::new();
        bus.register(0x0900_0000, 0x1000, uart.clone()).unwrap();
        bus.register(0x0800_0000, 0x1_0000, gic.clone()).unwrap();

        let (dev, off) = bus.find(0x0900_0018).unwrap();
        assert_eq!((dev.name(), off), ("probe", 0x18));
        assert!(bus.find(0x0900_1000).is_none());
        assert!(bus.find(0x07ff_ffff).is_none());
        assert!(bus.find(0).is_none());
        assert_eq!(bus.find(0x0800_ffff).unwrap().1, 0xffff);

        // Read: the result is truncated to the access size (reads return tag << 32 | offset).
        assert_eq!(
            bus.dispatch(3, 0x0800_0104, &access(4, false), 0),
            Ok(Some(0x104))
        );
        assert_eq!(
            bus.dispatch(3, 0x0800_0104, &access(8, false), 0),
            Ok(Some((2 << 32) | 0x104))
        );
        // Write: the value is truncated to the access size.
        assert_eq!(
            bus.dispatch(1, 0x0900_0000, &access(1, true), 0x1234_5641),
            Ok(None)
        );
        assert_eq!(*uart.log.lock().unwrap(), [(1, 0, 1, Some(0x41))]);
        assert_eq!(
            *gic.log.lock().unwrap(),
            [(3, 0x104, 4, None), (3, 0x104, 8, None)]
        );

        assert_eq!(
            bus.dispatch(0, 0x0a00_0000, &access(4, false), 0),
            Err(MmioError::Unmapped { ipa: 0x0a00_0000 })
        );
        // Straddling the end of the window.
        assert_eq!(
            bus.dispatch(0, 0x0900_0ffc, &access(8, true), 0),
            Err(MmioError::BadOffset { offset: 0xffc })
        );
        // Device errors pass through.
        assert_eq!(
            bus.dispatch(0, 0x0900_0666, &access(4, false), 0),
            Err(MmioError::Device("boom"))
        );
        assert_eq!(MmioError::Device("boom").to_string(), "boom");
        assert_eq!(
            MmioError::Unmapped { ipa: 0x10 }.to_string(),
            "no device at IPA 0x10"
        );
    }

    #[test]
    fn empty_bus() {
        let bus = MmioBus::default();
        assert!(bus.find(0x1234).is_none());
        assert_eq!(
            bus.dispatch(0, 0x1234, &access(4, true), 0),
            Err(MmioError::Unmapped { ipa: 0x1234 })
        );
    }
}
