//! An emulated Arm PL011 UART: one per VM, as the guest's console.
//!
//! Register map and semantics: Arm PrimeCell UART (PL011) Technical Reference Manual (DDI 0183),
//! chapter 3. The PrimeCell ID registers carry the PL011's values, so Linux's AMBA bus probes it;
//! the control registers a driver programs (baud divisors, line control, FIFO levels, interrupt
//! mask, DMA control) are stored and read back.
//!
//! # Transmit
//!
//! Bytes written to `UARTDR` are collected into lines, and each complete line goes to a
//! [`ConsoleSink`] (the arch layer's physical UART) prefixed with the VM's name, so the output of
//! several VMs stays readable on one serial port. In raw mode ([`VirtPl011::set_raw`], for the
//! VM a user types into) every byte goes to [`ConsoleSink::write_raw`] at once instead, so
//! prompts and echoed keystrokes show up before the line ends. The transmitter is infinitely
//! fast: `UARTFR` always says "TX FIFO empty, not full, not busy", so polled drivers never wait.
//! Writes are accepted whether or not the guest enabled the UART in `UARTCR` (early consoles
//! often skip that).
//!
//! # Receive
//!
//! [`VirtPl011::push_rx`] is the line coming in: it puts bytes into a receive FIFO of 32 entries
//! (the r1p5 depth) while `UARTLCR_H.FEN` is set, or a single holding register while it is clear.
//! Only a receiver the guest enabled (`UARTCR.UARTEN` and `RXE`) takes data; otherwise the bytes
//! are lost, as on the wire. What does not fit is an overrun: `UARTRSR.OE` and `UARTRIS.OEIS`
//! are set, and the next character that fits carries `OE` (bit 11) in `UARTDR`, as the TRM
//! describes. Reading `UARTDR` pops one entry (any read of the register, whatever its size or
//! byte lane: the PL011 decodes only `PADDR[11:2]`), with the error bits 11:8 above the data;
//! an empty FIFO reads as 0. `UARTRSR` holds `OE` until a write to `UARTECR`, and the
//! break/parity/framing bits of the last character read (never set here). `UARTFR.RXFE` and
//! `RXFF` follow the FIFO.
//!
//! # Interrupts
//!
//! `UARTRIS` holds the raw interrupt state, `UARTMIS` = `UARTRIS & UARTIMSC`, and `UARTICR`
//! clears `UARTRIS` bits. The device has one output, UARTINTR (the OR of `UARTMIS`), driven as a
//! level on the [`IrqLine`] attached with [`VirtPl011::set_irq`].
//!
//! - RXRIS is set when a received character takes the FIFO level from below the trigger level
//!   (`UARTIFLS.RXIFLSEL`: 1/8, 1/4, 1/2, 3/4, 7/8 of 32; 1 without FIFO) to at or above it. It
//!   clears when reads take the level below the trigger level, or by `UARTICR.RXIC`.
//! - RTRIS (receive timeout): a real PL011 raises it when characters sit in the FIFO for 32 bit
//!   periods without being read or joined by more. Time is not emulated: the timeout is taken to
//!   have expired whenever a push, a read or a change of the trigger level leaves the FIFO
//!   non-empty with RXRIS clear, so a single keystroke, which never reaches the trigger level,
//!   is seen at once (Linux's driver relies on RTIS for exactly that). It clears when the FIFO
//!   empties or by `UARTICR.RTIC`.
//! - TXRIS: the transmit FIFO drains instantly, so every character written to `UARTDR` passes
//!   the FIFO back through its trigger level, and each write sets TXRIS; only `UARTICR.TXIC`
//!   clears it (it is clear at reset, as on the hardware, which asserts it only on that
//!   transition). It is a latch, not a level that is always asserted, so a driver that
//!   acknowledges it through `UARTICR` is not interrupted again until it writes more. Linux's
//!   `amba-pl011` driver never enables TXIM here: `pl011_start_tx_pio` writes characters until
//!   `UARTFR.TXFF`, which never comes, so the whole buffer is written at once and
//!   `pl011_stop_tx` keeps TXIM clear. Were TXIM set, its interrupt handler (which clears every
//!   bit through `UARTICR` except TXIS, RTIS and RXIS) would on TXIS write up to half a FIFO more
//!   or, with nothing left, clear TXIM: no livelock either way.
//! - OEIS: set by an overrun, cleared by `UARTICR.OEIC`. The modem-status, framing, parity and
//!   break interrupts never occur.
//!
//! # Locking
//!
//! The line buffer, the FIFO and the registers sit behind one `spin::Mutex`. The console is not a
//! hot path, and the lock is also what keeps the lines of one VM in order when several vCPUs
//! print. The sink is called with the lock held; it must not access this device.
//!
//! The interrupt line is driven without that lock: whoever changes the level publishes it (a
//! sequence number and the level, in one atomic word) under the lock, then, with the lock
//! released, takes a second lock that only serialises the calls to [`IrqLine::set_level`] and
//! passes on the newest level unless someone already did. So the line always ends at the
//! device's current level, calls never go backwards in time, and a level that lasted only
//! between two calls may be skipped, as a level-sensitive input would not see it either. The
//! line is called with that second lock held: it must not access this device (it may take
//! locks of its own, e.g. the vGIC's).

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use spin::Mutex;

