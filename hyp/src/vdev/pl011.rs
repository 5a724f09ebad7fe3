//! An emulated Arm PL011 UART: one per VM, as the guest's console.
//!
//! The guest only transmits. Bytes written to `UARTDR` are collected into lines, and each complete
//! line goes to a [`ConsoleSink`] (the arch layer's physical UART) prefixed with the VM's name, so
//! the output of several VMs stays readable on one serial port. The transmitter is infinitely
//! fast: `UARTFR` always says "TX FIFO empty, RX FIFO empty, not busy", so polled drivers never
//! wait, and no interrupt is ever raised. Writes are accepted whether or not the guest enabled
//! the UART in `UARTCR` (early consoles often skip that).
//!
//! The control registers a driver programs (baud divisors, line control, FIFO levels, interrupt
//! mask) are stored and read back, and the PrimeCell ID registers carry the PL011's values, so
//! Linux's AMBA bus can probe it. Register map: Arm PrimeCell UART (PL011) Technical Reference
//! Manual (DDI 0183), chapter 3.
//!
//! Locking: the line buffer and the registers sit behind one `spin::Mutex`. The console is not a
//! hot path, and the lock is also what keeps the lines of one VM in order when several vCPUs
//! print. The sink is called with the lock held; it must not access this device.

use core::fmt::Write as _;

use alloc::format;
use alloc::string::String;

use spin::Mutex;

use crate::trap::{MmioDevice, MmioError};

/// Size of the PL011's register window.
pub const PL011_MMIO_SIZE: u64 = 0x1000;

/// Where finished console lines go.
pub trait ConsoleSink: Send + Sync {
    /// Outputs one line: `"[vm0] text"`, without a trailing newline.
    fn write_line(&self, line: &str);
}

/// Register offsets (PL011 TRM, table 3-1).
mod reg {
    pub const DR: u64 = 0x000;
    pub const RSR_ECR: u64 = 0x004;
    pub const FR: u64 = 0x018;
    pub const ILPR: u64 = 0x020;
    pub const IBRD: u64 = 0x024;
    pub const FBRD: u64 = 0x028;
    pub const LCR_H: u64 = 0x02c;
    pub const CR: u64 = 0x030;
    pub const IFLS: u64 = 0x034;
    pub const IMSC: u64 = 0x038;
    pub const RIS: u64 = 0x03c;
    pub const MIS: u64 = 0x040;
    pub const ICR: u64 = 0x044;
    pub const DMACR: u64 = 0x048;
    /// UARTPeriphID0..3 then UARTPCellID0..3, one byte per 32-bit register.
    pub const ID_BASE: u64 = 0xfe0;
}

/// `UARTFR`: transmit FIFO empty (bit 7) and receive FIFO empty (bit 4); BUSY (bit 3) clear.
const FR_TXFE_RXFE: u32 = (1 << 7) | (1 << 4);

/// UARTPeriphID0..3 and UARTPCellID0..3. Part number 0x011, designer 0x41 (Arm), revision 1
/// (r1p0, the value QEMU's PL011 presents, so guests see what they are tested against; r1p5
/// would be 0x34 in PeriphID2, which Linux reads as a 32-byte FIFO), then the PrimeCell ID
/// 0xB105F00D.
const ID_REGS: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// Lines are cut after this many characters even without a newline, so a guest that never sends
/// one cannot grow the buffer.
const MAX_LINE: usize = 200;
/// Longest rendering of one byte (`\xNN`).
const MAX_BYTE_RENDER: usize = 4;

/// The registers that hold what the guest wrote, with their reset values.
struct Regs {
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    dmacr: u32,
}

impl Regs {
    const RESET: Regs = Regs {
        ilpr: 0,
        ibrd: 0,
        fbrd: 0,
        lcr_h: 0,
        // TXE and RXE are set at reset; UARTEN is not.
        cr: 0x0300,
        // Both FIFO levels at 1/2.
        ifls: 0x12,
        imsc: 0,
        dmacr: 0,
    };

