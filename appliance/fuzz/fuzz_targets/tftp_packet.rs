//! Fuzzes the TFTP packet parser: it must never panic, and whatever it
//! accepts must re-encode into a packet that parses to the same value
//! (unknown options are dropped, so compare after one round trip).
//! Run: `cd appliance/fuzz && cargo +nightly fuzz run tftp_packet`.

#![no_main]

use appliance::tftp::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::parse(data) {
        let once = p.to_vec();
        let q = Packet::parse(&once).expect("re-encoded packet parses");
        assert_eq!(q.to_vec(), once, "encoding is stable");
    }
});
