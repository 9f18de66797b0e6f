//! The web console in a real browser: Debian's headless `chromium` driven
//! over WebDriver (`chromedriver`) against a real `appliance serve` on
//! loopback with a fresh data directory. An operator logs in, reads the
//! overview, enlists an agent that checked in (this test process posing as
//! the agent), edits a profile (and sees the API's validation message),
//! previews a template for a system, watches an event arrive live; then a
//! read-only token sees no write control and its forced write is refused.
//! Screenshots of every page land in `target/console-screenshots/`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (xtask/debian-packages.txt): it fails, never skips, without them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use appliance::bmc::redfish::Redfish;
use appliance::bmc::{PowerDriver, PowerError};
use integration_tests::http::request_with_token;
use integration_tests::webdriver::{Driver, Session};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn call(port: u16, method: &str, path: &str, body: Option<Value>, token: &str) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let token = Some(token).filter(|t| !t.is_empty());
    let r = request_with_token(port, method, path, body.as_deref(), token).unwrap();
    let v = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body.clone()));
    (r.status, v)
}

fn ok(port: u16, method: &str, path: &str, body: Value, token: &str) -> Value {
    let (st, v) = call(port, method, path, Some(body), token);
    assert!((200..300).contains(&st), "{method} {path}: {st} {v}");
    v
}

/// What an agent sends when it checks in (the test is the agent).
fn check_in(port: u16, mac: &str, cpu: &str) {
    let body = json!({
        "mac": mac,
        "hardware": {
            "firmware": "uefi", "cpus": 4, "cpu_model": cpu, "memory_bytes": 8u64 << 30,
            "nics": [{"name": "ens3", "mac": mac, "driver": "virtio_net", "speed_mbps": 1000}],
            "disks": [{"name": "vda", "size_bytes": 64u64 << 30, "model": "QEMU HARDDISK",
                        "serial": "D1", "removable": false, "rotational": false}],
            "vendor": "QEMU", "product": "Standard PC (Q35 + ICH9, 2009)", "serial": "S-1"
        },
        "release": null,
        "mode": "agent"
    });
    let r = request_with_token(
        port,
        "POST",
        "/api/v1/agents",
        Some(&body.to_string()),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "agent check-in: {}", r.body);
}

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

/// Follows a nav link (as a person would) and waits for the page to draw.
fn open(s: &Session, hash: &str, page: &str) {
    s.eval("location.hash = arguments[0];", vec![json!(hash)])
        .unwrap();
    s.wait(&format!("main[data-page='{page}'][data-ready]"), T)
        .unwrap();
}

/// axe-core's browser build (`xtask/npm-packages.txt`, installed into
/// `target/peers/node` by `.ci/run` and `cargo xtask test`); `$AXE_CORE`
/// names another copy. Missing, the test fails: it never skips the scan.
fn axe_source() -> &'static str {
    static SRC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SRC.get_or_init(|| {
        let path = std::env::var_os("AXE_CORE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/peers/node/node_modules/axe-core/axe.min.js")
            });
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: install the npm peers (.ci/run, or `cargo xtask test`, \
                 or npm install --prefix target/peers/node axe-core@VERSION from \
                 xtask/npm-packages.txt)",
                path.display()
            )
        })
    })
}

/// axe-core's scan of the page as it is now (injected once per document,
/// through WebDriver, so the page's own CSP stays strict): no serious or
/// critical violation.
fn accessible(s: &Session, name: &str) {
    let loaded = s.eval("return typeof window.axe;", vec![]).unwrap();
    if loaded != json!("object") {
        let t = s
            .eval(
                &format!("{}\nreturn typeof window.axe;", axe_source()),
                vec![],
            )
            .unwrap();
        assert_eq!(t, json!("object"), "axe-core did not load");
    }
    let found = s
        .eval_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document)
               .then(r => done({passed: r.passes.length, serious: r.violations
                 .filter(v => v.impact === 'serious' || v.impact === 'critical')
                 .map(v => `${v.impact} ${v.id}: ${v.help}: ` + v.nodes.slice(0, 4)
                   .map(n => `${n.target.join(' ')} (${n.failureSummary.replace(/\\s+/g, ' ')})`).join('; '))}))
               .catch(e => done({passed: 0, serious: [`axe failed: ${e}`]}));",
            vec![],
        )
        .unwrap();
    assert_eq!(
        found["serious"],
        json!([]),
        "accessibility violations on {name}"
    );
    // The scan ran: it checked the page against rules that passed.
    assert!(
        found["passed"].as_u64().unwrap_or(0) > 5,
        "axe-core checked almost nothing on {name}: {found}"
    );
}

