//! Finding (and on Debian, installing) QEMU, building its command line, and running it under a
//! wall-clock timeout while echoing and capturing its output.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::board::{Board, Exit, Qemu};
use crate::util;

/// Oldest QEMU we accept (SMMUv3 with `virtualization=on` and GICv3 as we use them).
pub const MIN_VERSION: (u32, u32) = (10, 0);
const BINARY: &str = "qemu-system-aarch64";
const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/backports.list";
const BACKPORTS_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main";

/// Parses `QEMU emulator version 10.0.2 (Debian ...)` into `(10, 0, 2)`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = &text[text.find("version ")? + "version ".len()..];
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| {
        let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let micro = parts.next().flatten().unwrap_or(0);
    Some((major, minor, micro))
}

/// The program to run: `$QEMU` if set, else `qemu-system-aarch64` from `PATH`.
fn program() -> PathBuf {
    std::env::var_os("QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BINARY))
}

/// `Ok(None)` when the program is missing.
fn version_of(program: &Path) -> Result<Option<(u32, u32, u32)>> {
    match Command::new(program).arg("--version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running {} --version", program.display())),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            parse_version(&text)
                .map(Some)
                .with_context(|| format!("cannot read a version from {text:?}"))
        }
    }
}

fn debian_codename() -> Option<String> {
    if !Path::new("/etc/debian_version").exists() {
        return None;
    }
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    Some(
        os.lines()
            .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
            .unwrap_or("")
            .trim_matches('"')
            .to_owned(),
    )
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

fn install_commands(codename: &str) -> Vec<String> {
    if codename == "bookworm" {
        vec![
            format!("echo '{BACKPORTS_LINE}' > {BACKPORTS_LIST}"),
            "apt-get update".into(),
            "apt-get install -y -t bookworm-backports qemu-system-arm".into(),
        ]
    } else {
        vec![
            "apt-get update".into(),
            "apt-get install -y qemu-system-arm".into(),
        ]
    }
}

fn install(codename: &str) -> Result<()> {
    if codename == "bookworm" {
        println!("installing qemu-system-arm from bookworm-backports");
        let have = std::fs::read_to_string(BACKPORTS_LIST)
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim() == BACKPORTS_LINE);
        if !have {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(BACKPORTS_LIST)
                .with_context(|| format!("opening {BACKPORTS_LIST}"))?;
            writeln!(f, "{BACKPORTS_LINE}")?;
        }
    } else {
        println!("installing qemu-system-arm");
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        util::run(&mut c)
    };
    apt(&["update"])?;
    if codename == "bookworm" {
        apt(&[
            "install",
            "-y",
            "-t",
            "bookworm-backports",
            "qemu-system-arm",
        ])
    } else {
        apt(&["install", "-y", "qemu-system-arm"])
    }
}

/// Finds a QEMU ≥ 10.0, installing it on Debian when running as root.
pub fn find() -> Result<PathBuf> {
    let prog = program();
    let ok = |v: (u32, u32, u32)| (v.0, v.1) >= MIN_VERSION;
    let problem = match version_of(&prog)? {
        Some(v) if ok(v) => return Ok(prog),
        Some(v) => format!(
            "{} is version {}.{}.{}; {}.{} or newer is needed",
            prog.display(),
            v.0,
            v.1,
            v.2,
            MIN_VERSION.0,
            MIN_VERSION.1
        ),
        None => format!("{} not found", prog.display()),
    };
    eprintln!("{problem}");
    let codename = debian_codename();
    match codename {
        Some(c) if is_root() && std::env::var_os("QEMU").is_none() => {
            install(&c)?;
            match version_of(&prog)? {
                Some(v) if ok(v) => Ok(prog),
                Some(v) => bail!(
                    "after installing, {} is still version {}.{}.{}",
                    prog.display(),
                    v.0,
                    v.1,
                    v.2
                ),
                None => bail!("after installing, {} is still not found", prog.display()),
            }
        }
        other => {
            let codename = other.as_deref().unwrap_or("bookworm");
            let cmds = install_commands(codename);
            let distro = if codename == "bookworm" {
                "Debian 12 (bookworm)"
            } else {
                "Debian"
            };
            bail!(
                "{problem}.\nOn {distro}, install it as root with:\n    {}\n\
                 or point $QEMU at a qemu-system-aarch64 of version {}.{} or newer.",
                cmds.join("\n    "),
                MIN_VERSION.0,
                MIN_VERSION.1
            )
        }
    }
}

