//! Fuzzes the git pack reader (what a replica pushes and a sync bundle
//! carries), the delta applier, and the block-map and capture-manifest
//! parsers: no input may panic or abort. The pack gets a correct trailing
//! SHA-1 appended, so the fuzzer reaches the entry parser behind it.
//! Run: `cd appliance/fuzz && cargo +nightly fuzz run git_pack`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sha1::{Digest, Sha1};

fuzz_target!(|data: &[u8]| {
    let mut pack = data.to_vec();
    pack.extend_from_slice(&Sha1::digest(data));
    let _ = appliance::inventory::git::read_pack(&pack);
    let _ = appliance::inventory::gitpack::apply_delta(b"a base of some bytes", data);
    let _ = appliance::bmap::Bmap::parse(data);
    let _ = appliance::clone::manifest::Manifest::parse(data);
});
