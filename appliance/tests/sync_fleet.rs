//! Sync end to end with host processes on loopback: four `appliance serve`
//! instances, each with its own data directory, arranged A→B→C plus A→E.
//! Concurrent edits on C and E, syncs in different orders, a node killed
//! mid-sync, convergence to one state hash with the conflicts listed on
//! every node, and an offline bundle round trip from C to A (corrupt and
//! truncated copies rejected whole, a second import changing nothing).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_appliance"))
}

/// One `appliance serve` process we started (killed on drop).
struct Node {
    name: &'static str,
    data: PathBuf,
    child: Option<Child>,
    _out: Option<BufReader<ChildStdout>>,
    url: String,
    token: String,
    id: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Node {
    fn start(name: &'static str, data: &Path) -> Node {
        let mut n = Node {
            name,
            data: data.to_owned(),
            child: None,
            _out: None,
            url: String::new(),
            token: String::new(),
            id: String::new(),
        };
        n.spawn(true);
        n.id = n.get("/api/v1/version")["node_id"]
            .as_str()
            .unwrap()
            .to_owned();
        n
    }

    fn spawn(&mut self, first: bool) {
        let mut child = bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&self.data)
            .args(["--sync-interval", "0", "--checkin-interval", "3600"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{}: {line:?}", self.name))
            .to_owned();
        self.url = format!("http://{addr}");
        if first {
            line.clear();
            out.read_line(&mut line).unwrap();
            self.token = line.trim().rsplit(' ').next().unwrap().to_owned();
            assert!(self.token.starts_with("apl_"), "{line}");
        }
        self.child = Some(child);
        self._out = Some(out);
    }

    /// SIGKILL (only the process this test started).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        bin()
            .args(args)
            .env("APPLIANCE_URL", &self.url)
            .env("APPLIANCE_TOKEN", &self.token)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "{}: appliance {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn get(&self, path: &str) -> Value {
        http_get(&self.url, path)
    }

    fn sync(&self) -> Value {
        let t = std::time::Instant::now();
        let v = self.json(&["sync"]);
        eprintln!("{} sync: {:?} {v}", self.name, t.elapsed());
        v
    }

    fn state(&self) -> String {
        self.json(&["sync", "status"])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn mirror(&self, repo: &str) -> Option<String> {
        let o = self.cli(&["repo", "show", repo, "--json"]);
        if !o.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["mirror"].as_str().map(str::to_owned)
    }

    /// Registers `child` under this node and joins its data directory.
    fn adopt(&self, name: &'static str, child_data: &Path) -> Node {
        let reg = self.json(&["replica", "register", "--name", name]);
        let id = reg["node_id"].as_str().unwrap();
        let token = reg["token"].as_str().unwrap();
        let o = bin()
            .args(["replica", "join", "--data"])
            .arg(child_data)
            .args(["--parent", &self.url, "--node-id", id, "--token", token])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let n = Node::start(name, child_data);
        assert_eq!(n.id, id, "{name} did not take its registered id");
        n
    }
}

fn http_get(url: &str, path: &str) -> Value {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

fn repo_obj(name: &str, mirror: &str) -> Value {
    json!({"kind": "repo", "object": {"name": name, "mirror": mirror}})
}

#[test]
fn fleet_converges_with_conflicts_listed_and_bundles_round_trip() {
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>8.1?}] {what}", t0.elapsed());
    // tmpfs when there is one: tens of thousands of small git objects are
    // slow to delete on a disk mounted with `discard`.
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir_in(&base).unwrap())
        .collect();
    let a = Node::start("A", dirs[0].path());
    let b = a.adopt("B", dirs[1].path());
    let e = a.adopt("E", dirs[2].path());
    let mut c = b.adopt("C", dirs[3].path());

    step("nodes up");
    // Shared starting point made on A, synced down the tree.
    a.ok(&["repo", "add", "shared", "--mirror", "http://a/0"]);
    a.ok(&["repo", "add", "doomed", "--mirror", "http://a/doomed"]);
    b.sync();
    c.sync();
    e.sync();
    assert_eq!(c.mirror("shared").as_deref(), Some("http://a/0"));
    assert_eq!(e.mirror("doomed").as_deref(), Some("http://a/doomed"));

    // A child's token cannot write the parent's inventory, and cannot sync
    // as another node.
    let link: Value =
        serde_json::from_slice(&std::fs::read(c.data.join("state/parent.json")).unwrap()).unwrap();
    let ctok = link["token"].as_str().unwrap();
    let o = bin()
        .args(["repo", "add", "sneaky", "--mirror", "http://x"])
        .env("APPLIANCE_URL", &b.url)
        .env("APPLIANCE_TOKEN", ctok)
        .output()
        .unwrap();
    assert!(!o.status.success(), "a replica token wrote the inventory");

