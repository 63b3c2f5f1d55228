//! `cargo xtask build-ebpf [--check]`: compiles `ebpf/bpf/steer.bpf.c` into the
//! committed `ebpf/obj/steer.bpf.o`.
//!
//! The object is committed so that building kvroute never needs clang; `--check`
//! (run by CI when clang is present) rebuilds it and fails if the bytes differ
//! from the committed ones, so the object cannot drift from its source.
//!
//! Reproducibility: clang's DWARF records the build directory and the header
//! paths, which differ per checkout, so paths are mapped to `.` and the DWARF
//! sections are stripped afterwards. BTF (what the loader and the verifier use)
//! stays. Other variance would come from a different clang, so the exact one is
//! pinned.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use kvroute_bench::procs::{have, root};

/// Debian bookworm's clang; another major version emits different bytes.
const CLANG: &str = "clang-19";
const STRIP: &str = "llvm-strip-19";
const SOURCE: &str = "ebpf/bpf/steer.bpf.c";
const OBJECT: &str = "ebpf/obj/steer.bpf.o";

#[derive(clap::Args)]
pub struct Args {
    /// Rebuild into a temporary file and fail if it differs from the committed object.
    #[arg(long)]
    check: bool,
    /// With --check: succeed (with a note) when clang-19 is not installed.
    #[arg(long)]
    allow_missing_clang: bool,
}

/// The multiarch include dir holding `asm/types.h`, which `linux/bpf.h` needs
/// but `-target bpf` does not search.
fn multiarch_include() -> Option<PathBuf> {
    let from_gcc = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|t| t.trim().to_string());
    // Without gcc, Debian's triple for this machine's architecture.
    let guess = format!("{}-linux-gnu", std::env::consts::ARCH);
    from_gcc
        .into_iter()
        .chain([guess])
        .map(|t| Path::new("/usr/include").join(t))
        .find(|p| p.join("asm").exists())
}

/// Compiles `SOURCE` to `out`; deterministic for a given clang and libbpf headers.
pub fn build(out: &Path) -> anyhow::Result<()> {
    let root = root();
    let src_dir = root.join("ebpf");
    let raw = out.with_extension("unstripped.o");
    let mut cc = Command::new(CLANG);
    cc.current_dir(&src_dir)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-ffile-prefix-map={}=.", src_dir.display()))
        .arg(format!("-ffile-prefix-map={}=.", root.display()));
    if let Some(inc) = multiarch_include() {
        cc.arg("-I").arg(inc);
    }
    cc.arg("-c")
        .arg(root.join(SOURCE))
        .arg("-o")
        .arg(&raw)
        .env("SOURCE_DATE_EPOCH", "0");
    let st = cc.status().with_context(|| format!("running {CLANG}"))?;
    if !st.success() {
        bail!("{CLANG} failed on {SOURCE}");
    }
    let st = Command::new(STRIP)
        .args(["--strip-debug", "--remove-section=.llvm_addrsig"])
        .arg(&raw)
        .arg("-o")
        .arg(out)
        .status()
        .with_context(|| format!("running {STRIP}"))?;
    let _ = std::fs::remove_file(&raw);
    if !st.success() {
        bail!("{STRIP} failed");
    }
    Ok(())
}

/// `--check`, for `cargo xtask test`.
pub fn check(allow_missing_clang: bool) -> anyhow::Result<()> {
    run(Args {
        check: true,
        allow_missing_clang,
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let root = root();
    let committed = root.join(OBJECT);
    if !have(CLANG) || !have(STRIP) {
        let msg = format!(
            "{CLANG} and {STRIP} are needed (Debian: apt-get install clang-19 llvm-19 libbpf-dev)"
        );
        if a.check && a.allow_missing_clang {
            println!("build-ebpf --check: skipped, {msg}");
            return Ok(());
        }
        bail!(msg);
    }
    if !a.check {
        std::fs::create_dir_all(committed.parent().expect("has a parent"))?;
        build(&committed)?;
        println!(
            "built {OBJECT} ({} bytes)",
            std::fs::metadata(&committed)?.len()
        );
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("kvroute-steer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (first, second) = (tmp.join("a.o"), tmp.join("b.o"));
    build(&first)?;
    build(&second)?;
    let (a_bytes, b_bytes) = (std::fs::read(&first)?, std::fs::read(&second)?);
    let _ = std::fs::remove_dir_all(&tmp);
    if a_bytes != b_bytes {
        bail!("build-ebpf is not reproducible: two builds of {SOURCE} differ");
    }
    let old = std::fs::read(&committed).with_context(|| format!("reading {OBJECT}"))?;
    if old != a_bytes {
        bail!(
            "{OBJECT} does not match {SOURCE}: run `cargo xtask build-ebpf` and commit the object"
        );
    }
    println!(
        "build-ebpf --check: two builds identical, {OBJECT} matches its source ({} bytes)",
        old.len()
    );
    Ok(())
}
