//! Stage-2 TLB maintenance for an SMMU that may be powered off.
//!
//! [`PoweredTlb`] wraps the SMMU's stage-2 TLB backend. An invalidation is issued only when
//! [`Domain::tlb_begin`] pins a powered SMMU; otherwise it is skipped (and counted), which is
//! safe because a powered-off SMMU comes back with empty TLBs and walks the tables changed
//! before the skip (the argument is in `rpm`'s module docs). Map and unmap therefore never
//! power the SMMU up and never wait for it.
//!
//! The pin is held only while the commands are queued, not until the later `sync`: if the
//! domain is suspended in between, suspend first drains the command queue, so the commands have
//! completed; `sync` then finds the SMMU off and has nothing to wait for.

use crate::mm::stage2::{Invalidation, TlbBackend, TlbError};

use super::rpm::{Domain, PowerOps};

/// A stage-2 TLB backend that reaches the SMMU only while its power domain is active.
pub struct PoweredTlb<B, P: PowerOps + 'static> {
    inner: B,
    domain: &'static Domain<P>,
}

impl<B: TlbBackend, P: PowerOps + 'static> PoweredTlb<B, P> {
    /// `inner` gated by `domain`.
    pub fn new(inner: B, domain: &'static Domain<P>) -> Self {
        Self { inner, domain }
    }
}

impl<B: TlbBackend, P: PowerOps + Send + Sync + 'static> TlbBackend for PoweredTlb<B, P> {
    fn invalidate(&self, inv: &Invalidation) {
        if let Some(_pin) = self.domain.tlb_begin() {
            self.inner.invalidate(inv);
        }
    }

    fn sync(&self, vmid: u16) -> Result<(), TlbError> {
        match self.domain.get_if_active() {
            Some(_pin) => self.inner.sync(vmid),
            None => Ok(()),
        }
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::power::PowerError;
    use crate::power::rpm::State;
    use std::boxed::Box;
    use std::sync::Mutex;
    use std::vec::Vec;

    struct Ops;
    impl PowerOps for Ops {
        fn power_on(&self) -> Result<(), PowerError> {
            Ok(())
        }
        fn power_off(&self) -> Result<(), PowerError> {
            Ok(())
        }
        fn now(&self) -> u64 {
            0
        }
    }

    /// Records what reached the "SMMU" and checks it was powered (pinned) at that moment.
    struct Recorder {
        domain: &'static Domain<Ops>,
        log: Mutex<Vec<&'static str>>,
    }
    impl TlbBackend for Recorder {
        fn invalidate(&self, _inv: &Invalidation) {
            assert_eq!(self.domain.state(), State::Active);
            assert!(self.domain.usage() > 0, "issued without a pin");
            self.log.lock().unwrap().push("inv");
        }
        fn sync(&self, _vmid: u16) -> Result<(), TlbError> {
            assert!(self.domain.usage() > 0, "synced without a pin");
            self.log.lock().unwrap().push("sync");
            Ok(())
        }
        fn name(&self) -> &str {
            "rec"
        }
    }

    #[test]
    fn skipped_while_off_issued_while_on() {
        let domain: &'static Domain<Ops> = Box::leak(Box::new(Domain::new(Ops, 0, true)));
        let gate = PoweredTlb::new(
            Recorder {
                domain,
                log: Mutex::new(Vec::new()),
            },
            domain,
        );
        let inv = Invalidation {
            vmid: 1,
            range: None,
            leaf_only: false,
            level: 0,
        };
        gate.invalidate(&inv);
        gate.sync(1).unwrap();
        assert!(domain.suspend());
        gate.invalidate(&inv);
        gate.sync(1).unwrap();
        assert_eq!(domain.state(), State::Suspended, "never powers up");
        assert_eq!(domain.stats().tlbi_skipped, 1);
        drop(domain.get().unwrap());
        gate.invalidate(&inv);
        gate.sync(1).unwrap();
        assert_eq!(
            *gate.inner.log.lock().unwrap(),
            ["inv", "sync", "inv", "sync"]
        );
        assert_eq!(gate.name(), "rec");
    }
}