use crate::trap::{MmioDevice, MmioError};

/// Size of the PL011's register window.
pub const PL011_MMIO_SIZE: u64 = 0x1000;

/// Depth of the receive FIFO while `UARTLCR_H.FEN` is set.
pub const RX_FIFO_DEPTH: usize = 32;

/// Where the console output goes.
pub trait ConsoleSink: Send + Sync {
    /// Outputs one line: `"[vm0] text"`, without a trailing newline.
    fn write_line(&self, line: &str);

    /// Outputs transmitted bytes as they are, in raw mode ([`VirtPl011::set_raw`]). The default
    /// drops them: a sink that is ever put in raw mode must provide this.
    fn write_raw(&self, bytes: &[u8]) {
        let _ = bytes;
    }
}

/// The PL011's interrupt output UARTINTR, a level-sensitive line (e.g. a virtual SPI).
pub trait IrqLine: Send + Sync {
    /// Drives the line: `true` while some `UARTMIS` bit is set. Called with no lock of the
    /// device held but one that serialises the calls: it must not access the device.
    fn set_level(&self, level: bool);
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

/// Register bits (PL011 TRM, chapter 3).
mod bit {
    /// `UARTDR`: overrun error, above the data byte (bits 11:8 are OE, BE, PE, FE).
    pub const DR_OE: u16 = 1 << 11;
    /// `UARTRSR`: overrun error (bits 3:0 are OE, BE, PE, FE).
    pub const RSR_OE: u32 = 1 << 3;
    /// `UARTFR`: receive FIFO empty, receive FIFO full, transmit FIFO empty.
    pub const FR_RXFE: u32 = 1 << 4;
    pub const FR_RXFF: u32 = 1 << 6;
    pub const FR_TXFE: u32 = 1 << 7;
    /// `UARTLCR_H`: FIFOs enabled.
    pub const LCR_H_FEN: u32 = 1 << 4;
    /// `UARTCR`: UART enable, receive enable.
    pub const CR_UARTEN: u32 = 1 << 0;
    pub const CR_RXE: u32 = 1 << 9;
    /// `UARTRIS`/`UARTMIS`/`UARTIMSC`/`UARTICR`: receive, transmit, receive timeout, overrun.
    pub const INT_RX: u32 = 1 << 4;
    pub const INT_TX: u32 = 1 << 5;
    pub const INT_RT: u32 = 1 << 6;
    pub const INT_OE: u32 = 1 << 10;
    /// The eleven interrupt bits.
    pub const INT_ALL: u32 = 0x7ff;
}

/// UARTPeriphID0..3 and UARTPCellID0..3. Part number 0x011, designer 0x41 (Arm), revision 1
/// (r1p0, the value QEMU's PL011 presents, so guests see what they are tested against; r1p5
/// would be 0x34 in PeriphID2, which Linux reads as a 32-byte FIFO), then the PrimeCell ID
/// 0xB105F00D. Linux then sizes its transmit bursts for 16 entries, which is harmless here; it
/// reads the receive FIFO until `UARTFR.RXFE` whatever its depth.
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
            reg::IMSC => (&mut self.imsc, bit::INT_ALL),
            reg::DMACR => (&mut self.dmacr, 0x7),
            _ => return None,
        })
    }

    /// Entries the receive FIFO holds: 32, or 1 (the holding register) without FIFOs.
    fn rx_capacity(&self) -> usize {
        if self.lcr_h & bit::LCR_H_FEN != 0 {
            RX_FIFO_DEPTH
        } else {
            1
        }
    }

    /// The receive FIFO level at which RXRIS is raised (`UARTIFLS.RXIFLSEL`, bits 5:3).
    fn rx_trigger(&self) -> usize {
        if self.lcr_h & bit::LCR_H_FEN == 0 {
            return 1;
        }
        match (self.ifls >> 3) & 7 {
            0 => RX_FIFO_DEPTH / 8,
            1 => RX_FIFO_DEPTH / 4,
            3 => RX_FIFO_DEPTH * 3 / 4,
            4 => RX_FIFO_DEPTH * 7 / 8,
            // 2 is 1/2; 5 to 7 are reserved: take the reset value.
            _ => RX_FIFO_DEPTH / 2,
        }
    }
}

