//! Check results and the PASS/FAIL markers the test harness looks for.

use core::fmt;

use crate::console::println;
use crate::psci;

/// Longest failure reason kept (small enough for clippy's `result_large_err`).
const MSG_LEN: usize = 120;

/// A short failure reason, formatted without allocation (truncated if long).
pub struct Msg {
    buf: [u8; MSG_LEN],
    len: u8,
}

impl Msg {
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut m = Msg {
            buf: [0; MSG_LEN],
            len: 0,
        };
        // Msg::write_str never fails; it truncates.
        let _ = fmt::Write::write_fmt(&mut m, args);
        m
    }

    fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..usize::from(self.len)]) {
            Ok(s) => s,
            // Truncation split a character: keep the valid prefix.
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl fmt::Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let len = usize::from(self.len);
        let n = s.len().min(MSG_LEN - len);
        self.buf[len..len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len = (len + n) as u8;
        Ok(())
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one check.
pub type CheckResult = Result<(), Msg>;

/// Returns `Err(Msg)` from the enclosing function.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::report::Msg::new(format_args!($($arg)*)))
    };
}
pub(crate) use fail;

/// Fails the enclosing check unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::report::fail!($($arg)*);
        }
    };
}
pub(crate) use ensure;

/// Counts and prints check results.
pub struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    pub const fn new() -> Self {
        Report {
            passed: 0,
            failed: 0,
        }
    }

    /// Prints `selftest: PASS <name>` or `selftest: FAIL <name>: <reason>`.
    pub fn record(&mut self, name: impl fmt::Display, result: CheckResult) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("selftest: PASS {name}");
            }
            Err(why) => {
                self.failed += 1;
                println!("selftest: FAIL {name}: {why}");
            }
        }
    }

    /// Notes a check that was not run (it counts neither way).
    pub fn skip(&mut self, name: &str, why: &str) {
        println!("selftest: SKIP {name}: {why}");
    }

    /// Prints the summary and powers off (all passed) or resets the VM.
    pub fn finish(self) -> ! {
        if self.failed == 0 {
            println!("selftest: ALL PASS ({} checks)", self.passed);
            psci::system_off()
        } else {
            println!("selftest: {} FAILED", self.failed);
            psci::system_reset()
        }
    }
}
