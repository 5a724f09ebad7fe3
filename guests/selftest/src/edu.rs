//! QEMU's `edu` educational PCI device (1234:11e8) as a DMA master.
//!
//! BAR0 (1 MiB) holds its registers; offsets below 0x80 take 32-bit accesses only, the DMA
//! registers at 0x80 and above 32- or 64-bit ones. A DMA copies between a bus address (which goes
//! through the SMMU, after `& dma_mask`: run QEMU with `-device edu,dma_mask=0xffffffffffffffff`)
//! and the device's 4 KiB buffer at device addresses 0x40000..0x41000. It completes 100 ms of
//! virtual time after it is started; the device never learns whether the SMMU faulted it, so
//! callers check the data and the SMMU's event queue.

use crate::arch::wait_until;
use crate::pci::{dsb_sy, read32, write32, write64};
use crate::report::{Msg, ensure};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
/// The device's DMA buffer, in its own address space.
pub const BUF: u64 = 0x4_0000;
pub const BUF_SIZE: u64 = 0x1000;

const ID: usize = 0x00;
const LIVENESS: usize = 0x04;
const DMA_SRC: usize = 0x80;
const DMA_DST: usize = 0x88;
const DMA_CNT: usize = 0x90;
const DMA_CMD: usize = 0x98;
const DMA_RUN: u32 = 1 << 0;
/// Direction: 0 = bus address -> device buffer, 1 = device buffer -> bus address.
const DMA_TO_BUS: u32 = 1 << 1;
/// How long one transfer may take: 100 ms of virtual time, with a generous margin.
const DMA_TIMEOUT_MS: u64 = 3000;

/// An `edu` whose BAR0 is mapped (Device memory) at `base`.
pub struct Edu {
    base: usize,
}

impl Edu {
    /// Checks the identification and liveness registers.
    pub fn new(base: usize) -> Result<Self, Msg> {
        let edu = Edu { base };
        let id = edu.read(ID);
        ensure!(
            id & 0xffff == 0x00ed,
            "edu ID register at {base:#x} reads {id:#x}"
        );
        edu.write(LIVENESS, 0x1234_5678);
        let live = edu.read(LIVENESS);
        ensure!(
            live == !0x1234_5678,
            "edu liveness register reads {live:#x}, want {:#x}",
            !0x1234_5678u32
        );
        Ok(edu)
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: a 32-bit register in the edu's BAR0 (Device memory in the boot map); reading
        // it has no memory side effects.
        unsafe { read32(self.base + off) }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: a 32-bit edu register; `run` is the only writer of DMA_CMD, so no transfer
        // starts from here.
        unsafe { write32(self.base + off, v) }
    }

    /// Runs one transfer and waits for it.
    fn run(&self, src: u64, dst: u64, len: u64, cmd: u32) -> Result<(), Msg> {
        ensure!(
            self.read(DMA_CMD) & DMA_RUN == 0,
            "edu DMA engine busy before a transfer"
        );
        // Buffers and tables written before this point are visible to the device.
        dsb_sy();
        // SAFETY: 64-bit DMA registers of the edu. The bus address is one the caller chose for
        // this check: its own memory, or an address outside its memory that the (hypervisor's)
        // SMMU must refuse.
        unsafe {
            write64(self.base + DMA_SRC, src);
            write64(self.base + DMA_DST, dst);
            write64(self.base + DMA_CNT, len);
            write32(self.base + DMA_CMD, cmd | DMA_RUN);
        }
        ensure!(
            wait_until(DMA_TIMEOUT_MS, || self.read(DMA_CMD) & DMA_RUN == 0),
            "edu DMA did not complete in {DMA_TIMEOUT_MS} ms"
        );
        // What the device wrote is read only after its completion was seen.
        dsb_sy();
        Ok(())
    }

    /// Copies `len` bytes from bus address `bus` into the device buffer at `buf_off`.
    pub fn bus_to_buf(&self, bus: u64, buf_off: u64, len: u64) -> Result<(), Msg> {
        ensure!(buf_off + len <= BUF_SIZE, "edu buffer overrun");
        self.run(bus, BUF + buf_off, len, 0)
    }

    /// Copies `len` bytes from the device buffer at `buf_off` to bus address `bus`.
    pub fn buf_to_bus(&self, buf_off: u64, bus: u64, len: u64) -> Result<(), Msg> {
        ensure!(buf_off + len <= BUF_SIZE, "edu buffer overrun");
        self.run(BUF + buf_off, bus, len, DMA_TO_BUS)
    }
}
