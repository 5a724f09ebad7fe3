//! Randomised invariant test: two VMs (different VMIDs, disjoint StreamIDs) share one physical
//! SMMU; random register accesses (valid and garbage), random guest memory (STEs with pointers
//! inside and outside the VM, level-1 descriptors, raw garbage), random commands and random
//! events. After every step, [`check_invariants`]: every physical STE is abort, stage 2 only or
//! nested with its owner's VMID and stage 2, written only by its owner; every forwarded command
//! is an allowed one with the sender's VMID and StreamIDs. And while a guest's SMMU is disabled,
//! its streams are exactly what GBPA says.
//!
//! 10^5 steps by default; `VSMMU_FUZZ_STEPS=<n>` runs more (`xtask test --long`), and
//! `VSMMU_FUZZ_SEED=<n>` changes the seed.

use std::string::String;
use std::vec::Vec;

use alloc::sync::Arc;

use super::*;
use crate::smmu::v3::ste::L1Desc;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints where the run was if a check fails.
struct Context {
    seed: u64,
    step: u64,
    what: String,
}

impl Drop for Context {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::eprintln!(
                "vsmmu fuzz failed: seed {} step {} ({})",
                self.seed,
                self.step,
                self.what
            );
        }
    }
}

const VM0_SIDS: &[u32] = &[8, 9, 0x20, 0x41];
const VM1_SIDS: &[u32] = &[0x10, 0x11, 0x42];

/// StreamIDs commands and STEs name: both VMs', nobody's, and out-of-range ones.
const SID_POOL: &[u32] = &[
    8,
    9,
    0x20,
    0x41,
    0x10,
    0x11,
    0x42,
    0,
    1,
    0x3f,
    0x100,
    0xffff,
    u32::MAX,
];

/// An address in or around the VM: a CD slot, the hole, just past RAM, far away, or random.
fn any_addr(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0..=3 => CDS + rng.below(64) * 64,
        4 => HOLE.0 + rng.below(0x1_0000),
        5 => RAM + RAM_LEN as u64 - 64 + rng.below(2) * 64,
        6 => rng.below(1 << 40),
        _ => rng.next(),
    }
}

fn random_ste(rng: &mut Rng) -> Ste {
    let mut ste = Ste([0; 8]);
    for d in &mut ste.0 {
        if rng.chance(40) {
            *d = rng.next();
        }
    }
    let config = match rng.below(10) {
        0..=4 => SteConfig::S1Trans.bits(),
        5 => SteConfig::Bypass.bits(),
        6 => SteConfig::Abort.bits(),
        _ => rng.below(8) as u8,
    };
    let mut d0 = ste.0[0] & !0xf;
    d0 |= u64::from(rng.chance(90)) | (u64::from(config) << 1);
    if rng.chance(70) {
        d0 = (d0 & !0x000f_ffff_ffff_ffc0) | (any_addr(rng) & 0x000f_ffff_ffff_ffc0);
    }
    if rng.chance(80) {
        d0 &= !(0x1f << 59); // S1CDMax = 0
    }
    ste.0[0] = d0;
    if rng.chance(70) {
        ste.0[1] &= !(1 << 27); // S1STALLD = 0
    }
    ste
}

