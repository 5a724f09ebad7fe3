//! Consuming the guest's command queue: what each command does is in the table of the
//! [module docs](super).

use crate::smmu::v3::cmd::{Command, SYNC_CS_IRQ};
use crate::smmu::v3::regs::{CERROR_ABT, CERROR_ILL};

use super::queue::Queue;
use super::regfile::{CMDQ_CONS_ERR_MASK, CMDQ_CONS_ERR_SHIFT, GERROR_CMDQ_ERR, Q_PTR_MASK};
use super::{BATCH, State, VSmmu};

/// Bytes of one command.
const CMD_BYTES: u64 = 16;

impl VSmmu {
    /// Executes the commands between CONS and PROD, unless the queue is disabled or stopped by a
    /// command error, then hands anything still batched to the physical SMMU.
    pub(super) fn consume(&self, st: &mut State) {
        if !st.regs.cmdq_enabled() || st.regs.gerror_active() & GERROR_CMDQ_ERR != 0 {
            return;
        }
        let q = Queue::from_base(st.regs.cmdq_base, CMD_BYTES, self.ids.cmdqs);
        // Every command moves CONS one entry towards PROD, so this ends within two laps of the
        // queue even when the guest's PROD is inconsistent.
        while !q.is_empty(st.regs.cmdq_prod, st.regs.cmdq_cons) {
            let cons = st.regs.cmdq_cons;
            let mut raw = [0u8; CMD_BYTES as usize];
            let result = match self.mem.read(q.entry_addr(cons), &mut raw) {
                Ok(()) => {
                    let mut cmd = [0u64; 2];
                    for (d, bytes) in cmd.iter_mut().zip(raw.chunks_exact(8)) {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(bytes);
                        *d = u64::from_le_bytes(w);
                    }
                    self.execute(st, cmd)
                }
                Err(_) => Err(CERROR_ABT),
            };
            match result {
                Ok(()) => {
                    st.regs.cmdq_cons = (cons & CMDQ_CONS_ERR_MASK) | q.inc(cons);
                    st.stats.commands += 1;
                }
                Err(code) => {
                    // The queue stops with CONS at the bad command.
                    st.regs.cmdq_cons =
                        (cons & Q_PTR_MASK) | (u32::from(code) << CMDQ_CONS_ERR_SHIFT);
                    st.stats.commands_rejected += 1;
                    self.raise_gerror(st, GERROR_CMDQ_ERR);
                    break;
                }
            }
        }
        self.submit(st);
    }

    /// Executes one command; `Err` is the `CERROR_*` code that stops the queue.
    fn execute(&self, st: &mut State, raw: [u64; 2]) -> Result<(), u8> {
        let cmd = Command::decode(raw).map_err(|e| e.code())?;
        match cmd {
            Command::PrefetchConfig { .. } | Command::PrefetchAddr { .. } => {}
            Command::CfgiSte { sid, .. } => self.cfgi_ste(st, sid.into(), sid.into()),
            Command::CfgiSteRange { sid, range } => {
                // 2^(range + 1) StreamIDs, aligned; `range` < 31.
                let span = 2u64 << range;
                let first = u64::from(sid) & !(span - 1);
                self.cfgi_ste(st, first, first + span - 1);
            }
            Command::CfgiAll => self.cfgi_ste(st, 0, u64::MAX),
            Command::CfgiCd { sid, leaf, .. } => {
                // No substreams: the only CD of a stream is number 0.
                self.forward_for_stream(st, sid, Command::CfgiCd { sid, ssid: 0, leaf });
            }
            Command::CfgiCdAll { sid } => {
                self.forward_for_stream(st, sid, Command::CfgiCdAll { sid });
            }
            // TLBI_NSNH_ALL: for an SMMU without stage 2 and EL2 streams, everything it caches
            // is NS-EL1 stage 1, i.e. (for this VM) TLBI_NH_ALL of its VMID.
            Command::TlbiNhAll { .. } | Command::TlbiNsnhAll => {
                self.forward(st, Command::TlbiNhAll { vmid: self.vmid });
            }
            Command::TlbiNhAsid { asid, .. } => {
                let asid = self.asid(asid);
                self.forward(
                    st,
                    Command::TlbiNhAsid {
                        vmid: self.vmid,
                        asid,
                    },
                );
            }
            Command::TlbiNhVa {
                asid,
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
                ..
            } => {
                let (num, scale) = self.range(num, scale);
                let asid = self.asid(asid);
                let cmd = Command::TlbiNhVa {
                    vmid: self.vmid,
                    asid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                };
                self.forward(st, cmd);
            }
            Command::TlbiNhVaa {
                addr,
                leaf,
                ttl,
                tg,
                num,
                scale,
                ..
            } => {
                let (num, scale) = self.range(num, scale);
                let cmd = Command::TlbiNhVaa {
                    vmid: self.vmid,
                    addr,
                    leaf,
                    ttl,
                    tg,
                    num,
                    scale,
                };
                self.forward(st, cmd);
            }
            Command::Sync { cs, .. } => {
                self.sync(st);
                if cs == SYNC_CS_IRQ {
                    st.irqs.cmd_sync = true;
                }
            }
            // No stage 2 and no EL2 StreamWorld advertised.
            Command::TlbiEl2All
            | Command::TlbiEl2Asid { .. }
            | Command::TlbiEl2Va { .. }
            | Command::TlbiEl2Vaa { .. }
            | Command::TlbiS12Vmall { .. }
            | Command::TlbiS2Ipa { .. }
            // No ATS, PRI or stall advertised.
            | Command::AtcInv { .. }
            | Command::PriResp { .. }
            | Command::Resume { .. }
            | Command::StallTerm { .. } => return Err(CERROR_ILL),
        }
        Ok(())
    }

