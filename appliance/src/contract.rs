//! Paths, signals and environment variables other components rely on.
//!
//! These are the appliance's external contracts: the image builder writes
//! some of these files, the boot tests parse the console markers, and `serve`
//! and `init` talk to each other through them. Change them only together with
//! their users.

use rustix::process::Signal;

/// Module load list written by the image builder: one absolute path to an
/// uncompressed `.ko` per line, in dependency order. `#` starts a comment.
pub const MODULES_LIST: &str = "/etc/appliance/modules.list";

/// Module load plan written by the image builder (format in
/// [`crate::modules`]): each module with whether the image names it, its
/// dependencies and its aliases, so init loads only what the devices need.
pub const MODULES_PLAN: &str = "/etc/appliance/modules.plan";

/// Where init looks for device modaliases (`<bus>/devices/*/modalias`).
pub const SYS_BUS: &str = "/sys/bus";

/// Degraded reasons known to init, one per line; `serve` re-reads it on every
/// `/api/v1/version` request, so init may append reasons later.
pub const DEGRADED_FILE: &str = "/run/appliance/degraded";

/// What init booted from ([`crate::medium::Medium`], JSON); beside the
/// degraded file, and re-read by `serve` on each `/api/v1/version`.
pub const MEDIUM_FILE: &str = "/run/appliance/medium";

/// Where init mounts a read-only medium's data partition (read-only) on a
/// live boot; `/data/release` and `/data/bundle` link into it.
pub const LIVE_MOUNT: &str = "/run/appliance/live";

/// Directory for init's runtime state (tmpfs).
pub const RUN_DIR: &str = "/run/appliance";

/// Where the data partition is mounted (a tmpfs when it is missing).
pub const DATA_DIR: &str = "/data";

/// A blob upload's partial file (`<data>/blobs/sha256/.upload-<hex>`)
/// untouched for this long is abandoned: the blob store's gc removes it
/// (a client resuming later starts that blob again from offset 0).
pub const UPLOAD_PARTIAL_MAX_AGE: std::time::Duration =
    std::time::Duration::from_secs(24 * 60 * 60);

/// How often `serve` runs that gc (and once at start).
pub const UPLOAD_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// GPT partition name (PARTNAME) of the data partition.
pub const DATA_PARTNAME: &str = "appliance-data";

/// GPT partition names accepted for the EFI system partition, first wins.
pub const ESP_PARTNAMES: &[&str] = &[
    "esp",
    "appliance-esp",
    "ESP",
    "EFI System Partition",
    "EFI system partition",
];

/// Where the ESP is mounted read-only while init reads its config.
pub const ESP_MOUNT: &str = "/run/appliance/esp";

/// First-boot config file on the ESP (relative to the ESP root).
pub const ESP_CONFIG: &str = "appliance/config.json";

/// First-boot config from QEMU `-fw_cfg name=opt/appliance/config,...`.
pub const FW_CFG_CONFIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/appliance/config/raw";

/// Release manifest inside the data directory (hashed for `release`).
pub const RELEASE_MANIFEST: &str = "release/manifest.json";

/// Boot settings kept as node state (JSON object, the keys of
/// [`crate::config`]); the installer writes the uplink a replica was
/// installed through.
pub const BOOT_STATE: &str = "state/boot.json";

/// Signature of the release manifest inside the data directory.
pub const RELEASE_SIGNATURE: &str = "release/manifest.sig";

/// Node identity inside the data directory.
pub const NODE_FILE: &str = "state/node.json";

/// The random seed kept for the next boot, relative to the data directory
/// (see [`crate::entropy`]).
pub const RANDOM_SEED: &str = "state/random-seed";

/// Set to `1` by init in the environment of the supervised `serve` child.
pub const ENV_UNDER_INIT: &str = "APPLIANCE_UNDER_INIT";

/// Signal to PID 1 asking for a clean power-off.
pub const SIGNAL_POWEROFF: Signal = Signal::USR1;

/// Signal to PID 1 asking for a clean reboot (SIGTERM and SIGINT, which the
/// kernel sends on ctrl-alt-del, also reboot).
pub const SIGNAL_REBOOT: Signal = Signal::USR2;
