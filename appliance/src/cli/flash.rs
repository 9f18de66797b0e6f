//! `appliance flash TARGET [--image PATH] [--bmap MAP] [--yes]`: the thin CLI over
//! [`crate::flash::flash`], with a progress bar on a terminal and plain
//! periodic lines otherwise.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::flash::{self, System};
use crate::writer::{Phase, Progress, WriteOptions};

/// `appliance flash`.
#[derive(Debug, Args)]
pub struct FlashCmd {
    /// Block device (e.g. /dev/sdb) or image file to write; a missing
    /// file is created.
    pub target: PathBuf,
    /// Image to write (its block map is --bmap, else IMAGE.bmap, else
    /// computed).
    #[arg(long, default_value = flash::DEFAULT_IMAGE)]
    pub image: PathBuf,
    /// The image's block map, in bmaptool's format (`appliance bmap`,
    /// `bmaptool create`); checked against the image.
    #[arg(long, conflicts_with = "from")]
    pub bmap: Option<PathBuf>,
    /// Fetch the image from another appliance instead (its base URL, e.g.
    /// http://10.77.1.1): only its data ranges travel, each checked against
    /// the served block map.
    #[arg(long, conflicts_with = "image")]
    pub from: Option<String>,
    /// Do not ask (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Leave bytes between the image's data ranges as the target has them
    /// (fine for a blank target) instead of zeroing them.
    #[arg(long)]
    pub keep_holes: bool,
    /// Data directory; the disk holding it is never written
    /// [default: config file's `data`, else /data].
    #[arg(long, env = "APPLIANCE_DATA")]
    pub data: Option<PathBuf>,
    /// Print the report as JSON (the global `--json`).
    #[arg(skip)]
    pub json: bool,
}

/// Runs `appliance flash`.
pub fn run(cmd: FlashCmd) -> Result<()> {
    let data = super::defaults::data(cmd.data.clone())?;
    let sys = System::current(&data);
    if let Some(base) = &cmd.from {
        if !cmd.yes {
            bail!(
                "flash --from needs --yes (it overwrites {})",
                cmd.target.display()
            );
        }
        let opts = WriteOptions {
            zero_holes: !cmd.keep_holes,
            ..WriteOptions::default()
        };
        let mut reporter = Reporter::new(std::io::stderr().is_terminal());
        let report =
            flash::flash_from(&sys, base, &cmd.target, &opts, &mut |p| reporter.update(p))?;
        reporter.finish();
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let given = match &cmd.bmap {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let bmap = flash::image_map(&cmd.image, given)?;
    // Refusals first: nothing is asked about a target we would not write.
    flash::check_target(&sys, &cmd.target, &cmd.image, bmap.image_size)?;
    let what = format!(
        "{} with {} ({} MiB image, {} MiB of data)",
        cmd.target.display(),
        cmd.image.display(),
        bmap.image_size >> 20,
        bmap.mapped_bytes().div_ceil(1 << 20)
    );
    if !cmd.yes {
        if !std::io::stdin().is_terminal() {
            bail!("refusing to overwrite {what} without --yes (stdin is not a terminal)");
        }
        eprint!("This overwrites {what}; everything on it is lost. Type yes to go on: ");
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("reading the answer")?;
        if answer.trim() != "yes" {
            bail!("not confirmed; {} is untouched", cmd.target.display());
        }
    }
    let opts = WriteOptions {
        zero_holes: !cmd.keep_holes,
        ..WriteOptions::default()
    };
    let mut reporter = Reporter::new(std::io::stderr().is_terminal());
    let report = flash::flash(&sys, &cmd.image, &bmap, &cmd.target, &opts, &mut |p| {
        reporter.update(p)
    })?;
    reporter.finish();
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "flashed {}: {} MiB written, verified{}; write {:.1}s, verify {:.1}s, finish {:.1}s, {} retries",
            cmd.target.display(),
            report.bytes_written >> 20,
            if report.grown { ", partition table grown to the target" } else { "" },
            report.write_secs,
            report.verify_secs,
            report.finish_secs,
            report.retries
        );
        if let Some(e) = &report.reread_error {
            println!("note: the kernel did not re-read the partition table: {e}");
        }
    }
    Ok(())
}

/// A progress bar on a terminal, else a line every 5 seconds and per phase.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    phase: Option<Phase>,
    last_line: Instant,
}

impl Reporter {
    fn new(terminal: bool) -> Reporter {
        Reporter {
            bar: terminal.then(indicatif::ProgressBar::hidden),
            phase: None,
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, p: Progress) {
        let name = match p.phase {
            Phase::Write => "writing",
            Phase::Verify => "verifying",
            Phase::Finish => "finishing",
        };
        let new_phase = self.phase != Some(p.phase);
        self.phase = Some(p.phase);
        match &mut self.bar {
            Some(bar) => {
                if new_phase {
                    bar.finish();
                    *bar = indicatif::ProgressBar::new(p.total).with_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_message(name);
                }
                bar.set_position(p.done);
            }
            None => {
                if new_phase
                    || p.done == p.total
                    || self.last_line.elapsed() >= Duration::from_secs(5)
                {
                    eprintln!("{name}: {} of {} MiB", p.done >> 20, p.total >> 20);
                    self.last_line = Instant::now();
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// `appliance bmap`.
#[derive(Debug, Args)]
pub struct BmapCmd {
    /// Image to map.
    pub image: PathBuf,
    /// Largest range in bytes (a multiple of 4096, at most 64 MiB).
    #[arg(long, default_value_t = crate::bmap::DEFAULT_CHUNK)]
    pub chunk_size: u64,
    /// Write the map to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// Runs `appliance bmap`: prints or writes the image's block map
/// (bmaptool's XML; `bmaptool copy IMAGE TARGET` finds it as IMAGE.bmap).
pub fn bmap(cmd: BmapCmd) -> Result<()> {
    let b = crate::bmap::Bmap::from_file(&cmd.image, cmd.chunk_size)?;
    match &cmd.output {
        Some(out) => {
            std::fs::write(out, b.to_bytes()).with_context(|| format!("writing {}", out.display()))
        }
        None => std::io::stdout()
            .write_all(&b.to_bytes())
            .context("writing to stdout"),
    }
}
