//! Stream-table shadowing: reading one guest STE from the guest's stream table (through the
//! VM's stage 2), validating it, and turning the result into the physical STE.
//!
//! What each kind of guest STE becomes, and which event the guest gets when it is invalid, is
//! the table in the [module docs](super).

use crate::smmu::v3::event::{Event, EventId};
use crate::smmu::v3::regs::STRTAB_BASE_ADDR_MASK;
use crate::smmu::v3::ste::{
    L1_DESC_BYTES, L1Desc, S1Fields, S2Config, STE_BYTES, Ste, SteConfig, l1_desc_addr,
    l2_ste_addr, linear_ste_addr,
};

use super::GuestMemory;
use super::regfile::{CR2_RECINVSID, Regs};

/// Bytes of one context descriptor (what the S1ContextPtr check reads).
const CD_BYTES: usize = 64;

/// The guest's configuration of one stream, as its SMMU would have cached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GuestCfg {
    /// Transactions abort (also every invalid configuration).
    Abort,
    /// Bypass: for a VM, IOVA = IPA through its stage 2.
    Bypass,
    /// Stage-1 translation with these fields (S1Fmt, S1CDMax, S1DSS zeroed).
    S1(S1Fields),
}

/// Why a guest STE gives an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Problem {
    /// STE.V = 0.
    Invalid,
    /// The StreamID is outside the guest's stream table.
    OutOfRange,
    /// Reading the level-1 descriptor or the STE at this IPA failed.
    Fetch(u64),
    /// The STE is ILLEGAL for this SMMU.
    BadSte,
    /// The context descriptor at this IPA cannot be read.
    CdFetch(u64),
}

impl Problem {
    /// The event a guest gets for this problem on `sid`, if any. `from_cfgi`: the load came from
    /// a guest `CFGI_*` command (rather than from enabling the SMMU).
    pub(super) fn event(self, sid: u32, regs: &Regs, from_cfgi: bool) -> Option<Event> {
        match self {
            Problem::Invalid => None,
            Problem::OutOfRange => {
                (from_cfgi && regs.cr2 & CR2_RECINVSID != 0).then(|| Event::bad_streamid(sid))
            }
            Problem::Fetch(addr) => Some(Event::ste_fetch(sid, addr)),
            Problem::BadSte => Some(Event::bad_ste(sid)),
            Problem::CdFetch(addr) => {
                Some(Event::new(EventId::F_CD_FETCH, sid).with_addresses(0, addr))
            }
        }
    }
}

/// The SPLIT a 2-level table uses: 6, 8 or 10 as programmed. The other values are reserved;
/// they behave as the nearest smaller valid one (6 at least), a CONSTRAINED UNPREDICTABLE choice.
fn effective_split(raw: u32) -> u32 {
    match raw {
        0..=7 => 6,
        8 | 9 => 8,
        _ => 10,
    }
}

fn read_u64(mem: &dyn GuestMemory, ipa: u64) -> Result<u64, Problem> {
    let mut b = [0u8; L1_DESC_BYTES];
    mem.read(ipa, &mut b).map_err(|_| Problem::Fetch(ipa))?;
    Ok(u64::from_le_bytes(b))
}

fn read_ste(mem: &dyn GuestMemory, ipa: u64) -> Result<Ste, Problem> {
    let mut b = [0u8; STE_BYTES];
    mem.read(ipa, &mut b).map_err(|_| Problem::Fetch(ipa))?;
    Ok(Ste::from_le_bytes(&b))
}

