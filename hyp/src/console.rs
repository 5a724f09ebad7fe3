//! The hypervisor's console: a small [`Console`] trait (PL011 now; the SDM845 GENI UART later),
//! the `log` backend that prints through it, and an emergency path for panics.
//!
//! Lines are written whole under one lock so output from several CPUs does not interleave
//! mid-line. The panic path takes the lock only if it can get it quickly: a CPU that panicked while
//! holding it must still be able to say why.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::{Mutex, Once};
use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

/// A byte sink the hypervisor prints to.
pub trait Console: Send + Sync {
    /// Writes bytes, blocking until the device took them.
    fn write_bytes(&self, bytes: &[u8]);
}

register_bitfields![u32,
    UARTDR [
        DATA OFFSET(0) NUMBITS(8) [],
        /// Framing, parity and break errors of this character (bit 11, OE, only says that
        /// characters before it were lost).
        FE_PE_BE OFFSET(8) NUMBITS(3) []
    ],
    UARTFR [
        BUSY OFFSET(3) NUMBITS(1) [],
        RXFE OFFSET(4) NUMBITS(1) [],
        TXFF OFFSET(5) NUMBITS(1) [],
        TXFE OFFSET(7) NUMBITS(1) []
    ],
    UARTLCR_H [
        FEN OFFSET(4) NUMBITS(1) []
    ],
    UARTCR [
        UARTEN OFFSET(0) NUMBITS(1) [],
        TXE OFFSET(8) NUMBITS(1) [],
        RXE OFFSET(9) NUMBITS(1) []
    ],
    /// UARTIMSC, UARTRIS, UARTMIS, UARTICR.
    UARTINT [
        RX OFFSET(4) NUMBITS(1) [],
        TX OFFSET(5) NUMBITS(1) [],
        RT OFFSET(6) NUMBITS(1) []
    ]
];

register_structs! {
    /// Arm PrimeCell PL011 UART registers (the subset a console with input uses; TRM DDI 0183,
    /// table 3-1).
    pub Pl011Regs {
        (0x000 => dr: ReadWrite<u32, UARTDR::Register>),
        (0x004 => _reserved0),
        (0x018 => fr: ReadOnly<u32, UARTFR::Register>),
        (0x01c => _reserved1),
        (0x02c => lcr_h: ReadWrite<u32, UARTLCR_H::Register>),
        (0x030 => cr: ReadWrite<u32, UARTCR::Register>),
        (0x034 => _reserved2),
        (0x038 => imsc: ReadWrite<u32, UARTINT::Register>),
        (0x03c => ris: ReadOnly<u32, UARTINT::Register>),
        (0x040 => mis: ReadOnly<u32, UARTINT::Register>),
        (0x044 => icr: WriteOnly<u32, UARTINT::Register>),
        (0x048 => @END),
    }
}

/// A PL011 already configured by firmware (baud rate etc.): output polled, input polled or
/// interrupt-driven.
pub struct Pl011 {
    regs: *const Pl011Regs,
}

// SAFETY: the device is only accessed through volatile MMIO. Output and re-configuration are
// serialised by the console lock (an unserialised panic write can at worst interleave bytes);
// input (`read_byte`, `clear_rx_interrupt`) touches only the receive side (UARTFR, reads of
// UARTDR, UARTMIS, UARTICR's receive bits), which is independent of transmission.
unsafe impl Send for Pl011 {}
// SAFETY: as above.
unsafe impl Sync for Pl011 {}

impl Pl011 {
    /// # Safety
    /// `base` must be the address of a PL011's registers, mapped as device memory for as long as
    /// the returned value is used.
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            regs: base as *const Pl011Regs,
        }
    }

    fn regs(&self) -> &Pl011Regs {
        // SAFETY: `new`'s contract.
        unsafe { &*self.regs }
    }

    /// The next received character, if there is one; never waits. Characters received with a
    /// framing, parity or break error (a break reads as a NUL with BE) are dropped, and the
    /// next one is returned instead.
    pub fn read_byte(&self) -> Option<u8> {
        let regs = self.regs();
        // Bounded: a line that keeps delivering bad characters must not hold the caller here.
        for _ in 0..64 {
            if regs.fr.is_set(UARTFR::RXFE) {
                return None;
            }
            // Reading UARTDR pops the character and its error bits from the receive FIFO.
            let dr = regs.dr.extract();
            if dr.read(UARTDR::FE_PE_BE) == 0 {
                return Some(dr.read(UARTDR::DATA) as u8);
            }
        }
        None
    }

    /// Enables the receive interrupts: UARTINTR is asserted when the receive FIFO reaches its
    /// trigger level (RXIM) or holds characters that have not been read for 32 bit periods
    /// (RTIM, which is what reports a single keystroke). Makes sure the receiver is on
    /// (`UARTCR.RXE`, `UARTEN`) and the FIFOs are enabled (`UARTLCR_H.FEN`); the firmware's
    /// baud rate, format and FIFO trigger levels are kept. Under QEMU the boot UART already
    /// runs that way, and only `UARTIMSC` is written.
    ///
    /// Receive interrupts already pending (characters that arrived before) are left pending, so
    /// the first interrupt collects them. Takes the console lock, so no line is printed while
    /// re-programming the line control briefly disables the UART (only the emergency path
    /// ignores that lock). Must not be called with the console lock held.
    pub fn enable_rx_interrupt(&self) {
        let regs = self.regs();
        let _guard = LOCK.lock();
        let cr = regs.cr.extract();
        let running = cr.is_set(UARTCR::UARTEN) && cr.is_set(UARTCR::RXE);
        if !running || !regs.lcr_h.is_set(UARTLCR_H::FEN) {
            // TRM 3.3.8: disable the UART and let the current character finish before changing
            // the line control; writing UARTLCR_H also re-latches the baud divisors, unchanged.
            while regs.fr.is_set(UARTFR::BUSY) {}
            regs.cr.modify(UARTCR::UARTEN::CLEAR);
            regs.lcr_h.modify(UARTLCR_H::FEN::SET);
            let mut on = cr;
            on.modify(UARTCR::UARTEN::SET + UARTCR::TXE::SET + UARTCR::RXE::SET);
            regs.cr.set(on.get());
        }
        regs.imsc.modify(UARTINT::RX::SET + UARTINT::RT::SET);
    }

    /// Clears the receive interrupts (`UARTICR` RXIC and RTIC). Call it at the start of the
    /// interrupt handler, then read with [`read_byte`](Self::read_byte) until it returns
    /// `None`: never the other way round, or a character that arrives between the last read and
    /// the clear may not interrupt again (QEMU's PL011 raises RXRIS only when its FIFO goes from
    /// empty to one character). Draining the FIFO also clears both on a real PL011.
    pub fn clear_rx_interrupt(&self) {
        self.regs().icr.write(UARTINT::RX::SET + UARTINT::RT::SET);
    }

    /// Whether a receive interrupt is pending and unmasked (`UARTMIS` RXMIS or RTMIS).
    pub fn rx_interrupt_pending(&self) -> bool {
        let mis = self.regs().mis.extract();
        mis.is_set(UARTINT::RX) || mis.is_set(UARTINT::RT)
    }
}

