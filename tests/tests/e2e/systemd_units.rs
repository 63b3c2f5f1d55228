//! The shipped systemd units pass `systemd-analyze verify` and score an exposure
//! of at most 2.0 under `systemd-analyze security --offline=yes`, kvroute.service
//! also with its optional eBPF-steering drop-in applied.
//!
//! Skips (saying why) only where systemd-analyze is not installed, and never
//! under CI (`CI` set), where a skip is a failure.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvroute_tests::harness::workspace_bin;

fn analyze_available() -> bool {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is required under CI"
        );
        eprintln!("skipped: systemd-analyze not installed (Debian package `systemd`)");
    }
    ok
}

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// The unit with `/usr/bin/<bin>` pointing at the freshly built binary, so verify
/// checks everything but the install location, plus `dropins` (files of
/// `deploy/systemd/<name>.d/`) in `<name>.d/` beside it: systemd-analyze adds
/// the unit file's directory to its search path, drop-in directories included.
fn staged_unit(name: &str, dropins: &[&str]) -> PathBuf {
    let src = deploy_dir().join(name);
    let text = std::fs::read_to_string(&src).unwrap();
    let text = text
        .replace(
            "/usr/bin/kvroute-control",
            workspace_bin("kvroute-control").to_str().unwrap(),
        )
        .replace(
            "/usr/bin/kvroute ",
            &format!("{} ", workspace_bin("kvroute").display()),
        );
    // One directory per call: the tests run in parallel.
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvroute-units-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(name);
    std::fs::write(&dst, text).unwrap();
    if !dropins.is_empty() {
        let d = dir.join(format!("{name}.d"));
        std::fs::create_dir_all(&d).unwrap();
        for f in dropins {
            let src = deploy_dir().join(format!("{name}.d")).join(f);
            std::fs::copy(&src, d.join(f)).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        }
    }
    dst
}

/// `systemd-analyze security --offline=yes` of a staged unit: its report.
fn security(unit: &std::path::Path) -> String {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(unit)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Verifies the unit (with `dropins`) and returns its exposure score.
fn check(name: &str, dropins: &[&str]) -> Option<f64> {
    if !analyze_available() {
        return None;
    }
    let unit = staged_unit(name, dropins);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "verify {name}: {stderr}"
    );

    let text = security(&unit);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line: {text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    eprintln!("{name} {dropins:?}: exposure {score}");
    assert!(
        score <= 2.0,
        "{name} {dropins:?} exposure {score} > 2.0: {text}"
    );
    Some(score)
}

#[test]
fn kvroute_unit_verifies_and_is_hardened() {
    check("kvroute.service", &[]);
}

#[test]
fn control_unit_verifies_and_is_hardened() {
    check("kvroute-control.service", &[]);
}

/// The drop-in is really applied (the capability it adds shows up in the
/// analysis), verifies, and keeps the exposure at 2.0 or below.
#[test]
fn kvroute_unit_with_ebpf_steering_dropin_verifies_and_is_hardened() {
    const DROPIN: &str = "ebpf-steering.conf";
    let Some(with) = check("kvroute.service", &[DROPIN]) else {
        return;
    };
    let text = security(&staged_unit("kvroute.service", &[DROPIN]));
    // CAP_BPF granted; CAP_NET_ADMIN not (sk_reuseport needs CAP_BPF only).
    for (cap, granted) in [("CAP_BPF", true), ("CAP_NET_ADMIN", false)] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("CapabilityBoundingSet=~{cap} ")))
            .unwrap_or_else(|| panic!("no {cap} line: {text}"));
        assert_eq!(
            line.trim_start().starts_with('✗'),
            granted,
            "{cap} with the drop-in: {line}"
        );
    }
    let base = check("kvroute.service", &[]).unwrap();
    assert!(with >= base, "drop-in {with} vs base {base}");
}