/// The receive FIFO: characters with their error bits, as `UARTDR` reads them.
struct RxFifo {
    entries: [u16; RX_FIFO_DEPTH],
    head: usize,
    len: usize,
    /// An overrun happened and no character has been received since: the next one carries OE.
    overrun: bool,
}

struct State {
    /// The VM prefix followed by the current partial line. Its capacity is reserved up front, so
    /// the trap path never allocates.
    line: String,
    /// Transmitted bytes go to [`ConsoleSink::write_raw`] instead of `line`.
    raw: bool,
    regs: Regs,
    rx: RxFifo,
    /// `UARTRSR`.
    rsr: u32,
    /// `UARTRIS`.
    ris: u32,
    /// The level last published to [`VirtPl011::level`], and how many times it changed.
    level: bool,
    level_seq: u64,
}

impl State {
    fn mis(&self) -> u32 {
        self.ris & self.regs.imsc
    }

    fn fr(&self) -> u32 {
        let mut fr = bit::FR_TXFE;
        if self.rx.len == 0 {
            fr |= bit::FR_RXFE;
        }
        if self.rx.len >= self.regs.rx_capacity() {
            fr |= bit::FR_RXFF;
        }
        fr
    }

    /// Re-evaluates RXRIS and RTRIS after the FIFO level went from `prev_len` (with trigger
    /// level `prev_trigger`) to its current value, or the trigger level changed.
    fn rx_update(&mut self, prev_len: usize, prev_trigger: usize) {
        let trigger = self.regs.rx_trigger();
        let len = self.rx.len;
        if len >= trigger && prev_len < prev_trigger {
            self.ris |= bit::INT_RX;
        }
        if len < trigger {
            self.ris &= !bit::INT_RX;
        }
        if len == 0 {
            self.ris &= !bit::INT_RT;
        } else if self.ris & bit::INT_RX == 0 {
            // Data waits and nothing else will report it: the timeout has expired.
            self.ris |= bit::INT_RT;
        }
    }

    /// Receives `bytes`; returns how many the FIFO took.
    fn receive(&mut self, bytes: &[u8]) -> usize {
        let enabled = bit::CR_UARTEN | bit::CR_RXE;
        if bytes.is_empty() || self.regs.cr & enabled != enabled {
            return 0;
        }
        let (prev_len, trigger) = (self.rx.len, self.regs.rx_trigger());
        let room = self.regs.rx_capacity().saturating_sub(self.rx.len);
        let taken = bytes.len().min(room);
        for &b in &bytes[..taken] {
            let mut entry = u16::from(b);
            if core::mem::take(&mut self.rx.overrun) {
                entry |= bit::DR_OE;
            }
            self.rx.entries[(self.rx.head + self.rx.len) % RX_FIFO_DEPTH] = entry;
            self.rx.len += 1;
        }
        if taken < bytes.len() {
            self.rx.overrun = true;
            self.rsr |= bit::RSR_OE;
            self.ris |= bit::INT_OE;
        }
        self.rx_update(prev_len, trigger);
        taken
    }

    /// A read of `UARTDR`: pops the oldest character with its error bits (0 if there is none).
    fn pop(&mut self) -> u32 {
        if self.rx.len == 0 {
            return 0;
        }
        let (prev_len, trigger) = (self.rx.len, self.regs.rx_trigger());
        let entry = self.rx.entries[self.rx.head];
        self.rx.head = (self.rx.head + 1) % RX_FIFO_DEPTH;
        self.rx.len -= 1;
        // BE, PE and FE describe the character just read; OE stays until UARTECR is written.
        self.rsr = (self.rsr & bit::RSR_OE) | u32::from((entry >> 8) & 0x7);
        self.rx_update(prev_len, trigger);
        u32::from(entry)
    }
}

/// Who drives the interrupt line, and the newest change passed on to it.
struct LineState {
    line: Option<Arc<dyn IrqLine>>,
    delivered_seq: u64,
}

/// An emulated PL011 for one VM. Register it on the VM's bus with a [`PL011_MMIO_SIZE`] window.
pub struct VirtPl011 {
    /// Length of the `"[vmname] "` prefix at the start of `State::line`.
    prefix_len: usize,
    sink: &'static dyn ConsoleSink,
    state: Mutex<State>,
    /// The interrupt level published under the `state` lock: `level_seq << 1 | level`.
    level: AtomicU64,
    /// Serialises the calls to the interrupt line (see the module docs).
    line: Mutex<LineState>,
}

