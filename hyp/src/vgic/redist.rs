//! The emulated GICv3 redistributors: per vCPU an RD_base and an SGI_base frame (64 KiB each,
//! [`GICR_STRIDE`] per vCPU), contiguous in vCPU order, registered as one device of
//! `nvcpus` × [`GICR_STRIDE`] bytes. Any vCPU of the VM may access any of the VM's frames (Linux
//! reads every GICR_TYPER to find its own); the frame decides whose interrupts change.
//!
//! RD_base (IHI0069 §12.10, "The GIC Redistributor register map"):
//!
//! | register | offset | emulation |
//! |---|---|---|
//! | GICR_CTLR | 0x0000 | RAZ/WI: no LPIs (EnableLPIs RES0), writes complete at once (RWP, UWP 0), DPG* 0 |
//! | GICR_IIDR | 0x0004 | as GICD_IIDR |
//! | GICR_TYPER | 0x0008 | 64-bit (or 32-bit halves): Affinity_Value \[63:32\] = the vCPU's Aff3.Aff2.Aff1.Aff0 (Aff0 = vCPU index), Processor_Number \[23:8\] = vCPU index, Last [4] on the final vCPU; PLPIS, VLPIS, DirectLPI, Dirty, DPGS, CommonLPIAff, PPInum = 0 |
//! | GICR_STATUSR | 0x0010 | RAZ/WI |
//! | GICR_WAKER | 0x0014 | ProcessorSleep [1] RW, reset 1; ChildrenAsleep [2] reads as ProcessorSleep (the handshake completes at once: Linux clears ProcessorSleep and polls until ChildrenAsleep reads 0); bits 0 and 31 RAZ/WI |
//! | GICR_PROPBASER, GICR_PENDBASER | 0x0070, 0x0078 | RAZ/WI (no LPIs) |
//! | GICR_PIDR2 | 0xFFE8 | ArchRev = 3; ID registers as the distributor's |
//!
//! SGI_base (at RD_base + 64 KiB), for the vCPU's SGIs 0–15 and PPIs 16–31:
//!
//! | register | offset | emulation |
//! |---|---|---|
//! | GICR_IGROUPR0 | 0x0080 | RAO/WI (Group 1) |
//! | GICR_IS/ICENABLER0, IS/ICPENDR0, IS/ICACTIVER0 | 0x0100–0x0380 | the vCPU's private interrupts |
//! | GICR_IPRIORITYR0–7 | 0x0400–0x041C | byte-accessible, top 5 bits kept |
//! | GICR_ICFGR0 | 0x0C00 | SGIs: 0xAAAA_AAAA, read-only (edge) |
//! | GICR_ICFGR1 | 0x0C04 | PPIs: Int_config[1] RW, reset 0 (level), except PPIs forwarded from hardware (the virtual timer, 27): read-only, level |
//! | GICR_IGRPMODR0, GICR_NSACR | 0x0D00, 0x0E00 | RAZ/WI |
//!
//! All other offsets read as zero and ignore writes. ProcessorSleep does not gate delivery: the
//! vCPU runs on its own physical CPU and a guest that never wakes its redistributor still gets
//! its interrupts. All SGIs and PPIs are purely virtual state of this VM except the configured
//! forwarded PPIs, whose physical side is only ever deactivated (see the module docs of
//! `vgic`); the maintenance PPI (25) and the other timer PPIs are ordinary virtual PPIs that
//! nothing raises.
//!
//! Access sizes: aligned 32-bit; bytes for IPRIORITYR; 64-bit for GICR_TYPER, PROPBASER,
//! PENDBASER and reserved space; anything else is an error (the guest gets an abort).

use core::sync::atomic::Ordering;

use alloc::sync::Arc;

use crate::trap::{MmioDevice, MmioError};

use super::dist::{IIDR, Width, bitmap_reg, check, id_reg, is_id_reg, read_part};
use super::state::Vgic;
use super::vcpu_affinity;

/// Size of one redistributor frame (RD_base or SGI_base).
pub const GICR_FRAME_SIZE: u64 = 0x1_0000;
/// Distance between two vCPUs' redistributors (RD_base + SGI_base).
pub const GICR_STRIDE: u64 = 2 * GICR_FRAME_SIZE;

mod rd {
    pub const CTLR: u64 = 0x0000;
    pub const IIDR: u64 = 0x0004;
    pub const TYPER: u64 = 0x0008;
    pub const WAKER: u64 = 0x0014;
}

mod sgi {
    pub const IPRIORITYR: u64 = 0x0400;
    pub const IPRIORITYR_END: u64 = 0x0420;
    pub const ICFGR0: u64 = 0x0C00;
    pub const ICFGR1: u64 = 0x0C04;
}

/// GICR_TYPER.Last.
pub const TYPER_LAST: u64 = 1 << 4;
/// GICR_WAKER.ProcessorSleep.
pub const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
/// GICR_WAKER.ChildrenAsleep.
pub const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

/// The emulated redistributors of one VM's vCPUs. Register them on the VM's bus with a
/// [`Redistributors::size`] window.
pub struct Redistributors {
    vgic: Arc<Vgic>,
}

impl Redistributors {
    /// The redistributors of `vgic`'s VM.
    pub fn new(vgic: Arc<Vgic>) -> Self {
        Redistributors { vgic }
    }

    /// Size of the whole region: `nvcpus` × [`GICR_STRIDE`].
    pub fn size(&self) -> u64 {
        self.vgic.nr_vcpus() as u64 * GICR_STRIDE
    }