    step("shared synced");
    // Concurrent edits on C and E: same object, edit vs delete, and new
    // objects on each side.
    c.ok(&["repo", "edit", "shared", "--mirror", "http://c/1"]);
    c.ok(&["repo", "edit", "doomed", "--mirror", "http://c/edited"]);
    std::thread::sleep(Duration::from_millis(20));
    e.ok(&["repo", "edit", "shared", "--mirror", "http://e/1"]);
    e.ok(&["repo", "remove", "doomed", "--yes"]);
    e.ok(&["repo", "add", "from-e", "--mirror", "http://e/new"]);

    step("edits done");
    // C has many changes: kill it in the middle of syncs (at several
    // points), then restart it; nothing is lost and the tree converges.
    for (round, delay_ms) in [40u64, 120, 300].into_iter().enumerate() {
        let batch: Vec<Value> = (0..1000)
            .map(|i| {
                let n = round * 1000 + i;
                repo_obj(&format!("c-{n:04}"), &format!("http://c/{n}"))
            })
            .collect();
        let tmp = c.data.join("batch.json");
        std::fs::write(&tmp, json!({"objects": batch}).to_string()).unwrap();
        let o = Command::new("curl")
            .args(["-sf", "-X", "POST", "-H"])
            .arg(format!("Authorization: Bearer {}", c.token))
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", tmp.display()))
            .arg(format!("{}/api/v1/batch", c.url))
            .output()
            .expect("curl is installed");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let syncing = bin()
            .args(["sync"])
            .env("APPLIANCE_URL", &c.url)
            .env("APPLIANCE_TOKEN", &c.token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.kill();
        let killed = syncing.wait_with_output().unwrap();
        step(&format!(
            "C killed after {delay_ms} ms (sync ok: {})",
            killed.status.success()
        ));
        c.spawn(false);
    }
    // Syncs in different orders: E first to A, then C (restarted) up.
    e.sync();
    let r = c.sync();
    assert!(r["state"].is_string(), "{r}");
    // A rerun after success sends nothing and changes nothing.
    let again = c.sync();
    assert_eq!(again["pushed_objects"], 0, "{again}");
    assert_eq!(again["pulled_objects"], 0, "{again}");
    assert_eq!(again["state"], r["state"], "{again}");
    b.sync();
    // Rounds until quiet.
    for _ in 0..3 {
        b.sync();
        c.sync();
        e.sync();
    }
    let states: Vec<String> = [&a, &b, &c, &e].iter().map(|n| n.state()).collect();
    assert!(
        states.iter().all(|s| s == &states[0]),
        "states differ: {states:?}"
    );
    // A no-change sync is one round trip.
    let quiet = c.sync();
    assert_eq!(quiet["round_trips"], 1, "{quiet}");

    step("converged");
    // The later edit (E's) won; C's edit of `shared` is listed everywhere;
    // E's later delete of `doomed` won over C's edit, which is listed too.
    for n in [&a, &b, &c, &e] {
        assert_eq!(
            n.mirror("shared").as_deref(),
            Some("http://e/1"),
            "{}",
            n.name
        );
        assert_eq!(n.mirror("doomed"), None, "{}", n.name);
        assert_eq!(n.mirror("from-e").as_deref(), Some("http://e/new"));
        assert_eq!(n.mirror("c-2999").as_deref(), Some("http://c/2999"));
        let cs = n.json(&["sync", "conflicts"]);
        let paths: Vec<&str> = cs
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"repos/shared.json"), "{}: {cs}", n.name);
        assert!(paths.contains(&"repos/doomed.json"), "{}: {cs}", n.name);
        assert!(cs
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["node"] == c.id.as_str()));
    }
    step("checked values");
    // The losing version is in A's history, readable by stock git.
    let cs = a.json(&["sync", "conflicts"]);
    let lost = cs
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["path"] == "repos/shared.json")
        .unwrap();
    let o = Command::new("git")
        .arg("-C")
        .arg(a.data.join("inventory"))
        .args(["cat-file", "-p", lost["blob"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("http://c/1"));
    let o = Command::new("git")
        .arg("-C")
        .arg(a.data.join("inventory"))
        .args(["fsck", "--no-dangling"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    step("git checked");
    // Offline: a bundle from C to A.
    c.ok(&["repo", "add", "offline-c", "--mirror", "http://c/offline"]);
    let blob = b"a blob that travels offline\n";
    let digest = {
        use std::io::Write;
        let mut p = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(blob).unwrap();
        let out = p.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    };
    std::fs::create_dir_all(c.data.join("blobs/sha256")).unwrap();
    std::fs::write(c.data.join("blobs/sha256").join(&digest), blob).unwrap();
    let file = c.data.join("to-a.bundle");
    c.ok(&[
        "bundle",
        "export",
        "--for",
        &a.id,
        "-o",
        file.to_str().unwrap(),
    ]);
    step("exported");
    let good = std::fs::read(&file).unwrap();
    let a_before = a.state();
    let bad = c.data.join("bad.bundle");
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    std::fs::write(&bad, &corrupt).unwrap();
    let o = a.cli(&["bundle", "import", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing applied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&bad, &good[..good.len() - 100]).unwrap();
    assert!(!a
        .cli(&["bundle", "import", bad.to_str().unwrap()])
        .status
        .success());
    assert_eq!(a.state(), a_before, "a rejected bundle changed A");
    assert!(!a.data.join("blobs/sha256").join(&digest).exists());
    step("rejected bad");
    let r = a.json(&["bundle", "import", file.to_str().unwrap()]);
    assert_ne!(r["merge"]["action"], "unchanged", "{r}");
    assert_eq!(a.mirror("offline-c").as_deref(), Some("http://c/offline"));
    assert_eq!(
        std::fs::read(a.data.join("blobs/sha256").join(&digest)).unwrap(),
        blob
    );
    let after = a.state();
    let r = a.json(&["bundle", "import", file.to_str().unwrap()]);
    assert_eq!(r["merge"]["action"], "unchanged", "{r}");
    assert_eq!(r["blobs_added"], 0);
    assert_eq!(a.state(), after);
    step("imported");
    // And online, the blob reaches E through A.
    e.sync();
    assert_eq!(
        std::fs::read(e.data.join("blobs/sha256").join(&digest)).unwrap(),
        blob
    );
    step("end");
    drop((a, b, c, e));
    step("killed");
    drop(dirs);
    step("removed");
}

/// A replica installed from an image starts with its own history, not its
/// parent's: the first sync merges two unrelated histories with a
/// conflict, and every later sync (edits on either side, reruns) must
/// still push and converge. The QEMU fleet found a child that had recorded
/// its own merge commit as the parent's head, so its next push left out
/// the very commit it pushed: the record is now the parent's word, and the
/// parent confirms it still holds the recorded head before a push relies
/// on it.
#[test]
fn independent_histories_keep_syncing_after_a_conflict() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Node::start("A", dirs[0].path());
    a.ok(&["repo", "add", "both", "--mirror", "http://a/0"]);
    let b = a.adopt("B", dirs[1].path());
    // B made its own, unrelated history before its first sync.
    b.ok(&["repo", "add", "both", "--mirror", "http://b/0"]);
    b.ok(&["repo", "add", "only-b", "--mirror", "http://b/1"]);
    for round in 0..3 {
        let r = b.sync();
        if round == 0 {
            // B's own writes so far travel with this first sync.
            assert!(r["audit_bytes"].as_u64().unwrap() > 0, "{r}");
        }
        a.ok(&[
            "repo",
            "edit",
            "both",
            "--mirror",
            &format!("http://a/{round}x"),
        ]);
        b.sync();
        b.ok(&[
            "repo",
            "add",
            &format!("b-{round}"),
            "--mirror",
            "http://b/r",
        ]);
        let r = b.sync();
        assert!(r["state"].is_string(), "{r}");
    }
    let r = b.sync();
    assert_eq!(r["round_trips"], 1, "not quiet after syncing: {r}");
    assert_eq!(a.state(), b.state());
    // B's writes reached A's audit log, each once, named as B's.
    let audit = a.json(&["audit"]);
    let from_b: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["via"] == b.id.as_str())
        .collect();
    let adds: Vec<&str> = from_b
        .iter()
        .filter(|l| l["method"] == "POST" && l["node"] == b.id.as_str())
        .filter_map(|l| l["path"].as_str())
        .filter(|p| p.starts_with("/api/v1/repos"))
        .collect();
    assert_eq!(adds.len(), 5, "B's five repo adds, once each: {from_b:?}");
    assert!(
        from_b
            .iter()
            .all(|l| l["who"].is_string() && l["time"].is_number()),
        "{from_b:?}"
    );
    // What the parent reported is what is recorded, never B's own head.
    let rec: Value =
        serde_json::from_slice(&std::fs::read(b.data.join("state/sync.json")).unwrap()).unwrap();
    assert_eq!(rec["parent_head"], a.json(&["sync", "status"])["head"]);
    // A record naming a commit the parent never got (as the old code wrote,
    // or a parent restored from an older backup) does not stop the push.
    b.ok(&["repo", "add", "after-bad-record", "--mirror", "http://b/x"]);
    let own = b.json(&["sync", "status"])["head"].clone();
    let bad = json!({"parent_head": own, "last_sync": rec["last_sync"]});
    std::fs::write(b.data.join("state/sync.json"), bad.to_string()).unwrap();
    let r = b.sync();
    assert!(r["pushed_objects"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(a.mirror("after-bad-record").as_deref(), Some("http://b/x"));
    assert_eq!(a.mirror("b-2").as_deref(), Some("http://b/r"));
    assert_eq!(b.mirror("both").as_deref(), Some("http://a/2x"));
}

/// The blob digests a bundle file carries (its header line).
fn bundle_blobs(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let mut lines = bytes.split(|b| *b == b'\n');
    assert_eq!(lines.next().unwrap(), b"APPLIANCE-SYNC-BUNDLE 1");
    let header: Value = serde_json::from_slice(lines.next().unwrap()).unwrap();
    let mut v: Vec<String> = header["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

fn put_blob(data: &Path, bytes: &[u8]) -> String {
    use sha2::Digest;
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::create_dir_all(data.join("blobs/sha256")).unwrap();
    std::fs::write(data.join("blobs/sha256").join(&hex), bytes).unwrap();
    hex
}

/// Issue 16: a bundle for a child already in sync held every blob (49 MB
/// for an almost empty inventory). Now it carries only what the child is
/// not known to hold: nothing after an online sync, the one new (mirror)
/// blob after that, everything when it is for nobody in particular.
#[test]
fn a_bundle_for_a_node_carries_only_the_blobs_it_lacks() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Node::start("A", dirs[0].path());
    let old: Vec<String> = (0..3)
        .map(|i| {
            put_blob(
                &a.data,
                format!("mirror blob {i}\n").repeat(1000).as_bytes(),
            )
        })
        .collect();
    a.ok(&["repo", "add", "r1", "--mirror", "http://a/1"]);
    let b = a.adopt("B", dirs[1].path());
    b.sync();
    for h in &old {
        assert!(b.data.join("blobs/sha256").join(h).is_file());
    }
    let export = |n: &Node, file: &str, for_node: Option<&str>| {
        let path = n.data.join(file);
        let mut args = vec!["bundle", "export", "-o", path.to_str().unwrap()];
        if let Some(f) = for_node {
            args.extend(["--for", f]);
        }
        n.ok(&args);
        path
    };
    // In sync: the bundle for B holds no blob; one for anyone holds all.
    assert_eq!(
        bundle_blobs(&export(&a, "b0.bundle", Some(&b.id))),
        Vec::<String>::new()
    );
    let mut all = old.clone();
    all.sort();
    assert_eq!(bundle_blobs(&export(&a, "any.bundle", None)), all);

    // A new mirror blob and a new object on A: the bundle carries that blob
    // alone, and B, offline, takes it.
    let new = put_blob(&a.data, b"a new .deb\n");
    a.ok(&["repo", "add", "r2", "--mirror", "http://a/2"]);
    let file = export(&a, "b1.bundle", Some(&b.id));
    assert_eq!(bundle_blobs(&file), vec![new.clone()]);
    let r = b.json(&["bundle", "import", file.to_str().unwrap()]);
    assert_eq!(r["blobs_added"], 1, "{r}");
    assert_eq!(b.mirror("r2").as_deref(), Some("http://a/2"));
    assert!(b.data.join("blobs/sha256").join(&new).is_file());
    // B knows A holds what A sent: B's bundle for A carries only B's own.
    let mine = put_blob(&b.data, b"made on B\n");
    assert_eq!(bundle_blobs(&export(&b, "a.bundle", Some(&a.id))), {
        let mut v: Vec<String> = b
            .data
            .join("blobs/sha256")
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() == 64 && *n != new && !old.contains(n))
            .collect();
        v.sort();
        assert!(v.contains(&mine));
        v
    });
    // Once B syncs online, A knows B holds everything: empty again.
    b.sync();
    assert_eq!(
        bundle_blobs(&export(&a, "b2.bundle", Some(&b.id))),
        Vec::<String>::new()
    );
}
