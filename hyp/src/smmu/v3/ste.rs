//! SMMUv3 Stream Table Entries (STEs), level-1 stream table descriptors and stream-table indexing.
//!
//! An STE is eight little-endian doublewords. The fields this hypervisor reads or writes (IHI0070
//! "STE", Linux `STRTAB_STE_*`, QEMU `STE_*`):
//!
//! | dword | bits | field |
//! |---|---|---|
//! | 0 | 0 | V |
//! | 0 | 3:1 | Config: 0b000 abort, 0b100 bypass, 0b101 S1, 0b110 S2, 0b111 nested (S1+S2) |
//! | 0 | 5:4 | S1Fmt |
//! | 0 | 51:6 | S1ContextPtr (bits [51:6] of the CD table address) |
//! | 0 | 63:59 | S1CDMax |
//! | 1 | 1:0 | S1DSS |
//! | 1 | 3:2, 5:4, 7:6 | S1CIR, S1COR, S1CSH |
//! | 1 | 27 | S1STALLD |
//! | 1 | 29:28 | EATS |
//! | 1 | 31:30 | STRW |
//! | 1 | 45:44 | SHCFG (1 = use incoming shareability) |
//! | 2 | 15:0 | S2VMID |
//! | 2 | 50:32 | VTCR: S2T0SZ [37:32], S2SL0 [39:38], S2IR0 [41:40], S2OR0 [43:42], S2SH0 [45:44], S2TG [47:46], S2PS [50:48] |
//! | 2 | 51, 52, 53, 54, 55, 56, 57, 58 | S2AA64, S2ENDI, S2AFFD, S2PTW, S2HD, S2HA, S2S, S2R |
//! | 3 | 51:4 | S2TTB |
//!
//! Every STE the hypervisor builds for a device is either [`Ste::abort`] or a translating one
//! ([`Ste::s2`], [`Ste::nested`]); it never builds a bypass STE.

use super::regs::{addr_size_bits, addr_size_code, bits};

/// Bytes in one STE.
pub const STE_BYTES: usize = 64;
/// Doublewords in one STE.
pub const STE_DWORDS: usize = 8;
/// SPLIT of the 2-level stream tables this hypervisor builds (as Linux): 256 STEs per level-2
/// table, one PCI bus each.
pub const STRTAB_SPLIT: u32 = 8;

/// STE.Config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteConfig {
    /// 0b000: abort every transaction, record no event.
    Abort,
    /// 0b100: bypass both stages.
    Bypass,
    /// 0b101: stage 1 only.
    S1Trans,
    /// 0b110: stage 2 only.
    S2Trans,
    /// 0b111: stage 1 then stage 2.
    Nested,
    /// 0b001, 0b010, 0b011: reserved (the STE is ILLEGAL: `C_BAD_STE`).
    Reserved(u8),
}

impl SteConfig {
    /// Decodes the 3-bit Config field.
    pub const fn from_bits(v: u8) -> SteConfig {
        match v & 0b111 {
            0b000 => SteConfig::Abort,
            0b100 => SteConfig::Bypass,
            0b101 => SteConfig::S1Trans,
            0b110 => SteConfig::S2Trans,
            0b111 => SteConfig::Nested,
            r => SteConfig::Reserved(r),
        }
    }

    /// The 3-bit Config field.
    pub const fn bits(self) -> u8 {
        match self {
            SteConfig::Abort => 0b000,
            SteConfig::Bypass => 0b100,
            SteConfig::S1Trans => 0b101,
            SteConfig::S2Trans => 0b110,
            SteConfig::Nested => 0b111,
            SteConfig::Reserved(r) => r & 0b111,
        }
    }

    /// Stage 1 translates (S1Trans, Nested).
    pub const fn s1_enabled(self) -> bool {
        matches!(self, SteConfig::S1Trans | SteConfig::Nested)
    }

    /// Stage 2 translates (S2Trans, Nested).
    pub const fn s2_enabled(self) -> bool {
        matches!(self, SteConfig::S2Trans | SteConfig::Nested)
    }
}