    /// The stored register at `offset` and its implemented bits, if it is one of them.
    fn stored(&mut self, offset: u64) -> Option<(&mut u32, u32)> {
        Some(match offset {
            reg::ILPR => (&mut self.ilpr, 0xff),
            reg::IBRD => (&mut self.ibrd, 0xffff),
            reg::FBRD => (&mut self.fbrd, 0x3f),
            reg::LCR_H => (&mut self.lcr_h, 0xff),
            reg::CR => (&mut self.cr, 0xffff),
            reg::IFLS => (&mut self.ifls, 0x3f),
            reg::IMSC => (&mut self.imsc, 0x7ff),
            reg::DMACR => (&mut self.dmacr, 0x7),
            _ => return None,
        })
    }
}

struct State {
    /// The VM prefix followed by the current partial line. Its capacity is reserved up front, so
    /// the trap path never allocates.
    line: String,
    regs: Regs,
}

/// An emulated PL011 for one VM. Register it on the VM's bus with a [`PL011_MMIO_SIZE`] window.
pub struct VirtPl011 {
    /// Length of the `"[vmname] "` prefix at the start of `State::line`.
    prefix_len: usize,
    sink: &'static dyn ConsoleSink,
    state: Mutex<State>,
}

impl VirtPl011 {
    /// A PL011 whose lines go to `sink` as `"[<vm_name>] text"`.
    pub fn new(vm_name: &str, sink: &'static dyn ConsoleSink) -> Self {
        let mut line = String::with_capacity(vm_name.len() + 3 + MAX_LINE + MAX_BYTE_RENDER);
        line.push_str(&format!("[{vm_name}] "));
        VirtPl011 {
            prefix_len: line.len(),
            sink,
            state: Mutex::new(State {
                line,
                regs: Regs::RESET,
            }),
        }
    }

    /// Emits the pending partial line, if any (when the VM stops, so its last words are seen).
    pub fn flush(&self) {
        let mut state = self.state.lock();
        if state.line.len() > self.prefix_len {
            self.emit(&mut state);
        }
    }

    fn emit(&self, state: &mut State) {
        self.sink.write_line(&state.line);
        state.line.truncate(self.prefix_len);
    }

    /// Adds one transmitted byte to the line.
    fn transmit(&self, state: &mut State, byte: u8) {
        match byte {
            b'\n' => return self.emit(state),
            b'\r' => return,
            b'\t' | 0x20..=0x7e => state.line.push(char::from(byte)),
            // Writing to a String cannot fail.
            _ => {
                let _ = write!(state.line, "\\x{byte:02x}");
            }
        }
        if state.line.len() - self.prefix_len >= MAX_LINE {
            self.emit(state);
        }
    }
}

/// Checks an access: up to 32 bits, within one 32-bit register. Returns the register's offset
/// and the bit position of the access in it.
fn locate(offset: u64, size: u8) -> Result<(u64, u32), MmioError> {
    if !matches!(size, 1 | 2 | 4) {
        return Err(MmioError::BadSize { size });
    }
    let lane = offset & 3;
    if lane + u64::from(size) > 4 || offset >= PL011_MMIO_SIZE {
        return Err(MmioError::BadOffset { offset });
    }
    // `lane` is at most 3.
    Ok((offset - lane, lane as u32 * 8))
}

/// All-ones in the low `size` bytes (size 1, 2 or 4).
fn lane_mask(size: u8) -> u32 {
    u32::MAX >> (32 - u32::from(size) * 8)
}

impl MmioDevice for VirtPl011 {
    fn name(&self) -> &str {
        "pl011"
    }

