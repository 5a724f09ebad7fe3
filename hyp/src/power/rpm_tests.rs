//! Tests of runtime PM: host tests with std threads, loom models under `--cfg loom`.

use super::*;

#[cfg(not(loom))]
mod host {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64 as StdU64, Ordering as O};
    use std::vec::Vec;

    fn err() -> PowerError {
        PowerError::Timeout {
            domain: "test",
            what: "power on",
        }
    }

    /// Power ops that check the contract: on and off strictly alternate, never overlap, and
    /// `power_off` never runs while a `get` caller holds its reference.
    #[derive(Default)]
    struct Ops {
        powered: AtomicBool,
        busy: AtomicBool,
        /// Callers that hold a reference returned by `get` (set by the test around its use).
        holders: StdU64,
        ons: StdU64,
        offs: StdU64,
        fail_on: AtomicBool,
        fail_off: AtomicBool,
        clock: StdU64,
    }

    impl PowerOps for Ops {
        fn power_on(&self) -> Result<(), PowerError> {
            assert!(!self.busy.swap(true, O::SeqCst), "overlapping power ops");
            assert!(!self.powered.load(O::SeqCst), "power_on while on");
            self.clock.fetch_add(7, O::SeqCst);
            let r = if self.fail_on.load(O::SeqCst) {
                Err(err())
            } else {
                self.powered.store(true, O::SeqCst);
                self.ons.fetch_add(1, O::SeqCst);
                Ok(())
            };
            self.busy.store(false, O::SeqCst);
            r
        }

        fn power_off(&self) -> Result<(), PowerError> {
            assert!(!self.busy.swap(true, O::SeqCst), "overlapping power ops");
            assert!(self.powered.load(O::SeqCst), "power_off while off");
            assert_eq!(self.holders.load(O::SeqCst), 0, "power_off with a holder");
            self.powered.store(false, O::SeqCst);
            self.offs.fetch_add(1, O::SeqCst);
            self.busy.store(false, O::SeqCst);
            if self.fail_off.load(O::SeqCst) {
                Err(err())
            } else {
                Ok(())
            }
        }

        fn now(&self) -> u64 {
            self.clock.load(O::SeqCst)
        }
    }

    #[test]
    fn state_machine() {
        let d = Domain::new(Ops::default(), 20, false);
        assert_eq!(d.state(), State::Suspended);
        assert_eq!(d.next_deadline(), None);
        assert!(!d.suspend(), "already off");
        {
            let r = d.get().unwrap();
            assert_eq!(d.state(), State::Active);
            assert_eq!(d.usage(), 1);
            assert!(d.ops().powered.load(O::SeqCst));
            assert_eq!(d.next_deadline(), None, "in use");
            assert!(!d.suspend(), "in use");
            assert!(!d.poll(u64::MAX));
            let r2 = d.get().unwrap();
            assert_eq!(d.usage(), 2);
            drop(r2);
            drop(r);
        }
        assert_eq!(d.usage(), 0);
        // Idle since the put at clock 7 (the power_on advanced it).
        d.ops().clock.store(10, O::SeqCst);
        let r = d.get().unwrap();
        drop(r);
        assert_eq!(d.next_deadline(), Some(30));
        assert!(!d.poll(29));
        assert_eq!(d.state(), State::Active);
        assert_eq!(d.epoch(), 0);
        assert!(d.poll(30));
        assert_eq!(d.state(), State::Suspended);
        assert_eq!(d.epoch(), 1);
        assert!(!d.ops().powered.load(O::SeqCst));
        // Off from the suspend (the clock read 10) to the next resume at 100.
        d.ops().clock.store(100, O::SeqCst);
        drop(d.get().unwrap());
        let s = d.stats();
        assert_eq!(s.power_ups, 2);
        assert_eq!(s.power_downs, 1);
        assert_eq!(
            s.off_ticks, 90,
            "0..0 before the first resume, then 10..100"
        );
        assert_eq!(s.resume_last, 7);
        assert_eq!(s.resume_max, 7);
        assert_eq!(s.resume_total, 14, "two power-ups of 7 ticks each");
        assert_eq!(s.power_on_errors, 0);
    }

    #[test]
    fn failing_power_on() {
        let d = Domain::new(Ops::default(), 0, false);
        d.ops().fail_on.store(true, O::SeqCst);
        assert_eq!(d.get().err(), Some(err()));
        assert_eq!(d.state(), State::Suspended);
        assert_eq!(d.usage(), 0, "the failed get's count is given back");
        assert_eq!(d.stats().power_on_errors, 1);
        assert_eq!(d.stats().power_ups, 0);
        d.ops().fail_on.store(false, O::SeqCst);
        let r = d.get().unwrap();
        assert_eq!(d.state(), State::Active);
        drop(r);
        assert_eq!(d.stats().power_ups, 1);
    }

    #[test]
    fn failing_power_off_counts_as_off() {
        let d = Domain::new(Ops::default(), 0, true);
        d.ops().powered.store(true, O::SeqCst);
        d.ops().fail_off.store(true, O::SeqCst);
        assert!(d.suspend());
        assert_eq!(d.state(), State::Suspended);
        assert_eq!(d.stats().power_off_errors, 1);
        assert!(d.tlb_begin().is_none());
        drop(d.get().unwrap());
        assert_eq!(d.state(), State::Active);
    }

    #[test]
    fn tlb_skip_counting() {
        let d = Domain::new(Ops::default(), 0, false);
        for _ in 0..3 {
            assert!(d.tlb_begin().is_none());
        }
        assert_eq!(d.stats().tlbi_skipped, 3);
        assert_eq!(d.usage(), 0);
        assert_eq!(d.state(), State::Suspended, "tlb_begin never powers up");
        let r = d.get().unwrap();
        let g = d.tlb_begin().expect("active");
        assert_eq!(g.epoch(), 0);
        drop(r);
        assert!(!d.suspend(), "the guard pins the domain");
        drop(g);
        assert!(d.suspend());
        assert!(d.tlb_begin().is_none());
        let _r = d.get().unwrap();
        assert_eq!(d.tlb_begin().map(|g| g.epoch()), Some(1));
        assert_eq!(d.stats().tlbi_skipped, 4);
    }

    #[test]
    fn acquire_release_and_get_if_active() {
        let d = Domain::new(Ops::default(), 0, false);
        assert!(d.get_if_active().is_none(), "off: nothing to pin");
        assert_eq!(d.stats().tlbi_skipped, 0, "get_if_active counts nothing");
        assert_eq!(d.state(), State::Suspended, "and never powers up");
        d.acquire().unwrap();
        assert_eq!((d.state(), d.usage()), (State::Active, 1));
        assert!(!d.suspend(), "an acquired reference holds the domain on");
        {
            let _p = d.get_if_active().expect("active");
            assert_eq!(d.usage(), 2);
        }
        d.release();
        assert_eq!(d.usage(), 0);
        assert!(d.suspend());
        d.ops().fail_on.store(true, O::SeqCst);
        assert!(d.acquire().is_err());
        assert_eq!((d.state(), d.usage()), (State::Suspended, 0));
    }

    #[test]
    fn ms_to_ticks_default() {
        assert_eq!(ms_to_ticks(DEFAULT_AUTOSUSPEND_MS, 19_200_000), 384_000);
        assert_eq!(ms_to_ticks(20, 62_500_000), 1_250_000);
    }

    /// Many threads hammer get/put (and tlb_begin) while another polls with a zero delay.
    #[test]
    fn concurrent_get_put_vs_poll() {
        let threads = 6;
        let iters = 20_000;
        let d = Arc::new(Domain::new(Ops::default(), 0, false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for t in 0..threads {
            let d = d.clone();
            hs.push(std::thread::spawn(move || {
                let mut got = 0u64;
                for i in 0..iters {
                    if (i + t) % 5 == 0 {
                        if let Some(g) = d.tlb_begin() {
                            assert!(d.ops().powered.load(O::SeqCst), "TLBI to an off SMMU");
                            drop(g);
                        }
                        continue;
                    }
                    let r = d.get().unwrap();
                    d.ops().holders.fetch_add(1, O::SeqCst);
                    assert!(d.ops().powered.load(O::SeqCst), "get returned while off");
                    assert_eq!(d.state(), State::Active);
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                    d.ops().holders.fetch_sub(1, O::SeqCst);
                    drop(r);
                    got += 1;
                    // Idle gaps, so that the count often reaches 0 and the poller suspends.
                    if i % 250 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
                got
            }));
        }
        let poller = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                // Once the workers are done the domain is idle: keep polling until it has been
                // suspended at least once, so the assertion below never depends on timing.
                while !stop.load(O::SeqCst) || (n == 0 && d.state() != State::Suspended) {
                    if d.poll(u64::MAX) {
                        n += 1;
                    }
                    std::hint::spin_loop();
                }
                n
            })
        };
        let gets: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        stop.store(true, O::SeqCst);
        let suspends = poller.join().unwrap();
        assert!(gets > 0);
        assert!(suspends > 0, "the poller never found the domain idle");
        assert_eq!(d.usage(), 0, "counts balance");
        let (ons, offs) = (d.ops().ons.load(O::SeqCst), d.ops().offs.load(O::SeqCst));
        let s = d.stats();
        assert_eq!(s.power_downs, suspends);
        assert_eq!(s.power_ups, ons);
        assert_eq!(s.power_downs, offs);
        // Started off: ons and offs alternate, so ons == offs or ons == offs + 1.
        match d.state() {
            State::Active => assert_eq!(ons, offs + 1),
            State::Suspended => assert_eq!(ons, offs),
            s => panic!("transient state {s:?} at rest"),
        }
        assert_eq!(d.epoch() as u64, offs);
        std::println!("{gets} gets, {ons} power-ups, {offs} power-downs, {s:?}");
    }
}