/// `-m` value for a byte count.
fn mem_arg(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// The QEMU command line for a board: `-M -cpu -smp -m [-semihosting] [-device ...] [disks]
/// -nographic -nic none -no-reboot -kernel`. Creates the board's scratch disks afresh (zeroed),
/// so every run starts from the same disk. Fails for a board without a `[qemu]` section.
pub fn command(qemu: &Path, board: &Board, kernel: &Path) -> Result<Command> {
    let mut cmd = machine_command(qemu, board)?;
    cmd.arg("-kernel").arg(kernel);
    Ok(cmd)
}

/// [`command`] without `-kernel`: the machine, its devices and disks (created afresh), and the
/// console. For booting something else on the very same machine (the Linux benchmark's bare
/// kernel).
pub fn machine_command(qemu: &Path, board: &Board) -> Result<Command> {
    let Some(q) = &board.qemu else {
        bail!(
            "board {:?} has no [qemu] section: it cannot run under QEMU",
            board.name
        );
    };
    for d in &q.disks {
        crate::linux::disk_image(&d.path, d.size)?;
    }
    let mut cmd = Command::new(qemu);
    cmd.args(machine_args(q, board.exit == Exit::Semihosting));
    Ok(cmd)
}

/// The arguments of [`machine_command`].
fn machine_args(q: &Qemu, semihosting: bool) -> Vec<String> {
    let mut a: Vec<String> = ["-M", &q.machine, "-cpu", &q.cpu, "-smp"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(q.smp.to_string());
    a.push("-m".into());
    a.push(mem_arg(q.memory));
    if semihosting {
        a.push("-semihosting".into());
    }
    for d in &q.devices {
        a.push("-device".into());
        a.push(d.clone());
    }
    for d in &q.disks {
        a.extend(d.args.iter().cloned());
    }
    a.extend(["-nographic", "-nic", "none", "-no-reboot"].map(String::from));
    a
}

/// Dumps QEMU's own DTB for the board (same machine options) to `out`.
pub fn dump_dtb(qemu: &Path, board: &Board, out: &Path) -> Result<()> {
    let Some(q) = &board.qemu else {
        bail!("board {:?} has no [qemu] section", board.name);
    };
    let mut cmd = Command::new(qemu);
    let out_str = out.to_str().context("DTB path is not UTF-8")?;
    ensure_no_comma(out_str)?;
    cmd.args(["-M", &format!("{},dumpdtb={out_str}", q.machine)])
        .args([
            "-cpu",
            &q.cpu,
            "-smp",
            &q.smp.to_string(),
            "-m",
            &mem_arg(q.memory),
        ])
        .args(["-nographic", "-nic", "none"])
        .stdin(Stdio::null());
    util::output(&mut cmd)?;
    if !out.is_file() {
        bail!("QEMU did not write {}", out.display());
    }
    Ok(())
}

fn ensure_no_comma(s: &str) -> Result<()> {
    if s.contains(',') {
        bail!("path {s:?} contains a comma, which QEMU's option syntax cannot take");
    }
    Ok(())
}

/// How to run QEMU.
pub struct RunOptions {
    /// Kill QEMU after this long; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Put this in front of every echoed line (`None`: echo as is).
    pub prefix: Option<String>,
    /// Give QEMU our stdin (for the serial console / monitor); otherwise it gets /dev/null.
    pub interactive: bool,
    /// Copy QEMU's output to our stdout/stderr as it comes (it is captured either way).
    pub echo: bool,
}

/// How a QEMU run ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Exit code; for a death by signal, 128 + the signal number; 124 after a timeout (whatever
    /// QEMU itself returned when it was stopped).
    pub code: i32,
    /// Everything QEMU wrote to stdout and stderr, interleaved as it came.
    pub output: String,
    /// The same output as lines (without the line end), each with the time it was complete.
    pub lines: Vec<Line>,
    pub duration: Duration,
    /// It was killed because it ran past the timeout.
    pub timed_out: bool,
}

/// One line of output and when xtask had read all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Since QEMU was started.
    pub at: Duration,
    /// Without the `\n` (or `\r\n`).
    pub text: String,
}

