//! The CLI's global flags (`--json`, `--url`, `--token` before or after the
//! subcommand), where its defaults come from (flags > environment >
//! `~/.config/appliance/config.toml` > built-in), JSON errors under
//! `--json`, `sync status` text, and a broken pipe.

mod common;
use common::{bin, server};

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The binary with a clean environment: HOME in `home`, no APPLIANCE_*.
fn cli(home: &Path) -> Command {
    let mut c = bin();
    c.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("APPLIANCE_URL")
        .env_remove("APPLIANCE_TOKEN")
        .env_remove("APPLIANCE_DATA")
        .stdin(Stdio::null());
    c
}

fn run(c: &mut Command, args: &[&str]) -> Output {
    c.args(args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn write_config(home: &Path, text: &str) {
    let dir = home.join(".config/appliance");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.toml"), text).unwrap();
}

/// A URL nothing listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[test]
fn global_flags_go_before_or_after_the_subcommand() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (_s, url, token) = server(data.path(), &[]);
    ok(run(
        &mut cli(home.path()),
        &[
            "--url",
            &url,
            "--token",
            &token,
            "repo",
            "add",
            "web1",
            "--mirror",
            "http://m/",
        ],
    ));
    for args in [
        vec!["--json", "--url", url.as_str(), "repo", "list"],
        vec!["--url", url.as_str(), "repo", "--json", "list"],
        vec!["repo", "list", "--json", "--url", url.as_str()],
    ] {
        let out = ok(run(&mut cli(home.path()), &args));
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        assert_eq!(v[0]["name"], "web1", "{args:?}");
    }
    // `token` reads the data directory; --json global there too.
    let out = ok(run(
        &mut cli(home.path()),
        &[
            "--json",
            "token",
            "list",
            "--data",
            data.path().to_str().unwrap(),
        ],
    ));
    assert!(serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .is_array());
}

#[test]
fn defaults_come_from_flags_then_env_then_config_file() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (_s, url, token) = server(data.path(), &[]);
    let dead = dead_url();
    // The file alone: url, token (a write needs it) and data.
    write_config(
        home.path(),
        &format!(
            "url = \"{url}\"\ntoken = \"{token}\"\ndata = \"{}\"\n",
            data.path().display()
        ),
    );
    ok(run(
        &mut cli(home.path()),
        &["repo", "add", "r1", "--mirror", "http://m/"],
    ));
    let out = ok(run(&mut cli(home.path()), &["--json", "token", "list"]));
    assert!(
        out.contains("\"admin\"") || out.contains("\"name\""),
        "{out}"
    );
    // The environment beats the file...
    let o = run(
        cli(home.path()).env("APPLIANCE_URL", &dead),
        &["repo", "list"],
    );
    assert!(!o.status.success(), "APPLIANCE_URL ignored");
    let empty = tempfile::tempdir().unwrap();
    let out = ok(run(
        cli(home.path()).env("APPLIANCE_DATA", empty.path()),
        &["--json", "token", "list"],
    ));
    assert_eq!(out.trim(), "[]");
    // ...and the flag beats the environment.
    let out = ok(run(
        cli(home.path()).env("APPLIANCE_URL", &dead),
        &["repo", "list", "--url", &url],
    ));
    assert!(out.contains("r1"), "{out}");
    // A malformed config file is an error, not silently ignored.
    write_config(home.path(), "url = \n");
    let o = run(&mut cli(home.path()), &["repo", "list"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("config.toml"));
}

#[test]
fn errors_are_json_on_stderr_under_json() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (_s, url, _token) = server(data.path(), &[]);
    let o = run(
        &mut cli(home.path()),
        &["--json", "--url", &url, "system", "show", "nope"],
    );
    assert!(!o.status.success());
    assert!(o.stdout.is_empty());
    let e: serde_json::Value = serde_json::from_slice(&o.stderr)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(e["code"], "not_found", "{e}");
    assert!(e["message"].as_str().unwrap().contains("nope"), "{e}");
    // A write without a token: the guard's code.
    let o = run(
        &mut cli(home.path()),
        &["--url", &url, "system", "remove", "x", "--yes", "--json"],
    );
    let e: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert_eq!(e["code"], "unauthorized", "{e}");
    // Not from the server: code `error`.
    let o = run(
        &mut cli(home.path()),
        &["--json", "--url", &dead_url(), "system", "list"],
    );
    let e: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert_eq!(e["code"], "error", "{e}");
    assert!(e["message"].as_str().unwrap().contains("connecting"), "{e}");
    // Without --json, the readable text.
    let o = run(
        &mut cli(home.path()),
        &["--url", &url, "system", "show", "nope"],
    );
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("Error: "));
}

#[test]
fn sync_status_prints_json_only_with_json() {
    let data = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (_s, url, token) = server(data.path(), &[]);
    let text = ok(run(
        &mut cli(home.path()),
        &["--url", &url, "--token", &token, "sync", "status"],
    ));
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
    assert!(text.lines().all(|l| l.contains(": ")), "{text}");
    let json = ok(run(
        &mut cli(home.path()),
        &["--url", &url, "--token", &token, "sync", "status", "--json"],
    ));
    assert!(serde_json::from_str::<serde_json::Value>(&json)
        .unwrap()
        .is_object());
}

#[test]
fn completions_into_a_closed_pipe_do_not_panic() {
    let home = tempfile::tempdir().unwrap();
    let mut child = cli(home.path())
        .args(["completions", "zsh"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end at once: like `| head` that already exited.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}

#[test]
fn man_pages_are_generated_for_every_command() {
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("man1");
    ok(run(&mut cli(home.path()), &["man", dir.to_str().unwrap()]));
    for page in [
        "appliance.1",
        "appliance-serve.1",
        "appliance-system.1",
        "appliance-system-list.1",
        "appliance-token-create.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie \\n(.g .ds Aq") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    // The global flags are documented on the top page.
    let top = std::fs::read_to_string(dir.join("appliance.1")).unwrap();
    assert!(
        top.contains("APPLIANCE_URL") && top.contains("json"),
        "{top}"
    );
}
