//! `ternctl cluster status` against a real etcd (`tern_testkit::etcd`): a cluster not
//! created is a problem (exit 1); two joined nodes with every shard placed are in order
//! (exit 0) and the report names each node with its shard count and the controller; a
//! node that left leaves shards without a live owner (exit 1). `ternctl cluster init`
//! writes a development CA and node certificates, and never overwrites them.

use std::process::Command;
use std::time::Duration;

use tern_cluster::{ClusterConfig, ControlPlane, JoinConfig, Listeners, NodeInfo};
use tern_testkit::etcd::Etcd;

fn status(etcd: &Etcd) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .args(["cluster", "status", "--etcd", &etcd.endpoint, "--cluster", "ops"])
        .output()
        .expect("ternctl runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code().unwrap_or(-1), stdout)
}

#[test]
fn cluster_status_reports_nodes_shards_and_the_controller() {
    let Some(etcd) = Etcd::start() else { return };
    let (code, report) = status(&etcd);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("not created"), "{report}");

    let join = |node: &str| {
        ControlPlane::join(JoinConfig {
            endpoints: vec![etcd.endpoint.clone()],
            cluster: "ops".into(),
            node: node.into(),
            info: NodeInfo {
                listeners: Listeners::tcp(format!("{node}.local:7000")),
                cores: 4,
                capacity: 1,
            },
            create: ClusterConfig { shards: 12, initial_nodes: 2 },
            lease_ttl_s: 5,
        })
        .expect("joins")
    };
    let (one, two) = (join("one"), join("two"));
    let (map, placed) = two.wait_for(Duration::from_secs(15), |m| m.shards.len() == 12);
    assert!(placed, "{map:?}");
    let (code, report) = status(&etcd);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("cluster ops: 12 shards"), "{report}");
    assert!(
        report.contains("node one: tcp one.local:7000 (4 cores, capacity 1): 6 shards"),
        "{report}"
    );
    assert!(
        report.contains("node two: tcp two.local:7000 (4 cores, capacity 1): 6 shards"),
        "{report}"
    );
    let controller = map.controller().expect("a controller");
    assert!(report.contains(&format!("controller: {controller}")), "{report}");
    // A node that left takes its shards' owner with it: they are reported, exit 1.
    one.leave();
    let (_, gone) = two.wait_for(Duration::from_secs(5), |m| !m.nodes.contains_key("one"));
    assert!(gone);
    let (code, report) = status(&etcd);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("6 shards without a live owner"), "{report}");
}

#[test]
fn cluster_init_writes_a_ca_and_node_certificates_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mesh");
    let init = || {
        Command::new(env!("CARGO_BIN_EXE_ternctl"))
            .args(["cluster", "init", "--nodes", "a,b", "--out"])
            .arg(&out)
            .output()
            .expect("ternctl runs")
    };
    let first = init();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    for name in ["ca.pem", "ca-key.pem", "a.pem", "a-key.pem", "b.pem", "b-key.pem"] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(text.starts_with("-----BEGIN "), "{name}: {text}");
    }
    // A second run would overwrite the CA: refused, naming the file, nothing changed.
    let ca = std::fs::read(out.join("ca.pem")).unwrap();
    let second = init();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ca.pem exists: nothing was written"), "{stderr}");
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca);
}