#[cfg(loom)]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicBool, AtomicU64 as LU64, Ordering as O};

    /// A model SMMU: a power flag and a one-entry TLB filled from the table at power-on.
    struct Smmu {
        powered: AtomicBool,
        on_off: LU64,
        /// The stage-2 entry (a model table).
        table: LU64,
        /// What the TLB holds: a table value, or `EMPTY`.
        tlb: LU64,
    }

    const EMPTY: u64 = u64::MAX;

    impl PowerOps for Arc<Smmu> {
        fn power_on(&self) -> Result<(), PowerError> {
            assert!(!self.powered.load(O::Relaxed), "power_on while on");
            // Reset: the TLB starts empty, then the SMMU walks (and caches) the current table.
            let t = self.table.load(O::Relaxed);
            self.tlb.store(t, O::Relaxed);
            self.powered.store(true, O::Relaxed);
            self.on_off.fetch_add(1, O::Relaxed);
            Ok(())
        }

        fn power_off(&self) -> Result<(), PowerError> {
            assert!(self.powered.load(O::Relaxed), "power_off while off");
            self.powered.store(false, O::Relaxed);
            self.tlb.store(EMPTY, O::Relaxed);
            self.on_off.fetch_add(1, O::Relaxed);
            Ok(())
        }

        fn now(&self) -> u64 {
            0
        }
    }

    fn smmu() -> Arc<Smmu> {
        Arc::new(Smmu {
            powered: AtomicBool::new(true),
            on_off: LU64::new(0),
            table: LU64::new(0),
            tlb: LU64::new(0),
        })
    }

    /// A get/put races a suspend (zero delay): a returned reference always sees a powered SMMU,
    /// power_off never runs under a reference, on/off alternate and the count balances.
    #[test]
    fn loom_get_put_vs_suspend() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let s = smmu();
            let d = Arc::new(Domain::new(s.clone(), 0, true));
            let d2 = d.clone();
            let t = loom::thread::spawn(move || {
                let r = d2.get().unwrap();
                assert!(d2.ops().powered.load(O::Relaxed), "get returned while off");
                drop(r);
            });
            let suspended = d.poll(0);
            t.join().unwrap();
            assert_eq!(d.usage(), 0);
            let flips = s.on_off.load(O::Relaxed);
            assert_eq!(d.stats().power_downs, u64::from(suspended));
            match d.state() {
                State::Active => {
                    assert!(s.powered.load(O::Relaxed));
                    assert_eq!(flips % 2, 0);
                }
                State::Suspended => {
                    assert!(!s.powered.load(O::Relaxed));
                    assert_eq!(flips, 1);
                }
                st => panic!("transient state {st:?} at rest"),
            }
        });
    }

    /// Thread A changes the table, then invalidates through `tlb_begin`; thread B suspends and
    /// resumes the domain. Whatever the interleaving, the SMMU's TLB never ends up holding the old
    /// table value: either A's invalidation reached a powered SMMU, or the SMMU was powered down
    /// and re-walked the changed table at power-on.
    #[test]
    fn loom_invalidate_vs_suspend() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let s = smmu();
            let d = Arc::new(Domain::new(s.clone(), 0, true));
            let (da, sa) = (d.clone(), s.clone());
            let a = loom::thread::spawn(move || {
                sa.table.store(1, O::Relaxed);
                match da.tlb_begin() {
                    Some(g) => {
                        assert!(sa.powered.load(O::Relaxed), "TLBI to an off SMMU");
                        sa.tlb.store(EMPTY, O::Relaxed);
                        Some(g.epoch())
                    }
                    None => None,
                }
            });
            let suspended = d.suspend();
            let r = d.get().unwrap();
            // A powered SMMU may refill its TLB by walking at any time: what it would cache now.
            let cached = s.tlb.load(O::Relaxed);
            drop(r);
            let invalidated_at = a.join().unwrap();
            let tlb = s.tlb.load(O::Relaxed);
            // A skipped TLBI means B's power-on came after the table change.
            assert!(
                invalidated_at.is_some() || cached == 1,
                "resume walked the old table and the TLBI was skipped"
            );
            assert!(
                tlb == EMPTY || tlb == 1,
                "stale TLB: {tlb} (suspended {suspended}, invalidated at {invalidated_at:?})"
            );
            if let Some(e) = invalidated_at {
                // The guard pinned the domain within one epoch.
                assert!(e <= d.epoch());
            } else {
                assert_eq!(d.stats().tlbi_skipped, 1);
                assert!(suspended, "a skip needs a suspend");
            }
        });
    }
}
