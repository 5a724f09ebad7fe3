//! SMMUv3 programming interface: the page-0 and page-1 registers, named and laid out as in the Arm
//! SMMUv3 specification (IHI0070), plus the queue-pointer arithmetic every queue user shares.
//!
//! Three views of the same registers:
//!
//! * [`off`]: the byte offset of every register from the SMMU base, for code that dispatches on
//!   offsets (the driver's [`SmmuMmio`](super::driver::SmmuMmio) accesses, the emulated SMMU's
//!   MMIO handler). Page-1 registers carry the `+0x10000` in their offset.
//! * `register_bitfields!` types ([`IDR0`], [`CR0`], [`GBPA`], …): field positions, usable on a
//!   value read through any accessor with [`LocalRegisterCopy`](tock_registers::LocalRegisterCopy)
//!   or to build a value with `FieldValue::value`.
//! * [`SmmuPage0`] / [`SmmuPage1`]: `register_structs!` layouts of the two 64 KiB pages; the
//!   offsets of their fields are checked against [`off`] in the tests.
//!
//! ## EVENTQ_PROD/CONS and PRIQ_PROD/CONS live in page 1
//!
//! The architecture places `SMMU_EVENTQ_PROD`/`SMMU_EVENTQ_CONS` at `0x100A8`/`0x100AC` and
//! `SMMU_PRIQ_PROD`/`SMMU_PRIQ_CONS` at `0x100C8`/`0x100CC` (page 1), so that they can be mapped
//! separately from the rest of the interface. The same offsets in page 0 (`0xA8`, `0xAC`, `0xC8`,
//! `0xCC`) are reserved: software must not use them, and an emulated SMMU answers them RAZ/WI.
//! (A few implementations only decode page 0 and put these registers there; Linux supports them
//! with its `ARM_SMMU_OPT_PAGE0_REGS_ONLY` "page 1 fix-up". This driver does not.)

use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

/// Register offsets from the SMMU base. Page-1 registers include [`PAGE1`](off::PAGE1).
pub mod off {
    /// Start of register page 1.
    pub const PAGE1: u64 = 0x1_0000;
    /// Size of the register file the driver uses (pages 0 and 1).
    pub const SIZE: u64 = 0x2_0000;

    pub const IDR0: u64 = 0x00;
    pub const IDR1: u64 = 0x04;
    pub const IDR2: u64 = 0x08;
    pub const IDR3: u64 = 0x0c;
    pub const IDR4: u64 = 0x10;
    pub const IDR5: u64 = 0x14;
    pub const IIDR: u64 = 0x18;
    pub const AIDR: u64 = 0x1c;
    pub const CR0: u64 = 0x20;
    pub const CR0ACK: u64 = 0x24;
    pub const CR1: u64 = 0x28;
    pub const CR2: u64 = 0x2c;
    pub const STATUSR: u64 = 0x40;
    pub const GBPA: u64 = 0x44;
    pub const AGBPA: u64 = 0x48;
    pub const IRQ_CTRL: u64 = 0x50;
    pub const IRQ_CTRLACK: u64 = 0x54;
    pub const GERROR: u64 = 0x60;
    pub const GERRORN: u64 = 0x64;
    /// 64-bit.
    pub const GERROR_IRQ_CFG0: u64 = 0x68;
    pub const GERROR_IRQ_CFG1: u64 = 0x70;
    pub const GERROR_IRQ_CFG2: u64 = 0x74;
    /// 64-bit.
    pub const STRTAB_BASE: u64 = 0x80;
    pub const STRTAB_BASE_CFG: u64 = 0x88;
    /// 64-bit.
    pub const CMDQ_BASE: u64 = 0x90;
    pub const CMDQ_PROD: u64 = 0x98;
    pub const CMDQ_CONS: u64 = 0x9c;
    /// 64-bit.
    pub const EVENTQ_BASE: u64 = 0xa0;
    /// 64-bit.
    pub const EVENTQ_IRQ_CFG0: u64 = 0xb0;
    pub const EVENTQ_IRQ_CFG1: u64 = 0xb8;
    pub const EVENTQ_IRQ_CFG2: u64 = 0xbc;
    /// 64-bit.
    pub const PRIQ_BASE: u64 = 0xc0;
    /// 64-bit.
    pub const PRIQ_IRQ_CFG0: u64 = 0xd0;
    pub const PRIQ_IRQ_CFG1: u64 = 0xd8;
    pub const PRIQ_IRQ_CFG2: u64 = 0xdc;
    /// Page 1.
    pub const EVENTQ_PROD: u64 = PAGE1 + 0xa8;
    /// Page 1.
    pub const EVENTQ_CONS: u64 = PAGE1 + 0xac;
    /// Page 1.
    pub const PRIQ_PROD: u64 = PAGE1 + 0xc8;
    /// Page 1.
    pub const PRIQ_CONS: u64 = PAGE1 + 0xcc;
    /// Reserved page-0 aliases of the page-1 queue pointers (RAZ/WI; see the module docs).
    pub const RESERVED_PAGE0_EVENTQ_PROD: u64 = 0xa8;
    pub const RESERVED_PAGE0_EVENTQ_CONS: u64 = 0xac;
    pub const RESERVED_PAGE0_PRIQ_PROD: u64 = 0xc8;
    pub const RESERVED_PAGE0_PRIQ_CONS: u64 = 0xcc;

