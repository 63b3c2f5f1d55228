//! `cargo xtask package`: a Debian package built with plain `dpkg-deb --build`
//! (no cargo-deb to install), then checked by unpacking it into a scratch root.
//!
//! Layout: the two binaries in /usr/bin, the units in /lib/systemd/system, the
//! commented default configs in /etc/kvroute (conffiles, so an upgrade keeps the
//! operator's edits), the README and deployment examples in /usr/share/doc/kvroute,
//! and the optional eBPF-steering drop-in in /usr/share/kvroute/systemd (not in
//! a drop-in directory, so it is off until the operator links it; not under
//! /usr/share/doc, which minimal installs drop).
//! No sysusers/tmpfiles snippets: the units use `DynamicUser=` and
//! `RuntimeDirectory=kvroute`, so systemd creates the user and the admin-socket
//! directory at start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvroute_bench::procs::{build_release_daemons, capture, root, sh, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the .deb (default: target/debian).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use the binaries already in target/release instead of building them.
    #[arg(long)]
    pub no_build: bool,
    /// Keep debug line tables (by default the packaged binaries are stripped).
    #[arg(long)]
    pub no_strip: bool,
}

/// What goes into the package: (source, path inside the package, mode, conffile).
struct Entry {
    src: PathBuf,
    dest: &'static str,
    mode: u32,
    conffile: bool,
}

pub const PACKAGE: &str = "kvroute";

/// Files every kvroute .deb must contain; the scratch-root check compares against it.
pub const REQUIRED: &[&str] = &[
    "usr/bin/kvroute",
    "usr/bin/kvroute-control",
    "lib/systemd/system/kvroute.service",
    "lib/systemd/system/kvroute-control.service",
    "etc/kvroute/kvroute.toml",
    "etc/kvroute/control.toml",
    "usr/share/doc/kvroute/README.md",
    "usr/share/doc/kvroute/copyright",
    DROPIN_EBPF,
];

/// The optional drop-in granting what eBPF steering needs (README: "Running under systemd").
pub const DROPIN_EBPF: &str = "usr/share/kvroute/systemd/ebpf-steering.conf";

pub const CONFFILES: &[&str] = &["/etc/kvroute/kvroute.toml", "/etc/kvroute/control.toml"];

pub fn run(a: Args) -> anyhow::Result<()> {
    let root = root();
    let target = target_dir();
    if !a.no_build {
        build_release_daemons()?;
    }
    let bins = target.join("release");
    let out = a.out.unwrap_or_else(|| target.join("debian"));
    let deb = build(
        &root,
        &bins.join("kvroute"),
        &bins.join("kvroute-control"),
        &out,
        !a.no_strip,
    )?;
    let scratch = out.join("scratch-root");
    verify(&deb, &scratch)?;
    println!("{}", deb.display());
    println!(
        "install: sudo apt install ./{}   (or dpkg -i; enables and starts kvroute.service)",
        deb.file_name().unwrap_or_default().to_string_lossy()
    );
    Ok(())
}

fn entries(root: &Path, kvroute: &Path, control: &Path) -> Vec<Entry> {
    let e = |src: PathBuf, dest, mode, conffile| Entry {
        src,
        dest,
        mode,
        conffile,
    };
    let mut v = vec![
        e(kvroute.into(), "usr/bin/kvroute", 0o755, false),
        e(control.into(), "usr/bin/kvroute-control", 0o755, false),
        e(
            root.join("deploy/systemd/kvroute.service"),
            "lib/systemd/system/kvroute.service",
            0o644,
            false,
        ),
        e(
            root.join("deploy/systemd/kvroute-control.service"),
            "lib/systemd/system/kvroute-control.service",
            0o644,
            false,
        ),
        e(
            root.join("deploy/kvroute.toml"),
            "etc/kvroute/kvroute.toml",
            0o644,
            true,
        ),
        e(
            root.join("control/control.example.toml"),
            "etc/kvroute/control.toml",
            0o644,
            true,
        ),
        e(
            root.join("README.md"),
            "usr/share/doc/kvroute/README.md",
            0o644,
            false,
        ),
        e(
            root.join("deploy/systemd/kvroute.service.d/ebpf-steering.conf"),
            DROPIN_EBPF,
            0o644,
            false,
        ),
    ];
    // Deployment examples ship as documentation when present in the tree.
    for (src, dest) in [
        (
            "deploy/sidecar/kvroute.toml",
            "usr/share/doc/kvroute/examples/sidecar/kvroute.toml",
        ),
        (
            "deploy/sidecar/README.md",
            "usr/share/doc/kvroute/examples/sidecar/README.md",
        ),
        (
            "deploy/sidecar/edge.toml",
            "usr/share/doc/kvroute/examples/sidecar/edge.toml",
        ),
        (
            "deploy/grafana/kvroute.json",
            "usr/share/doc/kvroute/examples/grafana/kvroute.json",
        ),
        (
            "deploy/prometheus/prometheus.yml",
            "usr/share/doc/kvroute/examples/prometheus/prometheus.yml",
        ),
    ] {
        let p = root.join(src);
        if p.exists() {
            v.push(e(p, dest, 0o644, false));
        }
    }
    v
}

