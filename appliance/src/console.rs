//! Console markers: fixed-format lines that boot tests and benchmarks parse
//! from the serial log.
//!
//! Format: `[SSSSS.UUUUUU] appliance: <event>` where the bracket holds
//! `CLOCK_MONOTONIC` seconds, the same clock (and shape) as kernel `printk`
//! timestamps, so markers and kernel lines can be compared directly. Parse
//! with the regex `^\[\s*(\d+\.\d+)\] appliance: (.*)$`.
//!
//! Events printed by init: `init started`, `modules loaded <n>/<planned>`,
//! `network up <iface> <addr>/<prefix>`,
//! `network degraded <reason>`, `data mounted <dev>`, `data on tmpfs`,
//! `random seed credited (<n> bytes)`, `random seed not credited: <why>`,
//! `waiting for the kernel's random pool …` and `random pool ready after
//! <n>s` (first boot without a hardware RNG),
//! `serving on <addr>` (printed by the `serve` child once bound),
//! `waiting for the kernel's random pool to create the API token …`,
//! `server exited <status>`, `powering off`, `rebooting`.

use std::io::Write;

use rustix::time::{clock_gettime, ClockId};

/// Seconds on the monotonic clock.
pub fn monotonic_secs() -> f64 {
    let ts = clock_gettime(ClockId::Monotonic);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Formats one marker line (without newline).
pub fn format_marker(secs: f64, event: &str) -> String {
    format!("[{secs:12.6}] appliance: {event}")
}

/// Prints a marker to stdout (the console under init) and flushes it.
pub fn marker(event: &str) {
    let line = format_marker(monotonic_secs(), event);
    let mut out = std::io::stdout().lock();
    // A broken console must not take anything down.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_has_kernel_like_timestamp_and_fixed_prefix() {
        assert_eq!(
            format_marker(1.5, "init started"),
            "[    1.500000] appliance: init started"
        );
    }
}
