//! `cargo xtask bench`: runs the host benchmarks of the hypervisor's portable code and says where
//! their results are.
//!
//! Each benchmark is a `harness = false` bench target of the `hyp` crate, built with cargo's
//! bench (release) profile. It prints a table and writes JSON to the path in its environment
//! variable `<NAME>_BENCH_JSON` (upper case), which xtask points at `target/bench/<name>.json`.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::util;

/// The benchmarks there are: bench targets of the `hyp` crate.
pub const BENCHES: &[&str] = &["stage2", "cmdq", "power"];

/// Where benchmark `name` writes its JSON.
pub fn json_path(name: &str) -> PathBuf {
    util::target_dir()
        .join("bench")
        .join(format!("{name}.json"))
}

/// The environment variable that tells benchmark `name` where to write its JSON.
pub fn json_env(name: &str) -> String {
    format!("{}_BENCH_JSON", name.to_uppercase())
}

/// The benchmarks to run for the names given (all when none), in order, without duplicates.
pub fn select(names: &[String]) -> Result<Vec<&'static str>> {
    if names.is_empty() {
        return Ok(BENCHES.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        match BENCHES.iter().find(|b| *b == n) {
            Some(b) if !out.contains(b) => out.push(*b),
            Some(_) => {}
            None => bail!("unknown benchmark {n:?} (known: {})", BENCHES.join(", ")),
        }
    }
    Ok(out)
}

/// Runs the benchmarks `names` (all when empty).
pub fn run(names: &[String]) -> Result<()> {
    let benches = select(names)?;
    for name in &benches {
        let json = json_path(name);
        if let Some(dir) = json.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut cmd = util::cargo();
        cmd.args(["bench", "-p", "hyp", "--bench", name])
            .env(json_env(name), &json);
        util::run(&mut cmd)?;
        println!("xtask: {name} results: {}", util::rel(&json));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_benches() {
        assert_eq!(select(&[]).unwrap(), vec!["stage2", "cmdq", "power"]);
        assert_eq!(select(&["cmdq".into()]).unwrap(), vec!["cmdq"]);
        assert_eq!(
            select(&["stage2".into(), "stage2".into()]).unwrap(),
            vec!["stage2"]
        );
        let e = select(&["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown benchmark \"nope\""), "{e}");
    }

    #[test]
    fn cli_parses_bench() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from(["xtask", "bench", "stage2"]).unwrap();
        assert!(matches!(cli.cmd, crate::Cmd::Bench { names } if names == ["stage2"]));
        let cli = crate::Cli::try_parse_from(["xtask", "bench"]).unwrap();
        assert!(matches!(cli.cmd, crate::Cmd::Bench { names } if names.is_empty()));
    }

    #[test]
    fn json_location() {
        assert_eq!(json_env("stage2"), "STAGE2_BENCH_JSON");
        assert!(json_path("stage2").ends_with("bench/stage2.json"));
    }
}
