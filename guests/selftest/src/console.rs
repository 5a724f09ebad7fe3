//! Output through the PL011 at IPA 0x0900_0000 (emulated by the hypervisor).
//!
//! Only vCPU 0 prints in normal operation, so there is no lock; a secondary
//! prints only when something has already gone wrong (exception, panic).

use core::fmt;

use crate::arch::{mmio_read32, mmio_write32};

/// Base address of the PL011.
pub const UART_BASE: usize = 0x0900_0000;
/// Data register.
const UARTDR: usize = 0x000;
/// Flag register.
pub const UARTFR: usize = 0x018;
/// UARTFR.TXFF: transmit FIFO full.
const FR_TXFF: u32 = 1 << 5;

/// Writes one byte, waiting while the transmit FIFO is full.
pub fn putc(b: u8) {
    // SAFETY: the PL011 registers are device registers that nothing else in
    // this guest maps as memory; reading UARTFR and writing UARTDR has no
    // effect on memory.
    unsafe {
        while mmio_read32(UART_BASE + UARTFR) & FR_TXFF != 0 {
            core::hint::spin_loop();
        }
        mmio_write32(UART_BASE + UARTDR, u32::from(b));
    }
}

/// The console as a [`fmt::Write`] sink.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(putc);
        Ok(())
    }
}

/// Prints formatted text to the console.
pub fn print(args: fmt::Arguments<'_>) {
    // Console::write_str never fails.
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints a line to the console.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use println;
