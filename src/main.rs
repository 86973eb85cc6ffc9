//! The `vae` command line: parses arguments and dispatches to the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vae::{config, eval, train};

#[derive(Parser)]
#[command(
    name = "vae",
    version,
    about = "Variational autoencoder (Kingma & Welling 2013): train, evaluate, sample"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a config into a new run directory (runs/<name>/).
    Train {
        /// Config file; a bare name also finds configs/NAME and the shipped configs.
        #[arg(long, short, default_value = "mnist.toml")]
        config: String,
        /// Override a config key, e.g. --set train.lr=3e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Train into this directory instead of <out_dir>/<name>.
        #[arg(long, value_name = "DIR")]
        run: Option<PathBuf>,
        /// auto | cpu | cuda | cuda:N (overrides the config's `device`).
        #[arg(long)]
        device: Option<String>,
        /// Print no config and no progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Evaluate a run's checkpoint on the whole test set: -ELBO, reconstruction, KL in nats.
    Eval {
        /// Run directory (default: the one runs/latest names).
        #[arg(long, value_name = "DIR")]
        run: Option<String>,
        /// auto | cpu | cuda | cuda:N (default: the run's config).
        #[arg(long)]
        device: Option<String>,
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    vae::device::init_cpu_threads();
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train {
            config,
            mut set,
            run,
            device,
            quiet,
        } => {
            if let Some(d) = device {
                set.push(format!("device={d}"));
            }
            let cfg = config::resolve(&config::find(&config)?, &set)?;
            train::train(&cfg, &train::Options { run, quiet })?;
        }
        Cmd::Eval { run, device, json } => eval::run_eval(run.as_deref(), device.as_deref(), json)?,
    }
    Ok(())
}
