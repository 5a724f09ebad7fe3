//! The ID registers a VM's emulated SMMU reports: the physical SMMU's, with everything the
//! emulation does not offer masked out.
//!
//! | register | what the guest sees |
//! |---|---|
//! | IDR0 | S1P, TTF = AArch64, ST_LVL = 2-level, STALL_MODEL = 0b01 (no stall); COHACC, ASID16, TTENDIAN, TERM_MODEL as the hardware. S2P, HYP, ATS, NS1ATS, PRI, MSI, SEV, BTM, HTTU, ATOS, VATOS, VMW, VMID16, CD2L, DORMHINT, ATSRECERR: 0 |
//! | IDR1 | SIDSIZE as the hardware (at least what covers the VM's StreamIDs), SSIDSIZE = 0, CMDQS / EVENTQS as the hardware (at most 19), PRIQS = 0; ATTR_*_OVR, REL, *_PRESET, ECMDQ: 0 |
//! | IDR2, IDR4 | 0 (no VATOS; IDR4 is IMPLEMENTATION DEFINED) |
//! | IDR3 | HAD, PBHA, STT, RIL, BBML, E0PD, PTWNNC as the hardware (they describe stage-1 walks and TLBI forms, which the hardware does for the guest); XNX, FWB, DPT (stage 2), PPS (PRI), MPAM: 0 |
//! | IDR5 | GRAN4K/16K/64K and VAX as the hardware; OAS = the VM's IPA size (the guest's "physical" addresses are IPAs), rounded down to an encodable size and at most the hardware's; STALL_MAX = 0 |
//! | IIDR, AIDR | as the hardware |

use tock_registers::LocalRegisterCopy;
use tock_registers::fields::FieldValue;

use crate::smmu::v3::regs::{IDR0, IDR1, IDR3, IDR5, addr_size_bits};

/// Largest CMDQS / EVENTQS the architecture allows.
const MAX_QUEUE_LOG2: u32 = 19;

/// The identification registers of one emulated SMMU and the limits derived from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IdRegs {
    /// IDR0..IDR5 as the guest reads them.
    pub idr: [u32; 6],
    pub iidr: u32,
    pub aidr: u32,
    /// IDR1.SIDSIZE.
    pub sidsize: u32,
    /// IDR1.CMDQS.
    pub cmdqs: u32,
    /// IDR1.EVENTQS.
    pub eventqs: u32,
    /// IDR5.OAS in bits.
    pub oas_bits: u32,
    /// IDR3.RIL: range invalidation (forwarded TLBIs keep their range fields only then).
    pub ril: bool,
    /// IDR0.ASID16: 16-bit ASIDs (else forwarded ASIDs are cut to 8 bits).
    pub asid16: bool,
    /// The *physical* SMMU can stall faulting transactions, and lets an STE turn that off
    /// (IDR0.STALL_MODEL = 0b00): nested STEs then get S1STALLD = 1.
    pub phys_stall: bool,
}

/// Copies `field` of `hw` into the value being built.
fn keep<R: tock_registers::RegisterLongName>(
    hw: LocalRegisterCopy<u32, R>,
    field: tock_registers::fields::Field<u32, R>,
) -> FieldValue<u32, R> {
    field.val(hw.read(field))
}

