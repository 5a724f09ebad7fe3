//! AArch64 VMSA translation tables (4 KiB granule) for the two regimes the hypervisor builds:
//! its own EL2 stage 1 (an identity map) and each VM's stage 2.
//!
//! `map` always uses the largest block that alignment and size allow (1 GiB at level 1, 2 MiB at
//! level 2, else 4 KiB pages), so guest RAM costs few TLB entries. Mapping over an existing mapping
//! is an error, never a silent overwrite. This builder is used while tables are private (before the
//! VM runs, or before the MMU uses them); it takes `&mut self` and does no break-before-make, which
//! live updates will need.
//!
//! The table walker touches memory only through [`TableAlloc::table`], so the same code runs with
//! the MMU off (early boot, aligned stores only, no atomics), on the live system, and on the host in
//! unit tests.

use core::fmt;

const ENTRIES: usize = 512;
const PAGE_SHIFT: u32 = 12;
/// Bytes in a 4 KiB page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub(crate) const DESC_VALID: u64 = 1 << 0;
/// Bit 1 distinguishes tables/pages (1) from blocks (0) at levels 0–2 and must be 1 at level 3.
pub(crate) const DESC_TABLE_OR_PAGE: u64 = 1 << 1;
const DESC_AF: u64 = 1 << 10;
const DESC_SH_INNER: u64 = 0b11 << 8;
const DESC_XN: u64 = 1 << 54;
/// Output address bits of a descriptor (48-bit PA).
pub(crate) const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

/// Which translation regime a table belongs to: the descriptor attribute encodings differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    /// EL2 stage 1 (non-VHE). AttrIndx selects MAIR_EL2 slot [`MAIR_NORMAL_IDX`] or
    /// [`MAIR_DEVICE_IDX`]; AP[1] is RES1 in this regime.
    El2,
    /// EL1&0 stage 1, used only to report an error when the image is (wrongly) entered at EL1.
    /// Same as [`Regime::El2`] but AP[1] = 0: memory EL0 could write would not be executable at
    /// EL1.
    El1,
    /// Stage 2 (VTTBR_EL2 / SMMU S2TTB): MemAttr and S2AP are in the descriptor itself.
    Stage2,
}

/// MAIR_EL2 slot for normal write-back cacheable memory.
pub const MAIR_NORMAL_IDX: u64 = 0;
/// MAIR_EL2 slot for Device-nGnRE.
pub const MAIR_DEVICE_IDX: u64 = 1;
/// MAIR_EL2 value matching the two slots above.
pub const MAIR_EL2_VALUE: u64 = 0xff | (0x04 << 8);

/// Memory type of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    /// Normal, inner/outer write-back cacheable, inner shareable.
    Normal,
    /// Device-nGnRE: MMIO.
    Device,
}

/// Type and permissions of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    pub mem: MemType,
    pub write: bool,
    pub exec: bool,
}

impl Attrs {
    /// Read/write data, never executable.
    pub const RW: Attrs = Attrs {
        mem: MemType::Normal,
        write: true,
        exec: false,
    };
    /// Read-only data.
    pub const RO: Attrs = Attrs {
        mem: MemType::Normal,
        write: false,
        exec: false,
    };
    /// Read-only, executable code.
    pub const RX: Attrs = Attrs {
        mem: MemType::Normal,
        write: false,
        exec: true,
    };
    /// Normal memory that may hold code and data (guest RAM).
    pub const RWX: Attrs = Attrs {
        mem: MemType::Normal,
        write: true,
        exec: true,
    };
    /// Device registers.
    pub const DEVICE: Attrs = Attrs {
        mem: MemType::Device,
        write: true,
        exec: false,
    };

