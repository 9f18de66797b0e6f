//! Fetch Debian packages into a bundle store, verified, from the archive the
//! host's apt sources name: `cargo run -p bundle --example debian_fetch --
//! <store-dir> [--deps] [--offline] <package>[=<version>]...`. Each `.deb` is
//! extracted to check it, and the fetched set is recorded under the ref
//! `debian/<suite>/fetched`.

use std::path::Path;
use std::process::ExitCode;

use bundle::debian::{self, Archive, Refresh};
use bundle::store::Descriptor;
use bundle::Store;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let deps = take_flag(&mut args, "--deps");
    let offline = take_flag(&mut args, "--offline");
    let (root, names) = args
        .split_first()
        .ok_or("usage: debian_fetch <store-dir> [--deps] [--offline] <package>...")?;
    let store = Store::init(root)?;
    let (uri, suite) = bundle::apt::debian_archive(&bundle::apt::host_sources()?)?;
    let keyring = debian::load_keyring(
        &store,
        Path::new("/usr/share/keyrings/debian-archive-keyring.gpg"),
    )?;
    let archive = Archive::new(uri, suite.clone(), keyring);
    let refresh = if offline {
        Refresh::Never
    } else {
        Refresh::IfMissing
    };
    let index = archive.index(&store, refresh)?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let pkgs = debian::resolve(&index, &names, deps)?;
    let mut fetched = Vec::new();
    for p in &pkgs {
        let d = archive.fetch_deb(p, &store)?;
        let c = bundle::deb::extract_blob(&store, &d, None)?;
        println!("{} {} {d} ({} entries)", p.name, p.version, c.entries.len());
        fetched.push(Descriptor {
            media_type: debian::DEB_MEDIA_TYPE.into(),
            digest: d,
            size: p.size,
        });
    }
    store.put_set(&format!("debian/{suite}/fetched"), &fetched)?;
    Ok(())
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != flag);
    args.len() != before
}
