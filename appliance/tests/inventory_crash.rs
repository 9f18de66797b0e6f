//! Crash safety of the inventory store: a child process commits systems in
//! a loop and is SIGKILLed at a random moment, again and again; after each
//! kill the inventory must load with exactly the systems of some complete
//! commit (0..n, none torn), and stock `git fsck` must accept the repository.

use std::process::Command;
use std::time::Duration;

use appliance::inventory::model::{Distro, Interface, Kind, Object, Profile, System};
use appliance::inventory::{Author, Inventory};

const K: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn system(i: usize) -> Object {
    Object::System(System {
        name: format!("s{i:06}"),
        profile: Some("p".into()),
        interfaces: vec![Interface {
            mac: format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// The child: opens the inventory and commits one system after another,
/// each with a larger body so files really change, until killed.
#[test]
#[ignore = "run by killed_writer_leaves_old_or_new_state as a child process"]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os("CRASH_DIR") else {
        return;
    };
    let mut inv = Inventory::open(std::path::Path::new(&dir)).unwrap();
    let who = Author::new("writer");
    if inv.distro("d").is_none() {
        inv.create(
            Object::Distro(Distro {
                name: "d".into(),
                kernel: K.into(),
                initrd: K.into(),
                ..Default::default()
            }),
            &who,
        )
        .unwrap();
        inv.create(
            Object::Profile(Profile {
                name: "p".into(),
                distro: Some("d".into()),
                ..Default::default()
            }),
            &who,
        )
        .unwrap();
    }
    let mut i = inv.count(Kind::System);
    loop {
        // Edit the previous one and add the next in one commit.
        inv.put_many(vec![system(i)], &who, &format!("add s{i}"))
            .unwrap();
        if i > 0 {
            let mut prev = inv.system(&format!("s{:06}", i - 1)).unwrap().clone();
            prev.kernel_options = format!("edited={i}");
            inv.update(Object::System(prev), &who).unwrap();
        }
        i += 1;
    }
}

#[test]
fn killed_writer_leaves_old_or_new_state() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seen = 0;
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CRASH_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Vary the moment of death: 250..750 ms after start.
        std::thread::sleep(Duration::from_millis(250 + (round * 97) % 500));
        child.kill().unwrap();
        child.wait().unwrap();

        let inv = Inventory::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: inventory does not load: {e}"));
        assert!(
            inv.load_errors.is_empty(),
            "round {round}: {:?}",
            inv.load_errors
        );
        let n = inv.count(Kind::System);
        assert!(
            n >= seen,
            "round {round}: went back from {seen} to {n} systems"
        );
        for i in 0..n {
            let s = inv
                .system(&format!("s{i:06}"))
                .unwrap_or_else(|| panic!("round {round}: s{i} missing of {n}"));
            assert_eq!(s.interfaces.len(), 1);
        }
        seen = n;
        drop(inv);
        let out = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["fsck", "--no-dangling"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: git fsck: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["status", "--porcelain"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&st.stdout),
            "",
            "round {round}: work tree differs from HEAD"
        );
    }
    eprintln!("{seen} systems committed across 20 kills");
    assert!(seen > 0, "the writer never committed");
}

/// The child of the concurrent test: four writer threads add systems
/// through the group committer (as the API does) and print each name once
/// its write is answered, until killed.
#[test]
#[ignore = "run by killed_group_commit_loses_no_answered_write as a child process"]
fn crash_group_writer_child() {
    use std::io::Write;
    use std::sync::{Arc, Mutex, RwLock};
    let Some(dir) = std::env::var_os("CRASH_DIR") else {
        return;
    };
    let round: usize = std::env::var("CRASH_ROUND").unwrap().parse().unwrap();
    let mut inv = Inventory::open(std::path::Path::new(&dir)).unwrap();
    let who = Author::new("writer");
    if inv.profile("p").is_none() {
        inv.create(
            Object::Distro(Distro {
                name: "d".into(),
                kernel: K.into(),
                initrd: K.into(),
                ..Default::default()
            }),
            &who,
        )
        .unwrap();
        inv.create(
            Object::Profile(Profile {
                name: "p".into(),
                distro: Some("d".into()),
                ..Default::default()
            }),
            &who,
        )
        .unwrap();
    }
    let lock = Arc::new(RwLock::new(inv));
    let committer = Arc::new(appliance::inventory::group::Committer::new());
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let (lock, committer, out) = (lock.clone(), committer.clone(), out.clone());
            std::thread::spawn(move || {
                for k in 0.. {
                    // Unique across rounds, threads and writes.
                    let i = round * 40_000 + t * 10_000 + k;
                    let obj = Object::System(System {
                        name: format!("s{i:06}"),
                        profile: Some("p".into()),
                        interfaces: vec![Interface {
                            mac: format!(
                                "02:00:01:{:02x}:{:02x}:{:02x}",
                                i >> 16,
                                (i >> 8) & 0xff,
                                i & 0xff
                            ),
                            ..Default::default()
                        }],
                        ..Default::default()
                    });
                    let name = obj.name().to_owned();
                    let who = Author::new(&format!("writer{t}"));
                    committer
                        .run(&lock, move |inv| inv.create(obj, &who))
                        .unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "{name}").unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Concurrent writers share commits (group commit); killing the process
/// with SIGKILL at any moment loses no write that was answered: every name
/// the child printed after its write returned is in the reloaded
/// inventory, and stock git accepts the repository.
#[test]
fn killed_group_commit_loses_no_answered_write() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut answered_total = 0;
    let mut grouped = false;
    for round in 0..8usize {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_group_writer_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CRASH_DIR", dir.path())
            .env("CRASH_ROUND", round.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        std::thread::sleep(Duration::from_millis(300 + (round as u64 * 131) % 600));
        child.kill().unwrap();
        child.wait().unwrap();
        let text = reader.join().unwrap();
        // Only whole lines: a name cut by the kill was not fully reported.
        let answered: Vec<&str> = text
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .filter(|l| l.starts_with('s'))
            .collect();
        let inv = Inventory::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: inventory does not load: {e}"));
        assert!(
            inv.load_errors.is_empty(),
            "round {round}: {:?}",
            inv.load_errors
        );
        for name in &answered {
            assert!(
                inv.system(name).is_some(),
                "round {round}: {name} was answered as stored but is gone after kill -9"
            );
        }
        answered_total += answered.len();
        let commits: usize = String::from_utf8_lossy(
            &Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(["rev-list", "--count", "HEAD"])
                .output()
                .unwrap()
                .stdout,
        )
        .trim()
        .parse()
        .unwrap();
        // 3 set-up commits; fewer commits than systems means writes shared.
        if commits < inv.count(Kind::System) + 3 {
            grouped = true;
        }
        drop(inv);
        let out = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["fsck", "--strict", "--no-dangling"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: git fsck: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("{answered_total} answered writes across 8 kills, none lost");
    assert!(answered_total > 0, "no write was ever answered");
    assert!(grouped, "four concurrent writers never shared a commit");
}
