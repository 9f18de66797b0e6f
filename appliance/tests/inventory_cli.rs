//! The operator CLI end to end against `appliance serve` on loopback, its
//! help width (80 columns) and shell completions.

mod common;
use common::{bin, server};

use std::process::{Command, Output, Stdio};

fn cli(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = bin();
    c.args(args)
        .env("APPLIANCE_URL", url)
        .env_remove("APPLIANCE_TOKEN")
        .stdin(Stdio::null());
    if let Some(t) = token {
        c.env("APPLIANCE_TOKEN", t);
    }
    c.output().unwrap()
}

fn ok(url: &str, token: &str, args: &[&str]) -> String {
    let o = cli(url, Some(token), args);
    assert!(
        o.status.success(),
        "appliance {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn cli_manages_the_inventory_through_the_api() {
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();

    // Import a fake Debian netboot tree.
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tree.path().join("debian-installer/amd64")).unwrap();
    std::fs::write(tree.path().join("debian-installer/amd64/linux"), b"kernel").unwrap();
    std::fs::write(
        tree.path().join("debian-installer/amd64/initrd.gz"),
        b"initrd",
    )
    .unwrap();
    std::fs::write(
        tree.path().join("version.info"),
        b"Debian version:  12 (bookworm)\n",
    )
    .unwrap();
    let out = ok(
        &url,
        t,
        &[
            "import",
            "--path",
            tree.path().to_str().unwrap(),
            "--name",
            "deb12",
            "--data",
            data.path().to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("imported distro deb12 (debian 12 x86_64)"),
        "{out}"
    );

    ok(
        &url,
        t,
        &[
            "profile",
            "add",
            "web",
            "--parent",
            "deb12",
            "--var",
            "role=web",
            "--kernel-options",
            "console=ttyS0",
        ],
    );
    ok(
        &url,
        t,
        &[
            "system",
            "add",
            "web1",
            "--profile",
            "web",
            "--mac",
            "52:54:00:00:00:01",
            "--ip",
            "10.0.0.11",
            "--hostname",
            "web1.lab",
        ],
    );
    let list = ok(&url, t, &["system", "list"]);
    assert!(
        list.starts_with("web1") && list.contains("52:54:00:00:00:01") && list.contains("netboot"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&url, t, &["system", "list", "--json"])).unwrap();
    assert_eq!(json[0]["interfaces"][0]["ip"], "10.0.0.11");

    // Errors are readable and change nothing.
    let o = cli(
        &url,
        Some(t),
        &[
            "system",
            "add",
            "web2",
            "--profile",
            "web",
            "--mac",
            "52:54:00:00:00:01",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "MAC 52:54:00:00:00:01 is already used by system \"web1\" (conflict, HTTP 409)"
        ),
        "{err}"
    );
    let o = cli(&url, None, &["system", "add", "web2", "--profile", "web"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unauthorized"),
        "no token must be refused"
    );

    ok(
        &url,
        t,
        &["system", "edit", "web1", "--kernel-options", "debug"],
    );
    ok(&url, t, &["system", "copy", "web1", "web2"]);
    ok(&url, t, &["system", "rename", "web2", "web3"]);
    let blended = ok(&url, t, &["report", "--blended", "system", "web1"]);
    assert!(
        blended.contains("role") && blended.contains("(profile:web)"),
        "{blended}"
    );
    assert!(blended.contains("console=ttyS0 debug"), "{blended}");

    // Status: report a start, then a finish through the Cobbler URL.
    let c = ureq::Agent::new_with_defaults();
    c.post(&format!("{url}/api/v1/systems/web1/status/start"))
        .send_empty()
        .unwrap();
    let st = ok(&url, t, &["status"]);
    assert!(st.contains("web1") && st.contains("installing"), "{st}");
    c.get(&format!("{url}/cblr/svc/op/nopxe/system/web1"))
        .call()
        .unwrap();
    let st: serde_json::Value = serde_json::from_str(&ok(&url, t, &["status", "--json"])).unwrap();
    let row = st
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["system"] == "web1")
        .unwrap();
    assert_eq!(
        (row["state"].as_str(), row["netboot"].as_bool()),
        (Some("installed"), Some(false))
    );

    // Removal asks for --yes without a terminal, and refuses while used.
    let o = cli(&url, Some(t), &["profile", "remove", "web"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--yes"));
    let o = cli(&url, Some(t), &["profile", "remove", "web", "--yes"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("in_use"));
    let out = ok(
        &url,
        t,
        &["profile", "remove", "web", "--yes", "--recursive"],
    );
    assert!(
        out.contains("removed system web1") && out.contains("removed system web3"),
        "{out}"
    );

    // Tokens: create, use, revoke.
    let d = data.path().to_str().unwrap();
    let new = ok(&url, t, &["token", "create", "ci", "--data", d])
        .trim()
        .to_owned();
    ok(
        &url,
        &new,
        &["repo", "add", "extras", "--mirror", "http://mirror/x"],
    );
    let list = ok(&url, t, &["token", "list", "--data", d]);
    assert!(list.contains("admin") && list.contains("ci"), "{list}");
    ok(&url, t, &["token", "revoke", "ci", "--data", d]);
    assert!(
        !cli(&url, Some(&new), &["repo", "remove", "extras", "--yes"])
            .status
            .success()
    );

    // Every change is a commit with its author, readable by stock git.
    let log = Command::new("git")
        .arg("-C")
        .arg(data.path().join("inventory"))
        .args(["log", "--format=%an|%s"])
        .output()
        .unwrap();
    let log = String::from_utf8(log.stdout).unwrap();
    assert!(log.starts_with("ci|Add repo extras\n"), "{log}");
    assert!(log.contains("install-status|Edit system web1"), "{log}");
    assert!(log.contains("admin|Add system web1"), "{log}");
}

/// Every command's help, recursively.
fn all_help(args: &mut Vec<String>, out: &mut Vec<(String, String)>) {
    let o = bin().args(args.iter()).arg("--help").output().unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    let mut subs = Vec::new();
    let mut in_cmds = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_cmds = true;
            continue;
        }
        if in_cmds {
            if !line.starts_with("  ") {
                in_cmds = false;
                continue;
            }
            if let Some(w) = line.split_whitespace().next() {
                if w != "help" && line.starts_with("  ") && !line.starts_with("   ") {
                    subs.push(w.to_owned());
                }
            }
        }
    }
    out.push((args.join(" "), text));
    for s in subs {
        args.push(s);
        all_help(args, out);
        args.pop();
    }
}

#[test]
fn help_fits_80_columns() {
    let mut pages = Vec::new();
    all_help(&mut Vec::new(), &mut pages);
    assert!(pages.len() > 40, "only {} help pages", pages.len());
    for (cmd, text) in &pages {
        for line in text.lines() {
            assert!(
                line.chars().count() <= 80,
                "`appliance {cmd} --help` has a line of {} columns:\n{line}",
                line.chars().count()
            );
        }
    }
}

#[test]
fn shell_completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let o = bin().args(["completions", shell]).output().unwrap();
        assert!(o.status.success());
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(
            text.contains("system") && text.contains("rename"),
            "{shell}"
        );
    }
}

