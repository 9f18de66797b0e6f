//! Self-replication end to end (issue 5): a chain of three machines in
//! QEMU. Machine 0 boots the appliance image; machine 1, blank, PXE-boots
//! from it, installs the appliance onto its own disk, boots from that disk
//! and serves its own provisioning wire; machine 2 installs from machine 1.
//! Passes only when the last machine reports machine 0's release and every
//! parent lists its child as a checked-in replica of that release. Two
//! faults ride along: a machine whose disk is too small (its install fails
//! with a clear error at the parent, its disk untouched) and machine 1
//! killed mid-write (its disk does not boot; it PXE-boots again and
//! completes). Then sync (issue 8): a profile added on machine 2 reaches
//! machine 0 after each machine syncs with its parent.

use integration_tests::{fleet, workspace_root};

#[test]
fn three_generation_replication_chain() {
    let image = workspace_root().join("target/appliance/appliance.img");
    assert!(
        image.exists(),
        "{} missing: run `cargo xtask image` (cargo xtask test does)",
        image.display()
    );
    let work = tempfile::tempdir().unwrap();
    // With the faults: a too-small disk fails cleanly, and a machine killed
    // mid-write PXE-boots again and completes.
    let faults = fleet::Faults {
        too_small: true,
        kill_mid_write: true,
        sync: true,
    };
    let report = fleet::run(&image, 3, work.path(), faults, &mut |l| {
        eprintln!("fleet: {l}")
    })
    .unwrap_or_else(|e| panic!("fleet failed: {e}"));
    eprintln!("{}", fleet::table(&report));
    assert!(report.ok, "fleet problems: {:#?}", report.problems);
    assert_eq!(report.generations.len(), 2);
    for g in &report.generations {
        assert!(
            g.bytes_sent > 0,
            "generation {} sent nothing: {g:?}",
            g.index
        );
        // Only the data ranges travel, not the whole disk: at most 1.05×
        // the image's data bytes.
        assert!(
            g.data_bytes > 0 && g.bytes_sent as f64 <= g.data_bytes as f64 * 1.05,
            "generation {} sent {} bytes for {} bytes of data",
            g.index,
            g.bytes_sent,
            g.data_bytes
        );
    }
}