fn random_command(rng: &mut Rng) -> [u64; 2] {
    let sid = rng.pick(SID_POOL);
    let cmd = match rng.below(16) {
        0 | 1 => Command::CfgiSte {
            sid,
            leaf: rng.chance(50),
        },
        2 => Command::CfgiSteRange {
            sid,
            range: rng.below(31) as u8,
        },
        3 => Command::CfgiAll,
        4 => Command::CfgiCd {
            sid,
            ssid: rng.next() as u32 & 0xf_ffff,
            leaf: rng.chance(50),
        },
        5 => Command::CfgiCdAll { sid },
        6 => Command::TlbiNhAsid {
            vmid: rng.next() as u16,
            asid: rng.next() as u16,
        },
        7 | 8 => Command::TlbiNhVa {
            vmid: rng.next() as u16,
            asid: rng.next() as u16,
            addr: rng.next(),
            leaf: rng.chance(50),
            ttl: rng.below(4) as u8,
            tg: rng.below(4) as u8,
            num: rng.below(32) as u8,
            scale: rng.below(32) as u8,
        },
        9 => Command::TlbiNhVaa {
            vmid: rng.next() as u16,
            addr: rng.next(),
            leaf: rng.chance(50),
            ttl: rng.below(4) as u8,
            tg: rng.below(4) as u8,
            num: rng.below(32) as u8,
            scale: rng.below(32) as u8,
        },
        10 => Command::TlbiNhAll {
            vmid: rng.next() as u16,
        },
        11 | 12 => Command::Sync {
            cs: rng.below(3) as u8,
            msh: 0,
            msiattr: 0,
            msidata: rng.next() as u32,
            msiaddr: any_addr(rng) & !3,
        },
        13 => Command::PrefetchConfig { sid },
        14 => {
            // A forbidden opcode with random fields.
            let d0 = (rng.next() & !0xff & !(1 << 10)) | u64::from(rng.pick(FORBIDDEN));
            return [d0, rng.next()];
        }
        _ => return [rng.next() & !(u64::from(rng.chance(50)) << 10), rng.next()],
    };
    let mut raw = cmd.encode();
    if rng.chance(10) {
        // Garbage in fields the command does not define.
        raw[1] ^= rng.next() & 0xf0;
    }
    raw
}

fn random_event(rng: &mut Rng) -> Event {
    let mut raw = [rng.next(), rng.next(), rng.next(), rng.next()];
    raw[0] = (raw[0] & 0xffff_ffff) | (u64::from(rng.pick(SID_POOL)) << 32);
    Event::decode(raw)
}

/// A register write a driver might do, or garbage.
fn random_write(g: &mut Guest, rng: &mut Rng) -> String {
    let (offset, value, size): (u64, u64, u8) = match rng.below(16) {
        0 | 1 => (off::CR0, rng.below(16), 4),
        2 => (
            off::GBPA,
            (rng.below(2) << 31) | (rng.below(2) << 20) | 0x1000,
            4,
        ),
        3 => (off::IRQ_CTRL, rng.below(8), 4),
        4 => (
            off::GERRORN,
            u64::from(g.r32(off::GERROR) ^ (rng.below(4) as u32)),
            4,
        ),
        5 => (off::CR2, rng.below(8), 4),
        6 => {
            let base = {
                let r = rng.next();
                rng.pick(&[STRTAB, STRTAB + 0x40, HOLE.0, 1 << 32, r])
            };
            (off::STRTAB_BASE, base, 8)
        }
        7 => {
            let cfg = if rng.chance(50) {
                rng.pick(&[0, 4, 6, 8, 63])
            } else {
                (1 << 16) | (rng.below(13) << 6) | rng.pick(&[4, 8, 10, 16, 20])
            };
            (off::STRTAB_BASE_CFG, cfg, 4)
        }
        8 => {
            let base = {
                let r = rng.next();
                rng.pick(&[CMDQ, HOLE.0, RAM + RAM_LEN as u64 - 0x20, r])
            };
            (off::CMDQ_BASE, base | rng.below(CMDQ_LOG2 as u64 + 2), 8)
        }
        9 => (off::CMDQ_PROD, rng.below(1 << 10), 4),
        10 => (off::CMDQ_CONS, rng.below(1 << 10), 4),
        11 => {
            let base = {
                let r = rng.next();
                rng.pick(&[EVTQ, HOLE.0, r])
            };
            (off::EVENTQ_BASE, base | rng.below(EVTQ_LOG2 as u64 + 2), 8)
        }
        12 => (off::EVENTQ_PROD, rng.next() & 0x8000_003f, 4),
        13 => (off::EVENTQ_CONS, rng.next() & 0x8000_003f, 4),
        14 => {
            // Either half of a 64-bit register.
            let reg = rng.pick(&[off::STRTAB_BASE, off::CMDQ_BASE, off::EVENTQ_BASE]);
            (reg + 4 * rng.below(2), rng.next() & 0xffff_ffff, 4)
        }
        _ => {
            let size = rng.pick(&[1u8, 2, 4, 8]);
            (rng.below(off::SIZE), rng.next(), size)
        }
    };
    // Garbage accesses may be rejected; that is fine.
    let _ = g.vs.write(0, offset, size, value);
    std::format!("write {offset:#x}/{size} = {value:#x}")
}