const POSTINST: &str = r#"#!/bin/sh
# Enables and starts the data plane on a systemd host. Skipped when installing
# into another root (DPKG_ROOT) or without systemd (containers, chroots).
# kvroute-control is not enabled: its example config names replicas to edit first.
set -e
if [ "$1" = "configure" ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable kvroute.service >/dev/null 2>&1 || true
    systemctl restart kvroute.service || \
        echo "kvroute: did not start; see journalctl -u kvroute and /etc/kvroute/kvroute.toml" >&2
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop kvroute-control.service kvroute.service || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    if [ "$1" = "remove" ] || [ "$1" = "purge" ]; then
        systemctl disable kvroute.service kvroute-control.service >/dev/null 2>&1 || true
    fi
    systemctl daemon-reload || true
fi
exit 0
"#;

/// Stages the tree and runs `dpkg-deb --build`; returns the .deb path.
pub fn build(
    root: &Path,
    kvroute: &Path,
    control: &Path,
    out: &Path,
    strip: bool,
) -> anyhow::Result<PathBuf> {
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("{PACKAGE}_{version}_{arch}");
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let mut size = 0u64;
    let all = entries(root, kvroute, control);
    for e in &all {
        let dest = stage.join(e.dest);
        std::fs::create_dir_all(dest.parent().expect("nested path"))?;
        std::fs::copy(&e.src, &dest)
            .map_err(|err| anyhow::anyhow!("{} -> {}: {err}", e.src.display(), e.dest))?;
        if strip && e.dest.starts_with("usr/bin/") {
            sh(Command::new("strip").arg("--strip-debug").arg(&dest))?;
        }
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(e.mode))?;
        size += std::fs::metadata(&dest)?.len();
    }
    std::fs::write(
        stage.join("usr/share/doc/kvroute/copyright"),
        format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
             Upstream-Name: kvroute\n\nFiles: *\nLicense: {}\n",
            env!("CARGO_PKG_LICENSE")
        ),
    )?;
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: kvroute developers <kvroute@example.invalid>\n\
             Installed-Size: {}\n\
             Depends: libc6, systemd\n\
             Section: net\n\
             Priority: optional\n\
             Description: KV-cache-aware reverse proxy for LLM inference replicas\n \
             A thread-per-core io_uring proxy that routes each request to the replica\n \
             most likely to hold its prompt prefix in KV cache, plus kvroute-control,\n \
             the daemon that keeps its replica set, health and load up to date.\n",
            size.div_ceil(1024),
        ),
    )?;
    let conffiles: Vec<String> = all
        .iter()
        .filter(|e| e.conffile)
        .map(|e| format!("/{}\n", e.dest))
        .collect();
    std::fs::write(debian.join("conffiles"), conffiles.concat())?;
    for (f, body) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let p = debian.join(f);
        std::fs::write(&p, body)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    // Staging permissions follow the umask; dpkg-deb records what it sees.
    set_dir_modes(&stage)?;
    let deb = out.join(format!("{name}.deb"));
    sh(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_dir_modes(&e.path())?;
        }
    }
    Ok(())
}

