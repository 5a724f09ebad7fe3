//! Activity sources ("device links"): what tells the hypervisor that a guest's DMA master is in
//! use, so that the SMMU in front of it must be powered.
//!
//! Two sources exist, declared per master in the board file:
//! - a guest's power vote for the master's own domain (on Qualcomm a GDSC in its clock
//!   controller; on QEMU the small emulated power controller in `vdev::power_ctrl`);
//! - PCI: the function's Bus Master Enable together with its PMCSR D-state (D0), seen in the
//!   config-space accesses the hypervisor filters (`vdev::pci_ecam`).
//!
//! A source reports transitions through [`ActivitySink`]. An active master holds one reference
//! on its SMMU's runtime-PM domain; going inactive drops it.

use super::PowerError;

/// Follows whether one master (through one source) is active.
pub trait ActivitySink: Send + Sync {
    /// The master turned active (`true`) or inactive (`false`). Turning active may power the
    /// SMMU up, which can fail (a GDSC that never reports on): the error is returned and the
    /// master stays inactive. Reporting the state it already has is a no-op.
    fn set_active(&self, active: bool) -> Result<(), PowerError>;
}

use super::rpm::{Domain, PowerOps};

/// The link from one master (through one source) to its SMMU's runtime-PM domain: while the
/// master is active it holds one reference on the domain.
///
/// Transitions of one master are serialised by a small lock of its own (they come from config
/// space or power-controller traps, never from a hot path); the domain's fast path stays one
/// atomic. The lock also makes "acquire, then mark active" atomic with respect to a concurrent
/// "mark inactive, then release", so the domain's count can never be released twice.
pub struct MasterLink<P: PowerOps + 'static> {
    name: &'static str,
    domain: &'static Domain<P>,
    active: spin::Mutex<bool>,
}

impl<P: PowerOps + 'static> MasterLink<P> {
    /// A link for the master called `name` (for messages), inactive.
    pub const fn new(name: &'static str, domain: &'static Domain<P>) -> Self {
        Self {
            name,
            domain,
            active: spin::Mutex::new(false),
        }
    }

    /// The master's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the master is active now.
    pub fn is_active(&self) -> bool {
        *self.active.lock()
    }
}

impl<P: PowerOps + Send + Sync + 'static> ActivitySink for MasterLink<P> {
    fn set_active(&self, active: bool) -> Result<(), PowerError> {
        let mut held = self.active.lock();
        match (*held, active) {
            (false, true) => {
                self.domain.acquire()?;
                *held = true;
            }
            (true, false) => {
                *held = false;
                self.domain.release();
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::power::rpm::State;
    use std::boxed::Box;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[derive(Default)]
    struct Ops {
        ons: AtomicU64,
        fail_on: AtomicBool,
    }

    impl PowerOps for Ops {
        fn power_on(&self) -> Result<(), PowerError> {
            if self.fail_on.load(Ordering::SeqCst) {
                return Err(PowerError::Timeout {
                    domain: "smmu",
                    what: "power on",
                });
            }
            self.ons.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn power_off(&self) -> Result<(), PowerError> {
            Ok(())
        }
        fn now(&self) -> u64 {
            0
        }
    }

    fn domain() -> &'static Domain<Ops> {
        Box::leak(Box::new(Domain::new(Ops::default(), 0, false)))
    }

    #[test]
    fn two_masters_hold_the_domain_until_both_are_inactive() {
        let d = domain();
        let (a, b) = (MasterLink::new("a", d), MasterLink::new("b", d));
        a.set_active(true).unwrap();
        a.set_active(true).unwrap();
        assert_eq!(
            (d.state(), d.usage()),
            (State::Active, 1),
            "repeat is a no-op"
        );
        b.set_active(true).unwrap();
        a.set_active(false).unwrap();
        a.set_active(false).unwrap();
        assert!(!d.suspend(), "b still holds it");
        b.set_active(false).unwrap();
        assert_eq!(d.usage(), 0);
        assert!(d.suspend());
        b.set_active(true).unwrap();
        assert_eq!(
            d.ops().ons.load(Ordering::SeqCst),
            2,
            "one power-up per off period"
        );
        assert!(b.is_active() && !a.is_active());
    }

    #[test]
    fn failed_power_up_leaves_the_master_inactive() {
        let d = domain();
        let a = MasterLink::new("a", d);
        d.ops().fail_on.store(true, Ordering::SeqCst);
        assert!(a.set_active(true).is_err());
        assert!(!a.is_active());
        a.set_active(false).unwrap();
        assert_eq!(d.usage(), 0, "no release without a reference");
        d.ops().fail_on.store(false, Ordering::SeqCst);
        a.set_active(true).unwrap();
        assert_eq!((d.state(), d.usage()), (State::Active, 1));
    }

    #[test]
    fn concurrent_toggles_never_unbalance_the_count() {
        let d = domain();
        let a: &'static MasterLink<Ops> = Box::leak(Box::new(MasterLink::new("a", d)));
        let threads: std::vec::Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        a.set_active((i + t) % 2 == 0).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.usage(), u32::from(a.is_active()));
    }
}