    /// Which vCPU's redistributor, which frame (false = RD_base), and the offset in it.
    fn locate(&self, offset: u64) -> Result<(usize, bool, u64), MmioError> {
        let vcpu = (offset / GICR_STRIDE) as usize;
        if vcpu >= self.vgic.nr_vcpus() {
            return Err(MmioError::BadOffset { offset });
        }
        let in_stride = offset % GICR_STRIDE;
        Ok((
            vcpu,
            in_stride >= GICR_FRAME_SIZE,
            in_stride % GICR_FRAME_SIZE,
        ))
    }

    fn typer(&self, vcpu: usize) -> u64 {
        let last = if vcpu + 1 == self.vgic.nr_vcpus() {
            TYPER_LAST
        } else {
            0
        };
        (u64::from(vcpu_affinity(vcpu)) << 32) | ((vcpu as u64) << 8) | last
    }

    fn waker(&self, vcpu: usize) -> u32 {
        if self.vgic.vcpus[vcpu].asleep.load(Ordering::Acquire) {
            WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP
        } else {
            0
        }
    }

    fn rd_read(&self, vcpu: usize, off: u64, size: u8) -> Result<u64, MmioError> {
        Ok(match off {
            rd::TYPER..0x10 => {
                check(off, size, Width::W64)?;
                read_part(self.typer(vcpu), off & 7, size)
            }
            _ if is_id_reg(off) => {
                check(off, size, Width::W32)?;
                u64::from(id_reg(off))
            }
            rd::CTLR | rd::IIDR | 0x0010 | rd::WAKER => {
                check(off, size, Width::W32)?;
                u64::from(match off {
                    rd::IIDR => IIDR,
                    rd::WAKER => self.waker(vcpu),
                    // CTLR, STATUSR.
                    _ => 0,
                })
            }
            // PROPBASER, PENDBASER, reserved space.
            _ => {
                check(off, size, Width::W64)?;
                0
            }
        })
    }

    fn rd_write(&self, vcpu: usize, off: u64, size: u8, value: u64) -> Result<(), MmioError> {
        match off {
            rd::TYPER..0x10 => check(off, size, Width::W64),
            _ if is_id_reg(off) => check(off, size, Width::W32),
            rd::CTLR | rd::IIDR | 0x0010 | rd::WAKER => {
                check(off, size, Width::W32)?;
                if off == rd::WAKER {
                    let sleep = value as u32 & WAKER_PROCESSOR_SLEEP != 0;
                    self.vgic.vcpus[vcpu].asleep.store(sleep, Ordering::Release);
                }
                Ok(())
            }
            _ => check(off, size, Width::W64),
        }
    }

    fn sgi_read(&self, vcpu: usize, off: u64, size: u8) -> Result<u64, MmioError> {
        let vgic = &*self.vgic;
        if (sgi::IPRIORITYR..sgi::IPRIORITYR_END).contains(&off) {
            check(off, size, Width::Byte)?;
            let first = (off - sgi::IPRIORITYR) as u32;
            return Ok((0..u32::from(size)).fold(0, |acc, i| {
                acc | u64::from(vgic.priority_read(vcpu, first + i)) << (8 * i)
            }));
        }
        if off >= 0x1000 && !is_id_reg(off) {
            check(off, size, Width::W64)?;
            return Ok(0);
        }
        check(off, size, Width::W32)?;
        Ok(u64::from(match off {
            // Only register 0 of each bitmap bank exists in SGI_base.
            _ if bitmap_reg(off).is_some_and(|(_, n)| n == 0) => {
                let (reg, _) = bitmap_reg(off).expect("checked");
                vgic.private_bits_read(vcpu, reg)
            }
            sgi::ICFGR0 | sgi::ICFGR1 => {
                let first = ((off - sgi::ICFGR0) * 4) as u32;
                (0..16)
                    .filter(|&k| vgic.edge_read(vcpu, first + k))
                    .fold(0, |acc, k| acc | (2 << (2 * k)))
            }
            _ => 0,
        }))
    }

    fn sgi_write(&self, vcpu: usize, off: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let vgic = &*self.vgic;
        if (sgi::IPRIORITYR..sgi::IPRIORITYR_END).contains(&off) {
            check(off, size, Width::Byte)?;
            let first = (off - sgi::IPRIORITYR) as u32;
            for i in 0..u32::from(size) {
                vgic.priority_write(vcpu, first + i, (value >> (8 * i)) as u8);
            }
            return Ok(());
        }
        if off >= 0x1000 && !is_id_reg(off) {
            return check(off, size, Width::W64);
        }
        check(off, size, Width::W32)?;
        let value = value as u32;
        match off {
            _ if bitmap_reg(off).is_some_and(|(_, n)| n == 0) => {
                let (reg, _) = bitmap_reg(off).expect("checked");
                vgic.private_bits_write(vcpu, reg, value);
            }
            sgi::ICFGR0 | sgi::ICFGR1 => {
                let first = ((off - sgi::ICFGR0) * 4) as u32;
                for k in 0..16 {
                    vgic.edge_write(vcpu, first + k, value & (2 << (2 * k)) != 0);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reports a bad offset relative to the whole region, as the bus expects.
fn whole_region(e: MmioError, offset: u64) -> MmioError {
    match e {
        MmioError::BadOffset { .. } => MmioError::BadOffset { offset },
        e => e,
    }
}

impl MmioDevice for Redistributors {
    fn name(&self) -> &str {
        "vgic-redist"
    }

    fn read(&self, _vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
        let (target, sgi_frame, off) = self.locate(offset)?;
        if sgi_frame {
            self.sgi_read(target, off, size)
        } else {
            self.rd_read(target, off, size)
        }
        .map_err(|e| whole_region(e, offset))
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let (target, sgi_frame, off) = self.locate(offset)?;
        if sgi_frame {
            self.sgi_write(target, off, size, value)
        } else {
            self.rd_write(target, off, size, value)
        }
        .map_err(|e| whole_region(e, offset))
    }
}