impl IdRegs {
    /// The guest's ID registers, derived from the physical `idr`, `iidr` and `aidr`, for a VM
    /// whose stage 2 translates `ipa_bits` of IPA and whose highest StreamID is `max_sid`.
    pub(super) fn derive(
        idr: [u32; 6],
        iidr: u32,
        aidr: u32,
        ipa_bits: u32,
        max_sid: Option<u32>,
    ) -> IdRegs {
        let hw0 = LocalRegisterCopy::<u32, IDR0::Register>::new(idr[0]);
        let idr0 = IDR0::S1P::SET
            + IDR0::TTF::AArch64
            + IDR0::ST_LVL::TwoLevel
            + IDR0::STALL_MODEL::TerminateOnly
            + keep(hw0, IDR0::COHACC)
            + keep(hw0, IDR0::ASID16)
            + keep(hw0, IDR0::TTENDIAN)
            + keep(hw0, IDR0::TERM_MODEL);

        let hw1 = LocalRegisterCopy::<u32, IDR1::Register>::new(idr[1]);
        // Enough StreamID bits for the VM's highest StreamID (the hardware's SIDSIZE always is,
        // since the VM's StreamIDs are physical ones).
        let needed = max_sid.map_or(0, |s| u32::BITS - s.leading_zeros());
        let sidsize = hw1.read(IDR1::SIDSIZE).max(needed).min(32);
        let cmdqs = hw1.read(IDR1::CMDQS).min(MAX_QUEUE_LOG2);
        let eventqs = hw1.read(IDR1::EVENTQS).min(MAX_QUEUE_LOG2);
        let idr1 = IDR1::SIDSIZE.val(sidsize) + IDR1::CMDQS.val(cmdqs) + IDR1::EVENTQS.val(eventqs);

        let hw3 = LocalRegisterCopy::<u32, IDR3::Register>::new(idr[3]);
        let idr3 = keep(hw3, IDR3::HAD)
            + keep(hw3, IDR3::PBHA)
            + keep(hw3, IDR3::STT)
            + keep(hw3, IDR3::RIL)
            + keep(hw3, IDR3::BBML)
            + keep(hw3, IDR3::E0PD)
            + keep(hw3, IDR3::PTWNNC);

        let hw5 = LocalRegisterCopy::<u32, IDR5::Register>::new(idr[5]);
        let hw_oas = addr_size_bits(hw5.read(IDR5::OAS));
        let limit = hw_oas.min(ipa_bits);
        // Largest encodable size not above the limit (32 bits at least).
        let oas_code = (0..=6u32)
            .rev()
            .find(|&c| addr_size_bits(c) <= limit)
            .unwrap_or(0);
        let idr5 = IDR5::OAS.val(oas_code)
            + keep(hw5, IDR5::GRAN4K)
            + keep(hw5, IDR5::GRAN16K)
            + keep(hw5, IDR5::GRAN64K)
            + keep(hw5, IDR5::VAX);

        IdRegs {
            idr: [idr0.value, idr1.value, 0, idr3.value, 0, idr5.value],
            iidr,
            aidr,
            sidsize,
            cmdqs,
            eventqs,
            oas_bits: addr_size_bits(oas_code),
            ril: hw3.is_set(IDR3::RIL),
            asid16: hw0.is_set(IDR0::ASID16),
            phys_stall: hw0.read(IDR0::STALL_MODEL) == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 10 virt's nested SMMUv3 (shared/reference/qemu-virt.md §1).
    const QEMU_IDR: [u32; 6] = [0x0d44_101b, 0x0273_0010, 0, 0x1414, 0, 0x74];

    #[test]
    fn qemu_ids_masked() {
        let ids = IdRegs::derive(QEMU_IDR, 0x43b, 1, 44, Some(8));
        let idr0 = LocalRegisterCopy::<u32, IDR0::Register>::new(ids.idr[0]);
        assert!(!idr0.is_set(IDR0::S2P), "no stage 2 for the guest");
        assert!(idr0.is_set(IDR0::S1P));
        assert_eq!(idr0.read(IDR0::TTF), 2);
        assert!(idr0.is_set(IDR0::COHACC) && idr0.is_set(IDR0::ASID16));
        assert!(!idr0.is_set(IDR0::VMID16));
        assert_eq!(idr0.read(IDR0::STALL_MODEL), 1);
        assert_eq!(idr0.read(IDR0::ST_LVL), 1);
        assert_eq!(idr0.read(IDR0::TTENDIAN), 2);
        assert!(idr0.is_set(IDR0::TERM_MODEL));
        // QEMU's IDR0 minus S2P and VMID16.
        assert_eq!(ids.idr[0], 0x0d44_101b & !(1 | (1 << 18)));
        assert_eq!(ids.idr[1], 0x0273_0010, "SIDSIZE 16, queues 2^19");
        assert_eq!(ids.idr[3], 0x1414 & !(1 << 4), "XNX is a stage-2 feature");
        assert_eq!(ids.idr[5], 0x74);
        assert_eq!((ids.iidr, ids.aidr), (0x43b, 1));
        assert_eq!(ids.oas_bits, 44);
        assert!(ids.ril);
        assert_eq!((ids.sidsize, ids.cmdqs, ids.eventqs), (16, 19, 19));
    }

    #[test]
    fn everything_we_do_not_offer_is_masked() {
        let ids = IdRegs::derive([u32::MAX; 6], u32::MAX, u32::MAX, 40, None);
        let idr0 = LocalRegisterCopy::<u32, IDR0::Register>::new(ids.idr[0]);
        for f in [
            IDR0::S2P,
            IDR0::BTM,
            IDR0::DORMHINT,
            IDR0::HYP,
            IDR0::ATS,
            IDR0::NS1ATS,
            IDR0::MSI,
            IDR0::SEV,
            IDR0::ATOS,
            IDR0::PRI,
            IDR0::VMW,
            IDR0::VMID16,
            IDR0::CD2L,
            IDR0::VATOS,
            IDR0::ATSRECERR,
        ] {
            assert!(!idr0.is_set(f), "{:#x}", f.mask << f.shift);
        }
        assert_eq!(idr0.read(IDR0::HTTU), 0);
        assert_eq!(idr0.read(IDR0::TTF), 2, "AArch64 tables only");
        assert_eq!(idr0.read(IDR0::STALL_MODEL), 1);
        assert_eq!(ids.idr[0] >> 29, 0, "reserved and RME bits");
        let idr1 = LocalRegisterCopy::<u32, IDR1::Register>::new(ids.idr[1]);
        assert_eq!(idr1.read(IDR1::SSIDSIZE), 0);
        assert_eq!(idr1.read(IDR1::PRIQS), 0);
        assert_eq!(idr1.read(IDR1::CMDQS), 19);
        assert_eq!(idr1.read(IDR1::EVENTQS), 19);
        assert_eq!(idr1.read(IDR1::SIDSIZE), 32);
        assert_eq!(ids.idr[1] >> 26, 0, "ATTR_*_OVR, REL, presets, ECMDQ");
        assert_eq!((ids.idr[2], ids.idr[4]), (0, 0));
        let idr3 = LocalRegisterCopy::<u32, IDR3::Register>::new(ids.idr[3]);
        for f in [IDR3::XNX, IDR3::PPS, IDR3::MPAM, IDR3::FWB, IDR3::DPT] {
            assert!(!idr3.is_set(f));
        }
        let idr5 = LocalRegisterCopy::<u32, IDR5::Register>::new(ids.idr[5]);
        assert_eq!(idr5.read(IDR5::STALL_MAX), 0);
        assert_eq!(
            addr_size_bits(idr5.read(IDR5::OAS)),
            40,
            "the VM's IPA size"
        );
        assert_eq!(ids.oas_bits, 40);
    }

    #[test]
    fn oas_and_sidsize_limits() {
        // A 39-bit IPA space is reported as the next smaller encodable size.
        let ids = IdRegs::derive(QEMU_IDR, 0, 0, 39, None);
        assert_eq!(ids.oas_bits, 36);
        // The hardware's OAS caps it.
        let ids = IdRegs::derive(QEMU_IDR, 0, 0, 48, None);
        assert_eq!(ids.oas_bits, 44);
        // SIDSIZE covers the VM's StreamIDs even if the hardware claimed fewer bits.
        let mut idr = QEMU_IDR;
        idr[1] &= !0x3f;
        idr[1] |= 4;
        assert_eq!(IdRegs::derive(idr, 0, 0, 44, Some(0x10)).sidsize, 5);
        assert_eq!(IdRegs::derive(idr, 0, 0, 44, Some(0xf)).sidsize, 4);
    }
}