fn random_memory(g: &mut Guest, rng: &mut Rng) -> String {
    let sid = u64::from(rng.pick(SID_POOL) & 0xff);
    let (ipa, words): (u64, Vec<u64>) = match rng.below(6) {
        0 | 1 => (STRTAB + sid * 64, random_ste(rng).0.to_vec()),
        2 => (L2_TABLES + (sid & 0xff) * 64, random_ste(rng).0.to_vec()),
        3 => {
            let l2 = {
                let r = rng.next();
                rng.pick(&[L2_TABLES, HOLE.0, 1 << 36, r])
            };
            let desc = L1Desc::new(l2, rng.below(14) as u8).0;
            (STRTAB + rng.below(4) * 8, std::vec![desc])
        }
        4 => (
            CMDQ + rng.below(1 << CMDQ_LOG2) * 16,
            std::vec![rng.next(), rng.next()],
        ),
        _ => (
            rng.pick(&[STRTAB, L2_TABLES, CDS]) + rng.below(0x4000),
            std::vec![rng.next()],
        ),
    };
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    // Through the stage-2 view: holes stay holes.
    let _ = g.mem.write(ipa, &bytes);
    std::format!("memory {ipa:#x} <- {words:x?}")
}

/// Writes random commands at the guest's current PROD (wherever its queue is) and publishes.
fn random_commands(g: &mut Guest, rng: &mut Rng) -> String {
    let q = Queue::from_base(g.r64(off::CMDQ_BASE), 16, 19);
    let mut prod = g.r32(off::CMDQ_PROD);
    let n = 1 + rng.below(6);
    let mut cmds = Vec::new();
    for _ in 0..n {
        let raw = random_command(rng);
        let bytes: Vec<u8> = raw.iter().flat_map(|w| w.to_le_bytes()).collect();
        let _ = g.mem.write(q.entry_addr(prod), &bytes);
        prod = q.inc(prod);
        cmds.push(raw);
    }
    g.w32(off::CMDQ_PROD, prod);
    // Poll CONS like a driver.
    let _ = g.r32(off::CMDQ_CONS);
    std::format!("commands {cmds:x?}")
}

/// What a driver does after a command error: skip the command, acknowledge.
fn recover(g: &mut Guest, rng: &mut Rng) -> String {
    if (g.r32(off::GERROR) ^ g.r32(off::GERRORN)) & 1 != 0 {
        if rng.chance(70) {
            let q = Queue::from_base(g.r64(off::CMDQ_BASE), 16, 19);
            let cons = g.r32(off::CMDQ_CONS);
            let bytes: Vec<u8> = Command::sync()
                .encode()
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let _ = g.mem.write(q.entry_addr(cons), &bytes);
        }
        g.w32(off::GERRORN, g.r32(off::GERROR));
    }
    let _ = g.events();
    String::from("recover")
}