/// A screenshot of the whole page: the window grows to the page's height
/// (at most 4,000 px) for the picture, then gets its size back. Every page
/// pictured is first scanned by axe-core.
fn shot(s: &Session, name: &str) {
    accessible(s, name);
    let size = s
        .eval(
            "return [window.outerWidth, window.outerHeight, window.innerHeight, document.documentElement.scrollHeight];",
            vec![],
        )
        .unwrap();
    let dim = |i: usize| size[i].as_u64().unwrap() as u32;
    let (w, h, inner, full) = (dim(0), dim(1), dim(2), dim(3).min(4000));
    if full > inner {
        s.set_size(w, h + full - inner).unwrap();
    }
    let p = s
        .screenshot(&screenshots().join(format!("{name}.png")))
        .unwrap();
    if full > inner {
        s.set_size(w, h).unwrap();
    }
    eprintln!("screenshot: {}", p.display());
}

/// Every form control on the page has a label a screen reader announces.
fn every_control_is_labelled(s: &Session, page: &str) {
    let unlabelled = s
        .eval(
            "return [...document.querySelectorAll('input, select, textarea')]
               .filter(e => e.type !== 'hidden')
               .filter(e => !e.getAttribute('aria-label') && !(e.id && document.querySelector(`label[for='${e.id}']`)))
               .map(e => e.outerHTML);",
            vec![],
        )
        .unwrap();
    assert_eq!(unlabelled, json!([]), "unlabelled controls on {page}");
}

