//! Rust side of the exception vectors (see `boot.rs`).
//!
//! A check that expects a data abort arms [`expect_abort`]; the synchronous
//! exception handler then records ESR_EL1/FAR_EL1, steps over the faulting
//! instruction and returns. Any other exception is reported and resets the
//! VM.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use crate::arch;
use crate::console::println;
use crate::psci;

static ARMED: AtomicBool = AtomicBool::new(false);
static TAKEN: AtomicBool = AtomicBool::new(false);
static ESR: AtomicU64 = AtomicU64::new(0);
static FAR: AtomicU64 = AtomicU64::new(0);
static ELR: AtomicU64 = AtomicU64::new(0);

/// What an expected exception left behind.
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    pub esr: u64,
    pub far: u64,
    /// ELR_EL1: the address of the faulting instruction.
    pub elr: u64,
}

/// Runs `access` (a single faulting instruction) with the expected-abort flag
/// armed; returns the exception it took, if any.
pub fn expect_abort(access: impl FnOnce()) -> Option<Taken> {
    TAKEN.store(false, SeqCst);
    ARMED.store(true, SeqCst);
    access();
    ARMED.store(false, SeqCst);
    TAKEN.swap(false, SeqCst).then(|| Taken {
        esr: ESR.load(SeqCst),
        far: FAR.load(SeqCst),
        elr: ELR.load(SeqCst),
    })
}

/// Synchronous exception from the current EL (vector offset 0x200).
#[unsafe(no_mangle)]
extern "C" fn selftest_sync_exception() {
    let esr = arch::esr_el1();
    let far = arch::far_el1();
    let elr = arch::elr_el1();
    if ARMED.swap(false, SeqCst) {
        ESR.store(esr, SeqCst);
        FAR.store(far, SeqCst);
        ELR.store(elr, SeqCst);
        TAKEN.store(true, SeqCst);
        // Every armed access is a single 4-byte A64 instruction.
        arch::set_elr_el1(elr + 4);
        return;
    }
    report(0x200, esr, far, elr)
}

/// Any other vector.
#[unsafe(no_mangle)]
extern "C" fn selftest_unexpected_exception(vector: u64) -> ! {
    report(vector, arch::esr_el1(), arch::far_el1(), arch::elr_el1())
}

fn report(vector: u64, esr: u64, far: u64, elr: u64) -> ! {
    println!("selftest: UNEXPECTED EXCEPTION esr={esr:#x} far={far:#x} elr={elr:#x}");
    println!(
        "selftest: (vector offset {vector:#x}, mpidr {:#x})",
        arch::my_mpidr()
    );
    psci::system_reset()
}
