//! List-register encoding and flush/sync against the model of the virtual CPU interface.

extern crate std;

use std::vec;
use std::vec::Vec;

use crate::trap::MmioDevice;
use crate::vgic::testutil::{GuestCpu, PhysCall, Vm, hw, virt};
use crate::vgic::{
    ICH_HCR_EN, ICH_HCR_NPIE, ICH_HCR_UIE, ICH_MISR_EOI, ICH_MISR_NP, ICH_MISR_U, ListRegs, Lr,
    LrState, num_lrs_from_vtr,
};

#[test]
fn lr_encoding() {
    let lr = Lr {
        vintid: 27,
        pintid: Some(27),
        eoi: false,
        priority: 0xa0,
        group1: true,
        state: LrState::Pending,
    };
    assert_eq!(
        lr.encode(),
        (1 << 62) | (1 << 61) | (1 << 60) | (0xa0 << 48) | (27 << 32) | 27
    );
    assert_eq!(Lr::decode(lr.encode()), lr);
    let lr = Lr {
        vintid: 1019,
        pintid: None,
        eoi: true,
        priority: 0xf8,
        group1: true,
        state: LrState::PendingActive,
    };
    assert_eq!(
        lr.encode(),
        (3 << 62) | (1 << 60) | (0xf8 << 48) | (1 << 41) | 1019
    );
    assert_eq!(Lr::decode(lr.encode()), lr);
    let active = Lr::decode(2 << 62);
    assert_eq!(active.state, LrState::Active);
    assert!(active.state.active() && !active.state.pending());
    assert!(!active.group1 && active.pintid.is_none() && !active.eoi);
    // pINTID is 10 bits.
    assert_eq!(Lr::decode((1 << 61) | (0x7ff << 32)).pintid, Some(0x3ff));
    assert_eq!(num_lrs_from_vtr(0x9000_0003), 4);
    assert_eq!(num_lrs_from_vtr(0xf), 16);
}

/// One entry: flush, run the guest (it takes everything), sync. Returns what it took.
fn round(vm: &Vm, vcpu: usize, cpu: &mut GuestCpu) -> Vec<u32> {
    vm.vgic.flush(vcpu, cpu);
    let got = cpu.drain();
    vm.vgic.sync(vcpu, cpu);
    got
}

#[test]
fn one_sgi_through_the_list_registers() {
    let vm = Vm::new(2, &[]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_private(0, 3, 0x80);
    vm.kick.take();
    vm.vgic.inject(0, 3).unwrap();
    assert_eq!(vm.kick.take(), [0]);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.hcr, ICH_HCR_EN);
    assert_eq!(
        cpu.valid(),
        [Lr {
            vintid: 3,
            pintid: None,
            eoi: false,
            priority: 0x80,
            group1: true,
            state: LrState::Pending,
        }]
    );
    // Guest acknowledges; exit; the state comes back as active.
    assert_eq!(cpu.ack(), Some(3));
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(vm.sgi_read(0, 0x300), 1 << 3, "active");
    assert_eq!(vm.sgi_read(0, 0x200), 0, "not pending");
    // Re-entry keeps it in a list register, active.
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid()[0].state, LrState::Active);
    cpu.eoi(3);
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(vm.sgi_read(0, 0x300), 0);
    // Nothing left: the list register is cleared, and then nothing more is written.
    vm.vgic.flush(0, &mut cpu);
    assert!(cpu.valid().is_empty());
    assert_eq!(cpu.lrs[0], 0);
    let writes = cpu.lr_writes;
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.lr_writes, writes, "idle entry writes no list register");
}

#[test]
fn disabled_or_group_disabled_is_not_delivered() {
    let vm = Vm::new(1, &[]);
    let mut cpu = GuestCpu::new(4);
    vm.set_private_prio(0, 5, 0x40);
    vm.vgic.inject(0, 5).unwrap();
    assert!(vm.kick.take().is_empty(), "disabled: no kick");
    vm.sgi_write(0, 0x100, 1 << 5);
    assert_eq!(vm.kick.take(), [0], "enabling a pending interrupt kicks");
    assert!(round(&vm, 0, &mut cpu).is_empty(), "Group 1 disabled");
    assert!(!vm.vgic.has_pending(0));
    vm.enable_grp1();
    assert!(vm.vgic.has_pending(0));
    assert_eq!(round(&vm, 0, &mut cpu), [5]);
    assert!(!vm.vgic.has_pending(0));
}