/// Waits until attribute `attr` of `css` is `want`.
fn wait_attr(s: &Session, css: &str, attr: &str, want: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let now = s.find(css).and_then(|e| s.attribute(&e, attr)).ok();
        if now.as_ref().and_then(|v| v.as_str()) == Some(want) {
            return;
        }
        assert!(t0.elapsed() < T, "{css} [{attr}] is {now:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn write_controls(s: &Session) -> Vec<String> {
    let v = s
        .eval(
            "return [...document.querySelectorAll('[data-write], button.enlist, #save, #inv-new, #power-on')].map(e => e.outerHTML);",
            vec![],
        )
        .unwrap();
    serde_json::from_value(v).unwrap()
}

fn login(s: &Session, base: &str, token: &str) {
    s.goto(&format!("{base}/")).unwrap();
    let input = s.wait("#token", T).unwrap();
    s.type_text(&input, token).unwrap();
    s.click(&s.find("#login button[type=submit]").unwrap())
        .unwrap();
    s.wait("main[data-page='overview'][data-ready]", T).unwrap();
    // The token never appears in the address.
    let url = s.eval("return location.href;", vec![]).unwrap();
    assert!(!url.as_str().unwrap().contains(token), "{url}");
}

#[test]
fn console_in_chromium_logs_in_enlists_edits_previews_follows_events_and_refuses_read_only_writes()
{
    // Only this test's pictures (the release test keeps its own folder).
    if let Ok(dir) = std::fs::read_dir(screenshots()) {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "png") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let data = tempfile::tempdir().unwrap();
    let (_server, base, admin) = common::server(data.path(), &[]);
    let port = port_of(&base);
    let out = common::bin()
        .args(["token", "create", "viewer", "--scope", "read", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let viewer = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("apl_"))
        .expect("a read token")
        .to_owned();

    // Inventory the operator already has, and an agent that checked in.
    ok(
        port,
        "POST",
        "/api/v1/distros",
        json!({"name": "deb12", "kernel": "http://127.0.0.1:9/linux",
        "initrd": "http://127.0.0.1:9/initrd.gz", "breed": "debian", "arch": "x86_64"}),
        &admin,
    );
    ok(
        port,
        "POST",
        "/api/v1/profiles",
        json!({"name": "web", "distro": "deb12"}),
        &admin,
    );
    ok(
        port,
        "POST",
        "/api/v1/systems",
        json!({"name": "alpha", "profile": "web",
        "interfaces": [{"name": "eth0", "mac": "52:54:00:aa:00:01", "ip": "10.9.0.11"}]}),
        &admin,
    );
    ok(
        port,
        "POST",
        "/api/v1/templates",
        json!({"name": "motd.txt",
        "body": "Welcome to {{ hostname }}\n"}),
        &admin,
    );
    let discovered = "52:54:00:12:34:56";
    check_in(port, discovered, "Test CPU 9000");

    let driver = Driver::start().unwrap();
    let profile = tempfile::tempdir().unwrap();
    let s = driver.session(profile.path(), 1280, 900).unwrap();

    // The page is public and carries no secret; the console asks for a token.
    s.goto(&format!("{base}/")).unwrap();
    s.wait("#token", T).unwrap();
    shot(&s, "01-login");
    every_control_is_labelled(&s, "login");

    // A wrong token is refused with the server's message.
    s.type_text(&s.find("#token").unwrap(), "apl_00000000_wrong")
        .unwrap();
    s.click(&s.find("#login button[type=submit]").unwrap())
        .unwrap();
    s.wait_text("#login .error", "not valid", T).unwrap();
    s.clear(&s.find("#token").unwrap()).unwrap();

    // Operator logs in: overview with this node's id.
    login(&s, &base, &admin);
    let (_, v) = call(port, "GET", "/api/v1/version", None, &admin);
    s.wait_text("#node-id", v["node_id"].as_str().unwrap(), T)
        .unwrap();
    s.wait_text("#scope", "admin", T).unwrap();
    shot(&s, "02-overview");

    // Machines: one system and the discovered agent; enlist it.
    open(&s, "#/machines", "machines");
    s.wait_text("#count", "2 of 2 shown (1 systems, 1 discovered)", T)
        .unwrap();
    every_control_is_labelled(&s, "machines");
    let enlist = s
        .wait(
            &format!("tr.discovered[data-mac='{discovered}'] button.enlist"),
            T,
        )
        .unwrap();
    s.click(&enlist).unwrap();
    let name = s.wait("#enlist-name", T).unwrap();
    s.clear(&name).unwrap();
    s.type_text(&name, "rack1-n1").unwrap();
    shot(&s, "03-machines-enlist");
    s.click(&s.find("#enlist-submit").unwrap()).unwrap();
    s.wait_text("#flash", "Enlisted 52:54:00:12:34:56 as rack1-n1", T)
        .unwrap();
    s.wait_text("#count", "2 of 2 shown (2 systems, 0 discovered)", T)
        .unwrap();
    let (st, sys) = call(port, "GET", "/api/v1/systems/rack1-n1", None, &admin);
    assert_eq!(st, 200, "{sys}");
    assert_eq!(sys["profile"], "web");
    assert_eq!(sys["interfaces"][0]["mac"], discovered);
    assert_eq!(sys["interfaces"][0]["name"], "ens3");
    // Search narrows the table.
    let search = s.find("#search").unwrap();
    s.type_text(&search, "rack1").unwrap();
    s.wait_text("#count", "1 of 2 shown", T).unwrap();
    shot(&s, "04-machines");

    // Its BMC: a Redfish emulator (sushy-tools), up before the page asks.
    let bmc_dir = tempfile::tempdir().unwrap();
    let (_bmc, bmc_url) = common::sushy(bmc_dir.path());
    let redfish = Redfish::new(&bmc_url, "admin", "pa55word", "tls=insecure", T).unwrap();
    let t0 = std::time::Instant::now();
    while matches!(redfish.status(), Err(PowerError::Unreachable { .. })) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the Redfish emulator did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(
        port,
        "PATCH",
        "/api/v1/systems/rack1-n1",
        json!({"power": {"type": "redfish",
        "address": bmc_url, "user": "admin", "password": "pa55word", "id": "tls=insecure"}}),
        &admin,
    );

    // The system's page: hardware from the agent, boot script, autoinstall.
    s.click(&s.find("#machine-rows a").unwrap()).unwrap();
    s.wait("main[data-page='systems'][data-ready]", T).unwrap();
    s.wait_text("#hardware", "Test CPU 9000", T).unwrap();
    s.wait_text("#boot-script", "#!ipxe", T).unwrap();
    s.wait_text("#power-state", "(via redfish)", T).unwrap();
    shot(&s, "05-system");

    // Power cycle once into the network boot: asked first, cancel keeps it.
    s.click(&s.find("#power-boot option[value='network']").unwrap())
        .unwrap();
    s.click(&s.find("#power-cycle").unwrap()).unwrap();
    s.wait_text(
        "dialog.confirm",
        "Power cycle rack1-n1, booting once from the network?",
        T,
    )
    .unwrap();
    shot(&s, "05b-power-confirm");
    s.click(&s.find("#confirm-no").unwrap()).unwrap();
    let target = || redfish.system_resource().unwrap()["Boot"]["BootSourceOverrideTarget"].clone();
    assert_ne!(target(), json!("Pxe"), "cancelled: the BMC was not asked");
    s.click(&s.find("#power-cycle").unwrap()).unwrap();
    s.click(&s.wait("#confirm-yes", T).unwrap()).unwrap();
    s.wait_text("#flash", "Power cycle sent to rack1-n1", T)
        .unwrap();
    assert_eq!(
        target(),
        json!("Pxe"),
        "the BMC was told to boot once from the network"
    );

    // Edit a profile; a bad reference gets the API's validation message.
    open(&s, "#/inventory/profiles/web", "inventory");
    every_control_is_labelled(&s, "profile form");
    let ko = s.wait("#f-kernel_options", T).unwrap();
    s.clear(&ko).unwrap();
    s.type_text(&ko, "console=ttyS0 quiet").unwrap();
    s.click(&s.find("#save").unwrap()).unwrap();
    s.wait_text("#flash", "Saved profile web", T).unwrap();
    let (_, p) = call(port, "GET", "/api/v1/profiles/web", None, &admin);
    assert_eq!(p["kernel_options"], "console=ttyS0 quiet");
    let distro = s.find("#f-distro").unwrap();
    s.clear(&distro).unwrap();
    s.type_text(&distro, "no-such-distro").unwrap();
    s.click(&s.find("#save").unwrap()).unwrap();
    let msg = s
        .wait_text("#form-error [role=alert]", "no-such-distro", T)
        .unwrap();
    eprintln!("validation message shown: {msg}");
    let marked = s.find("#f-distro").unwrap();
    assert_eq!(
        s.attribute(&marked, "aria-invalid").unwrap(),
        json!("true"),
        "the field the API named is marked"
    );
    shot(&s, "06-inventory-profile");
    let (_, p) = call(port, "GET", "/api/v1/profiles/web", None, &admin);
    assert_eq!(p["distro"], "deb12", "the refused edit changed nothing");

    open(&s, "#/inventory/profiles", "inventory");
    s.wait("#inv-table tr[data-name='web']", T).unwrap();
    shot(&s, "07-inventory-list");

    // Template preview for a chosen system, live as the text changes.
    open(&s, "#/inventory/templates/motd.txt", "inventory");
    let sys_in = s.wait("#preview-system", T).unwrap();
    s.type_text(&sys_in, "rack1-n1").unwrap();
    s.click(&s.find("#preview-run").unwrap()).unwrap();
    s.wait_text("#preview", "Welcome to rack1-n1", T).unwrap();
    let body = s.find("#f-body").unwrap();
    s.type_text(&body, "edited {{ system_name }} unsaved")
        .unwrap();
    s.wait_text("#preview", "edited rack1-n1 unsaved", T)
        .unwrap();
    shot(&s, "08-template-preview");
    let (_, t) = call(port, "GET", "/api/v1/templates/motd.txt", None, &admin);
    assert_eq!(
        t["body"], "Welcome to {{ hostname }}\n",
        "a preview saves nothing"
    );

    // Events: an agent checks in while the page follows live.
    open(&s, "#/events", "events");
    s.wait_text("#live-state", "live", T).unwrap();
    let late = "52:54:00:99:99:99";
    check_in(port, late, "Late CPU");
    s.wait_text("#event-rows tr:first-child", late, T).unwrap();
    every_control_is_labelled(&s, "events");
    shot(&s, "09-events");
    // Filtered by system: its MAC's events only (its power cycle, its check-in).
    s.type_text(&s.find("#ev-system").unwrap(), "rack1-n1")
        .unwrap();
    s.click(&s.find("#ev-filters button[type=submit]").unwrap())
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let rows = s.find("#event-rows").and_then(|e| s.text(&e)).unwrap();
        if rows.contains("power.cycle") && rows.contains(discovered) && !rows.contains(late) {
            break;
        }
        assert!(t0.elapsed() < T, "events of rack1-n1 only: {rows}");
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        s.property(&s.find("#ev-mac").unwrap(), "value").unwrap(),
        json!(discovered)
    );
    shot(&s, "09b-events-by-system");

    open(&s, "#/tree", "tree");
    s.wait_text("#tree", "No children registered", T).unwrap();
    shot(&s, "10-tree");
    // Release, on a node with no release manifest: said plainly, no rebuild.
    open(&s, "#/release", "release");
    s.wait_text("#release-digest", "no release manifest", T)
        .unwrap();
    assert!(s.find("#rebuild").is_err(), "no rebuild without a release");
    every_control_is_labelled(&s, "release");
    shot(&s, "10c-release-none");
    // Live work: a capture of alpha; this process is its agent, checks in,
    // takes the job and reports progress; the bar moves by itself.
    let (st, made) = call(
        port,
        "POST",
        "/api/v1/clone/jobs",
        Some(json!({"action": "capture", "systems": ["alpha"], "image": "alpha-disk"})),
        &admin,
    );
    assert!((200..300).contains(&st), "{made}");
    let job_id = made[0]["id"]
        .as_str()
        .unwrap_or_else(|| made["id"].as_str().unwrap())
        .to_owned();
    open(&s, "#/work", "work");
    s.wait_text("#work", "No installs", T).unwrap();
    s.wait_text("#work-live", "following progress live", T)
        .unwrap();
    let bar = format!("li[data-id='{job_id}'] progress");
    s.wait(&bar, T).unwrap();
    check_in(port, "52:54:00:aa:00:01", "Alpha CPU");
    let (st, work) = call(
        port,
        "GET",
        "/api/v1/agents/52:54:00:aa:00:01/work",
        None,
        "",
    );
    assert_eq!(
        (st, work["action"].as_str()),
        (200, Some("capture")),
        "{work}"
    );
    let job_token = work["token"].as_str().unwrap().to_owned();
    for (done, pct) in [(256u64 << 20, "25"), (768u64 << 20, "75")] {
        ok(
            port,
            "POST",
            &format!("/api/v1/clone/jobs/{job_id}/progress"),
            json!({"phase": "capture",
            "state": "running", "done_bytes": done, "total_bytes": 1u64 << 30}),
            &job_token,
        );
        wait_attr(&s, &bar, "value", pct);
    }
    s.wait_text(
        &format!("li[data-id='{job_id}']"),
        "768.0 MiB of 1.0 GiB",
        T,
    )
    .unwrap();
    shot(&s, "11-work");
    // Cancel with a reason, after confirmation.
    s.click(
        &s.find(&format!("li[data-id='{job_id}'] button.cancel-job"))
            .unwrap(),
    )
    .unwrap();
    let reason = s.wait("#confirm-reason", T).unwrap();
    s.type_text(&reason, "wrong disk").unwrap();
    shot(&s, "11b-work-cancel");
    s.click(&s.find("#confirm-yes").unwrap()).unwrap();
    s.wait_text("#flash", "wrong disk", T).unwrap();
    let (_, job) = call(
        port,
        "GET",
        &format!("/api/v1/clone/jobs/{job_id}"),
        None,
        &admin,
    );
    assert_eq!(
        (job["state"].as_str(), job["message"].as_str()),
        (Some("failed"), Some("cancelled: wrong disk")),
        "{job}"
    );

    // A phone (390 px wide, emulated): no page scrolls sideways.
    {
        let phone_profile = tempfile::tempdir().unwrap();
        let p = driver
            .phone_session(phone_profile.path(), 390, 844)
            .unwrap();
        p.goto(&format!("{base}/")).unwrap();
        p.wait("#token", T).unwrap();
        login(&p, &base, &admin);
        for (hash, page, name) in [
            ("#/", "overview", "12-phone-overview"),
            ("#/machines", "machines", "13-phone-machines"),
            ("#/systems/rack1-n1", "systems", "14-phone-system"),
            ("#/events", "events", "15-phone-events"),
            ("#/inventory/profiles/web", "inventory", "16-phone-profile"),
        ] {
            open(&p, hash, page);
            // Elements reaching past the 390 px screen (inside a box that
            // scrolls by itself is fine: code listings).
            let wide = p
                .eval(
                    "return [...document.querySelectorAll('body *')]
                       .filter(e => e.getBoundingClientRect().right > 390.5 && !e.closest('pre, .scroll'))
                       .map(e => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`);",
                    vec![],
                )
                .unwrap();
            assert_eq!(wide, json!([]), "{hash} is wider than a 390 px phone");
            let w = p
                .eval("return document.documentElement.scrollWidth;", vec![])
                .unwrap();
            assert!(
                w.as_u64().unwrap() <= 390,
                "{hash}: the page is {w} px wide"
            );
            shot(&p, name);
        }
    }

    // Read-only: the scope is shown, no write control anywhere.
    s.click(&s.find("#logout").unwrap()).unwrap();
    s.wait("#token", T).unwrap();
    let stored = s.eval("return sessionStorage.length;", vec![]).unwrap();
    assert_eq!(stored, json!(0), "logging out forgets the token");
    login(&s, &base, &viewer);
    s.wait_text("#scope", "read-only", T).unwrap();
    open(&s, "#/machines", "machines");
    s.wait(&format!("tr.discovered[data-mac='{late}']"), T)
        .unwrap();
    assert_eq!(
        write_controls(&s),
        Vec::<String>::new(),
        "write controls on machines"
    );
    shot(&s, "17-read-only-machines");
    open(&s, "#/inventory/profiles/web", "inventory");
    s.wait("#f-kernel_options", T).unwrap();
    assert_eq!(
        write_controls(&s),
        Vec::<String>::new(),
        "write controls on a profile"
    );
    let ro = s.find("#f-kernel_options").unwrap();
    assert_eq!(s.property(&ro, "readOnly").unwrap(), json!(true));
    open(&s, "#/systems/rack1-n1", "systems");
    assert_eq!(
        write_controls(&s),
        Vec::<String>::new(),
        "write controls on a system"
    );
    open(&s, "#/release", "release");
    s.wait_text("#r-flash", "Flash", T).unwrap();
    assert_eq!(
        write_controls(&s),
        Vec::<String>::new(),
        "write controls on the release page"
    );
    s.wait_text("main", "Flashing needs an admin token", T)
        .unwrap();
    // A write forced through the console's own client is refused by the server.
    let refused = s
        .eval_async(
            "const done = arguments[arguments.length - 1];
             const base = document.querySelector('script[type=module]').src.replace(/app\\.js$/, '');
             import(base + 'api.js').then(m => m.api('PATCH', '/api/v1/profiles/web', {kernel_options: 'ro-was-here'}))
               .then(() => done({ok: true}), e => done({status: e.status, code: e.code, message: e.message}));",
            vec![],
        )
        .unwrap();
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["code"], "forbidden");
    let (_, p) = call(port, "GET", "/api/v1/profiles/web", None, &admin);
    assert_eq!(p["kernel_options"], "console=ttyS0 quiet");
    shot(&s, "18-read-only-system");
}

/// `sha256:<hex>` of a file, by stock `sha256sum`.
fn sha256sum(path: &std::path::Path) -> String {
    let o = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8(o.stdout).unwrap();
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

/// The release page against the data partition of the image `cargo xtask
/// image` built (`cargo xtask test` builds it first): the running release
/// and its manifest, a rebuild from the bundle with its progress bar and
/// the identical verdict, the prepared image's download link (checked with
/// stock curl against the built image), a sync bundle download, a flash the
/// server refuses with the CLI's reason, and a flash onto a file whose
/// bytes stock sha256sum finds equal to the release's disk digest.
#[test]
fn console_release_page_rebuilds_identical_offers_downloads_and_flashes_with_the_cli_refusals() {
    let dir = integration_tests::workspace_root().join("target/appliance");
    for f in ["appliance.img", "manifest.json", "manifest.json.sig"] {
        assert!(
            dir.join(f).exists(),
            "{} has no {f}: run `cargo xtask image` (cargo xtask test does)",
            dir.display()
        );
    }
    let manifest_bytes = std::fs::read(dir.join("manifest.json")).unwrap();
    let release = builder::Digest::of(&manifest_bytes).to_string();
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let disk_digest = {
        let sum = std::fs::read_to_string(dir.join("appliance.img.sha256")).unwrap();
        format!("sha256:{}", sum.split_whitespace().next().unwrap())
    };
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    integration_tests::extract_data_partition(&dir, work.path(), &data);
    let (_server, base, admin) = common::server(&data, &[]);
    let port = port_of(&base);
    let shots = screenshots().join("release");
    let shot_r = |s: &Session, name: &str| shot(s, &format!("release/{name}"));
    let _ = std::fs::remove_dir_all(&shots);

    let driver = Driver::start().unwrap();
    let profile = tempfile::tempdir().unwrap();
    let s = driver.session(profile.path(), 1280, 900).unwrap();
    login(&s, &base, &admin);
    open(&s, "#/release", "release");
    s.wait_text("#release-digest", &release, T).unwrap();
    s.wait_text("#manifest-files", "appliance.efi", T).unwrap();
    s.wait_text("#rebuild-verdict", "No verified rebuild", T)
        .unwrap();
    s.wait_text("#prepare-state", "not prepared", T).unwrap();
    every_control_is_labelled(&s, "release");
    shot_r(&s, "01-release");

    // Rebuild, after confirmation: the bar shows, then the verdict.
    s.click(&s.find("#rebuild").unwrap()).unwrap();
    s.wait_text("dialog.confirm", "Rebuild this appliance", T)
        .unwrap();
    s.click(&s.find("#confirm-yes").unwrap()).unwrap();
    s.wait("#rebuild-progress", T).unwrap();
    s.wait_text("#rebuild-elapsed", "rebuilding", T).unwrap();
    shot_r(&s, "02-rebuilding");
    let verdict = s
        .wait_text("#rebuild-verdict", "Identical", Duration::from_secs(900))
        .unwrap();
    eprintln!("verdict: {verdict}");
    let (_, r) = call(port, "GET", "/api/v1/release", None, &admin);
    assert_eq!(r["cached"]["identical"], json!(true), "{r}");
    assert_eq!(r["cached"]["disk"], json!(disk_digest), "{r}");
    shot_r(&s, "03-identical");

    // The image download: prepared (from the verified rebuild), then a
    // plain public link with Range; its first MiB is the built image's.
    s.click(&s.find("#prepare").unwrap()).unwrap();
    let link = s.wait("#dl-image", Duration::from_secs(120)).unwrap();
    let href = s.property(&link, "href").unwrap();
    let href = href.as_str().unwrap().to_owned();
    assert_eq!(href, format!("{base}/api/v1/release/image"));
    let got = work.path().join("first-mib");
    let st = std::process::Command::new("curl")
        .args(["-sSf", "-r", "0-1048575", "-o"])
        .arg(&got)
        .arg(&href)
        .status()
        .unwrap();
    assert!(st.success(), "curl {href}");
    let want = {
        use std::io::Read;
        let mut b = vec![0u8; 1 << 20];
        std::fs::File::open(dir.join("appliance.img"))
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    };
    assert!(
        std::fs::read(&got).unwrap() == want,
        "the image link serves the built image"
    );

    // A sync bundle, fetched with the token (no link can carry it).
    s.click(&s.find("#dl-bundle").unwrap()).unwrap();
    s.wait_text("#flash", "Downloaded changes.bundle", T)
        .unwrap();
    shot_r(&s, "04-downloads");

    // Flash: the server refuses what the CLI refuses (here: the image
    // itself; and any mounted local disk the table marks).
    let image = format!(
        "{}/{}",
        r["cached"]["out"].as_str().unwrap(),
        manifest["disk"]["file"].as_str().unwrap()
    );
    let flash_to = |target: &str| {
        let input = s.find("#flash-device").unwrap();
        s.clear(&input).unwrap();
        s.type_text(&input, target).unwrap();
        s.click(&s.find("#flash-go").unwrap()).unwrap();
        s.wait_text("dialog.confirm", &format!("Erase {target}"), T)
            .unwrap();
        s.click(&s.find("#confirm-yes").unwrap()).unwrap();
    };
    flash_to(&image);
    s.wait_text("#flash-out [role=alert]", "is the image itself", T)
        .unwrap();
    let refused = s
        .eval(
            "return [...document.querySelectorAll('#disks tr[data-refused]')].map(r => r.dataset.path);",
            vec![],
        )
        .unwrap();
    if let Some(disk) = refused.as_array().and_then(|a| a.first()) {
        let disk = disk.as_str().unwrap();
        eprintln!("refused disk on this machine: {disk}");
        flash_to(disk);
        s.wait_text("#flash-out [role=alert]", "mounted", T)
            .unwrap();
    }
    shot_r(&s, "05-flash-refused");
    let target = work.path().join("stick.img");
    flash_to(target.to_str().unwrap());
    s.wait_text("#flash-state", "done", Duration::from_secs(300))
        .unwrap();
    s.wait_text("#flash-out", "Written and verified", T)
        .unwrap();
    shot_r(&s, "06-flashed");
    assert_eq!(
        sha256sum(&target),
        disk_digest,
        "the flashed file is the release's disk"
    );
}