impl Console for Pl011 {
    fn write_bytes(&self, bytes: &[u8]) {
        let regs = self.regs();
        for &b in bytes {
            if b == b'\n' {
                while regs.fr.is_set(UARTFR::TXFF) {}
                regs.dr.set(b'\r' as u32);
            }
            while regs.fr.is_set(UARTFR::TXFF) {}
            regs.dr.set(b as u32);
        }
    }
}

static CONSOLE: Once<&'static dyn Console> = Once::new();
static LOCK: Mutex<()> = Mutex::new(());

/// Installs the console (the first call wins; later calls are ignored).
pub fn init(console: &'static dyn Console) {
    CONSOLE.call_once(|| console);
}

struct Writer<'a>(&'a dyn Console);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints one formatted line (a newline is appended) atomically with respect to other lines.
pub fn print_line(args: fmt::Arguments<'_>) {
    let Some(console) = CONSOLE.get() else { return };
    let _guard = LOCK.lock();
    let mut w = Writer(*console);
    let _ = w.write_fmt(args);
    let _ = w.write_str("\n");
}

/// Writes bytes as they are, no newline added, atomically with respect to lines (a guest's
/// console output in raw mode, see [`crate::vdev::VirtPl011::set_raw`]).
pub fn print_raw(bytes: &[u8]) {
    let Some(console) = CONSOLE.get() else { return };
    let _guard = LOCK.lock();
    console.write_bytes(bytes);
}

/// Prints a line even if another CPU holds (or died holding) the console lock.
pub fn emergency_line(args: fmt::Arguments<'_>) {
    let Some(console) = CONSOLE.get() else { return };
    let mut guard = None;
    for _ in 0..1_000_000 {
        if let Some(g) = LOCK.try_lock() {
            guard = Some(g);
            break;
        }
        core::hint::spin_loop();
    }
    let mut w = Writer(*console);
    let _ = w.write_fmt(args);
    let _ = w.write_str("\n");
    drop(guard);
}

/// `log` backend: `hyp: <message>`, with the level spelled out for anything but info.
struct Logger;

static LOGGER: Logger = Logger;
static LOGGER_SET: AtomicBool = AtomicBool::new(false);

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let tag = match record.level() {
            log::Level::Info => return print_line(format_args!("hyp: {}", record.args())),
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            log::Level::Debug => "debug",
            log::Level::Trace => "trace",
        };
        print_line(format_args!("hyp: {tag}: {}", record.args()));
    }

    fn flush(&self) {}
}

/// Routes `log` macros to the console at `level` and above.
pub fn init_logger(level: log::LevelFilter) {
    if !LOGGER_SET.swap(true, Ordering::AcqRel) {
        let _ = log::set_logger(&LOGGER);
    }
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use std::vec::Vec;

    struct Capture(StdMutex<Vec<u8>>);
    impl Console for Capture {
        fn write_bytes(&self, bytes: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(bytes);
        }
    }

    #[test]
    fn lines_and_log_levels() {
        let cap: &'static Capture = Box::leak(Box::new(Capture(StdMutex::new(Vec::new()))));
        init(cap);
        init_logger(log::LevelFilter::Info);
        print_line(format_args!("one {}", 1));
        log::info!("two");
        log::warn!("three");
        log::debug!("hidden");
        emergency_line(format_args!("four"));
        let out = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out, "one 1\nhyp: two\nhyp: warning: three\nfour\n");
    }

    #[test]
    fn pl011_register_offsets() {
        assert_eq!(core::mem::offset_of!(Pl011Regs, fr), 0x18);
        assert_eq!(core::mem::offset_of!(Pl011Regs, lcr_h), 0x2c);
        assert_eq!(core::mem::offset_of!(Pl011Regs, cr), 0x30);
        assert_eq!(core::mem::offset_of!(Pl011Regs, imsc), 0x38);
        assert_eq!(core::mem::offset_of!(Pl011Regs, ris), 0x3c);
        assert_eq!(core::mem::offset_of!(Pl011Regs, mis), 0x40);
        assert_eq!(core::mem::offset_of!(Pl011Regs, icr), 0x44);
        assert_eq!(core::mem::size_of::<Pl011Regs>(), 0x48);
    }
}