    /// `CFGI_STE*`: re-shadows the VM's streams with StreamIDs in `first..=last`. Nothing to do
    /// while the guest's SMMU is disabled: it caches nothing then, and enabling it reloads
    /// every stream.
    fn cfgi_ste(&self, st: &mut State, first: u64, last: u64) {
        if !st.regs.smmu_enabled() {
            return;
        }
        let start = self.sids.partition_point(|&s| u64::from(s) < first);
        let end = self.sids.partition_point(|&s| u64::from(s) <= last);
        for i in start..end {
            self.reload(st, i, true);
        }
    }

    /// The ASID as the hardware takes it (8 bits without IDR0.ASID16).
    fn asid(&self, asid: u16) -> u16 {
        if self.ids.asid16 { asid } else { asid & 0xff }
    }

    /// TLBI range fields as forwarded: NUM and SCALE only mean something with IDR3.RIL.
    fn range(&self, num: u8, scale: u8) -> (u8, u8) {
        if self.ids.ril { (num, scale) } else { (0, 0) }
    }

    /// Forwards `cmd` (about stream `sid`) if `sid` is the VM's; otherwise drops and counts it.
    fn forward_for_stream(&self, st: &mut State, sid: u32, cmd: Command) {
        if self.stream_index(sid).is_some() {
            self.forward(st, cmd);
        } else {
            st.stats.foreign_dropped += 1;
        }
    }

    /// Adds `cmd` to the batch for the physical SMMU.
    pub(super) fn forward(&self, st: &mut State, cmd: Command) {
        st.batch.push(cmd.encode());
        st.stats.commands_forwarded += 1;
        if st.batch.len() >= BATCH {
            self.submit(st);
        }
    }

    /// Submits the batch to the physical SMMU (no sync).
    pub(super) fn submit(&self, st: &mut State) {
        if st.batch.is_empty() {
            return;
        }
        if let Err(e) = self.phys.submit(&st.batch) {
            log::warn!(
                "vsmmu (VMID {}): submitting {} commands failed: {e}",
                self.vmid,
                st.batch.len()
            );
            st.stats.phys_errors += 1;
        }
        st.batch.clear();
        st.unsynced = true;
    }

    /// A guest `CMD_SYNC`: everything forwarded before it must have completed.
    pub(super) fn sync(&self, st: &mut State) {
        self.submit(st);
        if !st.unsynced {
            return;
        }
        st.unsynced = false;
        st.stats.phys_syncs += 1;
        if let Err(e) = self.phys.sync() {
            log::warn!("vsmmu (VMID {}): physical sync failed: {e}", self.vmid);
            st.stats.phys_errors += 1;
        }
    }
}
