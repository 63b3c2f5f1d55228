//! sd_notify from kvroute-control against the real binaries: a test-owned
//! NOTIFY_SOCKET stands in for systemd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kvroute_tests::harness::{free_port, Kvroute, NotifySocket as Notify, Proc, Upstream};

fn start_control(n: &Notify, dataplane: &str, replica: &str) -> (Proc, PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvrc-notify-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("control.toml");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        &cfg,
        format!(
            "dataplanes = [\"{dataplane}\"]\nlisten = \"{listen}\"\n[health]\ninterval_ms = 100\n\
             [push]\nresync_ms = 100\n[[replicas]]\nurl = \"{replica}\"\nengine = \"openai\"\n"
        ),
    )
    .unwrap();
    let p = Proc::spawn_env(
        "kvroute-control",
        &["--config".to_string(), cfg.display().to_string()],
        &[
            ("NOTIFY_SOCKET", n.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    (p, dir)
}

#[test]
fn ready_after_the_first_push_then_watchdog_reload_and_stopping() {
    let n = Notify::new();
    let up = Upstream::start("a");
    // No --replica: the replica set can only come from the daemon's push.
    let dp = Kvroute::start(&["--workers", "1"]);
    let (p, dir) = start_control(&n, &dp.admin.to_string(), &up.url());
    let msgs = n.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let ready = msgs.last().expect("no notification at all");
    assert!(ready.contains("READY=1"), "{msgs:?}");
    assert!(ready.contains("STATUS=dataplanes=1/1 up"), "{ready}");
    // READY means the data plane already has the replica set.
    let st = dp.admin_get("/state").json();
    assert_eq!(st["replicas"][0]["url"], up.url(), "{st}");

    let pings = n.collect(Duration::from_millis(1500), |_| false);
    let count = pings.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        count >= 3,
        "watchdog pings at half of 400 ms expected, got {pings:?}"
    );

    p.signal("HUP");
    let msgs = n.collect(Duration::from_secs(5), |m| m.contains("READY=1"));
    let reload = msgs
        .iter()
        .position(|m| m.contains("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1: {msgs:?}"));
    assert!(
        msgs[reload..].iter().any(|m| m.contains("READY=1")),
        "no READY=1 after the reload: {msgs:?}"
    );

    p.signal("TERM");
    let msgs = n.collect(Duration::from_secs(5), |m| m.contains("STOPPING=1"));
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_data_plane_that_is_down_does_not_hold_back_readiness() {
    let n = Notify::new();
    let up = Upstream::start("a");
    let dead = format!("127.0.0.1:{}", free_port());
    let (_p, dir) = start_control(&n, &dead, &up.url());
    let msgs = n.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let ready = msgs.last().expect("no notification at all");
    assert!(ready.contains("READY=1"), "{msgs:?}");
    assert!(ready.contains("STATUS=dataplanes=0/1 up"), "{ready}");
    let _ = std::fs::remove_dir_all(dir);
}