#[test]
fn more_pending_than_list_registers() {
    let vm = Vm::new(1, &[virt(40, true), virt(41, true), virt(42, true)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    // Seven interrupts, priorities not in INTID order.
    let prios = [(1, 0x60), (2, 0x20), (3, 0xa0), (4, 0x20), (9, 0x80)];
    for (intid, prio) in prios {
        vm.setup_private(0, intid, prio);
        vm.vgic.inject(0, intid).unwrap();
    }
    for (intid, prio) in [(40, 0x10), (41, 0xf0), (42, 0x60)] {
        vm.setup_spi(intid, prio, 0);
        vm.vgic.inject_spi(intid).unwrap();
    }
    vm.vgic.flush(0, &mut cpu);
    // The four highest priorities, ties by INTID; NPIE because four more wait.
    let mut placed: Vec<u32> = cpu.valid().iter().map(|l| l.vintid).collect();
    placed.sort_unstable();
    assert_eq!(placed, [1, 2, 4, 40]);
    assert_eq!(cpu.hcr, ICH_HCR_EN | ICH_HCR_NPIE);
    assert_eq!(cpu.misr(), 0, "no maintenance interrupt on entry");

    // The guest takes them as Linux does: acknowledge, handle, EOI, next.
    let mut order = cpu.drain();
    assert_eq!(order, [40, 2, 4, 1]);
    assert_eq!(cpu.misr(), ICH_MISR_NP, "maintenance: no pending left");
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.hcr, ICH_HCR_EN, "the rest fits");
    order.extend(cpu.drain());
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(order, [40, 2, 4, 1, 42, 9, 3, 41]);
    assert!(round(&vm, 0, &mut cpu).is_empty());
}

#[test]
fn active_interrupts_keep_their_list_registers() {
    let vm = Vm::new(1, &[]);
    let mut cpu = GuestCpu::new(2);
    vm.enable_grp1();
    for intid in 0..5 {
        vm.setup_private(0, intid, 0x80 - 0x10 * intid as u8);
        vm.vgic.inject(0, intid).unwrap();
    }
    // Highest priorities are 4 then 3.
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.ack(), Some(4));
    assert_eq!(cpu.hcr & ICH_HCR_NPIE, ICH_HCR_NPIE);
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    // 4 active stays, 3 pending next to it.
    let valid = cpu.valid();
    assert_eq!(valid.len(), 2);
    assert!(
        valid
            .iter()
            .any(|l| l.vintid == 4 && l.state == LrState::Active)
    );
    assert!(
        valid
            .iter()
            .any(|l| l.vintid == 3 && l.state == LrState::Pending)
    );
    // 3 (0x50) cannot preempt 4 (0x40).
    assert_eq!(cpu.ack(), None);
    // A higher-priority SGI arrives; both list registers busy: it waits, UIE/NPIE as needed.
    vm.setup_private(0, 10, 0x00);
    vm.vgic.inject(0, 10).unwrap();
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    let mut ids: Vec<u32> = cpu.valid().iter().map(|l| l.vintid).collect();
    ids.sort_unstable();
    assert_eq!(ids, [4, 10], "active first, then the highest pending");
    assert_eq!(cpu.ack(), Some(10));
    // Both active, more pending: UIE (fires when at most one is still valid).
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.hcr, ICH_HCR_EN | ICH_HCR_UIE);
    assert_eq!(cpu.misr(), 0);
    cpu.eoi(10);
    assert_eq!(cpu.misr(), ICH_MISR_U);
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    cpu.eoi(4);
    let rest = cpu.drain();
    vm.vgic.sync(0, &mut cpu);
    let mut all = rest;
    all.extend(round(&vm, 0, &mut cpu));
    all.extend(round(&vm, 0, &mut cpu));
    assert_eq!(all, [3, 2, 1, 0]);
}

