//! SMMUv3 commands: every command of the Non-secure command queue as a typed [`Command`], with
//! [`Command::encode`] to the 16-byte queue entry and [`Command::decode`] back (for commands a
//! guest writes to its emulated queue).
//!
//! Layout (IHI0070 chapter 4, Linux `CMDQ_*`, QEMU `CMD_*`). Doubleword 0 always starts with the
//! opcode [7:0]; SSec [10] must be 0 on the Non-secure queue; SSV [11] says whether the
//! SubstreamID [31:12] is valid; StreamID is [63:32]. TLB invalidations carry NUM [16:12] and
//! SCALE [24:20] (range form), VMID [47:32] and ASID [63:48] in dword 0; LEAF [0], TTL [9:8],
//! TG [11:10] and the address [63:12] (VA) or [51:12] (IPA) in dword 1.
//!
//! | opcode | command | fields |
//! |---|---|---|
//! | 0x01 | `CMD_PREFETCH_CONFIG` | SID |
//! | 0x02 | `CMD_PREFETCH_ADDR` | SID, SSV/SSID; d1 Size [4:0], Stride [9:5], Addr [63:12] |
//! | 0x03 | `CMD_CFGI_STE` | SID; d1 Leaf [0] |
//! | 0x04 | `CMD_CFGI_STE_RANGE` | SID; d1 Range [4:0]; Range = 31 is `CMD_CFGI_ALL` |
//! | 0x05 | `CMD_CFGI_CD` | SID, SSID; d1 Leaf |
//! | 0x06 | `CMD_CFGI_CD_ALL` | SID |
//! | 0x10–0x13 | `CMD_TLBI_NH_{ALL,ASID,VA,VAA}` | VMID, ASID, range/address fields |
//! | 0x20–0x23 | `CMD_TLBI_EL2_{ALL,ASID,VA,VAA}` | ASID, range/address fields |
//! | 0x28 | `CMD_TLBI_S12_VMALL` | VMID |
//! | 0x2a | `CMD_TLBI_S2_IPA` | VMID, NUM/SCALE; d1 LEAF, TTL, TG, IPA [51:12] |
//! | 0x30 | `CMD_TLBI_NSNH_ALL` | — |
//! | 0x40 | `CMD_ATC_INV` | SID, SSV/SSID, Global [9]; d1 Size [5:0], Addr [63:12] |
//! | 0x41 | `CMD_PRI_RESP` | SID, SSV/SSID; d1 PRGIndex [8:0], Resp [13:12] |
//! | 0x44 | `CMD_RESUME` | SID, Resp [13:12]; d1 STAG [15:0] |
//! | 0x45 | `CMD_STALL_TERM` | SID |
//! | 0x46 | `CMD_SYNC` | CS [13:12], MSH [23:22], MSIAttr [27:24], MSIData [63:32]; d1 MSIAddr [51:2] |
//!
//! [`Command::decode`] answers [`CmdError::Illegal`] (`CERROR_ILL`) for reserved opcodes, for the
//! commands a Non-secure queue may not issue (`CMD_TLBI_EL3_*`, `CMD_CFGI_VMS_PIDM` without
//! MPAM, the Secure-queue-only opcodes), for SSec = 1, and for the reserved parameter values the
//! architecture makes ILLEGAL (`CMD_SYNC.CS` = 0b11, `CMD_PRI_RESP.Resp` = 0b11). Other RES0
//! fields are ignored (the architecture lets an SMMU either check or ignore them; ignoring is
//! what QEMU does). Whether a command is legal *on a given SMMU* (stage-1 commands without
//! stage 1, …) is [`Command::check_caps`].
//!
//! `CMD_PREFETCH_ADDR.Stride` at [9:5] is from the specification's field layout as recalled, not
//! cross-checked against Linux (which does not use it); prefetches are hints, so an emulated SMMU
//! may ignore the field either way.

use super::regs::bits;

/// Opcodes.
pub mod op {
    pub const PREFETCH_CONFIG: u8 = 0x01;
    pub const PREFETCH_ADDR: u8 = 0x02;
    pub const CFGI_STE: u8 = 0x03;
    /// Also `CMD_CFGI_ALL` (Range = 31).
    pub const CFGI_STE_RANGE: u8 = 0x04;
    pub const CFGI_CD: u8 = 0x05;
    pub const CFGI_CD_ALL: u8 = 0x06;
    pub const CFGI_VMS_PIDM: u8 = 0x07;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_EL3_ALL: u8 = 0x18;
    pub const TLBI_EL3_VA: u8 = 0x1a;
    pub const TLBI_EL2_ALL: u8 = 0x20;
    pub const TLBI_EL2_ASID: u8 = 0x21;
    pub const TLBI_EL2_VA: u8 = 0x22;
    pub const TLBI_EL2_VAA: u8 = 0x23;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2a;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const ATC_INV: u8 = 0x40;
    pub const PRI_RESP: u8 = 0x41;
    pub const RESUME: u8 = 0x44;
    pub const STALL_TERM: u8 = 0x45;
    pub const SYNC: u8 = 0x46;
}