// Dword 0.
const D0_V: u32 = 0;
const D0_CONFIG: (u32, u32) = (3, 1);
const D0_S1FMT: (u32, u32) = (5, 4);
const D0_S1CTXPTR: (u32, u32) = (51, 6);
const D0_S1CDMAX: (u32, u32) = (63, 59);
// Dword 1.
const D1_S1DSS: (u32, u32) = (1, 0);
const D1_S1CIR: (u32, u32) = (3, 2);
const D1_S1COR: (u32, u32) = (5, 4);
const D1_S1CSH: (u32, u32) = (7, 6);
const D1_S1STALLD: u32 = 27;
const D1_EATS: (u32, u32) = (29, 28);
const D1_STRW: (u32, u32) = (31, 30);
const D1_SHCFG: (u32, u32) = (45, 44);
// Dword 2.
const D2_S2VMID: (u32, u32) = (15, 0);
const D2_VTCR: (u32, u32) = (50, 32);
const D2_S2T0SZ: (u32, u32) = (37, 32);
const D2_S2SL0: (u32, u32) = (39, 38);
const D2_S2IR0: (u32, u32) = (41, 40);
const D2_S2OR0: (u32, u32) = (43, 42);
const D2_S2SH0: (u32, u32) = (45, 44);
const D2_S2TG: (u32, u32) = (47, 46);
const D2_S2PS: (u32, u32) = (50, 48);
const D2_S2AA64: u32 = 51;
const D2_S2ENDI: u32 = 52;
const D2_S2AFFD: u32 = 53;
const D2_S2PTW: u32 = 54;
const D2_S2HD: u32 = 55;
const D2_S2HA: u32 = 56;
const D2_S2S: u32 = 57;
const D2_S2R: u32 = 58;
// Dword 3.
const D3_S2TTB: (u32, u32) = (51, 4);

/// STE.SHCFG = use the incoming shareability attribute.
pub const SHCFG_INCOMING: u8 = 1;
/// Cacheability encoding of S2IR0/S2OR0 (and S1CIR/S1COR): write-back, read- and write-allocate.
pub const CACHE_WBWA: u8 = 0b01;
/// Shareability encoding: inner shareable.
pub const SH_ISH: u8 = 0b11;
/// S2TG encoding of the 4 KiB granule.
pub const S2TG_4K: u8 = 0b00;

const fn f(v: u64, (hi, lo): (u32, u32)) -> u64 {
    bits::get(v, hi, lo)
}

const fn s(v: u64, (hi, lo): (u32, u32), x: u64) -> u64 {
    bits::set(v, hi, lo, x)
}

/// One Stream Table Entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ste(pub [u64; 8]);

impl Ste {
    /// All zero: V = 0. Transactions on this stream are terminated with `C_BAD_STE`.
    pub const fn invalid() -> Ste {
        Ste([0; 8])
    }

    /// V = 1, Config = abort: transactions are terminated silently. The state of every stream
    /// the hypervisor has not given to a VM.
    pub const fn abort() -> Ste {
        Ste([1, 0, 0, 0, 0, 0, 0, 0])
    }

    /// A stage-2-only STE for `vmid` walking the table described by `s2`.
    ///
    /// Sets S2AA64 (QEMU aborts on S2AA64 = 0), S2PTW, S2R (record translation faults so they
    /// reach the event queue) and SHCFG = incoming; everything else is 0: no ATS (EATS = 0), no
    /// stalls (S2S = 0: a faulting transaction is terminated), no hardware AF/dirty updates,
    /// little-endian tables, STRW = NS-EL1.
    pub fn s2(vmid: u16, s2: &S2Config) -> Ste {
        let mut d = [0u64; 8];
        d[0] = s(1 << D0_V, D0_CONFIG, SteConfig::S2Trans.bits().into());
        d[1] = s(0, D1_SHCFG, SHCFG_INCOMING.into());
        d[2] = s2.dword2(vmid);
        d[3] = s(0, D3_S2TTB, s2.ttb >> 4);
        Ste(d)
    }

    /// A nested (stage 1 + stage 2) STE: the guest's stage-1 configuration `s1` (its CD table
    /// pointer is an IPA, walked through stage 2) over the VM's stage 2.
    pub fn nested(vmid: u16, s2: &S2Config, s1: &S1Fields) -> Ste {
        let mut ste = Ste::s2(vmid, s2);
        let mut d0 = s(1 << D0_V, D0_CONFIG, SteConfig::Nested.bits().into());
        d0 = s(d0, D0_S1FMT, s1.fmt.into());
        d0 = s(d0, D0_S1CTXPTR, s1.context_ptr >> 6);
        d0 = s(d0, D0_S1CDMAX, s1.cd_max.into());
        ste.0[0] = d0;
        let mut d1 = ste.0[1];
        d1 = s(d1, D1_S1DSS, s1.dss.into());
        d1 = s(d1, D1_S1CIR, s1.cir.into());
        d1 = s(d1, D1_S1COR, s1.cor.into());
        d1 = s(d1, D1_S1CSH, s1.csh.into());
        ste.0[1] = d1;
        ste
    }

    /// STE.V.
    pub const fn valid(&self) -> bool {
        bits::bit(self.0[0], D0_V)
    }

    /// STE.Config (whatever V says).
    pub const fn config(&self) -> SteConfig {
        SteConfig::from_bits(f(self.0[0], D0_CONFIG) as u8)
    }

