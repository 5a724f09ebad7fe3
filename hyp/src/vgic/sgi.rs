//! Software-generated interrupts: decoding a trapped write of ICC_SGI1R_EL1.
//!
//! With HCR_EL2.IMO = 1 every EL1 write of ICC_SGI1R_EL1 traps to EL2 (ESR_EL2.EC = 0x18,
//! op0 = 3, op1 = 0, CRn = 12, CRm = 11, op2 = 5); the arch layer passes the written value to
//! [`Vgic::write_sgi1r`]. Layout (IHI0069, ICC_SGI1R_EL1):
//!
//! | bits | field |
//! |---|---|
//! | 55:48 | Aff3 |
//! | 47:44 | RS: the target list covers Aff0 = 16·RS .. 16·RS + 15 |
//! | 40 | IRM: 1 = every PE but the sender, 0 = the target list |
//! | 39:32 | Aff2 |
//! | 27:24 | INTID (SGI 0–15) |
//! | 23:16 | Aff1 |
//! | 15:0 | TargetList: bit n targets Aff0 = 16·RS + n |
//!
//! Targets are looked up among this VM's vCPUs only (vCPU i has affinity 0.0.0.i): an affinity
//! that is not one of them is ignored, and IRM = 1 means every *other vCPU of this VM*. So a
//! guest cannot reach any other VM's vCPU or a physical CPU with an SGI. In affinity-routing
//! mode SGIs carry no source: an SGI already pending on a target stays one pending SGI.
//!
//! ICC_SGI0R_EL1 (Group 0) and ICC_ASGI1R_EL1 (the other Security state's Group 1) trap too; the
//! VM has neither Group 0 nor a second Security state, so the arch layer ignores those writes.

use super::state::Vgic;
use super::{VcpuSet, vcpu_of_affinity};

/// A decoded ICC_SGI1R_EL1 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sgi1r {
    /// SGI number, 0–15.
    pub intid: u32,
    /// Bit n: Aff0 = 16·`rs` + n.
    pub target_list: u16,
    pub aff1: u8,
    pub aff2: u8,
    pub aff3: u8,
    /// Range selector.
    pub rs: u8,
    /// Interrupt routing mode: every PE but the sender.
    pub irm: bool,
}

impl Sgi1r {
    /// Decodes an ICC_SGI1R_EL1 value (RES0 bits are ignored).
    pub fn decode(value: u64) -> Self {
        Sgi1r {
            intid: ((value >> 24) & 0xf) as u32,
            target_list: value as u16,
            aff1: (value >> 16) as u8,
            aff2: (value >> 32) as u8,
            aff3: (value >> 48) as u8,
            rs: ((value >> 44) & 0xf) as u8,
            irm: value & (1 << 40) != 0,
        }
    }

    /// The ICC_SGI1R_EL1 value.
    pub fn encode(&self) -> u64 {
        u64::from(self.target_list)
            | (u64::from(self.aff1) << 16)
            | (u64::from(self.intid & 0xf) << 24)
            | (u64::from(self.aff2) << 32)
            | (u64::from(self.irm) << 40)
            | (u64::from(self.rs & 0xf) << 44)
            | (u64::from(self.aff3) << 48)
    }

    /// The vCPUs of a VM with `nvcpus` vCPUs this SGI goes to when `sender` writes it.
    pub fn targets(&self, sender: usize, nvcpus: usize) -> VcpuSet {
        let mut set = VcpuSet::new();
        if self.irm {
            (0..nvcpus)
                .filter(|&v| v != sender)
                .for_each(|v| set.insert(v));
            return set;
        }
        let base = (u32::from(self.aff3) << 24) | (u32::from(self.aff2) << 16);
        let base = base | (u32::from(self.aff1) << 8);
        for bit in (0..16).filter(|&b| self.target_list & (1 << b) != 0) {
            let aff0 = u32::from(self.rs) * 16 + bit;
            if let Some(v) = vcpu_of_affinity(base | aff0, nvcpus) {
                set.insert(v);
            }
        }
        set
    }
}

impl Vgic {
    /// Emulates vCPU `sender`'s write of `value` to ICC_SGI1R_EL1: makes the SGI pending on
    /// each target vCPU of this VM (kicking those that have it enabled). Returns the targets.
    ///
    /// # Panics
    ///
    /// If `sender` is not a vCPU of this VM.
    pub fn write_sgi1r(&self, sender: usize, value: u64) -> VcpuSet {
        assert!(sender < self.nr_vcpus(), "vCPU {sender} is not in this VM");
        let sgi = Sgi1r::decode(value);
        let targets = sgi.targets(sender, self.nr_vcpus());
        for v in targets.iter() {
            // Cannot fail: v is a vCPU of this VM and the INTID is 0..16.
            let _ = self.inject(v, sgi.intid);
        }
        targets
    }
}
