//! The hypervisor binary. Everything lives in the library; on the bare-metal target this crate
//! only links it (the entry point `_start` is in `hyp::arch::boot`). On the host it is an empty
//! program so `cargo build` and `cargo test` at the workspace root work.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
use hyp as _;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on aarch64 hardware or QEMU: use `cargo xtask run`");
}
