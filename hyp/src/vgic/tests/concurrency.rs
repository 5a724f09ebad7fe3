//! Concurrency smoke tests: injections and guest register writes from other threads while a
//! vCPU thread flushes, runs and syncs. No interrupt may be lost.

extern crate std;

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use alloc::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::trap::MmioDevice;
use crate::vgic::testutil::{GuestCpu, Vm, virt};

const INTIDS: [u32; 4] = [2, 20, 40, 41];

/// Runs vCPU `vcpu` until `stop`: flush, let the guest take and EOI what it can, sync. Counts
/// every acknowledge per INTID.
fn run_vcpu(
    vm: Arc<Vm>,
    vcpu: usize,
    nr_lrs: usize,
    stop: Arc<AtomicBool>,
    taken: Arc<[AtomicUsize; 64]>,
) {
    let mut cpu = GuestCpu::new(nr_lrs);
    let mut held = std::vec::Vec::new();
    let mut round = 0usize;
    while !stop.load(Ordering::Acquire) {
        vm.vgic.flush(vcpu, &mut cpu);
        // Sometimes keep an interrupt active across an exit.
        for &i in &held {
            cpu.eoi(i);
        }
        held.clear();
        while let Some(i) = cpu.ack() {
            taken[i as usize].fetch_add(1, Ordering::AcqRel);
            if round.is_multiple_of(3) {
                held.push(i);
            } else {
                cpu.eoi(i);
            }
        }
        vm.vgic.sync(vcpu, &mut cpu);
        // After a sync, the interrupts it held are active in software; re-flush puts them back.
        round += 1;
        if !held.is_empty() {
            vm.vgic.flush(vcpu, &mut cpu);
            for &i in &held {
                cpu.eoi(i);
            }
            held.clear();
            vm.vgic.sync(vcpu, &mut cpu);
        }
        // The host has few cores; let the injecting threads run.
        thread::yield_now();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::yield_now();
    }
}

#[test]
fn injections_are_never_lost() {
    let vm = Arc::new(Vm::new(2, &[virt(40, true), virt(41, false)]));
    vm.enable_grp1();
    vm.setup_private(0, 2, 0x40);
    vm.setup_private(0, 20, 0x80);
    vm.setup_spi(40, 0x60, 0);
    vm.setup_spi(41, 0xa0, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let taken: Arc<[AtomicUsize; 64]> = Arc::new(core::array::from_fn(|_| AtomicUsize::new(0)));
    let runner = {
        let (vm, stop, taken) = (vm.clone(), stop.clone(), taken.clone());
        thread::spawn(move || run_vcpu(vm, 0, 2, stop, taken))
    };
    // Meanwhile another thread keeps changing priorities and toggling an unrelated interrupt.
    let noise = {
        let (vm, stop) = (vm.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                vm.dist
                    .write(1, 0x400 + 40, 1, 0x40 + (n % 4) * 0x10)
                    .unwrap();
                vm.redist.write(1, 0x1_0000 + 0x100, 4, 1 << 9).unwrap();
                vm.redist.write(1, 0x1_0000 + 0x180, 4, 1 << 9).unwrap();
            }
        })
    };
    for round in 0..2000 {
        let intid = INTIDS[round % INTIDS.len()];
        let before = taken[intid as usize].load(Ordering::Acquire);
        match intid {
            40 => vm.vgic.inject_spi(40).unwrap(),
            41 => vm.vgic.set_level(41, true).unwrap(),
            i => vm.vgic.inject(0, i).unwrap(),
        }
        wait_until("an injected interrupt to be taken", || {
            taken[intid as usize].load(Ordering::Acquire) > before
        });
        if intid == 41 {
            vm.vgic.set_level(41, false).unwrap();
        }
    }
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
    noise.join().unwrap();
    // Drained: nothing pending or active is left.
    let mut cpu = GuestCpu::new(2);
    for _ in 0..4 {
        vm.vgic.flush(0, &mut cpu);
        cpu.drain();
        vm.vgic.sync(0, &mut cpu);
    }
    vm.vgic.flush(0, &mut cpu);
    assert!(cpu.valid().is_empty());
    assert_eq!(vm.sgi_read(0, 0x200), 0);
    assert_eq!(vm.gicd_read(0x204), 0);
}

