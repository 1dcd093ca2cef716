//! A real etcd for tests: Debian's `etcd` binary (package `etcd-server`, which
//! `.ci/run` installs) on two free loopback ports with a temporary data directory,
//! killed on drop. Without the binary a test says so and skips, unless
//! `TERN_REQUIRE_ETCD=1` (CI) makes that a failure.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A running single-member etcd.
pub struct Etcd {
    child: Child,
    /// The client endpoint, `127.0.0.1:<port>`.
    pub endpoint: String,
    _data_dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts one, or returns `None` (after saying why) when the binary is missing and
    /// not required.
    pub fn start() -> Option<Etcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            let required = std::env::var("TERN_REQUIRE_ETCD").is_ok_and(|v| v == "1");
            assert!(!required, "etcd is required (TERN_REQUIRE_ETCD=1) and not on PATH");
            eprintln!("etcd is not installed (apt-get install etcd-server): test skipped");
            return None;
        }
        let data_dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--name", "test", "--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url, "--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        let etcd = Etcd { child, endpoint: format!("127.0.0.1:{client}"), _data_dir: data_dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&etcd.endpoint).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen on {}", etcd.endpoint);
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
