//! How a VM stops and how the run ends.
//!
//! Each VM stops once, for one reason (the first CPU to report wins, later reports are ignored);
//! when the last VM has stopped, the run ends with an exit status that reflects the worst outcome.
//! Under QEMU the status reaches the host through semihosting, so tests can tell a clean power-off
//! from a reset, a crash or a hypervisor failure.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Why a VM stopped, in increasing order of severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum StopReason {
    /// PSCI SYSTEM_OFF: the guest finished cleanly.
    PoweredOff = 1,
    /// PSCI SYSTEM_RESET: the guest asked to be restarted (our test guests: "something failed").
    ResetRequested = 2,
    /// The guest did something the hypervisor cannot continue from (unhandled exception).
    Crashed = 3,
}

impl StopReason {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::PoweredOff),
            2 => Some(Self::ResetRequested),
            3 => Some(Self::Crashed),
            _ => None,
        }
    }

    /// The run's exit status when this is the worst outcome.
    pub fn exit_status(self) -> u32 {
        match self {
            Self::PoweredOff => EXIT_OK,
            Self::ResetRequested => EXIT_VM_RESET,
            Self::Crashed => EXIT_VM_CRASHED,
        }
    }
}

/// Every VM powered off cleanly.
pub const EXIT_OK: u32 = 0;
/// Some VM asked for a reset.
pub const EXIT_VM_RESET: u32 = 1;
/// Some VM died of an unhandled exception.
pub const EXIT_VM_CRASHED: u32 = 2;
/// The hypervisor panicked (or found its own memory changed).
pub const EXIT_HYP_PANIC: u32 = 3;
/// The hypervisor could not boot: bad DTB, board/machine mismatch, not entered at EL2.
pub const EXIT_FATAL: u32 = 4;

/// A VM's run state: running until the first stop report.
#[derive(Debug, Default)]
pub struct VmRunState(AtomicU8);

impl VmRunState {
    pub const fn new() -> Self {
        Self(AtomicU8::new(0))
    }

    /// Records the stop; true only for the first report.
    pub fn stop(&self, reason: StopReason) -> bool {
        self.0
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Why the VM stopped, if it has.
    pub fn stopped(&self) -> Option<StopReason> {
        StopReason::from_u8(self.0.load(Ordering::Acquire))
    }
}

/// Counts stopped VMs and remembers the worst outcome.
#[derive(Debug)]
pub struct RunTracker {
    remaining: AtomicUsize,
    worst: AtomicU8,
}

impl RunTracker {
    pub const fn new(vms: usize) -> Self {
        Self {
            remaining: AtomicUsize::new(vms),
            worst: AtomicU8::new(StopReason::PoweredOff as u8),
        }
    }

    /// Records one VM's stop. Returns the run's exit status when this was the last VM.
    pub fn vm_stopped(&self, reason: StopReason) -> Option<u32> {
        self.worst.fetch_max(reason as u8, Ordering::AcqRel);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let worst = StopReason::from_u8(self.worst.load(Ordering::Acquire))?;
            Some(worst.exit_status())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_stop_wins() {
        let s = VmRunState::new();
        assert_eq!(s.stopped(), None);
        assert!(s.stop(StopReason::ResetRequested));
        assert!(!s.stop(StopReason::PoweredOff));
        assert_eq!(s.stopped(), Some(StopReason::ResetRequested));
    }

    #[test]
    fn last_vm_ends_the_run_with_the_worst_status() {
        let t = RunTracker::new(3);
        assert_eq!(t.vm_stopped(StopReason::PoweredOff), None);
        assert_eq!(t.vm_stopped(StopReason::ResetRequested), None);
        assert_eq!(t.vm_stopped(StopReason::PoweredOff), Some(EXIT_VM_RESET));
        let t = RunTracker::new(1);
        assert_eq!(t.vm_stopped(StopReason::PoweredOff), Some(EXIT_OK));
    }

    #[test]
    fn concurrent_stops_end_the_run_exactly_once() {
        for _ in 0..200 {
            let t = Arc::new(RunTracker::new(4));
            let state = Arc::new(VmRunState::new());
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let (t, state) = (t.clone(), state.clone());
                    std::thread::spawn(move || {
                        let reason = if i == 2 {
                            StopReason::Crashed
                        } else {
                            StopReason::PoweredOff
                        };
                        let won = state.stop(reason);
                        (won, t.vm_stopped(reason))
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(results.iter().filter(|r| r.0).count(), 1);
            let ends: Vec<_> = results.iter().filter_map(|r| r.1).collect();
            assert_eq!(ends, vec![EXIT_VM_CRASHED]);
        }
    }
}