    /// The attribute bits (and AF) of a leaf descriptor for `regime`: no address, no valid/type
    /// bits.
    pub(crate) fn encode(self, regime: Regime) -> u64 {
        let mut d = DESC_AF;
        if self.mem == MemType::Normal {
            d |= DESC_SH_INNER;
        }
        if !self.exec || self.mem == MemType::Device {
            d |= DESC_XN;
        }
        match regime {
            Regime::El2 | Regime::El1 => {
                let idx = match self.mem {
                    MemType::Normal => MAIR_NORMAL_IDX,
                    MemType::Device => MAIR_DEVICE_IDX,
                };
                // AP[2:1]: 0b01 read/write, 0b11 read-only (AP[1] is RES1 at EL2).
                let mut ap = if self.write { 0b01 } else { 0b11 };
                if regime == Regime::El1 {
                    ap &= !0b01;
                }
                d | (idx << 2) | (ap << 6)
            }
            Regime::Stage2 => {
                // MemAttr[3:0]: 0b1111 normal WB/WB, 0b0001 Device-nGnRE.
                let memattr = match self.mem {
                    MemType::Normal => 0b1111,
                    MemType::Device => 0b0001,
                };
                // S2AP: 0b01 read-only, 0b11 read/write.
                let s2ap = if self.write { 0b11 } else { 0b01 };
                d | (memattr << 2) | (s2ap << 6)
            }
        }
    }

    /// The attributes of a leaf descriptor `desc` of `regime` (inverse of [`Attrs::encode`]).
    pub(crate) fn decode(desc: u64, regime: Regime) -> Attrs {
        let exec = desc & DESC_XN == 0;
        match regime {
            Regime::El2 | Regime::El1 => Attrs {
                mem: if (desc >> 2) & 0b111 == MAIR_DEVICE_IDX {
                    MemType::Device
                } else {
                    MemType::Normal
                },
                write: (desc >> 7) & 1 == 0,
                exec,
            },
            Regime::Stage2 => Attrs {
                mem: if (desc >> 2) & 0b1111 == 0b1111 {
                    MemType::Normal
                } else {
                    MemType::Device
                },
                write: (desc >> 7) & 1 == 1,
                exec,
            },
        }
    }
}

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Address or size not page aligned, or size zero.
    Unaligned { va: u64, pa: u64, size: u64 },
    /// The range does not fit in the table's input address size.
    OutOfRange { va: u64, size: u64, limit: u64 },
    /// Part of the range is already mapped.
    AlreadyMapped { va: u64 },
    /// No memory for a new table.
    NoMemory,
    /// Part of the range (starting at `va`) is not mapped (stage-2 `protect`).
    NotMapped { va: u64 },
    /// `protect` would change the memory type of the mapping at `va`; only permissions may
    /// change in place (a type change needs unmap, sync, map).
    MemTypeChange { va: u64 },
    /// The operation would have to split the block mapping `va` while the table is live, and the
    /// table's split policy forbids that.
    WouldSplit { va: u64 },
    /// The output range does not fit in the 48-bit physical address space.
    OutputOutOfRange { pa: u64, size: u64 },
    /// The table cannot be built for this input address size.
    UnsupportedInputSize { bits: u32 },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MapError::Unaligned { va, pa, size } => {
                write!(f, "unaligned mapping {va:#x} -> {pa:#x} size {size:#x}")
            }
            MapError::OutOfRange { va, size, limit } => {
                write!(
                    f,
                    "mapping {va:#x}+{size:#x} exceeds the input range {limit:#x}"
                )
            }
            MapError::AlreadyMapped { va } => write!(f, "{va:#x} is already mapped"),
            MapError::NoMemory => write!(f, "out of memory for page tables"),
            MapError::NotMapped { va } => write!(f, "{va:#x} is not mapped"),
            MapError::MemTypeChange { va } => {
                write!(f, "changing the memory type of the mapping at {va:#x}")
            }
            MapError::WouldSplit { va } => {
                write!(f, "the block mapping {va:#x} cannot be split while live")
            }
            MapError::OutputOutOfRange { pa, size } => {
                write!(f, "output range {pa:#x}+{size:#x} exceeds 48 bits")
            }
            MapError::UnsupportedInputSize { bits } => {
                write!(f, "unsupported input address size of {bits} bits")
            }
        }
    }
}

/// Source of zeroed, naturally aligned table pages.
pub trait TableAlloc {
    /// Allocates `pages` contiguous zeroed pages aligned to their total size; returns the physical
    /// address.
    fn alloc_pages(&self, pages: usize) -> Option<u64>;
    /// Pointer through which the table at physical address `pa` is read and written.
    fn table(&self, pa: u64) -> *mut u64;
}

/// A translation table rooted at `root`.
pub struct PageTable<A: TableAlloc> {
    alloc: A,
    regime: Regime,
    root: u64,
    start_level: u32,
    /// Entries in the root: 512 × the number of concatenated root tables.
    root_entries: usize,
    input_bits: u32,
}

fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + 9 * (3 - level)
}

impl<A: TableAlloc> PageTable<A> {
    /// A new empty table for `input_bits` of input address. Stage 2 concatenates up to 16 root
    /// tables as VTCR_EL2 allows, to start one level lower; stage 1 never concatenates.
    pub fn new(alloc: A, regime: Regime, input_bits: u32) -> Result<Self, MapError> {
        assert!(
            (25..=48).contains(&input_bits),
            "unsupported input size {input_bits}"
        );
        let mut start_level = 3 - (input_bits - PAGE_SHIFT - 1) / 9;
        let mut root_bits = input_bits - level_shift(start_level);
        if regime == Regime::Stage2 && start_level == 0 && root_bits <= 4 {
            // Start at level 1 with 2^(input_bits - 39) concatenated tables (≤ 16).
            start_level = 1;
            root_bits = input_bits - level_shift(1);
        }
        let root_entries = 1usize << root_bits;
        let pages = root_entries.div_ceil(ENTRIES);
        let root = alloc.alloc_pages(pages).ok_or(MapError::NoMemory)?;
        Ok(Self {
            alloc,
            regime,
            root,
            start_level,
            root_entries,
            input_bits,
        })
    }

    /// Physical address of the root table (for TTBR0_EL2 / VTTBR_EL2 / S2TTB).
    pub fn root_pa(&self) -> u64 {
        self.root
    }

    /// The level translation starts at (for VTCR_EL2.SL0 / TCR T0SZ checks).
    pub fn start_level(&self) -> u32 {
        self.start_level
    }

    /// Input address bits covered (T0SZ = 64 - this).
    pub fn input_bits(&self) -> u32 {
        self.input_bits
    }

