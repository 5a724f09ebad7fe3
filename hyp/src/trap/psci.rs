//! Per-VM emulation of PSCI 1.1 and the SMCCC 1.1 architecture calls.
//!
//! Guests bring up their secondary vCPUs and power the VM off through PSCI calls (HVC or trapped
//! SMC). [`VPsci`] answers them from the VM's own view of its vCPUs, without touching firmware:
//! a vCPU is a software power domain with three states, and `CPU_ON` only records the entry point
//! for the target vCPU's physical CPU to pick up.
//!
//! Specs: Arm DEN0022 (PSCI, version 1.1: function IDs, arguments, return codes; section 5) and
//! DEN0028 (SMCCC 1.1: `SMCCC_VERSION`, `SMCCC_ARCH_FEATURES`, 32-bit convention). Function IDs and
//! error codes come from the `smccc` crate.
//!
//! Topology: vCPU `i` has MPIDR affinity Aff0 = `i`, Aff1..Aff3 = 0, so a VM holds at most 256
//! vCPUs. The arch layer programs `VMPIDR_EL2` from [`mpidr_of`].

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use alloc::boxed::Box;
use alloc::vec::Vec;

use smccc::arch::{SMCCC_ARCH_FEATURES, SMCCC_VERSION};
use smccc::psci::error::{ALREADY_ON, INVALID_PARAMETERS, NOT_SUPPORTED, ON_PENDING, SUCCESS};
use smccc::psci::{
    PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64, PSCI_CPU_OFF, PSCI_CPU_ON_32, PSCI_CPU_ON_64,
    PSCI_FEATURES, PSCI_MIGRATE_INFO_TYPE, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET, PSCI_VERSION,
};

/// PSCI version we implement: 1.1 (major in bits `[30:16]`, minor in `[15:0]`).
pub const PSCI_VERSION_1_1: u32 = 0x0001_0001;
/// SMCCC version we implement: 1.1.
pub const SMCCC_VERSION_1_1: u32 = 0x0001_0001;
/// `MIGRATE_INFO_TYPE`: no Trusted OS to migrate.
const MIGRATE_NOT_REQUIRED: i32 = 2;

/// SMCCC function ID bit 30: the call uses the SMC64/HVC64 convention.
const FID_SMC64: u32 = 1 << 30;

/// Largest VM: Aff0 is 8 bits wide.
pub const MAX_VCPUS: usize = 256;

/// Power state of a vCPU as PSCI sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuPowerState {
    /// Not running; `CPU_ON` may start it.
    Off,
    /// A `CPU_ON` succeeded; the vCPU's physical CPU has not picked up the entry point yet.
    OnPending,
    /// Running guest code.
    On,
}

// Internal encoding in the state atomics. `CLAIMED` is an On-pending vCPU whose entry point is
// still being written by the `CPU_ON` caller that won the race; outside it reads as OnPending.
const OFF: u8 = 0;
const CLAIMED: u8 = 1;
const ON_PENDING_STATE: u8 = 2;
const ON: u8 = 3;

/// What the arch layer must do after a PSCI/SMCCC call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciOutcome {
    /// Put this value in the caller's x0 and return to it.
    Return(u64),
    /// The caller is now Off (`CPU_OFF` never returns on success): park its physical CPU and poll
    /// [`VPsci::take_pending_entry`] until another vCPU turns it on again.
    CpuOff,
    /// The guest asked to power off the whole VM.
    SystemOff,
    /// The guest asked to reset the whole VM.
    SystemReset,
    /// `CPU_ON` succeeded: `target` is now OnPending with its entry point stored. Put `ret` (0,
    /// SUCCESS) in the caller's x0 and wake the target's physical CPU (e.g. SEV or an IPI).
    CpuOnStarted { target: usize, ret: u64 },
}

