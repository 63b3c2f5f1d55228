//! The shipped systemd units pass `systemd-analyze verify` and score an exposure
//! of at most 2.0 under `systemd-analyze security --offline=yes`.
//!
//! Skips (saying why) only where systemd-analyze is not installed, and never
//! under CI (`CI` set), where a skip is a failure.

use std::path::PathBuf;
use std::process::Command;

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

/// The unit with `/usr/bin/<bin>` pointing at the freshly built binary, so verify
/// checks everything but the install location.
fn staged_unit(name: &str) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(name);
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
    let dir = std::env::temp_dir().join(format!("kvroute-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(name);
    std::fs::write(&dst, text).unwrap();
    dst
}

fn check(name: &str) {
    if !analyze_available() {
        return;
    }
    let unit = staged_unit(name);
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

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
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
    eprintln!("{name}: exposure {score}");
    assert!(score <= 2.0, "{name} exposure {score} > 2.0: {text}");
}

#[test]
fn kvroute_unit_verifies_and_is_hardened() {
    check("kvroute.service");
}

#[test]
fn control_unit_verifies_and_is_hardened() {
    check("kvroute-control.service");
}