#[test]
fn network_cli_needs_a_token_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, url, token) = server(dir.path(), &[]);
    let list = ok(&url, &token, &["network", "list", "--json"]);
    assert_eq!(list.trim(), "[]");
    // No token: refused by the server.
    let o = cli(
        &url,
        None,
        &["network", "serve", "eth9", "--cidr", "10.77.0.1/24"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unauthorized"),
        "{o:?}"
    );
    // A bad CIDR is refused before anything is touched.
    let o = cli(
        &url,
        Some(&token),
        &["network", "serve", "eth9", "--cidr", "10.77.0.0/24"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("network or broadcast"),
        "{o:?}"
    );
    // An interface that does not exist: a clear error, nothing persisted.
    let o = cli(
        &url,
        Some(&token),
        &["network", "serve", "nosuch0", "--cidr", "10.77.0.1/24"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nosuch0"),
        "{o:?}"
    );
    assert_eq!(
        ok(&url, &token, &["network", "list", "--json"]).trim(),
        "[]"
    );
    assert!(!dir.path().join("state/networks.json").exists());
    let agents = ok(&url, &token, &["agents", "--json"]);
    assert_eq!(agents.trim(), "[]");
}

/// The `--help` text of `appliance ARGS --help`.
fn help(args: &[&str]) -> String {
    let o = bin().args(args).arg("--help").output().unwrap();
    assert!(o.status.success(), "{args:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// The long flags a help page lists, each with whether it has help text
/// (on its line after the value name, or on the lines below it).
fn flags(text: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let Some(at) = t.find("--") else { continue };
        if !l.starts_with("  ") || at > 4 {
            continue;
        }
        let name: String = t[at..]
            .chars()
            .take_while(|c| *c == '-' || c.is_ascii_alphanumeric())
            .collect();
        let same_line = t[at + name.len()..]
            .split("  ")
            .skip(1)
            .any(|w| !w.trim().is_empty());
        let below = lines.get(i + 1).is_some_and(|n| {
            !n.trim().is_empty() && indent(n) > indent(l) && !n.trim_start().starts_with('-')
        });
        out.push((name, same_line || below));
    }
    out
}

#[test]
fn each_noun_offers_only_its_own_flags_each_with_help() {
    let expect: &[(&str, &[&str], &[&str])] = &[
        (
            "system",
            &[
                "--profile",
                "--image",
                "--mac",
                "--ip",
                "--netboot",
                "--hostname",
            ],
            &[
                "--kernel", "--initrd", "--mirror", "--suite", "--file", "--distro",
            ],
        ),
        (
            "distro",
            &[
                "--kernel",
                "--initrd",
                "--breed",
                "--os-version",
                "--installer-by",
            ],
            &[
                "--mac",
                "--mirror",
                "--profile",
                "--file",
                "--netboot",
                "--repo",
            ],
        ),
        (
            "profile",
            &["--distro", "--parent", "--autoinstall", "--repo"],
            &["--mac", "--kernel", "--mirror", "--file"],
        ),
        (
            "repo",
            &["--mirror", "--suite", "--packages", "--installer"],
            &["--mac", "--kernel", "--profile", "--var", "--file"],
        ),
        (
            "image",
            &["--type", "--reference", "--arch"],
            &["--mac", "--kernel", "--mirror", "--file"],
        ),
        (
            "template",
            &["--file"],
            &["--mac", "--kernel", "--mirror", "--comment", "--var"],
        ),
        ("snippet", &["--file"], &["--mac", "--kernel", "--var"]),
    ];
    for (noun, has, lacks) in expect {
        for verb in ["add", "edit"] {
            let text = help(&[noun, verb]);
            let listed = flags(&text);
            let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
            for f in *has {
                assert!(names.contains(f), "{noun} {verb} lacks {f}:\n{text}");
            }
            for f in *lacks {
                assert!(!names.contains(f), "{noun} {verb} offers {f}:\n{text}");
            }
            for (f, documented) in &listed {
                assert!(documented, "{noun} {verb} {f} has no help:\n{text}");
            }
        }
    }
    // A flag of another noun is refused by clap, not dropped.
    for args in [
        &["distro", "add", "d1", "--mac", "52:54:00:00:00:09"][..],
        &["system", "add", "s1", "--kernel", "sha256:00"][..],
        &["system", "edit", "s1", "--mirror", "http://m/"][..],
        &["template", "add", "t1", "--var", "a=b"][..],
    ] {
        let o = cli("http://127.0.0.1:9", Some("t"), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("unexpected argument"), "{args:?}: {err}");
    }
}

/// A loopback proxy in front of `upstream` that records each request's
/// head and, before forwarding the first PUT, runs `before_put` (another
/// operator's edit landing between the CLI's GET and its PUT).
fn recording_proxy(
    upstream: String,
    before_put: impl FnOnce() + Send + 'static,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = upstream.trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        let mut before_put = Some(before_put);
        for conn in listener.incoming() {
            let Ok(mut client) = conn else { return };
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") {
                if client.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                buf.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            client.read_exact(&mut body).unwrap();
            if head.starts_with("PUT ") {
                if let Some(f) = before_put.take() {
                    f();
                }
            }
            log.lock().unwrap().push(head.clone());
            // One request per connection: ask upstream to close after it.
            let mut fwd: String = head
                .trim_end()
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                .map(|l| format!("{l}\r\n"))
                .collect();
            fwd.push_str("Connection: close\r\n\r\n");
            let mut server = std::net::TcpStream::connect(&up).unwrap();
            server.write_all(fwd.as_bytes()).unwrap();
            server.write_all(&body).unwrap();
            let mut answer = Vec::new();
            server.read_to_end(&mut answer).unwrap();
            client.write_all(&answer).unwrap();
        }
    });
    (addr, seen)
}

#[test]
fn cli_edit_is_refused_when_another_operator_changed_the_object_after_its_read() {
    let data = tempfile::tempdir().unwrap();
    let (_server, url, token) = server(data.path(), &[]);
    let t = token.as_str();
    ok(
        &url,
        t,
        &["repo", "add", "shared", "--mirror", "http://a/0"],
    );
    // Operator B's edit lands between operator A's GET and PUT.
    let (b_url, b_token) = (url.clone(), token.clone());
    let (proxy, seen) = recording_proxy(url.clone(), move || {
        ok(
            &b_url,
            &b_token,
            &["repo", "edit", "shared", "--comment", "B was here"],
        );
    });
    let o = cli(
        &proxy,
        Some(t),
        &["repo", "edit", "shared", "--mirror", "http://a/overwrite"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "A's stale edit went through");
    assert!(
        err.contains("precondition_failed") && err.contains("HTTP 412"),
        "{err}"
    );
    // A's PUT carried the ETag of its GET.
    let heads = seen.lock().unwrap().clone();
    let put = heads.iter().find(|h| h.starts_with("PUT ")).unwrap();
    assert!(
        put.to_ascii_lowercase().contains("if-match: \"sha256:"),
        "{put}"
    );
    // B's edit stands; A's mirror change was not applied.
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&url, t, &["repo", "show", "shared", "--json"])).unwrap();
    assert_eq!(
        (shown["comment"].as_str(), shown["mirror"].as_str()),
        (Some("B was here"), Some("http://a/0"))
    );
    // Read again, the same edit goes through.
    ok(
        &url,
        t,
        &["repo", "edit", "shared", "--mirror", "http://a/1"],
    );
}