    /// Whether the register at `off` is 64 bits wide.
    pub const fn is_64bit(off: u64) -> bool {
        matches!(
            off,
            GERROR_IRQ_CFG0
                | STRTAB_BASE
                | CMDQ_BASE
                | EVENTQ_BASE
                | EVENTQ_IRQ_CFG0
                | PRIQ_BASE
                | PRIQ_IRQ_CFG0
        )
    }
}

register_bitfields![u32,
    /// SMMU_IDR0: features.
    pub IDR0 [
        S2P OFFSET(0) NUMBITS(1) [],
        S1P OFFSET(1) NUMBITS(1) [],
        TTF OFFSET(2) NUMBITS(2) [AArch32 = 1, AArch64 = 2, Both = 3],
        COHACC OFFSET(4) NUMBITS(1) [],
        BTM OFFSET(5) NUMBITS(1) [],
        HTTU OFFSET(6) NUMBITS(2) [],
        DORMHINT OFFSET(8) NUMBITS(1) [],
        HYP OFFSET(9) NUMBITS(1) [],
        ATS OFFSET(10) NUMBITS(1) [],
        NS1ATS OFFSET(11) NUMBITS(1) [],
        ASID16 OFFSET(12) NUMBITS(1) [],
        MSI OFFSET(13) NUMBITS(1) [],
        SEV OFFSET(14) NUMBITS(1) [],
        ATOS OFFSET(15) NUMBITS(1) [],
        PRI OFFSET(16) NUMBITS(1) [],
        VMW OFFSET(17) NUMBITS(1) [],
        VMID16 OFFSET(18) NUMBITS(1) [],
        CD2L OFFSET(19) NUMBITS(1) [],
        VATOS OFFSET(20) NUMBITS(1) [],
        TTENDIAN OFFSET(21) NUMBITS(2) [Mixed = 0, LittleOnly = 2, BigOnly = 3],
        ATSRECERR OFFSET(23) NUMBITS(1) [],
        STALL_MODEL OFFSET(24) NUMBITS(2) [Both = 0, TerminateOnly = 1, StallForced = 2],
        TERM_MODEL OFFSET(26) NUMBITS(1) [],
        ST_LVL OFFSET(27) NUMBITS(2) [Linear = 0, TwoLevel = 1]
    ],
    /// SMMU_IDR1: table and queue sizes.
    pub IDR1 [
        SIDSIZE OFFSET(0) NUMBITS(6) [],
        SSIDSIZE OFFSET(6) NUMBITS(5) [],
        PRIQS OFFSET(11) NUMBITS(5) [],
        EVENTQS OFFSET(16) NUMBITS(5) [],
        CMDQS OFFSET(21) NUMBITS(5) [],
        ATTR_PERMS_OVR OFFSET(26) NUMBITS(1) [],
        ATTR_TYPES_OVR OFFSET(27) NUMBITS(1) [],
        REL OFFSET(28) NUMBITS(1) [],
        QUEUES_PRESET OFFSET(29) NUMBITS(1) [],
        TABLES_PRESET OFFSET(30) NUMBITS(1) [],
        ECMDQ OFFSET(31) NUMBITS(1) []
    ],
    /// SMMU_IDR2.
    pub IDR2 [
        BA_VATOS OFFSET(0) NUMBITS(10) []
    ],
    /// SMMU_IDR3.
    pub IDR3 [
        HAD OFFSET(2) NUMBITS(1) [],
        PBHA OFFSET(3) NUMBITS(1) [],
        XNX OFFSET(4) NUMBITS(1) [],
        PPS OFFSET(5) NUMBITS(1) [],
        MPAM OFFSET(7) NUMBITS(1) [],
        FWB OFFSET(8) NUMBITS(1) [],
        STT OFFSET(9) NUMBITS(1) [],
        RIL OFFSET(10) NUMBITS(1) [],
        BBML OFFSET(11) NUMBITS(2) [],
        E0PD OFFSET(13) NUMBITS(1) [],
        PTWNNC OFFSET(14) NUMBITS(1) [],
        DPT OFFSET(15) NUMBITS(1) []
    ],
    /// SMMU_IDR5.
    pub IDR5 [
        OAS OFFSET(0) NUMBITS(3) [],
        GRAN4K OFFSET(4) NUMBITS(1) [],
        GRAN16K OFFSET(5) NUMBITS(1) [],
        GRAN64K OFFSET(6) NUMBITS(1) [],
        VAX OFFSET(10) NUMBITS(2) [],
        STALL_MAX OFFSET(16) NUMBITS(16) []
    ],
    /// SMMU_IIDR.
    pub IIDR [
        IMPLEMENTER OFFSET(0) NUMBITS(12) [],
        REVISION OFFSET(12) NUMBITS(4) [],
        VARIANT OFFSET(16) NUMBITS(4) [],
        PRODUCTID OFFSET(20) NUMBITS(12) []
    ],
    /// SMMU_AIDR.
    pub AIDR [
        ARCH_MINOR_REV OFFSET(0) NUMBITS(4) [],
        ARCH_MAJOR_REV OFFSET(4) NUMBITS(4) []
    ],
    /// SMMU_CR0 and SMMU_CR0ACK.
    pub CR0 [
        SMMUEN OFFSET(0) NUMBITS(1) [],
        PRIQEN OFFSET(1) NUMBITS(1) [],
        EVENTQEN OFFSET(2) NUMBITS(1) [],
        CMDQEN OFFSET(3) NUMBITS(1) [],
        ATSCHK OFFSET(4) NUMBITS(1) [],
        VMW OFFSET(6) NUMBITS(3) []
    ],
    /// SMMU_CR1: attributes of the SMMU's table and queue accesses.
    pub CR1 [
        QUEUE_IC OFFSET(0) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        QUEUE_OC OFFSET(2) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        QUEUE_SH OFFSET(4) NUMBITS(2) [NonShareable = 0, OuterShareable = 2, InnerShareable = 3],
        TABLE_IC OFFSET(6) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        TABLE_OC OFFSET(8) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        TABLE_SH OFFSET(10) NUMBITS(2) [NonShareable = 0, OuterShareable = 2, InnerShareable = 3]
    ],
    /// SMMU_CR2.
    pub CR2 [
        E2H OFFSET(0) NUMBITS(1) [],
        RECINVSID OFFSET(1) NUMBITS(1) [],
        PTM OFFSET(2) NUMBITS(1) []
    ],
    /// SMMU_STATUSR.
    pub STATUSR [
        DORMANT OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_GBPA: what happens to traffic while SMMU_CR0.SMMUEN == 0.
    pub GBPA [
        MEMATTR OFFSET(0) NUMBITS(4) [],
        MTCFG OFFSET(4) NUMBITS(1) [],
        ALLOCCFG OFFSET(8) NUMBITS(4) [],
        SHCFG OFFSET(12) NUMBITS(2) [],
        PRIVCFG OFFSET(16) NUMBITS(2) [],
        INSTCFG OFFSET(18) NUMBITS(2) [],
        ABORT OFFSET(20) NUMBITS(1) [],
        UPDATE OFFSET(31) NUMBITS(1) []
    ],
    /// SMMU_IRQ_CTRL and SMMU_IRQ_CTRLACK.
    pub IRQ_CTRL [
        GERROR_IRQEN OFFSET(0) NUMBITS(1) [],
        PRIQ_IRQEN OFFSET(1) NUMBITS(1) [],
        EVENTQ_IRQEN OFFSET(2) NUMBITS(1) []
    ],
    /// SMMU_GERROR and SMMU_GERRORN. An error is active while its bits in the two differ.
    pub GERROR [
        CMDQ_ERR OFFSET(0) NUMBITS(1) [],
        EVENTQ_ABT_ERR OFFSET(2) NUMBITS(1) [],
        PRIQ_ABT_ERR OFFSET(3) NUMBITS(1) [],
        MSI_CMDQ_ABT_ERR OFFSET(4) NUMBITS(1) [],
        MSI_EVENTQ_ABT_ERR OFFSET(5) NUMBITS(1) [],
        MSI_PRIQ_ABT_ERR OFFSET(6) NUMBITS(1) [],
        MSI_GERROR_ABT_ERR OFFSET(7) NUMBITS(1) [],
        SFM_ERR OFFSET(8) NUMBITS(1) [],
        CMDQP_ERR OFFSET(9) NUMBITS(1) []
    ],
    /// SMMU_*_IRQ_CFG2.
    pub IRQ_CFG2 [
        MEMATTR OFFSET(0) NUMBITS(4) [],
        SH OFFSET(4) NUMBITS(2) []
    ],
    /// SMMU_STRTAB_BASE_CFG.
    pub STRTAB_BASE_CFG [
        LOG2SIZE OFFSET(0) NUMBITS(6) [],
        SPLIT OFFSET(6) NUMBITS(5) [],
        FMT OFFSET(16) NUMBITS(2) [Linear = 0, TwoLevel = 1]
    ],
    /// SMMU_CMDQ_PROD (the index and wrap bit sit in the low `log2size + 1` bits of WR).
    pub CMDQ_PROD [
        WR OFFSET(0) NUMBITS(20) []
    ],
    /// SMMU_CMDQ_CONS.
    pub CMDQ_CONS [
        RD OFFSET(0) NUMBITS(20) [],
        ERR OFFSET(24) NUMBITS(7) [None = 0, Ill = 1, Abt = 2, AtcInvSync = 3]
    ],
    /// SMMU_EVENTQ_PROD / SMMU_PRIQ_PROD (written by the SMMU).
    pub OUTQ_PROD [
        WR OFFSET(0) NUMBITS(20) [],
        OVFLG OFFSET(31) NUMBITS(1) []
    ],
    /// SMMU_EVENTQ_CONS / SMMU_PRIQ_CONS (written by software).
    pub OUTQ_CONS [
        RD OFFSET(0) NUMBITS(20) [],
        OVACKFLG OFFSET(31) NUMBITS(1) []
    ]
];

register_bitfields![u64,
    /// SMMU_STRTAB_BASE.
    pub STRTAB_BASE [
        ADDR OFFSET(6) NUMBITS(50) [],
        RA OFFSET(62) NUMBITS(1) []
    ],
    /// SMMU_CMDQ_BASE, SMMU_EVENTQ_BASE, SMMU_PRIQ_BASE.
    pub Q_BASE [
        LOG2SIZE OFFSET(0) NUMBITS(5) [],
        ADDR OFFSET(5) NUMBITS(51) [],
        /// RA for the command queue, WA for the event and PRI queues.
        RWA OFFSET(62) NUMBITS(1) []
    ],
    /// SMMU_*_IRQ_CFG0: MSI address.
    pub IRQ_CFG0 [
        ADDR OFFSET(2) NUMBITS(54) []
    ]
];

register_structs! {
    /// SMMUv3 register page 0 (the parts this hypervisor knows about).
    pub SmmuPage0 {
        (0x000 => pub idr0: ReadOnly<u32, IDR0::Register>),
        (0x004 => pub idr1: ReadOnly<u32, IDR1::Register>),
        (0x008 => pub idr2: ReadOnly<u32, IDR2::Register>),
        (0x00c => pub idr3: ReadOnly<u32, IDR3::Register>),
        (0x010 => pub idr4: ReadOnly<u32>),
        (0x014 => pub idr5: ReadOnly<u32, IDR5::Register>),
        (0x018 => pub iidr: ReadOnly<u32, IIDR::Register>),
        (0x01c => pub aidr: ReadOnly<u32, AIDR::Register>),
        (0x020 => pub cr0: ReadWrite<u32, CR0::Register>),
        (0x024 => pub cr0ack: ReadOnly<u32, CR0::Register>),
        (0x028 => pub cr1: ReadWrite<u32, CR1::Register>),
        (0x02c => pub cr2: ReadWrite<u32, CR2::Register>),
        (0x030 => _reserved0),
        (0x040 => pub statusr: ReadOnly<u32, STATUSR::Register>),
        (0x044 => pub gbpa: ReadWrite<u32, GBPA::Register>),
        (0x048 => pub agbpa: ReadWrite<u32>),
        (0x04c => _reserved1),
        (0x050 => pub irq_ctrl: ReadWrite<u32, IRQ_CTRL::Register>),
        (0x054 => pub irq_ctrlack: ReadOnly<u32, IRQ_CTRL::Register>),
        (0x058 => _reserved2),
        (0x060 => pub gerror: ReadOnly<u32, GERROR::Register>),
        (0x064 => pub gerrorn: ReadWrite<u32, GERROR::Register>),
        (0x068 => pub gerror_irq_cfg0: ReadWrite<u64, IRQ_CFG0::Register>),
        (0x070 => pub gerror_irq_cfg1: ReadWrite<u32>),
        (0x074 => pub gerror_irq_cfg2: ReadWrite<u32, IRQ_CFG2::Register>),
        (0x078 => _reserved3),
        (0x080 => pub strtab_base: ReadWrite<u64, STRTAB_BASE::Register>),
        (0x088 => pub strtab_base_cfg: ReadWrite<u32, STRTAB_BASE_CFG::Register>),
        (0x08c => _reserved4),
        (0x090 => pub cmdq_base: ReadWrite<u64, Q_BASE::Register>),
        (0x098 => pub cmdq_prod: ReadWrite<u32, CMDQ_PROD::Register>),
        (0x09c => pub cmdq_cons: ReadWrite<u32, CMDQ_CONS::Register>),
        (0x0a0 => pub eventq_base: ReadWrite<u64, Q_BASE::Register>),
        (0x0a8 => _reserved_eventq_ptrs),
        (0x0b0 => pub eventq_irq_cfg0: ReadWrite<u64, IRQ_CFG0::Register>),
        (0x0b8 => pub eventq_irq_cfg1: ReadWrite<u32>),
        (0x0bc => pub eventq_irq_cfg2: ReadWrite<u32, IRQ_CFG2::Register>),
        (0x0c0 => pub priq_base: ReadWrite<u64, Q_BASE::Register>),
        (0x0c8 => _reserved_priq_ptrs),
        (0x0d0 => pub priq_irq_cfg0: ReadWrite<u64, IRQ_CFG0::Register>),
        (0x0d8 => pub priq_irq_cfg1: ReadWrite<u32>),
        (0x0dc => pub priq_irq_cfg2: ReadWrite<u32, IRQ_CFG2::Register>),
        (0x0e0 => @END),
    },

    /// SMMUv3 register page 1 (offsets relative to [`off::PAGE1`]).
    pub SmmuPage1 {
        (0x000 => _reserved0),
        (0x0a8 => pub eventq_prod: ReadWrite<u32, OUTQ_PROD::Register>),
        (0x0ac => pub eventq_cons: ReadWrite<u32, OUTQ_CONS::Register>),
        (0x0b0 => _reserved1),
        (0x0c8 => pub priq_prod: ReadWrite<u32, OUTQ_PROD::Register>),
        (0x0cc => pub priq_cons: ReadWrite<u32, OUTQ_CONS::Register>),
        (0x0d0 => @END),
    }
}

/// Address bits [51:6] of `SMMU_STRTAB_BASE` (bits [55:52] are RES0 up to SMMUv3.3 at 52-bit OAS).
pub const STRTAB_BASE_ADDR_MASK: u64 = bits::mask(51, 6);
/// Address bits [51:5] of `SMMU_*Q_BASE`.
pub const Q_BASE_ADDR_MASK: u64 = bits::mask(51, 5);
/// `SMMU_CMDQ_CONS.ERR` values (also the `CERROR_*` codes of a command error).
pub const CERROR_NONE: u8 = 0;
/// Illegal command.
pub const CERROR_ILL: u8 = 1;
/// Abort on a command fetch.
pub const CERROR_ABT: u8 = 2;
/// An ATC invalidation completion timed out.
pub const CERROR_ATC_INV_SYNC: u8 = 3;
/// Bits of `SMMU_GERROR` that report errors (all defined error bits).
pub const GERROR_ERR_MASK: u32 = 0x3fd;
/// `SMMU_GERROR.CMDQ_ERR`.
pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
/// Overflow flag of an output queue's PROD (`OVFLG`) and CONS (`OVACKFLG`).
pub const Q_OVF: u32 = 1 << 31;

/// `SMMU_STRTAB_BASE` value.
pub const fn strtab_base(addr: u64, read_allocate: bool) -> u64 {
    (addr & STRTAB_BASE_ADDR_MASK) | if read_allocate { 1 << 62 } else { 0 }
}

/// `SMMU_STRTAB_BASE_CFG` value: `two_level` selects FMT = 2-level with `split`.
pub const fn strtab_base_cfg(log2size: u32, two_level: bool, split: u32) -> u32 {
    if two_level {
        (1 << 16) | ((split & 0x1f) << 6) | (log2size & 0x3f)
    } else {
        log2size & 0x3f
    }
}

/// `SMMU_*Q_BASE` value.
pub const fn q_base(addr: u64, log2size: u32, rwa: bool) -> u64 {
    (addr & Q_BASE_ADDR_MASK) | (log2size as u64 & 0x1f) | if rwa { 1 << 62 } else { 0 }
}

/// Output/input address-size encoding (IDR5.OAS, STE.S2PS, CD.IPS) to bits.
pub const fn addr_size_bits(code: u32) -> u32 {
    match code {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// Bits to the address-size encoding; `None` unless `bits` is one of 32, 36, 40, 42, 44, 48, 52.
pub const fn addr_size_code(bits: u32) -> Option<u8> {
    match bits {
        32 => Some(0),
        36 => Some(1),
        40 => Some(2),
        42 => Some(3),
        44 => Some(4),
        48 => Some(5),
        52 => Some(6),
        _ => None,
    }
}

// Queue pointers. A PROD or CONS value holds the entry index in bits [log2size-1:0] and the wrap
// bit at bit log2size; higher bits are flags (CMDQ_CONS.ERR, OVFLG) that the helpers below drop.
// The queue is empty when index and wrap are equal, full when the indexes are equal and the wrap
// bits differ.

/// Mask of the index and wrap bits of a queue of `2^log2size` entries.
pub const fn q_wrap_index_mask(log2size: u32) -> u32 {
    (2u32 << log2size) - 1
}

/// Entry index of a PROD/CONS value.
pub const fn q_idx(p: u32, log2size: u32) -> u32 {
    p & ((1u32 << log2size) - 1)
}

/// Wrap bit of a PROD/CONS value.
pub const fn q_wrap(p: u32, log2size: u32) -> bool {
    p & (1u32 << log2size) != 0
}

/// The pointer after `p` (index + wrap only; flags dropped).
pub const fn q_inc(p: u32, log2size: u32) -> u32 {
    q_add(p, 1, log2size)
}

/// `p` advanced by `n` entries (index + wrap only; flags dropped).
pub const fn q_add(p: u32, n: u32, log2size: u32) -> u32 {
    (p & q_wrap_index_mask(log2size)).wrapping_add(n) & q_wrap_index_mask(log2size)
}

/// Whether a queue with these pointers is empty.
pub const fn q_empty(prod: u32, cons: u32, log2size: u32) -> bool {
    (prod ^ cons) & q_wrap_index_mask(log2size) == 0
}

/// Whether a queue with these pointers is full.
pub const fn q_full(prod: u32, cons: u32, log2size: u32) -> bool {
    (prod ^ cons) & q_wrap_index_mask(log2size) == 1 << log2size
}

/// Number of entries between `cons` and `prod` (produced, not yet consumed).
pub const fn q_used(prod: u32, cons: u32, log2size: u32) -> u32 {
    (prod & q_wrap_index_mask(log2size)).wrapping_sub(cons & q_wrap_index_mask(log2size))
        & q_wrap_index_mask(log2size)
}

/// Number of free entries.
pub const fn q_space(prod: u32, cons: u32, log2size: u32) -> u32 {
    (1 << log2size) - q_used(prod, cons, log2size)
}

/// Whether `cons` has moved past the entry at `idx` (an index + wrap value produced before
/// `prod`): i.e. `idx` lies outside the `[cons, prod)` window. Used to wait for a `CMD_SYNC`.
pub const fn q_consumed(idx: u32, cons: u32, prod: u32, log2size: u32) -> bool {
    // Distance from cons to idx and from cons to prod, modulo 2^(log2size+1).
    let to_idx = q_used(idx, cons, log2size);
    let to_prod = q_used(prod, cons, log2size);
    to_idx >= to_prod
}

/// Bit-field helpers shared by the SMMUv3 format modules.
pub(crate) mod bits {
    /// Mask of bits `[hi:lo]`.
    pub const fn mask(hi: u32, lo: u32) -> u64 {
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }

    /// Field `[hi:lo]` of `v`.
    pub const fn get(v: u64, hi: u32, lo: u32) -> u64 {
        (v & mask(hi, lo)) >> lo
    }

    /// `v` with field `[hi:lo]` replaced by `x` (truncated to the field).
    pub const fn set(v: u64, hi: u32, lo: u32, x: u64) -> u64 {
        (v & !mask(hi, lo)) | ((x << lo) & mask(hi, lo))
    }

    /// Bit `b` of `v`.
    pub const fn bit(v: u64, b: u32) -> bool {
        v & (1 << b) != 0
    }

    /// `v` with bit `b` set to `on`.
    pub const fn with_bit(v: u64, b: u32, on: bool) -> u64 {
        if on { v | (1 << b) } else { v & !(1 << b) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use tock_registers::LocalRegisterCopy;

    #[test]
    fn page0_offsets_match_consts() {
        assert_eq!(offset_of!(SmmuPage0, idr0) as u64, off::IDR0);
        assert_eq!(offset_of!(SmmuPage0, idr1) as u64, off::IDR1);
        assert_eq!(offset_of!(SmmuPage0, idr2) as u64, off::IDR2);
        assert_eq!(offset_of!(SmmuPage0, idr3) as u64, off::IDR3);
        assert_eq!(offset_of!(SmmuPage0, idr4) as u64, off::IDR4);
        assert_eq!(offset_of!(SmmuPage0, idr5) as u64, off::IDR5);
        assert_eq!(offset_of!(SmmuPage0, iidr) as u64, off::IIDR);
        assert_eq!(offset_of!(SmmuPage0, aidr) as u64, off::AIDR);
        assert_eq!(offset_of!(SmmuPage0, cr0) as u64, off::CR0);
        assert_eq!(offset_of!(SmmuPage0, cr0ack) as u64, off::CR0ACK);
        assert_eq!(offset_of!(SmmuPage0, cr1) as u64, off::CR1);
        assert_eq!(offset_of!(SmmuPage0, cr2) as u64, off::CR2);
        assert_eq!(offset_of!(SmmuPage0, statusr) as u64, off::STATUSR);
        assert_eq!(offset_of!(SmmuPage0, gbpa) as u64, off::GBPA);
        assert_eq!(offset_of!(SmmuPage0, agbpa) as u64, off::AGBPA);
        assert_eq!(offset_of!(SmmuPage0, irq_ctrl) as u64, off::IRQ_CTRL);
        assert_eq!(offset_of!(SmmuPage0, irq_ctrlack) as u64, off::IRQ_CTRLACK);
        assert_eq!(offset_of!(SmmuPage0, gerror) as u64, off::GERROR);
        assert_eq!(offset_of!(SmmuPage0, gerrorn) as u64, off::GERRORN);
        assert_eq!(
            offset_of!(SmmuPage0, gerror_irq_cfg0) as u64,
            off::GERROR_IRQ_CFG0
        );
        assert_eq!(
            offset_of!(SmmuPage0, gerror_irq_cfg1) as u64,
            off::GERROR_IRQ_CFG1
        );
        assert_eq!(
            offset_of!(SmmuPage0, gerror_irq_cfg2) as u64,
            off::GERROR_IRQ_CFG2
        );
        assert_eq!(offset_of!(SmmuPage0, strtab_base) as u64, off::STRTAB_BASE);
        assert_eq!(
            offset_of!(SmmuPage0, strtab_base_cfg) as u64,
            off::STRTAB_BASE_CFG
        );
        assert_eq!(offset_of!(SmmuPage0, cmdq_base) as u64, off::CMDQ_BASE);
        assert_eq!(offset_of!(SmmuPage0, cmdq_prod) as u64, off::CMDQ_PROD);
        assert_eq!(offset_of!(SmmuPage0, cmdq_cons) as u64, off::CMDQ_CONS);
        assert_eq!(offset_of!(SmmuPage0, eventq_base) as u64, off::EVENTQ_BASE);
        assert_eq!(
            offset_of!(SmmuPage0, eventq_irq_cfg0) as u64,
            off::EVENTQ_IRQ_CFG0
        );
        assert_eq!(
            offset_of!(SmmuPage0, eventq_irq_cfg1) as u64,
            off::EVENTQ_IRQ_CFG1
        );
        assert_eq!(
            offset_of!(SmmuPage0, eventq_irq_cfg2) as u64,
            off::EVENTQ_IRQ_CFG2
        );
        assert_eq!(offset_of!(SmmuPage0, priq_base) as u64, off::PRIQ_BASE);
        assert_eq!(
            offset_of!(SmmuPage0, priq_irq_cfg0) as u64,
            off::PRIQ_IRQ_CFG0
        );
        assert_eq!(
            offset_of!(SmmuPage0, priq_irq_cfg1) as u64,
            off::PRIQ_IRQ_CFG1
        );
        assert_eq!(
            offset_of!(SmmuPage0, priq_irq_cfg2) as u64,
            off::PRIQ_IRQ_CFG2
        );
    }

    #[test]
    fn page1_offsets_match_consts() {
        assert_eq!(
            off::PAGE1 + offset_of!(SmmuPage1, eventq_prod) as u64,
            off::EVENTQ_PROD
        );
        assert_eq!(
            off::PAGE1 + offset_of!(SmmuPage1, eventq_cons) as u64,
            off::EVENTQ_CONS
        );
        assert_eq!(
            off::PAGE1 + offset_of!(SmmuPage1, priq_prod) as u64,
            off::PRIQ_PROD
        );
        assert_eq!(
            off::PAGE1 + offset_of!(SmmuPage1, priq_cons) as u64,
            off::PRIQ_CONS
        );
        assert_eq!(off::EVENTQ_PROD, 0x100a8);
        assert_eq!(off::EVENTQ_CONS, 0x100ac);
        assert_eq!(off::PRIQ_PROD, 0x100c8);
        assert_eq!(off::PRIQ_CONS, 0x100cc);
        assert!(off::is_64bit(off::STRTAB_BASE) && !off::is_64bit(off::STRTAB_BASE_CFG));
    }

    #[test]
    fn qemu_id_values_decode() {
        // QEMU 10 virt, nested SMMU (shared/reference/qemu-virt.md §1).
        let idr0 = LocalRegisterCopy::<u32, IDR0::Register>::new(0x0d44_101b);
        assert!(idr0.is_set(IDR0::S2P) && idr0.is_set(IDR0::S1P));
        assert_eq!(
            idr0.read_as_enum(IDR0::TTF),
            Some(IDR0::TTF::Value::AArch64)
        );
        assert!(idr0.is_set(IDR0::COHACC));
        assert!(idr0.is_set(IDR0::ASID16) && idr0.is_set(IDR0::VMID16));
        assert_eq!(
            idr0.read_as_enum(IDR0::TTENDIAN),
            Some(IDR0::TTENDIAN::Value::LittleOnly)
        );
        assert_eq!(idr0.read(IDR0::STALL_MODEL), 1);
        assert!(idr0.is_set(IDR0::TERM_MODEL));
        assert_eq!(idr0.read(IDR0::ST_LVL), 1);
        assert!(!idr0.is_set(IDR0::HYP) && !idr0.is_set(IDR0::MSI));
        let idr1 = LocalRegisterCopy::<u32, IDR1::Register>::new(0x0273_0010);
        assert_eq!(idr1.read(IDR1::SIDSIZE), 16);
        assert_eq!(idr1.read(IDR1::SSIDSIZE), 0);
        assert_eq!(idr1.read(IDR1::EVENTQS), 19);
        assert_eq!(idr1.read(IDR1::CMDQS), 19);
        let idr3 = LocalRegisterCopy::<u32, IDR3::Register>::new(0x1414);
        assert!(idr3.is_set(IDR3::RIL) && idr3.is_set(IDR3::HAD) && idr3.is_set(IDR3::XNX));
        assert_eq!(idr3.read(IDR3::BBML), 2);
        let idr5 = LocalRegisterCopy::<u32, IDR5::Register>::new(0x74);
        assert_eq!(addr_size_bits(idr5.read(IDR5::OAS)), 44);
        assert!(idr5.is_set(IDR5::GRAN4K) && idr5.is_set(IDR5::GRAN16K));
        assert!(idr5.is_set(IDR5::GRAN64K));
    }

    #[test]
    fn control_register_fields_bit_by_bit() {
        assert_eq!(CR0::SMMUEN::SET.value, 1 << 0);
        assert_eq!(CR0::PRIQEN::SET.value, 1 << 1);
        assert_eq!(CR0::EVENTQEN::SET.value, 1 << 2);
        assert_eq!(CR0::CMDQEN::SET.value, 1 << 3);
        assert_eq!(CR0::ATSCHK::SET.value, 1 << 4);
        assert_eq!(
            (CR1::QUEUE_IC::WriteBack
                + CR1::QUEUE_OC::WriteBack
                + CR1::QUEUE_SH::InnerShareable
                + CR1::TABLE_IC::WriteBack
                + CR1::TABLE_OC::WriteBack
                + CR1::TABLE_SH::InnerShareable)
                .value,
            0b11_01_01_11_01_01
        );
        assert_eq!(CR2::E2H::SET.value, 1);
        assert_eq!(CR2::RECINVSID::SET.value, 2);
        assert_eq!(CR2::PTM::SET.value, 4);
        assert_eq!(GBPA::ABORT::SET.value, 1 << 20);
        assert_eq!(GBPA::UPDATE::SET.value, 1 << 31);
        assert_eq!(GBPA::SHCFG.val(1).value, 0x1000, "QEMU's GBPA reset value");
        assert_eq!(IRQ_CTRL::GERROR_IRQEN::SET.value, 1);
        assert_eq!(IRQ_CTRL::PRIQ_IRQEN::SET.value, 2);
        assert_eq!(IRQ_CTRL::EVENTQ_IRQEN::SET.value, 4);
        assert_eq!(GERROR::CMDQ_ERR::SET.value, GERROR_CMDQ_ERR);
        assert_eq!(GERROR::EVENTQ_ABT_ERR::SET.value, 1 << 2);
        assert_eq!(GERROR::SFM_ERR::SET.value, 1 << 8);
        assert_eq!(CMDQ_CONS::ERR.val(1).value, 1 << 24);
        assert_eq!(OUTQ_PROD::OVFLG::SET.value, Q_OVF);
        assert_eq!(OUTQ_CONS::OVACKFLG::SET.value, Q_OVF);
    }

    #[test]
    fn base_and_cfg_encodings() {
        assert_eq!(
            strtab_base(0x4123_4000, true),
            0x4000_0000_4123_4000,
            "RA is bit 62"
        );
        assert_eq!(strtab_base(0xffff_ffff_ffff_ffff, false), bits::mask(51, 6));
        assert_eq!(strtab_base_cfg(16, true, 8), (1 << 16) | (8 << 6) | 16);
        assert_eq!(strtab_base_cfg(8, false, 8), 8);
        let cfg =
            LocalRegisterCopy::<u32, STRTAB_BASE_CFG::Register>::new(strtab_base_cfg(20, true, 8));
        assert_eq!(cfg.read(STRTAB_BASE_CFG::LOG2SIZE), 20);
        assert_eq!(cfg.read(STRTAB_BASE_CFG::SPLIT), 8);
        assert_eq!(
            cfg.read_as_enum(STRTAB_BASE_CFG::FMT),
            Some(STRTAB_BASE_CFG::FMT::Value::TwoLevel)
        );
        assert_eq!(q_base(0x4800_0000, 8, true), 0x4000_0000_4800_0008);
        assert_eq!(q_base(0x4800_0020, 31, false), 0x4800_0020 | 31);
        assert_eq!(Q_BASE::ADDR.val(1).value, 1 << 5);
    }

    #[test]
    fn address_sizes() {
        for code in 0..7 {
            assert_eq!(addr_size_code(addr_size_bits(code)), Some(code as u8));
        }
        assert_eq!(addr_size_code(39), None);
        assert_eq!(addr_size_bits(7), 52);
    }

    #[test]
    fn queue_arithmetic() {
        let l = 2; // 4 entries
        assert!(q_empty(0, 0, l));
        assert!(q_empty(0b100 | Q_OVF, 0b100, l), "flags ignored");
        assert!(!q_empty(0b100, 0, l));
        assert!(q_full(0b100, 0, l));
        assert!(q_full(0b011, 0b111, l));
        assert_eq!(q_inc(0b011, l), 0b100, "index wraps, wrap bit flips");
        assert_eq!(q_inc(0b111, l), 0);
        assert_eq!(q_inc(0b111 | (5 << 24), l), 0, "flags dropped");
        assert_eq!(q_idx(0b110, l), 2);
        assert!(q_wrap(0b110, l));
        assert_eq!(q_used(0b001, 0b111, l), 2);
        assert_eq!(q_space(0b001, 0b111, l), 2);
        assert_eq!(q_add(0b011, 3, l), 0b110);
        // A sync at index 2 (no wrap), queue prod = 3: not consumed until cons passes 2.
        assert!(!q_consumed(2, 0, 3, l));
        assert!(!q_consumed(2, 2, 3, l));
        assert!(q_consumed(2, 3, 3, l));
        // Across the wrap: sync at 0b111, prod 0b000.
        assert!(!q_consumed(0b111, 0b110, 0b000, l));
        assert!(q_consumed(0b111, 0b000, 0b000, l));
    }

    #[test]
    fn bit_helpers() {
        assert_eq!(bits::mask(63, 0), u64::MAX);
        assert_eq!(bits::mask(0, 0), 1);
        assert_eq!(bits::mask(51, 12), 0x000f_ffff_ffff_f000);
        assert_eq!(bits::get(0xabcd, 11, 4), 0xbc);
        assert_eq!(bits::set(0xf00f, 11, 4, 0x1ff), 0xffff);
        assert_eq!(bits::set(0, 11, 4, 0x1ff), 0xff0, "truncated to the field");
        assert_eq!(bits::set(0xffff, 11, 4, 0), 0xf00f);
        assert!(bits::bit(0x8, 3));
        assert_eq!(bits::with_bit(0, 63, true), 1 << 63);
    }
}