/// Unpacks `deb` into `scratch` (`dpkg -x`) and checks the file list, modes,
/// conffiles and control fields, so a broken layout fails here rather than on a host.
pub fn verify(deb: &Path, scratch: &Path) -> anyhow::Result<()> {
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    std::fs::create_dir_all(scratch)?;
    sh(Command::new("dpkg").arg("-x").arg(deb).arg(scratch))?;
    for f in REQUIRED {
        let p = scratch.join(f);
        anyhow::ensure!(p.is_file(), "{f} missing from {}", deb.display());
        let mode = std::fs::metadata(&p)?.permissions().mode() & 0o777;
        let want = if f.starts_with("usr/bin/") {
            0o755
        } else {
            0o644
        };
        anyhow::ensure!(mode == want, "{f} has mode {mode:o}, want {want:o}");
    }
    let conffiles = capture(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"))?;
    for c in CONFFILES {
        anyhow::ensure!(
            conffiles.lines().any(|l| l.trim() == *c),
            "{c} is not a conffile: {conffiles}"
        );
    }
    let pkg = capture(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(deb)
            .arg("Package")
            .arg("Architecture"),
    )?;
    anyhow::ensure!(pkg.contains(PACKAGE), "control fields: {pkg}");
    // The units must point at the packaged binaries and configs.
    for unit in ["kvroute.service", "kvroute-control.service"] {
        let text = std::fs::read_to_string(scratch.join("lib/systemd/system").join(unit))?;
        for line in text.lines().filter(|l| l.starts_with("ExecStart")) {
            let bin = line
                .split_once('=')
                .map(|(_, v)| v.split_whitespace().next().unwrap_or(""))
                .unwrap_or("");
            anyhow::ensure!(
                scratch.join(bin.trim_start_matches('/')).is_file(),
                "{unit}: {bin} is not in the package"
            );
            for cfg in line.split_whitespace().filter(|w| w.starts_with("/etc/")) {
                anyhow::ensure!(
                    scratch.join(cfg.trim_start_matches('/')).is_file(),
                    "{unit}: {cfg} is not in the package"
                );
            }
        }
    }
    // Optional drop-ins ship disabled: nothing in a directory systemd reads them from.
    for active in [
        "etc/systemd",
        "lib/systemd/system/kvroute.service.d",
        "usr/lib/systemd/system/kvroute.service.d",
    ] {
        anyhow::ensure!(
            !scratch.join(active).exists(),
            "{active} is in the package: its drop-ins would be on by default"
        );
    }
    install_into_scratch_root(deb, &scratch.with_extension("dpkg-root"))?;
    eprintln!(
        "xtask: {} unpacked into {}: {} required files, conffiles and unit paths ok",
        deb.display(),
        scratch.display(),
        REQUIRED.len()
    );
    Ok(())
}

/// A real `dpkg --install` into an empty root with its own dpkg database: the
/// maintainer scripts run (on the host, `--force-script-chrootless`; they see
/// `DPKG_ROOT` and leave systemd alone) and dpkg records the conffiles. The
/// scratch root has no libc6/systemd packages, hence `--force-depends`.
fn install_into_scratch_root(deb: &Path, root: &Path) -> anyhow::Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    std::fs::create_dir_all(root.join("var/lib/dpkg/info"))?;
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates"))?;
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    let mut dpkg = Command::new("dpkg");
    dpkg.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        "--force-not-root",
        "--force-depends",
        "--log=/dev/null",
    ]);
    sh(dpkg.arg("--install").arg(deb))?;
    let status = capture(
        Command::new("dpkg-query")
            .arg(format!("--root={}", root.display()))
            .args(["-W", "-f=${Status}|${Conffiles}", PACKAGE]),
    )?;
    anyhow::ensure!(
        status.starts_with("install ok installed"),
        "dpkg --root: {status}"
    );
    for c in CONFFILES {
        anyhow::ensure!(
            status.contains(c),
            "dpkg did not record {c} as a conffile: {status}"
        );
    }
    for f in REQUIRED {
        anyhow::ensure!(root.join(f).is_file(), "dpkg --root: {f} not installed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the .deb around stand-in binaries (a release build is too slow for a
    /// unit test) and unpacks it into a scratch root.
    #[test]
    fn deb_unpacks_into_a_scratch_root_with_every_file() {
        if Command::new("dpkg-deb").arg("--version").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "dpkg-deb is required in CI"
            );
            eprintln!("skipping: dpkg-deb not installed");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("kvroute-package-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let fake = tmp.join("fake-bin");
        std::fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
        let deb = build(&root(), &fake, &fake, &tmp.join("out"), false).unwrap();
        verify(&deb, &tmp.join("root")).unwrap();
        let listing = capture(Command::new("dpkg-deb").arg("-c").arg(&deb)).unwrap();
        assert!(listing.contains("root/root"), "{listing}");
        let cfg = std::fs::read_to_string(tmp.join("root/etc/kvroute/kvroute.toml")).unwrap();
        assert!(
            cfg.lines()
                .filter(|l| l.trim_start().starts_with('#'))
                .count()
                > 10,
            "the default config must be the commented one"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