impl Outcome {
    /// When the first line holding `marker` was complete (since QEMU was started).
    pub fn first_at(&self, marker: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|l| l.text.contains(marker))
            .map(|l| l.at)
    }
}

/// Splits output into timed lines as it arrives (one per stream: stdout and stderr each have
/// their own partial line).
struct LineSplitter {
    start: Instant,
    partial: Vec<u8>,
    lines: Arc<Mutex<Vec<Line>>>,
}

impl LineSplitter {
    fn push_line(&mut self, at: Duration) {
        let text = String::from_utf8_lossy(&self.partial);
        let text = text.strip_suffix('\r').unwrap_or(&text).to_owned();
        self.partial.clear();
        self.lines.lock().unwrap().push(Line { at, text });
    }

    /// A chunk that was read now.
    fn feed(&mut self, chunk: &[u8]) {
        let at = self.start.elapsed();
        for &b in chunk {
            if b == b'\n' {
                self.push_line(at);
            } else {
                self.partial.push(b);
            }
        }
    }

    /// End of the stream: an unterminated last line counts too.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let at = self.start.elapsed();
            self.push_line(at);
        }
    }
}

fn code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Kills the child when dropped, so QEMU never outlives xtask's control of it.
struct Reaper(Option<Child>);

impl Reaper {
    /// SIGTERM (QEMU then restores the terminal), then SIGKILL if it lingers; always waits.
    fn stop(&mut self) -> Option<ExitStatus> {
        let child = self.0.as_mut()?;
        if let Ok(Some(st)) = child.try_wait() {
            self.0 = None;
            return Some(st);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                self.0 = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let st = child.wait().ok();
        self.0 = None;
        st
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies `src` to our stdout or stderr as it arrives (with `prefix` at each line start), into
/// `sink` and, as timed lines, into `lines`.
fn pump(
    mut src: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<u8>>>,
    mut lines: LineSplitter,
    to_stderr: bool,
    echo: bool,
    prefix: Option<String>,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut at_line_start = true;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            lines.feed(chunk);
            sink.lock().unwrap().extend_from_slice(chunk);
            if !echo {
                continue;
            }
            let mut echoed = Vec::with_capacity(n + 16);
            match &prefix {
                None => echoed.extend_from_slice(chunk),
                Some(p) => {
                    for &b in chunk {
                        if at_line_start {
                            echoed.extend_from_slice(p.as_bytes());
                        }
                        echoed.push(b);
                        at_line_start = b == b'\n';
                    }
                }
            }
            let _ = if to_stderr {
                let mut e = std::io::stderr().lock();
                e.write_all(&echoed).and_then(|_| e.flush())
            } else {
                let mut o = std::io::stdout().lock();
                o.write_all(&echoed).and_then(|_| o.flush())
            };
        }
        lines.finish();
        let _ = done.send(());
    });
}