/// `CMD_CFGI_STE_RANGE.Range` that means "all StreamIDs" (`CMD_CFGI_ALL`).
pub const CFGI_RANGE_ALL: u8 = 31;
/// `CMD_SYNC.CS`: no completion signal (software polls CONS).
pub const SYNC_CS_NONE: u8 = 0;
/// `CMD_SYNC.CS`: signal completion with an MSI / wired interrupt.
pub const SYNC_CS_IRQ: u8 = 1;
/// `CMD_SYNC.CS`: signal completion with a WFE wake-up event.
pub const SYNC_CS_SEV: u8 = 2;
/// TG encoding of the 4 KiB granule in TLBI commands (0 = no range/TTL information).
pub const TG_4K: u8 = 0b01;

/// A command the SMMU cannot execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdError {
    /// `CERROR_ILL`: reserved opcode, SSec = 1, or an ILLEGAL parameter value.
    Illegal,
}

impl CmdError {
    /// The `SMMU_CMDQ_CONS.ERR` code an SMMU reports for this error.
    pub const fn code(self) -> u8 {
        match self {
            CmdError::Illegal => super::regs::CERROR_ILL,
        }
    }
}

/// One SMMUv3 command.
///
/// Address fields hold the address itself (`addr`), with the bits the command does not carry
/// dropped by [`Command::encode`] ([11:0]; for IPAs also [63:56]). `ssid: Option<u32>` is
/// SSV + SubstreamID. TLBI range fields are raw: `tg` 0 = no range/TTL (`num`, `scale`, `ttl`
/// are then ignored by the SMMU), [`TG_4K`] = 4 KiB; `num`/`scale` cover `(num + 1) << scale`
/// granules; `ttl` 0 = no level hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    PrefetchConfig {
        sid: u32,
    },
    PrefetchAddr {
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        size: u8,
        stride: u8,
    },
    CfgiSte {
        sid: u32,
        leaf: bool,
    },
    /// `2^(range + 1)` StreamIDs from `sid` aligned down; `range` < 31 (31 is [`Command::CfgiAll`]).
    CfgiSteRange {
        sid: u32,
        range: u8,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
        leaf: bool,
    },
    CfgiCdAll {
        sid: u32,
    },
    CfgiAll,
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    TlbiNhVa {
        vmid: u16,
        asid: u16,
        addr: u64,
        leaf: bool,
        ttl: u8,
        tg: u8,
        num: u8,
        scale: u8,
    },
    TlbiNhVaa {
        vmid: u16,
        addr: u64,
        leaf: bool,
        ttl: u8,
        tg: u8,
        num: u8,
        scale: u8,
    },
    TlbiEl2All,
    TlbiEl2Asid {
        asid: u16,
    },
    TlbiEl2Va {
        asid: u16,
        addr: u64,
        leaf: bool,
        ttl: u8,
        tg: u8,
        num: u8,
        scale: u8,
    },
    TlbiEl2Vaa {
        addr: u64,
        leaf: bool,
        ttl: u8,
        tg: u8,
        num: u8,
        scale: u8,
    },
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiS2Ipa {
        vmid: u16,
        addr: u64,
        leaf: bool,
        ttl: u8,
        tg: u8,
        num: u8,
        scale: u8,
    },
    TlbiNsnhAll,
    AtcInv {
        sid: u32,
        ssid: Option<u32>,
        global: bool,
        addr: u64,
        size: u8,
    },
    PriResp {
        sid: u32,
        ssid: Option<u32>,
        grpid: u16,
        resp: u8,
    },
    Resume {
        sid: u32,
        stag: u16,
        resp: u8,
    },
    StallTerm {
        sid: u32,
    },
    Sync {
        cs: u8,
        msh: u8,
        msiattr: u8,
        msidata: u32,
        msiaddr: u64,
    },
}

// Dword 0.
const D0_OP: (u32, u32) = (7, 0);
const D0_ATC_GLOBAL: u32 = 9;
const D0_SSEC: u32 = 10;
const D0_SSV: u32 = 11;
const D0_SSID: (u32, u32) = (31, 12);
const D0_SID: (u32, u32) = (63, 32);
const D0_NUM: (u32, u32) = (16, 12);
const D0_SCALE: (u32, u32) = (24, 20);
const D0_VMID: (u32, u32) = (47, 32);
const D0_ASID: (u32, u32) = (63, 48);
const D0_RESP: (u32, u32) = (13, 12);
const D0_SYNC_CS: (u32, u32) = (13, 12);
const D0_SYNC_MSH: (u32, u32) = (23, 22);
const D0_SYNC_MSIATTR: (u32, u32) = (27, 24);
const D0_SYNC_MSIDATA: (u32, u32) = (63, 32);
// Dword 1.
const D1_LEAF: u32 = 0;
const D1_RANGE: (u32, u32) = (4, 0);
const D1_TTL: (u32, u32) = (9, 8);
const D1_TG: (u32, u32) = (11, 10);
const D1_VA: (u32, u32) = (63, 12);
const D1_IPA: (u32, u32) = (55, 12);
const D1_PREFETCH_SIZE: (u32, u32) = (4, 0);
const D1_PREFETCH_STRIDE: (u32, u32) = (9, 5);
const D1_ATC_SIZE: (u32, u32) = (5, 0);
const D1_PRI_GRPID: (u32, u32) = (8, 0);
const D1_PRI_RESP: (u32, u32) = (13, 12);
const D1_RESUME_STAG: (u32, u32) = (15, 0);
const D1_SYNC_MSIADDR: (u32, u32) = (55, 2);