    /// STE.S1Fmt.
    pub const fn s1_fmt(&self) -> u8 {
        f(self.0[0], D0_S1FMT) as u8
    }

    /// STE.S1ContextPtr as an address (bits [51:6]).
    pub const fn s1_context_ptr(&self) -> u64 {
        f(self.0[0], D0_S1CTXPTR) << 6
    }

    /// STE.S1CDMax.
    pub const fn s1_cd_max(&self) -> u8 {
        f(self.0[0], D0_S1CDMAX) as u8
    }

    /// STE.S1DSS.
    pub const fn s1_dss(&self) -> u8 {
        f(self.0[1], D1_S1DSS) as u8
    }

    /// STE.S1CIR.
    pub const fn s1_cir(&self) -> u8 {
        f(self.0[1], D1_S1CIR) as u8
    }

    /// STE.S1COR.
    pub const fn s1_cor(&self) -> u8 {
        f(self.0[1], D1_S1COR) as u8
    }

    /// STE.S1CSH.
    pub const fn s1_csh(&self) -> u8 {
        f(self.0[1], D1_S1CSH) as u8
    }

    /// STE.S1STALLD.
    pub const fn s1_stalld(&self) -> bool {
        bits::bit(self.0[1], D1_S1STALLD)
    }

    /// STE.EATS.
    pub const fn eats(&self) -> u8 {
        f(self.0[1], D1_EATS) as u8
    }

    /// STE.STRW.
    pub const fn strw(&self) -> u8 {
        f(self.0[1], D1_STRW) as u8
    }

    /// STE.SHCFG.
    pub const fn shcfg(&self) -> u8 {
        f(self.0[1], D1_SHCFG) as u8
    }

    /// STE.S2VMID.
    pub const fn s2_vmid(&self) -> u16 {
        f(self.0[2], D2_S2VMID) as u16
    }

    /// STE.VTCR: the 19-bit field at dword 2 [50:32].
    pub const fn s2_vtcr(&self) -> u32 {
        f(self.0[2], D2_VTCR) as u32
    }

    /// STE.S2T0SZ.
    pub const fn s2_t0sz(&self) -> u8 {
        f(self.0[2], D2_S2T0SZ) as u8
    }

    /// STE.S2SL0.
    pub const fn s2_sl0(&self) -> u8 {
        f(self.0[2], D2_S2SL0) as u8
    }

    /// STE.S2IR0.
    pub const fn s2_ir0(&self) -> u8 {
        f(self.0[2], D2_S2IR0) as u8
    }

    /// STE.S2OR0.
    pub const fn s2_or0(&self) -> u8 {
        f(self.0[2], D2_S2OR0) as u8
    }

    /// STE.S2SH0.
    pub const fn s2_sh0(&self) -> u8 {
        f(self.0[2], D2_S2SH0) as u8
    }

    /// STE.S2TG.
    pub const fn s2_tg(&self) -> u8 {
        f(self.0[2], D2_S2TG) as u8
    }

    /// STE.S2PS.
    pub const fn s2_ps(&self) -> u8 {
        f(self.0[2], D2_S2PS) as u8
    }

    /// STE.S2AA64.
    pub const fn s2_aa64(&self) -> bool {
        bits::bit(self.0[2], D2_S2AA64)
    }

    /// STE.S2ENDI.
    pub const fn s2_endi(&self) -> bool {
        bits::bit(self.0[2], D2_S2ENDI)
    }

    /// STE.S2AFFD.
    pub const fn s2_affd(&self) -> bool {
        bits::bit(self.0[2], D2_S2AFFD)
    }

    /// STE.S2PTW.
    pub const fn s2_ptw(&self) -> bool {
        bits::bit(self.0[2], D2_S2PTW)
    }

    /// STE.S2HD.
    pub const fn s2_hd(&self) -> bool {
        bits::bit(self.0[2], D2_S2HD)
    }

    /// STE.S2HA.
    pub const fn s2_ha(&self) -> bool {
        bits::bit(self.0[2], D2_S2HA)
    }

    /// STE.S2S.
    pub const fn s2_s(&self) -> bool {
        bits::bit(self.0[2], D2_S2S)
    }

    /// STE.S2R.
    pub const fn s2_r(&self) -> bool {
        bits::bit(self.0[2], D2_S2R)
    }

    /// STE.S2TTB as an address (bits [51:4]).
    pub const fn s2_ttb(&self) -> u64 {
        f(self.0[3], D3_S2TTB) << 4
    }

    /// The stage-2 configuration this STE holds.
    pub const fn s2_config(&self) -> S2Config {
        S2Config {
            ttb: self.s2_ttb(),
            t0sz: self.s2_t0sz(),
            sl0: self.s2_sl0(),
            ps: self.s2_ps(),
            irgn: self.s2_ir0(),
            orgn: self.s2_or0(),
            sh: self.s2_sh0(),
        }
    }