    /// The allocator (e.g. to account for its pages).
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    fn entry(&self, table: u64, index: usize) -> *mut u64 {
        // Index bounds are guaranteed by the callers' masks; the pointer is only formed here.
        self.alloc.table(table).wrapping_add(index)
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` is a table page this PageTable allocated and `index` is within it.
        unsafe { self.entry(table, index).read_volatile() }
    }

    fn write(&self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `read`; single aligned 64-bit store, so the walker never sees a torn value.
        unsafe { self.entry(table, index).write_volatile(value) }
    }

    fn index(&self, level: u32, va: u64) -> usize {
        let entries = if level == self.start_level {
            self.root_entries
        } else {
            ENTRIES
        };
        ((va >> level_shift(level)) as usize) & (entries - 1)
    }

    /// Maps `size` bytes at input address `va` to output address `pa`.
    pub fn map(&mut self, va: u64, pa: u64, size: u64, attrs: Attrs) -> Result<(), MapError> {
        if size == 0 || (va | pa | size) & (PAGE_SIZE - 1) != 0 {
            return Err(MapError::Unaligned { va, pa, size });
        }
        let limit = 1u64 << self.input_bits;
        if va >= limit || size > limit - va {
            return Err(MapError::OutOfRange { va, size, limit });
        }
        // Check first so a failed map leaves nothing half-done.
        if let Some(at) = self.first_mapped(va, size) {
            return Err(MapError::AlreadyMapped { va: at });
        }
        let desc_attrs = attrs.encode(self.regime);
        self.map_level(self.start_level, self.root, va, pa, size, desc_attrs)
    }

    fn map_level(
        &mut self,
        level: u32,
        table: u64,
        mut va: u64,
        mut pa: u64,
        mut size: u64,
        attrs: u64,
    ) -> Result<(), MapError> {
        let shift = level_shift(level);
        let block = 1u64 << shift;
        while size > 0 {
            let index = self.index(level, va);
            let chunk = (block - (va & (block - 1))).min(size);
            let aligned = (va | pa) & (block - 1) == 0 && chunk == block;
            if level == 3 {
                self.write(table, index, pa | attrs | DESC_VALID | DESC_TABLE_OR_PAGE);
            } else if aligned && (1..=2).contains(&level) {
                self.write(table, index, pa | attrs | DESC_VALID);
            } else {
                let next = self.next_table(table, index)?;
                self.map_level(level + 1, next, va, pa, chunk, attrs)?;
            }
            va += chunk;
            pa += chunk;
            size -= chunk;
        }
        Ok(())
    }

    fn next_table(&mut self, table: u64, index: usize) -> Result<u64, MapError> {
        let desc = self.read(table, index);
        if desc & DESC_VALID != 0 {
            debug_assert!(
                desc & DESC_TABLE_OR_PAGE != 0,
                "block where a table was checked"
            );
            return Ok(desc & ADDR_MASK);
        }
        let next = self.alloc.alloc_pages(1).ok_or(MapError::NoMemory)?;
        self.write(table, index, next | DESC_VALID | DESC_TABLE_OR_PAGE);
        Ok(next)
    }

    /// First address in `[va, va + size)` that is already mapped, if any.
    fn first_mapped(&self, va: u64, size: u64) -> Option<u64> {
        let end = va + size;
        let mut at = va;
        while at < end {
            match self.walk(at) {
                Walk::Mapped { .. } => return Some(at),
                Walk::Hole { level } => {
                    let span = 1u64 << level_shift(level);
                    at = (at & !(span - 1)) + span;
                }
            }
        }
        None
    }

    fn walk(&self, va: u64) -> Walk {
        let mut table = self.root;
        let mut level = self.start_level;
        loop {
            let desc = self.read(table, self.index(level, va));
            if desc & DESC_VALID == 0 {
                return Walk::Hole { level };
            }
            let is_table = desc & DESC_TABLE_OR_PAGE != 0 && level < 3;
            if !is_table {
                return Walk::Mapped { desc, level };
            }
            table = desc & ADDR_MASK;
            level += 1;
        }
    }

    /// Output address and attributes for `va`, if mapped.
    pub fn translate(&self, va: u64) -> Option<(u64, Attrs)> {
        if va >> self.input_bits != 0 {
            return None;
        }
        match self.walk(va) {
            Walk::Hole { .. } => None,
            Walk::Mapped { desc, level } => {
                let offset_mask = (1u64 << level_shift(level)) - 1;
                let base = desc & ADDR_MASK & !offset_mask;
                Some((base | (va & offset_mask), Attrs::decode(desc, self.regime)))
            }
        }
    }

    /// The level of the leaf entry mapping `va` (1 = 1 GiB block, 2 = 2 MiB block, 3 = page).
    pub fn leaf_level(&self, va: u64) -> Option<u32> {
        match self.walk(va) {
            Walk::Mapped { level, .. } => Some(level),
            Walk::Hole { .. } => None,
        }
    }
}

enum Walk {
    Mapped { desc: u64, level: u32 },
    Hole { level: u32 },
}

#[cfg(test)]
pub(crate) mod test_alloc {
    use super::*;
    use std::{alloc::Layout, cell::RefCell, vec::Vec};

    /// Host allocator: table "physical addresses" are host pointers.
    #[derive(Default)]
    pub struct HostAlloc {
        pub pages: RefCell<Vec<(u64, usize)>>,
    }

    impl TableAlloc for &HostAlloc {
        fn alloc_pages(&self, pages: usize) -> Option<u64> {
            let size = pages * PAGE_SIZE as usize;
            let layout = Layout::from_size_align(size, size).ok()?;
            // SAFETY: non-zero size layout.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            self.pages.borrow_mut().push((p as u64, pages));
            Some(p as u64)
        }
        fn table(&self, pa: u64) -> *mut u64 {
            pa as *mut u64
        }
    }

    impl Drop for HostAlloc {
        fn drop(&mut self) {
            for &(p, pages) in self.pages.borrow().iter() {
                let size = pages * PAGE_SIZE as usize;
                // SAFETY: allocated above with this layout.
                unsafe {
                    std::alloc::dealloc(p as *mut u8, Layout::from_size_align(size, size).unwrap())
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_alloc::HostAlloc;
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn stage2_40_bit_concatenates_two_level1_tables() {
        let a = HostAlloc::default();
        let mut t = PageTable::new(&a, Regime::Stage2, 40).unwrap();
        assert_eq!(t.start_level(), 1);
        assert_eq!(a.pages.borrow()[0].1, 2, "root is two concatenated pages");
        // An address in the second half of the 40-bit space uses the second root page.
        t.map(0x80_0000_0000 + GIB, 0x4000_0000, GIB, Attrs::RWX)
            .unwrap();
        assert_eq!(t.translate(0x80_4000_1234), Some((0x4000_1234, Attrs::RWX)));
        assert_eq!(t.leaf_level(0x80_4000_0000), Some(1));
    }

    #[test]
    fn largest_blocks_are_used() {
        let a = HostAlloc::default();
        let mut t = PageTable::new(&a, Regime::Stage2, 40).unwrap();
        // 64 MiB at 2 MiB alignment: 32 level-2 blocks.
        t.map(0x8000_0000, 0x5000_0000, 64 * MIB, Attrs::RWX)
            .unwrap();
        assert_eq!(t.leaf_level(0x8000_0000), Some(2));
        assert_eq!(t.leaf_level(0x83ff_f000), Some(2));
        // Misaligned PA relative to IPA forces pages.
        t.map(0x9000_0000, 0x6000_1000, 2 * MIB, Attrs::RW).unwrap();
        assert_eq!(t.leaf_level(0x9000_0000), Some(3));
        assert_eq!(t.translate(0x901f_f008), Some((0x6020_0008, Attrs::RW)));
        assert_eq!(t.translate(0x8400_0000), None);
    }

    #[test]
    fn head_and_tail_pages_around_blocks() {
        let a = HostAlloc::default();
        let mut t = PageTable::new(&a, Regime::El2, 48).unwrap();
        assert_eq!(t.start_level(), 0);
        t.map(0x401f_f000, 0x401f_f000, 2 * MIB + 2 * PAGE_SIZE, Attrs::RW)
            .unwrap();
        assert_eq!(t.leaf_level(0x401f_f000), Some(3));
        assert_eq!(t.leaf_level(0x4020_0000), Some(2));
        assert_eq!(t.leaf_level(0x4040_0000), Some(3));
        assert_eq!(t.translate(0x4040_0fff), Some((0x4040_0fff, Attrs::RW)));
        assert_eq!(t.translate(0x4040_1000), None);
    }

    #[test]
    fn overlap_is_rejected_and_leaves_nothing_behind() {
        let a = HostAlloc::default();
        let mut t = PageTable::new(&a, Regime::Stage2, 40).unwrap();
        t.map(0x4000_0000 + 4 * MIB, 0x1000_0000, PAGE_SIZE, Attrs::RW)
            .unwrap();
        let err = t
            .map(0x4000_0000, 0x2000_0000, 8 * MIB, Attrs::RW)
            .unwrap_err();
        assert_eq!(err, MapError::AlreadyMapped { va: 0x4040_0000 });
        assert_eq!(t.translate(0x4000_0000), None);
    }

    #[test]
    fn bad_arguments() {
        let a = HostAlloc::default();
        let mut t = PageTable::new(&a, Regime::Stage2, 40).unwrap();
        assert!(matches!(
            t.map(0x1001, 0, PAGE_SIZE, Attrs::RW),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            t.map(0, 0, 0, Attrs::RW),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            t.map(0xff_ffff_f000, 0, 2 * PAGE_SIZE, Attrs::RW),
            Err(MapError::OutOfRange { .. })
        ));
        assert_eq!(t.translate(1 << 41), None);
    }

    #[test]
    fn attribute_encodings() {
        // Stage 2 device: MemAttr 0b0001, S2AP RW, XN, AF.
        let d = Attrs::DEVICE.encode(Regime::Stage2);
        assert_eq!((d >> 2) & 0xf, 0b0001);
        assert_eq!((d >> 6) & 0b11, 0b11);
        assert_ne!(d & DESC_XN, 0);
        assert_eq!(Attrs::decode(d, Regime::Stage2), Attrs::DEVICE);
        // EL2 read-only code: AttrIndx 0, AP 0b11, executable.
        let c = Attrs::RX.encode(Regime::El2);
        assert_eq!((c >> 6) & 0b11, 0b11);
        assert_eq!(c & DESC_XN, 0);
        assert_eq!(Attrs::decode(c, Regime::El2), Attrs::RX);
        for a in [Attrs::RW, Attrs::RO, Attrs::RX, Attrs::RWX, Attrs::DEVICE] {
            assert_eq!(Attrs::decode(a.encode(Regime::El2), Regime::El2), a);
            assert_eq!(Attrs::decode(a.encode(Regime::Stage2), Regime::Stage2), a);
        }
    }
}