#[test]
fn single_list_register_uses_eoi_maintenance() {
    let vm = Vm::new(1, &[]);
    let mut cpu = GuestCpu::new(1);
    vm.enable_grp1();
    for intid in [1, 2] {
        vm.setup_private(0, intid, 0x80);
        vm.vgic.inject(0, intid).unwrap();
    }
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.hcr, ICH_HCR_EN | ICH_HCR_NPIE);
    assert_eq!(cpu.ack(), Some(1));
    assert_eq!(cpu.misr(), ICH_MISR_NP);
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    // One list register, active: neither NPIE nor UIE could work; EOI = 1 instead.
    assert_eq!(cpu.hcr, ICH_HCR_EN);
    assert!(cpu.valid()[0].eoi);
    assert_eq!(cpu.misr(), 0);
    cpu.eoi(1);
    assert_eq!(cpu.misr(), ICH_MISR_EOI);
    assert_eq!(
        cpu.read_elrsr() & 1,
        0,
        "an EOI-maintenance LR is not empty"
    );
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(round(&vm, 0, &mut cpu), [2]);
}

#[test]
fn level_interrupt_is_resampled_on_deactivation() {
    let vm = Vm::new(1, &[virt(40, false)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(40, 0x80, 0);
    vm.kick.take();
    vm.vgic.set_level(40, true).unwrap();
    assert_eq!(vm.kick.take(), [0]);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.ack(), Some(40));
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    // Active, line still high: active only, with EOI maintenance to resample.
    let lr = cpu.valid()[0];
    assert_eq!((lr.state, lr.eoi), (LrState::Active, true));
    cpu.eoi(40);
    assert_eq!(cpu.misr(), ICH_MISR_EOI);
    vm.vgic.sync(0, &mut cpu);
    // Line still high: pending again.
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid()[0].state, LrState::Pending);
    assert_eq!(cpu.ack(), Some(40));
    // The handler quiesces the device before EOI: no second interrupt.
    vm.vgic.set_level(40, false).unwrap();
    cpu.eoi(40);
    vm.vgic.sync(0, &mut cpu);
    assert!(round(&vm, 0, &mut cpu).is_empty());
    assert_eq!(vm.gicd_read(0x200 + 4), 0);
}