impl VirtPl011 {
    /// A PL011 whose lines go to `sink` as `"[<vm_name>] text"`, with no interrupt line.
    pub fn new(vm_name: &str, sink: &'static dyn ConsoleSink) -> Self {
        let mut line = String::with_capacity(vm_name.len() + 3 + MAX_LINE + MAX_BYTE_RENDER);
        line.push_str(&format!("[{vm_name}] "));
        VirtPl011 {
            prefix_len: line.len(),
            sink,
            state: Mutex::new(State {
                line,
                raw: false,
                regs: Regs::RESET,
                rx: RxFifo {
                    entries: [0; RX_FIFO_DEPTH],
                    head: 0,
                    len: 0,
                    overrun: false,
                },
                rsr: 0,
                ris: 0,
                level: false,
                level_seq: 0,
            }),
            level: AtomicU64::new(0),
            line: Mutex::new(LineState {
                line: None,
                delivered_seq: 0,
            }),
        }
    }

    /// Attaches the interrupt output (replacing any previous one) and drives it to the current
    /// level at once.
    pub fn set_irq(&self, line: Arc<dyn IrqLine>) {
        let mut l = self.line.lock();
        let word = self.level.load(Ordering::Acquire);
        l.delivered_seq = word >> 1;
        line.set_level(word & 1 != 0);
        l.line = Some(line);
    }

    /// Receives `bytes` from the outside world into the receive FIFO, as if they arrived on the
    /// wire. Returns how many it took. The rest is lost: an overrun if the FIFO was full,
    /// nothing at all if the guest has not enabled the receiver (`UARTCR.UARTEN` and `RXE`).
    /// Raises the interrupt line if that makes an unmasked interrupt pending.
    pub fn push_rx(&self, bytes: &[u8]) -> usize {
        let (taken, changed) = {
            let mut state = self.state.lock();
            let taken = state.receive(bytes);
            (taken, self.publish(&mut state))
        };
        if changed {
            self.deliver();
        }
        taken
    }

    /// Raw mode on or off. In raw mode each transmitted byte goes to [`ConsoleSink::write_raw`]
    /// as it is written, without the VM prefix, escaping or line buffering: for the VM whose
    /// console a user types into, so that prompts, echo and line editing work. Turning it on
    /// first emits the pending partial line.
    pub fn set_raw(&self, raw: bool) {
        let mut state = self.state.lock();
        if raw && !state.raw && state.line.len() > self.prefix_len {
            self.emit(&mut state);
        }
        state.raw = raw;
    }

    /// Emits the pending partial line, if any (when the VM stops, so its last words are seen).
    pub fn flush(&self) {
        let mut state = self.state.lock();
        if state.line.len() > self.prefix_len {
            self.emit(&mut state);
        }
    }

    /// Publishes the interrupt level if it changed; returns whether it did, in which case the
    /// caller must [`deliver`](Self::deliver) it once the state lock is released.
    fn publish(&self, state: &mut State) -> bool {
        let level = state.mis() != 0;
        if level == state.level {
            return false;
        }
        state.level = level;
        state.level_seq += 1;
        self.level
            .store(state.level_seq << 1 | u64::from(level), Ordering::Release);
        true
    }

    /// Passes the newest published level on to the interrupt line, unless that already happened.
    fn deliver(&self) {
        let mut l = self.line.lock();
        // Under `line`, this sees at least what any earlier delivery saw (read-read coherence).
        let word = self.level.load(Ordering::Acquire);
        let seq = word >> 1;
        if seq <= l.delivered_seq {
            return;
        }
        l.delivered_seq = seq;
        if let Some(line) = &l.line {
            line.set_level(word & 1 != 0);
        }
    }

    fn emit(&self, state: &mut State) {
        self.sink.write_line(&state.line);
        state.line.truncate(self.prefix_len);
    }

