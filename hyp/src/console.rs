//! The hypervisor's console: a small [`Console`] trait (PL011 now; the SDM845 GENI UART later),
//! the `log` backend that prints through it, and an emergency path for panics.
//!
//! Lines are written whole under one lock so output from several CPUs does not interleave
//! mid-line. The panic path takes the lock only if it can get it quickly: a CPU that panicked while
//! holding it must still be able to say why.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::{Mutex, Once};
use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

/// A byte sink the hypervisor prints to.
pub trait Console: Send + Sync {
    /// Writes bytes, blocking until the device took them.
    fn write_bytes(&self, bytes: &[u8]);
}

register_bitfields![u32,
    UARTFR [
        BUSY OFFSET(3) NUMBITS(1) [],
        RXFE OFFSET(4) NUMBITS(1) [],
        TXFF OFFSET(5) NUMBITS(1) [],
        TXFE OFFSET(7) NUMBITS(1) []
    ]
];

register_structs! {
    /// Arm PrimeCell PL011 UART registers (the subset a polled console uses).
    pub Pl011Regs {
        (0x000 => dr: ReadWrite<u32>),
        (0x004 => _reserved0),
        (0x018 => fr: ReadOnly<u32, UARTFR::Register>),
        (0x01c => @END),
    }
}

/// A PL011 already configured by firmware (baud rate etc.), used polled.
pub struct Pl011 {
    regs: *const Pl011Regs,
}

// SAFETY: the device is only accessed through volatile MMIO; concurrent use is serialised by the
// console lock, and an unserialised panic write can at worst interleave bytes.
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
        assert_eq!(core::mem::size_of::<Pl011Regs>(), 0x1c);
    }
}