    /// The stage-1 fields of this STE.
    pub const fn s1_fields(&self) -> S1Fields {
        S1Fields::from_guest(self)
    }

    /// The STE as 64 little-endian bytes (its in-memory form).
    pub fn to_le_bytes(&self) -> [u8; STE_BYTES] {
        let mut b = [0u8; STE_BYTES];
        for (chunk, d) in b.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    /// An STE from its 64 in-memory little-endian bytes.
    pub fn from_le_bytes(b: &[u8; STE_BYTES]) -> Ste {
        let mut d = [0u64; 8];
        for (d, chunk) in d.iter_mut().zip(b.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            *d = u64::from_le_bytes(w);
        }
        Ste(d)
    }
}

/// A stage-2 translation configuration as an STE holds it (dword 2 VTCR fields and S2TTB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct S2Config {
    /// Root table address (S2TTB, 16-byte aligned at least; the SMMU requires alignment to the
    /// concatenated root table's size).
    pub ttb: u64,
    /// S2T0SZ = 64 - IPA bits.
    pub t0sz: u8,
    /// S2SL0 (4 KiB granule: 2 = start at level 0, 1 = level 1, 0 = level 2).
    pub sl0: u8,
    /// S2PS: output size code (0 = 32 bits … 6 = 52 bits).
    pub ps: u8,
    /// S2IR0: inner cacheability of table walks.
    pub irgn: u8,
    /// S2OR0: outer cacheability of table walks.
    pub orgn: u8,
    /// S2SH0: shareability of table walks.
    pub sh: u8,
}

impl S2Config {
    /// The configuration for a 4 KiB-granule stage-2 table at `root_pa` translating `ipa_bits`
    /// of IPA, whose walk starts at `start_level` (0, 1 or 2), with output size `oas_bits` (the
    /// smaller of the CPU's and the SMMU's; rounded down to an encodable size). Table walks are
    /// write-back cacheable, inner shareable (the tables live in ordinary RAM the CPUs write).
    pub fn for_table(root_pa: u64, ipa_bits: u32, start_level: u32, oas_bits: u32) -> S2Config {
        debug_assert!((25..=52).contains(&ipa_bits), "IPA bits {ipa_bits}");
        debug_assert!(start_level <= 2, "start level {start_level}");
        debug_assert!(addr_size_code(oas_bits).is_some(), "OAS {oas_bits}");
        let sl0 = match start_level {
            0 => 2,
            1 => 1,
            _ => 0,
        };
        // Largest encodable size that does not exceed oas_bits.
        let ps = (0..=6u8)
            .rev()
            .find(|&c| addr_size_bits(c.into()) <= oas_bits)
            .unwrap_or(0);
        S2Config {
            ttb: root_pa,
            t0sz: (64 - ipa_bits) as u8,
            sl0,
            ps,
            irgn: CACHE_WBWA,
            orgn: CACHE_WBWA,
            sh: SH_ISH,
        }
    }

    /// The 19-bit VTCR field (S2TG = 4 KiB).
    pub const fn vtcr(&self) -> u32 {
        let mut v = 0u64;
        v = bits::set(v, 5, 0, self.t0sz as u64);
        v = bits::set(v, 7, 6, self.sl0 as u64);
        v = bits::set(v, 9, 8, self.irgn as u64);
        v = bits::set(v, 11, 10, self.orgn as u64);
        v = bits::set(v, 13, 12, self.sh as u64);
        v = bits::set(v, 15, 14, S2TG_4K as u64);
        v = bits::set(v, 18, 16, self.ps as u64);
        v as u32
    }

    /// STE dword 2 for `vmid`: S2VMID, VTCR, S2AA64, S2PTW, S2R.
    const fn dword2(&self, vmid: u16) -> u64 {
        let mut d = s(0, D2_S2VMID, vmid as u64);
        d = s(d, D2_VTCR, self.vtcr() as u64);
        d |= (1 << D2_S2AA64) | (1 << D2_S2PTW) | (1 << D2_S2R);
        d
    }
}

/// The stage-1 fields of an STE: what the hypervisor copies from a guest's STE into the nested
/// STE it builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct S1Fields {
    /// S1ContextPtr as an address (an IPA for a guest).
    pub context_ptr: u64,
    /// S1Fmt.
    pub fmt: u8,
    /// S1CDMax.
    pub cd_max: u8,
    /// S1DSS.
    pub dss: u8,
    /// S1CIR.
    pub cir: u8,
    /// S1COR.
    pub cor: u8,
    /// S1CSH.
    pub csh: u8,
}