/// Reads `sid`'s STE from the guest's stream table as `regs` describe it. `sidsize` is the
/// advertised IDR1.SIDSIZE.
pub(super) fn fetch(
    mem: &dyn GuestMemory,
    regs: &Regs,
    sidsize: u32,
    sid: u32,
) -> Result<Ste, Problem> {
    let cfg = regs.strtab_base_cfg;
    // LOG2SIZE above SIDSIZE behaves as SIDSIZE.
    let log2size = (cfg & 0x3f).min(sidsize);
    if u64::from(sid) >> log2size != 0 {
        return Err(Problem::OutOfRange);
    }
    let base = regs.strtab_base & STRTAB_BASE_ADDR_MASK;
    // FMT = 1: 2-level. FMT 2 and 3 are reserved; they behave as linear.
    if (cfg >> 16) & 0b11 == 1 {
        let split = effective_split((cfg >> 6) & 0x1f);
        // The level-1 table is aligned to its size (64 bytes at least); the low address bits
        // of a misaligned base are taken as 0 (a CONSTRAINED UNPREDICTABLE choice, as QEMU).
        let l1_bytes = ((L1_DESC_BYTES as u64) << log2size.saturating_sub(split)).max(64);
        let base = base & !(l1_bytes - 1);
        let desc = L1Desc(read_u64(mem, l1_desc_addr(base, sid, split))?);
        let addr = l2_ste_addr(desc, sid, split).ok_or(Problem::OutOfRange)?;
        read_ste(mem, addr)
    } else {
        let bytes = (STE_BYTES as u64) << log2size;
        read_ste(mem, linear_ste_addr(base & !(bytes - 1), sid))
    }
}

/// Validates a guest STE against what this SMMU advertises (`oas_bits`: IDR5.OAS) and reads its
/// context descriptor pointer through stage 2.
pub(super) fn validate(
    mem: &dyn GuestMemory,
    ste: &Ste,
    oas_bits: u32,
) -> Result<GuestCfg, Problem> {
    if !ste.valid() {
        return Err(Problem::Invalid);
    }
    match ste.config() {
        SteConfig::Abort => Ok(GuestCfg::Abort),
        SteConfig::Bypass => Ok(GuestCfg::Bypass),
        SteConfig::S1Trans => {
            if ste.s1_cd_max() != 0 || ste.s1_stalld() {
                return Err(Problem::BadSte);
            }
            let ptr = ste.s1_context_ptr();
            if ptr >> oas_bits != 0 {
                return Err(Problem::BadSte);
            }
            let mut cd = [0u8; CD_BYTES];
            mem.read(ptr, &mut cd).map_err(|_| Problem::CdFetch(ptr))?;
            let mut s1 = S1Fields::from_guest(ste);
            s1.fmt = 0;
            s1.cd_max = 0;
            s1.dss = 0;
            Ok(GuestCfg::S1(s1))
        }
        // We advertise no stage 2: S2 and nested configurations are ILLEGAL, as are the
        // reserved encodings.
        SteConfig::S2Trans | SteConfig::Nested | SteConfig::Reserved(_) => Err(Problem::BadSte),
    }
}

/// STE.S1STALLD (dword 1 bit 27). Set by hand here because [`Ste::nested`] has no parameter for
/// it yet.
const STE_D1_S1STALLD: u64 = 1 << 27;

/// The physical STE for a stream of VM `vmid` (stage 2 `s2`) whose guest configuration is
/// `cfg`, with the guest SMMU's global state `regs`.
///
/// `disable_stall`: the hardware can stall faulting transactions and lets the STE forbid it
/// (IDR0.STALL_MODEL = 0b00). Nested STEs then get S1STALLD = 1, so a guest CD with CD.S = 1
/// (which the guest was told is not supported) cannot make the SMMU hold stalled transactions
/// (a resource shared with other VMs) waiting for a `CMD_RESUME` the guest may not issue.
pub(super) fn physical(
    vmid: u16,
    s2: &S2Config,
    disable_stall: bool,
    regs: &Regs,
    cfg: &GuestCfg,
) -> Ste {
    if !regs.smmu_enabled() {
        return if regs.gbpa_abort() {
            Ste::abort()
        } else {
            Ste::s2(vmid, s2)
        };
    }
    match cfg {
        GuestCfg::Abort => Ste::abort(),
        GuestCfg::Bypass => Ste::s2(vmid, s2),
        GuestCfg::S1(s1) => {
            let mut ste = Ste::nested(vmid, s2, s1);
            if disable_stall {
                ste.0[1] |= STE_D1_S1STALLD;
            }
            ste
        }
    }
}