/// Runs `cmd`, echoing and capturing its output, under the timeout.
pub fn run(mut cmd: Command, opts: &RunOptions) -> Result<Outcome> {
    let line = util::show(&cmd);
    eprintln!("$ {line}");
    cmd.stdin(if opts.interactive {
        Stdio::inherit()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let sink = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let splitter = || LineSplitter {
        start,
        partial: Vec::new(),
        lines: lines.clone(),
    };
    let (done, readers) = mpsc::channel();
    pump(
        child.stdout.take().unwrap(),
        sink.clone(),
        splitter(),
        false,
        opts.echo,
        opts.prefix.clone(),
        done.clone(),
    );
    pump(
        child.stderr.take().unwrap(),
        sink.clone(),
        splitter(),
        true,
        opts.echo,
        opts.prefix.clone(),
        done,
    );
    let mut reaper = Reaper(Some(child));
    let mut timed_out = false;
    let status = loop {
        let child = reaper.0.as_mut().unwrap();
        if let Some(st) = child.try_wait().context("waiting for QEMU")? {
            reaper.0 = None;
            break Some(st);
        }
        if opts.timeout.is_some_and(|t| start.elapsed() >= t) {
            timed_out = true;
            break reaper.stop();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let duration = start.elapsed();
    // Both pipes reach EOF once QEMU is gone; don't hang if something else still holds them.
    for _ in 0..2 {
        if readers.recv_timeout(Duration::from_secs(2)).is_err() {
            break;
        }
    }
    let output = String::from_utf8_lossy(&sink.lock().unwrap()).into_owned();
    let mut lines = std::mem::take(&mut *lines.lock().unwrap());
    lines.sort_by_key(|l| l.at);
    if timed_out {
        eprintln!(
            "QEMU killed after {:.1} s (timeout)",
            duration.as_secs_f64()
        );
    }
    Ok(Outcome {
        code: if timed_out {
            124
        } else {
            status.map(code_of).unwrap_or(137)
        },
        output,
        lines,
        duration,
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
            ),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15"),
            Some((7, 2, 15))
        );
        assert_eq!(
            parse_version("QEMU emulator version 11.1"),
            Some((11, 1, 0))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.1.0-rc2"),
            Some((10, 1, 0))
        );
        assert_eq!(parse_version("no"), None);
    }

    #[test]
    fn memory_argument() {
        assert_eq!(mem_arg(1 << 30), "1024M");
        assert_eq!(mem_arg((1 << 20) + 4096), "1028K");
    }

    #[test]
    fn install_hint_for_bookworm() {
        let cmds = install_commands("bookworm");
        assert!(cmds[0].contains(BACKPORTS_LINE));
        assert_eq!(
            cmds[2],
            "apt-get install -y -t bookworm-backports qemu-system-arm"
        );
    }

    #[test]
    fn runner_captures_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let o = run(
            cmd,
            &RunOptions {
                timeout: Some(Duration::from_secs(30)),
                prefix: Some("  | ".into()),
                interactive: false,
                echo: false,
            },
        )
        .unwrap();
        assert_eq!(o.code, 3);
        assert!(!o.timed_out);
        assert!(o.output.contains("out\n"));
        assert!(o.output.contains("err\n"));
        let texts: Vec<&str> = o.lines.iter().map(|l| l.text.as_str()).collect();
        assert!(
            texts.contains(&"out") && texts.contains(&"err"),
            "{texts:?}"
        );
    }

    #[test]
    fn runner_times_lines() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "printf 'first\\r\\n'; sleep 0.5; echo second; printf 'no newline'",
        ]);
        let o = run(
            cmd,
            &RunOptions {
                timeout: Some(Duration::from_secs(30)),
                prefix: None,
                interactive: false,
                echo: false,
            },
        )
        .unwrap();
        let texts: Vec<&str> = o.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["first", "second", "no newline"]);
        let first = o.first_at("first").unwrap();
        let second = o.first_at("sec").unwrap();
        assert!(
            second >= first + Duration::from_millis(400),
            "{first:?} {second:?}"
        );
        assert!(second <= o.duration);
        assert_eq!(o.first_at("third"), None);
    }

    #[test]
    fn machine_arguments() {
        let q = Qemu {
            machine: "virt".into(),
            cpu: "max".into(),
            smp: 4,
            memory: 1 << 30,
            devices: vec!["edu,addr=02.0".into()],
            disks: vec![crate::board::Disk {
                path: "/d.img".into(),
                size: 512,
                args: vec!["-drive".into(), "file=/d.img".into()],
            }],
        };
        assert_eq!(
            machine_args(&q, true).join(" "),
            "-M virt -cpu max -smp 4 -m 1024M -semihosting -device edu,addr=02.0 \
             -drive file=/d.img -nographic -nic none -no-reboot"
        );
        assert!(!machine_args(&q, false).contains(&"-semihosting".to_string()));
    }

    #[test]
    fn runner_escalates_to_sigkill() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap '' TERM; echo started; while :; do sleep 0.1; done",
        ]);
        let o = run(
            cmd,
            &RunOptions {
                timeout: Some(Duration::from_millis(300)),
                prefix: None,
                interactive: false,
                echo: false,
            },
        )
        .unwrap();
        assert!(o.timed_out);
        assert_eq!(o.code, 124);
        assert!(o.output.contains("started"));
        assert!(o.duration < Duration::from_secs(10), "{:?}", o.duration);
    }

    #[test]
    fn runner_kills_on_timeout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 60"]);
        let o = run(
            cmd,
            &RunOptions {
                timeout: Some(Duration::from_millis(300)),
                prefix: None,
                interactive: false,
                echo: false,
            },
        )
        .unwrap();
        assert!(o.timed_out);
        assert_eq!(o.code, 124);
        assert!(o.output.contains("started"));
        assert!(o.duration < Duration::from_secs(10));
    }
}