impl S1Fields {
    /// The stage-1 fields of `ste` (typically a guest's).
    pub const fn from_guest(ste: &Ste) -> S1Fields {
        S1Fields {
            context_ptr: ste.s1_context_ptr(),
            fmt: ste.s1_fmt(),
            cd_max: ste.s1_cd_max(),
            dss: ste.s1_dss(),
            cir: ste.s1_cir(),
            cor: ste.s1_cor(),
            csh: ste.s1_csh(),
        }
    }
}

/// A level-1 stream table descriptor: SPAN [4:0], L2Ptr [51:6].
///
/// SPAN = 0 means no level-2 table (the streams it covers are out of range: `C_BAD_STREAMID`);
/// otherwise the level-2 table holds `2^(SPAN - 1)` STEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct L1Desc(pub u64);

impl L1Desc {
    /// No level-2 table.
    pub const fn invalid() -> L1Desc {
        L1Desc(0)
    }

    /// A descriptor for the level-2 table at `l2_pa` (64-byte aligned at least, aligned to its
    /// size in practice) covering `2^(span - 1)` STEs.
    pub const fn new(l2_pa: u64, span: u8) -> L1Desc {
        L1Desc(bits::set(l2_pa & bits::mask(51, 6), 4, 0, span as u64))
    }

    /// The descriptor for a level-2 table of a stream table with `split`.
    pub const fn for_split(l2_pa: u64, split: u32) -> L1Desc {
        L1Desc::new(l2_pa, (split + 1) as u8)
    }

    /// SPAN.
    pub const fn span(self) -> u8 {
        bits::get(self.0, 4, 0) as u8
    }

    /// L2Ptr as an address.
    pub const fn l2_ptr(self) -> u64 {
        self.0 & bits::mask(51, 6)
    }

    /// Whether a level-2 table is present (SPAN != 0).
    pub const fn is_valid(self) -> bool {
        self.span() != 0
    }

    /// Number of STEs in the level-2 table (0 when invalid). SPAN values above 12 are reserved
    /// (treated as invalid here, as the architecture permits).
    pub const fn entries(self) -> u32 {
        match self.span() {
            0 | 13.. => 0,
            s => 1 << (s - 1),
        }
    }

    /// Whether the level-2 table holds the STE at `l2_index`.
    pub const fn covers(self, l2_index: u32) -> bool {
        l2_index < self.entries()
    }
}

/// Bytes in a level-1 descriptor.
pub const L1_DESC_BYTES: usize = 8;

/// Format of a stream table (`SMMU_STRTAB_BASE_CFG.FMT` and `SPLIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrtabFmt {
    /// One array of `2^LOG2SIZE` STEs.
    Linear,
    /// Level-1 descriptors, each for `2^split` StreamIDs.
    TwoLevel {
        /// SPLIT: the low `split` StreamID bits index the level-2 table.
        split: u32,
    },
}

/// Where the STE of a StreamID sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteIndex {
    /// Index into a linear table.
    Linear(usize),
    /// Level-1 descriptor index and index into its level-2 table.
    TwoLevel {
        /// Level-1 descriptor index: `sid >> split`.
        l1: usize,
        /// Index into the level-2 table: `sid & (2^split - 1)`.
        l2: usize,
    },
}

/// The position of `sid`'s STE in a stream table of format `fmt`.
pub const fn ste_index(sid: u32, fmt: StrtabFmt) -> SteIndex {
    match fmt {
        StrtabFmt::Linear => SteIndex::Linear(sid as usize),
        StrtabFmt::TwoLevel { split } => SteIndex::TwoLevel {
            l1: (sid >> split) as usize,
            l2: (sid & ((1u32 << split) - 1)) as usize,
        },
    }
}

/// Address of `sid`'s STE in a linear table at `base`.
pub const fn linear_ste_addr(base: u64, sid: u32) -> u64 {
    base + sid as u64 * STE_BYTES as u64
}

/// Address of the level-1 descriptor for `sid` in a 2-level table at `base` with `split`.
pub const fn l1_desc_addr(base: u64, sid: u32, split: u32) -> u64 {
    base + (sid >> split) as u64 * L1_DESC_BYTES as u64
}