const fn g(v: u64, (hi, lo): (u32, u32)) -> u64 {
    bits::get(v, hi, lo)
}

const fn p(v: u64, (hi, lo): (u32, u32), x: u64) -> u64 {
    bits::set(v, hi, lo, x)
}

fn ssid_fields(d0: u64, ssid: Option<u32>) -> u64 {
    match ssid {
        Some(s) => p(d0 | (1 << D0_SSV), D0_SSID, s.into()),
        None => d0,
    }
}

fn ssid_of(d0: u64) -> Option<u32> {
    bits::bit(d0, D0_SSV).then(|| g(d0, D0_SSID) as u32)
}

/// Dword 0 and 1 range/address fields common to the TLBI-by-address commands.
#[allow(clippy::too_many_arguments)]
fn tlbi_addr(
    mut d0: u64,
    addr: u64,
    addr_field: (u32, u32),
    leaf: bool,
    ttl: u8,
    tg: u8,
    num: u8,
    scale: u8,
) -> [u64; 2] {
    d0 = p(d0, D0_NUM, num.into());
    d0 = p(d0, D0_SCALE, scale.into());
    let mut d1 = addr & bits::mask(addr_field.0, addr_field.1);
    d1 = bits::with_bit(d1, D1_LEAF, leaf);
    d1 = p(d1, D1_TTL, ttl.into());
    d1 = p(d1, D1_TG, tg.into());
    [d0, d1]
}

/// `(addr, leaf, ttl, tg, num, scale)` of a TLBI-by-address command.
fn tlbi_fields(d0: u64, d1: u64, addr_field: (u32, u32)) -> (u64, bool, u8, u8, u8, u8) {
    (
        d1 & bits::mask(addr_field.0, addr_field.1),
        bits::bit(d1, D1_LEAF),
        g(d1, D1_TTL) as u8,
        g(d1, D1_TG) as u8,
        g(d0, D0_NUM) as u8,
        g(d0, D0_SCALE) as u8,
    )
}

impl Command {
    /// The opcode.
    pub const fn opcode(&self) -> u8 {
        match self {
            Command::PrefetchConfig { .. } => op::PREFETCH_CONFIG,
            Command::PrefetchAddr { .. } => op::PREFETCH_ADDR,
            Command::CfgiSte { .. } => op::CFGI_STE,
            Command::CfgiSteRange { .. } | Command::CfgiAll => op::CFGI_STE_RANGE,
            Command::CfgiCd { .. } => op::CFGI_CD,
            Command::CfgiCdAll { .. } => op::CFGI_CD_ALL,
            Command::TlbiNhAll { .. } => op::TLBI_NH_ALL,
            Command::TlbiNhAsid { .. } => op::TLBI_NH_ASID,
            Command::TlbiNhVa { .. } => op::TLBI_NH_VA,
            Command::TlbiNhVaa { .. } => op::TLBI_NH_VAA,
            Command::TlbiEl2All => op::TLBI_EL2_ALL,
            Command::TlbiEl2Asid { .. } => op::TLBI_EL2_ASID,
            Command::TlbiEl2Va { .. } => op::TLBI_EL2_VA,
            Command::TlbiEl2Vaa { .. } => op::TLBI_EL2_VAA,
            Command::TlbiS12Vmall { .. } => op::TLBI_S12_VMALL,
            Command::TlbiS2Ipa { .. } => op::TLBI_S2_IPA,
            Command::TlbiNsnhAll => op::TLBI_NSNH_ALL,
            Command::AtcInv { .. } => op::ATC_INV,
            Command::PriResp { .. } => op::PRI_RESP,
            Command::Resume { .. } => op::RESUME,
            Command::StallTerm { .. } => op::STALL_TERM,
            Command::Sync { .. } => op::SYNC,
        }
    }

    /// `CMD_SYNC` with no completion signal (CONS is polled).
    pub const fn sync() -> Command {
        Command::Sync {
            cs: SYNC_CS_NONE,
            msh: 0,
            msiattr: 0,
            msidata: 0,
            msiaddr: 0,
        }
    }

    /// The StreamID the command names, if any.
    pub const fn sid(&self) -> Option<u32> {
        match *self {
            Command::PrefetchConfig { sid }
            | Command::PrefetchAddr { sid, .. }
            | Command::CfgiSte { sid, .. }
            | Command::CfgiSteRange { sid, .. }
            | Command::CfgiCd { sid, .. }
            | Command::CfgiCdAll { sid }
            | Command::AtcInv { sid, .. }
            | Command::PriResp { sid, .. }
            | Command::Resume { sid, .. }
            | Command::StallTerm { sid } => Some(sid),
            _ => None,
        }
    }

