//! `builder`: the thin command line over the builder library.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use builder::plan::{self, BuildRequest, ResolvedInput};
use builder::treefile::BlobDir;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "builder",
    version,
    about = "Build reproducible disk images, UKIs and initramfs from an image definition"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build every output of a definition from inputs in a blob store.
    Build {
        /// The image definition (TOML).
        definition: PathBuf,
        /// Directory holding `blobs/sha256/<hex>` (an OCI layout).
        #[arg(long)]
        store: PathBuf,
        /// Where the outputs go.
        #[arg(long)]
        out: PathBuf,
        /// Pin an input: NAME=sha256:HEX (repeatable).
        #[arg(long = "input", value_name = "NAME=DIGEST")]
        inputs: Vec<String>,
        /// Sign the release manifest with this secret key file
        /// (`ed25519-seed:<hex>`), for definitions that place `signature`.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Build {
            definition,
            store,
            out,
            inputs,
            key,
        } => {
            let (def, src) = builder::definition::load(&definition)?;
            let mut overrides = BTreeMap::new();
            for i in inputs {
                let Some((k, v)) = i.split_once('=') else {
                    bail!("--input {i:?}: expected NAME=sha256:HEX")
                };
                let digest = v
                    .parse()
                    .with_context(|| format!("parsing --input {i:?}"))?;
                overrides.insert(
                    k.to_string(),
                    ResolvedInput {
                        digest,
                        origin: None,
                    },
                );
            }
            let epoch = builder::definition::epoch(
                &def,
                std::env::var("SOURCE_DATE_EPOCH").ok().as_deref(),
            )
            .map_err(anyhow::Error::msg)?;
            let blobs = BlobDir::new(store);
            let key = match &key {
                None => None,
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Some(
                        builder::signature::parse_secret_key(&text)
                            .with_context(|| format!("parsing {}", p.display()))?,
                    )
                }
            };
            let signer = key.map(|k| {
                move |m: &[u8]| -> Result<Vec<u8>, String> { Ok(builder::signature::sign(&k, m)) }
            });
            let req = BuildRequest {
                inputs: plan::resolve_inputs(&def, &overrides)?,
                definition: &def,
                source: &src,
                blobs: &blobs,
                epoch,
                out_dir: &out,
                sign: signer.as_ref().map(|s| s as &plan::Signer),
            };
            let r =
                plan::build(&req).with_context(|| format!("building {}", definition.display()))?;
            println!("release {}", r.release);
            if let Some((p, d)) = r.disk {
                println!("disk {} {d}", p.display());
            }
            Ok(())
        }
    }
}