/// One vCPU's PSCI state.
struct VcpuSlot {
    state: AtomicU8,
    /// Entry point and context ID of the pending `CPU_ON`. Written only by the caller that moved
    /// the state Off -> CLAIMED, read only after observing ON_PENDING (Release/Acquire on `state`).
    entry: AtomicU64,
    context_id: AtomicU64,
}

/// The PSCI state of one VM: one power state per vCPU, all lock-free so any vCPU's trap handler
/// (and the parked physical CPUs polling for `CPU_ON`) can use it concurrently.
pub struct VPsci {
    vcpus: Box<[VcpuSlot]>,
}

/// MPIDR affinity of vCPU `vcpu` (Aff0 = index). `VMPIDR_EL2` also needs bit 31 (RES1) set.
pub const fn mpidr_of(vcpu: usize) -> u64 {
    vcpu as u64
}

/// Sign-extends a PSCI return code into x0: SMCCC returns W0 for 32-bit calls, and every value we
/// return fits in 32 bits, so one encoding serves both conventions.
fn ret(code: i32) -> u64 {
    i64::from(code) as u64
}

impl VPsci {
    /// Creates the PSCI state of a VM with `nvcpus` vCPUs: vCPU 0 (the boot vCPU) On, the others
    /// Off until the guest turns them on.
    ///
    /// # Panics
    /// If `nvcpus` is 0 or more than [`MAX_VCPUS`]; a VM configuration is validated before this.
    pub fn new(nvcpus: usize) -> Self {
        assert!(
            (1..=MAX_VCPUS).contains(&nvcpus),
            "a VM needs 1..={MAX_VCPUS} vCPUs, got {nvcpus}"
        );
        let vcpus = (0..nvcpus)
            .map(|i| VcpuSlot {
                state: AtomicU8::new(if i == 0 { ON } else { OFF }),
                entry: AtomicU64::new(0),
                context_id: AtomicU64::new(0),
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        VPsci { vcpus }
    }

    /// Number of vCPUs in the VM.
    pub fn nvcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// The vCPU with MPIDR affinity `mpidr`, if it belongs to this VM. Non-affinity bits must be
    /// zero, as PSCI requires of `target_cpu`.
    pub fn vcpu_of_mpidr(&self, mpidr: u64) -> Option<usize> {
        // Our vCPUs only use Aff0, so every other bit (affinity or not) must be zero.
        let vcpu = usize::from(u8::try_from(mpidr).ok()?);
        (vcpu < self.vcpus.len()).then_some(vcpu)
    }

    /// Current power state of `vcpu` (a vCPU index out of range reads as Off).
    pub fn state(&self, vcpu: usize) -> VcpuPowerState {
        match self
            .vcpus
            .get(vcpu)
            .map(|s| s.state.load(Ordering::Acquire))
        {
            Some(ON) => VcpuPowerState::On,
            Some(CLAIMED | ON_PENDING_STATE) => VcpuPowerState::OnPending,
            _ => VcpuPowerState::Off,
        }
    }

    /// Marks `vcpu` Off, e.g. when its physical CPU stops running it for good. A pending
    /// `CPU_ON` for it is dropped. Out-of-range indexes are ignored.
    pub fn mark_off(&self, vcpu: usize) {
        if let Some(slot) = self.vcpus.get(vcpu) {
            slot.state.store(OFF, Ordering::Release);
        }
    }

    /// If `vcpu` is OnPending, moves it to On and returns the `(entry point, context ID)` of the
    /// `CPU_ON` that started it; the arch layer then starts the vCPU at the entry point with x0 =
    /// context ID and the reset state PSCI prescribes (EL1h, DAIF masked, MMU and caches off).
    ///
    /// Meant to be polled by the parked physical CPU of an Off vCPU; exactly one call returns
    /// `Some` per successful `CPU_ON`.
    pub fn take_pending_entry(&self, vcpu: usize) -> Option<(u64, u64)> {
        let slot = self.vcpus.get(vcpu)?;
        // Acquire pairs with the Release store of ON_PENDING in `cpu_on`, making the entry point
        // written before it visible here.
        slot.state
            .compare_exchange(ON_PENDING_STATE, ON, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some((
            slot.entry.load(Ordering::Relaxed),
            slot.context_id.load(Ordering::Relaxed),
        ))
    }

    /// Handles a PSCI or SMCCC architecture call made by vCPU `caller` with function ID `fid`
    /// (w0) and arguments `args` (x1..x3).
    ///
    /// Calls using the 32-bit convention (function ID bit 30 clear) only see the low 32 bits of
    /// their arguments. Unknown function IDs return NOT_SUPPORTED (-1), as SMCCC requires.
    pub fn handle_call(&self, caller: usize, fid: u32, args: [u64; 3]) -> PsciOutcome {
        let args = if fid & FID_SMC64 == 0 {
            args.map(|a| a & 0xffff_ffff)
        } else {
            args
        };
        let code = match fid {
            PSCI_VERSION => PSCI_VERSION_1_1 as i32,
            PSCI_FEATURES => self.features(args[0]),
            PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => return self.cpu_on(args[0], args[1], args[2]),
            PSCI_CPU_OFF => {
                self.mark_off(caller);
                return PsciOutcome::CpuOff;
            }
            PSCI_AFFINITY_INFO_32 | PSCI_AFFINITY_INFO_64 => self.affinity_info(args[0], args[1]),
            PSCI_MIGRATE_INFO_TYPE => MIGRATE_NOT_REQUIRED,
            PSCI_SYSTEM_OFF => return PsciOutcome::SystemOff,
            PSCI_SYSTEM_RESET => return PsciOutcome::SystemReset,
            SMCCC_VERSION => SMCCC_VERSION_1_1 as i32,
            // No SMCCC_ARCH_WORKAROUND_* or SOC_ID yet. Linux then treats the Spectre-v2/SSB
            // mitigation calls as unavailable, which is the truth.
            SMCCC_ARCH_FEATURES => NOT_SUPPORTED,
            _ => NOT_SUPPORTED,
        };
        PsciOutcome::Return(ret(code))
    }

    /// `PSCI_FEATURES`: 0 (present, no feature flags) for each function we implement. PSCI 1.1
    /// (DEN0022 5.1.14) also lets it be asked about `SMCCC_VERSION`, which is how Linux finds out
    /// SMCCC 1.1 is there. Anything else, including the SMCCC arch calls, is NOT_SUPPORTED.
    fn features(&self, queried: u64) -> i32 {
        let Ok(queried) = u32::try_from(queried) else {
            return NOT_SUPPORTED;
        };
        match queried {
            PSCI_VERSION
            | PSCI_FEATURES
            | PSCI_CPU_ON_32
            | PSCI_CPU_ON_64
            | PSCI_CPU_OFF
            | PSCI_AFFINITY_INFO_32
            | PSCI_AFFINITY_INFO_64
            | PSCI_MIGRATE_INFO_TYPE
            | PSCI_SYSTEM_OFF
            | PSCI_SYSTEM_RESET
            | SMCCC_VERSION => SUCCESS,
            _ => NOT_SUPPORTED,
        }
    }

    /// `CPU_ON(target_cpu, entry_point_address, context_id)`.
    ///
    /// Several vCPUs may target the same vCPU at once: the Off -> CLAIMED compare-exchange lets
    /// exactly one of them win and store the entry point; the others see ON_PENDING (or ALREADY_ON
    /// once the target picked it up). The entry point is not checked against guest RAM: a bad one
    /// faults in the guest's own vCPU, which only hurts that VM.
    fn cpu_on(&self, target: u64, entry: u64, context_id: u64) -> PsciOutcome {
        let Some(vcpu) = self.vcpu_of_mpidr(target) else {
            return PsciOutcome::Return(ret(INVALID_PARAMETERS));
        };
        let slot = &self.vcpus[vcpu];
        match slot
            .state
            .compare_exchange(OFF, CLAIMED, Ordering::Acquire, Ordering::Acquire)
        {
            Ok(_) => {
                slot.entry.store(entry, Ordering::Relaxed);
                slot.context_id.store(context_id, Ordering::Relaxed);
                // Release publishes the entry point to `take_pending_entry`.
                slot.state.store(ON_PENDING_STATE, Ordering::Release);
                PsciOutcome::CpuOnStarted {
                    target: vcpu,
                    ret: ret(SUCCESS),
                }
            }
            Err(ON) => PsciOutcome::Return(ret(ALREADY_ON)),
            Err(_) => PsciOutcome::Return(ret(ON_PENDING)),
        }
    }

    /// `AFFINITY_INFO(target_affinity, lowest_affinity_level)`: only level 0 (a single vCPU) is
    /// supported; ON = 0, OFF = 1, ON_PENDING = 2.
    fn affinity_info(&self, target: u64, lowest_level: u64) -> i32 {
        if lowest_level != 0 {
            return INVALID_PARAMETERS;
        }
        match self.vcpu_of_mpidr(target).map(|v| self.state(v)) {
            Some(VcpuPowerState::On) => 0,
            Some(VcpuPowerState::Off) => 1,
            Some(VcpuPowerState::OnPending) => 2,
            None => INVALID_PARAMETERS,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use smccc::psci::{PSCI_CPU_SUSPEND_64, PSCI_MIGRATE_64, PSCI_SYSTEM_RESET2_64};
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::vec;

    const NOT_SUPP: PsciOutcome = PsciOutcome::Return(u64::MAX);

    fn r(code: i32) -> PsciOutcome {
        PsciOutcome::Return(i64::from(code) as u64)
    }

    #[test]
    fn versions_and_features() {
        let p = VPsci::new(2);
        assert_eq!(p.handle_call(0, PSCI_VERSION, [0; 3]), r(0x1_0001));
        assert_eq!(p.handle_call(0, SMCCC_VERSION, [0; 3]), r(0x1_0001));
        for fid in [
            PSCI_VERSION,
            PSCI_FEATURES,
            PSCI_CPU_ON_32,
            PSCI_CPU_ON_64,
            PSCI_CPU_OFF,
            PSCI_AFFINITY_INFO_32,
            PSCI_AFFINITY_INFO_64,
            PSCI_MIGRATE_INFO_TYPE,
            PSCI_SYSTEM_OFF,
            PSCI_SYSTEM_RESET,
            SMCCC_VERSION,
        ] {
            assert_eq!(
                p.handle_call(0, PSCI_FEATURES, [fid.into(), 0, 0]),
                r(0),
                "{fid:#x}"
            );
        }
        for fid in [
            PSCI_CPU_SUSPEND_64,
            PSCI_MIGRATE_64,
            PSCI_SYSTEM_RESET2_64,
            SMCCC_ARCH_FEATURES,
            0x8000_8000,
            0xdead_beef,
        ] {
            assert_eq!(
                p.handle_call(0, PSCI_FEATURES, [fid.into(), 0, 0]),
                NOT_SUPP
            );
        }
        // PSCI_FEATURES is an SMC32 call: the upper half of x1 is ignored.
        assert_eq!(
            p.handle_call(0, PSCI_FEATURES, [(1 << 32) | 0x8400_0000, 0, 0]),
            r(0)
        );
        // There is no SMC64 form of it.
        assert_eq!(
            p.handle_call(0, PSCI_FEATURES | FID_SMC64, [0x8400_0000, 0, 0]),
            NOT_SUPP
        );
        assert_eq!(
            p.handle_call(0, SMCCC_ARCH_FEATURES, [0x8000_8000, 0, 0]),
            NOT_SUPP
        );
        assert_eq!(p.handle_call(0, PSCI_MIGRATE_INFO_TYPE, [0; 3]), r(2));
        assert_eq!(p.handle_call(0, PSCI_CPU_SUSPEND_64, [0; 3]), NOT_SUPP);
        assert_eq!(p.handle_call(0, 0xc200_0000, [0; 3]), NOT_SUPP);
        assert_eq!(NOT_SUPP, PsciOutcome::Return(0xffff_ffff_ffff_ffff));
    }

    #[test]
    fn cpu_on_off_lifecycle() {
        let p = VPsci::new(4);
        assert_eq!(p.nvcpus(), 4);
        assert_eq!(p.state(0), VcpuPowerState::On);
        assert_eq!(p.state(1), VcpuPowerState::Off);
        assert_eq!(p.take_pending_entry(1), None);

        assert_eq!(
            p.handle_call(0, PSCI_CPU_ON_64, [1, 0x4008_0000, 0x1234_5678_9abc]),
            PsciOutcome::CpuOnStarted { target: 1, ret: 0 }
        );
        assert_eq!(p.state(1), VcpuPowerState::OnPending);
        assert_eq!(p.handle_call(0, PSCI_AFFINITY_INFO_64, [1, 0, 0]), r(2));
        assert_eq!(
            p.handle_call(2, PSCI_CPU_ON_64, [1, 0x5000, 0]),
            r(ON_PENDING)
        );
        assert_eq!(
            p.take_pending_entry(1),
            Some((0x4008_0000, 0x1234_5678_9abc))
        );
        assert_eq!(p.take_pending_entry(1), None);
        assert_eq!(p.state(1), VcpuPowerState::On);
        assert_eq!(p.handle_call(0, PSCI_AFFINITY_INFO_64, [1, 0, 0]), r(0));
        assert_eq!(
            p.handle_call(0, PSCI_CPU_ON_64, [1, 0x5000, 0]),
            r(ALREADY_ON)
        );
        // Turning on oneself.
        assert_eq!(
            p.handle_call(0, PSCI_CPU_ON_64, [0, 0x5000, 0]),
            r(ALREADY_ON)
        );

        assert_eq!(p.handle_call(1, PSCI_CPU_OFF, [0; 3]), PsciOutcome::CpuOff);
        assert_eq!(p.state(1), VcpuPowerState::Off);
        assert_eq!(p.handle_call(0, PSCI_AFFINITY_INFO_32, [1, 0, 0]), r(1));
        // And back on.
        assert_eq!(
            p.handle_call(0, PSCI_CPU_ON_64, [1, 0x6000, 7]),
            PsciOutcome::CpuOnStarted { target: 1, ret: 0 }
        );
        assert_eq!(p.take_pending_entry(1), Some((0x6000, 7)));

        p.mark_off(3);
        p.mark_off(99);
        assert_eq!(p.state(99), VcpuPowerState::Off);
        assert_eq!(p.take_pending_entry(99), None);
    }

    #[test]
    fn invalid_parameters() {
        let p = VPsci::new(2);
        // Not a vCPU of this VM, Aff1/Aff2/Aff3 set, or non-affinity bits set.
        for mpidr in [2, 0x100, 0x1_0000, 0x1_0000_0000, 1 << 31, 1 << 24, 1 << 40] {
            assert_eq!(
                p.handle_call(0, PSCI_CPU_ON_64, [mpidr, 0x4000, 0]),
                r(INVALID_PARAMETERS),
                "{mpidr:#x}"
            );
            assert_eq!(
                p.handle_call(0, PSCI_AFFINITY_INFO_64, [mpidr, 0, 0]),
                r(INVALID_PARAMETERS)
            );
        }
        // Only the lowest affinity level 0 is supported.
        for level in 1..=3 {
            assert_eq!(
                p.handle_call(0, PSCI_AFFINITY_INFO_64, [0, level, 0]),
                r(INVALID_PARAMETERS)
            );
        }
        assert_eq!(p.state(1), VcpuPowerState::Off);
    }

    #[test]
    fn thirty_two_bit_calls_mask_arguments() {
        let p = VPsci::new(2);
        // Upper halves of x1..x3 are ignored by the 32-bit convention.
        assert_eq!(
            p.handle_call(
                0,
                PSCI_CPU_ON_32,
                [
                    0xffff_ffff_0000_0001,
                    0xaaaa_aaaa_4008_0000,
                    0x5555_5555_0000_0042
                ]
            ),
            PsciOutcome::CpuOnStarted { target: 1, ret: 0 }
        );
        assert_eq!(p.take_pending_entry(1), Some((0x4008_0000, 0x42)));
        assert_eq!(
            p.handle_call(
                0,
                PSCI_AFFINITY_INFO_32,
                [0xffff_ffff_0000_0001, 1 << 32, 0]
            ),
            r(0)
        );
        // The 64-bit variant does look at the upper halves.
        assert_eq!(
            p.handle_call(0, PSCI_AFFINITY_INFO_64, [0xffff_ffff_0000_0001, 0, 0]),
            r(INVALID_PARAMETERS)
        );
        // Errors of 32-bit calls are sign-extended to 64 bits.
        assert_eq!(
            p.handle_call(0, PSCI_CPU_ON_32, [5, 0, 0]),
            PsciOutcome::Return(0xffff_ffff_ffff_fffe)
        );
    }

    #[test]
    fn system_calls() {
        let p = VPsci::new(1);
        assert_eq!(
            p.handle_call(0, PSCI_SYSTEM_OFF, [0; 3]),
            PsciOutcome::SystemOff
        );
        assert_eq!(
            p.handle_call(0, PSCI_SYSTEM_RESET, [0; 3]),
            PsciOutcome::SystemReset
        );
    }

    #[test]
    #[should_panic]
    fn too_many_vcpus() {
        let _ = VPsci::new(MAX_VCPUS + 1);
    }

    #[test]
    fn concurrent_cpu_on_has_one_winner() {
        const CALLERS: usize = 8;
        for round in 0..200u64 {
            let p = Arc::new(VPsci::new(CALLERS + 1));
            // All callers are On, so they may make calls; the target is the last vCPU.
            let target = CALLERS;
            for caller in 1..CALLERS {
                assert!(matches!(
                    p.handle_call(0, PSCI_CPU_ON_64, [caller as u64, 0, 0]),
                    PsciOutcome::CpuOnStarted { .. }
                ));
                p.take_pending_entry(caller).unwrap();
            }
            let barrier = Arc::new(Barrier::new(CALLERS + 1));
            let callers: vec::Vec<_> = (0..CALLERS)
                .map(|caller| {
                    let (p, barrier) = (p.clone(), barrier.clone());
                    thread::spawn(move || {
                        barrier.wait();
                        let entry = 0x1000 * (caller as u64 + 1);
                        let out =
                            p.handle_call(caller, PSCI_CPU_ON_64, [target as u64, entry, round]);
                        (entry, out)
                    })
                })
                .collect();
            // The target's physical CPU polls concurrently.
            let poller = {
                let (p, barrier) = (p.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    loop {
                        if let Some(e) = p.take_pending_entry(target) {
                            return e;
                        }
                        std::hint::spin_loop();
                    }
                })
            };
            let results: vec::Vec<_> = callers.into_iter().map(|t| t.join().unwrap()).collect();
            let winners: vec::Vec<_> = results
                .iter()
                .filter(|(_, out)| *out == PsciOutcome::CpuOnStarted { target, ret: 0 })
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            for (_, out) in &results {
                assert!(
                    *out == PsciOutcome::CpuOnStarted { target, ret: 0 }
                        || *out == r(ON_PENDING)
                        || *out == r(ALREADY_ON),
                    "{out:?}"
                );
            }
            // The poller got exactly the winner's entry point and context.
            assert_eq!(poller.join().unwrap(), (winners[0].0, round));
            assert_eq!(p.state(target), VcpuPowerState::On);
        }
    }
}