    /// The 16-byte queue entry.
    pub fn encode(&self) -> [u64; 2] {
        let d0 = u64::from(self.opcode());
        match *self {
            Command::PrefetchConfig { sid } => [p(d0, D0_SID, sid.into()), 0],
            Command::PrefetchAddr {
                sid,
                ssid,
                addr,
                size,
                stride,
            } => {
                let d0 = ssid_fields(p(d0, D0_SID, sid.into()), ssid);
                let mut d1 = addr & bits::mask(D1_VA.0, D1_VA.1);
                d1 = p(d1, D1_PREFETCH_SIZE, size.into());
                d1 = p(d1, D1_PREFETCH_STRIDE, stride.into());
                [d0, d1]
            }
            Command::CfgiSte { sid, leaf } => [p(d0, D0_SID, sid.into()), u64::from(leaf)],
            Command::CfgiSteRange { sid, range } => {
                [p(d0, D0_SID, sid.into()), p(0, D1_RANGE, range.into())]
            }
            Command::CfgiAll => [d0, u64::from(CFGI_RANGE_ALL)],
            Command::CfgiCd { sid, ssid, leaf } => {
                let d0 = p(p(d0, D0_SID, sid.into()), D0_SSID, ssid.into());
                [d0, u64::from(leaf)]
            }
            Command::CfgiCdAll { sid } => [p(d0, D0_SID, sid.into()), 0],
            Command::TlbiNhAll { vmid } | Command::TlbiS12Vmall { vmid } => {
                [p(d0, D0_VMID, vmid.into()), 0]
            }
            Command::TlbiNhAsid { vmid, asid } => {
                [p(p(d0, D0_VMID, vmid.into()), D0_ASID, asid.into()), 0]
            }
            Command::TlbiNhVa {
                vmid,
                asid,
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
            } => {
                let d0 = p(p(d0, D0_VMID, vmid.into()), D0_ASID, asid.into());
                tlbi_addr(d0, addr, D1_VA, leaf, ttl, tg, num, scale)
            }
            Command::TlbiNhVaa {
                vmid,
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
            } => tlbi_addr(
                p(d0, D0_VMID, vmid.into()),
                addr,
                D1_VA,
                leaf,
                ttl,
                tg,
                num,
                scale,
            ),
            Command::TlbiEl2All | Command::TlbiNsnhAll => [d0, 0],
            Command::TlbiEl2Asid { asid } => [p(d0, D0_ASID, asid.into()), 0],
            Command::TlbiEl2Va {
                asid,
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
            } => tlbi_addr(
                p(d0, D0_ASID, asid.into()),
                addr,
                D1_VA,
                leaf,
                ttl,
                tg,
                num,
                scale,
            ),
            Command::TlbiEl2Vaa {
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
            } => tlbi_addr(d0, addr, D1_VA, leaf, ttl, tg, num, scale),
            Command::TlbiS2Ipa {
                vmid,
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
            } => tlbi_addr(
                p(d0, D0_VMID, vmid.into()),
                addr,
                D1_IPA,
                leaf,
                ttl,
                tg,
                num,
                scale,
            ),
            Command::AtcInv {
                sid,
                ssid,
                global,
                addr,
                size,
            } => {
                let d0 = ssid_fields(p(d0, D0_SID, sid.into()), ssid);
                let d0 = bits::with_bit(d0, D0_ATC_GLOBAL, global);
                let d1 = p(
                    addr & bits::mask(D1_VA.0, D1_VA.1),
                    D1_ATC_SIZE,
                    size.into(),
                );
                [d0, d1]
            }
            Command::PriResp {
                sid,
                ssid,
                grpid,
                resp,
            } => {
                let d0 = ssid_fields(p(d0, D0_SID, sid.into()), ssid);
                let d1 = p(p(0, D1_PRI_GRPID, grpid.into()), D1_PRI_RESP, resp.into());
                [d0, d1]
            }
            Command::Resume { sid, stag, resp } => {
                let d0 = p(p(d0, D0_SID, sid.into()), D0_RESP, resp.into());
                [d0, p(0, D1_RESUME_STAG, stag.into())]
            }
            Command::StallTerm { sid } => [p(d0, D0_SID, sid.into()), 0],
            Command::Sync {
                cs,
                msh,
                msiattr,
                msidata,
                msiaddr,
            } => {
                let mut d0 = p(d0, D0_SYNC_CS, cs.into());
                d0 = p(d0, D0_SYNC_MSH, msh.into());
                d0 = p(d0, D0_SYNC_MSIATTR, msiattr.into());
                d0 = p(d0, D0_SYNC_MSIDATA, msidata.into());
                [
                    d0,
                    msiaddr & bits::mask(D1_SYNC_MSIADDR.0, D1_SYNC_MSIADDR.1),
                ]
            }
        }
    }