    /// Transmits one byte: to the line, or straight to the sink in raw mode. Raises TXRIS.
    fn transmit(&self, state: &mut State, byte: u8) {
        state.ris |= bit::INT_TX;
        if state.raw {
            return self.sink.write_raw(&[byte]);
        }
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
        let (value, changed) = if reg_offset >= reg::ID_BASE {
            // `reg_offset` is below PL011_MMIO_SIZE, so the index is 0..8.
            let id = ID_REGS[((reg_offset - reg::ID_BASE) / 4) as usize];
            (u32::from(id), false)
        } else {
            let mut state = self.state.lock();
            let value = match reg_offset {
                reg::DR => state.pop(),
                reg::RSR_ECR => state.rsr,
                reg::FR => state.fr(),
                reg::RIS => state.ris,
                reg::MIS => state.mis(),
                // The stored registers; ICR (write-only) and unknown offsets read as zero.
                _ => state.regs.stored(reg_offset).map_or(0, |(r, _)| *r),
            };
            (value, self.publish(&mut state))
        };
        if changed {
            self.deliver();
        }
        Ok(u64::from((value >> shift) & lane_mask(size)))
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let (reg_offset, shift) = locate(offset, size)?;
        let mask = lane_mask(size) << shift;
        let bits = ((value as u32) << shift) & mask;
        let changed = {
            let mut state = self.state.lock();
            match reg_offset {
                // The data byte is lane 0; a write that does not cover it carries no character.
                reg::DR => {
                    if shift == 0 {
                        self.transmit(&mut state, value as u8);
                    }
                }
                // Any write to UARTECR clears the receive status.
                reg::RSR_ECR => state.rsr = 0,
                reg::ICR => state.ris &= !bits,
                reg::LCR_H | reg::IFLS => {
                    let (len, trigger) = (state.rx.len, state.regs.rx_trigger());
                    if let Some((r, implemented)) = state.regs.stored(reg_offset) {
                        *r = (*r & !(mask & implemented)) | (bits & implemented);
                    }
                    if state.regs.rx_trigger() != trigger {
                        state.rx_update(len, trigger);
                    }
                }
                _ => {
                    // The other stored registers; FR, RIS/MIS, the ID registers and unknown
                    // offsets are read-only or absent and ignore writes.
                    if let Some((r, implemented)) = state.regs.stored(reg_offset) {
                        *r = (*r & !(mask & implemented)) | (bits & implemented);
                    }
                }
            }
            self.publish(&mut state)
        };
        if changed {
            self.deliver();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::boxed::Box;
    use alloc::vec;
    use alloc::vec::Vec;
    use std::sync::Mutex as StdMutex;

    /// Lines, and the bytes written in raw mode.
    #[derive(Default)]
    struct Capture(StdMutex<Vec<String>>, StdMutex<Vec<u8>>);

    impl ConsoleSink for Capture {
        fn write_line(&self, line: &str) {
            self.0.lock().unwrap().push(line.into());
        }
        fn write_raw(&self, bytes: &[u8]) {
            self.1.lock().unwrap().extend_from_slice(bytes);
        }
    }

    /// Records every level the interrupt line is driven to.
    #[derive(Default)]
    struct Line(StdMutex<Vec<bool>>);

    impl IrqLine for Line {
        fn set_level(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    impl Line {
        fn levels(&self) -> Vec<bool> {
            self.0.lock().unwrap().clone()
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

    const CR_ON: u64 = 0x301; // UARTEN | TXE | RXE
    const LCR_FIFO: u64 = 0x70; // 8 bits, FEN
    const LCR_NOFIFO: u64 = 0x60; // 8 bits, no FIFO
    const RX: u64 = 1 << 4;
    const TX: u64 = 1 << 5;
    const RT: u64 = 1 << 6;
    const OE: u64 = 1 << 10;

    fn rd(u: &VirtPl011, offset: u64) -> u64 {
        u.read(0, offset, 4).unwrap()
    }

    fn wr(u: &VirtPl011, offset: u64, value: u64) {
        u.write(0, offset, 4, value).unwrap();
    }

    /// An enabled UART with FIFOs (trigger level 1/2 = 16) and an interrupt line attached.
    fn rx_uart() -> (VirtPl011, Arc<Line>) {
        let (u, _) = uart("vm0");
        wr(&u, reg::LCR_H, LCR_FIFO);
        wr(&u, reg::CR, CR_ON);
        let line = Arc::new(Line::default());
        u.set_irq(line.clone());
        (u, line)
    }

    #[test]
    fn rx_fifo_fill_and_overrun() {
        let (u, _) = rx_uart();
        assert_eq!(rd(&u, reg::FR), 0x90);
        assert_eq!(u.push_rx(b""), 0);
        let input: Vec<u8> = (0..40).map(|i| b'A' + i).collect();
        assert_eq!(u.push_rx(&input), RX_FIFO_DEPTH);
        // Full: RXFF, not RXFE; the overrun is flagged in RSR and RIS.
        assert_eq!(rd(&u, reg::FR), 0xc0);
        assert_eq!(rd(&u, reg::RSR_ECR), 0x8);
        assert_eq!(rd(&u, reg::RIS) & OE, OE);
        assert_eq!(u.push_rx(b"z"), 0);
        // The 32 characters that fit come out in order, without error bits.
        for &b in &input[..RX_FIFO_DEPTH] {
            assert_eq!(rd(&u, reg::DR), u64::from(b));
        }
        assert_eq!(rd(&u, reg::FR), 0x90);
        // Empty: DR reads 0 and changes nothing.
        assert_eq!(rd(&u, reg::DR), 0);
        // The next character received carries OE (DR bit 11); the one after does not.
        assert_eq!(u.push_rx(b"xy"), 2);
        assert_eq!(rd(&u, reg::DR), 0x800 | u64::from(b'x'));
        assert_eq!(rd(&u, reg::DR), u64::from(b'y'));
        // RSR keeps OE until UARTECR is written (any value); OEIS until UARTICR.OEIC.
        assert_eq!(rd(&u, reg::RSR_ECR), 0x8);
        wr(&u, reg::RSR_ECR, 0);
        assert_eq!(rd(&u, reg::RSR_ECR), 0);
        assert_eq!(rd(&u, reg::RIS) & OE, OE);
        wr(&u, reg::ICR, OE);
        assert_eq!(rd(&u, reg::RIS) & OE, 0);
    }

    #[test]
    fn rx_needs_an_enabled_receiver() {
        let (u, _) = uart("vm0");
        wr(&u, reg::LCR_H, LCR_FIFO);
        // At reset UARTEN is clear: nothing is received, and that is no overrun.
        assert_eq!(u.push_rx(b"ab"), 0);
        assert_eq!(rd(&u, reg::FR), 0x90);
        assert_eq!(rd(&u, reg::RSR_ECR), 0);
        assert_eq!(rd(&u, reg::RIS), 0);
        // UARTEN without RXE: still nothing.
        wr(&u, reg::CR, 0x101);
        assert_eq!(u.push_rx(b"ab"), 0);
        wr(&u, reg::CR, CR_ON);
        assert_eq!(u.push_rx(b"ab"), 2);
        // Disabling the receiver keeps what was received readable.
        wr(&u, reg::CR, 0x101);
        assert_eq!(rd(&u, reg::DR), u64::from(b'a'));
        assert_eq!(rd(&u, reg::DR), u64::from(b'b'));
    }

    #[test]
    fn dr_reads_pop_whatever_the_access() {
        let (u, _) = rx_uart();
        u.push_rx(b"abc");
        // A byte read of the error lane is a read of UARTDR too.
        assert_eq!(u.read(0, reg::DR + 1, 1), Ok(0));
        assert_eq!(u.read(0, reg::DR, 1), Ok(u64::from(b'b')));
        assert_eq!(u.read(0, reg::DR, 2), Ok(u64::from(b'c')));
        assert_eq!(rd(&u, reg::FR), 0x90);
    }

    #[test]
    fn trigger_levels() {
        for (sel, trigger) in [(0u64, 4usize), (1, 8), (2, 16), (3, 24), (4, 28), (7, 16)] {
            let (u, _) = rx_uart();
            wr(&u, reg::IFLS, sel << 3 | 0x2);
            assert_eq!(rd(&u, reg::IFLS), sel << 3 | 0x2);
            let below = vec![b'.'; trigger - 1];
            assert_eq!(u.push_rx(&below), trigger - 1);
            // Below the trigger level: only the receive timeout.
            assert_eq!(rd(&u, reg::RIS), RT, "sel {sel}");
            u.push_rx(b"!");
            assert_eq!(rd(&u, reg::RIS), RX | RT, "sel {sel}");
            // Reading below the trigger level clears RXRIS; what remains times out.
            rd(&u, reg::DR);
            assert_eq!(rd(&u, reg::RIS), RT, "sel {sel}");
            for _ in 1..trigger {
                rd(&u, reg::DR);
            }
            assert_eq!(rd(&u, reg::RIS), 0, "sel {sel}");
        }
    }

    #[test]
    fn rx_interrupt_at_the_trigger_level_only() {
        let (u, _) = rx_uart();
        // 20 characters at once: RXRIS (the level crossed 16), no timeout needed.
        assert_eq!(u.push_rx(&[b'x'; 20]), 20);
        assert_eq!(rd(&u, reg::RIS), RX);
        // Acknowledged while still above the trigger level: more data crossing nothing raises
        // the timeout instead, so it is not left unreported.
        wr(&u, reg::ICR, RX);
        assert_eq!(rd(&u, reg::RIS), 0);
        u.push_rx(b"y");
        assert_eq!(rd(&u, reg::RIS), RT);
        // Reads above the trigger level keep RXRIS as it is.
        for _ in 0..5 {
            rd(&u, reg::DR);
        }
        assert_eq!(rd(&u, reg::RIS), RT);
        for _ in 0..16 {
            rd(&u, reg::DR);
        }
        assert_eq!(rd(&u, reg::RIS), 0);
        // Raising the trigger level above the FIFO level, lowering it below.
        u.push_rx(&[b'z'; 10]);
        assert_eq!(rd(&u, reg::RIS), RT);
        wr(&u, reg::IFLS, 0x08); // RX 1/4 = 8
        assert_eq!(rd(&u, reg::RIS), RX | RT);
        wr(&u, reg::IFLS, 0x18); // RX 3/4 = 24
        assert_eq!(rd(&u, reg::RIS), RT);
    }

    #[test]
    fn receive_timeout() {
        let (u, _) = rx_uart();
        // One keystroke: below the trigger level, so the timeout reports it.
        u.push_rx(b"a");
        assert_eq!(rd(&u, reg::RIS), RT);
        // Cleared by UARTICR.RTIC, raised again by the next character.
        wr(&u, reg::ICR, RT);
        assert_eq!(rd(&u, reg::RIS), 0);
        u.push_rx(b"b");
        assert_eq!(rd(&u, reg::RIS), RT);
        // Cleared when the FIFO empties.
        rd(&u, reg::DR);
        assert_eq!(rd(&u, reg::RIS), RT);
        rd(&u, reg::DR);
        assert_eq!(rd(&u, reg::RIS), 0);
    }

    #[test]
    fn masked_status_and_clear() {
        let (u, _) = rx_uart();
        u.push_rx(b"a");
        put(&u, b"x");
        assert_eq!(rd(&u, reg::RIS), RT | TX);
        assert_eq!(rd(&u, reg::MIS), 0);
        wr(&u, reg::IMSC, RX | RT);
        assert_eq!(rd(&u, reg::IMSC), RX | RT);
        assert_eq!(rd(&u, reg::MIS), RT);
        wr(&u, reg::IMSC, 0x7ff);
        assert_eq!(rd(&u, reg::MIS), RT | TX);
        // UARTICR clears the bits written as 1, by byte lane too; it reads as zero.
        u.write(0, reg::ICR, 1, TX).unwrap();
        assert_eq!(rd(&u, reg::RIS), RT);
        assert_eq!(rd(&u, reg::ICR), 0);
        wr(&u, reg::ICR, 0x7ff);
        assert_eq!(rd(&u, reg::RIS), 0);
        // UARTRIS and UARTMIS ignore writes.
        wr(&u, reg::RIS, 0x7ff);
        wr(&u, reg::MIS, 0x7ff);
        assert_eq!(rd(&u, reg::RIS), 0);
    }

    #[test]
    fn interrupt_line_levels() {
        let (u, line) = rx_uart();
        // Attaching drives the line to the current level.
        assert_eq!(line.levels(), [false]);
        // Masked: no change.
        u.push_rx(b"a");
        assert_eq!(line.levels(), [false]);
        // Unmasking raises it, reading the only character lowers it.
        wr(&u, reg::IMSC, RX | RT);
        assert_eq!(line.levels(), [false, true]);
        assert_eq!(rd(&u, reg::DR), u64::from(b'a'));
        assert_eq!(line.levels(), [false, true, false]);
        // A keystroke raises it; more data while it is up changes nothing.
        u.push_rx(b"b");
        u.push_rx(&[b'c'; 20]);
        assert_eq!(line.levels(), [false, true, false, true]);
        // Draining lowers it once.
        while rd(&u, reg::FR) & 0x10 == 0 {
            rd(&u, reg::DR);
        }
        assert_eq!(line.levels(), [false, true, false, true, false]);
        // UARTICR and UARTIMSC lower it too.
        u.push_rx(b"d");
        wr(&u, reg::ICR, RT);
        u.push_rx(b"e");
        wr(&u, reg::IMSC, 0);
        assert_eq!(
            line.levels(),
            [false, true, false, true, false, true, false, true, false]
        );
        // An overrun with OEIM.
        wr(&u, reg::IMSC, OE);
        u.push_rx(&[b'f'; 40]);
        assert_eq!(line.levels().last(), Some(&true));
        wr(&u, reg::ICR, OE);
        assert_eq!(line.levels().last(), Some(&false));
        // Replacing the line drives the new one to the current level.
        let other = Arc::new(Line::default());
        wr(&u, reg::IMSC, RX);
        u.set_irq(other.clone());
        assert_eq!(other.levels(), [true]);
    }

    #[test]
    fn no_fifo_holds_one_character() {
        let (u, line) = rx_uart();
        wr(&u, reg::LCR_H, LCR_NOFIFO);
        wr(&u, reg::IMSC, RX);
        // The holding register takes one; the second is an overrun. RXRIS at once.
        assert_eq!(u.push_rx(b"ab"), 1);
        assert_eq!(rd(&u, reg::FR), 0xc0);
        assert_eq!(rd(&u, reg::RIS), RX | OE);
        assert_eq!(line.levels(), [false, true]);
        assert_eq!(u.push_rx(b"c"), 0);
        assert_eq!(rd(&u, reg::DR), u64::from(b'a'));
        assert_eq!(rd(&u, reg::RIS), OE);
        assert_eq!(rd(&u, reg::FR), 0x90);
        assert_eq!(line.levels(), [false, true, false]);
        assert_eq!(u.push_rx(b"d"), 1);
        assert_eq!(rd(&u, reg::DR), 0x800 | u64::from(b'd'));
        // The trigger level is 1 whatever UARTIFLS says.
        wr(&u, reg::IFLS, 0x20);
        u.push_rx(b"e");
        assert_eq!(rd(&u, reg::RIS) & (RX | RT), RX);
        // Enabling the FIFO keeps the character; the trigger level becomes 28.
        wr(&u, reg::LCR_H, LCR_FIFO);
        assert_eq!(rd(&u, reg::RIS) & (RX | RT), RT);
        assert_eq!(u.push_rx(b"fg"), 2);
        assert_eq!(rd(&u, reg::DR), u64::from(b'e'));
        // Disabling it with three characters inside: full until they are read.
        u.push_rx(b"h");
        wr(&u, reg::LCR_H, LCR_NOFIFO);
        assert_eq!(rd(&u, reg::FR), 0xc0);
        assert_eq!(u.push_rx(b"i"), 0);
        for b in *b"fgh" {
            assert_eq!(rd(&u, reg::DR) & 0xff, u64::from(b));
        }
        assert_eq!(rd(&u, reg::FR), 0x90);
    }

    #[test]
    fn tx_raises_txris_until_cleared() {
        let (u, sink) = uart("vm0");
        let line = Arc::new(Line::default());
        u.set_irq(line.clone());
        // TXIM on an idle transmitter: nothing (TXRIS is clear at reset).
        wr(&u, reg::IMSC, TX);
        assert_eq!(rd(&u, reg::RIS), 0);
        put(&u, b"hi\n");
        assert_eq!(lines(sink), ["[vm0] hi"]);
        assert_eq!(rd(&u, reg::RIS), TX);
        assert_eq!(rd(&u, reg::MIS), TX);
        assert_eq!(line.levels(), [false, true]);
        // Acknowledged, it stays clear until the next write.
        wr(&u, reg::ICR, TX);
        assert_eq!(rd(&u, reg::MIS), 0);
        assert_eq!(line.levels(), [false, true, false]);
        // A store to DR + 1 transmits nothing and raises nothing.
        u.write(0, reg::DR + 1, 1, 0x41).unwrap();
        assert_eq!(rd(&u, reg::RIS), 0);
        put(&u, b"x");
        assert_eq!(line.levels(), [false, true, false, true]);
        // FR is unaffected by transmission: TX FIFO empty, never full or busy.
        assert_eq!(rd(&u, reg::FR), 0x90);
    }

    #[test]
    fn raw_mode() {
        let (u, sink) = uart("vm0");
        put(&u, b"boot\nlog");
        u.set_raw(true);
        // The partial line went out first; then bytes pass as they are.
        assert_eq!(lines(sink), ["[vm0] boot", "[vm0] log"]);
        put(&u, b"~ # \x1b[0m\r\n");
        assert_eq!(*sink.1.lock().unwrap(), b"~ # \x1b[0m\r\n");
        assert_eq!(rd(&u, reg::RIS), TX);
        u.flush();
        assert_eq!(lines(sink).len(), 2);
        u.set_raw(false);
        put(&u, b"done\n");
        assert_eq!(lines(sink)[2], "[vm0] done");
        assert_eq!(sink.1.lock().unwrap().len(), 10);
    }

    /// Several vCPUs reading and a producer pushing: the line always ends at the device's level.
    #[test]
    fn concurrent_line_ends_at_the_device_level() {
        use std::thread;
        for round in 0..20 {
            let (u, line) = rx_uart();
            let u = Arc::new(u);
            wr(&u, reg::IMSC, RX | RT);
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    let u = u.clone();
                    thread::spawn(move || {
                        for _ in 0..200 {
                            rd(&u, reg::DR);
                        }
                    })
                })
                .collect();
            for i in 0..200u8 {
                u.push_rx(&[i; 3]);
            }
            for r in readers {
                r.join().unwrap();
            }
            let expect = rd(&u, reg::MIS) != 0;
            assert_eq!(line.levels().last(), Some(&expect), "round {round}");
        }
    }
}