fn run(seed: u64, steps: u64) {
    let rec = Arc::new(Recorder::default());
    let mut vms = [
        Guest::new(0, 1, VM0_SIDS, &rec),
        Guest::new(1, 2, VM1_SIDS, &rec),
    ];
    let descs: Vec<(u16, S2Config, &[u32])> = vms
        .iter()
        .zip([VM0_SIDS, VM1_SIDS])
        .map(|(g, sids)| (g.vmid, g.s2, sids))
        .collect();
    check_invariants(&rec, &descs, &rec.take_log());
    let mut rng = Rng(seed | 1);
    // Physical STE writes: [not nested, nested].
    let mut installed = [0u64; 2];
    let mut ctx = Context {
        seed,
        step: 0,
        what: String::new(),
    };
    for step in 0..steps {
        ctx.step = step;
        let g = &mut vms[rng.below(2) as usize];
        ctx.what = match rng.below(100) {
            0..=19 => random_write(g, &mut rng),
            20..=27 => {
                let offset = rng.below(off::SIZE / 4) * 4;
                let _ = g.vs.read(0, offset, rng.pick(&[4, 8]));
                std::format!("read {offset:#x}")
            }
            28..=49 => random_memory(g, &mut rng),
            50..=79 => random_commands(g, &mut rng),
            80..=89 => {
                let ev = random_event(&mut rng);
                g.vs.inject_event(ev);
                std::format!("event {ev:x?}")
            }
            90..=96 => recover(g, &mut rng),
            _ => {
                g.enable();
                String::from("enable")
            }
        };
        let log = rec.take_log();
        check_invariants(&rec, &descs, &log);
        for op in &log {
            if let PhysOp::Ste { ste, .. } = op {
                installed[usize::from(ste.config() == SteConfig::Nested)] += 1;
            }
        }
        // While disabled, a guest's streams follow GBPA.
        for (g, (vmid, s2, sids)) in vms.iter().zip(&descs) {
            if g.r32(off::CR0) & regfile::CR0_SMMUEN == 0 {
                let want = if g.r32(off::GBPA) & (1 << 20) != 0 {
                    Ste::abort()
                } else {
                    Ste::s2(*vmid, s2)
                };
                for &sid in *sids {
                    assert_eq!(rec.ste(sid), Some(want), "VMID {vmid} StreamID {sid:#x}");
                }
            }
        }
    }
    // The run must have reached the interesting states.
    let total = |f: fn(&VsmmuStats) -> u64| vms.iter().map(|g| f(&g.vs.stats())).sum::<u64>();
    if steps >= 10_000 {
        assert!(total(|s| s.commands_forwarded) > 100);
        assert!(total(|s| s.commands_rejected) > 100);
        assert!(total(|s| s.bad_stes) > 100);
        assert!(total(|s| s.events_injected) > 100);
        assert!(total(|s| s.foreign_dropped) > 10);
        assert!(
            installed[1] > 100,
            "nested STEs installed: {}",
            installed[1]
        );
        std::eprintln!(
            "vsmmu fuzz: {steps} steps, seed {seed}: {:?} / {:?}; STE writes {installed:?} \
             (other, nested)",
            vms[0].vs.stats(),
            vms[1].vs.stats()
        );
    }
}

#[test]
fn random_operations_keep_vms_isolated() {
    let steps = env_u64("VSMMU_FUZZ_STEPS", 100_000);
    let seed = env_u64("VSMMU_FUZZ_SEED", 0x5eed_f5a1);
    run(seed, steps);
}

#[test]
fn nested_stes_do_get_installed() {
    // The fuzz run is only meaningful if valid configurations happen: a short run with a
    // guest that keeps a valid setup must produce nested STEs for both VMs at some point.
    let rec = Arc::new(Recorder::default());
    let mut g = Guest::new(0, 1, VM0_SIDS, &rec);
    g.enable();
    let mut rng = Rng(7);
    let mut seen = 0;
    for _ in 0..2000 {
        let sid = rng.pick(VM0_SIDS);
        let ste = random_ste(&mut rng);
        g.set_ste(sid, ste);
        g.issue(&[Command::CfgiSte { sid, leaf: true }]);
        if (g.r32(off::GERROR) ^ g.r32(off::GERRORN)) & 1 != 0 {
            g.w32(off::GERRORN, g.r32(off::GERROR));
        }
        if rec
            .ste(sid)
            .is_some_and(|s| s.config() == SteConfig::Nested)
        {
            seen += 1;
            assert_eq!(rec.ste(sid), Some(g.nested(&ste)));
        }
        g.events();
    }
    assert!(seen > 100, "{seen}");
    check_invariants(&rec, &[(g.vmid, g.s2, VM0_SIDS)], &rec.take_log());
}