    fn read(&self, _vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
        let (reg_offset, shift) = locate(offset, size)?;
        let value = match reg_offset {
            reg::FR => FR_TXFE_RXFE,
            reg::ID_BASE.. => {
                // `reg_offset` is below PL011_MMIO_SIZE, so the index is 0..8.
                u32::from(ID_REGS[((reg_offset - reg::ID_BASE) / 4) as usize])
            }
            // Nothing received, no receive errors, no interrupts; ICR is write-only.
            reg::DR | reg::RSR_ECR | reg::RIS | reg::MIS | reg::ICR => 0,
            // The stored registers; unknown offsets read as zero.
            _ => {
                let mut state = self.state.lock();
                state.regs.stored(reg_offset).map_or(0, |(r, _)| *r)
            }
        };
        Ok(u64::from((value >> shift) & lane_mask(size)))
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let (reg_offset, shift) = locate(offset, size)?;
        let mut state = self.state.lock();
        match reg_offset {
            // The data byte is lane 0; a write that does not cover it carries no character.
            reg::DR => {
                if shift == 0 {
                    self.transmit(&mut state, value as u8);
                }
            }
            // Clearing receive errors or interrupts: there are none.
            reg::RSR_ECR | reg::ICR => {}
            _ => {
                // The stored registers; FR, RIS/MIS, the ID registers and unknown offsets are
                // read-only or absent and ignore writes.
                if let Some((r, implemented)) = state.regs.stored(reg_offset) {
                    let mask = (lane_mask(size) << shift) & implemented;
                    *r = (*r & !mask) | (((value as u32) << shift) & mask);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Capture(StdMutex<Vec<String>>);

    impl ConsoleSink for Capture {
        fn write_line(&self, line: &str) {
            self.0.lock().unwrap().push(line.into());
        }
    }

    fn uart(name: &str) -> (VirtPl011, &'static Capture) {
        let sink: &'static Capture = Box::leak(Box::default());
        (VirtPl011::new(name, sink), sink)
    }

    fn put(u: &VirtPl011, s: &[u8]) {
        for &b in s {
            u.write(0, reg::DR, 1, u64::from(b)).unwrap();
        }
    }

    fn lines(sink: &Capture) -> Vec<String> {
        sink.0.lock().unwrap().clone()
    }

    #[test]
    fn hello_line() {
        let (u, sink) = uart("vm0");
        put(&u, b"hello\n");
        assert_eq!(lines(sink), ["[vm0] hello"]);
        // 32-bit stores work too; the upper bits of DR are ignored.
        u.write(1, reg::DR, 4, 0xf00 | u64::from(b'x')).unwrap();
        u.write(1, reg::DR, 2, u64::from(b'\n')).unwrap();
        assert_eq!(lines(sink), ["[vm0] hello", "[vm0] x"]);
    }

    #[test]
    fn escapes_cr_and_flush() {
        let (u, sink) = uart("linux");
        put(&u, b"a\tb\r\n\x1b[0m\xff");
        assert_eq!(lines(sink), ["[linux] a\tb"]);
        u.flush();
        assert_eq!(lines(sink), ["[linux] a\tb", "[linux] \\x1b[0m\\xff"]);
        // Nothing pending: flush emits nothing, but an empty line is a line.
        u.flush();
        put(&u, b"\n");
        assert_eq!(lines(sink).len(), 3);
        assert_eq!(lines(sink)[2], "[linux] ");
    }

    #[test]
    fn long_lines_are_cut() {
        let (u, sink) = uart("vm1");
        put(&u, &[b'z'; 450]);
        let got = lines(sink);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], format!("[vm1] {}", "z".repeat(200)));
        u.flush();
        assert_eq!(lines(sink)[2], format!("[vm1] {}", "z".repeat(50)));
        // Escapes count by their rendered length: 50 of them (200 chars) make a line.
        put(&u, &[0x01; 50]);
        assert_eq!(lines(sink).len(), 4);
    }

    #[test]
    fn flag_and_id_registers() {
        let (u, _) = uart("vm0");
        assert_eq!(u.read(0, reg::FR, 4), Ok(0x90));
        assert_eq!(u.read(0, reg::FR, 1), Ok(0x90));
        assert_eq!(u.read(0, reg::DR, 4), Ok(0));
        let ids: Vec<u64> = (0..8)
            .map(|i| u.read(0, 0xfe0 + 4 * i, 4).unwrap())
            .collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        // Writes to read-only registers change nothing.
        u.write(0, 0xfe0, 4, 0).unwrap();
        u.write(0, reg::FR, 4, 0).unwrap();
        assert_eq!(u.read(0, 0xfe0, 4), Ok(0x11));
        assert_eq!(u.read(0, reg::FR, 4), Ok(0x90));
        assert_eq!(u.read(0, reg::RIS, 4), Ok(0));
        assert_eq!(u.read(0, reg::MIS, 4), Ok(0));
        assert_eq!(u.read(0, reg::RSR_ECR, 4), Ok(0));
        assert_eq!(u.read(0, 0x800, 4), Ok(0));
        u.write(0, reg::ICR, 4, 0x7ff).unwrap();
        u.write(0, 0x800, 4, 0x1234).unwrap();
    }

    #[test]
    fn control_registers_read_back() {
        let (u, _) = uart("vm0");
        assert_eq!(u.read(0, reg::CR, 4), Ok(0x300));
        assert_eq!(u.read(0, reg::IFLS, 4), Ok(0x12));
        for (offset, value, expect) in [
            (reg::IBRD, 0x1_0027, 0x27),
            (reg::FBRD, 0xff, 0x3f),
            (reg::LCR_H, 0x70, 0x70),
            (reg::CR, 0x301, 0x301),
            (reg::IFLS, 0x2d, 0x2d),
            (reg::IMSC, 0xffff_ffff, 0x7ff),
            (reg::ILPR, 0x5, 0x5),
            (reg::DMACR, 0x3, 0x3),
        ] {
            u.write(0, offset, 4, value).unwrap();
            assert_eq!(u.read(0, offset, 4), Ok(expect), "{offset:#x}");
        }
        // A 16-bit and an 8-bit access to the upper byte of CR.
        u.write(0, reg::CR, 2, 0x0b01).unwrap();
        assert_eq!(u.read(0, reg::CR, 4), Ok(0xb01));
        u.write(0, reg::CR + 1, 1, 0x03).unwrap();
        assert_eq!(u.read(0, reg::CR, 4), Ok(0x301));
        assert_eq!(u.read(0, reg::CR + 1, 1), Ok(0x03));
        assert_eq!(u.read(0, reg::CR, 2), Ok(0x301));
    }

    #[test]
    fn bad_accesses() {
        let (u, sink) = uart("vm0");
        assert_eq!(u.read(0, reg::DR, 8), Err(MmioError::BadSize { size: 8 }));
        assert_eq!(
            u.write(0, reg::DR, 8, 0x41),
            Err(MmioError::BadSize { size: 8 })
        );
        assert_eq!(u.read(0, 0x2, 4), Err(MmioError::BadOffset { offset: 2 }));
        assert_eq!(
            u.read(0, 0x1000, 4),
            Err(MmioError::BadOffset { offset: 0x1000 })
        );
        // A byte store to DR + 1 carries no character.
        u.write(0, reg::DR + 1, 1, u64::from(b'A')).unwrap();
        u.flush();
        assert!(lines(sink).is_empty());
        assert_eq!(u.name(), "pl011");
    }

    #[test]
    fn through_the_bus() {
        use crate::trap::{MmioAccess, MmioBus};
        use alloc::sync::Arc;

        let sink: &'static Capture = Box::leak(Box::default());
        let mut bus = MmioBus::new();
        bus.register(
            0x0900_0000,
            PL011_MMIO_SIZE,
            Arc::new(VirtPl011::new("vm2", sink)),
        )
        .unwrap();
        let strb = MmioAccess {
            size: 1,
            reg: 1,
            sign_extend: false,
            sf: false,
            write: true,
        };
        for b in b"ok\n" {
            bus.dispatch(0, 0x0900_0000, &strb, u64::from(*b)).unwrap();
        }
        assert_eq!(lines(sink), ["[vm2] ok"]);
        let ldr = MmioAccess {
            size: 4,
            write: false,
            ..strb
        };
        assert_eq!(bus.dispatch(0, 0x0900_0018, &ldr, 0), Ok(Some(0x90)));
        let ldr_x = MmioAccess {
            size: 8,
            sf: true,
            ..ldr
        };
        assert_eq!(
            bus.dispatch(0, 0x0900_0018, &ldr_x, 0),
            Err(MmioError::BadSize { size: 8 })
        );
    }
}