/// Address of `sid`'s STE in the level-2 table `desc` points to (`None` if the descriptor does
/// not cover it). `split` is the stream table's SPLIT.
pub const fn l2_ste_addr(desc: L1Desc, sid: u32, split: u32) -> Option<u64> {
    let l2 = sid & ((1u32 << split) - 1);
    if desc.covers(l2) {
        Some(desc.l2_ptr() + l2 as u64 * STE_BYTES as u64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn field(v: u64, hi: u32, lo: u32) -> u64 {
        bits::get(v, hi, lo)
    }

    #[test]
    fn config_encoding() {
        for v in 0..8u8 {
            assert_eq!(SteConfig::from_bits(v).bits(), v);
        }
        assert_eq!(SteConfig::from_bits(0), SteConfig::Abort);
        assert_eq!(SteConfig::from_bits(4), SteConfig::Bypass);
        assert_eq!(SteConfig::from_bits(5), SteConfig::S1Trans);
        assert_eq!(SteConfig::from_bits(6), SteConfig::S2Trans);
        assert_eq!(SteConfig::from_bits(7), SteConfig::Nested);
        for r in 1..4 {
            assert_eq!(SteConfig::from_bits(r), SteConfig::Reserved(r));
        }
        assert!(SteConfig::Nested.s1_enabled() && SteConfig::Nested.s2_enabled());
        assert!(!SteConfig::S2Trans.s1_enabled() && SteConfig::S2Trans.s2_enabled());
        assert!(!SteConfig::Bypass.s1_enabled() && !SteConfig::Bypass.s2_enabled());
    }

    #[test]
    fn abort_and_invalid() {
        assert_eq!(Ste::invalid().0, [0; 8]);
        assert!(!Ste::invalid().valid());
        assert_eq!(Ste::abort().0, [1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Ste::abort().valid());
        assert_eq!(Ste::abort().config(), SteConfig::Abort);
        assert_eq!(Ste::default(), Ste::invalid());
    }

    #[test]
    fn for_table_geometry() {
        // QEMU virt: 44-bit IPA, start level 0, OAS 44.
        let c = S2Config::for_table(0x4800_0000, 44, 0, 44);
        assert_eq!(
            c,
            S2Config {
                ttb: 0x4800_0000,
                t0sz: 20,
                sl0: 2,
                ps: 4,
                irgn: 1,
                orgn: 1,
                sh: 3
            }
        );
        assert_eq!(S2Config::for_table(0, 40, 1, 48).sl0, 1);
        assert_eq!(S2Config::for_table(0, 40, 1, 48).ps, 5);
        assert_eq!(S2Config::for_table(0, 32, 2, 40).sl0, 0);
        assert_eq!(S2Config::for_table(0, 32, 2, 40).t0sz, 32);
    }

    /// What Linux's `arm_smmu_make_s2_domain_ste` produces for VMID 1, a 44-bit IPA / 44-bit OAS
    /// table starting at level 0 (io-pgtable VTCR: T0SZ 20, SL0 2, IRGN/ORGN WBWA, SH inner,
    /// TG 4K, PS 44-bit), VTTBR 0x4800_0000, no ATS — worked out by hand from the field table:
    ///
    /// * d0 = V | Config 0b110 << 1 = 0xd
    /// * d1 = SHCFG incoming (1 << 44)
    /// * d2 = VMID 1 | VTCR 0x43594 << 32 | S2AA64 (51) | S2PTW (54) | S2R (58)
    ///   (VTCR = 0x14 | 2 << 6 | 1 << 8 | 1 << 10 | 3 << 12 | 0 << 14 | 4 << 16 = 0x43594)
    /// * d3 = S2TTB
    #[test]
    fn s2_ste_matches_linux_by_hand() {
        let ste = Ste::s2(1, &S2Config::for_table(0x4800_0000, 44, 0, 44));
        assert_eq!(
            ste.0,
            [
                0xd,
                0x0000_1000_0000_0000,
                0x044c_3594_0000_0001,
                0x4800_0000,
                0,
                0,
                0,
                0
            ]
        );
    }

    #[test]
    fn s2_ste_fields_bit_by_bit() {
        let c = S2Config {
            ttb: 0x000f_ffff_ffff_fff0,
            t0sz: 0x2a,
            sl0: 1,
            ps: 6,
            irgn: 2,
            orgn: 3,
            sh: 2,
        };
        let ste = Ste::s2(0xbeef, &c);
        let [d0, d1, d2, d3, ..] = ste.0;
        assert_eq!(field(d0, 0, 0), 1, "V");
        assert_eq!(field(d0, 3, 1), 0b110, "Config");
        assert_eq!(field(d0, 63, 4), 0);
        assert_eq!(field(d1, 45, 44), 1, "SHCFG");
        assert_eq!(d1 & !bits::mask(45, 44), 0);
        assert_eq!(field(d2, 15, 0), 0xbeef, "S2VMID");
        assert_eq!(field(d2, 31, 16), 0);
        assert_eq!(field(d2, 37, 32), 0x2a, "S2T0SZ");
        assert_eq!(field(d2, 39, 38), 1, "S2SL0");
        assert_eq!(field(d2, 41, 40), 2, "S2IR0");
        assert_eq!(field(d2, 43, 42), 3, "S2OR0");
        assert_eq!(field(d2, 45, 44), 2, "S2SH0");
        assert_eq!(field(d2, 47, 46), 0, "S2TG 4K");
        assert_eq!(field(d2, 50, 48), 6, "S2PS");
        assert_eq!(field(d2, 51, 51), 1, "S2AA64");
        assert_eq!(field(d2, 52, 52), 0, "S2ENDI");
        assert_eq!(field(d2, 53, 53), 0, "S2AFFD");
        assert_eq!(field(d2, 54, 54), 1, "S2PTW");
        assert_eq!(field(d2, 56, 55), 0, "S2HD/S2HA");
        assert_eq!(field(d2, 57, 57), 0, "S2S");
        assert_eq!(field(d2, 58, 58), 1, "S2R");
        assert_eq!(field(d2, 63, 59), 0);
        assert_eq!(d3, 0x000f_ffff_ffff_fff0, "S2TTB[51:4]");
        assert_eq!(ste.0[4..], [0; 4]);
        // Accessors read back what the constructor wrote.
        assert!(ste.valid());
        assert_eq!(ste.config(), SteConfig::S2Trans);
        assert_eq!(ste.s2_vmid(), 0xbeef);
        assert_eq!(ste.s2_config(), c);
        assert_eq!(ste.s2_vtcr(), c.vtcr());
        assert!(ste.s2_aa64() && ste.s2_ptw() && ste.s2_r());
        assert!(!ste.s2_endi() && !ste.s2_affd() && !ste.s2_hd() && !ste.s2_ha() && !ste.s2_s());
        assert_eq!(ste.s2_tg(), 0);
        assert_eq!(ste.shcfg(), 1);
        assert_eq!((ste.eats(), ste.strw(), ste.s1_stalld()), (0, 0, false));
        // S2TTB bits outside [51:4] never leak.
        let ste = Ste::s2(0, &S2Config { ttb: u64::MAX, ..c });
        assert_eq!(ste.0[3], bits::mask(51, 4));
    }

    #[test]
    fn nested_ste_fields_bit_by_bit() {
        let s2 = S2Config::for_table(0x4800_0000, 44, 0, 44);
        let s1 = S1Fields {
            context_ptr: 0x000f_ffff_ffff_ffc0,
            fmt: 2,
            cd_max: 0x1f,
            dss: 2,
            cir: 1,
            cor: 2,
            csh: 3,
        };
        let ste = Ste::nested(7, &s2, &s1);
        let [d0, d1, d2, d3, ..] = ste.0;
        assert_eq!(field(d0, 0, 0), 1);
        assert_eq!(field(d0, 3, 1), 0b111, "Config nested");
        assert_eq!(field(d0, 5, 4), 2, "S1Fmt");
        assert_eq!(field(d0, 51, 6), 0x000f_ffff_ffff_ffc0 >> 6, "S1ContextPtr");
        assert_eq!(field(d0, 58, 52), 0);
        assert_eq!(field(d0, 63, 59), 0x1f, "S1CDMax");
        assert_eq!(field(d1, 1, 0), 2, "S1DSS");
        assert_eq!(field(d1, 3, 2), 1, "S1CIR");
        assert_eq!(field(d1, 5, 4), 2, "S1COR");
        assert_eq!(field(d1, 7, 6), 3, "S1CSH");
        assert_eq!(field(d1, 43, 8), 0);
        assert_eq!(field(d1, 45, 44), 1, "SHCFG");
        assert_eq!(d2, Ste::s2(7, &s2).0[2]);
        assert_eq!(d3, 0x4800_0000);
        assert_eq!(ste.config(), SteConfig::Nested);
        assert_eq!(S1Fields::from_guest(&ste), s1);
        assert_eq!(ste.s1_fields(), s1);
    }

    #[test]
    fn guest_ste_accessors() {
        // A hand-built guest S1 STE with every dword-1 field set.
        let d0 = 1 | (0b101 << 1) | (1 << 4) | 0x1234_5640 | (3 << 59);
        let d1 = 2 | (3 << 2) | (1 << 4) | (2 << 6) | (1 << 27) | (2 << 28) | (2 << 30);
        let ste = Ste([d0, d1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ste.config(), SteConfig::S1Trans);
        assert_eq!(ste.s1_fmt(), 1);
        assert_eq!(ste.s1_context_ptr(), 0x1234_5640);
        assert_eq!(ste.s1_cd_max(), 3);
        assert_eq!(ste.s1_dss(), 2);
        assert_eq!(ste.s1_cir(), 3);
        assert_eq!(ste.s1_cor(), 1);
        assert_eq!(ste.s1_csh(), 2);
        assert!(ste.s1_stalld());
        assert_eq!(ste.eats(), 2);
        assert_eq!(ste.strw(), 2);
        // Each dword-2 flag alone.
        for (bit, get) in [
            (51, Ste::s2_aa64 as fn(&Ste) -> bool),
            (52, Ste::s2_endi),
            (53, Ste::s2_affd),
            (54, Ste::s2_ptw),
            (55, Ste::s2_hd),
            (56, Ste::s2_ha),
            (57, Ste::s2_s),
            (58, Ste::s2_r),
        ] {
            let ste = Ste([0, 0, 1 << bit, 0, 0, 0, 0, 0]);
            assert!(get(&ste), "bit {bit}");
            assert!(!get(&Ste([0, 0, !(1 << bit), 0, 0, 0, 0, 0])), "bit {bit}");
        }
    }

    #[test]
    fn bytes_round_trip() {
        let ste = Ste([1, 2, 3, 4, 5, 6, 7, 0x0102_0304_0506_0708]);
        let b = ste.to_le_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(b[56], 8, "little-endian");
        assert_eq!(Ste::from_le_bytes(&b), ste);
    }

    #[test]
    fn l1_descriptor() {
        let d = L1Desc::for_split(0x4123_4000, STRTAB_SPLIT);
        assert_eq!(d.0, 0x4123_4000 | 9);
        assert_eq!(d.span(), 9);
        assert_eq!(d.l2_ptr(), 0x4123_4000);
        assert!(d.is_valid());
        assert_eq!(d.entries(), 256);
        assert!(d.covers(255) && !d.covers(256));
        assert!(!L1Desc::invalid().is_valid());
        assert_eq!(L1Desc::invalid().entries(), 0);
        // Address bits outside [51:6] and span bits outside [4:0] never leak.
        let d = L1Desc::new(u64::MAX, 0xff);
        assert_eq!(d.0, bits::mask(51, 6) | 0x1f);
        assert_eq!(L1Desc(0x1f).entries(), 0, "reserved SPAN");
    }

    #[test]
    fn indexing() {
        assert_eq!(
            ste_index(0x1234, StrtabFmt::Linear),
            SteIndex::Linear(0x1234)
        );
        assert_eq!(
            ste_index(0x1234, StrtabFmt::TwoLevel { split: 8 }),
            SteIndex::TwoLevel { l1: 0x12, l2: 0x34 }
        );
        assert_eq!(
            ste_index(0x1234, StrtabFmt::TwoLevel { split: 10 }),
            SteIndex::TwoLevel { l1: 4, l2: 0x234 }
        );
        assert_eq!(linear_ste_addr(0x1000, 3), 0x1000 + 192);
        assert_eq!(l1_desc_addr(0x1000, 0x1234, 8), 0x1000 + 0x12 * 8);
        let d = L1Desc::for_split(0x8000, 8);
        assert_eq!(l2_ste_addr(d, 0x1234, 8), Some(0x8000 + 0x34 * 64));
        assert_eq!(l2_ste_addr(L1Desc::invalid(), 0x1234, 8), None);
        // A guest descriptor spanning fewer STEs than SPLIT allows.
        assert_eq!(l2_ste_addr(L1Desc::new(0x8000, 3), 0x1203, 8), Some(0x80c0));
        assert_eq!(l2_ste_addr(L1Desc::new(0x8000, 3), 0x1204, 8), None);
    }

    proptest! {
        #[test]
        fn s2_constructor_round_trips(
            vmid: u16, ttb in 0u64..(1 << 48), t0sz in 0u8..64, sl0 in 0u8..4, ps in 0u8..8,
            irgn in 0u8..4, orgn in 0u8..4, sh in 0u8..4,
        ) {
            let c = S2Config { ttb: ttb << 4, t0sz, sl0, ps, irgn, orgn, sh };
            let ste = Ste::s2(vmid, &c);
            prop_assert_eq!(ste.s2_config(), c);
            prop_assert_eq!(ste.s2_vmid(), vmid);
            prop_assert_eq!(ste.config(), SteConfig::S2Trans);
        }

        #[test]
        fn nested_constructor_round_trips(
            ptr in 0u64..(1 << 46), fmt in 0u8..4, cd_max in 0u8..32, dss in 0u8..4,
            cir in 0u8..4, cor in 0u8..4, csh in 0u8..4, vmid: u16,
        ) {
            let s1 = S1Fields { context_ptr: ptr << 6, fmt, cd_max, dss, cir, cor, csh };
            let s2 = S2Config::for_table(0x4000_0000, 40, 1, 40);
            let ste = Ste::nested(vmid, &s2, &s1);
            prop_assert_eq!(S1Fields::from_guest(&ste), s1);
            prop_assert_eq!(ste.s2_config(), s2);
            prop_assert_eq!(ste.s2_vmid(), vmid);
        }
    }
}