#[test]
fn level_dropped_before_acknowledge_is_withdrawn() {
    let vm = Vm::new(1, &[virt(40, false)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(40, 0x80, 0);
    vm.vgic.set_level(40, true).unwrap();
    vm.vgic.flush(0, &mut cpu);
    vm.kick.take();
    vm.vgic.set_level(40, false).unwrap();
    assert_eq!(vm.kick.take(), [0], "in a list register: kick to withdraw");
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert!(cpu.valid().is_empty());
    // A software pend (ISPENDR) on a level interrupt is a latch, consumed by the acknowledge.
    vm.gicd_write(0x200 + 4, 1 << 8);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.ack(), Some(40));
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(vm.gicd_read(0x200 + 4), 0);
    assert_eq!(vm.gicd_read(0x300 + 4), 1 << 8);
    vm.vgic.flush(0, &mut cpu);
    cpu.eoi(40);
    vm.vgic.sync(0, &mut cpu);
    assert!(round(&vm, 0, &mut cpu).is_empty());
}

#[test]
fn edge_while_active_is_pending_and_active() {
    let vm = Vm::new(1, &[virt(41, true)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(41, 0x80, 0);
    vm.vgic.inject_spi(41).unwrap();
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.ack(), Some(41));
    // Two more edges while the guest handles it (they merge into one).
    vm.vgic.inject_spi(41).unwrap();
    vm.vgic.inject_spi(41).unwrap();
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid()[0].state, LrState::PendingActive);
    assert_eq!(cpu.hcr, ICH_HCR_EN);
    // The guest takes it again straight after deactivating it, with no exit.
    cpu.eoi(41);
    assert_eq!(cpu.ack(), Some(41));
    cpu.eoi(41);
    vm.vgic.sync(0, &mut cpu);
    assert!(round(&vm, 0, &mut cpu).is_empty());
}

#[test]
fn edge_before_acknowledge_merges() {
    let vm = Vm::new(1, &[]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_private(0, 7, 0x80);
    vm.vgic.inject(0, 7).unwrap();
    vm.vgic.flush(0, &mut cpu);
    vm.vgic.inject(0, 7).unwrap();
    // Exit before the guest took it: still one pending interrupt.
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(vm.sgi_read(0, 0x200), 1 << 7);
    assert_eq!(round(&vm, 0, &mut cpu), [7]);
    assert!(round(&vm, 0, &mut cpu).is_empty());
}

#[test]
fn flush_twice_loses_nothing() {
    let vm = Vm::new(1, &[]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_private(0, 7, 0x80);
    vm.vgic.inject(0, 7).unwrap();
    vm.vgic.flush(0, &mut cpu);
    // The vCPU did not enter after all (e.g. a kick); flush again without sync.
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid().len(), 1);
    assert_eq!(cpu.drain(), [7]);
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.sync(0, &mut cpu);
    assert!(round(&vm, 0, &mut cpu).is_empty());
}

#[test]
fn guest_clears_pending_in_list_register() {
    let vm = Vm::new(2, &[virt(41, true)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(41, 0x80, 0);
    vm.vgic.inject_spi(41).unwrap();
    vm.vgic.flush(0, &mut cpu);
    // vCPU 1 clears it while it sits pending in vCPU 0's list register.
    assert_eq!(vm.gicd_read(0x200 + 4), 1 << 9);
    vm.kick.take();
    vm.dist.write(1, 0x280 + 4, 4, 1 << 9).unwrap();
    assert_eq!(vm.kick.take(), [0]);
    assert_eq!(vm.gicd_read(0x200 + 4), 0);
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert!(cpu.valid().is_empty());
}

#[test]
fn hardware_spi_is_deactivated_by_the_guest() {
    let vm = Vm::new(1, &[hw(70, 100, false)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(70, 0x80, 0);
    assert_eq!(vm.phys.take(), [PhysCall::Enable(100)]);
    // Not this VM's physical SPI.
    assert!(vm.vgic.inject_phys_spi(101).is_err());
    vm.vgic.inject_phys_spi(100).unwrap();
    vm.vgic.flush(0, &mut cpu);
    let lr = cpu.valid()[0];
    assert_eq!((lr.vintid, lr.pintid, lr.eoi), (70, Some(100), false));
    assert_eq!(cpu.ack(), Some(70));
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid()[0].state, LrState::Active);
    assert_eq!(cpu.valid()[0].pintid, Some(100));
    cpu.eoi(70);
    assert_eq!(cpu.hw_deactivated, [100]);
    vm.vgic.sync(0, &mut cpu);
    assert!(round(&vm, 0, &mut cpu).is_empty());
    assert!(vm.phys.take().is_empty(), "hardware did the deactivation");
}

#[test]
fn hardware_spi_cleared_in_list_register_is_deactivated_at_sync() {
    let vm = Vm::new(1, &[hw(70, 100, false)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(70, 0x80, 0);
    vm.phys.take();
    vm.vgic.inject_phys_spi(100).unwrap();
    vm.vgic.flush(0, &mut cpu);
    vm.gicd_write(0x280 + 8, 1 << 6);
    assert!(
        vm.phys.take().is_empty(),
        "not while a live HW list register could still deactivate it"
    );
    vm.vgic.sync(0, &mut cpu);
    assert_eq!(vm.phys.take(), [PhysCall::Deactivate(100, 0)]);
    vm.vgic.flush(0, &mut cpu);
    assert!(cpu.valid().is_empty());
}

#[test]
fn hardware_spi_pended_by_software_while_active() {
    let vm = Vm::new(1, &[hw(70, 100, true)]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(70, 0x80, 0);
    vm.vgic.inject_phys_spi(100).unwrap();
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.ack(), Some(70));
    vm.vgic.sync(0, &mut cpu);
    vm.gicd_write(0x200 + 8, 1 << 6);
    vm.vgic.flush(0, &mut cpu);
    // HW = 1 cannot be pending and active: active only; the pending part waits.
    let lr = cpu.valid()[0];
    assert_eq!((lr.state, lr.pintid), (LrState::Active, Some(100)));
    cpu.eoi(70);
    vm.vgic.sync(0, &mut cpu);
    // Delivered next as a software interrupt (nothing physical is active any more).
    vm.vgic.flush(0, &mut cpu);
    let lr = cpu.valid()[0];
    assert_eq!((lr.state, lr.pintid), (LrState::Pending, None));
    assert_eq!(cpu.drain(), [70]);
    vm.vgic.sync(0, &mut cpu);
    assert!(round(&vm, 0, &mut cpu).is_empty());
    assert_eq!(cpu.hw_deactivated, [100]);
    assert!(
        vm.phys
            .take()
            .iter()
            .all(|c| !matches!(c, PhysCall::Deactivate(..)))
    );
}

#[test]
fn virtual_timer_forwarded_with_hw_bit() {
    let vm = Vm::new(2, &[]);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_private(1, 27, 0xa0);
    vm.vgic.inject_phys_ppi(1, 27).unwrap();
    vm.vgic.flush(1, &mut cpu);
    let lr = cpu.valid()[0];
    assert_eq!((lr.vintid, lr.pintid, lr.priority), (27, Some(27), 0xa0));
    assert_eq!(cpu.drain(), [27]);
    assert_eq!(cpu.hw_deactivated, [27]);
    vm.vgic.sync(1, &mut cpu);
    assert!(round(&vm, 1, &mut cpu).is_empty());
    // Disabled: an occurrence stays pending (and physically active: no storm)...
    vm.sgi_write(1, 0x180, 1 << 27);
    vm.vgic.inject_phys_ppi(1, 27).unwrap();
    assert!(round(&vm, 1, &mut cpu).is_empty());
    assert_eq!(vm.sgi_read(1, 0x200), 1 << 27);
    // ...until the guest enables it again.
    vm.sgi_write(1, 0x100, 1 << 27);
    assert_eq!(round(&vm, 1, &mut cpu), [27]);
    // The VM stops with one occurrence outstanding: released.
    vm.vgic.inject_phys_ppi(1, 27).unwrap();
    vm.vgic.release_phys();
    assert_eq!(vm.phys.take(), [PhysCall::Deactivate(27, 1)]);
}

#[test]
fn active_spi_stays_on_its_vcpu_when_rerouted() {
    let vm = Vm::new(2, &[virt(41, true)]);
    let mut cpu0 = GuestCpu::new(4);
    let mut cpu1 = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(41, 0x80, 0);
    vm.vgic.inject_spi(41).unwrap();
    vm.vgic.flush(0, &mut cpu0);
    assert_eq!(cpu0.ack(), Some(41));
    // The guest moves it to vCPU 1 while vCPU 0 handles it, and a new edge arrives.
    vm.set_irouter(41, 1);
    vm.vgic.inject_spi(41).unwrap();
    vm.vgic.sync(0, &mut cpu0);
    vm.vgic.flush(1, &mut cpu1);
    assert!(cpu1.valid().is_empty(), "still active on vCPU 0");
    vm.vgic.flush(0, &mut cpu0);
    assert_eq!(cpu0.valid()[0].state, LrState::PendingActive);
    // Deactivated on vCPU 0 before it could take it again: exit, and it moves to vCPU 1.
    cpu0.eoi(41);
    vm.kick.take();
    vm.vgic.sync(0, &mut cpu0);
    // The pending instance is handed on: vCPU 0 kicks vCPU 1.
    vm.vgic.flush(0, &mut cpu0);
    assert!(cpu0.valid().is_empty());
    assert_eq!(vm.kick.take(), [1]);
    assert_eq!(round(&vm, 1, &mut cpu1), [41]);
}

#[test]
fn spi_routed_nowhere_waits() {
    let vm = Vm::new(2, &[virt(41, true)]);
    let mut cpu0 = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(41, 0x80, 0);
    vm.set_irouter(41, 5);
    vm.kick.take();
    vm.vgic.inject_spi(41).unwrap();
    assert!(vm.kick.take().is_empty());
    assert!(round(&vm, 0, &mut cpu0).is_empty());
    vm.set_irouter(41, 0);
    assert_eq!(vm.kick.take(), [0]);
    assert_eq!(round(&vm, 0, &mut cpu0), [41]);
}

#[test]
fn priority_change_reorders_pending() {
    let vm = Vm::new(1, &[]);
    let mut cpu = GuestCpu::new(1);
    vm.enable_grp1();
    vm.setup_private(0, 1, 0x40);
    vm.setup_private(0, 2, 0x80);
    vm.vgic.inject(0, 1).unwrap();
    vm.vgic.inject(0, 2).unwrap();
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid()[0].vintid, 1);
    vm.kick.take();
    // Make 2 the more urgent one.
    vm.set_private_prio(0, 2, 0x00);
    assert_eq!(vm.kick.take(), [0]);
    vm.vgic.sync(0, &mut cpu);
    vm.vgic.flush(0, &mut cpu);
    assert_eq!(cpu.valid()[0].vintid, 2);
    let mut got = cpu.drain();
    vm.vgic.sync(0, &mut cpu);
    got.extend(round(&vm, 0, &mut cpu));
    assert_eq!(got, vec![2, 1]);
}

#[test]
fn new_physical_occurrence_before_sync_is_not_lost() {
    let vm = Vm::new(2, &[hw(70, 100, true)]);
    let mut cpu0 = GuestCpu::new(4);
    let mut cpu1 = GuestCpu::new(4);
    vm.enable_grp1();
    vm.setup_spi(70, 0x80, 0);
    vm.vgic.inject_phys_spi(100).unwrap();
    vm.vgic.flush(0, &mut cpu0);
    assert_eq!(cpu0.drain(), [70]);
    assert_eq!(cpu0.hw_deactivated, [100]);
    // Before vCPU 0 exits, the guest reroutes the SPI and the device fires again: the new
    // occurrence is taken on vCPU 1's CPU.
    vm.set_irouter(70, 1);
    vm.vgic.inject_phys_spi(100).unwrap();
    vm.vgic.sync(0, &mut cpu0);
    vm.vgic.flush(0, &mut cpu0);
    assert!(cpu0.valid().is_empty());
    vm.vgic.flush(1, &mut cpu1);
    assert_eq!(cpu1.valid()[0].pintid, Some(100), "still the physical one");
    assert_eq!(cpu1.drain(), [70]);
    assert_eq!(cpu1.hw_deactivated, [100]);
    vm.vgic.sync(1, &mut cpu1);
    assert!(
        vm.phys
            .take()
            .iter()
            .all(|c| !matches!(c, PhysCall::Deactivate(..)))
    );
}

/// Every list register holds a pending+active interrupt and more wait: the hardware's "no
/// pending" maintenance condition counts only plain Pending entries, so asking for it (NPIE)
/// here would raise a maintenance interrupt on every entry and the vCPU would never run. (A
/// guest gets there by making its SPIs active through GICD_ISACTIVER, then pending.)
#[test]
fn pending_active_list_registers_do_not_trap_on_entry() {
    let spis: Vec<_> = (41..=45).map(|i| virt(i, true)).collect();
    let vm = Vm::new(1, &spis);
    let mut cpu = GuestCpu::new(4);
    vm.enable_grp1();
    let bits: u32 = (41..=45).map(|i| 1u32 << (i % 32)).sum();
    for i in 41..=45 {
        vm.setup_spi(i, 0x80, 0);
    }
    // GICD_ISACTIVER1, then GICD_ISPENDR1: five SPIs pending and active at once.
    vm.gicd_write(0x304, bits);
    vm.gicd_write(0x204, bits);
    vm.vgic.flush(0, &mut cpu);
    let placed = cpu.valid();
    assert_eq!(placed.len(), 4);
    assert!(placed.iter().all(|l| l.state == LrState::PendingActive));
    assert_eq!(
        cpu.hcr & ICH_HCR_NPIE,
        0,
        "no NPIE without a plain pending entry"
    );
    assert_eq!(cpu.misr(), 0, "no maintenance interrupt on entry");
}