    /// Decodes a queue entry as the Non-secure command queue of an SMMU would.
    pub fn decode(raw: [u64; 2]) -> Result<Command, CmdError> {
        let [d0, d1] = raw;
        if bits::bit(d0, D0_SSEC) {
            return Err(CmdError::Illegal);
        }
        let sid = g(d0, D0_SID) as u32;
        let vmid = g(d0, D0_VMID) as u16;
        let asid = g(d0, D0_ASID) as u16;
        let cmd = match g(d0, D0_OP) as u8 {
            op::PREFETCH_CONFIG => Command::PrefetchConfig { sid },
            op::PREFETCH_ADDR => Command::PrefetchAddr {
                sid,
                ssid: ssid_of(d0),
                addr: d1 & bits::mask(D1_VA.0, D1_VA.1),
                size: g(d1, D1_PREFETCH_SIZE) as u8,
                stride: g(d1, D1_PREFETCH_STRIDE) as u8,
            },
            op::CFGI_STE => Command::CfgiSte {
                sid,
                leaf: bits::bit(d1, D1_LEAF),
            },
            op::CFGI_STE_RANGE => match g(d1, D1_RANGE) as u8 {
                CFGI_RANGE_ALL => Command::CfgiAll,
                range => Command::CfgiSteRange { sid, range },
            },
            op::CFGI_CD => Command::CfgiCd {
                sid,
                ssid: g(d0, D0_SSID) as u32,
                leaf: bits::bit(d1, D1_LEAF),
            },
            op::CFGI_CD_ALL => Command::CfgiCdAll { sid },
            op::TLBI_NH_ALL => Command::TlbiNhAll { vmid },
            op::TLBI_NH_ASID => Command::TlbiNhAsid { vmid, asid },
            op::TLBI_NH_VA => {
                let (addr, leaf, ttl, tg, num, scale) = tlbi_fields(d0, d1, D1_VA);
                Command::TlbiNhVa {
                    vmid,
                    asid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }
            op::TLBI_NH_VAA => {
                let (addr, leaf, ttl, tg, num, scale) = tlbi_fields(d0, d1, D1_VA);
                Command::TlbiNhVaa {
                    vmid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }
            op::TLBI_EL2_ALL => Command::TlbiEl2All,
            op::TLBI_EL2_ASID => Command::TlbiEl2Asid { asid },
            op::TLBI_EL2_VA => {
                let (addr, leaf, ttl, tg, num, scale) = tlbi_fields(d0, d1, D1_VA);
                Command::TlbiEl2Va {
                    asid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }
            op::TLBI_EL2_VAA => {
                let (addr, leaf, ttl, tg, num, scale) = tlbi_fields(d0, d1, D1_VA);
                Command::TlbiEl2Vaa {
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }
            op::TLBI_S12_VMALL => Command::TlbiS12Vmall { vmid },
            op::TLBI_S2_IPA => {
                let (addr, leaf, ttl, tg, num, scale) = tlbi_fields(d0, d1, D1_IPA);
                Command::TlbiS2Ipa {
                    vmid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }
            op::TLBI_NSNH_ALL => Command::TlbiNsnhAll,
            op::ATC_INV => Command::AtcInv {
                sid,
                ssid: ssid_of(d0),
                global: bits::bit(d0, D0_ATC_GLOBAL),
                addr: d1 & bits::mask(D1_VA.0, D1_VA.1),
                size: g(d1, D1_ATC_SIZE) as u8,
            },
            op::PRI_RESP => {
                let resp = g(d1, D1_PRI_RESP) as u8;
                if resp == 0b11 {
                    return Err(CmdError::Illegal);
                }
                Command::PriResp {
                    sid,
                    ssid: ssid_of(d0),
                    grpid: g(d1, D1_PRI_GRPID) as u16,
                    resp,
                }
            }
            op::RESUME => Command::Resume {
                sid,
                stag: g(d1, D1_RESUME_STAG) as u16,
                resp: g(d0, D0_RESP) as u8,
            },
            op::STALL_TERM => Command::StallTerm { sid },
            op::SYNC => {
                let cs = g(d0, D0_SYNC_CS) as u8;
                if cs == 0b11 {
                    return Err(CmdError::Illegal);
                }
                Command::Sync {
                    cs,
                    msh: g(d0, D0_SYNC_MSH) as u8,
                    msiattr: g(d0, D0_SYNC_MSIATTR) as u8,
                    msidata: g(d0, D0_SYNC_MSIDATA) as u32,
                    msiaddr: d1 & bits::mask(D1_SYNC_MSIADDR.0, D1_SYNC_MSIADDR.1),
                }
            }
            // Reserved, Secure-only (EL3, S_*), or needing features this interface does not
            // offer (CFGI_VMS_PIDM needs MPAM + VMS).
            _ => return Err(CmdError::Illegal),
        };
        Ok(cmd)
    }

    /// The command only exists on an SMMU with stage 1 (IDR0.S1P): `CERROR_ILL` otherwise.
    pub const fn needs_stage1(&self) -> bool {
        matches!(
            self,
            Command::CfgiCd { .. }
                | Command::CfgiCdAll { .. }
                | Command::TlbiNhAll { .. }
                | Command::TlbiNhAsid { .. }
                | Command::TlbiNhVa { .. }
                | Command::TlbiNhVaa { .. }
        )
    }

    /// The command only exists on an SMMU with stage 2 (IDR0.S2P): `CERROR_ILL` otherwise.
    pub const fn needs_stage2(&self) -> bool {
        matches!(
            self,
            Command::TlbiS12Vmall { .. } | Command::TlbiS2Ipa { .. }
        )
    }

    /// The command needs EL2 StreamWorld support (IDR0.HYP).
    pub const fn needs_hyp(&self) -> bool {
        matches!(
            self,
            Command::TlbiEl2All
                | Command::TlbiEl2Asid { .. }
                | Command::TlbiEl2Va { .. }
                | Command::TlbiEl2Vaa { .. }
        )
    }

    /// `Err(Illegal)` if an SMMU with these stages would raise `CERROR_ILL` for this command.
    /// (`TLBI_EL2_*` on an SMMU without IDR0.HYP is not checked: QEMU accepts them.)
    pub const fn check_caps(&self, s1p: bool, s2p: bool) -> Result<(), CmdError> {
        if (self.needs_stage1() && !s1p) || (self.needs_stage2() && !s2p) {
            Err(CmdError::Illegal)
        } else {
            Ok(())
        }
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
    fn opcodes() {
        let cases: &[(Command, u8)] = &[
            (Command::PrefetchConfig { sid: 0 }, 0x01),
            (
                Command::PrefetchAddr {
                    sid: 0,
                    ssid: None,
                    addr: 0,
                    size: 0,
                    stride: 0,
                },
                0x02,
            ),
            (
                Command::CfgiSte {
                    sid: 0,
                    leaf: false,
                },
                0x03,
            ),
            (Command::CfgiSteRange { sid: 0, range: 0 }, 0x04),
            (Command::CfgiAll, 0x04),
            (
                Command::CfgiCd {
                    sid: 0,
                    ssid: 0,
                    leaf: false,
                },
                0x05,
            ),
            (Command::CfgiCdAll { sid: 0 }, 0x06),
            (Command::TlbiNhAll { vmid: 0 }, 0x10),
            (Command::TlbiNhAsid { vmid: 0, asid: 0 }, 0x11),
            (Command::TlbiEl2All, 0x20),
            (Command::TlbiEl2Asid { asid: 0 }, 0x21),
            (Command::TlbiS12Vmall { vmid: 0 }, 0x28),
            (Command::TlbiNsnhAll, 0x30),
            (Command::StallTerm { sid: 0 }, 0x45),
            (Command::sync(), 0x46),
        ];
        for (c, opc) in cases {
            assert_eq!(c.opcode(), *opc, "{c:?}");
            assert_eq!(c.encode()[0] & 0xff, u64::from(*opc), "{c:?}");
            assert_eq!(Command::decode(c.encode()), Ok(*c));
        }
    }

    #[test]
    fn cfgi_fields_bit_by_bit() {
        let c = Command::CfgiSte {
            sid: 0xdead_beef,
            leaf: true,
        }
        .encode();
        assert_eq!(c, [0x03 | (0xdead_beef << 32), 1]);
        let c = Command::CfgiSteRange {
            sid: 0x1234,
            range: 7,
        }
        .encode();
        assert_eq!(c, [0x04 | (0x1234 << 32), 7]);
        // CFGI_ALL as Linux writes it: range 31, SID 0.
        assert_eq!(Command::CfgiAll.encode(), [0x04, 31]);
        // Any SID with range 31 decodes as CFGI_ALL (the SID is IGNORED).
        assert_eq!(
            Command::decode([0x04 | (5 << 32), 31]),
            Ok(Command::CfgiAll)
        );
        let c = Command::CfgiCd {
            sid: 9,
            ssid: 0xf_ffff,
            leaf: true,
        }
        .encode();
        assert_eq!(field(c[0], 31, 12), 0xf_ffff, "SSID[31:12]");
        assert_eq!(field(c[0], 11, 8), 0, "no SSV/SSec");
        assert_eq!(field(c[0], 63, 32), 9);
        assert_eq!(c[1], 1);
        assert_eq!(
            Command::PrefetchConfig { sid: 0xffff_ffff }.encode(),
            [0x01 | (0xffff_ffff << 32), 0]
        );
    }

    #[test]
    fn tlbi_fields_bit_by_bit() {
        let c = Command::TlbiNhVa {
            vmid: 0xbeef,
            asid: 0xcafe,
            addr: 0xffff_ffff_ffff_ffff,
            leaf: true,
            ttl: 3,
            tg: 2,
            num: 0x1f,
            scale: 0x15,
        }
        .encode();
        assert_eq!(field(c[0], 7, 0), 0x12);
        assert_eq!(field(c[0], 11, 8), 0);
        assert_eq!(field(c[0], 16, 12), 0x1f, "NUM");
        assert_eq!(field(c[0], 19, 17), 0);
        assert_eq!(field(c[0], 24, 20), 0x15, "SCALE");
        assert_eq!(field(c[0], 31, 25), 0);
        assert_eq!(field(c[0], 47, 32), 0xbeef, "VMID");
        assert_eq!(field(c[0], 63, 48), 0xcafe, "ASID");
        assert_eq!(c[1] & 1, 1, "LEAF");
        assert_eq!(field(c[1], 7, 1), 0);
        assert_eq!(field(c[1], 9, 8), 3, "TTL");
        assert_eq!(field(c[1], 11, 10), 2, "TG");
        assert_eq!(field(c[1], 63, 12), (1 << 52) - 1, "VA[63:12]");
        // IPA: bits above 55 are not carried.
        let c = Command::TlbiS2Ipa {
            vmid: 1,
            addr: u64::MAX,
            leaf: false,
            ttl: 0,
            tg: 0,
            num: 0,
            scale: 0,
        }
        .encode();
        assert_eq!(c, [0x2a | (1 << 32), bits::mask(55, 12)]);
        // EL2 forms carry no VMID.
        let c = Command::TlbiEl2Va {
            asid: 0x55,
            addr: 0x1000,
            leaf: false,
            ttl: 0,
            tg: 0,
            num: 0,
            scale: 0,
        }
        .encode();
        assert_eq!(c, [0x22 | (0x55 << 48), 0x1000]);
        assert_eq!(
            Command::TlbiEl2Asid { asid: 0xffff }.encode(),
            [0x21 | (0xffff << 48), 0]
        );
        assert_eq!(
            Command::TlbiNhAsid { vmid: 2, asid: 3 }.encode(),
            [0x11 | (2 << 32) | (3 << 48), 0]
        );
        assert_eq!(
            Command::TlbiS12Vmall { vmid: 0x1234 }.encode(),
            [0x28 | (0x1234 << 32), 0]
        );
        assert_eq!(Command::TlbiNsnhAll.encode(), [0x30, 0]);
    }

    #[test]
    fn other_fields_bit_by_bit() {
        let c = Command::Sync {
            cs: 1,
            msh: 3,
            msiattr: 0xf,
            msidata: 0xdead_beef,
            msiaddr: u64::MAX,
        }
        .encode();
        assert_eq!(field(c[0], 13, 12), 1, "CS");
        assert_eq!(field(c[0], 23, 22), 3, "MSH");
        assert_eq!(field(c[0], 27, 24), 0xf, "MSIAttr");
        assert_eq!(field(c[0], 63, 32), 0xdead_beef, "MSIData");
        assert_eq!(field(c[0], 21, 14), 0);
        assert_eq!(c[1], bits::mask(55, 2), "MSIAddr[55:2]");
        assert_eq!(Command::sync().encode(), [0x46, 0]);

        let c = Command::AtcInv {
            sid: 3,
            ssid: Some(0x12345),
            global: true,
            addr: 0x1234_5678_9abc_def0,
            size: 52,
        }
        .encode();
        assert_eq!(field(c[0], 9, 9), 1, "Global");
        assert_eq!(field(c[0], 10, 10), 0, "SSec");
        assert_eq!(field(c[0], 11, 11), 1, "SSV");
        assert_eq!(field(c[0], 31, 12), 0x12345);
        assert_eq!(field(c[0], 63, 32), 3);
        assert_eq!(c[1], 0x1234_5678_9abc_d000 | 52);

        let c = Command::PriResp {
            sid: 4,
            ssid: None,
            grpid: 0x1ff,
            resp: 2,
        }
        .encode();
        assert_eq!(c, [0x41 | (4 << 32), 0x1ff | (2 << 12)]);

        let c = Command::Resume {
            sid: 6,
            stag: 0xabcd,
            resp: 1,
        }
        .encode();
        assert_eq!(c, [0x44 | (1 << 12) | (6 << 32), 0xabcd]);

        let c = Command::PrefetchAddr {
            sid: 8,
            ssid: Some(1),
            addr: 0x8000_1fff,
            size: 3,
            stride: 9,
        }
        .encode();
        assert_eq!(
            c,
            [
                0x02 | (1 << 11) | (1 << 12) | (8 << 32),
                0x8000_1000 | 3 | (9 << 5)
            ]
        );
    }

    #[test]
    fn illegal_commands() {
        // SSec = 1 on any opcode.
        assert_eq!(
            Command::decode([0x46 | (1 << 10), 0]),
            Err(CmdError::Illegal)
        );
        assert_eq!(
            Command::decode([0x03 | (1 << 10), 0]),
            Err(CmdError::Illegal)
        );
        // Reserved and Secure/EL3-only opcodes.
        for opc in [
            0x00u64, 0x07, 0x08, 0x0a, 0x0f, 0x14, 0x18, 0x1a, 0x24, 0x29, 0x2b, 0x31, 0x42, 0x47,
            0x50, 0x58, 0x60, 0x70, 0x80, 0xff,
        ] {
            assert_eq!(
                Command::decode([opc, 0]),
                Err(CmdError::Illegal),
                "{opc:#x}"
            );
        }
        // Reserved parameter values.
        assert_eq!(
            Command::decode([0x46 | (3 << 12), 0]),
            Err(CmdError::Illegal)
        );
        assert_eq!(Command::decode([0x41, 3 << 12]), Err(CmdError::Illegal));
        assert_eq!(CmdError::Illegal.code(), 1);
    }

    #[test]
    fn capability_checks() {
        let nh = Command::TlbiNhAll { vmid: 1 };
        assert_eq!(nh.check_caps(false, true), Err(CmdError::Illegal));
        assert_eq!(nh.check_caps(true, false), Ok(()));
        let s2 = Command::TlbiS12Vmall { vmid: 1 };
        assert_eq!(s2.check_caps(true, false), Err(CmdError::Illegal));
        assert_eq!(s2.check_caps(false, true), Ok(()));
        assert!(
            Command::CfgiCdAll { sid: 0 }
                .check_caps(false, true)
                .is_err()
        );
        assert_eq!(Command::CfgiAll.check_caps(false, false), Ok(()));
        assert!(Command::TlbiEl2All.needs_hyp());
        assert_eq!(Command::CfgiSte { sid: 4, leaf: true }.sid(), Some(4));
        assert_eq!(Command::CfgiAll.sid(), None);
    }

    fn any_ssid() -> impl Strategy<Value = Option<u32>> {
        prop::option::of(0u32..(1 << 20))
    }

    prop_compose! {
        fn tlbi_args()(addr: u64, leaf: bool, ttl in 0u8..4, tg in 0u8..4, num in 0u8..32,
                       scale in 0u8..32) -> (u64, bool, u8, u8, u8, u8) {
            (addr & !0xfff, leaf, ttl, tg, num, scale)
        }
    }

    fn any_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            any::<u32>().prop_map(|sid| Command::PrefetchConfig { sid }),
            (any::<u32>(), any_ssid(), any::<u64>(), 0u8..32, 0u8..32).prop_map(
                |(sid, ssid, addr, size, stride)| Command::PrefetchAddr {
                    sid,
                    ssid,
                    addr: addr & !0xfff,
                    size,
                    stride
                }
            ),
            (any::<u32>(), any::<bool>()).prop_map(|(sid, leaf)| Command::CfgiSte { sid, leaf }),
            (any::<u32>(), 0u8..31).prop_map(|(sid, range)| Command::CfgiSteRange { sid, range }),
            (any::<u32>(), 0u32..(1 << 20), any::<bool>())
                .prop_map(|(sid, ssid, leaf)| Command::CfgiCd { sid, ssid, leaf }),
            any::<u32>().prop_map(|sid| Command::CfgiCdAll { sid }),
            Just(Command::CfgiAll),
            any::<u16>().prop_map(|vmid| Command::TlbiNhAll { vmid }),
            (any::<u16>(), any::<u16>())
                .prop_map(|(vmid, asid)| Command::TlbiNhAsid { vmid, asid }),
            (any::<u16>(), any::<u16>(), tlbi_args()).prop_map(
                |(vmid, asid, (addr, leaf, ttl, tg, num, scale))| Command::TlbiNhVa {
                    vmid,
                    asid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale
                }
            ),
            (any::<u16>(), tlbi_args()).prop_map(|(vmid, (addr, leaf, ttl, tg, num, scale))| {
                Command::TlbiNhVaa {
                    vmid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }),
            Just(Command::TlbiEl2All),
            any::<u16>().prop_map(|asid| Command::TlbiEl2Asid { asid }),
            (any::<u16>(), tlbi_args()).prop_map(|(asid, (addr, leaf, ttl, tg, num, scale))| {
                Command::TlbiEl2Va {
                    asid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }),
            tlbi_args().prop_map(|(addr, leaf, ttl, tg, num, scale)| Command::TlbiEl2Vaa {
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale
            }),
            any::<u16>().prop_map(|vmid| Command::TlbiS12Vmall { vmid }),
            (any::<u16>(), tlbi_args()).prop_map(|(vmid, (addr, leaf, ttl, tg, num, scale))| {
                Command::TlbiS2Ipa {
                    vmid,
                    addr: addr & bits::mask(55, 12),
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                }
            }),
            Just(Command::TlbiNsnhAll),
            (
                any::<u32>(),
                any_ssid(),
                any::<bool>(),
                any::<u64>(),
                0u8..64
            )
                .prop_map(|(sid, ssid, global, addr, size)| Command::AtcInv {
                    sid,
                    ssid,
                    global,
                    addr: addr & !0xfff,
                    size
                }),
            (any::<u32>(), any_ssid(), 0u16..512, 0u8..3).prop_map(|(sid, ssid, grpid, resp)| {
                Command::PriResp {
                    sid,
                    ssid,
                    grpid,
                    resp,
                }
            }),
            (any::<u32>(), any::<u16>(), 0u8..4).prop_map(|(sid, stag, resp)| Command::Resume {
                sid,
                stag,
                resp
            }),
            any::<u32>().prop_map(|sid| Command::StallTerm { sid }),
            (0u8..3, 0u8..4, 0u8..16, any::<u32>(), any::<u64>()).prop_map(
                |(cs, msh, msiattr, msidata, msiaddr)| Command::Sync {
                    cs,
                    msh,
                    msiattr,
                    msidata,
                    msiaddr: msiaddr & bits::mask(55, 2)
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn encode_decode_round_trip(c in any_command()) {
            let raw = c.encode();
            prop_assert_eq!(raw[0] & 0xff, u64::from(c.opcode()));
            prop_assert_eq!(raw[0] & (1 << 10), 0, "SSec never set");
            prop_assert_eq!(Command::decode(raw), Ok(c));
        }

        #[test]
        fn decode_never_panics_and_reencodes_stably(d0: u64, d1: u64) {
            if let Ok(c) = Command::decode([d0, d1]) {
                // Re-encoding keeps every field the decoder understood.
                prop_assert_eq!(Command::decode(c.encode()), Ok(c));
                prop_assert_eq!(c.encode()[0] & 0xff, d0 & 0xff);
            }
        }
    }
}