#[test]
fn sgis_between_two_running_vcpus() {
    let vm = Arc::new(Vm::new(2, &[]));
    vm.enable_grp1();
    for v in 0..2 {
        vm.setup_private(v, 1, 0x80);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let taken: [Arc<[AtomicUsize; 64]>; 2] =
        core::array::from_fn(|_| Arc::new(core::array::from_fn(|_| AtomicUsize::new(0))));
    let runners: std::vec::Vec<_> = (0..2)
        .map(|v| {
            let (vm, stop, taken) = (vm.clone(), stop.clone(), taken[v].clone());
            thread::spawn(move || run_vcpu(vm, v, 4, stop, taken))
        })
        .collect();
    // Ping-pong SGI 1, sent "from" each vCPU in turn (IRM = 1: the other one).
    for round in 0..1000 {
        let from = round % 2;
        let to = 1 - from;
        let before = taken[to][1].load(Ordering::Acquire);
        vm.vgic.write_sgi1r(from, (1 << 40) | (1 << 24));
        wait_until("an SGI to be taken", || {
            taken[to][1].load(Ordering::Acquire) > before
        });
    }
    stop.store(true, Ordering::Release);
    for r in runners {
        r.join().unwrap();
    }
}

/// Kicks recorded as flags, like a physical SGI pending at the target CPU.
struct FlagKick([AtomicBool; 2]);

impl crate::vgic::VcpuKick for FlagKick {
    fn kick(&self, vcpu: usize) {
        self.0[vcpu].store(true, Ordering::Release);
    }
}

#[test]
fn kicks_and_maintenance_alone_drive_delivery() {
    use crate::vgic::testutil::MockPhys;
    use crate::vgic::{Distributor, Redistributors, Vgic, VgicConfig};

    let kick = Arc::new(FlagKick([AtomicBool::new(false), AtomicBool::new(false)]));
    let spis = [virt(40, true), virt(41, true), virt(42, true)];
    let vgic = Vgic::new(
        &VgicConfig::new(2, &spis),
        Arc::new(MockPhys::default()),
        kick.clone(),
    )
    .unwrap();
    let dist = Distributor::new(vgic.clone());
    let redist = Redistributors::new(vgic.clone());
    dist.write(0, 0, 4, 2).unwrap();
    for (n, intid) in [40u64, 41, 42].into_iter().enumerate() {
        dist.write(0, 0x400 + intid, 1, 0x20 * n as u64).unwrap();
        dist.write(0, 0x6000 + 8 * intid, 8, 1).unwrap();
    }
    dist.write(0, 0x104, 4, 0b111 << 8).unwrap();
    redist.write(0, 0x2_0000 + 0x1_0100, 4, 0b1110).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let taken: Arc<[AtomicUsize; 64]> = Arc::new(core::array::from_fn(|_| AtomicUsize::new(0)));
    // vCPU 1 with a single list register: it only exits when kicked or for maintenance.
    let runner = {
        let (vgic, stop, taken, kick) = (vgic.clone(), stop.clone(), taken.clone(), kick.clone());
        thread::spawn(move || {
            let mut cpu = GuestCpu::new(1);
            vgic.flush(1, &mut cpu);
            while !stop.load(Ordering::Acquire) {
                for i in cpu.drain() {
                    taken[i as usize].fetch_add(1, Ordering::AcqRel);
                }
                if !kick.0[1].swap(false, Ordering::AcqRel) && cpu.misr() == 0 {
                    thread::yield_now();
                    continue;
                }
                vgic.sync(1, &mut cpu);
                vgic.flush(1, &mut cpu);
            }
        })
    };
    for round in 0..500 {
        // A burst of four at once: more than the one list register.
        let before: std::vec::Vec<usize> = [1, 2, 3, 40, 41, 42]
            .iter()
            .map(|&i| taken[i].load(Ordering::Acquire))
            .collect();
        let burst: [u32; 3] = match round % 3 {
            0 => [1, 40, 42],
            1 => [2, 41, 3],
            _ => [42, 1, 41],
        };
        for &intid in &burst {
            if intid < 32 {
                vgic.write_sgi1r(0, (u64::from(intid) << 24) | 0b10);
            } else {
                vgic.inject_spi(intid).unwrap();
            }
        }
        wait_until("a burst to be taken", || {
            burst.iter().all(|&i| {
                let k = [1, 2, 3, 40, 41, 42].iter().position(|&x| x == i).unwrap();
                taken[i as usize].load(Ordering::Acquire) > before[k]
            })
        });
    }
    stop.store(true, Ordering::Release);
    runner.join().unwrap();
}
